//! A completed CT series as one volume of Hounsfield units on a grid with its patient (LPS)
//! geometry, the input of the spine stage.
//!
//! Slices are ordered along the image normal by the same rules the series tracker applies
//! ([`crate::ingest::series::stack_geometry`]), so a series the tracker called complete loads, and one it
//! would skip fails here with the same reason rather than yielding a silently wrong volume.

use std::path::{Path, PathBuf};

use dicom_dictionary_std::tags;
use dicom_object::{DefaultDicomObject, OpenFileOptions};
use dicom_pixeldata::PixelDecoder;
use rayon::prelude::*;

use crate::config::SeriesConfig;
use crate::geometry::{dot, scale, sub};
use crate::ingest::pixel_module::PixelModule;
use crate::ingest::series::stack_geometry;
use crate::ingest::spool::InstanceHeader;

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
    #[error("{what} of {voxels} voxels needs {needed_mb} MB, more than the {limit_mb} MB allowed ({limit})")]
    TooLarge { what: &'static str, voxels: u64, needed_mb: u64, limit_mb: u64, limit: &'static str },
}

/// Allocates a zeroed voxel buffer, refusing sizes over `limit_mb` (and any the allocator cannot
/// give) with an error: a failed allocation would abort the whole agent.
fn voxel_buffer(
    what: &'static str,
    voxels: u64,
    (limit_mb, limit): (u64, &'static str),
) -> Result<Vec<f32>, VolumeError> {
    let needed_mb = voxels.saturating_mul(std::mem::size_of::<f32>() as u64).div_ceil(1 << 20);
    let too_large = || VolumeError::TooLarge { what, voxels, needed_mb, limit_mb, limit };
    if needed_mb > limit_mb {
        return Err(too_large());
    }
    let len = usize::try_from(voxels).map_err(|_| too_large())?;
    let mut buffer = Vec::new();
    buffer.try_reserve_exact(len).map_err(|_| too_large())?;
    buffer.resize(len, 0.0);
    Ok(buffer)
}

/// How far outside the volume, in voxels, a sample still counts as on its surface: a point on
/// the surface comes back from the geometry a rounding error out.
const ON_THE_EDGE: f64 = 1e-6;

/// Largest resampled grid, in MB of voxels: resampling a few sparse slices onto a fine grid
/// could otherwise ask for any amount of memory.
const MAX_RESAMPLED_MB: u64 = 4096;

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
    /// Unit LPS directions of increasing column, row and slice index (orthonormal).
    pub axes: [[f64; 3]; 3],
    /// LPS displacement (mm), within the slice plane, of each slice's origin per mm it lies along
    /// the slice axis: zero for an orthogonal stack, `tan(tilt)` long for a gantry-tilted one,
    /// whose table moved along the patient axis while its image planes were tilted. Kept in the
    /// geometry rather than resampled away: every consumer samples through
    /// [`Volume::voxel_to_lps`] and [`Volume::lps_to_voxel`], so the pixels are interpolated once.
    pub slice_shear: [f64; 3],
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
        let along = v[2] * self.spacing[2];
        std::array::from_fn(|d| p[d] + self.slice_shear[d] * along)
    }

    /// Fractional voxel index of an LPS position. The axes are orthonormal and the shear lies in
    /// the slice plane, so the slice index is a projection on the normal, and the in-plane
    /// indices a projection once that slice's shift is taken off.
    pub fn lps_to_voxel(&self, p: [f64; 3]) -> [f64; 3] {
        let project = |rel: [f64; 3], a: usize| dot(rel, self.axes[a]) / self.spacing[a];
        let rel = sub(p, self.origin);
        let k = project(rel, 2);
        let in_plane = sub(rel, scale(self.slice_shear, k * self.spacing[2]));
        [project(in_plane, 0), project(in_plane, 1), k]
    }

    /// Whether the voxels lie on an axis-aligned grid (axial slices, no shear).
    pub fn is_axis_aligned_axial(&self) -> bool {
        self.axes[0][0].abs() > 0.999 && self.axes[1][1].abs() > 0.999 && self.slice_shear == [0.0; 3]
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
            if !(-ON_THE_EDGE..=max + ON_THE_EDGE).contains(&v[a]) {
                return None;
            }
            let v = v[a].clamp(0.0, max);
            let f = v.floor().min((self.dims[a].max(2) - 2) as f64).max(0.0);
            base[a] = f as usize;
            frac[a] = (v - f) as f32;
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

    /// [`Volume::sample`] along a line of voxel indices `start + i * step`, one value per element
    /// of `row`: the part of the line inside the volume is found once, so the inner loop has no
    /// bounds to test. Resampling a tilted series spends nearly all its time here.
    fn trilinear_row(&self, start: [f64; 3], step: [f64; 3], row: &mut [f32], fill: f32) {
        let max = self.dims.map(|n| (n - 1) as f64);
        let at = |i: usize| -> [f64; 3] { std::array::from_fn(|a| start[a] + i as f64 * step[a]) };
        let inside = |i: usize| {
            let v = at(i);
            (0..3).all(|a| (-ON_THE_EDGE..=max[a] + ON_THE_EDGE).contains(&v[a]))
        };
        // The interval of i where each axis is in range, solved per axis, then settled against
        // `inside` itself below so that rounding cannot make it disagree with `sample`.
        let (mut low, mut high) = (0.0f64, (row.len() as f64) - 1.0);
        for a in 0..3 {
            let (from, to) = (-ON_THE_EDGE - start[a], max[a] + ON_THE_EDGE - start[a]);
            if step[a] == 0.0 {
                if from > 0.0 || to < 0.0 {
                    row.fill(fill);
                    return;
                }
            } else {
                let (x, y) = (from / step[a], to / step[a]);
                low = low.max(x.min(y));
                high = high.min(x.max(y));
            }
        }
        // `inside` holds on one interval of i; the solved bounds are off by a rounding at most.
        let n = row.len();
        if low > high + 1.0 {
            row.fill(fill);
            return;
        }
        let mut first_inside = (low.ceil().max(0.0) as usize).min(n);
        while first_inside > 0 && inside(first_inside - 1) {
            first_inside -= 1;
        }
        while first_inside < n && !inside(first_inside) {
            first_inside += 1;
        }
        let mut end_inside = ((high.floor() + 1.0).max(0.0) as usize).clamp(first_inside, n);
        while end_inside > first_inside && !inside(end_inside - 1) {
            end_inside -= 1;
        }
        while end_inside < n && inside(end_inside) {
            end_inside += 1;
        }
        row[..first_inside].fill(fill);
        row[end_inside..].fill(fill);
        let [nx, ny, nz] = self.dims;
        let top = self.dims.map(|n| n.max(2) - 2);
        let (row_stride, slice_stride) = (nx, nx * ny);
        // Neighbour offsets; zero along an axis of one voxel, where `sample` reads the same voxel.
        let next = [usize::from(nx > 1), row_stride * usize::from(ny > 1), slice_stride * usize::from(nz > 1)];
        for (i, voxel) in row.iter_mut().enumerate().take(end_inside).skip(first_inside) {
            let v = at(i);
            let mut base = [0usize; 3];
            let mut frac = [0f32; 3];
            for a in 0..3 {
                let v = v[a].clamp(0.0, max[a]);
                // Non-negative, so truncation is the floor.
                let f = (v as usize).min(top[a]);
                base[a] = f;
                frac[a] = (v - f as f64) as f32;
            }
            let origin = base[2] * slice_stride + base[1] * row_stride + base[0];
            let weight = |a: usize, corner: usize| if corner >> a & 1 == 1 { frac[a] } else { 1.0 - frac[a] };
            let mut value = 0.0;
            for corner in 0..8 {
                let w = weight(0, corner) * weight(1, corner) * weight(2, corner);
                let offset = (corner & 1) * next[0] + (corner >> 1 & 1) * next[1] + (corner >> 2 & 1) * next[2];
                value += w * self.hu[origin + offset];
            }
            *voxel = value;
        }
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
    pub fn resample_axial(&self, spacing: f64, nearest: bool, fill: f32) -> Result<Volume, VolumeError> {
        self.resample_axial_grid([spacing; 3], nearest, fill)
    }

    /// The spacing along each LPS axis that keeps this volume's own sampling: that of the volume
    /// axis closest to it (a tilted axial stack keeps its pixel and slice spacing, a sagittal one
    /// swaps them), no finer than `finest` mm. Resampling there adds few voxels beyond the ones
    /// a tilt's wider bounding box needs.
    pub fn native_axial_spacing(&self, finest: f64) -> [f64; 3] {
        std::array::from_fn(|d| {
            let closest = (0..3).max_by(|&a, &b| self.axes[a][d].abs().total_cmp(&self.axes[b][d].abs())).unwrap_or(d);
            self.spacing[closest].max(finest)
        })
    }

    /// [`Volume::resample_axial`] with a spacing of its own along each LPS axis (x, y, z).
    pub fn resample_axial_grid(&self, spacing: [f64; 3], nearest: bool, fill: f32) -> Result<Volume, VolumeError> {
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
        // Saturating float-to-integer casts: an absurd extent gives an absurd count, refused below.
        let dims = [0, 1, 2].map(|d| ((high[d] - low[d]) / spacing[d]).floor() as u64 + 1);
        let voxels = dims.iter().fold(1u64, |n, d| n.saturating_mul(*d));
        let mut hu = voxel_buffer("a resampled grid", voxels, (MAX_RESAMPLED_MB, "the resampling limit"))?;
        let dims = dims.map(|d| d as usize);
        // The source index is affine in the output index: one step per column, and a row's start.
        let source_of = |p: [f64; 3]| self.lps_to_voxel(p);
        let first = source_of(low);
        let step_of =
            |d: usize| sub(source_of(std::array::from_fn(|e| low[e] + if e == d { spacing[d] } else { 0.0 })), first);
        let (column_step, row_step, plane_step) = (step_of(0), step_of(1), step_of(2));
        // Slice by slice on every core: a tilted or sagittal series of a few hundred MB is some
        // hundred million samples.
        hu.par_chunks_mut(dims[0] * dims[1]).enumerate().for_each(|(k, plane)| {
            for (j, row) in plane.chunks_mut(dims[0]).enumerate() {
                if nearest {
                    for (i, voxel) in row.iter_mut().enumerate() {
                        let p = [
                            low[0] + i as f64 * spacing[0],
                            low[1] + j as f64 * spacing[1],
                            low[2] + k as f64 * spacing[2],
                        ];
                        *voxel = self.sample_nearest(p).unwrap_or(fill);
                    }
                } else {
                    let start = std::array::from_fn(|a| first[a] + j as f64 * row_step[a] + k as f64 * plane_step[a]);
                    self.trilinear_row(start, column_step, row, fill);
                }
            }
        });
        Ok(Volume {
            study_uid: self.study_uid.clone(),
            series_uid: self.series_uid.clone(),
            hu,
            dims,
            spacing,
            origin: low,
            axes: [[1.0, 0.0, 0.0], [0.0, 1.0, 0.0], [0.0, 0.0, 1.0]],
            slice_shear: [0.0; 3],
        })
    }

    /// Bytes held by the voxels.
    pub fn byte_size(&self) -> usize {
        self.hu.len() * std::mem::size_of::<f32>()
    }
}

/// One plane of the volume: a single-frame instance, or one frame of a multi-frame (Enhanced CT)
/// instance with the geometry of its functional groups.
struct Plane {
    /// Index of the file it comes from.
    file: usize,
    /// Frame index within that file (0 for single-frame instances).
    frame: u32,
    /// The instance's header with this frame's position and orientation filled in.
    header: InstanceHeader,
    rows: usize,
    columns: usize,
    pixel_spacing: [f64; 2],
}

/// Reads an instance's header only, as one plane per frame: the pixels are decoded later,
/// straight into the volume.
fn read_planes(file: usize, path: &Path) -> Result<Vec<Plane>, VolumeError> {
    let err = |message: String| VolumeError::Instance { path: path.to_path_buf(), message };
    let object = OpenFileOptions::new().read_until(tags::PIXEL_DATA).open_file(path).map_err(|e| err(e.to_string()))?;
    let header = InstanceHeader::from_object(&object).map_err(|e| err(e.to_string()))?;
    let pixels = PixelModule::from_object(&object).map_err(err)?;
    if pixels.samples_per_pixel != 1 {
        return Err(err(format!("{} samples per pixel; CT has one", pixels.samples_per_pixel)));
    }
    let (rows, columns) = (pixels.rows as usize, pixels.columns as usize);
    let valid_spacing =
        |v: Vec<f64>| (v.len() == 2 && v.iter().all(|x| x.is_finite() && *x > 0.0)).then(|| [v[0], v[1]]);
    if header.number_of_frames <= 1 {
        let pixel_spacing = object
            .element(tags::PIXEL_SPACING)
            .ok()
            .and_then(|e| e.to_multi_float64().ok())
            .and_then(valid_spacing)
            .ok_or_else(|| err("no valid PixelSpacing".into()))?;
        return Ok(vec![Plane { file, frame: 0, header, rows, columns, pixel_spacing }]);
    }
    // Enhanced CT: each frame's attributes are in its per-frame functional group item, or in the
    // shared item when they hold for every frame (PS3.3 C.7.6.16).
    let items =
        |obj: &dicom_object::InMemDicomObject, tag| obj.element(tag).ok().and_then(|e| e.items()).map(<[_]>::to_vec);
    let top_items = |tag| object.element(tag).ok().and_then(|e| e.items()).map(<[_]>::to_vec);
    let shared = top_items(tags::SHARED_FUNCTIONAL_GROUPS_SEQUENCE).and_then(|v| v.into_iter().next());
    let per_frame = top_items(tags::PER_FRAME_FUNCTIONAL_GROUPS_SEQUENCE).unwrap_or_default();
    if per_frame.len() != header.number_of_frames as usize {
        return Err(err(format!(
            "{} per-frame functional group items for {} frames",
            per_frame.len(),
            header.number_of_frames
        )));
    }
    let lookup = |frame: &dicom_object::InMemDicomObject, macro_tag, tag| -> Option<Vec<f64>> {
        [Some(frame), shared.as_ref()]
            .into_iter()
            .flatten()
            .find_map(|group| items(group, macro_tag)?.first()?.element(tag).ok()?.to_multi_float64().ok())
    };
    let mut planes = Vec::with_capacity(per_frame.len());
    for (index, item) in per_frame.iter().enumerate() {
        let missing = |what: &str| err(format!("frame {}: no {what} in its functional groups", index + 1));
        let position = lookup(item, tags::PLANE_POSITION_SEQUENCE, tags::IMAGE_POSITION_PATIENT)
            .and_then(|v| <[f64; 3]>::try_from(v.as_slice()).ok())
            .ok_or_else(|| missing("ImagePositionPatient"))?;
        let orientation = lookup(item, tags::PLANE_ORIENTATION_SEQUENCE, tags::IMAGE_ORIENTATION_PATIENT)
            .and_then(|v| <[f64; 6]>::try_from(v.as_slice()).ok())
            .ok_or_else(|| missing("ImageOrientationPatient"))?;
        let pixel_spacing = lookup(item, tags::PIXEL_MEASURES_SEQUENCE, tags::PIXEL_SPACING)
            .and_then(valid_spacing)
            .ok_or_else(|| missing("valid PixelSpacing"))?;
        let mut frame_header = header.clone();
        frame_header.image_position = Some(position);
        frame_header.image_orientation = Some(orientation);
        planes.push(Plane { file, frame: index as u32, header: frame_header, rows, columns, pixel_spacing });
    }
    Ok(planes)
}

/// Opens an instance whole for decoding, once its compressed frames' own headers agree with its
/// pixel description; JPEG Extended comes back decoded ([`crate::ingest::jpeg_extended`]). The SCP
/// checks this before it acknowledges an instance, but files also come from folders (`idaics
/// analyze`), from instances too large to check whole while the sender waits, and from spools of
/// earlier versions; a decoder trusts the stream's header and sizes its buffers by it.
fn open_for_decoding(path: &Path) -> Result<DefaultDicomObject, VolumeError> {
    let err = |message: String| VolumeError::Instance { path: path.to_path_buf(), message };
    let object: DefaultDicomObject = dicom_object::open_file(path).map_err(|e| err(e.to_string()))?;
    let pixels = PixelModule::from_object(&object).map_err(err)?;
    pixels.check_codestream(&object, object.meta().transfer_syntax().trim_end_matches('\0')).map_err(err)?;
    crate::ingest::jpeg_extended::to_native(object).map_err(err)
}

/// Decodes a single-frame instance's pixels as Hounsfield units into `out` (one plane).
fn decode_into(path: &Path, out: &mut [f32]) -> Result<(), VolumeError> {
    let err = |message: String| VolumeError::Instance { path: path.to_path_buf(), message };
    let object = open_for_decoding(path)?;
    let decoded = object.decode_pixel_data().map_err(|e| err(format!("pixel data: {e}")))?;
    let values: Vec<f32> = decoded.to_vec().map_err(|e| err(format!("pixel values: {e}")))?;
    if values.len() != out.len() {
        return Err(err(format!("{} values where {} were expected", values.len(), out.len())));
    }
    out.copy_from_slice(&values);
    Ok(())
}

/// Loads the CT files of one series (single-frame slices, or Enhanced CT multi-frame objects)
/// into one volume: planes sorted along the normal, pixels decoded (every transfer syntax the SCP
/// accepts) and rescaled to Hounsfield units, per frame where the frames say so. A series with
/// gaps or stray images is refused here; [`load_blocks`] takes it apart instead.
pub fn load_series(paths: &[PathBuf], config: &SeriesConfig) -> Result<Volume, VolumeError> {
    let planes = read_all_planes(paths)?;
    check_consistent(paths, &planes.iter().collect::<Vec<_>>())?;
    let headers: Vec<&InstanceHeader> = planes.iter().map(|p| &p.header).collect();
    let geometry = stack_geometry(&headers, config).map_err(VolumeError::Geometry)?;
    load_stack(paths, &planes, &geometry, config)
}

/// The series as the contiguous blocks it holds, each a volume in its own geometry, in order
/// along the normal; images of another orientation (a localizer) and blocks too short to hold
/// a disc are set aside. What was split or set aside is logged and returned.
pub fn load_blocks(paths: &[PathBuf], config: &SeriesConfig) -> Result<(Vec<Volume>, Vec<String>), VolumeError> {
    let planes = read_all_planes(paths)?;
    let headers: Vec<&InstanceHeader> = planes.iter().map(|p| &p.header).collect();
    let stacks = crate::ingest::series::stack_blocks(&headers, config).map_err(VolumeError::Geometry)?;
    let series_uid = planes.first().map(|p| p.header.series_instance_uid.clone()).unwrap_or_default();
    for note in &stacks.notes {
        tracing::warn!(series_uid = %series_uid, "{note}");
    }
    let kept: Vec<&Plane> = stacks.blocks.iter().flat_map(|b| b.order.iter().map(|&i| &planes[i])).collect();
    check_consistent(paths, &kept)?;
    let volumes = stacks
        .blocks
        .iter()
        .map(|geometry| load_stack(paths, &planes, geometry, config))
        .collect::<Result<Vec<_>, _>>()?;
    Ok((volumes, stacks.notes))
}

fn read_all_planes(paths: &[PathBuf]) -> Result<Vec<Plane>, VolumeError> {
    let planes: Vec<Plane> = paths
        .par_iter()
        .enumerate()
        .map(|(file, p)| read_planes(file, p))
        .collect::<Result<Vec<_>, _>>()?
        .into_iter()
        .flatten()
        .collect();
    if planes.is_empty() {
        return Err(VolumeError::Geometry("no slices".into()));
    }
    Ok(planes)
}

/// The planes of one volume must share series, size and pixel spacing.
fn check_consistent(paths: &[PathBuf], planes: &[&Plane]) -> Result<(), VolumeError> {
    let first = planes.first().ok_or_else(|| VolumeError::Geometry("no slices".into()))?;
    for plane in planes {
        let path = paths[plane.file].display();
        if plane.header.series_instance_uid != first.header.series_instance_uid {
            return Err(VolumeError::Inconsistent(format!("{path} belongs to another series")));
        }
        if (plane.rows, plane.columns) != (first.rows, first.columns) {
            return Err(VolumeError::Inconsistent(format!(
                "{path} is {}x{}, the first slice {}x{}",
                plane.columns, plane.rows, first.columns, first.rows
            )));
        }
        if (0..2).any(|a| (plane.pixel_spacing[a] - first.pixel_spacing[a]).abs() > 1e-3) {
            return Err(VolumeError::Inconsistent(format!("{path} has another pixel spacing")));
        }
    }
    Ok(())
}

/// Decodes the planes of one regular stack into a volume.
fn load_stack(
    paths: &[PathBuf],
    planes: &[Plane],
    geometry: &crate::ingest::series::StackGeometry,
    config: &SeriesConfig,
) -> Result<Volume, VolumeError> {
    let first = &planes[geometry.order[0]];
    let (rows, columns) = (first.rows, first.columns);
    let plane_len = rows * columns;
    // Decoded in parallel, each plane straight into its place: memory stays at the volume plus
    // one file per thread. A multi-frame object is decoded once and its frames copied out.
    let mut hu = voxel_buffer(
        "a series",
        (plane_len as u64) * geometry.order.len() as u64,
        (config.max_volume_mb, "series.max_volume_mb"),
    )?;
    let multi_frame_files: Vec<usize> = {
        let mut files: Vec<usize> = geometry
            .order
            .iter()
            .map(|&i| &planes[i])
            .filter(|p| p.header.number_of_frames > 1)
            .map(|p| p.file)
            .collect();
        files.sort_unstable();
        files.dedup();
        files
    };
    hu.par_chunks_mut(plane_len).zip(geometry.order.par_iter()).try_for_each(|(out, &index)| {
        let plane = &planes[index];
        if plane.header.number_of_frames > 1 { Ok(()) } else { decode_into(&paths[plane.file], out) }
    })?;
    for file in multi_frame_files {
        let path = &paths[file];
        let err = |message: String| VolumeError::Instance { path: path.clone(), message };
        let object = open_for_decoding(path)?;
        let decoded = object.decode_pixel_data().map_err(|e| err(format!("pixel data: {e}")))?;
        hu.par_chunks_mut(plane_len)
            .zip(geometry.order.par_iter())
            .filter(|(_, index)| planes[**index].file == file)
            .try_for_each(|(out, &index)| {
            let frame = planes[index].frame;
            let values: Vec<f32> = decoded.to_vec_frame(frame).map_err(|e| err(format!("frame {}: {e}", frame + 1)))?;
            if values.len() != out.len() {
                return Err(err(format!(
                    "frame {}: {} values where {} were expected",
                    frame + 1,
                    values.len(),
                    out.len()
                )));
            }
            out.copy_from_slice(&values);
            Ok(())
        })?;
    }
    if geometry.shear != [0.0; 3] {
        tracing::info!(
            series_uid = %first.header.series_instance_uid,
            "gantry tilt of {:.2} degrees: slice positions sheared along the image plane",
            geometry.tilt_degrees()
        );
    }
    Ok(Volume {
        study_uid: first.header.study_instance_uid.clone(),
        series_uid: first.header.series_instance_uid.clone(),
        hu,
        dims: [columns, rows, geometry.order.len()],
        // PixelSpacing is (between rows, between columns).
        spacing: [first.pixel_spacing[1], first.pixel_spacing[0], geometry.spacing],
        slice_shear: geometry.shear,
        origin: geometry.first_position,
        axes: [geometry.row_direction, geometry.column_direction, geometry.normal],
    })
}
