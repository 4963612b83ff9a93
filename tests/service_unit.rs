//! The systemd unit's system call filter against what the agent really does. systemd does not
//! run as PID 1 in CI, so the unit cannot be started here. Instead the agent runs a whole job
//! under strace, and every system call it made is checked against the unit's own
//! `SystemCallFilter=` lines, with the groups expanded by systemd-analyze as systemd expands them.
//! A call that the filter lacks would fail with EPERM in production, on a path that no other test
//! would show.

mod common;

use std::collections::BTreeSet;
use std::os::unix::net::UnixDatagram;
use std::path::PathBuf;
use std::process::Command;
use std::time::Duration;

use common::{Agent, PHANTOM_MODEL, StoreScp, free_port, http_get, output_text, store_outcomes, wait_until};
use idaics::phantom::{PhantomSpec, write_phantom};

const UNIT: &str = concat!(env!("CARGO_MANIFEST_DIR"), "/packaging/idaics.service");

/// The system calls that filter entries name; each group (`@name`) is expanded by
/// systemd-analyze, and so is every group that it names.
fn expand(entries: &[&str], out: &mut BTreeSet<String>) {
    for entry in entries {
        if !entry.starts_with('@') {
            out.insert(entry.to_string());
            continue;
        }
        let listing = Command::new("systemd-analyze").args(["syscall-filter", "--no-pager", entry]).output().unwrap();
        assert!(listing.status.success(), "systemd-analyze syscall-filter {entry}: {}", output_text(&listing));
        let text = String::from_utf8_lossy(&listing.stdout).into_owned();
        let members: Vec<&str> =
            text.lines().skip(1).map(str::trim).filter(|l| !l.is_empty() && !l.starts_with('#')).collect();
        assert!(!members.is_empty(), "systemd-analyze knows no group {entry}");
        expand(&members, out);
    }
}

/// What the unit lets through: its first `SystemCallFilter=` list (an allow-list), less each
/// `~` list after it.
fn calls_the_unit_allows() -> BTreeSet<String> {
    let unit = std::fs::read_to_string(UNIT).unwrap();
    let filters: Vec<&str> = unit.lines().filter_map(|l| l.strip_prefix("SystemCallFilter=")).collect();
    let (allow, denials) = filters.split_first().expect("the unit has a SystemCallFilter");
    assert!(!allow.starts_with('~'), "the first SystemCallFilter= is expected to be an allow-list: {allow}");
    let mut allowed = BTreeSet::new();
    expand(&allow.split_whitespace().collect::<Vec<_>>(), &mut allowed);
    for denial in denials {
        let denial = denial.strip_prefix('~').unwrap_or_else(|| panic!("a second allow-list: {denial}"));
        let mut denied = BTreeSet::new();
        expand(&denial.split_whitespace().collect::<Vec<_>>(), &mut denied);
        allowed.retain(|call| !denied.contains(call));
    }
    allowed
}

/// The system calls in `strace -c` output (its last column, between the table's rules).
fn calls_in_trace_summary(summary: &str) -> BTreeSet<String> {
    summary
        .lines()
        .filter(|l| !l.starts_with('%') && !l.starts_with('-') && !l.trim().is_empty())
        .filter_map(|l| l.split_whitespace().last())
        .filter(|call| *call != "total")
        .map(str::to_string)
        .collect()
}

