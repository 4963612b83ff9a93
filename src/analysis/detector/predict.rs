//! From an image to detections, as ultralytics 8.x `YOLO(weights).predict(img, imgsz, conf, iou)`
//! does it: letterbox (minimum rectangle, stride 32, gray 114 padding), the network, class-aware
//! NMS, masks from prototypes (upsampled to the input, binarised, cropped to the box), and boxes
//! and masks scaled back to the original image.

use candle_core::{Device, Tensor};

use super::DetectorError;
use super::yolov8_seg::YoloV8Seg;

/// ultralytics' class offset for class-aware NMS and its candidate cap.
const MAX_WH: f32 = 7680.0;
const MAX_NMS: usize = 30_000;
const STRIDE: usize = 32;
const PAD_VALUE: u8 = 114;

/// Thresholds of a prediction, with ultralytics' defaults.
#[derive(Debug, Clone, Copy)]
pub struct PredictOptions {
    pub imgsz: usize,
    pub conf: f32,
    pub iou: f32,
    pub max_det: usize,
}

impl Default for PredictOptions {
    fn default() -> Self {
        PredictOptions { imgsz: 640, conf: 0.25, iou: 0.7, max_det: 300 }
    }
}

/// An 8-bit RGB image, rows top to bottom.
#[derive(Debug, Clone)]
pub struct RgbImage {
    pub width: usize,
    pub height: usize,
    pub data: Vec<u8>,
}

/// A binary mask in original image pixels.
#[derive(Debug, Clone)]
pub struct Mask {
    pub width: usize,
    pub height: usize,
    pub data: Vec<bool>,
}

impl Mask {
    pub fn area(&self) -> usize {
        self.data.iter().filter(|v| **v).count()
    }
}

#[derive(Debug, Clone)]
pub struct Detection {
    pub class_id: usize,
    pub confidence: f32,
    /// x1, y1, x2, y2 in original image pixels.
    pub bbox: [f32; 4],
    pub mask: Mask,
}

/// How the original image sits in the network input.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Letterbox {
    pub input_width: usize,
    pub input_height: usize,
    pub resized_width: usize,
    pub resized_height: usize,
    pub left: usize,
    pub top: usize,
}

impl Letterbox {
    /// ultralytics' LetterBox with `auto=True` (predict on a .pt model): scale to fit `imgsz`
    /// (up or down), then pad only to the next multiple of the stride, split evenly.
    pub fn new(width: usize, height: usize, imgsz: usize) -> Letterbox {
        let r = (imgsz as f64 / height as f64).min(imgsz as f64 / width as f64);
        let resized_width = ((width as f64 * r).round() as usize).max(1);
        let resized_height = ((height as f64 * r).round() as usize).max(1);
        let dw = (imgsz - resized_width.min(imgsz)) % STRIDE;
        let dh = (imgsz - resized_height.min(imgsz)) % STRIDE;
        let (dw, dh) = (dw as f64 / 2.0, dh as f64 / 2.0);
        let (left, right) = (round_half_even(dw - 0.1), round_half_even(dw + 0.1));
        let (top, bottom) = (round_half_even(dh - 0.1), round_half_even(dh + 0.1));
        Letterbox {
            input_width: resized_width + left + right,
            input_height: resized_height + top + bottom,
            resized_width,
            resized_height,
            left,
            top,
        }
    }
}

/// Python's `round`: halves go to the even neighbour.
fn round_half_even(x: f64) -> usize {
    let r = x.round();
    let r = if (x - x.trunc()).abs() == 0.5 && r % 2.0 != 0.0 { r - x.signum() } else { r };
    r.max(0.0) as usize
}

