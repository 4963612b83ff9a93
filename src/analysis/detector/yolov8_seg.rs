//! YOLOv8-seg (ultralytics 8.x) in candle: backbone (Conv, C2f, SPPF), PAN-FPN neck and the
//! Segment head (box distribution + classes + mask coefficients, and the mask prototypes).
//!
//! Layer names follow the ultralytics checkpoint (`model.N.…`), so weights load without renaming.
//! Batch norm is folded into the preceding convolution when the weights are loaded: inference then
//! runs one convolution with bias per block, as ultralytics' own `fuse()` does.

use candle_core::{DType, Module, Result, Tensor};
use candle_nn::VarBuilder;

use super::cpu_conv::{ConvShape, PackedConv};

/// Width, depth and channel cap of the five published sizes (ultralytics `yolov8-seg.yaml`).
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Scale {
    pub name: char,
    pub depth: f64,
    pub width: f64,
    pub max_channels: usize,
}

impl Scale {
    pub const ALL: [Scale; 5] = [
        Scale { name: 'n', depth: 0.33, width: 0.25, max_channels: 1024 },
        Scale { name: 's', depth: 0.33, width: 0.50, max_channels: 1024 },
        Scale { name: 'm', depth: 0.67, width: 0.75, max_channels: 768 },
        Scale { name: 'l', depth: 1.00, width: 1.00, max_channels: 512 },
        Scale { name: 'x', depth: 1.00, width: 1.25, max_channels: 512 },
    ];

    /// The size whose first convolution has `channels` output channels (16, 32, 48, 64 or 80).
    pub fn from_stem_channels(channels: usize) -> Option<Scale> {
        Self::ALL.into_iter().find(|s| s.channels(64) == channels)
    }

    pub fn from_name(name: char) -> Option<Scale> {
        Self::ALL.into_iter().find(|s| s.name == name)
    }

    /// Output channels of a layer declared with `c` in the yaml.
    fn channels(&self, c: usize) -> usize {
        let scaled = (c.min(self.max_channels) as f64) * self.width;
        ((scaled / 8.0).ceil() as usize) * 8
    }

    /// Repeats of a block declared with `n` in the yaml.
    fn repeats(&self, n: usize) -> usize {
        ((n as f64 * self.depth).round() as usize).max(1)
    }
}

/// Architecture hyper-parameters read from the weights.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Config {
    pub scale: Scale,
    pub num_classes: usize,
    pub num_masks: usize,
    pub reg_max: usize,
    pub bn_eps: f64,
}

/// Conv2d + BatchNorm2d + SiLU, with the batch norm folded into the convolution.
#[derive(Debug, Clone)]
struct ConvBlock {
    weight: Tensor,
    bias: Tensor,
    shape: ConvShape,
    activation: bool,
    /// The weights packed for the CPU kernels, when the network runs on the CPU.
    packed: Option<PackedConv>,
}

impl ConvBlock {
    fn load(vb: VarBuilder, c_in: usize, c_out: usize, k: usize, stride: usize, eps: f64) -> Result<Self> {
        let weight = vb.get((c_out, c_in, k, k), "conv.weight")?;
        let bn = vb.pp("bn");
        let gamma = bn.get(c_out, "weight")?;
        let beta = bn.get(c_out, "bias")?;
        let mean = bn.get(c_out, "running_mean")?;
        let var = bn.get(c_out, "running_var")?;
        // Fold in f64 so the fused weights round once, like ultralytics' fuse_conv_and_bn.
        let scale = (gamma.to_dtype(DType::F64)? / (var.to_dtype(DType::F64)? + eps)?.sqrt()?)?;
        let weight =
            weight.to_dtype(DType::F64)?.broadcast_mul(&scale.reshape((c_out, 1, 1, 1))?)?.to_dtype(DType::F32)?;
        let bias = (beta.to_dtype(DType::F64)? - (mean.to_dtype(DType::F64)? * &scale)?)?.to_dtype(DType::F32)?;
        let shape = ConvShape { c_in, c_out, kernel: k, stride };
        ConvBlock::new(weight.contiguous()?, bias, shape, true)
    }

    /// A plain Conv2d with bias (the last layer of each head branch).
    fn load_plain(vb: VarBuilder, c_in: usize, c_out: usize) -> Result<Self> {
        let weight = vb.get((c_out, c_in, 1, 1), "weight")?.to_dtype(DType::F32)?;
        let bias = vb.get(c_out, "bias")?.to_dtype(DType::F32)?;
        ConvBlock::new(weight, bias, ConvShape { c_in, c_out, kernel: 1, stride: 1 }, false)
    }

