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

/// The largest single frame accepted, decoded: 64 MiB, a 4096 x 4096 frame of 32-bit pixels or
/// of 8-bit colour. CT frames are 512 x 512 to 2048 x 2048 16-bit pixels (8 MiB at most); the
/// bound is what a compressed frame of a kilobyte can make a decoder allocate before Success.
pub const MAX_FRAME_BYTES: u64 = 64 << 20;

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

    /// Bytes of one decoded frame, saturating (see [`PixelModule::total_bytes`]).
    pub fn frame_bytes(&self) -> u64 {
        [self.columns, self.samples_per_pixel, self.bits_allocated / 8]
            .into_iter()
            .fold(u64::from(self.rows), |bytes, factor| bytes.saturating_mul(u64::from(factor)))
    }

    /// Bytes of all frames, decoded: what native (uncompressed) pixel data must hold. Saturates
    /// rather than wraps: a header declaring absurd sizes must read as too large, never as small.
    pub fn total_bytes(&self) -> u64 {
        self.frame_bytes().saturating_mul(u64::from(self.number_of_frames))
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

    /// Checks the header of every compressed frame against this description before a decoder
    /// sees it. A decoder sizes its buffers from the stream, not from the DICOM header: a
    /// 512 x 512 CT whose JPEG 2000 stream claimed 60000 x 60000 kept openjp2 busy for half a
    /// minute, then it panicked; a 1.5 kB one that announced 3000 components took 15 s and 3 GB,
    /// and a few thousand more would exhaust the server for an instance no larger than a slice.
    /// PS3.5 8.2 asks the stream to agree with the header: the same size, as many components as
    /// samples per pixel, no more bits than are allocated (and no subsampled JPEG 2000
    /// component). Streams without a header of their own (RLE) and headers it cannot find pass;
    /// the decode then has the last word.
    pub fn check_codestream(&self, object: &InMemDicomObject, transfer_syntax_uid: &str) -> Result<(), String> {
        let Some(fragments) = object.element_opt(tags::PIXEL_DATA).ok().flatten().and_then(|e| e.value().fragments())
        else {
            return Ok(());
        };
        let read: fn(&[u8]) -> Result<Option<FrameShape>, String> = match transfer_syntax_uid {
            "1.2.840.10008.1.2.4.90"
            | "1.2.840.10008.1.2.4.91"
            | "1.2.840.10008.1.2.4.201"
            | "1.2.840.10008.1.2.4.202"
            | "1.2.840.10008.1.2.4.203" => jpeg2000_shape,
            uid if uid.starts_with("1.2.840.10008.1.2.4.") => jpeg_shape,
            _ => return Ok(()),
        };
        // A frame split over several fragments has its header in the first: the others are
        // not frame starts and read as `None`.
        for (n, fragment) in fragments.iter().enumerate() {
            let Some(shape) = read(fragment).map_err(|e| format!("fragment {}: {e}", n + 1))? else { continue };
            let problem = if shape.size.is_some_and(|size| size != (self.columns, self.rows)) {
                let (columns, rows) = shape.size.unwrap_or_default();
                Some(format!(
                    "the compressed stream is {columns} x {rows} pixels, the header says {} x {}",
                    self.columns, self.rows
                ))
            } else if shape.components != self.samples_per_pixel {
                Some(format!(
                    "the compressed stream has {} components, the header says {} sample(s) per pixel",
                    shape.components, self.samples_per_pixel
                ))
            } else if shape.subsampled {
                Some("the compressed stream subsamples a component".to_string())
            } else if let Some((tiles, width, height)) = shape.tiles.filter(|(tiles, ..)| *tiles > MAX_JPEG2000_TILES) {
                Some(format!(
                    "the compressed stream is cut into {tiles} tiles of {width} x {height}; at most {MAX_JPEG2000_TILES} are accepted"
                ))
            } else if u32::from(shape.precision) > self.bits_allocated {
                Some(format!(
                    "the compressed stream holds {}-bit samples, the header allocates {} bits",
                    shape.precision, self.bits_allocated
                ))
            } else {
                None
            };
            if let Some(problem) = problem {
                return Err(if fragments.len() > 1 { format!("fragment {}: {problem}", n + 1) } else { problem });
            }
        }
        // CharLS 2.4 decodes a JPEG-LS stream cut short for seconds, or for ever (measured on
        // mutated CT_small: 9.9 s, and one that never returned), and a decode cannot be stopped
        // from outside. A complete frame ends with its EOI marker, then padding to an even
        // length: a zero as DICOM says, or 0xFF as some encoders write (pylibjpeg's CT1_JLSN).
        if matches!(transfer_syntax_uid, "1.2.840.10008.1.2.4.80" | "1.2.840.10008.1.2.4.81") {
            for frame in jpeg_frame_fragments(fragments) {
                let n = frame.end - 1;
                let fragment = &fragments[n];
                let content =
                    fragment.iter().rposition(|b| !matches!(b, 0x00 | 0xFF)).map_or(&[][..], |last| &fragment[..=last]);
                if !content.ends_with(&[0xFF, 0xD9]) {
                    let problem = "the JPEG-LS stream ends without its end-of-image marker: it is cut short";
                    return Err(if fragments.len() > 1 {
                        format!("fragment {}: {problem}", n + 1)
                    } else {
                        problem.into()
                    });
                }
            }
        }
        Ok(())
    }

    /// Native pixel data holds exactly its frames (padded to even, PS3.5 8.1.1). A little more
    /// is tolerated, as some writers leave it; a value larger by more than a frame is refused:
    /// it would be held whole at analysis for pixels nobody declared.
    pub fn excess(&self, held: u64) -> Option<String> {
        let allowed = self.total_bytes().saturating_add(self.frame_bytes()).saturating_add(1);
        (held > allowed)
            .then(|| format!("PixelData holds {held} bytes; {} need only {}", self.frames(), self.total_bytes()))
    }

    /// Explains why `held` bytes of native pixel data are too few.
    pub fn shortfall(&self, held: u64) -> String {
        format!("PixelData holds {held} bytes; {} need {}", self.frames(), self.total_bytes())
    }

    /// "N frame(s) of C x R pixels, S sample(s) of B bits", for messages.
    fn frames(&self) -> String {
        format!(
            "{} frame(s) of {} x {} pixels, {} sample(s) of {} bits",
            self.number_of_frames, self.columns, self.rows, self.samples_per_pixel, self.bits_allocated
        )
    }
}

