//! The features a model reads: the families that describe the patch (not
//! the corpus target's size or health, not the machine's load), without
//! those constant over the training samples.

use crate::corpus::dataset::Sample;
use std::collections::BTreeSet;

/// The size-only baseline's one feature.
pub const SIZE_FEATURE: &str = "static.bytes_changed";
/// Features that describe the target's size, not the patch's risk: a
/// model would learn the corpus target's RSS, not anything that carries
/// over to another service. Left out of every model.
pub const EXCLUDED_FEATURES: &[&str] = &[
    "context.rss_bytes",
    "context.ram_total_bytes",
    "context.fd_count",
    "context.window_s",
    "context.metrics_series",
    "context.metrics_error_total",
    "static.module_functions",
];
/// Families of features the model reads. Not `context.`: the corpus target
/// is always healthy, so weights learned for the target's health would be
/// noise; a degraded target raises the risk through its context findings
/// instead ([`shadowpatch_predict::model::ModelRisk`]). Not `analysis.`: those counts mix
/// every source, context included, for the same reason.
/// Of the simulation, only the rates per call (`sim_rate_*`): the corpus
/// always captures 8 calls, so raw counts would teach the model the
/// corpus's call count (fewer calls there means failures stopped it early).
const FEATURE_PREFIXES: &[&str] = &["static.", "sim_rate_", "history."];
/// Feature families that measure the machine, not the patch (the live
/// pause of a capture depends on the load of the moment).
/// Nor `sim_rate_memory_pages_differing`: which pages differ after a call
/// depends on the program's stack and heap layout (1 page per call for a
/// trivially correct patch of another fixture), so its corpus weight does
/// not carry over; leaks are seen by static analysis's allocation checks.
const EXCLUDED_PREFIXES: &[&str] = &["sim_live_pause_", "sim_rate_memory_pages_differing"];
/// The features a model reads: known families, not excluded, and not
/// constant over `samples` (a constant carries no information), sorted.
pub fn select_features(samples: &[Sample], keep: &dyn Fn(&str) -> bool) -> Vec<String> {
    let names: BTreeSet<&String> = samples.iter().flat_map(|s| s.features.keys()).collect();
    names
        .into_iter()
        .filter(|name| FEATURE_PREFIXES.iter().any(|p| name.starts_with(p)))
        .filter(|name| !EXCLUDED_FEATURES.contains(&name.as_str()))
        .filter(|name| !EXCLUDED_PREFIXES.iter().any(|p| name.starts_with(p)))
        .filter(|name| keep(name))
        .filter(|name| {
            let values: Vec<f64> = samples.iter().map(|s| value(s, name)).collect();
            values.iter().any(|v| *v != values[0])
        })
        .cloned()
        .collect()
}

pub(crate) fn value(sample: &Sample, name: &str) -> f64 {
    sample
        .features
        .get(name)
        .copied()
        .filter(|v| v.is_finite())
        .unwrap_or(0.0)
}

pub(crate) fn matrix(samples: &[Sample], features: &[String]) -> Vec<Vec<f64>> {
    samples
        .iter()
        .map(|s| features.iter().map(|f| value(s, f)).collect())
        .collect()
}
