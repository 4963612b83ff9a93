//! Disc levels on whole real CTs (../shared/data/real/*/truth.json, read by eye): every scored
//! disc found within 6 mm along z and named right, and no level named with certainty and wrong,
//! on the series as archives hold them and on series made from them the way archives break
//! them (a block of slices missing, a localizer inside the series).

use std::path::{Path, PathBuf};

use dicom_core::value::PrimitiveValue;
use dicom_core::{DataElement, VR};
use dicom_dictionary_std::tags;
use idaics::analysis::spine::DiscLevel;
use idaics::config::SeriesConfig;

const TOLERANCE_MM: f64 = 6.0;

struct TruthDisc {
    level: String,
    z: f64,
    scored: bool,
}

fn real(name: &str) -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../shared/data/real").join(name)
}

fn truth(name: &str) -> Vec<TruthDisc> {
    let text = std::fs::read_to_string(real(name).join("truth.json")).expect("truth.json");
    let doc: serde_json::Value = serde_json::from_str(&text).unwrap();
    doc["discs"]
        .as_array()
        .unwrap()
        .iter()
        .map(|d| TruthDisc {
            level: d["level"].as_str().unwrap().to_string(),
            z: d["center_lps_mm"][2].as_f64().unwrap(),
            scored: d["scored"].as_bool().unwrap_or(true),
        })
        .collect()
}

fn strs(values: &[&str]) -> PrimitiveValue {
    PrimitiveValue::Strs(values.iter().map(|v| v.to_string()).collect())
}

fn series_files(dir: &Path) -> Vec<PathBuf> {
    let mut files: Vec<PathBuf> = std::fs::read_dir(dir)
        .unwrap()
        .map(|e| e.unwrap().path())
        .filter(|p| p.extension().is_some_and(|e| e == "dcm"))
        .collect();
    files.sort();
    files
}

fn levels_of(files: &[PathBuf]) -> Vec<DiscLevel> {
    let (blocks, _notes) = idaics::analysis::volume::load_blocks(files, &SeriesConfig::default()).unwrap();
    idaics::pipeline::analyze(&blocks, None).unwrap().levels
}

/// The acceptance rule of the real-CT issue (as ../shared/tools/score_real_levels.py applies it):
/// the problems found, empty when the levels pass. Only truth discs inside `z_range` are scored.
fn problems(levels: &[DiscLevel], truth: &[TruthDisc], z_range: (f64, f64)) -> Vec<String> {
    let mut found = Vec::new();
    for disc in truth.iter().filter(|d| d.scored && (z_range.0..=z_range.1).contains(&d.z)) {
        if !levels.iter().any(|l| l.name == disc.level && (l.center_lps_mm[2] - disc.z).abs() <= TOLERANCE_MM) {
            found.push(format!("{} at z {:.1} not found and named", disc.level, disc.z));
        }
    }
    for level in levels.iter().filter(|l| l.name_certain) {
        let z = level.center_lps_mm[2];
        let nearest = truth.iter().min_by(|a, b| (a.z - z).abs().total_cmp(&(b.z - z).abs())).unwrap();
        if (nearest.z - z).abs() <= TOLERANCE_MM && nearest.level != level.name {
            found.push(format!("{} at z {z:.1} named with certainty; it is {}", level.name, nearest.level));
        }
        let same: Vec<&TruthDisc> = truth.iter().filter(|d| d.level == level.name).collect();
        if !same.is_empty() && same.iter().all(|d| (d.z - z).abs() > TOLERANCE_MM) {
            found.push(format!("{} at z {z:.1} named with certainty; that disc is at {:.1}", level.name, same[0].z));
        }
    }
    found
}

fn assert_levels(name: &str, levels: &[DiscLevel], z_range: (f64, f64)) {
    let problems = problems(levels, &truth(name), z_range);
    let summary: Vec<String> = levels.iter().map(|l| format!("{}@{:.1}", l.label(), l.center_lps_mm[2])).collect();
    assert!(problems.is_empty(), "{name}: {problems:?}; levels {summary:?}");
}

#[test]
fn low_dose_pet_ct_from_t9_to_the_hips() {
    let name = "acrin-flt-breast-001-ct";
    let levels = levels_of(&series_files(&real(name)));
    assert_levels(name, &levels, (f64::MIN, f64::MAX));
    // Sacrum and ribs are both in view and agree: every lumbar name is certain.
    assert!(levels.iter().filter(|l| l.name.starts_with('L')).all(|l| l.name_certain));
}

