//! Disc levels on a CT volume: where each intervertebral disc is, its plane, its name, and
//! whether that name is certain.
//!
//! Built for the CT a spine, abdomen or PET/CT service produces, not only for spine protocols:
//! chest-to-pelvis fields of view, low-dose noisy attenuation CTs, slices 0.5 to 5 mm, porous
//! bodies whose interior is no denser than a disc. The steps:
//!
//! 1. The spinal canal, slice by slice ([`canal`]): a soft-tissue hole ringed by bone, followed
//!    through the slices as one continuous path.
//! 2. The discs ([`profile`]): in a box inside the bodies, in front of the canal, short dips of
//!    the bone share between two endplate peaks, measured in sagittally tilted planes so that
//!    the oblique lower lumbar discs stand out too.
//! 3. The landmarks ([`anchors`]): the sacrum between the iliac bones, and the lowest rib head.
//! 4. The names, counted from the sacrum (the disc above it is L5/S1) and from the ribs (the disc
//!    below the lowest rib-bearing vertebra is T12/L1), as a radiologist counts. A name is
//!    certain only when a landmark anchors the count, no disc is missing between the landmark
//!    and the level (no gap much wider than its neighbours), and, when both landmarks are seen,
//!    the two counts agree. Otherwise every level keeps its best name, marked uncertain.

pub mod anchors;
pub mod canal;
pub mod profile;

use serde::Serialize;

use crate::analysis::volume::Volume;

/// Bone threshold, HU: cortical bone and endplates are far above it, muscle and disc below.
const BONE_HU: f32 = 160.0;
/// The contrast (in bone share) of a disc with its flanking endplates above which a dip counts
/// for a disc on its own; fainter dips count only where they make the column regular.
const MIN_CONTRAST: f64 = 0.12;
/// A disc fainter than this share of the clearest ones within a body's span around it earns
/// nothing on its own: a dip inside a porous body can be as deep as a disc in dense bone.
const FAINT_DISC_RATIO: f64 = 0.5;
/// The faintest dip that may still be a disc.
const MIN_CANDIDATE_CONTRAST: f64 = 0.02;
/// Weight of the squared log ratio of two consecutive spacings, against contrast.
const UNEVEN_SPACING_COST: f64 = 0.5;
/// The lower thoracic and lumbar bodies with their discs span this much or more, mm; a shorter
/// span costs its squared log ratio to it, times the weight, so that a run of dips halfway
/// inside porous bodies, evenly spaced as it is, does not pass for a column.
const SHORT_SPAN_MM: f64 = 24.0;
const SHORT_SPAN_COST: f64 = 2.0;
/// Two discs are at least this far apart: a vertebral body is 15 mm tall or more.
const MIN_DISC_SPACING_MM: f64 = 15.0;
/// Around a disc, the canal must have been seen this clearly (mean ring score over 40 mm), as a
/// share of how clearly it was seen along the whole track: below the sacrum the track passes
/// through the pelvis, where ring-like bone is no canal.
const MIN_CANAL_CONFIDENCE: f32 = 0.6;
/// The slabs of the bodies above and below a disc whose bone gives its centre: from and to this
/// distance from the disc, mm.
const BODY_SLAB_MM: (f64, f64) = (4.0, 14.0);
/// Half-width of the box in which a body's side-to-side extent is measured, mm.
const BODY_HALF_WIDTH_MM: f64 = 30.0;
/// Where the bodies lie in front of the canal's centre, mm: their back wall and far enough for
/// the deepest lumbar body.
const BODY_FROM_CANAL_MM: (f64, f64) = (10.0, 62.0);
/// Where a body's centre usually lies in front of the canal's centre, mm: a canal's radius
/// and half a lumbar body's depth.
const TYPICAL_BODY_CENTRE_MM: f64 = 26.0;
/// Windows below and above a disc in which the sacrum is looked for, mm.
const SACRUM_WINDOW_MM: (f64, f64) = (6.0, 28.0);
/// Bone share beside the column that the sacrum's alae and sacroiliac joints give at least.
const SACRUM_ALA_SHARE: f64 = 0.12;
/// The tallest lumbar body with one disc, mm: two discs further apart than this have a body
/// between them, not a dip inside one.
const MAX_BODY_AND_DISC_MM: f64 = 50.0;
/// Half the stretch of canal whose course gives a disc's plane, mm.
const COLUMN_TANGENT_MM: f64 = 25.0;
/// L1 to L5 with their discs: no rib head lies closer above L5/S1 than this, mm.
const MIN_RIBS_ABOVE_SACRUM_MM: f64 = 100.0;
/// A gap between two neighbouring discs this much wider than the usual spacing may hide a disc
/// the locator did not find: a count through it is not certain.
const MISSED_DISC_RATIO: f64 = 1.6;

