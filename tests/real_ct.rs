//! Disc levels on whole real CTs (../shared/data/real/*/truth.json, read by eye): every scored
//! disc found within 6 mm along z and named right, and no level named with certainty and wrong,
//! on the series as archives hold them and on series made from them the way archives break
//! them (a block of slices missing, a localizer inside the series).

use std::path::{Path, PathBuf};

use dicom_core::value::PrimitiveValue;
use dicom_core::{DataElement, VR};
use dicom_dictionary_std::tags;
use idaics::config::SeriesConfig;
use idaics::spine::DiscLevel;

const TOLERANCE_MM: f64 = 6.0;

struct TruthDisc {
    level: String,
    z: f64,
    scored: bool,
}

fn real(name: &str) -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../shared/data/real").join(name)
}

fn truth(name: &str) -> Vec<TruthDisc> {
    let text = std::fs::read_to_string(real(name).join("truth.json")).expect("truth.json");
    let doc: serde_json::Value = serde_json::from_str(&text).unwrap();
    doc["discs"]
        .as_array()
        .unwrap()
        .iter()
        .map(|d| TruthDisc {
            level: d["level"].as_str().unwrap().to_string(),
            z: d["center_lps_mm"][2].as_f64().unwrap(),
            scored: d["scored"].as_bool().unwrap_or(true),
        })
        .collect()
}

fn strs(values: &[&str]) -> PrimitiveValue {
    PrimitiveValue::Strs(values.iter().map(|v| v.to_string()).collect())
}

fn series_files(dir: &Path) -> Vec<PathBuf> {
    let mut files: Vec<PathBuf> = std::fs::read_dir(dir)
        .unwrap()
        .map(|e| e.unwrap().path())
        .filter(|p| p.extension().is_some_and(|e| e == "dcm"))
        .collect();
    files.sort();
    files
}

fn levels_of(files: &[PathBuf]) -> Vec<DiscLevel> {
    let (blocks, _notes) = idaics::volume::load_blocks(files, &SeriesConfig::default()).unwrap();
    idaics::pipeline::analyze(&blocks, None).unwrap().levels
}

/// The acceptance rule of the real-CT issue (as ../shared/tools/score_real_levels.py applies it):
/// the problems found, empty when the levels pass. Only truth discs inside `z_range` are scored.
fn problems(levels: &[DiscLevel], truth: &[TruthDisc], z_range: (f64, f64)) -> Vec<String> {
    let mut found = Vec::new();
    for disc in truth.iter().filter(|d| d.scored && (z_range.0..=z_range.1).contains(&d.z)) {
        if !levels.iter().any(|l| l.name == disc.level && (l.center_lps_mm[2] - disc.z).abs() <= TOLERANCE_MM) {
            found.push(format!("{} at z {:.1} not found and named", disc.level, disc.z));
        }
    }
    for level in levels.iter().filter(|l| l.name_certain) {
        let z = level.center_lps_mm[2];
        let nearest = truth.iter().min_by(|a, b| (a.z - z).abs().total_cmp(&(b.z - z).abs())).unwrap();
        if (nearest.z - z).abs() <= TOLERANCE_MM && nearest.level != level.name {
            found.push(format!("{} at z {z:.1} named with certainty; it is {}", level.name, nearest.level));
        }
        let same: Vec<&TruthDisc> = truth.iter().filter(|d| d.level == level.name).collect();
        if !same.is_empty() && same.iter().all(|d| (d.z - z).abs() > TOLERANCE_MM) {
            found.push(format!("{} at z {z:.1} named with certainty; that disc is at {:.1}", level.name, same[0].z));
        }
    }
    found
}

fn assert_levels(name: &str, levels: &[DiscLevel], z_range: (f64, f64)) {
    let problems = problems(levels, &truth(name), z_range);
    let summary: Vec<String> =
        levels.iter().map(|l| format!("{}@{:.1}", l.label(), l.center_lps_mm[2])).collect();
    assert!(problems.is_empty(), "{name}: {problems:?}; levels {summary:?}");
}

#[test]
fn low_dose_pet_ct_from_t9_to_the_hips() {
    let name = "acrin-flt-breast-001-ct";
    let levels = levels_of(&series_files(&real(name)));
    assert_levels(name, &levels, (f64::MIN, f64::MAX));
    // Sacrum and ribs are both in view and agree: every lumbar name is certain.
    assert!(levels.iter().filter(|l| l.name.starts_with('L')).all(|l| l.name_certain));
}

