//! YOLOv8's convolutions on the CPU, computed straight from the input planes, with bias, SiLU and
//! the bottleneck's residual applied while the sums are still in registers.
//!
//! Why not a GEMM library: the column matrix of a 3x3 convolution is nine times its input and was
//! written and read again for every layer, the library packed both operands on every call, and
//! bias and SiLU were another pass over the output. With YOLOv8-seg at 512 that spent two thirds
//! of the forward outside the multiply and left it at 3.3 times PyTorch's time. Here the weights
//! are packed once, at load, in the order the kernel reads them; the input is copied once into a
//! zero-padded frame (for stride 2, with even and odd columns apart, so that every tap reads
//! consecutive pixels); and each output tile, a few channels by a few runs of pixels, is summed
//! over every input channel and tap in registers and stored once, finished.
//!
//! Three kernels share that plan: AVX-512 (8 channels x 3 runs of 16 pixels), AVX2 with FMA
//! (4 x 3 runs of 8) and a portable one (4 x 2 runs of 8, what the compiler makes of plain loops),
//! picked at run time; `IDAICS_CPU_KERNEL=avx2|portable` picks a lesser one, for tests and for
//! timing the AVX2 path on a machine that has AVX-512. Wide 3x3 stride-1 convolutions go through
//! Winograd's F(2x2, 3x3) instead (`winograd.rs`), whose products run on these kernels.

use std::sync::OnceLock;

use rayon::prelude::*;

use super::winograd::WinogradWeights;

/// The instruction set the convolutions run on.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Kernel {
    Avx512,
    Avx2,
    Portable,
}

impl Kernel {
    /// The best this CPU runs, or the lesser one `IDAICS_CPU_KERNEL` names. Decided once.
    pub fn detected() -> Kernel {
        static DETECTED: OnceLock<Kernel> = OnceLock::new();
        *DETECTED.get_or_init(|| {
            let best = Kernel::best_supported();
            match std::env::var("IDAICS_CPU_KERNEL").as_deref() {
                Ok("portable") => Kernel::Portable,
                Ok("avx2") if best != Kernel::Portable => Kernel::Avx2,
                _ => best,
            }
        })
    }

    fn best_supported() -> Kernel {
        #[cfg(target_arch = "x86_64")]
        {
            if is_x86_feature_detected!("avx512f") {
                return Kernel::Avx512;
            }
            if is_x86_feature_detected!("avx2") && is_x86_feature_detected!("fma") {
                return Kernel::Avx2;
            }
        }
        Kernel::Portable
    }

    pub fn name(self) -> &'static str {
        match self {
            Kernel::Avx512 => "avx512",
            Kernel::Avx2 => "avx2",
            Kernel::Portable => "portable",
        }
    }

    /// Output channels per tile.
    pub(super) fn channels(self) -> usize {
        match self {
            Kernel::Avx512 => 8,
            Kernel::Avx2 | Kernel::Portable => 4,
        }
    }

    /// Pixels per run (one vector).
    pub(super) fn run_length(self) -> usize {
        match self {
            Kernel::Avx512 => 16,
            Kernel::Avx2 | Kernel::Portable => 8,
        }
    }

    /// Runs per tile.
    pub(super) fn runs(self) -> usize {
        match self {
            Kernel::Avx512 | Kernel::Avx2 => 3,
            Kernel::Portable => 2,
        }
    }
}

/// Geometry of one convolution. YOLOv8 has 1x1 ones with stride 1 and 3x3 ones with stride 1
/// or 2, always padded to keep the size (or halve it).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ConvShape {
    pub c_in: usize,
    pub c_out: usize,
    pub kernel: usize,
    pub stride: usize,
}

impl ConvShape {
    pub fn padding(&self) -> usize {
        self.kernel / 2
    }

    pub fn output_size(&self, h: usize, w: usize) -> (usize, usize) {
        let p = self.padding();
        ((h + 2 * p - self.kernel) / self.stride + 1, (w + 2 * p - self.kernel) / self.stride + 1)
    }
}

#[derive(Debug, thiserror::Error)]
pub enum ConvError {
    #[error("a {kernel}x{kernel} convolution with stride {stride} has no CPU kernel here")]
    Unsupported { kernel: usize, stride: usize },
    #[error("{what}: {got} values where {expected} were expected")]
    Size { what: &'static str, got: usize, expected: usize },
}

/// A convolution with its weights packed for one kernel: for each block of output channels, for
/// each input channel and tap, the block's weights side by side (zero beyond `c_out`).
#[derive(Debug, Clone)]
pub struct PackedConv {
    shape: ConvShape,
    kernel: Kernel,
    packed: Vec<f32>,
    /// The same weights transformed for F(2x2, 3x3), for 3x3 stride-1 convolutions wide enough.
    winograd: Option<WinogradWeights>,
    bias: Vec<f32>,
    silu: bool,
}

/// Input and output channels below which a 3x3 convolution stays direct: the transforms cost per
/// channel what the products save per pair of channels (see [`WinogradWeights::applies`]).
const WINOGRAD_MIN_CHANNELS: usize = 32;

/// `c_out x taps` weights (row-major) packed for `kernel`: for each block of output channels, for
/// each tap, the block's weights side by side (zero beyond `c_out`).
pub(super) fn pack_weights(kernel: Kernel, c_out: usize, taps: usize, weight: &[f32]) -> Vec<f32> {
    let mr = kernel.channels();
    let blocks = c_out.div_ceil(mr);
    let mut packed = vec![0f32; blocks * taps * mr];
    for co in 0..c_out {
        let (block, lane) = (co / mr, co % mr);
        for tap in 0..taps {
            packed[(block * taps + tap) * mr + lane] = weight[co * taps + tap];
        }
    }
    packed
}

impl PackedConv {
    /// `weight`: `(c_out, c_in, k, k)` row-major, as PyTorch stores it; `bias`: `c_out`.
    pub fn new(shape: ConvShape, weight: &[f32], bias: &[f32], silu: bool) -> Result<PackedConv, ConvError> {
        Self::for_kernel(Kernel::detected(), shape, weight, bias, silu)
    }

