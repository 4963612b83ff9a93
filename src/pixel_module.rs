//! The Image Pixel module's description of an instance's pixel data, checked for sense before
//! anything is decoded or allocated from it.
//!
//! Rows, Columns and Number of Frames are sender-controlled 16- and 32-bit numbers: a header that
//! claims 65535 x 65535 pixels over a few kilobytes of data would otherwise make a decoder or the
//! volume loader ask for tens of gigabytes, and a failed allocation aborts the whole process. The
//! spool refuses such an instance at ingest, while the sender can still be told; the volume
//! loader checks again for files that reached it another way (`idaics analyze`, older spools).

use dicom_core::Tag;
use dicom_core::header::HasLength;
use dicom_dictionary_std::tags;
use dicom_object::InMemDicomObject;

/// The largest single frame accepted, decoded: 16384 x 16384 16-bit pixels. CT frames are
/// 512 x 512 to 2048 x 2048.
pub const MAX_FRAME_BYTES: u64 = 16384 * 16384 * 2;

/// What the header says the pixel data holds.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct PixelModule {
    pub rows: u32,
    pub columns: u32,
    pub samples_per_pixel: u32,
    pub bits_allocated: u32,
    pub number_of_frames: u32,
}

impl PixelModule {
    /// Reads and checks the pixel description; the error says which attribute is wrong and why.
    pub fn from_object(object: &InMemDicomObject) -> Result<PixelModule, String> {
        let number = |tag: Tag, name: &str| -> Result<Option<u32>, String> {
            match object.element_opt(tag) {
                Ok(Some(element)) if !element.is_empty() => element
                    .to_int::<i64>()
                    .ok()
                    .and_then(|v| u32::try_from(v).ok())
                    .map(Some)
                    .ok_or_else(|| format!("{name} is not a non-negative number")),
                _ => Ok(None),
            }
        };
        let required = |tag: Tag, name: &str| number(tag, name)?.ok_or_else(|| format!("no {name}"));
        let module = PixelModule {
            rows: required(tags::ROWS, "Rows")?,
            columns: required(tags::COLUMNS, "Columns")?,
            samples_per_pixel: number(tags::SAMPLES_PER_PIXEL, "SamplesPerPixel")?.unwrap_or(1),
            bits_allocated: required(tags::BITS_ALLOCATED, "BitsAllocated")?,
            number_of_frames: number(tags::NUMBER_OF_FRAMES, "NumberOfFrames")?.unwrap_or(1),
        };
        if module.rows == 0 || module.columns == 0 {
            return Err(format!("an image of {} x {} pixels", module.columns, module.rows));
        }
        if !matches!(module.bits_allocated, 8 | 16 | 32) {
            return Err(format!("BitsAllocated {} (8, 16 or 32 can be decoded)", module.bits_allocated));
        }
        if !matches!(module.samples_per_pixel, 1 | 3) {
            return Err(format!("SamplesPerPixel {} (1 or 3 are defined)", module.samples_per_pixel));
        }
        if module.number_of_frames == 0 {
            return Err("NumberOfFrames 0".into());
        }
        if module.frame_bytes() > MAX_FRAME_BYTES {
            return Err(format!(
                "a frame of {} x {} pixels, {} samples of {} bits: {} MB decoded, more than the {} MB this agent decodes",
                module.columns,
                module.rows,
                module.samples_per_pixel,
                module.bits_allocated,
                module.frame_bytes() >> 20,
                MAX_FRAME_BYTES >> 20
            ));
        }
        Ok(module)
    }

    /// Bytes of one decoded frame.
    pub fn frame_bytes(&self) -> u64 {
        u64::from(self.rows)
            * u64::from(self.columns)
            * u64::from(self.samples_per_pixel)
            * u64::from(self.bits_allocated / 8)
    }

    /// Bytes of all frames, decoded: what native (uncompressed) pixel data must hold.
    pub fn total_bytes(&self) -> u64 {
        self.frame_bytes() * u64::from(self.number_of_frames)
    }

    /// Checks the description against the Pixel Data element as received: native data must hold
    /// every frame, and encapsulated data needs at least one fragment per frame (PS3.5 A.4: a
    /// fragment never holds parts of two frames).
    pub fn check_against(&self, object: &InMemDicomObject) -> Result<(), String> {
        let Some(pixel_data) = object.element_opt(tags::PIXEL_DATA).ok().flatten() else {
            return Err("no PixelData".into());
        };
        match pixel_data.value().fragments() {
            Some(fragments) => {
                if (fragments.len() as u64) < u64::from(self.number_of_frames) {
                    return Err(format!(
                        "NumberOfFrames {} but the encapsulated PixelData has {} fragment(s)",
                        self.number_of_frames,
                        fragments.len()
                    ));
                }
            }
            None => {
                let held = pixel_data.length().get().map(u64::from).unwrap_or(0);
                if held < self.total_bytes() {
                    return Err(self.shortfall(held));
                }
            }
        }
        Ok(())
    }