    fn new(weight: Tensor, bias: Tensor, shape: ConvShape, activation: bool) -> Result<Self> {
        let packed = if weight.device().is_cpu() {
            let packed =
                PackedConv::new(shape, &weight.flatten_all()?.to_vec1::<f32>()?, &bias.to_vec1::<f32>()?, activation);
            Some(packed.map_err(candle_core::Error::wrap)?)
        } else {
            None
        };
        Ok(ConvBlock { weight, bias, shape, activation, packed })
    }

    fn packed(&self) -> Result<&PackedConv> {
        self.packed.as_ref().ok_or_else(loaded_elsewhere)
    }

    /// Convolves `input` into `output` (each one image's planes), adding `residual` after the
    /// activation.
    fn run(&self, input: &[f32], size: (usize, usize), output: &mut [f32], residual: Option<&[f32]>) -> Result<()> {
        self.packed()?.run(input, size, output, residual).map_err(candle_core::Error::wrap)
    }

    /// Convolves into new planes.
    fn apply(&self, x: &Planes) -> Result<Planes> {
        let (h, w) = self.shape.output_size(x.h, x.w);
        let mut out = Planes::uninitialised(self.shape.c_out, h, w);
        self.run(&x.data, (x.h, x.w), &mut out.data, None)?;
        Ok(out)
    }
}

/// The tensor path, with candle's own operations: what runs on a GPU, and on the CPU the
/// reference the CPU path is tested against.
impl Module for ConvBlock {
    fn forward(&self, xs: &Tensor) -> Result<Tensor> {
        let ys = xs.conv2d(&self.weight, self.shape.padding(), self.shape.stride, 1, 1)?;
        let ys = ys.broadcast_add(&self.bias.reshape((1, (), 1, 1))?)?;
        if self.activation { ys.silu() } else { Ok(ys) }
    }
}

/// The CPU path asked of a network whose weights were loaded on a GPU (nothing packed for it).
fn loaded_elsewhere() -> candle_core::Error {
    candle_core::Error::Msg("a CPU forward on a network loaded on a GPU".into())
}

/// One image's feature map on the CPU: `channels` planes of `h x w`, row-major, as NCHW holds
/// them. The CPU forward passes these between layers instead of tensors, so that a layer can
/// write into part of a larger map (C2f and SPPF outputs are concatenated where they are made)
/// and read a channel range of one without copying it.
#[derive(Debug, Clone)]
struct Planes {
    data: Vec<f32>,
    channels: usize,
    h: usize,
    w: usize,
}

/// Storage of feature maps no longer needed, for the next ones: a forward makes about a hundred
/// maps of up to a few megabytes, and freshly allocated ones cost a page fault per 4 kB and a
/// zeroing pass each time.
static SPARE_STORAGE: std::sync::Mutex<Vec<Vec<f32>>> = std::sync::Mutex::new(Vec::new());
const MAX_SPARES: usize = 32;

impl Planes {
    /// Planes whose values are whatever was there before: every caller writes them all before
    /// they are read.
    fn uninitialised(channels: usize, h: usize, w: usize) -> Planes {
        let len = channels * h * w;
        let spare = {
            let mut spares = SPARE_STORAGE.lock().unwrap_or_else(|poisoned| poisoned.into_inner());
            let fitting = spares
                .iter()
                .enumerate()
                .filter(|(_, v)| v.capacity() >= len)
                .min_by_key(|(_, v)| v.capacity())
                .map(|(i, _)| i);
            fitting.map(|i| spares.swap_remove(i))
        };
        let mut data = spare.unwrap_or_default();
        data.resize(len, 0.0);
        data.truncate(len);
        Planes { data, channels, h, w }
    }

    fn from_batch(xs: &Tensor) -> Result<Vec<Planes>> {
        let (batch, channels, h, w) = xs.dims4()?;
        let data = xs.to_dtype(DType::F32)?.flatten_all()?.to_vec1::<f32>()?;
        let size = channels * h * w;
        Ok((0..batch).map(|b| Planes { data: data[b * size..(b + 1) * size].to_vec(), channels, h, w }).collect())
    }

    fn to_batch(images: &[Planes], device: &candle_core::Device) -> Result<Tensor> {
        let first = images.first().ok_or_else(|| candle_core::Error::Msg("an empty batch".into()))?;
        let data: Vec<f32> = images.iter().flat_map(|p| p.data.iter().copied()).collect();
        Tensor::from_vec(data, (images.len(), first.channels, first.h, first.w), device)
    }

    /// These planes and `other`'s, one after the other (the neck's concatenations).
    fn concat(&self, other: &Planes) -> Planes {
        let mut out = Planes::uninitialised(self.channels + other.channels, self.h, self.w);
        let (first, second) = out.data.split_at_mut(self.data.len());
        first.copy_from_slice(&self.data);
        second.copy_from_slice(&other.data);
        out
    }