#[test]
fn planning_ct_without_sacrum_is_named_from_the_ribs() {
    let name = "pancreas-ct-cb001";
    let levels = levels_of(&series_files(&real(name)));
    assert_levels(name, &levels, (f64::MIN, f64::MAX));
}

#[test]
fn colonography_with_archive_gaps_is_analysed_on_its_blocks() {
    let name = "colonography-0518-gaps";
    let files = series_files(&real(name));
    let (blocks, notes) = idaics::analysis::volume::load_blocks(&files, &SeriesConfig::default()).unwrap();
    assert!(notes.iter().any(|n| n.contains("35.20 mm")), "{notes:?}");
    assert!(blocks.len() >= 2, "{} blocks", blocks.len());
    let levels = idaics::pipeline::analyze(&blocks, None).unwrap().levels;
    assert_levels(name, &levels, (f64::MIN, f64::MAX));
    // Above the gap no landmark anchors the count: no name there may claim certainty. Its discs
    // (T10/T11 and T9/T10) are counted on from the block below, across the gap, and lie above
    // the levels reported, rather than counted up from their own lowest as L5/S1 and L4/L5.
    assert!(levels.iter().filter(|l| l.center_lps_mm[2] > -127.0).all(|l| !l.name_certain));
    let mut names: Vec<&str> = levels.iter().map(|l| l.name.as_str()).collect();
    names.sort();
    names.dedup();
    assert_eq!(names.len(), levels.len(), "a name given twice: {levels:#?}");
    assert!(levels.iter().all(|l| l.center_lps_mm[2] < -127.0), "{levels:#?}");
}

/// The PET/CT with a 60 mm block of slices (over L1/L2 and L2/L3) missing, as when a block of a
/// series never reached the archive: each side is analysed on its own, and what is named on
/// either side is either right or marked uncertain.
#[test]
fn a_series_with_a_block_missing_keeps_its_levels_on_both_sides() {
    let name = "acrin-flt-breast-001-ct";
    let (low, high) = (-640.0, -580.0);
    let files: Vec<PathBuf> = series_files(&real(name))
        .into_iter()
        .filter(|f| {
            let object = dicom_object::OpenFileOptions::new().read_until(tags::PIXEL_DATA).open_file(f).unwrap();
            let z = object.element(tags::IMAGE_POSITION_PATIENT).unwrap().to_multi_float64().unwrap()[2];
            !(low..=high).contains(&z)
        })
        .collect();
    let (blocks, notes) = idaics::analysis::volume::load_blocks(&files, &SeriesConfig::default()).unwrap();
    assert_eq!(blocks.len(), 2, "{notes:?}");
    let levels = idaics::pipeline::analyze(&blocks, None).unwrap().levels;
    // The discs well away from the gap (their flanks are imaged) are scored.
    assert_levels(name, &levels, (f64::MIN, low - 15.0));
    let problems = problems(&levels, &truth(name), (high + 15.0, f64::MAX));
    assert!(problems.is_empty(), "{problems:?}");
}

/// A localizer stored inside the series (another orientation, another size) is set aside with a
/// note; the levels are those of the series without it.
#[test]
fn a_localizer_inside_the_series_is_set_aside() {
    let name = "pancreas-ct-cb001";
    let tmp = tempfile::tempdir().unwrap();
    let mut files = series_files(&real(name));
    let mut localizer = dicom_object::open_file(&files[40]).unwrap();
    localizer.put(DataElement::new(tags::IMAGE_ORIENTATION_PATIENT, VR::DS, strs(&["1", "0", "0", "0", "0", "-1"])));
    localizer.put(DataElement::new(tags::IMAGE_TYPE, VR::CS, strs(&["ORIGINAL", "PRIMARY", "LOCALIZER"])));
    let uid = "1.2.826.0.1.3680043.8.498.99999999999999999999";
    localizer.put(DataElement::new(tags::SOP_INSTANCE_UID, VR::UI, PrimitiveValue::from(uid)));
    localizer.meta_mut().media_storage_sop_instance_uid = uid.to_string();
    let path = tmp.path().join("localizer.dcm");
    localizer.write_to_file(&path).unwrap();
    files.push(path);
    let (blocks, notes) = idaics::analysis::volume::load_blocks(&files, &SeriesConfig::default()).unwrap();
    assert_eq!(blocks.len(), 1);
    assert_eq!(blocks[0].dims[2], 79);
    assert!(notes.iter().any(|n| n.contains("another orientation")), "{notes:?}");
    let levels = idaics::pipeline::analyze(&blocks, None).unwrap().levels;
    assert_levels(name, &levels, (f64::MIN, f64::MAX));
}

