//! Training data from the agent: the exact images the network sees (the sagittal image and each
//! level's axial image), each with a LabelMe pre-annotation that a radiologist corrects instead
//! of drawing from nothing. No public CT labels discs by the paper's four classes, so a site's
//! own annotated images are the only way to clinical weights; starting from what the agent saw
//! keeps training and inference on the same slices.
//!
//! Patients are named by pseudonyms: a keyed hash of the PatientID, with the key and the
//! pseudonym-to-patient mapping kept in the state directory, never beside the images. The same
//! patient keeps the same pseudonym across exports, so training folds can be grouped by patient.

use std::collections::BTreeMap;
use std::io::Write;
use std::path::{Path, PathBuf};

use serde_json::json;
use sha2::{Digest, Sha256};

use crate::analysis::detector::predict::Mask;
use crate::analysis::findings::LevelFinding;
use crate::analysis::slices::{SliceImage, View};
use crate::pipeline::Detector;

/// The label of a shape whose class nobody has decided yet.
pub const UNLABELLED: &str = "unlabelled";
/// The outline drawn where the network drew none, mm: a lumbar disc's half-width and half-depth
/// on the axial image, its half-depth and half-height on the sagittal one.
const AXIAL_HALF_AXES_MM: (f64, f64) = (20.0, 14.0);
const SAGITTAL_HALF_SIDES_MM: (f64, f64) = (18.0, 4.0);
const ELLIPSE_POINTS: usize = 24;

#[derive(Debug, thiserror::Error)]
pub enum DatasetError {
    #[error("{path}: {source}")]
    Io { path: PathBuf, source: std::io::Error },
    #[error(transparent)]
    Pipeline(#[from] crate::pipeline::PipelineError),
    #[error("{path}: {reason}")]
    Image { path: PathBuf, reason: String },
    #[error("{0}: no PatientID or SeriesInstanceUID to name it by")]
    Identity(PathBuf),
}

fn io(path: &Path) -> impl FnOnce(std::io::Error) -> DatasetError + '_ {
    move |source| DatasetError::Io { path: path.to_path_buf(), source }
}

/// The key and the mapping of the state directory's `dataset/` folder.
pub struct Pseudonyms {
    key: Vec<u8>,
    mapping: PathBuf,
}

impl Pseudonyms {
    /// Opens the key (created at first use, readable by the agent's user only) and the mapping.
    pub fn open(state_dir: &Path) -> Result<Pseudonyms, DatasetError> {
        use std::os::unix::fs::OpenOptionsExt;
        let dir = state_dir.join("dataset");
        std::fs::create_dir_all(&dir).map_err(io(&dir))?;
        let key_path = dir.join("pseudonym.key");
        let key = match std::fs::read(&key_path) {
            Ok(key) if key.len() >= 16 => key,
            _ => {
                let mut key = vec![0u8; 32];
                let random = Path::new("/dev/urandom");
                std::io::Read::read_exact(&mut std::fs::File::open(random).map_err(io(random))?, &mut key)
                    .map_err(io(random))?;
                let mut file = std::fs::OpenOptions::new()
                    .write(true)
                    .create(true)
                    .truncate(true)
                    .mode(0o600)
                    .open(&key_path)
                    .map_err(io(&key_path))?;
                file.write_all(&key).and_then(|()| file.sync_all()).map_err(io(&key_path))?;
                key
            }
        };
        Ok(Pseudonyms { key, mapping: dir.join("mapping.csv") })
    }

    fn keyed(&self, kind: &str, value: &str, length: usize) -> String {
        let mut hash = Sha256::new();
        hash.update(&self.key);
        hash.update(kind.as_bytes());
        hash.update([0]);
        hash.update(value.as_bytes());
        let hex: String = hash.finalize().iter().map(|b| format!("{b:02x}")).collect();
        hex[..length].to_string()
    }

    /// The patient's pseudonym, and the case name (patient and series) the files of one series
    /// are named by; the mapping gains a line for a case it does not hold yet.
    fn name(&self, patient_id: &str, study_uid: &str, series_uid: &str) -> Result<(String, String), DatasetError> {
        let patient = format!("P{}", self.keyed("patient", patient_id, 10));
        let case = format!("{patient}-S{}", self.keyed("series", series_uid, 8));
        let known = std::fs::read_to_string(&self.mapping).unwrap_or_default();
        if known.lines().any(|l| l.starts_with(&format!("{case},"))) {
            return Ok((patient, case));
        }
        let mut file =
            std::fs::OpenOptions::new().create(true).append(true).open(&self.mapping).map_err(io(&self.mapping))?;
        let mut line = String::new();
        if known.is_empty() {
            line.push_str("case,patient_pseudonym,patient_id,study_uid,series_uid\n");
        }
        let quoted = |v: &str| format!("\"{}\"", v.replace('"', "\"\""));
        line.push_str(&format!("{case},{patient},{},{study_uid},{series_uid}\n", quoted(patient_id)));
        file.write_all(line.as_bytes()).map_err(io(&self.mapping))?;
        Ok((patient, case))
    }
}