    /// These planes upsampled by 2 (nearest neighbour, as `nn.Upsample(scale_factor=2)`), then
    /// `skip`'s: the neck's upsample and concatenation in one pass.
    fn upsample2_concat(&self, skip: &Planes) -> Planes {
        use rayon::prelude::*;
        let (h, w) = (self.h, self.w);
        let mut out = Planes::uninitialised(self.channels + skip.channels, 2 * h, 2 * w);
        let (upsampled, copied) = out.data.split_at_mut(self.channels * 4 * h * w);
        upsampled.par_chunks_mut(4 * h * w).zip(self.data.par_chunks(h * w)).for_each(|(dst, src)| {
            for y in 0..2 * h {
                let line = &src[(y / 2) * w..(y / 2 + 1) * w];
                for (pair, &v) in dst[y * 2 * w..(y + 1) * 2 * w].chunks_exact_mut(2).zip(line) {
                    pair.fill(v);
                }
            }
        });
        copied.copy_from_slice(&skip.data);
        out
    }
}

impl Drop for Planes {
    fn drop(&mut self) {
        let data = std::mem::take(&mut self.data);
        if data.capacity() == 0 {
            return;
        }
        let mut spares = SPARE_STORAGE.lock().unwrap_or_else(|poisoned| poisoned.into_inner());
        if spares.len() < MAX_SPARES {
            spares.push(data);
        }
    }
}

/// 5x5 max-pool, stride 1, padding 2, of every plane of `src` into `dst`: a row pass then a
/// column pass, each over the values inside the image (the padding never wins a maximum).
fn max_pool_5_planes(src: &[f32], dst: &mut [f32], (h, w): (usize, usize)) {
    use rayon::prelude::*;
    dst.par_chunks_mut(h * w).zip(src.par_chunks(h * w)).for_each(|(dst, src)| {
        let mut rows = vec![0f32; h * w];
        for y in 0..h {
            for x in 0..w {
                let line = &src[y * w + x.saturating_sub(2)..y * w + (x + 3).min(w)];
                rows[y * w + x] = line.iter().copied().fold(f32::NEG_INFINITY, f32::max);
            }
        }
        for y in 0..h {
            for x in 0..w {
                dst[y * w + x] =
                    (y.saturating_sub(2)..(y + 3).min(h)).map(|r| rows[r * w + x]).fold(f32::NEG_INFINITY, f32::max);
            }
        }
    });
}

#[derive(Debug, Clone)]
struct Bottleneck {
    cv1: ConvBlock,
    cv2: ConvBlock,
    residual: bool,
}

impl Bottleneck {
    fn load(vb: VarBuilder, c: usize, shortcut: bool, eps: f64) -> Result<Self> {
        Ok(Bottleneck {
            cv1: ConvBlock::load(vb.pp("cv1"), c, c, 3, 1, eps)?,
            cv2: ConvBlock::load(vb.pp("cv2"), c, c, 3, 1, eps)?,
            residual: shortcut,
        })
    }
}

impl Module for Bottleneck {
    fn forward(&self, xs: &Tensor) -> Result<Tensor> {
        let ys = self.cv2.forward(&self.cv1.forward(xs)?)?;
        if self.residual { xs + ys } else { Ok(ys) }
    }
}

/// CSP bottleneck with two convolutions, keeping every intermediate output ("C2f").
#[derive(Debug, Clone)]
struct C2f {
    cv1: ConvBlock,
    cv2: ConvBlock,
    blocks: Vec<Bottleneck>,
    hidden: usize,
}

impl C2f {
    fn load(vb: VarBuilder, c_in: usize, c_out: usize, n: usize, shortcut: bool, eps: f64) -> Result<Self> {
        let hidden = c_out / 2;
        let cv1 = ConvBlock::load(vb.pp("cv1"), c_in, 2 * hidden, 1, 1, eps)?;
        let cv2 = ConvBlock::load(vb.pp("cv2"), (2 + n) * hidden, c_out, 1, 1, eps)?;
        let blocks =
            (0..n).map(|i| Bottleneck::load(vb.pp(format!("m.{i}")), hidden, shortcut, eps)).collect::<Result<_>>()?;
        Ok(C2f { cv1, cv2, blocks, hidden })
    }
}

impl C2f {
    /// Every part is written into its place in the concatenation that `cv2` reads: the two
    /// halves of `cv1`, then each bottleneck's output, read back as the next one's input.
    fn forward_cpu(&self, x: &Planes) -> Result<Planes> {
        let (h, w) = (x.h, x.w);
        let part = self.hidden * h * w;
        let mut parts = Planes::uninitialised((2 + self.blocks.len()) * self.hidden, h, w);
        self.cv1.run(&x.data, (h, w), &mut parts.data[..2 * part], None)?;
        let mut inner = Planes::uninitialised(self.hidden, h, w);
        for (i, block) in self.blocks.iter().enumerate() {
            let (done, rest) = parts.data.split_at_mut((2 + i) * part);
            let input = &done[(1 + i) * part..];
            block.cv1.run(input, (h, w), &mut inner.data, None)?;
            block.cv2.run(&inner.data, (h, w), &mut rest[..part], block.residual.then_some(input))?;
        }
        self.cv2.apply(&parts)
    }
}

