//! Test harness: starts the real `idaics` binary on a free port with a fresh state directory and
//! talks to it with DCMTK's tools (and, for deliberately broken data sets that DCMTK refuses to
//! send, with a raw dicom-ul SCU).
#![allow(dead_code)]

pub mod pki;
pub mod postgres;

use std::io::{BufRead, BufReader};
use std::net::TcpListener;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Output, Stdio};
use std::time::{Duration, Instant};

pub const AE: &str = "IDAICS";

/// Repository-relative path of the shared test data (never copied into the repository).
pub fn shared_data() -> PathBuf {
    let p = Path::new(env!("CARGO_MANIFEST_DIR")).join("../shared/data");
    assert!(p.is_dir(), "shared test data not found at {}", p.display());
    p
}

/// Fails the test (never skips it) when a tool it talks to (DCMTK, Orthanc) is missing.
pub fn require_tool(name: &str) {
    let found = Command::new("sh")
        .arg("-c")
        .arg(format!("command -v {name}"))
        .output()
        .map(|o| o.status.success())
        .unwrap_or(false);
    assert!(found, "{name} is not installed: the README's test command installs it");
}

/// The phantom test model (model/README.md): detections and masks from a real network.
pub const PHANTOM_MODEL: &str = concat!(env!("CARGO_MANIFEST_DIR"), "/model/phantom-yolov8n-seg.safetensors");

/// Polls `check` until it holds; fails the test after `timeout`.
pub fn wait_until(what: &str, timeout: Duration, mut check: impl FnMut() -> bool) {
    let deadline = Instant::now() + timeout;
    while !check() {
        assert!(Instant::now() < deadline, "timed out waiting for {what}");
        std::thread::sleep(Duration::from_millis(100));
    }
}

/// Numbers below a bound from a seeded xorshift64* generator: a fuzz test mutates the same way
/// on every run, so a failure can be replayed.
pub fn seeded_random(seed: u64) -> impl FnMut(usize) -> usize {
    let mut state = seed;
    move |below: usize| {
        state ^= state >> 12;
        state ^= state << 25;
        state ^= state >> 27;
        (state.wrapping_mul(0x2545_F491_4F6C_DD1D) >> 33) as usize % below.max(1)
    }
}

/// One random mutation of `bytes`: a few bytes changed within the first `head` (where the
/// headers are), the end cut off, a run of bytes repeated, or bits flipped anywhere.
pub fn mutate(bytes: &mut Vec<u8>, head: usize, next: &mut impl FnMut(usize) -> usize) {
    let head = head.min(bytes.len()).max(1);
    match next(4) {
        0 if !bytes.is_empty() => (0..1 + next(8)).for_each(|_| bytes[next(head)] = next(256) as u8),
        1 => bytes.truncate(next(bytes.len())),
        2 => {
            let at = next(bytes.len());
            let chunk = bytes[at..(at + next(500)).min(bytes.len())].to_vec();
            bytes.splice(at..at, chunk);
        }
        _ if !bytes.is_empty() => (0..1 + next(30)).for_each(|_| {
            let at = next(bytes.len());
            bytes[at] ^= 1 << next(8)
        }),
        _ => {}
    }
}

pub fn free_port() -> u16 {
    TcpListener::bind("127.0.0.1:0").unwrap().local_addr().unwrap().port()
}

pub struct Agent {
    pub port: u16,
    pub state_dir: PathBuf,
    pub log_path: PathBuf,
    child: Option<Child>,
    /// Started under a wrapper: the agent is the child's child.
    wrapped: bool,
}

impl Agent {
    /// Starts the agent with `env` as IDAICS_* overrides and waits until it answers C-ECHO.
    pub fn start(state_dir: &Path, env: &[(&str, &str)]) -> Agent {
        Self::start_on(state_dir, free_port(), env)
    }

    pub fn start_on(state_dir: &Path, port: u16, env: &[(&str, &str)]) -> Agent {
        Self::start_on_with_args(state_dir, port, env, &[])
    }

    /// Starts the agent with extra `serve` arguments (destinations, ...).
    pub fn start_with_args(state_dir: &Path, env: &[(&str, &str)], args: &[&str]) -> Agent {
        Self::start_on_with_args(state_dir, free_port(), env, args)
    }

