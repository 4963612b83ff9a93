//! The real spine CT crops (../shared/data/real, NIfTI) load as volumes in LPS with their masks
//! aligned, and the locator finds the discs where the masks put them.
//!
//! TPTBox is a real osteoporotic spine at 1.5 mm: the body interiors read about 50 HU (sub-region
//! label 50), under the discs' 80 to 130 HU, and only the endplates and cortical walls stand out.
//! The VerSe crop cannot be passed as it is: it holds L2 alone with every voxel outside the
//! vertebra's mask set to 0, so the discs it is said to contain are not in the image, only their
//! place beyond the endplates; and its header puts the neural arch in front of the body. Its test
//! stays ignored (run it with `--ignored`) as the record of where those discs would be.

use std::path::{Path, PathBuf};

fn real(path: &str) -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../shared/data/real").join(path)
}

#[test]
fn tptbox_crop_and_mask_load_aligned_in_lps() {
    let ct = idaics::analysis::nifti::read(&real("tptbox-L3/sub-ct_label-22_ct.nii.gz")).unwrap();
    let mask = idaics::analysis::nifti::read(&real("tptbox-L3/sub-ct_seg-vert_label-22_msk.nii.gz")).unwrap();
    assert_eq!(ct.dims, [73, 47, 73]);
    assert_eq!(ct.dims, mask.dims);
    assert_eq!(ct.origin, mask.origin);
    assert!(ct.spacing.iter().all(|s| (s - 1.5).abs() < 1e-6));
    // The sform stores the volume sagittally: its third index runs along patient right-left.
    assert!((ct.axes[2][0].abs() - 1.0).abs() < 1e-9, "{:?}", ct.axes);
    let axial = ct.resample_axial(1.0, false, -1000.0).unwrap();
    let labels = mask.resample_axial(1.0, true, 0.0).unwrap();
    assert_eq!(axial.dims, labels.dims);
    assert_eq!(axial.axes[2], [0.0, 0.0, 1.0]);
    // L2, L3 and L4 (21, 22, 23) are stacked from the top down (superior is +z in LPS), and bone
    // lies under their masks.
    let centroid_z = |label: f32| {
        let zs: Vec<f64> = (0..labels.hu.len())
            .filter(|&n| labels.hu[n] == label)
            .map(|n| labels.voxel_to_lps([0.0, 0.0, (n / (labels.dims[0] * labels.dims[1])) as f64])[2])
            .collect();
        assert!(!zs.is_empty(), "label {label} missing");
        zs.iter().sum::<f64>() / zs.len() as f64
    };
    let (l2, l3, l4) = (centroid_z(21.0), centroid_z(22.0), centroid_z(23.0));
    assert!(l2 > l3 && l3 > l4, "L2 {l2:.1}, L3 {l3:.1}, L4 {l4:.1} mm");
    let under_mask: Vec<f32> = (0..labels.hu.len()).filter(|&n| labels.hu[n] > 0.0).map(|n| axial.hu[n]).collect();
    let outside: Vec<f32> = (0..labels.hu.len()).filter(|&n| labels.hu[n] == 0.0).map(|n| axial.hu[n]).collect();
    let mean = |v: &[f32]| v.iter().map(|x| f64::from(*x)).sum::<f64>() / v.len() as f64;
    assert!(mean(&under_mask) > mean(&outside) + 100.0, "{} vs {}", mean(&under_mask), mean(&outside));
}

#[test]
fn verse_crop_loads_through_its_qform() {
    let ct = idaics::analysis::nifti::read(&real("verse004-L2/sub-verse004_0000_vertebra_21_im.nii.gz")).unwrap();
    let mask = idaics::analysis::nifti::read(&real("verse004-L2/sub-verse004_0000_vertebra_21_seg.nii.gz")).unwrap();
    assert_eq!(ct.dims, [100, 89, 74]);
    assert_eq!(mask.dims, ct.dims);
    let under: Vec<f32> = (0..mask.hu.len()).filter(|&n| mask.hu[n] > 0.0).map(|n| ct.hu[n]).collect();
    assert!(!under.is_empty());
    let mean = under.iter().map(|x| f64::from(*x)).sum::<f64>() / under.len() as f64;
    assert!(mean > 150.0, "bone under the vertebra mask averages {mean:.0} HU");
    for axis in ct.axes {
        assert!(((axis[0] * axis[0] + axis[1] * axis[1] + axis[2] * axis[2]).sqrt() - 1.0).abs() < 1e-9);
    }
}

/// Mean LPS position of the voxels whose label is in `labels` and that lie within `radius_mm`
/// (side to side and front to back) of `axis`, with their lowest and highest z.
struct BodyExtent {
    centre: [f64; 3],
    z_low: f64,
    z_high: f64,
}

