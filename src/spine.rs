//! Disc levels on a CT volume: where each intervertebral disc is, its plane, and its name.
//!
//! First cut, for axial stacks: the vertebral bodies are the anterior-most bone on the midline in
//! each axial slice; a smooth curve through their centres follows the spine; along it, the mean
//! density alternates between bone (bodies) and soft tissue (discs). A disc is a soft-tissue run
//! with bone on both sides; its plane's normal is the curve's tangent. Names are counted from the
//! sacrum, recognised as the lowest bone run longer than any lumbar body; without it in the field
//! of view the names are counted from the lowest disc as L5/S1 and marked uncertain.

use serde::Serialize;

use crate::volume::Volume;

/// Bone threshold, HU: above cancellous bone's lower range, far above muscle and disc.
const BONE_HU: f32 = 160.0;
/// Half-width of the midline band searched for bodies, mm.
const MIDLINE_BAND_MM: f64 = 6.0;
/// A bone run along the spine longer than this is the sacrum, not a lumbar body (25 to 30 mm).
const SACRUM_MIN_MM: f64 = 38.0;

const NAMES: [&str; 6] = ["L5/S1", "L4/L5", "L3/L4", "L2/L3", "L1/L2", "T12/L1"];

#[derive(Debug, Clone, Serialize)]
pub struct DiscLevel {
    pub name: String,
    pub name_certain: bool,
    pub center_lps_mm: [f64; 3],
    pub normal: [f64; 3],
}

#[derive(Debug, thiserror::Error)]
pub enum SpineError {
    #[error("no vertebral column found: {0}")]
    NotFound(String),
}

