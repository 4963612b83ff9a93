//! The agent receiving CT over DICOM from real peers (DCMTK), end to end over loopback.

mod common;

use std::path::{Path, PathBuf};
use std::time::Duration;

use common::*;
use dicom_dictionary_std::tags;
use dicom_pixeldata::PixelDecoder;
use idaics::synthetic::{SeriesSpec, write_ct_series};

const CT: &str = "1.2.840.10008.5.1.4.1.1.2";
const EXPLICIT_LE: &str = "1.2.840.10008.1.2.1";

/// As senders that open an association per instance do: one `storescu` run per file.
fn send_one_association_each(agent: &Agent, files: &[PathBuf]) {
    for file in files {
        assert_eq!(store_outcomes(&agent.storescu(&[], std::slice::from_ref(file))), (1, 0));
    }
}

fn pixel_bytes(path: &Path) -> Vec<u8> {
    let obj = dicom_object::open_file(path).unwrap();
    obj.element(tags::PIXEL_DATA).unwrap().to_bytes().unwrap().into_owned()
}

#[test]
fn generated_series_is_stored_whole_and_completed_once() {
    let tmp = tempfile::tempdir().unwrap();
    let series = write_ct_series(
        &tmp.path().join("in"),
        &SeriesSpec { slices: 24, size: 96, seed: 11, reverse_instance_numbers: true, ..Default::default() },
    )
    .unwrap();
    let agent = Agent::start(&tmp.path().join("state"), &[("IDAICS_SERIES_QUIET_PERIOD_S", "2")]);
    assert!(agent.echo(), "C-ECHO failed");

    let out = agent.storescu(&[], &series.files);
    assert!(out.status.success(), "{}", output_text(&out));
    assert_eq!(store_outcomes(&out), (24, 0), "{}", output_text(&out));

    // Every instance is in the spool under its UIDs, with the pixels that were sent.
    let series_dir = agent.state_dir.join("spool").join(&series.study_uid).join(&series.series_uid);
    for (file, sop) in series.files.iter().zip(&series.sop_uids) {
        let stored = series_dir.join(format!("{sop}.dcm"));
        assert!(stored.is_file(), "{} missing", stored.display());
        assert_eq!(pixel_bytes(&stored), pixel_bytes(file));
        let obj = dicom_object::open_file(&stored).unwrap();
        assert_eq!(obj.meta().source_application_entity_title().map(str::trim), Some("STORESCU"));
    }
    assert_eq!(agent.spool_files().len(), 24);
    assert_eq!(partial_files(&agent.state_dir), Vec::<PathBuf>::new(), "temporary files left");

    // Completed on release (contiguous stack), and only once: wait past the quiet period too.
    agent.wait_for("series completion", Duration::from_secs(10), |a| {
        a.series_record(&series.study_uid, &series.series_uid).is_some()
    });
    std::thread::sleep(Duration::from_secs(3));
    let record = agent.series_record(&series.study_uid, &series.series_uid).unwrap();
    assert_eq!(record["state"], "complete");
    assert_eq!(record["trigger"], "association-released");
    assert_eq!(record["slices"], 24);
    let completions: Vec<_> = agent
        .events("series complete")
        .into_iter()
        .filter(|e| e["fields"]["series_uid"] == series.series_uid.as_str())
        .collect();
    assert_eq!(completions.len(), 1, "log:\n{}", agent.log());

    // Resending the same series creates nothing new and completes nothing again.
    let again = agent.storescu(&[], &series.files);
    assert_eq!(store_outcomes(&again), (24, 0));
    std::thread::sleep(Duration::from_secs(3));
    assert_eq!(agent.events("series complete").len(), 1);
    assert_eq!(agent.spool_files().len(), 24);

    // The listing CLI shows it.
    let list = std::process::Command::new(env!("CARGO_BIN_EXE_idaics"))
        .args(["series", "--format", "json", "--state-dir"])
        .arg(&agent.state_dir)
        .output()
        .unwrap();
    let rows: serde_json::Value = serde_json::from_slice(&list.stdout).unwrap();
    assert_eq!(rows[0]["series_uid"], series.series_uid.as_str());
    assert_eq!(rows[0]["state"], "complete");
    assert_eq!(rows[0]["instances"], 24);
}

/// Some senders open an association per instance. Each release then shows a contiguous stack
/// that is only the part sent so far: such a series must be decided once, by its quiet period,
/// not at every release (which analysed it, and sent objects, once per instance).
#[test]
fn a_series_sent_one_instance_per_association_is_decided_once() {
    let tmp = tempfile::tempdir().unwrap();
    let series =
        write_ct_series(&tmp.path().join("in"), &SeriesSpec { slices: 12, size: 64, seed: 13, ..Default::default() })
            .unwrap();
    let agent = Agent::start(&tmp.path().join("state"), &[("IDAICS_SERIES_QUIET_PERIOD_S", "2")]);
    let completions = |agent: &Agent| {
        agent
            .events("series complete")
            .into_iter()
            .filter(|e| e["fields"]["series_uid"] == series.series_uid.as_str())
            .collect::<Vec<_>>()
    };
    // The last two slices are held back: they come after the first decision.
    send_one_association_each(&agent, &series.files[..10]);
    assert!(completions(&agent).is_empty(), "decided while it was still arriving:\n{}", agent.log());
    agent.wait_for("quiet period", Duration::from_secs(10), |a| {
        a.series_record(&series.study_uid, &series.series_uid).is_some()
    });
    let record = agent.series_record(&series.study_uid, &series.series_uid).unwrap();
    assert_eq!((record["trigger"].as_str(), record["slices"].as_u64()), (Some("quiet-period"), Some(10)), "{record}");
    assert_eq!(agent.events("series arrives one association after another").len(), 1, "{}", agent.log());

    // Late instances sent the same way reopen it once, not once each.
    send_one_association_each(&agent, &series.files[10..]);
    agent.wait_for("second decision", Duration::from_secs(10), |a| {
        a.series_record(&series.study_uid, &series.series_uid).is_some_and(|r| r["revision"] == 2)
    });
    let record = agent.series_record(&series.study_uid, &series.series_uid).unwrap();
    assert_eq!((record["trigger"].as_str(), record["slices"].as_u64()), (Some("quiet-period"), Some(12)), "{record}");
    std::thread::sleep(Duration::from_secs(3));
    assert_eq!(completions(&agent).len(), 2, "log:\n{}", agent.log());
}

#[test]
fn partial_series_waits_for_the_quiet_period_and_gappy_series_is_skipped() {
    let tmp = tempfile::tempdir().unwrap();
    let series =
        write_ct_series(&tmp.path().join("in"), &SeriesSpec { slices: 12, size: 64, seed: 12, ..Default::default() })
            .unwrap();
    let agent = Agent::start(&tmp.path().join("state"), &[("IDAICS_SERIES_QUIET_PERIOD_S", "2")]);
    // Slice 6 missing: the stack is not contiguous, so release does not complete it.
    let mut files = series.files.clone();
    files.remove(5);
    assert_eq!(store_outcomes(&agent.storescu(&[], &files)), (11, 0));
    std::thread::sleep(Duration::from_millis(500));
    assert!(agent.series_record(&series.study_uid, &series.series_uid).is_none(), "completed on release despite a gap");
    agent.wait_for("quiet period", Duration::from_secs(10), |a| {
        a.series_record(&series.study_uid, &series.series_uid).is_some()
    });
    let record = agent.series_record(&series.study_uid, &series.series_uid).unwrap();
    assert_eq!(record["state"], "skipped");
    assert_eq!(record["trigger"], "quiet-period");
    assert!(record["skip_reason"].as_str().unwrap().contains("gap"), "{record}");

    // The missing slice arrives late: the series is reopened and, now whole, completed.
    assert_eq!(store_outcomes(&agent.storescu(&[], &series.files[5..6])), (1, 0));
    agent.wait_for("second decision", Duration::from_secs(10), |a| {
        a.series_record(&series.study_uid, &series.series_uid).is_some_and(|r| r["revision"] == 2)
    });
    assert_eq!(agent.series_record(&series.study_uid, &series.series_uid).unwrap()["state"], "complete");
}

