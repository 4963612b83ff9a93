//! The objects the agent sends back: valid by dciodvfy, readable by DCMTK, deterministic; and
//! delivered end to end, through a destination outage and an agent restart.

mod common;

use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::Duration;

use common::{Agent, PHANTOM_MODEL, StoreScp, free_port, output_text, store_outcomes, wait_until};
use idaics::config::{OutputsConfig, SeriesConfig, SrStorage};
use idaics::phantom::{PhantomSpec, write_phantom};
use idaics::report::{Algorithm, Source};

fn phantom(dir: &Path, seed: u64) -> (Vec<PathBuf>, idaics::phantom::Truth) {
    let spec = PhantomSpec { seed, pixel_spacing_mm: 2.0, slice_thickness_mm: 2.5, size: 160, ..Default::default() };
    let (series, truth) = write_phantom(dir, &spec).unwrap();
    (series.files, truth)
}

/// Gives every file the study's Procedure Code Sequence item (RadLex RPID16), and `more` dcmodify
/// arguments besides.
fn give_a_procedure_code(files: &[PathBuf], more: &[&str]) {
    let procedure = [
        "-i",
        "(0008,1032)[0].(0008,0100)=RPID16",
        "-i",
        "(0008,1032)[0].(0008,0102)=RADLEX",
        "-i",
        "(0008,1032)[0].(0008,0104)=CT LUMBAR SPINE WO CONTRAST",
    ];
    let args: Vec<&str> = ["-nb"].into_iter().chain(procedure).chain(more.iter().copied()).collect();
    for file in files {
        common::dcmtk("dcmodify", &args, file, Path::new(""));
    }
}

fn dciodvfy_errors(path: &Path) -> Vec<String> {
    let out =
        Command::new("dciodvfy").arg(path).output().expect("dciodvfy (dicom3tools) is installed by the test script");
    let text = String::from_utf8_lossy(&out.stderr).to_string() + &String::from_utf8_lossy(&out.stdout);
    text.lines().filter(|l| l.starts_with("Error")).map(str::to_string).collect()
}

#[test]
fn sr_and_key_slices_are_valid_readable_and_deterministic() {
    let tmp = tempfile::tempdir().unwrap();
    let (files, truth) = phantom(&tmp.path().join("in"), 3);
    let volume = idaics::analysis::volume::load_series(&files, &SeriesConfig::default()).unwrap();
    let analysis = idaics::pipeline::analyze(std::slice::from_ref(&volume), None).unwrap();
    assert!(analysis.findings.iter().all(|f| f.class == "undetermined"));
    let source = Source::read(&files).unwrap();
    let algorithm = Algorithm::new(None);
    let write = |outputs: &OutputsConfig, dir: &str| {
        idaics::pipeline::write_objects(&source, &analysis, &algorithm, outputs, &tmp.path().join(dir)).unwrap()
    };
    let objects = write(&OutputsConfig::default(), "out");
    assert_eq!(
        objects.len(),
        1 + 2 * truth.levels.len() + 1,
        "sagittal, per level an axial and a Secondary Capture, the SR"
    );
    for o in &objects {
        let errors = dciodvfy_errors(&o.path);
        assert!(errors.is_empty(), "{}:\n{}", o.path.display(), errors.join("\n"));
    }
    let sr = objects.last().unwrap();
    let dump = Command::new("dsrdump").arg(&sr.path).output().unwrap();
    assert!(dump.status.success(), "{}", String::from_utf8_lossy(&dump.stderr));
    let text = String::from_utf8_lossy(&dump.stdout);
    assert!(text.contains("Imaging Measurement Report"), "{text}");
    assert_eq!(text.matches("Measurement Group").count(), truth.levels.len(), "{text}");
    for (level, code) in [("L4/L5", "84020006"), ("L5/S1", "715056000"), ("T12/L1", "76206002")] {
        assert!(text.contains(&format!("\"{level}\"")), "{level} missing:\n{text}");
        assert!(text.contains(code), "{code} missing:\n{text}");
    }
    assert!(text.contains("UNVERIFIED") || text.contains("Unverified"), "{text}");
    // The same inputs give the same UIDs: a resent series replaces its objects.
    let again = write(&OutputsConfig::default(), "again");
    let uids = |v: &[idaics::report::WrittenObject]| v.iter().map(|o| o.sop_instance_uid.clone()).collect::<Vec<_>>();
    assert_eq!(uids(&objects), uids(&again));
    // For a PACS without Comprehensive 3D SR: the same report as Comprehensive SR, valid for that
    // IOD, under a UID of its own; the other objects are the same ones.
    let comprehensive = OutputsConfig { sr_storage: SrStorage::Comprehensive, ..OutputsConfig::default() };
    let older = write(&comprehensive, "older");
    let (older_sr, older_rest) = older.split_last().unwrap();
    assert_eq!(uids(older_rest), uids(&objects[..objects.len() - 1]));
    assert_ne!(older_sr.sop_instance_uid, sr.sop_instance_uid);
    assert_eq!(sop_class(&older_sr.path), "1.2.840.10008.5.1.4.1.1.88.33");
    assert_eq!(sop_class(&sr.path), SR_STORAGE);
    let errors = dciodvfy_errors(&older_sr.path);
    assert!(errors.is_empty(), "{}:\n{}", older_sr.path.display(), errors.join("\n"));
    let older_dump =
        String::from_utf8_lossy(&Command::new("dsrdump").arg(&older_sr.path).output().unwrap().stdout).into_owned();
    let content = |dump: &str| {
        dump.lines().skip_while(|l| !l.contains("Imaging Measurement Report")).collect::<Vec<_>>().join("\n")
    };
    assert_eq!(content(&older_dump), content(&text), "the report's content differs between the classes");
    // Key slices sit in the source frame of reference.
    let key = dicom_object::open_file(&objects[1].path).unwrap();
    let frame = |o: &dicom_object::DefaultDicomObject| {
        o.element(dicom_dictionary_std::tags::FRAME_OF_REFERENCE_UID)
            .unwrap()
            .to_str()
            .unwrap()
            .trim_end_matches('\0')
            .to_string()
    };
    assert_eq!(frame(&key), frame(&dicom_object::open_file(&files[0]).unwrap()));
}

#[test]
fn results_reach_the_pacs_once_through_an_outage_and_a_restart() {
    let tmp = tempfile::tempdir().unwrap();
    let (files, truth) = phantom(&tmp.path().join("in"), 8);
    let expected = 1 + 2 * truth.levels.len() + 1; // sagittal, axials, Secondary Captures, SR
    let pacs_port = free_port();
    let folder = tmp.path().join("folder");
    let destination = format!("PACS@127.0.0.1:{pacs_port}");
    let state = tmp.path().join("state");
    // The PACS is down when the job finishes.
    let args = ["--destination", destination.as_str(), "--destination", folder.to_str().unwrap()];
    let mut agent = Agent::start_with_args(&state, &[], &args);
    let out = agent.storescu(&[], &files);
    assert_eq!(store_outcomes(&out), (files.len(), 0), "{}", output_text(&out));
    // The folder destination gets everything; the DICOM one is retried.
    wait_until("the folder destination", Duration::from_secs(60), || {
        std::fs::read_dir(&folder).ok().and_then(|mut d| d.next()).and_then(|e| e.ok()).is_some_and(|series| {
            std::fs::read_dir(series.path())
                .map(|r| r.flatten().filter(|f| f.file_name().to_string_lossy().ends_with(".dcm")).count())
                .unwrap_or(0)
                == expected
        })
    });
    // The two destinations have senders of their own: the failed attempt may be logged a moment
    // after the folder is full.
    wait_until("a failed delivery", Duration::from_secs(30), || {
        agent.log().contains("delivery failed; kept for a retry")
    });
    // Killed with objects in the outbox; restarted; the PACS comes up.
    agent.kill();
    let pacs = StoreScp::start(pacs_port, &tmp.path().join("pacs"));
    let _agent = Agent::start_with_args(&state, &[], &args);
    wait_until("delivery to the PACS", Duration::from_secs(90), || pacs.received().len() >= expected);
    std::thread::sleep(Duration::from_secs(2));
    let received = pacs.assert_each_once(expected);
    // The SR lists one measurement group per level of the phantom, with its site.
    let sr = received.iter().find(|p| p.file_name().unwrap().to_string_lossy().starts_with("SR")).expect("an SR");
    let dump = Command::new("dsrdump").arg(sr).output().unwrap();
    let text = String::from_utf8_lossy(&dump.stdout);
    assert_eq!(text.matches("Measurement Group").count(), truth.levels.len(), "{text}");
}

