//! Loading a CT series as a Hounsfield-unit volume with its LPS geometry.

mod common;

use std::path::PathBuf;

use common::dcmtk;
use idaics::analysis::volume::{VolumeError, load_series};
use idaics::config::SeriesConfig;
use idaics::synthetic::{SeriesSpec, write_ct_series};

#[test]
fn synthetic_series_loads_sorted_with_its_geometry() {
    let tmp = tempfile::tempdir().unwrap();
    let spec = SeriesSpec {
        slices: 12,
        size: 64,
        pixel_spacing_mm: 0.7,
        slice_spacing_mm: 1.5,
        seed: 3,
        reverse_instance_numbers: true,
    };
    let series = write_ct_series(tmp.path(), &spec).unwrap();
    // Files in a scrambled order: the loader sorts by position, not by name or instance number.
    let mut files = series.files.clone();
    files.rotate_left(5);
    files.swap(0, 7);
    let volume = load_series(&files, &SeriesConfig::default()).unwrap();
    assert_eq!(volume.dims, [64, 64, 12]);
    assert_eq!(volume.series_uid, series.series_uid);
    assert!((volume.spacing[0] - 0.7).abs() < 1e-9 && (volume.spacing[2] - 1.5).abs() < 1e-9, "{:?}", volume.spacing);
    assert_eq!(volume.axes[2], [0.0, 0.0, 1.0]);
    // Slice z = -(i * 1.5): sorted along +z the first is the deepest one written.
    let half = 0.7 * 64.0 / 2.0;
    let expected_origin = [-half, -half, -(11.0 * 1.5)];
    for (found, expected) in volume.origin.iter().zip(expected_origin) {
        assert!((found - expected).abs() < 1e-3, "{:?}", volume.origin);
    }
    // Air outside the body, bone on the ring: rescaled to HU.
    assert_eq!(volume.at(0, 0, 0), -1000.0);
    assert!(volume.hu.contains(&900.0));
    // Geometry round trip and trilinear sampling at voxel centres.
    let p = volume.voxel_to_lps([10.0, 20.0, 5.0]);
    let v = volume.lps_to_voxel(p);
    assert!((v[0] - 10.0).abs() < 1e-9 && (v[1] - 20.0).abs() < 1e-9 && (v[2] - 5.0).abs() < 1e-9);
    assert_eq!(volume.sample(p), Some(volume.at(10, 20, 5)));
    assert_eq!(volume.sample([1000.0, 0.0, 0.0]), None);
    assert_eq!(volume.byte_size(), 64 * 64 * 12 * 4);
}

#[test]
fn compressed_series_gives_the_same_hounsfield_units() {
    let tmp = tempfile::tempdir().unwrap();
    let spec = SeriesSpec { slices: 4, size: 48, seed: 4, ..Default::default() };
    let series = write_ct_series(&tmp.path().join("plain"), &spec).unwrap();
    let reference = load_series(&series.files, &SeriesConfig::default()).unwrap();
    for (tool, args) in [("dcmcrle", &[][..]), ("dcmcjpls", &["+el"][..]), ("dcmcjpeg", &["+el"][..])] {
        let dir = tmp.path().join(tool);
        std::fs::create_dir_all(&dir).unwrap();
        let files: Vec<PathBuf> = series
            .files
            .iter()
            .map(|f| {
                let out = dir.join(f.file_name().unwrap());
                dcmtk(tool, args, f, &out);
                out
            })
            .collect();
        let volume = load_series(&files, &SeriesConfig::default()).unwrap();
        assert_eq!(volume.hu, reference.hu, "{tool} changed the pixels");
    }
    // Lossy 12-bit JPEG Extended: the Hounsfield units of DCMTK's decompression, within the one
    // unit by which two inverse DCTs may round apart.
    let (lossy, decompressed) = (tmp.path().join("extended"), tmp.path().join("decompressed"));
    std::fs::create_dir_all(&lossy).unwrap();
    std::fs::create_dir_all(&decompressed).unwrap();
    let mut lossy_files = Vec::new();
    let mut decompressed_files = Vec::new();
    for f in &series.files {
        let (compressed, plain) = (lossy.join(f.file_name().unwrap()), decompressed.join(f.file_name().unwrap()));
        dcmtk("dcmcjpeg", &["+ee"], f, &compressed);
        dcmtk("dcmdjpeg", &[], &compressed, &plain);
        lossy_files.push(compressed);
        decompressed_files.push(plain);
    }
    let ours = load_series(&lossy_files, &SeriesConfig::default()).unwrap();
    let dcmtk_decoded = load_series(&decompressed_files, &SeriesConfig::default()).unwrap();
    let worst = ours.hu.iter().zip(&dcmtk_decoded.hu).map(|(a, b)| (a - b).abs()).fold(0.0, f32::max);
    assert!(worst <= 1.0, "JPEG Extended decoded {worst} HU away from DCMTK's decompression");
    let lossy_error = ours.hu.iter().zip(&reference.hu).map(|(a, b)| (a - b).abs()).fold(0.0, f32::max);
    assert!(lossy_error > 0.0, "a lossy compression that changed nothing: was it decoded at all?");
}