    /// Checks the first frame's codestream against the header before anything decodes it: a
    /// JPEG, JPEG-LS or JPEG 2000 stream carries its own image size, and the decoders work to
    /// that size, not the header's (a 512 x 512 CT whose JPEG 2000 stream claims 60000 x 60000
    /// kept a decoder busy for half a minute, then panicked). Streams without a size of their own
    /// (RLE) and sizes it cannot find pass; the decode then has the last word.
    pub fn check_codestream(&self, object: &InMemDicomObject, transfer_syntax_uid: &str) -> Result<(), String> {
        let Some(first) = object
            .element_opt(tags::PIXEL_DATA)
            .ok()
            .flatten()
            .and_then(|e| e.value().fragments())
            .and_then(|fragments| fragments.first())
        else {
            return Ok(());
        };
        let size = match transfer_syntax_uid {
            "1.2.840.10008.1.2.4.90"
            | "1.2.840.10008.1.2.4.91"
            | "1.2.840.10008.1.2.4.201"
            | "1.2.840.10008.1.2.4.202"
            | "1.2.840.10008.1.2.4.203" => jpeg2000_size(first),
            uid if uid.starts_with("1.2.840.10008.1.2.4.") => jpeg_size(first),
            _ => None,
        };
        match size {
            Some((columns, rows)) if (columns, rows) != (self.columns, self.rows) => Err(format!(
                "the compressed stream is {columns} x {rows} pixels, the header says {} x {}",
                self.columns, self.rows
            )),
            _ => Ok(()),
        }
    }

    /// Explains why `held` bytes of native pixel data are too few.
    pub fn shortfall(&self, held: u64) -> String {
        format!(
            "PixelData holds {held} bytes; {} frame(s) of {} x {} pixels, {} sample(s) of {} bits need {}",
            self.number_of_frames,
            self.columns,
            self.rows,
            self.samples_per_pixel,
            self.bits_allocated,
            self.total_bytes()
        )
    }
}

/// Width and height from a JPEG 2000 codestream's SIZ segment (ISO 15444-1 A.5.1), found after
/// the SOC marker, in a bare codestream or inside a JP2 box.
fn jpeg2000_size(stream: &[u8]) -> Option<(u32, u32)> {
    let head = &stream[..stream.len().min(4096)];
    let at = head.windows(4).position(|w| w == [0xFF, 0x4F, 0xFF, 0x51])? + 2;
    let field = |offset: usize| -> Option<u32> {
        Some(u32::from_be_bytes(head.get(at + offset..at + offset + 4)?.try_into().ok()?))
    };
    // FF51, Lsiz, Rsiz, then Xsiz, Ysiz, XOsiz, YOsiz.
    let (x, y, x_offset, y_offset) = (field(6)?, field(10)?, field(14)?, field(18)?);
    Some((x.checked_sub(x_offset)?, y.checked_sub(y_offset)?))
}

