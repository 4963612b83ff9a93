//! The Debian package as a PACS administrator gets it: built by `packaging/deb/build.sh` from the
//! binary under test, checked by lintian, and, on a throwaway machine, installed with dpkg, run
//! as the user it creates, and purged.

mod common;

use std::os::unix::fs::MetadataExt;
use std::path::{Path, PathBuf};
use std::process::{Command, Output, Stdio};
use std::time::Duration;

use common::*;
use idaics::synthetic::{SeriesSpec, write_ct_series};

fn run(command: &mut Command) -> Output {
    let output = command.output().unwrap_or_else(|e| panic!("cannot run {command:?}: {e}"));
    assert!(output.status.success(), "{command:?} failed:\n{}", output_text(&output));
    output
}

fn stdout(output: &Output) -> String {
    String::from_utf8_lossy(&output.stdout).into_owned()
}

/// Builds the package around the binary these tests were built with; returns the .deb's path.
fn build_package(out: &Path) -> PathBuf {
    for tool in ["dpkg-deb", "dpkg-shlibdeps", "lintian"] {
        require_tool(tool);
    }
    let script = Path::new(env!("CARGO_MANIFEST_DIR")).join("packaging/deb/build.sh");
    let output = run(Command::new(script).args(["--binary", env!("CARGO_BIN_EXE_idaics"), "--out"]).arg(out));
    let deb = PathBuf::from(stdout(&output).lines().last().expect("the script names the package").trim());
    assert!(deb.is_file(), "{} was not written", deb.display());
    deb
}

/// `dpkg-deb --contents` as (path, mode string, owner/group) per entry.
fn contents(deb: &Path) -> Vec<(String, String, String)> {
    stdout(&run(Command::new("dpkg-deb").arg("--contents").arg(deb)))
        .lines()
        .map(|line| {
            let fields: Vec<&str> = line.split_whitespace().collect();
            let path = fields[5].trim_start_matches('.').to_string();
            (path, fields[0].to_string(), fields[1].to_string())
        })
        .collect()
}

#[test]
fn package_holds_the_agent_its_configuration_unit_and_model_and_passes_lintian() {
    let tmp = tempfile::tempdir().unwrap();
    let deb = build_package(tmp.path());

    let field =
        |name: &str| stdout(&run(Command::new("dpkg-deb").arg("--field").arg(&deb).arg(name))).trim().to_string();
    assert_eq!(field("Package"), "idaics");
    assert_eq!(field("Version"), env!("CARGO_PKG_VERSION"), "the package's version is the crate's");
    let depends = field("Depends");
    for needed in ["libc6", "adduser"] {
        assert!(depends.contains(needed), "Depends lacks {needed}: {depends}");
    }

    // Reproducible: the same sources and binary give the same bytes.
    let again = build_package(&tmp.path().join("again"));
    assert!(std::fs::read(&deb).unwrap() == std::fs::read(&again).unwrap(), "two builds of the package differ");

    let listed = contents(&deb);
    let entry = |path: &str| {
        listed.iter().find(|(p, _, _)| p == path).unwrap_or_else(|| panic!("{path} not in the package: {listed:?}"))
    };
    for (path, mode) in [
        ("/usr/bin/idaics", "-rwxr-xr-x"),
        ("/etc/idaics/idaics.toml", "-rw-r--r--"),
        ("/lib/systemd/system/idaics.service", "-rw-r--r--"),
        ("/usr/share/idaics/phantom-yolov8n-seg.safetensors", "-rw-r--r--"),
        ("/usr/share/doc/idaics/README.md", "-rw-r--r--"),
        ("/usr/share/doc/idaics/docs/operations.md", "-rw-r--r--"),
        ("/usr/share/doc/idaics/docs/conformance.md", "-rw-r--r--"),
        ("/usr/share/doc/idaics/docs/design.md", "-rw-r--r--"),
        ("/usr/share/doc/idaics/docs/benchmarks.md", "-rw-r--r--"),
        ("/usr/share/doc/idaics/MODEL.md", "-rw-r--r--"),
        ("/usr/share/doc/idaics/copyright", "-rw-r--r--"),
        ("/usr/share/doc/idaics/changelog.gz", "-rw-r--r--"),
        ("/usr/share/doc/idaics/THIRD-PARTY", "-rw-r--r--"),
        ("/usr/share/man/man1/idaics.1.gz", "-rw-r--r--"),
    ] {
        assert_eq!(entry(path).1, mode, "{path}");
    }
    assert!(listed.iter().all(|(_, _, owner)| owner == "root/root"), "{listed:?}");
    let conffiles = stdout(&run(Command::new("dpkg-deb").arg("--info").arg(&deb).arg("conffiles")));
    assert_eq!(conffiles.trim(), "/etc/idaics/idaics.toml", "edits to the configuration must survive upgrades");

    // What the unit starts is what the package installs, and the shipped configuration checks out
    // with the shipped binary.
    let root = tmp.path().join("root");
    run(Command::new("dpkg-deb").arg("--extract").arg(&deb).arg(&root));
    let unit = std::fs::read_to_string(root.join("lib/systemd/system/idaics.service")).unwrap();
    let exec = unit.lines().find_map(|l| l.strip_prefix("ExecStart=")).expect("ExecStart");
    assert_eq!(exec, "/usr/bin/idaics serve --config /etc/idaics/idaics.toml");
    let packaged = |path: &str| root.join(path.trim_start_matches('/'));
    let check = run(Command::new(packaged("/usr/bin/idaics"))
        .args(["check-config", "--config"])
        .arg(packaged("/etc/idaics/idaics.toml"))
        .env_remove("RUST_LOG"));
    assert!(stdout(&check).contains("OK"), "{}", stdout(&check));
    assert_eq!(
        std::fs::read(packaged("/usr/share/idaics/phantom-yolov8n-seg.safetensors")).unwrap(),
        std::fs::read(PHANTOM_MODEL).unwrap()
    );
    let third_party = std::fs::read_to_string(packaged("/usr/share/doc/idaics/THIRD-PARTY")).unwrap();
    for krate in ["candle-core ", "dicom-ul ", "sqlx ", "tokio "] {
        let line =
            third_party.lines().find(|l| l.starts_with(krate)).unwrap_or_else(|| panic!("{krate}in\n{third_party}"));
        assert!(line.contains("MIT") || line.contains("Apache"), "{line}");
    }

    // Debian's own package checker: no errors and no warnings (its informational tags are printed
    // for the record).
    let lintian = Command::new("lintian")
        .args(["--fail-on", "error,warning", "--display-info", "--tag-display-limit", "0"])
        .arg(&deb)
        .output()
        .unwrap();
    println!("lintian:\n{}", output_text(&lintian));
    assert!(lintian.status.success(), "lintian found problems:\n{}", output_text(&lintian));
}

