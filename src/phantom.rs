//! Synthetic lumbar spine CT with ground truth, for tests and training.
//!
//! The spine runs T12 to the sacrum along a lordotic curve in the sagittal plane. Each vertebra is
//! an elliptic body (cancellous bone in a cortical shell) with a neural arch around the spinal canal
//! and a spinous process; discs fill the gaps, drawn to the paper's radiological definitions
//! (../shared/data/paper/idaics-tables.md): a bulge extends beyond the vertebral edge over more
//! than 25% of the disc's circumference; a protrusion is focal (under 25%), its base wider than its
//! extension; a Schmorl's node is disc material through the endplate into the vertebral body.
//! Muscle, fat, air and noise surround it; position, curvature and sizes vary with the seed.

use std::f64::consts::PI;
use std::path::Path;

use serde::{Deserialize, Serialize};

use crate::geometry::{add, dot, scale, sub};
use crate::synthetic::{
    AxialPlacement, PatientPosition, SeriesSpec, SyntheticError, SyntheticSeries, write_axial_series,
};

/// The disc levels from the sacrum up, in the order the spine stage counts them.
pub const LEVELS: [&str; 6] = ["L5/S1", "L4/L5", "L3/L4", "L2/L3", "L1/L2", "T12/L1"];

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Condition {
    Normal,
    Schmorl,
    Bulge,
    Protrusion,
}

impl Condition {
    const ALL: [Condition; 4] = [Condition::Normal, Condition::Schmorl, Condition::Bulge, Condition::Protrusion];

    /// The finding class the agent should report for a disc in this condition.
    pub fn class(self) -> &'static str {
        use crate::analysis::findings::{BULGE, NORMAL, PROTRUSION, SCHMORL};
        match self {
            Condition::Normal => NORMAL,
            Condition::Schmorl => SCHMORL,
            Condition::Bulge => BULGE,
            Condition::Protrusion => PROTRUSION,
        }
    }
}

impl std::str::FromStr for Condition {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, String> {
        let s = s.trim();
        Condition::ALL
            .into_iter()
            .find(|c| c.class() == s)
            .ok_or_else(|| format!("{s:?}: expected normal, schmorl, bulge or protrusion"))
    }
}

/// Parses `"L1/L2=normal,L4/L5=bulge"`; levels not named are normal.
pub fn parse_levels(text: &str) -> Result<Vec<(String, Condition)>, String> {
    let mut out: Vec<(String, Condition)> = LEVELS.iter().map(|l| (l.to_string(), Condition::Normal)).collect();
    for item in text.split(',').map(str::trim).filter(|s| !s.is_empty()) {
        let (level, condition) = item.split_once('=').ok_or_else(|| format!("{item:?}: expected LEVEL=CONDITION"))?;
        let slot = out
            .iter_mut()
            .find(|(l, _)| l == level.trim())
            .ok_or_else(|| format!("{level:?}: not one of {}", LEVELS.join(", ")))?;
        slot.1 = condition.parse()?;
    }
    Ok(out)
}

#[derive(Debug, Clone)]
pub struct PhantomSpec {
    pub seed: u64,
    pub levels: Vec<(String, Condition)>,
    pub pixel_spacing_mm: f64,
    pub slice_thickness_mm: f64,
    pub size: u16,
    /// Osteoporotic bone as in many of the elderly patients who get lumbar CT: cancellous bone
    /// no denser than the discs, a thin cortical shell, and the noise of a low-dose scan.
    pub osteoporotic: bool,
    /// Gantry tilt about the patient's left-right axis, degrees: the image planes tilt while the
    /// table, and so each slice's centre, moves along the patient axis, as in lumbar protocols
    /// that angle the gantry towards the disc planes. 0 for a plain axial stack.
    pub gantry_tilt_degrees: f64,
    /// How the patient lay: which way the image rows and columns run through the patient.
    pub patient_position: PatientPosition,
}

impl Default for PhantomSpec {
    fn default() -> Self {
        PhantomSpec {
            seed: 1,
            levels: LEVELS.iter().map(|l| (l.to_string(), Condition::Normal)).collect(),
            pixel_spacing_mm: 0.8,
            slice_thickness_mm: 1.0,
            size: 512,
            osteoporotic: false,
            gantry_tilt_degrees: 0.0,
            patient_position: PatientPosition::Hfs,
        }
    }
}

