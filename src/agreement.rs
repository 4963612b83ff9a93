//! Agreement between two raters over a fixed list of categories: the confusion matrix, accuracy,
//! Cohen's kappa and one-vs-rest figures per class. The evaluation scores the agent against
//! labels with it, and the finding log the agent against its readers' reviews.

use serde::Serialize;

/// A category the matrix was not made for.
#[derive(Debug, thiserror::Error)]
#[error("{category:?} is not one of {known}")]
pub struct UnknownCategory {
    pub category: String,
    pub known: String,
}

/// Counts of (true, predicted) pairs over a fixed list of categories: the classes first, then
/// whatever else predictions may say.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct ConfusionMatrix {
    pub categories: Vec<String>,
    /// `counts[true][predicted]`, indices into `categories`.
    pub counts: Vec<Vec<u64>>,
}

/// One class against the rest. A figure whose denominator is zero (no such labels, or no such
/// predictions) is `None`: there is nothing to measure, which is not the same as 0 or 1.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct ClassMetrics {
    pub class: String,
    pub labelled: u64,
    pub predicted: u64,
    pub sensitivity: Option<f64>,
    pub specificity: Option<f64>,
    pub ppv: Option<f64>,
    pub npv: Option<f64>,
    pub youden: Option<f64>,
}

impl ConfusionMatrix {
    /// An empty matrix over `categories`, which must name every label and prediction to come.
    pub fn new<S: Into<String>>(categories: impl IntoIterator<Item = S>) -> ConfusionMatrix {
        let categories: Vec<String> = categories.into_iter().map(Into::into).collect();
        let n = categories.len();
        ConfusionMatrix { categories, counts: vec![vec![0; n]; n] }
    }

    fn index(&self, category: &str) -> Result<usize, UnknownCategory> {
        self.categories
            .iter()
            .position(|c| c == category)
            .ok_or_else(|| UnknownCategory { category: category.to_string(), known: self.categories.join(", ") })
    }

    pub fn add(&mut self, truth: &str, predicted: &str) -> Result<(), UnknownCategory> {
        let (t, p) = (self.index(truth)?, self.index(predicted)?);
        self.counts[t][p] += 1;
        Ok(())
    }

    pub fn set(&mut self, truth: &str, predicted: &str, count: u64) -> Result<(), UnknownCategory> {
        let (t, p) = (self.index(truth)?, self.index(predicted)?);
        self.counts[t][p] = count;
        Ok(())
    }

    pub fn total(&self) -> u64 {
        self.counts.iter().flatten().sum()
    }

    pub fn correct(&self) -> u64 {
        (0..self.categories.len()).map(|i| self.counts[i][i]).sum()
    }

    fn row_sum(&self, i: usize) -> u64 {
        self.counts[i].iter().sum()
    }

    fn column_sum(&self, j: usize) -> u64 {
        self.counts.iter().map(|row| row[j]).sum()
    }

    /// Correct over all labelled discs; `None` with no labels.
    pub fn accuracy(&self) -> Option<f64> {
        ratio(self.correct(), self.total())
    }

    /// Cohen's kappa: agreement beyond what the two marginals would give by chance. Categories
    /// only predictions use have an empty row, so they add disagreement and nothing by chance.
    /// `None` with no labels, or when chance agreement is already total (one category used by
    /// both sides for everything), where kappa is undefined.
    pub fn kappa(&self) -> Option<f64> {
        let total = self.total() as f64;
        if total == 0.0 {
            return None;
        }
        let observed = self.correct() as f64 / total;
        let chance: f64 = (0..self.categories.len())
            .map(|i| self.row_sum(i) as f64 * self.column_sum(i) as f64 / (total * total))
            .sum();
        (chance < 1.0).then(|| (observed - chance) / (1.0 - chance))
    }

    /// One-vs-rest figures for `class`.
    pub fn class_metrics(&self, class: &str) -> Result<ClassMetrics, UnknownCategory> {
        let i = self.index(class)?;
        let total = self.total();
        let true_positive = self.counts[i][i];
        let labelled = self.row_sum(i);
        let predicted = self.column_sum(i);
        let false_negative = labelled - true_positive;
        let false_positive = predicted - true_positive;
        let true_negative = total - labelled - false_positive;
        let sensitivity = ratio(true_positive, labelled);
        let specificity = ratio(true_negative, true_negative + false_positive);
        Ok(ClassMetrics {
            class: class.to_string(),
            labelled,
            predicted,
            sensitivity,
            specificity,
            ppv: ratio(true_positive, predicted),
            npv: ratio(true_negative, true_negative + false_negative),
            youden: sensitivity.zip(specificity).map(|(se, sp)| se + sp - 1.0),
        })
    }
}

fn ratio(numerator: u64, denominator: u64) -> Option<f64> {
    (denominator > 0).then(|| numerator as f64 / denominator as f64)
}
