//! systemd readiness and watchdog notifications (sd_notify protocol), without linking libsystemd.
//! A no-op when the agent does not run under systemd (no NOTIFY_SOCKET).

use std::os::unix::net::UnixDatagram;
use std::time::Duration;

fn send(message: &str) {
    if let Some(path) = std::env::var_os("NOTIFY_SOCKET") {
        send_to(&path, message);
    }
}

/// Sends without waiting: these calls run on the async runtime's threads, and one that blocked
/// on a manager whose queue is full (Linux queues 10 datagrams by default) would stall them, and
/// stop the agent from ever finishing its shutdown. A notification that finds the queue full is
/// dropped; the next watchdog ping goes out on time.
fn send_to(path: &std::ffi::OsStr, message: &str) {
    let Ok(socket) = UnixDatagram::unbound() else { return };
    if let Err(e) = socket.set_nonblocking(true) {
        tracing::debug!(error = %e, "sd_notify socket");
        return;
    }
    let bytes = path.as_encoded_bytes();
    let result = if let Some(name) = bytes.strip_prefix(b"@") {
        use std::os::linux::net::SocketAddrExt;
        std::os::unix::net::SocketAddr::from_abstract_name(name)
            .and_then(|addr| socket.send_to_addr(message.as_bytes(), &addr))
    } else {
        socket.send_to(message.as_bytes(), path)
    };
    if let Err(e) = result {
        tracing::debug!(error = %e, message, "sd_notify failed");
    }
}

/// Tells systemd the service is up (Type=notify).
pub fn notify_ready() {
    send("READY=1");
}

/// Tells systemd the service is stopping, so a slow drain is not mistaken for a hang.
pub fn notify_stopping() {
    send("STOPPING=1");
}

/// The interval at which to ping the watchdog (half of WatchdogSec), if one is configured.
pub fn watchdog_interval() -> Option<Duration> {
    let usec: u64 = std::env::var("WATCHDOG_USEC").ok()?.parse().ok()?;
    if let Some(pid) = std::env::var("WATCHDOG_PID").ok().and_then(|p| p.parse::<u32>().ok())
        && pid != std::process::id()
    {
        return None;
    }
    Some(Duration::from_micros(usec / 2))
}

pub fn notify_watchdog() {
    send("WATCHDOG=1");
}

/// The parts of the agent that must keep going for it to be of use: the DICOM receiver's accept
/// loop, the series tracker, the job worker and the finding log's writer. Each reports when it
/// makes progress or finds nothing to do; the watchdog is fed only while every one of them has
/// reported within its allowance. A timer alone would keep feeding it with a dead worker, and
/// systemd would never restart the agent.
#[derive(Debug)]
pub struct Liveness {
    started: std::time::Instant,
    parts: Vec<Part>,
}

#[derive(Debug)]
struct Part {
    name: &'static str,
    allowance: Duration,
    /// Milliseconds after `started` of the last report.
    last: std::sync::atomic::AtomicU64,
}

/// What one part holds to report with.
#[derive(Debug, Clone)]
pub struct Heartbeat {
    liveness: std::sync::Arc<Liveness>,
    index: usize,
}

impl Heartbeat {
    pub fn beat(&self) {
        let now = self.liveness.started.elapsed().as_millis() as u64;
        self.liveness.parts[self.index].last.store(now, std::sync::atomic::Ordering::Relaxed);
    }
}

impl Liveness {
    /// The parts, each with how long it may go without reporting.
    pub fn new(parts: &[(&'static str, Duration)]) -> std::sync::Arc<Liveness> {
        std::sync::Arc::new(Liveness {
            started: std::time::Instant::now(),
            parts: parts
                .iter()
                .map(|&(name, allowance)| Part { name, allowance, last: std::sync::atomic::AtomicU64::new(0) })
                .collect(),
        })
    }

    pub fn heartbeat(self: &std::sync::Arc<Self>, name: &str) -> Heartbeat {
        let index = self.parts.iter().position(|p| p.name == name).unwrap_or_else(|| panic!("no part {name}"));
        Heartbeat { liveness: self.clone(), index }
    }

    /// The parts silent for longer than their allowance, with how long.
    pub fn silent(&self) -> Vec<(&'static str, Duration)> {
        let now = self.started.elapsed();
        self.parts
            .iter()
            .filter_map(|p| {
                let quiet =
                    now.saturating_sub(Duration::from_millis(p.last.load(std::sync::atomic::Ordering::Relaxed)));
                (quiet > p.allowance).then_some((p.name, quiet))
            })
            .collect()
    }
}

/// Feeds the watchdog every `interval` while every part reports; says once which went silent.
pub async fn feed_watchdog(interval: Duration, liveness: std::sync::Arc<Liveness>) {
    let mut tick = tokio::time::interval(interval);
    let mut starving = false;
    loop {
        tick.tick().await;
        let silent = liveness.silent();
        if silent.is_empty() {
            if starving {
                tracing::info!("every part reports again; the watchdog is fed");
                starving = false;
            }
            notify_watchdog();
        } else if !starving {
            starving = true;
            for (part, quiet) in silent {
                tracing::error!(
                    part,
                    silent_s = quiet.as_secs(),
                    "a part of the agent stopped reporting; the watchdog is no longer fed, so systemd restarts the agent"
                );
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_part_silent_past_its_allowance_is_named() {
        let liveness = Liveness::new(&[("tracker", Duration::from_millis(50)), ("worker", Duration::from_secs(60))]);
        let (tracker, worker) = (liveness.heartbeat("tracker"), liveness.heartbeat("worker"));
        tracker.beat();
        worker.beat();
        assert!(liveness.silent().is_empty());
        std::thread::sleep(Duration::from_millis(120));
        worker.beat();
        let silent = liveness.silent();
        assert_eq!(silent.iter().map(|(p, _)| *p).collect::<Vec<_>>(), ["tracker"]);
        assert!(silent[0].1 >= Duration::from_millis(100));
        tracker.beat();
        assert!(liveness.silent().is_empty());
    }

    #[test]
    fn a_manager_that_reads_nothing_never_blocks_the_sender() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("notify");
        let manager = UnixDatagram::bind(&path).unwrap();
        let (done_tx, done_rx) = std::sync::mpsc::channel();
        let sender_path = path.clone();
        std::thread::spawn(move || {
            for _ in 0..100 {
                send_to(sender_path.as_os_str(), "WATCHDOG=1");
            }
            send_to(sender_path.as_os_str(), "STOPPING=1");
            done_tx.send(()).unwrap();
        });
        // A blocking send would wait here for ever; the bound only catches that hang.
        done_rx.recv_timeout(Duration::from_secs(30)).expect("a notification blocked on a full queue");
        let mut buffer = [0u8; 64];
        let n = manager.recv(&mut buffer).unwrap();
        assert_eq!(&buffer[..n], b"WATCHDOG=1", "what fitted in the queue was delivered");
    }
}
