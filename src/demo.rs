//! `idaics demo`: the whole path with no set-up. A synthetic lumbar CT study with known disc
//! conditions is written, the real agent is started on loopback (its own state directory, the
//! embedded SQLite finding log, a folder as the PACS), the series is sent to it by C-STORE as a
//! modality would, and when the job is done and every object delivered, the agent is stopped and
//! its findings are printed beside the phantom's truth.
//!
//! Top-level orchestration like the CLI, so errors are `anyhow`.

use std::net::{TcpListener, TcpStream};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use anyhow::{Context, bail};

use crate::phantom::{PhantomSpec, parse_levels, write_phantom};

/// The phantom test model, where a source checkout or the package puts it.
const MODEL_FILE: &str = "phantom-yolov8n-seg.safetensors";
const MARKER: &str = ".idaics-demo";
/// A phantom on a coarse grid: quick to write and to analyse on a laptop CPU.
const PIXEL_SPACING_MM: f64 = 1.0;
const SLICE_THICKNESS_MM: f64 = 2.0;
const SIZE: u16 = 256;

pub struct DemoOptions {
    pub out: PathBuf,
    pub weights: Option<PathBuf>,
    pub levels: String,
    pub seed: u64,
    /// How long the job and its deliveries may take.
    pub timeout: Duration,
}

/// The weights the demo uses when none are named: the phantom test model beside the sources
/// (`model/`) or where the package installs it.
fn default_weights() -> Option<PathBuf> {
    let mut candidates = vec![PathBuf::from("model").join(MODEL_FILE)];
    if let Ok(exe) = std::env::current_exe()
        && let Some(bin) = exe.parent()
    {
        candidates.push(bin.join("../share/idaics").join(MODEL_FILE));
        candidates.push(bin.join("../../model").join(MODEL_FILE)); // target/release/idaics
    }
    candidates.push(PathBuf::from("/usr/share/idaics").join(MODEL_FILE));
    // Printed to the user: /usr/share/idaics/..., not /usr/bin/../share/idaics/...
    candidates.into_iter().find(|p| p.is_file()).map(|p| p.canonicalize().unwrap_or(p))
}

fn free_port() -> anyhow::Result<u16> {
    Ok(TcpListener::bind("127.0.0.1:0")?.local_addr()?.port())
}

/// The output folder holds the demo's own earlier runs only: it is emptied when it carries our
/// marker and refused when it holds anything else.
fn prepare(out: &Path) -> anyhow::Result<()> {
    if out.exists() {
        let empty = std::fs::read_dir(out)?.next().is_none();
        if !empty && !out.join(MARKER).exists() {
            bail!("{} is not empty and not an earlier demo's folder; name another with --out", out.display());
        }
        for dir in ["phantom", "state", "pacs"] {
            let path = out.join(dir);
            if path.exists() {
                std::fs::remove_dir_all(&path).with_context(|| format!("cannot clear {}", path.display()))?;
            }
        }
    }
    std::fs::create_dir_all(out)?;
    std::fs::write(out.join(MARKER), "written by idaics demo; its contents are replaced at each run\n")?;
    Ok(())
}

/// The agent as a child process, stopped (SIGTERM, then killed) when dropped.
struct AgentProcess(Child);