impl Module for C2f {
    fn forward(&self, xs: &Tensor) -> Result<Tensor> {
        let ys = self.cv1.forward(xs)?;
        let mut parts = vec![ys.narrow(1, 0, self.hidden)?, ys.narrow(1, self.hidden, self.hidden)?];
        for block in &self.blocks {
            let next = block.forward(parts.last().expect("two parts to start"))?;
            parts.push(next);
        }
        self.cv2.forward(&Tensor::cat(&parts, 1)?)
    }
}

/// Spatial pyramid pooling, fast: three chained 5x5 max-pools.
#[derive(Debug, Clone)]
struct Sppf {
    cv1: ConvBlock,
    cv2: ConvBlock,
}

impl Sppf {
    fn load(vb: VarBuilder, c_in: usize, c_out: usize, eps: f64) -> Result<Self> {
        let hidden = c_in / 2;
        Ok(Sppf {
            cv1: ConvBlock::load(vb.pp("cv1"), c_in, hidden, 1, 1, eps)?,
            cv2: ConvBlock::load(vb.pp("cv2"), hidden * 4, c_out, 1, 1, eps)?,
        })
    }
}

/// 5x5 max-pool, stride 1, padding 2. Edge replication gives the same maxima as -inf padding,
/// since the replicated values are already inside each border window.
fn max_pool_5(xs: &Tensor) -> Result<Tensor> {
    xs.pad_with_same(2, 2, 2)?.pad_with_same(3, 2, 2)?.max_pool2d_with_stride(5, 1)
}

impl Sppf {
    fn forward_cpu(&self, x: &Planes) -> Result<Planes> {
        let (h, w) = (x.h, x.w);
        let part = self.cv1.shape.c_out * h * w;
        let mut parts = Planes::uninitialised(4 * self.cv1.shape.c_out, h, w);
        self.cv1.run(&x.data, (h, w), &mut parts.data[..part], None)?;
        for i in 0..3 {
            let (done, rest) = parts.data.split_at_mut((i + 1) * part);
            max_pool_5_planes(&done[i * part..], &mut rest[..part], (h, w));
        }
        self.cv2.apply(&parts)
    }
}

impl Module for Sppf {
    fn forward(&self, xs: &Tensor) -> Result<Tensor> {
        let x = self.cv1.forward(xs)?;
        let y1 = max_pool_5(&x)?;
        let y2 = max_pool_5(&y1)?;
        let y3 = max_pool_5(&y2)?;
        self.cv2.forward(&Tensor::cat(&[&x, &y1, &y2, &y3], 1)?)
    }
}

/// Mask prototypes: 3x3 conv, 2x transposed conv, 3x3 conv, 1x1 conv to `num_masks` channels.
#[derive(Debug, Clone)]
struct Proto {
    cv1: ConvBlock,
    up_weight: Tensor,
    up_bias: Tensor,
    /// The transposed convolution on the CPU: a 1x1 convolution to the four sub-pixel phases
    /// (row-major 2x2) of every output channel, which `forward_cpu` then interleaves.
    up_phases: Option<PackedConv>,
    cv2: ConvBlock,
    cv3: ConvBlock,
}

impl Proto {
    fn load(vb: VarBuilder, c_in: usize, hidden: usize, num_masks: usize, eps: f64) -> Result<Self> {
        let up_weight = vb.get((hidden, hidden, 2, 2), "upsample.weight")?.to_dtype(DType::F32)?;
        let up_bias = vb.get(hidden, "upsample.bias")?.to_dtype(DType::F32)?;
        let up_phases = if up_weight.device().is_cpu() {
            // ConvTranspose2d weights are (in, out, ky, kx): phase (ky, kx) of output channel o
            // becomes output channel (2 ky + kx) * hidden + o of the 1x1 convolution.
            let weight = up_weight.permute((2, 3, 1, 0))?.flatten_all()?.to_vec1::<f32>()?;
            let bias = up_bias.to_vec1::<f32>()?.repeat(4);
            let shape = ConvShape { c_in: hidden, c_out: 4 * hidden, kernel: 1, stride: 1 };
            Some(PackedConv::new(shape, &weight, &bias, false).map_err(candle_core::Error::wrap)?)
        } else {
            None
        };
        Ok(Proto {
            cv1: ConvBlock::load(vb.pp("cv1"), c_in, hidden, 3, 1, eps)?,
            up_weight,
            up_bias,
            up_phases,
            cv2: ConvBlock::load(vb.pp("cv2"), hidden, hidden, 3, 1, eps)?,
            cv3: ConvBlock::load(vb.pp("cv3"), hidden, num_masks, 1, 1, eps)?,
        })
    }

