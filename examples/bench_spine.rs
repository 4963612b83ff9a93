//! From a spooled series to the slices the model sees, timed: a 300-slice 512x512 phantom by
//! default. `bench_spine [SLICES] [DIR] [GANTRY_TILT_DEGREES]` prints the time of each stage and
//! the peak memory against the volume's size (targets: under 2 s in all, memory under twice the
//! volume). A tilted series is resampled to an axial grid for the localisation, which costs time
//! and memory of its own.
use std::time::Instant;

use idaics::phantom::{PhantomSpec, write_phantom};

fn peak_rss_mb() -> f64 {
    std::fs::read_to_string("/proc/self/status")
        .unwrap_or_default()
        .lines()
        .find(|l| l.starts_with("VmHWM:"))
        .and_then(|l| l.split_whitespace().nth(1))
        .and_then(|v| v.parse::<f64>().ok())
        .unwrap_or(0.0)
        / 1024.0
}

fn main() -> anyhow::Result<()> {
    let args: Vec<String> = std::env::args().skip(1).collect();
    let slices: usize = args.first().map(|s| s.parse()).transpose()?.unwrap_or(300);
    let dir = std::path::PathBuf::from(args.get(1).cloned().unwrap_or_else(|| "target/bench-spine".into()));
    let gantry_tilt_degrees: f64 = args.get(2).map(|s| s.parse()).transpose()?.unwrap_or(0.0);
    // Slice thickness chosen so the phantom's T12-to-sacrum span gives about `slices` slices.
    let probe = write_phantom(
        &dir.join("probe"),
        &PhantomSpec { size: 32, slice_thickness_mm: 1.0, pixel_spacing_mm: 10.0, ..Default::default() },
    )?;
    let span_mm = probe.0.files.len() as f64;
    std::fs::remove_dir_all(dir.join("probe"))?;
    let spec = PhantomSpec {
        size: 512,
        pixel_spacing_mm: 0.7,
        slice_thickness_mm: span_mm / slices as f64,
        gantry_tilt_degrees,
        ..Default::default()
    };
    let (series, _) = write_phantom(&dir.join("series"), &spec)?;
    let before = peak_rss_mb();

    let t = Instant::now();
    let volume = idaics::analysis::volume::load_series(&series.files, &Default::default())?;
    let t_volume = t.elapsed().as_secs_f64();
    let t = Instant::now();
    let levels = idaics::analysis::spine::locate_discs(&volume)?;
    let t_locate = t.elapsed().as_secs_f64();
    let t = Instant::now();
    let sagittal = idaics::analysis::slices::sagittal(&volume, &levels, 512);
    let axials: Vec<_> = levels.iter().map(|l| idaics::analysis::slices::axial(&volume, l, 512)).collect();
    let t_slices = t.elapsed().as_secs_f64();
    let volume_mb = volume.byte_size() as f64 / 1e6 * 1.048_576_f64.recip();
    println!(
        "series: {} slices of 512x512, gantry tilt {gantry_tilt_degrees} degrees ({} levels found)",
        series.files.len(),
        levels.len()
    );
    println!("decode + volume: {t_volume:.3} s");
    println!("localisation:    {t_locate:.3} s");
    println!("extraction:      {t_slices:.3} s ({} images)", axials.len() + usize::from(sagittal.is_some()));
    println!("total:           {:.3} s (target < 2 s)", t_volume + t_locate + t_slices);
    println!(
        "peak RSS {:.0} MB (before loading {before:.0} MB), volume {volume_mb:.0} MB: {:.2}x the volume (target < 2)",
        peak_rss_mb(),
        (peak_rss_mb() - before) / volume_mb
    );
    if !volume.is_axis_aligned_axial() {
        // Localisation's own share of a tilted series: the resampling to an axial grid, again.
        let t = Instant::now();
        volume.resample_axial_grid(volume.native_axial_spacing(0.5), false, -1000.0)?;
        println!("  of which resampling to an axial grid: {:.3} s", t.elapsed().as_secs_f64());
    }
    Ok(())
}
