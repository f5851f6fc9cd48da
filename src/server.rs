//! A running Tether: its runtimes (see [`Runtimes`]), and starting everything (listeners
//! through `control`, the admin listener, the health supervisor, the once-a-second
//! housekeeping), then serving until a signal: SIGHUP reloads, SIGTERM and SIGINT shut
//! down gracefully.
//!
//! Shutdown uses one `watch` channel. Every accept loop, client connection and upgraded
//! tunnel holds a receiver, on whichever worker it runs; shutdown sends `true` (accept
//! loops stop, connections finish their requests and close) and then waits, up to the
//! grace period, for the channel's last receiver to go. Only then are the workers' runtimes
//! stopped, which drops whatever the grace period left open.
//!
//! With `runtime.state_dir`, the learned tables and admin overrides a previous process
//! saved are restored before the first listener opens, and saved again once shutdown is
//! done (`warm`). Under systemd, readiness, reloads and stopping are reported through
//! `sd_notify`.
//!
//! SIGUSR2 upgrades the binary (`upgrade`): a new process gets the listening sockets and
//! the learned state, and once it serves this one stops accepting, finishes its
//! connections within the grace period and exits, saving nothing (the new process has it).

use std::future::Future;
use std::io;
use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::Arc;
use std::thread::JoinHandle;
use std::time::Duration;

use anyhow::Context as _;
use tokio::runtime::{Handle, Runtime};
use tokio::sync::oneshot;

use crate::access_log::AccessLog;
use crate::config::Config;
use crate::control::Control;
use crate::pool::Snapshot;
use crate::state::Shared;

/// How long a stopping worker waits for its runtime's blocking tasks (it has none of its
/// own; this bounds what a library might have started).
const WORKER_STOP: Duration = Duration::from_secs(1);

/// The runtimes of a Tether process, as `runtime.threads` asks: never a work-stealing
/// pool, always single-threaded runtimes that share nothing but `Shared`'s lock-free state.
///
/// With `threads = 1`, one current-thread runtime on the calling thread runs everything:
/// the listeners, their connections and the control plane. It is the fastest setting per
/// core.
///
/// With `threads = N` (N >= 2), N worker threads, `tether-w0` to `tether-w{N-1}`, each run
/// a current-thread runtime of their own. Every traffic listener has a socket on each
/// worker (`SO_REUSEPORT`, see `listener::bind_for_workers`), so the kernel spreads new
/// connections over the workers, and a connection is accepted, served and closed on one
/// worker, with its backend connections (`tokio::spawn` puts a task on the runtime it is
/// called from, and a backend's idle native connections are kept per worker). The control
/// plane (signals, reloads, the admin listener and API, health checks, housekeeping) runs
/// on a current-thread runtime of its own on the calling thread, not on a worker:
/// `SO_REUSEPORT` spreads connections by a hash of their addresses, not by load, so a
/// worker that also did the control plane's work (a scrape, a reload building a snapshot,
/// a round of health checks) would serve its share of the connections more slowly, while
/// a thread of its own that sleeps nearly all the time costs next to nothing. It also
/// keeps signals and the admin API answering when a worker is saturated.
pub struct Runtimes {
    control: Runtime,
    workers: Vec<WorkerThread>,
}

/// A worker thread running its runtime until told to stop.
struct WorkerThread {
    handle: Handle,
    stop: Option<oneshot::Sender<()>>,
    thread: Option<JoinHandle<()>>,
}

impl Runtimes {
    /// Starts the runtimes for `threads` workers (the worker threads idle until the
    /// control plane gives them listeners).
    pub fn new(threads: usize) -> io::Result<Runtimes> {
        let single = || tokio::runtime::Builder::new_current_thread().enable_all().build();
        let control = single()?;
        let threads = threads.max(1);
        let mut workers = Vec::new();
        if threads > 1 {
            for index in 0..threads {
                let runtime = single()?;
                let handle = runtime.handle().clone();
                let (stop, stopped) = oneshot::channel::<()>();
                let thread = std::thread::Builder::new().name(format!("tether-w{index}")).spawn(move || {
                    crate::worker::set_index(index);
                    // Runs the tasks the control plane spawns here until told to stop.
                    runtime.block_on(async move {
                        let _ = stopped.await;
                    });
                    runtime.shutdown_timeout(WORKER_STOP);
                })?;
                workers.push(WorkerThread { handle, stop: Some(stop), thread: Some(thread) });
            }
        }
        Ok(Runtimes { control, workers })
    }

