//! The command line as an administrator uses it.

use std::process::Command;

fn idaics(args: &[&str]) -> std::process::Output {
    Command::new(env!("CARGO_BIN_EXE_idaics")).args(args).env_remove("RUST_LOG").output().unwrap()
}

#[test]
fn shipped_configuration_checks_out() {
    let conf = concat!(env!("CARGO_MANIFEST_DIR"), "/conf/idaics.toml");
    let out = idaics(&["check-config", "--config", conf]);
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(text.contains("OK"));
    assert!(text.contains("\n  series analysed: axial stacks\n"), "{text}");
    assert!(text.contains("\n  model: none (series are received and tracked, not analysed)"), "{text}");
}

/// The summary says in words which series the selection rules let through.
#[test]
fn check_config_summarises_the_series_selection() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("site.toml");
    std::fs::write(
        &path,
        "[series]\norientations = [\"axial\", \"sagittal\"]\ninclude_descriptions = [\"BONE\"]\nexclude_descriptions = [\"MPR\", \"3D\"]\n",
    )
    .unwrap();
    let out = idaics(&["check-config", "--config", path.to_str().unwrap()]);
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(
        text.contains(
            "  series analysed: axial, sagittal stacks whose SeriesDescription contains one of \"BONE\" and contains none of \"MPR\", \"3D\"\n"
        ),
        "{text}"
    );
}

#[test]
fn bad_configuration_names_every_problem_and_fails() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("bad.toml");
    std::fs::write(
        &path,
        "[dicom]\nae_title = \"MUCH_TOO_LONG_AE_TITLE\"\nallowed_peers = [\"10.0.0.0/99\"]\n[series]\nquiet_period_s = 60\nmax_wait_s = 30\n\
         [[destinations]]\nname = \"archive\"\npath = \"outbox\"\n",
    )
    .unwrap();
    let out = idaics(&["check-config", "--config", path.to_str().unwrap()]);
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("\"outbox\" is relative"), "{err}");
    for key in ["dicom.ae_title", "dicom.allowed_peers[0]", "series.max_wait_s", "destinations[0].path"] {
        assert!(err.contains(key), "{key} not reported:\n{err}");
    }

    std::fs::write(&path, "[dicom]\nport = \"eleven\"\n").unwrap();
    let out = idaics(&["check-config", "--config", path.to_str().unwrap()]);
    assert!(!out.status.success());
    assert!(String::from_utf8_lossy(&out.stderr).contains("line 2"), "{}", String::from_utf8_lossy(&out.stderr));

    // An administrator's shell may have RUST_BACKTRACE set: the message stays the whole output.
    let out = Command::new(env!("CARGO_BIN_EXE_idaics"))
        .args(["check-config", "--config", path.to_str().unwrap()])
        .env("RUST_BACKTRACE", "1")
        .output()
        .unwrap();
    let err = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(1));
    assert!(err.starts_with("Error: ") && err.contains("line 2"), "{err}");
    assert!(!err.contains("backtrace") && !err.contains("src/"), "{err}");
}

#[test]
fn database_password_is_not_printed() {
    let out = Command::new(env!("CARGO_BIN_EXE_idaics"))
        .args(["check-config"])
        .env("IDAICS_DATABASE_URL", "postgres://idaics:hunter2@db.example/idaics")
        .output()
        .unwrap();
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(text.contains("postgres://idaics:***@db.example/idaics"), "{text}");
    assert!(!text.contains("hunter2"));
}

#[test]
fn serve_refuses_a_busy_port_with_a_clear_message() {
    let holder = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let port = holder.local_addr().unwrap().port().to_string();
    let dir = tempfile::tempdir().unwrap();
    let out = Command::new(env!("CARGO_BIN_EXE_idaics"))
        .args(["serve", "--port", &port, "--state-dir", dir.path().to_str().unwrap()])
        .env("IDAICS_DICOM_BIND_ADDRESS", "127.0.0.1")
        .output()
        .unwrap();
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("cannot listen on 127.0.0.1:") && err.contains("in use"), "{err}");
}

