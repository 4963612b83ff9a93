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

#[cfg(test)]
mod tests {
    use super::*;

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