/// An image cut from `volume` through the plane whose first pixel lies at `first` (LPS mm), its
/// rows along `row_direction` and columns along `column_direction`, square `pixel_mm` pixels,
/// written as instance `number` of `series_uid` with one of the real files as a template
/// (patient, study and equipment kept).
struct Cut<'a> {
    volume: &'a idaics::analysis::volume::Volume,
    template: &'a Path,
    series_uid: &'a str,
    image_type: [&'a str; 3],
    thickness_mm: f64,
}

impl Cut<'_> {
    fn write(
        &self,
        path: &Path,
        number: usize,
        first: [f64; 3],
        directions: [[f64; 3]; 2],
        size: [usize; 2],
        pixel_mm: f64,
    ) {
        let [row_direction, column_direction] = directions;
        let [rows, columns] = size;
        let mut pixels = Vec::with_capacity(rows * columns);
        for r in 0..rows {
            for c in 0..columns {
                let p: [f64; 3] = std::array::from_fn(|d| {
                    first[d] + pixel_mm * (c as f64 * row_direction[d] + r as f64 * column_direction[d])
                });
                pixels.push(self.volume.sample(p).unwrap_or(-1000.0).round().clamp(-1024.0, 3071.0) as i16);
            }
        }
        let mut object = dicom_object::open_file(self.template).unwrap().into_inner();
        let sop_uid = format!("{}.{number}", self.series_uid);
        let orientation: Vec<String> =
            row_direction.iter().chain(&column_direction).map(|v| format!("{:.6}", v + 0.0)).collect();
        let pixel = format!("{pixel_mm}");
        let mut put = |tag, vr, value: PrimitiveValue| object.put(DataElement::new(tag, vr, value));
        put(tags::SERIES_INSTANCE_UID, VR::UI, self.series_uid.into());
        put(tags::SOP_INSTANCE_UID, VR::UI, sop_uid.as_str().into());
        put(tags::IMAGE_TYPE, VR::CS, strs(&self.image_type));
        put(tags::INSTANCE_NUMBER, VR::IS, number.to_string().into());
        put(tags::IMAGE_ORIENTATION_PATIENT, VR::DS, strs(&orientation.iter().map(String::as_str).collect::<Vec<_>>()));
        put(
            tags::IMAGE_POSITION_PATIENT,
            VR::DS,
            strs(&first.map(|v| format!("{v:.3}")).each_ref().map(String::as_str)),
        );
        put(tags::PIXEL_SPACING, VR::DS, strs(&[&pixel, &pixel]));
        put(tags::SLICE_THICKNESS, VR::DS, format!("{}", self.thickness_mm).into());
        put(tags::ROWS, VR::US, PrimitiveValue::from(rows as u16));
        put(tags::COLUMNS, VR::US, PrimitiveValue::from(columns as u16));
        put(tags::BITS_ALLOCATED, VR::US, PrimitiveValue::from(16_u16));
        put(tags::BITS_STORED, VR::US, PrimitiveValue::from(16_u16));
        put(tags::HIGH_BIT, VR::US, PrimitiveValue::from(15_u16));
        put(tags::PIXEL_REPRESENTATION, VR::US, PrimitiveValue::from(1_u16));
        put(tags::RESCALE_INTERCEPT, VR::DS, "0".into());
        put(tags::RESCALE_SLOPE, VR::DS, "1".into());
        put(tags::PIXEL_DATA, VR::OW, PrimitiveValue::I16(pixels.into()));
        object.remove_element(tags::PIXEL_PADDING_VALUE);
        object.remove_element(tags::SMALLEST_IMAGE_PIXEL_VALUE);
        object.remove_element(tags::LARGEST_IMAGE_PIXEL_VALUE);
        let meta = dicom_object::meta::FileMetaTableBuilder::new()
            .media_storage_sop_class_uid(dicom_dictionary_std::uids::CT_IMAGE_STORAGE)
            .media_storage_sop_instance_uid(sop_uid.as_str())
            .transfer_syntax(dicom_dictionary_std::uids::EXPLICIT_VR_LITTLE_ENDIAN)
            .build()
            .unwrap();
        object.with_exact_meta(meta).write_to_file(path).unwrap();
    }
}

