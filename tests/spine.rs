//! Disc localisation and naming on phantoms with known truth.

use idaics::config::SeriesConfig;
use idaics::phantom::{PhantomSpec, parse_levels, write_phantom};
use idaics::spine::locate_discs;
use idaics::volume::load_series;

#[test]
fn twenty_phantoms_every_disc_within_3_mm_and_named() {
    let tmp = tempfile::tempdir().unwrap();
    let conditions = ["", "L4/L5=bulge", "L3/L4=protrusion,L5/S1=schmorl", "L1/L2=schmorl,L2/L3=bulge"];
    // (pixel spacing, slice thickness, size): 0.6 to 3 mm, covering 230 to 340 mm.
    let grids = [(0.6, 1.0, 384), (1.0, 1.25, 320), (1.5, 2.0, 224), (2.0, 2.5, 160), (3.0, 3.0, 112)];
    let mut worst: f64 = 0.0;
    for seed in 1..=20u64 {
        let (px, thick, size) = grids[seed as usize % grids.len()];
        let spec = PhantomSpec {
            seed,
            levels: parse_levels(conditions[seed as usize % conditions.len()]).unwrap(),
            pixel_spacing_mm: px,
            slice_thickness_mm: thick,
            size,
        };
        let dir = tmp.path().join(format!("p{seed}"));
        let (series, truth) = write_phantom(&dir, &spec).unwrap();
        let volume = load_series(&series.files, &SeriesConfig::default()).unwrap();
        let found = locate_discs(&volume).unwrap();
        assert_eq!(found.len(), truth.levels.len(), "seed {seed}: found {found:#?}");
        for (t, f) in truth.levels.iter().zip(&found) {
            assert_eq!(f.name, t.name, "seed {seed}");
            assert!(f.name_certain, "seed {seed}: {} uncertain", f.name);
            let d = (0..3).map(|a| (f.center_lps_mm[a] - t.center_lps_mm[a]).powi(2)).sum::<f64>().sqrt();
            worst = worst.max(d);
            assert!(d <= 3.0, "seed {seed} ({px} mm, {thick} mm) {}: {d:.2} mm off", t.name);
            let cos = (0..3).map(|a| f.normal[a] * t.normal[a]).sum::<f64>();
            assert!(cos > 0.98, "seed {seed} {}: normal {:?} vs {:?}", t.name, f.normal, t.normal);
        }
        std::fs::remove_dir_all(&dir).unwrap();
    }
    eprintln!("largest disc centre error over 20 phantoms: {worst:.2} mm");
}

#[test]
fn without_the_sacrum_names_are_uncertain() {
    let tmp = tempfile::tempdir().unwrap();
    let spec = PhantomSpec { seed: 4, pixel_spacing_mm: 2.0, slice_thickness_mm: 2.0, size: 160, ..Default::default() };
    let (series, truth) = write_phantom(tmp.path(), &spec).unwrap();
    // Keep only the slices above L4/L5's disc centre + 15 mm: the sacrum and L5/S1 are cut off.
    let cut = truth.levels[1].center_lps_mm[2] + 15.0;
    let files: Vec<_> = series
        .files
        .iter()
        .filter(|f| {
            let obj = dicom_object::open_file(f).unwrap();
            let z = obj.element(dicom_dictionary_std::tags::IMAGE_POSITION_PATIENT).unwrap().to_multi_float64().unwrap()[2];
            z > cut
        })
        .cloned()
        .collect();
    let volume = load_series(&files, &SeriesConfig::default()).unwrap();
    let found = locate_discs(&volume).unwrap();
    assert!(!found.is_empty());
    assert!(found.iter().all(|l| !l.name_certain), "{found:#?}");
    // Still found where the truth has them (L3/L4 and up).
    for f in &found {
        let nearest = truth.levels.iter().map(|t| (0..3).map(|a| (f.center_lps_mm[a] - t.center_lps_mm[a]).powi(2)).sum::<f64>().sqrt()).fold(f64::MAX, f64::min);
        assert!(nearest <= 3.0, "{f:?} is {nearest:.2} mm from any true disc");
    }
}
