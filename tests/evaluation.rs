//! The evaluation's figures against the IDAICS paper's own: its Table 2 (per-class figures) and
//! its kappa must follow from its Table 1 (the confusion matrix) by our arithmetic.

use idaics::analysis::findings::canonical_class;
use idaics::evaluation::ConfusionMatrix;

const TABLES: &str = concat!(env!("CARGO_MANIFEST_DIR"), "/../shared/data/paper/idaics-tables.md");

/// The rows of the markdown table that follows `heading`, cells trimmed, header and rule dropped.
fn table_rows(text: &str, heading: &str) -> Vec<Vec<String>> {
    let start = text.find(heading).unwrap_or_else(|| panic!("{heading:?} not in {TABLES}"));
    text[start..]
        .lines()
        .skip_while(|l| !l.starts_with('|'))
        .take_while(|l| l.starts_with('|'))
        .skip(2)
        .map(|l| l.trim_matches('|').split('|').map(|c| c.trim().to_string()).collect())
        .collect()
}

fn round3(x: f64) -> f64 {
    (x * 1000.0).round() / 1000.0
}

#[test]
fn the_papers_table_2_and_kappa_follow_from_its_table_1() {
    let text = std::fs::read_to_string(TABLES).unwrap();
    let header_start = text.find("## Table 1").unwrap();
    let header: Vec<&'static str> = text[header_start..]
        .lines()
        .find(|l| l.starts_with('|'))
        .unwrap()
        .trim_matches('|')
        .split('|')
        .skip(1)
        .map(|c| canonical_class(c.trim()).unwrap_or_else(|| panic!("column {c:?}")))
        .collect();
    let mut matrix = ConfusionMatrix::for_findings();
    let table1 = table_rows(&text, "## Table 1");
    assert_eq!(table1.len(), 4);
    for row in &table1 {
        let truth = canonical_class(&row[0]).unwrap();
        for (predicted, count) in header.iter().zip(&row[1..]) {
            matrix.set(truth, predicted, count.parse().unwrap()).unwrap();
        }
    }
    assert_eq!((matrix.correct(), matrix.total()), (69, 74));
    assert!(text.contains("Accuracy 69/74 = 93.2%; Cohen's kappa 0.905"));
    assert_eq!(round3(matrix.accuracy().unwrap()), 0.932);
    assert_eq!(round3(matrix.kappa().unwrap()), 0.905);

    let table2 = table_rows(&text, "## Table 2");
    assert_eq!(table2.len(), 4);
    for row in &table2 {
        let class = canonical_class(&row[0]).unwrap();
        let paper: Vec<f64> = row[1..].iter().map(|c| c.parse().unwrap()).collect();
        let ours = matrix.class_metrics(class).unwrap();
        let figures = [ours.sensitivity, ours.specificity, ours.ppv, ours.npv].map(Option::unwrap);
        for (name, (ours, paper)) in ["sensitivity", "specificity", "PPV", "NPV"].iter().zip(figures.iter().zip(&paper))
        {
            assert_eq!(round3(*ours), *paper, "{class} {name}");
        }
        // The paper's Youden is the sum of its rounded figures (protrusion: 0.897 + 0.956 - 1 =
        // 0.853, where the exact value rounds to 0.852); ours is exact.
        let youden = ours.youden.unwrap();
        assert!((youden - (figures[0] + figures[1] - 1.0)).abs() < 1e-12);
        assert!(
            round3(youden) == paper[4] || round3(round3(figures[0]) + round3(figures[1]) - 1.0) == paper[4],
            "{class} Youden {youden} against {}",
            paper[4]
        );
    }
    let protrusion = matrix.class_metrics("protrusion").unwrap();
    assert_eq!(round3(protrusion.youden.unwrap()), 0.852);
}
