//! Disc localisation and naming on phantoms with known truth.

use idaics::analysis::spine::locate_discs;
use idaics::analysis::volume::load_series;
use idaics::config::SeriesConfig;
use idaics::phantom::{PhantomSpec, parse_levels, write_phantom};

/// Writes each phantom, locates its discs and checks every one: found, named with certainty,
/// within `tolerance_mm` of the truth, and (with `min_normal_cos`) its plane's orientation.
/// Returns the largest centre error.
fn check_phantoms(specs: impl IntoIterator<Item = PhantomSpec>, tolerance_mm: f64, min_normal_cos: Option<f64>) -> f64 {
    let tmp = tempfile::tempdir().unwrap();
    let mut worst: f64 = 0.0;
    for spec in specs {
        let (seed, px, thick) = (spec.seed, spec.pixel_spacing_mm, spec.slice_thickness_mm);
        let dir = tmp.path().join(format!("p{seed}"));
        let (series, truth) = write_phantom(&dir, &spec).unwrap();
        let volume = load_series(&series.files, &SeriesConfig::default()).unwrap();
        let found = locate_discs(&volume).unwrap();
        assert_eq!(found.len(), truth.levels.len(), "seed {seed}: found {found:#?}");
        for (t, f) in truth.levels.iter().zip(&found) {
            assert_eq!(f.name, t.name, "seed {seed}");
            assert!(f.name_certain, "seed {seed}: {} uncertain", f.name);
            let d = (0..3).map(|a| (f.center_lps_mm[a] - t.center_lps_mm[a]).powi(2)).sum::<f64>().sqrt();
            worst = worst.max(d);
            assert!(d <= tolerance_mm, "seed {seed} ({px} mm, {thick} mm) {}: {d:.2} mm off", t.name);
            if let Some(min_cos) = min_normal_cos {
                let cos = (0..3).map(|a| f.normal[a] * t.normal[a]).sum::<f64>();
                assert!(cos > min_cos, "seed {seed} {}: normal {:?} vs {:?}", t.name, f.normal, t.normal);
            }
        }
        std::fs::remove_dir_all(&dir).unwrap();
    }
    worst
}

#[test]
fn twenty_phantoms_every_disc_within_3_mm_and_named() {
    let conditions = ["", "L4/L5=bulge", "L3/L4=protrusion,L5/S1=schmorl", "L1/L2=schmorl,L2/L3=bulge"];
    // (pixel spacing, slice thickness, size): 0.6 to 3 mm, covering 230 to 340 mm.
    let grids = [(0.6, 1.0, 384), (1.0, 1.25, 320), (1.5, 2.0, 224), (2.0, 2.5, 160), (3.0, 3.0, 112)];
    let specs = (1..=20u64).map(|seed| {
        let (px, thick, size) = grids[seed as usize % grids.len()];
        PhantomSpec {
            seed,
            levels: parse_levels(conditions[seed as usize % conditions.len()]).unwrap(),
            pixel_spacing_mm: px,
            slice_thickness_mm: thick,
            size,
            ..Default::default()
        }
    });
    let worst = check_phantoms(specs, 3.0, Some(0.98));
    eprintln!("largest disc centre error over 20 phantoms: {worst:.2} mm");
}

/// Lumbar protocols that angle the gantry towards the discs: the table moves along the patient
/// axis while the image planes are tilted, so the stack is sheared. The volume keeps the shear in
/// its geometry, and every disc is found and named, both ways of tilting and up to 30 degrees.
/// 3.5 mm where untilted phantoms get 3: the resampling to an axial grid that a tilted volume
/// needs adds up to half a millimetre. Without the shear, the discs would lie off by the slice
/// offset times tan(tilt): tens of millimetres for the upper ones.
#[test]
fn gantry_tilted_phantoms_every_disc_within_3_5_mm_and_named() {
    let specs = [(51u64, 12.0, (1.0, 1.25, 320)), (52, -20.0, (1.5, 2.0, 224)), (53, 30.0, (1.0, 1.5, 288))].map(
        |(seed, tilt, (px, thick, size))| PhantomSpec {
            seed,
            levels: parse_levels("L4/L5=protrusion,L5/S1=schmorl").unwrap(),
            pixel_spacing_mm: px,
            slice_thickness_mm: thick,
            size,
            gantry_tilt_degrees: tilt,
            ..Default::default()
        },
    );
    let worst = check_phantoms(specs, 3.5, Some(0.98));
    eprintln!("largest disc centre error over 3 tilted phantoms: {worst:.2} mm");
}

