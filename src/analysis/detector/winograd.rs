//! 3x3 stride-1 convolutions by Winograd's minimal filtering F(2x2, 3x3) (Lavin and Gray, 2015):
//! each 2x2 block of output pixels comes from 16 products per input channel instead of 36.
//!
//! Why: most of YOLOv8-seg's multiplies are in 3x3 stride-1 convolutions (the bottlenecks, the
//! head's branches, the mask prototypes at a quarter of the input's size), and the direct kernel
//! already runs them at about three quarters of what the cores' multipliers allow; fewer
//! multiplies is what is left.
//! F(2x2, 3x3) is the variant whose transforms only add, subtract and halve, so its rounding stays
//! that of a differently ordered sum.
//!
//! The plan per group of tiles, kept in the second-level cache: the input windows (4x4 pixels of
//! each input channel, read from the zero-padded frame in its even/odd column layout, so that 16
//! neighbouring tiles' columns are consecutive) are transformed into 16 planes of channels by
//! tiles; each of the 16 is multiplied by its transformed weights with the direct kernel's 1x1
//! path (a plain matrix product); the 16 product planes are transformed back into 2x2 output
//! blocks, where bias, SiLU and the residual are applied as the direct kernel does.

use rayon::prelude::*;

use super::cpu_conv::{Epilogue, Kernel, Run, SyncPtr, fast_exp, pack_weights, tile_for};

/// Tiles transformed together in one lane array: one AVX-512 vector, two AVX2 ones.
const LANES: usize = 16;
type Lanes = [f32; LANES];

/// Elements between the starts of two transformed taps' planes beyond their `channels x group`:
/// without it a plane of a multiple of 4 KiB put the 16 values of one tile in the same few cache
/// sets, where they evicted each other (the transforms ran twice as slow).
const TAP_PADDING: usize = 16;

/// Elements from one transformed tap's planes to the next.
fn tap_stride(channels: usize, group: usize) -> usize {
    channels * group + TAP_PADDING
}

/// Bytes of transformed input and products a group of tiles keeps in the second-level cache.
const GROUP_BYTES: usize = 1 << 20;

/// The weights of one 3x3 stride-1 convolution, transformed (G g Gᵀ) and packed per transformed
/// tap as the direct kernel packs a 1x1 convolution.
#[derive(Debug, Clone)]
pub(super) struct WinogradWeights {
    c_in: usize,
    c_out: usize,
    /// 16 matrices of `c_out x c_in`, each packed by [`pack_weights`].
    packed: Vec<Vec<f32>>,
    zeros: Vec<f32>,
}

impl WinogradWeights {
    /// `weight`: `(c_out, c_in, 3, 3)` row-major.
    pub(super) fn new(kernel: Kernel, c_in: usize, c_out: usize, weight: &[f32]) -> WinogradWeights {
        let mut transformed = vec![vec![0f32; c_out * c_in]; 16];
        for co in 0..c_out {
            for ci in 0..c_in {
                let g = &weight[(co * c_in + ci) * 9..][..9];
                // G g, G = [[1, 0, 0], [1/2, 1/2, 1/2], [1/2, -1/2, 1/2], [0, 0, 1]]: 4 x 3.
                let mut gg = [[0f32; 3]; 4];
                for c in 0..3 {
                    let (a, b, d) = (g[c], g[3 + c], g[6 + c]);
                    gg[0][c] = a;
                    gg[1][c] = 0.5 * (a + b + d);
                    gg[2][c] = 0.5 * (a - b + d);
                    gg[3][c] = d;
                }
                // (G g) Gᵀ: 4 x 4.
                for (r, row) in gg.iter().enumerate() {
                    let (a, b, d) = (row[0], row[1], row[2]);
                    let u = [a, 0.5 * (a + b + d), 0.5 * (a - b + d), d];
                    for (c, &value) in u.iter().enumerate() {
                        transformed[r * 4 + c][co * c_in + ci] = value;
                    }
                }
            }
        }
        let packed = transformed.iter().map(|matrix| pack_weights(kernel, c_out, c_in, matrix)).collect();
        WinogradWeights { c_in, c_out, packed, zeros: vec![0.0; kernel.channels()] }
    }