/// A small phantom (2 mm pixels, 160 x 160) written by `idaics phantom`.
fn phantom_cli(dir: &std::path::Path, seed: &str, slice_thickness: &str, extra: &[&str]) {
    let mut args = vec![
        "phantom",
        "--out",
        dir.to_str().unwrap(),
        "--seed",
        seed,
        "--pixel-spacing",
        "2",
        "--slice-thickness",
        slice_thickness,
        "--size",
        "160",
    ];
    args.extend(extra);
    let out = idaics(&args);
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
}

#[test]
fn analyze_reads_an_enhanced_ct_phantom_and_a_nifti_crop() {
    let dir = tempfile::tempdir().unwrap();
    let phantom = dir.path().join("phantom");
    phantom_cli(&phantom, "5", "2", &["--enhanced"]);
    let truth: serde_json::Value = serde_json::from_slice(&std::fs::read(phantom.join("truth.json")).unwrap()).unwrap();
    let crop = concat!(env!("CARGO_MANIFEST_DIR"), "/../shared/data/real/tptbox-L3/sub-ct_label-22_ct.nii.gz");
    let results = dir.path().join("results");
    let out =
        idaics(&["analyze", phantom.to_str().unwrap(), crop, "--out", results.to_str().unwrap(), "--format", "json"]);
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    let report: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    let series = report["series"].as_array().unwrap();
    assert_eq!(series.len(), 2, "{report:#}");
    let phantom_levels: Vec<&str> =
        series.iter().find(|s| s["series_uid"] == truth["series_uid"]).expect("the phantom's series")["levels"]
            .as_array()
            .unwrap()
            .iter()
            .map(|l| l["name"].as_str().unwrap())
            .collect();
    let truth_levels: Vec<&str> =
        truth["levels"].as_array().unwrap().iter().map(|l| l["name"].as_str().unwrap()).collect();
    assert_eq!(phantom_levels, truth_levels);
    // The crop is analysed as a volume of its own, named by its file (its result: see real_crops).
    assert!(series.iter().any(|s| s["series_uid"] == "sub-ct_label-22_ct.nii.gz"), "{report:#}");
}

#[test]
fn analyze_runs_the_detector_when_given_weights() {
    // The shapes model (tests/fixtures/shapes) knows no disc classes: the path runs end to end
    // and every level is reported, undetermined.
    let dir = tempfile::tempdir().unwrap();
    let phantom = dir.path().join("phantom");
    phantom_cli(&phantom, "6", "2.5", &[]);
    let weights = concat!(env!("CARGO_MANIFEST_DIR"), "/tests/fixtures/shapes/shapes-yolov8n-seg.safetensors");
    let results = dir.path().join("results");
    let out = idaics(&[
        "analyze",
        phantom.to_str().unwrap(),
        "--out",
        results.to_str().unwrap(),
        "--format",
        "json",
        "--weights",
        weights,
        "--device",
        "cpu",
    ]);
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    let report: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    let levels = report["series"][0]["levels"].as_array().unwrap();
    assert_eq!(levels.len(), 6);
    for l in levels {
        assert_eq!(l["finding"]["class"], "undetermined", "{l}");
        assert!(l["finding"]["views"].is_array());
    }
}