    pub fn for_kernel(
        kernel: Kernel,
        shape: ConvShape,
        weight: &[f32],
        bias: &[f32],
        silu: bool,
    ) -> Result<PackedConv, ConvError> {
        if !matches!((shape.kernel, shape.stride), (1, 1) | (3, 1) | (3, 2)) {
            return Err(ConvError::Unsupported { kernel: shape.kernel, stride: shape.stride });
        }
        let taps = shape.c_in * shape.kernel * shape.kernel;
        let expected = shape.c_out * taps;
        if weight.len() != expected {
            return Err(ConvError::Size { what: "weights", got: weight.len(), expected });
        }
        if bias.len() != shape.c_out {
            return Err(ConvError::Size { what: "bias", got: bias.len(), expected: shape.c_out });
        }
        let packed = pack_weights(kernel, shape.c_out, taps, weight);
        let winograd = (shape.kernel == 3
            && shape.stride == 1
            && shape.c_in >= WINOGRAD_MIN_CHANNELS
            && shape.c_out >= WINOGRAD_MIN_CHANNELS)
            .then(|| WinogradWeights::new(kernel, shape.c_in, shape.c_out, weight));
        Ok(PackedConv { shape, kernel, packed, winograd, bias: bias.to_vec(), silu })
    }

    pub fn shape(&self) -> ConvShape {
        self.shape
    }

    /// Convolves one image: `input` holds `c_in` planes of `h x w`, `output` receives `c_out`
    /// planes of the output size, and `residual` (same size as the output), when given, is
    /// added after the activation, as a YOLOv8 bottleneck adds its input.
    pub fn run(
        &self,
        input: &[f32],
        (h, w): (usize, usize),
        output: &mut [f32],
        residual: Option<&[f32]>,
    ) -> Result<(), ConvError> {
        let s = self.shape;
        let (out_h, out_w) = s.output_size(h, w);
        let plane = out_h * out_w;
        let check = |what, got: usize, expected: usize| {
            if got == expected { Ok(()) } else { Err(ConvError::Size { what, got, expected }) }
        };
        check("input", input.len(), s.c_in * h * w)?;
        check("output", output.len(), s.c_out * plane)?;
        if let Some(residual) = residual {
            check("residual", residual.len(), s.c_out * plane)?;
        }
        // Taken out while in use: a thread that waits on rayon may run another convolution.
        let mut frame = FRAME.take();
        match &self.winograd {
            Some(winograd) if winograd.applies((h, w)) => {
                // The stride-2 layout puts neighbouring tiles' columns side by side.
                Layout::prepare(ConvShape { stride: 2, ..s }, input, (h, w), &mut frame);
                winograd.run(self.kernel, &frame, (h, w), &self.bias, self.silu, output, residual);
            }
            _ => {
                let layout = Layout::prepare(s, input, (h, w), &mut frame);
                let source: &[f32] = if s.kernel == 1 { input } else { &frame };
                self.convolve(source, &layout, (out_h, out_w), output, residual);
            }
        }
        FRAME.set(frame);
        Ok(())
    }