#[test]
fn gaps_and_mixed_series_are_refused_with_the_reason() {
    let tmp = tempfile::tempdir().unwrap();
    let a = write_ct_series(&tmp.path().join("a"), &SeriesSpec { slices: 8, size: 32, seed: 5, ..Default::default() })
        .unwrap();
    let mut gappy = a.files.clone();
    gappy.remove(4);
    match load_series(&gappy, &SeriesConfig::default()) {
        Err(VolumeError::Geometry(reason)) => assert!(reason.contains("gap"), "{reason}"),
        other => panic!("expected a gap error, got {other:?}"),
    }
    let b = write_ct_series(&tmp.path().join("b"), &SeriesSpec { slices: 2, size: 32, seed: 6, ..Default::default() })
        .unwrap();
    let mut mixed = a.files.clone();
    mixed.push(b.files[0].clone());
    assert!(matches!(load_series(&mixed, &SeriesConfig::default()), Err(VolumeError::Inconsistent(_))));
    let broken = tmp.path().join("broken.dcm");
    std::fs::write(&broken, b"not dicom").unwrap();
    let err = load_series(std::slice::from_ref(&broken), &SeriesConfig::default()).unwrap_err();
    assert!(err.to_string().contains("broken.dcm"), "{err}");
}

/// A gantry-tilted series: every stored pixel is where its file says, through the volume's
/// geometry (which keeps the stack's shear), in both directions; the same as Enhanced CT.
#[test]
fn gantry_tilted_series_keeps_each_pixel_where_its_file_puts_it() {
    use dicom_dictionary_std::tags;
    let tmp = tempfile::tempdir().unwrap();
    let spec = idaics::phantom::PhantomSpec {
        seed: 8,
        pixel_spacing_mm: 2.0,
        slice_thickness_mm: 2.5,
        size: 96,
        gantry_tilt_degrees: -15.0,
        ..Default::default()
    };
    let (series, _truth) = idaics::phantom::write_phantom(&tmp.path().join("single"), &spec).unwrap();
    let volume = load_series(&series.files, &SeriesConfig::default()).unwrap();
    let tan = 15f64.to_radians().tan();
    let shear = volume.slice_shear;
    assert!(((shear[1].powi(2) + shear[2].powi(2)).sqrt() - tan).abs() < 1e-4, "{shear:?}");
    assert!(!volume.is_axis_aligned_axial());
    // Files in writing order run down the patient; sorted along the normal, the last comes first.
    let slices = series.files.len();
    for (written, file) in series.files.iter().enumerate().step_by(7) {
        let k = slices - 1 - written;
        let object = dicom_object::open_file(file).unwrap();
        let position = object.element(tags::IMAGE_POSITION_PATIENT).unwrap().to_multi_float64().unwrap();
        let orientation = object.element(tags::IMAGE_ORIENTATION_PATIENT).unwrap().to_multi_float64().unwrap();
        for (i, j) in [(0, 0), (95, 0), (40, 60), (95, 95)] {
            let expected: Vec<f64> = (0..3)
                .map(|d| position[d] + i as f64 * 2.0 * orientation[d] + j as f64 * 2.0 * orientation[3 + d])
                .collect();
            let at = volume.voxel_to_lps([i as f64, j as f64, k as f64]);
            assert!((0..3).all(|d| (at[d] - expected[d]).abs() < 2e-3), "slice {k} ({i}, {j}): {at:?} vs {expected:?}");
            let back = volume.lps_to_voxel(at);
            assert!(
                (0..3).all(|a| (back[a] - [i as f64, j as f64, k as f64][a]).abs() < 1e-5),
                "slice {k} ({i}, {j}) back: {back:?}"
            );
        }
        // Pixel values: the stored ones, rescaled, at their own positions.
        let stored = object.element(tags::PIXEL_DATA).unwrap().to_multi_int::<i16>().unwrap();
        let hu = f32::from(stored[60 * 96 + 40]) - 1024.0;
        assert_eq!(volume.at(40, 60, k), hu);
        let sampled = volume.sample(volume.voxel_to_lps([40.0, 60.0, k as f64])).unwrap();
        // Up to a few thousandths of a HU: the 7-decimal direction cosines are not exactly unit.
        assert!((sampled - hu).abs() < 0.05, "slice {k}: sampled {sampled}, stored {hu}");
    }
    let enhanced = idaics::synthetic::write_enhanced_ct(&series.files, &tmp.path().join("enhanced.dcm"), 8).unwrap();
    let multi_frame = load_series(std::slice::from_ref(&enhanced), &SeriesConfig::default()).unwrap();
    assert_eq!(multi_frame.slice_shear, volume.slice_shear);
    assert_eq!(multi_frame.hu, volume.hu);
}

