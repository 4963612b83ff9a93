//! The DICOM objects that carry the agent's work back to the PACS: the key slices the network
//! saw (derived CT images in the source frame of reference) and a Comprehensive 3D SR following
//! TID 1500 with one measurement group per disc level.
//!
//! UIDs are derived from the source series UID, the weights' hash and the object's role, so a
//! resent series yields the same objects (a PACS replaces them) rather than duplicates.

pub mod key_slices;
pub mod scu;
pub mod secondary_capture;
pub mod seg;
pub mod sr;

use crate::common::MANUFACTURER;
use std::path::{Path, PathBuf};

use dicom_core::value::{DataSetSequence, PrimitiveValue};
use dicom_core::{DataElement, Tag, VR};
use dicom_dictionary_std::tags;
use dicom_object::InMemDicomObject;
use dicom_object::meta::FileMetaTableBuilder;
use sha2::{Digest, Sha256};

#[derive(Debug, thiserror::Error)]
pub enum ReportError {
    #[error("cannot read the source series: {0}")]
    Source(String),
    #[error("cannot write {path}: {message}")]
    Write { path: PathBuf, message: String },
}

/// What the objects repeat from the source series: patient, study and frame of reference.
#[derive(Debug, Clone)]
pub struct Source {
    /// Patient and study attributes, copied as they are.
    pub patient_study: Vec<DataElement<InMemDicomObject>>,
    pub study_uid: String,
    pub series_uid: String,
    pub frame_of_reference_uid: String,
    /// (SOP class, SOP instance) of every source instance, for the evidence sequence.
    pub instances: Vec<(String, String)>,
    /// The imaging procedure the series belongs to, as (code value, coding scheme, meaning): the
    /// first item of the source's Procedure Code Sequence, which the SR reports as "Procedure
    /// reported" (IHE AIR asks for the procedure analysed, not the algorithm); `None` when the
    /// source has none.
    pub procedure: Option<(String, String, String)>,
    /// Set when a source instance was lossy compressed, in transit or before: images derived
    /// from it must say so (PS3.3 C.7.6.1.1.5), or a viewer shows them as faithful.
    pub lossy: Option<LossyHistory>,
}

/// What derived images repeat of their source's lossy compression.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct LossyHistory {
    /// Lossy Image Compression Ratio (0028,2112) as the source states it, or as measured on its
    /// pixel data; `None` when neither is known.
    pub ratio: Option<String>,
    /// Lossy Image Compression Method (0028,2114), e.g. `ISO_10918_1`.
    pub method: Option<String>,
}

/// JPEG Baseline and Extended: lossy whatever the stream.
const ALWAYS_LOSSY: [&str; 2] = ["1.2.840.10008.1.2.4.50", "1.2.840.10008.1.2.4.51"];

/// The transfer syntaxes the SCP accepts that may hold lossy compressed pixels, with the method
/// each stands for (PS3.3 C.7.6.1.1.5.1). All but [`ALWAYS_LOSSY`] hold lossless streams
/// too, and a lossy one is told by Lossy Image Compression.
const LOSSY_METHODS: [(&str, &str); 5] = [
    ("1.2.840.10008.1.2.4.50", "ISO_10918_1"),
    ("1.2.840.10008.1.2.4.51", "ISO_10918_1"),
    ("1.2.840.10008.1.2.4.81", "ISO_14495_1"),
    ("1.2.840.10008.1.2.4.91", "ISO_15444_1"),
    ("1.2.840.10008.1.2.4.203", "ISO_15444_15"),
];

impl LossyHistory {
    /// The history of `path`, whose header says it was lossy compressed or which is stored in a
    /// lossy JPEG syntax: the ratio and method it states, else the method its syntax stands for
    /// and the ratio of its pixel data's size decoded to its size compressed.
    fn of(path: &Path, transfer_syntax_uid: &str) -> LossyHistory {
        let object = dicom_object::open_file(path).ok();
        let stated = |tag| {
            let object = object.as_ref()?;
            let value = object.element(tag).ok()?.to_str().ok()?;
            Some(value.trim_end_matches(['\0', ' ']).to_string()).filter(|v| !v.is_empty())
        };
        let method = stated(tags::LOSSY_IMAGE_COMPRESSION_METHOD)
            .or_else(|| LOSSY_METHODS.iter().find(|(uid, _)| *uid == transfer_syntax_uid).map(|(_, m)| m.to_string()));
        let measured = || {
            let object = object.as_ref()?;
            let pixels = crate::ingest::pixel_module::PixelModule::from_object(object).ok()?;
            let fragments = object.element(tags::PIXEL_DATA).ok()?.value().fragments()?;
            let compressed: usize = fragments.iter().map(Vec::len).sum();
            (compressed > 0).then(|| format!("{:.2}", pixels.total_bytes() as f64 / compressed as f64))
        };
        LossyHistory { ratio: stated(tags::LOSSY_IMAGE_COMPRESSION_RATIO).or_else(measured), method }
    }
}