    /// Whether F(2x2, 3x3) is used for an `h x w` input: even sizes (every tile whole; YOLOv8's
    /// feature maps are multiples of 32 over 2^k), and enough channel pairs per tile, and tiles,
    /// for the transforms to pay. Measured layer by layer on YOLOv8n/s-seg at 512 (AVX-512, two
    /// threads): 32 -> 32 channels ran 10 to 20 % slower than directly on 16x16 and 64x64 maps,
    /// 64 -> 64 on a 16x16 map the same; 64 -> 32 and wider 0.6 to 0.9 of the direct time from
    /// 32x32 maps on, 128 -> 128 and wider also on 16x16 maps.
    pub(super) fn applies(&self, (h, w): (usize, usize)) -> bool {
        let (tiles, pairs) = ((h / 2) * (w / 2), self.c_in * self.c_out);
        h % 2 == 0 && w % 2 == 0 && pairs >= 2048 && (tiles >= 256 || (tiles >= 64 && pairs >= 8192)) && !disabled()
    }

    /// Convolves one image. `frame` is the input zero-padded by one pixel, each padded row stored
    /// as its even columns, then its odd ones (the direct kernel's stride-2 layout).
    #[allow(clippy::too_many_arguments)]
    pub(super) fn run(
        &self,
        kernel: Kernel,
        frame: &[f32],
        (h, w): (usize, usize),
        bias: &[f32],
        silu: bool,
        output: &mut [f32],
        residual: Option<&[f32]>,
    ) {
        let geometry = Geometry::new(h, w);
        let tiles = geometry.tiles_y * geometry.tiles_x;
        let step = kernel.runs() * kernel.run_length();
        // As many tiles as fit the cache, in whole kernel tiles, and enough groups for every thread.
        let fits = GROUP_BYTES / (16 * 4 * (self.c_in + self.c_out));
        let threads = rayon::current_num_threads().max(1);
        let group = (fits.min(tiles.div_ceil(4 * threads)) / step).max(1) * step;
        let target = SyncPtr(output.as_mut_ptr());
        let groups: Vec<usize> = (0..tiles).step_by(group).collect();
        groups.par_iter().for_each(|&first| {
            let count = group.min(tiles - first);
            let mut buffers = BUFFERS.take();
            let (transformed, products) = &mut buffers;
            // Grown, never shrunk: filling them again for every layer cost more than the layer.
            for (buffer, channels) in [(&mut *transformed, self.c_in), (&mut *products, self.c_out)] {
                if buffer.len() < 16 * tap_stride(channels, group) {
                    buffer.resize(16 * tap_stride(channels, group), 0.0);
                }
            }
            let target = &target;
            // SAFETY (both calls): `kernel` was chosen by `Kernel::detected` or the caller for
            // this CPU; the groups' tiles are disjoint, so are the output pixels they write.
            unsafe {
                transform_input(kernel, frame, &geometry, self.c_in, first, count, group, transformed);
                self.multiply(kernel, transformed, products, count, group);
                transform_output(
                    kernel,
                    products,
                    &geometry,
                    (self.c_out, first, count, group),
                    &Finish { bias, silu, residual },
                    target.0,
                );
            }
            BUFFERS.set(buffers);
        });
    }

