//! The command line: `tether run`, `tether check`, `tether demo`, `tether simulate`,
//! `tether upgrade`.

use std::io::{IsTerminal, Write};
use std::net::SocketAddr;
use std::path::PathBuf;
use std::process::ExitCode;
use std::sync::OnceLock;
use std::time::Duration;

use clap::{Parser, Subcommand};

use crate::config;
use crate::demo::{self, DemoBackend};
use crate::line_writer::LineWriter;
use crate::server::{self, Server};

#[derive(Debug, Parser)]
#[command(name = "tether", version, about = "An HTTP load balancer whose speciality is session persistence")]
struct Cli {
    /// More log output: -v for debug, -vv for trace (RUST_LOG overrides).
    #[arg(short, long, action = clap::ArgAction::Count, global = true)]
    verbose: u8,
    #[command(subcommand)]
    command: Command,
}

#[derive(Debug, Subcommand)]
enum Command {
    /// Run the balancer with a config file.
    Run {
        /// The config file.
        #[arg(short, long, value_name = "FILE")]
        config: PathBuf,
        /// Worker threads, overriding `runtime.threads` (1 is the fastest per core; N runs
        /// N single-threaded workers with a SO_REUSEPORT socket each per listener).
        #[arg(long)]
        threads: Option<usize>,
    },
    /// Upgrade a running Tether to the binary now at the path it was started from, without
    /// dropping a connection: sends it SIGUSR2 and waits until the new process serves
    /// (exit 0, its pid on stdout) or the upgrade failed (exit 1; the old process serves on).
    Upgrade {
        /// The running Tether's process id (SIGUSR2 ends a process that is not a Tether).
        #[arg(long, required_unless_present = "pid_file", conflicts_with = "pid_file")]
        pid: Option<u32>,
        /// A file holding the running Tether's process id.
        #[arg(long, value_name = "FILE")]
        pid_file: Option<PathBuf>,
        /// Seconds to wait for the outcome.
        #[arg(long, default_value_t = 60)]
        timeout: u64,
    },
    /// Check a config file and exit: 0 when it is valid, 1 with located errors otherwise.
    Check {
        #[arg(short, long, value_name = "FILE")]
        config: PathBuf,
    },
    /// Run three demo backends and a balancer in front of them, ready to curl.
    Demo {
        /// Port of the balancer on 127.0.0.1.
        #[arg(long, default_value_t = 8080)]
        port: u16,
        /// Port of the balancer's HTTPS listener on 127.0.0.1 (a certificate for localhost
        /// and 127.0.0.1 is made at start).
        #[arg(long, default_value_t = 8443)]
        https_port: u16,
        /// Port of the first demo backend; the others take the next two.
        #[arg(long, default_value_t = 9001)]
        backend_port: u16,
        /// Port of the admin listener (dashboard, API, metrics) on 127.0.0.1.
        #[arg(long, default_value_t = 9901)]
        admin_port: u16,
        /// Worker threads.
        #[arg(long, default_value_t = 1)]
        threads: usize,
    },
    /// Simulate a scenario: Tether's own placement code over synthetic clients in
    /// simulated time, per strategy; prints a table, and writes an HTML report with --html.
    Simulate {
        /// The scenario file (see examples/simulate/).
        scenario: PathBuf,
        /// Write a self-contained HTML report (SVG charts) here.
        #[arg(long, value_name = "PATH")]
        html: Option<PathBuf>,
        /// The seed of the run, overriding the scenario's.
        #[arg(long)]
        seed: Option<u64>,
    },
    /// Run one demo backend on its own (tests kill it with SIGKILL).
    #[command(hide = true)]
    Backend {
        #[arg(long)]
        name: String,
        #[arg(long, default_value = "127.0.0.1:0")]
        bind: SocketAddr,
    },
}

pub fn main() -> ExitCode {
    let cli = Cli::parse();
    // A simulation logs every health transition of every strategy it runs; its output is
    // the report, so its log is only on when asked for.
    if !matches!(cli.command, Command::Simulate { .. }) || cli.verbose > 0 {
        init_logging(cli.verbose);
    }
    raise_open_files_limit();
    let code = run_command(cli);
    // Lines still queued for the log writer thread go out before the process exits.
    flush_logs(Duration::from_secs(2));
    code
}