/// Resampling to an axial grid walks each output row through the source in steps and finds where
/// the row enters and leaves it once; every voxel must still be what sampling its own position
/// gives, including the ones on the volume's surface and the ones outside it.
#[test]
fn resampling_to_an_axial_grid_gives_each_voxel_its_sampled_value() {
    use idaics::analysis::volume::Volume;
    use idaics::geometry::{cross, normalize};
    // Rotated about two axes and sheared like a tilted gantry; and, axis-aligned, one slice thin.
    let column = normalize([0.95, 0.2, 0.1]);
    let row = normalize(cross([0.1, -0.3, 1.0], column));
    let oblique = ([column, row, cross(column, row)], idaics::geometry::scale(row, 0.3));
    let axial = ([[1.0, 0.0, 0.0], [0.0, 1.0, 0.0], [0.0, 0.0, 1.0]], [0.0; 3]);
    for (dims, spacing, (axes, shear)) in [
        ([23, 17, 11], [0.7, 0.9, 1.6], oblique),
        ([9, 14, 2], [1.0, 1.0, 2.0], oblique),
        ([2, 6, 5], [1.2, 0.8, 1.0], oblique),
        ([9, 14, 1], [0.8, 0.8, 2.0], axial),
    ] {
        let mut value = 0x2545_F491u64;
        let hu = (0..dims[0] * dims[1] * dims[2])
            .map(|_| {
                value = value.wrapping_mul(6364136223846793005).wrapping_add(1442695040888963407);
                (value >> 52) as f32 - 1000.0
            })
            .collect();
        let volume = Volume {
            study_uid: "1.2".into(),
            series_uid: "1.2.3".into(),
            hu,
            dims,
            spacing,
            origin: [-12.0, 30.5, 101.25],
            axes,
            slice_shear: shear,
        };
        for grid_spacing in [[0.5, 0.5, 0.5], [0.7, 0.9, 1.3]] {
            const FILL: f32 = -5000.0;
            let grid = volume.resample_axial_grid(grid_spacing, false, FILL).unwrap();
            let [nx, ny, nz] = grid.dims;
            let (mut inside, mut outside) = (0, 0);
            for k in 0..nz {
                for j in 0..ny {
                    for i in 0..nx {
                        let p = std::array::from_fn(|d| grid.origin[d] + [i, j, k][d] as f64 * grid_spacing[d]);
                        let got = grid.at(i, j, k);
                        match volume.sample(p) {
                            Some(expected) => {
                                inside += 1;
                                assert!((got - expected).abs() < 1e-3, "{dims:?} ({i}, {j}, {k}): {got} vs {expected}");
                            }
                            None => {
                                outside += 1;
                                assert_eq!(got, FILL, "{dims:?} ({i}, {j}, {k}) is outside the volume");
                            }
                        }
                    }
                }
            }
            // An oblique volume's bounding box holds air; an axis-aligned one is all volume.
            let oblique = shear != [0.0; 3];
            assert!(inside > 0 && (outside > 0) == oblique, "{dims:?}: {inside} inside, {outside} outside");
        }
    }
}

