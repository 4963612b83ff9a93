//! candle side of bench/detector.sh: YOLOv8-seg forward time and peak memory.
//! `bench_detector WEIGHTS SIZE RUNS` prints one JSON line. IDAICS_BENCH_DEVICE picks the device
//! (default cpu); IDAICS_BENCH_BATCH=N times batches of N images (default 1; a series' views go
//! through the network as one batch of about seven).
use candle_core::Tensor;

fn main() -> anyhow::Result<()> {
    let args: Vec<String> = std::env::args().skip(1).collect();
    anyhow::ensure!(args.len() == 3, "usage: bench_detector WEIGHTS SIZE RUNS");
    let size: usize = args[1].parse()?;
    let runs: usize = args[2].parse()?;
    let device = idaics::analysis::detector::select_device(
        &std::env::var("IDAICS_BENCH_DEVICE").unwrap_or_else(|_| "cpu".into()),
    )?;
    let (network, _) = idaics::analysis::detector::load_network(std::path::Path::new(&args[0]), &device)?;
    let batch: usize = std::env::var("IDAICS_BENCH_BATCH").ok().map(|b| b.parse()).transpose()?.unwrap_or(1);
    anyhow::ensure!(batch >= 1, "IDAICS_BENCH_BATCH must be at least 1");
    let input = Tensor::rand(0f32, 1f32, (batch, 3, size, size), &device)?;
    for _ in 0..3 {
        network.forward(&input)?;
    }
    let mut times = Vec::with_capacity(runs);
    for _ in 0..runs {
        let t = std::time::Instant::now();
        let (y, _) = network.forward(&input)?;
        device.synchronize()?;
        drop(y);
        times.push(t.elapsed().as_secs_f64() * 1000.0);
    }
    times.sort_by(f64::total_cmp);
    let status = std::fs::read_to_string("/proc/self/status").unwrap_or_default();
    let peak_kb: u64 = status
        .lines()
        .find(|l| l.starts_with("VmHWM:"))
        .and_then(|l| l.split_whitespace().nth(1))
        .and_then(|v| v.parse().ok())
        .unwrap_or(0);
    println!(
        "{}",
        serde_json::json!({
            "peer": "candle",
            "kernel": idaics::analysis::detector::cpu_conv::Kernel::detected().name(),
            "device": format!("{device:?}"),
            "batch": batch,
            "median_ms": times[runs / 2],
            "min_ms": times[0],
            "peak_rss_mb": peak_kb as f64 / 1024.0
        })
    );
    Ok(())
}
