//! The spinal canal, slice by slice: the one landmark every axial CT of the trunk shows along the
//! whole column, whatever else the field of view holds (lungs, bowel gas, contrast in the aorta,
//! the pelvis). In each slice the canal is a round soft-tissue hole (CSF, epidural fat) ringed by
//! bone: the body or disc in front, the pedicles and laminae around. Candidates are scored by
//! that ring on a 2 mm grid, and one path through the slices is chosen that keeps the canal
//! continuous, so that a ring-shaped pattern in the pelvis or a rib cannot pull it aside.

use rayon::prelude::*;

use crate::analysis::volume::Volume;

/// Bone, HU, for the ring around the canal.
const RING_BONE_HU: f32 = 180.0;
/// The canal's content: CSF and epidural fat average between these, HU.
const CANAL_HU: (f32, f32) = (-60.0, 80.0);
/// Half-sides of the boxes, mm: the canal's interior, the inner and the outer edge of its ring.
const INNER_HALF_MM: f64 = 4.0;
const RING_INNER_HALF_MM: f64 = 7.0;
const RING_OUTER_HALF_MM: f64 = 14.0;
/// Cell of the scoring grid, mm.
const CELL_MM: f64 = 2.0;
/// Candidates kept per slice, and the least ring score that makes one.
const CANDIDATES: usize = 8;
const MIN_SCORE: f32 = 0.15;
/// Free movement of the canal between slices (mm, plus this much per mm along the column), and
/// the cost of each mm beyond, in ring score.
const FREE_MOVE_MM: f64 = 3.0;
const FREE_MOVE_PER_MM: f64 = 0.5;
const MOVE_COST_PER_MM: f64 = 0.1;
/// A slice whose chosen candidate scores less than this share of the path's median ring score
/// is placed between its clear neighbours.
const CLEAR_SHARE_OF_MEDIAN: f32 = 0.75;
/// The path is smoothed by a running median over this many mm along the column.
const SMOOTH_MM: f64 = 20.0;

/// The canal's centre in each slice, as fractional voxel indices, and its ring score there.
pub struct Canal {
    pub i: Vec<f64>,
    pub j: Vec<f64>,
    pub score: Vec<f32>,
}

impl Canal {
    /// Centre at a fractional slice index, interpolated.
    pub fn at(&self, k: f64) -> (f64, f64) {
        let last = self.i.len() - 1;
        let k = k.clamp(0.0, last as f64);
        let k0 = (k.floor() as usize).min(last);
        let k1 = (k0 + 1).min(last);
        let t = k - k0 as f64;
        (self.i[k0] * (1.0 - t) + self.i[k1] * t, self.j[k0] * (1.0 - t) + self.j[k1] * t)
    }

    /// Change of the centre's column and row per slice around slice `k`: a least-squares line
    /// through the slices within `half` slices (the centres lie on a 2 mm grid, so neighbours
    /// alone would give steps, not a slope).
    pub fn slope(&self, k: f64, half: f64) -> (f64, f64) {
        let last = self.i.len() - 1;
        let from = (k - half).floor().max(0.0) as usize;
        let to = ((k + half).ceil() as usize).min(last);
        let n = (to + 1 - from) as f64;
        let mean_k = (from..=to).map(|q| q as f64).sum::<f64>() / n;
        let spread: f64 = (from..=to).map(|q| (q as f64 - mean_k).powi(2)).sum();
        if spread == 0.0 {
            return (0.0, 0.0);
        }
        let fit = |values: &[f64]| {
            let mean = values[from..=to].iter().sum::<f64>() / n;
            (from..=to).map(|q| (q as f64 - mean_k) * (values[q] - mean)).sum::<f64>() / spread
        };
        (fit(&self.i), fit(&self.j))
    }

    /// The median ring score along the track: how clearly this scan shows its canal.
    pub fn typical_score(&self) -> f32 {
        let mut scores = self.score.clone();
        scores.sort_by(f32::total_cmp);
        scores[scores.len() / 2]
    }

    /// Mean ring score over the slices within `half_mm` of slice `k`.
    pub fn confidence(&self, k: f64, half_mm: f64, slice_mm: f64) -> f32 {
        let half = (half_mm / slice_mm).round() as isize;
        let centre = k.round() as isize;
        let range = (centre - half).max(0) as usize..((centre + half + 1).max(0) as usize).min(self.score.len());
        let n = range.len().max(1) as f32;
        self.score[range].iter().sum::<f32>() / n
    }
}