/// A study routed whole brings the scanner's sagittal reformat with the axial acquisition: the
/// axial series is analysed, the reformat is skipped at release with the rule that left it out,
/// and a site rule on the series description leaves out what the administrator names.
#[test]
fn reformats_and_excluded_descriptions_are_skipped_with_the_rule() {
    let tmp = tempfile::tempdir().unwrap();
    let spec = SeriesSpec { slices: 12, size: 64, seed: 31, ..Default::default() };
    let axial = write_ct_series(&tmp.path().join("axial"), &spec).unwrap();
    // The reformat, as the scanner would send it: the same study, its own series and instances,
    // images whose normal runs left to right, one every 2 mm.
    let reformat = write_ct_series(&tmp.path().join("sagittal"), &SeriesSpec { seed: 32, ..spec.clone() }).unwrap();
    for (i, file) in reformat.files.iter().enumerate() {
        let status = std::process::Command::new("dcmodify")
            .args(["-nb", "-m"])
            .arg(format!("(0020,000d)={}", axial.study_uid))
            .args(["-m", "(0020,0037)=0\\1\\0\\0\\0\\-1", "-m"])
            .arg(format!("(0020,0032)={}\\-25\\25", i as f64 * 2.0 - 12.0))
            .args(["-i", "(0008,103e)=SAG MPR 2mm"])
            .arg(file)
            .status()
            .unwrap();
        assert!(status.success(), "dcmodify");
    }
    // The same reformat as one Enhanced CT object, whose orientation is in its functional groups.
    let enhanced = idaics::synthetic::write_enhanced_ct(&reformat.files, &tmp.path().join("enhanced.dcm"), 33).unwrap();
    let enhanced_series = idaics::synthetic::derived_uid(33, 2);
    dcmtk("dcmodify", &["-nb", "-m", &format!("(0020,000e)={enhanced_series}")], &enhanced, Path::new(""));
    let agent = Agent::start(&tmp.path().join("state"), &[("IDAICS_SERIES_QUIET_PERIOD_S", "30")]);
    let all: Vec<PathBuf> = axial.files.iter().chain(&reformat.files).chain([&enhanced]).cloned().collect();
    assert_eq!(store_outcomes(&agent.storescu(&[], &all)), (25, 0));
    let record =
        |series: &idaics::synthetic::SyntheticSeries| agent.series_record(&axial.study_uid, &series.series_uid);
    agent.wait_for("the decisions at release", Duration::from_secs(10), |a| {
        record(&axial).is_some()
            && record(&reformat).is_some()
            && a.series_record(&axial.study_uid, &enhanced_series).is_some()
    });
    let enhanced_record = agent.series_record(&axial.study_uid, &enhanced_series).unwrap();
    assert_eq!(enhanced_record["state"], "skipped", "{enhanced_record}");
    assert!(enhanced_record["skip_reason"].as_str().unwrap().starts_with("sagittal stack"), "{enhanced_record}");
    assert_eq!(record(&axial).unwrap()["state"], "complete");
    let skipped = record(&reformat).unwrap();
    assert_eq!(skipped["state"], "skipped", "{skipped}");
    assert_eq!(skipped["trigger"], "association-released", "decided at release, not after the quiet period");
    let reason = skipped["skip_reason"].as_str().unwrap();
    assert!(reason.starts_with("sagittal stack") && reason.contains("series.orientations is axial"), "{reason}");
    // The administrator's listing gives the rule beside the series, in aligned columns.
    let list = std::process::Command::new(env!("CARGO_BIN_EXE_idaics"))
        .args(["series", "--state-dir"])
        .arg(&agent.state_dir)
        .output()
        .unwrap();
    let table = String::from_utf8_lossy(&list.stdout).into_owned();
    let line = table.lines().find(|l| l.contains(&reformat.series_uid)).unwrap_or_else(|| panic!("{table}"));
    assert!(line.starts_with("skipped          12  ") && line.ends_with(reason), "{table}");
    drop(agent);

    // A site that analyses sagittal stacks but names the reformats it does not want.
    let agent = Agent::start(
        &tmp.path().join("state2"),
        &[("IDAICS_SERIES_ORIENTATIONS", "axial,sagittal"), ("IDAICS_SERIES_EXCLUDE_DESCRIPTIONS", "mpr")],
    );
    assert_eq!(store_outcomes(&agent.storescu(&[], &reformat.files)), (12, 0));
    agent.wait_for("the decision", Duration::from_secs(10), |a| {
        a.series_record(&axial.study_uid, &reformat.series_uid).is_some()
    });
    let skipped = agent.series_record(&axial.study_uid, &reformat.series_uid).unwrap();
    let reason = skipped["skip_reason"].as_str().unwrap();
    assert_eq!(reason, "SeriesDescription \"SAG MPR 2mm\" contains \"mpr\" (series.exclude_descriptions)");
}

/// Every CT image of the shared corpora, and CT transcoded by DCMTK into each transfer syntax the
/// corpora lack, is stored and decodable; broken CT files fail with a status and the agent stays up.
#[test]
fn corpus_ct_in_every_transfer_syntax() {
    let tmp = tempfile::tempdir().unwrap();
    let agent = Agent::start(&tmp.path().join("state"), &[]);
    let data = shared_data().join("corpora");
    let mut ct_files: Vec<PathBuf> = Vec::new();
    collect(&data, &mut ct_files);
    ct_files.retain(|p| {
        dicom_object::OpenFileOptions::new()
            .read_until(tags::PIXEL_DATA)
            .open_file(p)
            .ok()
            .and_then(|o| {
                o.element(tags::SOP_CLASS_UID)
                    .ok()
                    .and_then(|e| e.to_str().ok())
                    .map(|s| s.trim_end_matches('\0') == CT)
            })
            .unwrap_or(false)
    });
    assert!(ct_files.len() >= 10, "expected the corpora's CT files, found {}", ct_files.len());

    // Transfer syntaxes the corpora have no CT in (JPEG 2000 and near-lossless JPEG-LS they do):
    // made from CT_small.dcm with DCMTK.
    let ct_small = data.join("pydicom-test-files/CT_small.dcm");
    let conv = tmp.path().join("conv");
    std::fs::create_dir_all(&conv).unwrap();
    let variants: &[(&str, &[&str], &str)] = &[
        ("dcmconv", &["+ti"], "1.2.840.10008.1.2"),
        ("dcmconv", &["+tb"], "1.2.840.10008.1.2.2"),
        ("dcmconv", &["+td"], "1.2.840.10008.1.2.1.99"),
        ("dcmcjpeg", &["+ee"], "1.2.840.10008.1.2.4.51"),
        ("dcmcjpeg", &["+el"], "1.2.840.10008.1.2.4.57"),
        ("dcmcjpeg", &["+e1"], "1.2.840.10008.1.2.4.70"),
        ("dcmcjpls", &["+el"], "1.2.840.10008.1.2.4.80"),
        ("dcmcrle", &[], "1.2.840.10008.1.2.5"),
    ];
    for (i, (tool, args, ts)) in variants.iter().enumerate() {
        let out = conv.join(format!("variant_{i}.dcm"));
        dcmtk(tool, args, &ct_small, &out);
        // A distinct SOP instance per variant, so each lands as its own file.
        dcmtk(
            "dcmodify",
            &["-nb", "-m", &format!("(0008,0018)=1.2.826.0.1.3680043.8.498.77.{i}")],
            &out,
            Path::new(""),
        );
        assert_eq!(dataset_bytes(&out).1, *ts, "{tool} {args:?} made another syntax");
        ct_files.push(out);
    }
    // HTJ2K, which neither the corpora nor DCMTK have: CT_small's pixels through OpenJPH, losslessly
    // (plain, and in the RPCL order of 1.2.840.10008.1.2.4.202, whose TLM marker Debian's OpenJPH
    // 0.9 cannot write: a decoder does not need it), and lossy.
    let htj2k: &[(&str, &[&str])] = &[
        ("1.2.840.10008.1.2.4.201", &["-reversible", "true"]),
        ("1.2.840.10008.1.2.4.202", &["-reversible", "true", "-prog_order", "RPCL"]),
        ("1.2.840.10008.1.2.4.203", &["-qstep", "0.001"]),
    ];
    let mut lossless_htj2k = Vec::new();
    for (i, (ts, args)) in htj2k.iter().enumerate() {
        let out = conv.join(format!("htj2k_{i}.dcm"));
        htj2k_from(&ct_small, &out, ts, args, &format!("1.2.826.0.1.3680043.8.498.78.{i}"));
        if args.contains(&"-reversible") {
            lossless_htj2k.push(out.clone());
        }
        ct_files.push(out);
    }
    // An 8-bit grayscale JPEG Baseline image from the corpus, relabelled as CT (no CT in the
    // corpora uses baseline JPEG: it cannot hold CT's 12 to 16 bits).
    let baseline = conv.join("baseline.dcm");
    std::fs::copy(data.join("pylibjpeg-data/ds/JPEGBaseline/JPEGBaseline_1s_1f_u_08_08.dcm"), &baseline).unwrap();
    dcmtk("dcmodify", &["-nb", "-m", &format!("(0008,0016)={CT}"), "-m", "(0008,0060)=CT"], &baseline, Path::new(""));
    ct_files.push(baseline);

    let mut stored_ts = std::collections::BTreeSet::new();
    let mut failures = Vec::new();
    for file in &ct_files {
        let header = dicom_object::OpenFileOptions::new().read_until(tags::PIXEL_DATA).open_file(file).unwrap();
        let sop =
            header.element(tags::SOP_INSTANCE_UID).unwrap().to_str().unwrap().trim_end_matches(['\0', ' ']).to_string();
        let ts = header.meta().transfer_syntax().trim_end_matches('\0').to_string();
        let (acknowledged, transcript) = match propose_flag(&ts) {
            Some(flag) => {
                let out = agent.storescu(&[flag], std::slice::from_ref(file));
                (store_outcomes(&out).0 == 1, output_text(&out))
            }
            None => {
                // storescu cannot propose this syntax on its own: send the data set as it is.
                let (bytes, ts) = dataset_bytes(file);
                let status = raw_store(agent.port, CT, &sop, &ts, &bytes);
                (status == 0, format!("status {status:#06x}"))
            }
        };
        assert!(agent.echo(), "agent down after {}", file.display());
        if !acknowledged {
            failures.push(format!("{}: {transcript}", file.display()));
            continue;
        }
        let spooled = agent.spool_files().into_iter().find(|p| p.file_stem().unwrap().to_string_lossy() == sop);
        let spooled = spooled.unwrap_or_else(|| panic!("{} acknowledged but not in the spool", file.display()));
        let obj = dicom_object::open_file(&spooled).unwrap();
        let kept_ts = obj.meta().transfer_syntax().trim_end_matches('\0').to_string();
        assert_eq!(kept_ts, ts, "{} was not kept in its syntax", file.display());
        stored_ts.insert(kept_ts);
        // What was acknowledged can be decoded by this build (12-bit JPEG Extended by our own
        // decoder, as the volume loader does).
        let obj = idaics::ingest::jpeg_extended::to_native(obj).unwrap_or_else(|e| panic!("{}: {e}", file.display()));
        obj.decode_pixel_data().unwrap_or_else(|e| panic!("{} stored but not decodable: {e}", file.display()));
    }
    assert!(failures.is_empty(), "failed to store:\n{}", failures.join("\n"));
    for (uid, name) in idaics::ingest::scp::transfer_syntaxes::ACCEPTED {
        assert!(stored_ts.contains(*uid), "no CT stored in {name}; stored: {stored_ts:?}");
    }
    // Lossless HTJ2K reads back as the pixels that went in, through the decoder the pipeline uses.
    let original = stored_pixels(&ct_small);
    assert_eq!(original.len(), 128 * 128);
    for file in &lossless_htj2k {
        let sop = sop_instance_uid(file);
        let spooled =
            agent.spool_files().into_iter().find(|p| p.file_stem().unwrap().to_string_lossy() == sop).unwrap();
        let read_back = stored_pixels(&spooled);
        let differing = original.iter().zip(&read_back).filter(|(a, b)| a != b).count();
        assert!(
            read_back.len() == original.len() && differing == 0,
            "{}: {differing} of {} pixels differ",
            file.display(),
            read_back.len()
        );
    }
}