    fn convolve(
        &self,
        source: &[f32],
        layout: &Layout,
        (out_h, out_w): (usize, usize),
        output: &mut [f32],
        residual: Option<&[f32]>,
    ) {
        let kernel = self.kernel;
        let (mr, length, runs) = (kernel.channels(), kernel.run_length(), kernel.runs());
        let plane = out_h * out_w;
        // Runs of pixels: each row cut into vectors; a 1x1 convolution reads its plane as one row.
        let (rows, width) = if self.shape.kernel == 1 { (1, plane) } else { (out_h, out_w) };
        let per_row = width.div_ceil(length);
        let all_runs: Vec<Run> = (0..rows * per_row)
            .map(|i| {
                let (row, x) = (i / per_row, (i % per_row) * length);
                Run { source: layout.origin(row, x), target: row * width + x, len: length.min(width - x) }
            })
            .collect();
        let taps = layout.offsets.len();
        let blocks = self.shape.c_out.div_ceil(mr);
        // Tasks of whole tiles, a few per thread and small enough that a task's input stays in
        // the core's cache while every block of output channels passes over it.
        let tiles = all_runs.len().div_ceil(runs);
        let threads = rayon::current_num_threads().max(1);
        let tiles_per_task = tiles.div_ceil(threads * 8).clamp(1, 64);
        // A tile's input (its runs' windows through every input channel) stays in the first-level
        // cache while the blocks of output channels pass over it, their weights read in order
        // from the second level: as many blocks at a time as keep those weights there.
        let blocks_per_group = (WEIGHTS_IN_CACHE / (taps * mr * 4)).clamp(1, blocks);
        let target = SyncPtr(output.as_mut_ptr());
        // A 1x1 convolution reads a tile's pixels in every input plane, and planes whose size is
        // a multiple of 4 KiB put those strips in the same few cache sets: with hundreds of input
        // channels they evict each other before the next block of output channels reads them
        // again. Such tiles are gathered side by side first (measured with YOLOv8s at 512: the
        // 384- to 768-channel 1x1 layers at 32x32 and 64x64 ran 1.3 to 1.6 times faster; with
        // fewer channels or smaller planes the copy cost more than it saved).
        let gather = self.shape.kernel == 1 && self.shape.c_in >= 384 && (plane * 4) % 4096 == 0;
        let gathered_offsets: Vec<usize> =
            if gather { (0..taps).map(|c| c * runs * length).collect() } else { Vec::new() };
        all_runs.par_chunks(tiles_per_task * runs).for_each(|task| {
            let target = &target;
            let mut panel = if gather { PANEL.take() } else { Vec::new() };
            let mut gathered = [Run { source: 0, target: 0, len: 0 }; 3];
            for group in (0..blocks).step_by(blocks_per_group) {
                for tile in task.chunks(runs) {
                    let (source, offsets, tile) = if gather {
                        panel.resize(taps * runs * length, 0.0);
                        for (strip, &offset) in panel.chunks_exact_mut(runs * length).zip(&layout.offsets) {
                            for (j, run) in tile.iter().enumerate() {
                                copy_run(&source[offset + run.source..], &mut strip[j * length..], run.len);
                            }
                        }
                        for (j, run) in tile.iter().enumerate() {
                            gathered[j] = Run { source: j * length, ..*run };
                        }
                        (&panel[..], &gathered_offsets[..], &gathered[..tile.len()])
                    } else {
                        (source, &layout.offsets[..], tile)
                    };
                    for block in group..(group + blocks_per_group).min(blocks) {
                        let weights = &self.packed[block * taps * mr..(block + 1) * taps * mr];
                        let channels = mr.min(self.shape.c_out - block * mr);
                        let epilogue = Epilogue {
                            bias: &self.bias[block * mr..block * mr + channels],
                            silu: self.silu,
                            residual: residual.map(|r| &r[block * mr * plane..]),
                            plane,
                        };
                        // SAFETY: tiles of different tasks cover disjoint runs of every plane, and
                        // this block's planes lie inside `output` (checked in `run`).
                        let target = unsafe { target.0.add(block * mr * plane) };
                        unsafe { tile_for(kernel, source, offsets, weights, tile, channels, &epilogue, target) };
                    }
                }
            }
            if gather {
                PANEL.set(panel);
            }
        });
    }
}

/// Copies `len` values; whole vectors of 8 or 16 as fixed-size moves, not calls to `memcpy`.
#[inline(always)]
fn copy_run(from: &[f32], to: &mut [f32], len: usize) {
    match len {
        16 => to[..16].copy_from_slice(&from[..16]),
        8 => to[..8].copy_from_slice(&from[..8]),
        _ => to[..len].copy_from_slice(&from[..len]),
    }
}

/// Bytes of weights a pass over a tile keeps at hand: a quarter of a server core's second-level
/// cache, whose rest holds the input.
const WEIGHTS_IN_CACHE: usize = 256 * 1024;

/// One run of output pixels: where its first pixel's window starts in the source, where it goes
/// in an output plane, and how many pixels it has.
#[derive(Debug, Clone, Copy)]
pub(super) struct Run {
    pub(super) source: usize,
    pub(super) target: usize,
    pub(super) len: usize,
}

pub(super) struct SyncPtr(pub(super) *mut f32);
// SAFETY: shared only to write disjoint runs (see `convolve`).
unsafe impl Sync for SyncPtr {}

/// What happens to a tile's sums before they are stored.
pub(super) struct Epilogue<'a> {
    pub(super) bias: &'a [f32],
    pub(super) silu: bool,
    /// From the block's first channel on.
    pub(super) residual: Option<&'a [f32]>,
    pub(super) plane: usize,
}

thread_local! {
    /// The padded copy of the last 3x3 convolution's input on this thread, kept so that megabytes
    /// are not allocated and faulted in for every layer.
    static FRAME: std::cell::RefCell<Vec<f32>> = const { std::cell::RefCell::new(Vec::new()) };
    /// The gathered input strips of the 1x1 convolution tile this thread is computing.
    static PANEL: std::cell::RefCell<Vec<f32>> = const { std::cell::RefCell::new(Vec::new()) };
}

/// Where the kernel reads: the source offset of each (input channel, tap), and how an output
/// pixel maps to its window's first element.
struct Layout {
    offsets: Vec<usize>,
    /// Source elements per row and rows per output row (the stride).
    row: usize,
    stride: usize,
}