#[test]
fn planning_ct_without_sacrum_is_named_from_the_ribs() {
    let name = "pancreas-ct-cb001";
    let levels = levels_of(&series_files(&real(name)));
    assert_levels(name, &levels, (f64::MIN, f64::MAX));
}

#[test]
fn colonography_with_archive_gaps_is_analysed_on_its_blocks() {
    let name = "colonography-0518-gaps";
    let files = series_files(&real(name));
    let (blocks, notes) = idaics::volume::load_blocks(&files, &SeriesConfig::default()).unwrap();
    assert!(notes.iter().any(|n| n.contains("35.20 mm")), "{notes:?}");
    assert!(blocks.len() >= 2, "{} blocks", blocks.len());
    let levels = idaics::pipeline::analyze(&blocks, None).unwrap().levels;
    assert_levels(name, &levels, (f64::MIN, f64::MAX));
    // Above the gap no landmark anchors the count: no name there may claim certainty. Its discs
    // (T10/T11 and T9/T10) are counted on from the block below, across the gap, and lie above
    // the levels reported, rather than counted up from their own lowest as L5/S1 and L4/L5.
    assert!(levels.iter().filter(|l| l.center_lps_mm[2] > -127.0).all(|l| !l.name_certain));
    let mut names: Vec<&str> = levels.iter().map(|l| l.name.as_str()).collect();
    names.sort();
    names.dedup();
    assert_eq!(names.len(), levels.len(), "a name given twice: {levels:#?}");
    assert!(levels.iter().all(|l| l.center_lps_mm[2] < -127.0), "{levels:#?}");
}

/// The PET/CT with a 60 mm block of slices (over L1/L2 and L2/L3) missing, as when a block of a
/// series never reached the archive: each side is analysed on its own, and what is named on
/// either side is either right or marked uncertain.
#[test]
fn a_series_with_a_block_missing_keeps_its_levels_on_both_sides() {
    let name = "acrin-flt-breast-001-ct";
    let (low, high) = (-640.0, -580.0);
    let files: Vec<PathBuf> = series_files(&real(name))
        .into_iter()
        .filter(|f| {
            let object = dicom_object::OpenFileOptions::new().read_until(tags::PIXEL_DATA).open_file(f).unwrap();
            let z = object.element(tags::IMAGE_POSITION_PATIENT).unwrap().to_multi_float64().unwrap()[2];
            !(low..=high).contains(&z)
        })
        .collect();
    let (blocks, notes) = idaics::volume::load_blocks(&files, &SeriesConfig::default()).unwrap();
    assert_eq!(blocks.len(), 2, "{notes:?}");
    let levels = idaics::pipeline::analyze(&blocks, None).unwrap().levels;
    // The discs well away from the gap (their flanks are imaged) are scored.
    assert_levels(name, &levels, (f64::MIN, low - 15.0));
    let problems = problems(&levels, &truth(name), (high + 15.0, f64::MAX));
    assert!(problems.is_empty(), "{problems:?}");
}

/// A localizer stored inside the series (another orientation, another size) is set aside with a
/// note; the levels are those of the series without it.
#[test]
fn a_localizer_inside_the_series_is_set_aside() {
    let name = "pancreas-ct-cb001";
    let tmp = tempfile::tempdir().unwrap();
    let mut files = series_files(&real(name));
    let mut localizer = dicom_object::open_file(&files[40]).unwrap();
    localizer.put(DataElement::new(
        tags::IMAGE_ORIENTATION_PATIENT,
        VR::DS,
        strs(&["1", "0", "0", "0", "0", "-1"]),
    ));
    localizer.put(DataElement::new(tags::IMAGE_TYPE, VR::CS, strs(&["ORIGINAL", "PRIMARY", "LOCALIZER"])));
    let uid = "1.2.826.0.1.3680043.8.498.99999999999999999999";
    localizer.put(DataElement::new(tags::SOP_INSTANCE_UID, VR::UI, PrimitiveValue::from(uid)));
    localizer.meta_mut().media_storage_sop_instance_uid = uid.to_string();
    let path = tmp.path().join("localizer.dcm");
    localizer.write_to_file(&path).unwrap();
    files.push(path);
    let (blocks, notes) = idaics::volume::load_blocks(&files, &SeriesConfig::default()).unwrap();
    assert_eq!(blocks.len(), 1);
    assert_eq!(blocks[0].dims[2], 79);
    assert!(notes.iter().any(|n| n.contains("another orientation")), "{notes:?}");
    let levels = idaics::pipeline::analyze(&blocks, None).unwrap().levels;
    assert_levels(name, &levels, (f64::MIN, f64::MAX));
}