/// Feet first (common for lumbar CT) and prone (CT-guided spine procedures) turn the image rows
/// and columns through the patient; the discs are found and named as for head first supine.
#[test]
fn every_patient_position_every_disc_within_3_mm_and_named() {
    use idaics::synthetic::PatientPosition;
    let specs = PatientPosition::ALL.into_iter().zip(61u64..).map(|(patient_position, seed)| PhantomSpec {
        seed,
        levels: parse_levels("L3/L4=bulge,L5/S1=schmorl").unwrap(),
        pixel_spacing_mm: 1.25,
        slice_thickness_mm: 1.5,
        size: 256,
        patient_position,
        gantry_tilt_degrees: if seed % 2 == 0 { 10.0 } else { 0.0 },
        ..Default::default()
    });
    let worst = check_phantoms(specs, 3.0, Some(0.98));
    eprintln!("largest disc centre error over the four patient positions: {worst:.2} mm");
}

#[test]
fn without_the_sacrum_and_the_ribs_names_are_uncertain() {
    let tmp = tempfile::tempdir().unwrap();
    let spec = PhantomSpec { seed: 4, pixel_spacing_mm: 2.0, slice_thickness_mm: 2.0, size: 160, ..Default::default() };
    let (series, truth) = write_phantom(tmp.path(), &spec).unwrap();
    // Keep only the slices above L4/L5's disc centre + 15 mm and below T12/L1's + 3 mm: the
    // sacrum and L5/S1 are cut off, and so are T12 and its ribs. No landmark is left to count from.
    let cut = truth.levels[1].center_lps_mm[2] + 15.0;
    let top = truth.levels[5].center_lps_mm[2] + 3.0;
    let files: Vec<_> = series
        .files
        .iter()
        .filter(|f| {
            let obj = dicom_object::open_file(f).unwrap();
            let z =
                obj.element(dicom_dictionary_std::tags::IMAGE_POSITION_PATIENT).unwrap().to_multi_float64().unwrap()[2];
            z > cut && z < top
        })
        .cloned()
        .collect();
    let volume = load_series(&files, &SeriesConfig::default()).unwrap();
    let found = locate_discs(&volume).unwrap();
    assert!(!found.is_empty());
    assert!(found.iter().all(|l| !l.name_certain), "{found:#?}");
    // Still found where the truth has them (L3/L4 and up).
    for f in &found {
        let nearest = truth
            .levels
            .iter()
            .map(|t| (0..3).map(|a| (f.center_lps_mm[a] - t.center_lps_mm[a]).powi(2)).sum::<f64>().sqrt())
            .fold(f64::MAX, f64::min);
        assert!(nearest <= 3.0, "{f:?} is {nearest:.2} mm from any true disc");
    }
}

#[test]
fn slices_are_cut_through_the_discs_with_their_geometry() {
    use idaics::analysis::slices::{axial, sagittal, window};
    let tmp = tempfile::tempdir().unwrap();
    let spec =
        PhantomSpec { seed: 12, pixel_spacing_mm: 1.5, slice_thickness_mm: 1.5, size: 224, ..Default::default() };
    let (series, truth) = write_phantom(tmp.path(), &spec).unwrap();
    let volume = load_series(&series.files, &SeriesConfig::default()).unwrap();
    let levels = locate_discs(&volume).unwrap();
    let sag = sagittal(&volume, &levels, 512).unwrap();
    assert_eq!(sag.pixels.len(), 512 * 512);
    assert!((sag.pixel_spacing_mm * 512.0 - idaics::analysis::slices::SAGITTAL_FOV_MM).abs() < 1e-9);
    for t in &truth.levels {
        let (c, r) = sag.lps_to_pixel(t.center_lps_mm);
        assert!((0.0..512.0).contains(&c) && (0.0..512.0).contains(&r), "{} outside the sagittal", t.name);
        let back = sag.pixel_to_lps(c, r);
        // The sagittal plane passes within a few mm of every disc centre (x is the only lost axis).
        assert!((back[1] - t.center_lps_mm[1]).abs() < 1e-6 && (back[2] - t.center_lps_mm[2]).abs() < 1e-6);
        assert!((back[0] - t.center_lps_mm[0]).abs() < 3.0);
    }
    for level in &levels {
        let ax = axial(&volume, level, 512);
        // The centre of the image is the disc centre, in the disc's plane, shown through the window.
        let (c, r) = ax.lps_to_pixel(level.center_lps_mm);
        assert!((c - 255.5).abs() < 1e-6 && (r - 255.5).abs() < 1e-6);
        let plane_dot: f64 = (0..3).map(|d| ax.row_direction[d] * level.normal[d]).sum::<f64>().abs()
            + (0..3).map(|d| ax.column_direction[d] * level.normal[d]).sum::<f64>().abs();
        assert!(plane_dot < 1e-9, "{}: image plane not the disc plane", level.name);
        let centre_pixel = ax.pixels[256 * 512 + 256];
        let expected = window(volume.sample(ax.pixel_to_lps(256.0, 256.0)).unwrap());
        assert_eq!(centre_pixel, expected);
        assert!((60..130).contains(&centre_pixel), "{}: {centre_pixel} is not disc tissue", level.name);
        // Anterior at the top: the top-centre pixel (60 mm anterior) is soft tissue, not air.
        assert!(ax.pixels[256] > window(-500.0), "{}: air at the top", level.name);
    }
}

