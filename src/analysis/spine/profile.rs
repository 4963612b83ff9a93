//! Discs along the column. In a box inside the vertebral bodies, in front of the canal, the share
//! of bone voxels is high at every endplate, medium through a body (dense or porous: a porous
//! body keeps its cortical ring) and lowest in a disc, which has no bone at all. A disc is
//! therefore a short dip between two endplate peaks a few mm apart, where the middle of a body
//! is a broad low stretch between peaks 20 mm or more apart. The box is tilted in the sagittal
//! plane at several angles: the discs of a lordotic lumbar spine lie up to 40 degrees off the
//! axial plane (L5/S1 most), and an axial box would smear such a disc with its endplates.

use super::canal::Canal;
use super::{BONE_HU, row_step_towards_front};
use crate::analysis::volume::Volume;

/// The box, mm: side to side around the canal's centre, and front to back from the canal's
/// centre towards the front.
const BOX_HALF_WIDTH_MM: f64 = 10.0;
const BOX_FROM_CANAL_MM: (f64, f64) = (10.0, 44.0);
/// The box's centre, where a disc's position along the column is measured, mm from the canal.
pub const BOX_CENTRE_MM: f64 = (BOX_FROM_CANAL_MM.0 + BOX_FROM_CANAL_MM.1) / 2.0;
/// Sagittal tilts tried, degrees.
const TILTS_DEGREES: [f64; 17] =
    [-40.0, -35.0, -30.0, -25.0, -20.0, -15.0, -10.0, -5.0, 0.0, 5.0, 10.0, 15.0, 20.0, 25.0, 30.0, 35.0, 40.0];
/// The endplates that flank a disc lie within this distance of its middle, mm (a disc is 3 to
/// 14 mm high).
const FLANK_MM: usize = 8;
const FLANK_GAP_MM: usize = 2;

/// Score gained per mm of a dip's bone-free core when tilts are compared.
const CORE_BONUS_PER_MM: f64 = 0.03;
/// Column imaged on either side of a disc before it is judged, mm.
const EDGE_MM: usize = 10;

/// Profile samples are 1 mm apart along the slice axis.
pub const STEP_MM: f64 = 1.0;

/// The bone share along the column, per tilt.
pub struct Profile {
    /// `share[t][s]`: bone share at sample `s` (fractional slice `s * STEP_MM / slice spacing`)
    /// through the box tilted by `TILTS_DEGREES[t]`.
    share: Vec<Vec<f32>>,
}

/// A disc on the profile.
#[derive(Debug, Clone, Copy)]
pub struct ProfileDisc {
    /// Fractional slice index of the disc's middle at the box's centre.
    pub k: f64,
    /// How clearly it stands out: the lower flanking peak less the share at its middle.
    pub contrast: f64,
    /// The bone share left at its middle, as a share of its flanks': near 0 in a disc, which
    /// holds no bone, higher in a dip inside a porous body.
    pub residual: f64,
    /// Tilt of its plane, degrees (positive: the front lies towards higher slice indices).
    pub tilt_degrees: f64,
}

impl Profile {
    pub fn measure(volume: &Volume, canal: &Canal) -> Profile {
        let [nx, ny, nz] = volume.dims;
        let (sx, sy, sz) = (volume.spacing[0], volume.spacing[1], volume.spacing[2]);
        let samples = ((nz - 1) as f64 * sz / STEP_MM).floor() as usize + 1;
        let front = row_step_towards_front(volume);
        let half_width = (BOX_HALF_WIDTH_MM / sx).round() as isize;
        let depths: Vec<f64> = (0..=((BOX_FROM_CANAL_MM.1 - BOX_FROM_CANAL_MM.0) as usize))
            .map(|d| BOX_FROM_CANAL_MM.0 + d as f64)
            .collect();
        let share = TILTS_DEGREES
            .iter()
            .map(|tilt| {
                let slope = tilt.to_radians().tan();
                (0..samples)
                    .map(|s| {
                        let k = s as f64 * STEP_MM / sz;
                        let (ci, cj) = canal.at(k);
                        let (mut bone, mut all) = (0u32, 0u32);
                        for &depth in &depths {
                            let j = (cj + front * depth / sy).round();
                            let kk = k + (depth - BOX_CENTRE_MM) * slope / sz;
                            if j < 0.0 || j >= ny as f64 || kk < 0.0 || kk > (nz - 1) as f64 {
                                continue;
                            }
                            let (k0, t) = (kk.floor() as usize, (kk - kk.floor()) as f32);
                            let k1 = (k0 + 1).min(nz - 1);
                            let (r0, r1) = (super::row(volume, k0, j as usize), super::row(volume, k1, j as usize));
                            for di in -half_width..=half_width {
                                let i = ci.round() as isize + di;
                                if i < 0 || i >= nx as isize {
                                    continue;
                                }
                                let v = r0[i as usize] * (1.0 - t) + r1[i as usize] * t;
                                all += 1;
                                bone += u32::from(v > BONE_HU);
                            }
                        }
                        if all == 0 { 0.0 } else { bone as f32 / all as f32 }
                    })
                    .collect()
            })
            .collect();
        Profile { share }
    }