    /// The 16 products of transformed weights and transformed input: each a 1x1 convolution of
    /// `c_in` planes of `group` tiles into `c_out` planes, on the direct kernel.
    fn multiply(&self, kernel: Kernel, transformed: &[f32], products: &mut [f32], count: usize, group: usize) {
        let (mr, length) = (kernel.channels(), kernel.run_length());
        let offsets: Vec<usize> = (0..self.c_in).map(|c| c * group).collect();
        let runs: Vec<Run> = (0..count.div_ceil(length))
            .map(|i| Run { source: i * length, target: i * length, len: length.min(count - i * length) })
            .collect();
        let epilogue = |block: usize| Epilogue {
            bias: &self.zeros[..mr.min(self.c_out - block * mr)],
            silu: false,
            residual: None,
            plane: group,
        };
        for (xi, weights) in self.packed.iter().enumerate() {
            let source = &transformed[xi * tap_stride(self.c_in, group)..][..self.c_in * group];
            let out = products[xi * tap_stride(self.c_out, group)..].as_mut_ptr();
            for block in 0..self.c_out.div_ceil(mr) {
                let weights = &weights[block * self.c_in * mr..(block + 1) * self.c_in * mr];
                let channels = mr.min(self.c_out - block * mr);
                for tile in runs.chunks(kernel.runs()) {
                    // SAFETY: runs lie inside each `group`-long plane of `source` and of the
                    // products, whose `c_out` planes per transformed tap were sized by the caller.
                    unsafe {
                        tile_for(
                            kernel,
                            source,
                            &offsets,
                            weights,
                            tile,
                            channels,
                            &epilogue(block),
                            out.add(block * mr * group),
                        )
                    };
                }
            }
        }
    }
}

/// `IDAICS_CPU_WINOGRAD=0` runs every 3x3 convolution directly (for timing the two against each
/// other and for tests). Read once.
fn disabled() -> bool {
    static DISABLED: std::sync::OnceLock<bool> = std::sync::OnceLock::new();
    *DISABLED.get_or_init(|| std::env::var("IDAICS_CPU_WINOGRAD").as_deref() == Ok("0"))
}

thread_local! {
    /// A group's transformed input and products on this thread, kept between layers.
    static BUFFERS: std::cell::RefCell<(Vec<f32>, Vec<f32>)> = const { std::cell::RefCell::new((Vec::new(), Vec::new())) };
}

/// Sizes of one image's tiles and its padded frame.
struct Geometry {
    h: usize,
    w: usize,
    tiles_y: usize,
    tiles_x: usize,
    /// Elements per padded row, and where its odd columns start.
    padded_row: usize,
    odd_start: usize,
}

impl Geometry {
    fn new(h: usize, w: usize) -> Geometry {
        let padded_row = w + 2;
        Geometry { h, w, tiles_y: h / 2, tiles_x: w / 2, padded_row, odd_start: padded_row.div_ceil(2) }
    }

    /// The tiles `first..first + count` as pieces of tile rows of at most [`LANES`] tiles:
    /// (tile row, first tile column, tiles, position in the group).
    fn pieces(&self, first: usize, count: usize) -> impl Iterator<Item = (usize, usize, usize, usize)> + '_ {
        let mut next = first;
        std::iter::from_fn(move || {
            if next >= first + count {
                return None;
            }
            let (ty, tx) = (next / self.tiles_x, next % self.tiles_x);
            let n = LANES.min(self.tiles_x - tx).min(first + count - next);
            let piece = (ty, tx, n, next - first);
            next += n;
            Some(piece)
        })
    }
}

#[inline(always)]
fn load(from: &[f32], n: usize) -> Lanes {
    let mut lanes = [0f32; LANES];
    if n == LANES {
        lanes.copy_from_slice(&from[..LANES]);
    } else {
        lanes[..n].copy_from_slice(&from[..n]);
    }
    lanes
}

#[inline(always)]
fn store(to: &mut [f32], lanes: &[f32], n: usize) {
    if n == LANES {
        to[..LANES].copy_from_slice(&lanes[..LANES]);
    } else {
        to[..n].copy_from_slice(&lanes[..n]);
    }
}

#[inline(always)]
fn add(a: &Lanes, b: &Lanes) -> Lanes {
    std::array::from_fn(|l| a[l] + b[l])
}

#[inline(always)]
fn sub(a: &Lanes, b: &Lanes) -> Lanes {
    std::array::from_fn(|l| a[l] - b[l])
}

