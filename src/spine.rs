//! Disc levels on a CT volume: where each intervertebral disc is, its plane, and its name.
//!
//! Built to hold on osteoporotic spines, common among the patients who get lumbar CT: there the
//! cancellous bone inside a body reads 50 to 100 HU, no denser than the disc, and only the
//! cortical shell and the endplates stay above 160 HU. So the locator anchors on what every spine
//! keeps:
//!
//! 1. The spinal canal. On the midline, pooled over 30 mm of neighbouring slices, the canal is
//!    the run of rows as thin as CSF and epidural fat (under 35 HU), 6 to 30 mm deep, with the
//!    denser column of bodies and discs right in front of it. Its front edge, the bodies'
//!    posterior wall, is fitted slice by slice with a robust cubic: the column's course.
//! 2. The discs. In a box in front of that wall, the fraction of bone voxels per slice is high
//!    through dense bodies and at every endplate, medium inside porous bodies (their cortical
//!    ring), and lowest in discs, which have no cortex at all. At each of several levels a disc
//!    candidate is a dip of 2 to 16 mm with higher slices on both sides; candidates are taken by
//!    clarity, and one within 18 mm of a disc already taken is the same disc at another level or
//!    a Schmorl's node. Dips that touch the edge of the volume are not reported: a body's
//!    interior cut by the edge looks the same as a disc cut by it. A dip halfway between two
//!    discs that are one usual spacing apart is the middle of a porous body, not a disc.
//! 3. The centre. Side to side and front to back, it is the middle of the bone of the bodies
//!    above and below, away from their endplates (which a tilted disc cuts obliquely).
//!
//! Names are counted from the sacrum: under the lowest disc, 38 mm of column without another disc
//! is the sacrum (a lumbar body is 25 to 30 mm tall). Without it in the field of view, the lowest
//! disc is called L5/S1 and every name is marked uncertain.
//!
//! The front is taken from the volume's geometry (LPS anterior). A volume whose header flips
//! front and back is not recognised as such.

use serde::Serialize;

use crate::volume::Volume;

/// Bone threshold, HU: cortical bone and endplates are far above it, muscle and disc below.
const BONE_HU: f32 = 160.0;
/// Half-width of the midline band in which the canal is sought, mm.
const MIDLINE_BAND_MM: f64 = 6.0;
/// Half-width of the box in which the bone profile along the column is measured, mm.
const PROFILE_HALF_WIDTH_MM: f64 = 10.0;
/// Slices on either side whose bone is pooled to find the canal in one slice, mm.
const CANAL_WINDOW_MM: f64 = 15.0;
/// The canal is at least this deep (front to back) on the midline, and at most, mm.
const CANAL_MIN_MM: f64 = 6.0;
const CANAL_MAX_MM: f64 = 30.0;
/// Mean density below which a midline row is canal (CSF, epidural fat), HU.
const CANAL_MAX_HU: f64 = 35.0;
/// Mean density above which a midline row belongs to the column of bodies and discs, HU.
const COLUMN_MIN_HU: f64 = 60.0;
/// What lies in front of the canal must be at least this deep to be the column, mm.
const COLUMN_MIN_MM: f64 = 15.0;
/// A disc's contrast with its flanks, as a fraction of the profile's spread (10th to 80th
/// percentile), at the least.
const MIN_CONTRAST: f64 = 0.5;
/// Two discs are at least this far apart: a lumbar body is 20 mm tall or more.
const MIN_DISC_SPACING_MM: f64 = 18.0;
/// A low stretch of the bone profile longer than this is the inside of a body, not a disc, mm.
const DISC_MAX_MM: f64 = 16.0;
const DISC_MIN_MM: f64 = 2.0;
/// Under the lowest lumbar disc, this much of the column without another disc is the sacrum.
const SACRUM_MIN_MM: f64 = 38.0;
/// Where the volume ends sooner, this much without another disc.
const SACRUM_AT_EDGE_MM: f64 = 30.0;
/// Anterior-posterior depth of a lumbar body when the volume gives no measure of it, mm.
const TYPICAL_BODY_DEPTH_MM: f64 = 36.0;
/// Half-width of the box in which a body's side-to-side extent is measured, mm.
const BODY_HALF_WIDTH_MM: f64 = 30.0;
/// The slabs of the bodies above and below a disc whose bone gives its centre: from and to this
/// distance from the disc, mm.
const BODY_SLAB_MM: (f64, f64) = (4.0, 14.0);

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
    #[error(transparent)]
    Volume(#[from] crate::volume::VolumeError),
}