    /// The runtimes traffic is served on, by worker index: the workers', or with one
    /// thread the control plane's own.
    pub fn worker_handles(&self) -> Vec<Handle> {
        if self.workers.is_empty() {
            vec![self.control.handle().clone()]
        } else {
            self.workers.iter().map(|w| w.handle.clone()).collect()
        }
    }

    /// Runs `future` on the control plane's runtime, on the calling thread.
    pub fn block_on<F: Future>(&self, future: F) -> F::Output {
        self.control.block_on(future)
    }
}

impl Drop for Runtimes {
    /// Stops every worker's runtime (dropping the tasks still on it) and waits for its
    /// thread to end.
    fn drop(&mut self) {
        for w in &mut self.workers {
            if let Some(stop) = w.stop.take() {
                let _ = stop.send(());
            }
        }
        for w in &mut self.workers {
            if let Some(thread) = w.thread.take() {
                let _ = thread.join();
            }
        }
    }
}

/// A started Tether, listening.
pub struct Server {
    pub control: Arc<Control>,
    /// Each listener's name and the address it was bound to at start.
    pub addresses: Vec<(String, SocketAddr)>,
    /// The admin listener's address, when the config has `[admin]`.
    pub admin_address: Option<SocketAddr>,
    /// SIGTERM, SIGINT, SIGHUP and SIGUSR2, caught from before the first listener opens so
    /// that a signal sent as soon as Tether says it listens is never missed.
    signals: [tokio::signal::unix::Signal; 4],
    /// When an upgrade started this process: the old process, told once this one serves.
    upgraded_from: Option<crate::upgrade::Received>,
}

impl Server {
    /// Binds every listener, a socket on each of `workers` (see [`Runtimes::worker_handles`]),
    /// and starts accepting. `source` is the file to re-read on SIGHUP. Everything else
    /// (the admin listener, health checks, housekeeping) runs on the runtime this is called
    /// on.
    pub async fn start(config: Config, source: Option<PathBuf>, workers: Vec<Handle>) -> anyhow::Result<Server> {
        Server::start_with(config, source, workers, None).await
    }

    /// [`Server::start`], with what an old process handed over when an upgrade started
    /// this one: its sockets are used instead of binding where a listener's name and
    /// address match, and its state is restored instead of the state file's.
    pub(crate) async fn start_with(
        config: Config,
        source: Option<PathBuf>,
        workers: Vec<Handle>,
        mut handed: Option<crate::upgrade::Received>,
    ) -> anyhow::Result<Server> {
        use tokio::signal::unix::{signal, SignalKind};
        let signals = [
            signal(SignalKind::terminate())?,
            signal(SignalKind::interrupt())?,
            signal(SignalKind::hangup())?,
            signal(SignalKind::user_defined2())?,
        ];
        let access_log = AccessLog::open(&config.access_log).context("cannot open the access log")?;
        // State kept per worker (connection counts, backends' idle sockets) is sized by
        // this, so it is set before anything is built.
        crate::worker::set_count(workers.len());
        let config = Arc::new(config);
        let shared = Arc::new(Shared::new(Snapshot::build(config.clone(), None), access_log));
        let control = Arc::new(Control::new(shared.clone(), config.clone(), source, workers));
        // The pools' DNS sources are looked up once before anything else, so that the
        // first request (and the warm restart's restore) finds their backends.
        crate::discovery::first_round(&control).await;
        // Before any listener opens, so that the first request already finds its session.
        // An upgrade hands over the old process's state, newer than any file.
        let restored = match &handed {
            Some(h) => {
                if let Err(e) = crate::warm::restore_bytes(&control, &h.state) {
                    tracing::warn!("upgrade: the handed-over state is not used: it {e}");
                }
                None
            }
            None => config.state_dir.as_deref().and_then(|dir| crate::warm::restore(&control, dir)),
        };
        let mut addresses = Vec::new();
        for l in &config.listeners {
            let sockets = handed.as_mut().and_then(|h| h.take_listener(&l.name, l.bind));
            addresses.push((l.name.clone(), control.open_listener(l, sockets)?));
        }
        let handed_admin = handed.as_mut().and_then(|h| h.admin.take());
        if let Some(h) = handed.as_mut() {
            h.close_unused();
        }
        // The admin listener is control's to move on reload; what serves it is the admin
        // module's, handed over here. It holds the control weakly, so the two do not keep
        // each other alive.
        let weak = Arc::downgrade(&control);
        let admin_address = control.start_admin(
            Box::new(move |listener, stopped| {
                if let Some(control) = weak.upgrade() {
                    tokio::spawn(crate::admin::serve(listener, control, stopped));
                }
            }),
            handed_admin,
        )?;
        tokio::spawn(crate::housekeeping::run(shared.clone(), control.shutdown_signal()));
        tokio::spawn(crate::health::supervise(shared.clone(), control.shutdown_signal()));
        tokio::spawn(crate::discovery::run(control.clone(), control.shutdown_signal()));
        tokio::spawn(crate::fleet::keep_in_step(control.clone(), control.shutdown_signal()));
        // Started: the state file has been used, and is set aside so that a crash (which
        // saves nothing) is not followed by a start that brings back what it said then.
        if let (Some(_), Some(dir)) = (restored, &config.state_dir) {
            crate::warm::set_aside(dir);
        }
        Ok(Server { control, addresses, admin_address, signals, upgraded_from: handed })
    }