#[test]
fn enhanced_ct_multi_frame_loads_like_its_single_frame_series() {
    let tmp = tempfile::tempdir().unwrap();
    let spec = idaics::phantom::PhantomSpec {
        seed: 7,
        pixel_spacing_mm: 2.0,
        slice_thickness_mm: 2.5,
        size: 128,
        ..Default::default()
    };
    let (series, _truth) = idaics::phantom::write_phantom(&tmp.path().join("single"), &spec).unwrap();
    let enhanced = idaics::synthetic::write_enhanced_ct(&series.files, &tmp.path().join("enhanced.dcm"), 7).unwrap();
    let reference = load_series(&series.files, &SeriesConfig::default()).unwrap();
    let volume = load_series(std::slice::from_ref(&enhanced), &SeriesConfig::default()).unwrap();
    assert_eq!(volume.dims, reference.dims);
    assert_eq!(volume.axes, reference.axes);
    assert!((0..3).all(|d| (volume.origin[d] - reference.origin[d]).abs() < 1e-6), "{:?}", volume.origin);
    assert!((volume.spacing[2] - reference.spacing[2]).abs() < 1e-6);
    // Frames are stored in reverse order, each with its own intercept: equal HU means both the
    // sorting and the per-frame rescale were applied.
    let differing = volume.hu.iter().zip(&reference.hu).filter(|(a, b)| a != b).count();
    assert_eq!(differing, 0, "{differing} voxels differ");
    // The spine stage finds the same discs.
    let a = idaics::analysis::spine::locate_discs(&volume).unwrap();
    let b = idaics::analysis::spine::locate_discs(&reference).unwrap();
    assert_eq!(a.len(), b.len());
    // DCMTK agrees that it is a multi-frame Enhanced CT object.
    let dump = std::process::Command::new("dcmdump").arg("+P").arg("0028,0008").arg(&enhanced).output().unwrap();
    let text = String::from_utf8_lossy(&dump.stdout);
    assert!(text.contains(&format!("[{}]", reference.dims[2])), "{text}");
    // Compressed as 12-bit JPEG Extended, one frame per fragment: each frame decoded by our own
    // decoder into its place, within one unit of DCMTK's decompression of the same object.
    let (lossy, decompressed) = (tmp.path().join("enhanced-jpeg.dcm"), tmp.path().join("enhanced-plain.dcm"));
    common::dcmtk("dcmcjpeg", &["+ee"], &enhanced, &lossy);
    common::dcmtk("dcmdjpeg", &[], &lossy, &decompressed);
    let compressed = dicom_object::OpenFileOptions::new().read_until(dicom_dictionary_std::tags::PIXEL_DATA);
    let compressed = compressed.open_file(&lossy).unwrap();
    assert_eq!(
        compressed.meta().transfer_syntax().trim_end_matches('\0'),
        idaics::ingest::jpeg_extended::JPEG_EXTENDED
    );
    let ours = load_series(std::slice::from_ref(&lossy), &SeriesConfig::default()).unwrap();
    let dcmtk_decoded = load_series(std::slice::from_ref(&decompressed), &SeriesConfig::default()).unwrap();
    assert_eq!(ours.dims, reference.dims);
    let worst = ours.hu.iter().zip(&dcmtk_decoded.hu).map(|(a, b)| (a - b).abs()).fold(0.0, f32::max);
    assert!(worst <= 1.0, "multi-frame JPEG Extended decoded {worst} HU away from DCMTK's decompression");
}

#[test]
fn enhanced_ct_without_frame_positions_is_refused_with_the_reason() {
    let tmp = tempfile::tempdir().unwrap();
    let series = write_ct_series(tmp.path(), &SeriesSpec { slices: 6, size: 32, ..Default::default() }).unwrap();
    let path = idaics::synthetic::write_enhanced_ct(&series.files, &tmp.path().join("enhanced.dcm"), 1).unwrap();
    let mut object = dicom_object::open_file(&path).unwrap();
    let mut groups = object.element(dicom_dictionary_std::tags::PER_FRAME_FUNCTIONAL_GROUPS_SEQUENCE).unwrap().clone();
    if let Some(items) = groups.items_mut() {
        items[2].remove_element(dicom_dictionary_std::tags::PLANE_POSITION_SEQUENCE);
    }
    object.put(groups);
    object.write_to_file(&path).unwrap();
    match load_series(&[path], &SeriesConfig::default()) {
        Err(VolumeError::Instance { message, .. }) => {
            assert!(message.contains("frame 3") && message.contains("ImagePositionPatient"), "{message}")
        }
        other => panic!("expected a frame error, got {other:?}"),
    }
}