/// One disc of the ground truth.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct DiscTruth {
    pub name: String,
    pub center_lps_mm: [f64; 3],
    pub normal: [f64; 3],
    pub condition: Condition,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct Truth {
    pub seed: u64,
    pub study_uid: String,
    pub series_uid: String,
    pub pixel_spacing_mm: f64,
    pub slice_thickness_mm: f64,
    pub levels: Vec<DiscTruth>,
}

/// A segment of the spine: a vertebral body or a disc, with its local frame.
#[derive(Debug, Clone)]
struct Segment {
    center: [f64; 3],
    /// Along the spine (superior-ish).
    axis: [f64; 3],
    /// Anterior-posterior direction in the segment's plane (posterior positive).
    ap: [f64; 3],
    half_height: f64,
    /// Lateral and AP semi-axes of the ellipse, mm.
    radii: [f64; 2],
    kind: SegmentKind,
}

#[derive(Debug, Clone, Copy, PartialEq)]
enum SegmentKind {
    Vertebra,
    Sacrum,
    /// `level` indexes [`LEVELS`].
    Disc {
        level: usize,
        condition: Condition,
    },
}

struct Anatomy {
    segments: Vec<Segment>,
    /// Schmorl's nodes: centre and radius of disc material inside a vertebral body, and the level
    /// (index into [`LEVELS`]) of the disc it came from.
    nodes: Vec<([f64; 3], f64, usize)>,
    body_center: [f64; 2],
    body_radii: [f64; 2],
    z_range: [f64; 2],
    /// T12's ribs: segments (from, to) of cortical bone, `RIB_RADIUS_MM` thick. T12 is the
    /// lowest vertebra that bears ribs, and the locator counts from them too.
    ribs: Vec<([f64; 3], [f64; 3])>,
    /// Bone densities, HU.
    cancellous: f64,
    cortical: f64,
}