/// Bᵀ x for four lane arrays, Bᵀ = [[1, 0, -1, 0], [0, 1, 1, 0], [0, -1, 1, 0], [0, 1, 0, -1]].
#[inline(always)]
fn input_step(x: [&Lanes; 4]) -> [Lanes; 4] {
    [sub(x[0], x[2]), add(x[1], x[2]), sub(x[2], x[1]), sub(x[1], x[3])]
}

/// Aᵀ x for four lane arrays, Aᵀ = [[1, 1, 1, 0], [0, 1, -1, -1]].
#[inline(always)]
fn output_step(x: [&Lanes; 4]) -> [Lanes; 2] {
    [add(&add(x[0], x[1]), x[2]), sub(&sub(x[1], x[2]), x[3])]
}

/// The input transform of tiles `first..first + count` for every input channel, into
/// `transformed[xi * tap_stride(c_in, group) + ci * group + position]`.
///
/// # Safety
/// `kernel` runs on this CPU.
#[allow(clippy::too_many_arguments)]
unsafe fn transform_input(
    kernel: Kernel,
    frame: &[f32],
    geometry: &Geometry,
    c_in: usize,
    first: usize,
    count: usize,
    group: usize,
    transformed: &mut [f32],
) {
    match kernel {
        #[cfg(target_arch = "x86_64")]
        // SAFETY: the caller's.
        Kernel::Avx512 => unsafe {
            x86::transform_input_avx512(frame, geometry, c_in, first, count, group, transformed)
        },
        #[cfg(target_arch = "x86_64")]
        Kernel::Avx2 => unsafe { x86::transform_input_avx2(frame, geometry, c_in, first, count, group, transformed) },
        _ => transform_input_generic(frame, geometry, c_in, first, count, group, transformed),
    }
}

#[inline(always)]
fn transform_input_generic(
    frame: &[f32],
    g: &Geometry,
    c_in: usize,
    first: usize,
    count: usize,
    group: usize,
    transformed: &mut [f32],
) {
    let padded_plane = (g.h + 2) * g.padded_row;
    for ci in 0..c_in {
        let plane = &frame[ci * padded_plane..(ci + 1) * padded_plane];
        for (ty, tx, n, at) in g.pieces(first, count) {
            // Tile (ty, tx) reads padded rows 2ty..2ty+4 and padded columns 2tx..2tx+4: even
            // column tx, odd tx, even tx + 1, odd tx + 1 of the split rows.
            let d: [[Lanes; 4]; 4] = std::array::from_fn(|r| {
                let row = &plane[(2 * ty + r) * g.padded_row..];
                let odd = &row[g.odd_start..];
                [load(&row[tx..], n), load(&odd[tx..], n), load(&row[tx + 1..], n), load(&odd[tx + 1..], n)]
            });
            let rows: [[Lanes; 4]; 4] = {
                let columns: [[Lanes; 4]; 4] =
                    std::array::from_fn(|c| input_step([&d[0][c], &d[1][c], &d[2][c], &d[3][c]]));
                // columns[c][r] = (Bᵀ d)[r][c]; now each row of that times B.
                std::array::from_fn(|r| input_step([&columns[0][r], &columns[1][r], &columns[2][r], &columns[3][r]]))
            };
            for (r, row) in rows.iter().enumerate() {
                for (c, lanes) in row.iter().enumerate() {
                    let xi = r * 4 + c;
                    store(&mut transformed[xi * tap_stride(c_in, group) + ci * group + at..], lanes, n);
                }
            }
        }
    }
}

/// What the output transform applies to each output pixel, as the direct kernel's epilogue does.
struct Finish<'a> {
    bias: &'a [f32],
    silu: bool,
    residual: Option<&'a [f32]>,
}