    fn forward_cpu(&self, xs: &Planes) -> Result<Planes> {
        use rayon::prelude::*;
        let x = self.cv1.apply(xs)?;
        let up = self.up_phases.as_ref().ok_or_else(loaded_elsewhere)?;
        let hidden = x.channels;
        let (h, w) = (x.h, x.w);
        let mut phases = Planes::uninitialised(4 * hidden, h, w);
        up.run(&x.data, (h, w), &mut phases.data, None).map_err(candle_core::Error::wrap)?;
        let mut upsampled = Planes::uninitialised(hidden, 2 * h, 2 * w);
        let phase_size = hidden * h * w;
        upsampled.data.par_chunks_mut(4 * h * w).enumerate().for_each(|(o, dst)| {
            for (phase, src) in phases.data.chunks(phase_size).enumerate() {
                let (dy, dx) = (phase / 2, phase % 2);
                let src = &src[o * h * w..(o + 1) * h * w];
                for y in 0..h {
                    let row = &mut dst[(2 * y + dy) * 2 * w..(2 * y + dy + 1) * 2 * w];
                    for (x, &v) in src[y * w..(y + 1) * w].iter().enumerate() {
                        row[2 * x + dx] = v;
                    }
                }
            }
        });
        self.cv3.apply(&self.cv2.apply(&upsampled)?)
    }
}

impl Module for Proto {
    fn forward(&self, xs: &Tensor) -> Result<Tensor> {
        let x = self.cv1.forward(xs)?;
        let x =
            x.conv_transpose2d(&self.up_weight, 0, 0, 2, 1)?.broadcast_add(&self.up_bias.reshape((1, (), 1, 1))?)?;
        self.cv3.forward(&self.cv2.forward(&x)?)
    }
}

/// One three-layer branch of the head (two 3x3 ConvBlocks and a 1x1 Conv2d), per pyramid level.
#[derive(Debug, Clone)]
struct Branch(ConvBlock, ConvBlock, ConvBlock);

impl Branch {
    fn load(vb: VarBuilder, c_in: usize, hidden: usize, c_out: usize, eps: f64) -> Result<Self> {
        Ok(Branch(
            ConvBlock::load(vb.pp("0"), c_in, hidden, 3, 1, eps)?,
            ConvBlock::load(vb.pp("1"), hidden, hidden, 3, 1, eps)?,
            ConvBlock::load_plain(vb.pp("2"), hidden, c_out)?,
        ))
    }
}

impl Branch {
    fn forward_cpu(&self, xs: &Planes) -> Result<Planes> {
        self.2.apply(&self.1.apply(&self.0.apply(xs)?)?)
    }
}

impl Module for Branch {
    fn forward(&self, xs: &Tensor) -> Result<Tensor> {
        self.2.forward(&self.1.forward(&self.0.forward(xs)?)?)
    }
}

/// The Segment head: per level a box branch (distribution over `reg_max` bins per side), a class
/// branch and a mask-coefficient branch, plus the prototypes from the finest level.
#[derive(Debug, Clone)]
struct SegmentHead {
    boxes: Vec<Branch>,
    classes: Vec<Branch>,
    masks: Vec<Branch>,
    proto: Proto,
    num_classes: usize,
    num_masks: usize,
    reg_max: usize,
}

const STRIDES: [usize; 3] = [8, 16, 32];

/// One pyramid level's branch outputs, `(batch, channels, h * w)` each.
struct LevelOutputs {
    size: (usize, usize),
    boxes: Tensor,
    classes: Tensor,
    masks: Tensor,
}

impl SegmentHead {
    fn load(vb: VarBuilder, levels: [usize; 3], cfg: &Config) -> Result<Self> {
        let eps = cfg.bn_eps;
        let c2 = (levels[0] / 4).max(cfg.reg_max * 4).max(16);
        let c3 = levels[0].max(cfg.num_classes.min(100));
        let c4 = (levels[0] / 4).max(cfg.num_masks);
        let prototypes = cfg.scale.channels(256);
        let branches = |name: &str, hidden: usize, out: usize| -> Result<Vec<Branch>> {
            levels
                .iter()
                .enumerate()
                .map(|(i, &c)| Branch::load(vb.pp(format!("{name}.{i}")), c, hidden, out, eps))
                .collect()
        };
        Ok(SegmentHead {
            boxes: branches("cv2", c2, 4 * cfg.reg_max)?,
            classes: branches("cv3", c3, cfg.num_classes)?,
            masks: branches("cv4", c4, cfg.num_masks)?,
            proto: Proto::load(vb.pp("proto"), levels[0], prototypes, cfg.num_masks, eps)?,
            num_classes: cfg.num_classes,
            num_masks: cfg.num_masks,
            reg_max: cfg.reg_max,
        })
    }