fn eval_cubic(c: &[f64; 4], k: f64) -> f64 {
    c[0] + k * (c[1] + k * (c[2] + k * c[3]))
}

/// The bodies' posterior wall along the column: row index `j(k)`, fitted over the slices that
/// showed the canal, and held constant beyond them.
struct PosteriorWall {
    curve: [f64; 4],
    k_first: f64,
    k_last: f64,
    /// +1 when rows advance towards the back (LPS +y), -1 when towards the front.
    backward: f64,
    /// Measured depth of the column in front of the wall, rows.
    depth_rows: f64,
}

impl PosteriorWall {
    fn j(&self, k: f64) -> f64 {
        eval_cubic(&self.curve, k.clamp(self.k_first, self.k_last))
    }

    fn slope(&self, k: f64) -> f64 {
        let k = k.clamp(self.k_first, self.k_last);
        self.curve[1] + k * (2.0 * self.curve[2] + 3.0 * k * self.curve[3])
    }
}

/// Finds the discs of a volume, from the lowest up. A volume not stored as axial slices (a
/// sagittal acquisition, a NIfTI file, a gantry-tilted scan) is resampled to an axial grid first.
pub fn locate_discs(volume: &Volume) -> Result<Vec<DiscLevel>, SpineError> {
    if !volume.is_axis_aligned_axial() {
        return locate_discs(&volume.resample_axial_grid(volume.native_axial_spacing(0.5), false, -1000.0)?);
    }
    let [nx, _, nz] = volume.dims;
    let (sx, sz) = (volume.spacing[0], volume.spacing[2]);
    let mid_i = midline_column(volume)?;
    let wall = posterior_wall(volume, mid_i)?;
    // Bone fraction in a box in front of the wall, slice by slice.
    let half_width = (PROFILE_HALF_WIDTH_MM / sx).ceil() as isize;
    let columns: Vec<usize> = (-half_width..=half_width)
        .map(|d| mid_i as isize + d)
        .filter(|&i| i >= 0 && (i as usize) < nx)
        .map(|i| i as usize)
        .collect();
    let sy = volume.spacing[1];
    let rows_in_front = |k: usize, from_mm: f64, to_mm: f64| -> Vec<usize> {
        // Rows between `from_mm` and `to_mm` in front of the wall.
        let w = wall.j(k as f64);
        let a = w - wall.backward * from_mm / sy;
        let b = w - wall.backward * to_mm / sy;
        let (low, high) = (a.min(b).round().max(0.0) as usize, a.max(b).round().max(0.0) as usize);
        (low..=high.min(volume.dims[1] - 1)).collect()
    };
    let depth_mm = wall.depth_rows * sy;
    let profile: Vec<f64> = (0..nz)
        .map(|k| {
            let rows = rows_in_front(k, 2.0, depth_mm - 3.0);
            let (mut bone, mut all) = (0usize, 0usize);
            for &j in &rows {
                for &i in &columns {
                    all += 1;
                    bone += usize::from(volume.at(i, j, k) > BONE_HU);
                }
            }
            if all == 0 { 0.0 } else { bone as f64 / all as f64 }
        })
        .collect();
    let (k_first, k_last) = (wall.k_first as usize, wall.k_last as usize);
    let mut along: Vec<f64> = profile[k_first..=k_last].to_vec();
    along.sort_by(f64::total_cmp);
    let percentile = |p: f64| along[((along.len() - 1) as f64 * p).round() as usize];
    if std::env::var_os("IDAICS_SPINE_DEBUG").is_some() {
        eprintln!("midline {mid_i}, depth {depth_mm:.1} mm, median {:.2}", percentile(0.5));
        for (k, f) in profile.iter().enumerate() {
            eprintln!("k {k:4} wall {:7.1} bone {f:.2}", wall.j(k as f64));
        }
    }
    let superior_is_up = volume.axes[2][2] >= 0.0;
    let levels: Vec<f64> = (1..=8).map(|n| percentile(0.1 * n as f64)).collect();
    let candidates = disc_candidates(&profile, &levels, sz);
    let mut discs = select_discs(&candidates, sz);
    if discs.is_empty() {
        return Err(SpineError::NotFound("no disc between two vertebral bodies".into()));
    }
    if !superior_is_up {
        discs.reverse();
    }
    // The sacrum lies under the lowest disc when the volume goes on for 38 mm below it (a lumbar
    // body is 25 to 30 mm tall) without another disc candidate half as clear as the faintest
    // disc taken. Then the names count up from it and are certain.
    let reach = (SACRUM_MIN_MM / sz).ceil() as usize;
    let lowest = &discs[0];
    // Cut by the volume's edge, 30 mm will do.
    let (start, end) = if superior_is_up {
        (lowest.first.saturating_sub(reach), lowest.first)
    } else {
        (lowest.last + 1, (lowest.last + 1 + reach).min(nz))
    };
    let faintest = discs.iter().map(|d| d.score).fold(f64::MAX, f64::min);
    let names_certain = (end - start) as f64 * sz >= SACRUM_AT_EDGE_MM
        && !candidates.iter().any(|c| {
            // Wholly below the disc (the disc itself, seen at another level, is not another).
            let below = if superior_is_up { c.2 < end && c.2 >= start } else { c.1 >= start && c.1 < end };
            below && c.0 >= faintest / 2.0
        });
    let mut levels = Vec::with_capacity(discs.len());
    for (name_index, disc) in discs.iter().enumerate() {
        let name = NAMES.get(name_index).map_or_else(|| format!("above T12/L1 ({name_index})"), |n| n.to_string());
        let k = (disc.first + disc.last) as f64 / 2.0;
        // Plane normal: the column's tangent, in LPS.
        let mut normal = [0.0; 3];
        for (axis, component) in volume.axes.iter().zip([0.0, wall.slope(k) * sy, sz]) {
            for d in 0..3 {
                normal[d] += axis[d] * component;
            }
        }
        let mut normal = crate::geometry::normalize(normal);
        if normal[2] < 0.0 {
            normal = normal.map(|v| -v);
        }
        // Centre: the extent of the bodies above and below, where the bone count per column (per
        // row) reaches half its peak, so that noise and osteophytes do not pull. Front to back,
        // each half of the body has its own peak: in porous bone the back wall, doubled by the
        // pedicles, outweighs the front wall. Measured away from the endplates, which a tilted
        // disc plane cuts obliquely.
        let (near, far) = (((BODY_SLAB_MM.0 / sz).round() as usize).max(1), (BODY_SLAB_MM.1 / sz).round() as usize);
        let slabs = (disc.first.saturating_sub(far)..disc.first.saturating_sub(near))
            .chain((disc.last + near).min(nz)..(disc.last + far + 1).min(nz));
        let reach = (BODY_HALF_WIDTH_MM / sx).ceil() as isize;
        let mut per_row = vec![0usize; volume.dims[1]];
        let mut per_column = vec![0usize; nx];
        for ks in slabs {
            for j in rows_in_front(ks, 0.0, depth_mm + 12.0) {
                for di in -reach..=reach {
                    let i = mid_i as isize + di;
                    if i >= 0 && (i as usize) < nx && volume.at(i as usize, j, ks) > BONE_HU {
                        per_row[j] += 1;
                        per_column[i as usize] += 1;
                    }
                }
            }
        }
        let split =
            (wall.j(k) - wall.backward * wall.depth_rows / 2.0).round().clamp(1.0, (per_row.len() - 1) as f64) as usize;
        let centre_j = two_sided_half_peak_middle(&per_row, split)
            .unwrap_or_else(|| wall.j(k) - wall.backward * wall.depth_rows / 2.0);
        let centre_i = half_peak_middle(&per_column).unwrap_or(mid_i as f64);
        let centre = volume.voxel_to_lps([centre_i, centre_j, k]);
        levels.push(DiscLevel { name, name_certain: names_certain, center_lps_mm: centre, normal });
    }
    Ok(levels)
}

