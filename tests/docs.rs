//! The documentation's shape: a short front page from which every document is reachable, and no
//! relative link that leads nowhere (sections moved between files are where links break).

use std::path::{Path, PathBuf};

const ROOT: &str = env!("CARGO_MANIFEST_DIR");

/// Relative link targets in Markdown text: `](target)`, without the `#anchor`.
fn relative_links(text: &str) -> Vec<String> {
    text.split("](")
        .skip(1)
        .filter_map(|rest| rest.split_once(')').map(|(target, _)| target))
        .filter(|target| !target.contains("://") && !target.starts_with('#'))
        .map(|target| target.split('#').next().unwrap_or_default().to_string())
        .collect()
}

fn documents() -> Vec<PathBuf> {
    let mut docs: Vec<PathBuf> = std::fs::read_dir(Path::new(ROOT).join("docs"))
        .expect("docs/")
        .map(|entry| entry.unwrap().path())
        .filter(|path| path.extension().is_some_and(|e| e == "md"))
        .collect();
    docs.sort();
    docs
}

#[test]
fn the_front_page_is_short_and_reaches_every_document() {
    let readme = std::fs::read_to_string(Path::new(ROOT).join("README.md")).unwrap();
    let lines = readme.lines().count();
    assert!(lines < 150, "README.md has {lines} lines: the front page should stay under 150");
    let linked = relative_links(&readme);
    let docs = documents();
    assert!(docs.len() >= 4, "operations, conformance, design and benchmarks: {docs:?}");
    for doc in docs {
        let name = format!("docs/{}", doc.file_name().unwrap().to_string_lossy());
        assert!(linked.contains(&name), "README.md does not link {name}");
    }
    assert!(readme.contains("scripts/test.sh"), "the README's test command is what .ci/run runs");
}

#[test]
fn every_relative_link_leads_to_a_file() {
    let mut files = vec![Path::new(ROOT).join("README.md"), Path::new(ROOT).join("model/README.md")];
    files.extend(documents());
    for file in files {
        let text = std::fs::read_to_string(&file).unwrap();
        for target in relative_links(&text) {
            let resolved = file.parent().unwrap().join(&target);
            assert!(resolved.exists(), "{}: link to {target} leads nowhere", file.display());
        }
    }
}
