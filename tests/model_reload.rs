//! New weights put in place by SIGHUP (`systemctl reload idaics`) while the agent runs: the next
//! series' SR names the new weights, a bad file is refused and the weights in use stay, and no
//! association is dropped on the way.

mod common;

use std::path::{Path, PathBuf};
use std::time::Duration;

use common::{Agent, PHANTOM_MODEL, analyse_to_folder, names_weights, wait_until, write_model_config};
use idaics::phantom::{PhantomSpec, parse_levels, write_phantom};

fn phantom(dir: &Path, seed: u64) -> Vec<PathBuf> {
    let spec = PhantomSpec {
        seed,
        levels: parse_levels("L4/L5=protrusion").unwrap(),
        pixel_spacing_mm: 1.0,
        slice_thickness_mm: 2.0,
        size: 256,
        ..Default::default()
    };
    write_phantom(dir, &spec).unwrap().0.files
}

/// The same network with a note added to the safetensors metadata: other bytes, another SHA-256.
fn weights_with_note(from: &Path, to: &Path, note: &str) {
    let bytes = std::fs::read(from).unwrap();
    let length = u64::from_le_bytes(bytes[..8].try_into().unwrap()) as usize;
    let mut header: serde_json::Value = serde_json::from_slice(&bytes[8..8 + length]).unwrap();
    header["__metadata__"]["note"] = note.into();
    let mut text = serde_json::to_vec(&header).unwrap();
    while !text.len().is_multiple_of(8) {
        text.push(b' ');
    }
    let mut out = (text.len() as u64).to_le_bytes().to_vec();
    out.extend(text);
    out.extend(&bytes[8 + length..]);
    std::fs::write(to, out).unwrap();
}

#[test]
fn sighup_puts_new_weights_in_place_and_refuses_a_bad_file() {
    let tmp = tempfile::tempdir().unwrap();
    let (first, second, broken) =
        (PathBuf::from(PHANTOM_MODEL), tmp.path().join("second.safetensors"), tmp.path().join("broken.safetensors"));
    weights_with_note(&first, &second, "retrained at the site");
    let bytes = std::fs::read(&first).unwrap();
    std::fs::write(&broken, &bytes[..bytes.len() / 2]).unwrap();
    let sha = |p: &Path| idaics::report::sha256_file(p).unwrap();
    let (first_sha, second_sha) = (sha(&first), sha(&second));
    assert_ne!(first_sha, second_sha);

    let config = tmp.path().join("idaics.toml");
    write_model_config(&config, &first);
    let folder = tmp.path().join("pacs");
    std::fs::create_dir_all(&folder).unwrap();
    let agent = Agent::start_with_args(
        &tmp.path().join("state"),
        &[],
        &["--config", config.to_str().unwrap(), "--destination", folder.to_str().unwrap()],
    );
    let sr = analyse_to_folder(&agent, &folder, &phantom(&tmp.path().join("s1"), 7101));
    assert!(names_weights(&sr, &first_sha), "the first SR names the weights the agent started with");

    write_model_config(&config, &second);
    agent.hangup();
    wait_until("the reload", Duration::from_secs(60), || agent.log().contains("weights reloaded"));
    assert!(agent.echo(), "the agent answers after a reload:\n{}", agent.log());
    let sr = analyse_to_folder(&agent, &folder, &phantom(&tmp.path().join("s2"), 7102));
    assert!(names_weights(&sr, &second_sha) && !names_weights(&sr, &first_sha), "the next SR names the new weights");

    // A truncated file is refused with the reason; the weights in use stay.
    write_model_config(&config, &broken);
    agent.hangup();
    wait_until("the refusal", Duration::from_secs(60), || agent.log().contains("weights refused"));
    let refusal = agent.log().lines().find(|l| l.contains("weights refused")).unwrap().to_string();
    eprintln!("{refusal}");
    assert!(refusal.contains("broken.safetensors"), "the refusal names the file: {refusal}");
    let sr = analyse_to_folder(&agent, &folder, &phantom(&tmp.path().join("s3"), 7103));
    assert!(names_weights(&sr, &second_sha), "after a refused reload the weights in use stay");
    // The same weights again: nothing to do.
    write_model_config(&config, &second);
    agent.hangup();
    wait_until("the unchanged weights", Duration::from_secs(60), || agent.log().contains("weights unchanged"));
    // Each reload, and each object copied to the destination, is in the audit trail.
    wait_until("the audit trail", Duration::from_secs(10), || {
        let trail = common::audit_trail(&agent.state_dir);
        let reloads: Vec<&str> = trail.iter().filter(|(e, _)| e == "reload").map(|(_, d)| d.as_str()).collect();
        reloads.len() == 3
            && reloads[0].starts_with(&format!("weights reloaded: {second_sha}"))
            && reloads[1].starts_with("weights refused")
            && reloads[2].starts_with("weights unchanged")
            && trail.iter().any(|(e, d)| e == "export" && d.contains("(copied)"))
    });
}