/// What the objects of a series look like when the detector outlined two discs: a phantom
/// analysed, then L4/L5 given a protrusion seen in both views and L5/S1 a bulge seen axially, each
/// with an elliptic mask where the disc is.
fn objects_with_two_segmented_findings(
    files: &[PathBuf],
    out: &Path,
) -> (idaics::pipeline::Analysis, Algorithm, Vec<idaics::report::WrittenObject>) {
    use idaics::analysis::detector::predict::Mask;
    use idaics::analysis::findings::ViewDetection;
    let volume = idaics::analysis::volume::load_series(files, &SeriesConfig::default()).unwrap();
    let mut analysis = idaics::pipeline::analyze(std::slice::from_ref(&volume), None).unwrap();
    // What a detector would have said: an ellipse where the disc is, on the views named.
    let size = idaics::pipeline::SLICE_SIZE;
    let ellipse = |cx: f64, cy: f64, rx: f64, ry: f64| Mask {
        width: size,
        height: size,
        data: (0..size * size)
            .map(|p| (((p % size) as f64 - cx) / rx).powi(2) + (((p / size) as f64 - cy) / ry).powi(2) <= 1.0)
            .collect(),
    };
    let centre = size as f64 / 2.0;
    let detection = |view: &'static str, class: &'static str, mask: Mask| ViewDetection {
        view,
        class,
        confidence: 0.9,
        bbox: [10.0, 10.0, 50.0, 50.0],
        mask_area_mm2: mask.area() as f64,
        mask,
    };
    let (l4l5, l5s1) = (
        analysis.findings.iter().position(|f| f.level.name == "L4/L5").unwrap(),
        analysis.findings.iter().position(|f| f.level.name == "L5/S1").unwrap(),
    );
    analysis.findings[l4l5].class = "protrusion";
    analysis.findings[l4l5].confidence = 0.9;
    analysis.findings[l4l5].views = vec!["axial", "sagittal"];
    analysis.findings[l4l5].evidence = vec![
        detection("axial", "protrusion", ellipse(centre, centre, 80.0, 50.0)),
        detection("sagittal", "protrusion", ellipse(centre, centre, 40.0, 12.0)),
    ];
    analysis.findings[l5s1].class = "bulge";
    analysis.findings[l5s1].confidence = 0.7;
    analysis.findings[l5s1].views = vec!["axial"];
    analysis.findings[l5s1].evidence = vec![detection("axial", "bulge", ellipse(centre, centre, 90.0, 60.0))];
    let source = Source::read(files).unwrap();
    let algorithm = Algorithm::new(Some("ab".repeat(32)));
    let objects =
        idaics::pipeline::write_objects(&source, &analysis, &algorithm, &OutputsConfig::default(), out).unwrap();
    (analysis, algorithm, objects)
}

/// docs/conformance.md's IHE AI Results table, item by item, on the SR and SEG of a study with an
/// accession number and a procedure code: every item the table lists is checked by
/// tests/scripts/air_check.py (highdicom and pydicom), and DCMTK's dsrdump reads the same report.
#[test]
fn the_ai_results_conformance_table_holds_item_by_item() {
    let tmp = tempfile::tempdir().unwrap();
    let (files, _truth) = phantom(&tmp.path().join("in"), 5);
    give_a_procedure_code(&files, &["-i", "(0008,0050)=ACC-0042", "-i", "(0020,0010)=S42"]);
    let (_analysis, algorithm, objects) = objects_with_two_segmented_findings(&files, &tmp.path().join("out"));
    let seg = objects.iter().find(|o| o.sop_class_uid == "1.2.840.10008.5.1.4.1.1.66.4").expect("a SEG");
    let sr = objects.last().unwrap();
    let device = idaics::report::derived_uid("idaics-algorithm", algorithm.weights_sha256.as_deref(), "device");
    for object in [sr, seg] {
        let errors = dciodvfy_errors(&object.path);
        assert!(errors.is_empty(), "{}", errors.join("\n"));
    }

    let python = std::env::var("IDAICS_PYTHON").unwrap_or_else(|_| "python3".into());
    let script = concat!(env!("CARGO_MANIFEST_DIR"), "/tests/scripts/air_check.py");
    let out = Command::new(&python)
        .arg(script)
        .arg(&sr.path)
        .arg(&seg.path)
        .arg(&files[0])
        .arg(&device)
        .output()
        .unwrap_or_else(|e| panic!("{python}: {e}; scripts/test.sh provides a Python with highdicom (IDAICS_PYTHON)"));
    let checked = String::from_utf8_lossy(&out.stdout).into_owned();
    assert!(out.status.success(), "air_check.py: {}\n{checked}", String::from_utf8_lossy(&out.stderr));
    let checked_items: Vec<&str> =
        checked.lines().filter_map(|l| l.split_once(" ok: ")).map(|(item, _)| item).collect();
    let table = std::fs::read_to_string(concat!(env!("CARGO_MANIFEST_DIR"), "/docs/conformance.md")).unwrap();
    let listed: Vec<&str> = table
        .lines()
        .filter_map(|l| l.strip_prefix("| AIR-"))
        .map(|rest| rest.split_once(' ').map_or(rest, |(n, _)| n))
        .collect();
    let listed: Vec<String> = listed.iter().map(|n| format!("AIR-{n}")).collect();
    assert!(!listed.is_empty(), "docs/conformance.md has no AIR table");
    assert_eq!(listed, checked_items, "the table's items and the checked ones differ:\n{checked}");

    // DCMTK reads the same report and names the same things.
    let dump = Command::new("dsrdump").args(["+Pl", "+Pc"]).arg(&sr.path).output().unwrap();
    let dump = String::from_utf8_lossy(&dump.stdout).into_owned();
    for expected in [
        "Imaging Measurement Report",
        "(121012,DCM,\"Device Observer UID\")",
        "(121014,DCM,\"Device Observer Manufacturer\")=\"IDAICS\"",
        "(121015,DCM,\"Device Observer Model Name\")",
        "(RPID16,RADLEX,\"CT LUMBAR SPINE WO CONTRAST\")",
        "(112039,DCM,\"Tracking Identifier\")",
        "(112040,DCM,\"Tracking Unique Identifier\")",
        "(121071,DCM,\"Finding\")",
        "(111001,DCM,\"Algorithm Name\")",
        "(121112,DCM,\"Source of Measurement\")",
    ] {
        assert!(dump.contains(expected), "dsrdump lacks {expected}:\n{dump}");
    }
    assert!(dump.contains(&device), "dsrdump lacks the Device Observer UID {device}:\n{dump}");
}