/// Bilinear resize of 8-bit RGB with OpenCV's INTER_LINEAR arithmetic (half-pixel centres,
/// 11-bit fixed-point weights), so the network sees what it sees under ultralytics.
fn resize_linear(src: &RgbImage, width: usize, height: usize) -> Vec<u8> {
    const BITS: i32 = 11;
    const ONE: f32 = (1 << BITS) as f32;
    let taps = |dst: usize, src_len: usize| -> Vec<(usize, usize, i32, i32)> {
        let scale = src_len as f64 / dst as f64;
        (0..dst)
            .map(|d| {
                let f = ((d as f64 + 0.5) * scale - 0.5) as f32;
                let mut s = f.floor() as i64;
                let mut frac = f - s as f32;
                if s < 0 {
                    s = 0;
                    frac = 0.0;
                }
                if s as usize >= src_len - 1 {
                    s = src_len as i64 - 1;
                    frac = 0.0;
                }
                let w0 = ((1.0 - frac) * ONE).round() as i32;
                let s = s as usize;
                (s, (s + 1).min(src_len - 1), w0, (1 << BITS) - w0)
            })
            .collect()
    };
    let xs = taps(width, src.width);
    let ys = taps(height, src.height);
    let mut out = vec![0u8; width * height * 3];
    let mut row0 = vec![0i32; width * 3];
    let mut row1 = vec![0i32; width * 3];
    let horizontal = |y: usize, row: &mut [i32]| {
        let line = &src.data[y * src.width * 3..(y + 1) * src.width * 3];
        for (x, &(s0, s1, w0, w1)) in xs.iter().enumerate() {
            for c in 0..3 {
                row[x * 3 + c] = i32::from(line[s0 * 3 + c]) * w0 + i32::from(line[s1 * 3 + c]) * w1;
            }
        }
    };
    for (y, &(s0, s1, w0, w1)) in ys.iter().enumerate() {
        horizontal(s0, &mut row0);
        horizontal(s1, &mut row1);
        let dst = &mut out[y * width * 3..(y + 1) * width * 3];
        for i in 0..width * 3 {
            let v = (i64::from(row0[i]) * i64::from(w0) + i64::from(row1[i]) * i64::from(w1) + (1 << (2 * BITS - 1)))
                >> (2 * BITS);
            dst[i] = v.clamp(0, 255) as u8;
        }
    }
    out
}

/// The network input: `(1, 3, H, W)` RGB in [0, 1].
pub fn preprocess(image: &RgbImage, letterbox: &Letterbox, device: &Device) -> Result<Tensor, DetectorError> {
    let resized = if letterbox.resized_width == image.width && letterbox.resized_height == image.height {
        image.data.clone()
    } else {
        resize_linear(image, letterbox.resized_width, letterbox.resized_height)
    };
    let (w, h) = (letterbox.input_width, letterbox.input_height);
    let pad = f32::from(PAD_VALUE) / 255.0;
    let mut chw = vec![pad; 3 * w * h];
    for y in 0..letterbox.resized_height {
        for x in 0..letterbox.resized_width {
            let src = (y * letterbox.resized_width + x) * 3;
            let dst = (y + letterbox.top) * w + x + letterbox.left;
            for c in 0..3 {
                chw[c * w * h + dst] = f32::from(resized[src + c]) / 255.0;
            }
        }
    }
    Ok(Tensor::from_vec(chw, (1, 3, h, w), device)?)
}

struct Candidate {
    bbox: [f32; 4],
    confidence: f32,
    class_id: usize,
    anchor: usize,
}

fn iou(a: &[f32; 4], b: &[f32; 4]) -> f32 {
    let w = (a[2].min(b[2]) - a[0].max(b[0])).max(0.0);
    let h = (a[3].min(b[3]) - a[1].max(b[1])).max(0.0);
    let inter = w * h;
    let union = (a[2] - a[0]) * (a[3] - a[1]) + (b[2] - b[0]) * (b[3] - b[1]) - inter;
    if union <= 0.0 { 0.0 } else { inter / union }
}

/// Runs the whole predict path on one image.
pub fn predict(
    network: &YoloV8Seg,
    image: &RgbImage,
    options: &PredictOptions,
    device: &Device,
) -> Result<Vec<Detection>, DetectorError> {
    let letterbox = Letterbox::new(image.width, image.height, options.imgsz);
    let input = preprocess(image, &letterbox, device)?;
    let (predictions, prototypes) = network.forward(&input)?;
    postprocess(&predictions, &prototypes, &letterbox, image.width, image.height, network.config().num_classes, options)
}