/// The stored values of a single-frame 16-bit signed image, decoded from whatever its syntax.
fn stored_pixels(path: &Path) -> Vec<i16> {
    let object = dicom_object::open_file(path).unwrap();
    object.decode_pixel_data().unwrap().data_ow().into_iter().map(|v| v as i16).collect()
}

/// `source` (16-bit signed, one frame) with its pixel data compressed by OpenJPH's
/// `ojph_compress` (`args` choose lossless or lossy, progression order and markers), written to
/// `out` as transfer syntax `ts` and SOP instance `sop`.
fn htj2k_from(source: &Path, out: &Path, ts: &str, args: &[&str], sop: &str) {
    use dicom_core::value::{PixelFragmentSequence, Value};
    use dicom_core::{DataElement, PrimitiveValue, VR};
    require_tool("ojph_compress");
    let object = dicom_object::open_file(source).unwrap();
    let (rows, columns) = (
        object.element(tags::ROWS).unwrap().to_int::<u16>().unwrap(),
        object.element(tags::COLUMNS).unwrap().to_int::<u16>().unwrap(),
    );
    let raw = out.with_extension("raw");
    let codestream = out.with_extension("j2c");
    std::fs::write(&raw, object.element(tags::PIXEL_DATA).unwrap().to_bytes().unwrap()).unwrap();
    let dims = format!("{{{columns},{rows}}}");
    let mut command = std::process::Command::new("ojph_compress");
    command.arg("-i").arg(&raw).arg("-o").arg(&codestream);
    command.args(["-dims", &dims, "-num_comps", "1", "-signed", "true", "-bit_depth", "16", "-downsamp", "{1,1}"]);
    let run = command.args(args).output().unwrap();
    assert!(run.status.success() && codestream.exists(), "ojph_compress {args:?}: {}", output_text(&run));
    let mut dataset = object.into_inner();
    let fragments = PixelFragmentSequence::new(Vec::<u32>::new(), vec![std::fs::read(&codestream).unwrap()]);
    dataset.put(DataElement::new(tags::PIXEL_DATA, VR::OB, Value::PixelSequence(fragments)));
    dataset.put(DataElement::new(tags::SOP_INSTANCE_UID, VR::UI, PrimitiveValue::from(sop)));
    if !args.contains(&"-reversible") {
        dataset.put(DataElement::new(tags::LOSSY_IMAGE_COMPRESSION, VR::CS, PrimitiveValue::from("01")));
    }
    let meta = dicom_object::meta::FileMetaTableBuilder::new()
        .media_storage_sop_class_uid(CT)
        .media_storage_sop_instance_uid(sop)
        .transfer_syntax(ts)
        .implementation_class_uid("1.2.826.0.1.3680043.8.498.1")
        .build()
        .unwrap();
    dataset.with_exact_meta(meta).write_to_file(out).unwrap();
}