#[test]
fn segmentation_holds_one_segment_per_finding_with_a_mask() {
    let tmp = tempfile::tempdir().unwrap();
    let (files, _truth) = phantom(&tmp.path().join("in"), 5);
    let (analysis, algorithm, objects) = objects_with_two_segmented_findings(&files, &tmp.path().join("out"));
    let seg = objects.iter().find(|o| o.sop_class_uid == "1.2.840.10008.5.1.4.1.1.66.4").expect("a SEG");
    let errors = dciodvfy_errors(&seg.path);
    assert!(errors.is_empty(), "{}", errors.join("\n"));
    let object = dicom_object::open_file(&seg.path).unwrap();
    let tags = dicom_dictionary_std::tags::NUMBER_OF_FRAMES;
    assert_eq!(object.element(tags).unwrap().to_int::<u32>().unwrap(), 3, "three masks, no empty frame");
    assert_eq!(object.element(dicom_dictionary_std::tags::SEGMENT_SEQUENCE).unwrap().items().unwrap().len(), 2);
    let bits: u32 = object
        .element(dicom_dictionary_std::tags::PIXEL_DATA)
        .unwrap()
        .to_bytes()
        .unwrap()
        .iter()
        .map(|b| b.count_ones())
        .sum();
    let expected: usize = analysis.findings.iter().flat_map(|f| f.evidence.iter()).map(|e| e.mask.area()).sum();
    assert_eq!(bits as usize, expected);
    // The SR is valid alongside and points each level with a mask at its segment.
    let sr = objects.last().unwrap();
    let errors = dciodvfy_errors(&sr.path);
    assert!(errors.is_empty(), "{}", errors.join("\n"));
    let dump = String::from_utf8_lossy(&Command::new("dsrdump").arg(&sr.path).output().unwrap().stdout).into_owned();
    assert_eq!(dump.matches("Referenced Segment").count(), 2, "{dump}");
    // IHE AI Results: both name the algorithm as contributing equipment, by a Device UID of the
    // weights.
    let algorithm_device = |path: &Path| {
        use dicom_dictionary_std::tags;
        let object = dicom_object::open_file(path).unwrap();
        let items = object.element(tags::CONTRIBUTING_EQUIPMENT_SEQUENCE).unwrap().items().unwrap().to_vec();
        let item = &items[0];
        let text = |o: &dicom_object::InMemDicomObject, tag| {
            o.element(tag).unwrap().to_str().unwrap().trim_end_matches('\0').to_string()
        };
        let purpose = item.element(tags::PURPOSE_OF_REFERENCE_CODE_SEQUENCE).unwrap().items().unwrap()[0].clone();
        assert_eq!(
            (text(&purpose, tags::CODE_VALUE), text(&purpose, tags::CODING_SCHEME_DESIGNATOR)),
            ("Newcode1".into(), "99IHE".into())
        );
        assert_eq!(text(item, tags::MANUFACTURER), "IDAICS");
        text(item, tags::DEVICE_UID)
    };
    let device = algorithm_device(&sr.path);
    assert_eq!(device, algorithm_device(&seg.path));
    assert_eq!(device, idaics::report::derived_uid("idaics-algorithm", Some(&"ab".repeat(32)), "device"));
    assert_ne!(device, idaics::report::derived_uid("idaics-algorithm", Some(&"cd".repeat(32)), "device"));
    // highdicom reads both back.
    let python = std::env::var("IDAICS_PYTHON").unwrap_or_else(|_| "python3".into());
    let script = concat!(env!("CARGO_MANIFEST_DIR"), "/tests/scripts/highdicom_read.py");
    let out = Command::new(&python)
        .arg(script)
        .arg(&sr.path)
        .arg(&seg.path)
        .arg(analysis.findings.len().to_string())
        .output()
        .unwrap_or_else(|e| {
            panic!("{python}: {e}; the README's test command provides a Python with highdicom (IDAICS_PYTHON)")
        });
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(out.status.success(), "highdicom: {}\n{text}", String::from_utf8_lossy(&out.stderr));
    assert!(text.contains("L4/L5 Disc protrusion 84020006"), "{text}");
    assert!(text.contains("segments 2 frames 3"), "{text}");
    assert!(text.contains("Artificial Intelligence"), "{text}");

    // Images derived from lossy compressed sources say so (PS3.3 C.7.6.1.1.5), with the source's
    // ratio and method; from the uncompressed phantom, the SEG says 00 and the others nothing.
    let lossy_attribute = |path: &Path| {
        let object = dicom_object::open_file(path).unwrap();
        let text =
            |tag| object.element(tag).ok().map(|e| e.to_str().unwrap().trim_end_matches(['\0', ' ']).to_string());
        use dicom_dictionary_std::tags::{LOSSY_IMAGE_COMPRESSION, LOSSY_IMAGE_COMPRESSION_METHOD};
        (text(LOSSY_IMAGE_COMPRESSION), text(LOSSY_IMAGE_COMPRESSION_METHOD))
    };
    let images: Vec<&PathBuf> = objects.iter().filter(|o| o.path != sr.path).map(|o| &o.path).collect();
    for image in &images {
        let expected = if image == &&seg.path { Some("00".to_string()) } else { None };
        assert_eq!(lossy_attribute(image), (expected, None), "{}", image.display());
    }
    let lossy_dir = tmp.path().join("lossy");
    std::fs::create_dir_all(&lossy_dir).unwrap();
    let lossy_files: Vec<PathBuf> = files
        .iter()
        .map(|f| {
            let out = lossy_dir.join(f.file_name().unwrap());
            common::dcmtk("dcmcjpeg", &["+ee"], f, &out);
            out
        })
        .collect();
    let lossy_source = Source::read(&lossy_files).unwrap();
    let ratio = lossy_source.lossy.as_ref().and_then(|l| l.ratio.clone()).expect("the ratio DCMTK wrote");
    let lossy_objects = idaics::pipeline::write_objects(
        &lossy_source,
        &analysis,
        &algorithm,
        &OutputsConfig::default(),
        &tmp.path().join("lossy-out"),
    )
    .unwrap();
    // The SR is written last.
    let (_, lossy_images) = lossy_objects.split_last().unwrap();
    assert_eq!(lossy_images.len(), images.len());
    for image in lossy_images {
        assert_eq!(
            lossy_attribute(&image.path),
            (Some("01".to_string()), Some("ISO_10918_1".to_string())),
            "{}",
            image.path.display()
        );
        let errors = dciodvfy_errors(&image.path);
        assert!(errors.is_empty(), "{}: {}", image.path.display(), errors.join("\n"));
        let object = dicom_object::open_file(&image.path).unwrap();
        let stated = object.element(dicom_dictionary_std::tags::LOSSY_IMAGE_COMPRESSION_RATIO).unwrap();
        assert_eq!(stated.to_str().unwrap().trim_end_matches(['\0', ' ']), ratio);
    }
}

/// A phantom on a grid the phantom model was trained on, with every abnormal class.
fn phantom_for_the_model(dir: &Path, seed: u64) -> (Vec<PathBuf>, idaics::phantom::Truth) {
    let spec = PhantomSpec {
        seed,
        levels: idaics::phantom::parse_levels("L4/L5=protrusion,L3/L4=bulge,L5/S1=schmorl").unwrap(),
        pixel_spacing_mm: 1.0,
        slice_thickness_mm: 2.0,
        size: 256,
        ..Default::default()
    };
    let (series, truth) = write_phantom(dir, &spec).unwrap();
    (series.files, truth)
}

fn sop_class(path: &Path) -> String {
    sop_class_if_readable(path).unwrap_or_else(|| panic!("{} is not a readable DICOM file", path.display()))
}

