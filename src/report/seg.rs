//! The network's masks as a BINARY Segmentation: one segment per finding that has a mask, its
//! frames on the key slices the masks were drawn on (per-frame position and orientation, since
//! the sagittal and the axial images lie in different planes), empty frames left out.

use std::path::Path;

use dicom_core::value::PrimitiveValue;
use dicom_core::{DataElement, VR};
use dicom_dictionary_std::{tags, uids};
use dicom_object::InMemDicomObject;

use super::sr::{PRIVATE_SCHEME, class_code, disc_site};
use super::{
    Algorithm, ReportError, Source, WrittenObject, code, derived_uid, ds, ds_multi, item, sequence, text, write_object,
};
use crate::analysis::findings::LevelFinding;
use crate::analysis::slices::SliceImage;

pub const SERIES_NUMBER: u32 = 9903;

/// CIELab display colours (DICOM scaled), one per class, so viewers colour findings alike.
fn colour(class: &str) -> [u16; 3] {
    match class {
        crate::analysis::findings::PROTRUSION => [34_000, 53_000, 50_000], // red
        crate::analysis::findings::BULGE => [55_000, 38_000, 60_000],      // orange
        crate::analysis::findings::SCHMORL => [30_000, 40_000, 20_000],    // blue
        _ => [50_000, 25_000, 45_000],                                     // green
    }
}

/// The written SEG and, per level, its segment number.
pub struct WrittenSeg {
    pub object: WrittenObject,
    pub segments: Vec<(String, u16)>,
}

