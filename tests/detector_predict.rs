//! `idaics detect` against ultralytics predict on a trained model: the shapes test model
//! (yolov8n-seg, 4 classes, float16 weights) on images of several sizes, with the golden
//! detections `model/tools/golden_predict.py` recorded from ultralytics on the same weights.

use std::path::PathBuf;
use std::process::Command;

/// The repository, also when a prebuilt test binary runs from another checkout (scripts/gpu-check.sh).
fn repo_root() -> PathBuf {
    std::env::var_os("IDAICS_REPO_ROOT").map_or_else(|| PathBuf::from(env!("CARGO_MANIFEST_DIR")), PathBuf::from)
}

fn fixtures() -> PathBuf {
    repo_root().join("tests/fixtures/shapes")
}

/// The idaics binary under test; IDAICS_BIN overrides it for prebuilt runs.
fn idaics() -> Command {
    Command::new(std::env::var_os("IDAICS_BIN").unwrap_or_else(|| env!("CARGO_BIN_EXE_idaics").into()))
}

fn iou(a: &[f64], b: &[f64]) -> f64 {
    let w = (a[2].min(b[2]) - a[0].max(b[0])).max(0.0);
    let h = (a[3].min(b[3]) - a[1].max(b[1])).max(0.0);
    let inter = w * h;
    inter / ((a[2] - a[0]) * (a[3] - a[1]) + (b[2] - b[0]) * (b[3] - b[1]) - inter)
}

fn floats(v: &serde_json::Value) -> Vec<f64> {
    v.as_array().unwrap().iter().map(|x| x.as_f64().unwrap()).collect()
}

/// The device under test: the CPU unless IDAICS_TEST_DEVICE says otherwise (scripts/gpu-check.sh).
fn device() -> String {
    std::env::var("IDAICS_TEST_DEVICE").unwrap_or_else(|_| "cpu".into())
}

#[test]
fn detect_matches_ultralytics_predict() {
    let dir = fixtures();
    let golden: serde_json::Value = serde_json::from_slice(&std::fs::read(dir.join("golden.json")).unwrap()).unwrap();
    let images: Vec<_> =
        golden["images"].as_array().unwrap().iter().map(|i| dir.join(i["file"].as_str().unwrap())).collect();
    let out = idaics()
        .args(["detect", "--device", &device(), "--format", "json", "--weights"])
        .arg(dir.join("shapes-yolov8n-seg.safetensors"))
        .args([
            "--imgsz",
            &golden["imgsz"].to_string(),
            "--conf",
            &golden["conf"].to_string(),
            "--iou",
            &golden["iou"].to_string(),
        ])
        .args(&images)
        .output()
        .unwrap();
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    let ours: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    let mut compared = 0;
    for (expected, got) in golden["images"].as_array().unwrap().iter().zip(ours.as_array().unwrap()) {
        let file = expected["file"].as_str().unwrap();
        assert_eq!(got["width"], expected["width"], "{file}");
        assert_eq!(got["height"], expected["height"], "{file}");
        let want = expected["detections"].as_array().unwrap();
        let have = got["detections"].as_array().unwrap();
        // Detections within the allowed confidence difference of the threshold may fall on
        // either side of it; every other detection must be matched one to one.
        let borderline =
            |d: &serde_json::Value| d["confidence"].as_f64().unwrap() < golden["conf"].as_f64().unwrap() + 0.01;
        let mut used = vec![false; have.len()];
        for w in want {
            let wb = floats(&w["box"]);
            let (best, overlap) = have
                .iter()
                .enumerate()
                .filter(|(i, h)| !used[*i] && h["class_id"] == w["class_id"])
                .map(|(i, h)| (i, iou(&wb, &floats(&h["box"]))))
                .fold((usize::MAX, 0.0), |acc, cur| if cur.1 > acc.1 { cur } else { acc });
            if best == usize::MAX || overlap < 0.95 {
                assert!(borderline(w), "{file}: no match for ultralytics' {w} (best IoU {overlap})\nours: {have:#?}");
                continue;
            }
            used[best] = true;
            let h = &have[best];
            let dc = (h["confidence"].as_f64().unwrap() - w["confidence"].as_f64().unwrap()).abs();
            assert!(dc <= 0.01, "{file}: confidence {} vs {}", h["confidence"], w["confidence"]);
            let (ma, mb) = (h["mask_area"].as_f64().unwrap(), w["mask_area"].as_f64().unwrap());
            assert!((ma - mb).abs() <= 0.03 * mb, "{file}: mask area {ma} vs {mb}");
            assert!(!h["class_name"].as_str().unwrap().is_empty());
            assert!(h["polygon"].as_array().unwrap().len() >= 3, "{file}: no outline");
            compared += 1;
        }
        for (h, used) in have.iter().zip(&used) {
            assert!(*used || borderline(h), "{file}: detection {h} that ultralytics does not have");
        }
    }
    assert!(compared >= 5, "only {compared} detections compared: the fixture model is too weak to test with");
}