/// Middle of the range from the first bin at `first_level` or above to the last bin at
/// `last_level` or above, with both ends interpolated between bins (coarse grids put a bin
/// across the edge).
fn extent_middle(counts: &[usize], first_level: f64, last_level: f64) -> Option<f64> {
    let value = |i: usize| counts[i] as f64;
    let first = counts.iter().position(|&c| c as f64 >= first_level)?;
    let last = counts.iter().rposition(|&c| c as f64 >= last_level)?;
    // Where the count crosses the level, between the last bin below and the first at or above.
    let start =
        if first > 0 { first as f64 - (value(first) - first_level) / (value(first) - value(first - 1)) } else { 0.0 };
    let end = if last + 1 < counts.len() {
        last as f64 + (value(last) - last_level) / (value(last) - value(last + 1))
    } else {
        last as f64
    };
    Some((start + end) / 2.0)
}

/// Middle of the range where a histogram reaches half its peak; `None` when it is empty.
fn half_peak_middle(counts: &[usize]) -> Option<f64> {
    let half = *counts.iter().max()? as f64 / 2.0;
    if half == 0.0 { None } else { extent_middle(counts, half, half) }
}

/// Like [`half_peak_middle`], with the lower end taken against the peak below `split` and the
/// upper end against the peak from `split` on.
fn two_sided_half_peak_middle(counts: &[usize], split: usize) -> Option<f64> {
    let (lower, upper) = counts.split_at(split);
    let lower_half = *lower.iter().max()? as f64 / 2.0;
    let upper_half = *upper.iter().max()? as f64 / 2.0;
    if lower_half == 0.0 || upper_half == 0.0 {
        return half_peak_middle(counts);
    }
    extent_middle(counts, lower_half, upper_half)
}

