//! A completed CT series as one volume of Hounsfield units on a grid with its patient (LPS)
//! geometry, the input of the spine stage.
//!
//! Slices are ordered along the image normal by the same rules the series tracker applies
//! ([`crate::series::stack_geometry`]), so a series the tracker called complete loads, and one it
//! would skip fails here with the same reason rather than yielding a silently wrong volume.

use std::path::{Path, PathBuf};

use dicom_dictionary_std::tags;
use dicom_object::{DefaultDicomObject, OpenFileOptions};
use dicom_pixeldata::PixelDecoder;
use rayon::prelude::*;

use crate::config::SeriesConfig;
use crate::series::stack_geometry;
use crate::spool::InstanceHeader;

#[derive(Debug, thiserror::Error)]
pub enum VolumeError {
    #[error("{path}: {message}")]
    Instance { path: PathBuf, message: String },
    #[error("not a usable stack: {0}")]
    Geometry(String),
    #[error("slices disagree: {0}")]
    Inconsistent(String),
    #[error("{0}")]
    Unsupported(String),
}

/// Voxels in Hounsfield units. Index `(k * rows + j) * columns + i`: column `i`, row `j`, slice `k`.
#[derive(Debug, Clone)]
pub struct Volume {
    pub study_uid: String,
    pub series_uid: String,
    pub hu: Vec<f32>,
    /// Columns, rows, slices.
    pub dims: [usize; 3],
    /// mm between columns, rows and slices.
    pub spacing: [f64; 3],
    /// LPS position (mm) of the centre of voxel (0, 0, 0).
    pub origin: [f64; 3],
    /// Unit LPS directions of increasing column, row and slice index.
    pub axes: [[f64; 3]; 3],
}

impl Volume {
    /// LPS position (mm) of a (possibly fractional) voxel index `[i, j, k]`.
    pub fn voxel_to_lps(&self, v: [f64; 3]) -> [f64; 3] {
        let mut p = self.origin;
        for (axis, (&index, &step)) in self.axes.iter().zip(v.iter().zip(self.spacing.iter())) {
            for d in 0..3 {
                p[d] += axis[d] * index * step;
            }
        }
        p
    }

    /// Fractional voxel index of an LPS position; the axes are orthonormal, so this is a projection.
    pub fn lps_to_voxel(&self, p: [f64; 3]) -> [f64; 3] {
        let rel = [p[0] - self.origin[0], p[1] - self.origin[1], p[2] - self.origin[2]];
        let mut v = [0.0; 3];
        for a in 0..3 {
            v[a] = (rel[0] * self.axes[a][0] + rel[1] * self.axes[a][1] + rel[2] * self.axes[a][2]) / self.spacing[a];
        }
        v
    }

    pub fn at(&self, i: usize, j: usize, k: usize) -> f32 {
        self.hu[(k * self.dims[1] + j) * self.dims[0] + i]
    }

    /// Trilinear HU at an LPS position; `None` outside the volume.
    pub fn sample(&self, p: [f64; 3]) -> Option<f32> {
        let v = self.lps_to_voxel(p);
        let mut base = [0usize; 3];
        let mut frac = [0f32; 3];
        for a in 0..3 {
            let max = (self.dims[a] - 1) as f64;
            if !(0.0..=max).contains(&v[a]) {
                return None;
            }
            let f = v[a].floor().min((self.dims[a].max(2) - 2) as f64).max(0.0);
            base[a] = f as usize;
            frac[a] = (v[a] - f) as f32;
        }
        let mut value = 0.0;
        for corner in 0..8 {
            let (di, dj, dk) = (corner & 1, (corner >> 1) & 1, (corner >> 2) & 1);
            let w = (if di == 1 { frac[0] } else { 1.0 - frac[0] })
                * (if dj == 1 { frac[1] } else { 1.0 - frac[1] })
                * (if dk == 1 { frac[2] } else { 1.0 - frac[2] });
            if w == 0.0 {
                continue;
            }
            let (i, j, k) = (
                (base[0] + di).min(self.dims[0] - 1),
                (base[1] + dj).min(self.dims[1] - 1),
                (base[2] + dk).min(self.dims[2] - 1),
            );
            value += w * self.at(i, j, k);
        }
        Some(value)
    }

    /// Value of the nearest voxel at an LPS position (for label masks); `None` outside.
    pub fn sample_nearest(&self, p: [f64; 3]) -> Option<f32> {
        let v = self.lps_to_voxel(p);
        let mut index = [0usize; 3];
        for a in 0..3 {
            let r = v[a].round();
            if r < 0.0 || r > (self.dims[a] - 1) as f64 {
                return None;
            }
            index[a] = r as usize;
        }
        Some(self.at(index[0], index[1], index[2]))
    }

    /// The same content on an axis-aligned LPS grid (axial slices, superior last) of isotropic
    /// `spacing` mm, covering the volume's extent: what the spine stage expects, whatever the
    /// stored orientation. Outside the source, voxels take `fill`; labels want `nearest`.
    pub fn resample_axial(&self, spacing: f64, nearest: bool, fill: f32) -> Volume {
        let mut low = [f64::MAX; 3];
        let mut high = [f64::MIN; 3];
        for corner in 0..8 {
            let v = [0, 1, 2].map(|a| if corner >> a & 1 == 1 { (self.dims[a] - 1) as f64 } else { 0.0 });
            let p = self.voxel_to_lps(v);
            for d in 0..3 {
                low[d] = low[d].min(p[d]);
                high[d] = high[d].max(p[d]);
            }
        }
        let dims = [0, 1, 2].map(|d| ((high[d] - low[d]) / spacing).floor() as usize + 1);
        let mut hu = Vec::with_capacity(dims[0] * dims[1] * dims[2]);
        for k in 0..dims[2] {
            for j in 0..dims[1] {
                for i in 0..dims[0] {
                    let p = [low[0] + i as f64 * spacing, low[1] + j as f64 * spacing, low[2] + k as f64 * spacing];
                    let value = if nearest { self.sample_nearest(p) } else { self.sample(p) };
                    hu.push(value.unwrap_or(fill));
                }
            }
        }
        Volume {
            study_uid: self.study_uid.clone(),
            series_uid: self.series_uid.clone(),
            hu,
            dims,
            spacing: [spacing; 3],
            origin: low,
            axes: [[1.0, 0.0, 0.0], [0.0, 1.0, 0.0], [0.0, 0.0, 1.0]],
        }
    }