    pub fn start_on_with_args(state_dir: &Path, port: u16, env: &[(&str, &str)], args: &[&str]) -> Agent {
        Self::start_under(&[], state_dir, port, env, args)
    }

    /// Starts the agent as the last argument of `wrapper` (a tracer, say); the child is then the
    /// wrapper, and [`Agent::pid`] is still the agent's.
    pub fn start_under(wrapper: &[&str], state_dir: &Path, port: u16, env: &[(&str, &str)], args: &[&str]) -> Agent {
        require_tool("echoscu");
        std::fs::create_dir_all(state_dir).unwrap();
        let log_path = state_dir.with_extension(format!("{}.log", now_ms()));
        let log = std::fs::File::create(&log_path).unwrap();
        let mut cmd = match wrapper {
            [] => Command::new(env!("CARGO_BIN_EXE_idaics")),
            [program, wrapper_args @ ..] => {
                let mut cmd = Command::new(program);
                cmd.args(wrapper_args).arg(env!("CARGO_BIN_EXE_idaics"));
                cmd
            }
        };
        cmd.args(["serve", "--port", &port.to_string(), "--state-dir"])
            .arg(state_dir)
            .args(args)
            .env("IDAICS_LOGGING_FORMAT", "json")
            .env("IDAICS_DICOM_BIND_ADDRESS", "127.0.0.1")
            // Tests talk to it from loopback only; a test of the allow-lists sets its own.
            .env("IDAICS_DICOM_ALLOW_ANY_PEER", "true")
            .env("IDAICS_LIMITS_MIN_FREE_DISK_MB", "16")
            .env("IDAICS_HTTP_PORT", free_port().to_string())
            .env_remove("RUST_LOG")
            .stdout(Stdio::null())
            .stderr(log);
        for (k, v) in env {
            cmd.env(k, v);
        }
        let child = cmd.spawn().expect("start idaics");
        let mut agent = Agent {
            port,
            state_dir: state_dir.to_path_buf(),
            log_path,
            child: Some(child),
            wrapped: !wrapper.is_empty(),
        };
        let deadline = Instant::now() + Duration::from_secs(20);
        loop {
            if agent.log().contains("listening for DICOM associations") {
                break;
            }
            if let Some(status) = agent.child.as_mut().unwrap().try_wait().unwrap() {
                panic!("agent exited with {status} during start-up:\n{}", agent.log());
            }
            assert!(Instant::now() < deadline, "agent did not start:\n{}", agent.log());
            std::thread::sleep(Duration::from_millis(50));
        }
        agent
    }

    /// The agent's peak resident memory so far (VmHWM), in KiB.
    pub fn peak_rss_kb(&self) -> u64 {
        let pid = self.pid();
        let status = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap();
        let line = status.lines().find(|l| l.starts_with("VmHWM:")).expect("VmHWM");
        line.split_whitespace().nth(1).unwrap().parse().unwrap()
    }

    pub fn log(&self) -> String {
        std::fs::read_to_string(&self.log_path).unwrap_or_default()
    }

    /// Log records (JSON lines) whose message is `message`.
    pub fn events(&self, message: &str) -> Vec<serde_json::Value> {
        log_events(&self.log_path, message)
    }

    pub fn echo(&self) -> bool {
        Command::new("echoscu")
            .args(["-aec", AE, "-to", "10", "127.0.0.1", &self.port.to_string()])
            .output()
            .map(|o| o.status.success())
            .unwrap_or(false)
    }

    pub fn storescu(&self, extra: &[&str], files: &[PathBuf]) -> Output {
        storescu(self.port, extra, files)
    }

    pub fn kill(&mut self) {
        // A killed tracer would leave the agent running, detached: the agent goes first.
        if let Some(agent) = self.wrapped_agent() {
            // SAFETY: a plain kill(2) on the wrapper's child's pid.
            unsafe { libc::kill(agent as i32, libc::SIGKILL) };
        }
        if let Some(mut child) = self.child.take() {
            let _ = child.kill();
            child.wait().unwrap();
        }
    }

