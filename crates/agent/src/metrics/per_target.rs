//! Per-target series within a bounded cardinality: the first
//! `MAX_LABELLED_TARGETS` live targets the agent counts something for get
//! their own labels (`pid`, `comm`, `unit`); any further target is counted
//! under `pid="other"`. A labelled target that has exited (its pid gone or
//! now another process) is folded into `other` at the next scrape, which
//! frees its slot: `other` only ever grows, so every series stays a valid
//! counter, and the labelled series plus `other` add up to the totals.

use std::collections::BTreeMap;
use std::sync::Mutex;

/// Targets with labels of their own at once; the rest are `other`.
pub const MAX_LABELLED_TARGETS: usize = 64;

/// What is counted per target.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum TargetCount<'a> {
    Sweep,
    Alert,
    Heal,
    Apply,
    Rollback(&'a str),
    RollbackRefused(&'a str),
}

#[derive(Debug, Clone, Default)]
struct Counters {
    sweeps: u64,
    alerts: u64,
    heals: u64,
    applies: u64,
    rollbacks: BTreeMap<String, u64>,
    refused: BTreeMap<String, u64>,
}

impl Counters {
    fn add(&mut self, count: TargetCount<'_>, by: u64) {
        match count {
            TargetCount::Sweep => self.sweeps += by,
            TargetCount::Alert => self.alerts += by,
            TargetCount::Heal => self.heals += by,
            TargetCount::Apply => self.applies += by,
            TargetCount::Rollback(cause) => *self.rollbacks.entry(cause.to_string()).or_insert(0) += by,
            TargetCount::RollbackRefused(cause) => *self.refused.entry(cause.to_string()).or_insert(0) += by,
        }
    }

    fn fold_into(self, other: &mut Counters) {
        other.sweeps += self.sweeps;
        other.alerts += self.alerts;
        other.heals += self.heals;
        other.applies += self.applies;
        for (cause, n) in self.rollbacks {
            *other.rollbacks.entry(cause).or_insert(0) += n;
        }
        for (cause, n) in self.refused {
            *other.refused.entry(cause).or_insert(0) += n;
        }
    }
}

#[derive(Debug, Clone)]
struct Labelled {
    comm: String,
    unit: String,
    counters: Counters,
}

/// The live identity of a pid: start time, comm and systemd unit (empty
/// when none), from /proc. `None`: no such process.
pub type Identify = fn(i32) -> Option<(u64, String, String)>;

#[derive(Debug)]
struct Inner {
    labelled: BTreeMap<(i32, u64), Labelled>,
    other: Counters,
}

/// The per-target counters.
#[derive(Debug)]
pub struct PerTarget {
    inner: Mutex<Inner>,
    identify: Identify,
    capacity: usize,
}

impl Default for PerTarget {
    fn default() -> Self {
        PerTarget::new(MAX_LABELLED_TARGETS, identify_from_proc)
    }
}

impl PerTarget {
    pub fn new(capacity: usize, identify: Identify) -> Self {
        PerTarget {
            inner: Mutex::new(Inner {
                labelled: BTreeMap::new(),
                other: Counters::default(),
            }),
            identify,
            capacity,
        }
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, Inner> {
        self.inner.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Count `count` for the process `pid` is now (a pid that is gone is
    /// `other`).
    pub fn count(&self, pid: i32, count: TargetCount<'_>) {
        let identity = (self.identify)(pid);
        let mut inner = self.lock();
        match identity {
            Some((start_time, comm, unit)) => {
                let key = (pid, start_time);
                if !inner.labelled.contains_key(&key) && inner.labelled.len() < self.capacity {
                    inner.labelled.insert(
                        key,
                        Labelled {
                            comm,
                            unit,
                            counters: Counters::default(),
                        },
                    );
                }
                match inner.labelled.get_mut(&key) {
                    Some(labelled) => labelled.counters.add(count, 1),
                    None => inner.other.add(count, 1),
                }
            }
            None => inner.other.add(count, 1),
        }
    }

    /// Targets labelled now (after folding the exited ones).
    pub fn labelled(&self) -> usize {
        self.fold_exited();
        self.lock().labelled.len()
    }

    fn fold_exited(&self) {
        let keys: Vec<(i32, u64)> = self.lock().labelled.keys().copied().collect();
        let gone: Vec<(i32, u64)> = keys
            .into_iter()
            .filter(|(pid, start)| (self.identify)(*pid).is_none_or(|(now, _, _)| now != *start))
            .collect();
        let mut inner = self.lock();
        for key in gone {
            if let Some(labelled) = inner.labelled.remove(&key) {
                let Inner { other, .. } = &mut *inner;
                labelled.counters.fold_into(other);
            }
        }
    }

    /// The per-target series in the text format; `active` is each live
    /// target's active patch count (pid, start time, count), read by the
    /// caller from the journals at scrape time.
    pub fn render(&self, active: &[(i32, u64, u64)], out: &mut String) {
        self.fold_exited();
        // Targets with active patches get a slot if there is room (they
        // are what an operator looks for first).
        for (pid, start_time, count) in active {
            if *count == 0 {
                continue;
            }
            if let Some((now, comm, unit)) = (self.identify)(*pid).filter(|(now, _, _)| now == start_time) {
                let mut inner = self.lock();
                if !inner.labelled.contains_key(&(*pid, now)) && inner.labelled.len() < self.capacity {
                    inner.labelled.insert(
                        (*pid, now),
                        Labelled {
                            comm,
                            unit,
                            counters: Counters::default(),
                        },
                    );
                }
            }
        }
        let inner = self.lock();
        let mut rows: Vec<(String, &Counters)> = inner
            .labelled
            .iter()
            .map(|((pid, _), l)| (labels(&pid.to_string(), &l.comm, &l.unit), &l.counters))
            .collect();
        rows.push((labels("other", "other", ""), &inner.other));
        let mut family = |name: &str, help: &str, value: &dyn Fn(&Counters) -> u64| {
            out.push_str(&format!("# HELP {name} {help}\n# TYPE {name} counter\n"));
            for (labels, counters) in &rows {
                out.push_str(&format!("{name}{{{labels}}} {}\n", value(counters)));
            }
        };
        family(
            "shadowpatch_target_verification_sweeps_total",
            "Verification passes, per target (at most 64 labelled; the rest and exited ones under pid=\"other\").",
            &|c| c.sweeps,
        );
        family("shadowpatch_target_alerts_total", "Alerts raised, per target.", &|c| {
            c.alerts
        });
        family("shadowpatch_target_heals_total", "Heals written, per target.", &|c| {
            c.heals
        });
        family(
            "shadowpatch_target_applies_total",
            "Patches applied by the agent, per target.",
            &|c| c.applies,
        );
        let mut by_cause = |name: &str, help: &str, value: &dyn Fn(&Counters) -> &BTreeMap<String, u64>| {
            out.push_str(&format!("# HELP {name} {help}\n# TYPE {name} counter\n"));
            for (labels, counters) in &rows {
                for (cause, n) in value(counters) {
                    out.push_str(&format!("{name}{{{labels},cause=\"{}\"}} {n}\n", escape(cause)));
                }
            }
        };
        by_cause(
            "shadowpatch_target_rollbacks_total",
            "Rollbacks, per target and cause.",
            &|c| &c.rollbacks,
        );
        by_cause(
            "shadowpatch_target_rollbacks_refused_total",
            "Rollbacks asked for that did not happen, per target and cause.",
            &|c| &c.refused,
        );
        out.push_str(
            "# HELP shadowpatch_target_patches_active Active patches, per live target (labelled targets; the rest under pid=\"other\").\n# TYPE shadowpatch_target_patches_active gauge\n",
        );
        let mut other_active = 0;
        for (pid, start_time, count) in active {
            match inner.labelled.get(&(*pid, *start_time)) {
                Some(l) => out.push_str(&format!(
                    "shadowpatch_target_patches_active{{{}}} {count}\n",
                    labels(&pid.to_string(), &l.comm, &l.unit)
                )),
                None => other_active += count,
            }
        }
        out.push_str(&format!(
            "shadowpatch_target_patches_active{{{}}} {other_active}\n",
            labels("other", "other", "")
        ));
    }
}

fn labels(pid: &str, comm: &str, unit: &str) -> String {
    format!("pid=\"{pid}\",comm=\"{}\",unit=\"{}\"", escape(comm), escape(unit))
}

/// A label value in the text format: backslash, double quote and line
/// feed escaped (a `comm` is the process's to choose).
fn escape(value: &str) -> String {
    value.replace('\\', "\\\\").replace('"', "\\\"").replace('\n', "\\n")
}

/// Start time and comm from /proc/PID/stat (comm ends at the last ')'),
/// and the systemd unit from /proc/PID/cgroup (the last path component
/// ending in `.service` or `.scope`; empty when none).
pub fn identify_from_proc(pid: i32) -> Option<(u64, String, String)> {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    let open = stat.find('(')?;
    let close = stat.rfind(')')?;
    let comm = stat.get(open + 1..close)?.to_string();
    let fields: Vec<&str> = stat.get(close + 1..)?.split_whitespace().collect();
    // Fields from 3 (state): state [0], starttime (22) [19].
    if matches!(fields.first(), Some(&"Z") | Some(&"X")) {
        return None;
    }
    let start_time = fields.get(19)?.parse().ok()?;
    let unit = std::fs::read_to_string(format!("/proc/{pid}/cgroup"))
        .ok()
        .and_then(|text| {
            text.lines().find_map(|line| {
                let path = line.splitn(3, ':').nth(2)?;
                path.rsplit('/')
                    .find(|c| c.ends_with(".service") || c.ends_with(".scope"))
                    .map(str::to_string)
            })
        })
        .unwrap_or_default();
    Some((start_time, comm, unit))
}

#[cfg(test)]
mod tests {
    use super::*;

    /// pids 1..=1000 are alive with start time 7 (a comm with a quote).
    fn fake(pid: i32) -> Option<(u64, String, String)> {
        (1..=1000)
            .contains(&pid)
            .then(|| (7, format!("p\"{pid}"), String::new()))
    }

    #[test]
    fn at_most_capacity_targets_are_labelled_and_the_rest_are_other() {
        let per = PerTarget::new(3, fake);
        for pid in 1..=10 {
            per.count(pid, TargetCount::Apply);
        }
        per.count(1, TargetCount::Rollback("command"));
        per.count(5000, TargetCount::RollbackRefused("command"));
        let mut out = String::new();
        per.render(&[(2, 7, 1), (9, 7, 2)], &mut out);
        assert!(
            out.contains("shadowpatch_target_applies_total{pid=\"1\",comm=\"p\\\"1\",unit=\"\"} 1\n"),
            "{out}"
        );
        assert!(
            out.contains("shadowpatch_target_applies_total{pid=\"other\",comm=\"other\",unit=\"\"} 7\n"),
            "{out}"
        );
        assert!(!out.contains("pid=\"4\""), "{out}");
        assert!(
            out.contains(
                "shadowpatch_target_rollbacks_total{pid=\"1\",comm=\"p\\\"1\",unit=\"\",cause=\"command\"} 1\n"
            ),
            "{out}"
        );
        // A pid that is gone counts as other.
        assert!(out.contains("shadowpatch_target_rollbacks_refused_total{pid=\"other\",comm=\"other\",unit=\"\",cause=\"command\"} 1\n"), "{out}");
        assert!(
            out.contains("shadowpatch_target_patches_active{pid=\"2\",comm=\"p\\\"2\",unit=\"\"} 1\n"),
            "{out}"
        );
        assert!(
            out.contains("shadowpatch_target_patches_active{pid=\"other\",comm=\"other\",unit=\"\"} 2\n"),
            "{out}"
        );
        assert_eq!(per.labelled(), 3);
    }

    fn gone_after_500(pid: i32) -> Option<(u64, String, String)> {
        (pid <= 500).then(|| (7, format!("p{pid}"), "x.service".to_string()))
    }

    #[test]
    fn a_pid_that_is_gone_is_counted_as_other() {
        let per = PerTarget::new(2, gone_after_500);
        per.count(1, TargetCount::Sweep);
        per.count(1, TargetCount::Sweep);
        per.count(2, TargetCount::Alert);
        assert_eq!(per.labelled(), 2);
        // pid 600 is not alive: other straight away.
        per.count(600, TargetCount::Heal);
        let mut out = String::new();
        per.render(&[], &mut out);
        assert!(
            out.contains("shadowpatch_target_verification_sweeps_total{pid=\"1\",comm=\"p1\",unit=\"x.service\"} 2\n"),
            "{out}"
        );
        assert!(
            out.contains("shadowpatch_target_heals_total{pid=\"other\",comm=\"other\",unit=\"\"} 1\n"),
            "{out}"
        );
    }

    #[test]
    fn labelled_targets_that_exit_fold_into_other() {
        // Our own child: labelled while it runs, folded once reaped.
        let mut child = std::process::Command::new("sleep").arg("1000").spawn().unwrap();
        let pid = child.id() as i32;
        let per = PerTarget::default();
        per.count(pid, TargetCount::Apply);
        per.count(pid, TargetCount::Rollback("command"));
        let mut out = String::new();
        per.render(&[], &mut out);
        assert!(
            out.contains(&format!(
                "shadowpatch_target_applies_total{{pid=\"{pid}\",comm=\"sleep\""
            )),
            "{out}"
        );
        child.kill().unwrap();
        child.wait().unwrap();
        let mut out = String::new();
        per.render(&[], &mut out);
        assert!(!out.contains(&format!("pid=\"{pid}\"")), "{out}");
        assert!(
            out.contains("shadowpatch_target_applies_total{pid=\"other\",comm=\"other\",unit=\"\"} 1\n"),
            "{out}"
        );
        assert!(
            out.contains(
                "shadowpatch_target_rollbacks_total{pid=\"other\",comm=\"other\",unit=\"\",cause=\"command\"} 1\n"
            ),
            "{out}"
        );
        assert_eq!(per.labelled(), 0);
    }
}