fn run_command(cli: Cli) -> ExitCode {
    let result = match cli.command {
        Command::Check { config } => match config::load(&config) {
            Ok(c) => {
                let backends: usize = c.pools.iter().map(|p| p.backends.len()).sum();
                let sources: usize = c.pools.iter().map(|p| p.dns.len()).sum();
                // DNS sources are counted, never looked up, by a check.
                let dns = if sources > 0 { format!(", {sources} dns sources") } else { String::new() };
                let splits = match c.splits().count() {
                    0 => String::new(),
                    n => format!(", {n} splits"),
                };
                println!(
                    "{}: ok ({} listeners, {} pools, {} backends{dns}{splits})",
                    config.display(),
                    c.listeners.len(),
                    c.pools.len(),
                    backends
                );
                return ExitCode::SUCCESS;
            }
            Err(e) => {
                eprintln!("{e}");
                return ExitCode::FAILURE;
            }
        },
        Command::Simulate { scenario, html, seed } => match crate::simulate::scenario::load(&scenario) {
            Ok(sc) => simulate(&sc, html, seed),
            Err(e) => {
                eprintln!("{e}");
                return ExitCode::FAILURE;
            }
        },
        Command::Run { config, threads } => run(config, threads),
        Command::Upgrade { pid, pid_file, timeout } => {
            return upgrade(pid, pid_file, Duration::from_secs(timeout));
        }
        Command::Demo { port, https_port, backend_port, admin_port, threads } => {
            run_demo(port, https_port, backend_port, admin_port, threads)
        }
        Command::Backend { name, bind } => server::Runtimes::new(1).map_err(anyhow::Error::from).and_then(|rt| {
            rt.block_on(async move {
                let b = DemoBackend::start(&name, bind).await?;
                tracing::info!(backend = %name, "listening on {}", b.address);
                std::future::pending::<()>().await;
                Ok(())
            })
        }),
    };
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            tracing::error!("{e:#}");
            ExitCode::FAILURE
        }
    }
}

/// Runs a scenario, printing the table (and a progress line on stderr when it is a
/// terminal) and writing the HTML report when asked.
fn simulate(sc: &crate::simulate::Scenario, html: Option<PathBuf>, seed: Option<u64>) -> anyhow::Result<()> {
    let tty = std::io::stderr().is_terminal();
    let started = std::time::Instant::now();
    let mut last_shown = started;
    let report = crate::simulate::run(sc, seed, &mut |done, total| {
        if tty && (last_shown.elapsed() >= Duration::from_millis(100) || done == total) {
            last_shown = std::time::Instant::now();
            let width = 30;
            let filled = (done * width / total.max(1)) as usize;
            let bar = format!("{}{}", "#".repeat(filled), ".".repeat(width as usize - filled));
            eprint!("\rsimulating [{bar}] {:3}%", done * 100 / total.max(1));
            let _ = std::io::stderr().flush();
        }
    });
    if tty {
        eprintln!("\r\x1b[2Ksimulated in {:.1}s", started.elapsed().as_secs_f64());
    }
    // A closed stdout (`| head`) is not an error worth a panic.
    let mut out = std::io::stdout().lock();
    let _ = out.write_all(report.table().as_bytes());
    if let Some(path) = html {
        std::fs::write(&path, report.html())
            .map_err(|e| anyhow::anyhow!("cannot write the HTML report to {}: {e}", path.display()))?;
        let _ = writeln!(out, "\nHTML report: {}", path.display());
    }
    Ok(())
}

fn init_logging(verbose: u8) {
    let default = match verbose {
        0 => "info",
        1 => "debug",
        _ => "trace",
    };
    let filter = tracing_subscriber::EnvFilter::try_from_default_env()
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new(default));
    let writer = LOG.get_or_init(LogOutput::start);
    tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(writer)
        .with_ansi(std::io::stderr().is_terminal())
        // A closed stderr must never take Tether down: by default tracing-subscriber
        // reports a failed write with eprintln!, which panics when stderr is gone.
        .log_internal_errors(false)
        .init();
    // A panic's own message goes straight to stderr; what was logged before it goes first.
    let previous = std::panic::take_hook();
    std::panic::set_hook(Box::new(move |info| {
        flush_logs(Duration::from_millis(500));
        previous(info);
    }));
}

/// Raises the soft limit on open files to the hard limit: every client and backend
/// connection is a descriptor, and the usual soft limit (1024) is far below what a
/// balancer holds.
fn raise_open_files_limit() {
    let mut lim = libc::rlimit { rlim_cur: 0, rlim_max: 0 };
    // SAFETY: `lim` is a valid `rlimit` for getrlimit to fill and setrlimit to read.
    if unsafe { libc::getrlimit(libc::RLIMIT_NOFILE, &mut lim) } != 0 {
        tracing::debug!("cannot read the open files limit: {}", std::io::Error::last_os_error());
        return;
    }
    if lim.rlim_cur >= lim.rlim_max {
        tracing::debug!(limit = lim.rlim_cur, "open files limit already at its maximum");
        return;
    }
    let old = lim.rlim_cur;
    lim.rlim_cur = lim.rlim_max;
    // SAFETY: as above.
    if unsafe { libc::setrlimit(libc::RLIMIT_NOFILE, &lim) } == 0 {
        tracing::debug!(from = old, to = lim.rlim_cur, "raised the open files limit");
    } else {
        tracing::debug!(limit = old, "cannot raise the open files limit: {}", std::io::Error::last_os_error());
    }
}