    /// Freezes the agent (SIGSTOP), as a host that hangs or drops off the network looks to
    /// the others: it holds its files and claims but does nothing.
    pub fn freeze(&self) {
        self.signal(libc::SIGSTOP);
    }

    /// Asks the agent to re-read its configuration and weights (SIGHUP, as `systemctl reload`).
    pub fn hangup(&self) {
        self.signal(libc::SIGHUP);
    }

    /// Lets a frozen agent go on (SIGCONT).
    pub fn thaw(&self) {
        self.signal(libc::SIGCONT);
    }

    /// The agent's process id: the child's, or the wrapper's only child's.
    pub fn pid(&self) -> u32 {
        let child = self.child.as_ref().expect("agent running").id();
        if !self.wrapped {
            return child;
        }
        self.wrapped_agent().unwrap_or_else(|| panic!("the wrapper {child} runs no agent"))
    }

    /// The wrapper's only child, while there is one.
    fn wrapped_agent(&self) -> Option<u32> {
        let child = self.child.as_ref().filter(|_| self.wrapped)?.id();
        let children = std::fs::read_to_string(format!("/proc/{child}/task/{child}/children")).ok()?;
        match children.split_whitespace().collect::<Vec<_>>()[..] {
            [only] => only.parse().ok(),
            _ => None,
        }
    }

    fn signal(&self, signal: i32) {
        let pid = self.pid();
        // SAFETY: a plain kill(2) on our own child's pid.
        assert_eq!(unsafe { libc::kill(pid as i32, signal) }, 0, "kill({pid}, {signal})");
    }

    /// SIGTERM and wait; returns the exit status.
    pub fn terminate(&mut self) -> std::process::ExitStatus {
        let pid = self.pid();
        let mut child = self.child.take().expect("agent running");
        // SAFETY: a plain kill(2) on our own child's (or the wrapper's child's) pid.
        unsafe {
            libc::kill(pid as i32, libc::SIGTERM);
        }
        let deadline = Instant::now() + Duration::from_secs(40);
        loop {
            if let Some(status) = child.try_wait().unwrap() {
                return status;
            }
            assert!(Instant::now() < deadline, "agent did not stop on SIGTERM; log:\n{}", self.log());
            std::thread::sleep(Duration::from_millis(50));
        }
    }

    pub fn spool_files(&self) -> Vec<PathBuf> {
        let mut out = Vec::new();
        walk(&self.state_dir.join("spool"), &mut out);
        out.retain(|p| p.extension().is_some_and(|e| e == "dcm"));
        out.sort();
        out
    }

    pub fn series_record(&self, study: &str, series: &str) -> Option<serde_json::Value> {
        let p = self.state_dir.join("spool").join(study).join(series).join("series.json");
        std::fs::read(p).ok().map(|b| serde_json::from_slice(&b).unwrap())
    }

    /// Waits until `predicate` holds or panics after `timeout` with the log.
    pub fn wait_for(&self, what: &str, timeout: Duration, mut predicate: impl FnMut(&Agent) -> bool) {
        let deadline = Instant::now() + timeout;
        while !predicate(self) {
            assert!(Instant::now() < deadline, "timed out waiting for {what}; log:\n{}", self.log());
            std::thread::sleep(Duration::from_millis(50));
        }
    }
}

impl Drop for Agent {
    fn drop(&mut self) {
        self.kill();
    }
}

/// Partly received instances in a state directory's `tmp/<host>`. The empty files there are
/// spares the agent creates ahead of need; an instance being received always holds at least its
/// file meta.
pub fn partial_files(state_dir: &Path) -> Vec<PathBuf> {
    std::fs::read_dir(state_dir.join("tmp").join(idaics::common::hostname()))
        .unwrap()
        .flatten()
        .filter(|entry| entry.metadata().is_ok_and(|m| m.len() > 0))
        .map(|entry| entry.path())
        .collect()
}

pub fn log_events(path: &Path, message: &str) -> Vec<serde_json::Value> {
    let Ok(file) = std::fs::File::open(path) else { return Vec::new() };
    BufReader::new(file)
        .lines()
        .map_while(Result::ok)
        .filter_map(|l| serde_json::from_str::<serde_json::Value>(&l).ok())
        .filter(|v| v["fields"]["message"] == message)
        .collect()
}

