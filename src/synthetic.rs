//! Synthetic CT series written with dicom-object: a cylinder of soft tissue with a bony ring, in
//! Hounsfield units, on a regular axial grid. Used by the tests and the ingest benchmark, where a
//! series with known geometry and UIDs is needed and no real patient data may be committed.

use std::path::{Path, PathBuf};

use dicom_core::value::PrimitiveValue;
use dicom_core::{DataElement, VR};
use dicom_dictionary_std::{tags, uids};
use dicom_object::InMemDicomObject;
use dicom_object::meta::FileMetaTableBuilder;

#[derive(Debug, thiserror::Error)]
pub enum SyntheticError {
    #[error("cannot create {path}: {source}")]
    Io { path: PathBuf, source: std::io::Error },
    #[error("cannot encode DICOM: {0}")]
    Encode(String),
}

/// Shape of a synthetic series.
#[derive(Debug, Clone)]
pub struct SeriesSpec {
    pub slices: usize,
    pub size: u16,
    pub pixel_spacing_mm: f64,
    pub slice_spacing_mm: f64,
    /// Determines the UIDs: the same seed gives the same study, series and instance UIDs.
    pub seed: u64,
    /// Reverses the file order relative to the slice order, as some scanners do.
    pub reverse_instance_numbers: bool,
}

impl Default for SeriesSpec {
    fn default() -> Self {
        SeriesSpec {
            slices: 40,
            size: 128,
            pixel_spacing_mm: 0.8,
            slice_spacing_mm: 1.0,
            seed: 1,
            reverse_instance_numbers: false,
        }
    }
}

/// What was written.
#[derive(Debug, Clone)]
pub struct SyntheticSeries {
    pub study_uid: String,
    pub series_uid: String,
    pub sop_uids: Vec<String>,
    pub files: Vec<PathBuf>,
}

/// A UID under 2.25 (UUID-derived root, PS3.5 B.2) made deterministic from a seed and a role.
pub fn derived_uid(seed: u64, role: u64) -> String {
    let mut x = seed ^ role.wrapping_mul(0x9E37_79B9_7F4A_7C15);
    let mut next = || {
        x = x.wrapping_add(0x9E37_79B9_7F4A_7C15);
        let mut z = x;
        z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
        z ^ (z >> 31)
    };
    let value = (u128::from(next()) << 64 | u128::from(next())) >> 2;
    format!("2.25.{value}")
}

/// Writes `spec.slices` CT Image Storage files named `slice_NNNN.dcm` into `dir`.
pub fn write_ct_series(dir: &Path, spec: &SeriesSpec) -> Result<SyntheticSeries, SyntheticError> {
    let n = spec.size as usize;
    let half_extent = spec.pixel_spacing_mm * (n as f64) / 2.0;
    let placement = AxialPlacement {
        patient_position: PatientPosition::Hfs,
        row_direction: [1.0, 0.0, 0.0],
        column_direction: [0.0, 1.0, 0.0],
        position_of: |i| [-half_extent, -half_extent, -(i as f64) * spec.slice_spacing_mm],
    };
    write_axial_series(dir, spec, &placement, |i| slice_pixels(n, spec.pixel_spacing_mm, i))
}

/// How the patient lay on the table (PatientPosition). It sets which way the scanner's image
/// rows and columns run through the patient: a viewer shows axial images as seen from the feet,
/// anterior up, whatever the position.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum PatientPosition {
    /// Head first, supine.
    #[default]
    Hfs,
    /// Feet first, supine.
    Ffs,
    /// Head first, prone: CT-guided spine procedures.
    Hfp,
    /// Feet first, prone.
    Ffp,
}

impl PatientPosition {
    pub const ALL: [PatientPosition; 4] =
        [PatientPosition::Hfs, PatientPosition::Ffs, PatientPosition::Hfp, PatientPosition::Ffp];