/// The log writer of this process, once logging is set up.
static LOG: OnceLock<LogOutput> = OnceLock::new();

/// Lines of log waiting for the writer thread; more are dropped (and counted).
const LOG_QUEUE: usize = 4096;

/// Log lines go to stderr through a [`LineWriter`], so that a slow or blocked stderr never
/// stalls a runtime thread; dropped lines are noticed in the log when it flows again.
#[derive(Debug)]
struct LogOutput(Option<LineWriter>);

impl LogOutput {
    fn start() -> LogOutput {
        match LineWriter::start("tether-log", Box::new(std::io::stderr()), LOG_QUEUE, true) {
            Ok(w) => LogOutput(Some(w)),
            Err(e) => {
                // Without the thread nothing would ever be written; say so once, directly.
                let _ = writeln!(std::io::stderr(), "tether: cannot start the log writer thread: {e}");
                LogOutput(None)
            }
        }
    }
}

/// Waits up to `limit` for queued log lines to be written.
fn flush_logs(limit: Duration) {
    if let Some(LogOutput(Some(w))) = LOG.get() {
        w.wait_written(limit);
    }
}

impl Write for &LogOutput {
    /// Queues `buf` (one formatted event) without waiting.
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        if let Some(w) = &self.0 {
            w.send(buf.to_vec());
        }
        Ok(buf.len())
    }

    fn flush(&mut self) -> std::io::Result<()> {
        Ok(())
    }
}

impl tracing_subscriber::fmt::MakeWriter<'_> for &'static LogOutput {
    type Writer = &'static LogOutput;

    fn make_writer(&self) -> &'static LogOutput {
        self
    }
}

/// `tether upgrade`: the outcome on stdout (the new pid) or stderr.
fn upgrade(pid: Option<u32>, pid_file: Option<PathBuf>, limit: Duration) -> ExitCode {
    let pid = match (pid, pid_file) {
        (Some(pid), _) => Ok(pid),
        (None, Some(file)) => std::fs::read_to_string(&file)
            .map_err(|e| format!("cannot read {}: {e}", file.display()))
            .and_then(|t| t.trim().parse().map_err(|_| format!("{} does not hold a process id", file.display()))),
        (None, None) => Err("give --pid or --pid-file".to_string()),
    };
    let result = pid.map_err(anyhow::Error::msg).and_then(|pid| crate::upgrade::request(pid, limit));
    match result {
        Ok(new) => {
            println!("{new}");
            ExitCode::SUCCESS
        }
        Err(e) => {
            eprintln!("tether upgrade: {e:#}");
            ExitCode::FAILURE
        }
    }
}

fn run(path: PathBuf, threads: Option<usize>) -> anyhow::Result<()> {
    // The path of this binary as it is now: an upgrade starts what that path names then.
    crate::upgrade::remember_executable();
    // Started by an upgrade: take what the old process hands over before anything else,
    // so that a failure ends this process (and the old one serves on) before it serves.
    let handed = crate::upgrade::receive().transpose().map_err(|e| e.context("upgrade: nothing was handed over"))?;
    let mut config = match config::load(&path) {
        Ok(c) => c,
        Err(e) => anyhow::bail!("invalid config:\n{e}"),
    };
    if let Some(t) = threads {
        anyhow::ensure!((1..=1024).contains(&t), "--threads must be 1 to 1024");
        config.threads = t;
    }
    tracing::info!(version = env!("CARGO_PKG_VERSION"), threads = config.threads, "starting tether");
    let runtimes = server::Runtimes::new(config.threads)?;
    let workers = runtimes.worker_handles();
    runtimes.block_on(
        async move { Server::start_with(config, Some(path), workers, handed).await?.run_until_signal().await },
    )
}