/// The output transform of tiles `first..first + count` for every output channel, from
/// `products[xi * tap_stride(c_out, group) + co * group + position]`, with bias, SiLU and the residual, into the
/// output planes at `target`.
///
/// # Safety
/// `kernel` runs on this CPU; `target` holds `c_out` planes of `h x w`, and no other thread
/// writes these tiles' pixels.
unsafe fn transform_output(
    kernel: Kernel,
    products: &[f32],
    geometry: &Geometry,
    tiles: (usize, usize, usize, usize),
    finish: &Finish,
    target: *mut f32,
) {
    match kernel {
        #[cfg(target_arch = "x86_64")]
        // SAFETY: the caller's.
        Kernel::Avx512 => unsafe { x86::transform_output_avx512(products, geometry, tiles, finish, target) },
        #[cfg(target_arch = "x86_64")]
        Kernel::Avx2 => unsafe { x86::transform_output_avx2(products, geometry, tiles, finish, target) },
        // SAFETY: the caller's.
        _ => unsafe { transform_output_generic(products, geometry, tiles, finish, target) },
    }
}

/// # Safety
/// As [`transform_output`].
#[inline(always)]
unsafe fn transform_output_generic(
    products: &[f32],
    g: &Geometry,
    (c_out, first, count, group): (usize, usize, usize, usize),
    finish: &Finish,
    target: *mut f32,
) {
    let plane = g.h * g.w;
    for co in 0..c_out {
        let bias = finish.bias[co];
        for (ty, tx, n, at) in g.pieces(first, count) {
            let m: [Lanes; 16] =
                std::array::from_fn(|xi| load(&products[xi * tap_stride(c_out, group) + co * group + at..], n));
            // Aᵀ m, column by column: s[c][a].
            let s: [[Lanes; 2]; 4] = std::array::from_fn(|c| output_step([&m[c], &m[4 + c], &m[8 + c], &m[12 + c]]));
            // Row `a` of Aᵀ m is spread over the four columns of `s`: indexed, not iterated.
            #[allow(clippy::needless_range_loop)]
            for a in 0..2 {
                let y = output_step([&s[0][a], &s[1][a], &s[2][a], &s[3][a]]);
                // Output row 2ty + a, columns 2tx.. : the tiles' left and right pixels in turn.
                let mut row = [0f32; 2 * LANES];
                for l in 0..LANES {
                    row[2 * l] = y[0][l] + bias;
                    row[2 * l + 1] = y[1][l] + bias;
                }
                if finish.silu {
                    for v in row.iter_mut() {
                        *v /= 1.0 + fast_exp(-*v);
                    }
                }
                let start = co * plane + (2 * ty + a) * g.w + 2 * tx;
                if let Some(residual) = finish.residual {
                    for (v, r) in row.iter_mut().zip(&residual[start..start + 2 * n]) {
                        *v += r;
                    }
                }
                // SAFETY: 2n pixels of this output row, inside the planes the caller vouched for.
                unsafe { std::ptr::copy_nonoverlapping(row.as_ptr(), target.add(start), 2 * n) };
            }
        }
    }
}

#[cfg(target_arch = "x86_64")]
mod x86 {
    //! The transforms in AVX-512 and in AVX2 (the generic version's arrays did not become vectors).

    use std::arch::x86_64::*;

    use super::{Finish, Geometry};
    use crate::analysis::detector::cpu_conv::x86::{exp_avx2, exp_avx512, lanes, reciprocal_avx2, reciprocal_avx512};

