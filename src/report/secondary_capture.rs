//! One Secondary Capture per disc level: the key slice that shows the finding best (the view of
//! its strongest detection: the sagittal one for a Schmorl's node, usually the level's axial one
//! otherwise) in colour with the finding's mask outline and a label burned in, for viewers that
//! do not render SEG. The label uses a built-in 5x7 bitmap font, so the agent needs no font files.

use std::path::Path;

use dicom_core::value::PrimitiveValue;
use dicom_core::{DataElement, VR};
use dicom_dictionary_std::{tags, uids};
use dicom_object::InMemDicomObject;

use super::{Algorithm, ReportError, Source, WrittenObject, derived_uid, now_da_tm, text, write_object};
use crate::analysis::findings::LevelFinding;
use crate::analysis::slices::SliceImage;

pub const SERIES_NUMBER: u32 = 9904;

/// Outline and label colours per class (RGB).
fn colour(class: &str) -> [u8; 3] {
    match class {
        crate::analysis::findings::PROTRUSION => [255, 40, 40],
        crate::analysis::findings::BULGE => [255, 160, 0],
        crate::analysis::findings::SCHMORL => [60, 140, 255],
        crate::analysis::findings::NORMAL => [40, 220, 80],
        _ => [230, 230, 230],
    }
}

/// 5x7 glyphs, one row per byte (low 5 bits, leftmost pixel in bit 4).
fn glyph(c: char) -> [u8; 7] {
    match c.to_ascii_uppercase() {
        '0' => [0x0E, 0x11, 0x13, 0x15, 0x19, 0x11, 0x0E],
        '1' => [0x04, 0x0C, 0x04, 0x04, 0x04, 0x04, 0x0E],
        '2' => [0x0E, 0x11, 0x01, 0x02, 0x04, 0x08, 0x1F],
        '3' => [0x1F, 0x02, 0x04, 0x02, 0x01, 0x11, 0x0E],
        '4' => [0x02, 0x06, 0x0A, 0x12, 0x1F, 0x02, 0x02],
        '5' => [0x1F, 0x10, 0x1E, 0x01, 0x01, 0x11, 0x0E],
        '6' => [0x06, 0x08, 0x10, 0x1E, 0x11, 0x11, 0x0E],
        '7' => [0x1F, 0x01, 0x02, 0x04, 0x08, 0x08, 0x08],
        '8' => [0x0E, 0x11, 0x11, 0x0E, 0x11, 0x11, 0x0E],
        '9' => [0x0E, 0x11, 0x11, 0x0F, 0x01, 0x02, 0x0C],
        'A' => [0x0E, 0x11, 0x11, 0x1F, 0x11, 0x11, 0x11],
        'B' => [0x1E, 0x11, 0x11, 0x1E, 0x11, 0x11, 0x1E],
        'C' => [0x0E, 0x11, 0x10, 0x10, 0x10, 0x11, 0x0E],
        'D' => [0x1C, 0x12, 0x11, 0x11, 0x11, 0x12, 0x1C],
        'E' => [0x1F, 0x10, 0x10, 0x1E, 0x10, 0x10, 0x1F],
        'G' => [0x0E, 0x11, 0x10, 0x17, 0x11, 0x11, 0x0F],
        'H' => [0x11, 0x11, 0x11, 0x1F, 0x11, 0x11, 0x11],
        'I' => [0x0E, 0x04, 0x04, 0x04, 0x04, 0x04, 0x0E],
        'L' => [0x10, 0x10, 0x10, 0x10, 0x10, 0x10, 0x1F],
        'M' => [0x11, 0x1B, 0x15, 0x15, 0x11, 0x11, 0x11],
        'N' => [0x11, 0x11, 0x19, 0x15, 0x13, 0x11, 0x11],
        'O' => [0x0E, 0x11, 0x11, 0x11, 0x11, 0x11, 0x0E],
        'P' => [0x1E, 0x11, 0x11, 0x1E, 0x10, 0x10, 0x10],
        'R' => [0x1E, 0x11, 0x11, 0x1E, 0x14, 0x12, 0x11],
        'S' => [0x0F, 0x10, 0x10, 0x0E, 0x01, 0x01, 0x1E],
        'T' => [0x1F, 0x04, 0x04, 0x04, 0x04, 0x04, 0x04],
        'U' => [0x11, 0x11, 0x11, 0x11, 0x11, 0x11, 0x0E],
        'V' => [0x11, 0x11, 0x11, 0x11, 0x11, 0x0A, 0x04],
        'W' => [0x11, 0x11, 0x11, 0x15, 0x15, 0x15, 0x0A],
        'F' => [0x1F, 0x10, 0x10, 0x1E, 0x10, 0x10, 0x10],
        'K' => [0x11, 0x12, 0x14, 0x18, 0x14, 0x12, 0x11],
        'Y' => [0x11, 0x11, 0x0A, 0x04, 0x04, 0x04, 0x04],
        '/' => [0x01, 0x01, 0x02, 0x04, 0x08, 0x10, 0x10],
        '.' => [0x00, 0x00, 0x00, 0x00, 0x00, 0x0C, 0x0C],
        '-' => [0x00, 0x00, 0x00, 0x1F, 0x00, 0x00, 0x00],
        ':' => [0x00, 0x0C, 0x0C, 0x00, 0x0C, 0x0C, 0x00],
        '(' => [0x02, 0x04, 0x08, 0x08, 0x08, 0x04, 0x02],
        ')' => [0x08, 0x04, 0x02, 0x02, 0x02, 0x04, 0x08],
        '?' => [0x0E, 0x11, 0x01, 0x02, 0x04, 0x00, 0x04],
        'J' => [0x07, 0x02, 0x02, 0x02, 0x02, 0x12, 0x0C],
        'Q' => [0x0E, 0x11, 0x11, 0x11, 0x15, 0x12, 0x0D],
        'X' => [0x11, 0x11, 0x0A, 0x04, 0x0A, 0x11, 0x11],
        'Z' => [0x1F, 0x01, 0x02, 0x04, 0x08, 0x10, 0x1F],
        _ => [0; 7],
    }
}