/// The volume's extent along LPS axis `d`, from its corners.
fn extent(volume: &idaics::analysis::volume::Volume, d: usize) -> (f64, f64) {
    let [nx, ny, nz] = volume.dims.map(|n| (n - 1) as f64);
    let values: Vec<f64> = (0..8)
        .map(|c| volume.voxel_to_lps([nx * (c & 1) as f64, ny * ((c >> 1) & 1) as f64, nz * (c >> 2) as f64])[d])
        .collect();
    (values.iter().copied().fold(f64::MAX, f64::min), values.iter().copied().fold(f64::MIN, f64::max))
}

/// A reformat of a real series, as a workstation writes one: images 2 mm apart along
/// `normal_axis` (0: sagittal, 1: coronal) within `half_width_mm` of `centre`, 1 mm pixels,
/// rows running from head to feet, written as `series_uid` from `template`.
fn write_reformat(
    dir: &Path,
    (volume, template, series_uid): (&idaics::analysis::volume::Volume, &Path, &str),
    normal_axis: usize,
    centre: [f64; 3],
    half_width_mm: f64,
) -> Vec<PathBuf> {
    let in_plane = 1 - normal_axis; // sagittal: columns run front to back (y); coronal: right to left (x)
    let (across_from, across_to) = extent(volume, in_plane);
    let (z_from, z_to) = extent(volume, 2);
    let size = [(z_to - z_from) as usize, (across_to - across_from) as usize];
    let mut row_direction = [0.0; 3];
    row_direction[in_plane] = 1.0;
    let cut =
        Cut { volume, template, series_uid, image_type: ["DERIVED", "SECONDARY", "REFORMATTED"], thickness_mm: 2.0 };
    std::fs::create_dir_all(dir).unwrap();
    let planes = (half_width_mm as usize) + 1; // 2 mm apart over twice the half width
    (0..planes)
        .map(|n| {
            let mut first = [0.0; 3];
            first[normal_axis] = centre[normal_axis] - half_width_mm + 2.0 * n as f64;
            first[in_plane] = across_from;
            first[2] = z_to;
            let path = dir.join(format!("reformat_{:03}.dcm", n + 1));
            cut.write(&path, n + 1, first, [row_direction, [0.0, 0.0, -1.0]], size, 1.0);
            path
        })
        .collect()
}

/// The PET/CT as sagittal and as coronal reformats, each with an axial image of the original
/// series slipped in as a stray localizer: the localizer is set aside with a note, and the
/// reformat is read in its own geometry, with the same levels as the axial series.
#[test]
fn sagittal_and_coronal_reformats_with_a_stray_localizer() {
    let name = "acrin-flt-breast-001-ct";
    let files = series_files(&real(name));
    let truth = truth(name);
    let tmp = tempfile::tempdir().unwrap();
    // Around the column: the mean centre of the scored discs.
    let axial_levels = levels_of(&files);
    let scored: Vec<&DiscLevel> = axial_levels.iter().filter(|l| l.name.starts_with('L')).collect();
    let centre: [f64; 3] =
        std::array::from_fn(|d| scored.iter().map(|l| l.center_lps_mm[d]).sum::<f64>() / scored.len() as f64);
    let volume = idaics::analysis::volume::load_series(&files, &SeriesConfig::default()).unwrap();
    for (normal_axis, half_width) in [(0, 70.0), (1, 50.0)] {
        let dir = tmp.path().join(format!("reformat{normal_axis}"));
        let series_uid = format!("1.2.826.0.1.3680043.8.498.7700{normal_axis}");
        let mut reformat = write_reformat(&dir, (&volume, &files[0], &series_uid), normal_axis, centre, half_width);
        let mut localizer = dicom_object::open_file(&files[50]).unwrap();
        localizer.put(DataElement::new(tags::SERIES_INSTANCE_UID, VR::UI, PrimitiveValue::from(series_uid.as_str())));
        localizer.put(DataElement::new(tags::IMAGE_TYPE, VR::CS, strs(&["ORIGINAL", "PRIMARY", "LOCALIZER"])));
        let uid = format!("{series_uid}.9999");
        localizer.put(DataElement::new(tags::SOP_INSTANCE_UID, VR::UI, PrimitiveValue::from(uid.as_str())));
        localizer.meta_mut().media_storage_sop_instance_uid = uid.clone();
        let path = dir.join("localizer.dcm");
        localizer.write_to_file(&path).unwrap();
        reformat.insert(reformat.len() / 2, path);
        let analysis = idaics::pipeline::analyze_files(&reformat, &SeriesConfig::default(), None).unwrap();
        assert!(analysis.notes.iter().any(|n| n.contains("another orientation")), "{:?}", analysis.notes);
        let problems = problems(&analysis.levels, &truth, (f64::MIN, f64::MAX));
        let summary: Vec<String> =
            analysis.levels.iter().map(|l| format!("{}@{:.1}", l.label(), l.center_lps_mm[2])).collect();
        eprintln!(
            "reformat across axis {normal_axis}: {} images; levels {summary:?}; notes {:?}",
            reformat.len(),
            analysis.notes
        );
        assert!(problems.is_empty(), "reformat across axis {normal_axis}: {problems:?}; levels {summary:?}");
    }
}