/// Readers' classes by series and level: each finding's latest review.
pub struct ReviewedLabels {
    by_series: BTreeMap<String, BTreeMap<String, Reviewed>>,
}

/// A level's class as its reader gave it.
#[derive(Debug, Clone)]
pub struct Reviewed {
    pub class: String,
    pub reviewer: String,
    pub reviewed_at: String,
}

impl ReviewedLabels {
    /// From the log's reviews, oldest first: a later review of a finding replaces an earlier one.
    pub fn latest(reviews: Vec<crate::store::db::ReviewRow>) -> ReviewedLabels {
        let mut by_series: BTreeMap<String, BTreeMap<String, Reviewed>> = BTreeMap::new();
        for r in reviews {
            let reviewed = Reviewed { class: r.class, reviewer: r.reviewer, reviewed_at: r.reviewed_at };
            by_series.entry(r.series_uid).or_default().insert(r.level, reviewed);
        }
        ReviewedLabels { by_series }
    }

    pub fn series(&self) -> Vec<String> {
        self.by_series.keys().cloned().collect()
    }

    pub fn of_series(&self, series_uid: &str) -> BTreeMap<String, Reviewed> {
        self.by_series.get(series_uid).cloned().unwrap_or_default()
    }
}

/// Analyses the series in `files` as the agent does and writes its images and pre-annotations
/// into `out`; returns the PNG files written, each with its LabelMe JSON beside it. With
/// `reviewed`, only the reviewed levels' axial images, labelled with the readers' classes, and
/// the sagittal image only when every level on it was reviewed: a disc left unannotated on an
/// image would teach the network that it is background.
pub fn export_series(
    files: &[PathBuf],
    series_config: &crate::config::SeriesConfig,
    detector: Option<&Detector>,
    pseudonyms: &Pseudonyms,
    reviewed: Option<&BTreeMap<String, Reviewed>>,
    out: &Path,
) -> Result<Vec<PathBuf>, DatasetError> {
    let mut analysis = crate::pipeline::analyze_files(files, series_config, detector)?;
    if let Some(reviewed) = reviewed {
        for finding in &mut analysis.findings {
            if let Some(r) = reviewed.get(&finding.level.name) {
                finding.class = crate::analysis::findings::canonical_class(&r.class)
                    .unwrap_or(crate::analysis::findings::UNDETERMINED);
            }
        }
    }
    let first = files.first().ok_or_else(|| DatasetError::Identity(out.to_path_buf()))?;
    let header = dicom_object::OpenFileOptions::new()
        .read_until(dicom_dictionary_std::tags::PIXEL_DATA)
        .open_file(first)
        .map_err(|e| DatasetError::Image { path: first.clone(), reason: e.to_string() })?;
    let text = |tag| {
        header.element(tag).ok().and_then(|e| e.to_str().ok()).map(|s| s.trim_end_matches(['\0', ' ']).to_string())
    };
    let patient_id = text(dicom_dictionary_std::tags::PATIENT_ID).unwrap_or_default();
    let study_uid = text(dicom_dictionary_std::tags::STUDY_INSTANCE_UID).unwrap_or_default();
    let series_uid = text(dicom_dictionary_std::tags::SERIES_INSTANCE_UID)
        .filter(|s| !s.is_empty())
        .ok_or_else(|| DatasetError::Identity(first.clone()))?;
    let (patient, case) = pseudonyms.name(&patient_id, &study_uid, &series_uid)?;
    std::fs::create_dir_all(out).map_err(io(out))?;
    let weights = detector.map(|d| d.sha256.clone());
    let context = Context { patient: &patient, case: &case, series_uid: &series_uid, weights: weights.as_deref() };
    let mut images = Vec::new();
    let is_reviewed = |f: &LevelFinding| reviewed.is_none_or(|r| r.contains_key(&f.level.name));
    let review_of = |f: &LevelFinding| reviewed.and_then(|r| r.get(&f.level.name)).cloned();
    if let Some(sagittal) = analysis.sagittal.as_ref().filter(|_| analysis.findings.iter().all(is_reviewed)) {
        let shapes: Vec<serde_json::Value> =
            analysis.findings.iter().map(|f| shape(f, sagittal, View::SAGITTAL)).collect();
        let reviews: Vec<Option<Reviewed>> = analysis.findings.iter().map(review_of).collect();
        images.push(write_image(out, &format!("{case}_sagittal"), sagittal, shapes, &context, None, &reviews)?);
    }
    for (finding, axial) in analysis.findings.iter().zip(&analysis.axials).filter(|(f, _)| is_reviewed(f)) {
        let name = format!("{case}_{}", finding.level.name.replace('/', "-"));
        let shapes = vec![shape(finding, axial, View::AXIAL)];
        images.push(write_image(out, &name, axial, shapes, &context, Some(finding), &[review_of(finding)])?);
    }
    Ok(images)
}

