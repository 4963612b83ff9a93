//! JPEG Extended (1.2.840.10008.1.2.4.51) for grayscale images: the sequential DCT process with
//! Huffman coding (ISO 10918-1 processes 2 and 4) at 8 or 12 bits per sample.
//!
//! CT archives that compressed lossily did so as 12-bit JPEG Extended, and dicom-pixeldata 0.10's
//! JPEG decoder (jpeg-decoder) refuses 12-bit DCT streams: without this module such a study
//! could only be refused at negotiation, and a PACS that keeps nothing else could not send it.
//! Only what CT needs is here: one component, Huffman tables, restart intervals. Progressive,
//! arithmetic, hierarchical and lossless streams, colour and DNL-sized frames are refused with
//! the reason. Every length and index comes from the sender, so nothing here indexes unchecked,
//! and nothing is allocated for a frame before its header has been found to match the DICOM
//! header's Rows and Columns.
//!
//! The inverse DCT is computed in floating point and rounded, so values may differ by one from
//! a decoder using IJG's integer approximation (DCMTK's), as the standard's accuracy test allows
//! (ISO 10918-2).

use std::ops::Range;

use dicom_core::value::Value;
use dicom_core::{DataElement, PrimitiveValue, VR};
use dicom_dictionary_std::tags;
use dicom_object::{DefaultDicomObject, InMemDicomObject};

/// The transfer syntax this module decodes.
pub const JPEG_EXTENDED: &str = "1.2.840.10008.1.2.4.51";

#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum JpegError {
    #[error("the JPEG stream does not start with SOI")]
    NoStartOfImage,
    #[error("the JPEG stream is cut short ({0})")]
    CutShort(&'static str),
    #[error("{0}")]
    Unsupported(String),
    #[error("the JPEG stream is damaged: {0}")]
    Damaged(String),
}

/// One decoded grayscale frame.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Frame {
    pub width: usize,
    pub height: usize,
    /// 8 or 12.
    pub precision: u8,
    /// Row by row, each in `0..2^precision`.
    pub samples: Vec<u16>,
}

/// Natural (row-major) index of the k-th coefficient in zig-zag order (ISO 10918-1 figure 5).
const ZIGZAG: [usize; 64] = [
    0, 1, 8, 16, 9, 2, 3, 10, 17, 24, 32, 25, 18, 11, 4, 5, 12, 19, 26, 33, 40, 48, 41, 34, 27, 20, 13, 6, 7, 14, 21,
    28, 35, 42, 49, 56, 57, 50, 43, 36, 29, 22, 15, 23, 30, 37, 44, 51, 58, 59, 52, 45, 38, 31, 39, 46, 53, 60, 61, 54,
    47, 55, 62, 63,
];

/// A Huffman table in the form of ISO 10918-1 F.2.2.3: for each code length, the largest code
/// and where its symbols start.
#[derive(Debug, Clone)]
struct HuffmanTable {
    /// Largest code of each length 1..=16, or -1 when there is none.
    max_code: [i32; 17],
    /// `values` index of the first code of each length, minus that code.
    offset: [i32; 17],
    values: Vec<u8>,
}

impl HuffmanTable {
    fn new(counts: &[u8; 16], values: Vec<u8>) -> Result<HuffmanTable, JpegError> {
        let mut max_code = [-1i32; 17];
        let mut offset = [0i32; 17];
        let mut code = 0i32;
        let mut index = 0i32;
        for length in 1..=16 {
            let count = i32::from(counts[length - 1]);
            if count > 0 {
                offset[length] = index - code;
                code += count;
                index += count;
                max_code[length] = code - 1;
                // The codes of a length must fit in it.
                if code > 1 << length {
                    return Err(JpegError::Damaged(format!("a Huffman table with too many codes of length {length}")));
                }
            }
            code <<= 1;
        }
        Ok(HuffmanTable { max_code, offset, values })
    }
}

/// Reads the entropy-coded data bit by bit, removing stuffed zero bytes. A marker ends it: a
/// read past one is an error (a truncated or damaged scan), never invented zeros.
struct BitReader<'a> {
    data: &'a [u8],
    at: usize,
    bits: u32,
    count: u32,
}