pub fn storescu(port: u16, extra: &[&str], files: &[PathBuf]) -> Output {
    require_tool("storescu");
    Command::new("storescu")
        .args(["-v", "-R", "-aec", AE, "-to", "20"])
        .args(extra)
        .arg("127.0.0.1")
        .arg(port.to_string())
        .args(files)
        .output()
        .expect("run storescu")
}

/// Store responses storescu reported, as (success, failure) counts.
pub fn store_outcomes(output: &Output) -> (usize, usize) {
    let text = format!("{}{}", String::from_utf8_lossy(&output.stdout), String::from_utf8_lossy(&output.stderr));
    let ok = text.matches("Received Store Response (Success)").count();
    let failed = text.matches("Received Store Response").count() - ok + text.matches("Store Failed").count();
    (ok, failed)
}

pub fn output_text(output: &Output) -> String {
    format!("{}{}", String::from_utf8_lossy(&output.stdout), String::from_utf8_lossy(&output.stderr))
}

fn walk(dir: &Path, out: &mut Vec<PathBuf>) {
    if let Ok(rd) = std::fs::read_dir(dir) {
        for e in rd.flatten() {
            let p = e.path();
            if p.is_dir() {
                walk(&p, out);
            } else {
                out.push(p);
            }
        }
    }
}

fn now_ms() -> u128 {
    std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).unwrap().as_nanos()
}

/// Runs a DCMTK conversion tool and asserts it worked; an empty `output` modifies in place.
pub fn dcmtk(tool: &str, args: &[&str], input: &Path, output: &Path) {
    require_tool(tool);
    let mut cmd = Command::new(tool);
    cmd.args(args).arg(input);
    if !output.as_os_str().is_empty() {
        cmd.arg(output);
    }
    let out = cmd.output().unwrap();
    assert!(out.status.success(), "{tool} {args:?} failed: {}", output_text(&out));
}

/// A minimal SCU that sends arbitrary bytes as a C-STORE data set, for inputs no well-behaved
/// tool would send. Returns the DIMSE status of the response.
pub fn raw_store(port: u16, sop_class: &str, sop_instance: &str, ts: &str, dataset: &[u8]) -> u16 {
    let mut scu = RawScu::connect(port, sop_class, ts);
    let status = scu.store(sop_instance, dataset);
    scu.release();
    status
}

/// One association of [`raw_store`], for many stores.
pub struct RawScu {
    association: dicom_ul::association::client::ClientAssociation<std::net::TcpStream>,
    sop_class: String,
}

impl RawScu {
    pub fn connect(port: u16, sop_class: &str, ts: &str) -> RawScu {
        let association = dicom_ul::association::client::ClientAssociationOptions::new()
            .calling_ae_title("RAWSCU")
            .with_presentation_context(sop_class, vec![ts])
            .establish_with(&format!("{AE}@127.0.0.1:{port}"))
            .expect("association");
        RawScu { association, sop_class: sop_class.to_string() }
    }

    pub fn store(&mut self, sop_instance: &str, dataset: &[u8]) -> u16 {
        use dicom_ul::Pdu;
        use dicom_ul::pdu::{PDataValue, PDataValueType};
        let pc = self.association.presentation_contexts()[0].id;
        let command = idaics::dimse::store_request(&self.sop_class, sop_instance, 1).unwrap();
        self.association
            .send(&Pdu::PData {
                data: vec![PDataValue {
                    presentation_context_id: pc,
                    value_type: PDataValueType::Command,
                    is_last: true,
                    data: command,
                }],
            })
            .unwrap();
        let chunks: Vec<&[u8]> = if dataset.is_empty() { vec![&[]] } else { dataset.chunks(16_000).collect() };
        let n = chunks.len();
        for (i, chunk) in chunks.into_iter().enumerate() {
            self.association
                .send(&Pdu::PData {
                    data: vec![PDataValue {
                        presentation_context_id: pc,
                        value_type: PDataValueType::Data,
                        is_last: i + 1 == n,
                        data: chunk.to_vec(),
                    }],
                })
                .unwrap();
        }
        // The response may come in fragments, to a peer that takes small PDUs.
        let mut response = Vec::new();
        loop {
            match self.association.receive().unwrap() {
                Pdu::PData { data } => {
                    assert!(data.iter().all(|v| v.value_type == PDataValueType::Command), "{data:?}");
                    response.extend(data.iter().flat_map(|v| v.data.iter().copied()));
                    if data.iter().any(|v| v.is_last) {
                        break;
                    }
                }
                other => panic!("unexpected PDU {other:?}"),
            }
        }
        let obj = dicom_object::InMemDicomObject::read_dataset_with_ts(
            &response[..],
            &dicom_transfer_syntax_registry::entries::IMPLICIT_VR_LITTLE_ENDIAN.erased(),
        )
        .unwrap();
        obj.element(dicom_dictionary_std::tags::STATUS).unwrap().to_int::<u16>().unwrap()
    }