#[test]
fn broken_instances_get_failure_statuses_and_the_agent_stays_up() {
    let tmp = tempfile::tempdir().unwrap();
    let agent = Agent::start(&tmp.path().join("state"), &[]);
    let corpus = shared_data().join("corpora/pydicom-test-files");
    let (good, ts) = dataset_bytes(&corpus.join("CT_small.dcm"));
    let good_sop = sop_instance_uid(&corpus.join("CT_small.dcm"));

    let mut cases: Vec<(&str, String, Vec<u8>, u16)> = vec![
        ("truncated in the pixel data", good_sop.clone(), good[..good.len() - 5000].to_vec(), 0xC000),
        ("truncated in the header", good_sop.clone(), good[..300].to_vec(), 0xC000),
        ("random bytes", good_sop.clone(), (0..4000u32).map(|i| (i * 7919 % 251) as u8).collect(), 0xC000),
        ("empty data set", good_sop.clone(), Vec::new(), 0xC000),
        ("SOP instance differs from the command", "1.2.3.4.5".into(), good.clone(), 0xC000),
        ("invalid SOP instance UID in the command", "1.2.abc".into(), good.clone(), 0xC000),
    ];
    // Sequences nested 20000 deep (400 kB): the parser would recurse 20000 times and overflow.
    let nested = {
        let mut bytes = Vec::new();
        for _ in 0..20_000 {
            bytes.extend_from_slice(&[0x08, 0x00, 0x15, 0x11, b'S', b'Q', 0, 0, 0xFF, 0xFF, 0xFF, 0xFF]);
            bytes.extend_from_slice(&[0xFE, 0xFF, 0x00, 0xE0, 0xFF, 0xFF, 0xFF, 0xFF]);
        }
        for _ in 0..20_000 {
            bytes.extend_from_slice(&[0xFE, 0xFF, 0x0D, 0xE0, 0, 0, 0, 0, 0xFE, 0xFF, 0xDD, 0xE0, 0, 0, 0, 0]);
        }
        bytes
    };
    cases.push(("sequences nested 20000 deep", good_sop.clone(), nested, 0xC000));
    // 1.2 million empty private elements (10 MB): about a gigabyte once parsed.
    let flood: Vec<u8> = (0..1_200_000u32)
        .flat_map(|n| {
            let (group, element) = (0x0009 + 2 * (n >> 16) as u16, n as u16);
            let mut header = group.to_le_bytes().to_vec();
            header.extend_from_slice(&element.to_le_bytes());
            header.extend_from_slice(b"LO\0\0");
            header
        })
        .collect();
    cases.push(("1.2 million data elements", good_sop.clone(), flood, 0xC000));
    // A text value that claims 4 GB, in front of a good data set: the parser would zero 4 GB.
    let mut overlong = vec![0x09, 0x00, 0x10, 0x10, b'U', b'T', 0, 0, 0xF0, 0xFF, 0xFF, 0xFF];
    overlong.extend_from_slice(&good);
    cases.push(("a value claiming 4 GB", good_sop.clone(), overlong, 0xC000));
    // Values that are all there but too large to hold: a 2 MiB private OB, and a private string
    // of a million numbers (2 MB), each in front of a good data set. Every later parse would
    // hold them whole.
    let with_value_in_front = |vr: &[u8; 2], value: Vec<u8>| {
        let mut bytes = vec![0x09, 0x00, 0x10, 0x10, vr[0], vr[1], 0, 0];
        bytes.extend_from_slice(&(value.len() as u32).to_le_bytes());
        bytes.extend_from_slice(&value);
        bytes.extend_from_slice(&good);
        bytes
    };
    cases.push(("a 2 MiB OB value", good_sop.clone(), with_value_in_front(b"OB", vec![0x5A; 2 << 20]), 0xC000));
    cases.push((
        "a string of a million values",
        good_sop.clone(),
        with_value_in_front(b"UT", b"1\\".repeat(1 << 20)),
        0xC000,
    ));
    // Native pixel data a hundred times what Rows and Columns declare: held whole at analysis.
    let oversized_pixels = {
        use dicom_core::{DataElement, PrimitiveValue, VR};
        let mut object = dicom_object::open_file(corpus.join("CT_small.dcm")).unwrap().into_inner();
        object.put(DataElement::new(tags::PIXEL_DATA, VR::OW, PrimitiveValue::from(vec![0u8; 128 * 128 * 2 * 100])));
        let mut out = Vec::new();
        object
            .write_dataset_with_ts(
                &mut out,
                &dicom_transfer_syntax_registry::entries::EXPLICIT_VR_LITTLE_ENDIAN.erased(),
            )
            .unwrap();
        out
    };
    cases.push(("pixel data a hundred times the image", good_sop.clone(), oversized_pixels, 0xC000));
    // Corpus files broken by their makers, sent byte for byte as data sets.
    for name in ["no_meta.dcm", "MR_truncated.dcm", "rtplan_truncated.dcm"] {
        let bytes = std::fs::read(corpus.join(name)).unwrap();
        cases.push((name, good_sop.clone(), bytes, 0xC000));
    }
    // A data set whose UIDs are missing.
    let no_study_uid = {
        let obj = dicom_object::open_file(corpus.join("CT_small.dcm")).unwrap();
        let mut obj = obj.into_inner();
        obj.remove_element(tags::STUDY_INSTANCE_UID);
        let mut out = Vec::new();
        obj.write_dataset_with_ts(
            &mut out,
            &dicom_transfer_syntax_registry::entries::EXPLICIT_VR_LITTLE_ENDIAN.erased(),
        )
        .unwrap();
        out
    };
    cases.push(("no StudyInstanceUID", good_sop.clone(), no_study_uid, 0xC000));
    // A JPEG-LS codestream damaged in the middle: the file parses, the pixels do not decode.
    let jls = tmp.path().join("jls.dcm");
    dcmtk("dcmcjpls", &["+el"], &corpus.join("CT_small.dcm"), &jls);
    let (mut jls_bytes, jls_ts) = dataset_bytes(&jls);
    let n = jls_bytes.len();
    jls_bytes[n * 6 / 10..n * 9 / 10].fill(0xFF);
    let mut crafted: Vec<(&str, String, Vec<u8>)> = Vec::new();

    // Headers that promise more pixels than the data carries: the agent must refuse them before
    // a decoder or the volume loader allocates what they promise (65535 x 65535 is 8 GB a frame).
    let rle = tmp.path().join("rle.dcm");
    dcmtk("dcmcrle", &[], &corpus.join("CT_small.dcm"), &rle);
    let ct_small = corpus.join("CT_small.dcm");
    for (what, source, changes) in [
        ("65535 x 65535 pixels claimed over 128 x 128", &ct_small, &["-m", "Rows=65535", "-m", "Columns=65535"][..]),
        ("512 x 512 pixels claimed over 128 x 128", &ct_small, &["-m", "Rows=512", "-m", "Columns=512"]),
        ("BitsAllocated 12", &ct_small, &["-m", "BitsAllocated=12"]),
        ("no Rows", &ct_small, &["-e", "Rows"]),
        ("no PixelData", &ct_small, &["-e", "(7fe0,0010)"]),
        ("a 128 x 128 JPEG-LS codestream under a 256 x 256 header", &jls, &["-m", "Rows=256", "-m", "Columns=256"]),
        ("1000 frames claimed over one RLE fragment", &rle, &["-i", "NumberOfFrames=1000"]),
    ] {
        let path = tmp.path().join(format!("crafted-{}.dcm", cases.len()));
        std::fs::write(&path, std::fs::read(source).unwrap()).unwrap();
        let mut args = vec!["-nb", "-q"];
        args.extend_from_slice(changes);
        dcmtk("dcmodify", &args, &path, Path::new(""));
        let (bytes, crafted_ts) = dataset_bytes(&path);
        crafted.push((what, crafted_ts, bytes));
    }

    // A real JPEG 2000 CT whose codestream claims 60000 x 60000 pixels under its 512 x 512
    // header: a decoder worked on it for half a minute before it panicked.
    let (mut j2k, j2k_ts) = dataset_bytes(&corpus.join("693_J2KI.dcm"));
    let siz = j2k.windows(4).position(|w| w == [0xFF, 0x4F, 0xFF, 0x51]).expect("a SIZ segment") + 2;
    j2k[siz + 6..siz + 14].copy_from_slice(&[0, 0, 0xEA, 0x60, 0, 0, 0xEA, 0x60]);
    crafted.push(("a JPEG 2000 stream larger than its header", j2k_ts.clone(), j2k.clone()));
    // The same stream at its own size but with 400 components (SIZ rewritten in place, over what
    // follows it): a decoder sizes its planes by the stream's count, not SamplesPerPixel's.
    let mut many_components = j2k;
    let components: u16 = 400;
    many_components[siz + 2..siz + 4].copy_from_slice(&(38 + 3 * components).to_be_bytes());
    many_components[siz + 6..siz + 14].copy_from_slice(&[0, 0, 2, 0, 0, 0, 2, 0]);
    many_components[siz + 38..siz + 40].copy_from_slice(&components.to_be_bytes());
    for component in 0..usize::from(components) {
        many_components[siz + 40 + 3 * component..siz + 43 + 3 * component].copy_from_slice(&[0x8F, 1, 1]);
    }
    crafted.push(("a JPEG 2000 stream with 400 components", j2k_ts.clone(), many_components));
    // A JPEG 2000 CT whose header and codestream both claim 16384 x 16384 pixels over a few
    // kilobytes: decoding its first frame would take 512 MiB.
    let claims_16384 = {
        use dicom_core::{DataElement, PrimitiveValue, VR};
        let (mut bytes, _) = dataset_bytes(&corpus.join("693_J2KI.dcm"));
        let siz = bytes.windows(4).position(|w| w == [0xFF, 0x4F, 0xFF, 0x51]).unwrap() + 2;
        bytes[siz + 6..siz + 14].copy_from_slice(&[0, 0, 0x40, 0, 0, 0, 0x40, 0]);
        let ts =
            dicom_encoding::TransferSyntaxIndex::get(&dicom_transfer_syntax_registry::TransferSyntaxRegistry, &j2k_ts)
                .unwrap();
        let mut object = dicom_object::InMemDicomObject::read_dataset_with_ts(&bytes[..], ts).unwrap();
        for tag in [tags::ROWS, tags::COLUMNS] {
            object.put(DataElement::new(tag, VR::US, PrimitiveValue::from(16384u16)));
        }
        let mut out = Vec::new();
        object.write_dataset_with_ts(&mut out, ts).unwrap();
        out
    };
    crafted.push(("a JPEG 2000 CT claiming 16384 x 16384", j2k_ts, claims_16384));
    // A JPEG-LS frame cut short (its fragment's length amended to match): CharLS decodes such a
    // stream for seconds or for ever, and this one kept it busy for minutes.
    let cut_short = tmp.path().join("jls-cut.dcm");
    {
        use dicom_core::value::{PixelFragmentSequence, Value};
        use dicom_core::{DataElement, VR};
        let mut object = dicom_object::open_file(&jls).unwrap();
        let fragment = object.element(tags::PIXEL_DATA).unwrap().value().fragments().unwrap()[0].clone();
        let fragments = PixelFragmentSequence::new(Vec::<u32>::new(), vec![fragment[..2236].to_vec()]);
        object.put(DataElement::new(tags::PIXEL_DATA, VR::OB, Value::PixelSequence(fragments)));
        object.write_to_file(&cut_short).unwrap();
    }
    let (cut_short, cut_short_ts) = dataset_bytes(&cut_short);
    crafted.push(("a JPEG-LS stream cut short", cut_short_ts, cut_short));
    // 12-bit JPEG Extended, which our own decoder reads: cut short, and with its entropy-coded
    // data overwritten.
    let extended = tmp.path().join("extended.dcm");
    dcmtk("dcmcjpeg", &["+ee"], &ct_small, &extended);
    for (what, damage) in [
        ("a JPEG Extended stream cut short", &(|f: &mut Vec<u8>| f.truncate(f.len() / 2)) as &dyn Fn(&mut Vec<u8>)),
        ("a JPEG Extended stream with damaged coded data", &|f: &mut Vec<u8>| {
            let n = f.len();
            f[n / 2..n / 2 + 64].fill(0xFF);
        }),
    ] {
        use dicom_core::value::{PixelFragmentSequence, Value};
        use dicom_core::{DataElement, VR};
        let mut object = dicom_object::open_file(&extended).unwrap();
        let mut fragment = object.element(tags::PIXEL_DATA).unwrap().value().fragments().unwrap()[0].clone();
        damage(&mut fragment);
        fragment.resize(fragment.len().next_multiple_of(2), 0);
        let fragments = PixelFragmentSequence::new(Vec::<u32>::new(), vec![fragment]);
        object.put(DataElement::new(tags::PIXEL_DATA, VR::OB, Value::PixelSequence(fragments)));
        let path = tmp.path().join(format!("crafted-{}.dcm", crafted.len()));
        object.write_to_file(&path).unwrap();
        let (bytes, ts) = dataset_bytes(&path);
        crafted.push((what, ts, bytes));
    }

    let mut sent = 0;
    for (what, ts, bytes) in &crafted {
        let status = raw_store(agent.port, CT, &good_sop, ts, bytes);
        sent += 1;
        assert_eq!(status, 0xC000, "{what}: status {status:#06x}");
        assert!(agent.echo(), "agent stopped answering after: {what}");
    }
    for (what, sop, bytes, expected) in &cases {
        let status = raw_store(agent.port, CT, sop, &ts, bytes);
        sent += 1;
        assert_eq!(status, *expected, "{what}: status {status:#06x}");
        assert!(agent.echo(), "agent stopped answering after: {what}");
    }
    let status = raw_store(agent.port, CT, &good_sop, &jls_ts, &jls_bytes);
    sent += 1;
    assert_eq!(status, 0xC000, "corrupt JPEG-LS codestream: status {status:#06x}");
    assert!(agent.echo());
    // A deflated data set of 1 MB that inflates to 1 GiB, over the 256 MiB inflated limit.
    let bomb = {
        use std::io::Write;
        let mut encoder = flate2::write::DeflateEncoder::new(Vec::new(), flate2::Compression::best());
        encoder.write_all(&[0x09, 0x00, 0x10, 0x10, b'O', b'B', 0, 0, 0x00, 0x00, 0x00, 0x40]).unwrap();
        let zeros = vec![0u8; 1 << 20];
        for _ in 0..1024 {
            encoder.write_all(&zeros).unwrap();
        }
        encoder.finish().unwrap()
    };
    assert!(bomb.len() < 2 << 20, "{} bytes deflated", bomb.len());
    let status = raw_store(agent.port, CT, &good_sop, "1.2.840.10008.1.2.1.99", &bomb);
    sent += 1;
    assert_eq!(status, 0xA700, "deflate bomb: status {status:#06x}");
    assert!(agent.echo());
    assert!(agent.spool_files().is_empty(), "a broken instance entered the spool");
    assert_eq!(partial_files(&agent.state_dir), Vec::<PathBuf>::new(), "temporary files left");
    // Each failure is logged with its reason.
    let failures = agent.events("store failed");
    assert_eq!(failures.len(), sent, "{}", agent.log());
    for reason in [
        "sequences nested more than 64 deep",
        "more than 1000000 data elements",
        "claims 4294967280 bytes",
        "the compressed stream is 60000 x 60000 pixels, the header says 512 x 512",
        "the compressed stream has 400 components, the header says 1 sample(s) per pixel",
        "the JPEG-LS stream ends without its end-of-image marker",
        "PixelData holds 32768 bytes; 1 frame(s) of 512 x 512 pixels",
        "no PixelData",
        "(0009,1010) (OB) holds 2097152 bytes, more than the 1048576 bytes",
        "(0009,1010) (UT) holds 2097152 bytes",
        "need only 32768",
        "a frame of 16384 x 16384 pixels",
        "inflates to more than the limit of 268435456 bytes",
    ] {
        assert!(
            failures.iter().any(|f| f["fields"]["reason"].as_str().unwrap_or("").contains(reason)),
            "no failure says {reason:?}:\n{}",
            agent.log()
        );
    }
    // And a good instance still goes through, and none of it took the agent's memory.
    assert_eq!(raw_store(agent.port, CT, &good_sop, EXPLICIT_LE, &good), 0x0000);
    assert_eq!(agent.spool_files().len(), 1);
    let peak_mb = agent.peak_rss_kb() / 1024;
    assert!(peak_mb < 512, "peak RSS {peak_mb} MB");
    eprintln!("peak RSS after the broken instances: {peak_mb} MB");
}

