//! The 2D images the network sees: a mid-sagittal reformat through the spine and, per disc level,
//! an axial image in the disc's plane. Each is resampled to a fixed size over a fixed physical
//! field of view, windowed to 8-bit grayscale (the paper's network takes grayscale slices), and
//! carries its geometry in the source frame of reference so it can be written back as DICOM.

use serde::Serialize;

use crate::analysis::spine::DiscLevel;
use crate::analysis::volume::Volume;
use crate::geometry::{cross, normalize};

/// Field of view of the sagittal reformat: T12 to S1 with margin.
pub const SAGITTAL_FOV_MM: f64 = 240.0;
/// Field of view of the axial disc images: the disc, canal and neighbouring tissue.
pub const AXIAL_FOV_MM: f64 = 120.0;
/// One window for both views, wide enough for disc soft tissue and endplate bone alike.
pub const WINDOW_CENTER_HU: f32 = 300.0;
pub const WINDOW_WIDTH_HU: f32 = 1500.0;

#[derive(Debug, Clone, Serialize)]
pub enum View {
    Sagittal,
    Axial { level: String },
}

impl View {
    pub const SAGITTAL: &str = "sagittal";
    pub const AXIAL: &str = "axial";

    /// The view's name as findings, the JSON output and the reports spell it.
    pub fn kind(&self) -> &'static str {
        match self {
            View::Sagittal => View::SAGITTAL,
            View::Axial { .. } => View::AXIAL,
        }
    }
}

/// An 8-bit image with its place in the patient.
#[derive(Debug, Clone)]
pub struct SliceImage {
    pub view: View,
    pub size: usize,
    /// Row by row, `size * size` values.
    pub pixels: Vec<u8>,
    /// LPS position of the centre of pixel (0, 0).
    pub origin: [f64; 3],
    /// Unit LPS direction of increasing column, then of increasing row.
    pub row_direction: [f64; 3],
    pub column_direction: [f64; 3],
    pub pixel_spacing_mm: f64,
}

impl SliceImage {
    /// LPS position of pixel (column, row).
    pub fn pixel_to_lps(&self, column: f64, row: f64) -> [f64; 3] {
        std::array::from_fn(|d| {
            self.origin[d] + (self.row_direction[d] * column + self.column_direction[d] * row) * self.pixel_spacing_mm
        })
    }

    /// (column, row) of an LPS position projected onto the image plane.
    pub fn lps_to_pixel(&self, p: [f64; 3]) -> (f64, f64) {
        let rel = [p[0] - self.origin[0], p[1] - self.origin[1], p[2] - self.origin[2]];
        let along = |axis: [f64; 3]| (rel[0] * axis[0] + rel[1] * axis[1] + rel[2] * axis[2]) / self.pixel_spacing_mm;
        (along(self.row_direction), along(self.column_direction))
    }
}

/// HU to 8-bit through the fixed window.
pub fn window(hu: f32) -> u8 {
    let low = WINDOW_CENTER_HU - WINDOW_WIDTH_HU / 2.0;
    ((hu - low) / WINDOW_WIDTH_HU * 255.0).round().clamp(0.0, 255.0) as u8
}

/// The volume resampled on a plane: `size` pixels square over `fov_mm`, centred on `centre`.
pub fn resample(
    volume: &Volume,
    view: View,
    centre: [f64; 3],
    row_direction: [f64; 3],
    column_direction: [f64; 3],
    size: usize,
    fov_mm: f64,
) -> SliceImage {
    let spacing = fov_mm / size as f64;
    let half = (size as f64 - 1.0) / 2.0;
    let mut origin = centre;
    for d in 0..3 {
        origin[d] -= (row_direction[d] + column_direction[d]) * half * spacing;
    }
    let mut image = SliceImage {
        view,
        size,
        pixels: vec![0; size * size],
        origin,
        row_direction,
        column_direction,
        pixel_spacing_mm: spacing,
    };
    for row in 0..size {
        for column in 0..size {
            let p = image.pixel_to_lps(column as f64, row as f64);
            image.pixels[row * size + column] = window(volume.sample(p).unwrap_or(-1000.0));
        }
    }
    image
}

/// The mid-sagittal reformat through the discs: anterior on the left, head at the top.
pub fn sagittal(volume: &Volume, levels: &[DiscLevel], size: usize) -> Option<SliceImage> {
    if levels.is_empty() {
        return None;
    }
    let n = levels.len() as f64;
    let centre: [f64; 3] = std::array::from_fn(|d| levels.iter().map(|l| l.center_lps_mm[d]).sum::<f64>() / n);
    // LPS: +y is posterior, +z superior; rows run downwards, so the column direction is -z.
    Some(resample(volume, View::Sagittal, centre, [0.0, 1.0, 0.0], [0.0, 0.0, -1.0], size, SAGITTAL_FOV_MM))
}

/// The image in a disc's plane, centred on it: patient right on the left, anterior at the top, as
/// axial CT is shown.
pub fn axial(volume: &Volume, level: &DiscLevel, size: usize) -> SliceImage {
    let normal = normalize(level.normal);
    // In-plane x: patient left (+x) made orthogonal to the normal; y completes the frame towards
    // posterior.
    let x = [1.0, 0.0, 0.0];
    let dot = normal[0];
    let row_direction = normalize([x[0] - dot * normal[0], x[1] - dot * normal[1], x[2] - dot * normal[2]]);
    let mut column_direction = cross(normal, row_direction);
    if column_direction[1] < 0.0 {
        column_direction = column_direction.map(|v| -v);
    }
    resample(
        volume,
        View::Axial { level: level.name.clone() },
        level.center_lps_mm,
        row_direction,
        column_direction,
        size,
        AXIAL_FOV_MM,
    )
}