struct Context<'a> {
    patient: &'a str,
    case: &'a str,
    series_uid: &'a str,
    weights: Option<&'a str>,
}

fn write_image(
    out: &Path,
    name: &str,
    image: &SliceImage,
    shapes: Vec<serde_json::Value>,
    context: &Context,
    level: Option<&LevelFinding>,
    reviews: &[Option<Reviewed>],
) -> Result<PathBuf, DatasetError> {
    let reviews: Vec<serde_json::Value> = reviews
        .iter()
        .flatten()
        .map(|r| json!({"class": r.class, "reviewer": r.reviewer, "reviewed_at": r.reviewed_at}))
        .collect();
    let png = out.join(format!("{name}.png"));
    let gray = image::GrayImage::from_raw(image.size as u32, image.size as u32, image.pixels.clone())
        .ok_or_else(|| DatasetError::Image { path: png.clone(), reason: "image buffer size".into() })?;
    gray.save(&png).map_err(|e| DatasetError::Image { path: png.clone(), reason: e.to_string() })?;
    let document = json!({
        "version": "5.4.1",
        "flags": {},
        "shapes": shapes,
        "imagePath": format!("{name}.png"),
        "imageData": null,
        "imageHeight": image.size,
        "imageWidth": image.size,
        "idaics": {
            "case": context.case,
            "patient": context.patient,
            "series_uid": context.series_uid,
            "view": image.view.kind(),
            "level": level.map(|f| f.level.name.clone()),
            "level_certain": level.map(|f| f.level.name_certain),
            "pixel_spacing_mm": image.pixel_spacing_mm,
            "weights_sha256": context.weights,
            "reviews": reviews,
        },
    });
    let json_path = out.join(format!("{name}.json"));
    let text = serde_json::to_vec_pretty(&document).expect("a JSON value serialises");
    std::fs::write(&json_path, text).map_err(io(&json_path))?;
    Ok(png)
}

/// One level's outline on one view: the network's mask where it drew one on this view (its
/// convex hull, which the reader adjusts), else the locator's geometry; labelled with the
/// agent's finding, or [`UNLABELLED`].
fn shape(finding: &LevelFinding, image: &SliceImage, view: &str) -> serde_json::Value {
    let drawn = finding.evidence.iter().find(|e| e.view == view).and_then(|e| convex_hull(&e.mask));
    let (points, outline) = match drawn {
        Some(points) => (points, "mask"),
        None => (locator_outline(finding, image, view), "locator"),
    };
    let label = if finding.class == "undetermined" { UNLABELLED } else { finding.class };
    json!({
        "label": label,
        "points": points,
        "group_id": null,
        "description": format!("{} confidence {:.2} outline {outline}", finding.level.label(), finding.confidence),
        "shape_type": "polygon",
        "flags": {},
    })
}

/// Where the disc lies by the locator: an ellipse across the disc on the axial image; on the
/// sagittal one a box along the disc's plane.
fn locator_outline(finding: &LevelFinding, image: &SliceImage, view: &str) -> Vec<[f64; 2]> {
    let (cx, cy) = image.lps_to_pixel(finding.level.center_lps_mm);
    let mm = |v: f64| v / image.pixel_spacing_mm;
    if view == View::AXIAL {
        let (a, b) = AXIAL_HALF_AXES_MM;
        return (0..ELLIPSE_POINTS)
            .map(|n| {
                let t = n as f64 * std::f64::consts::TAU / ELLIPSE_POINTS as f64;
                [cx + mm(a) * t.cos(), cy + mm(b) * t.sin()]
            })
            .collect();
    }
    // The disc's normal in the image's pixels; the plane runs across it.
    let along = |axis: [f64; 3]| crate::geometry::dot(finding.level.normal, axis);
    let (nx, ny) = (along(image.row_direction), along(image.column_direction));
    let length = (nx * nx + ny * ny).sqrt().max(1e-9);
    let (nx, ny) = (nx / length, ny / length);
    let (px, py) = (-ny, nx);
    let (half_depth, half_height) = SAGITTAL_HALF_SIDES_MM;
    [(-1.0, -1.0), (1.0, -1.0), (1.0, 1.0), (-1.0, 1.0)]
        .iter()
        .map(|&(u, v)| {
            [
                cx + u * mm(half_depth) * px + v * mm(half_height) * nx,
                cy + u * mm(half_depth) * py + v * mm(half_height) * ny,
            ]
        })
        .collect()
}

