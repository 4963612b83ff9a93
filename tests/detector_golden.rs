//! candle's YOLOv8-seg against ultralytics: raw head outputs of randomly initialised n and s
//! networks (4 classes, 512x512 input) must match within 1e-3. The weights are regenerated here
//! from the same deterministic recipe `model/tools/golden_random.py` used (see detector::detrand);
//! the fixture holds ultralytics' tensor names and shapes and samples of its outputs.

use std::collections::HashMap;
use std::path::{Path, PathBuf};

use candle_core::{DType, Device, Tensor};
use idaics::analysis::detector::{self, DetectorError, detrand};

/// The repository, also when a prebuilt test binary runs from another checkout (scripts/gpu-check.sh).
fn repo_root() -> PathBuf {
    std::env::var_os("IDAICS_REPO_ROOT").map_or_else(|| PathBuf::from(env!("CARGO_MANIFEST_DIR")), PathBuf::from)
}

fn fixture(name: &str) -> serde_json::Value {
    let path = repo_root().join("tests/fixtures/golden").join(name);
    serde_json::from_slice(&std::fs::read(&path).unwrap()).unwrap()
}

/// Writes the fixture's network as a safetensors file with ultralytics names, as the exporter would.
fn write_weights(
    golden: &serde_json::Value,
    dir: &Path,
    edit: impl Fn(&str, Vec<usize>) -> Option<Vec<usize>>,
) -> PathBuf {
    let mut tensors = HashMap::new();
    for t in golden["tensors"].as_array().unwrap() {
        let name = t["name"].as_str().unwrap();
        let shape: Vec<usize> = t["shape"].as_array().unwrap().iter().map(|d| d.as_u64().unwrap() as usize).collect();
        let Some(shape) = edit(name, shape) else { continue };
        let values = if name.ends_with("dfl.conv.weight") {
            (0..shape.iter().product::<usize>()).map(|i| i as f32).collect()
        } else {
            detrand::tensor_values(name, &shape)
        };
        tensors.insert(name.to_string(), Tensor::from_vec(values, shape, &Device::Cpu).unwrap());
    }
    let path = dir.join(format!("{}.safetensors", golden["model"].as_str().unwrap()));
    candle_core::safetensors::save(&tensors, &path).unwrap();
    path
}

/// The device under test: the CPU unless IDAICS_TEST_DEVICE says otherwise (scripts/gpu-check.sh).
fn device() -> Device {
    detector::select_device(&std::env::var("IDAICS_TEST_DEVICE").unwrap_or_else(|_| "cpu".into())).unwrap()
}

fn check(model: &str) {
    let golden = fixture(&format!("{model}-random.json"));
    let dir = tempfile::tempdir().unwrap();
    let weights = write_weights(&golden, dir.path(), |_, s| Some(s));
    let device = device();
    let (network, info) = detector::load_network(&weights, &device).unwrap();
    assert_eq!(info.config.num_classes, 4);
    assert_eq!(info.config.scale.name, model.chars().nth(6).unwrap());
    assert!((info.config.bn_eps - golden["bn_eps"].as_f64().unwrap()).abs() < 1e-12);

    let size = golden["input_size"].as_u64().unwrap() as usize;
    let pixels = detrand::image(golden["image_seed"].as_u64().unwrap(), 3 * size * size);
    let input = Tensor::from_vec(pixels, (1, 3, size, size), &device).unwrap();
    // On the CPU the network has a path of its own kernels and the tensor path a GPU runs
    // (candle's operations): both must give ultralytics' outputs.
    let mut paths = vec![("forward", network.forward(&input).unwrap())];
    if device.is_cpu() {
        paths.push(("tensor path", network.forward_with_tensors(&input).unwrap()));
    }
    for (path, (y, proto)) in &paths {
        let model = format!("{model} ({path}, {} kernels)", detector::cpu_conv::Kernel::detected().name());
        compare(&golden, &model, y, proto);
    }
}