#[test]
fn series_larger_than_the_memory_limit_is_refused_not_allocated() {
    let tmp = tempfile::tempdir().unwrap();
    let series = write_ct_series(tmp.path(), &SeriesSpec { slices: 8, size: 256, ..Default::default() }).unwrap();
    // 8 x 256 x 256 voxels of 4 bytes are 2 MB.
    let small = SeriesConfig { max_volume_mb: 1, ..SeriesConfig::default() };
    match load_series(&series.files, &small) {
        Err(error @ VolumeError::TooLarge { .. }) => {
            let message = error.to_string();
            assert!(message.contains("524288 voxels") && message.contains("series.max_volume_mb"), "{message}")
        }
        other => panic!("expected TooLarge, got {other:?}"),
    }
    let enough = SeriesConfig { max_volume_mb: 2, ..SeriesConfig::default() };
    assert_eq!(load_series(&series.files, &enough).unwrap().dims, [256, 256, 8]);

    // Slices 1e6 mm apart in a sagittal stack: resampling them axially at the in-plane spacing
    // would need petabytes. It is refused with the reason.
    let mut volume = load_series(&series.files, &enough).unwrap();
    volume.axes = [[0.0, 1.0, 0.0], [0.0, 0.0, -1.0], [1.0, 0.0, 0.0]];
    volume.spacing[2] = 1e6;
    let error = volume.resample_axial(volume.spacing[0], false, -1000.0).unwrap_err();
    assert!(matches!(error, VolumeError::TooLarge { what: "a resampled grid", .. }), "{error}");
}

/// Files analysed from a folder were never checked by the SCP: the loader reads each compressed
/// frame's own header before a decoder does, and a JPEG 2000 stream announcing 400 components
/// under a one-sample header is refused with the reason, not decoded to 400 planes.
#[test]
fn a_compressed_frame_at_odds_with_its_header_is_refused_before_decoding() {
    let dir = tempfile::tempdir().unwrap();
    let files = stack_of_two("../shared/data/corpora/pydicom-test-files/693_J2KI.dcm", dir.path());
    if let Err(e) = load_series(&files, &SeriesConfig::default()) {
        panic!("{e}");
    }
    let mut bytes = std::fs::read(&files[1]).unwrap();
    let siz = bytes.windows(4).position(|w| w == [0xFF, 0x4F, 0xFF, 0x51]).expect("a SIZ segment") + 2;
    let components: u16 = 400;
    bytes[siz + 2..siz + 4].copy_from_slice(&(38 + 3 * components).to_be_bytes());
    bytes[siz + 38..siz + 40].copy_from_slice(&components.to_be_bytes());
    for component in 0..usize::from(components) {
        bytes[siz + 40 + 3 * component..siz + 43 + 3 * component].copy_from_slice(&[0x8F, 1, 1]);
    }
    std::fs::write(&files[1], bytes).unwrap();
    let error = load_series(&files, &SeriesConfig::default()).unwrap_err().to_string();
    assert!(error.contains("b.dcm") && error.contains("has 400 components"), "{error}");
}

/// dcm2niix's converted volume in a dcm_qa corpus: 35 slices of 64 x 64 little-endian int16
/// (slice, row, column), with no scaling.
fn dcm2niix_reference(path: &str) -> Vec<i16> {
    let bytes = std::fs::read(path).unwrap();
    let dims: Vec<i16> = (0..4).map(|d| i16::from_le_bytes([bytes[40 + 2 * d], bytes[41 + 2 * d]])).collect();
    assert_eq!(dims, [3, 64, 64, 35], "{path}");
    assert_eq!(i16::from_le_bytes([bytes[70], bytes[71]]), 4, "{path}: not int16");
    let offset = f32::from_le_bytes(bytes[108..112].try_into().unwrap()) as usize;
    bytes[offset..offset + 2 * 64 * 64 * 35].chunks_exact(2).map(|b| i16::from_le_bytes([b[0], b[1]])).collect()
}