#[test]
fn demo_runs_a_phantom_study_through_the_agent_with_no_set_up() {
    let dir = tempfile::tempdir().unwrap();
    let out_dir = dir.path().join("demo");
    let run = || {
        Command::new(env!("CARGO_BIN_EXE_idaics"))
            .args(["demo", "--out", out_dir.to_str().unwrap()])
            .current_dir(env!("CARGO_MANIFEST_DIR"))
            .env_remove("RUST_LOG")
            .output()
            .unwrap()
    };
    let out = run();
    let text = String::from_utf8_lossy(&out.stdout).into_owned();
    assert!(out.status.success(), "{text}\n{}", String::from_utf8_lossy(&out.stderr));
    assert!(text.contains("phantom-yolov8n-seg.safetensors"), "the phantom model is found:\n{text}");
    // One line per level, each with its truth.
    let levels: Vec<&str> = text.lines().filter(|l| l.contains("agrees") || l.contains("differs")).collect();
    assert_eq!(levels.len(), 6, "{text}");
    for (level, truth) in [("L5/S1", "schmorl"), ("L4/L5", "protrusion"), ("L3/L4", "bulge"), ("L2/L3", "normal")] {
        assert!(levels.iter().any(|l| l.starts_with(level) && l.contains(truth)), "{level} {truth}:\n{text}");
    }
    // Key slices (7), the SEG, 6 Secondary Captures and the SR reached the folder PACS.
    assert!(text.contains("(key slices, SEG, Secondary Captures, SR): 15 in"), "{text}");
    // The finding log answers the command the demo prints.
    let db = out_dir.join("state").join("idaics.db");
    let findings = idaics(&["findings", "--database-url", &format!("sqlite://{}", db.display()), "--format", "csv"]);
    assert_eq!(String::from_utf8_lossy(&findings.stdout).lines().count(), 1 + 6);
    // A second run replaces the first; a folder that is not the demo's is left alone.
    assert!(run().status.success());
    let foreign = dir.path().join("foreign");
    std::fs::create_dir_all(&foreign).unwrap();
    std::fs::write(foreign.join("notes.txt"), "mine").unwrap();
    let out = idaics(&["demo", "--out", foreign.to_str().unwrap()]);
    assert!(!out.status.success());
    assert!(String::from_utf8_lossy(&out.stderr).contains("not an earlier demo's folder"));
    assert!(foreign.join("notes.txt").exists());
}