    /// The DICOM code.
    pub fn code(self) -> &'static str {
        match self {
            PatientPosition::Hfs => "HFS",
            PatientPosition::Ffs => "FFS",
            PatientPosition::Hfp => "HFP",
            PatientPosition::Ffp => "FFP",
        }
    }

    /// LPS directions of an untilted axial image's rows and columns in this position.
    pub fn axial_directions(self) -> ([f64; 3], [f64; 3]) {
        match self {
            PatientPosition::Hfs => ([1.0, 0.0, 0.0], [0.0, 1.0, 0.0]),
            PatientPosition::Ffs => ([-1.0, 0.0, 0.0], [0.0, 1.0, 0.0]),
            PatientPosition::Hfp => ([-1.0, 0.0, 0.0], [0.0, -1.0, 0.0]),
            PatientPosition::Ffp => ([1.0, 0.0, 0.0], [0.0, -1.0, 0.0]),
        }
    }
}

impl std::str::FromStr for PatientPosition {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, String> {
        PatientPosition::ALL
            .into_iter()
            .find(|p| p.code().eq_ignore_ascii_case(s.trim()))
            .ok_or_else(|| format!("{s:?}: expected HFS, FFS, HFP or FFP"))
    }
}

/// Where the slices of a written axial series lie: slice `i` has its first pixel at
/// `position_of(i)` (LPS mm), its rows along `row_direction` and its columns along
/// `column_direction` (tilted about the left-right axis when the gantry was).
pub struct AxialPlacement<F: Fn(usize) -> [f64; 3]> {
    pub patient_position: PatientPosition,
    pub row_direction: [f64; 3],
    pub column_direction: [f64; 3],
    pub position_of: F,
}

