//! The disc detector: YOLOv8-seg weights loaded into candle, on CUDA when available.

pub mod cpu_conv;
pub mod detrand;
pub mod predict;
mod winograd;
pub mod yolov8_seg;

use std::collections::HashMap;
use std::io::Read;
use std::path::{Path, PathBuf};

use candle_core::{DType, Device};
use candle_nn::VarBuilder;

use yolov8_seg::{Config, Scale, YoloV8Seg};

/// Batch-norm epsilon of models built by ultralytics (its `initialize_weights` sets 1e-3).
pub const ULTRALYTICS_BN_EPS: f64 = 1e-3;

#[derive(Debug, thiserror::Error)]
pub enum DetectorError {
    #[error("cannot read weights {path}: {message}")]
    Read { path: PathBuf, message: String },
    #[error("weights {path}: {message}")]
    Weights { path: PathBuf, message: String },
    #[error("device {spec}: {message}")]
    Device { spec: String, message: String },
    #[error("cannot read image {path}: {message}")]
    Image { path: PathBuf, message: String },
    #[error("inference failed: {0}")]
    Inference(#[from] candle_core::Error),
}

/// What the weights file says about itself.
#[derive(Debug, Clone)]
pub struct WeightsInfo {
    pub config: Config,
    pub class_names: Vec<String>,
    pub input_size: usize,
}

/// Tensor shapes and metadata from a safetensors header, read without loading the tensors.
struct Header {
    shapes: HashMap<String, Vec<usize>>,
    metadata: HashMap<String, String>,
}

/// Read by the safetensors crate, which also checks what a hand-written reader did not: that the
/// tensors' byte ranges follow one another without gap or overlap, fit their shapes and dtypes,
/// and end where the file does (a truncated or padded file is refused here, by name, rather than
/// failing later inside candle).
fn read_header(path: &Path) -> Result<Header, DetectorError> {
    let read_err = |message: String| DetectorError::Read { path: path.to_path_buf(), message };
    let file = std::fs::File::open(path).map_err(|e| read_err(e.to_string()))?;
    // SAFETY: mapped read-only and only read here; weights files are not modified while the
    // agent runs (as for the VarBuilder that loads them).
    let mapped = unsafe { memmap2::Mmap::map(&file) }.map_err(|e| read_err(e.to_string()))?;
    let (_, parsed) = safetensors::SafeTensors::read_metadata(&mapped)
        .map_err(|e| read_err(format!("not a valid safetensors file: {e}")))?;
    let shapes = parsed.tensors().into_iter().map(|(name, info)| (name, info.shape.clone())).collect();
    let metadata = parsed.metadata().clone().unwrap_or_default();
    Ok(Header { shapes, metadata })
}

/// The metadata of a weights file (class names, input size, and how the weights were made when
/// model/tools/train.py made them), read without loading the tensors.
pub fn weights_metadata(path: &Path) -> Result<HashMap<String, String>, DetectorError> {
    Ok(read_header(path)?.metadata)
}

impl WeightsInfo {
    /// Reads the architecture from the tensor shapes, and class names and input size from the
    /// metadata (`names`: JSON list, `imgsz`: integer, `bn_eps`: float).
    pub fn read(path: &Path) -> Result<WeightsInfo, DetectorError> {
        let header = read_header(path)?;
        let weights_err = |message: String| DetectorError::Weights { path: path.to_path_buf(), message };
        let dim = |name: &str, axis: usize| -> Result<usize, DetectorError> {
            header
                .shapes
                .get(name)
                .and_then(|s| s.get(axis).copied())
                .ok_or_else(|| weights_err(format!("missing tensor {name}")))
        };
        let stem = dim("model.0.conv.weight", 0)?;
        let scale = match header.metadata.get("scale").and_then(|s| s.chars().next()).and_then(Scale::from_name) {
            Some(s) => s,
            None => Scale::from_stem_channels(stem).ok_or_else(|| {
                weights_err(format!("model.0.conv.weight has {stem} output channels; not a YOLOv8 n/s/m/l/x"))
            })?,
        };
        let num_classes = dim("model.22.cv3.0.2.weight", 0)?;
        let num_masks = dim("model.22.proto.cv3.conv.weight", 0)?;
        let reg_max = dim("model.22.cv2.0.2.weight", 0)? / 4;
        let bn_eps = match header.metadata.get("bn_eps") {
            Some(v) => v.parse().map_err(|_| weights_err(format!("metadata bn_eps {v:?} is not a number")))?,
            None => ULTRALYTICS_BN_EPS,
        };
        let class_names = match header.metadata.get("names") {
            Some(v) => serde_json::from_str::<Vec<String>>(v)
                .map_err(|e| weights_err(format!("metadata names is not a JSON list of strings: {e}")))?,
            None => (0..num_classes).map(|i| format!("class{i}")).collect(),
        };
        if class_names.len() != num_classes {
            return Err(weights_err(format!("{} class names for {num_classes} classes", class_names.len())));
        }
        let input_size = match header.metadata.get("imgsz") {
            Some(v) => v
                .trim_matches(|c| c == '[' || c == ']')
                .split(',')
                .next()
                .unwrap_or("")
                .trim()
                .parse()
                .map_err(|_| weights_err(format!("metadata imgsz {v:?} is not a size")))?,
            None => 640,
        };
        Ok(WeightsInfo { config: Config { scale, num_classes, num_masks, reg_max, bn_eps }, class_names, input_size })
    }
}

/// Loads a network from safetensors with ultralytics tensor names. A missing or misshapen tensor
/// is an error naming it.
pub fn load_network(path: &Path, device: &Device) -> Result<(YoloV8Seg, WeightsInfo), DetectorError> {
    let info = WeightsInfo::read(path)?;
    // SAFETY: the file is mapped read-only; weights files are not modified while the agent runs.
    let vb = unsafe { VarBuilder::from_mmaped_safetensors(&[path], DType::F32, device) }
        .map_err(|e| DetectorError::Read { path: path.to_path_buf(), message: e.to_string() })?;
    let network = YoloV8Seg::load(vb, info.config)
        .map_err(|e| DetectorError::Weights { path: path.to_path_buf(), message: e.to_string() })?;
    Ok((network, info))
}

/// Resolves `auto`, `cpu` or `cuda:N`. `auto` takes the first GPU when this build has CUDA and
/// one answers, otherwise the CPU, with one warning line saying why.
pub fn select_device(spec: &str) -> Result<Device, DetectorError> {
    let device_err = |message: String| DetectorError::Device { spec: spec.to_string(), message };
    match spec {
        "cpu" => Ok(Device::Cpu),
        "auto" => {
            if cfg!(feature = "cuda") {
                match Device::new_cuda(0) {
                    Ok(d) => return Ok(d),
                    Err(e) => tracing::warn!(error = %e, "no CUDA device answered; running on the CPU"),
                }
            } else {
                tracing::warn!("this build has no CUDA support; running on the CPU");
            }
            Ok(Device::Cpu)
        }
        other => {
            let ordinal: usize = other
                .strip_prefix("cuda:")
                .and_then(|n| n.parse().ok())
                .ok_or_else(|| device_err("expected auto, cpu or cuda:N".into()))?;
            if !cfg!(feature = "cuda") {
                return Err(device_err("this build has no CUDA support (build with --features cuda)".into()));
            }
            Device::new_cuda(ordinal).map_err(|e| device_err(e.to_string()))
        }
    }
}

/// Reads a PNG, JPEG or single-frame DICOM image as 8-bit RGB. DICOM pixels go through the
/// object's rescale and VOI window (or the full range when it has none), as a viewer shows them.
pub fn read_image(path: &Path) -> Result<predict::RgbImage, DetectorError> {
    let image_err = |message: String| DetectorError::Image { path: path.to_path_buf(), message };
    let mut magic = [0u8; 132];
    let is_dicom = std::fs::File::open(path)
        .and_then(|mut f| f.read_exact(&mut magic))
        .map(|_| &magic[128..132] == b"DICM")
        .unwrap_or(false);
    let dynamic = if is_dicom {
        use dicom_pixeldata::PixelDecoder;
        // Headers and pixel description checked first: a damaged file must not make the parser
        // or the decoder allocate what its lengths claim.
        crate::ingest::spool::check_structure(path, crate::ingest::spool::StructureLimits::LOCAL_FILES)
            .map_err(|e| image_err(e.to_string()))?;
        let obj = dicom_object::open_file(path).map_err(|e| image_err(e.to_string()))?;
        let pixels = crate::ingest::pixel_module::PixelModule::from_object(&obj).map_err(image_err)?;
        pixels.check_against(&obj).map_err(image_err)?;
        let transfer_syntax = crate::common::trim_uid(obj.meta().transfer_syntax()).to_string();
        pixels.check_codestream(&obj, &transfer_syntax).map_err(image_err)?;
        let frames = pixels.number_of_frames;
        if frames > 1 {
            return Err(image_err(format!("{frames} frames; detect takes single-frame images")));
        }
        let obj = crate::ingest::jpeg_extended::to_native(obj).map_err(image_err)?;
        let decoded = obj.decode_pixel_data().map_err(|e| image_err(e.to_string()))?;
        decoded.to_dynamic_image(0).map_err(|e| image_err(e.to_string()))?
    } else {
        image::open(path).map_err(|e| image_err(e.to_string()))?
    };
    let rgb = dynamic.to_rgb8();
    Ok(predict::RgbImage { width: rgb.width() as usize, height: rgb.height() as usize, data: rgb.into_raw() })
}