/// Finds the discs of a volume, from the lowest up. A volume not stored as axial slices (a
/// sagittal acquisition, a NIfTI file) is resampled to an axial grid first.
pub fn locate_discs(volume: &Volume) -> Result<Vec<DiscLevel>, SpineError> {
    let is_axial = volume.axes[0][0].abs() > 0.999 && volume.axes[1][1].abs() > 0.999;
    if !is_axial {
        let finest = volume.spacing.iter().copied().fold(f64::MAX, f64::min).max(0.5);
        return locate_discs(&volume.resample_axial(finest, false, -1000.0));
    }
    let [nx, ny, nz] = volume.dims;
    let (sx, sy) = (volume.spacing[0], volume.spacing[1]);
    // Midline: the median column of bone voxels across the volume.
    let mut bone_columns: Vec<usize> = Vec::new();
    for k in (0..nz).step_by(2) {
        for j in 0..ny {
            for i in 0..nx {
                if volume.at(i, j, k) > BONE_HU {
                    bone_columns.push(i);
                }
            }
        }
    }
    if bone_columns.len() < 100 {
        return Err(SpineError::NotFound("almost no bone in the volume".into()));
    }
    bone_columns.sort_unstable();
    let mid_i = bone_columns[bone_columns.len() / 2] as f64;
    let band = (MIDLINE_BAND_MM / sx).ceil() as isize;
    // Per slice: the anterior-most bone run on the midline, if long enough to be a body.
    let mut centres: Vec<(f64, f64)> = Vec::new(); // (k, j centre)
    for k in 0..nz {
        let mut profile = vec![0usize; ny];
        for (j, count) in profile.iter_mut().enumerate() {
            for di in -band..=band {
                let i = mid_i as isize + di;
                if i >= 0 && (i as usize) < nx && volume.at(i as usize, j, k) > BONE_HU {
                    *count += 1;
                }
            }
        }
        let needed = (band as usize).max(1);
        let mut j = 0;
        while j < ny {
            if profile[j] >= needed {
                let start = j;
                while j < ny && profile[j] >= needed {
                    j += 1;
                }
                if (j - start) as f64 * sy >= 15.0 {
                    centres.push((k as f64, (start + j - 1) as f64 / 2.0));
                    break;
                }
            }
            j += 1;
        }
    }
    if centres.len() < 5 {
        return Err(SpineError::NotFound("no vertebral bodies on the midline".into()));
    }
    // Where a slice cuts a disc, the anterior-most long bone run is a neural arch, 4 to 5 cm
    // behind the bodies: drop such points by their distance from the fit, tightening as it improves.
    let mut curve = fit_cubic(&centres);
    let eval = |c: &[f64; 4], k: f64| c[0] + k * (c[1] + k * (c[2] + k * c[3]));
    for limit_mm in [25.0, 12.0, 6.0] {
        let inliers: Vec<(f64, f64)> =
            centres.iter().copied().filter(|&(k, j)| (j - eval(&curve, k)).abs() * sy <= limit_mm).collect();
        if inliers.len() < 5 {
            break;
        }
        curve = fit_cubic(&inliers);
    }
    let j_at = |k: f64| eval(&curve, k);
    // Density along the curve: mean HU in a small disc around it in each axial slice.
    let radius = (5.0 / sx).ceil() as isize;
    let density: Vec<f32> = (0..nz)
        .map(|k| {
            let jc = j_at(k as f64).round() as isize;
            let (mut sum, mut n) = (0.0, 0);
            for dj in -radius..=radius {
                for di in -radius..=radius {
                    let (i, j) = (mid_i as isize + di, jc + dj);
                    if di * di + dj * dj <= radius * radius
                        && i >= 0
                        && j >= 0
                        && (i as usize) < nx
                        && (j as usize) < ny
                    {
                        sum += volume.at(i as usize, j as usize, k);
                        n += 1;
                    }
                }
            }
            if n > 0 { sum / n as f32 } else { -1000.0 }
        })
        .collect();
    // Runs of bone and of soft tissue along the slices.
    let is_bone: Vec<bool> = density.iter().map(|d| *d > (BONE_HU + 85.0) / 2.0 + 20.0).collect();
    let mut runs: Vec<(bool, usize, usize)> = Vec::new(); // (bone, first k, last k)
    for (k, &b) in is_bone.iter().enumerate() {
        match runs.last_mut() {
            Some(run) if run.0 == b => run.2 = k,
            _ => runs.push((b, k, k)),
        }
    }
    let slice_mm = volume.spacing[2];
    // Along the volume's slice axis; make "up" the patient's superior direction.
    let superior_is_up = volume.axes[2][2] >= 0.0;
    let mut discs: Vec<(f64, bool)> = Vec::new(); // (k centre, directly above the sacrum)
    let length_mm = |r: &(bool, usize, usize)| (r.2 - r.1 + 1) as f64 * slice_mm;
    // A Schmorl's node shows as a short soft run inside a body, cut off from its disc only by the
    // thin endplate: of two soft runs split by under 5 mm of bone, the shorter is not a disc.
    let mut node = vec![false; runs.len()];
    for w in 1..runs.len().saturating_sub(1) {
        if runs[w].0 && length_mm(&runs[w]) < 5.0 && !runs[w - 1].0 && !runs[w + 1].0 {
            let shorter = if length_mm(&runs[w - 1]) < length_mm(&runs[w + 1]) { w - 1 } else { w + 1 };
            node[shorter] = true;
        }
    }
    for w in 1..runs.len().saturating_sub(1) {
        let (bone, first, last) = runs[w];
        if bone || node[w] || !runs[w - 1].0 || !runs[w + 1].0 || length_mm(&runs[w]) < 3.0 {
            continue;
        }
        let below = if superior_is_up { runs[w - 1] } else { runs[w + 1] };
        let below_len = (below.2 - below.1 + 1) as f64 * slice_mm;
        // The sacrum's run may be cut by the volume's edge: long, or reaching the edge and long-ish.
        let at_edge = below.1 == 0 || below.2 == nz - 1;
        let sacrum = below_len >= SACRUM_MIN_MM || (at_edge && below_len >= 30.0);
        discs.push(((first + last) as f64 / 2.0, sacrum));
    }
    if !superior_is_up {
        discs.reverse();
    }
    if discs.is_empty() {
        return Err(SpineError::NotFound("no disc between two vertebral bodies".into()));
    }
    let sacrum_index = discs.iter().position(|d| d.1);
    let mut levels = Vec::with_capacity(discs.len());
    for (index, &(k, _)) in discs.iter().enumerate() {
        let (name_index, certain) = match sacrum_index {
            Some(s) if index >= s => (index - s, true),
            Some(_) => continue, // below the sacrum: not a lumbar disc
            None => (index, false),
        };
        let name = NAMES.get(name_index).map_or_else(|| format!("above T12/L1 ({name_index})"), |n| n.to_string());
        let j = j_at(k);
        let centre = volume.voxel_to_lps([mid_i, j, k]);
        // Tangent of the curve in voxel units, then in LPS.
        let dj = curve[1] + k * (2.0 * curve[2] + 3.0 * k * curve[3]);
        let step = [0.0, dj * sy, slice_mm];
        let mut normal = [0.0; 3];
        for (axis, &component) in volume.axes.iter().zip(step.iter()) {
            for d in 0..3 {
                normal[d] += axis[d] * component;
            }
        }
        let norm = (normal[0] * normal[0] + normal[1] * normal[1] + normal[2] * normal[2]).sqrt();
        let mut normal = normal.map(|v| v / norm);
        if normal[2] < 0.0 {
            normal = normal.map(|v| -v);
        }
        levels.push(DiscLevel { name, name_certain: certain, center_lps_mm: centre, normal });
    }
    Ok(levels)
}

