//! Orthanc as the PACS on both sides: it pushes a CT series to the agent the way a PACS routing
//! rule does, and receives the agent's results, which it must file under the patient's study.

mod common;

use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::Duration;

use common::{
    Agent, PHANTOM_MODEL, free_port, http_get, http_post, require_tool, store_outcomes, storescu, wait_until,
};
use idaics::phantom::{PhantomSpec, parse_levels, write_phantom};

/// An Orthanc server of its own, with the agent as a known modality; stopped on drop.
struct Orthanc {
    child: Child,
    dicom_port: u16,
    http_port: u16,
}

impl Orthanc {
    fn start(dir: &Path, agent_port: u16) -> Orthanc {
        Self::start_with(
            dir,
            serde_json::json!({ "DicomModalities": { "idaics": ["IDAICS", "127.0.0.1", agent_port] } }),
        )
    }

    /// With these keys of Orthanc's configuration set over the defaults below.
    fn start_with(dir: &Path, overrides: serde_json::Value) -> Orthanc {
        require_tool("Orthanc");
        let (dicom_port, http_port) = (free_port(), free_port());
        std::fs::create_dir_all(dir).unwrap();
        let mut config = serde_json::json!({
            "Name": "test PACS",
            "StorageDirectory": dir.join("storage"),
            "IndexDirectory": dir.join("index"),
            "DicomAet": "ORTHANC",
            "DicomPort": dicom_port,
            "HttpPort": http_port,
            "RemoteAccessAllowed": false,
            "AuthenticationEnabled": false,
            "DicomCheckCalledAet": false,
            "DicomAlwaysAllowStore": true,
            "Plugins": []
        });
        for (key, value) in overrides.as_object().unwrap() {
            config[key] = value.clone();
        }
        let config_path = dir.join("orthanc.json");
        std::fs::write(&config_path, config.to_string()).unwrap();
        let log = std::fs::File::create(dir.join("orthanc.log")).unwrap();
        let child =
            Command::new("Orthanc").arg(&config_path).stdout(Stdio::null()).stderr(log).spawn().expect("start Orthanc");
        let orthanc = Orthanc { child, dicom_port, http_port };
        wait_until("Orthanc's REST API", Duration::from_secs(30), || {
            std::net::TcpStream::connect(("127.0.0.1", http_port)).is_ok() && orthanc.get("/system").0 == 200
        });
        orthanc
    }

    fn get(&self, path: &str) -> (u16, String) {
        http_get(self.http_port, path)
    }

    fn json(&self, path: &str) -> serde_json::Value {
        let (status, body) = self.get(path);
        assert_eq!(status, 200, "GET {path}: {body}");
        serde_json::from_str(&body).unwrap()
    }
}