    pub fn release(self) {
        let _ = self.association.release();
    }
}

/// A DICOM file's SOPInstanceUID, without its padding.
pub fn sop_instance_uid(path: &Path) -> String {
    let object = dicom_object::open_file(path).unwrap();
    let uid = object.element(dicom_dictionary_std::tags::SOP_INSTANCE_UID).unwrap().to_str().unwrap();
    uid.trim_end_matches(['\0', ' ']).to_string()
}

/// The data set bytes of a DICOM file (everything after the file meta group), and its TS.
pub fn dataset_bytes(path: &Path) -> (Vec<u8>, String) {
    let bytes = std::fs::read(path).unwrap();
    assert_eq!(&bytes[128..132], b"DICM");
    let group_len = u32::from_le_bytes(bytes[140..144].try_into().unwrap()) as usize;
    let start = 144 + group_len;
    let obj = dicom_object::open_file(path).unwrap();
    (bytes[start..].to_vec(), obj.meta().transfer_syntax().trim_end_matches('\0').to_string())
}

/// A plain HTTP GET on loopback: (status, body).
pub fn http_get(port: u16, path: &str) -> (u16, String) {
    http_request(port, "GET", path, "")
}

/// A plain HTTP POST of a JSON body on loopback: (status, body).
pub fn http_post(port: u16, path: &str, json: &str) -> (u16, String) {
    http_request(port, "POST", path, json)
}

fn http_request(port: u16, method: &str, path: &str, body: &str) -> (u16, String) {
    use std::io::{Read, Write};
    let mut stream = std::net::TcpStream::connect(("127.0.0.1", port)).unwrap();
    write!(
        stream,
        "{method} {path} HTTP/1.1\r\nHost: localhost\r\nConnection: close\r\nContent-Type: application/json\r\nContent-Length: {}\r\n\r\n{body}",
        body.len()
    )
    .unwrap();
    let mut response = String::new();
    stream.read_to_string(&mut response).unwrap();
    let status = response.split_whitespace().nth(1).and_then(|s| s.parse().ok()).unwrap_or(0);
    let (head, body) = response.split_once("\r\n\r\n").unwrap_or((&response, ""));
    let chunked = head.lines().any(|l| l.eq_ignore_ascii_case("transfer-encoding: chunked"));
    (status, if chunked { dechunk(body) } else { body.to_string() })
}

/// The body of a response sent in chunks (RFC 9112 section 7.1): each chunk's hex size line, its
/// data and CRLF, until the chunk of size 0.
fn dechunk(mut rest: &str) -> String {
    let mut body = String::new();
    while let Some((size_line, after)) = rest.split_once("\r\n") {
        let size = usize::from_str_radix(size_line.split(';').next().unwrap().trim(), 16)
            .unwrap_or_else(|_| panic!("not a chunk size: {size_line:?}"));
        if size == 0 {
            break;
        }
        body.push_str(&after[..size]);
        rest = after[size..].strip_prefix("\r\n").expect("CRLF after a chunk");
    }
    body
}

/// DCMTK storescp as the destination PACS.
pub struct StoreScp {
    child: Child,
    dir: PathBuf,
    log: PathBuf,
}