/// Least-squares cubic `j(k)` through (k, j) points; coefficients from the constant term up.
fn fit_cubic(points: &[(f64, f64)]) -> [f64; 4] {
    // Normal equations on a centred, scaled variable for conditioning.
    let mean = points.iter().map(|p| p.0).sum::<f64>() / points.len() as f64;
    let spread = points.iter().map(|p| (p.0 - mean).abs()).fold(1.0, f64::max);
    let mut a = [[0.0f64; 5]; 4];
    for &(k, j) in points {
        let t = (k - mean) / spread;
        let powers = [1.0, t, t * t, t * t * t];
        for r in 0..4 {
            for c in 0..4 {
                a[r][c] += powers[r] * powers[c];
            }
            a[r][4] += powers[r] * j;
        }
    }
    // Gaussian elimination with partial pivoting.
    for col in 0..4 {
        let pivot = (col..4).max_by(|&x, &y| a[x][col].abs().total_cmp(&a[y][col].abs())).expect("rows");
        a.swap(col, pivot);
        if a[col][col].abs() < 1e-12 {
            continue;
        }
        for row in 0..4 {
            if row != col {
                let f = a[row][col] / a[col][col];
                for c in col..5 {
                    a[row][c] -= f * a[col][c];
                }
            }
        }
    }
    let t_coef: Vec<f64> = (0..4).map(|r| if a[r][r].abs() < 1e-12 { 0.0 } else { a[r][4] / a[r][r] }).collect();
    // Back to k: j = sum c_n ((k - mean) / spread)^n, expanded.
    let (m, s) = (mean, spread);
    let c = [t_coef[0], t_coef[1] / s, t_coef[2] / (s * s), t_coef[3] / (s * s * s)];
    [
        c[0] - c[1] * m + c[2] * m * m - c[3] * m * m * m,
        c[1] - 2.0 * c[2] * m + 3.0 * c[3] * m * m,
        c[2] - 3.0 * c[3] * m,
        c[3],
    ]
}

#[cfg(test)]
mod tests {
    #[test]
    fn cubic_fit_recovers_a_cubic() {
        let pts: Vec<(f64, f64)> = (0..50)
            .map(|k| (k as f64, 3.0 - 0.5 * k as f64 + 0.02 * (k * k) as f64 - 0.0003 * (k * k * k) as f64))
            .collect();
        let c = super::fit_cubic(&pts);
        for (k, j) in pts {
            let got = c[0] + k * (c[1] + k * (c[2] + k * c[3]));
            assert!((got - j).abs() < 1e-6, "{got} vs {j}");
        }
    }
}
