//! The images the network saw, as derived CT images: one series per job, in the source frame of
//! reference with their exact position, orientation and spacing, so a viewer can cross-reference
//! them with the source series and the SEG and SR can point at them.
//!
//! The stored values are the network's 8-bit input itself; the rescale maps them back to the
//! Hounsfield units of the window they were cut with, so a viewer shows HU.

use std::path::Path;

use dicom_core::value::PrimitiveValue;
use dicom_core::{DataElement, VR};
use dicom_dictionary_std::{tags, uids};
use dicom_object::InMemDicomObject;

use super::{
    Algorithm, ReportError, Source, WrittenObject, derived_uid, ds, ds_multi, now_da_tm, sequence, text, write_object,
};
use crate::analysis::slices::{SliceImage, View, WINDOW_CENTER_HU, WINDOW_WIDTH_HU};

/// Series number of the key-slice series (the SR and SEG series follow it).
pub const SERIES_NUMBER: u32 = 9901;

/// The role of a slice in the UID derivation and file name.
pub fn role(slice: &SliceImage) -> String {
    match &slice.view {
        View::Sagittal => "key-sagittal".into(),
        View::Axial { level } => format!("key-axial-{}", level.replace('/', "-")),
    }
}

/// The key-slice series' UID for a source series and weights.
pub fn series_uid(source: &Source, algorithm: &Algorithm) -> String {
    derived_uid(&source.series_uid, algorithm.weights_sha256.as_deref(), "key-slices")
}

/// Writes one key slice as CT Image Storage into `dir`.
pub fn write(
    source: &Source,
    algorithm: &Algorithm,
    slice: &SliceImage,
    instance_number: usize,
    dir: &Path,
) -> Result<WrittenObject, ReportError> {
    let sop_uid = derived_uid(&source.series_uid, algorithm.weights_sha256.as_deref(), &role(slice));
    let (date, time) = now_da_tm();
    let mut object = InMemDicomObject::new_empty();
    for e in &source.patient_study {
        object.put(e.clone());
    }
    let description = match &slice.view {
        View::Sagittal => "IDAICS mid-sagittal reformat through the disc levels".to_string(),
        View::Axial { level } => format!("IDAICS image in the plane of the {level} disc"),
    };
    let size = slice.size as u16;
    let orientation = [
        slice.row_direction[0],
        slice.row_direction[1],
        slice.row_direction[2],
        slice.column_direction[0],
        slice.column_direction[1],
        slice.column_direction[2],
    ];
    // Stored value v (0..255) is the windowed grey level: HU = v * width / 255 + (centre - width / 2).
    let slope = f64::from(WINDOW_WIDTH_HU) / 255.0;
    let intercept = f64::from(WINDOW_CENTER_HU - WINDOW_WIDTH_HU / 2.0);
    let elements = vec![
        text(tags::IMAGE_TYPE, VR::CS, "DERIVED\\SECONDARY\\AXIAL"),
        text(tags::INSTANCE_CREATION_DATE, VR::DA, date.clone()),
        text(tags::INSTANCE_CREATION_TIME, VR::TM, time.clone()),
        text(tags::CONTENT_DATE, VR::DA, date.clone()),
        text(tags::CONTENT_TIME, VR::TM, time.clone()),
        text(tags::SERIES_DATE, VR::DA, date),
        text(tags::SERIES_TIME, VR::TM, time),
        text(tags::MODALITY, VR::CS, "CT"),
        text(tags::MANUFACTURER, VR::LO, crate::common::MANUFACTURER),
        text(tags::MANUFACTURER_MODEL_NAME, VR::LO, algorithm.name.clone()),
        text(tags::SOFTWARE_VERSIONS, VR::LO, algorithm.version.clone()),
        text(tags::SERIES_DESCRIPTION, VR::LO, "IDAICS key slices"),
        text(tags::DERIVATION_DESCRIPTION, VR::ST, description),
        sequence(tags::DERIVATION_CODE_SEQUENCE, vec![super::code("113072", "DCM", "Multiplanar reformatting")]),
        text(tags::SERIES_INSTANCE_UID, VR::UI, series_uid(source, algorithm)),
        text(tags::SERIES_NUMBER, VR::IS, SERIES_NUMBER.to_string()),
        text(tags::INSTANCE_NUMBER, VR::IS, instance_number.to_string()),
        text(tags::PATIENT_ORIENTATION, VR::CS, ""),
        text(tags::FRAME_OF_REFERENCE_UID, VR::UI, source.frame_of_reference_uid.clone()),
        text(tags::POSITION_REFERENCE_INDICATOR, VR::LO, ""),
        DataElement::new(tags::IMAGE_POSITION_PATIENT, VR::DS, ds_multi(&slice.origin)),
        DataElement::new(tags::IMAGE_ORIENTATION_PATIENT, VR::DS, ds_multi(&orientation)),
        DataElement::new(tags::PIXEL_SPACING, VR::DS, ds_multi(&[slice.pixel_spacing_mm, slice.pixel_spacing_mm])),
        text(tags::SLICE_THICKNESS, VR::DS, ds(slice.pixel_spacing_mm)),
        DataElement::new(tags::SAMPLES_PER_PIXEL, VR::US, PrimitiveValue::from(1_u16)),
        text(tags::PHOTOMETRIC_INTERPRETATION, VR::CS, "MONOCHROME2"),
        DataElement::new(tags::ROWS, VR::US, PrimitiveValue::from(size)),
        DataElement::new(tags::COLUMNS, VR::US, PrimitiveValue::from(size)),
        DataElement::new(tags::BITS_ALLOCATED, VR::US, PrimitiveValue::from(16_u16)),
        DataElement::new(tags::BITS_STORED, VR::US, PrimitiveValue::from(16_u16)),
        DataElement::new(tags::HIGH_BIT, VR::US, PrimitiveValue::from(15_u16)),
        DataElement::new(tags::PIXEL_REPRESENTATION, VR::US, PrimitiveValue::from(0_u16)),
        text(tags::RESCALE_INTERCEPT, VR::DS, ds(intercept)),
        text(tags::RESCALE_SLOPE, VR::DS, ds(slope)),
        text(tags::RESCALE_TYPE, VR::LO, "HU"),
        text(tags::WINDOW_CENTER, VR::DS, ds(f64::from(WINDOW_CENTER_HU))),
        text(tags::WINDOW_WIDTH, VR::DS, ds(f64::from(WINDOW_WIDTH_HU))),
        text(tags::KVP, VR::DS, ""),
        text(tags::ACQUISITION_NUMBER, VR::IS, ""),
        text(tags::PATIENT_POSITION, VR::CS, ""),
        text(tags::LATERALITY, VR::CS, ""),
        DataElement::new(
            tags::PIXEL_DATA,
            VR::OW,
            PrimitiveValue::U16(slice.pixels.iter().map(|v| u16::from(*v)).collect()),
        ),
    ];
    for e in elements.into_iter().chain(super::lossy_compression(source, false)) {
        object.put(e);
    }
    let path = dir.join(format!("{}.dcm", role(slice)));
    write_object(object, uids::CT_IMAGE_STORAGE, &sop_uid, &path)
}