/// None while storescp is still writing the file: it writes in place, so a file polled too early
/// is partial.
fn sop_class_if_readable(path: &Path) -> Option<String> {
    let object = dicom_object::open_file(path).ok()?;
    let uid = object.element(dicom_dictionary_std::tags::SOP_CLASS_UID).ok()?.to_str().ok()?;
    Some(uid.trim_end_matches('\0').to_string())
}

/// Whether a file the PACS received is an SR; false while it is still being written.
fn is_received_sr(path: &Path) -> bool {
    sop_class_if_readable(path).as_deref() == Some(SR_STORAGE)
}

/// A PACS that aborts each association on its first object: that object waits out its back-off,
/// and the objects behind it, never sent, are not counted as attempts: the next association
/// starts with them at once. Once the PACS behaves, every object arrives once.
#[test]
fn an_association_aborted_on_one_object_costs_the_objects_behind_it_nothing() {
    let tmp = tempfile::tempdir().unwrap();
    let (files, truth) = phantom_for_the_model(&tmp.path().join("in"), 7013);
    let objects = 2 * truth.levels.len() + 3;
    let pacs_port = free_port();
    let aborting = StoreScp::start_with_args(pacs_port, &tmp.path().join("aborting"), &["-v", "--abort-after"]);
    let destination = format!("PACS@127.0.0.1:{pacs_port}");
    let state = tmp.path().join("state");
    let agent = Agent::start_with_args(
        &state,
        &[("IDAICS_MODEL_WEIGHTS", PHANTOM_MODEL), ("IDAICS_MODEL_DEVICE", "cpu")],
        &["--destination", destination.as_str()],
    );
    assert_eq!(store_outcomes(&agent.storescu(&[], &files)).0, files.len());
    let outbox = || idaics_json(&state, &["outbox"])["outbox"].as_array().unwrap().clone();
    wait_until("every object to have been aborted on once", Duration::from_secs(180), || {
        let listed = outbox();
        listed.len() == objects && listed.iter().all(|o| o["attempts"].as_i64().unwrap() >= 1)
    });
    // Frozen, so the outbox and the PACS's log are read at one moment.
    agent.freeze();
    let attempts: i64 = outbox().iter().map(|o| o["attempts"].as_i64().unwrap()).sum();
    let log = std::fs::read_to_string(tmp.path().join("aborting.storescp.log")).unwrap();
    let associations = log.matches("Association Received").count() as i64;
    // One attempt per association (the one it was aborted on; one may be in flight).
    assert!(
        attempts == associations || attempts + 1 == associations,
        "{attempts} attempts, {associations} associations"
    );
    drop(aborting);

    let pacs = StoreScp::start(pacs_port, &tmp.path().join("pacs"));
    agent.thaw();
    assert!(
        Command::new(env!("CARGO_BIN_EXE_idaics"))
            .args(["outbox", "--retry"])
            .args(outbox().iter().map(|o| o["id"].to_string()))
            .arg("--state-dir")
            .arg(&state)
            .status()
            .unwrap()
            .success()
    );
    wait_until("every object at the PACS", Duration::from_secs(60), || pacs.received().len() == objects);
    std::thread::sleep(Duration::from_secs(1));
    pacs.assert_each_once(objects);
    assert!(outbox().iter().all(|o| o["state"] == "sent"));
}

/// storescp as a PACS that predates Comprehensive 3D SR: it stores CT, SEG, Secondary Capture
/// and Comprehensive SR, nothing else.
const OLDER_PACS_PROFILE: &str = "\
[[TransferSyntaxes]]
[Uncompressed]
TransferSyntax1 = LocalEndianExplicit
TransferSyntax2 = LittleEndianImplicit
[[PresentationContexts]]
[OlderPacs]
PresentationContext1 = VerificationSOPClass\\Uncompressed
PresentationContext2 = CTImageStorage\\Uncompressed
PresentationContext3 = SegmentationStorage\\Uncompressed
PresentationContext4 = SecondaryCaptureImageStorage\\Uncompressed
PresentationContext5 = ComprehensiveSRStorage\\Uncompressed
[[Profiles]]
[OlderPacs]
PresentationContexts = OlderPacs
";

/// A PACS without Comprehensive 3D SR refuses the report at negotiation: the agent says why and
/// what to set, and keeps the report for a retry. With `outputs.sr_storage = "comprehensive"` the
/// same series' report arrives as Comprehensive SR, and highdicom reads it as TID 1500.
#[test]
fn a_pacs_without_comprehensive_3d_sr_is_told_apart_and_gets_comprehensive_sr() {
    let tmp = tempfile::tempdir().unwrap();
    let (files, truth) = phantom_for_the_model(&tmp.path().join("in"), 7012);
    let levels = truth.levels.len();
    let profile = tmp.path().join("older-pacs.cfg");
    std::fs::write(&profile, OLDER_PACS_PROFILE).unwrap();
    let pacs_port = free_port();
    let pacs = StoreScp::start_with_args(
        pacs_port,
        &tmp.path().join("pacs"),
        &["-xf", profile.to_str().unwrap(), "OlderPacs"],
    );
    let destination = format!("PACS@127.0.0.1:{pacs_port}");
    let model = [("IDAICS_MODEL_WEIGHTS", PHANTOM_MODEL), ("IDAICS_MODEL_DEVICE", "cpu")];
    let http = free_port().to_string();

    let agent = Agent::start_with_args(
        &tmp.path().join("state-3d"),
        &[model[0], model[1], ("IDAICS_HTTP_PORT", &http)],
        &["--destination", destination.as_str()],
    );
    assert_eq!(store_outcomes(&agent.storescu(&[], &files)).0, files.len());
    agent.wait_for("the report's refusal", Duration::from_secs(180), |a| {
        a.events("delivery failed; kept for a retry").iter().any(|e| e.to_string().contains("88.34"))
    });
    let refusal = agent.events("delivery failed; kept for a retry");
    let refusal = refusal.iter().find(|e| e.to_string().contains("88.34")).unwrap().to_string();
    assert!(refusal.contains("outputs.sr_storage") && refusal.contains("comprehensive"), "{refusal}");
    // Everything else arrived: key slices, SEG, Secondary Captures.
    wait_until("the other objects", Duration::from_secs(30), || pacs.received().len() == 2 * levels + 2);
    // The operator sees which object waits and why, and gives it up rather than have it retried
    // for ever; a retry sends it at once.
    let state = tmp.path().join("state-3d");
    let outbox = |state_filter: &str| idaics_json(&state, &["outbox", "--state", state_filter])["outbox"].clone();
    assert_eq!(outbox("sent").as_array().unwrap().len(), 2 * levels + 2);
    let pending = outbox("pending");
    let [report] = pending.as_array().unwrap().as_slice() else { panic!("one pending object: {pending}") };
    assert_eq!(report["sop_class_uid"], SR_STORAGE);
    assert!(report["last_error"].as_str().unwrap().contains("outputs.sr_storage"), "{report}");
    let id = report["id"].to_string();
    let idaics = |args: &[&str]| {
        let out =
            Command::new(env!("CARGO_BIN_EXE_idaics")).args(args).arg("--state-dir").arg(&state).output().unwrap();
        assert!(out.status.success(), "{args:?}: {}", output_text(&out));
    };
    idaics(&["outbox", "--cancel", &id]);
    let cancelled = outbox("cancelled");
    assert_eq!(cancelled[0]["id"].to_string(), id, "{cancelled}");
    let (status, body) = common::http_get(http.parse().unwrap(), "/api/v1/outbox?state=cancelled");
    assert_eq!(status, 200, "{body}");
    assert_eq!(serde_json::from_str::<serde_json::Value>(&body).unwrap()["outbox"], cancelled);
    assert!(outbox("pending").as_array().unwrap().is_empty());
    let attempts = cancelled[0]["attempts"].as_i64().unwrap();
    idaics(&["outbox", "--retry", &id]);
    wait_until("the retried report's attempt", Duration::from_secs(30), || {
        outbox("pending").as_array().unwrap().iter().any(|o| o["attempts"].as_i64().unwrap() > attempts)
    });
    let sent_id = outbox("sent")[0]["id"].to_string();
    let refused = Command::new(env!("CARGO_BIN_EXE_idaics"))
        .args(["outbox", "--cancel", &sent_id, "--state-dir"])
        .arg(&state)
        .output()
        .unwrap();
    assert!(!refused.status.success() && output_text(&refused).contains(&sent_id), "{}", output_text(&refused));
    drop(agent);

    let older = [model[0], model[1], ("IDAICS_OUTPUTS_SR_STORAGE", "comprehensive")];
    let agent = Agent::start_with_args(&tmp.path().join("state-2d"), &older, &["--destination", destination.as_str()]);
    assert_eq!(store_outcomes(&agent.storescu(&[], &files)).0, files.len());
    let comprehensive_sr = |p: &PathBuf| sop_class_if_readable(p).as_deref() == Some("1.2.840.10008.5.1.4.1.1.88.33");
    wait_until("the Comprehensive SR", Duration::from_secs(180), || pacs.received().iter().any(comprehensive_sr));
    let received = pacs.received();
    let sr = received.iter().find(|p| comprehensive_sr(p)).unwrap();
    let errors = dciodvfy_errors(sr);
    assert!(errors.is_empty(), "{}: {}", sr.display(), errors.join("\n"));
    assert!(!received.iter().any(|p| is_received_sr(p)), "no Comprehensive 3D SR reached this PACS");
    let seg = received.iter().find(|p| sop_class(p) == SEG_STORAGE).unwrap();
    let python = std::env::var("IDAICS_PYTHON").unwrap_or_else(|_| "python3".into());
    let script = concat!(env!("CARGO_MANIFEST_DIR"), "/tests/scripts/highdicom_read.py");
    let out = Command::new(&python).arg(script).arg(sr).arg(seg).arg(levels.to_string()).output().unwrap();
    assert!(out.status.success(), "highdicom: {}\n{}", String::from_utf8_lossy(&out.stderr), output_text(&out));
}