/// Runs the predict path on several images with one forward per input size: the views of one
/// series (a sagittal and an axial per level, all of one size) go through the network as one
/// batch, which a GPU runs in about the time of one image. Detections come back in image order.
pub fn predict_batch(
    network: &YoloV8Seg,
    images: &[RgbImage],
    options: &PredictOptions,
    device: &Device,
) -> Result<Vec<Vec<Detection>>, DetectorError> {
    let letterboxes: Vec<Letterbox> =
        images.iter().map(|image| Letterbox::new(image.width, image.height, options.imgsz)).collect();
    let mut detections: Vec<Vec<Detection>> = vec![Vec::new(); images.len()];
    let mut done = vec![false; images.len()];
    for first in 0..images.len() {
        if done[first] {
            continue;
        }
        let input_size = |lb: &Letterbox| (lb.input_width, lb.input_height);
        let members: Vec<usize> = (first..images.len())
            .filter(|&i| !done[i] && input_size(&letterboxes[i]) == input_size(&letterboxes[first]))
            .collect();
        let inputs =
            members.iter().map(|&i| preprocess(&images[i], &letterboxes[i], device)).collect::<Result<Vec<_>, _>>()?;
        let (predictions, prototypes) = network.forward(&Tensor::cat(&inputs, 0)?)?;
        for (n, &i) in members.iter().enumerate() {
            detections[i] = postprocess(
                &predictions.narrow(0, n, 1)?,
                &prototypes.narrow(0, n, 1)?,
                &letterboxes[i],
                images[i].width,
                images[i].height,
                network.config().num_classes,
                options,
            )?;
            done[i] = true;
        }
    }
    Ok(detections)
}

/// NMS, masks and scaling back, from the raw head outputs of one image.
pub fn postprocess(
    predictions: &Tensor,
    prototypes: &Tensor,
    letterbox: &Letterbox,
    original_width: usize,
    original_height: usize,
    num_classes: usize,
    options: &PredictOptions,
) -> Result<Vec<Detection>, DetectorError> {
    let predictions = predictions.squeeze(0)?.to_device(&Device::Cpu)?; // (4 + nc + nm, anchors)
    let (channels, anchors) = predictions.dims2()?;
    let num_masks = channels - 4 - num_classes;
    let p: Vec<f32> = predictions.flatten_all()?.to_vec1()?;
    let at = |c: usize, a: usize| p[c * anchors + a];

    let mut candidates: Vec<Candidate> = (0..anchors)
        .filter_map(|a| {
            let (class_id, confidence) = (0..num_classes)
                .map(|c| (c, at(4 + c, a)))
                .fold((0, f32::NEG_INFINITY), |best, cur| if cur.1 > best.1 { cur } else { best });
            (confidence > options.conf).then(|| {
                let (cx, cy, w, h) = (at(0, a), at(1, a), at(2, a), at(3, a));
                Candidate {
                    bbox: [cx - w / 2.0, cy - h / 2.0, cx + w / 2.0, cy + h / 2.0],
                    confidence,
                    class_id,
                    anchor: a,
                }
            })
        })
        .collect();
    candidates.sort_by(|a, b| b.confidence.total_cmp(&a.confidence));
    candidates.truncate(MAX_NMS);

    // Greedy class-aware NMS: boxes of different classes are shifted apart so they never overlap.
    let shifted: Vec<[f32; 4]> = candidates
        .iter()
        .map(|c| {
            let o = c.class_id as f32 * MAX_WH;
            [c.bbox[0] + o, c.bbox[1] + o, c.bbox[2] + o, c.bbox[3] + o]
        })
        .collect();
    let mut kept: Vec<usize> = Vec::new();
    for i in 0..candidates.len() {
        if kept.len() == options.max_det {
            break;
        }
        if kept.iter().all(|&k| iou(&shifted[k], &shifted[i]) <= options.iou) {
            kept.push(i);
        }
    }

    let prototypes = prototypes.squeeze(0)?.to_device(&Device::Cpu)?; // (nm, mh, mw)
    let (_, mh, mw) = prototypes.dims3()?;
    let proto: Vec<f32> = prototypes.flatten_all()?.to_vec1()?;
    let (iw, ih) = (letterbox.input_width, letterbox.input_height);
    let mut detections = Vec::with_capacity(kept.len());
    for &k in &kept {
        let c = &candidates[k];
        let coefficients: Vec<f32> = (0..num_masks).map(|m| at(4 + num_classes + m, c.anchor)).collect();
        let mut low = vec![0f32; mh * mw];
        for (m, coefficient) in coefficients.iter().enumerate() {
            let plane = &proto[m * mh * mw..(m + 1) * mh * mw];
            for (v, q) in low.iter_mut().zip(plane) {
                *v += coefficient * q;
            }
        }
        // Upsample to the input, binarise (logit > 0), crop to the box: as ultralytics' process_mask.
        let up = bilinear(&low, mw, mh, iw, ih);
        let b = c.bbox;
        let input_mask: Vec<f32> = (0..ih * iw)
            .map(|i| {
                let (x, y) = ((i % iw) as f32, (i / iw) as f32);
                let inside = x >= b[0] && x < b[2] && y >= b[1] && y < b[3];
                if inside && up[i] > 0.0 { 1.0 } else { 0.0 }
            })
            .collect();
        if !input_mask.iter().any(|v| *v > 0.0) {
            continue; // ultralytics drops detections whose mask is empty
        }
        let mask = scale_mask(&input_mask, letterbox, original_width, original_height);
        detections.push(Detection {
            class_id: c.class_id,
            confidence: c.confidence,
            bbox: scale_box(c.bbox, letterbox, original_width, original_height),
            mask,
        });
    }
    Ok(detections)
}

