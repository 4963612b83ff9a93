//! The training recipe's own tools (model/tools, standard-library Python): their unit tests, and
//! the agent's export converted into a YOLO-seg dataset with patient-grouped folds.

use std::path::Path;
use std::process::Command;

use idaics::phantom::{PhantomSpec, parse_levels, write_phantom};

fn python() -> String {
    std::env::var("IDAICS_PYTHON").unwrap_or_else(|_| "python3".into())
}

fn tools() -> &'static Path {
    Path::new(concat!(env!("CARGO_MANIFEST_DIR"), "/model/tools"))
}

#[test]
fn labelme_conversion_unit_tests_pass() {
    let out = Command::new(python())
        .args(["-m", "unittest", "discover", "-s"])
        .arg(tools())
        .args(["-p", "test_*.py", "-v"])
        .output()
        .expect("python3");
    let text = String::from_utf8_lossy(&out.stderr).into_owned();
    assert!(out.status.success() && text.contains("OK"), "{text}");
}

/// Two phantom patients exported as a reader would receive them, their labels set from the
/// phantoms' truth (a script standing in for the radiologist), converted into folds.
#[test]
fn an_export_corrected_to_the_truth_converts_into_patient_grouped_folds() {
    let tmp = tempfile::tempdir().unwrap();
    let export = tmp.path().join("export");
    let mut truths = Vec::new();
    for seed in [7201u64, 7202] {
        let spec = PhantomSpec {
            seed,
            levels: parse_levels("L4/L5=protrusion,L5/S1=schmorl").unwrap(),
            pixel_spacing_mm: 1.5,
            slice_thickness_mm: 2.0,
            size: 192,
            ..Default::default()
        };
        let dir = tmp.path().join(format!("series{seed}"));
        let (_, truth) = write_phantom(&dir, &spec).unwrap();
        truths.push(truth);
        let out = Command::new(env!("CARGO_BIN_EXE_idaics"))
            .args(["dataset", "export"])
            .arg(&dir)
            .arg("--out")
            .arg(&export)
            .arg("--state-dir")
            .arg(tmp.path().join("state"))
            .output()
            .unwrap();
        assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    }
    // The reader: every unlabelled disc gets its truth.
    let condition_of = |level: &str| {
        truths.iter().flat_map(|t| &t.levels).find(|l| l.name == level).map(|l| l.condition.class()).unwrap()
    };
    let mut images = 0;
    for entry in std::fs::read_dir(&export).unwrap() {
        let path = entry.unwrap().path();
        if path.extension().is_none_or(|e| e != "json") {
            continue;
        }
        images += 1;
        let mut doc: serde_json::Value = serde_json::from_slice(&std::fs::read(&path).unwrap()).unwrap();
        for shape in doc["shapes"].as_array_mut().unwrap() {
            let level = shape["description"].as_str().unwrap().split(' ').next().unwrap().to_string();
            assert_eq!(shape["label"], "unlabelled");
            shape["label"] = condition_of(&level).into();
        }
        std::fs::write(&path, serde_json::to_vec(&doc).unwrap()).unwrap();
    }
    let dataset = tmp.path().join("dataset");
    let out = Command::new(python())
        .arg(tools().join("labelme_to_yolo.py"))
        .arg(&export)
        .arg("--out")
        .arg(&dataset)
        .args(["--folds", "2"])
        .output()
        .unwrap();
    let printed = String::from_utf8_lossy(&out.stdout).into_owned() + &String::from_utf8_lossy(&out.stderr);
    assert!(out.status.success(), "{printed}");
    assert!(printed.contains(&format!("{images} images of 2 patients in 2 folds")), "{printed}");
    // Every disc became one object of its class: per image, the axial one disc, the sagittal all.
    let mut per_class = [0usize; 4];
    for entry in std::fs::read_dir(dataset.join("labels")).unwrap() {
        for line in std::fs::read_to_string(entry.unwrap().path()).unwrap().lines() {
            let fields: Vec<&str> = line.split(' ').collect();
            per_class[fields[0].parse::<usize>().unwrap()] += 1;
            assert!(fields.len() >= 7 && fields.len() % 2 == 1, "{line}");
            assert!(fields[1..].iter().all(|v| (0.0..=1.0).contains(&v.parse::<f64>().unwrap())), "{line}");
        }
    }
    // Per patient: 4 normal, 1 schmorl, 1 protrusion discs, each on its axial and the sagittal.
    assert_eq!(per_class, [16, 4, 0, 4]);
    let cases = std::fs::read_to_string(dataset.join("cases.csv")).unwrap();
    let mut folds_of_patient = std::collections::BTreeMap::<String, std::collections::BTreeSet<String>>::new();
    for line in cases.lines().skip(1) {
        let fields: Vec<&str> = line.split(',').collect();
        folds_of_patient.entry(fields[1].into()).or_default().insert(fields[2].into());
    }
    assert_eq!(folds_of_patient.len(), 2);
    assert!(folds_of_patient.values().all(|f| f.len() == 1), "{cases}");
    assert!(dataset.join("fold_0.yaml").is_file() && dataset.join("fold_1.yaml").is_file());
}
