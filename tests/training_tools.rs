//! The training recipe's own tools (model/tools): their unit tests, the agent's export converted
//! into a YOLO-seg dataset with patient-grouped folds, and the whole loop from export to weights a
//! running agent reloads.

mod common;

use std::path::Path;
use std::process::Command;
use std::time::Duration;

use common::{Agent, PHANTOM_MODEL, analyse_to_folder, names_weights, wait_until, write_model_config};

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

/// Phantom patients exported as a reader receives them, every disc's label then set from the
/// phantoms' truth (a script standing in for the radiologist). Returns the number of images.
fn export_corrected_to_truth(tmp: &Path, export: &Path, seeds: &[u64]) -> usize {
    let mut truths = Vec::new();
    for &seed in seeds {
        let spec = PhantomSpec {
            seed,
            levels: parse_levels("L4/L5=protrusion,L5/S1=schmorl").unwrap(),
            pixel_spacing_mm: 1.5,
            slice_thickness_mm: 2.0,
            size: 192,
            ..Default::default()
        };
        let dir = tmp.join(format!("series{seed}"));
        let (_, truth) = write_phantom(&dir, &spec).unwrap();
        truths.push(truth);
        let out = Command::new(env!("CARGO_BIN_EXE_idaics"))
            .args(["dataset", "export"])
            .arg(&dir)
            .arg("--out")
            .arg(export)
            .arg("--state-dir")
            .arg(tmp.join("state"))
            .output()
            .unwrap();
        assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    }
    let condition_of = |level: &str| {
        truths.iter().flat_map(|t| &t.levels).find(|l| l.name == level).map(|l| l.condition.class()).unwrap()
    };
    let mut images = 0;
    for entry in std::fs::read_dir(export).unwrap() {
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
    images
}

fn convert(export: &Path, dataset: &Path, folds: usize) -> String {
    let out = Command::new(python())
        .arg(tools().join("labelme_to_yolo.py"))
        .arg(export)
        .arg("--out")
        .arg(dataset)
        .args(["--folds", &folds.to_string()])
        .output()
        .unwrap();
    let printed = String::from_utf8_lossy(&out.stdout).into_owned() + &String::from_utf8_lossy(&out.stderr);
    assert!(out.status.success(), "{printed}");
    printed
}

#[test]
fn an_export_corrected_to_the_truth_converts_into_patient_grouped_folds() {
    let tmp = tempfile::tempdir().unwrap();
    let export = tmp.path().join("export");
    let images = export_corrected_to_truth(tmp.path(), &export, &[7201, 7202]);
    let dataset = tmp.path().join("dataset");
    let printed = convert(&export, &dataset, 2);
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

    // The converted dataset scored fold by fold, with a model card.
    let card = tmp.path().join("card.md");
    let weights = concat!(env!("CARGO_MANIFEST_DIR"), "/model/phantom-yolov8n-seg.safetensors");
    let out = Command::new(env!("CARGO_BIN_EXE_idaics"))
        .args(["evaluate", "--images", "--device", "cpu", "--format", "json", "--weights", weights])
        .arg(dataset.join("images"))
        .arg("--folds")
        .arg(dataset.join("cases.csv"))
        .arg("--model-card")
        .arg(&card)
        .output()
        .unwrap();
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    let scored: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(scored["total"].as_u64(), Some(24), "{scored}");
    let folds = scored["folds"].as_array().unwrap();
    assert_eq!(folds.len(), 2, "{scored}");
    assert_eq!(folds.iter().map(|f| f["total"].as_u64().unwrap()).sum::<u64>(), 24);
    let map50 = scored["map50"].as_f64().unwrap();
    assert!((0.0..=1.0).contains(&map50) && map50 > 0.5, "{scored}");
    let card = std::fs::read_to_string(&card).unwrap();
    let sha = idaics::report::sha256_file(Path::new(weights)).unwrap();
    assert!(card.contains(&sha) && card.contains("## Figures") && card.contains("mAP50"), "{card}");
}

/// The whole loop a site runs, on phantoms, on the CPU: the agent analyses and exports them, a
/// script stands in for the radiologist, the recipe converts and trains (one epoch at 128 px on two
/// folds of four patients) and exports safetensors, `idaics evaluate` scores them on a phantom no
/// fold has seen, and a running agent takes them by SIGHUP: the next SR names them. Needs torch and
/// ultralytics: scripts/test.sh makes a Python with model/tools/requirements.txt and names it in
/// IDAICS_TRAIN_PYTHON.
#[test]
fn the_whole_loop_from_export_to_a_reloaded_agent() {
    let python = std::env::var("IDAICS_TRAIN_PYTHON").expect(
        "IDAICS_TRAIN_PYTHON: a Python with model/tools/requirements.txt (scripts/test.sh makes one in target/trainenv)",
    );
    let tmp = tempfile::tempdir().unwrap();
    let export = tmp.path().join("export");
    export_corrected_to_truth(tmp.path(), &export, &[7301, 7302, 7303, 7304]);
    let dataset = tmp.path().join("dataset");
    convert(&export, &dataset, 2);
    let weights = tmp.path().join("site.safetensors");
    let out = Command::new(&python)
        .arg(tools().join("train.py"))
        .arg(&dataset)
        .arg(&weights)
        .args(["--epochs", "1", "--imgsz", "128", "--batch", "4", "--device", "cpu"])
        .env("YOLO_OFFLINE", "1")
        .output()
        .unwrap();
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    // The metadata says how the weights were made.
    let bytes = std::fs::read(&weights).unwrap();
    let length = u64::from_le_bytes(bytes[..8].try_into().unwrap()) as usize;
    let header: serde_json::Value = serde_json::from_slice(&bytes[8..8 + length]).unwrap();
    let metadata = &header["__metadata__"];
    let recipe: serde_json::Value = serde_json::from_str(metadata["recipe"].as_str().unwrap()).unwrap();
    assert_eq!(
        (recipe["lr0"].as_f64(), recipe["fliplr"].as_f64(), recipe["optimizer"].as_str()),
        (Some(0.001), Some(0.5), Some("AdamW"))
    );
    assert_eq!(metadata["dataset_images"], "28");
    assert_eq!(metadata["dataset_sha256"].as_str().unwrap().len(), 64);
    let folds: serde_json::Value = serde_json::from_str(metadata["fold_metrics"].as_str().unwrap()).unwrap();
    assert_eq!(folds.as_object().unwrap().len(), 2);
    // The agent loads them and scores a phantom no fold has seen.
    let unseen_spec = |seed| PhantomSpec {
        seed,
        levels: parse_levels("L4/L5=protrusion").unwrap(),
        pixel_spacing_mm: 1.5,
        slice_thickness_mm: 2.0,
        size: 192,
        ..Default::default()
    };
    let unseen = tmp.path().join("unseen");
    write_phantom(&unseen, &unseen_spec(7399)).unwrap();
    let out = Command::new(env!("CARGO_BIN_EXE_idaics"))
        .args(["evaluate", "--device", "cpu", "--format", "json", "--weights"])
        .arg(&weights)
        .arg(&unseen)
        .output()
        .unwrap();
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    let scored: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    assert!(scored.as_object().unwrap().contains_key("kappa"), "{scored}");
    assert_eq!(scored["total"].as_u64(), Some(6), "{scored}");

    // A running agent on the shipped weights takes the site's by SIGHUP, between two series.
    let config = tmp.path().join("idaics.toml");
    write_model_config(&config, Path::new(PHANTOM_MODEL));
    let folder = tmp.path().join("pacs");
    std::fs::create_dir_all(&folder).unwrap();
    let agent = Agent::start_with_args(
        &tmp.path().join("agent"),
        &[],
        &["--config", config.to_str().unwrap(), "--destination", folder.to_str().unwrap()],
    );
    let series =
        |seed: u64| write_phantom(&tmp.path().join(format!("sent{seed}")), &unseen_spec(seed)).unwrap().0.files;
    let (shipped_sha, site_sha) = (
        idaics::report::sha256_file(Path::new(PHANTOM_MODEL)).unwrap(),
        idaics::report::sha256_file(&weights).unwrap(),
    );
    let sr = analyse_to_folder(&agent, &folder, &series(7398));
    assert!(names_weights(&sr, &shipped_sha), "before the reload: the shipped weights");
    write_model_config(&config, &weights);
    agent.hangup();
    wait_until("the reload", Duration::from_secs(60), || agent.log().contains("weights reloaded"));
    let sr = analyse_to_folder(&agent, &folder, &series(7397));
    assert!(names_weights(&sr, &site_sha) && !names_weights(&sr, &shipped_sha), "the next SR names the site's weights");
}
