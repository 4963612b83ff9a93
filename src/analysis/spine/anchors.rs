//! The two landmarks a radiologist counts lumbar levels from, found independently of the discs:
//!
//! - The sacrum: the vertebra wedged between the iliac bones. Beside its body the sacral alae
//!   and, beyond the sacroiliac joints, the ilia fill the space 25 to 45 mm from the midline
//!   with bone on both sides; beside a lumbar body the same space holds the psoas muscles, crossed
//!   only by thin transverse processes.
//! - The ribs: T12 is the lowest vertebra that bears ribs. A rib is a long bone that starts
//!   beside the column (its head and neck within 45 mm of the canal) and runs out beyond 75 mm.
//!   Lumbar transverse processes end within about 55 mm, and the tips of the lowest ribs, which
//!   hang down to L1 or L2, are far from the column there. So with the column itself cut away,
//!   each rib is a connected piece of bone whose medial end lies at the level of the vertebra
//!   that bears it. The iliac crests and the scapulae are told apart by the height of their
//!   medial part (tens of mm) and by their distance from the canal.

use super::canal::Canal;
use super::row_step_towards_front;
use crate::analysis::volume::Volume;

/// Dense bone, HU: cortical bone of ribs, alae and ilia.
const DENSE_BONE_HU: f32 = 200.0;

/// Where the alae lie beside the sacrum: mm from the canal's centre, to each side and towards
/// the front.
const ALA_LATERAL_MM: (f64, f64) = (25.0, 45.0);
const ALA_FRONT_MM: (f64, f64) = (5.0, 30.0);

/// Bone share beside the column per slice, the lower of the two sides: high through the sacrum
/// (alae, sacroiliac joints), low beside lumbar bodies.
pub fn ala_share(volume: &Volume, canal: &Canal) -> Vec<f32> {
    let [nx, ny, nz] = volume.dims;
    let (sx, sy) = (volume.spacing[0], volume.spacing[1]);
    let front = row_step_towards_front(volume);
    (0..nz)
        .map(|k| {
            let (ci, cj) = (canal.i[k], canal.j[k]);
            let mut sides = [(0u32, 0u32); 2];
            for (side, sign) in [-1.0f64, 1.0].into_iter().enumerate() {
                let mut depth = ALA_FRONT_MM.0;
                while depth <= ALA_FRONT_MM.1 {
                    let j = (cj + front * depth / sy).round();
                    depth += sy;
                    if j < 0.0 || j >= ny as f64 {
                        continue;
                    }
                    let row = super::row(volume, k, j as usize);
                    let mut lateral = ALA_LATERAL_MM.0;
                    while lateral <= ALA_LATERAL_MM.1 {
                        let i = (ci + sign * lateral / sx).round();
                        lateral += sx;
                        if i < 0.0 || i >= nx as f64 {
                            continue;
                        }
                        sides[side].1 += 1;
                        sides[side].0 += u32::from(row[i as usize] > DENSE_BONE_HU);
                    }
                }
            }
            let share = |(bone, all): (u32, u32)| if all == 0 { 0.0 } else { bone as f32 / all as f32 };
            share(sides[0]).min(share(sides[1]))
        })
        .collect()
}

/// Cell of the grid on which ribs are traced, mm.
const RIB_CELL_MM: f64 = 2.0;
/// The column cut away before tracing: this far to each side of the canal, and from this far
/// behind it to this far in front, mm.
const COLUMN_HALF_WIDTH_MM: f64 = 28.0;
const COLUMN_BEHIND_MM: f64 = 50.0;
const COLUMN_FRONT_MM: f64 = 60.0;
/// Only bone from this far behind the canal to this far in front is traced, mm: the ribs'
/// course beside the column, not the chest wall in front.
const TRACE_BEHIND_MM: f64 = 60.0;
const TRACE_FRONT_MM: f64 = 80.0;
/// A rib reaches at least this far from the canal, and its medial part lies within `MEDIAL_MM`.
const RIB_REACH_MM: f64 = 75.0;
const MEDIAL_MM: f64 = 45.0;
/// The medial part of one rib spans at most this much along the column, mm.
const MEDIAL_HEIGHT_MM: f64 = 30.0;
/// Smaller pieces are noise or vessel calcification, mm^3.
const MIN_RIB_MM3: f64 = 1500.0;