impl StoreScp {
    pub fn start(port: u16, dir: &Path) -> StoreScp {
        Self::start_with_args(port, dir, &[])
    }

    /// With more storescp options (a configuration profile, say).
    pub fn start_with_args(port: u16, dir: &Path, args: &[&str]) -> StoreScp {
        std::fs::create_dir_all(dir).unwrap();
        // storescp names files by SOP instance UID and overwrites a second copy with a warning on
        // stderr: the log is what tells a duplicate delivery.
        let log = dir.with_extension("storescp.log");
        let child = Command::new("storescp")
            .args(args)
            .args(["-aet", "PACS", "-od"])
            .arg(dir)
            .arg(port.to_string())
            .stdout(Stdio::null())
            .stderr(std::fs::OpenOptions::new().create(true).append(true).open(&log).unwrap())
            .spawn()
            .expect("storescp (dcmtk)");
        std::thread::sleep(Duration::from_millis(300));
        StoreScp { child, dir: dir.to_path_buf(), log }
    }

    pub fn received(&self) -> Vec<PathBuf> {
        std::fs::read_dir(&self.dir).map(|r| r.flatten().map(|e| e.path()).collect()).unwrap_or_default()
    }

    /// Every object arrived, none twice; returns the files.
    pub fn assert_each_once(&self, expected: usize) -> Vec<PathBuf> {
        let received = self.received();
        assert_eq!(received.len(), expected, "{received:?}");
        let log = std::fs::read_to_string(&self.log).unwrap_or_default();
        assert!(!log.contains("already exists"), "an object arrived twice:\n{log}");
        received
    }
}

impl Drop for StoreScp {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

const SR_STORAGE: &str = "1.2.840.10008.5.1.4.1.1.88.34";

/// A configuration file that names the weights (on the CPU), for `--config` and SIGHUP.
pub fn write_model_config(path: &Path, weights: &Path) {
    let text = format!("[model]\nweights = {:?}\ndevice = \"cpu\"\n", weights.to_str().unwrap());
    std::fs::write(path, text).unwrap();
}

/// The SRs delivered to a folder destination so far.
pub fn delivered_reports(folder: &Path) -> Vec<PathBuf> {
    let mut found = Vec::new();
    let mut stack = vec![folder.to_path_buf()];
    while let Some(dir) = stack.pop() {
        for entry in std::fs::read_dir(&dir).into_iter().flatten().flatten() {
            let path = entry.path();
            if path.is_dir() {
                stack.push(path);
            } else if let Ok(object) = dicom_object::open_file(&path)
                && object.meta().media_storage_sop_class_uid.trim_end_matches('\0') == SR_STORAGE
            {
                found.push(path);
            }
        }
    }
    found.sort();
    found
}

/// Sends a new series to an agent whose destination is `folder`; returns the SR it brings back.
pub fn analyse_to_folder(agent: &Agent, folder: &Path, series: &[PathBuf]) -> Vec<u8> {
    let before = delivered_reports(folder);
    assert_eq!(store_outcomes(&agent.storescu(&[], series)).0, series.len(), "{}", agent.log());
    let mut new = Vec::new();
    wait_until("the series' SR", Duration::from_secs(240), || {
        new = delivered_reports(folder).into_iter().filter(|p| !before.contains(p)).collect();
        !new.is_empty()
    });
    std::fs::read(&new[0]).unwrap()
}

/// Whether an object names the weights with this SHA-256 (the SR's algorithm identification).
pub fn names_weights(object: &[u8], sha256: &str) -> bool {
    object.windows(sha256.len()).any(|w| w == sha256.as_bytes())
}

/// The audit trail an agent wrote to its embedded finding log so far: (event, detail) pairs.
pub fn audit_trail(state_dir: &Path) -> Vec<(String, String)> {
    let url = format!("sqlite://{}", state_dir.join("idaics.db").display());
    let runtime = tokio::runtime::Builder::new_current_thread().enable_all().build().unwrap();
    runtime.block_on(async {
        let db = idaics::store::db::Db::connect(&url).await.unwrap();
        let rows = db.audit_events("").await.unwrap_or_default();
        rows.into_iter().map(|r| (r.event, r.detail.unwrap_or_default())).collect()
    })
}
