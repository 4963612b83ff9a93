//! The systemd watchdog is fed only while the agent's parts work: a job that never returns (here
//! a spooled instance that became a FIFO nobody writes to, as a dead network mount would hang a
//! read) stops the pings, so systemd would restart the agent, where a timer would have fed it on.

mod common;

use std::os::unix::net::UnixDatagram;
use std::path::PathBuf;
use std::time::{Duration, Instant};

use common::*;

/// What the agent sent to its notify socket within `time`.
fn notifications(socket: &UnixDatagram, time: Duration) -> Vec<String> {
    let deadline = Instant::now() + time;
    let mut received = Vec::new();
    let mut buffer = [0u8; 256];
    while let Some(left) = deadline.checked_duration_since(Instant::now()) {
        socket.set_read_timeout(Some(left.max(Duration::from_millis(1)))).unwrap();
        match socket.recv(&mut buffer) {
            Ok(n) => received.push(String::from_utf8_lossy(&buffer[..n]).into_owned()),
            Err(_) => break,
        }
    }
    received
}

#[test]
fn a_hung_job_starves_the_watchdog() {
    let tmp = tempfile::tempdir().unwrap();
    let notify = tmp.path().join("notify");
    let socket = UnixDatagram::bind(&notify).unwrap();
    let agent = Agent::start(
        &tmp.path().join("state"),
        &[
            ("NOTIFY_SOCKET", notify.to_str().unwrap()),
            ("WATCHDOG_USEC", "1000000"),
            ("IDAICS_LIMITS_MAX_JOB_S", "2"),
            ("IDAICS_MODEL_WEIGHTS", PHANTOM_MODEL),
            ("IDAICS_SERIES_COMPLETE_ON_RELEASE", "false"),
            ("IDAICS_SERIES_QUIET_PERIOD_S", "3"),
            ("IDAICS_SERIES_MAX_WAIT_S", "30"),
        ],
    );
    // Fed every half second while all is well.
    let before = notifications(&socket, Duration::from_secs(3));
    assert!(before.iter().any(|n| n == "READY=1"), "{before:?}");
    assert!(before.iter().filter(|n| *n == "WATCHDOG=1").count() >= 3, "{before:?}");

    let spec = idaics::synthetic::SeriesSpec { slices: 6, size: 64, seed: 4242, ..Default::default() };
    let series = idaics::synthetic::write_ct_series(&tmp.path().join("series"), &spec).unwrap();
    assert_eq!(store_outcomes(&agent.storescu(&[], &series.files)).0, 6);
    // Before the quiet period ends, one spooled instance becomes a FIFO: the job's read of it
    // never returns.
    // (Not the first: the series' finding-log row is read from that one.)
    let spooled: PathBuf = agent.spool_files().into_iter().last().unwrap();
    std::fs::remove_file(&spooled).unwrap();
    let status = std::process::Command::new("mkfifo").arg(&spooled).status().unwrap();
    assert!(status.success());

    agent.wait_for("the hung job to be named", Duration::from_secs(60), |a| {
        a.log().contains("a part of the agent stopped reporting")
    });
    let stalled = agent
        .events("a part of the agent stopped reporting; the watchdog is no longer fed, so systemd restarts the agent");
    assert_eq!(stalled[0]["fields"]["part"], "worker", "{}", agent.log());
    // What queued up before the pings stopped, then three seconds of silence.
    notifications(&socket, Duration::from_millis(200));
    let after = notifications(&socket, Duration::from_secs(3));
    assert!(!after.iter().any(|n| n == "WATCHDOG=1"), "the watchdog was fed with the worker hung: {after:?}");
    // The other parts still report: the receiver answers.
    assert!(agent.echo());
}