/// Lossy Image Compression with its ratio and method, for an image derived from `source`:
/// 01 when the source was lossy compressed; otherwise 00 where the IOD requires the attribute
/// (`required`), nothing where it is optional.
pub(crate) fn lossy_compression(source: &Source, required: bool) -> Vec<DataElement<InMemDicomObject>> {
    match &source.lossy {
        Some(history) => {
            let mut elements = vec![text(tags::LOSSY_IMAGE_COMPRESSION, VR::CS, "01")];
            if let Some(ratio) = &history.ratio {
                elements.push(text(tags::LOSSY_IMAGE_COMPRESSION_RATIO, VR::DS, ratio.clone()));
            }
            if let Some(method) = &history.method {
                elements.push(text(tags::LOSSY_IMAGE_COMPRESSION_METHOD, VR::CS, method.clone()));
            }
            elements
        }
        None if required => vec![text(tags::LOSSY_IMAGE_COMPRESSION, VR::CS, "00")],
        None => Vec::new(),
    }
}

/// Patient and study attributes copied from the source (Type 2 ones are written empty when the
/// source lacks them, so the objects stay valid).
const COPIED: [Tag; 11] = [
    tags::PATIENT_NAME,
    tags::PATIENT_ID,
    tags::PATIENT_BIRTH_DATE,
    tags::PATIENT_SEX,
    tags::STUDY_INSTANCE_UID,
    tags::STUDY_DATE,
    tags::STUDY_TIME,
    tags::REFERRING_PHYSICIAN_NAME,
    tags::STUDY_ID,
    tags::ACCESSION_NUMBER,
    tags::SPECIFIC_CHARACTER_SET,
];

impl Source {
    /// Reads the headers of the series' files.
    pub fn read(files: &[PathBuf]) -> Result<Source, ReportError> {
        let first = files.first().ok_or_else(|| ReportError::Source("no files".into()))?;
        let open = |p: &Path| {
            dicom_object::OpenFileOptions::new()
                .read_until(tags::PIXEL_DATA)
                .open_file(p)
                .map_err(|e| ReportError::Source(format!("{}: {e}", p.display())))
        };
        let object = open(first)?;
        let text = |tag| {
            object.element(tag).ok().and_then(|e| e.to_str().ok()).map(|s| s.trim_end_matches(['\0', ' ']).to_string())
        };
        let mut patient_study = Vec::new();
        for tag in COPIED {
            match object.element(tag) {
                Ok(e) => patient_study.push(e.clone()),
                Err(_) if tag == tags::SPECIFIC_CHARACTER_SET => {}
                Err(_) => patient_study.push(DataElement::new(tag, dicom_vr(tag), PrimitiveValue::Empty)),
            }
        }
        let procedure = object
            .element(tags::PROCEDURE_CODE_SEQUENCE)
            .ok()
            .and_then(|e| e.items().and_then(|items| items.first()).cloned())
            .and_then(|item| {
                let code = |tag| {
                    item.element(tag)
                        .ok()
                        .and_then(|e| e.to_str().ok())
                        .map(|s| s.trim_end_matches(['\0', ' ']).to_string())
                        .filter(|s| !s.is_empty())
                };
                Some((code(tags::CODE_VALUE)?, code(tags::CODING_SCHEME_DESIGNATOR)?, code(tags::CODE_MEANING)?))
            });
        let mut instances = Vec::with_capacity(files.len());
        let mut lossy = None;
        for f in files {
            let header = crate::ingest::spool::InstanceHeader::read(f)
                .map_err(|e| ReportError::Source(format!("{}: {e}", f.display())))?;
            let jpeg_lossy = ALWAYS_LOSSY.contains(&header.transfer_syntax_uid.as_str());
            if lossy.is_none() && (header.lossy_image_compression || jpeg_lossy) {
                lossy = Some(LossyHistory::of(f, &header.transfer_syntax_uid));
            }
            instances.push((header.sop_class_uid, header.sop_instance_uid));
        }
        Ok(Source {
            patient_study,
            study_uid: text(tags::STUDY_INSTANCE_UID)
                .ok_or_else(|| ReportError::Source("no StudyInstanceUID".into()))?,
            series_uid: text(tags::SERIES_INSTANCE_UID)
                .ok_or_else(|| ReportError::Source("no SeriesInstanceUID".into()))?,
            frame_of_reference_uid: text(tags::FRAME_OF_REFERENCE_UID)
                .ok_or_else(|| ReportError::Source("no FrameOfReferenceUID: results could not be placed".into()))?,
            instances,
            procedure,
            lossy,
        })
    }
}

