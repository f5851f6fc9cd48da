//! Lines written by a thread of their own, from a bounded queue: whoever writes a line
//! never waits on the output (a slow disk, a pipe nobody reads), and memory stays bounded.
//!
//! A line that finds the queue full is dropped and counted. The writer thread batches
//! what is queued into a buffered writer and flushes whenever the queue runs dry, so a
//! burst costs one write system call. The access log and the process's own log both write
//! through one.

use std::io::{self, Write};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::mpsc::{self, Receiver, SyncSender};
use std::sync::{Arc, Condvar, Mutex};
use std::time::Duration;

/// The sending end: cheap to clone, shared by everything that writes lines.
#[derive(Debug, Clone)]
pub struct LineWriter {
    tx: SyncSender<Vec<u8>>,
    counts: Arc<Counts>,
}

#[derive(Debug, Default)]
struct Counts {
    /// Lines queued so far.
    queued: AtomicU64,
    /// Lines dropped because the queue was full (or the writer thread gone).
    dropped: AtomicU64,
    /// Lines written (or given up on) so far, for [`LineWriter::wait_written`].
    written: Mutex<u64>,
    advanced: Condvar,
}

impl LineWriter {
    /// Starts a thread named `name` that writes to `out`, with room for `queue` waiting
    /// lines. With `notice_drops`, the output itself is told how many lines were dropped
    /// once it takes lines again (for a log people read; the access log counts its drops
    /// in a metric instead, so its lines stay one per request).
    pub fn start(name: &str, out: Box<dyn Write + Send>, queue: usize, notice_drops: bool) -> io::Result<LineWriter> {
        let (tx, rx) = mpsc::sync_channel(queue);
        let counts = Arc::new(Counts::default());
        let c = counts.clone();
        std::thread::Builder::new().name(name.into()).spawn(move || write_lines(rx, out, &c, notice_drops))?;
        Ok(LineWriter { tx, counts })
    }

    /// Queues `line` (with its own line end) without waiting; a full queue drops it.
    pub fn send(&self, line: Vec<u8>) {
        match self.tx.try_send(line) {
            Ok(()) => {
                self.counts.queued.fetch_add(1, Ordering::Relaxed);
            }
            Err(_) => {
                self.counts.dropped.fetch_add(1, Ordering::Relaxed);
            }
        }
    }

    /// Lines dropped so far.
    pub fn dropped(&self) -> u64 {
        self.counts.dropped.load(Ordering::Relaxed)
    }

    /// Waits up to `limit` until every line queued so far has been written.
    pub fn wait_written(&self, limit: Duration) {
        let target = self.counts.queued.load(Ordering::Relaxed);
        let written = self.counts.written.lock().unwrap_or_else(|e| e.into_inner());
        let _ = self.counts.advanced.wait_timeout_while(written, limit, |w| *w < target);
    }
}

/// The writer thread: writes what is queued until every sender is gone. Write errors are
/// ignored: a closed output must never take Tether down.
fn write_lines(rx: Receiver<Vec<u8>>, out: Box<dyn Write + Send>, counts: &Counts, notice_drops: bool) {
    let mut out = io::BufWriter::with_capacity(64 * 1024, out);
    let mut noticed = 0;
    while let Ok(first) = rx.recv() {
        if notice_drops {
            let dropped = counts.dropped.load(Ordering::Relaxed);
            if dropped > noticed {
                let _ = writeln!(out, "tether: {} log lines dropped: the output was too slow", dropped - noticed);
                noticed = dropped;
            }
        }
        let _ = out.write_all(&first);
        let mut lines = 1;
        while let Ok(line) = rx.try_recv() {
            let _ = out.write_all(&line);
            lines += 1;
        }
        let _ = out.flush();
        *counts.written.lock().unwrap_or_else(|e| e.into_inner()) += lines;
        counts.advanced.notify_all();
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// An output that keeps what it gets, shared with the test.
    #[derive(Clone, Default)]
    struct Kept(Arc<Mutex<Vec<u8>>>);

    impl Write for Kept {
        fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
            self.0.lock().unwrap().extend_from_slice(buf);
            Ok(buf.len())
        }

        fn flush(&mut self) -> io::Result<()> {
            Ok(())
        }
    }

    #[test]
    fn queued_lines_are_written_and_waited_for() {
        let kept = Kept::default();
        let w = LineWriter::start("test-lines", Box::new(kept.clone()), 64, false).unwrap();
        for i in 0..50 {
            w.send(format!("line {i}\n").into_bytes());
        }
        w.wait_written(Duration::from_secs(10));
        let text = String::from_utf8(kept.0.lock().unwrap().clone()).unwrap();
        assert_eq!(text.lines().count(), 50, "{text}");
        assert_eq!(w.dropped(), 0);
    }

    #[test]
    fn drops_are_noticed_in_the_output_only_when_asked() {
        for notice in [true, false] {
            let kept = Kept::default();
            let w = LineWriter::start("test-lines", Box::new(kept.clone()), 64, notice).unwrap();
            // As if three lines had found the queue full.
            w.counts.dropped.fetch_add(3, Ordering::Relaxed);
            w.send(b"after\n".to_vec());
            w.wait_written(Duration::from_secs(10));
            let text = String::from_utf8(kept.0.lock().unwrap().clone()).unwrap();
            let said = text.contains("tether: 3 log lines dropped");
            assert_eq!(said, notice, "{text}");
            assert!(text.ends_with("after\n"), "{text}");
        }
    }
}
