//! Training and validation images for the phantom test model, made by the agent's own pipeline.
//!
//! Each phantom (random disc conditions, bone density, grid) is written as a DICOM series, loaded,
//! localised and sliced exactly as a received series is; so the network trains on the very images
//! it will be shown. Every image gets a label map from the phantom's ground truth (pixel value =
//! level index + 1, 0 elsewhere) and `manifest.json` says which condition each label holds.
//! `model/tools/train_phantom.py` turns the label maps into YOLO polygons and trains.
//!
//!     cargo run --release --example phantom_dataset -- OUT_DIR [PHANTOMS] [FIRST_SEED] [SERIES_DIR]
//!
//! With SERIES_DIR the phantoms' DICOM series and truth.json stay there, one folder per seed,
//! for `idaics evaluate`; without it they are deleted once sliced.

use std::path::Path;

use idaics::analysis::slices::SliceImage;
use idaics::phantom::{Condition, DiscLabels, LEVELS, PhantomSpec, write_phantom};
use serde_json::json;

/// Grids of real lumbar CT, as the locator's tests use: (pixel spacing, slice thickness, size).
const GRIDS: [(f64, f64, u16); 5] =
    [(0.6, 1.0, 384), (0.8, 1.25, 320), (1.0, 2.0, 256), (1.2, 2.5, 224), (1.5, 3.0, 176)];
const CONDITIONS: [Condition; 4] = [Condition::Normal, Condition::Schmorl, Condition::Bulge, Condition::Protrusion];

/// A splitmix64 stream: the dataset is a function of its seeds.
struct Choices(u64);
impl Choices {
    fn pick(&mut self, n: usize) -> usize {
        self.0 = self.0.wrapping_add(0x9E37_79B9_7F4A_7C15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
        ((z ^ (z >> 31)) % n as u64) as usize
    }
}

fn spec_for(seed: u64) -> PhantomSpec {
    let mut choices = Choices(seed.wrapping_mul(0xD1B5_4A32_D192_ED03));
    let (pixel_spacing_mm, slice_thickness_mm, size) = GRIDS[choices.pick(GRIDS.len())];
    let levels = LEVELS.iter().map(|l| (l.to_string(), CONDITIONS[choices.pick(CONDITIONS.len())])).collect();
    // Dense bone only: in the one window the network sees, osteoporotic bone and disc differ by a
    // few gray levels, and a test model should learn what the images show.
    PhantomSpec { seed, levels, pixel_spacing_mm, slice_thickness_mm, size, ..PhantomSpec::default() }
}

fn write_image(image: &SliceImage, labels: &DiscLabels, out: &Path, stem: &str) -> anyhow::Result<serde_json::Value> {
    let size = image.size as u32;
    let mut label_map = vec![0u8; image.size * image.size];
    for row in 0..image.size {
        for column in 0..image.size {
            if let Some(level) = labels.level_at(image.pixel_to_lps(column as f64, row as f64)) {
                label_map[row * image.size + column] = level as u8 + 1;
            }
        }
    }
    image::GrayImage::from_raw(size, size, image.pixels.clone())
        .expect("size * size pixels")
        .save(out.join(format!("{stem}.png")))?;
    image::GrayImage::from_raw(size, size, label_map)
        .expect("size * size labels")
        .save(out.join(format!("{stem}.label.png")))?;
    let classes: serde_json::Map<String, serde_json::Value> =
        (0..LEVELS.len()).map(|level| ((level + 1).to_string(), json!(labels.condition(level).class()))).collect();
    Ok(json!({ "image": format!("{stem}.png"), "labels": format!("{stem}.label.png"), "classes": classes }))
}

fn main() -> anyhow::Result<()> {
    let args: Vec<String> = std::env::args().skip(1).collect();
    let out = Path::new(
        args.first()
            .ok_or_else(|| anyhow::anyhow!("usage: phantom_dataset OUT_DIR [PHANTOMS] [FIRST_SEED] [SERIES_DIR]"))?,
    );
    let phantoms: u64 = args.get(1).map(|s| s.parse()).transpose()?.unwrap_or(60);
    let first_seed: u64 = args.get(2).map(|s| s.parse()).transpose()?.unwrap_or(1000);
    let kept = args.get(3).map(Path::new);
    std::fs::create_dir_all(out)?;
    let scratch = tempfile::tempdir()?;
    let mut entries = Vec::new();
    for seed in first_seed..first_seed + phantoms {
        let spec = spec_for(seed);
        let dir = kept.unwrap_or(scratch.path()).join(seed.to_string());
        let (series, _) = write_phantom(&dir, &spec)?;
        let volume = idaics::analysis::volume::load_series(&series.files, &Default::default())?;
        let analysis = idaics::pipeline::analyze(std::slice::from_ref(&volume), None)?;
        let labels = DiscLabels::new(&spec);
        for image in analysis.sagittal.iter() {
            entries.push(write_image(image, &labels, out, &format!("p{seed}_sagittal"))?);
        }
        for (level, image) in analysis.levels.iter().zip(&analysis.axials) {
            entries.push(write_image(image, &labels, out, &format!("p{seed}_axial_{}", level.name.replace('/', "-")))?);
        }
        if kept.is_none() {
            std::fs::remove_dir_all(&dir)?;
        }
        eprintln!("phantom {seed}: {} levels found", analysis.levels.len());
    }
    std::fs::write(out.join("manifest.json"), serde_json::to_vec_pretty(&json!({ "images": entries }))?)?;
    Ok(())
}
