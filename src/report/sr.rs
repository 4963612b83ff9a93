//! The findings as a Comprehensive 3D SR following TID 1500 (Measurement Report): one
//! measurement group per disc level, with its tracking identifier (the level's name) and UID,
//! its finding site (SNOMED CT, CID 7604), the finding and the network's confidence, the key
//! slices it was read from, and the algorithm that read it (name, version, weights' SHA-256).
//!
//! The four classes have no SNOMED CT concepts we could verify here, so they are coded in a
//! private scheme, 99IDAICS, declared in the CodingSchemeIdentificationSequence.

use std::path::Path;

use dicom_core::{DataElement, VR};
use dicom_dictionary_std::tags;
use dicom_object::InMemDicomObject;

use super::{Algorithm, ReportError, Source, WrittenObject, code, derived_uid, item, sequence, text, write_object};
use crate::analysis::findings::LevelFinding;

pub const SERIES_NUMBER: u32 = 9902;
pub const PRIVATE_SCHEME: &str = "99IDAICS";

/// SNOMED CT intervertebral disc concepts (DICOM CID 7604) by level name.
pub fn disc_site(level: &str) -> Option<(&'static str, &'static str)> {
    Some(match level {
        "T12/L1" => ("76206002", "T12/L1 disc"),
        "L1/L2" => ("80064006", "L1/L2 disc"),
        "L2/L3" => ("67459009", "L2/L3 disc"),
        "L3/L4" => ("62551000", "L3/L4 disc"),
        "L4/L5" => ("84020006", "L4/L5 disc"),
        "L5/S1" => ("715056000", "L5/S1 disc"),
        _ => return None,
    })
}

/// The private code of a class.
pub fn class_code(class: &str) -> (&'static str, &'static str) {
    match class {
        crate::analysis::findings::NORMAL => ("NORMAL", "Normal intervertebral disc"),
        crate::analysis::findings::SCHMORL => ("SCHMORL", "Schmorl's node"),
        crate::analysis::findings::BULGE => ("BULGE", "Disc bulge"),
        crate::analysis::findings::PROTRUSION => ("PROTRUSION", "Disc protrusion"),
        _ => ("UNDETERMINED", "Undetermined"),
    }
}

/// A content item: relationship, value type, concept name, and the value's elements.
fn content(
    relationship: &str,
    value_type: &str,
    concept: Option<InMemDicomObject>,
    value: Vec<DataElement<InMemDicomObject>>,
) -> InMemDicomObject {
    let mut elements =
        vec![text(tags::RELATIONSHIP_TYPE, VR::CS, relationship), text(tags::VALUE_TYPE, VR::CS, value_type)];
    if let Some(c) = concept {
        elements.push(sequence(tags::CONCEPT_NAME_CODE_SEQUENCE, vec![c]));
    }
    elements.extend(value);
    item(elements)
}

fn code_item(relationship: &str, concept: InMemDicomObject, value: InMemDicomObject) -> InMemDicomObject {
    content(relationship, "CODE", Some(concept), vec![sequence(tags::CONCEPT_CODE_SEQUENCE, vec![value])])
}

fn text_item(relationship: &str, concept: InMemDicomObject, value: &str) -> InMemDicomObject {
    content(relationship, "TEXT", Some(concept), vec![text(tags::TEXT_VALUE, VR::UT, value)])
}

fn uid_item(relationship: &str, concept: InMemDicomObject, value: &str) -> InMemDicomObject {
    content(relationship, "UIDREF", Some(concept), vec![text(tags::UID, VR::UI, value)])
}

fn container(
    relationship: Option<&str>,
    concept: InMemDicomObject,
    children: Vec<InMemDicomObject>,
) -> InMemDicomObject {
    let mut elements = Vec::new();
    if let Some(r) = relationship {
        elements.push(text(tags::RELATIONSHIP_TYPE, VR::CS, r));
    }
    elements.push(text(tags::VALUE_TYPE, VR::CS, "CONTAINER"));
    elements.push(sequence(tags::CONCEPT_NAME_CODE_SEQUENCE, vec![concept]));
    elements.push(text(tags::CONTINUITY_OF_CONTENT, VR::CS, "SEPARATE"));
    elements.push(sequence(tags::CONTENT_SEQUENCE, children));
    item(elements)
}

