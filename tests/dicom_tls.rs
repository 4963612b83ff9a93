//! DICOM over TLS on a port of its own beside the plain one, against DCMTK's TLS client: mutual
//! TLS accepts a client certificate the configured CA signed and refuses one without or with
//! another; a plain-text client on the TLS port is turned away with a reason; and check-config
//! reads the files before the agent would.

mod common;

use std::process::Command;

use common::pki::TestPki;
use common::*;

fn echo(port: u16, tls: &[&str]) -> std::process::Output {
    Command::new("echoscu").args(tls).args(["-aec", AE, "-to", "10", "127.0.0.1", &port.to_string()]).output().unwrap()
}

#[test]
fn mutual_tls_beside_the_plain_port_with_dcmtk() {
    let tmp = tempfile::tempdir().unwrap();
    let pki = TestPki::make(&tmp.path().join("pki"));
    let tls_port = free_port();
    let tls_port_text = tls_port.to_string();
    let (certificate, key, ca) = (pki.path("a.pem"), pki.path("a.key"), pki.path("ca.pem"));
    let agent = Agent::start(
        &tmp.path().join("state"),
        &[
            ("IDAICS_DICOM_TLS_PORT", &tls_port_text),
            ("IDAICS_DICOM_TLS_CERTIFICATE", &certificate),
            ("IDAICS_DICOM_TLS_PRIVATE_KEY", &key),
            ("IDAICS_DICOM_TLS_CLIENT_CA", &ca),
        ],
    );
    assert!(agent.log().contains("listening for DICOM associations over TLS"), "{}", agent.log());
    let (client_key, client_certificate) = (pki.path("b.key"), pki.path("b.pem"));
    let with_certificate = ["+tls", client_key.as_str(), client_certificate.as_str(), "+cf", ca.as_str()];

    // The CA's client: accepted, and it stores.
    let accepted = echo(tls_port, &with_certificate);
    assert!(accepted.status.success(), "{}\n{}", output_text(&accepted), agent.log());
    let series = idaics::synthetic::write_ct_series(
        &tmp.path().join("series"),
        &idaics::synthetic::SeriesSpec { slices: 3, size: 64, seed: 5150, ..Default::default() },
    )
    .unwrap();
    let stored = storescu(tls_port, &with_certificate, &series.files);
    assert_eq!(store_outcomes(&stored), (3, 0), "{}", output_text(&stored));
    assert_eq!(agent.spool_files().len(), 3);

    // No client certificate, or one the CA did not sign: refused.
    let anonymous = echo(tls_port, &["+tla", "+cf", &ca]);
    assert!(!anonymous.status.success(), "a client without a certificate was accepted");
    let (stranger_key, stranger) = (pki.path("stranger.key"), pki.path("stranger.pem"));
    let unknown = echo(tls_port, &["+tls", &stranger_key, &stranger, "+cf", &ca]);
    assert!(!unknown.status.success(), "a certificate the CA did not sign was accepted");
    // Plain DICOM on the TLS port: turned away, with the reason in the log.
    assert!(!echo(tls_port, &[]).status.success());
    agent.wait_for("the plain-text refusal", std::time::Duration::from_secs(10), |a| {
        a.log().contains("a plain DICOM association request on the TLS port")
    });
    // The audit trail has each of them: the TLS association, what it stored, the failed
    // handshakes and the plain-text client.
    wait_until("the audit trail", std::time::Duration::from_secs(10), || {
        let trail = audit_trail(&agent.state_dir);
        let has = |event: &str, detail: &str| trail.iter().any(|(e, d)| e == event && d.contains(detail));
        has("association-accepted", "over TLS")
            && has("instances-stored", "3 instance(s) stored")
            && trail.iter().filter(|(e, _)| e == "tls-failure").count() >= 2
            && has("association-refused", "plain DICOM association request on the TLS port")
    });
    // The plain port serves on beside it, and TLS there is named for what it is.
    assert!(agent.echo());
    assert!(!echo(agent.port, &with_certificate).status.success());
    agent.wait_for("the TLS-on-plain refusal", std::time::Duration::from_secs(10), |a| {
        a.log().contains("a TLS handshake on the plain DICOM port")
    });
}