/// Writes the SEG, or returns `None` when no finding has a mask (nothing to segment).
/// `key_slices` pairs each written key slice with the image it holds.
pub fn write(
    source: &Source,
    algorithm: &Algorithm,
    findings: &[LevelFinding],
    key_slices: &[(&SliceImage, &WrittenObject)],
    dir: &Path,
) -> Result<Option<WrittenSeg>, ReportError> {
    let weights = algorithm.weights_sha256.as_deref();
    // (segment number, finding index, evidence index, key slice index)
    let mut frames: Vec<(u16, usize, usize, usize)> = Vec::new();
    let mut segments: Vec<InMemDicomObject> = Vec::new();
    let mut numbers: Vec<(String, u16)> = Vec::new();
    for (finding_index, f) in findings.iter().enumerate() {
        let with_masks: Vec<(usize, usize)> = f
            .evidence
            .iter()
            .enumerate()
            .filter(|(_, e)| e.mask.area() > 0)
            .filter_map(|(n, e)| {
                let key = key_slices.iter().position(|(image, _)| match (&image.view, e.view) {
                    (crate::analysis::slices::View::Sagittal, "sagittal") => true,
                    (crate::analysis::slices::View::Axial { level }, "axial") => *level == f.level.name,
                    _ => false,
                })?;
                (key_slices[key].0.size == e.mask.width && key_slices[key].0.size == e.mask.height).then_some((n, key))
            })
            .collect();
        if with_masks.is_empty() {
            continue;
        }
        let number = segments.len() as u16 + 1;
        numbers.push((f.level.name.clone(), number));
        let (class_value, class_meaning) = class_code(f.class);
        let mut segment = vec![
            DataElement::new(tags::SEGMENT_NUMBER, VR::US, PrimitiveValue::from(number)),
            text(tags::SEGMENT_LABEL, VR::LO, format!("{} {}", f.level.name, f.class)),
            text(tags::SEGMENT_ALGORITHM_TYPE, VR::CS, "AUTOMATIC"),
            text(tags::SEGMENT_ALGORITHM_NAME, VR::LO, algorithm.name.clone()),
            sequence(
                tags::SEGMENTATION_ALGORITHM_IDENTIFICATION_SEQUENCE,
                vec![item(vec![
                    sequence(
                        tags::ALGORITHM_FAMILY_CODE_SEQUENCE,
                        vec![code("123110", "DCM", "Artificial Intelligence")],
                    ),
                    text(tags::ALGORITHM_NAME, VR::LO, algorithm.name.clone()),
                    text(tags::ALGORITHM_VERSION, VR::LO, algorithm.version.clone()),
                    text(tags::ALGORITHM_PARAMETERS, VR::LT, format!("weights SHA-256: {}", weights.unwrap_or("none"))),
                ])],
            ),
            sequence(
                tags::SEGMENTED_PROPERTY_CATEGORY_CODE_SEQUENCE,
                vec![code("49755003", "SCT", "Morphologically Abnormal Structure")],
            ),
            sequence(
                tags::SEGMENTED_PROPERTY_TYPE_CODE_SEQUENCE,
                vec![code(class_value, PRIVATE_SCHEME, class_meaning)],
            ),
            DataElement::new(
                tags::RECOMMENDED_DISPLAY_CIE_LAB_VALUE,
                VR::US,
                PrimitiveValue::U16(colour(f.class).to_vec().into()),
            ),
            text(tags::TRACKING_ID, VR::UT, f.level.name.clone()),
            text(
                tags::TRACKING_UID,
                VR::UI,
                derived_uid(&source.series_uid, weights, &format!("tracking-{}", f.level.name)),
            ),
        ];
        if let Some((value, meaning)) = disc_site(&f.level.name) {
            segment.push(sequence(tags::ANATOMIC_REGION_SEQUENCE, vec![code(value, "SCT", meaning)]));
        }
        segments.push(item(segment));
        for (evidence, key) in with_masks {
            frames.push((number, finding_index, evidence, key));
        }
    }
    if frames.is_empty() {
        return Ok(None);
    }
    let size = key_slices[frames[0].3].0.size;
    // Bit-packed frames, little-endian bit order, one after the other.
    let bits_per_frame = size * size;
    let mut pixels = vec![0u8; (frames.len() * bits_per_frame).div_ceil(8)];
    let mut per_frame = Vec::with_capacity(frames.len());
    for (n, &(segment, finding_index, evidence, key)) in frames.iter().enumerate() {
        let mask = &findings[finding_index].evidence[evidence].mask;
        for (p, &on) in mask.data.iter().enumerate() {
            if on {
                let bit = n * bits_per_frame + p;
                pixels[bit / 8] |= 1 << (bit % 8);
            }
        }
        let (image, object) = key_slices[key];
        let orientation: Vec<f64> = image.row_direction.iter().chain(image.column_direction.iter()).copied().collect();
        per_frame.push(item(vec![
            sequence(
                tags::DERIVATION_IMAGE_SEQUENCE,
                vec![item(vec![
                    sequence(
                        tags::SOURCE_IMAGE_SEQUENCE,
                        vec![item(vec![
                            text(tags::REFERENCED_SOP_CLASS_UID, VR::UI, object.sop_class_uid.clone()),
                            text(tags::REFERENCED_SOP_INSTANCE_UID, VR::UI, object.sop_instance_uid.clone()),
                            sequence(
                                tags::PURPOSE_OF_REFERENCE_CODE_SEQUENCE,
                                vec![code("121322", "DCM", "Source image for image processing operation")],
                            ),
                        ])],
                    ),
                    sequence(tags::DERIVATION_CODE_SEQUENCE, vec![code("113076", "DCM", "Segmentation")]),
                ])],
            ),
            sequence(
                tags::FRAME_CONTENT_SEQUENCE,
                vec![item(vec![DataElement::new(
                    tags::DIMENSION_INDEX_VALUES,
                    VR::UL,
                    PrimitiveValue::U32(vec![u32::from(segment), n as u32 + 1].into()),
                )])],
            ),
            sequence(
                tags::PLANE_POSITION_SEQUENCE,
                vec![item(vec![DataElement::new(tags::IMAGE_POSITION_PATIENT, VR::DS, ds_multi(&image.origin))])],
            ),
            sequence(
                tags::PLANE_ORIENTATION_SEQUENCE,
                vec![item(vec![DataElement::new(tags::IMAGE_ORIENTATION_PATIENT, VR::DS, ds_multi(&orientation))])],
            ),
            sequence(
                tags::PIXEL_MEASURES_SEQUENCE,
                vec![item(vec![
                    DataElement::new(
                        tags::PIXEL_SPACING,
                        VR::DS,
                        ds_multi(&[image.pixel_spacing_mm, image.pixel_spacing_mm]),
                    ),
                    text(tags::SLICE_THICKNESS, VR::DS, ds(image.pixel_spacing_mm)),
                ])],
            ),
            sequence(
                tags::SEGMENT_IDENTIFICATION_SEQUENCE,
                vec![item(vec![DataElement::new(
                    tags::REFERENCED_SEGMENT_NUMBER,
                    VR::US,
                    PrimitiveValue::from(segment),
                )])],
            ),
        ]));
    }
    let sop_uid = derived_uid(&source.series_uid, weights, "seg");
    let dimension_uid = derived_uid(&source.series_uid, weights, "seg-dimensions");
    let mut object = InMemDicomObject::new_empty();
    for e in &source.patient_study {
        object.put(e.clone());
    }
    let key_series = super::key_slices::series_uid(source, algorithm);
    let referenced: Vec<InMemDicomObject> = key_slices
        .iter()
        .map(|(_, o)| {
            item(vec![
                text(tags::REFERENCED_SOP_CLASS_UID, VR::UI, o.sop_class_uid.clone()),
                text(tags::REFERENCED_SOP_INSTANCE_UID, VR::UI, o.sop_instance_uid.clone()),
            ])
        })
        .collect();
    let elements = vec![
        text(tags::MODALITY, VR::CS, "SEG"),
        text(tags::SERIES_INSTANCE_UID, VR::UI, derived_uid(&source.series_uid, weights, "seg-series")),
        text(tags::SERIES_NUMBER, VR::IS, SERIES_NUMBER.to_string()),
        text(tags::SERIES_DESCRIPTION, VR::LO, "IDAICS disc findings"),
        text(tags::FRAME_OF_REFERENCE_UID, VR::UI, source.frame_of_reference_uid.clone()),
        text(tags::POSITION_REFERENCE_INDICATOR, VR::LO, ""),
        text(tags::IMAGE_TYPE, VR::CS, "DERIVED\\PRIMARY"),
        text(tags::CONTENT_LABEL, VR::CS, "DISC_FINDINGS"),
        text(tags::CONTENT_DESCRIPTION, VR::LO, "Intervertebral disc findings"),
        text(tags::CONTENT_CREATOR_NAME, VR::PN, ""),
        text(tags::SEGMENTATION_TYPE, VR::CS, "BINARY"),
        DataElement::new(tags::SAMPLES_PER_PIXEL, VR::US, PrimitiveValue::from(1_u16)),
        text(tags::PHOTOMETRIC_INTERPRETATION, VR::CS, "MONOCHROME2"),
        DataElement::new(tags::ROWS, VR::US, PrimitiveValue::from(size as u16)),
        DataElement::new(tags::COLUMNS, VR::US, PrimitiveValue::from(size as u16)),
        DataElement::new(tags::BITS_ALLOCATED, VR::US, PrimitiveValue::from(1_u16)),
        DataElement::new(tags::BITS_STORED, VR::US, PrimitiveValue::from(1_u16)),
        DataElement::new(tags::HIGH_BIT, VR::US, PrimitiveValue::from(0_u16)),
        DataElement::new(tags::PIXEL_REPRESENTATION, VR::US, PrimitiveValue::from(0_u16)),
        text(tags::NUMBER_OF_FRAMES, VR::IS, frames.len().to_string()),
        sequence(tags::SEGMENT_SEQUENCE, segments),
        sequence(tags::SHARED_FUNCTIONAL_GROUPS_SEQUENCE, vec![item(Vec::new())]),
        sequence(tags::PER_FRAME_FUNCTIONAL_GROUPS_SEQUENCE, per_frame),
        sequence(
            tags::DIMENSION_ORGANIZATION_SEQUENCE,
            vec![item(vec![text(tags::DIMENSION_ORGANIZATION_UID, VR::UI, dimension_uid.clone())])],
        ),
        sequence(
            tags::DIMENSION_INDEX_SEQUENCE,
            vec![
                item(vec![
                    text(tags::DIMENSION_ORGANIZATION_UID, VR::UI, dimension_uid.clone()),
                    DataElement::new(
                        tags::DIMENSION_INDEX_POINTER,
                        VR::AT,
                        PrimitiveValue::Tags(vec![tags::REFERENCED_SEGMENT_NUMBER].into()),
                    ),
                    DataElement::new(
                        tags::FUNCTIONAL_GROUP_POINTER,
                        VR::AT,
                        PrimitiveValue::Tags(vec![tags::SEGMENT_IDENTIFICATION_SEQUENCE].into()),
                    ),
                    text(tags::DIMENSION_DESCRIPTION_LABEL, VR::LO, "Segment"),
                ]),
                item(vec![
                    text(tags::DIMENSION_ORGANIZATION_UID, VR::UI, dimension_uid),
                    DataElement::new(
                        tags::DIMENSION_INDEX_POINTER,
                        VR::AT,
                        PrimitiveValue::Tags(vec![tags::IMAGE_POSITION_PATIENT].into()),
                    ),
                    DataElement::new(
                        tags::FUNCTIONAL_GROUP_POINTER,
                        VR::AT,
                        PrimitiveValue::Tags(vec![tags::PLANE_POSITION_SEQUENCE].into()),
                    ),
                    text(tags::DIMENSION_DESCRIPTION_LABEL, VR::LO, "Image Position"),
                ]),
            ],
        ),
        sequence(
            tags::REFERENCED_SERIES_SEQUENCE,
            vec![item(vec![
                text(tags::SERIES_INSTANCE_UID, VR::UI, key_series),
                sequence(tags::REFERENCED_INSTANCE_SEQUENCE, referenced),
            ])],
        ),
        super::private_scheme_identification(),
        DataElement::new(tags::PIXEL_DATA, VR::OB, PrimitiveValue::U8(pixels.into())),
    ];
    for e in
        elements.into_iter().chain(super::equipment_and_dates(algorithm)).chain(super::lossy_compression(source, true))
    {
        object.put(e);
    }
    let object = write_object(object, uids::SEGMENTATION_STORAGE, &sop_uid, &dir.join("seg.dcm"))?;
    Ok(Some(WrittenSeg { object, segments: numbers }))
}
