//! The library's modules follow the data flow and their imports point one way: no import circle
//! spans two top-level modules (`ingest`, `analysis`, `report`, `store`, `pipeline`, ... see
//! src/lib.rs). Within a stage modules may use each other freely.

use std::collections::{BTreeMap, BTreeSet};
use std::path::{Path, PathBuf};

const SRC: &str = concat!(env!("CARGO_MANIFEST_DIR"), "/src");

fn rust_files(dir: &Path, out: &mut Vec<PathBuf>) {
    for entry in std::fs::read_dir(dir).unwrap() {
        let path = entry.unwrap().path();
        if path.is_dir() {
            rust_files(&path, out);
        } else if path.extension().is_some_and(|e| e == "rs") {
            out.push(path);
        }
    }
}

/// The top-level module a file belongs to: `src/ingest/scp/mod.rs` to `ingest`.
fn unit_of(path: &Path) -> String {
    let relative = path.strip_prefix(SRC).unwrap();
    let first = relative.components().next().unwrap().as_os_str().to_string_lossy().into_owned();
    first.trim_end_matches(".rs").to_string()
}

/// `crate::NAME` paths in code (not in comments, not in unit tests).
fn references(text: &str) -> BTreeSet<String> {
    let code = text.split("#[cfg(test)]").next().unwrap_or_default();
    let mut found = BTreeSet::new();
    for line in code.lines().filter(|l| !l.trim_start().starts_with("//")) {
        for piece in line.split("crate::").skip(1) {
            let name: String = piece.chars().take_while(|c| c.is_ascii_alphanumeric() || *c == '_').collect();
            if !name.is_empty() {
                found.insert(name);
            }
        }
    }
    found
}

#[test]
fn no_import_circle_spans_two_stages() {
    let mut files = Vec::new();
    rust_files(Path::new(SRC), &mut files);
    let units: BTreeSet<String> = files.iter().map(|f| unit_of(f)).filter(|u| u != "lib" && u != "main").collect();
    assert!(units.contains("ingest") && units.contains("analysis") && units.contains("store"), "{units:?}");
    // unit -> (unit it imports -> a file that does)
    let mut edges: BTreeMap<String, BTreeMap<String, PathBuf>> = BTreeMap::new();
    for file in &files {
        let from = unit_of(file);
        if !units.contains(&from) {
            continue;
        }
        for to in references(&std::fs::read_to_string(file).unwrap()) {
            if to != from && units.contains(&to) {
                edges.entry(from.clone()).or_default().entry(to).or_insert_with(|| file.clone());
            }
        }
    }
    // A unit that reaches itself again through others is in a circle.
    let reach = |start: &str| {
        let mut seen = BTreeSet::new();
        let mut stack: Vec<String> = edges.get(start).map(|e| e.keys().cloned().collect()).unwrap_or_default();
        while let Some(unit) = stack.pop() {
            if seen.insert(unit.clone()) {
                stack.extend(edges.get(&unit).map(|e| e.keys().cloned().collect::<Vec<_>>()).unwrap_or_default());
            }
        }
        seen
    };
    let mut circles = Vec::new();
    for unit in &units {
        if reach(unit).contains(unit) {
            let back: Vec<String> = edges[unit]
                .iter()
                .filter(|(to, _)| reach(to).contains(unit))
                .map(|(to, file)| format!("{unit} -> {to} ({})", file.strip_prefix(SRC).unwrap().display()))
                .collect();
            circles.push(back.join(", "));
        }
    }
    assert!(circles.is_empty(), "imports running against the data flow:\n{}", circles.join("\n"));
}