impl<'a> BitReader<'a> {
    fn new(data: &'a [u8], at: usize) -> BitReader<'a> {
        BitReader { data, at, bits: 0, count: 0 }
    }

    fn bit(&mut self) -> Result<u32, JpegError> {
        if self.count == 0 {
            let byte = *self.data.get(self.at).ok_or(JpegError::CutShort("in the entropy-coded data"))?;
            if byte == 0xFF {
                match self.data.get(self.at + 1) {
                    Some(0x00) => self.at += 2,
                    Some(_) => return Err(JpegError::Damaged("a marker inside a block's coded data".into())),
                    None => return Err(JpegError::CutShort("in the entropy-coded data")),
                }
            } else {
                self.at += 1;
            }
            self.bits = u32::from(byte);
            self.count = 8;
        }
        self.count -= 1;
        Ok((self.bits >> self.count) & 1)
    }

    fn bits(&mut self, n: u8) -> Result<u32, JpegError> {
        let mut value = 0;
        for _ in 0..n {
            value = (value << 1) | self.bit()?;
        }
        Ok(value)
    }

    fn decode(&mut self, table: &HuffmanTable) -> Result<u8, JpegError> {
        let mut code = 0i32;
        for length in 1..=16 {
            code = (code << 1) | self.bit()? as i32;
            if code <= table.max_code[length] {
                let index = (code + table.offset[length]) as usize;
                return table
                    .values
                    .get(index)
                    .copied()
                    .ok_or_else(|| JpegError::Damaged("a Huffman table cut short".into()));
            }
        }
        Err(JpegError::Damaged("a Huffman code no table holds".into()))
    }

    /// A coefficient of `size` bits (F.2.2.1, EXTEND).
    fn signed(&mut self, size: u8) -> Result<i32, JpegError> {
        if size == 0 {
            return Ok(0);
        }
        let value = self.bits(size)? as i32;
        Ok(if value < 1 << (size - 1) { value - (1 << size) + 1 } else { value })
    }

    /// At a restart interval's end: drops the partial byte and reads the RSTn marker that must
    /// follow, returning n.
    fn restart(&mut self) -> Result<u8, JpegError> {
        self.count = 0;
        while self.data.get(self.at) == Some(&0xFF) && self.data.get(self.at + 1) == Some(&0xFF) {
            self.at += 1; // fill bytes before a marker
        }
        match self.data.get(self.at..self.at + 2) {
            Some([0xFF, marker @ 0xD0..=0xD7]) => {
                self.at += 2;
                Ok(marker - 0xD0)
            }
            Some(_) => Err(JpegError::Damaged("a restart marker is missing".into())),
            None => Err(JpegError::CutShort("before a restart marker")),
        }
    }
}

struct FrameHeader {
    precision: u8,
    width: usize,
    height: usize,
    component_id: u8,
    quantization: usize,
}

fn u16_at(stream: &[u8], at: usize) -> Result<usize, JpegError> {
    stream
        .get(at..at + 2)
        .map(|b| usize::from(u16::from_be_bytes([b[0], b[1]])))
        .ok_or(JpegError::CutShort("in a marker segment"))
}

/// Decodes one frame (a complete JPEG stream, SOI to EOI) that must be `columns` x `rows`
/// samples: the size is checked before anything is allocated for it.
pub fn decode(stream: &[u8], (columns, rows): (usize, usize)) -> Result<Frame, JpegError> {
    if stream.get(..2) != Some(&[0xFF, 0xD8]) {
        return Err(JpegError::NoStartOfImage);
    }
    let mut quantization: [Option<[u16; 64]>; 4] = [None; 4];
    let mut dc_tables: [Option<HuffmanTable>; 4] = Default::default();
    let mut ac_tables: [Option<HuffmanTable>; 4] = Default::default();
    let mut restart_interval = 0usize;
    let mut frame: Option<FrameHeader> = None;
    let mut at = 2;
    loop {
        // Markers may be preceded by any number of fill bytes (B.1.1.2).
        while stream.get(at) == Some(&0xFF) && stream.get(at + 1) == Some(&0xFF) {
            at += 1;
        }
        let marker = match stream.get(at..at + 2) {
            Some([0xFF, marker]) => *marker,
            Some(_) => return Err(JpegError::Damaged(format!("no marker at byte {at}"))),
            None => return Err(JpegError::CutShort("before its first scan")),
        };
        at += 2;
        if marker == 0xD9 {
            return Err(JpegError::Damaged("the stream ends before any scan".into()));
        }
        let length = u16_at(stream, at)?;
        if length < 2 {
            return Err(JpegError::Damaged(format!("a marker segment of length {length}")));
        }
        let segment = stream.get(at + 2..at + length).ok_or(JpegError::CutShort("in a marker segment"))?;
        match marker {
            0xDB => read_quantization(segment, &mut quantization)?,
            0xC4 => read_huffman(segment, &mut dc_tables, &mut ac_tables)?,
            0xDD => {
                restart_interval = u16_at(segment, 0)?;
            }
            0xC0 | 0xC1 if frame.is_some() => {
                return Err(JpegError::Damaged("a second frame header".into()));
            }
            0xC0 | 0xC1 => {
                let header = read_frame_header(segment)?;
                if (header.width, header.height) != (columns, rows) {
                    return Err(JpegError::Damaged(format!(
                        "the JPEG frame is {} x {} pixels, the DICOM header says {columns} x {rows}",
                        header.width, header.height
                    )));
                }
                frame = Some(header);
            }
            0xC2 | 0xC3 | 0xC5..=0xC7 | 0xC9..=0xCB | 0xCD..=0xCF => {
                let process = match marker {
                    0xC2 | 0xC6 | 0xCA | 0xCE => "progressive",
                    0xC3 | 0xC7 | 0xCB | 0xCF => "lossless",
                    _ => "hierarchical",
                };
                let coding = if marker >= 0xC9 { ", arithmetic-coded" } else { "" };
                return Err(JpegError::Unsupported(format!(
                    "a {process}{coding} JPEG frame (SOF{}); JPEG Extended holds sequential DCT frames",
                    marker - 0xC0
                )));
            }
            0xDA => {
                let frame = frame.ok_or_else(|| JpegError::Damaged("a scan before the frame header".into()))?;
                let scan_start = at + length;
                return decode_scan(
                    stream,
                    scan_start,
                    segment,
                    &frame,
                    &quantization,
                    (&dc_tables, &ac_tables),
                    restart_interval,
                );
            }
            // APPn, COM and anything else with a length: not needed to decode.
            _ => {}
        }
        at += length;
    }
}

fn read_quantization(mut segment: &[u8], tables: &mut [Option<[u16; 64]>; 4]) -> Result<(), JpegError> {
    while let Some(&first) = segment.first() {
        let (precision, id) = (first >> 4, usize::from(first & 0x0F));
        let width = if precision == 0 { 1 } else { 2 };
        if precision > 1 || id > 3 {
            return Err(JpegError::Damaged(format!("a quantization table {id} of precision {precision}")));
        }
        let values = segment.get(1..1 + 64 * width).ok_or(JpegError::CutShort("in a quantization table"))?;
        let mut table = [0u16; 64];
        for (k, natural) in ZIGZAG.iter().enumerate() {
            table[*natural] =
                if width == 1 { u16::from(values[k]) } else { u16::from_be_bytes([values[2 * k], values[2 * k + 1]]) };
        }
        tables[id] = Some(table);
        segment = &segment[1 + 64 * width..];
    }
    Ok(())
}

fn read_huffman(
    mut segment: &[u8],
    dc: &mut [Option<HuffmanTable>; 4],
    ac: &mut [Option<HuffmanTable>; 4],
) -> Result<(), JpegError> {
    while let Some(&first) = segment.first() {
        let (class, id) = (first >> 4, usize::from(first & 0x0F));
        if class > 1 || id > 3 {
            return Err(JpegError::Damaged(format!("a Huffman table of class {class} and number {id}")));
        }
        let counts: [u8; 16] =
            segment.get(1..17).ok_or(JpegError::CutShort("in a Huffman table"))?.try_into().expect("16 bytes");
        let total: usize = counts.iter().map(|c| usize::from(*c)).sum();
        if total > 256 {
            return Err(JpegError::Damaged(format!("a Huffman table of {total} codes")));
        }
        let values = segment.get(17..17 + total).ok_or(JpegError::CutShort("in a Huffman table"))?.to_vec();
        let table = HuffmanTable::new(&counts, values)?;
        if class == 0 {
            dc[id] = Some(table)
        } else {
            ac[id] = Some(table)
        }
        segment = &segment[17 + total..];
    }
    Ok(())
}

fn read_frame_header(segment: &[u8]) -> Result<FrameHeader, JpegError> {
    let cut = || JpegError::CutShort("in the frame header");
    let precision = *segment.first().ok_or_else(cut)?;
    let height = u16_at(segment, 1)?;
    let width = u16_at(segment, 3)?;
    let components = *segment.get(5).ok_or_else(cut)?;
    if !matches!(precision, 8 | 12) {
        return Err(JpegError::Damaged(format!("a DCT frame of {precision}-bit samples (8 or 12)")));
    }
    if components != 1 {
        return Err(JpegError::Unsupported(format!(
            "a JPEG Extended frame of {components} components; only grayscale (one) is decoded"
        )));
    }
    if height == 0 {
        return Err(JpegError::Unsupported("a frame whose height is left to a DNL marker".into()));
    }
    if width == 0 {
        return Err(JpegError::Damaged("a frame 0 samples wide".into()));
    }
    let component = segment.get(6..9).ok_or_else(cut)?;
    Ok(FrameHeader { precision, width, height, component_id: component[0], quantization: usize::from(component[2]) })
}

fn decode_scan(
    stream: &[u8],
    data_start: usize,
    scan_header: &[u8],
    frame: &FrameHeader,
    quantization: &[Option<[u16; 64]>; 4],
    (dc_tables, ac_tables): (&[Option<HuffmanTable>; 4], &[Option<HuffmanTable>; 4]),
    restart_interval: usize,
) -> Result<Frame, JpegError> {
    let cut = || JpegError::CutShort("in the scan header");
    if scan_header.first() != Some(&1) {
        return Err(JpegError::Damaged("a scan of more than one component in a grayscale frame".into()));
    }
    let (id, tables) = (*scan_header.get(1).ok_or_else(cut)?, *scan_header.get(2).ok_or_else(cut)?);
    // Ss, Se, Ah and Al mean nothing to a sequential scan (it always codes all 64
    // coefficients): some encoders write Se = 0 there, as in pydicom's JPEG-lossy.dcm, and IJG
    // only warns. They are not read.
    scan_header.get(3..6).ok_or_else(cut)?;
    if id != frame.component_id {
        return Err(JpegError::Damaged(format!("a scan of component {id}, which the frame does not have")));
    }
    let dc = huffman_table(dc_tables, tables >> 4, "DC")?;
    let ac = huffman_table(ac_tables, tables & 0x0F, "AC")?;
    let q = quantization
        .get(frame.quantization)
        .and_then(Option::as_ref)
        .ok_or_else(|| JpegError::Damaged(format!("quantization table {} is not defined", frame.quantization)))?;

    let (blocks_across, blocks_down) = (frame.width.div_ceil(8), frame.height.div_ceil(8));
    let blocks = blocks_across * blocks_down;
    let mut samples = vec![0u16; frame.width * frame.height];
    let level_shift = f64::from(1u32 << (frame.precision - 1));
    let max_sample = f64::from((1u32 << frame.precision) - 1);
    let basis = idct_basis();
    let mut reader = BitReader::new(stream, data_start);
    let mut predictor = 0i32;
    let mut expected_restart = 0u8;
    for block in 0..blocks {
        if restart_interval > 0 && block > 0 && block % restart_interval == 0 {
            let n = reader.restart()?;
            if n != expected_restart {
                return Err(JpegError::Damaged(format!("restart marker {n} where {expected_restart} was due")));
            }
            expected_restart = (expected_restart + 1) % 8;
            predictor = 0;
        }
        let mut coefficients = [0f64; 64];
        let dc_size = reader.decode(dc)?;
        if dc_size > 16 {
            return Err(JpegError::Damaged(format!("a DC difference of {dc_size} bits")));
        }
        predictor = predictor.wrapping_add(reader.signed(dc_size)?);
        coefficients[0] = f64::from(predictor) * f64::from(q[0]);
        let mut k = 1;
        let mut only_dc = true;
        while k < 64 {
            let symbol = reader.decode(ac)?;
            let (run, size) = (usize::from(symbol >> 4), symbol & 0x0F);
            if size == 0 {
                if run == 15 {
                    k += 16;
                    continue;
                }
                break; // end of block
            }
            k += run;
            if k > 63 {
                return Err(JpegError::Damaged("a block with more than 64 coefficients".into()));
            }
            let natural = ZIGZAG[k];
            coefficients[natural] = f64::from(reader.signed(size)?) * f64::from(q[natural]);
            only_dc &= coefficients[natural] == 0.0;
            k += 1;
        }
        if k > 64 {
            return Err(JpegError::Damaged("a zero run past the end of a block".into()));
        }
        let (bx, by) = (block % blocks_across, block / blocks_across);
        // Air and flat tissue are mostly blocks of one value: their inverse DCT is that value.
        let pixels = if only_dc { [coefficients[0] / 8.0; 64] } else { inverse_dct(&coefficients, &basis) };
        for y in 0..8 {
            let row = by * 8 + y;
            if row >= frame.height {
                break;
            }
            for x in 0..8 {
                let column = bx * 8 + x;
                if column >= frame.width {
                    break;
                }
                let value = (pixels[y * 8 + x] + level_shift + 0.5).floor().clamp(0.0, max_sample);
                samples[row * frame.width + column] = value as u16;
            }
        }
    }
    Ok(Frame { width: frame.width, height: frame.height, precision: frame.precision, samples })
}

fn huffman_table<'t>(tables: &'t [Option<HuffmanTable>; 4], n: u8, kind: &str) -> Result<&'t HuffmanTable, JpegError> {
    tables
        .get(usize::from(n))
        .and_then(Option::as_ref)
        .ok_or_else(|| JpegError::Damaged(format!("the scan uses {kind} Huffman table {n}, which is not defined")))
}

