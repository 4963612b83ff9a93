//! NIfTI-1 volumes (`.nii`, `.nii.gz`) as [`Volume`]s, for research data such as the VerSe and
//! TPTBox crops. NIfTI world coordinates are RAS; DICOM's, and ours, are LPS: x and y flip.

use std::io::Read;
use std::path::Path;

use crate::analysis::volume::Volume;

#[derive(Debug, thiserror::Error)]
pub enum NiftiError {
    #[error("{path}: {message}")]
    Read { path: String, message: String },
}

fn f32_at(h: &[u8], offset: usize) -> f32 {
    f32::from_le_bytes(h[offset..offset + 4].try_into().expect("4 bytes"))
}

fn i16_at(h: &[u8], offset: usize) -> i16 {
    i16::from_le_bytes(h[offset..offset + 2].try_into().expect("2 bytes"))
}

/// Reads a little-endian NIfTI-1 file. Orientation from the sform when set, else the qform.
pub fn read(path: &Path) -> Result<Volume, NiftiError> {
    let err = |message: String| NiftiError::Read { path: path.display().to_string(), message };
    let raw = std::fs::read(path).map_err(|e| err(e.to_string()))?;
    let bytes = if raw.starts_with(&[0x1f, 0x8b]) {
        let mut out = Vec::new();
        flate2::read::GzDecoder::new(&raw[..]).read_to_end(&mut out).map_err(|e| err(format!("gzip: {e}")))?;
        out
    } else {
        raw
    };
    if bytes.len() < 352 || i32::from_le_bytes(bytes[0..4].try_into().expect("4 bytes")) != 348 {
        return Err(err("not a little-endian NIfTI-1 file".into()));
    }
    let h = &bytes[..348];
    let dims: Vec<usize> = (0..8).map(|i| i16_at(h, 40 + 2 * i).max(0) as usize).collect();
    if dims[0] < 3 || dims[1..4].contains(&0) {
        return Err(err(format!("not a 3D volume: dims {dims:?}")));
    }
    let (nx, ny, nz) = (dims[1], dims[2], dims[3]);
    let datatype = i16_at(h, 70);
    let pixdim: Vec<f64> = (0..8).map(|i| f64::from(f32_at(h, 76 + 4 * i))).collect();
    let vox_offset = f32_at(h, 108) as usize;
    let (mut slope, inter) = (f64::from(f32_at(h, 112)), f64::from(f32_at(h, 116)));
    if slope == 0.0 || !slope.is_finite() {
        slope = 1.0;
    }
    let (qform_code, sform_code) = (i16_at(h, 252), i16_at(h, 254));
    // Affine voxel -> RAS (3x4).
    let affine: [[f64; 4]; 3] = if sform_code > 0 {
        let row = |o: usize| -> [f64; 4] { std::array::from_fn(|i| f64::from(f32_at(h, o + 4 * i))) };
        [row(280), row(296), row(312)]
    } else if qform_code > 0 {
        let (b, c, d) = (f64::from(f32_at(h, 256)), f64::from(f32_at(h, 260)), f64::from(f32_at(h, 264)));
        let a = (1.0 - (b * b + c * c + d * d)).max(0.0).sqrt();
        let r = [
            [a * a + b * b - c * c - d * d, 2.0 * (b * c - a * d), 2.0 * (b * d + a * c)],
            [2.0 * (b * c + a * d), a * a + c * c - b * b - d * d, 2.0 * (c * d - a * b)],
            [2.0 * (b * d - a * c), 2.0 * (c * d + a * b), a * a + d * d - c * c - b * b],
        ];
        let qfac = if pixdim[0] < 0.0 { -1.0 } else { 1.0 };
        let scale = [pixdim[1], pixdim[2], pixdim[3] * qfac];
        let offset = [f64::from(f32_at(h, 268)), f64::from(f32_at(h, 272)), f64::from(f32_at(h, 276))];
        std::array::from_fn(|i| [r[i][0] * scale[0], r[i][1] * scale[1], r[i][2] * scale[2], offset[i]])
    } else {
        [[pixdim[1], 0.0, 0.0, 0.0], [0.0, pixdim[2], 0.0, 0.0], [0.0, 0.0, pixdim[3], 0.0]]
    };
    // RAS -> LPS: negate the x and y rows.
    let lps: [[f64; 4]; 3] = [affine[0].map(|v| -v), affine[1].map(|v| -v), affine[2]];
    let mut axes = [[0.0; 3]; 3];
    let mut spacing = [0.0; 3];
    for a in 0..3 {
        let column = [lps[0][a], lps[1][a], lps[2][a]];
        let norm = (column[0] * column[0] + column[1] * column[1] + column[2] * column[2]).sqrt();
        if norm <= 0.0 {
            return Err(err(format!("axis {a} has zero length")));
        }
        spacing[a] = norm;
        axes[a] = column.map(|v| v / norm);
    }
    let n = nx * ny * nz;
    let data = bytes.get(vox_offset..).ok_or_else(|| err("vox_offset beyond the file".into()))?;
    let size = match datatype {
        2 | 256 => 1,
        4 | 512 => 2,
        8 | 16 => 4,
        64 => 8,
        other => return Err(err(format!("datatype {other} not supported"))),
    };
    if data.len() < n * size {
        return Err(err(format!("{} bytes of voxels for {n} voxels of {size} bytes", data.len())));
    }
    let value = |i: usize| -> f64 {
        let b = &data[i * size..(i + 1) * size];
        match datatype {
            2 => f64::from(b[0]),
            256 => f64::from(b[0] as i8),
            4 => f64::from(i16::from_le_bytes([b[0], b[1]])),
            512 => f64::from(u16::from_le_bytes([b[0], b[1]])),
            8 => f64::from(i32::from_le_bytes(b.try_into().expect("4 bytes"))),
            16 => f64::from(f32::from_le_bytes(b.try_into().expect("4 bytes"))),
            _ => f64::from_le_bytes(b.try_into().expect("8 bytes")),
        }
    };
    let hu = (0..n).map(|i| (value(i) * slope + inter) as f32).collect();
    Ok(Volume {
        study_uid: String::new(),
        series_uid: String::new(),
        hu,
        dims: [nx, ny, nz],
        spacing,
        origin: [lps[0][3], lps[1][3], lps[2][3]],
        axes,
        slice_shear: [0.0; 3],
    })
}