const SEG_STORAGE: &str = "1.2.840.10008.5.1.4.1.1.66.4";
const SR_STORAGE: &str = "1.2.840.10008.5.1.4.1.1.88.34";

/// The acceptance case as written: the PACS is down while the job finishes and comes up two
/// minutes later; every object (the SEG of the model's masks among them) arrives exactly once,
/// with no restart of the agent. The retry interval is capped at 5 s here so the test does not
/// wait out the default 5 minutes.
#[test]
fn pacs_down_for_two_minutes_gets_everything_once() {
    let tmp = tempfile::tempdir().unwrap();
    let (files, truth) = phantom_for_the_model(&tmp.path().join("in"), 9);
    // Key slices, SEG, Secondary Captures, SR.
    let expected = (1 + truth.levels.len()) + 1 + truth.levels.len() + 1;
    let pacs_port = free_port();
    let destination = format!("PACS@127.0.0.1:{pacs_port}");
    let agent = Agent::start_with_args(
        &tmp.path().join("state"),
        &[("IDAICS_OUTPUTS_MAX_RETRY_INTERVAL_S", "5"), ("IDAICS_MODEL_WEIGHTS", PHANTOM_MODEL)],
        &["--destination", destination.as_str()],
    );
    assert_eq!(store_outcomes(&agent.storescu(&[], &files)).0, files.len());
    wait_until("a failed delivery", Duration::from_secs(60), || {
        agent.log().contains("delivery failed; kept for a retry")
    });
    std::thread::sleep(Duration::from_secs(120));
    let pacs = StoreScp::start(pacs_port, &tmp.path().join("pacs"));
    wait_until("delivery after the outage", Duration::from_secs(60), || pacs.received().len() >= expected);
    std::thread::sleep(Duration::from_secs(3));
    let received = pacs.assert_each_once(expected);
    assert_eq!(received.iter().filter(|p| sop_class(p) == SEG_STORAGE).count(), 1, "the SEG arrived");
    // Finding sites of every level of the phantom.
    let sr = received.iter().find(|p| sop_class(p) == SR_STORAGE).expect("an SR");
    let text = String::from_utf8_lossy(&Command::new("dsrdump").arg(sr).output().unwrap().stdout).into_owned();
    for level in &truth.levels {
        let (code, _) = idaics::report::sr::disc_site(&level.name).unwrap();
        assert!(text.contains(code), "{} ({code}) missing:\n{text}", level.name);
    }
}

/// The acceptance case with a real network: the phantom test model runs in the agent, and the
/// PACS receives the key slices, a SEG holding the model's masks, the Secondary Captures and the
/// SR, whose groups name every level's site and point the levels with masks at their segments.
#[test]
fn a_phantom_series_comes_back_as_key_slices_seg_and_sr_from_the_model() {
    let tmp = tempfile::tempdir().unwrap();
    let (files, truth) = phantom_for_the_model(&tmp.path().join("in"), 7004);
    let levels = truth.levels.len();
    let pacs_port = free_port();
    // Verbose, so its log shows each association.
    let pacs = StoreScp::start_with_args(pacs_port, &tmp.path().join("pacs"), &["-v"]);
    let destination = format!("PACS@127.0.0.1:{pacs_port}");
    let agent = Agent::start_with_args(
        &tmp.path().join("state"),
        &[("IDAICS_MODEL_WEIGHTS", PHANTOM_MODEL), ("IDAICS_MODEL_DEVICE", "cpu")],
        &["--destination", destination.as_str()],
    );
    assert_eq!(store_outcomes(&agent.storescu(&[], &files)).0, files.len());
    wait_until("the SR, sent last", Duration::from_secs(180), || pacs.received().iter().any(|p| is_received_sr(p)));
    std::thread::sleep(Duration::from_secs(1));
    let received = pacs.assert_each_once(1 + levels + 1 + levels + 1);
    // The analysis' objects came as one association, as a modality sends a series.
    let pacs_log = std::fs::read_to_string(tmp.path().join("pacs.storescp.log")).unwrap();
    assert_eq!(pacs_log.matches("Association Received").count(), 1, "{pacs_log}");
    let count = |uid: &str| received.iter().filter(|p| sop_class(p) == uid).count();
    assert_eq!(count("1.2.840.10008.5.1.4.1.1.2"), 1 + levels, "key slices: the sagittal and one axial per level");
    assert_eq!(count(SEG_STORAGE), 1, "one SEG");
    assert_eq!(count("1.2.840.10008.5.1.4.1.1.7"), levels, "one Secondary Capture per level");
    let seg = received.iter().find(|p| sop_class(p) == SEG_STORAGE).unwrap();
    let sr = received.iter().find(|p| sop_class(p) == SR_STORAGE).unwrap();
    // The SEG, the SR and every Secondary Capture (some on the sagittal image, where the model
    // saw a Schmorl's node) are valid.
    let captures = received.iter().filter(|p| sop_class(p) == "1.2.840.10008.5.1.4.1.1.7");
    for object in [seg, sr].into_iter().chain(captures) {
        let errors = dciodvfy_errors(object);
        assert!(errors.is_empty(), "{}: {}", object.display(), errors.join("\n"));
    }
    let dump = String::from_utf8_lossy(&Command::new("dsrdump").arg(sr).output().unwrap().stdout).into_owned();
    assert_eq!(dump.matches("Measurement Group").count(), levels, "{dump}");
    for level in &truth.levels {
        let (code, _) = idaics::report::sr::disc_site(&level.name).unwrap();
        assert!(dump.contains(code), "{} ({code}) missing:\n{dump}", level.name);
    }
    let segments = dicom_object::open_file(seg)
        .unwrap()
        .element(dicom_dictionary_std::tags::SEGMENT_SEQUENCE)
        .unwrap()
        .items()
        .unwrap()
        .len();
    assert!(segments >= 1, "the model's masks are in the SEG");
    assert_eq!(dump.matches("Referenced Segment").count(), segments, "each segment referenced once:\n{dump}");
    // highdicom reads both back, with the segments the SR points at.
    let python = std::env::var("IDAICS_PYTHON").unwrap_or_else(|_| "python3".into());
    let script = concat!(env!("CARGO_MANIFEST_DIR"), "/tests/scripts/highdicom_read.py");
    let out = Command::new(&python).arg(script).arg(sr).arg(seg).arg(levels.to_string()).output().unwrap();
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(out.status.success(), "highdicom: {}\n{text}", String::from_utf8_lossy(&out.stderr));
    assert!(text.contains(&format!("segments {segments} ")), "{text}");

    // A PACS that forwards whole studies sends the key slices, CT images, back to the agent: it
    // knows them as its own and does not analyse them.
    let key_slices: Vec<PathBuf> =
        received.iter().filter(|p| sop_class(p) == "1.2.840.10008.5.1.4.1.1.2").cloned().collect();
    assert_eq!(store_outcomes(&agent.storescu(&[], &key_slices)).0, key_slices.len());
    let header = idaics::ingest::spool::InstanceHeader::read(&key_slices[0]).unwrap();
    let decided = |a: &Agent| a.series_record(&header.study_instance_uid, &header.series_instance_uid);
    agent.wait_for("the key slices' series to be decided", Duration::from_secs(30), |a| decided(a).is_some());
    let record = decided(&agent).unwrap();
    assert_eq!(record["state"], "skipped", "{record}");
    assert!(record["skip_reason"].as_str().unwrap().contains("made by IDAICS"), "{record}");
}