/// Summed-area table of a `w x h` grid, with a zero row and column in front.
struct Integral {
    w: usize,
    sums: Vec<f32>,
}

impl Integral {
    fn new(values: &[f32], w: usize, h: usize) -> Integral {
        let mut sums = vec![0.0f32; (w + 1) * (h + 1)];
        for y in 0..h {
            let mut row = 0.0;
            for x in 0..w {
                row += values[y * w + x];
                sums[(y + 1) * (w + 1) + x + 1] = sums[y * (w + 1) + x + 1] + row;
            }
        }
        Integral { w, sums }
    }

    /// Sum over the box of half-side `r` cells around (x, y), which must lie inside the grid.
    fn box_sum(&self, x: usize, y: usize, r: usize) -> f32 {
        let s = |x: usize, y: usize| self.sums[y * (self.w + 1) + x];
        let (x0, y0, x1, y1) = (x - r, y - r, x + r + 1, y + r + 1);
        s(x1, y1) - s(x0, y1) - s(x1, y0) + s(x0, y0)
    }
}

/// Canal candidates of one slice: (ring score, column, row), in voxel indices, best first.
fn slice_candidates(grid: &Volume, k: usize) -> Vec<(f32, f64, f64)> {
    let [nx, ny, _] = grid.dims;
    let f = ((CELL_MM / grid.spacing[0]).round() as usize).max(1);
    let g = ((CELL_MM / grid.spacing[1]).round() as usize).max(1);
    let (w, h) = (nx / f, ny / g);
    let cell_mm = grid.spacing[0] * f as f64;
    let r_in = ((INNER_HALF_MM / cell_mm).round() as usize).max(1);
    let r_mid = ((RING_INNER_HALF_MM / cell_mm).round() as usize).max(r_in + 1);
    let r_out = ((RING_OUTER_HALF_MM / cell_mm).round() as usize).max(r_mid + 1);
    if w <= 2 * r_out + 2 || h <= 2 * r_out + 2 {
        return Vec::new();
    }
    let mut mean = vec![0.0f32; w * h];
    let mut bone = vec![0.0f32; w * h];
    let per_cell = (f * g) as f32;
    for cy in 0..h {
        for cx in 0..w {
            let (mut sum, mut count) = (0.0f32, 0.0f32);
            for j in cy * g..cy * g + g {
                let row = &super::row(grid, k, j)[cx * f..cx * f + f];
                for &v in row {
                    sum += v.clamp(-100.0, 400.0);
                    count += f32::from(u8::from(v > RING_BONE_HU));
                }
            }
            mean[cy * w + cx] = sum / per_cell;
            bone[cy * w + cx] = count / per_cell;
        }
    }
    let mean = Integral::new(&mean, w, h);
    let bone = Integral::new(&bone, w, h);
    let side = |r: usize| ((2 * r + 1) * (2 * r + 1)) as f32;
    let ring_area = side(r_out) - side(r_mid);
    let mut score = vec![0.0f32; w * h];
    for cy in r_out..h - r_out {
        for cx in r_out..w - r_out {
            let inner = mean.box_sum(cx, cy, r_in) / side(r_in);
            if inner > CANAL_HU.0 && inner < CANAL_HU.1 {
                score[cy * w + cx] = (bone.box_sum(cx, cy, r_out) - bone.box_sum(cx, cy, r_mid)) / ring_area;
            }
        }
    }
    let mut found = Vec::new();
    for cy in r_out..h - r_out {
        for cx in r_out..w - r_out {
            let s = score[cy * w + cx];
            if s < MIN_SCORE {
                continue;
            }
            let is_peak = (cy - 2..=cy + 2).all(|y| (cx - 2..=cx + 2).all(|x| score[y * w + x] <= s));
            if is_peak {
                found.push((s, (cx * f) as f64 + (f as f64 - 1.0) / 2.0, (cy * g) as f64 + (g as f64 - 1.0) / 2.0));
            }
        }
    }
    found.sort_by(|a, b| b.0.total_cmp(&a.0));
    found.truncate(CANDIDATES);
    found
}