/// Lets the demo's user stop and restart backends by typing their number.
async fn toggle_backends_from_stdin(backends: Vec<DemoBackend>) {
    let (tx, mut rx) = tokio::sync::mpsc::unbounded_channel::<String>();
    std::thread::spawn(move || {
        use std::io::BufRead;
        for line in std::io::stdin().lock().lines().map_while(Result::ok) {
            if tx.send(line).is_err() {
                break;
            }
        }
    });
    let places: Vec<(String, SocketAddr)> = backends.iter().map(|b| (b.name.clone(), b.address)).collect();
    let mut running: Vec<Option<DemoBackend>> = backends.into_iter().map(Some).collect();
    while let Some(line) = rx.recv().await {
        let Some(i) = line.trim().parse::<usize>().ok().filter(|n| (1..=running.len()).contains(n)).map(|n| n - 1)
        else {
            continue;
        };
        let (name, address) = &places[i];
        match running[i].take() {
            Some(b) => {
                b.stop();
                println!("{name} stopped: its visitors will be re-pinned to another backend");
            }
            None => match DemoBackend::start(name, *address).await {
                Ok(b) => {
                    running[i] = Some(b);
                    println!("{name} started again on {address}: it takes new visitors");
                }
                Err(e) => println!("{name} could not start again: {e}"),
            },
        }
    }
    // Standard input closed (the demo runs detached): keep the backends running.
    std::future::pending::<()>().await;
    drop(running);
}

fn run_demo(port: u16, https_port: u16, backend_port: u16, admin_port: u16, threads: usize) -> anyhow::Result<()> {
    anyhow::ensure!(backend_port <= u16::MAX - 2, "--backend-port must leave room for three ports");
    // Port 0 lets the system choose free ports for the backends (the tests use it).
    let wanted = if backend_port == 0 { [0; 3] } else { [backend_port, backend_port + 1, backend_port + 2] };
    let runtimes = server::Runtimes::new(threads.clamp(1, 1024))?;
    let workers = runtimes.worker_handles();
    runtimes.block_on(async move {
        let mut backends = Vec::new();
        for (i, p) in wanted.iter().enumerate() {
            let name = format!("app-{}", i + 1);
            let b = DemoBackend::start(&name, SocketAddr::from(([127, 0, 0, 1], *p))).await.map_err(|e| {
                anyhow::anyhow!(
                    "demo backend {name}: cannot bind 127.0.0.1:{p}: {e} (choose others with --backend-port)"
                )
            })?;
            backends.push(b);
        }
        let ports = [backends[0].address.port(), backends[1].address.port(), backends[2].address.port()];
        // The HTTPS listener's certificate, made for this run and removed after it.
        let dir = std::env::temp_dir().join(format!("tether-demo-{}", std::process::id()));
        let (cert, key) = demo::certificate(&dir)?;
        struct Remove(std::path::PathBuf);
        impl Drop for Remove {
            fn drop(&mut self) {
                let _ = std::fs::remove_dir_all(&self.0);
            }
        }
        let _remove = Remove(dir);
        let tls = demo::DemoTls { port: https_port, cert: &cert, key: &key };
        let mut config = config::parse(&demo::config_text(port, ports, admin_port, Some(&tls)), "<demo config>")?;
        config.threads = threads.clamp(1, 1024);
        let server = Server::start(config, None, workers).await?;
        let lb = server.addresses[0].1;
        let tls_lb = server.addresses[1].1;
        let admin = server.admin_address.map_or_else(String::new, |a| format!("http://{a}/"));
        let list: Vec<String> = backends.iter().map(|b| format!("{} on {}", b.name, b.address)).collect();
        println!(
            "\nTether demo: a balancer on http://{lb}/ in front of three demo backends ({}).\n\
             Each backend counts your visits in its own memory.\n\n\
             Try, from another shell:\n\
             \x20 curl -s http://{lb}/                  # round robin: app-1, app-2, app-3 in turn\n\
             \x20 curl -s -b jar -c jar http://{lb}/    # a visitor with a cookie jar\n\
             \x20 curl -s http://{lb}/headers           # the request as a backend sees it\n\
             \x20 curl -sk https://{tls_lb}/            # over HTTPS (a certificate made at start)\n\
             \x20 curl -sk --http2 -i https://{tls_lb}/ # HTTP/2 over TLS; the cookie is Secure\n\n\
             Visitors with a cookie jar stay on one backend (Tether's `tether` cookie pins them).\n\
             Watch sessions land on backends, and drain one, on the dashboard: {admin}\n\
             Type 1, 2 or 3 and Enter here to stop or restart that backend: its visitors re-pin.\n\
             Every request is logged below. Stop with Ctrl-C.\n",
            list.join(", ")
        );
        tokio::spawn(toggle_backends_from_stdin(backends));
        server.run_until_signal().await?;
        Ok(())
    })
}