fn body_extent(
    mask: &idaics::analysis::volume::Volume,
    keep: impl Fn(f32) -> bool,
    axis: Option<[f64; 2]>,
) -> BodyExtent {
    let [nx, ny, nz] = mask.dims;
    let (mut sum, mut n, mut z_low, mut z_high) = ([0.0; 3], 0.0, f64::MAX, f64::MIN);
    for k in 0..nz {
        for j in 0..ny {
            for i in 0..nx {
                if !keep(mask.at(i, j, k)) {
                    continue;
                }
                let p = mask.voxel_to_lps([i as f64, j as f64, k as f64]);
                if let Some([x, y]) = axis
                    && ((p[0] - x).powi(2) + (p[1] - y).powi(2)).sqrt() > 5.0
                {
                    continue;
                }
                for d in 0..3 {
                    sum[d] += p[d];
                }
                n += 1.0;
                z_low = z_low.min(p[2]);
                z_high = z_high.max(p[2]);
            }
        }
    }
    assert!(n > 0.0, "no voxels");
    BodyExtent { centre: sum.map(|s| s / n), z_low, z_high }
}

fn distance(a: [f64; 3], b: [f64; 3]) -> f64 {
    (0..3).map(|d| (a[d] - b[d]).powi(2)).sum::<f64>().sqrt()
}

/// Checks that every expected disc has a found disc within 5 mm, and that nothing else was found.
fn assert_discs_match(found: &[idaics::analysis::spine::DiscLevel], expected: &[(&str, [f64; 3])]) {
    assert_eq!(found.len(), expected.len(), "found {found:#?}, expected {expected:?}");
    for (name, truth) in expected {
        let nearest = found.iter().map(|f| distance(f.center_lps_mm, *truth)).fold(f64::MAX, f64::min);
        eprintln!("{name}: nearest found disc {nearest:.1} mm from the masks' disc centre");
        assert!(nearest <= 5.0, "{name}: nearest found disc is {nearest:.1} mm away; found {found:#?}");
    }
    // Without the sacrum in view the names are counts from the lowest disc, marked uncertain.
    assert!(found.iter().all(|f| !f.name_certain));
}

#[test]
fn tptbox_discs_between_the_vertebra_masks() {
    let ct = idaics::analysis::nifti::read(&real("tptbox-L3/sub-ct_label-22_ct.nii.gz")).unwrap();
    let vert = idaics::analysis::nifti::read(&real("tptbox-L3/sub-ct_seg-vert_label-22_msk.nii.gz")).unwrap();
    let subregions = idaics::analysis::nifti::read(&real("tptbox-L3/sub-ct_seg-subreg_label-22_msk.nii.gz")).unwrap();
    let found = idaics::analysis::spine::locate_discs(&ct).unwrap();
    // Body voxels of one vertebra: its label in the vertebra mask, corpus (49 border, 50 interior)
    // in the sub-region mask. Both masks share the CT's grid.
    let body = |label: f32| {
        let mut only = vert.clone();
        for (v, s) in only.hu.iter_mut().zip(&subregions.hu) {
            if *v != label || !(*s == 49.0 || *s == 50.0) {
                *v = 0.0;
            }
        }
        only
    };
    let (l2, l3, l4) = (body(21.0), body(22.0), body(23.0));
    let mut expected = Vec::new();
    for (name, upper, lower) in [("L2/L3", &l2, &l3), ("L3/L4", &l3, &l4)] {
        // The disc centre: midway between the facing endplates, on the axis through both bodies.
        let (a, b) = (body_extent(upper, |v| v > 0.0, None), body_extent(lower, |v| v > 0.0, None));
        let axis = [(a.centre[0] + b.centre[0]) / 2.0, (a.centre[1] + b.centre[1]) / 2.0];
        let (a, b) = (body_extent(upper, |v| v > 0.0, Some(axis)), body_extent(lower, |v| v > 0.0, Some(axis)));
        expected.push((name, [axis[0], axis[1], (a.z_low + b.z_high) / 2.0]));
    }
    assert_discs_match(&found, &expected);
}

#[test]
#[ignore = "the crop holds no disc tissue (zero outside L2's mask) and its header flips front and back; see the module comment"]
fn verse_discs_above_and_below_the_only_vertebra() {
    // This crop holds L2 alone, everything outside its mask set to 0, and its header puts the
    // neural arch in front of the body: the locator must recognise the body by its shape.
    let ct = idaics::analysis::nifti::read(&real("verse004-L2/sub-verse004_0000_vertebra_21_im.nii.gz")).unwrap();
    let mask = idaics::analysis::nifti::read(&real("verse004-L2/sub-verse004_0000_vertebra_21_seg.nii.gz")).unwrap();
    let found = idaics::analysis::spine::locate_discs(&ct).unwrap();
    // Labels 1 and 2 are the body and its cortical border. The discs are cut off by the crop's
    // masking: their centres lie half a typical disc height (about 5 mm) beyond the endplates.
    let rough = body_extent(&mask, |v| v == 1.0 || v == 2.0, None);
    let body = body_extent(&mask, |v| v == 1.0 || v == 2.0, Some([rough.centre[0], rough.centre[1]]));
    let [x, y, _] = body.centre;
    assert_discs_match(&found, &[("L2/L3", [x, y, body.z_low - 5.0]), ("L1/L2", [x, y, body.z_high + 5.0])]);
}