    /// Returns (predictions `(b, 4 + classes + masks, anchors)` with boxes as centre x, centre y,
    /// width, height in input pixels and class scores after the sigmoid; prototypes `(b, masks,
    /// h/4, w/4)`), the raw outputs of ultralytics' Segment head in inference mode.
    fn forward(&self, features: [&Tensor; 3]) -> Result<(Tensor, Tensor)> {
        let batch = features[0].dim(0)?;
        let proto = self.proto.forward(features[0])?;
        let mut outputs = Vec::with_capacity(3);
        for (level, x) in features.iter().enumerate() {
            let (_, _, h, w) = x.dims4()?;
            outputs.push(LevelOutputs {
                size: (h, w),
                boxes: self.boxes[level].forward(x)?.reshape((batch, 4 * self.reg_max, h * w))?,
                classes: self.classes[level].forward(x)?.reshape((batch, self.num_classes, h * w))?,
                masks: self.masks[level].forward(x)?.reshape((batch, self.num_masks, h * w))?,
            });
        }
        self.decode(outputs, proto)
    }

    /// The head on the CPU, one image after another, decoded as [`SegmentHead::decode`] does.
    fn forward_cpu(&self, features: &[[Planes; 3]]) -> Result<(Tensor, Tensor)> {
        let device = candle_core::Device::Cpu;
        let protos = features.iter().map(|f| self.proto.forward_cpu(&f[0])).collect::<Result<Vec<_>>>()?;
        let proto = Planes::to_batch(&protos, &device)?;
        let anchors: usize = features[0].iter().map(|level| level.h * level.w).sum();
        let rows = 4 + self.num_classes + self.num_masks;
        let mut predictions = vec![0f32; features.len() * rows * anchors];
        for (image, levels) in predictions.chunks_mut(rows * anchors).zip(features) {
            let mut first = 0;
            for (level, x) in levels.iter().enumerate() {
                let outputs =
                    [&self.boxes[level], &self.classes[level], &self.masks[level]].map(|branch| branch.forward_cpu(x));
                let [boxes, classes, masks] = outputs;
                self.decode_level_cpu(level, (x.h, x.w), [&boxes?, &classes?, &masks?], image, anchors, first);
                first += x.h * x.w;
            }
        }
        Ok((Tensor::from_vec(predictions, (features.len(), rows, anchors), &device)?, proto))
    }

    /// One level's branch outputs into one image's predictions (`rows x anchors`), at anchors
    /// `first..`.
    fn decode_level_cpu(
        &self,
        level: usize,
        (h, w): (usize, usize),
        [boxes, classes, masks]: [&Planes; 3],
        image: &mut [f32],
        anchors: usize,
        first: usize,
    ) {
        let cells = h * w;
        let stride = STRIDES[level] as f32;
        let mut bins = vec![0f32; self.reg_max];
        for cell in 0..cells {
            // Expected distance per side (left, top, right, bottom): softmax over the bins,
            // weighted by the bin index.
            let mut distance = [0f32; 4];
            for (side, distance) in distance.iter_mut().enumerate() {
                for (bin, value) in bins.iter_mut().enumerate() {
                    *value = boxes.data[(side * self.reg_max + bin) * cells + cell];
                }
                let max = bins.iter().copied().fold(f32::NEG_INFINITY, f32::max);
                let (mut total, mut weighted) = (0f32, 0f32);
                for (bin, &value) in bins.iter().enumerate() {
                    let e = (value - max).exp();
                    total += e;
                    weighted += e * bin as f32;
                }
                *distance = weighted / total;
            }
            let (ax, ay) = ((cell % w) as f32 + 0.5, (cell / w) as f32 + 0.5);
            let (x1, y1, x2, y2) = (ax - distance[0], ay - distance[1], ax + distance[2], ay + distance[3]);
            let anchor = first + cell;
            image[anchor] = (x1 + x2) * 0.5 * stride;
            image[anchors + anchor] = (y1 + y2) * 0.5 * stride;
            image[2 * anchors + anchor] = (x2 - x1) * stride;
            image[3 * anchors + anchor] = (y2 - y1) * stride;
            for class in 0..self.num_classes {
                let logit = classes.data[class * cells + cell];
                image[(4 + class) * anchors + anchor] = 1.0 / (1.0 + (-logit).exp());
            }
            for mask in 0..self.num_masks {
                image[(4 + self.num_classes + mask) * anchors + anchor] = masks.data[mask * cells + cell];
            }
        }
    }