/// Draws `label` at (x, y) with each font pixel `scale` pixels wide, on an RGB image of `size`.
pub(crate) fn draw_text(rgb: &mut [u8], size: usize, x: usize, y: usize, scale: usize, label: &str, colour: [u8; 3]) {
    for (n, c) in label.chars().enumerate() {
        let rows = glyph(c);
        for (row, bits) in rows.iter().enumerate() {
            for col in 0..5 {
                if bits >> (4 - col) & 1 == 0 {
                    continue;
                }
                for dy in 0..scale {
                    for dx in 0..scale {
                        let (px, py) = (x + (n * 6 + col) * scale + dx, y + row * scale + dy);
                        if px < size && py < size {
                            rgb[(py * size + px) * 3..][..3].copy_from_slice(&colour);
                        }
                    }
                }
            }
        }
    }
}

/// Writes the level's Secondary Capture into `dir`.
pub fn write(
    source: &Source,
    algorithm: &Algorithm,
    finding: &LevelFinding,
    image: &SliceImage,
    instance_number: usize,
    dir: &Path,
) -> Result<WrittenObject, ReportError> {
    let size = image.size;
    let view = image.view.kind();
    let mut rgb: Vec<u8> = image.pixels.iter().flat_map(|&v| [v, v, v]).collect();
    let tint = colour(finding.class);
    // The outline of every supporting mask on this image: mask pixels with a neighbour outside it.
    for evidence in finding.evidence.iter().filter(|e| e.view == view && e.mask.width == size && e.mask.height == size)
    {
        let inside = |x: isize, y: isize| {
            x >= 0
                && y >= 0
                && (x as usize) < size
                && (y as usize) < size
                && evidence.mask.data[y as usize * size + x as usize]
        };
        for y in 0..size as isize {
            for x in 0..size as isize {
                if inside(x, y) && !(inside(x - 1, y) && inside(x + 1, y) && inside(x, y - 1) && inside(x, y + 1)) {
                    rgb[(y as usize * size + x as usize) * 3..][..3].copy_from_slice(&tint);
                }
            }
        }
    }
    // An uncertain level says so on the image itself: a reader may see nothing else.
    let label = format!("{} {} {:.2}", finding.level.label(), finding.class, finding.confidence);
    draw_text(&mut rgb, size, 8, 8, 3, &label, tint);
    draw_text(&mut rgb, size, 8, size.saturating_sub(30), 2, "IDAICS - NOT FOR DIAGNOSIS UNVERIFIED", [230, 230, 230]);

    let role = format!("sc-{}", finding.level.name.replace('/', "-"));
    let sop_uid = derived_uid(&source.series_uid, algorithm.weights_sha256.as_deref(), &role);
    let (date, time) = now_da_tm();
    let mut object = InMemDicomObject::new_empty();
    for e in &source.patient_study {
        object.put(e.clone());
    }
    let elements = vec![
        text(tags::MODALITY, VR::CS, "OT"),
        text(
            tags::SERIES_INSTANCE_UID,
            VR::UI,
            derived_uid(&source.series_uid, algorithm.weights_sha256.as_deref(), "sc-series"),
        ),
        text(tags::SERIES_NUMBER, VR::IS, SERIES_NUMBER.to_string()),
        text(tags::SERIES_DESCRIPTION, VR::LO, "IDAICS disc findings (key images)"),
        text(tags::LATERALITY, VR::CS, ""),
        text(tags::CONVERSION_TYPE, VR::CS, "WSD"),
        text(tags::MANUFACTURER, VR::LO, crate::common::MANUFACTURER),
        text(tags::SECONDARY_CAPTURE_DEVICE_MANUFACTURER, VR::LO, crate::common::MANUFACTURER),
        text(tags::SECONDARY_CAPTURE_DEVICE_MANUFACTURER_MODEL_NAME, VR::LO, algorithm.name.clone()),
        text(tags::SECONDARY_CAPTURE_DEVICE_SOFTWARE_VERSIONS, VR::LO, algorithm.version.clone()),
        text(tags::INSTANCE_NUMBER, VR::IS, instance_number.to_string()),
        text(tags::PATIENT_ORIENTATION, VR::CS, "L\\P"),
        text(tags::CONTENT_DATE, VR::DA, date.clone()),
        text(tags::CONTENT_TIME, VR::TM, time.clone()),
        text(tags::INSTANCE_CREATION_DATE, VR::DA, date),
        text(tags::INSTANCE_CREATION_TIME, VR::TM, time),
        text(tags::IMAGE_TYPE, VR::CS, "DERIVED\\SECONDARY"),
        text(tags::BURNED_IN_ANNOTATION, VR::CS, "YES"),
        DataElement::new(tags::SAMPLES_PER_PIXEL, VR::US, PrimitiveValue::from(3_u16)),
        text(tags::PHOTOMETRIC_INTERPRETATION, VR::CS, "RGB"),
        DataElement::new(tags::PLANAR_CONFIGURATION, VR::US, PrimitiveValue::from(0_u16)),
        DataElement::new(tags::ROWS, VR::US, PrimitiveValue::from(size as u16)),
        DataElement::new(tags::COLUMNS, VR::US, PrimitiveValue::from(size as u16)),
        DataElement::new(tags::BITS_ALLOCATED, VR::US, PrimitiveValue::from(8_u16)),
        DataElement::new(tags::BITS_STORED, VR::US, PrimitiveValue::from(8_u16)),
        DataElement::new(tags::HIGH_BIT, VR::US, PrimitiveValue::from(7_u16)),
        DataElement::new(tags::PIXEL_REPRESENTATION, VR::US, PrimitiveValue::from(0_u16)),
        DataElement::new(tags::PIXEL_DATA, VR::OB, PrimitiveValue::U8(rgb.into())),
    ];
    for e in elements.into_iter().chain(super::lossy_compression(source, false)) {
        object.put(e);
    }
    write_object(object, uids::SECONDARY_CAPTURE_IMAGE_STORAGE, &sop_uid, &dir.join(format!("{role}.dcm")))
}