/// A two-slice series made of one corpus file and a copy of it one slice further along the
/// normal: the loader needs a stack, and both planes must then read the same.
fn stack_of_two(source: &str, dir: &std::path::Path) -> Vec<PathBuf> {
    use dicom_core::{DataElement, PrimitiveValue, VR};
    use dicom_dictionary_std::tags;
    let first = dir.join("a.dcm");
    std::fs::copy(source, &first).unwrap();
    let mut object = dicom_object::open_file(source).unwrap();
    let number = |tag| -> Vec<f64> {
        let object: &dicom_object::InMemDicomObject = &object;
        object.element(tag).unwrap().to_multi_float64().unwrap()
    };
    let (position, orientation) = (number(tags::IMAGE_POSITION_PATIENT), number(tags::IMAGE_ORIENTATION_PATIENT));
    let normal = [
        orientation[1] * orientation[5] - orientation[2] * orientation[4],
        orientation[2] * orientation[3] - orientation[0] * orientation[5],
        orientation[0] * orientation[4] - orientation[1] * orientation[3],
    ];
    let moved: Vec<String> = (0..3).map(|d| format!("{:.4}", position[d] + 3.2 * normal[d])).collect();
    object.put(DataElement::new(tags::IMAGE_POSITION_PATIENT, VR::DS, PrimitiveValue::Strs(moved.into())));
    // A UID of its own, whatever the length of the source's (64 characters at most).
    let source_uid =
        object.element(tags::SOP_INSTANCE_UID).unwrap().to_str().unwrap().trim_end_matches('\0').to_string();
    let uid = format!("2.25.{}", source_uid.bytes().fold(17u64, |h, b| h.wrapping_mul(31).wrapping_add(u64::from(b))));
    object.put(DataElement::new(tags::SOP_INSTANCE_UID, VR::UI, PrimitiveValue::from(uid.as_str())));
    object.update_meta(|meta| meta.media_storage_sop_instance_uid = uid.clone());
    let second = dir.join("b.dcm");
    object.write_to_file(&second).unwrap();
    vec![first, second]
}

/// Real 12-bit Siemens mosaics, checked against dcm2niix's conversions shipped beside them. DICOM
/// lets the bits above Bits Stored hold anything: the original scan (12bitUnsigned) has values
/// above 4095 in its 16-bit words, the 0x0F0F files stripes with those bits set, and in the signed
/// one bit 11 is the sign. Read as 16-bit words, every file differs from its reference (by up to
/// 65536); masked to 12 bits and sign-extended from bit 11, they are equal. The same image in nine
/// transfer syntaxes (two encoders each for JPEG lossless and JPEG-LS) must read the same too.
#[test]
fn twelve_bit_and_lossless_corpus_pixels_equal_their_dcm2niix_conversions() {
    let ts_corpus = "../shared/data/corpora/dcm-qa-ts";
    let twelve_bit = "../shared/data/corpora/dcm-qa-12bit";
    let mut cases: Vec<(String, String)> =
        (1..=9).map(|n| (format!("{ts_corpus}/In/{n}.dcm"), format!("{ts_corpus}/Ref/1.nii"))).collect();
    for (file, reference) in [("12bitUnsigned", 2), ("12bitUnsigned_0x0F0F", 3), ("12bitSigned_0x0F0F", 4)] {
        cases.push((format!("{twelve_bit}/In/{file}.dcm"), format!("{twelve_bit}/Ref/{reference}.nii")));
    }
    for (file, reference_path) in cases {
        let tmp = tempfile::tempdir().unwrap();
        let volume = load_series(&stack_of_two(&file, tmp.path()), &SeriesConfig::default())
            .unwrap_or_else(|e| panic!("{file}: {e}"));
        assert_eq!(volume.dims, [384, 384, 2], "{file}");
        let reference = dcm2niix_reference(&reference_path);
        // Slice t of the mosaic is tile t of a 6 x 6 grid; dcm2niix stores its rows bottom up.
        let mut differences = Vec::new();
        for plane in 0..2 {
            for (index, &expected) in reference.iter().enumerate() {
                let (tile, row, column) = (index / 4096, index / 64 % 64, index % 64);
                let found = volume.at(tile % 6 * 64 + column, tile / 6 * 64 + 63 - row, plane);
                if found != f32::from(expected) {
                    differences
                        .push(format!("plane {plane} tile {tile} ({column}, {row}): {found}, dcm2niix {expected}"));
                }
            }
        }
        assert!(
            differences.is_empty(),
            "{file}: {} pixels differ from {reference_path}, first {:?}",
            differences.len(),
            &differences[..differences.len().min(3)]
        );
    }
}