/// The median column of bone voxels across the volume.
fn midline_column(volume: &Volume) -> Result<usize, SpineError> {
    let [nx, ny, nz] = volume.dims;
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
    Ok(bone_columns[bone_columns.len() / 2])
}

/// Finds the canal slice by slice and fits the bodies' posterior wall (its front edge).
fn posterior_wall(volume: &Volume, mid_i: usize) -> Result<PosteriorWall, SpineError> {
    let [nx, ny, nz] = volume.dims;
    let (sx, sy, sz) = (volume.spacing[0], volume.spacing[1], volume.spacing[2]);
    let band = (MIDLINE_BAND_MM / sx).ceil() as isize;
    let columns: Vec<usize> = (-band..=band)
        .map(|d| mid_i as isize + d)
        .filter(|&i| i >= 0 && (i as usize) < nx)
        .map(|i| i as usize)
        .collect();
    // Mean density of the midline band per (slice, row), rows ordered from front to back. Each
    // voxel is clamped to [-100, 400] HU, so fat does not pull a row below the canal's CSF and
    // dense bone does not drown porous bone.
    let backward: f64 = if volume.axes[1][1] >= 0.0 { 1.0 } else { -1.0 };
    let row_at = |position: usize| if backward > 0.0 { position } else { ny - 1 - position };
    let midline: Vec<Vec<f64>> = (0..nz)
        .map(|k| {
            (0..ny)
                .map(|p| {
                    let j = row_at(p);
                    columns.iter().map(|&i| f64::from(volume.at(i, j, k).clamp(-100.0, 400.0))).sum::<f64>()
                        / columns.len() as f64
                })
                .collect()
        })
        .collect();
    let window = (CANAL_WINDOW_MM / sz).round() as usize;
    let smooth = (1.5 / sy).round().max(1.0) as usize;
    let bridge = (4.0 / sy).round() as usize;
    let mut walls: Vec<(f64, f64)> = Vec::new(); // (k, row of the wall)
    let mut depths: Vec<f64> = Vec::new(); // rows
    for k in 0..nz {
        let slices = k.saturating_sub(window)..(k + window + 1).min(nz);
        let count = slices.len() as f64;
        let pooled: Vec<f64> = (0..ny).map(|p| slices.clone().map(|s| midline[s][p]).sum::<f64>() / count).collect();
        let smoothed: Vec<f64> = (0..ny)
            .map(|p| {
                let range = p.saturating_sub(smooth)..(p + smooth + 1).min(ny);
                let n = range.len() as f64;
                range.map(|q| pooled[q]).sum::<f64>() / n
            })
            .collect();
        // The canal: the first run of CSF-like rows, deep enough, with a column of denser rows
        // right in front of it and denser rows behind it.
        let mut p = 0;
        while p < ny {
            if smoothed[p] >= CANAL_MAX_HU {
                p += 1;
                continue;
            }
            let first = p;
            while p < ny && smoothed[p] < CANAL_MAX_HU {
                p += 1;
            }
            let canal_rows = (p - first) as f64;
            if canal_rows * sy < CANAL_MIN_MM || canal_rows * sy > CANAL_MAX_MM || first == 0 || p >= ny {
                continue;
            }
            // The column in front: rows at column density, short dips bridged.
            let (mut front, mut gap) = (first, 0);
            while front > 0 && gap <= bridge {
                front -= 1;
                if smoothed[front] >= COLUMN_MIN_HU {
                    gap = 0;
                } else {
                    gap += 1;
                }
            }
            let column_rows = (first - front - gap) as f64;
            if column_rows * sy < COLUMN_MIN_MM {
                continue;
            }
            let wall_position = first as f64 - 0.5;
            let wall_row = if backward > 0.0 { wall_position } else { (ny - 1) as f64 - wall_position };
            walls.push((k as f64, wall_row));
            // The column's front edge is measured only where the volume does not cut it.
            if front > 0 {
                depths.push(column_rows);
            }
            break;
        }
    }
    if walls.len() < 5 {
        return Err(SpineError::NotFound("no spinal canal behind a column of bodies on the midline".into()));
    }
    let mut curve = fit_cubic(&walls);
    let mut inliers = walls.clone();
    for limit_mm in [25.0, 12.0, 6.0] {
        let kept: Vec<(f64, f64)> =
            walls.iter().copied().filter(|&(k, j)| (j - eval_cubic(&curve, k)).abs() * sy <= limit_mm).collect();
        if kept.len() < 5 {
            break;
        }
        curve = fit_cubic(&kept);
        inliers = kept;
    }
    let k_first = inliers.iter().map(|p| p.0).fold(f64::MAX, f64::min);
    let k_last = inliers.iter().map(|p| p.0).fold(f64::MIN, f64::max);
    depths.sort_by(f64::total_cmp);
    let depth_rows = if depths.len() >= 5 {
        (depths[depths.len() / 2] * sy).clamp(20.0, 50.0) / sy
    } else {
        TYPICAL_BODY_DEPTH_MM / sy
    };
    Ok(PosteriorWall { curve, k_first, k_last, backward, depth_rows })
}