/// Writes an axial series placed by `placement`, slice `i` holding `pixels(i)`, stored values
/// (HU + 1024) row by row.
pub fn write_axial_series<F: Fn(usize) -> [f64; 3]>(
    dir: &Path,
    spec: &SeriesSpec,
    placement: &AxialPlacement<F>,
    pixels: impl Fn(usize) -> Vec<i16>,
) -> Result<SyntheticSeries, SyntheticError> {
    let AxialPlacement { patient_position, row_direction, column_direction, ref position_of } = *placement;
    std::fs::create_dir_all(dir).map_err(|source| SyntheticError::Io { path: dir.to_path_buf(), source })?;
    let study_uid = derived_uid(spec.seed, 1);
    let series_uid = derived_uid(spec.seed, 2);
    let frame_of_reference = derived_uid(spec.seed, 3);
    let mut written = SyntheticSeries {
        study_uid: study_uid.clone(),
        series_uid: series_uid.clone(),
        sop_uids: Vec::new(),
        files: Vec::new(),
    };
    for i in 0..spec.slices {
        let sop_uid = derived_uid(spec.seed, 1000 + i as u64);
        let position = position_of(i);
        let instance_number = if spec.reverse_instance_numbers { spec.slices - i } else { i + 1 };
        let pixels = pixels(i);
        let mut obj = InMemDicomObject::new_empty();
        let mut put = |tag, vr, value: PrimitiveValue| obj.put(DataElement::new(tag, vr, value));
        put(tags::SPECIFIC_CHARACTER_SET, VR::CS, "ISO_IR 100".into());
        put(tags::IMAGE_TYPE, VR::CS, strs(&["ORIGINAL", "PRIMARY", "AXIAL"]));
        put(tags::SOP_CLASS_UID, VR::UI, uids::CT_IMAGE_STORAGE.into());
        put(tags::SOP_INSTANCE_UID, VR::UI, sop_uid.as_str().into());
        put(tags::STUDY_DATE, VR::DA, "20260101".into());
        put(tags::STUDY_TIME, VR::TM, "120000".into());
        put(tags::ACCESSION_NUMBER, VR::SH, format!("ACC{}", spec.seed).into());
        put(tags::MODALITY, VR::CS, "CT".into());
        put(tags::MANUFACTURER, VR::LO, "IDAICS synthetic".into());
        put(tags::REFERRING_PHYSICIAN_NAME, VR::PN, "".into());
        put(tags::PATIENT_NAME, VR::PN, "SYNTHETIC^PHANTOM".into());
        put(tags::PATIENT_ID, VR::LO, format!("SYN{}", spec.seed).into());
        put(tags::PATIENT_BIRTH_DATE, VR::DA, "".into());
        put(tags::PATIENT_SEX, VR::CS, "O".into());
        put(tags::BODY_PART_EXAMINED, VR::CS, "LSPINE".into());
        put(tags::SLICE_THICKNESS, VR::DS, format!("{}", spec.slice_spacing_mm).into());
        put(tags::KVP, VR::DS, "120".into());
        put(tags::PATIENT_POSITION, VR::CS, patient_position.code().into());
        put(tags::STUDY_INSTANCE_UID, VR::UI, study_uid.as_str().into());
        put(tags::SERIES_INSTANCE_UID, VR::UI, series_uid.as_str().into());
        put(tags::STUDY_ID, VR::SH, "1".into());
        put(tags::SERIES_NUMBER, VR::IS, "2".into());
        put(tags::INSTANCE_NUMBER, VR::IS, instance_number.to_string().into());
        put(
            tags::IMAGE_POSITION_PATIENT,
            VR::DS,
            strs(&position.map(|v| format!("{v:.3}")).each_ref().map(String::as_str)),
        );
        let orientation = [
            row_direction[0],
            row_direction[1],
            row_direction[2],
            column_direction[0],
            column_direction[1],
            column_direction[2],
        ];
        let orientation = orientation.map(direction_cosine);
        put(tags::IMAGE_ORIENTATION_PATIENT, VR::DS, strs(&orientation.each_ref().map(String::as_str)));
        put(tags::FRAME_OF_REFERENCE_UID, VR::UI, frame_of_reference.as_str().into());
        put(tags::POSITION_REFERENCE_INDICATOR, VR::LO, "".into());
        put(tags::SAMPLES_PER_PIXEL, VR::US, PrimitiveValue::from(1_u16));
        put(tags::PHOTOMETRIC_INTERPRETATION, VR::CS, "MONOCHROME2".into());
        put(tags::ROWS, VR::US, PrimitiveValue::from(spec.size));
        put(tags::COLUMNS, VR::US, PrimitiveValue::from(spec.size));
        let spacing = format!("{}", spec.pixel_spacing_mm);
        put(tags::PIXEL_SPACING, VR::DS, strs(&[&spacing, &spacing]));
        put(tags::BITS_ALLOCATED, VR::US, PrimitiveValue::from(16_u16));
        put(tags::BITS_STORED, VR::US, PrimitiveValue::from(16_u16));
        put(tags::HIGH_BIT, VR::US, PrimitiveValue::from(15_u16));
        put(tags::PIXEL_REPRESENTATION, VR::US, PrimitiveValue::from(1_u16));
        put(tags::WINDOW_CENTER, VR::DS, "40".into());
        put(tags::WINDOW_WIDTH, VR::DS, "400".into());
        put(tags::RESCALE_INTERCEPT, VR::DS, "-1024".into());
        put(tags::RESCALE_SLOPE, VR::DS, "1".into());
        put(tags::RESCALE_TYPE, VR::LO, "HU".into());
        put(tags::PIXEL_DATA, VR::OW, PrimitiveValue::I16(pixels.into()));
        let meta = FileMetaTableBuilder::new()
            .media_storage_sop_class_uid(uids::CT_IMAGE_STORAGE)
            .media_storage_sop_instance_uid(sop_uid.as_str())
            .transfer_syntax(uids::EXPLICIT_VR_LITTLE_ENDIAN)
            .implementation_class_uid(crate::common::IMPLEMENTATION_CLASS_UID)
            .build()
            .map_err(|e| SyntheticError::Encode(e.to_string()))?;
        let file_obj = obj.with_exact_meta(meta);
        let path = dir.join(format!("slice_{:04}.dcm", i + 1));
        file_obj.write_to_file(&path).map_err(|e| SyntheticError::Encode(e.to_string()))?;
        written.sop_uids.push(sop_uid);
        written.files.push(path);
    }
    Ok(written)
}

/// A direction cosine as scanners write it: "1" and "0" exactly, seven decimals where a tilt
/// needs them.
fn direction_cosine(value: f64) -> String {
    let text = format!("{:.7}", value + 0.0); // + 0.0 turns -0 into 0
    let text = text.trim_end_matches('0').trim_end_matches('.');
    if text == "-0" { "0".into() } else { text.into() }
}

fn strs(values: &[&str]) -> PrimitiveValue {
    PrimitiveValue::Strs(values.iter().map(|s| s.to_string()).collect())
}

