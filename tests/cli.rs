//! The command line as an administrator uses it.

use std::process::Command;

fn idaics(args: &[&str]) -> std::process::Output {
    Command::new(env!("CARGO_BIN_EXE_idaics")).args(args).env_remove("RUST_LOG").output().unwrap()
}

#[test]
fn shipped_configuration_checks_out() {
    let conf = concat!(env!("CARGO_MANIFEST_DIR"), "/conf/idaics.toml");
    let out = idaics(&["check-config", "--config", conf]);
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    assert!(String::from_utf8_lossy(&out.stdout).contains("OK"));
}

#[test]
fn bad_configuration_names_every_problem_and_fails() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("bad.toml");
    std::fs::write(
        &path,
        "[dicom]\nae_title = \"MUCH_TOO_LONG_AE_TITLE\"\nallowed_peers = [\"10.0.0.0/99\"]\n[series]\nquiet_period_s = 60\nmax_wait_s = 30\n",
    )
    .unwrap();
    let out = idaics(&["check-config", "--config", path.to_str().unwrap()]);
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    for key in ["dicom.ae_title", "dicom.allowed_peers[0]", "series.max_wait_s"] {
        assert!(err.contains(key), "{key} not reported:\n{err}");
    }

    std::fs::write(&path, "[dicom]\nport = \"eleven\"\n").unwrap();
    let out = idaics(&["check-config", "--config", path.to_str().unwrap()]);
    assert!(!out.status.success());
    assert!(String::from_utf8_lossy(&out.stderr).contains("line 2"), "{}", String::from_utf8_lossy(&out.stderr));
}

#[test]
fn database_password_is_not_printed() {
    let out = Command::new(env!("CARGO_BIN_EXE_idaics"))
        .args(["check-config"])
        .env("IDAICS_DATABASE_URL", "postgres://idaics:hunter2@db.example/idaics")
        .output()
        .unwrap();
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(text.contains("postgres://idaics:***@db.example/idaics"), "{text}");
    assert!(!text.contains("hunter2"));
}

#[test]
fn serve_refuses_a_busy_port_with_a_clear_message() {
    let holder = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let port = holder.local_addr().unwrap().port().to_string();
    let dir = tempfile::tempdir().unwrap();
    let out = Command::new(env!("CARGO_BIN_EXE_idaics"))
        .args(["serve", "--port", &port, "--state-dir", dir.path().to_str().unwrap()])
        .env("IDAICS_DICOM_BIND_ADDRESS", "127.0.0.1")
        .output()
        .unwrap();
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("cannot listen on 127.0.0.1:") && err.contains("in use"), "{err}");
}
