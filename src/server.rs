//! A running Tether: the runtime, and starting everything (listeners through `control`,
//! the admin listener, the health supervisor, the once-a-second housekeeping), then
//! serving until a signal: SIGHUP reloads, SIGTERM and SIGINT shut down gracefully.
//!
//! Shutdown uses one `watch` channel. Every accept loop, client connection and upgraded
//! tunnel holds a receiver; shutdown sends `true` (accept loops stop, connections finish
//! their requests and close) and then waits, up to the grace period, for the channel's
//! last receiver to go.

use std::io;
use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::Arc;

use anyhow::Context as _;

use crate::access_log::AccessLog;
use crate::config::Config;
use crate::control::Control;
use crate::pool::Snapshot;
use crate::state::Shared;

/// Builds the runtime the config asks for: one thread runs everything on the calling
/// thread with no work stealing, which is the fastest setting per core.
pub fn runtime(threads: usize) -> io::Result<tokio::runtime::Runtime> {
    if threads <= 1 {
        tokio::runtime::Builder::new_current_thread().enable_all().build()
    } else {
        tokio::runtime::Builder::new_multi_thread().worker_threads(threads).enable_all().build()
    }
}

/// A started Tether, listening.
pub struct Server {
    pub control: Arc<Control>,
    /// Each listener's name and the address it was bound to at start.
    pub addresses: Vec<(String, SocketAddr)>,
    /// The admin listener's address, when the config has `[admin]`.
    pub admin_address: Option<SocketAddr>,
    /// SIGTERM, SIGINT and SIGHUP, caught from before the first listener opens so that
    /// a signal sent as soon as Tether says it listens is never missed.
    signals: [tokio::signal::unix::Signal; 3],
}

impl Server {
    /// Binds every listener and starts accepting. `source` is the file to re-read on
    /// SIGHUP.
    pub async fn start(config: Config, source: Option<PathBuf>) -> anyhow::Result<Server> {
        use tokio::signal::unix::{signal, SignalKind};
        let signals =
            [signal(SignalKind::terminate())?, signal(SignalKind::interrupt())?, signal(SignalKind::hangup())?];
        let access_log = AccessLog::open(&config.access_log).context("cannot open the access log")?;
        let config = Arc::new(config);
        let shared = Arc::new(Shared::new(Snapshot::build(config.clone(), None), access_log));
        let control = Arc::new(Control::new(shared.clone(), config.clone(), source));
        let mut addresses = Vec::new();
        for l in &config.listeners {
            addresses.push((l.name.clone(), control.open_listener(l)?));
        }
        // The admin listener is control's to move on reload; what serves it is the admin
        // module's, handed over here. It holds the control weakly, so the two do not keep
        // each other alive.
        let weak = Arc::downgrade(&control);
        let admin_address = control.start_admin(Box::new(move |listener, stopped| {
            if let Some(control) = weak.upgrade() {
                tokio::spawn(crate::admin::serve(listener, control, stopped));
            }
        }))?;
        tokio::spawn(crate::housekeeping::run(shared.clone(), control.shutdown_signal()));
        tokio::spawn(crate::health::supervise(shared.clone(), control.shutdown_signal()));
        Ok(Server { control, addresses, admin_address, signals })
    }

    /// Serves until SIGTERM or SIGINT, reloading on SIGHUP, then shuts down gracefully.
    pub async fn run_until_signal(self) -> anyhow::Result<()> {
        let Server { control, signals, .. } = self;
        let [mut term, mut int, mut hup] = signals;
        loop {
            tokio::select! {
                _ = term.recv() => { tracing::info!("SIGTERM: shutting down"); break }
                _ = int.recv() => { tracing::info!("SIGINT: shutting down"); break }
                _ = hup.recv() => { let _ = control.reload(); }
            }
        }
        control.shutdown().await;
        Ok(())
    }
}
