//! Writes a synthetic CT series for benchmarks and manual tries:
//! `cargo run --release --example write_ct_series -- DIR [SLICES] [SIZE] [SEED]`
use idaics::synthetic::{SeriesSpec, write_ct_series};

fn main() -> anyhow::Result<()> {
    let args: Vec<String> = std::env::args().skip(1).collect();
    let dir = args.first().ok_or_else(|| anyhow::anyhow!("usage: write_ct_series DIR [SLICES] [SIZE] [SEED]"))?;
    let mut spec = SeriesSpec::default();
    if let Some(s) = args.get(1) {
        spec.slices = s.parse()?;
    }
    if let Some(s) = args.get(2) {
        spec.size = s.parse()?;
    }
    if let Some(s) = args.get(3) {
        spec.seed = s.parse()?;
    }
    let series = write_ct_series(std::path::Path::new(dir), &spec)?;
    println!("{} {} {}", series.files.len(), series.study_uid, series.series_uid);
    Ok(())
}
