//! `idaics phantom`: a synthetic lumbar CT series whose ground truth matches its voxels.

use std::path::PathBuf;
use std::process::Command;

use idaics::analysis::volume::load_series;
use idaics::config::SeriesConfig;
use idaics::phantom::{Condition, Truth};

fn phantom(dir: &std::path::Path, seed: u64, levels: &str) -> (Truth, Vec<PathBuf>) {
    let out = Command::new(env!("CARGO_BIN_EXE_idaics"))
        .args(["phantom", "--out"])
        .arg(dir)
        .args([
            "--seed",
            &seed.to_string(),
            "--levels",
            levels,
            "--size",
            "128",
            "--pixel-spacing",
            "2.4",
            "--slice-thickness",
            "2.5",
        ])
        .output()
        .unwrap();
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    let truth: Truth = serde_json::from_slice(&std::fs::read(dir.join("truth.json")).unwrap()).unwrap();
    let mut files: Vec<PathBuf> = std::fs::read_dir(dir)
        .unwrap()
        .flatten()
        .map(|e| e.path())
        .filter(|p| p.extension().is_some_and(|e| e == "dcm"))
        .collect();
    files.sort();
    (truth, files)
}

#[test]
fn discs_and_bodies_lie_where_the_truth_says() {
    let tmp = tempfile::tempdir().unwrap();
    let (truth, files) = phantom(tmp.path(), 7, "L3/L4=protrusion,L4/L5=bulge,L5/S1=schmorl");
    let volume = load_series(&files, &SeriesConfig::default()).unwrap();
    assert_eq!(truth.series_uid, volume.series_uid);
    let names: Vec<&str> = truth.levels.iter().map(|l| l.name.as_str()).collect();
    assert_eq!(names, ["L5/S1", "L4/L5", "L3/L4", "L2/L3", "L1/L2", "T12/L1"]);
    assert_eq!(truth.levels[1].condition, Condition::Bulge);
    assert_eq!(truth.levels[2].condition, Condition::Protrusion);
    assert_eq!(truth.levels[0].condition, Condition::Schmorl);
    for level in &truth.levels {
        let c = level.center_lps_mm;
        let n = level.normal;
        assert!((n[0] * n[0] + n[1] * n[1] + n[2] * n[2] - 1.0).abs() < 1e-9);
        // Disc at the centre (noise averaged over a small neighbourhood along the normal).
        let disc: f32 = (-1..=1)
            .map(|t| volume.sample([c[0], c[1] + t as f64 * 0.5 * n[1], c[2] + t as f64 * 0.5 * n[2]]).unwrap())
            .sum::<f32>()
            / 3.0;
        assert!((40.0..130.0).contains(&disc), "{}: {disc} HU at the disc centre", level.name);
        // Bone 18 mm up and down the normal, in the vertebral bodies (or the sacrum).
        for sign in [-1.0, 1.0] {
            let p = [c[0] + sign * 18.0 * n[0], c[1] + sign * 18.0 * n[1], c[2] + sign * 18.0 * n[2]];
            let bone = volume.sample(p).unwrap();
            assert!(bone > 150.0, "{}: {bone} HU 18 mm from the disc", level.name);
        }
    }
    // Air outside the patient.
    assert!(volume.at(0, 0, 0) < -900.0);
}

#[test]
fn seeds_move_the_patient_and_vary_the_spine() {
    let tmp = tempfile::tempdir().unwrap();
    let (a, _) = phantom(&tmp.path().join("a"), 1, "");
    let (b, _) = phantom(&tmp.path().join("b"), 2, "");
    let (a2, _) = phantom(&tmp.path().join("a2"), 1, "");
    assert_ne!(a.levels[3].center_lps_mm, b.levels[3].center_lps_mm);
    assert_eq!(a.levels[3].center_lps_mm, a2.levels[3].center_lps_mm);
    assert!(a.levels.iter().all(|l| l.condition == Condition::Normal));
    let bad = Command::new(env!("CARGO_BIN_EXE_idaics"))
        .args(["phantom", "--out"])
        .arg(tmp.path().join("c"))
        .args(["--levels", "L9/L10=bulge"])
        .output()
        .unwrap();
    assert!(!bad.status.success());
    assert!(String::from_utf8_lossy(&bad.stderr).contains("L9/L10"));
}