/// The canal through every slice: the candidates of each slice joined into the path of highest
/// total ring score less the cost of its jumps (Viterbi), then smoothed. `None` when no slice
/// shows a canal.
pub fn track(grid: &Volume) -> Option<Canal> {
    let nz = grid.dims[2];
    let (sx, sy, sz) = (grid.spacing[0], grid.spacing[1], grid.spacing[2]);
    let candidates: Vec<Vec<(f32, f64, f64)>> = (0..nz).into_par_iter().map(|k| slice_candidates(grid, k)).collect();
    if candidates.iter().all(Vec::is_empty) {
        return None;
    }
    // A slice without candidates keeps the path where it was at no gain.
    let mut states: Vec<Vec<(f32, f64, f64)>> = Vec::with_capacity(nz);
    for (k, c) in candidates.into_iter().enumerate() {
        if c.is_empty() {
            let previous = if k > 0 {
                states[k - 1].clone()
            } else {
                vec![(0.0, grid.dims[0] as f64 / 2.0, grid.dims[1] as f64 / 2.0)]
            };
            states.push(previous.into_iter().map(|(_, i, j)| (0.0, i, j)).collect());
        } else {
            states.push(c);
        }
    }
    let free = FREE_MOVE_MM + FREE_MOVE_PER_MM * sz;
    let mut total: Vec<f64> = states[0].iter().map(|c| f64::from(c.0)).collect();
    let mut back: Vec<Vec<usize>> = vec![Vec::new()];
    for k in 1..nz {
        let mut next = Vec::with_capacity(states[k].len());
        let mut from = Vec::with_capacity(states[k].len());
        for &(s, i, j) in &states[k] {
            let (best, arg) = states[k - 1]
                .iter()
                .enumerate()
                .map(|(p, &(_, pi, pj))| {
                    let moved = (((i - pi) * sx).powi(2) + ((j - pj) * sy).powi(2)).sqrt();
                    (total[p] - (moved - free).max(0.0) * MOVE_COST_PER_MM, p)
                })
                .fold((f64::MIN, 0), |a, b| if b.0 > a.0 { b } else { a });
            next.push(best + f64::from(s));
            from.push(arg);
        }
        total = next;
        back.push(from);
    }
    let mut state = (0..total.len()).max_by(|&a, &b| total[a].total_cmp(&total[b])).unwrap_or(0);
    let mut path = vec![(0.0f32, 0.0, 0.0); nz];
    for k in (0..nz).rev() {
        path[k] = states[k][state];
        if k > 0 {
            state = back[k][state];
        }
    }
    // Where the ring is faint (at a disc whose facets the slice misses, in a phantom's disc) the
    // best candidate may lie anywhere: such slices take the line between the clear ones around.
    let mut canal = Canal { i: Vec::new(), j: Vec::new(), score: path.iter().map(|p| p.0).collect() };
    let clear_score = CLEAR_SHARE_OF_MEDIAN * canal.typical_score();
    let clear: Vec<usize> = (0..nz).filter(|&k| path[k].0 >= clear_score).collect();
    if !clear.is_empty() {
        for k in 0..nz {
            if path[k].0 >= clear_score {
                continue;
            }
            let after = clear.partition_point(|&c| c < k);
            let (i, j) = match (after.checked_sub(1).map(|b| clear[b]), clear.get(after).copied()) {
                (Some(a), Some(b)) => {
                    let t = (k - a) as f64 / (b - a) as f64;
                    (path[a].1 + (path[b].1 - path[a].1) * t, path[a].2 + (path[b].2 - path[a].2) * t)
                }
                (Some(a), None) => (path[a].1, path[a].2),
                (None, Some(b)) => (path[b].1, path[b].2),
                (None, None) => (path[k].1, path[k].2),
            };
            path[k].1 = i;
            path[k].2 = j;
        }
    }
    let half = ((SMOOTH_MM / 2.0 / sz).round() as usize).max(1);
    let median = |values: &[f64], k: usize| {
        let mut window: Vec<f64> = values[k.saturating_sub(half)..(k + half + 1).min(nz)].to_vec();
        window.sort_by(f64::total_cmp);
        window[window.len() / 2]
    };
    let raw_i: Vec<f64> = path.iter().map(|p| p.1).collect();
    let raw_j: Vec<f64> = path.iter().map(|p| p.2).collect();
    canal.i = (0..nz).map(|k| median(&raw_i, k)).collect();
    canal.j = (0..nz).map(|k| median(&raw_j, k)).collect();
    Some(canal)
}