fn dicom_vr(tag: Tag) -> VR {
    match tag {
        tags::PATIENT_NAME | tags::REFERRING_PHYSICIAN_NAME => VR::PN,
        tags::PATIENT_BIRTH_DATE | tags::STUDY_DATE => VR::DA,
        tags::STUDY_TIME => VR::TM,
        tags::PATIENT_SEX => VR::CS,
        tags::STUDY_ID | tags::ACCESSION_NUMBER => VR::SH,
        tags::STUDY_INSTANCE_UID => VR::UI,
        _ => VR::LO,
    }
}

/// Who made the objects.
#[derive(Debug, Clone)]
pub struct Algorithm {
    pub name: String,
    pub version: String,
    /// SHA-256 of the weights file, hex; `None` without weights.
    pub weights_sha256: Option<String>,
}

impl Algorithm {
    pub fn new(weights_sha256: Option<String>) -> Algorithm {
        Algorithm { name: "IDAICS".into(), version: env!("CARGO_PKG_VERSION").into(), weights_sha256 }
    }
}

/// SHA-256 of a file, hex.
pub fn sha256_file(path: &Path) -> std::io::Result<String> {
    let mut hasher = Sha256::new();
    let mut file = std::fs::File::open(path)?;
    std::io::copy(&mut file, &mut hasher)?;
    Ok(hasher.finalize().iter().map(|b| format!("{b:02x}")).collect())
}

/// A UID under 2.25 derived from the source series, the weights and the object's role: the same
/// inputs always give the same UID.
pub fn derived_uid(source_series_uid: &str, weights_sha256: Option<&str>, role: &str) -> String {
    let digest = Sha256::new()
        .chain_update(source_series_uid.as_bytes())
        .chain_update([0])
        .chain_update(weights_sha256.unwrap_or("no-weights").as_bytes())
        .chain_update([0])
        .chain_update(role.as_bytes())
        .finalize();
    let mut bytes = [0u8; 16];
    bytes.copy_from_slice(&digest[..16]);
    // Shaped as a name-based UUID (version 8, RFC 9562) so the 2.25 rules hold.
    bytes[6] = (bytes[6] & 0x0f) | 0x80;
    bytes[8] = (bytes[8] & 0x3f) | 0x80;
    format!("2.25.{}", u128::from_be_bytes(bytes))
}

/// A written object, ready for the outbox.
#[derive(Debug, Clone)]
pub struct WrittenObject {
    pub path: PathBuf,
    pub sop_class_uid: String,
    pub sop_instance_uid: String,
}

pub(crate) fn text(tag: Tag, vr: VR, value: impl Into<String>) -> DataElement<InMemDicomObject> {
    DataElement::new(tag, vr, PrimitiveValue::from(value.into()))
}

pub(crate) fn sequence(tag: Tag, items: Vec<InMemDicomObject>) -> DataElement<InMemDicomObject> {
    DataElement::new(tag, VR::SQ, DataSetSequence::from(items))
}

pub(crate) fn item(elements: Vec<DataElement<InMemDicomObject>>) -> InMemDicomObject {
    InMemDicomObject::from_element_iter(elements)
}

/// A decimal string value (DS holds at most 16 characters).
pub(crate) fn ds(value: f64) -> String {
    let s = format!("{value:.6}");
    let s = s.trim_end_matches('0').trim_end_matches('.').to_string();
    if s.len() > 16 { format!("{value:.3e}") } else { s }
}

/// A multi-valued decimal string.
pub(crate) fn ds_multi(values: &[f64]) -> PrimitiveValue {
    PrimitiveValue::Strs(values.iter().map(|v| ds(*v)).collect())
}

/// A coded concept as a sequence item.
pub(crate) fn code(value: &str, scheme: &str, meaning: &str) -> InMemDicomObject {
    item(vec![
        text(tags::CODE_VALUE, VR::SH, value),
        text(tags::CODING_SCHEME_DESIGNATOR, VR::SH, scheme),
        text(tags::CODE_MEANING, VR::LO, meaning),
    ])
}

/// The algorithm's Device UID: one per weights file, whatever the series.
pub(crate) fn algorithm_device_uid(algorithm: &Algorithm) -> String {
    derived_uid("idaics-algorithm", algorithm.weights_sha256.as_deref(), "device")
}