    /// Bytes held by the voxels.
    pub fn byte_size(&self) -> usize {
        self.hu.len() * std::mem::size_of::<f32>()
    }
}

/// The per-slice facts the volume needs beyond the tracker's header.
struct Slice {
    header: InstanceHeader,
    rows: usize,
    columns: usize,
    pixel_spacing: [f64; 2],
}

/// Reads a slice's header only: the pixels are decoded later, straight into the volume.
fn read_slice(path: &Path) -> Result<Slice, VolumeError> {
    let err = |message: String| VolumeError::Instance { path: path.to_path_buf(), message };
    let object = OpenFileOptions::new().read_until(tags::PIXEL_DATA).open_file(path).map_err(|e| err(e.to_string()))?;
    let header = InstanceHeader::from_object(&object).map_err(|e| err(e.to_string()))?;
    if header.number_of_frames > 1 {
        return Err(VolumeError::Unsupported(format!(
            "{}: multi-frame (Enhanced CT) volumes are not assembled yet",
            path.display()
        )));
    }
    let int = |tag| object.element(tag).ok().and_then(|e| e.to_int::<u32>().ok()).map(|v| v as usize);
    let rows = int(tags::ROWS).ok_or_else(|| err("no Rows".into()))?;
    let columns = int(tags::COLUMNS).ok_or_else(|| err("no Columns".into()))?;
    let spacing = object
        .element(tags::PIXEL_SPACING)
        .ok()
        .and_then(|e| e.to_multi_float64().ok())
        .filter(|v| v.len() == 2 && v.iter().all(|x| x.is_finite() && *x > 0.0))
        .ok_or_else(|| err("no valid PixelSpacing".into()))?;
    Ok(Slice { header, rows, columns, pixel_spacing: [spacing[0], spacing[1]] })
}

/// Decodes one slice's pixels as Hounsfield units into `out` (one plane).
fn decode_into(path: &Path, out: &mut [f32]) -> Result<(), VolumeError> {
    let err = |message: String| VolumeError::Instance { path: path.to_path_buf(), message };
    let object: DefaultDicomObject = dicom_object::open_file(path).map_err(|e| err(e.to_string()))?;
    let decoded = object.decode_pixel_data().map_err(|e| err(format!("pixel data: {e}")))?;
    let values: Vec<f32> = decoded.to_vec().map_err(|e| err(format!("pixel values: {e}")))?;
    if values.len() != out.len() {
        return Err(err(format!("{} values where {} were expected", values.len(), out.len())));
    }
    out.copy_from_slice(&values);
    Ok(())
}

/// Loads single-frame CT files of one series into a volume: sorted along the normal, pixels
/// decoded (every transfer syntax the SCP accepts) and rescaled to Hounsfield units.
pub fn load_series(paths: &[PathBuf], config: &SeriesConfig) -> Result<Volume, VolumeError> {
    let slices: Vec<Slice> = paths.par_iter().map(|p| read_slice(p)).collect::<Result<_, _>>()?;
    let first = slices.first().ok_or_else(|| VolumeError::Geometry("no slices".into()))?;
    for (s, path) in slices.iter().zip(paths) {
        if s.header.series_instance_uid != first.header.series_instance_uid {
            return Err(VolumeError::Inconsistent(format!("{} belongs to another series", path.display())));
        }
        if (s.rows, s.columns) != (first.rows, first.columns) {
            return Err(VolumeError::Inconsistent(format!(
                "{} is {}x{}, the first slice {}x{}",
                path.display(),
                s.columns,
                s.rows,
                first.columns,
                first.rows
            )));
        }
        if (0..2).any(|a| (s.pixel_spacing[a] - first.pixel_spacing[a]).abs() > 1e-3) {
            return Err(VolumeError::Inconsistent(format!("{} has another pixel spacing", path.display())));
        }
    }
    let headers: Vec<&InstanceHeader> = slices.iter().map(|s| &s.header).collect();
    let geometry = stack_geometry(&headers, config).map_err(VolumeError::Geometry)?;
    let (rows, columns) = (first.rows, first.columns);
    let plane = rows * columns;
    // Decoded in parallel, each slice straight into its place: memory stays at the volume plus
    // one file per thread.
    let mut hu = vec![0f32; plane * slices.len()];
    hu.par_chunks_mut(plane)
        .zip(geometry.order.par_iter())
        .try_for_each(|(out, &index)| decode_into(&paths[index], out))?;
    Ok(Volume {
        study_uid: first.header.study_instance_uid.clone(),
        series_uid: first.header.series_instance_uid.clone(),
        hu,
        dims: [columns, rows, slices.len()],
        // PixelSpacing is (between rows, between columns).
        spacing: [first.pixel_spacing[1], first.pixel_spacing[0], geometry.spacing],
        origin: geometry.first_position,
        axes: [geometry.row_direction, geometry.column_direction, geometry.normal],
    })
}