/// Bilinear interpolation with PyTorch's `align_corners=False` convention.
fn bilinear(src: &[f32], sw: usize, sh: usize, dw: usize, dh: usize) -> Vec<f32> {
    let taps = |dst: usize, len: usize| -> Vec<(usize, usize, f32)> {
        let scale = len as f32 / dst as f32;
        (0..dst)
            .map(|d| {
                let f = ((d as f32 + 0.5) * scale - 0.5).max(0.0);
                let i0 = (f.floor() as usize).min(len - 1);
                let i1 = (i0 + 1).min(len - 1);
                (i0, i1, f - i0 as f32)
            })
            .collect()
    };
    let xs = taps(dw, sw);
    let ys = taps(dh, sh);
    let mut out = vec![0f32; dw * dh];
    for (y, &(y0, y1, fy)) in ys.iter().enumerate() {
        for (x, &(x0, x1, fx)) in xs.iter().enumerate() {
            let top = src[y0 * sw + x0] * (1.0 - fx) + src[y0 * sw + x1] * fx;
            let bottom = src[y1 * sw + x0] * (1.0 - fx) + src[y1 * sw + x1] * fx;
            out[y * dw + x] = top * (1.0 - fy) + bottom * fy;
        }
    }
    out
}

/// ultralytics' scale_boxes: remove the padding, undo the per-axis resize, clip to the image.
fn scale_box(b: [f32; 4], lb: &Letterbox, width: usize, height: usize) -> [f32; 4] {
    let gain_x = lb.resized_width as f32 / width as f32;
    let gain_y = lb.resized_height as f32 / height as f32;
    let (px, py) = (lb.left as f32, lb.top as f32);
    [
        ((b[0] - px) / gain_x).clamp(0.0, width as f32),
        ((b[1] - py) / gain_y).clamp(0.0, height as f32),
        ((b[2] - px) / gain_x).clamp(0.0, width as f32),
        ((b[3] - py) / gain_y).clamp(0.0, height as f32),
    ]
}

/// ultralytics' scale_masks: crop the padding, resize bilinearly to the original, threshold 0.5.
fn scale_mask(input_mask: &[f32], lb: &Letterbox, width: usize, height: usize) -> Mask {
    let iw = lb.input_width;
    let mut content = Vec::with_capacity(lb.resized_width * lb.resized_height);
    for y in lb.top..lb.top + lb.resized_height {
        content.extend_from_slice(&input_mask[y * iw + lb.left..y * iw + lb.left + lb.resized_width]);
    }
    let data = if lb.resized_width == width && lb.resized_height == height {
        content.iter().map(|v| *v > 0.5).collect()
    } else {
        bilinear(&content, lb.resized_width, lb.resized_height, width, height).into_iter().map(|v| v > 0.5).collect()
    };
    Mask { width, height, data }
}