impl Layout {
    /// For a 1x1 convolution the input is read as it is; for a 3x3 one it is copied into `frame`
    /// with a border of zeros, and for stride 2 each padded row is stored as its even columns,
    /// then its odd ones, so that the three taps of a row read consecutive pixels.
    fn prepare(s: ConvShape, input: &[f32], (h, w): (usize, usize), frame: &mut Vec<f32>) -> Layout {
        if s.kernel == 1 {
            return Layout { offsets: (0..s.c_in).map(|c| c * h * w).collect(), row: 0, stride: 1 };
        }
        let (ph, pw) = (h + 2, w + 2);
        let padded_plane = ph * pw;
        // Every element is written below: the border as zeros, the inside from the input.
        frame.resize(s.c_in * padded_plane, 0.0);
        let even = pw.div_ceil(2);
        frame.par_chunks_mut(padded_plane).zip(input.par_chunks(h * w)).for_each(|(padded, plane)| {
            padded[..pw].fill(0.0);
            padded[(ph - 1) * pw..].fill(0.0);
            for y in 0..h {
                let row = &mut padded[(y + 1) * pw..(y + 2) * pw];
                let line = &plane[y * w..(y + 1) * w];
                if s.stride == 1 {
                    row[0] = 0.0;
                    row[1..=w].copy_from_slice(line);
                    row[w + 1] = 0.0;
                } else {
                    // Padded column c is input column c - 1, and goes to evens[c / 2] or
                    // odds[c / 2]: input columns 2j and 2j + 1 to odds[j] and evens[j + 1].
                    let (evens, odds) = row.split_at_mut(even);
                    evens[0] = 0.0;
                    let pairs = line.chunks_exact(2);
                    if let [last] = pairs.remainder() {
                        odds[w / 2] = *last;
                    }
                    for ((pair, odd), even) in pairs.zip(odds.iter_mut()).zip(evens[1..].iter_mut()) {
                        *odd = pair[0];
                        *even = pair[1];
                    }
                    let last = w + 1;
                    if last % 2 == 0 { evens[last / 2] = 0.0 } else { odds[last / 2] = 0.0 }
                }
            }
        });
        let column = |kx: usize| if s.stride == 1 { kx } else { [0, even, 1][kx] };
        let offsets = (0..s.c_in)
            .flat_map(|c| (0..3).flat_map(move |ky| (0..3).map(move |kx| (c, ky, kx))))
            .map(|(c, ky, kx)| c * padded_plane + ky * pw + column(kx))
            .collect();
        Layout { offsets, row: pw, stride: s.stride }
    }

    /// The source index of the window of output pixel (`row`, `x`) (for a 1x1 convolution,
    /// `row` is 0 and `x` the pixel's index in its plane).
    fn origin(&self, row: usize, x: usize) -> usize {
        row * self.stride * self.row + x
    }
}

/// Runs one tile on `kernel`.
///
/// # Safety
/// Every run's source window plus the largest offset must lie in `source`, and `target` must be
/// valid for writes of `channels` planes of `epilogue.plane` at each run's target.
#[allow(clippy::too_many_arguments)]
pub(super) unsafe fn tile_for(
    kernel: Kernel,
    source: &[f32],
    offsets: &[usize],
    weights: &[f32],
    tile: &[Run],
    channels: usize,
    epilogue: &Epilogue,
    target: *mut f32,
) {
    match kernel {
        #[cfg(target_arch = "x86_64")]
        // SAFETY: `Kernel::detected` chose this kernel only where the CPU has the features.
        Kernel::Avx512 => unsafe { x86::tile_avx512(source, offsets, weights, tile, channels, epilogue, target) },
        #[cfg(target_arch = "x86_64")]
        Kernel::Avx2 => unsafe { x86::tile_avx2(source, offsets, weights, tile, channels, epilogue, target) },
        _ => unsafe { tile_portable(source, offsets, weights, tile, channels, epilogue, target) },
    }
}

/// The portable kernel: 4 channels by 2 runs of 8, in plain loops the compiler vectorises for
/// whatever it targets.
unsafe fn tile_portable(
    source: &[f32],
    offsets: &[usize],
    weights: &[f32],
    tile: &[Run],
    channels: usize,
    epilogue: &Epilogue,
    target: *mut f32,
) {
    const MR: usize = 4;
    const L: usize = 8;
    let mut sums = [[[0f32; L]; 2]; MR];
    let mut window = [[0f32; L]; 2];
    for (tap, &offset) in offsets.iter().enumerate() {
        for (j, run) in tile.iter().enumerate() {
            let start = run.source + offset;
            window[j][..run.len].copy_from_slice(&source[start..start + run.len]);
        }
        let w = &weights[tap * MR..tap * MR + MR];
        // A multiply and an add, not `mul_add`: without FMA in the target that is a libm call
        // per element.
        for i in 0..MR {
            for j in 0..2 {
                for l in 0..L {
                    sums[i][j][l] += w[i] * window[j][l];
                }
            }
        }
    }
    for (i, sums) in sums.iter().enumerate().take(channels) {
        for (j, run) in tile.iter().enumerate() {
            for (l, &sum) in sums[j].iter().enumerate().take(run.len) {
                let mut v = sum + epilogue.bias[i];
                if epilogue.silu {
                    v /= 1.0 + fast_exp(-v);
                }
                let at = i * epilogue.plane + run.target + l;
                if let Some(residual) = epilogue.residual {
                    v += residual[at];
                }
                // SAFETY: inside the planes the caller vouched for.
                unsafe { *target.add(at) = v };
            }
        }
    }
}

#[cfg(target_arch = "x86_64")]
pub(super) mod x86 {
    use std::arch::x86_64::*;

    use super::{Epilogue, Run};

