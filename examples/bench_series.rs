//! End-to-end benchmark: a spine phantom series (300 slices of 512x512 by default) sent by C-STORE
//! to a running agent, timed from the sender's last C-STORE response to the SR arriving at a DCMTK
//! storescp destination; the median of ROUNDS series, each with UIDs of its own, with the job's
//! stages as its log line gives them and the agent's peak RSS. Not a test: it measures.
//!
//! `bench_series [ROUNDS=5] [SLICES=300] [WEIGHTS=model/phantom-yolov8n-seg.safetensors]`, run by
//! bench/series.sh, which builds the agent first. Needs storescp (DCMTK) on the PATH.
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use anyhow::{Context, bail};
use idaics::phantom::{PhantomSpec, write_phantom};

enum Workspace {
    Temporary(tempfile::TempDir),
    Kept(PathBuf),
}

impl Workspace {
    fn path(&self) -> &Path {
        match self {
            Workspace::Temporary(dir) => dir.path(),
            Workspace::Kept(path) => path,
        }
    }
}

struct Reaped(Child);

impl Drop for Reaped {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

fn free_port() -> anyhow::Result<u16> {
    Ok(std::net::TcpListener::bind("127.0.0.1:0")?.local_addr()?.port())
}

fn wait_for_port(port: u16) -> anyhow::Result<()> {
    let deadline = Instant::now() + Duration::from_secs(60);
    while std::net::TcpStream::connect(("127.0.0.1", port)).is_err() {
        if Instant::now() > deadline {
            bail!("nothing listens on port {port}");
        }
        std::thread::sleep(Duration::from_millis(20));
    }
    Ok(())
}

fn srs_received(dir: &Path) -> usize {
    std::fs::read_dir(dir)
        .map(|entries| entries.flatten().filter(|e| e.file_name().to_string_lossy().starts_with("SR")).count())
        .unwrap_or(0)
}

fn median(values: &mut [f64]) -> f64 {
    values.sort_by(f64::total_cmp);
    values[values.len() / 2]
}

fn main() -> anyhow::Result<()> {
    let args: Vec<String> = std::env::args().skip(1).collect();
    let rounds: usize = args.first().map(|s| s.parse()).transpose()?.unwrap_or(5);
    let slices: usize = args.get(1).map(|s| s.parse()).transpose()?.unwrap_or(300);
    let weights = PathBuf::from(args.get(2).cloned().unwrap_or_else(|| "model/phantom-yolov8n-seg.safetensors".into()));
    let weights = weights.canonicalize().with_context(|| format!("weights {}", weights.display()))?;
    let agent_binary = Path::new("target/release/idaics").canonicalize().context("build the agent first")?;
    let work = tempfile::Builder::new().prefix("bench-series-").tempdir()?;
    // BENCH_KEEP=1 keeps the series, the log and what the PACS received.
    let work = if std::env::var_os("BENCH_KEEP").is_some() {
        let kept = work.keep();
        println!("working in {}", kept.display());
        Workspace::Kept(kept)
    } else {
        Workspace::Temporary(work)
    };

    // Series with their own UIDs (seeded), about `slices` slices from T12 to the sacrum.
    let probe = write_phantom(
        &work.path().join("probe"),
        &PhantomSpec { size: 32, slice_thickness_mm: 1.0, pixel_spacing_mm: 10.0, ..Default::default() },
    )?;
    let span_mm = probe.0.files.len() as f64;
    let mut series = Vec::new();
    for round in 0..rounds {
        let spec = PhantomSpec {
            seed: 100 + round as u64,
            size: 512,
            pixel_spacing_mm: 0.7,
            slice_thickness_mm: span_mm / slices as f64,
            ..Default::default()
        };
        series.push(write_phantom(&work.path().join(format!("series-{round}")), &spec)?.0);
    }
    println!("series: {rounds} phantoms of {} slices of 512x512", series[0].files.len());

    let pacs_dir = work.path().join("pacs");
    std::fs::create_dir_all(&pacs_dir)?;
    let pacs_port = free_port()?;
    let _pacs = Reaped(
        // DCMTK writes a response in two parts and, without TCP_NODELAY, waits for the
        // acknowledgement of the first, which the sender delays by 40 ms (bench/ingest.sh too).
        Command::new("storescp")
            .env("TCP_NODELAY", "1")
            .args(["-aet", "PACS", "-od"])
            .arg(&pacs_dir)
            .arg(pacs_port.to_string())
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .context("storescp (DCMTK)")?,
    );
    wait_for_port(pacs_port)?;

    let (port, http_port) = (free_port()?, free_port()?);
    let config = work.path().join("idaics.toml");
    std::fs::write(
        &config,
        format!(
            "[dicom]\nae_title = \"IDAICS\"\nbind_address = \"127.0.0.1\"\nport = {port}\nallowed_peers = [\"127.0.0.1\"]\n\
             [http]\nbind_address = \"127.0.0.1\"\nport = {http_port}\n\
             [storage]\nstate_dir = {:?}\n\
             [model]\nweights = {:?}\n\
             [[destinations]]\nname = \"pacs\"\nae_title = \"PACS\"\nhost = \"127.0.0.1\"\nport = {pacs_port}\n",
            work.path().join("state"),
            weights,
        ),
    )?;
    let log_path = work.path().join("agent.log");
    let mut command = Command::new(&agent_binary);
    for (key, _) in std::env::vars_os() {
        if key.to_string_lossy().starts_with("IDAICS_") {
            command.env_remove(&key);
        }
    }
    let agent = Reaped(
        command
            .args(["serve", "--config"])
            .arg(&config)
            .env("IDAICS_LOGGING_FORMAT", "json")
            .stdout(Stdio::null())
            .stderr(std::fs::File::create(&log_path)?)
            .spawn()
            .context("cannot start the agent")?,
    );
    wait_for_port(port)?;

    let peer = idaics::report::scu::Peer { ae_title: "IDAICS".into(), host: "127.0.0.1".into(), port, tls: None };
    let mut latencies = Vec::new();
    for (round, series) in series.iter().enumerate() {
        let statuses = idaics::report::scu::store_all(&peer, "BENCH", &series.files, Duration::from_secs(60))?;
        // store_all returns once the last response is in and the association released.
        let last_response = Instant::now();
        if statuses.iter().any(|s| *s != 0) {
            bail!("the agent refused instances; see {}", log_path.display());
        }
        let deadline = last_response + Duration::from_secs(120);
        while srs_received(&pacs_dir) <= round {
            if Instant::now() > deadline {
                let log = std::fs::read_to_string(&log_path).unwrap_or_default();
                let tail: Vec<&str> = log.lines().rev().take(15).collect();
                bail!(
                    "no SR within 120 s; the agent's log ends:\n{}",
                    tail.into_iter().rev().collect::<Vec<_>>().join("\n")
                );
            }
            std::thread::sleep(Duration::from_millis(2));
        }
        let seconds = last_response.elapsed().as_secs_f64();
        println!("round {}: last C-STORE response to SR at the PACS {seconds:.3} s", round + 1);
        latencies.push(seconds);
    }
    let status = std::fs::read_to_string(format!("/proc/{}/status", agent.0.id())).unwrap_or_default();
    let peak_mb = status
        .lines()
        .find(|l| l.starts_with("VmHWM:"))
        .and_then(|l| l.split_whitespace().nth(1))
        .and_then(|v| v.parse::<f64>().ok())
        .unwrap_or(0.0)
        / 1024.0;
    drop(agent);

    // The jobs' stages, from their log lines: the median of each.
    let log = std::fs::read_to_string(&log_path)?;
    let mut stages: Vec<(String, Vec<f64>)> = Vec::new();
    for line in log.lines().filter(|l| l.contains("\"job done\"")) {
        let Ok(event) = serde_json::from_str::<serde_json::Value>(line) else { continue };
        let listed = event["fields"]["stages"].as_str().unwrap_or_default();
        for part in listed.split(", ") {
            let Some((name, seconds)) = part.split_once(' ') else { continue };
            let Ok(seconds) = seconds.parse::<f64>() else { continue };
            match stages.iter_mut().find(|(n, _)| n == name) {
                Some((_, values)) => values.push(seconds),
                None => stages.push((name.to_string(), vec![seconds])),
            }
        }
    }
    let breakdown: Vec<String> =
        stages.iter_mut().map(|(name, values)| format!("{name} {:.3}", median(values))).collect();
    println!(
        "median of {rounds}: {:.3} s from the last C-STORE response to the SR (target < 2 s); job stages (median, s): {}; agent peak RSS {peak_mb:.0} MB (target < 1024)",
        median(&mut latencies),
        breakdown.join(", ")
    );
    Ok(())
}