/// Which fragments hold each frame of JPEG-family encapsulated pixel data (JPEG, JPEG-LS). A
/// frame starts with SOI; entropy-coded data cannot hold one (0xFF is stuffed there), so a
/// fragment that starts with SOI starts a frame.
pub(crate) fn jpeg_frame_fragments(fragments: &[Vec<u8>]) -> Vec<std::ops::Range<usize>> {
    let mut frames: Vec<std::ops::Range<usize>> = Vec::new();
    for (n, fragment) in fragments.iter().enumerate() {
        match frames.last_mut() {
            Some(frame) if !fragment.starts_with(&[0xFF, 0xD8]) => frame.end = n + 1,
            _ => frames.push(n..n + 1),
        }
    }
    frames
}

/// What a compressed frame's own header says of its image.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
struct FrameShape {
    /// JPEG 2000: how many tiles, and their width and height.
    tiles: Option<(u64, u32, u32)>,
    /// Columns and rows; `None` for a JPEG whose height is left to a DNL marker.
    size: Option<(u32, u32)>,
    components: u32,
    /// The largest sample precision, in bits.
    precision: u8,
    subsampled: bool,
}

/// More tiles in one JPEG 2000 frame than any CT encoder writes: a 16384 x 16384 image in tiles
/// of 256 x 256 is 4096.
const MAX_JPEG2000_TILES: u64 = 4096;