/// Stored values (HU + 1024): air outside, soft tissue in a body ellipse, a bony ring near the
/// centre whose radius drifts with the slice so neighbouring slices differ.
fn slice_pixels(n: usize, spacing: f64, slice: usize) -> Vec<i16> {
    let mut out = Vec::with_capacity(n * n);
    let c = n as f64 / 2.0;
    let ring = 12.0 + 3.0 * ((slice as f64) / 7.0).sin();
    for y in 0..n {
        for x in 0..n {
            let dx = (x as f64 - c) * spacing;
            let dy = (y as f64 - c) * spacing;
            let body = (dx / (0.45 * n as f64 * spacing)).powi(2) + (dy / (0.35 * n as f64 * spacing)).powi(2) <= 1.0;
            let r = (dx * dx + (dy - 0.1 * n as f64 * spacing).powi(2)).sqrt();
            let hu: i32 = if !body {
                -1000
            } else if (r - ring).abs() < 3.0 {
                900
            } else if r < ring {
                250
            } else {
                40 + ((x * 7 + y * 13 + slice * 3) % 11) as i32 - 5
            };
            out.push((hu + 1024) as i16);
        }
    }
    out
}

/// Re-encodes a single-frame CT series as one Enhanced CT Image Storage object: geometry in the
/// shared and per-frame functional groups, frames in reverse file order (so a reader must sort
/// them by position), each frame with its own rescale intercept (so a reader must apply the
/// per-frame value transformation). Lets the volume stage be tested on the multi-frame form that
/// modern scanners send, with the single-frame volume as the reference.
pub fn write_enhanced_ct(single_frame: &[PathBuf], path: &Path, seed: u64) -> Result<PathBuf, SyntheticError> {
    use dicom_core::value::DataSetSequence;
    let encode = |e: String| SyntheticError::Encode(e);
    let sources: Vec<dicom_object::DefaultDicomObject> = single_frame
        .iter()
        .map(|p| dicom_object::open_file(p).map_err(|e| encode(format!("{}: {e}", p.display()))))
        .collect::<Result<_, _>>()?;
    let first = sources.first().ok_or_else(|| encode("no source slices".into()))?;
    let text = |obj: &dicom_object::DefaultDicomObject, tag| -> Result<String, SyntheticError> {
        obj.element(tag)
            .ok()
            .and_then(|e| e.to_str().ok())
            .map(|s| s.to_string())
            .ok_or_else(|| encode(format!("{tag} missing")))
    };
    let item = |elements: Vec<DataElement<InMemDicomObject>>| InMemDicomObject::from_element_iter(elements);
    let seq = |tag, items: Vec<InMemDicomObject>| DataElement::new(tag, VR::SQ, DataSetSequence::from(items));
    let shared = item(vec![
        seq(
            tags::PIXEL_MEASURES_SEQUENCE,
            vec![item(vec![
                DataElement::new(tags::PIXEL_SPACING, VR::DS, PrimitiveValue::from(text(first, tags::PIXEL_SPACING)?)),
                DataElement::new(
                    tags::SLICE_THICKNESS,
                    VR::DS,
                    PrimitiveValue::from(text(first, tags::SLICE_THICKNESS)?),
                ),
            ])],
        ),
        seq(
            tags::PLANE_ORIENTATION_SEQUENCE,
            vec![item(vec![DataElement::new(
                tags::IMAGE_ORIENTATION_PATIENT,
                VR::DS,
                PrimitiveValue::from(text(first, tags::IMAGE_ORIENTATION_PATIENT)?),
            )])],
        ),
    ]);
    let mut per_frame = Vec::new();
    let mut pixels: Vec<i16> = Vec::new();
    for (index, source) in sources.iter().enumerate().rev() {
        // Frame n stores HU + 1024 + n * 10 and says so in its own intercept.
        let shift = (per_frame.len() * 10) as i16;
        let values: Vec<i16> = source
            .element(tags::PIXEL_DATA)
            .ok()
            .and_then(|e| e.value().to_multi_int::<i16>().ok())
            .ok_or_else(|| encode(format!("slice {index}: no native 16-bit pixel data")))?;
        pixels.extend(values.iter().map(|v| v.saturating_add(shift)));
        let intercept = -1024 - i32::from(shift);
        per_frame.push(item(vec![
            seq(
                tags::FRAME_CONTENT_SEQUENCE,
                vec![item(vec![DataElement::new(
                    tags::IN_STACK_POSITION_NUMBER,
                    VR::UL,
                    PrimitiveValue::from((index + 1) as u32),
                )])],
            ),
            seq(
                tags::PLANE_POSITION_SEQUENCE,
                vec![item(vec![DataElement::new(
                    tags::IMAGE_POSITION_PATIENT,
                    VR::DS,
                    PrimitiveValue::from(text(source, tags::IMAGE_POSITION_PATIENT)?),
                )])],
            ),
            seq(
                tags::PIXEL_VALUE_TRANSFORMATION_SEQUENCE,
                vec![item(vec![
                    DataElement::new(tags::RESCALE_INTERCEPT, VR::DS, PrimitiveValue::from(intercept.to_string())),
                    DataElement::new(tags::RESCALE_SLOPE, VR::DS, PrimitiveValue::from("1")),
                    DataElement::new(tags::RESCALE_TYPE, VR::LO, PrimitiveValue::from("HU")),
                ])],
            ),
        ]));
    }
    let sop_uid = derived_uid(seed, 900);
    let mut obj = InMemDicomObject::new_empty();
    // Patient, study and series attributes carry over from the first slice.
    for tag in [
        tags::SPECIFIC_CHARACTER_SET,
        tags::STUDY_DATE,
        tags::STUDY_TIME,
        tags::ACCESSION_NUMBER,
        tags::MODALITY,
        tags::MANUFACTURER,
        tags::REFERRING_PHYSICIAN_NAME,
        tags::PATIENT_NAME,
        tags::PATIENT_ID,
        tags::PATIENT_BIRTH_DATE,
        tags::PATIENT_SEX,
        tags::BODY_PART_EXAMINED,
        tags::STUDY_INSTANCE_UID,
        tags::SERIES_INSTANCE_UID,
        tags::STUDY_ID,
        tags::SERIES_NUMBER,
        tags::FRAME_OF_REFERENCE_UID,
        tags::POSITION_REFERENCE_INDICATOR,
        tags::ROWS,
        tags::COLUMNS,
    ] {
        if let Ok(element) = first.element(tag) {
            obj.put(element.clone());
        }
    }
    let mut put = |tag, vr, value: PrimitiveValue| obj.put(DataElement::new(tag, vr, value));
    put(tags::IMAGE_TYPE, VR::CS, strs(&["ORIGINAL", "PRIMARY", "AXIAL", "NONE"]));
    put(tags::SOP_CLASS_UID, VR::UI, uids::ENHANCED_CT_IMAGE_STORAGE.into());
    put(tags::SOP_INSTANCE_UID, VR::UI, sop_uid.as_str().into());
    put(tags::INSTANCE_NUMBER, VR::IS, "1".into());
    put(tags::NUMBER_OF_FRAMES, VR::IS, sources.len().to_string().into());
    put(tags::SAMPLES_PER_PIXEL, VR::US, PrimitiveValue::from(1_u16));
    put(tags::PHOTOMETRIC_INTERPRETATION, VR::CS, "MONOCHROME2".into());
    put(tags::BITS_ALLOCATED, VR::US, PrimitiveValue::from(16_u16));
    put(tags::BITS_STORED, VR::US, PrimitiveValue::from(16_u16));
    put(tags::HIGH_BIT, VR::US, PrimitiveValue::from(15_u16));
    put(tags::PIXEL_REPRESENTATION, VR::US, PrimitiveValue::from(1_u16));
    obj.put(seq(tags::SHARED_FUNCTIONAL_GROUPS_SEQUENCE, vec![shared]));
    obj.put(seq(tags::PER_FRAME_FUNCTIONAL_GROUPS_SEQUENCE, per_frame));
    obj.put(DataElement::new(tags::PIXEL_DATA, VR::OW, PrimitiveValue::I16(pixels.into())));
    let meta = FileMetaTableBuilder::new()
        .media_storage_sop_class_uid(uids::ENHANCED_CT_IMAGE_STORAGE)
        .media_storage_sop_instance_uid(sop_uid.as_str())
        .transfer_syntax(uids::EXPLICIT_VR_LITTLE_ENDIAN)
        .implementation_class_uid(crate::common::IMPLEMENTATION_CLASS_UID)
        .build()
        .map_err(|e| encode(e.to_string()))?;
    obj.with_exact_meta(meta).write_to_file(path).map_err(|e| encode(e.to_string()))?;
    Ok(path.to_path_buf())
}