/// Disc-parallel stacks as a technologist plans them on the PET/CT: five 3 mm slices through each
/// of L3/L4, L4/L5 and L5/S1, each stack tilted to its disc, with a sagittal and a coronal
/// localizer (other sizes, other pixel spacings) in the same series. No one volume holds such
/// stacks: the series is declined, saying so, rather than stacked by z or refused for the
/// localizers' pixel spacing.
#[test]
fn disc_angled_stacks_are_declined_with_the_reason() {
    let name = "acrin-flt-breast-001-ct";
    let files = series_files(&real(name));
    let volume = idaics::analysis::volume::load_series(&files, &SeriesConfig::default()).unwrap();
    let tmp = tempfile::tempdir().unwrap();
    let series_uid = "1.2.826.0.1.3680043.8.498.77010";
    let cut =
        |image_type, thickness_mm| Cut { volume: &volume, template: &files[0], series_uid, image_type, thickness_mm };
    let levels = levels_of(&files);
    let mut written = Vec::new();
    let mut number = 0;
    for (level, tilt_degrees) in [("L3/L4", 5.0f64), ("L4/L5", 15.0), ("L5/S1", 30.0)] {
        let centre = levels.iter().find(|l| l.name == level).unwrap().center_lps_mm;
        let (sin, cos) = tilt_degrees.to_radians().sin_cos();
        // Rows run to the patient's left; columns to the back, tilted about the left-right axis.
        let (row_direction, column_direction) = ([1.0, 0.0, 0.0], [0.0, cos, -sin]);
        let normal = [0.0, sin, cos];
        for s in -2..=2 {
            number += 1;
            let half = 100.0;
            let first: [f64; 3] = std::array::from_fn(|d| {
                centre[d] + 3.0 * s as f64 * normal[d] - half * row_direction[d] - half * column_direction[d]
            });
            let path = tmp.path().join(format!("angled_{number:02}.dcm"));
            cut(["ORIGINAL", "PRIMARY", "AXIAL"], 3.0).write(
                &path,
                number,
                first,
                [row_direction, column_direction],
                [256, 256],
                200.0 / 256.0,
            );
            written.push(path);
        }
    }
    for (n, columns_along) in [(1usize, [0.0, 1.0, 0.0]), (2, [1.0, 0.0, 0.0])] {
        let centre = levels[0].center_lps_mm;
        let first: [f64; 3] =
            std::array::from_fn(|d| centre[d] - 200.0 * columns_along[d] + if d == 2 { 200.0 } else { 0.0 });
        let path = tmp.path().join(format!("localizer_{n}.dcm"));
        cut(["ORIGINAL", "PRIMARY", "LOCALIZER"], 10.0).write(
            &path,
            100 + n,
            first,
            [columns_along, [0.0, 0.0, -1.0]],
            [200, 200],
            2.0,
        );
        written.push(path);
    }
    let Err(error) = idaics::pipeline::analyze_files(&written, &SeriesConfig::default(), None) else {
        panic!("disc-angled stacks analysed as one volume");
    };
    let error = error.to_string();
    assert!(error.contains("different orientations") && error.contains("stacks at different angles"), "{error}");
    assert!(!error.contains("pixel spacing"), "{error}");
    eprintln!("declined: {error}");
}