/// Width and height from the start-of-frame segment of a JPEG (ISO 10918-1 B.2.2) or JPEG-LS
/// (ISO 14495-1, SOF55) stream; `None` where the height is left to a DNL marker.
fn jpeg_size(stream: &[u8]) -> Option<(u32, u32)> {
    if stream.get(..2)? != [0xFF, 0xD8] {
        return None;
    }
    let mut at = 2;
    loop {
        while *stream.get(at)? != 0xFF {
            at += 1;
        }
        while *stream.get(at)? == 0xFF {
            at += 1;
        }
        let marker = *stream.get(at)?;
        at += 1;
        if matches!(marker, 0x01 | 0xD0..=0xD7) {
            continue;
        }
        let length = u16::from_be_bytes(stream.get(at..at + 2)?.try_into().ok()?) as usize;
        let is_frame = matches!(marker, 0xC0..=0xCF if !matches!(marker, 0xC4 | 0xC8 | 0xCC)) || marker == 0xF7;
        if is_frame {
            let segment = stream.get(at..at + 7)?;
            let (height, width) =
                (u16::from_be_bytes([segment[3], segment[4]]), u16::from_be_bytes([segment[5], segment[6]]));
            return (height > 0).then_some((u32::from(width), u32::from(height)));
        }
        if marker == 0xDA {
            return None;
        }
        at += length;
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use dicom_core::{DataElement, PrimitiveValue, VR};

    fn image(rows: u16, columns: u16, frames: Option<&str>, pixel_bytes: usize) -> InMemDicomObject {
        let mut object = InMemDicomObject::new_empty();
        object.put(DataElement::new(tags::ROWS, VR::US, PrimitiveValue::from(rows)));
        object.put(DataElement::new(tags::COLUMNS, VR::US, PrimitiveValue::from(columns)));
        object.put(DataElement::new(tags::SAMPLES_PER_PIXEL, VR::US, PrimitiveValue::from(1u16)));
        object.put(DataElement::new(tags::BITS_ALLOCATED, VR::US, PrimitiveValue::from(16u16)));
        if let Some(frames) = frames {
            object.put(DataElement::new(tags::NUMBER_OF_FRAMES, VR::IS, PrimitiveValue::from(frames)));
        }
        object.put(DataElement::new(tags::PIXEL_DATA, VR::OW, PrimitiveValue::from(vec![0u8; pixel_bytes])));
        object
    }

    #[test]
    fn a_consistent_image_passes() {
        let object = image(4, 3, Some("2"), 48);
        let module = PixelModule::from_object(&object).unwrap();
        assert_eq!((module.frame_bytes(), module.total_bytes()), (24, 48));
        module.check_against(&object).unwrap();
    }

    #[test]
    fn a_header_that_claims_more_than_the_data_holds_is_refused() {
        let object = image(512, 512, None, 100);
        let error = PixelModule::from_object(&object).unwrap().check_against(&object).unwrap_err();
        assert!(error.contains("holds 100 bytes") && error.contains("need 524288"), "{error}");
    }

    #[test]
    fn codestream_sizes_are_read_from_jpeg_jpeg_ls_and_jpeg_2000() {
        // SOI, an APP0 segment, SOF3 (lossless): P 16, Y 300, X 200.
        let jpeg = [0xFF, 0xD8, 0xFF, 0xE0, 0x00, 0x04, 0xAA, 0xBB, 0xFF, 0xC3, 0x00, 0x0B, 16, 0x01, 0x2C, 0x00, 0xC8];
        assert_eq!(jpeg_size(&jpeg), Some((200, 300)));
        // SOF55 of JPEG-LS has the same layout.
        let jpeg_ls = [0xFF, 0xD8, 0xFF, 0xF7, 0x00, 0x0B, 16, 0x00, 0x80, 0x00, 0x80];
        assert_eq!(jpeg_size(&jpeg_ls), Some((128, 128)));
        // A height left to a DNL marker, and a scan before any frame header: no size.
        assert_eq!(jpeg_size(&[0xFF, 0xD8, 0xFF, 0xC0, 0x00, 0x0B, 8, 0, 0, 0x01, 0x00]), None);
        assert_eq!(jpeg_size(&[0xFF, 0xD8, 0xFF, 0xDA, 0x00, 0x02]), None);
        // SOC, SIZ: Lsiz, Rsiz, Xsiz 612, Ysiz 530, XOsiz 100, YOsiz 18.
        let mut j2k = vec![0xFF, 0x4F, 0xFF, 0x51, 0x00, 0x29, 0x00, 0x00];
        for value in [612u32, 530, 100, 18] {
            j2k.extend_from_slice(&value.to_be_bytes());
        }
        assert_eq!(jpeg2000_size(&j2k), Some((512, 512)));
        assert_eq!(jpeg2000_size(&j2k[..12]), None, "a truncated segment");
    }

    #[test]
    fn absurd_descriptions_are_refused_before_any_allocation() {
        for (object, expected) in [
            (image(0, 512, None, 0), "0 pixels"),
            (image(65535, 65535, None, 0), "more than the"),
            (image(4, 4, Some("0"), 0), "NumberOfFrames 0"),
            (image(4, 4, Some("-3"), 0), "NumberOfFrames is not"),
        ] {
            let error = PixelModule::from_object(&object).unwrap_err();
            assert!(error.contains(expected), "{error}");
        }
        let mut twelve_bit = image(4, 4, None, 32);
        twelve_bit.put(DataElement::new(tags::BITS_ALLOCATED, VR::US, PrimitiveValue::from(12u16)));
        assert!(PixelModule::from_object(&twelve_bit).unwrap_err().contains("BitsAllocated 12"));
    }
}