    /// # Safety
    /// AVX-512F present; `frame` and `transformed` as [`super::transform_input`] takes them.
    #[target_feature(enable = "avx512f")]
    pub(super) unsafe fn transform_input_avx512(
        frame: &[f32],
        g: &Geometry,
        c_in: usize,
        first: usize,
        count: usize,
        group: usize,
        transformed: &mut [f32],
    ) {
        let padded_plane = (g.h + 2) * g.padded_row;
        assert!(frame.len() >= c_in * padded_plane && transformed.len() >= 16 * super::tap_stride(c_in, group));
        let out = transformed.as_mut_ptr();
        for ci in 0..c_in {
            // SAFETY: plane `ci` of the frame (asserted above).
            let plane = unsafe { frame.as_ptr().add(ci * padded_plane) };
            for (ty, tx, n, at) in g.pieces(first, count) {
                let mask = ((1u32 << n) - 1) as __mmask16;
                // SAFETY: tiles tx..tx + n read even and odd columns tx..=tx + n of padded rows
                // 2ty..2ty + 4, all inside the plane (`Geometry`); masked lanes are not read.
                let d: [[__m512; 4]; 4] = std::array::from_fn(|r| unsafe {
                    let row = plane.add((2 * ty + r) * g.padded_row + tx);
                    let odd = row.add(g.odd_start);
                    [
                        _mm512_maskz_loadu_ps(mask, row),
                        _mm512_maskz_loadu_ps(mask, odd),
                        _mm512_maskz_loadu_ps(mask, row.add(1)),
                        _mm512_maskz_loadu_ps(mask, odd.add(1)),
                    ]
                });
                let mut t = [[_mm512_setzero_ps(); 4]; 4];
                for c in 0..4 {
                    t[0][c] = _mm512_sub_ps(d[0][c], d[2][c]);
                    t[1][c] = _mm512_add_ps(d[1][c], d[2][c]);
                    t[2][c] = _mm512_sub_ps(d[2][c], d[1][c]);
                    t[3][c] = _mm512_sub_ps(d[1][c], d[3][c]);
                }
                for (r, t) in t.iter().enumerate() {
                    let v = [
                        _mm512_sub_ps(t[0], t[2]),
                        _mm512_add_ps(t[1], t[2]),
                        _mm512_sub_ps(t[2], t[1]),
                        _mm512_sub_ps(t[1], t[3]),
                    ];
                    for (c, v) in v.into_iter().enumerate() {
                        // SAFETY: n positions of plane (xi, ci) of the group (asserted above).
                        unsafe {
                            _mm512_mask_storeu_ps(
                                out.add((r * 4 + c) * super::tap_stride(c_in, group) + ci * group + at),
                                mask,
                                v,
                            )
                        };
                    }
                }
            }
        }
    }

    /// # Safety
    /// AVX-512F present; as [`super::transform_output`].
    #[target_feature(enable = "avx512f")]
    pub(super) unsafe fn transform_output_avx512(
        products: &[f32],
        g: &Geometry,
        (c_out, first, count, group): (usize, usize, usize, usize),
        finish: &Finish,
        target: *mut f32,
    ) {
        assert!(products.len() >= 16 * super::tap_stride(c_out, group));
        let plane = g.h * g.w;
        let (low, high) = (
            _mm512_setr_epi32(0, 16, 1, 17, 2, 18, 3, 19, 4, 20, 5, 21, 6, 22, 7, 23),
            _mm512_setr_epi32(8, 24, 9, 25, 10, 26, 11, 27, 12, 28, 13, 29, 14, 30, 15, 31),
        );
        let one = _mm512_set1_ps(1.0);
        for co in 0..c_out {
            let bias = _mm512_set1_ps(finish.bias[co]);
            for (ty, tx, n, at) in g.pieces(first, count) {
                let mask = ((1u32 << n) - 1) as __mmask16;
                // SAFETY: n positions of each product plane (asserted above).
                let m: [__m512; 16] = std::array::from_fn(|xi| unsafe {
                    _mm512_maskz_loadu_ps(
                        mask,
                        products.as_ptr().add(xi * super::tap_stride(c_out, group) + co * group + at),
                    )
                });
                // Aᵀ m: rows 0 and 1 of four columns.
                let mut s = [[_mm512_setzero_ps(); 4]; 2];
                for c in 0..4 {
                    s[0][c] = _mm512_add_ps(_mm512_add_ps(m[c], m[4 + c]), m[8 + c]);
                    s[1][c] = _mm512_sub_ps(_mm512_sub_ps(m[4 + c], m[8 + c]), m[12 + c]);
                }
                let pixels = 2 * n;
                let masks = [
                    if pixels >= 16 { 0xFFFF } else { ((1u32 << pixels) - 1) as __mmask16 },
                    if pixels > 16 { ((1u32 << (pixels - 16)) - 1) as __mmask16 } else { 0 },
                ];
                for (a, s) in s.iter().enumerate() {
                    let left = _mm512_add_ps(_mm512_add_ps(s[0], s[1]), s[2]);
                    let right = _mm512_sub_ps(_mm512_sub_ps(s[1], s[2]), s[3]);
                    let start = co * plane + (2 * ty + a) * g.w + 2 * tx;
                    for (half, index) in [low, high].into_iter().enumerate() {
                        if masks[half] == 0 {
                            continue;
                        }
                        let mut v = _mm512_add_ps(_mm512_permutex2var_ps(left, index, right), bias);
                        if finish.silu {
                            v = _mm512_mul_ps(
                                v,
                                reciprocal_avx512(_mm512_add_ps(
                                    one,
                                    exp_avx512(_mm512_sub_ps(_mm512_setzero_ps(), v)),
                                )),
                            );
                        }
                        let at = start + 16 * half;
                        if let Some(residual) = finish.residual {
                            // SAFETY: the residual has the output's size; masked lanes are not read.
                            v = _mm512_add_ps(v, unsafe {
                                _mm512_maskz_loadu_ps(masks[half], residual.as_ptr().add(at))
                            });
                        }
                        // SAFETY: 2n pixels of this output row, inside the planes the caller vouched for.
                        unsafe { _mm512_mask_storeu_ps(target.add(at), masks[half], v) };
                    }
                }
            }
        }
    }