/// `basis[x * 8 + u]` = C(u)/2 · cos((2x + 1)uπ/16), the 1-D inverse DCT's terms (A.3.3).
fn idct_basis() -> [f64; 64] {
    std::array::from_fn(|i| {
        let (x, u) = ((i / 8) as f64, (i % 8) as f64);
        let c = if i % 8 == 0 { std::f64::consts::FRAC_1_SQRT_2 } else { 1.0 };
        c / 2.0 * ((2.0 * x + 1.0) * u * std::f64::consts::PI / 16.0).cos()
    })
}

/// The 2-D inverse DCT of a block (natural order), separably: columns, then rows.
fn inverse_dct(coefficients: &[f64; 64], basis: &[f64; 64]) -> [f64; 64] {
    let mut columns = [0f64; 64];
    for u in 0..8 {
        // Quantisation leaves most high-frequency columns empty: their transform is zero.
        if (0..8).all(|v| coefficients[v * 8 + u] == 0.0) {
            continue;
        }
        for y in 0..8 {
            columns[y * 8 + u] = (0..8).map(|v| basis[y * 8 + v] * coefficients[v * 8 + u]).sum();
        }
    }
    let mut out = [0f64; 64];
    for y in 0..8 {
        for x in 0..8 {
            out[y * 8 + x] = (0..8).map(|u| basis[x * 8 + u] * columns[y * 8 + u]).sum();
        }
    }
    out
}