#[test]
fn non_ct_objects_follow_the_configured_policy() {
    let tmp = tempfile::tempdir().unwrap();
    let corpus = shared_data().join("corpora/pydicom-test-files");
    let others = [corpus.join("MR_small.dcm"), corpus.join("reportsi.dcm"), corpus.join("waveform_ecg.dcm")];

    let discard = Agent::start(&tmp.path().join("discard"), &[("IDAICS_DICOM_OTHER_SOP_CLASSES", "discard")]);
    let out = discard.storescu(&[], &others);
    assert_eq!(store_outcomes(&out), (3, 0), "{}", output_text(&out));
    assert!(discard.spool_files().is_empty(), "discarded objects were stored");
    assert_eq!(discard.events("instance of a non-CT SOP class accepted and discarded").len(), 3);

    let refuse = Agent::start(&tmp.path().join("refuse"), &[("IDAICS_DICOM_OTHER_SOP_CLASSES", "refuse")]);
    let out = refuse.storescu(&[], &others[..1]);
    assert_eq!(store_outcomes(&out).0, 0, "{}", output_text(&out));
    let text = output_text(&out);
    assert!(text.contains("No Acceptable Presentation Contexts") || text.contains("No presentation context"), "{text}");
    // A CT in the same association mix still goes through.
    let out = refuse.storescu(&["--no-halt"], &[others[0].clone(), corpus.join("CT_small.dcm")]);
    assert_eq!(store_outcomes(&out).0, 1, "{}", output_text(&out));
    assert_eq!(refuse.spool_files().len(), 1);
}

/// A series sent whole, then topped up by instances sent one association each (a PACS resending
/// what a first send missed): the late instances make one revision, not one each.
#[test]
fn late_instances_sent_one_per_association_make_one_revision() {
    let tmp = tempfile::tempdir().unwrap();
    let series =
        write_ct_series(&tmp.path().join("in"), &SeriesSpec { slices: 12, size: 64, seed: 15, ..Default::default() })
            .unwrap();
    let agent = Agent::start(&tmp.path().join("state"), &[("IDAICS_SERIES_QUIET_PERIOD_S", "2")]);
    // The first ten in one association, decided at its release.
    assert_eq!(store_outcomes(&agent.storescu(&[], &series.files[..10])), (10, 0));
    agent.wait_for("the release decision", Duration::from_secs(10), |a| {
        a.series_record(&series.study_uid, &series.series_uid).is_some()
    });
    let record = agent.series_record(&series.study_uid, &series.series_uid).unwrap();
    assert_eq!(record["trigger"], "association-released", "{record}");
    send_one_association_each(&agent, &series.files[10..]);
    agent.wait_for("the second decision", Duration::from_secs(10), |a| {
        a.series_record(&series.study_uid, &series.series_uid).is_some_and(|r| r["revision"] == 2)
    });
    let record = agent.series_record(&series.study_uid, &series.series_uid).unwrap();
    assert_eq!((record["trigger"].as_str(), record["slices"].as_u64()), (Some("quiet-period"), Some(12)), "{record}");
    std::thread::sleep(Duration::from_secs(3));
    let revisions = agent.series_record(&series.study_uid, &series.series_uid).unwrap()["revision"].clone();
    assert_eq!(revisions, 2, "log:\n{}", agent.log());
}

/// The same sender across a restart: the restarted agent never saw the earlier associations end,
/// and must not take the first release after it for the end of the series.
#[test]
fn a_series_sent_one_instance_per_association_across_a_restart_is_decided_once() {
    let tmp = tempfile::tempdir().unwrap();
    let series =
        write_ct_series(&tmp.path().join("in"), &SeriesSpec { slices: 12, size: 64, seed: 14, ..Default::default() })
            .unwrap();
    let state = tmp.path().join("state");
    let mut before = Agent::start(&state, &[("IDAICS_SERIES_QUIET_PERIOD_S", "60")]);
    send_one_association_each(&before, &series.files[..5]);
    before.kill();

    let agent = Agent::start_on(&state, free_port(), &[("IDAICS_SERIES_QUIET_PERIOD_S", "2")]);
    send_one_association_each(&agent, &series.files[5..]);
    assert!(
        agent.series_record(&series.study_uid, &series.series_uid).is_none(),
        "decided while it was still arriving:\n{}",
        agent.log()
    );
    agent.wait_for("quiet period", Duration::from_secs(10), |a| {
        a.series_record(&series.study_uid, &series.series_uid).is_some()
    });
    let record = agent.series_record(&series.study_uid, &series.series_uid).unwrap();
    assert_eq!(
        (record["trigger"].as_str(), record["slices"].as_u64(), record["revision"].as_u64()),
        (Some("quiet-period"), Some(12), Some(1)),
        "{record}"
    );
    std::thread::sleep(Duration::from_secs(3));
    let completions = log_events(&before.log_path, "series complete").len() + agent.events("series complete").len();
    assert_eq!(completions, 1, "log:\n{}", agent.log());
}

#[test]
fn kill_during_a_series_loses_nothing_acknowledged() {
    let tmp = tempfile::tempdir().unwrap();
    let series =
        write_ct_series(&tmp.path().join("in"), &SeriesSpec { slices: 240, size: 256, seed: 13, ..Default::default() })
            .unwrap();
    let state = tmp.path().join("state");
    let env = [("IDAICS_SERIES_QUIET_PERIOD_S", "60")];
    let mut agent = Agent::start(&state, &env);
    let port = agent.port;

    let files = series.files.clone();
    let sender = std::thread::spawn(move || storescu(port, &[], &files));
    agent.wait_for("the first instances", Duration::from_secs(30), |a| a.spool_files().len() >= 10);
    agent.kill();
    let out = sender.join().unwrap();
    let (acknowledged, _) = store_outcomes(&out);
    // The kill can land between an instance's rename into the spool and its answer: one
    // association has at most one such instance, so 10 in the spool means at least 9 answered.
    assert!((9..240).contains(&acknowledged), "not killed mid-series: {acknowledged} acknowledged");

    // Every acknowledged instance is there, whole.
    let spooled = agent.spool_files();
    assert!(spooled.len() >= acknowledged, "{} acknowledged, {} in the spool", acknowledged, spooled.len());
    for p in &spooled {
        dicom_object::open_file(p).unwrap_or_else(|e| panic!("{} is damaged: {e}", p.display()));
    }
    let first_log = agent.log_path.clone();

    // Restart, send what is missing, and the series completes exactly once.
    let agent = Agent::start_on(&state, free_port(), &env);
    assert!(agent.log().contains("recovered pending series from the spool"), "{}", agent.log());
    let have: std::collections::HashSet<String> =
        spooled.iter().map(|p| p.file_stem().unwrap().to_string_lossy().into_owned()).collect();
    let rest: Vec<PathBuf> =
        series.files.iter().zip(&series.sop_uids).filter(|(_, s)| !have.contains(*s)).map(|(f, _)| f.clone()).collect();
    assert_eq!(store_outcomes(&agent.storescu(&[], &rest)), (rest.len(), 0));
    agent.wait_for("completion", Duration::from_secs(15), |a| {
        a.series_record(&series.study_uid, &series.series_uid).is_some()
    });
    let record = agent.series_record(&series.study_uid, &series.series_uid).unwrap();
    assert_eq!(record["state"], "complete");
    assert_eq!(record["instances"], 240);
    assert_eq!(record["revision"], 1);
    assert_eq!(agent.spool_files().len(), 240);
    // The record is written before its log line: wait for the line, then count.
    let completions = |a: &Agent| log_events(&first_log, "series complete").len() + a.events("series complete").len();
    agent.wait_for("the completion in the log", Duration::from_secs(10), |a| completions(a) >= 1);
    assert_eq!(completions(&agent), 1, "log:\n{}", agent.log());
    assert_eq!(partial_files(&state), Vec::<PathBuf>::new(), "partial file survived the restart");
}

/// A running agent remembers each decided series in its spool, to tell an instance sent again
/// from a late one that reopens its series; retention may keep millions of instances. A spool of
/// 100 000 decided instances (empty files: only the names of a decided series are read) must
/// cost the agent a few MB over an empty spool, not the tens that holding their UIDs took.
#[test]
fn a_spool_of_a_hundred_thousand_decided_instances_costs_little_memory() {
    let tmp = tempfile::tempdir().unwrap();
    let full = tmp.path().join("full");
    let (series_count, per_series) = (500, 200);
    for s in 0..series_count {
        let (study, series) = (format!("2.25.{}", 1000 + s / 10), format!("2.25.{}", 100_000 + s));
        let dir = full.join("spool").join(&study).join(&series);
        std::fs::create_dir_all(&dir).unwrap();
        for i in 0..per_series {
            std::fs::File::create(dir.join(format!("1.2.826.0.1.3680043.8.498.{s}.{i}.1234567890123456789.{i}.dcm")))
                .unwrap();
        }
        let record = idaics::ingest::spool::SeriesRecord {
            study_instance_uid: study,
            series_instance_uid: series,
            state: "complete".into(),
            skip_reason: None,
            trigger: "quiet-period".into(),
            instances: per_series,
            slices: per_series,
            revision: 1,
            decided_at: "2026-11-01T00:00:00Z".into(),
            purged_at: None,
        };
        std::fs::write(dir.join("series.json"), serde_json::to_vec(&record).unwrap()).unwrap();
    }
    let decided = |agent: &Agent| {
        let rebuilt = "series state rebuilt from the spool";
        agent.wait_for("the rebuilt state", Duration::from_secs(60), |a| !a.events(rebuilt).is_empty());
        agent.events(rebuilt)[0]["fields"]["decided"].as_u64().unwrap()
    };
    let empty = Agent::start(&tmp.path().join("empty"), &[]);
    let loaded = Agent::start(&full, &[]);
    assert_eq!((decided(&empty), decided(&loaded)), (0, series_count));
    let grown_mb = (loaded.peak_rss_kb() as f64 - empty.peak_rss_kb() as f64) / 1024.0;
    assert!(grown_mb < 12.0, "{grown_mb:.1} MB more for a spool of {} instances", series_count * per_series as u64);
}