#[cfg(test)]
mod tests {
    /// Every letter, digit and mark a label can hold draws, and no two draw alike: a class name or
    /// a weights name with a J, Q, X or Z drew blanks once.
    #[test]
    fn every_character_of_a_label_has_a_glyph_of_its_own() {
        let characters: Vec<char> = ('A'..='Z').chain('0'..='9').chain("/.-:()?".chars()).collect();
        for &c in &characters {
            assert!(super::glyph(c).iter().any(|row| *row != 0), "{c:?} draws nothing");
            assert_eq!(super::glyph(c), super::glyph(c.to_ascii_lowercase()), "{c:?} in lower case");
        }
        for (i, &a) in characters.iter().enumerate() {
            for &b in &characters[i + 1..] {
                assert_ne!(super::glyph(a), super::glyph(b), "{a:?} and {b:?} look alike");
            }
        }
        let mut rgb = vec![0u8; 64 * 64 * 3];
        super::draw_text(&mut rgb, 64, 0, 0, 1, "JQXZ", [255, 255, 255]);
        for n in 0..4 {
            let lit = (0..7).flat_map(|y| (0..5).map(move |x| (y * 64 + n * 6 + x) * 3)).filter(|&i| rgb[i] == 255);
            assert!(lit.count() > 5, "letter {n} of JQXZ");
        }
    }
}