    /// From the three levels' branch outputs to ultralytics' inference outputs.
    fn decode(&self, outputs: Vec<LevelOutputs>, proto: Tensor) -> Result<(Tensor, Tensor)> {
        let batch = proto.dim(0)?;
        let device = proto.device().clone();
        let device = &device;
        let mut box_parts = Vec::with_capacity(3);
        let mut class_parts = Vec::with_capacity(3);
        let mut mask_parts = Vec::with_capacity(3);
        let mut anchor_parts = Vec::with_capacity(3);
        let mut stride_parts = Vec::with_capacity(3);
        for (level, outputs) in outputs.into_iter().enumerate() {
            let (h, w) = outputs.size;
            box_parts.push(outputs.boxes);
            class_parts.push(outputs.classes);
            mask_parts.push(outputs.masks);
            // Anchor points at cell centres, in grid units of this level.
            let xs = Tensor::arange(0u32, w as u32, device)?.to_dtype(DType::F32)?.affine(1.0, 0.5)?;
            let ys = Tensor::arange(0u32, h as u32, device)?.to_dtype(DType::F32)?.affine(1.0, 0.5)?;
            let ax = xs.unsqueeze(0)?.broadcast_as((h, w))?.flatten_all()?;
            let ay = ys.unsqueeze(1)?.broadcast_as((h, w))?.flatten_all()?;
            anchor_parts.push(Tensor::stack(&[ax, ay], 0)?);
            stride_parts.push(Tensor::full(STRIDES[level] as f32, h * w, device)?);
        }
        let distribution = Tensor::cat(&box_parts, 2)?;
        let anchors_total = distribution.dim(2)?;
        // Expected distance per side: softmax over the bins, weighted by the bin index.
        let distribution = distribution.reshape((batch, 4, self.reg_max, anchors_total))?;
        let probabilities = candle_nn::ops::softmax(&distribution, 2)?;
        let bins = Tensor::arange(0u32, self.reg_max as u32, device)?.to_dtype(DType::F32)?.reshape((
            1,
            1,
            self.reg_max,
            1,
        ))?;
        let distances = probabilities.broadcast_mul(&bins)?.sum(2)?; // (b, 4, anchors)
        let anchors = Tensor::cat(&anchor_parts, 1)?.unsqueeze(0)?; // (1, 2, anchors)
        let strides = Tensor::cat(&stride_parts, 0)?.reshape((1, 1, anchors_total))?;
        let left_top = distances.narrow(1, 0, 2)?;
        let right_bottom = distances.narrow(1, 2, 2)?;
        let top_left = anchors.broadcast_sub(&left_top)?;
        let bottom_right = anchors.broadcast_add(&right_bottom)?;
        let centre = ((&top_left + &bottom_right)? * 0.5)?;
        let size = (&bottom_right - &top_left)?;
        let boxes = Tensor::cat(&[centre, size], 1)?.broadcast_mul(&strides)?;
        let scores = candle_nn::ops::sigmoid(&Tensor::cat(&class_parts, 2)?)?;
        let coefficients = Tensor::cat(&mask_parts, 2)?;
        Ok((Tensor::cat(&[boxes, scores, coefficients], 1)?, proto))
    }
}

/// The whole network.
#[derive(Debug, Clone)]
pub struct YoloV8Seg {
    cfg: Config,
    // Backbone: model.0 … model.9
    stem: ConvBlock,
    down1: ConvBlock,
    c2f2: C2f,
    down3: ConvBlock,
    c2f4: C2f,
    down5: ConvBlock,
    c2f6: C2f,
    down7: ConvBlock,
    c2f8: C2f,
    sppf9: Sppf,
    // Neck: model.12, 15, 16, 18, 19, 21 (10, 11, 13, 14, 17, 20 are parameter-free)
    c2f12: C2f,
    c2f15: C2f,
    down16: ConvBlock,
    c2f18: C2f,
    down19: ConvBlock,
    c2f21: C2f,
    head: SegmentHead,
}