/// The raw stored values of a native 16-bit (or 8-bit) image.
fn native_samples(path: &std::path::Path) -> Vec<u16> {
    let object = dicom_object::open_file(path).unwrap();
    let pixel_data = object.element(dicom_dictionary_std::tags::PIXEL_DATA).unwrap();
    match object.element(dicom_dictionary_std::tags::BITS_ALLOCATED).unwrap().to_int::<u16>().unwrap() {
        8 => pixel_data.to_bytes().unwrap().iter().map(|b| u16::from(*b)).collect(),
        _ => pixel_data.to_bytes().unwrap().chunks_exact(2).map(|b| u16::from_le_bytes([b[0], b[1]])).collect(),
    }
}

/// JPEG Extended, which dicom-pixeldata cannot decode at 12 bits, decoded by our own decoder:
/// real 12-bit and 10-bit lossy images of the corpora, and CT compressed by DCMTK at several
/// qualities and over several fragments, against DCMTK's decompression of the same files
/// (IJG's integer inverse DCT approximates the exact one that ours computes in floating point:
/// at most one apart, measured on 0.5 to 4.1% of the samples; against the original CT before
/// compression, both err alike).
#[test]
fn jpeg_extended_decodes_as_dcmtk_does() {
    let tmp = tempfile::tempdir().unwrap();
    let corpora = common::shared_data().join("corpora");
    let mut files: Vec<PathBuf> = [
        "pydicom-test-files/JPEG-lossy.dcm",
        "pydicom-test-files/JPGExtended.dcm",
        "pylibjpeg-data/ds/JPEGExtended/RG2_JPLY_fixed.dcm",
        "pylibjpeg-data/ds/JPEGExtended/JPEGExtended_1s_1f_u_16_12.dcm",
    ]
    .iter()
    .map(|f| corpora.join(f))
    .collect();
    let ct_small = corpora.join("pydicom-test-files/CT_small.dcm");
    for (i, args) in
        [&["+ee"][..], &["+ee", "+q", "40"], &["+ee", "+q", "100", "-ho"], &["+ee", "+fs", "1"]].iter().enumerate()
    {
        let out = tmp.path().join(format!("ct_{i}.dcm"));
        dcmtk("dcmcjpeg", args, &ct_small, &out);
        files.push(out);
    }
    // 8 bits per sample, in 8 allocated bits.
    let (plain, eight_bit) = (tmp.path().join("eight_bit_plain.dcm"), tmp.path().join("eight_bit.dcm"));
    dcmtk(
        "dcmdjpeg",
        &[],
        &corpora.join("pylibjpeg-data/ds/JPEGLosslessSV1/JPEGLosslessP14SV1_1s_1f_u_08_08.dcm"),
        &plain,
    );
    dcmtk("dcmcjpeg", &["+ee"], &plain, &eight_bit);
    files.push(eight_bit);
    for (i, file) in files.iter().enumerate() {
        let reference = tmp.path().join(format!("reference_{i}.dcm"));
        dcmtk("dcmdjpeg", &[], file, &reference);
        let expected = native_samples(&reference);
        let object = dicom_object::open_file(file).unwrap();
        let native =
            idaics::ingest::jpeg_extended::to_native(object).unwrap_or_else(|e| panic!("{}: {e}", file.display()));
        let written = tmp.path().join(format!("ours_{i}.dcm"));
        native.write_to_file(&written).unwrap();
        let ours = native_samples(&written);
        assert_eq!(ours.len(), expected.len(), "{}", file.display());
        let off_by_one = ours.iter().zip(&expected).filter(|(a, b)| a != b).count();
        let worst = ours.iter().zip(&expected).map(|(a, b)| a.abs_diff(*b)).max().unwrap();
        eprintln!("{}: {off_by_one} of {} samples differ, by at most {worst}", file.display(), ours.len());
        assert!(worst <= 1 && off_by_one * 10 <= ours.len(), "{}: {off_by_one} differ, worst {worst}", file.display());
    }
}