/// A disc on the bone profile: its first and last slice.
struct ProfileDisc {
    first: usize,
    last: usize,
    /// Contrast with the flanks times length, as in [`disc_candidates`].
    score: f64,
}

/// Every disc candidate at every level: (score, first slice, last slice).
fn disc_candidates(profile: &[f64], levels: &[f64], slice_mm: f64) -> Vec<(f64, usize, usize)> {
    let nz = profile.len();
    // Below this, a dip is the texture of a body's interior, not a disc.
    let min_contrast = MIN_CONTRAST * (levels[levels.len() - 1] - levels[0]);
    let flank = (4.0 / slice_mm).ceil().max(1.0) as usize;
    let mut candidates: Vec<(f64, usize, usize)> = Vec::new(); // (score, first, last)
    for &level in levels {
        let mut k = 0;
        while k < nz {
            if profile[k] > level {
                k += 1;
                continue;
            }
            let first = k;
            while k < nz && profile[k] <= level {
                k += 1;
            }
            let last = k - 1;
            let length = (last - first + 1) as f64 * slice_mm;
            if first == 0 || k == nz || !(DISC_MIN_MM..=DISC_MAX_MM).contains(&length) {
                continue;
            }
            let inside = profile[first..=last].iter().sum::<f64>() / length * slice_mm;
            let before = profile[first.saturating_sub(flank)..first].iter().copied().fold(0.0, f64::max);
            let after = profile[last + 1..(last + 1 + flank).min(nz)].iter().copied().fold(0.0, f64::max);
            let contrast = before.min(after) - inside;
            if contrast >= min_contrast {
                candidates.push((contrast * length.min(12.0), first, last));
            }
        }
    }
    candidates
}