/// The network sees the same images whichever way the scanner's rows and columns ran through the
/// patient (feet first, prone): the slices are cut in patient coordinates, as radiologists view
/// them (axial: patient's left on the right, anterior up; sagittal: anterior on the left, head up).
#[test]
fn slices_look_the_same_in_every_patient_position() {
    use idaics::analysis::slices::{axial, sagittal};
    use idaics::synthetic::PatientPosition;
    let tmp = tempfile::tempdir().unwrap();
    let cos = |a: [f64; 3], b: [f64; 3]| (0..3).map(|d| a[d] * b[d]).sum::<f64>();
    let mut reference: Option<Vec<idaics::analysis::slices::SliceImage>> = None;
    for position in PatientPosition::ALL {
        let spec = PhantomSpec {
            seed: 12,
            pixel_spacing_mm: 1.5,
            slice_thickness_mm: 1.5,
            size: 224,
            patient_position: position,
            ..Default::default()
        };
        let (series, _) = write_phantom(&tmp.path().join(position.code()), &spec).unwrap();
        let volume = load_series(&series.files, &SeriesConfig::default()).unwrap();
        let levels = locate_discs(&volume).unwrap();
        let mut images = vec![sagittal(&volume, &levels, 512).unwrap()];
        images.extend(levels.iter().map(|l| axial(&volume, l, 512)));
        let sag = &images[0];
        assert!(cos(sag.row_direction, [0.0, 1.0, 0.0]) > 0.9, "{position:?}: sagittal rows {:?}", sag.row_direction);
        assert!(cos(sag.column_direction, [0.0, 0.0, -1.0]) > 0.9, "{position:?}: sagittal columns");
        for ax in &images[1..] {
            assert!(cos(ax.row_direction, [1.0, 0.0, 0.0]) > 0.9, "{position:?}: axial rows {:?}", ax.row_direction);
            assert!(cos(ax.column_direction, [0.0, 1.0, 0.0]) > 0.9, "{position:?}: axial columns");
        }
        match &reference {
            None => reference = Some(images),
            Some(first) => {
                assert_eq!(first.len(), images.len(), "{position:?}");
                for (a, b) in first.iter().zip(&images) {
                    // The same anatomy on the same grid: pixels within a grey level or two on
                    // average (the disc planes are fitted again for each scan).
                    let mean = a.pixels.iter().zip(&b.pixels).map(|(x, y)| x.abs_diff(*y) as f64).sum::<f64>()
                        / a.pixels.len() as f64;
                    assert!(mean < 2.0, "{position:?}: {:?} image differs by {mean:.2} grey levels", b.view);
                }
            }
        }
    }
}

#[test]
fn osteoporotic_phantoms_every_disc_within_4_mm_and_named() {
    // Cancellous bone as dense as the discs, a thin cortex and low-dose noise: the discs show only
    // between endplates, as on the real TPTBox crop.
    let grids = [(0.8, 1.0, 320), (0.7, 2.0, 384), (1.0, 3.0, 256), (1.5, 1.5, 192)];
    let specs = (31..=38u64).map(|seed| {
        let (px, thick, size) = grids[seed as usize % grids.len()];
        PhantomSpec {
            seed,
            levels: parse_levels(if seed % 2 == 0 { "L4/L5=schmorl" } else { "L3/L4=bulge" }).unwrap(),
            pixel_spacing_mm: px,
            slice_thickness_mm: thick,
            size,
            osteoporotic: true,
            ..Default::default()
        }
    });
    // Thin, noisy walls blur a porous body's extent: 4 mm here (the real crops: 5 mm).
    let worst = check_phantoms(specs, 4.0, None);
    eprintln!("largest disc centre error over 8 osteoporotic phantoms: {worst:.2} mm");
}

/// Osteoporotic bone on a coarse grid (1.5 mm pixels, 3 mm slices): a porous body's interior
/// dips like a disc, halfway between two true ones. Seed 1001 put a spurious level in L1's body
/// before the locator learnt that discs are evenly spaced.
#[test]
fn osteoporotic_coarse_grid_finds_no_disc_inside_a_body() {
    let levels = "L5/S1=schmorl,L4/L5=bulge,L3/L4=schmorl,L2/L3=bulge,L1/L2=protrusion,T12/L1=bulge";
    let specs = [1001u64, 41, 45].map(|seed| PhantomSpec {
        seed,
        levels: parse_levels(levels).unwrap(),
        pixel_spacing_mm: 1.5,
        slice_thickness_mm: 3.0,
        size: 176,
        osteoporotic: true,
        ..Default::default()
    });
    let worst = check_phantoms(specs, 4.0, None);
    eprintln!("largest disc centre error, coarse osteoporotic: {worst:.2} mm");
}