    /// e^x for 16 lanes, as [`super::fast_exp`] computes it, with the power of two by `scalef`.
    #[inline]
    #[target_feature(enable = "avx512f")]
    pub(crate) fn exp_avx512(x: __m512) -> __m512 {
        let x = _mm512_max_ps(_mm512_min_ps(x, _mm512_set1_ps(88.0)), _mm512_set1_ps(-87.0));
        let n = _mm512_roundscale_ps::<{ _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC }>(_mm512_mul_ps(
            x,
            _mm512_set1_ps(std::f32::consts::LOG2_E),
        ));
        let r = _mm512_fnmadd_ps(n, _mm512_set1_ps(0.693_145_75), x);
        let r = _mm512_fnmadd_ps(n, _mm512_set1_ps(1.428_606_8e-6), r);
        let mut p = _mm512_set1_ps(1.0 / 720.0);
        for c in [1.0 / 120.0, 1.0 / 24.0, 1.0 / 6.0, 0.5, 1.0, 1.0] {
            p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(c));
        }
        _mm512_scalef_ps(p, n)
    }

    /// 1 / d for d >= 1 (SiLU's denominator): the 14-bit estimate and one Newton step, for a
    /// division takes ten times the cycles and the epilogue of a small convolution is mostly SiLU.
    #[inline]
    #[target_feature(enable = "avx512f")]
    pub(crate) fn reciprocal_avx512(d: __m512) -> __m512 {
        let r = _mm512_rcp14_ps(d);
        _mm512_mul_ps(r, _mm512_fnmadd_ps(d, r, _mm512_set1_ps(2.0)))
    }

    /// 8 channels by 3 runs of 16 pixels: 24 sums in registers, 3 loads and 8 broadcasts per tap.
    ///
    /// # Safety
    /// AVX-512F present; the bounds [`super::tile_for`] states.
    #[target_feature(enable = "avx512f")]
    pub(super) unsafe fn tile_avx512(
        source: &[f32],
        offsets: &[usize],
        weights: &[f32],
        tile: &[Run],
        channels: usize,
        epilogue: &Epilogue,
        target: *mut f32,
    ) {
        const MR: usize = 8;
        let mut sums = [[_mm512_setzero_ps(); 3]; MR];
        let mut masks = [0 as __mmask16; 3];
        let mut starts = [source.as_ptr(); 3];
        for (j, run) in tile.iter().enumerate() {
            masks[j] = ((1u32 << run.len) - 1) as __mmask16;
            // SAFETY: inside `source` (the caller's bound).
            starts[j] = unsafe { source.as_ptr().add(run.source) };
        }
        let w = weights.as_ptr();
        let whole = masks == [0xFFFF; 3];
        // Masked loads take an ALU slot the multiplies need: only tiles at a row's end use them.
        macro_rules! accumulate {
            ($load:expr) => {
                for (tap, &offset) in offsets.iter().enumerate() {
                    let x = [$load(0, offset), $load(1, offset), $load(2, offset)];
                    for (i, sums) in sums.iter_mut().enumerate() {
                        // SAFETY: `weights` holds MR per tap.
                        let b = _mm512_set1_ps(unsafe { *w.add(tap * MR + i) });
                        sums[0] = _mm512_fmadd_ps(x[0], b, sums[0]);
                        sums[1] = _mm512_fmadd_ps(x[1], b, sums[1]);
                        sums[2] = _mm512_fmadd_ps(x[2], b, sums[2]);
                    }
                }
            };
        }
        if whole {
            // SAFETY: sixteen pixels of each run are inside `source`.
            accumulate!(|j: usize, offset: usize| unsafe { _mm512_loadu_ps(starts[j].add(offset)) });
        } else {
            // SAFETY: masked lanes are not read; the rest are inside `source`.
            accumulate!(|j: usize, offset: usize| unsafe { _mm512_maskz_loadu_ps(masks[j], starts[j].add(offset)) });
        }
        let one = _mm512_set1_ps(1.0);
        for (i, sums) in sums.iter().enumerate().take(channels) {
            let bias = _mm512_set1_ps(epilogue.bias[i]);
            for (j, run) in tile.iter().enumerate() {
                let mut v = _mm512_add_ps(sums[j], bias);
                if epilogue.silu {
                    v = _mm512_mul_ps(
                        v,
                        reciprocal_avx512(_mm512_add_ps(one, exp_avx512(_mm512_sub_ps(_mm512_setzero_ps(), v)))),
                    );
                }
                let at = i * epilogue.plane + run.target;
                if let Some(residual) = epilogue.residual {
                    // SAFETY: the residual has the output's size.
                    v = _mm512_add_ps(v, unsafe { _mm512_maskz_loadu_ps(masks[j], residual.as_ptr().add(at)) });
                }
                // SAFETY: inside the planes the caller vouched for.
                unsafe { _mm512_mask_storeu_ps(target.add(at), masks[j], v) };
            }
        }
    }

    /// e^x for 8 lanes, as [`super::fast_exp`] computes it.
    #[inline]
    #[target_feature(enable = "avx2,fma")]
    pub(crate) fn exp_avx2(x: __m256) -> __m256 {
        let x = _mm256_max_ps(_mm256_min_ps(x, _mm256_set1_ps(88.0)), _mm256_set1_ps(-87.0));
        let n = _mm256_round_ps::<{ _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC }>(_mm256_mul_ps(
            x,
            _mm256_set1_ps(std::f32::consts::LOG2_E),
        ));
        let r = _mm256_fnmadd_ps(n, _mm256_set1_ps(0.693_145_75), x);
        let r = _mm256_fnmadd_ps(n, _mm256_set1_ps(1.428_606_8e-6), r);
        let mut p = _mm256_set1_ps(1.0 / 720.0);
        for c in [1.0 / 120.0, 1.0 / 24.0, 1.0 / 6.0, 0.5, 1.0, 1.0] {
            p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(c));
        }
        let power = _mm256_slli_epi32::<23>(_mm256_add_epi32(_mm256_cvtps_epi32(n), _mm256_set1_epi32(127)));
        _mm256_mul_ps(p, _mm256_castsi256_ps(power))
    }

    /// 1 / d for d >= 1, as [`reciprocal_avx512`] computes it from a 12-bit estimate: two
    /// Newton steps.
    #[inline]
    #[target_feature(enable = "avx2,fma")]
    pub(crate) fn reciprocal_avx2(d: __m256) -> __m256 {
        let two = _mm256_set1_ps(2.0);
        let r = _mm256_rcp_ps(d);
        let r = _mm256_mul_ps(r, _mm256_fnmadd_ps(d, r, two));
        _mm256_mul_ps(r, _mm256_fnmadd_ps(d, r, two))
    }

    /// Lanes `..len` of 8 set, as `maskload` and `maskstore` read a mask.
    #[inline]
    #[target_feature(enable = "avx2")]
    pub(crate) fn lanes(len: usize) -> __m256i {
        _mm256_cmpgt_epi32(_mm256_set1_epi32(len as i32), _mm256_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7))
    }

    /// The inner loop of [`tile_avx2`] for whole runs, written out: its 12 sums, 3 windows and
    /// one broadcast weight take all 16 registers, and the compiler, given the loop in
    /// intrinsics, kept one sum on the stack, so that every tap waited on a store and a load of
    /// it (the AVX2 forward ran at two thirds of its speed).
    ///
    /// # Safety
    /// AVX2 and FMA present; `offsets` not empty; eight floats at `starts[j] + offset` for every
    /// run and offset; four weights per offset at `weights`.
    #[target_feature(enable = "avx2,fma")]
    unsafe fn accumulate_whole_avx2(
        sums: &mut [[__m256; 3]; 4],
        starts: [*const f32; 3],
        offsets: &[usize],
        weights: *const f32,
    ) {
        let [[a00, a01, a02], [a10, a11, a12], [a20, a21, a22], [a30, a31, a32]] = sums;
        // SAFETY: the caller's bounds; the loop reads nothing else and writes only registers.
        unsafe {
            std::arch::asm!(
                "2:",
                "mov {o}, qword ptr [{offset}]",
                "vmovups {x0}, ymmword ptr [{s0} + 4*{o}]",
                "vmovups {x1}, ymmword ptr [{s1} + 4*{o}]",
                "vmovups {x2}, ymmword ptr [{s2} + 4*{o}]",
                "vbroadcastss {b}, dword ptr [{w}]",
                "vfmadd231ps {a00}, {x0}, {b}",
                "vfmadd231ps {a01}, {x1}, {b}",
                "vfmadd231ps {a02}, {x2}, {b}",
                "vbroadcastss {b}, dword ptr [{w} + 4]",
                "vfmadd231ps {a10}, {x0}, {b}",
                "vfmadd231ps {a11}, {x1}, {b}",
                "vfmadd231ps {a12}, {x2}, {b}",
                "vbroadcastss {b}, dword ptr [{w} + 8]",
                "vfmadd231ps {a20}, {x0}, {b}",
                "vfmadd231ps {a21}, {x1}, {b}",
                "vfmadd231ps {a22}, {x2}, {b}",
                "vbroadcastss {b}, dword ptr [{w} + 12]",
                "vfmadd231ps {a30}, {x0}, {b}",
                "vfmadd231ps {a31}, {x1}, {b}",
                "vfmadd231ps {a32}, {x2}, {b}",
                "add {offset}, 8",
                "add {w}, 16",
                "cmp {offset}, {end}",
                "jne 2b",
                offset = inout(reg) offsets.as_ptr() => _,
                end = in(reg) offsets.as_ptr().add(offsets.len()),
                w = inout(reg) weights => _,
                s0 = in(reg) starts[0],
                s1 = in(reg) starts[1],
                s2 = in(reg) starts[2],
                o = out(reg) _,
                x0 = out(ymm_reg) _,
                x1 = out(ymm_reg) _,
                x2 = out(ymm_reg) _,
                b = out(ymm_reg) _,
                a00 = inout(ymm_reg) *a00,
                a01 = inout(ymm_reg) *a01,
                a02 = inout(ymm_reg) *a02,
                a10 = inout(ymm_reg) *a10,
                a11 = inout(ymm_reg) *a11,
                a12 = inout(ymm_reg) *a12,
                a20 = inout(ymm_reg) *a20,
                a21 = inout(ymm_reg) *a21,
                a22 = inout(ymm_reg) *a22,
                a30 = inout(ymm_reg) *a30,
                a31 = inout(ymm_reg) *a31,
                a32 = inout(ymm_reg) *a32,
                options(nostack, readonly),
            );
        }
    }

    /// 4 channels by 3 runs of 8 pixels: 12 sums in registers, 3 loads and 4 broadcasts per tap.
    ///
    /// # Safety
    /// AVX2 and FMA present; the bounds [`super::tile_for`] states.
    #[target_feature(enable = "avx2,fma")]
    pub(super) unsafe fn tile_avx2(
        source: &[f32],
        offsets: &[usize],
        weights: &[f32],
        tile: &[Run],
        channels: usize,
        epilogue: &Epilogue,
        target: *mut f32,
    ) {
        const MR: usize = 4;
        let mut sums = [[_mm256_setzero_ps(); 3]; MR];
        let mut masks = [_mm256_setzero_si256(); 3];
        let mut starts = [source.as_ptr(); 3];
        let mut whole = tile.len() == 3;
        for (j, run) in tile.iter().enumerate() {
            masks[j] = lanes(run.len);
            whole &= run.len == 8;
            // SAFETY: inside `source` (the caller's bound).
            starts[j] = unsafe { source.as_ptr().add(run.source) };
        }
        let w = weights.as_ptr();
        // Masked loads cost more than plain ones on AVX2: only tiles at a row's end use them.
        macro_rules! accumulate {
            ($load:expr) => {
                for (tap, &offset) in offsets.iter().enumerate() {
                    let x = [$load(0, offset), $load(1, offset), $load(2, offset)];
                    for (i, sums) in sums.iter_mut().enumerate() {
                        // SAFETY: `weights` holds MR per tap.
                        let b = _mm256_set1_ps(unsafe { *w.add(tap * MR + i) });
                        sums[0] = _mm256_fmadd_ps(x[0], b, sums[0]);
                        sums[1] = _mm256_fmadd_ps(x[1], b, sums[1]);
                        sums[2] = _mm256_fmadd_ps(x[2], b, sums[2]);
                    }
                }
            };
        }
        if whole && !offsets.is_empty() {
            // SAFETY: eight pixels of each run are inside `source` at every offset; `weights`
            // holds MR per offset.
            unsafe { accumulate_whole_avx2(&mut sums, starts, offsets, w) };
        } else {
            // SAFETY: masked lanes are not read; the rest are inside `source`.
            accumulate!(|j: usize, offset: usize| unsafe { _mm256_maskload_ps(starts[j].add(offset), masks[j]) });
        }
        let one = _mm256_set1_ps(1.0);
        for (i, sums) in sums.iter().enumerate().take(channels) {
            let bias = _mm256_set1_ps(epilogue.bias[i]);
            for (j, run) in tile.iter().enumerate() {
                let mut v = _mm256_add_ps(sums[j], bias);
                if epilogue.silu {
                    v = _mm256_mul_ps(
                        v,
                        reciprocal_avx2(_mm256_add_ps(one, exp_avx2(_mm256_sub_ps(_mm256_setzero_ps(), v)))),
                    );
                }
                let at = i * epilogue.plane + run.target;
                if let Some(residual) = epilogue.residual {
                    // SAFETY: the residual has the output's size.
                    v = _mm256_add_ps(v, unsafe { _mm256_maskload_ps(residual.as_ptr().add(at), masks[j]) });
                }
                // SAFETY: inside the planes the caller vouched for.
                unsafe { _mm256_maskstore_ps(target.add(at), masks[j], v) };
            }
        }
    }
}