#[test]
fn every_system_call_of_a_whole_job_passes_the_units_filter() {
    for tool in ["strace", "systemd-analyze", "storescp", "storescu"] {
        common::require_tool(tool);
    }
    let allowed = calls_the_unit_allows();
    for (call, expected) in [("read", true), ("fdatasync", true), ("mount", false), ("setuid", false)] {
        assert_eq!(allowed.contains(call), expected, "{call} in the filter as systemd-analyze expands it");
    }

    let tmp = tempfile::tempdir().unwrap();
    let spec = PhantomSpec {
        seed: 7011,
        levels: idaics::phantom::parse_levels("L4/L5=protrusion,L5/S1=schmorl").unwrap(),
        pixel_spacing_mm: 1.0,
        slice_thickness_mm: 2.0,
        size: 256,
        ..Default::default()
    };
    let (series, _) = write_phantom(&tmp.path().join("in"), &spec).unwrap();
    let files: Vec<PathBuf> = series.files;
    let pacs_port = free_port();
    let pacs = StoreScp::start(pacs_port, &tmp.path().join("pacs"));
    // systemd's notification socket, for the readiness and watchdog messages the unit's
    // Type=notify and WatchdogSec= make the agent send.
    let notify_path = tmp.path().join("notify");
    let notify = UnixDatagram::bind(&notify_path).unwrap();
    // Read as systemd reads them, all along; a minute's silence ends it (the watchdog pings
    // every half second).
    notify.set_read_timeout(Some(Duration::from_secs(60))).unwrap();
    let notifications = std::thread::spawn(move || {
        let mut messages = BTreeSet::new();
        let mut buffer = [0u8; 256];
        while !messages.contains("STOPPING=1") {
            let Ok(n) = notify.recv(&mut buffer) else { break };
            messages.insert(String::from_utf8_lossy(&buffer[..n]).into_owned());
        }
        messages
    });
    let trace = tmp.path().join("strace-summary.txt");
    let http_port = free_port();
    let destination = format!("PACS@127.0.0.1:{pacs_port}");
    let mut agent = Agent::start_under(
        &["strace", "--follow-forks", "-qq", "--summary-only", "--output", trace.to_str().unwrap()],
        &tmp.path().join("state"),
        free_port(),
        &[
            ("IDAICS_MODEL_WEIGHTS", PHANTOM_MODEL),
            ("IDAICS_MODEL_DEVICE", "cpu"),
            ("IDAICS_HTTP_PORT", &http_port.to_string()),
            ("NOTIFY_SOCKET", notify_path.to_str().unwrap()),
            ("WATCHDOG_USEC", "1000000"),
        ],
        &["--destination", destination.as_str()],
    );

    assert_eq!(store_outcomes(&agent.storescu(&[], &files)).0, files.len());
    wait_until("the SR at the PACS", Duration::from_secs(240), || {
        pacs.received().iter().any(|p| {
            dicom_object::open_file(p)
                .is_ok_and(|o| o.meta().media_storage_sop_class_uid().starts_with("1.2.840.10008.5.1.4.1.1.88."))
        })
    });
    for path in ["/metrics", "/api/v1/findings", "/readyz"] {
        let (status, body) = http_get(http_port, path);
        assert_eq!(status, 200, "{path}: {body}");
    }
    let status = agent.terminate();
    assert!(status.success(), "the agent under strace ended with {status}:\n{}", agent.log());
    let messages = notifications.join().unwrap();
    for expected in ["READY=1", "WATCHDOG=1", "STOPPING=1"] {
        assert!(messages.contains(expected), "{expected} not among the notifications {messages:?}");
    }

    let summary = std::fs::read_to_string(&trace).unwrap();
    let used = calls_in_trace_summary(&summary);
    // The trace saw the job: the syncs of the spool, the network both ways, the model's threads.
    for call in ["fdatasync", "accept4", "connect", "clone3", "futex", "sendto"] {
        assert!(used.contains(call), "{call} not in the trace: {used:?}\n{summary}");
    }
    let mut outside: Vec<&String> = used.iter().filter(|call| !allowed.contains(*call)).collect();
    // SQLite gives its journal the database's owner (fchown) only when it runs as root, as CI
    // does; the unit runs the agent as the user idaics.
    if unsafe { libc::geteuid() } == 0 {
        outside.retain(|call| *call != "fchown");
    }
    assert!(
        outside.is_empty(),
        "the agent makes system calls the unit's SystemCallFilter refuses: {outside:?}\n{summary}\nlog:\n{}",
        agent.log()
    );
}