impl Drop for Orthanc {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

#[test]
fn orthanc_sends_a_series_and_files_the_results_under_its_study() {
    let tmp = tempfile::tempdir().unwrap();
    let spec = PhantomSpec {
        seed: 7021,
        levels: parse_levels("L4/L5=protrusion,L3/L4=bulge").unwrap(),
        pixel_spacing_mm: 1.0,
        slice_thickness_mm: 2.0,
        size: 256,
        ..Default::default()
    };
    let (series, truth) = write_phantom(&tmp.path().join("in"), &spec).unwrap();
    let files: Vec<PathBuf> = series.files;
    let levels = truth.levels.len();

    let agent_port = free_port();
    let orthanc = Orthanc::start(&tmp.path().join("orthanc"), agent_port);
    let destination = format!("ORTHANC@127.0.0.1:{}", orthanc.dicom_port);
    let agent = Agent::start_on_with_args(
        &tmp.path().join("state"),
        agent_port,
        &[("IDAICS_MODEL_WEIGHTS", PHANTOM_MODEL), ("IDAICS_MODEL_DEVICE", "cpu")],
        &["--destination", destination.as_str()],
    );

    // The series reaches the PACS first, then the PACS forwards it, as a routing rule would.
    assert_eq!(store_outcomes(&storescu(orthanc.dicom_port, &[], &files)), (files.len(), 0));
    let source_series = orthanc.json("/series");
    assert_eq!(source_series.as_array().unwrap().len(), 1, "{source_series}");
    let (status, body) = http_post(
        orthanc.http_port,
        "/modalities/idaics/store",
        &serde_json::json!({ "Resources": [source_series[0]], "Synchronous": true }).to_string(),
    );
    assert_eq!(status, 200, "Orthanc's C-STORE to the agent: {body}");
    assert_eq!(agent.spool_files().len(), files.len());

    // Key slices (the sagittal and one axial per level), a SEG, a Secondary Capture per level
    // and the SR come back, and Orthanc files them all under the one patient and study.
    let expected = files.len() + (1 + levels) + 1 + levels + 1;
    wait_until("the results in Orthanc", Duration::from_secs(240), || {
        orthanc.json("/statistics")["CountInstances"].as_u64() == Some(expected as u64)
    });
    std::thread::sleep(Duration::from_secs(2));
    let statistics = orthanc.json("/statistics");
    assert_eq!(statistics["CountInstances"], expected, "{statistics}");
    assert_eq!(statistics["CountPatients"], 1, "{statistics}");
    assert_eq!(statistics["CountStudies"], 1, "{statistics}");
    let mut modalities: Vec<String> = orthanc
        .json("/series?expand")
        .as_array()
        .unwrap()
        .iter()
        .map(|s| s["MainDicomTags"]["Modality"].as_str().unwrap_or("").to_string())
        .collect();
    modalities.sort();
    assert_eq!(modalities, ["CT", "CT", "OT", "SEG", "SR"], "source, key slices, captures, SEG, SR");

    // Orthanc sent the series in one association and released it: decided once, at the release.
    let completions = agent.events("series complete");
    assert_eq!(completions.len(), 1, "{}", agent.log());
    assert_eq!(completions[0]["fields"]["trigger"], "association-released");
}

/// The same round trip with every DICOM connection over mutual TLS: Orthanc's DICOM port speaks
/// TLS only, it sends the series to the agent's TLS port with its certificate, and the agent
/// sends the results back over TLS with its own; both trust the one test CA.
#[test]
fn orthanc_and_the_agent_over_mutual_tls() {
    let tmp = tempfile::tempdir().unwrap();
    let pki = common::pki::TestPki::make(&tmp.path().join("pki"));
    let file = |name: &str| pki.path(name);

    let spec = PhantomSpec {
        seed: 7022,
        levels: parse_levels("L4/L5=protrusion").unwrap(),
        pixel_spacing_mm: 1.5,
        slice_thickness_mm: 2.0,
        size: 192,
        ..Default::default()
    };
    let (series, truth) = write_phantom(&tmp.path().join("in"), &spec).unwrap();
    let files: Vec<PathBuf> = series.files;
    let levels = truth.levels.len();

    let (agent_port, agent_tls_port) = (free_port(), free_port());
    let orthanc = Orthanc::start_with(
        &tmp.path().join("orthanc"),
        serde_json::json!({
            "DicomTlsEnabled": true,
            "DicomTlsCertificate": file("a.pem"),
            "DicomTlsPrivateKey": file("a.key"),
            "DicomTlsTrustedCertificates": file("ca.pem"),
            "DicomTlsRemoteCertificateRequired": true,
            "DicomModalities": {
                "idaics": { "AET": "IDAICS", "Host": "127.0.0.1", "Port": agent_tls_port, "UseDicomTls": true }
            },
        }),
    );
    let config = tmp.path().join("idaics.toml");
    std::fs::write(
        &config,
        format!(
            "[dicom]\ntls_port = {agent_tls_port}\ntls_certificate = {:?}\ntls_private_key = {:?}\ntls_client_ca = {:?}\n\
             [[destinations]]\nae_title = \"ORTHANC\"\nhost = \"localhost\"\nport = {}\ntls = true\ntls_ca = {:?}\n\
             tls_certificate = {:?}\ntls_private_key = {:?}\n",
            file("b.pem"),
            file("b.key"),
            file("ca.pem"),
            orthanc.dicom_port,
            file("ca.pem"),
            file("b.pem"),
            file("b.key"),
        ),
    )
    .unwrap();
    let agent = Agent::start_on_with_args(
        &tmp.path().join("state"),
        agent_port,
        &[("IDAICS_MODEL_WEIGHTS", PHANTOM_MODEL), ("IDAICS_MODEL_DEVICE", "cpu")],
        &["--config", config.to_str().unwrap()],
    );

    // Into Orthanc over TLS (its DICOM port takes nothing else), then on to the agent's TLS port.
    let tls = ["+tls", &file("b.key"), &file("b.pem"), "+cf", &file("ca.pem")];
    assert_eq!(store_outcomes(&storescu(orthanc.dicom_port, &tls, &files)), (files.len(), 0));
    let source_series = orthanc.json("/series");
    let (status, body) = http_post(
        orthanc.http_port,
        "/modalities/idaics/store",
        &serde_json::json!({ "Resources": [source_series[0]], "Synchronous": true }).to_string(),
    );
    assert_eq!(status, 200, "Orthanc's C-STORE over TLS to the agent: {body}\n{}", agent.log());
    assert_eq!(agent.spool_files().len(), files.len());
    let expected = files.len() + (1 + levels) + 1 + levels + 1;
    wait_until("the results in Orthanc, over TLS", Duration::from_secs(240), || {
        orthanc.json("/statistics")["CountInstances"].as_u64() == Some(expected as u64)
    });
    let statistics = orthanc.json("/statistics");
    assert_eq!((statistics["CountPatients"].as_u64(), statistics["CountStudies"].as_u64()), (Some(1), Some(1)));
}