fn compare(golden: &serde_json::Value, model: &str, y: &Tensor, proto: &Tensor) {
    for (name, tensor) in [("y", y), ("proto", proto)] {
        let shape: Vec<usize> =
            golden[format!("{name}_shape")].as_array().unwrap().iter().map(|d| d.as_u64().unwrap() as usize).collect();
        assert_eq!(tensor.dims(), shape.as_slice(), "{model} {name} shape");
        let flat: Vec<f32> = tensor.flatten_all().unwrap().to_dtype(DType::F32).unwrap().to_vec1().unwrap();
        let stride = golden[format!("{name}_stride")].as_u64().unwrap() as usize;
        let samples = golden[format!("{name}_samples")].as_array().unwrap();
        let mut worst = (0.0f64, 0usize);
        for (k, expected) in samples.iter().enumerate() {
            let got = f64::from(flat[k * stride]);
            let diff = (got - expected.as_f64().unwrap()).abs();
            if diff > worst.0 {
                worst = (diff, k * stride);
            }
        }
        assert!(worst.0 <= 1e-3, "{model} {name}: largest difference {} at flat index {}", worst.0, worst.1);
        let abs_sum: f64 = flat.iter().map(|v| f64::from(v.abs())).sum();
        let expected_sum = golden[format!("{name}_abs_sum")].as_f64().unwrap();
        assert!(
            (abs_sum - expected_sum).abs() <= 1e-5 * expected_sum.max(1.0),
            "{model} {name}: |sum| {abs_sum} vs {expected_sum}"
        );
    }
}

#[test]
fn yolov8n_seg_matches_ultralytics() {
    check("yolov8n-seg");
}

#[test]
fn yolov8s_seg_matches_ultralytics() {
    check("yolov8s-seg");
}

#[test]
fn missing_or_misshapen_tensor_is_named() {
    let golden = fixture("yolov8n-seg-random.json");
    let dir = tempfile::tempdir().unwrap();
    let missing =
        write_weights(&golden, dir.path(), |name, s| (name != "model.15.m.0.cv2.bn.running_var").then_some(s));
    let err = detector::load_network(&missing, &Device::Cpu).unwrap_err();
    assert!(matches!(err, DetectorError::Weights { .. }), "{err}");
    assert!(err.to_string().contains("model.15.m.0.cv2.bn.running_var"), "{err}");

    let dir2 = tempfile::tempdir().unwrap();
    let misshapen = write_weights(&golden, dir2.path(), |name, mut s| {
        if name == "model.4.cv1.conv.weight" {
            s[1] += 1;
        }
        Some(s)
    });
    let err = detector::load_network(&misshapen, &Device::Cpu).unwrap_err();
    assert!(err.to_string().contains("model.4.cv1.conv.weight"), "{err}");
}

/// A weights file whose tensors do not fill it as its header says (cut short, or an offset
/// pointing past its end) is refused when read, naming the file.
#[test]
fn a_damaged_safetensors_file_is_refused_by_name() {
    let golden = fixture("yolov8n-seg-random.json");
    let dir = tempfile::tempdir().unwrap();
    let weights = write_weights(&golden, dir.path(), |_, s| Some(s));
    let bytes = std::fs::read(&weights).unwrap();
    let cut = dir.path().join("cut.safetensors");
    std::fs::write(&cut, &bytes[..bytes.len() - 4]).unwrap();
    let err = detector::load_network(&cut, &Device::Cpu).unwrap_err();
    assert!(matches!(err, DetectorError::Read { .. }), "{err}");
    assert!(err.to_string().contains("cut.safetensors") && err.to_string().contains("safetensors"), "{err}");
    // The header claims a byte range that runs past the data.
    let header_len = u64::from_le_bytes(bytes[..8].try_into().unwrap()) as usize;
    let header = String::from_utf8(bytes[8..8 + header_len].to_vec()).unwrap();
    let mut value: serde_json::Value = serde_json::from_str(&header).unwrap();
    let entry = value.as_object_mut().unwrap().iter_mut().find(|(k, _)| *k != "__metadata__").unwrap().1;
    let end = entry["data_offsets"][1].as_u64().unwrap();
    entry["data_offsets"][1] = serde_json::json!(end + 4096);
    let mut text = serde_json::to_string(&value).unwrap();
    while !text.len().is_multiple_of(8) {
        text.push(' ');
    }
    let mut damaged = (text.len() as u64).to_le_bytes().to_vec();
    damaged.extend_from_slice(text.as_bytes());
    damaged.extend_from_slice(&bytes[8 + header_len..]);
    let overlapping = dir.path().join("overlapping.safetensors");
    std::fs::write(&overlapping, damaged).unwrap();
    let err = detector::load_network(&overlapping, &Device::Cpu).unwrap_err();
    assert!(err.to_string().contains("overlapping.safetensors"), "{err}");
}