/// Enhanced General Equipment (as Comprehensive 3D SR and SEG require), the instance number and
/// the creation and content date and time: the same in every multi-purpose object we write. And
/// the algorithm as IHE AI Results identifies it: a Contributing Equipment item whose purpose is
/// (Newcode1, 99IHE, "Processing Algorithm"), with a Device UID that changes whenever the
/// weights do, so a viewer can tell results of different weights apart.
pub(crate) fn equipment_and_dates(algorithm: &Algorithm) -> Vec<DataElement<InMemDicomObject>> {
    let (date, time) = now_da_tm();
    let device_uid = algorithm_device_uid(algorithm);
    vec![
        sequence(
            tags::CONTRIBUTING_EQUIPMENT_SEQUENCE,
            vec![item(vec![
                sequence(
                    tags::PURPOSE_OF_REFERENCE_CODE_SEQUENCE,
                    vec![code("Newcode1", "99IHE", "Processing Algorithm")],
                ),
                text(tags::MANUFACTURER, VR::LO, MANUFACTURER),
                text(tags::MANUFACTURER_MODEL_NAME, VR::LO, algorithm.name.clone()),
                text(tags::SOFTWARE_VERSIONS, VR::LO, algorithm.version.clone()),
                text(tags::DEVICE_UID, VR::UI, device_uid),
            ])],
        ),
        text(tags::MANUFACTURER, VR::LO, MANUFACTURER),
        text(tags::MANUFACTURER_MODEL_NAME, VR::LO, algorithm.name.clone()),
        text(tags::DEVICE_SERIAL_NUMBER, VR::LO, "0"),
        text(tags::SOFTWARE_VERSIONS, VR::LO, algorithm.version.clone()),
        text(tags::INSTANCE_NUMBER, VR::IS, "1"),
        text(tags::INSTANCE_CREATION_DATE, VR::DA, date.clone()),
        text(tags::INSTANCE_CREATION_TIME, VR::TM, time.clone()),
        text(tags::CONTENT_DATE, VR::DA, date),
        text(tags::CONTENT_TIME, VR::TM, time),
    ]
}

/// Declares the private coding scheme of the finding classes.
pub(crate) fn private_scheme_identification() -> DataElement<InMemDicomObject> {
    sequence(
        tags::CODING_SCHEME_IDENTIFICATION_SEQUENCE,
        vec![item(vec![
            text(tags::CODING_SCHEME_DESIGNATOR, VR::SH, sr::PRIVATE_SCHEME),
            text(tags::CODING_SCHEME_NAME, VR::ST, "IDAICS intervertebral disc findings"),
            text(tags::CODING_SCHEME_RESPONSIBLE_ORGANIZATION, VR::ST, "IDAICS"),
        ])],
    )
}

/// DICOM date and time of now (UTC).
pub(crate) fn now_da_tm() -> (String, String) {
    let t = crate::common::now_rfc3339(); // 2026-11-27T22:50:00.123Z
    let date = t[0..10].replace('-', "");
    let time = t[11..19].replace(':', "");
    (date, time)
}

/// Writes a data set as a DICOM file (explicit VR little endian), synced to disk: these files are
/// what the outbox promises to deliver.
pub(crate) fn write_object(
    mut object: InMemDicomObject,
    sop_class: &str,
    sop_uid: &str,
    path: &Path,
) -> Result<WrittenObject, ReportError> {
    let err = |message: String| ReportError::Write { path: path.to_path_buf(), message };
    object.put(text(tags::SOP_CLASS_UID, VR::UI, sop_class));
    object.put(text(tags::SOP_INSTANCE_UID, VR::UI, sop_uid));
    let meta = FileMetaTableBuilder::new()
        .media_storage_sop_class_uid(sop_class)
        .media_storage_sop_instance_uid(sop_uid)
        .transfer_syntax(dicom_dictionary_std::uids::EXPLICIT_VR_LITTLE_ENDIAN)
        .implementation_class_uid(crate::common::IMPLEMENTATION_CLASS_UID)
        .build()
        .map_err(|e| err(e.to_string()))?;
    if let Some(dir) = path.parent() {
        std::fs::create_dir_all(dir).map_err(|e| err(e.to_string()))?;
    }
    let tmp = path.with_extension("tmp");
    object.with_exact_meta(meta).write_to_file(&tmp).map_err(|e| err(e.to_string()))?;
    std::fs::File::open(&tmp).and_then(|f| f.sync_all()).map_err(|e| err(e.to_string()))?;
    std::fs::rename(&tmp, path).map_err(|e| err(e.to_string()))?;
    Ok(WrittenObject {
        path: path.to_path_buf(),
        sop_class_uid: sop_class.to_string(),
        sop_instance_uid: sop_uid.to_string(),
    })
}

#[cfg(test)]
mod tests {
    #[test]
    fn derived_uids_are_stable_valid_and_distinct() {
        let a = super::derived_uid("1.2.3", Some("abc"), "sr");
        assert_eq!(a, super::derived_uid("1.2.3", Some("abc"), "sr"));
        assert_ne!(a, super::derived_uid("1.2.3", Some("abd"), "sr"));
        assert_ne!(a, super::derived_uid("1.2.3", Some("abc"), "seg"));
        assert!(a.len() <= 64 && a.starts_with("2.25.") && !a[5..].starts_with('0'), "{a}");
    }
}
