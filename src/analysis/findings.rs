//! One finding per disc level, fused from what the network saw on the sagittal reformat and on
//! the level's own axial image.
//!
//! The paper's network labels each disc it sees as normal, Schmorl's node, bulge or protrusion.
//! The two views see different things: a Schmorl's node lies in the endplate, on the sagittal
//! image and not in the disc's axial plane; a bulge and a protrusion differ by their extent
//! around the disc, which the axial image shows and the mid-sagittal one barely does. So a view
//! that cannot tell two classes apart gives them similar confidences, and the other view has to
//! decide. A level's class is the one with the highest geometric mean, over the two views, of
//! the best confidence each view gives it, a view without that class counting [`ABSENT`]: the
//! product, unlike a sum, lets the discriminating view's preference through instead of adding
//! the undecided view's tie to it. A level on which neither view detected anything is still a
//! finding, `undetermined`, so the report says every level was looked at.

use serde::Serialize;

use crate::analysis::detector::predict::{Detection, Mask};
use crate::analysis::slices::SliceImage;
use crate::analysis::spine::DiscLevel;

/// The classes, as reported and stored.
pub const NORMAL: &str = "normal";
pub const SCHMORL: &str = "schmorl";
pub const BULGE: &str = "bulge";
pub const PROTRUSION: &str = "protrusion";
pub const UNDETERMINED: &str = "undetermined";

/// What a view that did not detect a class contributes to that class's geometric mean: small, so
/// that a class needs both views, yet not zero, so that a view's silence does not veto a class
/// the other view is sure of.
pub const ABSENT: f64 = 0.01;

/// Our class for a class name in the weights' metadata, whatever its spelling ("Schmorl's node",
/// "schmorl", "Bulge", ...); `None` for a name we do not know.
pub fn canonical_class(name: &str) -> Option<&'static str> {
    let n = name.to_lowercase();
    [(SCHMORL, "schmorl"), (BULGE, "bulg"), (PROTRUSION, "protru"), (NORMAL, "normal")]
        .into_iter()
        .find(|(_, key)| n.contains(key))
        .map(|(class, _)| class)
}

/// What one view contributed to a level.
#[derive(Debug, Clone)]
pub struct ViewDetection {
    /// [`crate::analysis::slices::View::kind`] of the image it was found on.
    pub view: &'static str,
    pub class: &'static str,
    pub confidence: f32,
    /// x1, y1, x2, y2 in the view's pixels.
    pub bbox: [f32; 4],
    pub mask: Mask,
    pub mask_area_mm2: f64,
}

/// A disc level's finding.
#[derive(Debug, Clone)]
pub struct LevelFinding {
    pub level: DiscLevel,
    pub class: &'static str,
    pub confidence: f64,
    /// Views whose detections support the class.
    pub views: Vec<&'static str>,
    /// The supporting detections, best first.
    pub evidence: Vec<ViewDetection>,
}

#[derive(Debug, Serialize)]
pub struct FindingJson {
    pub class: &'static str,
    pub confidence: f64,
    pub views: Vec<&'static str>,
}

impl LevelFinding {
    /// Nothing detected on the level (or no detector).
    pub fn undetermined(level: &DiscLevel) -> LevelFinding {
        LevelFinding {
            level: level.clone(),
            class: UNDETERMINED,
            confidence: 0.0,
            views: Vec::new(),
            evidence: Vec::new(),
        }
    }

    pub fn json(&self) -> FindingJson {
        FindingJson { class: self.class, confidence: self.confidence, views: self.views.clone() }
    }
}

/// Every level undetermined: no weights configured, or no detector run.
pub fn undetermined(levels: &[DiscLevel]) -> Vec<LevelFinding> {
    levels.iter().map(LevelFinding::undetermined).collect()
}