/// The image a JPEG 2000 or HTJ2K frame announces in its SIZ segment (ISO 15444-1 A.5.1), in a
/// bare codestream or inside a JP2 file; `None` for a fragment that starts neither (the rest of
/// a frame), an error for a SIZ segment cut short or at odds with itself.
fn jpeg2000_shape(stream: &[u8]) -> Result<Option<FrameShape>, String> {
    const SOC_SIZ: [u8; 4] = [0xFF, 0x4F, 0xFF, 0x51];
    const JP2_SIGNATURE: [u8; 8] = [0x00, 0x00, 0x00, 0x0C, 0x6A, 0x50, 0x20, 0x20];
    let at = if stream.starts_with(&SOC_SIZ) {
        2
    } else if stream.starts_with(&JP2_SIGNATURE) {
        let head = &stream[..stream.len().min(4096)];
        match head.windows(4).position(|w| w == SOC_SIZ) {
            Some(soc) => soc + 2,
            None => return Err("a JP2 file without a codestream header in its first 4 kB".into()),
        }
    } else {
        return Ok(None);
    };
    let cut_short = || "its SIZ segment is cut short".to_string();
    let u16_at = |offset: usize| -> Result<u16, String> {
        Ok(u16::from_be_bytes(stream.get(at + offset..at + offset + 2).ok_or_else(cut_short)?.try_into().unwrap()))
    };
    let u32_at = |offset: usize| -> Result<u32, String> {
        Ok(u32::from_be_bytes(stream.get(at + offset..at + offset + 4).ok_or_else(cut_short)?.try_into().unwrap()))
    };
    // FF51, Lsiz, Rsiz, Xsiz, Ysiz, XOsiz, YOsiz, XTsiz, YTsiz, XTOsiz, YTOsiz, Csiz, then
    // Ssiz, XRsiz, YRsiz for each component.
    let (x, y, x_offset, y_offset) = (u32_at(6)?, u32_at(10)?, u32_at(14)?, u32_at(18)?);
    let (tile_width, tile_height, tile_x_offset, tile_y_offset) = (u32_at(22)?, u32_at(26)?, u32_at(30)?, u32_at(34)?);
    // Decoders keep state per tile: a 512 x 512 frame cut into 1 x 1 tiles is 262144 of them
    // from a stream of a few kilobytes. The grid must also hold the image as A.5.1 says (tile
    // origin at or before the image's, first tile reaching into it).
    if tile_width == 0
        || tile_height == 0
        || tile_x_offset > x_offset
        || tile_y_offset > y_offset
        || u64::from(tile_x_offset) + u64::from(tile_width) <= u64::from(x_offset)
        || u64::from(tile_y_offset) + u64::from(tile_height) <= u64::from(y_offset)
    {
        return Err(format!(
            "its tile grid ({tile_width} x {tile_height} from {tile_x_offset}, {tile_y_offset}) does not hold its image"
        ));
    }
    let tiles = u64::from(x.saturating_sub(tile_x_offset).div_ceil(tile_width))
        * u64::from(y.saturating_sub(tile_y_offset).div_ceil(tile_height));
    let components = u16_at(38)?;
    if usize::from(u16_at(2)?) != 38 + 3 * usize::from(components) {
        return Err(format!("its SIZ segment's length does not fit its {components} components"));
    }
    let described = stream.get(at + 40..at + 40 + 3 * usize::from(components)).ok_or_else(cut_short)?;
    let size = (x.checked_sub(x_offset).ok_or_else(cut_short)?, y.checked_sub(y_offset).ok_or_else(cut_short)?);
    Ok(Some(FrameShape {
        tiles: Some((tiles, tile_width, tile_height)),
        size: Some(size),
        components: u32::from(components),
        precision: described.chunks_exact(3).map(|c| (c[0] & 0x7F) + 1).max().unwrap_or(0),
        subsampled: described.chunks_exact(3).any(|c| c[1] != 1 || c[2] != 1),
    }))
}