/// Discs on the per-slice bone profile, from the lowest slice index up.
///
/// At each of several levels (the profile's 10th to 80th percentiles), a disc candidate is a stretch below the
/// level, 2 to 16 mm long, with higher slices on both sides and not touching the volume's edge.
/// Dense bone shows its discs at every level; porous bone shows them either between endplates
/// (high levels: the interiors are as low as the discs) or below the interiors' cortical ring (low
/// levels: the disc has no cortex at all). Candidates are then taken by contrast with their
/// flanks, times their length up to 12 mm (a Schmorl's node beside its disc is shorter), and a
/// candidate closer than 18 mm to one already taken is the same disc seen at another level, or a
/// node.
fn select_discs(candidates: &[(f64, usize, usize)], slice_mm: f64) -> Vec<ProfileDisc> {
    let mut candidates = candidates.to_vec();
    candidates.sort_by(|a, b| b.0.total_cmp(&a.0));
    let min_gap = (MIN_DISC_SPACING_MM / slice_mm).round() as isize;
    let mut taken: Vec<ProfileDisc> = Vec::new();
    for (score, first, last) in candidates {
        let centre = (first + last) as isize;
        if taken.iter().all(|d| ((d.first + d.last) as isize - centre).abs() >= 2 * min_gap) {
            taken.push(ProfileDisc { first, last, score });
        }
    }
    taken.sort_by_key(|d| d.first);
    drop_mid_body_dips(&mut taken);
    taken
}

/// A body lies between consecutive discs, so their spacing is about even along the column. A
/// disc whose gaps to both neighbours are each well under the usual spacing, while together
/// they make about one, is the middle of a body: in porous bone the cancellous interior inside
/// its cortical ring can dip like a disc. Such dips are dropped, the weakest first.
fn drop_mid_body_dips(taken: &mut Vec<ProfileDisc>) {
    while taken.len() >= 4 {
        let centres: Vec<f64> = taken.iter().map(|d| (d.first + d.last) as f64 / 2.0).collect();
        let gaps: Vec<f64> = centres.windows(2).map(|w| w[1] - w[0]).collect();
        let mut sorted = gaps.clone();
        sorted.sort_by(f64::total_cmp);
        let usual = sorted[sorted.len() / 2];
        let mid_body = (1..taken.len() - 1)
            .filter(|&i| {
                let (below, above) = (gaps[i - 1], gaps[i]);
                below < 0.65 * usual && above < 0.65 * usual && (0.75..1.35).contains(&((below + above) / usual))
            })
            .min_by(|&i, &j| taken[i].score.total_cmp(&taken[j].score));
        match mid_body {
            Some(i) => {
                taken.remove(i);
            }
            None => return,
        }
    }
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
                let pivot_row = a[col];
                for (value, pivot_value) in a[row][col..].iter_mut().zip(&pivot_row[col..]) {
                    *value -= f * pivot_value;
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
