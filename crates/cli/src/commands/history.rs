//! `shadowpatch history [PID]`: the event history (attach, mirror, alerts,
//! heals, analyses, applies, rollbacks with their cause, watch verdicts),
//! read from the SQLite database in the state directory.

use super::Context;
use crate::failure::BadInput;
use crate::output::print_json;
use shadowpatch_store::{Event, EventFilter, EventKind, Store};

/// The options of `history`.
#[derive(Debug, Clone)]
pub struct HistoryQuery {
    pub pid: Option<i32>,
    pub since: Option<String>,
    pub kinds: Vec<String>,
    pub limit: Option<u64>,
}

pub fn run(context: &Context, query: &HistoryQuery) -> anyhow::Result<i32> {
    let filter = EventFilter {
        pid: query.pid,
        since_unix_ms: query.since.as_deref().map(parse_since).transpose()?,
        kinds: query
            .kinds
            .iter()
            .map(|name| {
                EventKind::parse(name).ok_or_else(|| {
                    let known: Vec<&str> = EventKind::ALL.iter().map(|k| k.as_str()).collect();
                    BadInput(format!(
                        "--kind {name}: unknown event kind (kinds: {})",
                        known.join(", ")
                    ))
                })
            })
            .collect::<Result<_, _>>()?,
        limit: query.limit,
        ..Default::default()
    };
    let events = match Store::open_read_only(&context.state_dir)? {
        Some(store) => store.events(&filter)?,
        None => Vec::new(),
    };
    if context.json {
        print_json(&events);
        return Ok(0);
    }
    if events.is_empty() {
        println!(
            "no events{}",
            query.pid.map(|p| format!(" for pid {p}")).unwrap_or_default()
        );
        return Ok(0);
    }
    for event in &events {
        println!("{}", describe(event));
    }
    Ok(0)
}

/// `--since`: a duration back from now (`90s`, `15m`, `2h`, `3d`), an RFC
/// 3339 time (`2026-11-25T10:00:00Z`), or Unix milliseconds.
pub fn parse_since(text: &str) -> Result<u64, BadInput> {
    let now = shadowpatch_store::now_ms();
    if let Ok(duration) = humantime::parse_duration(text) {
        return Ok(now.saturating_sub(duration.as_millis() as u64));
    }
    if let Ok(time) = humantime::parse_rfc3339_weak(text) {
        return time
            .duration_since(std::time::UNIX_EPOCH)
            .map(|d| d.as_millis() as u64)
            .map_err(|_| BadInput(format!("--since {text}: before 1970")));
    }
    if let Ok(ms) = text.parse::<u64>() {
        return Ok(ms);
    }
    Err(BadInput(format!(
        "--since {text}: expected a duration (15m, 2h, 3d), an RFC 3339 time or Unix milliseconds"
    )))
}

/// One line: time, kind, target, patch, outcome, cause, duration.
fn describe(event: &Event) -> String {
    let time =
        humantime::format_rfc3339_millis(std::time::UNIX_EPOCH + std::time::Duration::from_millis(event.unix_ms));
    let mut line = format!("{time} {:<16}", event.kind.as_str());
    if let (Some(pid), Some(start)) = (event.pid, event.start_time) {
        line.push_str(&format!(" pid {pid} ({start})"));
    }
    if let Some(patch) = &event.patch_id {
        line.push_str(&format!(" patch {patch}"));
    }
    if let Some(outcome) = &event.outcome {
        line.push_str(&format!(" {outcome}"));
    }
    if let Some(cause) = &event.cause {
        line.push_str(&format!(" (cause: {cause})"));
    }
    if let Some(us) = event.duration_us {
        line.push_str(&format!(" {us} µs"));
    }
    if let Some(summary) = event.details.get("summary").and_then(|s| s.as_str()) {
        line.push_str(&format!(" — {summary}"));
    }
    line
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn since_accepts_durations_times_and_milliseconds() {
        let now = shadowpatch_store::now_ms();
        let fifteen_minutes_ago = parse_since("15m").unwrap();
        assert!((now - 15 * 60_000).abs_diff(fifteen_minutes_ago) < 5_000);
        assert_eq!(parse_since("2026-11-25T10:00:00Z").unwrap(), 1_795_600_800_000);
        assert_eq!(parse_since("1234").unwrap(), 1234);
        assert!(parse_since("yesterday-ish")
            .unwrap_err()
            .0
            .contains("--since yesterday-ish"));
    }
}
