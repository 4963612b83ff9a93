//! The paper's figures of merit for the agent's findings against labels: a confusion matrix
//! (rows true, columns predicted), accuracy, Cohen's kappa, and one-vs-rest sensitivity,
//! specificity, PPV, NPV and Youden index per class (Tables 1 and 2 of the IDAICS paper,
//! ../shared/data/paper/idaics-tables.md).
//!
//! The agent can answer what the paper's classifier never had to: a level it looked at and could
//! not classify (`undetermined`), and a labelled disc it did not find at all. Both are columns
//! of their own, never rows, and both count against accuracy and sensitivity: leaving them out
//! would report a figure for the easy levels only.

use std::collections::BTreeMap;

use serde::Serialize;

use crate::analysis::detector::predict::Mask;
use crate::analysis::findings::{BULGE, LevelFinding, NORMAL, PROTRUSION, SCHMORL, UNDETERMINED};

#[derive(Debug, thiserror::Error)]
pub enum EvaluationError {
    #[error(transparent)]
    UnknownCategory(#[from] crate::agreement::UnknownCategory),
    #[error("{series} {level}: label {label:?} is not one of normal, schmorl, bulge, protrusion")]
    LabelNotAClass { series: String, level: String, label: String },
    #[error("line {line}: {message}")]
    YoloLabel { line: usize, message: String },
    #[error("{0}")]
    LabelMe(String),
}

/// What a label can say, in the paper's order of definitions.
pub const CLASSES: [&str; 4] = [NORMAL, SCHMORL, BULGE, PROTRUSION];

/// The prediction for a labelled disc the agent did not locate.
pub const NOT_FOUND: &str = "not found";

pub use crate::agreement::{ClassMetrics, ConfusionMatrix};

impl ConfusionMatrix {
    /// The matrix the agent's evaluation fills: the four classes, `undetermined`, `not found`.
    pub fn for_findings() -> ConfusionMatrix {
        ConfusionMatrix::new(CLASSES.iter().copied().chain([UNDETERMINED, NOT_FOUND]))
    }
}

/// A disc's label: its level, where it is when the label knows (a phantom's truth), its class.
#[derive(Debug, Clone)]
pub struct Label {
    pub level: String,
    pub center_lps_mm: Option<[f64; 3]>,
    pub class: &'static str,
}

/// How far a found disc may lie from a labelled centre and still be that disc: well under half
/// the distance between neighbouring lumbar discs (30 mm and more), so a neighbour never matches.
pub const LABEL_MATCH_MM: f64 = 12.0;

/// Scores one series: each label against the finding of the same disc, found by position when
/// the label has one (the level naming is then not what is measured), by level name otherwise.
/// A label without its disc among the findings is [`NOT_FOUND`].
pub fn score_series(series: &str, labels: Vec<Label>, findings: &[LevelFinding]) -> Vec<LevelOutcome> {
    labels
        .into_iter()
        .map(|label| {
            let matched = match label.center_lps_mm {
                Some(center) => {
                    let distance = |f: &LevelFinding| {
                        let d = crate::geometry::sub(f.level.center_lps_mm, center);
                        crate::geometry::dot(d, d).sqrt()
                    };
                    findings
                        .iter()
                        .min_by(|a, b| distance(a).total_cmp(&distance(b)))
                        .filter(|f| distance(f) <= LABEL_MATCH_MM)
                }
                None => findings.iter().find(|f| f.level.name == label.level),
            };
            LevelOutcome {
                series: series.to_string(),
                level: label.level,
                truth: label.class.to_string(),
                predicted: matched.map_or(NOT_FOUND, |f| f.class).to_string(),
                confidence: matched.map(|f| f.confidence),
                dice: None,
            }
        })
        .collect()
}

/// An object of a YOLO segmentation label file (ultralytics' format, one object per line:
/// class index, then the polygon's x y pairs as fractions of the image's width and height).
#[derive(Debug, Clone, PartialEq)]
pub struct YoloObject {
    pub class_id: usize,
    pub polygon: Vec<[f64; 2]>,
}

pub fn parse_yolo_labels(text: &str) -> Result<Vec<YoloObject>, EvaluationError> {
    let mut objects = Vec::new();
    for (index, line) in text.lines().enumerate() {
        let error = |message: String| EvaluationError::YoloLabel { line: index + 1, message };
        let fields: Vec<&str> = line.split_whitespace().collect();
        let Some((class, coordinates)) = fields.split_first() else { continue };
        let class_id = class.parse().map_err(|_| error(format!("{class:?} is not a class index")))?;
        let values = coordinates
            .iter()
            .map(|v| v.parse::<f64>().ok().filter(|v| v.is_finite()))
            .collect::<Option<Vec<f64>>>()
            .ok_or_else(|| error("a coordinate is not a number".into()))?;
        if values.len() < 6 || values.len() % 2 != 0 {
            return Err(error(format!("{} coordinates: a polygon needs 3 or more x y pairs", values.len())));
        }
        objects.push(YoloObject { class_id, polygon: values.chunks(2).map(|p| [p[0], p[1]]).collect() });
    }
    Ok(objects)
}

/// The objects of a LabelMe file (as `idaics dataset export` writes them and a reader corrects
/// them) on a `width` x `height` image: each shape's class and mask. Shapes sharing a label and a
/// group_id are one object whose rings combine by the even-odd rule, so a ring inside another is
/// a hole. Polygons and rectangles only; a label not among the four classes (`unlabelled`
/// included) is refused with the shape named, as `model/tools/labelme_to_yolo.py` refuses it.
pub fn parse_labelme(text: &str, width: usize, height: usize) -> Result<Vec<(&'static str, Mask)>, EvaluationError> {
    let document: serde_json::Value =
        serde_json::from_str(text).map_err(|e| EvaluationError::LabelMe(format!("not LabelMe JSON: {e}")))?;
    let mut objects: Vec<(&'static str, Option<i64>, Mask)> = Vec::new();
    for (number, shape) in document["shapes"].as_array().into_iter().flatten().enumerate() {
        let label = shape["label"].as_str().unwrap_or("");
        let fail = |why: &str| EvaluationError::LabelMe(format!("shape {} ({label:?}): {why}", number + 1));
        let class = CLASSES
            .iter()
            .copied()
            .find(|c| *c == label)
            .ok_or_else(|| fail(if label == "unlabelled" { "not labelled yet" } else { "unknown label" }))?;
        let mut points: Vec<[f64; 2]> = shape["points"]
            .as_array()
            .into_iter()
            .flatten()
            .filter_map(|p| Some([p[0].as_f64()? / width as f64, p[1].as_f64()? / height as f64]))
            .collect();
        match shape["shape_type"].as_str().unwrap_or("polygon") {
            "polygon" => {}
            "rectangle" if points.len() == 2 => {
                let ([x0, y0], [x1, y1]) = (points[0], points[1]);
                points = vec![[x0, y0], [x1, y0], [x1, y1], [x0, y1]];
            }
            other => return Err(fail(&format!("shape type {other:?}; only polygons and rectangles are outlines"))),
        }
        if points.len() < 3 {
            return Err(fail("an outline needs three points"));
        }
        let mask = rasterize(&points, width, height);
        let group = shape["group_id"].as_i64();
        match objects.iter_mut().find(|(c, g, _)| group.is_some() && *c == class && *g == group) {
            Some((_, _, combined)) => combined.data.iter_mut().zip(&mask.data).for_each(|(a, b)| *a ^= *b),
            None => objects.push((class, group, mask)),
        }
    }
    Ok(objects.into_iter().map(|(class, _, mask)| (class, mask)).collect())
}

/// Dice overlap of two masks of one image; 0 when both are empty.
pub fn mask_dice(a: &Mask, b: &Mask) -> f64 {
    let (mut both, mut total) = (0usize, 0usize);
    for (&x, &y) in a.data.iter().zip(&b.data) {
        both += usize::from(x && y);
        total += usize::from(x) + usize::from(y);
    }
    if total == 0 { 0.0 } else { 2.0 * both as f64 / total as f64 }
}

/// The pixels of a `width` x `height` image whose centres lie inside a polygon given in
/// fractions of the image (even-odd rule).
pub fn rasterize(polygon: &[[f64; 2]], width: usize, height: usize) -> Mask {
    let points: Vec<[f64; 2]> = polygon.iter().map(|p| [p[0] * width as f64, p[1] * height as f64]).collect();
    let mut data = vec![false; width * height];
    for (row, line) in data.chunks_mut(width.max(1)).enumerate() {
        let y = row as f64 + 0.5;
        // Where the polygon's edges cross this row, sorted: inside between pairs.
        let mut crossings: Vec<f64> = points
            .iter()
            .zip(points.iter().cycle().skip(1))
            .filter(|(a, b)| (a[1] <= y) != (b[1] <= y))
            .map(|(a, b)| a[0] + (y - a[1]) / (b[1] - a[1]) * (b[0] - a[0]))
            .collect();
        crossings.sort_by(f64::total_cmp);
        for pair in crossings.chunks_exact(2) {
            let from = (pair[0] - 0.5).ceil().max(0.0) as usize;
            let to = ((pair[1] - 0.5).floor() + 1.0).clamp(0.0, width as f64) as usize;
            for pixel in line.iter_mut().take(to).skip(from) {
                *pixel = true;
            }
        }
    }
    Mask { width, height, data }
}

/// Intersection over union of two masks of one image; 0 when both are empty.
pub fn mask_iou(a: &Mask, b: &Mask) -> f64 {
    let (mut both, mut either) = (0usize, 0usize);
    for (&x, &y) in a.data.iter().zip(&b.data) {
        both += usize::from(x && y);
        either += usize::from(x || y);
    }
    if either == 0 { 0.0 } else { both as f64 / either as f64 }
}

/// The overlap at which a detection is the labelled object: mask IoU 0.5, as in mAP50.
pub const IMAGE_MATCH_IOU: f64 = 0.5;

/// Scores one labelled image: each labelled object takes the class of the detection whose
/// mask overlaps it most (pairs taken best first, each detection once), or [`NOT_FOUND`]. Also
/// returns how many detections matched no labelled object: false alarms the confusion matrix,
/// whose rows are labels, cannot show.
pub fn score_image(
    image: &str,
    labelled: &[(&'static str, Mask)],
    detected: &[(&'static str, f64, Mask)],
) -> (Vec<LevelOutcome>, usize) {
    let mut pairs: Vec<(f64, usize, usize)> = labelled
        .iter()
        .enumerate()
        .flat_map(|(l, (_, label))| {
            detected.iter().enumerate().map(move |(d, (_, _, mask))| (mask_iou(label, mask), l, d))
        })
        .filter(|(iou, _, _)| *iou >= IMAGE_MATCH_IOU)
        .collect();
    pairs.sort_by(|a, b| b.0.total_cmp(&a.0));
    let mut label_match = vec![None; labelled.len()];
    let mut detection_used = vec![false; detected.len()];
    for (_, l, d) in pairs {
        if label_match[l].is_none() && !detection_used[d] {
            label_match[l] = Some(d);
            detection_used[d] = true;
        }
    }
    let outcomes = labelled
        .iter()
        .zip(&label_match)
        .enumerate()
        .map(|(index, ((class, _), matched))| LevelOutcome {
            series: image.to_string(),
            level: format!("object {}", index + 1),
            truth: class.to_string(),
            predicted: matched.map_or(NOT_FOUND, |d| detected[d].0).to_string(),
            confidence: matched.map(|d| detected[d].1),
            dice: matched.map(|d| mask_dice(&labelled[index].1, &detected[d].2)),
        })
        .collect();
    (outcomes, detection_used.iter().filter(|used| !**used).count())
}

/// A detection for average precision: its class, confidence, and whether it is a true positive.
pub type PrecisionRecord = (&'static str, f64, bool);

/// Per image, what average precision needs without keeping masks: each detection's class,
/// confidence and whether it is a true positive (mask IoU 0.5 or more with a labelled object of
/// its class not yet taken by a more confident detection), and the labelled objects per class.
pub fn precision_records(
    labelled: &[(&'static str, Mask)],
    detected: &[(&'static str, f64, Mask)],
) -> (Vec<PrecisionRecord>, BTreeMap<&'static str, u64>) {
    let mut order: Vec<usize> = (0..detected.len()).collect();
    order.sort_by(|&a, &b| detected[b].1.total_cmp(&detected[a].1));
    let mut taken = vec![false; labelled.len()];
    let mut records = Vec::with_capacity(detected.len());
    for d in order {
        let (class, confidence, mask) = &detected[d];
        let best = labelled
            .iter()
            .enumerate()
            .filter(|(l, (c, _))| c == class && !taken[*l])
            .map(|(l, (_, label))| (mask_iou(label, mask), l))
            .filter(|(iou, _)| *iou >= IMAGE_MATCH_IOU)
            .max_by(|a, b| a.0.total_cmp(&b.0));
        if let Some((_, l)) = best {
            taken[l] = true;
        }
        records.push((*class, *confidence, best.is_some()));
    }
    let mut counts = BTreeMap::new();
    for (class, _) in labelled {
        *counts.entry(*class).or_insert(0) += 1;
    }
    (records, counts)
}

/// Average precision per class at mask IoU 0.5 (the area under the precision-recall curve,
/// precision made monotone, all points), over every image's records; `None` for a class with
/// no labelled object.
pub fn average_precision(
    records: &[PrecisionRecord],
    labelled: &BTreeMap<&'static str, u64>,
) -> Vec<(String, Option<f64>)> {
    CLASSES
        .iter()
        .map(|&class| {
            let total = labelled.get(class).copied().unwrap_or(0);
            if total == 0 {
                return (class.to_string(), None);
            }
            let mut own: Vec<(f64, bool)> = records.iter().filter(|r| r.0 == class).map(|r| (r.1, r.2)).collect();
            own.sort_by(|a, b| b.0.total_cmp(&a.0));
            let (mut tp, mut points) = (0u64, Vec::with_capacity(own.len()));
            for (n, (_, hit)) in own.iter().enumerate() {
                tp += u64::from(*hit);
                points.push((tp as f64 / total as f64, tp as f64 / (n + 1) as f64));
            }
            // Precision at each recall: the best at that recall or beyond.
            for i in (0..points.len().saturating_sub(1)).rev() {
                points[i].1 = points[i].1.max(points[i + 1].1);
            }
            let (mut ap, mut recall) = (0.0, 0.0);
            for (r, p) in points {
                ap += (r - recall) * p;
                recall = r;
            }
            (class.to_string(), Some(ap))
        })
        .collect()
}

/// A labelled disc and what the agent said of it.
#[derive(Debug, Clone, Serialize)]
pub struct LevelOutcome {
    pub series: String,
    pub level: String,
    pub truth: String,
    pub predicted: String,
    /// The finding's confidence; `None` when the disc was not found.
    pub confidence: Option<f64>,
    /// Images only: Dice of the matched detection's mask with the labelled one.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub dice: Option<f64>,
}

/// Everything `idaics evaluate` reports.
#[derive(Debug, Clone, Serialize)]
pub struct Evaluation {
    pub levels: Vec<LevelOutcome>,
    pub confusion: ConfusionMatrix,
    pub correct: u64,
    pub total: u64,
    pub accuracy: Option<f64>,
    pub kappa: Option<f64>,
    pub classes: Vec<ClassMetrics>,
    /// Series with labels that were not among the inputs, and inputs without labels: neither
    /// counts, and both are listed so a mistyped UID does not go unnoticed.
    pub left_out: BTreeMap<String, String>,
    /// Images only: detections that matched no labelled object.
    pub unlabelled_detections: Option<u64>,
    /// Images only: mean Dice of the matched objects' masks with their labels.
    pub mean_dice: Option<f64>,
    /// Images only: average precision per class at mask IoU 0.5, and its mean over the classes
    /// with labels (mAP50, as ultralytics reports it for masks).
    #[serde(skip_serializing_if = "Vec::is_empty")]
    pub ap50: Vec<(String, Option<f64>)>,
    pub map50: Option<f64>,
    /// Images with `--folds`: the figures of each fold's images.
    #[serde(skip_serializing_if = "Vec::is_empty")]
    pub folds: Vec<FoldFigures>,
}

/// One fold's share of an evaluation.
#[derive(Debug, Clone, Serialize)]
pub struct FoldFigures {
    pub fold: String,
    pub total: u64,
    pub correct: u64,
    pub accuracy: Option<f64>,
    pub kappa: Option<f64>,
    pub mean_dice: Option<f64>,
}

impl Evaluation {
    /// The figures for these outcomes; an outcome whose truth or prediction is no category of
    /// [`ConfusionMatrix::for_findings`] is an error (a label file naming an unknown class).
    pub fn from_outcomes(
        levels: Vec<LevelOutcome>,
        left_out: BTreeMap<String, String>,
    ) -> Result<Evaluation, EvaluationError> {
        let mut confusion = ConfusionMatrix::for_findings();
        for outcome in &levels {
            if !CLASSES.contains(&outcome.truth.as_str()) {
                return Err(EvaluationError::LabelNotAClass {
                    series: outcome.series.clone(),
                    level: outcome.level.clone(),
                    label: outcome.truth.clone(),
                });
            }
            confusion.add(&outcome.truth, &outcome.predicted)?;
        }
        let classes = CLASSES.iter().map(|c| confusion.class_metrics(c)).collect::<Result<Vec<_>, _>>()?;
        let dice: Vec<f64> = levels.iter().filter_map(|l| l.dice).collect();
        let mean_dice = (!dice.is_empty()).then(|| dice.iter().sum::<f64>() / dice.len() as f64);
        Ok(Evaluation {
            mean_dice,
            ap50: Vec::new(),
            map50: None,
            folds: Vec::new(),
            correct: confusion.correct(),
            total: confusion.total(),
            accuracy: confusion.accuracy(),
            kappa: confusion.kappa(),
            classes,
            confusion,
            levels,
            left_out,
            unlabelled_detections: None,
        })
    }

    /// The paper's two tables, as text.
    pub fn table(&self) -> String {
        use std::fmt::Write;
        let figure = |v: Option<f64>| v.map_or_else(|| "-".to_string(), |v| format!("{v:.3}"));
        let mut out = String::new();
        let width = self.confusion.categories.iter().map(String::len).max().unwrap_or(0).max(12);
        let _ = write!(out, "{:<width$}", "true \\ predicted");
        for c in &self.confusion.categories {
            let _ = write!(out, " {c:>width$}");
        }
        out.push('\n');
        for (i, row) in self.confusion.counts.iter().enumerate().take(CLASSES.len()) {
            let _ = write!(out, "{:<width$}", self.confusion.categories[i]);
            for count in row {
                let _ = write!(out, " {count:>width$}");
            }
            out.push('\n');
        }
        let _ = writeln!(
            out,
            "\naccuracy {}/{} = {}; Cohen's kappa {}\n",
            self.correct,
            self.total,
            self.accuracy.map_or_else(|| "-".to_string(), |a| format!("{:.1}%", a * 100.0)),
            figure(self.kappa)
        );
        let _ = writeln!(
            out,
            "{:<12} {:>8} {:>9} {:>11} {:>11} {:>7} {:>7} {:>7}",
            "class", "labelled", "predicted", "sensitivity", "specificity", "PPV", "NPV", "Youden"
        );
        for m in &self.classes {
            let _ = writeln!(
                out,
                "{:<12} {:>8} {:>9} {:>11} {:>11} {:>7} {:>7} {:>7}",
                m.class,
                m.labelled,
                m.predicted,
                figure(m.sensitivity),
                figure(m.specificity),
                figure(m.ppv),
                figure(m.npv),
                figure(m.youden)
            );
        }
        if let Some(count) = self.unlabelled_detections {
            let _ = writeln!(out, "detections matching no labelled object: {count}");
        }
        if let Some(dice) = self.mean_dice {
            let _ = writeln!(out, "mask Dice of the matched objects, mean: {dice:.3}");
        }
        if !self.ap50.is_empty() {
            let per_class: Vec<String> = self.ap50.iter().map(|(c, ap)| format!("{c} {}", figure(*ap))).collect();
            let _ = writeln!(out, "mask mAP50 {} ({})", figure(self.map50), per_class.join(", "));
        }
        for f in &self.folds {
            let _ = writeln!(
                out,
                "fold {}: {} of {} right, accuracy {}, kappa {}, mean Dice {}",
                f.fold,
                f.correct,
                f.total,
                figure(f.accuracy),
                figure(f.kappa),
                figure(f.mean_dice)
            );
        }
        for (series, why) in &self.left_out {
            let _ = writeln!(out, "left out: {series}: {why}");
        }
        out
    }
}

#[cfg(test)]
mod tests {
    #[test]
    fn average_precision_is_the_area_under_the_monotone_precision_recall_curve() {
        // Two labelled bulges; detections by confidence: hit, miss, hit.
        let records = [("bulge", 0.9, true), ("bulge", 0.8, false), ("bulge", 0.7, true), ("normal", 0.6, false)];
        let labelled = BTreeMap::from([("bulge", 2u64)]);
        let ap = super::average_precision(&records, &labelled);
        let bulge = ap.iter().find(|(c, _)| c == "bulge").unwrap().1.unwrap();
        assert!((bulge - (0.5 + 0.5 * 2.0 / 3.0)).abs() < 1e-12, "{bulge}");
        assert_eq!(ap.iter().find(|(c, _)| c == "normal").unwrap().1, None, "no labelled normal disc");
    }

    #[test]
    fn labelme_shapes_become_masks_with_holes_by_group() {
        let text = r#"{"shapes": [
            {"label": "bulge", "points": [[0, 0], [10, 0], [10, 10], [0, 10]], "group_id": 1, "shape_type": "polygon"},
            {"label": "bulge", "points": [[4, 4], [6, 4], [6, 6], [4, 6]], "group_id": 1, "shape_type": "polygon"},
            {"label": "normal", "points": [[12, 12], [16, 16]], "group_id": null, "shape_type": "rectangle"}
        ]}"#;
        let objects = super::parse_labelme(text, 20, 20).unwrap();
        assert_eq!(objects.iter().map(|o| o.0).collect::<Vec<_>>(), ["bulge", "normal"]);
        assert_eq!(objects[0].1.area(), 100 - 4, "the inner ring is a hole");
        assert_eq!(objects[1].1.area(), 16);
        for (label, says) in [("unlabelled", "not labelled yet"), ("herniation", "unknown label")] {
            let text = format!(r#"{{"shapes": [{{"label": "{label}", "points": [[0, 0], [5, 0], [5, 5]]}}]}}"#);
            let error = super::parse_labelme(&text, 20, 20).unwrap_err().to_string();
            assert!(error.contains(says) && error.contains(label) && error.contains("shape 1"), "{error}");
        }
    }

    use super::*;

    #[test]
    fn perfect_agreement_and_chance_agreement() {
        let mut m = ConfusionMatrix::for_findings();
        for class in CLASSES {
            m.add(class, class).unwrap();
            m.add(class, class).unwrap();
        }
        assert_eq!(m.accuracy(), Some(1.0));
        assert!((m.kappa().unwrap() - 1.0).abs() < 1e-12);

        // Everything called normal: the normal labels are right, and kappa is 0, no better
        // than chance.
        let mut m = ConfusionMatrix::for_findings();
        for class in CLASSES {
            m.add(class, NORMAL).unwrap();
        }
        assert_eq!(m.accuracy(), Some(0.25));
        assert!(m.kappa().unwrap().abs() < 1e-12);
        let normal = m.class_metrics(NORMAL).unwrap();
        assert_eq!((normal.sensitivity, normal.specificity), (Some(1.0), Some(0.0)));
        let bulge = m.class_metrics(BULGE).unwrap();
        assert_eq!((bulge.sensitivity, bulge.ppv), (Some(0.0), None));
    }

    #[test]
    fn labels_find_their_disc_by_position_or_by_name() {
        let finding = |name: &str, z: f64, class: &'static str| {
            let level = crate::analysis::spine::DiscLevel {
                name: name.into(),
                name_certain: true,
                center_lps_mm: [0.0, 0.0, z],
                normal: [0.0, 0.0, 1.0],
            };
            LevelFinding { class, ..LevelFinding::undetermined(&level) }
        };
        // The locator named the discs one level off: position still finds the right ones.
        let findings = [finding("L4/L5", 0.0, BULGE), finding("L3/L4", 35.0, NORMAL)];
        let label = |level: &str, z: Option<f64>, class| Label {
            level: level.into(),
            center_lps_mm: z.map(|z| [0.0, 3.0, z]),
            class,
        };
        let outcomes = score_series(
            "1.2",
            vec![
                label("L5/S1", Some(4.0), BULGE),
                label("L4/L5", Some(31.0), PROTRUSION),
                label("L2/L3", Some(70.0), NORMAL),
                label("L3/L4", None, NORMAL),
                label("T12/L1", None, SCHMORL),
            ],
            &findings,
        );
        let predicted: Vec<&str> = outcomes.iter().map(|o| o.predicted.as_str()).collect();
        assert_eq!(predicted, [BULGE, NORMAL, NOT_FOUND, NORMAL, NOT_FOUND]);
        assert_eq!(outcomes[2].confidence, None);
    }

    #[test]
    fn yolo_polygons_become_masks_and_match_detections_by_overlap() {
        let objects = parse_yolo_labels("2 0.1 0.1 0.5 0.1 0.5 0.5 0.1 0.5\n\n0 0.6 0.6 0.9 0.6 0.75 0.9\n").unwrap();
        assert_eq!(objects.len(), 2);
        assert_eq!(objects[0].class_id, 2);
        let square = rasterize(&objects[0].polygon, 10, 10);
        // Pixel centres 1.5 to 4.5 in both directions lie inside [1, 5].
        assert_eq!(square.area(), 16);
        assert!(square.data[2 * 10 + 3] && !square.data[5 * 10 + 5]);
        let triangle = rasterize(&objects[1].polygon, 10, 10);
        assert!(triangle.area() > 0 && mask_iou(&square, &triangle) == 0.0);
        assert!((mask_iou(&square, &square) - 1.0).abs() < 1e-12);

        let shifted = rasterize(&[[0.2, 0.1], [0.6, 0.1], [0.6, 0.5], [0.2, 0.5]], 10, 10);
        assert!((mask_iou(&square, &shifted) - 12.0 / 20.0).abs() < 1e-12);
        let (outcomes, unmatched) = score_image(
            "a.png",
            &[(BULGE, square.clone()), (NORMAL, triangle)],
            &[
                (PROTRUSION, 0.4, shifted),
                (BULGE, 0.9, square),
                (SCHMORL, 0.3, Mask { width: 10, height: 10, data: vec![false; 100] }),
            ],
        );
        // The exact square wins over the shifted one; the triangle has no detection.
        assert_eq!((outcomes[0].predicted.as_str(), outcomes[0].confidence), (BULGE, Some(0.9)));
        assert_eq!(outcomes[1].predicted, NOT_FOUND);
        assert_eq!(unmatched, 2);

        for bad in ["x 0.1 0.1 0.2 0.2 0.3 0.3", "1 0.1 0.1 0.2", "1 0.1 0.1 0.2 0.2 0.3 nan"] {
            assert!(matches!(parse_yolo_labels(bad), Err(EvaluationError::YoloLabel { line: 1, .. })), "{bad}");
        }
    }

    #[test]
    fn misses_count_against_accuracy_and_sensitivity() {
        let mut m = ConfusionMatrix::for_findings();
        m.add(BULGE, BULGE).unwrap();
        m.add(BULGE, NOT_FOUND).unwrap();
        m.add(PROTRUSION, UNDETERMINED).unwrap();
        m.add(PROTRUSION, PROTRUSION).unwrap();
        assert_eq!(m.accuracy(), Some(0.5));
        let bulge = m.class_metrics(BULGE).unwrap();
        assert_eq!((bulge.sensitivity, bulge.ppv, bulge.specificity), (Some(0.5), Some(1.0), Some(1.0)));
        assert!(m.add("herniation", BULGE).is_err());
        let e = Evaluation::from_outcomes(
            vec![LevelOutcome {
                series: "1.2".into(),
                level: "L4/L5".into(),
                truth: UNDETERMINED.into(),
                predicted: BULGE.into(),
                confidence: Some(0.5),
                dice: None,
            }],
            BTreeMap::new(),
        );
        assert!(e.unwrap_err().to_string().contains("is not one of normal"));
    }
}