/// Fuses the detections of the sagittal image and of each level's axial image (`axials[i]`
/// belongs to `levels[i]`). `class_names` are the weights' names, by class index.
pub fn fuse(
    levels: &[DiscLevel],
    sagittal: Option<(&SliceImage, &[Detection])>,
    axials: &[(&SliceImage, &[Detection])],
    class_names: &[String],
) -> Vec<LevelFinding> {
    let to_view = |image: &SliceImage, d: &Detection| -> Option<ViewDetection> {
        let class = canonical_class(class_names.get(d.class_id)?)?;
        let pixel_mm2 = image.pixel_spacing_mm * image.pixel_spacing_mm;
        Some(ViewDetection {
            view: image.view.kind(),
            class,
            confidence: d.confidence,
            bbox: d.bbox,
            mask_area_mm2: d.mask.area() as f64 * pixel_mm2,
            mask: d.mask.clone(),
        })
    };
    // Sagittal detections go to the level nearest the centre of their box, when within 15 mm.
    let mut sagittal_by_level: Vec<Vec<ViewDetection>> = vec![Vec::new(); levels.len()];
    if let Some((image, detections)) = sagittal {
        for d in detections {
            let centre =
                image.pixel_to_lps(f64::from(d.bbox[0] + d.bbox[2]) / 2.0, f64::from(d.bbox[1] + d.bbox[3]) / 2.0);
            let nearest = levels
                .iter()
                .enumerate()
                .map(|(i, l)| {
                    (
                        i,
                        crate::geometry::dot(
                            crate::geometry::sub(centre, l.center_lps_mm),
                            crate::geometry::sub(centre, l.center_lps_mm),
                        )
                        .sqrt(),
                    )
                })
                .min_by(|a, b| a.1.total_cmp(&b.1));
            if let Some((i, distance)) = nearest
                && distance <= 15.0
                && let Some(v) = to_view(image, d)
            {
                sagittal_by_level[i].push(v);
            }
        }
    }
    levels
        .iter()
        .enumerate()
        .map(|(i, level)| {
            let axial: Vec<ViewDetection> = axials
                .get(i)
                .map(|(image, detections)| detections.iter().filter_map(|d| to_view(image, d)).collect())
                .unwrap_or_default();
            let views = [&sagittal_by_level[i], &axial];
            let best = |view: &[ViewDetection], class: &str| {
                view.iter().filter(|v| v.class == class).map(|v| v.confidence).fold(0.0f32, f32::max)
            };
            if views.iter().all(|v| v.is_empty()) {
                return LevelFinding::undetermined(level);
            }
            let scored = [NORMAL, SCHMORL, BULGE, PROTRUSION].map(|class| {
                (class, views.iter().map(|v| f64::from(best(v, class)).max(ABSENT)).product::<f64>().sqrt())
            });
            let (class, confidence) = scored.into_iter().max_by(|a, b| a.1.total_cmp(&b.1)).expect("four classes");
            let mut evidence: Vec<ViewDetection> =
                views.iter().flat_map(|v| v.iter()).filter(|v| v.class == class).cloned().collect();
            evidence.sort_by(|a, b| b.confidence.total_cmp(&a.confidence));
            let mut supporting: Vec<&'static str> = evidence.iter().map(|v| v.view).collect();
            supporting.sort_unstable();
            supporting.dedup();
            LevelFinding { level: level.clone(), class, confidence, views: supporting, evidence }
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn class_names_from_weights_map_to_ours() {
        assert_eq!(canonical_class("Schmorl's node"), Some(SCHMORL));
        assert_eq!(canonical_class("bulging"), Some(BULGE));
        assert_eq!(canonical_class("Protrusion"), Some(PROTRUSION));
        assert_eq!(canonical_class("normal"), Some(NORMAL));
        assert_eq!(canonical_class("circle"), None);
    }

    /// Each view is sure of what it can see and undecided about the rest: the sagittal image
    /// tells a Schmorl's node from the other classes, the axial one tells normal, bulge and
    /// protrusion apart but not a node above the disc's plane from a normal disc.
    #[test]
    fn each_view_decides_what_it_can_see() {
        use crate::analysis::slices::View;
        let image = |view: View| SliceImage {
            view,
            size: 100,
            pixels: vec![0; 100 * 100],
            origin: [0.0, 0.0, 0.0],
            row_direction: [0.0, 1.0, 0.0],
            column_direction: [0.0, 0.0, -1.0],
            pixel_spacing_mm: 1.0,
        };
        // Sagittal row r lies at z = -r.
        let level = |name: &str, z: f64| DiscLevel {
            name: name.into(),
            name_certain: true,
            center_lps_mm: [0.0, 50.0, z],
            normal: [0.0, 0.0, 1.0],
        };
        let levels = [level("L3/L4", 0.0), level("L4/L5", -30.0), level("L5/S1", -60.0), level("L2/L3", 30.0)];
        let names: Vec<String> = [NORMAL, SCHMORL, BULGE, PROTRUSION].map(String::from).to_vec();
        let detection = |class_id: usize, confidence: f32, row: f32| Detection {
            class_id,
            confidence,
            bbox: [40.0, row - 5.0, 60.0, row + 5.0],
            mask: Mask { width: 100, height: 100, data: vec![true; 100 * 100] },
        };
        let undecided = |row: f32| [0, 2, 3].map(|class| detection(class, 0.3, row));
        let sagittal_image = image(View::Sagittal);
        let mut sagittal = vec![detection(1, 0.9, 30.0)]; // a node at L4/L5
        sagittal.extend(undecided(0.0));
        sagittal.extend(undecided(60.0));
        let axial_images: Vec<SliceImage> =
            levels.iter().map(|l| image(View::Axial { level: l.name.clone() })).collect();
        let axial_detections = [
            vec![detection(2, 0.7, 50.0), detection(3, 0.2, 50.0)], // L3/L4: a bulge
            vec![detection(0, 0.55, 50.0), detection(1, 0.45, 50.0)], // L4/L5: the node is not here
            vec![detection(0, 0.2, 50.0), detection(1, 0.64, 50.0)], // L5/S1: a normal disc, a coin toss
            vec![],                                                 // L2/L3: nothing anywhere
        ];
        let axials: Vec<(&SliceImage, &[Detection])> =
            axial_images.iter().zip(&axial_detections).map(|(i, d)| (i, d.as_slice())).collect();
        let findings = fuse(&levels, Some((&sagittal_image, &sagittal)), &axials, &names);
        let classes: Vec<&str> = findings.iter().map(|f| f.class).collect();
        assert_eq!(classes, [BULGE, SCHMORL, NORMAL, UNDETERMINED]);
        assert!((findings[1].confidence - (0.9f64 * 0.45).sqrt()).abs() < 1e-6);
        assert_eq!(findings[1].views, ["axial", "sagittal"]);
        // L5/S1 is where a mean of the views goes wrong: (0.0 + 0.64) / 2 for a node the sagittal
        // view does not see beats (0.3 + 0.2) / 2 for normal. The product gives sqrt(0.3 * 0.2)
        // for normal against sqrt(0.01 * 0.64) for the node.
        assert!((findings[2].confidence - (0.3f64 * 0.2).sqrt()).abs() < 1e-6);
        assert!(findings[3].evidence.is_empty());
    }
}