#[test]
fn four_concurrent_associations_deliver_everything() {
    let tmp = tempfile::tempdir().unwrap();
    let agent = Agent::start(&tmp.path().join("state"), &[("IDAICS_SERIES_QUIET_PERIOD_S", "2")]);
    let all: Vec<_> = (0..4)
        .map(|i| {
            write_ct_series(
                &tmp.path().join(format!("in{i}")),
                &SeriesSpec { slices: 30, size: 128, seed: 100 + i, ..Default::default() },
            )
            .unwrap()
        })
        .collect();
    let port = agent.port;
    let senders: Vec<_> = all
        .iter()
        .map(|s| {
            let files = s.files.clone();
            std::thread::spawn(move || storescu(port, &[], &files))
        })
        .collect();
    for sender in senders {
        let out = sender.join().unwrap();
        assert_eq!(store_outcomes(&out), (30, 0), "{}", output_text(&out));
    }
    assert_eq!(agent.spool_files().len(), 120);
    for s in &all {
        agent.wait_for("completion", Duration::from_secs(10), |a| {
            a.series_record(&s.study_uid, &s.series_uid).is_some()
        });
        assert_eq!(agent.series_record(&s.study_uid, &s.series_uid).unwrap()["instances"], 30);
    }
    // The record is written before the log line, so the last line may still be on its way; then
    // wait out the quiet period once more to see that nothing completes twice.
    agent.wait_for("four completions in the log", Duration::from_secs(10), |a| a.events("series complete").len() >= 4);
    std::thread::sleep(Duration::from_secs(3));
    assert_eq!(agent.events("series complete").len(), 4, "log:\n{}", agent.log());
}

#[test]
fn access_control_and_limits_reject_with_reasons() {
    let tmp = tempfile::tempdir().unwrap();
    let agent = Agent::start(&tmp.path().join("a"), &[("IDAICS_DICOM_ALLOWED_CALLING_AE_TITLES", "PACS,CT1")]);
    let echo = |calling: &str, called: &str| {
        std::process::Command::new("echoscu")
            .args(["-aet", calling, "-aec", called, "127.0.0.1", &agent.port.to_string()])
            .output()
            .unwrap()
    };
    assert!(echo("PACS", AE).status.success());
    let wrong_called = echo("PACS", "OTHER");
    assert!(!wrong_called.status.success());
    assert!(output_text(&wrong_called).contains("Called AE Title Not Recognized"), "{}", output_text(&wrong_called));
    let stranger = echo("STRANGER", AE);
    assert!(output_text(&stranger).contains("Calling AE Title Not Recognized"), "{}", output_text(&stranger));

    // Nobody said who may send: every association is refused, and the agent says why, in its log
    // and in /readyz.
    let http = free_port();
    let closed = Agent::start(
        &tmp.path().join("closed"),
        &[("IDAICS_DICOM_ALLOW_ANY_PEER", "false"), ("IDAICS_HTTP_PORT", &http.to_string())],
    );
    assert!(!closed.echo(), "an agent nobody configured accepted an association");
    assert!(closed.log().contains("no sender is allowed yet"), "{}", closed.log());
    let (status, body) = http_get(http, "/readyz");
    assert_eq!(status, 503, "{body}");
    let ready: serde_json::Value = serde_json::from_str(&body).unwrap();
    assert_eq!(ready["accepting_associations"], false, "{body}");
    assert!(ready["not_accepting_because"].as_str().unwrap().contains("dicom.allowed_peers"), "{body}");
    // Listing the sender's AE title is enough.
    let by_title = Agent::start(
        &tmp.path().join("by-title"),
        &[("IDAICS_DICOM_ALLOW_ANY_PEER", "false"), ("IDAICS_DICOM_ALLOWED_CALLING_AE_TITLES", "ECHOSCU")],
    );
    assert!(by_title.echo(), "{}", by_title.log());

    let peers = Agent::start(&tmp.path().join("b"), &[("IDAICS_DICOM_ALLOWED_PEERS", "10.0.0.0/8")]);
    assert!(!peers.echo(), "loopback peer accepted despite the allow-list");
    assert!(peers.log().contains("peer address not in the allow-list"));

    // Free disk below the minimum: associations are refused, nothing is written.
    let full = Agent::start(&tmp.path().join("c"), &[("IDAICS_LIMITS_MIN_FREE_DISK_MB", "999999999")]);
    let out = full.storescu(&[], &[shared_data().join("corpora/pydicom-test-files/CT_small.dcm")]);
    assert!(output_text(&out).contains("Rejected Transient"), "{}", output_text(&out));
    assert!(full.spool_files().is_empty());

    // An instance over the size limit gets 0xA700 and leaves no file behind.
    let small = Agent::start(&tmp.path().join("d"), &[("IDAICS_LIMITS_MAX_INSTANCE_SIZE_MB", "1")]);
    let big =
        write_ct_series(&tmp.path().join("big"), &SeriesSpec { slices: 2, size: 1024, seed: 5, ..Default::default() })
            .unwrap();
    let out = small.storescu(&[], &big.files[..1]);
    assert!(output_text(&out).contains("Refused: OutOfResources"), "{}", output_text(&out));
    assert!(small.spool_files().is_empty());
    assert_eq!(partial_files(&small.state_dir), Vec::<PathBuf>::new());
    assert!(small.echo());
}

/// What real peers send that the agent does not serve must leave a log line that says so: a PACS
/// administrator reads the agent's log, not the peer's, when a send fails.
#[test]
fn requests_the_agent_does_not_serve_are_named_in_its_log() {
    require_tool("findscu");
    let tmp = tempfile::tempdir().unwrap();
    let agent = Agent::start(&tmp.path().join("state"), &[]);
    let series =
        write_ct_series(&tmp.path().join("series"), &SeriesSpec { slices: 2, size: 64, seed: 8, ..Default::default() })
            .unwrap();

    // A user identity is ignored (access is by AE title and address) unless the sender insists
    // on a positive response, which the agent does not give: that sender closes the association.
    let plain = agent.storescu(&["--user", "alice", "--password", "secret"], &series.files[..1]);
    assert_eq!(store_outcomes(&plain), (1, 0), "{}", output_text(&plain));
    assert!(!agent.log().contains("positive user identity response"));
    let insisting = agent.storescu(&["--user", "alice", "--password", "secret", "--pos-response"], &series.files[1..]);
    assert!(!insisting.status.success(), "{}", output_text(&insisting));
    assert!(agent.log().contains("the peer asks for a positive user identity response"), "{}", agent.log());
    agent.wait_for("the hang-up in the log", Duration::from_secs(10), |a| {
        a.log().contains("the peer closed the connection without releasing the association")
    });

    // A query is not a service of this agent: no context is accepted and the log names the query.
    let find = std::process::Command::new("findscu")
        .args(["-aec", AE, "-S", "-k", "QueryRetrieveLevel=STUDY", "127.0.0.1", &agent.port.to_string()])
        .output()
        .unwrap();
    assert!(output_text(&find).contains("No Acceptable Presentation Contexts"), "{}", output_text(&find));
    agent.wait_for("the refused query in the log", Duration::from_secs(10), |a| {
        a.log().contains("no proposed presentation context is acceptable")
    });
    assert!(agent.log().contains("Study Root Query/Retrieve Information Model - FIND"), "{}", agent.log());

    // Not DICOM at all: a browser, and a peer set up for DICOM over TLS.
    for (bytes, what) in [
        (&b"GET / HTTP/1.1\r\nHost: pacs\r\n\r\n"[..], "an HTTP request"),
        (&[0x16, 0x03, 0x01, 0x02, 0x00, 0x01][..], "a TLS handshake"),
    ] {
        use std::io::{Read, Write};
        let mut stream = std::net::TcpStream::connect(("127.0.0.1", agent.port)).unwrap();
        stream.write_all(bytes).unwrap();
        stream.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
        let _ = stream.read(&mut [0u8; 16]);
        agent.wait_for(what, Duration::from_secs(10), |a| {
            a.events("not a DICOM association request; closing the connection")
                .iter()
                .any(|e| e["fields"]["what"].as_str().is_some_and(|w| w.starts_with(what)))
        });
    }
    assert!(agent.echo());
    assert_eq!(agent.spool_files().len(), 1);
}