/// `--gantry-tilt` writes planes tilted about the left-right axis with positions down the patient
/// axis, and refuses angles no scanner tilts to; `--patient-position` turns rows and columns.
#[test]
fn gantry_tilt_and_patient_position_options_place_the_planes() {
    use dicom_dictionary_std::tags;
    let tmp = tempfile::tempdir().unwrap();
    let run = |tilt: &str, out: &str| {
        Command::new(env!("CARGO_BIN_EXE_idaics"))
            .args(["phantom", "--size", "48", "--pixel-spacing", "8", "--slice-thickness", "10", "--gantry-tilt", tilt])
            .arg("--out")
            .arg(tmp.path().join(out))
            .output()
            .unwrap()
    };
    let ok = run("-12", "tilted");
    assert!(ok.status.success(), "{}", String::from_utf8_lossy(&ok.stderr));
    let read = |name: &str| {
        let object = dicom_object::open_file(tmp.path().join("tilted").join(name)).unwrap();
        let get = |tag| object.element(tag).unwrap().to_multi_float64().unwrap();
        (get(tags::IMAGE_POSITION_PATIENT), get(tags::IMAGE_ORIENTATION_PATIENT))
    };
    let ((p1, o1), (p2, o2)) = (read("slice_0001.dcm"), read("slice_0002.dcm"));
    assert_eq!(o1, o2);
    let (sin, cos) = (-12f64).to_radians().sin_cos();
    let expected = [1.0, 0.0, 0.0, 0.0, cos, sin];
    assert!(o1.iter().zip(expected).all(|(a, b)| (a - b).abs() < 1e-6), "{o1:?}");
    assert!((p1[0] - p2[0]).abs() < 1e-9 && (p1[1] - p2[1]).abs() < 1e-9 && (p1[2] - p2[2] - 10.0).abs() < 1e-6);
    let refused = run("40", "steep");
    assert!(!refused.status.success());
    assert!(String::from_utf8_lossy(&refused.stderr).contains("--gantry-tilt"));

    // Feet first prone: rows along the patient's left, columns anterior, and the position written.
    let write = |position: &str, out: &str| {
        Command::new(env!("CARGO_BIN_EXE_idaics"))
            .args(["phantom", "--size", "48", "--pixel-spacing", "8", "--slice-thickness", "10"])
            .args(["--patient-position", position, "--out"])
            .arg(tmp.path().join(out))
            .output()
            .unwrap()
    };
    assert!(write("ffp", "prone").status.success());
    let object = dicom_object::open_file(tmp.path().join("prone/slice_0001.dcm")).unwrap();
    let orientation = object.element(tags::IMAGE_ORIENTATION_PATIENT).unwrap().to_multi_float64().unwrap();
    assert_eq!(orientation, vec![1.0, 0.0, 0.0, 0.0, -1.0, 0.0]);
    assert_eq!(object.element(tags::PATIENT_POSITION).unwrap().to_str().unwrap().trim(), "FFP");
    let refused = write("sitting", "odd");
    assert!(!refused.status.success());
    assert!(String::from_utf8_lossy(&refused.stderr).contains("HFS, FFS, HFP or FFP"));
}

#[test]
fn analyze_reports_levels_and_skipped_series() {
    let tmp = tempfile::tempdir().unwrap();
    let (truth, _) = phantom(&tmp.path().join("ph"), 11, "L4/L5=protrusion");
    let ct_small =
        std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("../shared/data/corpora/pydicom-test-files/CT_small.dcm");
    let out = Command::new(env!("CARGO_BIN_EXE_idaics"))
        .arg("analyze")
        .arg(tmp.path().join("ph"))
        .arg(&ct_small)
        .arg("--out")
        .arg(tmp.path().join("out"))
        .args(["--format", "json", "--png"])
        .output()
        .unwrap();
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    let pngs = tmp.path().join("out").join(&truth.series_uid);
    for name in ["sagittal.png", "axial_L4-L5.png", "axial_T12-L1.png"] {
        let img = image::open(pngs.join(name)).unwrap_or_else(|e| panic!("{name}: {e}"));
        assert_eq!((img.width(), img.height()), (512, 512));
    }
    let report: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    let written: serde_json::Value =
        serde_json::from_slice(&std::fs::read(tmp.path().join("out/analysis.json")).unwrap()).unwrap();
    assert_eq!(report, written);
    let series = report["series"].as_array().unwrap();
    let phantom = series.iter().find(|s| s["series_uid"] == truth.series_uid.as_str()).unwrap();
    assert!(phantom["skipped"].is_null());
    let names: Vec<&str> = phantom["levels"].as_array().unwrap().iter().map(|l| l["name"].as_str().unwrap()).collect();
    assert_eq!(names, ["L5/S1", "L4/L5", "L3/L4", "L2/L3", "L1/L2", "T12/L1"]);
    assert!(
        phantom["levels"]
            .as_array()
            .unwrap()
            .iter()
            .all(|l| l["finding"]["class"] == "undetermined" && l["name_certain"] == true)
    );
    let single = series.iter().find(|s| s["series_uid"] != truth.series_uid.as_str()).unwrap();
    assert!(single["skipped"].as_str().unwrap().contains("1 slice"));
}