impl YoloV8Seg {
    pub fn load(vb: VarBuilder, cfg: Config) -> Result<Self> {
        let s = cfg.scale;
        let eps = cfg.bn_eps;
        let (c64, c128, c256, c512, c1024) =
            (s.channels(64), s.channels(128), s.channels(256), s.channels(512), s.channels(1024));
        let (n3, n6) = (s.repeats(3), s.repeats(6));
        let m = |i: usize| vb.pp(format!("model.{i}"));
        Ok(YoloV8Seg {
            stem: ConvBlock::load(m(0), 3, c64, 3, 2, eps)?,
            down1: ConvBlock::load(m(1), c64, c128, 3, 2, eps)?,
            c2f2: C2f::load(m(2), c128, c128, n3, true, eps)?,
            down3: ConvBlock::load(m(3), c128, c256, 3, 2, eps)?,
            c2f4: C2f::load(m(4), c256, c256, n6, true, eps)?,
            down5: ConvBlock::load(m(5), c256, c512, 3, 2, eps)?,
            c2f6: C2f::load(m(6), c512, c512, n6, true, eps)?,
            down7: ConvBlock::load(m(7), c512, c1024, 3, 2, eps)?,
            c2f8: C2f::load(m(8), c1024, c1024, n3, true, eps)?,
            sppf9: Sppf::load(m(9), c1024, c1024, eps)?,
            c2f12: C2f::load(m(12), c1024 + c512, c512, n3, false, eps)?,
            c2f15: C2f::load(m(15), c512 + c256, c256, n3, false, eps)?,
            down16: ConvBlock::load(m(16), c256, c256, 3, 2, eps)?,
            c2f18: C2f::load(m(18), c256 + c512, c512, n3, false, eps)?,
            down19: ConvBlock::load(m(19), c512, c512, 3, 2, eps)?,
            c2f21: C2f::load(m(21), c512 + c1024, c1024, n3, false, eps)?,
            head: SegmentHead::load(m(22), [c256, c512, c1024], &cfg)?,
            cfg,
        })
    }

    pub fn config(&self) -> &Config {
        &self.cfg
    }

    /// `images`: `(batch, 3, H, W)` RGB in [0, 1], H and W multiples of 32.
    /// Returns the raw head outputs, see [`SegmentHead::forward`].
    pub fn forward(&self, images: &Tensor) -> Result<(Tensor, Tensor)> {
        if images.device().is_cpu() {
            // The whole forward runs on one of rayon's threads, so that each layer's parallel
            // loops share out work among threads already awake instead of waking the pool from
            // outside and sleeping until it is done (a few hundred such hand-overs a forward).
            return rayon::scope(|_| {
                use rayon::prelude::*;
                let features = Planes::from_batch(images)?
                    .par_iter()
                    .map(|image| self.features_cpu(image))
                    .collect::<Result<Vec<_>>>()?;
                self.head.forward_cpu(&features)
            });
        }
        self.forward_with_tensors(images)
    }

    /// The forward in candle tensor operations, on any device: how a GPU runs it. On the CPU it
    /// is the reference for the CPU path (see the tests), several times slower.
    pub fn forward_with_tensors(&self, images: &Tensor) -> Result<(Tensor, Tensor)> {
        let x = self.down1.forward(&self.stem.forward(images)?)?;
        let x = self.c2f2.forward(&x)?;
        let p3 = self.c2f4.forward(&self.down3.forward(&x)?)?;
        let p4 = self.c2f6.forward(&self.down5.forward(&p3)?)?;
        let p5 = self.sppf9.forward(&self.c2f8.forward(&self.down7.forward(&p4)?)?)?;
        let up = upsample2(&p5)?;
        let n4 = self.c2f12.forward(&Tensor::cat(&[&up, &p4], 1)?)?;
        let up = upsample2(&n4)?;
        let out3 = self.c2f15.forward(&Tensor::cat(&[&up, &p3], 1)?)?;
        let out4 = self.c2f18.forward(&Tensor::cat(&[&self.down16.forward(&out3)?, &n4], 1)?)?;
        let out5 = self.c2f21.forward(&Tensor::cat(&[&self.down19.forward(&out4)?, &p5], 1)?)?;
        self.head.forward([&out3, &out4, &out5])
    }
}

impl YoloV8Seg {
    /// Backbone and neck of one image on the CPU: the three feature maps the head reads.
    fn features_cpu(&self, image: &Planes) -> Result<[Planes; 3]> {
        let x = self.c2f2.forward_cpu(&self.down1.apply(&self.stem.apply(image)?)?)?;
        let p3 = self.c2f4.forward_cpu(&self.down3.apply(&x)?)?;
        let p4 = self.c2f6.forward_cpu(&self.down5.apply(&p3)?)?;
        let p5 = self.sppf9.forward_cpu(&self.c2f8.forward_cpu(&self.down7.apply(&p4)?)?)?;
        let n4 = self.c2f12.forward_cpu(&p5.upsample2_concat(&p4))?;
        let out3 = self.c2f15.forward_cpu(&n4.upsample2_concat(&p3))?;
        let out4 = self.c2f18.forward_cpu(&self.down16.apply(&out3)?.concat(&n4))?;
        let out5 = self.c2f21.forward_cpu(&self.down19.apply(&out4)?.concat(&p5))?;
        Ok([out3, out4, out5])
    }
}

fn upsample2(xs: &Tensor) -> Result<Tensor> {
    let (_, _, h, w) = xs.dims4()?;
    xs.upsample_nearest2d(2 * h, 2 * w)
}