/// The standard sets no lower bound on the largest PDU a peer takes: the agent cuts its
/// responses to fit, here PDUs of 64 bytes, where a C-STORE response with an error comment takes
/// about 200. DCMTK and dicom-ul announce 1 kB or more, so the peer is written here on the socket.
#[test]
fn responses_are_cut_to_fit_a_peer_that_takes_only_small_pdus() {
    use dicom_ul::Pdu;
    use dicom_ul::pdu::{AssociationRQ, PDataValue, PDataValueType, PresentationContextProposed, UserVariableItem};
    use std::io::{Read, Write};
    const PEER_MAX: u32 = 64;
    let tmp = tempfile::tempdir().unwrap();
    let series =
        write_ct_series(&tmp.path().join("in"), &SeriesSpec { slices: 1, size: 32, seed: 21, ..Default::default() })
            .unwrap();
    let agent = Agent::start(&tmp.path().join("state"), &[]);
    let (dataset, ts) = dataset_bytes(&series.files[0]);
    let mut socket = std::net::TcpStream::connect(("127.0.0.1", agent.port)).unwrap();
    socket.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
    let mut reader = socket.try_clone().unwrap();
    let mut send = |pdu: Pdu| {
        let mut bytes = Vec::new();
        dicom_ul::pdu::write_pdu(&mut bytes, &pdu).unwrap();
        socket.write_all(&bytes).unwrap();
    };
    send(Pdu::AssociationRQ(AssociationRQ {
        protocol_version: 1,
        calling_ae_title: "SMALLPDU".into(),
        called_ae_title: AE.into(),
        application_context_name: "1.2.840.10008.3.1.1.1".into(),
        presentation_contexts: vec![PresentationContextProposed {
            id: 1,
            abstract_syntax: CT.into(),
            transfer_syntaxes: vec![ts.clone()],
        }],
        user_variables: vec![UserVariableItem::MaxLength(PEER_MAX)],
    }));
    // Every PDU the agent sends, checked against the announced maximum as it arrives.
    let mut receive = move || -> Pdu {
        let mut header = [0u8; 6];
        reader.read_exact(&mut header).unwrap();
        let length = u32::from_be_bytes(header[2..6].try_into().unwrap());
        let mut body = vec![0u8; length as usize];
        reader.read_exact(&mut body).unwrap();
        let whole = [&header[..], &body].concat();
        let pdu = dicom_ul::pdu::read_pdu(&whole[..], dicom_ul::pdu::MAXIMUM_PDU_SIZE, false).unwrap().unwrap();
        if matches!(pdu, Pdu::PData { .. }) {
            assert!(length <= PEER_MAX, "a PDU of {length} bytes to a peer that takes {PEER_MAX}");
        }
        pdu
    };
    assert!(matches!(receive(), Pdu::AssociationAC(_)));
    let mut store = |data: &[u8]| -> u16 {
        let command = idaics::dimse::store_request(CT, &series.sop_uids[0], 1).unwrap();
        for (value_type, bytes) in [(PDataValueType::Command, command), (PDataValueType::Data, data.to_vec())] {
            send(Pdu::PData {
                data: vec![PDataValue { presentation_context_id: 1, value_type, is_last: true, data: bytes }],
            });
        }
        let mut response = Vec::new();
        let mut fragments = 0;
        loop {
            let Pdu::PData { data } = receive() else { panic!("no response") };
            fragments += 1;
            response.extend_from_slice(&data[0].data);
            if data[0].is_last {
                break;
            }
        }
        assert!(fragments > 1);
        let object = dicom_object::InMemDicomObject::read_dataset_with_ts(
            &response[..],
            &dicom_transfer_syntax_registry::entries::IMPLICIT_VR_LITTLE_ENDIAN.erased(),
        )
        .unwrap();
        object.element(dicom_dictionary_std::tags::STATUS).unwrap().to_int::<u16>().unwrap()
    };
    // A failure carries an error comment, the longest response the agent gives.
    assert_eq!(store(&dataset[..dataset.len() / 2]), 0xC000);
    assert_eq!(store(&dataset), 0x0000);
    send(Pdu::ReleaseRQ);
    assert!(matches!(receive(), Pdu::ReleaseRP));
    assert_eq!(agent.spool_files().len(), 1);
    assert!(agent.events("protocol error; aborting association").is_empty(), "{}", agent.log());
}

/// A sender that stops in the middle of an instance: the association is aborted after the idle
/// timeout, the half-received instance leaves nothing behind, and the agent serves the next peer.
#[test]
fn a_sender_that_stalls_mid_instance_is_aborted_after_the_idle_timeout() {
    use dicom_ul::Pdu;
    use dicom_ul::pdu::{PDataValue, PDataValueType};
    let tmp = tempfile::tempdir().unwrap();
    let series =
        write_ct_series(&tmp.path().join("in"), &SeriesSpec { slices: 2, size: 256, seed: 16, ..Default::default() })
            .unwrap();
    let agent = Agent::start(&tmp.path().join("state"), &[("IDAICS_LIMITS_IDLE_TIMEOUT_S", "1")]);
    let (dataset, ts) = dataset_bytes(&series.files[0]);
    let mut association = dicom_ul::association::client::ClientAssociationOptions::new()
        .calling_ae_title("STALLER")
        .with_presentation_context(CT, vec![ts.as_str()])
        .establish_with(&format!("{AE}@127.0.0.1:{}", agent.port))
        .unwrap();
    let pc = association.presentation_contexts()[0].id;
    let pdv = |value_type, data: Vec<u8>, is_last| Pdu::PData {
        data: vec![PDataValue { presentation_context_id: pc, value_type, is_last, data }],
    };
    let command = idaics::dimse::store_request(CT, &series.sop_uids[0], 1).unwrap();
    association.send(&pdv(PDataValueType::Command, command, true)).unwrap();
    association.send(&pdv(PDataValueType::Data, dataset[..16_000].to_vec(), false)).unwrap();
    agent.wait_for("the partial file", Duration::from_secs(5), |a| !partial_files(&a.state_dir).is_empty());

    // Silence: the agent aborts the association and drops the partial instance.
    let answer = association.receive();
    assert!(matches!(answer, Ok(Pdu::AbortRQ { .. }) | Err(_)), "{answer:?}");
    agent.wait_for("the idle timeout in the log", Duration::from_secs(10), |a| {
        !a.events("nothing received within the idle timeout; aborting the association").is_empty()
    });
    agent.wait_for("the partial file to go", Duration::from_secs(5), |a| partial_files(&a.state_dir).is_empty());
    assert!(agent.spool_files().is_empty());
    assert_eq!(store_outcomes(&agent.storescu(&[], &series.files)), (2, 0));
}

#[test]
fn association_limit_rejects_transiently_and_frees_the_slot() {
    use dicom_ul::association::client::ClientAssociationOptions;
    let tmp = tempfile::tempdir().unwrap();
    let agent = Agent::start(&tmp.path().join("state"), &[("IDAICS_LIMITS_MAX_ASSOCIATIONS", "1")]);
    let held = ClientAssociationOptions::new()
        .calling_ae_title("HOLDER")
        .with_abstract_syntax("1.2.840.10008.1.1")
        .establish_with(&format!("{AE}@127.0.0.1:{}", agent.port))
        .unwrap();
    let out = std::process::Command::new("echoscu")
        .args(["-aec", AE, "127.0.0.1", &agent.port.to_string()])
        .output()
        .unwrap();
    assert!(output_text(&out).contains("Rejected Transient"), "{}", output_text(&out));
    held.release().unwrap();
    agent.wait_for("the slot to free", Duration::from_secs(5), |a| a.echo());
}

#[test]
fn enhanced_and_legacy_converted_ct_multiframe_are_stored_and_completed() {
    let tmp = tempfile::tempdir().unwrap();
    let agent = Agent::start(&tmp.path().join("state"), &[]);
    // The corpora hold no Enhanced CT: an Enhanced MR multi-frame object relabelled as one, and
    // as the Legacy Converted Enhanced CT that archives make of classic series (its own series).
    for (n, sop_class) in ["1.2.840.10008.5.1.4.1.1.2.1", "1.2.840.10008.5.1.4.1.1.2.2"].iter().enumerate() {
        let file = tmp.path().join(format!("enhanced_ct_{n}.dcm"));
        std::fs::copy(shared_data().join("corpora/pylibjpeg-data/ds/LittleEndianExplicit/emri_small.dcm"), &file)
            .unwrap();
        let series = format!("1.2.826.0.1.3680043.8.498.79.{n}");
        let modify = [format!("(0008,0016)={sop_class}"), "(0008,0060)=CT".into(), format!("(0020,000e)={series}")];
        let mut args = vec!["-nb"];
        modify.iter().for_each(|m| args.extend(["-m", m.as_str()]));
        dcmtk("dcmodify", &args, &file, Path::new(""));
        let header = dicom_object::open_file(&file).unwrap();
        let frames: u32 = header.element(tags::NUMBER_OF_FRAMES).unwrap().to_int().unwrap();
        let study =
            header.element(tags::STUDY_INSTANCE_UID).unwrap().to_str().unwrap().trim_end_matches('\0').to_string();
        assert_eq!(store_outcomes(&agent.storescu(&[], &[file])), (1, 0), "{sop_class}");
        agent.wait_for("completion", Duration::from_secs(10), |a| a.series_record(&study, &series).is_some());
        let record = agent.series_record(&study, &series).unwrap();
        assert_eq!(record["state"], "complete", "{sop_class}: {record}");
        assert_eq!(record["slices"], u64::from(frames));
    }
    assert_eq!(agent.spool_files().len(), 2, "both kept, neither discarded");
}

#[test]
fn sigterm_stops_cleanly_and_state_survives() {
    let tmp = tempfile::tempdir().unwrap();
    let series =
        write_ct_series(&tmp.path().join("in"), &SeriesSpec { slices: 6, size: 64, seed: 21, ..Default::default() })
            .unwrap();
    let state = tmp.path().join("state");
    let mut agent =
        Agent::start(&state, &[("IDAICS_SERIES_COMPLETE_ON_RELEASE", "false"), ("IDAICS_SERIES_QUIET_PERIOD_S", "2")]);
    assert_eq!(store_outcomes(&agent.storescu(&[], &series.files)), (6, 0));
    let status = agent.terminate();
    assert!(status.success(), "exit status {status}");
    assert!(agent.log().contains("\"stopped\""));
    // Pending when stopped; completed by the quiet period after the restart.
    assert!(agent.series_record(&series.study_uid, &series.series_uid).is_none());
    let agent = Agent::start_on(&state, free_port(), &[("IDAICS_SERIES_QUIET_PERIOD_S", "2")]);
    agent.wait_for("completion after restart", Duration::from_secs(10), |a| {
        a.series_record(&series.study_uid, &series.series_uid).is_some()
    });
    assert_eq!(agent.series_record(&series.study_uid, &series.series_uid).unwrap()["trigger"], "quiet-period");
}