    /// # Safety
    /// AVX2 and FMA present; `frame` and `transformed` as [`super::transform_input`] takes them.
    #[target_feature(enable = "avx2,fma")]
    pub(super) unsafe fn transform_input_avx2(
        frame: &[f32],
        g: &Geometry,
        c_in: usize,
        first: usize,
        count: usize,
        group: usize,
        transformed: &mut [f32],
    ) {
        let padded_plane = (g.h + 2) * g.padded_row;
        assert!(frame.len() >= c_in * padded_plane && transformed.len() >= 16 * super::tap_stride(c_in, group));
        let out = transformed.as_mut_ptr();
        for ci in 0..c_in {
            // SAFETY: plane `ci` of the frame (asserted above).
            let plane = unsafe { frame.as_ptr().add(ci * padded_plane) };
            for (ty, tx0, n0, at0) in g.pieces(first, count) {
                for half in 0..n0.div_ceil(8) {
                    let (tx, n, at) = (tx0 + 8 * half, (n0 - 8 * half).min(8), at0 + 8 * half);
                    let mask = lanes(n);
                    // SAFETY: as in the AVX-512 version, eight tiles at a time.
                    let d: [[__m256; 4]; 4] = std::array::from_fn(|r| unsafe {
                        let row = plane.add((2 * ty + r) * g.padded_row + tx);
                        let odd = row.add(g.odd_start);
                        [
                            _mm256_maskload_ps(row, mask),
                            _mm256_maskload_ps(odd, mask),
                            _mm256_maskload_ps(row.add(1), mask),
                            _mm256_maskload_ps(odd.add(1), mask),
                        ]
                    });
                    let mut t = [[_mm256_setzero_ps(); 4]; 4];
                    for c in 0..4 {
                        t[0][c] = _mm256_sub_ps(d[0][c], d[2][c]);
                        t[1][c] = _mm256_add_ps(d[1][c], d[2][c]);
                        t[2][c] = _mm256_sub_ps(d[2][c], d[1][c]);
                        t[3][c] = _mm256_sub_ps(d[1][c], d[3][c]);
                    }
                    for (r, t) in t.iter().enumerate() {
                        let v = [
                            _mm256_sub_ps(t[0], t[2]),
                            _mm256_add_ps(t[1], t[2]),
                            _mm256_sub_ps(t[2], t[1]),
                            _mm256_sub_ps(t[1], t[3]),
                        ];
                        for (c, v) in v.into_iter().enumerate() {
                            // SAFETY: n positions of plane (xi, ci) of the group (asserted above).
                            unsafe {
                                _mm256_maskstore_ps(
                                    out.add((r * 4 + c) * super::tap_stride(c_in, group) + ci * group + at),
                                    mask,
                                    v,
                                )
                            };
                        }
                    }
                }
            }
        }
    }