/// Outline of the largest 8-connected region of a mask, traced along pixel centres (Moore
/// neighbourhood), as the polygon a viewer can draw.
pub fn outline(mask: &Mask) -> Vec<[f32; 2]> {
    let (w, h) = (mask.width as i64, mask.height as i64);
    let get = |x: i64, y: i64| x >= 0 && y >= 0 && x < w && y < h && mask.data[(y * w + x) as usize];
    // Largest component by flood fill; its topmost-leftmost pixel starts the trace.
    let mut label = vec![0u32; mask.data.len()];
    let mut best = (0usize, None);
    let mut next = 0u32;
    for start in 0..mask.data.len() {
        if !mask.data[start] || label[start] != 0 {
            continue;
        }
        next += 1;
        let mut stack = vec![start];
        label[start] = next;
        let mut size = 0;
        while let Some(i) = stack.pop() {
            size += 1;
            let (x, y) = ((i as i64) % w, (i as i64) / w);
            for dy in -1..=1 {
                for dx in -1..=1 {
                    let (nx, ny) = (x + dx, y + dy);
                    if get(nx, ny) && label[(ny * w + nx) as usize] == 0 {
                        label[(ny * w + nx) as usize] = next;
                        stack.push((ny * w + nx) as usize);
                    }
                }
            }
        }
        if size > best.0 {
            best = (size, Some((start, next)));
        }
    }
    let Some((start, id)) = best.1 else { return Vec::new() };
    let inside = |x: i64, y: i64| get(x, y) && label[(y * w + x) as usize] == id;
    const DIRS: [(i64, i64); 8] = [(1, 0), (1, 1), (0, 1), (-1, 1), (-1, 0), (-1, -1), (0, -1), (1, -1)];
    let start = ((start as i64) % w, (start as i64) / w);
    let mut points = vec![[start.0 as f32, start.1 as f32]];
    let (mut current, mut dir) = (start, 6usize); // arrived moving "up": start search from there
    for _ in 0..4 * mask.data.len() {
        let mut moved = false;
        for k in 0..8 {
            let d = (dir + 6 + k) % 8; // begin left of the previous direction
            let (nx, ny) = (current.0 + DIRS[d].0, current.1 + DIRS[d].1);
            if inside(nx, ny) {
                current = (nx, ny);
                dir = d;
                moved = true;
                break;
            }
        }
        if !moved || current == start {
            break;
        }
        points.push([current.0 as f32, current.1 as f32]);
    }
    points
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn letterbox_matches_ultralytics_rect_mode() {
        // 400x300 at 320: scale 0.8 -> 320x240, padded to 320x256 (8 above, 8 below).
        let lb = Letterbox::new(400, 300, 320);
        assert_eq!(
            (lb.resized_width, lb.resized_height, lb.input_width, lb.input_height, lb.left, lb.top),
            (320, 240, 320, 256, 0, 8)
        );
        // Odd padding: 333x200 at 320 -> 320x192 exactly, no padding.
        let lb = Letterbox::new(333, 200, 320);
        assert_eq!((lb.input_width, lb.input_height), (320, 192));
        let lb = Letterbox::new(100, 90, 320);
        assert_eq!(lb.input_height % 32, 0);
        assert_eq!(lb.resized_width, 320);
    }

    #[test]
    fn resize_keeps_flat_images_flat_and_is_identity_at_scale_one() {
        let img = RgbImage { width: 7, height: 5, data: vec![200; 7 * 5 * 3] };
        assert!(resize_linear(&img, 13, 3).iter().all(|v| *v == 200));
        let ramp = RgbImage { width: 4, height: 1, data: (0..12).map(|v| v as u8 * 10).collect() };
        assert_eq!(resize_linear(&ramp, 4, 1), ramp.data);
    }

    #[test]
    fn outline_of_a_square_walks_its_border() {
        let mut data = vec![false; 100];
        for y in 2..6 {
            for x in 3..8 {
                data[y * 10 + x] = true;
            }
        }
        let poly = outline(&Mask { width: 10, height: 10, data });
        assert_eq!(poly.len(), 14); // 4x5 block: 2*(4+5) - 4 border pixels
        assert!(poly.contains(&[3.0, 2.0]) && poly.contains(&[7.0, 5.0]));
    }

    #[test]
    fn iou_of_identical_and_disjoint_boxes() {
        assert_eq!(iou(&[0.0, 0.0, 2.0, 2.0], &[0.0, 0.0, 2.0, 2.0]), 1.0);
        assert_eq!(iou(&[0.0, 0.0, 1.0, 1.0], &[5.0, 5.0, 6.0, 6.0]), 0.0);
    }
}