/// The convex hull of a mask's pixels (their corners), once round, clockwise as the image is
/// shown (rows downwards); `None` for an empty mask.
pub fn convex_hull(mask: &Mask) -> Option<Vec<[f64; 2]>> {
    let mut points: Vec<(i64, i64)> = Vec::new();
    for y in 0..mask.height {
        let row = &mask.data[y * mask.width..(y + 1) * mask.width];
        // The outermost pixels of each row are enough for the hull.
        if let (Some(first), Some(last)) = (row.iter().position(|&v| v), row.iter().rposition(|&v| v)) {
            let (y, first, last) = (y as i64, first as i64, last as i64);
            points.extend([(first, y), (first, y + 1), (last + 1, y), (last + 1, y + 1)]);
        }
    }
    if points.is_empty() {
        return None;
    }
    points.sort_unstable();
    points.dedup();
    let cross = |o: (i64, i64), a: (i64, i64), b: (i64, i64)| (a.0 - o.0) * (b.1 - o.1) - (a.1 - o.1) * (b.0 - o.0);
    // Andrew's monotone chain.
    let mut hull: Vec<(i64, i64)> = Vec::with_capacity(points.len() + 1);
    for pass in [points.clone(), points.iter().rev().copied().collect()] {
        let start = hull.len();
        for p in pass {
            while hull.len() >= start + 2 && cross(hull[hull.len() - 2], hull[hull.len() - 1], p) <= 0 {
                hull.pop();
            }
            hull.push(p);
        }
        hull.pop();
    }
    Some(hull.into_iter().map(|(x, y)| [x as f64, y as f64]).collect())
}

/// Writes progress on one line of a terminal; nothing when stderr is not one.
pub fn progress(done: usize, total: usize, what: &str) {
    use std::io::IsTerminal;
    if std::io::stderr().is_terminal() {
        eprint!("\r{done}/{total} {what}\x1b[K");
        if done == total {
            eprintln!();
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn convex_hull_of_an_l_shape_is_its_outer_corners() {
        // An L: a 2x3 block with a 1x1 foot.
        let (width, height) = (4, 4);
        let mut data = vec![false; width * height];
        for (x, y) in [(1, 0), (1, 1), (1, 2), (2, 2)] {
            data[y * width + x] = true;
        }
        let hull = convex_hull(&Mask { width, height, data }).unwrap();
        assert_eq!(hull, vec![[1.0, 0.0], [2.0, 0.0], [3.0, 2.0], [3.0, 3.0], [1.0, 3.0]]);
        assert!(convex_hull(&Mask { width, height, data: vec![false; 16] }).is_none());
    }

    #[test]
    fn pseudonyms_are_stable_keyed_and_mapped_in_the_state_directory() {
        let state = tempfile::tempdir().unwrap();
        let names = Pseudonyms::open(state.path()).unwrap();
        let (patient, case) = names.name("MRN-1234", "1.2.3", "1.2.3.4").unwrap();
        assert!(!patient.contains("1234") && case.starts_with(&patient));
        // The same key gives the same pseudonym; another state directory, another.
        assert_eq!(Pseudonyms::open(state.path()).unwrap().name("MRN-1234", "1.2.3", "1.2.3.5").unwrap().0, patient);
        let other = tempfile::tempdir().unwrap();
        assert_ne!(Pseudonyms::open(other.path()).unwrap().name("MRN-1234", "1.2.3", "1.2.3.4").unwrap().0, patient);
        names.name("MRN-1234", "1.2.3", "1.2.3.4").unwrap();
        let mapping = std::fs::read_to_string(state.path().join("dataset/mapping.csv")).unwrap();
        assert_eq!(mapping.lines().count(), 3, "the header and two cases, each once: {mapping}");
        assert!(mapping.contains("\"MRN-1234\""));
        use std::os::unix::fs::PermissionsExt;
        let mode = std::fs::metadata(state.path().join("dataset/pseudonym.key")).unwrap().permissions().mode();
        assert_eq!(mode & 0o077, 0, "the key is the agent's alone");
    }
}