/// A JPEG Extended data set's pixel description and its frames, not yet decoded.
pub struct EncapsulatedFrames<'a> {
    fragments: &'a [Vec<u8>],
    frames: Vec<Range<usize>>,
    columns: usize,
    rows: usize,
    bits_allocated: usize,
}

impl<'a> EncapsulatedFrames<'a> {
    /// Finds the frames and checks that there are as many as NumberOfFrames says.
    pub fn of(object: &'a InMemDicomObject) -> Result<EncapsulatedFrames<'a>, String> {
        let number = |tag, name: &str| -> Result<usize, String> {
            object
                .element(tag)
                .ok()
                .and_then(|e| e.to_int::<u32>().ok())
                .map(|v| v as usize)
                .ok_or_else(|| format!("no {name}"))
        };
        let (rows, columns, bits_allocated) = (
            number(tags::ROWS, "Rows")?,
            number(tags::COLUMNS, "Columns")?,
            number(tags::BITS_ALLOCATED, "BitsAllocated")?,
        );
        let number_of_frames = number(tags::NUMBER_OF_FRAMES, "NumberOfFrames").unwrap_or(1).max(1);
        let fragments = object
            .element(tags::PIXEL_DATA)
            .ok()
            .and_then(|e| e.value().fragments())
            .ok_or("no encapsulated PixelData")?;
        let frames = crate::ingest::pixel_module::jpeg_frame_fragments(fragments);
        if frames.len() != number_of_frames {
            return Err(format!(
                "NumberOfFrames {number_of_frames} but the pixel data holds {} JPEG frame(s)",
                frames.len()
            ));
        }
        Ok(EncapsulatedFrames { fragments, frames, columns, rows, bits_allocated })
    }

    pub fn len(&self) -> usize {
        self.frames.len()
    }

    pub fn is_empty(&self) -> bool {
        self.frames.is_empty()
    }

    /// Decodes frame `index` (from 0), of the size and at most the bits the header says.
    pub fn decode(&self, index: usize) -> Result<Frame, String> {
        let name = |e: String| if self.frames.len() > 1 { format!("frame {}: {e}", index + 1) } else { e };
        let range = self.frames.get(index).ok_or_else(|| format!("no frame {}", index + 1))?.clone();
        let stream = self.fragments[range].concat();
        let frame = decode(&stream, (self.columns, self.rows)).map_err(|e| name(e.to_string()))?;
        if usize::from(frame.precision) > self.bits_allocated {
            return Err(name(format!(
                "{}-bit JPEG samples in {} allocated bits",
                frame.precision, self.bits_allocated
            )));
        }
        Ok(frame)
    }
}

/// A JPEG Extended object with its pixel data decoded, as Explicit VR Little Endian, so that
/// dicom-pixeldata applies Bits Stored, the pixel representation and the modality LUT to it as
/// to any native image. Objects in other syntaxes are returned as they are. Every frame is held
/// decoded: callers bound the object's size first (the volume loader by `series.max_volume_mb`).
pub fn to_native(object: DefaultDicomObject) -> Result<DefaultDicomObject, String> {
    if object.meta().transfer_syntax().trim_end_matches('\0') != JPEG_EXTENDED {
        return Ok(object);
    }
    let frames = EncapsulatedFrames::of(&object)?;
    let mut samples = Vec::new();
    for index in 0..frames.len() {
        samples.extend_from_slice(&frames.decode(index)?.samples);
    }
    let eight_bit = frames.bits_allocated <= 8;
    let (vr, value) = if eight_bit {
        (VR::OB, PrimitiveValue::U8(samples.iter().map(|s| *s as u8).collect()))
    } else {
        (VR::OW, PrimitiveValue::U16(samples.into()))
    };
    let mut meta = object.meta().clone();
    meta.set_transfer_syntax(&dicom_transfer_syntax_registry::entries::EXPLICIT_VR_LITTLE_ENDIAN);
    let mut dataset = object.into_inner();
    dataset.put(DataElement::new(tags::PIXEL_DATA, vr, Value::Primitive(value)));
    Ok(dataset.with_exact_meta(meta))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_inverse_dct_of_a_lone_dc_coefficient_is_flat() {
        let mut coefficients = [0f64; 64];
        coefficients[0] = 80.0;
        let out = inverse_dct(&coefficients, &idct_basis());
        assert!(out.iter().all(|v| (v - 10.0).abs() < 1e-9), "{out:?}");
    }

    #[test]
    fn streams_other_than_sequential_grayscale_are_refused_with_the_reason() {
        assert_eq!(decode(&[0x00, 0x01], (8, 8)), Err(JpegError::NoStartOfImage));
        let progressive = [0xFF, 0xD8, 0xFF, 0xC2, 0x00, 0x0B, 12, 0, 8, 0, 8, 1, 1, 0x11, 0];
        assert!(matches!(decode(&progressive, (8, 8)), Err(JpegError::Unsupported(e)) if e.contains("progressive")));
        let colour = [0xFF, 0xD8, 0xFF, 0xC1, 0x00, 0x11, 12, 0, 8, 0, 8, 3, 1, 0x11, 0, 2, 0x11, 0, 3, 0x11, 0];
        assert!(matches!(decode(&colour, (8, 8)), Err(JpegError::Unsupported(e)) if e.contains("3 components")));
        let cut = [0xFF, 0xD8, 0xFF, 0xC1, 0x00, 0x0B, 12];
        assert!(matches!(decode(&cut, (8, 8)), Err(JpegError::CutShort(_))));
        // Sizes are the DICOM header's: a stream claiming more is refused before allocation, and
        // so is one that states a second, different frame header after the first.
        let grey = |width: u8| [0xFF, 0xC1, 0x00, 0x0B, 12, 0, 8, 0, width, 1, 1, 0x11, 0];
        let larger = [&[0xFF, 0xD8][..], &grey(16)].concat();
        assert!(matches!(decode(&larger, (8, 8)), Err(JpegError::Damaged(e)) if e.contains("16 x 8")));
        let twice = [&[0xFF, 0xD8][..], &grey(8), &grey(255)].concat();
        assert!(matches!(decode(&twice, (8, 8)), Err(JpegError::Damaged(e)) if e.contains("second frame header")));
    }

    #[test]
    fn huffman_tables_that_cannot_be_codes_are_refused() {
        // Three codes of length one cannot exist.
        let mut counts = [0u8; 16];
        counts[0] = 3;
        assert!(HuffmanTable::new(&counts, vec![1, 2, 3]).is_err());
        counts[0] = 1;
        counts[1] = 2;
        assert!(HuffmanTable::new(&counts, vec![1, 2, 3]).is_ok());
    }
}