/// The disc names counted up from L5/S1: the lumbar discs and the two above them. Higher
/// thoracic discs are not reported: the network was trained on lumbar discs, and a count far
/// from its landmark is the likeliest to slip.
fn name_from_sacrum(index: i64) -> Option<String> {
    match index {
        0..=4 => Some(format!("L{}/{}", 5 - index, if index == 0 { "S1".into() } else { format!("L{}", 6 - index) })),
        5 => Some("T12/L1".into()),
        6 => Some("T11/T12".into()),
        _ => None,
    }
}

#[derive(Debug, Clone, Serialize)]
pub struct DiscLevel {
    pub name: String,
    /// True only when the name was counted from a landmark (the sacrum, or T12 by its ribs) in
    /// the same volume, through no gap that could hide a disc, and the landmarks agree.
    pub name_certain: bool,
    pub center_lps_mm: [f64; 3],
    pub normal: [f64; 3],
}

impl DiscLevel {
    /// The name as a reader must see it: "L3/L4", or "L3/L4 (level uncertain)".
    pub fn label(&self) -> String {
        if self.name_certain { self.name.clone() } else { format!("{} (level uncertain)", self.name) }
    }
}

#[derive(Debug, thiserror::Error)]
pub enum SpineError {
    #[error("no vertebral column found: {0}")]
    NotFound(String),
    #[error(transparent)]
    Volume(#[from] crate::analysis::volume::VolumeError),
}

/// Row `j` of slice `k`.
fn row(volume: &Volume, k: usize, j: usize) -> &[f32] {
    let start = (k * volume.dims[1] + j) * volume.dims[0];
    &volume.hu[start..start + volume.dims[0]]
}

/// Rows per mm towards the patient's front (LPS -y), signed: -1/sy when rows run backwards.
fn row_step_towards_front(volume: &Volume) -> f64 {
    if volume.axes[1][1] >= 0.0 { -1.0 } else { 1.0 }
}

/// Finds the discs of a volume, from the lowest up, and names them. A volume not stored as axial
/// slices (a sagittal acquisition, a NIfTI file, a gantry-tilted scan) is resampled to an axial
/// grid first.
pub fn locate_discs(volume: &Volume) -> Result<Vec<DiscLevel>, SpineError> {
    if !volume.is_axis_aligned_axial() {
        return locate_discs(&volume.resample_axial_grid(volume.native_axial_spacing(0.5), false, -1000.0)?);
    }
    let [nx, ny, nz] = volume.dims;
    let (sx, sy, sz) = (volume.spacing[0], volume.spacing[1], volume.spacing[2]);
    if nz < 3 {
        return Err(SpineError::NotFound(format!("{nz} slices")));
    }
    let debug = std::env::var_os("IDAICS_SPINE_DEBUG").is_some();
    let canal = canal::track(volume)
        .ok_or_else(|| SpineError::NotFound("no spinal canal (soft tissue ringed by bone) in any slice".into()))?;
    let profile = profile::Profile::measure(volume, &canal);
    // Height along the patient's axis, mm, of a fractional slice index.
    let up = if volume.axes[2][2] >= 0.0 { 1.0 } else { -1.0 };
    let height = |k: f64| up * k * sz;
    if debug {
        for c in profile.candidates(sz, 0.03) {
            eprintln!(
                "cand k {:.1} h {:.1} contrast {:.3} resid {:.2} tilt {} conf {:.2}",
                c.k,
                height(c.k),
                c.contrast,
                c.residual,
                c.tilt_degrees,
                canal.confidence(c.k, 20.0, sz) / canal.typical_score()
            );
        }
    }
    let mut candidates: Vec<profile::ProfileDisc> = profile
        .candidates(sz, MIN_CANDIDATE_CONTRAST)
        .into_iter()
        .filter(|d| canal.confidence(d.k, 20.0, sz) >= MIN_CANAL_CONFIDENCE * canal.typical_score())
        .collect();
    candidates.sort_by(|a, b| height(a.k).total_cmp(&height(b.k)));
    let heights: Vec<f64> = candidates.iter().map(|c| height(c.k)).collect();
    let mut discs: Vec<profile::ProfileDisc> = most_plausible_column(
        &heights,
        &candidates.iter().map(|c| c.contrast * (1.0 - c.residual)).collect::<Vec<_>>(),
    )
    .into_iter()
    .map(|i| candidates[i])
    .collect();
    let ala = anchors::ala_share(volume, &canal);
    let heads = anchors::rib_heads(volume, &canal);
    if debug {
        for (k, share) in ala.iter().enumerate() {
            let (ci, cj) = (canal.i[k], canal.j[k]);
            eprintln!(
                "k {k:4} h {:7.1} canal ({ci:5.1}, {cj:5.1}) ring {:.2} bone {:.2} ala {share:.2}",
                height(k as f64),
                canal.score[k],
                profile.axial()[((k as f64 * sz / profile::STEP_MM) as usize).min(profile.axial().len() - 1)]
            );
        }
        for d in &discs {
            eprintln!("disc k {:.1} h {:.1} contrast {:.2} tilt {}", d.k, height(d.k), d.contrast, d.tilt_degrees);
        }
        for r in &heads {
            eprintln!("rib head k {:.1} h {:.1}", r.k, height(r.k));
        }
    }
    if discs.is_empty() {
        return Err(SpineError::NotFound("no disc between two vertebral bodies".into()));
    }
    // The sacrum: below L5/S1 the alae fill the space beside the column on both sides; above it,
    // beside L5, they do not. Among the discs that show this, the clearest.
    let ala_mean = |from_mm: f64, to_mm: f64| -> Option<f64> {
        let slices: Vec<f32> =
            (0..nz).filter(|&k| (from_mm..=to_mm).contains(&height(k as f64))).map(|k| ala[k]).collect();
        let wanted = ((to_mm - from_mm) / sz).floor().max(1.0);
        (slices.len() as f64 >= 0.8 * wanted)
            .then(|| slices.iter().map(|&v| f64::from(v)).sum::<f64>() / slices.len() as f64)
    };
    let sacral_disc = discs
        .iter()
        .enumerate()
        .filter_map(|(index, d)| {
            let h = height(d.k);
            let below = ala_mean(h - SACRUM_WINDOW_MM.1, h - SACRUM_WINDOW_MM.0)?;
            let above = ala_mean(h + SACRUM_WINDOW_MM.0, h + SACRUM_WINDOW_MM.1)?;
            if debug {
                eprintln!("disc h {h:.1}: alae below {below:.2} above {above:.2}");
            }
            // Ribs right above it: the bone beside the column is rib heads, not the alae.
            let ribs_close_above = heads.iter().any(|r| (0.0..MIN_RIBS_ABOVE_SACRUM_MM).contains(&(height(r.k) - h)));
            (below >= SACRUM_ALA_SHARE && above < 0.6 * below && !ribs_close_above).then_some((index, below - above))
        })
        .max_by(|a, b| a.1.total_cmp(&b.1))
        .map(|(index, _)| index);
    // Under L5/S1 lie the sacrum's fused segments and the pelvis: nothing there is a disc to report.
    let sacral_disc = sacral_disc.map(|index| {
        discs.drain(..index);
        0
    });
    // T12: the vertebra of the lowest rib head, with the vertebra below it (L1) seen free of
    // ribs. A rib head under the lowest disc leaves the count unanchored: that vertebra bears
    // ribs itself, and T12 may lie lower still. Under the sacrum, bone is pelvis, not ribs.
    let lowest_disc = height(discs[0].k);
    let rib_floor = if sacral_disc.is_some() { lowest_disc } else { f64::MIN };
    let rib_disc = heads
        .iter()
        .map(|r| height(r.k))
        .filter(|&h| h > rib_floor)
        .min_by(f64::total_cmp)
        .filter(|&h| h > lowest_disc)
        .and_then(|h| {
            let below = discs.iter().rposition(|d| height(d.k) < h)?;
            let above_top = below + 1 == discs.len();
            // A head above the highest disc counts only within a body's height of it.
            (!above_top || h - height(discs[below].k) < 35.0).then_some(below)
        })
        .filter(|&below| {
            // L1 must be in view far enough below its upper disc to show it bears no rib.
            let h = height(discs[below].k);
            (0..nz).any(|k| height(k as f64) <= h - 20.0)
        });
    let spacings: Vec<f64> = discs.windows(2).map(|w| height(w[1].k) - height(w[0].k)).collect();
    let usual = {
        let mut sorted = spacings.clone();
        sorted.sort_by(f64::total_cmp);
        sorted.get(sorted.len() / 2).copied().unwrap_or(30.0)
    };
    // Index ranges [a, b) of discs with no suspicious gap between neighbours.
    let missed_between = |a: usize, b: usize| -> bool {
        let (low, high) = (a.min(b), a.max(b));
        spacings[low..high].iter().any(|&s| s > MISSED_DISC_RATIO * usual && s > 45.0)
    };
    // Index of each disc counted from L5/S1, and whether that index is certain.
    let (sacrum_offset, anchor): (i64, Option<usize>) = match (sacral_disc, rib_disc) {
        (Some(s), Some(r)) if r as i64 - s as i64 == 5 => (-(s as i64), Some(s)),
        (Some(s), Some(r)) => {
            tracing::warn!(
                lumbar_discs_between = r as i64 - s as i64,
                "the counts from the sacrum and from the ribs disagree (a transitional vertebra, or a disc missed): \
                 levels named from the sacrum and marked uncertain"
            );
            (-(s as i64), None)
        }
        (Some(s), None) => (-(s as i64), Some(s)),
        (None, Some(r)) => (5 - r as i64, Some(r)),
        (None, None) => (0, None),
    };
    let (near, far) = (((BODY_SLAB_MM.0 / sz).round() as usize).max(1), (BODY_SLAB_MM.1 / sz).round() as usize);
    let front = row_step_towards_front(volume);
    let mut levels = Vec::with_capacity(discs.len());
    for (index, disc) in discs.iter().enumerate() {
        let counted = index as i64 + sacrum_offset;
        let Some(name) = name_from_sacrum(counted) else { continue };
        let name_certain = anchor.is_some_and(|a| !missed_between(a, index));
        // Centre: the extent of the bodies above and below, where the bone count per column (per
        // row) reaches half its peak, so that noise and osteophytes do not pull. Front to back,
        // each half of the body has its own peak: in porous bone the back wall, doubled by the
        // pedicles, outweighs the front wall. Measured away from the endplates, which a tilted
        // disc plane cuts obliquely.
        let k_mid = disc.k.round() as usize;
        let slabs = (k_mid.saturating_sub(far)..k_mid.saturating_sub(near))
            .chain((k_mid + near).min(nz)..(k_mid + far + 1).min(nz));
        let (ci, cj) = canal.at(disc.k);
        let reach = (BODY_HALF_WIDTH_MM / sx).ceil() as isize;
        let mut per_row = vec![0usize; ny];
        let mut per_column = vec![0usize; nx];
        let rows: Vec<usize> = {
            let a = cj + front * BODY_FROM_CANAL_MM.0 / sy;
            let b = cj + front * BODY_FROM_CANAL_MM.1 / sy;
            let (low, high) = (a.min(b).round().max(0.0) as usize, a.max(b).round().max(0.0) as usize);
            (low..=high.min(ny - 1)).collect()
        };
        for ks in slabs {
            for &j in &rows {
                let values = row(volume, ks, j);
                for di in -reach..=reach {
                    let i = ci.round() as isize + di;
                    if i >= 0 && (i as usize) < nx && values[i as usize] > BONE_HU {
                        per_row[j] += 1;
                        per_column[i as usize] += 1;
                    }
                }
            }
        }
        let usual_centre = cj + front * TYPICAL_BODY_CENTRE_MM / sy;
        let split = usual_centre.round().clamp(1.0, (ny - 1) as f64) as usize;
        let centre_j = two_sided_half_peak_middle(&per_row, split).unwrap_or(usual_centre);
        if debug {
            let shown: Vec<String> = rows.iter().map(|&j| format!("{j}:{}", per_row[j])).collect();
            eprintln!(
                "centre of {name}: canal j {cj:.1}, split {split}, centre j {centre_j:.1}; rows {}",
                shown.join(" ")
            );
        }
        let centre_i = half_peak_middle(&per_column).unwrap_or(ci);
        // The disc's plane passes through the profile box's centre at `disc.k`; at the body's
        // centre it lies higher or lower by the tilt.
        let slope = disc.tilt_degrees.to_radians().tan();
        let profile_centre = cj + front * profile::BOX_CENTRE_MM / sy;
        let ahead_mm = (centre_j - profile_centre) * sy * front;
        let k = disc.k + ahead_mm * slope / sz;
        let centre = volume.voxel_to_lps([centre_i, centre_j, k]);
        // The plane the slices are cut in: across the column, whose course the canal follows
        // (a line fitted over 50 mm). The profile's tilt is coarser and, where dense bone saturates the
        // contrast, less sure; the model was trained on slices cut across the column.
        let (di, dj) = canal.slope(k, COLUMN_TANGENT_MM / sz);
        let tangent =
            crate::geometry::sub(volume.voxel_to_lps([ci + di, cj + dj, k + 1.0]), volume.voxel_to_lps([ci, cj, k]));
        let mut normal = crate::geometry::normalize(tangent);
        if normal[2] < 0.0 {
            normal = normal.map(|v| -v);
        }
        levels.push(DiscLevel { name, name_certain, center_lps_mm: centre, normal });
    }
    if levels.is_empty() {
        return Err(SpineError::NotFound("no disc between two vertebral bodies".into()));
    }
    Ok(levels)
}

/// The chain of candidates, by index into `heights` (ascending), that a column of bodies and
/// discs most plausibly made. Each candidate earns its contrast less a bar: [`MIN_CONTRAST`], or
/// half the contrast of the clearest dips within a body and disc's span on either side,
/// whichever is higher, so a dip inside a body earns nothing on its own and a faint disc is taken
/// only where it keeps the column regular. Each body costs the squared log ratio of its span to
/// the one below, as consecutive vertebrae differ in height by a few mm, not by half: a dip
/// halfway inside a body halves two spans, and a disc left out doubles one. Exact, by dynamic
/// programming over the last two discs of a chain: a few hundred candidates at most.
fn most_plausible_column(heights: &[f64], contrasts: &[f64]) -> Vec<usize> {
    let n = heights.len();
    let clearest_within = |i: usize, below: bool| {
        (0..n)
            .filter(|&q| {
                let d = heights[q] - heights[i];
                if below { (-MAX_BODY_AND_DISC_MM..0.0).contains(&d) } else { d > 0.0 && d <= MAX_BODY_AND_DISC_MM }
            })
            .map(|q| contrasts[q])
            .fold(None, |m: Option<f64>, c| Some(m.map_or(c, |m| m.max(c))))
    };
    let rewards: Vec<f64> = (0..n)
        .map(|i| {
            let neighbours = match (clearest_within(i, true), clearest_within(i, false)) {
                (Some(a), Some(b)) => a.min(b),
                (Some(a), None) | (None, Some(a)) => a,
                (None, None) => 0.0,
            };
            contrasts[i] - MIN_CONTRAST.max(FAINT_DISC_RATIO * neighbours)
        })
        .collect();
    let reward = |i: usize| rewards[i];
    let unevenness = |lower: f64, upper: f64| UNEVEN_SPACING_COST * (upper / lower).ln().powi(2);
    let shortness = |span: f64| SHORT_SPAN_COST * (SHORT_SPAN_MM / span).ln().max(0.0).powi(2);
    // score[i][j], j < i: the best chain ending with discs j then i; from[i][j]: the disc before j.
    let mut score = vec![vec![f64::MIN; n]; n];
    let mut from = vec![vec![usize::MAX; n]; n];
    let mut best: Option<(f64, usize, usize)> = None;
    for i in 0..n {
        for j in 0..i {
            let spacing = heights[i] - heights[j];
            if spacing < MIN_DISC_SPACING_MM {
                continue;
            }
            let (mut value, mut before) = (reward(j) - shortness(spacing), usize::MAX);
            for k in 0..j {
                if score[j][k] == f64::MIN {
                    continue;
                }
                let v = score[j][k] - unevenness(heights[j] - heights[k], spacing) - shortness(spacing);
                if v > value {
                    (value, before) = (v, k);
                }
            }
            score[i][j] = value + reward(i);
            from[i][j] = before;
            if best.is_none_or(|(b, _, _)| score[i][j] > b) {
                best = Some((score[i][j], j, i));
            }
        }
    }
    let single = (0..n).max_by(|&a, &b| reward(a).total_cmp(&reward(b)));
    match (best, single) {
        (Some((value, mut j, mut i)), Some(s)) if value >= reward(s) => {
            let mut chain = vec![i, j];
            while from[i][j] != usize::MAX {
                (i, j) = (j, from[i][j]);
                chain.push(j);
            }
            chain.reverse();
            chain
        }
        (_, Some(s)) if reward(s) > 0.0 => vec![s],
        _ => Vec::new(),
    }
}

/// Names the levels of a block whose count no landmark anchors from a block of the same series
/// whose count one does (the two lie on either side of a gap in the archive, along `axis`, the
/// patient's head-foot direction). The number of discs across the gap is the distance between
/// the nearest discs on either side over the spacing of the anchored discs nearest the gap:
/// a best guess, so every name stays uncertain; levels counted beyond L5/S1 or T11/T12 are
/// dropped, as in one block. Without this, an unanchored block above a gap would count up from
/// its own lowest disc as L5/S1.
pub fn name_across_gap(anchored: &[DiscLevel], unanchored: &[DiscLevel], axis: [f64; 3]) -> Vec<DiscLevel> {
    let along = |l: &DiscLevel| crate::geometry::dot(l.center_lps_mm, axis);
    let index_of = |name: &str| (0..7).find(|&i| name_from_sacrum(i).as_deref() == Some(name));
    let mut counted: Vec<(f64, i64)> =
        anchored.iter().filter(|l| l.name_certain).filter_map(|l| Some((along(l), index_of(&l.name)?))).collect();
    counted.sort_by(|a, b| a.0.total_cmp(&b.0));
    let mut others: Vec<&DiscLevel> = unanchored.iter().collect();
    others.sort_by(|a, b| along(a).total_cmp(&along(b)));
    let (Some(&(low, low_index)), Some(&(high, high_index)), Some(first), Some(last)) =
        (counted.first(), counted.last(), others.first(), others.last())
    else {
        return Vec::new();
    };
    // The anchored spacing nearest the gap, or a lumbar body and disc's.
    let spacing = |a: usize, b: usize| {
        counted.get(a).zip(counted.get(b)).map(|(x, y)| (y.0 - x.0).abs() / (y.1 - x.1).abs().max(1) as f64)
    };
    let n = counted.len();
    let (start_index, step) = if along(first) > high {
        let s = if n >= 2 { spacing(n - 2, n - 1) } else { None }.unwrap_or(35.0);
        let steps = ((along(first) - high) / s).round().max(1.0) as i64;
        (high_index + steps, 1)
    } else if along(last) < low {
        let s = spacing(0, 1).unwrap_or(35.0);
        let steps = ((low - along(last)) / s).round().max(1.0) as i64;
        (low_index - steps, -1)
    } else {
        return Vec::new();
    };
    // Count away from the anchored block: upwards from the lowest, or downwards from the highest.
    let ordered: Vec<&DiscLevel> = if step > 0 { others } else { others.into_iter().rev().collect() };
    let mut named: Vec<DiscLevel> = ordered
        .into_iter()
        .enumerate()
        .filter_map(|(i, level)| {
            let name = name_from_sacrum(start_index + step * i as i64)?;
            Some(DiscLevel { name, name_certain: false, ..level.clone() })
        })
        .collect();
    // From the lowest up, as every block's levels are.
    if step < 0 {
        named.reverse();
    }
    named
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

#[cfg(test)]
mod tests {
    #[test]
    fn names_count_up_from_the_sacrum() {
        let names: Vec<String> = (-1..9).filter_map(super::name_from_sacrum).collect();
        assert_eq!(names, ["L5/S1", "L4/L5", "L3/L4", "L2/L3", "L1/L2", "T12/L1", "T11/T12"]);
    }

    fn level(name: &str, z: f64, certain: bool) -> super::DiscLevel {
        super::DiscLevel {
            name: name.into(),
            name_certain: certain,
            center_lps_mm: [0.0, 0.0, z],
            normal: [0.0, 0.0, 1.0],
        }
    }

    #[test]
    fn a_block_beyond_a_gap_is_counted_on_from_the_anchored_one_and_stays_uncertain() {
        let below = [level("L5/S1", 0.0, true), level("L4/L5", 35.0, true), level("L3/L4", 70.0, true)];
        // Two discs missing in the gap (L2/L3, L1/L2), then T12/L1 and T11/T12, then a thoracic
        // disc that is not reported.
        let above = [level("L5/S1", 173.0, false), level("L4/L5", 203.0, false), level("L3/L4", 231.0, false)];
        let named = super::name_across_gap(&below, &above, [0.0, 0.0, 1.0]);
        let got: Vec<(&str, bool, f64)> =
            named.iter().map(|l| (l.name.as_str(), l.name_certain, l.center_lps_mm[2])).collect();
        assert_eq!(got, [("T12/L1", false, 173.0), ("T11/T12", false, 203.0)]);
        // And downwards: an anchored block above, an unanchored one below the gap.
        let above = [level("T12/L1", 200.0, true), level("L1/L2", 165.0, true)];
        let below = [level("L5/S1", 60.0, false), level("L4/L5", 95.0, false)];
        let named = super::name_across_gap(&above, &below, [0.0, 0.0, 1.0]);
        let got: Vec<&str> = named.iter().map(|l| l.name.as_str()).collect();
        assert_eq!(got, ["L4/L5", "L3/L4"]);
    }
}
