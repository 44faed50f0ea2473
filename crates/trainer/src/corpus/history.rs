//! Samples from the local event history: an applied patch later rolled
//! back because it crashed, failed a health check or was asked to go by
//! the application is harmful; one kept by a watch verdict, or still
//! active (not rolled back) long after it was applied, is benign. Each is
//! paired with the features its `analysis` event recorded before the
//! apply; patches without one, or whose fate is not known yet, are left out.

use super::dataset::Sample;
use shadowpatch_predict::finding::Analysis;
use shadowpatch_store::{Event, EventFilter, EventKind, Store, StoreError};
use std::path::Path;

/// Rollback causes that make a patch harmful.
pub const HARMFUL_CAUSES: &[&str] = &["crash", "health", "request"];
/// How long an applied patch must stay to count as benign: 24 hours.
pub const DEFAULT_BENIGN_AFTER_MS: u64 = 24 * 3600 * 1000;

/// Samples from `events` (oldest first), as of `now_ms`.
pub fn history_samples(events: &[Event], now_ms: u64, benign_after_ms: u64) -> Vec<Sample> {
    let same = |a: &Event, b: &Event| a.pid == b.pid && a.start_time == b.start_time && a.patch_id == b.patch_id;
    let mut samples = Vec::new();
    for (index, apply) in events.iter().enumerate() {
        if apply.kind != EventKind::Apply || apply.outcome.as_deref() != Some("ok") || apply.patch_id.is_none() {
            continue;
        }
        let Some(analysis) = events[..index]
            .iter()
            .rev()
            .filter(|e| e.kind == EventKind::Analysis && same(e, apply))
            .find_map(|e| serde_json::from_value::<Analysis>(e.details.get("analysis")?.clone()).ok())
        else {
            continue;
        };
        let later = &events[index + 1..];
        // The patch's fate: its first rollback, or a watch verdict.
        let fate = later.iter().filter(|e| same(e, apply)).find(|e| {
            (e.kind == EventKind::Rollback && e.outcome.as_deref() == Some("ok")) || e.kind == EventKind::WatchVerdict
        });
        let label = match fate {
            Some(e) if e.kind == EventKind::WatchVerdict => match e.outcome.as_deref() {
                Some("keep") => Some((false, "watch:keep".to_string())),
                Some("rollback") => Some((true, "watch:rollback".to_string())),
                _ => None,
            },
            Some(rollback) => {
                let cause = rollback.cause.as_deref().unwrap_or("");
                if HARMFUL_CAUSES.contains(&cause) {
                    Some((true, format!("rollback:{cause}")))
                } else if rollback.unix_ms.saturating_sub(apply.unix_ms) >= benign_after_ms {
                    Some((false, format!("rollback:{cause} after the benign window")))
                } else {
                    None
                }
            }
            None if now_ms.saturating_sub(apply.unix_ms) >= benign_after_ms => {
                Some((false, "still active".to_string()))
            }
            None => None,
        };
        let Some((harmful, outcome)) = label else { continue };
        let patch = apply.patch_id.as_deref().unwrap_or_default();
        samples.push(Sample::from_analysis(
            &format!("history:{}:{}:{patch}", apply.pid.unwrap_or(0), apply.id),
            &format!("history:{patch}"),
            "history",
            harmful,
            &outcome,
            &analysis,
        ));
    }
    samples
}

/// The history samples of the state directory's event history.
pub fn read_history(state_dir: &Path, now_ms: u64, benign_after_ms: u64) -> Result<Vec<Sample>, StoreError> {
    let Some(store) = Store::open_read_only(state_dir)? else {
        return Ok(Vec::new());
    };
    let events = store.events(&EventFilter {
        kinds: vec![
            EventKind::Analysis,
            EventKind::Apply,
            EventKind::Rollback,
            EventKind::WatchVerdict,
        ],
        ..Default::default()
    })?;
    Ok(history_samples(&events, now_ms, benign_after_ms))
}

#[cfg(test)]
mod tests {
    use super::*;
    use shadowpatch_predict::finding::{Finding, Severity, Source, Verdict};
    use std::collections::BTreeMap;

    fn event(id: i64, unix_ms: u64, kind: EventKind, patch: &str) -> Event {
        Event {
            id,
            unix_ms,
            kind,
            pid: Some(10),
            start_time: Some(99),
            patch_id: Some(patch.to_string()),
            cause: None,
            outcome: Some("ok".to_string()),
            duration_us: None,
            details: serde_json::json!({}),
        }
    }

    fn analysis(id: i64, unix_ms: u64, patch: &str, warnings: f64) -> Event {
        let analysis = Analysis {
            verdict: Verdict::Warn,
            risk: 0.4,
            findings: vec![Finding::new("added-loop", Severity::Warning, Source::Static, "x")],
            features: BTreeMap::from([("analysis.warnings".to_string(), warnings)]),
            unavailable: Vec::new(),
            explanation: Default::default(),
        };
        Event {
            details: serde_json::json!({ "analysis": analysis }),
            outcome: Some("warn".into()),
            ..event(id, unix_ms, EventKind::Analysis, patch)
        }
    }

    #[test]
    fn rollbacks_for_crash_are_harmful_kept_patches_benign_and_undecided_ones_left_out() {
        let hour = 3600 * 1000;
        let mut crash = event(4, 3 * hour, EventKind::Rollback, "a");
        crash.cause = Some("crash".into());
        let mut command = event(8, 5 * hour + 1, EventKind::Rollback, "c");
        command.cause = Some("command".into());
        let events = vec![
            analysis(1, hour, "a", 1.0),
            event(2, hour + 1, EventKind::Apply, "a"),
            analysis(3, 2 * hour, "b", 2.0),
            event(5, 2 * hour + 1, EventKind::Apply, "b"),
            crash,
            analysis(6, 5 * hour, "c", 3.0),
            event(7, 5 * hour, EventKind::Apply, "c"),
            command,
            event(9, 6 * hour, EventKind::Apply, "no-analysis"),
        ];
        let samples = history_samples(&events, 30 * hour, DEFAULT_BENIGN_AFTER_MS);
        let summary: Vec<(String, bool, f64)> = samples
            .iter()
            .map(|s| (s.group.clone(), s.harmful, s.features["analysis.warnings"]))
            .collect();
        // a: rolled back for a crash; b: still active after 28 hours;
        // c: rolled back by command within the hour (unknown); no-analysis: no features.
        assert_eq!(
            summary,
            [
                ("history:a".to_string(), true, 1.0),
                ("history:b".to_string(), false, 2.0)
            ]
        );
        assert_eq!(samples[0].outcome, "rollback:crash");
        // Too early to call b benign.
        assert_eq!(history_samples(&events, 3 * hour, DEFAULT_BENIGN_AFTER_MS).len(), 1);
    }
}