    /// # Safety
    /// AVX2 and FMA present; as [`super::transform_output`].
    #[target_feature(enable = "avx2,fma")]
    pub(super) unsafe fn transform_output_avx2(
        products: &[f32],
        g: &Geometry,
        (c_out, first, count, group): (usize, usize, usize, usize),
        finish: &Finish,
        target: *mut f32,
    ) {
        assert!(products.len() >= 16 * super::tap_stride(c_out, group));
        let plane = g.h * g.w;
        let one = _mm256_set1_ps(1.0);
        for co in 0..c_out {
            let bias = _mm256_set1_ps(finish.bias[co]);
            for (ty, tx0, n0, at0) in g.pieces(first, count) {
                for part in 0..n0.div_ceil(8) {
                    let (tx, n, at) = (tx0 + 8 * part, (n0 - 8 * part).min(8), at0 + 8 * part);
                    let mask = lanes(n);
                    // SAFETY: n positions of each product plane (asserted above).
                    let m: [__m256; 16] = std::array::from_fn(|xi| unsafe {
                        _mm256_maskload_ps(
                            products.as_ptr().add(xi * super::tap_stride(c_out, group) + co * group + at),
                            mask,
                        )
                    });
                    let mut s = [[_mm256_setzero_ps(); 4]; 2];
                    for c in 0..4 {
                        s[0][c] = _mm256_add_ps(_mm256_add_ps(m[c], m[4 + c]), m[8 + c]);
                        s[1][c] = _mm256_sub_ps(_mm256_sub_ps(m[4 + c], m[8 + c]), m[12 + c]);
                    }
                    let pixels = 2 * n;
                    let masks = [lanes(pixels.min(8)), lanes(pixels.saturating_sub(8))];
                    for (a, s) in s.iter().enumerate() {
                        let left = _mm256_add_ps(_mm256_add_ps(s[0], s[1]), s[2]);
                        let right = _mm256_sub_ps(_mm256_sub_ps(s[1], s[2]), s[3]);
                        // Interleaved within 128-bit halves, then the halves put in order.
                        let (low, high) = (_mm256_unpacklo_ps(left, right), _mm256_unpackhi_ps(left, right));
                        let halves =
                            [_mm256_permute2f128_ps::<0x20>(low, high), _mm256_permute2f128_ps::<0x31>(low, high)];
                        let start = co * plane + (2 * ty + a) * g.w + 2 * tx;
                        for (half, v) in halves.into_iter().enumerate() {
                            if pixels <= 8 * half {
                                continue;
                            }
                            let mut v = _mm256_add_ps(v, bias);
                            if finish.silu {
                                v = _mm256_mul_ps(
                                    v,
                                    reciprocal_avx2(_mm256_add_ps(
                                        one,
                                        exp_avx2(_mm256_sub_ps(_mm256_setzero_ps(), v)),
                                    )),
                                );
                            }
                            let at = start + 8 * half;
                            if let Some(residual) = finish.residual {
                                // SAFETY: the residual has the output's size; masked lanes are not read.
                                v = _mm256_add_ps(v, unsafe {
                                    _mm256_maskload_ps(residual.as_ptr().add(at), masks[half])
                                });
                            }
                            // SAFETY: inside the planes the caller vouched for.
                            unsafe { _mm256_maskstore_ps(target.add(at), masks[half], v) };
                        }
                    }
                }
            }
        }
    }
}