/// A rib's medial end.
#[derive(Debug, Clone, Copy)]
pub struct RibHead {
    /// Fractional slice index of the middle of its medial part.
    pub k: f64,
}

/// The medial ends of the ribs: each connected piece of dense bone outside the column that
/// starts near it and reaches far out to one side.
pub fn rib_heads(volume: &Volume, canal: &Canal) -> Vec<RibHead> {
    let [nx, ny, nz] = volume.dims;
    let (sx, sy, sz) = (volume.spacing[0], volume.spacing[1], volume.spacing[2]);
    let f = ((RIB_CELL_MM / sx).round() as usize).max(1);
    let g = ((RIB_CELL_MM / sy).round() as usize).max(1);
    let (w, h) = (nx / f, ny / g);
    let (cell_x, cell_y) = (sx * f as f64, sy * g as f64);
    let front = row_step_towards_front(volume);
    // Lateral offset (mm) of each cell, per slice; bone cells outside the column.
    let mut bone = vec![false; w * h * nz];
    for k in 0..nz {
        let (ci, cj) = (canal.i[k], canal.j[k]);
        for cy in 0..h {
            let j_mid = (cy * g) as f64 + (g as f64 - 1.0) / 2.0;
            // Positive towards the front.
            let ahead = (j_mid - cj) * sy * front;
            if !(-TRACE_BEHIND_MM..=TRACE_FRONT_MM).contains(&ahead) {
                continue;
            }
            for cx in 0..w {
                let i_mid = (cx * f) as f64 + (f as f64 - 1.0) / 2.0;
                let lateral = (i_mid - ci).abs() * sx;
                if lateral < COLUMN_HALF_WIDTH_MM && (-COLUMN_BEHIND_MM..=COLUMN_FRONT_MM).contains(&ahead) {
                    continue;
                }
                let any_bone = (cy * g..cy * g + g)
                    .any(|j| super::row(volume, k, j)[cx * f..cx * f + f].iter().any(|&v| v > DENSE_BONE_HU));
                bone[(k * h + cy) * w + cx] = any_bone;
            }
        }
    }
    let cell_mm3 = cell_x * cell_y * sz;
    let mut label = vec![0u32; bone.len()];
    let mut heads = Vec::new();
    let mut stack = Vec::new();
    let mut next_label = 0u32;
    for start in 0..bone.len() {
        if !bone[start] || label[start] != 0 {
            continue;
        }
        next_label += 1;
        label[start] = next_label;
        stack.push(start);
        let (mut voxels, mut reach) = (0usize, 0.0f64);
        let (mut medial_k_sum, mut medial_count) = (0.0f64, 0usize);
        let (mut medial_low, mut medial_high) = (f64::MAX, f64::MIN);
        while let Some(at) = stack.pop() {
            voxels += 1;
            let (k, rest) = (at / (w * h), at % (w * h));
            let (cy, cx) = (rest / w, rest % w);
            let lateral = ((cx * f) as f64 + (f as f64 - 1.0) / 2.0 - canal.i[k]).abs() * sx;
            reach = reach.max(lateral);
            if lateral < MEDIAL_MM {
                medial_k_sum += k as f64;
                medial_count += 1;
                medial_low = medial_low.min(k as f64);
                medial_high = medial_high.max(k as f64);
            }
            let mut visit = |n: usize| {
                if bone[n] && label[n] == 0 {
                    label[n] = next_label;
                    stack.push(n);
                }
            };
            if cx > 0 {
                visit(at - 1);
            }
            if cx + 1 < w {
                visit(at + 1);
            }
            if cy > 0 {
                visit(at - w);
            }
            if cy + 1 < h {
                visit(at + w);
            }
            if k > 0 {
                visit(at - w * h);
            }
            if k + 1 < nz {
                visit(at + w * h);
            }
        }
        let is_rib = reach >= RIB_REACH_MM
            && medial_count > 0
            && (medial_high - medial_low) * sz <= MEDIAL_HEIGHT_MM
            && voxels as f64 * cell_mm3 >= MIN_RIB_MM3;
        if is_rib {
            heads.push(RibHead { k: medial_k_sum / medial_count as f64 });
        }
    }
    heads
}