/// Results to a PACS that takes DICOM over TLS only and asks for our certificate (DCMTK storescp
/// +tls, requiring a client certificate by default): delivered; and with the wrong trust
/// configured for it, kept in the outbox with the TLS reason.
#[test]
fn results_go_to_a_tls_pacs_with_our_certificate() {
    let tmp = tempfile::tempdir().unwrap();
    let pki = TestPki::make(&tmp.path().join("pki"));
    let (pacs_port, stranger_port) = (free_port(), free_port());
    let _pacs = StoreScp::start_with_args(
        pacs_port,
        &tmp.path().join("pacs"),
        &["+tls", &pki.path("a.key"), &pki.path("a.pem"), "+cf", &pki.path("ca.pem")],
    );
    // A second TLS PACS whose certificate the configured CA did not sign.
    let _stranger = StoreScp::start_with_args(
        stranger_port,
        &tmp.path().join("stranger"),
        &["+tls", &pki.path("stranger.key"), &pki.path("stranger.pem"), "-ic"],
    );
    let destination = |port: u16| {
        format!(
            "[[destinations]]\nae_title = \"PACS\"\nhost = \"localhost\"\nport = {port}\ntls = true\n\
             tls_ca = {:?}\ntls_certificate = {:?}\ntls_private_key = {:?}\n",
            pki.path("ca.pem"),
            pki.path("b.pem"),
            pki.path("b.key")
        )
    };
    let config = tmp.path().join("idaics.toml");
    std::fs::write(&config, destination(pacs_port) + &destination(stranger_port)).unwrap();
    let agent = Agent::start_with_args(
        &tmp.path().join("state"),
        &[("IDAICS_MODEL_WEIGHTS", PHANTOM_MODEL)],
        &["--config", config.to_str().unwrap()],
    );
    let spec = idaics::phantom::PhantomSpec {
        seed: 6161,
        pixel_spacing_mm: 1.5,
        slice_thickness_mm: 2.0,
        size: 192,
        ..Default::default()
    };
    let (series, _) = idaics::phantom::write_phantom(&tmp.path().join("series"), &spec).unwrap();
    assert_eq!(store_outcomes(&agent.storescu(&[], &series.files)).0, series.files.len());
    agent.wait_for("delivery over TLS", std::time::Duration::from_secs(240), |a| {
        !a.events("object delivered").is_empty() && a.log().contains("delivery failed; kept for a retry")
    });
    let delivered = agent.events("object delivered");
    assert!(delivered.iter().all(|e| e["fields"]["destination"].as_str().unwrap().contains(&pacs_port.to_string())));
    let sr = tmp.path().join("pacs").read_dir().unwrap().flatten().count();
    assert!(sr >= 1, "nothing arrived at the TLS PACS");
    let failed = agent.events("delivery failed; kept for a retry");
    let error = failed[0]["fields"]["error"].as_str().unwrap();
    assert!(failed[0]["fields"]["destination"].as_str().unwrap().contains(&stranger_port.to_string()));
    assert!(error.to_lowercase().contains("certificate"), "{error}");
}

#[test]
fn check_config_reads_the_tls_files() {
    let tmp = tempfile::tempdir().unwrap();
    let pki = TestPki::make(&tmp.path().join("pki"));
    let check_pair = |certificate: &str, key: &str| {
        let config = tmp.path().join("idaics.toml");
        let text = format!(
            "[dicom]\ntls_port = 2762\ntls_certificate = {certificate:?}\ntls_private_key = {key:?}\ntls_client_ca = {:?}\n",
            pki.path("ca.pem")
        );
        std::fs::write(&config, text).unwrap();
        Command::new(env!("CARGO_BIN_EXE_idaics")).args(["check-config", "--config"]).arg(&config).output().unwrap()
    };
    let check = |key: &str| check_pair(&pki.path("a.pem"), key);
    let good = check(&pki.path("a.key"));
    assert!(good.status.success(), "{}", output_text(&good));
    assert!(output_text(&good).contains("DICOM over TLS: port 2762, client certificates required"));
    // The node's certificate is valid for two days: named ahead of its end; the CA's (ten
    // years) is not.
    let notice = format!("warning: dicom.tls_certificate ({}): a certificate in it expires on ", pki.path("a.pem"));
    assert!(output_text(&good).contains(&notice), "{}", output_text(&good));
    assert!(!output_text(&good).contains("warning: dicom.tls_client_ca"), "{}", output_text(&good));
    // Another certificate's key, and a file that holds no key: refused, naming what is wrong.
    let mismatched = check(&pki.path("b.key"));
    assert!(!mismatched.status.success(), "{}", output_text(&mismatched));
    let not_a_key = check(&pki.path("node.ext"));
    assert!(!not_a_key.status.success());
    assert!(output_text(&not_a_key).contains("dicom.tls_private_key"), "{}", output_text(&not_a_key));
    // A certificate past its date: refused with the date, before any peer would see it.
    pki.make_expired();
    let expired = check_pair(&pki.path("expired.pem"), &pki.path("a.key"));
    assert!(!expired.status.success());
    assert!(output_text(&expired).contains("expired on 2020-01-02 00:00:00 UTC"), "{}", output_text(&expired));
}