/// The storescu option that proposes a file's own transfer syntax, so that it is sent as it is
/// rather than converted (storescu cannot decompress JPEG 2000 or JPEG-LS near-lossless).
fn propose_flag(ts: &str) -> Option<&'static str> {
    Some(match ts {
        "1.2.840.10008.1.2" => "-xi",
        "1.2.840.10008.1.2.2" => "-xb",
        "1.2.840.10008.1.2.1.99" => "-xd",
        "1.2.840.10008.1.2.4.50" => "-xy",
        "1.2.840.10008.1.2.4.51" => "-xx",
        "1.2.840.10008.1.2.4.70" => "-xs",
        "1.2.840.10008.1.2.4.80" => "-xt",
        "1.2.840.10008.1.2.4.81" => "-xu",
        "1.2.840.10008.1.2.4.90" => "-xv",
        "1.2.840.10008.1.2.4.91" => "-xw",
        "1.2.840.10008.1.2.5" => "-xr",
        "1.2.840.10008.1.2.1" => "-xe",
        _ => return None,
    })
}

fn collect(dir: &Path, out: &mut Vec<PathBuf>) {
    for e in std::fs::read_dir(dir).unwrap().flatten() {
        let p = e.path();
        if p.is_dir() {
            collect(&p, out);
        } else if p.extension().is_some_and(|x| x == "dcm") {
            out.push(p);
        }
    }
    out.sort();
}

/// One agent per host and state directory: a second `serve` on it (another port, say a test run
/// by hand beside the service) is refused with the reason, and the first one is undisturbed.
#[test]
fn a_second_agent_of_this_host_on_the_same_state_directory_is_refused() {
    let tmp = tempfile::tempdir().unwrap();
    let agent = Agent::start(&tmp.path().join("state"), &[]);
    let out = std::process::Command::new(env!("CARGO_BIN_EXE_idaics"))
        .args(["serve", "--port", &free_port().to_string(), "--state-dir"])
        .arg(&agent.state_dir)
        .env("IDAICS_DICOM_BIND_ADDRESS", "127.0.0.1")
        .env("IDAICS_HTTP_PORT", free_port().to_string())
        .output()
        .unwrap();
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("is in use by another agent of this host (process "), "{err}");
    assert!(agent.echo(), "the first agent stopped answering");
}

/// Mutation fuzzing with a fixed seed: 300 damaged copies of real CTs (bytes changed in the
/// header and anywhere, truncations, length fields replaced, chunks repeated), uncompressed,
/// JPEG-LS and JPEG 2000. Each gets an answer, a failure status or Success; what was
/// acknowledged is in the spool; nothing panics, memory stays small whatever the damaged lengths
/// say, and the agent keeps answering.
#[test]
fn mutated_instances_never_take_the_agent_down() {
    let tmp = tempfile::tempdir().unwrap();
    let agent = Agent::start(&tmp.path().join("state"), &[]);
    let corpus = shared_data().join("corpora/pydicom-test-files");
    let jls = tmp.path().join("jls.dcm");
    dcmtk("dcmcjpls", &["+el"], &corpus.join("CT_small.dcm"), &jls);
    let sop = sop_instance_uid(&corpus.join("CT_small.dcm"));
    let htj2k = tmp.path().join("htj2k.dcm");
    htj2k_from(&corpus.join("CT_small.dcm"), &htj2k, "1.2.840.10008.1.2.4.201", &["-reversible", "true"], &sop);
    // 12-bit JPEG Extended, decoded by our own code; the same SOP instance UID kept (+un).
    let extended = tmp.path().join("extended.dcm");
    dcmtk("dcmcjpeg", &["+ee", "+un"], &corpus.join("CT_small.dcm"), &extended);
    // The third, a real JPEG 2000 CT, carries another SOP instance UID: its copies are refused
    // for the mismatch at the end, after the decoder had them.
    let sources = [
        dataset_bytes(&corpus.join("CT_small.dcm")),
        dataset_bytes(&jls),
        dataset_bytes(&corpus.join("693_J2KI.dcm")),
        dataset_bytes(&htj2k),
        dataset_bytes(&extended),
    ];
    let mut senders: Vec<RawScu> = sources.iter().map(|(_, ts)| RawScu::connect(agent.port, CT, ts)).collect();
    let mut next = seeded_random(0x9E37_79B9_7F4A_7C15);
    let mut outcomes = std::collections::BTreeMap::new();
    let mut acknowledged = 0;
    for case in 0..500 {
        let (source, _) = &sources[case % sources.len()];
        let mut bytes = source.clone();
        let head = bytes.len().min(2000);
        if next(5) == 0 {
            // A length field of gigabytes among the element headers.
            let at = next(head - 4);
            let length = [0xFFFF_FFFF, 0xFFFF_FFF0, 0x7FFF_FFFF, next(1 << 31) as u32][next(4)];
            bytes[at..at + 4].copy_from_slice(&length.to_le_bytes());
        } else {
            mutate(&mut bytes, head, &mut next);
        }
        let status = senders[case % sources.len()].store(&sop, &bytes);
        assert!([0x0000, 0xA700, 0xA900, 0xC000].contains(&status), "case {case}: status {status:#06x}");
        *outcomes.entry(status).or_insert(0) += 1;
        if status == 0 {
            acknowledged += 1;
        }
        if case % 50 == 49 {
            assert!(agent.echo(), "agent stopped answering after case {case}");
        }
    }
    senders.into_iter().for_each(RawScu::release);
    assert!(agent.echo(), "agent stopped answering");
    eprintln!("outcomes: {outcomes:x?}");
    assert!(outcomes.get(&0xC000).is_some_and(|n| *n > 100), "{outcomes:?}");
    // Every acknowledged copy carried the same SOP instance UID: the last one is in the spool,
    // once per study and series (a digit changed in a UID can leave it valid: another series).
    let spooled = agent.spool_files();
    assert!(spooled.is_empty() == (acknowledged == 0) && spooled.len() <= acknowledged, "{outcomes:x?} {spooled:?}");
    assert!(spooled.iter().all(|p| p.file_stem().unwrap().to_string_lossy() == sop));
    assert!(!agent.log().contains("panicked"), "{}", agent.log());
    // Length fields of gigabytes in a 20 kB data set must not make the agent allocate them.
    let peak_rss_mb = agent.peak_rss_kb() / 1024;
    assert!(peak_rss_mb < 256, "peak RSS {peak_rss_mb} MB");
}

/// One series, one patient and one study: an instance of a series in the spool that names another
/// PatientID or StudyInstanceUID (a merge gone wrong, a mislabelled resend) is refused, since its slices would be analysed and
/// reported as the first patient's; the series' own later instances still go in.
#[test]
fn an_instance_of_another_patient_or_study_cannot_join_a_series() {
    let tmp = tempfile::tempdir().unwrap();
    let agent = Agent::start(&tmp.path().join("state"), &[("IDAICS_SERIES_QUIET_PERIOD_S", "60")]);
    let series =
        write_ct_series(&tmp.path().join("in"), &SeriesSpec { slices: 4, size: 64, seed: 99, ..Default::default() })
            .unwrap();
    let (first, rest) = series.files.split_at(3);
    assert_eq!(store_outcomes(&agent.storescu(&[], first)), (3, 0));
    let intruder = tmp.path().join("intruder.dcm");
    std::fs::copy(&rest[0], &intruder).unwrap();
    dcmtk(
        "dcmodify",
        &["-nb", "-m", "PatientID=SOMEONE-ELSE", "-m", "SOPInstanceUID=1.2.826.0.1.3680043.8.498.4242"],
        &intruder,
        Path::new(""),
    );
    let (bytes, ts) = dataset_bytes(&intruder);
    let status = raw_store(agent.port, CT, "1.2.826.0.1.3680043.8.498.4242", &ts, &bytes);
    assert_eq!(status, 0xC000);
    let failure = agent.events("store failed");
    assert!(
        failure[0]["fields"]["reason"].as_str().unwrap().contains("one series cannot hold two patients"),
        "{failure:?}"
    );
    assert!(!agent.log().contains("SOMEONE-ELSE"), "the log names no patient");
    // Same patient, same series UID, another study: refused too, since everything after the
    // spool knows a series by its UID.
    let stray = tmp.path().join("stray.dcm");
    std::fs::copy(&rest[0], &stray).unwrap();
    dcmtk(
        "dcmodify",
        &[
            "-nb",
            "-m",
            "StudyInstanceUID=1.2.826.0.1.3680043.8.498.4343",
            "-m",
            "SOPInstanceUID=1.2.826.0.1.3680043.8.498.4344",
        ],
        &stray,
        Path::new(""),
    );
    let (bytes, ts) = dataset_bytes(&stray);
    assert_eq!(raw_store(agent.port, CT, "1.2.826.0.1.3680043.8.498.4344", &ts, &bytes), 0xC000);
    let failure = agent.events("store failed");
    assert!(
        failure[1]["fields"]["reason"].as_str().unwrap().contains("a series UID names one series of one study"),
        "{failure:?}"
    );
    // The series' own fourth slice is still welcome.
    assert_eq!(store_outcomes(&agent.storescu(&[], rest)), (1, 0));
    assert_eq!(agent.spool_files().len(), 4);
}
