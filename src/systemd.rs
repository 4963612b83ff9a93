//! systemd readiness and watchdog notifications (sd_notify protocol), without linking libsystemd.
//! A no-op when the agent does not run under systemd (no NOTIFY_SOCKET).

use std::os::unix::net::UnixDatagram;
use std::time::Duration;

fn send(message: &str) {
    let Some(path) = std::env::var_os("NOTIFY_SOCKET") else { return };
    let Ok(socket) = UnixDatagram::unbound() else { return };
    let bytes = path.as_encoded_bytes();
    let result = if let Some(name) = bytes.strip_prefix(b"@") {
        use std::os::linux::net::SocketAddrExt;
        std::os::unix::net::SocketAddr::from_abstract_name(name)
            .and_then(|addr| socket.send_to_addr(message.as_bytes(), &addr))
    } else {
        socket.send_to(message.as_bytes(), &path)
    };
    if let Err(e) = result {
        tracing::debug!(error = %e, "sd_notify failed");
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
