//! `idaics dataset export`: the images the network sees, with LabelMe pre-annotations, named by
//! pseudonyms, ready for a radiologist to correct.

mod common;

use std::path::Path;
use std::process::Command;

use common::PHANTOM_MODEL;
use idaics::phantom::{PhantomSpec, parse_levels, write_phantom};

const LABELS: [&str; 5] = ["normal", "schmorl", "bulge", "protrusion", "unlabelled"];

fn export(args: &[&str]) -> String {
    let out = Command::new(env!("CARGO_BIN_EXE_idaics")).args(["dataset", "export"]).args(args).output().unwrap();
    let text = String::from_utf8_lossy(&out.stdout).into_owned() + &String::from_utf8_lossy(&out.stderr);
    assert!(out.status.success(), "{text}");
    text
}

fn documents(dir: &Path) -> Vec<(String, serde_json::Value)> {
    let mut found: Vec<(String, serde_json::Value)> = std::fs::read_dir(dir)
        .unwrap()
        .map(|e| e.unwrap().path())
        .filter(|p| p.extension().is_some_and(|e| e == "json"))
        .map(|p| {
            let name = p.file_name().unwrap().to_string_lossy().into_owned();
            (name, serde_json::from_slice(&std::fs::read(&p).unwrap()).unwrap())
        })
        .collect();
    found.sort_by(|a, b| a.0.cmp(&b.0));
    found
}