/// Undoes what the install test did to the machine, even when it fails half-way: the package,
/// the state directory (the test checked there was none before) and the user.
struct Installed;

impl Drop for Installed {
    fn drop(&mut self) {
        let _ = Command::new("dpkg").args(["--purge", "idaics"]).stdout(Stdio::null()).stderr(Stdio::null()).status();
        let _ = std::fs::remove_dir_all("/var/lib/idaics");
        let _ = Command::new("userdel").arg("idaics").status();
    }
}

/// The installed agent, killed if the test fails while it runs.
struct Running(std::process::Child);

impl Drop for Running {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

fn as_idaics(program: &str) -> Command {
    let mut command = Command::new("setpriv");
    command.args(["--reuid", "idaics", "--regid", "idaics", "--init-groups", "--", program]).env_remove("RUST_LOG");
    command
}

/// Installs the package for real, so it runs only where that is wanted: as root on a throwaway
/// machine, where the README's test command runs it (`cargo test --test package -- --ignored`),
/// and never over an IDAICS that is already installed.
#[test]
#[ignore = "installs the package system-wide; scripts/test.sh runs it as root on a throwaway machine"]
fn package_installs_runs_as_its_own_user_and_purges_keeping_the_received_images() {
    assert_eq!(unsafe { libc::geteuid() }, 0, "installing the package needs root");
    for tool in ["dpkg", "setpriv", "userdel", "echoscu", "storescu", "systemd-analyze"] {
        require_tool(tool);
    }
    let installed_before = Command::new("dpkg-query").args(["--show", "idaics"]).output().unwrap();
    assert!(!installed_before.status.success(), "idaics is already installed here: this test would replace it");
    assert!(!Path::new("/var/lib/idaics").exists(), "/var/lib/idaics exists: this is no throwaway machine");
    let user_before = Command::new("getent").args(["passwd", "idaics"]).output().unwrap();
    assert!(!user_before.status.success(), "a user idaics exists already");

    let tmp = tempfile::tempdir().unwrap();
    let deb = build_package(tmp.path());
    let _cleanup = Installed;
    let install = run(Command::new("dpkg").arg("--install").arg(&deb));
    println!("{}", output_text(&install));

    // A system user and group of its own, owning the state directory nobody else may read.
    let passwd = stdout(&run(Command::new("getent").args(["passwd", "idaics"])));
    let fields: Vec<&str> = passwd.trim().split(':').collect();
    let uid: u32 = fields[2].parse().unwrap();
    assert!(uid < 1000, "not a system user: {passwd}");
    assert_eq!(fields[5], "/var/lib/idaics");
    let state = std::fs::metadata("/var/lib/idaics").unwrap();
    assert_eq!((state.uid(), state.mode() & 0o777), (uid, 0o750));
    // The configuration may hold a database password: readable by root and the agent's group only.
    let conf = std::fs::metadata("/etc/idaics/idaics.toml").unwrap();
    let gid: u32 =
        stdout(&run(Command::new("getent").args(["group", "idaics"]))).split(':').nth(2).unwrap().parse().unwrap();
    assert_eq!((conf.uid(), conf.gid(), conf.mode() & 0o777), (0, gid, 0o640));
    let nobody_reads = Command::new("setpriv")
        .args(["--reuid", "nobody", "--regid", "nogroup", "--clear-groups", "cat", "/etc/idaics/idaics.toml"])
        .output()
        .unwrap();
    assert!(!nobody_reads.status.success(), "another user can read the configuration");
    let check = run(as_idaics("/usr/bin/idaics").args(["check-config", "--config", "/etc/idaics/idaics.toml"]));
    assert!(stdout(&check).contains("OK"));
    // Installed, it accepts nobody until someone says who may send, and says so.
    assert!(stdout(&check).contains("warning: no sender is allowed yet"), "{}", stdout(&check));

    // systemd's own check of the installed unit: its directives, user and ExecStart binary.
    run(Command::new("systemd-analyze").args(["verify", "/lib/systemd/system/idaics.service"]));

    // The agent as the unit starts it (same user, same configuration; systemd itself does not run
    // in CI), on a free port: a series sent to it lands in the packaged state directory.
    let port = free_port();
    let log_path = tmp.path().join("agent.log");
    let mut agent = Running(
        as_idaics("/usr/bin/idaics")
            .args(["serve", "--config", "/etc/idaics/idaics.toml", "--port", &port.to_string()])
            .env("IDAICS_DICOM_BIND_ADDRESS", "127.0.0.1")
            .env("IDAICS_HTTP_PORT", free_port().to_string())
            .stderr(std::fs::File::create(&log_path).unwrap())
            .spawn()
            .unwrap(),
    );
    let log = || std::fs::read_to_string(&log_path).unwrap_or_default();
    wait_until("the installed agent to listen", Duration::from_secs(30), || {
        log().contains("listening for DICOM associations")
    });
    let echo = Command::new("echoscu").args(["-aec", "IDAICS", "127.0.0.1", &port.to_string()]).output().unwrap();
    assert!(!echo.status.success(), "the installed agent accepted a sender nobody allowed");
    assert!(log().contains("no sender is allowed yet"), "{}", log());
    unsafe { libc::kill(agent.0.id() as i32, libc::SIGTERM) };
    assert!(agent.0.wait().unwrap().success(), "{}", log());
    // With the sender listed (here by the environment; on a server in the file), it stores.
    let mut agent = Running(
        as_idaics("/usr/bin/idaics")
            .args(["serve", "--config", "/etc/idaics/idaics.toml", "--port", &port.to_string()])
            .env("IDAICS_DICOM_BIND_ADDRESS", "127.0.0.1")
            .env("IDAICS_DICOM_ALLOWED_PEERS", "127.0.0.1")
            .env("IDAICS_HTTP_PORT", free_port().to_string())
            .stderr(std::fs::File::create(&log_path).unwrap())
            .spawn()
            .unwrap(),
    );
    wait_until("the installed agent to listen again", Duration::from_secs(30), || {
        log().contains("listening for DICOM associations")
    });
    let series =
        write_ct_series(&tmp.path().join("in"), &SeriesSpec { slices: 6, size: 64, seed: 77, ..Default::default() })
            .unwrap();
    let sent = storescu(port, &[], &series.files);
    assert_eq!(store_outcomes(&sent), (6, 0), "{}\n{}", output_text(&sent), log());
    let series_dir = Path::new("/var/lib/idaics/spool").join(&series.study_uid).join(&series.series_uid);
    for sop in &series.sop_uids {
        let file = std::fs::metadata(series_dir.join(format!("{sop}.dcm"))).unwrap();
        assert_eq!(file.uid(), uid, "spooled files belong to the agent's user");
    }
    unsafe { libc::kill(agent.0.id() as i32, libc::SIGTERM) };
    assert!(agent.0.wait().unwrap().success(), "the agent did not stop cleanly on SIGTERM:\n{}", log());

    // `idaics demo` as installed: it finds the phantom model under /usr/share/idaics.
    let demo_out = tmp.path().join("demo");
    std::fs::create_dir(&demo_out).unwrap();
    run(Command::new("chown").arg("idaics:idaics").arg(&demo_out));
    std::fs::set_permissions(tmp.path(), std::os::unix::fs::PermissionsExt::from_mode(0o755)).unwrap();
    let demo = as_idaics("/usr/bin/idaics").args(["demo", "--out"]).arg(&demo_out).current_dir("/").output().unwrap();
    assert!(demo.status.success(), "{}", output_text(&demo));
    assert!(stdout(&demo).contains("/usr/share/idaics/phantom-yolov8n-seg.safetensors"), "{}", stdout(&demo));

    // Installing again (as an upgrade does) keeps the administrator's edits and the permissions.
    let edited = std::fs::read_to_string("/etc/idaics/idaics.toml")
        .unwrap()
        .replace("ae_title = \"IDAICS\"", "ae_title = \"IDAICS_TEST\"");
    assert!(edited.contains("IDAICS_TEST"));
    std::fs::write("/etc/idaics/idaics.toml", &edited).unwrap();
    run(Command::new("dpkg").arg("--install").arg(&deb));
    assert_eq!(
        std::fs::read_to_string("/etc/idaics/idaics.toml").unwrap(),
        edited,
        "an upgrade replaced the configuration"
    );
    let conf = std::fs::metadata("/etc/idaics/idaics.toml").unwrap();
    assert_eq!((conf.gid(), conf.mode() & 0o777), (gid, 0o640));

    // The installed binary reads the installed configuration when none is named, so the
    // administrator's commands see what the service sees.
    let check = run(as_idaics("/usr/bin/idaics").arg("check-config"));
    assert!(stdout(&check).contains("/etc/idaics/idaics.toml: OK"), "{}", stdout(&check));
    assert!(stdout(&check).contains("AE IDAICS_TEST"), "{}", stdout(&check));
    let listed = run(as_idaics("/usr/bin/idaics").arg("series"));
    assert!(stdout(&listed).contains(&series.series_uid), "{}", stdout(&listed));
    let findings = run(as_idaics("/usr/bin/idaics").args(["findings", "--format", "csv"]));
    assert!(stdout(&findings).starts_with("patient_id,"), "{}", stdout(&findings));
    // Another user may not read the configuration, and is told whose it is.
    let stranger = Command::new("setpriv")
        .args(["--reuid", "nobody", "--regid", "nogroup", "--clear-groups", "/usr/bin/idaics", "findings"])
        .output()
        .unwrap();
    assert!(!stranger.status.success());
    assert!(
        output_text(&stranger).contains("belongs to root:idaics with mode 640")
            && output_text(&stranger).contains("sudo -u idaics /usr/bin/idaics findings"),
        "{}",
        output_text(&stranger)
    );
    // Root is sent to the agent's user rather than leave root's files in its database directory.
    let as_root = Command::new("/usr/bin/idaics").args(["findings", "--level", "L4/L5"]).output().unwrap();
    assert!(!as_root.status.success());
    assert!(
        output_text(&as_root).contains("sudo -u idaics /usr/bin/idaics findings --level L4/L5"),
        "{}",
        output_text(&as_root)
    );
    let root_owned: Vec<_> = std::fs::read_dir("/var/lib/idaics")
        .unwrap()
        .map(|e| e.unwrap().path())
        .filter(|p| std::fs::symlink_metadata(p).unwrap().uid() == 0)
        .collect();
    assert!(root_owned.is_empty(), "root's files in the state directory: {root_owned:?}");

    // Removing keeps the configuration; purging takes it, and keeps what was received.
    run(Command::new("dpkg").args(["--remove", "idaics"]));
    assert!(!Path::new("/usr/bin/idaics").exists());
    assert!(Path::new("/etc/idaics/idaics.toml").exists(), "remove must keep the administrator's configuration");
    let purge = run(Command::new("dpkg").args(["--purge", "idaics"]));
    assert!(!Path::new("/etc/idaics").exists(), "purge leaves /etc/idaics");
    assert!(output_text(&purge).contains("kept /var/lib/idaics"), "{}", output_text(&purge));
    for sop in &series.sop_uids {
        assert!(series_dir.join(format!("{sop}.dcm")).is_file(), "purge must keep the received images");
    }
    let overrides = stdout(&run(Command::new("dpkg-statoverride").arg("--list")));
    assert!(!overrides.contains("/etc/idaics"), "{overrides}");
}