/// e^x to about 2 ulp, branch-free so the SiLU loop vectorises: Cody-Waite range reduction to
/// [-ln2/2, ln2/2], a degree-6 Taylor polynomial, and 2^n through the exponent bits. Rounding
/// uses the 1.5 * 2^23 trick, since `f32::round` is a libm call without SSE4.1.
#[inline(always)]
pub fn fast_exp(x: f32) -> f32 {
    const ROUNDER: f32 = 12_582_912.0;
    let x = x.clamp(-87.0, 88.0);
    let n = (x * std::f32::consts::LOG2_E + ROUNDER) - ROUNDER;
    let r = x - n * 0.693_145_75 - n * 1.428_606_8e-6;
    let p = 1.0 + r * (1.0 + r * (0.5 + r * (1.0 / 6.0 + r * (1.0 / 24.0 + r * (1.0 / 120.0 + r * (1.0 / 720.0))))));
    p * f32::from_bits(((n as i32 + 127) as u32) << 23)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn fast_exp_is_accurate() {
        let mut x = -80.0f32;
        while x < 80.0 {
            let (got, want) = (fast_exp(x), x.exp());
            assert!(((got - want) / want).abs() < 1e-6, "exp({x}) = {got}, not {want}");
            x += 0.037;
        }
    }

    /// Convolution by its definition, in f64.
    fn reference(s: ConvShape, input: &[f32], (h, w): (usize, usize), weight: &[f32], bias: &[f32]) -> Vec<f64> {
        let (oh, ow) = s.output_size(h, w);
        let p = s.padding() as isize;
        let mut out = vec![0f64; s.c_out * oh * ow];
        for co in 0..s.c_out {
            for oy in 0..oh {
                for ox in 0..ow {
                    let mut sum = f64::from(bias[co]);
                    for ci in 0..s.c_in {
                        for ky in 0..s.kernel {
                            for kx in 0..s.kernel {
                                let iy = (oy * s.stride + ky) as isize - p;
                                let ix = (ox * s.stride + kx) as isize - p;
                                if iy < 0 || ix < 0 || iy >= h as isize || ix >= w as isize {
                                    continue;
                                }
                                let x = input[(ci * h + iy as usize) * w + ix as usize];
                                let k = weight[((co * s.c_in + ci) * s.kernel + ky) * s.kernel + kx];
                                sum += f64::from(x) * f64::from(k);
                            }
                        }
                    }
                    out[(co * oh + oy) * ow + ox] = sum;
                }
            }
        }
        out
    }

    /// Every kernel this CPU runs, against the definition, on the shapes YOLOv8 uses and on
    /// sizes that leave partial runs and partial channel blocks (odd widths, 5 channels, rows
    /// narrower than a run), with and without SiLU and residual.
    #[test]
    fn every_kernel_matches_the_definition() {
        let mut kernels = vec![Kernel::Portable];
        if matches!(Kernel::best_supported(), Kernel::Avx2 | Kernel::Avx512) {
            kernels.push(Kernel::Avx2);
        }
        if Kernel::best_supported() == Kernel::Avx512 {
            kernels.push(Kernel::Avx512);
        }
        let mut seed = 7u64;
        let mut random = move |n: usize, scale: f32| -> Vec<f32> {
            (0..n)
                .map(|_| {
                    seed = seed.wrapping_mul(6_364_136_223_846_793_005).wrapping_add(1_442_695_040_888_963_407);
                    ((seed >> 40) as f32 / (1u64 << 24) as f32 - 0.5) * scale
                })
                .collect()
        };
        for &(c_in, c_out, kernel, stride, h, w) in &[
            (3, 16, 3, 2, 32, 32),
            (8, 8, 3, 1, 9, 7),
            (16, 5, 1, 1, 5, 6),
            (4, 6, 3, 2, 8, 8),
            (5, 12, 3, 2, 11, 13),
            (24, 20, 3, 1, 20, 37),
            // Even sizes with enough tiles go through F(2x2, 3x3): tile rows narrower and wider
            // than a lane array, groups that end inside a row, a partial block of channels.
            (32, 64, 3, 1, 34, 50),
            (64, 33, 3, 1, 32, 48),
            (128, 64, 3, 1, 16, 16),
            (32, 9, 1, 1, 16, 16),
            // Enough input channels, on a 4 KiB plane, for the 1x1 tiles to be gathered first.
            (384, 9, 1, 1, 32, 32),
        ] {
            let s = ConvShape { c_in, c_out, kernel, stride };
            let input = random(c_in * h * w, 2.0);
            let weight = random(c_out * c_in * kernel * kernel, 0.6);
            let bias = random(c_out, 0.2);
            let (oh, ow) = s.output_size(h, w);
            let residual = random(c_out * oh * ow, 1.0);
            let expected = reference(s, &input, (h, w), &weight, &bias);
            for &k in &kernels {
                for (silu, add) in [(false, false), (true, false), (true, true)] {
                    let conv = PackedConv::for_kernel(k, s, &weight, &bias, silu).unwrap();
                    let mut out = vec![f32::NAN; c_out * oh * ow];
                    conv.run(&input, (h, w), &mut out, add.then_some(&residual[..])).unwrap();
                    for (n, (&got, &sum)) in out.iter().zip(&expected).enumerate() {
                        let mut want = sum;
                        if silu {
                            want /= 1.0 + (-want).exp();
                        }
                        if add {
                            want += f64::from(residual[n]);
                        }
                        assert!(
                            (f64::from(got) - want).abs() < 1e-4 * (1.0 + want.abs()),
                            "{k:?} {s:?} {h}x{w} silu {silu} residual {add}: element {n} is {got}, not {want}"
                        );
                    }
                }
            }
        }
    }

    /// The shapes above meant for F(2x2, 3x3) do go through it, and the others do not.
    #[test]
    fn winograd_takes_the_wide_even_3x3_convolutions() {
        let takes = |c_in: usize, c_out: usize, stride: usize, (h, w): (usize, usize)| {
            let s = ConvShape { c_in, c_out, kernel: 3, stride };
            let conv =
                PackedConv::for_kernel(Kernel::Portable, s, &vec![0.0; c_out * c_in * 9], &vec![0.0; c_out], true)
                    .unwrap();
            conv.winograd.as_ref().is_some_and(|winograd| winograd.applies((h, w)))
        };
        assert!(takes(32, 64, 1, (34, 50)) && takes(64, 33, 1, (32, 48)) && takes(128, 64, 1, (16, 16)));
        // Odd width, stride 2, too few channels, too few tiles for the channels, too few tiles.
        assert!(!takes(32, 64, 1, (34, 49)) && !takes(32, 64, 2, (34, 50)));
        assert!(!takes(16, 16, 1, (128, 128)) && !takes(32, 32, 1, (64, 64)));
        assert!(!takes(64, 64, 1, (16, 16)) && !takes(128, 128, 1, (8, 8)));
    }

    #[test]
    fn wrong_sizes_and_shapes_are_refused() {
        let s = ConvShape { c_in: 2, c_out: 3, kernel: 3, stride: 1 };
        assert!(matches!(
            PackedConv::new(ConvShape { kernel: 5, ..s }, &[0.0; 150], &[0.0; 3], true),
            Err(ConvError::Unsupported { kernel: 5, stride: 1 })
        ));
        assert!(PackedConv::new(s, &[0.0; 53], &[0.0; 3], true).is_err());
        let conv = PackedConv::new(s, &[0.0; 54], &[0.0; 3], true).unwrap();
        let mut out = vec![0.0; 3 * 16];
        assert!(conv.run(&[0.0; 31], (4, 4), &mut out, None).is_err());
        assert!(conv.run(&[0.0; 32], (4, 4), &mut out, None).is_ok());
    }
}
