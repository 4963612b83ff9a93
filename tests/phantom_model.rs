//! The phantom test model (model/phantom-yolov8n-seg.safetensors) through the whole analysis, on
//! phantoms it never saw: each level's fused finding against the phantom's condition, and each
//! supporting mask against the phantom's ground-truth disc in that view.

use idaics::analysis::slices::SliceImage;
use idaics::config::SeriesConfig;
use idaics::phantom::{DiscLabels, LEVELS, PhantomSpec, parse_levels, write_phantom};
use idaics::pipeline::Detector;

const WEIGHTS: &str = concat!(env!("CARGO_MANIFEST_DIR"), "/model/phantom-yolov8n-seg.safetensors");

/// Dice overlap of a detection's mask with the level's disc as the phantom draws it.
fn dice(
    image: &SliceImage,
    mask: &idaics::analysis::detector::predict::Mask,
    labels: &DiscLabels,
    level: usize,
) -> f64 {
    let (mut both, mut detected, mut truth) = (0usize, 0usize, 0usize);
    for row in 0..image.size {
        for column in 0..image.size {
            let d = mask.data[row * mask.width + column];
            let t = labels.level_at(image.pixel_to_lps(column as f64, row as f64)) == Some(level);
            both += usize::from(d && t);
            detected += usize::from(d);
            truth += usize::from(t);
        }
    }
    2.0 * both as f64 / (detected + truth).max(1) as f64
}

#[test]
fn unseen_phantoms_get_each_level_classified_and_outlined() {
    let detector = Detector::load(WEIGHTS.as_ref(), "cpu").unwrap();
    let tmp = tempfile::tempdir().unwrap();
    // Seeds outside the training (1000-1079) and validation (5000-5011) sets; every class at
    // several levels, on grids from 0.8 to 1.2 mm.
    let cases = [
        (7001, "L5/S1=protrusion,L4/L5=bulge,L3/L4=schmorl", 0.8, 1.25, 320),
        (7002, "L4/L5=protrusion,L2/L3=bulge,L1/L2=schmorl,L5/S1=bulge", 1.0, 2.0, 256),
        (7003, "T12/L1=protrusion,L3/L4=bulge,L5/S1=schmorl", 1.2, 2.5, 224),
    ];
    let (mut correct, mut total) = (0, 0);
    let mut report = String::new();
    let mut worst_dice: f64 = 1.0;
    for (seed, conditions, pixel_spacing_mm, slice_thickness_mm, size) in cases {
        let spec = PhantomSpec {
            seed,
            levels: parse_levels(conditions).unwrap(),
            pixel_spacing_mm,
            slice_thickness_mm,
            size,
            ..Default::default()
        };
        let (series, truth) = write_phantom(&tmp.path().join(seed.to_string()), &spec).unwrap();
        let volume = idaics::analysis::volume::load_series(&series.files, &SeriesConfig::default()).unwrap();
        let analysis = idaics::pipeline::analyze(std::slice::from_ref(&volume), Some(&detector)).unwrap();
        let labels = DiscLabels::new(&spec);
        assert_eq!(analysis.findings.len(), truth.levels.len(), "seed {seed}");
        for finding in &analysis.findings {
            let level = LEVELS.iter().position(|l| *l == finding.level.name).expect("a phantom level");
            let expected = labels.condition(level).class();
            total += 1;
            correct += usize::from(expected == finding.class);
            report += &format!(
                "seed {seed} {}: {} ({:.2}, {:?}), truth {expected}\n",
                finding.level.name, finding.class, finding.confidence, finding.views
            );
            for evidence in &finding.evidence {
                let image = if evidence.view == "sagittal" {
                    analysis.sagittal.as_ref().unwrap()
                } else {
                    &analysis.axials[analysis.levels.iter().position(|l| l.name == finding.level.name).unwrap()]
                };
                let overlap = dice(image, &evidence.mask, &labels, level);
                report += &format!("    {} {} mask Dice {overlap:.2}\n", evidence.view, evidence.class);
                worst_dice = worst_dice.min(overlap);
            }
        }
    }
    eprintln!("{report}");
    let accuracy = correct as f64 / total as f64;
    assert!(accuracy >= 0.8, "{correct}/{total} levels right:\n{report}");
    assert!(worst_dice >= 0.6, "a mask misses its disc:\n{report}");
}

/// A phantom series stored as an archive that compressed it lossily would send it (12-bit JPEG
/// Extended, by DCMTK at its default quality, read by our own decoder) gets the findings of the
/// uncompressed series, level by level.
#[test]
fn a_lossy_jpeg_extended_series_gets_the_findings_of_the_original() {
    let detector = Detector::load(WEIGHTS.as_ref(), "cpu").unwrap();
    let tmp = tempfile::tempdir().unwrap();
    let spec = PhantomSpec {
        seed: 7004,
        levels: parse_levels("L5/S1=protrusion,L4/L5=bulge,L2/L3=schmorl").unwrap(),
        pixel_spacing_mm: 1.0,
        slice_thickness_mm: 2.0,
        size: 256,
        ..Default::default()
    };
    let (series, _truth) = write_phantom(&tmp.path().join("plain"), &spec).unwrap();
    let lossy_dir = tmp.path().join("lossy");
    std::fs::create_dir_all(&lossy_dir).unwrap();
    let lossy: Vec<std::path::PathBuf> = series
        .files
        .iter()
        .map(|f| {
            let out = lossy_dir.join(f.file_name().unwrap());
            let run = std::process::Command::new("dcmcjpeg").arg("+ee").arg(f).arg(&out).output().unwrap();
            assert!(run.status.success(), "dcmcjpeg: {}", String::from_utf8_lossy(&run.stderr));
            out
        })
        .collect();
    let findings = |files: &[std::path::PathBuf]| {
        let volume = idaics::analysis::volume::load_series(files, &SeriesConfig::default()).unwrap();
        let analysis = idaics::pipeline::analyze(std::slice::from_ref(&volume), Some(&detector)).unwrap();
        analysis.findings.iter().map(|f| (f.level.name.clone(), f.class)).collect::<Vec<_>>()
    };
    let original = findings(&series.files);
    assert!(!original.is_empty());
    assert_eq!(findings(&lossy), original);
}