/// Deterministic uniforms for the anatomy's variations.
struct Rng(u64);
impl Rng {
    fn next(&mut self) -> f64 {
        self.0 = self.0.wrapping_add(0x9E37_79B9_7F4A_7C15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
        ((z ^ (z >> 31)) >> 11) as f64 / (1u64 << 53) as f64
    }
    fn range(&mut self, lo: f64, hi: f64) -> f64 {
        lo + (hi - lo) * self.next()
    }
}

fn build_anatomy(spec: &PhantomSpec) -> Anatomy {
    let mut rng = Rng(spec.seed.wrapping_mul(0x2545_F491_4F6C_DD1D));
    let x0 = rng.range(-15.0, 15.0);
    let y0 = rng.range(-10.0, 25.0);
    let lordosis = rng.range(6.0, 16.0);
    let sacrum_top = rng.range(-130.0, -100.0);
    // Heights from the sacrum up: disc, body, disc, body, ... ending with T12's body.
    let disc_heights = [11.0, 11.5, 10.5, 9.5, 9.0, 8.0].map(|h: f64| h * rng.range(0.9, 1.1));
    let body_heights = [27.0, 27.5, 27.5, 27.0, 26.0, 24.0].map(|h: f64| h * rng.range(0.95, 1.05));
    let total: f64 = disc_heights.iter().sum::<f64>() + body_heights.iter().sum::<f64>();
    // Spine centre line: y bows anteriorly (smaller y) across the lumbar span.
    let centre = |z: f64| -> [f64; 3] {
        let t = ((z - sacrum_top) / total).clamp(-0.3, 1.3);
        [x0, y0 - lordosis * (PI * t).sin(), z]
    };
    let tangent = |z: f64| -> [f64; 3] {
        let t = (z - sacrum_top) / total;
        let dy = -lordosis * PI / total * (PI * t.clamp(-0.3, 1.3)).cos();
        let n = (dy * dy + 1.0).sqrt();
        [0.0, dy / n, 1.0 / n]
    };
    let segment = |z_mid: f64, half_height: f64, radii: [f64; 2], kind: SegmentKind| -> Segment {
        let axis = tangent(z_mid);
        // Posterior direction perpendicular to the axis, in the sagittal plane.
        let ap = [0.0, axis[2], -axis[1]];
        Segment { center: centre(z_mid), axis, ap, half_height, radii, kind }
    };
    let conditions: Vec<Condition> = LEVELS
        .iter()
        .map(|l| spec.levels.iter().find(|(n, _)| n == l).map_or(Condition::Normal, |(_, c)| *c))
        .collect();
    let mut segments = Vec::new();
    let mut nodes = Vec::new();
    // The sacrum: a wide block below S1's upper endplate, tilted back.
    segments.push(segment(sacrum_top - 25.0, 25.0, [26.0, 19.0], SegmentKind::Sacrum));
    let mut z = sacrum_top;
    for level in 0..6 {
        let (rx, ry) = (rng.range(20.0, 24.0), rng.range(15.0, 17.5));
        let disc_mid = z + disc_heights[level] / 2.0;
        segments.push(segment(
            disc_mid,
            disc_heights[level] / 2.0,
            [rx, ry],
            SegmentKind::Disc { level, condition: conditions[level] },
        ));
        z += disc_heights[level];
        let body_mid = z + body_heights[level] / 2.0;
        segments.push(segment(body_mid, body_heights[level] / 2.0, [rx, ry], SegmentKind::Vertebra));
        if conditions[level] == Condition::Schmorl {
            // Through the upper body's inferior endplate, 4 mm into the bone.
            let s = segments.last().expect("just pushed");
            let at = add(add(s.center, scale(s.axis, -s.half_height + 3.0)), scale(s.ap, rng.range(-4.0, 4.0)));
            nodes.push((at, 4.5, level));
        }
        z += body_heights[level];
    }
    // T12 (the last body) bears a rib on each side: from beside its body, out, back and down.
    let t12 = segments.last().expect("bodies were pushed");
    let ribs = [-1.0, 1.0]
        .map(|side: f64| {
            let start =
                add(add(t12.center, scale(t12.ap, t12.radii[1] * 0.6)), [side * (t12.radii[0] + 1.0), 0.0, 0.0]);
            let end = add(add(t12.center, scale(t12.ap, t12.radii[1] + 30.0)), [side * 115.0, 0.0, -8.0]);
            (start, end)
        })
        .to_vec();
    Anatomy {
        ribs,
        segments,
        nodes,
        body_center: [x0 * 0.5, y0 - 45.0],
        body_radii: [rng.range(150.0, 175.0), rng.range(105.0, 125.0)],
        z_range: [sacrum_top - 45.0, z + 12.0],
        cancellous: if spec.osteoporotic { OSTEOPOROTIC_CANCELLOUS } else { CANCELLOUS },
        cortical: if spec.osteoporotic { OSTEOPOROTIC_CORTICAL } else { CORTICAL },
    }
}

/// How far a disc of this condition reaches beyond its vertebral rim, mm, at in-plane angle
/// `theta` (0 = posterior, positive towards the patient's left).
fn disc_extension(condition: Condition, theta: f64) -> f64 {
    let angle = theta.rem_euclid(2.0 * PI);
    let from_posterior = angle.min(2.0 * PI - angle);
    match condition {
        Condition::Normal | Condition::Schmorl => 0.0,
        // Posterior and lateral: about 60% of the circumference, smooth at its ends.
        Condition::Bulge => {
            let half = 0.6 * PI;
            if from_posterior < half { 3.5 * (0.5 + 0.5 * (PI * from_posterior / half).cos()).sqrt() } else { 0.0 }
        }
        // Focal posterior: +-22 degrees (12% of the circumference), 5 mm deep; base about 13 mm.
        Condition::Protrusion => {
            let half = 22f64.to_radians();
            if from_posterior < half { 5.0 * (0.5 + 0.5 * (PI * from_posterior / half).cos()) } else { 0.0 }
        }
    }
}

const AIR: f64 = -1000.0;
const RIB_RADIUS_MM: f64 = 5.0;
const FAT: f64 = -100.0;
const MUSCLE: f64 = 50.0;
const CANCELLOUS: f64 = 250.0;
const CORTICAL: f64 = 900.0;
/// Measured on the real TPTBox crop: body interiors about 50 HU, cortical border about 250 HU.
const OSTEOPOROTIC_CANCELLOUS: f64 = 55.0;
const OSTEOPOROTIC_CORTICAL: f64 = 400.0;
/// Noise standard deviation, HU: a routine scan and a low-dose one.
const NOISE_HU: f64 = 12.0;
const LOW_DOSE_NOISE_HU: f64 = 40.0;
const DISC: f64 = 85.0;
const CSF: f64 = 15.0;
const ARCH: f64 = 700.0;

/// What the phantom holds at a point. One classification feeds both the HU values and the
/// ground-truth labels, so a training mask can never disagree with the image drawn from it.
#[derive(Debug, Clone, Copy, PartialEq)]
enum Tissue {
    Air,
    Fat,
    Muscle,
    Bone {
        cortical: bool,
    },
    /// Disc material of a level (index into [`LEVELS`]), Schmorl's nodes included.
    Disc {
        level: usize,
        nucleus: bool,
    },
    Csf,
    Arch,
}

fn tissue(anatomy: &Anatomy, p: [f64; 3]) -> Tissue {
    let dx = (p[0] - anatomy.body_center[0]) / anatomy.body_radii[0];
    let dy = (p[1] - anatomy.body_center[1]) / anatomy.body_radii[1];
    let r = (dx * dx + dy * dy).sqrt();
    if r > 1.0 {
        return Tissue::Air;
    }
    let mut found = if r > 0.9 { Tissue::Fat } else { Tissue::Muscle };
    for (centre, radius, level) in &anatomy.nodes {
        let d = sub(p, *centre);
        if dot(d, d) < radius * radius {
            return Tissue::Disc { level: *level, nucleus: false };
        }
    }
    for (from, to) in &anatomy.ribs {
        let (d, q) = (sub(*to, *from), sub(p, *from));
        let t = (dot(q, d) / dot(d, d)).clamp(0.0, 1.0);
        let off = sub(q, scale(d, t));
        if dot(off, off) < RIB_RADIUS_MM * RIB_RADIUS_MM {
            return Tissue::Bone { cortical: true };
        }
    }
    for s in &anatomy.segments {
        let rel = sub(p, s.center);
        let along = dot(rel, s.axis);
        if along.abs() > s.half_height {
            continue;
        }
        let lateral = rel[0];
        let ap = dot(rel, s.ap);
        let e = [lateral / s.radii[0], ap / s.radii[1]];
        let radial = (e[0] * e[0] + e[1] * e[1]).sqrt();
        match s.kind {
            // The sacral alae beside S1 and S2, out to the sacroiliac joints: what the locator
            // tells the sacrum by.
            SegmentKind::Sacrum
                if lateral.abs() > s.radii[0] && lateral.abs() < 70.0 && (-15.0..12.0).contains(&ap) =>
            {
                return Tissue::Bone { cortical: true };
            }
            SegmentKind::Vertebra | SegmentKind::Sacrum => {
                if radial <= 1.0 {
                    let shell = (1.0 - radial) * s.radii[1] < 1.5 || s.half_height - along.abs() < 1.2;
                    return Tissue::Bone { cortical: shell };
                }
            }
            SegmentKind::Disc { level, condition } => {
                let theta = lateral.atan2(ap);
                let rim = 1.0 + disc_extension(condition, theta) / s.radii[1].min(s.radii[0]);
                if radial <= rim {
                    return Tissue::Disc { level, nucleus: radial < 0.5 };
                }
            }
        }
        // The spinal canal behind every body and disc; the bony arch and spinous process behind
        // the lumbar bodies.
        let canal = [lateral / 11.0, (ap - s.radii[1] - 10.0) / 8.5];
        let c = (canal[0] * canal[0] + canal[1] * canal[1]).sqrt();
        if c <= 1.0 {
            return Tissue::Csf;
        }
        if matches!(s.kind, SegmentKind::Vertebra | SegmentKind::Sacrum)
            && ((c <= 1.55 && ap > s.radii[1])
                || (lateral.abs() < 3.5 && ap > s.radii[1] + 18.0 && ap < s.radii[1] + 48.0))
        {
            found = Tissue::Arch;
        }
    }
    found
}

fn hounsfield(anatomy: &Anatomy, p: [f64; 3]) -> f64 {
    match tissue(anatomy, p) {
        Tissue::Air => AIR,
        Tissue::Fat => FAT,
        Tissue::Muscle => MUSCLE,
        Tissue::Bone { cortical: true } => anatomy.cortical,
        Tissue::Bone { cortical: false } => anatomy.cancellous,
        Tissue::Disc { nucleus, .. } => DISC + if nucleus { -15.0 } else { 0.0 },
        Tissue::Csf => CSF,
        Tissue::Arch => ARCH,
    }
}

/// The ground truth of a phantom as masks: which disc, if any, a point belongs to. Training data
/// and detector checks take their masks from here; a Schmorl's node counts with its disc, since
/// the node is disc material.
pub struct DiscLabels {
    anatomy: Anatomy,
    conditions: Vec<Condition>,
}

impl DiscLabels {
    pub fn new(spec: &PhantomSpec) -> DiscLabels {
        let anatomy = build_anatomy(spec);
        let mut conditions = vec![Condition::Normal; LEVELS.len()];
        for s in &anatomy.segments {
            if let SegmentKind::Disc { level, condition } = s.kind {
                conditions[level] = condition;
            }
        }
        DiscLabels { anatomy, conditions }
    }