impl Drop for AgentProcess {
    fn drop(&mut self) {
        // SAFETY: kill(2) on our own child's pid.
        unsafe { libc::kill(self.0.id() as i32, libc::SIGTERM) };
        let deadline = Instant::now() + Duration::from_secs(10);
        while Instant::now() < deadline {
            if let Ok(Some(_)) = self.0.try_wait() {
                return;
            }
            std::thread::sleep(Duration::from_millis(100));
        }
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

pub fn run(options: &DemoOptions) -> anyhow::Result<()> {
    let out = &options.out;
    prepare(out)?;
    let spec = PhantomSpec {
        seed: options.seed,
        levels: parse_levels(&options.levels).map_err(anyhow::Error::msg)?,
        pixel_spacing_mm: PIXEL_SPACING_MM,
        slice_thickness_mm: SLICE_THICKNESS_MM,
        size: SIZE,
        ..PhantomSpec::default()
    };
    let (series, truth) = write_phantom(&out.join("phantom"), &spec)?;
    println!("phantom: {} slices of {SIZE}x{SIZE} in {}", series.files.len(), out.join("phantom").display());

    let weights = options.weights.clone().or_else(default_weights);
    match &weights {
        Some(w) => println!("weights: {}", w.display()),
        None => println!("weights: none found ({MODEL_FILE}); every level will be undetermined"),
    }
    let (port, http_port) = (free_port()?, free_port()?);
    let state = out.join("state");
    let pacs = out.join("pacs");
    let log_path = out.join("agent.log");
    let mut command = Command::new(std::env::current_exe()?);
    // The demo's agent runs on built-in defaults: overrides meant for a real agent (allow-lists,
    // a PostgreSQL URL, ...) stay out of it.
    for (key, _) in std::env::vars_os() {
        if key.to_string_lossy().starts_with(crate::config::ENV_PREFIX) {
            command.env_remove(&key);
        }
    }
    command
        .args(["serve", "--port", &port.to_string(), "--http-port", &http_port.to_string(), "--ae-title", "IDAICS"])
        .arg("--state-dir")
        .arg(&state)
        .arg("--destination")
        .arg(&pacs)
        .env("IDAICS_DICOM_BIND_ADDRESS", "127.0.0.1")
        .env("IDAICS_DICOM_ALLOWED_PEERS", "127.0.0.1")
        .env("IDAICS_HTTP_BIND_ADDRESS", "127.0.0.1")
        .env("IDAICS_MODEL_WEIGHTS", weights.as_deref().map(|w| w.to_string_lossy().into_owned()).unwrap_or_default())
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(std::fs::File::create(&log_path)?);
    let mut agent = AgentProcess(command.spawn().context("cannot start the agent")?);
    println!("agent: DICOM on 127.0.0.1:{port}, HTTP on 127.0.0.1:{http_port}, log in {}", log_path.display());
    wait_for_listener(port, &mut agent, &log_path)?;

    let peer = crate::report::scu::Peer { ae_title: "IDAICS".into(), host: "127.0.0.1".into(), port, tls: None };
    let started = Instant::now();
    let statuses = crate::report::scu::store_all(&peer, "IDAICS-DEMO", &series.files, Duration::from_secs(30))?;
    let refused = statuses.iter().filter(|s| **s != 0).count();
    if refused > 0 {
        bail!("the agent refused {refused} of {} instances; see {}", statuses.len(), log_path.display());
    }
    println!("sent: {} instances by C-STORE, one association", statuses.len());

    let runtime = tokio::runtime::Builder::new_current_thread().enable_all().build()?;
    let findings = runtime.block_on(async {
        let db = crate::store::db::Db::open(&format!("sqlite://{}", state.join("idaics.db").display()))?;
        let deadline = Instant::now() + options.timeout;
        loop {
            if Instant::now() > deadline {
                bail!("no result within {} s; see {}", options.timeout.as_secs(), log_path.display());
            }
            tokio::time::sleep(Duration::from_millis(300)).await;
            let job = db.latest_job(&truth.series_uid).await.ok().flatten();
            match job {
                Some((state, error)) if state == "failed" => {
                    bail!("the job failed: {}", error.unwrap_or_default())
                }
                // The agent writes while we read: a busy database is asked again.
                Some((state, _)) if state == "done" && db.outbox_depth().await.unwrap_or(1) == 0 => {
                    let filter =
                        crate::store::db::FindingFilter { study: Some(truth.study_uid.clone()), ..Default::default() };
                    if let Ok(rows) = db.findings(&filter, crate::store::db::Page::ALL).await {
                        break Ok(rows);
                    }
                }
                _ => {}
            }
        }
    })?;
    drop(agent);
    println!("done in {:.1} s: series received, analysed, objects delivered\n", started.elapsed().as_secs_f64());

    println!("{:<7} {:<13} {:>10}  {:<10}  {:<8}", "LEVEL", "FINDING", "CONFIDENCE", "TRUTH", "");
    // Head to foot, as a radiologist reads them (the truth lists them from the sacrum up).
    let mut findings = findings;
    findings.sort_by_key(|f| std::cmp::Reverse(truth.levels.iter().position(|t| t.name == f.level)));
    for f in &findings {
        let expected = truth.levels.iter().find(|t| t.name == f.level).map_or("-", |t| t.condition.class());
        let agrees = if expected == f.class { "agrees" } else { "differs" };
        println!("{:<7} {:<13} {:>10.2}  {:<10}  {agrees}", f.level, f.class, f.confidence, expected);
    }
    let delivered =
        crate::ingest::spool::instance_files(&pacs.join(&truth.series_uid)).map(|f| f.len()).unwrap_or_default();
    println!(
        "\nobjects for the PACS (key slices, SEG, Secondary Captures, SR): {delivered} in {}",
        pacs.join(&truth.series_uid).display()
    );
    println!("finding log: idaics findings --database-url sqlite://{}", state.join("idaics.db").display());
    Ok(())
}

/// Waits until the agent accepts TCP connections, or says why it will not.
fn wait_for_listener(port: u16, agent: &mut AgentProcess, log: &Path) -> anyhow::Result<()> {
    let deadline = Instant::now() + Duration::from_secs(60);
    while Instant::now() < deadline {
        if TcpStream::connect(("127.0.0.1", port)).is_ok() {
            return Ok(());
        }
        if let Ok(Some(status)) = agent.0.try_wait() {
            bail!("the agent stopped at start ({status}); see {}", log.display());
        }
        std::thread::sleep(Duration::from_millis(100));
    }
    bail!("the agent did not listen within 60 s; see {}", log.display())
}