#[test]
fn detect_reads_dicom_images_and_reports_bad_input() {
    let dir = fixtures();
    let weights = dir.join("shapes-yolov8n-seg.safetensors");
    let ct = repo_root().join("../shared/data/corpora/pydicom-test-files/CT_small.dcm");
    let out = idaics()
        .args(["detect", "--device", "cpu", "--format", "json", "--weights"])
        .arg(&weights)
        .arg(&ct)
        .output()
        .unwrap();
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    let report: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(report[0]["width"], 128);
    assert!(report[0]["detections"].is_array());

    let out = idaics()
        .args(["detect", "--device", "cpu", "--weights"])
        .arg(&weights)
        .arg(repo_root().join("Cargo.toml"))
        .output()
        .unwrap();
    assert!(!out.status.success());
    assert!(
        String::from_utf8_lossy(&out.stderr).contains("cannot read image"),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );

    // A header that promises 65535 x 65535 pixels over CT_small's 128 x 128: refused with the
    // reason, not decoded into gigabytes.
    let tmp = tempfile::tempdir().unwrap();
    let crafted = tmp.path().join("crafted.dcm");
    let mut object = dicom_object::open_file(&ct).unwrap();
    for tag in [dicom_dictionary_std::tags::ROWS, dicom_dictionary_std::tags::COLUMNS] {
        object.put(dicom_core::DataElement::new(tag, dicom_core::VR::US, dicom_core::PrimitiveValue::from(65535u16)));
    }
    object.write_to_file(&crafted).unwrap();
    let out = idaics().args(["detect", "--device", "cpu", "--weights"]).arg(&weights).arg(&crafted).output().unwrap();
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("65535 x 65535") && err.contains("more than the"), "{err}");

    let out = idaics().args(["detect", "--device", "cuda:0", "--weights"]).arg(&weights).arg(&ct).output().unwrap();
    if !cfg!(feature = "cuda") {
        assert!(!out.status.success());
        assert!(String::from_utf8_lossy(&out.stderr).contains("no CUDA support"));
    }
}

/// A batch (the views of one series go through the network together) gives each image the
/// detections it gets alone: images of several sizes, some twice, in mixed order.
#[test]
fn a_batch_gives_each_image_its_own_detections() {
    use idaics::analysis::detector::predict::{PredictOptions, predict, predict_batch};
    let dir = fixtures();
    let device = idaics::analysis::detector::select_device(&device()).unwrap();
    let (network, _) =
        idaics::analysis::detector::load_network(&dir.join("shapes-yolov8n-seg.safetensors"), &device).unwrap();
    let read = |name: &str| idaics::analysis::detector::read_image(&dir.join(name)).unwrap();
    let (a, b, c) = (read("shapes_0_320x320.png"), read("shapes_1_400x260.png"), read("shapes_3_512x384.png"));
    let images = vec![a.clone(), b.clone(), a, c, b];
    let options = PredictOptions { imgsz: 320, conf: 0.25, ..Default::default() };
    let batched = predict_batch(&network, &images, &options, &device).unwrap();
    assert_eq!(batched.len(), images.len());
    let mut detections = 0;
    for (image, together) in images.iter().zip(&batched) {
        let alone = predict(&network, image, &options, &device).unwrap();
        assert_eq!(alone.len(), together.len());
        for (x, y) in alone.iter().zip(together) {
            assert_eq!(x.class_id, y.class_id);
            assert!((x.confidence - y.confidence).abs() < 1e-4, "{} vs {}", x.confidence, y.confidence);
            assert!(x.bbox.iter().zip(&y.bbox).all(|(p, q)| (p - q).abs() < 0.05), "{:?} vs {:?}", x.bbox, y.bbox);
            let differing = x.mask.data.iter().zip(&y.mask.data).filter(|(p, q)| p != q).count();
            assert!(differing * 1000 <= x.mask.data.len(), "{differing} mask pixels differ");
        }
        detections += alone.len();
    }
    assert!(detections > 5, "the fixtures have shapes to find: {detections}");
}