/// `evaluate` scores what `analyze` finds: phantoms by the position in their truth.json, other
/// series by level name from a CSV, and names what it could not score.
#[test]
fn evaluate_scores_the_findings_analyze_reports() {
    let dir = tempfile::tempdir().unwrap();
    let weights = concat!(env!("CARGO_MANIFEST_DIR"), "/model/phantom-yolov8n-seg.safetensors");
    let phantom = |name: &str, seed: &str, levels: &str| {
        let path = dir.path().join(name);
        let out = idaics(&[
            "phantom",
            "--out",
            path.to_str().unwrap(),
            "--seed",
            seed,
            "--levels",
            levels,
            "--pixel-spacing",
            "1",
            "--slice-thickness",
            "2",
            "--size",
            "256",
        ]);
        assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
        let truth: serde_json::Value =
            serde_json::from_slice(&std::fs::read(path.join("truth.json")).unwrap()).unwrap();
        (path, truth)
    };
    // Labelled by its truth.json, matched by position.
    let (by_position, truth_a) = phantom("a", "7002", "L4/L5=protrusion,L2/L3=bulge,L1/L2=schmorl");
    // Labelled by a CSV, matched by level name; its truth.json is removed.
    let (by_name, truth_b) = phantom("b", "7004", "L5/S1=bulge,L3/L4=protrusion,T12/L1=schmorl");
    std::fs::remove_file(by_name.join("truth.json")).unwrap();
    let mut csv = String::from("series_uid,level,finding\n");
    for level in truth_b["levels"].as_array().unwrap() {
        csv += &format!(
            "{},{},{}\n",
            truth_b["series_uid"].as_str().unwrap(),
            level["name"].as_str().unwrap(),
            level["condition"].as_str().unwrap()
        );
    }
    csv += "1.2.826.0.1.3680043.2.1125.999,L4/L5,Protrusion\n";
    let labels = dir.path().join("labels.csv");
    std::fs::write(&labels, csv).unwrap();
    // Not labelled at all.
    let (unlabelled, truth_c) = phantom("c", "7005", "");
    std::fs::remove_file(unlabelled.join("truth.json")).unwrap();

    let inputs = [by_position.to_str().unwrap(), by_name.to_str().unwrap(), unlabelled.to_str().unwrap()];
    let mut args = vec!["evaluate", "--weights", weights, "--device", "cpu", "--format", "json", "--labels"];
    args.push(labels.to_str().unwrap());
    args.extend(inputs);
    let out = idaics(&args);
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    let evaluation: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();

    let mut args = vec!["analyze", "--weights", weights, "--device", "cpu", "--format", "json", "--out"];
    let results = dir.path().join("results");
    args.push(results.to_str().unwrap());
    args.extend(&inputs[..2]);
    let out = idaics(&args);
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    let analysis: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();

    // Every labelled disc is scored once, with the class analyze reports for that level.
    let outcomes = evaluation["levels"].as_array().unwrap();
    assert_eq!(outcomes.len(), 12, "{evaluation:#}");
    for (truth, truth_json) in [(&truth_a, "truth.json"), (&truth_b, "CSV")] {
        let series = truth["series_uid"].as_str().unwrap();
        let found = analysis["series"].as_array().unwrap().iter().find(|s| s["series_uid"] == series).unwrap();
        for level in truth["levels"].as_array().unwrap() {
            let name = level["name"].as_str().unwrap();
            let outcome = outcomes.iter().find(|o| o["series"] == series && o["level"] == name).unwrap();
            assert_eq!(outcome["truth"], level["condition"], "{series} {name} ({truth_json})");
            let reported = found["levels"].as_array().unwrap().iter().find(|l| l["name"] == name).unwrap();
            assert_eq!(outcome["predicted"], reported["finding"]["class"], "{series} {name} ({truth_json})");
        }
    }
    let agreeing = outcomes.iter().filter(|o| o["truth"] == o["predicted"]).count() as u64;
    assert_eq!(evaluation["correct"], agreeing);
    assert_eq!(evaluation["total"], 12);
    let counts: u64 = evaluation["confusion"]["counts"]
        .as_array()
        .unwrap()
        .iter()
        .flat_map(|r| r.as_array().unwrap())
        .map(|c| c.as_u64().unwrap())
        .sum();
    assert_eq!(counts, 12);
    assert!((evaluation["accuracy"].as_f64().unwrap() - agreeing as f64 / 12.0).abs() < 1e-12);
    // The phantom model gets most discs of unseen phantoms right (model/README.md).
    assert!(agreeing >= 8, "{evaluation:#}");
    let left_out = &evaluation["left_out"];
    assert_eq!(left_out[truth_c["series_uid"].as_str().unwrap()], "no labels", "{left_out}");
    assert_eq!(left_out["1.2.826.0.1.3680043.2.1125.999"], "labelled, but not among the inputs", "{left_out}");

    // The table says the same, in the paper's layout.
    let out = idaics(&["evaluate", "--weights", weights, "--device", "cpu", by_position.to_str().unwrap()]);
    let table = String::from_utf8_lossy(&out.stdout);
    assert!(table.contains("Cohen's kappa") && table.contains("sensitivity"), "{table}");

    // A label file that is not one gets a message that says where.
    std::fs::write(&labels, "series_uid,level,finding\n1.2.3,L4/L5,herniation\n").unwrap();
    let out = idaics(&["evaluate", "--weights", weights, "--labels", labels.to_str().unwrap(), inputs[1]]);
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("line 2") && err.contains("herniation"), "{err}");
}