/// Our JPEG Extended decoder reads sender-controlled bytes: 1000 mutations of a real 12-bit
/// stream (bytes changed, cut, repeated, bits flipped) each decode or fail with an error, never
/// a panic, and a damaged stream is never decoded silently into the size of another.
#[test]
fn mutated_jpeg_extended_streams_fail_cleanly() {
    use dicom_dictionary_std::tags;
    let path = common::shared_data().join("corpora/pydicom-test-files/JPEG-lossy.dcm");
    let object = dicom_object::open_file(&path).unwrap();
    let stream = object.element(tags::PIXEL_DATA).unwrap().value().fragments().unwrap().concat();
    let size = (256, 1024);
    let original = idaics::ingest::jpeg_extended::decode(&stream, size).unwrap();
    let mut next = common::seeded_random(0x2545_F491_4F6C_DD1D);
    let (mut decoded, mut refused) = (0, 0);
    for _ in 0..1000 {
        let mut bytes = stream.clone();
        // The first 700 bytes are the marker segments before the coded data.
        common::mutate(&mut bytes, 700, &mut next);
        match idaics::ingest::jpeg_extended::decode(&bytes, size) {
            Ok(frame) => {
                assert_eq!((frame.width, frame.height, frame.samples.len()), (256, 1024, 256 * 1024));
                assert!(frame.samples.iter().all(|s| *s < 1 << frame.precision));
                decoded += 1;
            }
            Err(_) => refused += 1,
        }
    }
    eprintln!("{decoded} mutated streams decoded, {refused} refused");
    assert!(refused > 300 && decoded > 0, "{decoded} decoded, {refused} refused");
    assert_eq!(original.samples.len(), 256 * 1024);
}

/// Restart intervals, which none of the corpora's JPEG Extended streams use: an 8-bit grayscale
/// JPEG of 53 x 37 pixels (partial blocks at two edges) with a restart marker every two blocks,
/// and its decoding by libjpeg-turbo, both made by Pillow 13 (`tests/fixtures/jpeg`, generated
/// with `Image.save(..., quality=85, restart_marker_blocks=2)`). A marker missing or out of
/// turn is an error, not a silently shifted image.
#[test]
fn jpeg_restart_intervals_are_followed() {
    let fixtures = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures/jpeg");
    let stream = std::fs::read(fixtures.join("restart_every_2_blocks_53x37.jpg")).unwrap();
    let expected = std::fs::read(fixtures.join("restart_every_2_blocks_53x37.gray")).unwrap();
    let frame = idaics::ingest::jpeg_extended::decode(&stream, (53, 37)).unwrap();
    assert_eq!(frame.precision, 8);
    assert_eq!(frame.samples.len(), expected.len());
    let worst = frame.samples.iter().zip(&expected).map(|(a, b)| a.abs_diff(u16::from(*b))).max().unwrap();
    assert!(worst <= 1, "{worst}");
    let markers: Vec<usize> = stream
        .windows(2)
        .enumerate()
        .filter(|(_, w)| w[0] == 0xFF && (0xD0..=0xD7).contains(&w[1]))
        .map(|(i, _)| i)
        .collect();
    assert_eq!(markers.len(), 17, "35 blocks, a restart marker after every second but the last");
    let mut missing = stream.clone();
    missing.drain(markers[5]..markers[5] + 2);
    let error = idaics::ingest::jpeg_extended::decode(&missing, (53, 37)).unwrap_err().to_string();
    assert!(error.contains("restart marker"), "{error}");
    let mut out_of_turn = stream.clone();
    out_of_turn[markers[5] + 1] = 0xD0 + ((out_of_turn[markers[5] + 1] - 0xD0 + 1) % 8);
    let error = idaics::ingest::jpeg_extended::decode(&out_of_turn, (53, 37)).unwrap_err().to_string();
    assert!(error.contains("restart marker"), "{error}");
}