    /// The level (index into [`LEVELS`]) whose disc holds `p`, LPS mm.
    pub fn level_at(&self, p: [f64; 3]) -> Option<usize> {
        match tissue(&self.anatomy, p) {
            Tissue::Disc { level, .. } => Some(level),
            _ => None,
        }
    }

    pub fn condition(&self, level: usize) -> Condition {
        self.conditions[level]
    }
}

/// Writes the phantom series into `dir` and `truth.json` beside it; returns the truth.
pub fn write_phantom(dir: &Path, spec: &PhantomSpec) -> Result<(SyntheticSeries, Truth), SyntheticError> {
    let anatomy = build_anatomy(spec);
    let n = spec.size as usize;
    let extent = spec.pixel_spacing_mm * n as f64;
    let (sin_tilt, cos_tilt) = spec.gantry_tilt_degrees.to_radians().sin_cos();
    // A tilted plane crosses the spine above or below its centre's height, by up to the spine's
    // distance from the isocentre (under 70 mm here) times the tilt's sine: covered both ways.
    let margin = 70.0 * sin_tilt.abs();
    let (bottom, top) = (anatomy.z_range[0] - margin, anatomy.z_range[1] + margin);
    let slices = ((top - bottom) / spec.slice_thickness_mm).ceil() as usize;
    let series_spec = SeriesSpec {
        slices,
        size: spec.size,
        pixel_spacing_mm: spec.pixel_spacing_mm,
        slice_spacing_mm: spec.slice_thickness_mm,
        seed: spec.seed.wrapping_add(0x5EED),
        reverse_instance_numbers: false,
    };
    let z_of = |i: usize| top - i as f64 * spec.slice_thickness_mm;
    let noise_hu = if spec.osteoporotic { LOW_DOSE_NOISE_HU } else { NOISE_HU };
    // The image centre lies on the patient axis at the slice's height; rows and columns run as
    // the patient position has them, the columns tilted about the left-right axis.
    let (row_direction, untilted_column) = spec.patient_position.axial_directions();
    let column_direction = [0.0, untilted_column[1] * cos_tilt, sin_tilt];
    let half = extent / 2.0;
    let position_of = |i: usize| -> [f64; 3] {
        std::array::from_fn(|d| {
            let centre = if d == 2 { z_of(i) } else { 0.0 };
            centre - half * row_direction[d] - half * column_direction[d]
        })
    };
    let placement =
        AxialPlacement { patient_position: spec.patient_position, row_direction, column_direction, position_of };
    let pixels = |i: usize| -> Vec<i16> {
        let origin = (placement.position_of)(i);
        let mut noise = Rng(spec.seed ^ (i as u64).wrapping_mul(0xA24B_AED4_963E_E407));
        let mut out = Vec::with_capacity(n * n);
        for row in 0..n {
            for col in 0..n {
                let (across, down) = (col as f64 * spec.pixel_spacing_mm, row as f64 * spec.pixel_spacing_mm);
                let p: [f64; 3] =
                    std::array::from_fn(|d| origin[d] + across * row_direction[d] + down * column_direction[d]);
                let base = hounsfield(&anatomy, p);
                // Gaussian noise (Box-Muller), none in air.
                let g = if base > -900.0 {
                    let (u1, u2) = (noise.next().max(1e-12), noise.next());
                    noise_hu * (-2.0 * u1.ln()).sqrt() * (2.0 * PI * u2).cos()
                } else {
                    0.0
                };
                out.push(((base + g).round().clamp(-1024.0, 3071.0) + 1024.0) as i16);
            }
        }
        out
    };
    let series = write_axial_series(dir, &series_spec, &placement, pixels)?;
    let levels = anatomy
        .segments
        .iter()
        .filter_map(|s| match s.kind {
            SegmentKind::Disc { condition, .. } => Some((s, condition)),
            _ => None,
        })
        .zip(LEVELS)
        .map(|((s, condition), name)| DiscTruth {
            name: name.to_string(),
            center_lps_mm: s.center,
            normal: s.axis,
            condition,
        })
        .collect();
    let truth = Truth {
        seed: spec.seed,
        study_uid: series.study_uid.clone(),
        series_uid: series.series_uid.clone(),
        pixel_spacing_mm: spec.pixel_spacing_mm,
        slice_thickness_mm: spec.slice_thickness_mm,
        levels,
    };
    let path = dir.join("truth.json");
    std::fs::write(&path, serde_json::to_vec_pretty(&truth).expect("truth serialises"))
        .map_err(|source| SyntheticError::Io { path, source })?;
    Ok((series, truth))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn level_list_parses_and_rejects_unknown_names() {
        let levels = parse_levels("L4/L5=bulge, L3/L4=protrusion,L5/S1=schmorl").unwrap();
        assert_eq!(levels.len(), 6);
        assert_eq!(levels.iter().find(|(l, _)| l == "L4/L5").unwrap().1, Condition::Bulge);
        assert_eq!(levels.iter().find(|(l, _)| l == "T12/L1").unwrap().1, Condition::Normal);
        assert!(parse_levels("L6/L7=bulge").is_err());
        assert!(parse_levels("L4/L5=herniated").is_err());
    }

    #[test]
    fn definitions_hold_bulge_wide_protrusion_focal_with_broad_base() {
        let steps = 3600;
        let covered = |c: Condition| {
            (0..steps).filter(|i| disc_extension(c, 2.0 * PI * *i as f64 / steps as f64) > 0.0).count() as f64
                / steps as f64
        };
        assert!(covered(Condition::Bulge) > 0.25);
        assert!(covered(Condition::Protrusion) < 0.25 && covered(Condition::Protrusion) > 0.0);
        // Base (arc at the rim, ~16 mm AP radius) wider than the 5 mm extension.
        let base = 2.0 * 22f64.to_radians() * 16.0;
        assert!(base > 5.0);
        assert_eq!(covered(Condition::Normal), 0.0);
    }

    #[test]
    fn tissues_are_where_the_truth_says() {
        let spec = PhantomSpec { levels: parse_levels("L4/L5=schmorl").unwrap(), ..Default::default() };
        let anatomy = build_anatomy(&spec);
        for s in &anatomy.segments {
            let v = hounsfield(&anatomy, s.center);
            match s.kind {
                SegmentKind::Disc { .. } => assert!((v - DISC).abs() <= 15.0, "disc centre {v}"),
                _ => assert_eq!(v, CANCELLOUS),
            }
        }
        assert_eq!(anatomy.nodes.len(), 1);
        assert_eq!(hounsfield(&anatomy, anatomy.nodes[0].0), DISC);
        assert_eq!(hounsfield(&anatomy, [400.0, 0.0, 0.0]), AIR);
    }

    #[test]
    fn labels_follow_the_discs_and_their_lesions() {
        let spec = PhantomSpec { levels: parse_levels("L4/L5=schmorl,L3/L4=bulge").unwrap(), ..Default::default() };
        let labels = DiscLabels::new(&spec);
        let anatomy = build_anatomy(&spec);
        assert_eq!(labels.condition(1), Condition::Schmorl);
        assert_eq!(labels.condition(2), Condition::Bulge);
        // The node sits in the body above L4/L5 and still belongs to L4/L5.
        assert_eq!(labels.level_at(anatomy.nodes[0].0), Some(1));
        let discs: Vec<&Segment> =
            anatomy.segments.iter().filter(|s| matches!(s.kind, SegmentKind::Disc { .. })).collect();
        for (level, s) in discs.iter().enumerate() {
            assert_eq!(labels.level_at(s.center), Some(level));
            // 2 mm behind the posterior rim: disc only where it bulges.
            let behind = add(s.center, scale(s.ap, s.radii[1] + 2.0));
            let expected = (labels.condition(level) == Condition::Bulge).then_some(level);
            assert_eq!(labels.level_at(behind), expected, "{}", LEVELS[level]);
        }
    }
}