    /// Serves until SIGTERM or SIGINT, reloading on SIGHUP, then shuts down gracefully.
    pub async fn run_until_signal(self) -> anyhow::Result<()> {
        let Server { control, signals, addresses, upgraded_from, .. } = self;
        let [mut term, mut int, mut hup, mut usr2] = signals;
        // Every listener is bound and its accept loops are running: ready. Under systemd
        // after an upgrade, `MAINPID` moves to this process before the old one stops.
        let listening: Vec<String> = addresses.iter().map(|(name, a)| format!("{name} on {a}")).collect();
        crate::sd_notify::ready(&format!("serving: {}", listening.join(", ")));
        if let Some(old) = upgraded_from {
            tracing::info!("upgrade: serving; the old process stops accepting");
            old.ready();
        }
        let mut upgraded = false;
        if let Some(every) = crate::sd_notify::watchdog_interval() {
            tokio::spawn(watchdog(control.clone(), every));
        }
        loop {
            tokio::select! {
                _ = term.recv() => { tracing::info!("SIGTERM: shutting down"); break }
                _ = int.recv() => { tracing::info!("SIGINT: shutting down"); break }
                _ = usr2.recv() => {
                    tracing::info!("SIGUSR2: upgrading");
                    let outcome = crate::upgrade::hand_over(&control).await;
                    crate::upgrade::report(&outcome);
                    match outcome {
                        Ok(pid) => {
                            tracing::info!("upgrade: the new process (pid {pid}) serves; this one finishes its connections and exits");
                            upgraded = true;
                            break;
                        }
                        Err(e) => tracing::error!("upgrade failed, this process keeps serving: {e}"),
                    }
                }
                _ = hup.recv() => {
                    crate::sd_notify::reloading();
                    // Ready again either way: a rejected reload leaves the running config
                    // serving.
                    let status = match control.reload() {
                        Ok(changes) => format!("serving: reloaded, {} changes", changes.len()),
                        Err(e) => format!("serving: reload rejected, the running config stays: {}", first_line(&e.to_string())),
                    };
                    crate::sd_notify::ready(&status);
                }
            }
        }
        if upgraded {
            // Not STOPPING=1: the service goes on in the new process, which systemd now
            // knows as its main process. Nothing is saved: the new process has the state,
            // and a file written now would be older than what it learns.
            control.shutdown().await;
            return Ok(());
        }
        crate::sd_notify::stopping();
        control.shutdown().await;
        // After the connections finished: what they learned last is saved too.
        if let Some(dir) = control.shared.snapshot.load().config.state_dir.clone() {
            crate::warm::save(&control, &dir);
        }
        Ok(())
    }
}

/// Pings systemd's watchdog twice an interval while every worker runtime answers, until
/// the process ends (shutdown's grace period included). A worker that does not answer
/// within half an interval withholds the ping, and systemd, past `WatchdogSec`, restarts
/// Tether.
async fn watchdog(control: Arc<Control>, every: Duration) {
    let half = every / 2;
    let mut stuck = false;
    loop {
        let started = tokio::time::Instant::now();
        if control.workers_answer(half).await {
            crate::sd_notify::watchdog();
            stuck = false;
        } else if !stuck {
            stuck = true;
            tracing::error!(
                "a worker thread did not answer within {half:?}: the systemd watchdog is not told we are alive"
            );
        }
        tokio::time::sleep_until(started + half).await;
    }
}

/// The first line of a message (a rejected config's errors are one per line).
fn first_line(s: &str) -> &str {
    s.lines().next().unwrap_or("")
}