    /// The bone share through the untilted box, per sample.
    pub fn axial(&self) -> &[f32] {
        &self.share[TILTS_DEGREES.len() / 2]
    }

    /// Disc candidates: at each sample, the tilt where it stands out most; kept where that is a
    /// local best within 5 mm and at least `min_contrast`. Samples whose flanks leave the volume
    /// are not judged: a body cut by the edge looks like a disc cut by it.
    pub fn candidates(&self, slice_mm: f64, min_contrast: f64) -> Vec<ProfileDisc> {
        let n = self.share[0].len();
        if n < 2 * FLANK_MM + 1 {
            return Vec::new();
        }
        // Per sample, over the tilts: (score, contrast, tilt, the dip's middle in samples). A
        // plane tilted like the disc lies wholly inside it over the disc's height less what the
        // box's depth adds to a mismatch, so the disc's own tilt has the longest run nearly free
        // of bone: the score is the contrast plus a little per mm of that core. Dense bone
        // saturates the contrast at many tilts; the core tells them apart.
        let mut best = vec![(f64::MIN, 0.0f64, 0usize, 0.0f64, 0.0f64); n];
        for (t, share) in self.share.iter().enumerate() {
            for s in FLANK_MM..n - FLANK_MM {
                let before = share[s - FLANK_MM..=s - FLANK_GAP_MM].iter().copied().fold(0.0f32, f32::max);
                let after = share[s + FLANK_GAP_MM..=s + FLANK_MM].iter().copied().fold(0.0f32, f32::max);
                let flank = before.min(after);
                let contrast = f64::from(flank - share[s]);
                if contrast <= 0.0 {
                    continue;
                }
                // The dip's core: the run around `s` below a quarter of the way up to the flank,
                // or, in a shallow dip, just below half-way.
                let run = |level: f32| {
                    let first = (s - FLANK_MM..=s).rev().take_while(|&q| share[q] < level).last();
                    let last = (s..=s + FLANK_MM).take_while(|&q| share[q] < level).last();
                    first.zip(last)
                };
                let core = run(share[s] + (flank - share[s]) * 0.25);
                let (first, last) = core.or_else(|| run((flank + share[s]) / 2.0)).unwrap_or((s, s));
                let core_mm = core.map_or(0.0, |(a, b)| (b - a + 1) as f64 * STEP_MM);
                let score = contrast * f64::from(1.0 - share[s] / flank) * (1.0 + CORE_BONUS_PER_MM * core_mm);
                if score > best[s].0 {
                    best[s] = (score, contrast, t, (first + last) as f64 / 2.0, f64::from(share[s] / flank));
                }
            }
        }
        let reach = 5;
        let mut found = Vec::new();
        // A disc is judged only with a body's worth of column imaged on either side: an endplate
        // at the volume's edge, with a bit of its body, looks like a disc cut by it.
        for s in EDGE_MM.max(FLANK_MM)..n.saturating_sub(EDGE_MM.max(FLANK_MM)) {
            let (score, contrast, t, middle, residual) = best[s];
            if contrast < min_contrast {
                continue;
            }
            let window = s.saturating_sub(reach)..(s + reach + 1).min(n);
            // The first of equal neighbours stands for a flat top.
            if window.clone().any(|q| best[q].0 > score || (best[q].0 == score && q < s)) {
                continue;
            }
            found.push(ProfileDisc {
                k: middle * STEP_MM / slice_mm,
                contrast,
                residual,
                tilt_degrees: TILTS_DEGREES[t],
            });
        }
        found
    }
}