/// What the interrupted-job tests share: a phantom series for the model, a PACS and its
/// destination, and a state directory.
struct InterruptedJob {
    _tmp: tempfile::TempDir,
    files: Vec<PathBuf>,
    levels: usize,
    pacs: StoreScp,
    destination: String,
    state: PathBuf,
}

impl InterruptedJob {
    fn new(seed: u64) -> InterruptedJob {
        let tmp = tempfile::tempdir().unwrap();
        let (files, truth) = phantom_for_the_model(&tmp.path().join("in"), seed);
        let pacs_port = free_port();
        InterruptedJob {
            files,
            levels: truth.levels.len(),
            pacs: StoreScp::start(pacs_port, &tmp.path().join("pacs")),
            destination: format!("PACS@127.0.0.1:{pacs_port}"),
            state: tmp.path().join("state"),
            _tmp: tmp,
        }
    }

    fn serve_args(&self) -> [&str; 2] {
        ["--destination", self.destination.as_str()]
    }

    /// Sends the series and returns once the agent has started its job.
    fn send_and_wait_for_the_job(&self, agent: &Agent) {
        assert_eq!(store_outcomes(&agent.storescu(&[], &self.files)).0, self.files.len());
        agent.wait_for("the job to start", Duration::from_secs(60), |a| !a.events("job started").is_empty());
    }

    /// Waits for the SR, sent last, then checks that the PACS holds each object once: key
    /// slices, SEG, Secondary Captures, SR.
    fn assert_pacs_got_each_object_once(&self) {
        wait_until("the SR", Duration::from_secs(180), || self.pacs.received().iter().any(|p| is_received_sr(p)));
        std::thread::sleep(Duration::from_secs(1));
        self.pacs.assert_each_once(1 + self.levels + 1 + self.levels + 1);
    }

    /// One job in the finding log, done, with one finding per level.
    fn assert_logged_once(&self) {
        let runtime = tokio::runtime::Builder::new_current_thread().enable_all().build().unwrap();
        runtime.block_on(async {
            let db =
                idaics::store::db::Db::open(&format!("sqlite://{}", self.state.join("idaics.db").display())).unwrap();
            let jobs = db.jobs(None, None, idaics::store::db::Page::ALL).await.unwrap();
            assert_eq!(jobs.iter().map(|j| j.state.as_str()).collect::<Vec<_>>(), ["done"]);
            let findings = db.count(idaics::store::db::Table::Findings).await.unwrap();
            assert_eq!(findings, self.levels as i64, "one finding per level, once");
        });
    }
}

/// Whoever takes a job up again runs it as its second attempt.
fn assert_second_attempt(agent: &Agent) {
    let started = agent.events("job started");
    assert_eq!(started.len(), 1, "{}", agent.log());
    assert_eq!(started[0]["fields"]["attempt"], 2, "the second attempt at the same job");
}

/// An agent killed while it analyses a series takes the job up again when it restarts: the PACS
/// gets every object once, and the finding log holds one finished job with one set of findings.
#[test]
fn a_job_killed_mid_analysis_is_taken_up_again_after_a_restart() {
    let job = InterruptedJob::new(4242);
    let env = [("IDAICS_MODEL_WEIGHTS", PHANTOM_MODEL), ("IDAICS_MODEL_DEVICE", "cpu")];
    let mut first = Agent::start_with_args(&job.state, &env, &job.serve_args());
    job.send_and_wait_for_the_job(&first);
    first.kill();
    assert!(first.events("job done").is_empty(), "the kill came after the job ended:\n{}", first.log());
    assert!(job.pacs.received().is_empty(), "objects left before the job ended");

    let second = Agent::start_on_with_args(&job.state, first.port, &env, &job.serve_args());
    job.assert_pacs_got_each_object_once();
    assert_eq!(second.events("jobs interrupted when the agent stopped are queued again").len(), 1, "{}", second.log());
    assert_second_attempt(&second);
    job.assert_logged_once();
}

/// A host that stops in the middle of a job (here its agent is frozen with SIGSTOP, as a hung or
/// cut-off host looks) does not hold the series back: once the job's claim has gone unrenewed
/// for the lease, the agent of another host sharing the state directory and the database takes
/// the job over. When the first agent comes back, its results are refused, so the PACS and the
/// finding log get each result once.
#[test]
fn a_job_whose_host_stops_is_taken_over_by_another_host() {
    let job = InterruptedJob::new(4343);
    let env = |host: &'static str| {
        [
            ("IDAICS_MODEL_WEIGHTS", PHANTOM_MODEL),
            ("IDAICS_MODEL_DEVICE", "cpu"),
            ("IDAICS_DATABASE_JOB_LEASE_S", "10"),
            ("IDAICS_STORAGE_HOST_NAME", host),
        ]
    };
    let first = Agent::start_with_args(&job.state, &env("host-a"), &job.serve_args());
    job.send_and_wait_for_the_job(&first);
    first.freeze();
    assert!(first.events("job done").is_empty(), "the job ended before the freeze:\n{}", first.log());

    let second = Agent::start_with_args(&job.state, &env("host-b"), &job.serve_args());
    job.assert_pacs_got_each_object_once();
    let taken = second.events("jobs whose agent stopped renewing its claim are queued again");
    assert_eq!(taken.len(), 1, "{}", second.log());
    assert_second_attempt(&second);

    first.thaw();
    first.wait_for("the first host's results refused", Duration::from_secs(180), |a| {
        !a.events("another agent took this job over after its claim lapsed; its results are theirs to record")
            .is_empty()
    });
    std::thread::sleep(Duration::from_secs(2));
    job.assert_pacs_got_each_object_once();
    assert!(first.events("job done").is_empty(), "{}", first.log());
    job.assert_logged_once();
}