/// `evaluate --images`, the paper's protocol: 2D images labelled in ultralytics' format. The
/// images and labels are the slices the agent shows the network, drawn from a phantom's truth.
#[test]
fn evaluate_scores_labelled_images_as_the_paper_did() {
    use idaics::phantom::{DiscLabels, PhantomSpec, parse_levels, write_phantom};
    let dir = tempfile::tempdir().unwrap();
    let spec = PhantomSpec {
        seed: 7006,
        levels: parse_levels("L5/S1=protrusion,L3/L4=bulge,L2/L3=schmorl").unwrap(),
        pixel_spacing_mm: 1.0,
        slice_thickness_mm: 2.0,
        size: 256,
        ..Default::default()
    };
    let (series, _) = write_phantom(&dir.path().join("series"), &spec).unwrap();
    let volume = idaics::analysis::volume::load_series(&series.files, &Default::default()).unwrap();
    let analysis = idaics::pipeline::analyze(std::slice::from_ref(&volume), None).unwrap();
    let labels = DiscLabels::new(&spec);
    let (images, label_dir) = (dir.path().join("set/images"), dir.path().join("set/labels"));
    std::fs::create_dir_all(&images).unwrap();
    std::fs::create_dir_all(&label_dir).unwrap();
    // The phantom model's classes, in the paper's order (model/README.md).
    let class_index = ["normal", "schmorl", "bulge", "protrusion"];
    let mut labelled_objects = 0;
    for (index, image) in analysis.sagittal.iter().chain(&analysis.axials).enumerate() {
        let n = image.size;
        image::GrayImage::from_raw(n as u32, n as u32, image.pixels.clone())
            .unwrap()
            .save(images.join(format!("{index}.png")))
            .unwrap();
        let mut lines = String::new();
        for level in 0..idaics::phantom::LEVELS.len() {
            let data: Vec<bool> = (0..n * n)
                .map(|i| labels.level_at(image.pixel_to_lps((i % n) as f64, (i / n) as f64)) == Some(level))
                .collect();
            let mask = idaics::analysis::detector::predict::Mask { width: n, height: n, data };
            if mask.area() < 50 {
                continue;
            }
            let class = class_index.iter().position(|c| *c == labels.condition(level).class()).unwrap();
            lines += &class.to_string();
            for [x, y] in idaics::analysis::detector::predict::outline(&mask) {
                lines += &format!(" {:.5} {:.5}", (f64::from(x) + 0.5) / n as f64, (f64::from(y) + 0.5) / n as f64);
            }
            lines.push('\n');
            labelled_objects += 1;
        }
        std::fs::write(label_dir.join(format!("{index}.txt")), lines).unwrap();
    }
    // An image without a label file is named, not scored.
    std::fs::copy(images.join("0.png"), images.join("unlabelled.png")).unwrap();

    let weights = concat!(env!("CARGO_MANIFEST_DIR"), "/model/phantom-yolov8n-seg.safetensors");
    let set = dir.path().join("set/images");
    let out = idaics(&[
        "evaluate",
        "--images",
        "--weights",
        weights,
        "--device",
        "cpu",
        "--format",
        "json",
        set.to_str().unwrap(),
    ]);
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    let evaluation: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(evaluation["total"], labelled_objects, "{evaluation:#}");
    assert!(labelled_objects >= 12, "6 discs on the sagittal and one per axial: {labelled_objects}");
    let outcomes = evaluation["levels"].as_array().unwrap();
    let agreeing = outcomes.iter().filter(|o| o["truth"] == o["predicted"]).count();
    assert_eq!(evaluation["correct"], agreeing);
    assert!(evaluation["unlabelled_detections"].is_u64());
    let unlabelled = set.join("unlabelled.png").display().to_string();
    assert!(evaluation["left_out"][&unlabelled].as_str().unwrap().contains("no label file"), "{evaluation:#}");
    // The network finds the discs it was trained on: most labelled discs are matched by a mask.
    let found = outcomes.iter().filter(|o| o["predicted"] != "not found").count();
    assert!(found * 10 >= labelled_objects * 8, "{found} of {labelled_objects} found:\n{evaluation:#}");

    // A label that names no class of the weights is an error that says where.
    std::fs::write(label_dir.join("0.txt"), "7 0.1 0.1 0.2 0.1 0.2 0.2\n").unwrap();
    let out = idaics(&["evaluate", "--images", "--weights", weights, "--device", "cpu", set.to_str().unwrap()]);
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("0.txt") && err.contains("class 7"), "{err}");
}