fn image_item(concept: Option<InMemDicomObject>, object: &WrittenObject) -> InMemDicomObject {
    content(
        "CONTAINS",
        "IMAGE",
        concept,
        vec![sequence(
            tags::REFERENCED_SOP_SEQUENCE,
            vec![item(vec![
                text(tags::REFERENCED_SOP_CLASS_UID, VR::UI, object.sop_class_uid.clone()),
                text(tags::REFERENCED_SOP_INSTANCE_UID, VR::UI, object.sop_instance_uid.clone()),
            ])],
        )],
    )
}

/// The objects written before the report that it references.
#[derive(Clone, Copy)]
pub struct Evidence<'a> {
    /// `key_slices[0]` is the sagittal (when there is one); an axial key slice's file name
    /// carries its level (see [`super::key_slices::role`]).
    pub key_slices: &'a [(Option<String>, WrittenObject)],
    pub seg: Option<&'a super::seg::WrittenSeg>,
}

/// Writes the report, with `notes` on how the series was read (gaps, images set aside).
pub fn write(
    source: &Source,
    algorithm: &Algorithm,
    findings: &[LevelFinding],
    evidence: Evidence<'_>,
    notes: &[String],
    storage: crate::config::SrStorage,
    dir: &Path,
) -> Result<WrittenObject, ReportError> {
    let Evidence { key_slices, seg } = evidence;
    let weights = algorithm.weights_sha256.as_deref();
    // A report in the other class is another object: it gets a UID of its own, so a PACS never
    // sees one UID under two SOP classes when a site switches.
    let role = match storage {
        crate::config::SrStorage::Comprehensive3d => "sr",
        crate::config::SrStorage::Comprehensive => "sr-comprehensive",
    };
    let sop_uid = derived_uid(&source.series_uid, weights, role);
    let observer = vec![
        code_item("HAS OBS CONTEXT", code("121005", "DCM", "Observer Type"), code("121007", "DCM", "Device")),
        // The observer is the algorithm: the same Device UID as its Contributing Equipment item
        // (TID 1004 codes: 121014 is the manufacturer, 121015 the model name).
        uid_item(
            "HAS OBS CONTEXT",
            code("121012", "DCM", "Device Observer UID"),
            &super::algorithm_device_uid(algorithm),
        ),
        text_item("HAS OBS CONTEXT", code("121013", "DCM", "Device Observer Name"), &algorithm.name),
        text_item(
            "HAS OBS CONTEXT",
            code("121014", "DCM", "Device Observer Manufacturer"),
            crate::common::MANUFACTURER,
        ),
        text_item("HAS OBS CONTEXT", code("121015", "DCM", "Device Observer Model Name"), &algorithm.name),
    ];
    let mut root = vec![code_item(
        "HAS CONCEPT MOD",
        code("121049", "DCM", "Language of Content Item and Descendants"),
        code("en-US", "RFC5646", "English (United States)"),
    )];
    root.extend(observer);
    // The study's own procedure code when it has one; a CT otherwise (the modality is all that
    // is known then).
    let procedure = match &source.procedure {
        Some((value, scheme, meaning)) => code(value, scheme, meaning),
        None => code("77477000", "SCT", "CT"),
    };
    root.push(code_item("HAS CONCEPT MOD", code("121058", "DCM", "Procedure reported"), procedure));
    let library: Vec<InMemDicomObject> = key_slices.iter().map(|(_, o)| image_item(None, o)).collect();
    root.push(container(
        Some("CONTAINS"),
        code("111028", "DCM", "Image Library"),
        vec![container(Some("CONTAINS"), code("126200", "DCM", "Image Library Group"), library)],
    ));
    let parameters = format!("weights SHA-256: {}", weights.unwrap_or("none (no weights configured)"));
    let groups: Vec<InMemDicomObject> = findings
        .iter()
        .map(|f| {
            let name = &f.level.name;
            // An uncertain name says so where a reader sees it, and codes no finding site: the
            // site would state as fact what the count could not establish.
            let mut children = vec![
                text_item("HAS OBS CONTEXT", code("112039", "DCM", "Tracking Identifier"), &f.level.label()),
                uid_item(
                    "HAS OBS CONTEXT",
                    code("112040", "DCM", "Tracking Unique Identifier"),
                    &derived_uid(&source.series_uid, weights, &format!("tracking-{name}")),
                ),
            ];
            if let Some((value, meaning)) = disc_site(name).filter(|_| f.level.name_certain) {
                children.push(code_item(
                    "HAS CONCEPT MOD",
                    code("363698007", "SCT", "Finding Site"),
                    code(value, "SCT", meaning),
                ));
            }
            let (class_value, class_meaning) = class_code(f.class);
            children.push(code_item(
                "CONTAINS",
                code("121071", "DCM", "Finding"),
                code(class_value, PRIVATE_SCHEME, class_meaning),
            ));
            children.push(content(
                "CONTAINS",
                "NUM",
                Some(code("CONFIDENCE", PRIVATE_SCHEME, "Classification confidence")),
                vec![sequence(
                    tags::MEASURED_VALUE_SEQUENCE,
                    vec![item(vec![
                        sequence(tags::MEASUREMENT_UNITS_CODE_SEQUENCE, vec![code("1", "UCUM", "no units")]),
                        text(tags::NUMERIC_VALUE, VR::DS, format!("{:.4}", f.confidence)),
                    ])],
                )],
            ));
            for (level, object) in key_slices {
                if level.is_none() || level.as_deref() == Some(name.as_str()) {
                    children.push(image_item(Some(code("121112", "DCM", "Source of Measurement")), object));
                }
            }
            // Its segment in the SEG, when the network drew one.
            if let Some(seg) = seg
                && let Some((_, number)) = seg.segments.iter().find(|(level, _)| level == name)
            {
                children.push(content(
                    "CONTAINS",
                    "IMAGE",
                    Some(code("121191", "DCM", "Referenced Segment")),
                    vec![sequence(
                        tags::REFERENCED_SOP_SEQUENCE,
                        vec![item(vec![
                            text(tags::REFERENCED_SOP_CLASS_UID, VR::UI, seg.object.sop_class_uid.clone()),
                            text(tags::REFERENCED_SOP_INSTANCE_UID, VR::UI, seg.object.sop_instance_uid.clone()),
                            DataElement::new(
                                tags::REFERENCED_SEGMENT_NUMBER,
                                VR::US,
                                dicom_core::value::PrimitiveValue::from(*number),
                            ),
                        ])],
                    )],
                ));
                // The images it was drawn on (TID 1411: needed to read the group back).
                for (level, object) in key_slices {
                    if level.is_none() || level.as_deref() == Some(name.as_str()) {
                        children.push(image_item(Some(code("121233", "DCM", "Source image for segmentation")), object));
                    }
                }
            }
            let mut algorithm_name =
                text_item("HAS CONCEPT MOD", code("111001", "DCM", "Algorithm Name"), &algorithm.name);
            algorithm_name.put(sequence(
                tags::CONTENT_SEQUENCE,
                vec![
                    text_item("HAS CONCEPT MOD", code("111003", "DCM", "Algorithm Version"), &algorithm.version),
                    text_item("HAS CONCEPT MOD", code("111002", "DCM", "Algorithm Parameters"), &parameters),
                ],
            ));
            children.push(algorithm_name);
            container(Some("CONTAINS"), code("125007", "DCM", "Measurement Group"), children)
        })
        .collect();
    root.push(container(Some("CONTAINS"), code("126010", "DCM", "Imaging Measurements"), groups));
    // How the series was read (a gap, an image set aside) bears on every level: TID 1500's
    // Qualitative Evaluations, one comment each, where a viewer shows them with the findings.
    if !notes.is_empty() {
        let comments = notes.iter().map(|n| text_item("CONTAINS", code("121106", "DCM", "Comment"), n)).collect();
        root.push(container(Some("CONTAINS"), code("C0034375", "UMLS", "Qualitative Evaluations"), comments));
    }

    let mut object = InMemDicomObject::new_empty();
    for e in &source.patient_study {
        object.put(e.clone());
    }
    // Evidence: the source series and the key slices.
    let evidence_series = |series_uid: &str, instances: Vec<(String, String)>| {
        item(vec![
            text(tags::SERIES_INSTANCE_UID, VR::UI, series_uid),
            sequence(
                tags::REFERENCED_SOP_SEQUENCE,
                instances
                    .into_iter()
                    .map(|(class, uid)| {
                        item(vec![
                            text(tags::REFERENCED_SOP_CLASS_UID, VR::UI, class),
                            text(tags::REFERENCED_SOP_INSTANCE_UID, VR::UI, uid),
                        ])
                    })
                    .collect(),
            ),
        ])
    };
    let mut evidence = vec![evidence_series(&source.series_uid, source.instances.clone())];
    if let Some(seg) = seg {
        evidence.push(evidence_series(
            &derived_uid(&source.series_uid, weights, "seg-series"),
            vec![(seg.object.sop_class_uid.clone(), seg.object.sop_instance_uid.clone())],
        ));
    }
    if !key_slices.is_empty() {
        evidence.push(evidence_series(
            &super::key_slices::series_uid(source, algorithm),
            key_slices.iter().map(|(_, o)| (o.sop_class_uid.clone(), o.sop_instance_uid.clone())).collect(),
        ));
    }
    let elements = vec![
        text(tags::MODALITY, VR::CS, "SR"),
        text(tags::SERIES_INSTANCE_UID, VR::UI, derived_uid(&source.series_uid, weights, "sr-series")),
        text(tags::SERIES_NUMBER, VR::IS, SERIES_NUMBER.to_string()),
        text(tags::SERIES_DESCRIPTION, VR::LO, "IDAICS disc findings"),
        sequence(tags::REFERENCED_PERFORMED_PROCEDURE_STEP_SEQUENCE, Vec::new()),
        text(tags::COMPLETION_FLAG, VR::CS, "COMPLETE"),
        text(tags::VERIFICATION_FLAG, VR::CS, "UNVERIFIED"),
        sequence(tags::PERFORMED_PROCEDURE_CODE_SEQUENCE, Vec::new()),
        sequence(
            tags::CURRENT_REQUESTED_PROCEDURE_EVIDENCE_SEQUENCE,
            vec![item(vec![
                text(tags::STUDY_INSTANCE_UID, VR::UI, source.study_uid.clone()),
                sequence(tags::REFERENCED_SERIES_SEQUENCE, evidence),
            ])],
        ),
        super::private_scheme_identification(),
        text(tags::VALUE_TYPE, VR::CS, "CONTAINER"),
        sequence(tags::CONCEPT_NAME_CODE_SEQUENCE, vec![code("126000", "DCM", "Imaging Measurement Report")]),
        text(tags::CONTINUITY_OF_CONTENT, VR::CS, "SEPARATE"),
        sequence(
            tags::CONTENT_TEMPLATE_SEQUENCE,
            vec![item(vec![
                text(tags::MAPPING_RESOURCE, VR::CS, "DCMR"),
                text(tags::TEMPLATE_IDENTIFIER, VR::CS, "1500"),
            ])],
        ),
        sequence(tags::CONTENT_SEQUENCE, root),
    ];
    for e in elements.into_iter().chain(super::equipment_and_dates(algorithm)) {
        object.put(e);
    }
    write_object(object, storage.sop_class_uid(), &sop_uid, &dir.join("sr.dcm"))
}