/// Runs `idaics COMMAND ARGS... --format json --state-dir STATE`, as an operator would, and
/// returns what it printed.
fn idaics_json(state: &Path, command_and_args: &[&str]) -> serde_json::Value {
    let out = Command::new(env!("CARGO_BIN_EXE_idaics"))
        .args(command_and_args)
        .args(["--format", "json", "--state-dir"])
        .arg(state)
        .output()
        .unwrap();
    assert!(out.status.success(), "{command_and_args:?}: {}", output_text(&out));
    serde_json::from_slice(&out.stdout).unwrap()
}

/// The operator's way out of a failed job: `idaics jobs` shows it and why, and once the cause is
/// dealt with (here a volume limit too small for the series, raised and the agent restarted)
/// `idaics jobs --retry` queues it again and the running agent analyses it.
#[test]
fn a_failed_job_is_listed_with_its_reason_and_runs_again_when_retried() {
    let tmp = tempfile::tempdir().unwrap();
    let (files, truth) = phantom(&tmp.path().join("in"), 6060);
    let state = tmp.path().join("state");
    let jobs_cli = |args: &[&str]| {
        Command::new(env!("CARGO_BIN_EXE_idaics"))
            .arg("jobs")
            .arg("--state-dir")
            .arg(&state)
            .args(args)
            .output()
            .unwrap()
    };
    let jobs_in = |job_state: &str| -> Vec<serde_json::Value> {
        idaics_json(&state, &["jobs", "--state", job_state])["jobs"].as_array().unwrap().clone()
    };

    let mut agent = Agent::start(&state, &[("IDAICS_SERIES_MAX_VOLUME_MB", "1")]);
    assert_eq!(store_outcomes(&agent.storescu(&[], &files)).0, files.len());
    wait_until("the job to fail", Duration::from_secs(60), || !jobs_in("failed").is_empty());
    let failed = jobs_in("failed");
    assert_eq!(failed.len(), 1);
    assert_eq!(failed[0]["series_uid"], truth.series_uid.as_str());
    let reason = failed[0]["error"].as_str().unwrap();
    assert!(reason.contains("series.max_volume_mb"), "{reason}");
    let id = failed[0]["id"].as_i64().unwrap().to_string();
    let table = jobs_cli(&[]);
    assert!(String::from_utf8_lossy(&table.stdout).contains("series.max_volume_mb"), "{}", output_text(&table));

    agent.kill();
    let agent = Agent::start(&state, &[]);
    std::thread::sleep(Duration::from_secs(3));
    assert!(agent.events("job started").is_empty(), "a failed job stays failed until retried");
    let retried = jobs_cli(&["--retry", &id]);
    assert!(retried.status.success(), "{}", output_text(&retried));
    assert!(String::from_utf8_lossy(&retried.stdout).contains(&format!("job {id} queued again")));
    wait_until("the retried job", Duration::from_secs(120), || !jobs_in("done").is_empty());
    assert!(jobs_in("failed").is_empty());
    let findings = idaics_json(&state, &["findings"]);
    assert_eq!(findings["findings"].as_array().unwrap().len(), truth.levels.len());

    // A done job is not run twice by a retry.
    let again = jobs_cli(&["--retry", &id]);
    assert!(!again.status.success());
    assert!(
        output_text(&again).contains(&format!("not failed jobs, left as they are: {id}")),
        "{}",
        output_text(&again)
    );
}

/// Retention: once a series is analysed, its objects delivered and its retention period over,
/// its instances and objects leave the state directory. Its record stays, so the same series
/// sent again is analysed again as its next revision (here with a restart between its arrival
/// and its decision), and removed again in its turn.
#[test]
fn retention_removes_a_delivered_series_and_a_resent_one_is_analysed_again() {
    let tmp = tempfile::tempdir().unwrap();
    let (files, truth) = phantom(&tmp.path().join("in"), 7070);
    let folder = tmp.path().join("folder-pacs");
    let state = tmp.path().join("state");
    let six_seconds = format!("{}", 6.0 / 86_400.0);
    let retention = ("IDAICS_STORAGE_RETENTION_DAYS", six_seconds.as_str());
    let args = ["--destination", folder.to_str().unwrap()];
    let spooled = state.join("spool").join(&truth.study_uid).join(&truth.series_uid);
    let outputs = state.join("outputs").join(&truth.series_uid);
    let instances_in = |dir: &Path| {
        std::fs::read_dir(dir)
            .map(|entries| entries.flatten().filter(|e| e.file_name().to_string_lossy().ends_with(".dcm")).count())
            .unwrap_or(0)
    };
    let removals = |a: &Agent| a.events("series removed from the spool after its retention period");
    let assert_removed = |agent: &Agent, revision: usize| {
        wait_until("the removal", Duration::from_secs(120), || !removals(agent).is_empty());
        assert_eq!(removals(agent)[0]["fields"]["instances"], files.len(), "{}", agent.log());
        assert_eq!(instances_in(&spooled), 0);
        assert!(!outputs.exists(), "the job's objects are removed with the series");
        let record = agent.series_record(&truth.study_uid, &truth.series_uid).unwrap();
        assert_eq!(record["revision"], revision);
        assert!(record["purged_at"].is_string(), "{record}");
    };

    let http = free_port().to_string();
    let mut agent = Agent::start_with_args(&state, &[retention, ("IDAICS_HTTP_PORT", http.as_str())], &args);
    assert_eq!(store_outcomes(&agent.storescu(&[], &files)).0, files.len());
    assert_removed(&agent, 1);
    // Removed once, not again at each look.
    std::thread::sleep(Duration::from_secs(3));
    assert_eq!(removals(&agent).len(), 1);
    let (_, metrics) = common::http_get(http.parse().unwrap(), "/metrics");
    assert!(metrics.lines().any(|l| l == "idaics_series_purged_total 1"), "{metrics}");
    agent.kill();

    // Sent again to an agent that waits to decide, which stops before it does.
    let holding = [("IDAICS_SERIES_COMPLETE_ON_RELEASE", "false"), ("IDAICS_SERIES_QUIET_PERIOD_S", "600"), retention];
    let mut waiting = Agent::start_with_args(&state, &holding, &args);
    assert_eq!(store_outcomes(&waiting.storescu(&[], &files)).0, files.len());
    waiting.kill();
    assert_eq!(instances_in(&spooled), files.len());
    // The next start finds them pending: decided as revision 2, analysed, removed in turn.
    let agent = Agent::start_with_args(&state, &[retention, ("IDAICS_SERIES_QUIET_PERIOD_S", "2")], &args);
    assert_removed(&agent, 2);

    let jobs = idaics_json(&state, &["jobs", "--series", &truth.series_uid]);
    let analysed: Vec<(i64, String)> = jobs["jobs"]
        .as_array()
        .unwrap()
        .iter()
        .map(|j| (j["revision"].as_i64().unwrap(), j["state"].as_str().unwrap().to_string()))
        .collect();
    assert_eq!(analysed, [(2, "done".to_string()), (1, "done".to_string())]);
    let listed = idaics_json(&state, &["series"]);
    assert_eq!(listed[0]["state"], "purged", "{listed}");
}