/// The image the start-of-frame segment of a JPEG (ISO 10918-1 B.2.2) or JPEG-LS (ISO 14495-1,
/// SOF55) frame announces; `None` for a fragment that does not start with SOI, or a stream whose
/// frame header cannot be found before its first scan.
fn jpeg_shape(stream: &[u8]) -> Result<Option<FrameShape>, String> {
    if stream.get(..2) != Some(&[0xFF, 0xD8]) {
        return Ok(None);
    }
    let mut at = 2;
    loop {
        let Some(skip) = stream.get(at..).and_then(|rest| rest.iter().position(|b| *b == 0xFF)) else {
            return Ok(None);
        };
        at += skip;
        while stream.get(at) == Some(&0xFF) {
            at += 1;
        }
        let Some(&marker) = stream.get(at) else { return Ok(None) };
        at += 1;
        if matches!(marker, 0x01 | 0xD0..=0xD7) {
            continue;
        }
        let Some(length) = stream.get(at..at + 2).map(|b| usize::from(u16::from_be_bytes([b[0], b[1]]))) else {
            return Ok(None);
        };
        let is_frame = matches!(marker, 0xC0..=0xCF if !matches!(marker, 0xC4 | 0xC8 | 0xCC)) || marker == 0xF7;
        if is_frame {
            // Lf, P, Y, X, Nf, then Ci, Hi and Vi (one byte for both), Tqi per component: all there.
            let header = stream.get(at..at + 8).ok_or("its frame header is cut short")?;
            let components = header[7];
            stream.get(at + 8..at + 8 + 3 * usize::from(components)).ok_or("its frame header is cut short")?;
            let (height, width) =
                (u16::from_be_bytes([header[3], header[4]]), u16::from_be_bytes([header[5], header[6]]));
            return Ok(Some(FrameShape {
                tiles: None,
                size: (height > 0).then_some((u32::from(width), u32::from(height))),
                components: u32::from(components),
                precision: header[2],
                // DICOM allows subsampled JPEG colour (YBR_FULL_422); the decoders size the
                // chroma planes from the frame size, which is checked.
                subsampled: false,
            }));
        }
        if marker == 0xDA {
            return Ok(None);
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
    fn absurd_sizes_read_as_too_large_never_wrap_to_small() {
        let module = PixelModule {
            rows: u32::MAX,
            columns: u32::MAX,
            samples_per_pixel: 3,
            bits_allocated: 64,
            number_of_frames: 9,
        };
        assert_eq!((module.frame_bytes(), module.total_bytes()), (u64::MAX, u64::MAX));
        let module = PixelModule {
            rows: 65535,
            columns: 65535,
            samples_per_pixel: 3,
            bits_allocated: 16,
            number_of_frames: u32::MAX,
        };
        assert_eq!(module.total_bytes(), u64::MAX);
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
    fn frame_headers_are_read_from_jpeg_jpeg_ls_and_jpeg_2000() {
        let shape = |size, components, precision, subsampled| {
            Ok(Some(FrameShape { tiles: None, size, components, precision, subsampled }))
        };
        // JPEG 2000 shapes compared without their tiles (looked at last).
        let jpeg2000_shape = |stream: &[u8]| jpeg2000_shape(stream).map(|s| s.map(|f| FrameShape { tiles: None, ..f }));
        // SOI, an APP0 segment, SOF3 (lossless): P 16, Y 300, X 200, one component.
        let jpeg = [
            0xFF, 0xD8, 0xFF, 0xE0, 0x00, 0x04, 0xAA, 0xBB, 0xFF, 0xC3, 0x00, 0x0B, 16, 0x01, 0x2C, 0x00, 0xC8, 1, 1,
            0x11, 0,
        ];
        assert_eq!(jpeg_shape(&jpeg), shape(Some((200, 300)), 1, 16, false));
        assert!(jpeg_shape(&jpeg[..jpeg.len() - 1]).unwrap_err().contains("cut short"));
        // SOF55 of JPEG-LS has the same layout.
        let jpeg_ls = [0xFF, 0xD8, 0xFF, 0xF7, 0x00, 0x0B, 16, 0x00, 0x80, 0x00, 0x80, 1, 1, 0x11, 0];
        assert_eq!(jpeg_shape(&jpeg_ls), shape(Some((128, 128)), 1, 16, false));
        // A height left to a DNL marker; a scan before any frame header; not a frame start.
        let dnl = [0xFF, 0xD8, 0xFF, 0xC0, 0x00, 0x0B, 8, 0, 0, 0x01, 0x00, 1, 1, 0x11, 0];
        assert_eq!(jpeg_shape(&dnl), shape(None, 1, 8, false));
        assert_eq!(jpeg_shape(&[0xFF, 0xD8, 0xFF, 0xDA, 0x00, 0x02]), Ok(None));
        assert_eq!(jpeg_shape(&[0x12, 0x34, 0xFF, 0xD8]), Ok(None));

        // SOC, SIZ: Lsiz, Rsiz, Xsiz 612, Ysiz 530, XOsiz 100, YOsiz 18, one 512 x 512 tile, then
        // Csiz 1 and a signed 16-bit component at full resolution.
        let mut j2k = vec![0xFF, 0x4F, 0xFF, 0x51, 0x00, 41, 0x00, 0x00];
        for value in [612u32, 530, 100, 18, 512, 512, 100, 18] {
            j2k.extend_from_slice(&value.to_be_bytes());
        }
        j2k.extend_from_slice(&[0, 1, 0x8F, 1, 1]);
        assert_eq!(jpeg2000_shape(&j2k), shape(Some((512, 512)), 1, 16, false));
        assert!(jpeg2000_shape(&j2k[..30]).unwrap_err().contains("cut short"));
        assert!(jpeg2000_shape(&j2k[..j2k.len() - 1]).unwrap_err().contains("cut short"));
        assert_eq!(jpeg2000_shape(&j2k[2..]), Ok(None), "no SOC: the rest of a frame");
        // The same codestream inside a JP2 file.
        let jp2 = [&[0x00, 0x00, 0x00, 0x0C, 0x6A, 0x50, 0x20, 0x20, 0x0D, 0x0A, 0x87, 0x0A][..], &j2k].concat();
        assert_eq!(jpeg2000_shape(&jp2), shape(Some((512, 512)), 1, 16, false));
        // Subsampled; and 3000 components announced in a segment sized for one.
        let mut subsampled = j2k.clone();
        subsampled[43] = 2;
        assert_eq!(jpeg2000_shape(&subsampled), shape(Some((512, 512)), 1, 16, true));
        let mut many = j2k.clone();
        many[40..42].copy_from_slice(&3000u16.to_be_bytes());
        assert!(jpeg2000_shape(&many).unwrap_err().contains("3000 components"));
        // Tiles: 8 x 8 ones make 4096 of them, 4 x 4 ones 16384 (their number is judged with
        // the header, below); a tile grid of zero width, or starting after the image, holds
        // nothing.
        let with_tiles = |width: u32, height: u32, x_offset: u32| {
            let mut tiled = j2k.clone();
            tiled[24..28].copy_from_slice(&width.to_be_bytes());
            tiled[28..32].copy_from_slice(&height.to_be_bytes());
            tiled[32..36].copy_from_slice(&x_offset.to_be_bytes());
            super::jpeg2000_shape(&tiled)
        };
        assert_eq!(with_tiles(8, 8, 100).unwrap().unwrap().tiles, Some((4096, 8, 8)));
        assert_eq!(with_tiles(4, 4, 100).unwrap().unwrap().tiles, Some((16384, 4, 4)));
        assert_eq!(super::jpeg2000_shape(&j2k).unwrap().unwrap().tiles, Some((1, 512, 512)));
        assert!(with_tiles(0, 512, 100).unwrap_err().contains("does not hold its image"));
        assert!(with_tiles(512, 512, 101).unwrap_err().contains("does not hold its image"));
        assert!(with_tiles(50, 512, 40).unwrap_err().contains("does not hold its image"));
    }

    #[test]
    fn frames_at_odds_with_the_header_are_refused_before_decoding() {
        use dicom_core::value::{PixelFragmentSequence, Value};
        let mut j2k = vec![0xFF, 0x4F, 0xFF, 0x51, 0x00, 41, 0x00, 0x00];
        for value in [4u32, 4, 0, 0, 4, 4, 0, 0] {
            j2k.extend_from_slice(&value.to_be_bytes());
        }
        j2k.extend_from_slice(&[0, 1, 0x8F, 1, 1]);
        let with_frames = |frames: Vec<Vec<u8>>| {
            let mut object = image(4, 4, Some(&frames.len().to_string()), 0);
            let fragments = PixelFragmentSequence::new(Vec::<u32>::new(), frames);
            object.put(DataElement::new(tags::PIXEL_DATA, VR::OB, Value::PixelSequence(fragments)));
            let module = PixelModule::from_object(&object).unwrap();
            module.check_codestream(&object, "1.2.840.10008.1.2.4.90")
        };
        assert_eq!(with_frames(vec![j2k.clone(), j2k.clone()]), Ok(()));
        // The second frame is the one at odds: every frame is read, not the first alone.
        let mut three_components = j2k.clone();
        three_components[5] = 47;
        three_components[40..42].copy_from_slice(&3u16.to_be_bytes());
        three_components.extend_from_slice(&[0x8F, 1, 1, 0x8F, 1, 1]);
        let error = with_frames(vec![j2k.clone(), three_components]).unwrap_err();
        assert!(error.contains("fragment 2") && error.contains("3 components"), "{error}");
        let mut wide = j2k.clone();
        wide[11] = 8;
        assert!(with_frames(vec![j2k.clone(), wide]).unwrap_err().contains("8 x 4 pixels"));
        let mut deep = j2k.clone();
        deep[42] = 0x90;
        assert!(with_frames(vec![deep, j2k.clone()]).unwrap_err().contains("17-bit samples"));
        // A continuation fragment (no SOC) is left to the decoder.
        assert_eq!(with_frames(vec![j2k.clone(), vec![0x12; 64]]), Ok(()));
        // A 128 x 128 frame in 1 x 1 tiles: 16384 of them, from a stream of a few bytes.
        let mut tiled = j2k;
        for (at, value) in [(8, 128u32), (12, 128), (24, 1), (28, 1)] {
            tiled[at..at + 4].copy_from_slice(&value.to_be_bytes());
        }
        let mut object = image(128, 128, Some("1"), 0);
        let fragments = PixelFragmentSequence::new(Vec::<u32>::new(), vec![tiled]);
        object.put(DataElement::new(tags::PIXEL_DATA, VR::OB, Value::PixelSequence(fragments)));
        let error = PixelModule::from_object(&object).unwrap().check_codestream(&object, "1.2.840.10008.1.2.4.90");
        assert!(error.unwrap_err().contains("cut into 16384 tiles of 1 x 1"));
    }

    #[test]
    fn a_jpeg_ls_frame_cut_short_is_refused_before_decoding() {
        use dicom_core::value::{PixelFragmentSequence, Value};
        // SOI, SOF55 (16-bit, 4 x 4, one component), a scan's worth of bytes, EOI.
        let frame = [
            &[0xFF, 0xD8, 0xFF, 0xF7, 0x00, 0x0B, 16, 0x00, 0x04, 0x00, 0x04, 1, 1, 0x11, 0][..],
            &[0xFF, 0xDA, 0x00, 0x08, 1, 1, 0, 0, 0, 0, 0x12, 0x34, 0x56],
            &[0xFF, 0xD9],
        ]
        .concat();
        let check = |fragments: Vec<Vec<u8>>, frames: &str| {
            let mut object = image(4, 4, Some(frames), 0);
            let fragments = PixelFragmentSequence::new(Vec::<u32>::new(), fragments);
            object.put(DataElement::new(tags::PIXEL_DATA, VR::OB, Value::PixelSequence(fragments)));
            PixelModule::from_object(&object).unwrap().check_codestream(&object, "1.2.840.10008.1.2.4.80")
        };
        let padded = [&frame[..], &[0]].concat();
        let padded_with_ff = [&frame[..], &[0xFF]].concat();
        assert_eq!(check(vec![frame.clone()], "1"), Ok(()));
        assert_eq!(check(vec![padded.clone(), padded_with_ff], "2"), Ok(()));
        // One frame over two fragments: only the second ends it.
        let (head, tail) = frame.split_at(20);
        assert_eq!(check(vec![head.to_vec(), tail.to_vec()], "1"), Ok(()));
        let cut = frame[..frame.len() - 3].to_vec();
        assert!(check(vec![cut.clone()], "1").unwrap_err().contains("cut short"));
        assert!(check(vec![cut, frame], "2").unwrap_err().starts_with("fragment 1:"));
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