#[test]
fn exports_the_networks_images_with_labelme_pre_annotations_under_pseudonyms() {
    let tmp = tempfile::tempdir().unwrap();
    let spec = PhantomSpec {
        seed: 7004,
        levels: parse_levels("L4/L5=protrusion,L3/L4=bulge,L5/S1=schmorl").unwrap(),
        pixel_spacing_mm: 1.0,
        slice_thickness_mm: 2.0,
        size: 256,
        ..Default::default()
    };
    let series = tmp.path().join("series");
    let (written, truth) = write_phantom(&series, &spec).unwrap();
    let first = dicom_object::open_file(&written.files[0]).unwrap();
    let patient_id =
        first.element(dicom_dictionary_std::tags::PATIENT_ID).unwrap().to_str().unwrap().trim().to_string();
    assert!(patient_id.starts_with("SYN"), "{patient_id}");
    let state = tmp.path().join("state");
    let (series_arg, state_arg) = (series.to_str().unwrap(), state.to_str().unwrap());

    // With weights: the network's outlines and classes.
    let with_weights = tmp.path().join("with-weights");
    let printed = export(&[
        series_arg,
        "--out",
        with_weights.to_str().unwrap(),
        "--weights",
        PHANTOM_MODEL,
        "--device",
        "cpu",
        "--state-dir",
        state_arg,
    ]);
    assert!(printed.contains("7 images"), "{printed}");
    let docs = documents(&with_weights);
    assert_eq!(docs.len(), 1 + truth.levels.len(), "the sagittal and one axial per level");
    for (name, doc) in &docs {
        let image_path = doc["imagePath"].as_str().unwrap();
        assert_eq!(name.trim_end_matches(".json"), image_path.trim_end_matches(".png"));
        let png = image::open(with_weights.join(image_path)).unwrap();
        assert_eq!((png.width(), png.height()), (512, 512));
        assert_eq!((doc["imageWidth"].as_u64(), doc["imageHeight"].as_u64()), (Some(512), Some(512)));
        assert_eq!(doc["idaics"]["series_uid"], written.series_uid.as_str());
        for shape in doc["shapes"].as_array().unwrap() {
            assert!(LABELS.contains(&shape["label"].as_str().unwrap()), "{shape}");
            assert_eq!(shape["shape_type"], "polygon");
            let points = shape["points"].as_array().unwrap();
            assert!(points.len() >= 3);
            for p in points {
                let (x, y) = (p[0].as_f64().unwrap(), p[1].as_f64().unwrap());
                assert!((0.0..=512.0).contains(&x) && (0.0..=512.0).contains(&y), "{p}");
            }
        }
    }
    let sagittal = &docs.iter().find(|(n, _)| n.ends_with("_sagittal.json")).unwrap().1;
    assert_eq!(sagittal["shapes"].as_array().unwrap().len(), truth.levels.len(), "every level on the sagittal");
    // Each level's axial image carries the agent's finding, which on this phantom is its truth.
    for level in &truth.levels {
        let doc = &docs.iter().find(|(_, d)| d["idaics"]["level"] == level.name.as_str()).unwrap().1;
        let shape = &doc["shapes"][0];
        assert_eq!(shape["label"], level.condition.class(), "{}: {shape}", level.name);
        assert!(shape["description"].as_str().unwrap().ends_with("outline mask"), "{shape}");
    }

    // Without weights: the locator's outlines, unlabelled, and the same pseudonym.
    let without = tmp.path().join("without");
    export(&[series_arg, "--out", without.to_str().unwrap(), "--state-dir", state_arg]);
    let plain = documents(&without);
    assert_eq!(plain.iter().map(|(n, _)| n).collect::<Vec<_>>(), docs.iter().map(|(n, _)| n).collect::<Vec<_>>());
    for (_, doc) in &plain {
        for shape in doc["shapes"].as_array().unwrap() {
            assert_eq!(shape["label"], "unlabelled");
            assert!(shape["description"].as_str().unwrap().ends_with("outline locator"), "{shape}");
        }
    }

    // A series the agent received, by its UID: read from the spool (state/spool/STUDY/SERIES).
    let spooled = state.join("spool").join(&written.study_uid).join(&written.series_uid);
    std::fs::create_dir_all(&spooled).unwrap();
    for file in &written.files {
        std::fs::copy(file, spooled.join(file.file_name().unwrap())).unwrap();
    }
    let received = tmp.path().join("received");
    export(&["--series", &written.series_uid, "--out", received.to_str().unwrap(), "--state-dir", state_arg]);
    assert_eq!(documents(&received).len(), docs.len());

    // No patient identifier beside the images; the mapping to them stays in the state directory.
    for dir in [&with_weights, &without, &received] {
        for entry in std::fs::read_dir(dir).unwrap() {
            let path = entry.unwrap().path();
            let name = path.file_name().unwrap().to_string_lossy().into_owned();
            assert!(!name.contains(&patient_id), "{name}");
            if name.ends_with(".json") {
                let text = std::fs::read_to_string(&path).unwrap();
                assert!(!text.contains(&patient_id) && !text.contains("SYNTHETIC"), "{name}");
            }
        }
    }
    // `idaics evaluate --images` reads the LabelMe files directly: the weights against their own
    // pre-annotations agree on every disc, with the masks' Dice beside; an image still
    // unlabelled is refused, naming its file.
    let evaluate = |dir: &Path| {
        Command::new(env!("CARGO_BIN_EXE_idaics"))
            .args(["evaluate", "--images", "--device", "cpu", "--format", "json", "--weights", PHANTOM_MODEL])
            .arg(dir)
            .output()
            .unwrap()
    };
    let out = evaluate(&with_weights);
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    let scored: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(scored["total"].as_u64(), Some(2 * truth.levels.len() as u64), "{scored}");
    assert_eq!(scored["correct"], scored["total"], "{scored}");
    assert!(scored["mean_dice"].as_f64().unwrap() > 0.8, "{scored}");
    let out = evaluate(&without);
    assert!(!out.status.success());
    let refusal = String::from_utf8_lossy(&out.stderr);
    assert!(refusal.contains("not labelled yet") && refusal.contains(".json"), "{refusal}");

    let mapping = std::fs::read_to_string(state.join("dataset/mapping.csv")).unwrap();
    let pseudonym = sagittal["idaics"]["patient"].as_str().unwrap();
    assert!(mapping.lines().any(|l| l.contains(pseudonym) && l.contains(&patient_id)), "{mapping}");
}
