//! The train/test split by group: variants of one function never
//! straddle train and test, so the test measures patches of functions the
//! model never saw.

use crate::corpus::dataset::Sample;
use crate::corpus::variants::seeded;
use std::collections::BTreeSet;

/// The samples split by group.
#[derive(Debug, Clone)]
pub struct Split {
    pub train: Vec<Sample>,
    pub test: Vec<Sample>,
    pub test_groups: Vec<String>,
}

/// Hold out whole functions (in a seeded order) until `fraction` of the
/// corpus samples are in the test split. History samples always train.
pub fn split(corpus: &[Sample], history: &[Sample], seed: u64, fraction: f64) -> Split {
    let mut groups: Vec<&str> = corpus
        .iter()
        .map(|s| s.group.as_str())
        .collect::<BTreeSet<_>>()
        .into_iter()
        .collect();
    groups.sort_by_key(|g| seeded(seed, g));
    let wanted = (corpus.len() as f64 * fraction).round() as usize;
    let mut test_groups = BTreeSet::new();
    let mut held = 0;
    for group in groups {
        if held >= wanted {
            break;
        }
        held += corpus.iter().filter(|s| s.group == group).count();
        test_groups.insert(group.to_string());
    }
    split_by_groups(corpus, history, &test_groups.into_iter().collect::<Vec<_>>())
}

/// Split with the given test groups (as a model file records them).
pub fn split_by_groups(corpus: &[Sample], history: &[Sample], test_groups: &[String]) -> Split {
    let (test, mut train): (Vec<Sample>, Vec<Sample>) =
        corpus.iter().cloned().partition(|s| test_groups.contains(&s.group));
    train.extend(history.iter().cloned());
    Split {
        train,
        test,
        test_groups: test_groups.to_vec(),
    }
}