/// A patient's name reaches the PACS byte for byte in the character set the scanner wrote it in:
/// GB18030, as in the paper's hospitals, and ISO 2022 code extensions (`\ISO 2022 IR 149`,
/// Korean, the form Japanese and Korean sites use), which dicom-rs does not decode and reads as
/// bytes. The names are written by DCMTK, not by the library under test. The second form made
/// dicom-rs warn on every object read or written, over a thousand lines a study: the log stays
/// free of that.
#[test]
fn patient_names_come_back_byte_for_byte_in_their_character_set() {
    use std::ffi::{OsStr, OsString};
    use std::os::unix::ffi::OsStrExt;
    let tmp = tempfile::tempdir().unwrap();
    let pacs = tmp.path().join("pacs");
    let agent = Agent::start_with_args(
        &tmp.path().join("state"),
        &[("IDAICS_MODEL_WEIGHTS", PHANTOM_MODEL), ("IDAICS_MODEL_DEVICE", "cpu")],
        &["--destination", pacs.to_str().unwrap()],
    );
    let cases: [(&str, &[u8]); 2] = [
        ("GB18030", b"\xcd\xf5^\xd0\xa1\xc3\xf7"),
        (
            "\\ISO 2022 IR 149",
            b"Hong^Gildong=\x1b$)C\xfb\xf3^\x1b$)C\xd1\xce\xd1\xdd=\x1b$)C\xc8\xab^\x1b$)C\xb1\xe6\xb5\xbf",
        ),
    ];
    let mut series = Vec::new();
    for (i, (charset, name)) in cases.iter().enumerate() {
        let (files, _) = phantom(&tmp.path().join(format!("in{i}")), 40 + i as u64);
        let mut name_value = OsString::from("(0010,0010)=");
        name_value.push(OsStr::from_bytes(name));
        let status = Command::new("dcmodify")
            .args(["-nb", "-i", &format!("(0008,0005)={charset}"), "-m"])
            .arg(name_value)
            .args(&files)
            .status()
            .unwrap();
        assert!(status.success(), "dcmodify");
        assert_eq!(store_outcomes(&agent.storescu(&[], &files)).0, files.len());
        series.push(idaics::ingest::spool::InstanceHeader::read(&files[0]).unwrap().series_instance_uid);
    }
    wait_until("both SRs", Duration::from_secs(180), || series.iter().all(|s| pacs.join(s).join("sr.dcm").exists()));
    let contains = |haystack: &[u8], needle: &[u8]| haystack.windows(needle.len()).any(|w| w == needle);
    for ((charset, name), series_uid) in cases.iter().zip(&series) {
        // Only delivered objects: the folder destination writes `.<name>.tmp` first.
        let objects: Vec<PathBuf> = std::fs::read_dir(pacs.join(series_uid))
            .unwrap()
            .map(|e| e.unwrap().path())
            .filter(|p| {
                let name = p.file_name().unwrap().to_string_lossy();
                name.ends_with(".dcm") && !name.starts_with('.')
            })
            .collect();
        assert!(objects.len() >= 3, "{objects:?}");
        for object in objects {
            let bytes = std::fs::read(&object).unwrap();
            assert!(contains(&bytes, name), "{}: the patient's name changed ({charset})", object.display());
            assert!(
                contains(&bytes, charset.as_bytes()),
                "{}: Specific Character Set {charset} lost",
                object.display()
            );
        }
    }
    let log = agent.log();
    assert!(!log.contains("Unsupported character set"), "{}", &log[..log.len().min(4000)]);
}

/// A series read around gaps in the archive says so in its report, where the reader sees the
/// levels: the real colonography CT, with three gaps, analysed as the job worker does.
#[test]
fn gaps_in_the_series_are_named_in_the_report() {
    let dir = Path::new(env!("CARGO_MANIFEST_DIR")).join("../shared/data/real/colonography-0518-gaps");
    let mut files: Vec<PathBuf> = std::fs::read_dir(&dir)
        .unwrap()
        .map(|e| e.unwrap().path())
        .filter(|p| p.extension().is_some_and(|e| e == "dcm"))
        .collect();
    files.sort();
    let analysis = idaics::pipeline::analyze_files(&files, &SeriesConfig::default(), None).unwrap();
    assert!(analysis.notes.iter().any(|n| n.contains("gap (missing slices): 35.20 mm")), "{:?}", analysis.notes);
    let tmp = tempfile::tempdir().unwrap();
    let source = Source::read(&files).unwrap();
    let objects = idaics::pipeline::write_objects(
        &source,
        &analysis,
        &Algorithm::new(None),
        &OutputsConfig { secondary_capture: false, ..OutputsConfig::default() },
        tmp.path(),
    )
    .unwrap();
    let sr = objects.last().unwrap();
    let errors = dciodvfy_errors(&sr.path);
    assert!(errors.is_empty(), "{}:\n{}", sr.path.display(), errors.join("\n"));
    let dump = Command::new("dsrdump").args(["+Pl", "+Pc"]).arg(&sr.path).output().unwrap();
    let dump = String::from_utf8_lossy(&dump.stdout).into_owned();
    assert!(dump.contains("C0034375,UMLS,\"Qualitative Evaluations\""), "{dump}");
    for note in &analysis.notes {
        assert!(dump.contains(note.as_str()), "{note:?} not in the SR:\n{dump}");
    }
    // A series without gaps has no such section.
    let (files, _) = phantom(&tmp.path().join("phantom"), 5);
    let analysis = idaics::pipeline::analyze_files(&files, &SeriesConfig::default(), None).unwrap();
    assert!(analysis.notes.is_empty(), "{:?}", analysis.notes);
}

/// IHE AI Results: the SR's "Procedure reported" names the imaging procedure analysed, from the
/// study's Procedure Code Sequence, and falls back to CT for a study without one; dciodvfy still
/// finds no error.
#[test]
fn the_sr_reports_the_studys_procedure() {
    use dicom_dictionary_std::tags;
    let tmp = tempfile::tempdir().unwrap();
    let (files, _truth) = phantom(&tmp.path().join("in"), 11);
    let volume = idaics::analysis::volume::load_series(&files, &SeriesConfig::default()).unwrap();
    let analysis = idaics::pipeline::analyze(std::slice::from_ref(&volume), None).unwrap();
    let reported = |files: &[PathBuf], out: &str| -> (String, String, String) {
        let source = Source::read(files).unwrap();
        let objects = idaics::pipeline::write_objects(
            &source,
            &analysis,
            &Algorithm::new(Some("ab".repeat(32))),
            &OutputsConfig::default(),
            &tmp.path().join(out),
        )
        .unwrap();
        let sr_path = &objects.last().unwrap().path;
        let errors = dciodvfy_errors(sr_path);
        assert!(errors.is_empty(), "{}", errors.join("\n"));
        let sr = dicom_object::open_file(sr_path).unwrap();
        let text = |o: &dicom_object::InMemDicomObject, tag| {
            o.element(tag).unwrap().to_str().unwrap().trim_end_matches(['\0', ' ']).to_string()
        };
        let first = |o: &dicom_object::InMemDicomObject, tag| o.element(tag).unwrap().items().unwrap()[0].clone();
        let item = sr
            .element(tags::CONTENT_SEQUENCE)
            .unwrap()
            .items()
            .unwrap()
            .iter()
            .find(|item| {
                item.element(tags::CONCEPT_NAME_CODE_SEQUENCE)
                    .is_ok_and(|_| text(&first(item, tags::CONCEPT_NAME_CODE_SEQUENCE), tags::CODE_VALUE) == "121058")
            })
            .expect("a Procedure reported item")
            .clone();
        let code = first(&item, tags::CONCEPT_CODE_SEQUENCE);
        (text(&code, tags::CODE_VALUE), text(&code, tags::CODING_SCHEME_DESIGNATOR), text(&code, tags::CODE_MEANING))
    };
    assert_eq!(reported(&files, "plain"), ("77477000".into(), "SCT".into(), "CT".into()));
    give_a_procedure_code(&files, &[]);
    assert_eq!(reported(&files, "coded"), ("RPID16".into(), "RADLEX".into(), "CT LUMBAR SPINE WO CONTRAST".into()));
}
