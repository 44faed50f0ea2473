//! The targets the agent verifies continuously: one `Watcher` thread each,
//! and the set persisted (`STATE/agent/watched.json`, written atomically)
//! so that an agent restarted, even after SIGKILL, resumes every watcher.

use crate::metrics::Metrics;
use crate::AgentError;
use shadowpatch_mirror::variables::VariableRequest;
use shadowpatch_watch::{EventSink, WatchError, WatchEvent, WatchOptions, WatchStats, Watcher};
use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::thread::JoinHandle;

/// One persisted entry: the target incarnation and how it is watched.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct WatchedEntry {
    pub pid: i32,
    pub start_time: u64,
    pub heal: bool,
}

#[derive(Debug)]
struct Running {
    entry: WatchedEntry,
    stop: Arc<AtomicBool>,
    stats: Arc<Mutex<WatchStats>>,
    thread: Option<JoinHandle<()>>,
}

/// What the agent tells about a watched target.
#[derive(Debug, Clone, serde::Serialize)]
pub struct WatchedStatus {
    pub pid: i32,
    pub start_time: u64,
    pub heal: bool,
    pub passes: u64,
    pub alerts: u64,
    pub heals: u64,
    pub generation: u32,
}

/// The watchers, keyed by pid.
#[derive(Debug)]
pub struct Targets {
    state_dir: PathBuf,
    metrics: Arc<Metrics>,
    /// How every watcher runs (interval, CPU budget; heal is per target).
    options: WatchOptions,
    running: Mutex<BTreeMap<i32, Running>>,
    /// Watchers remove themselves when their target exits.
    myself: Mutex<Option<std::sync::Weak<Targets>>>,
}

impl Targets {
    pub fn new(state_dir: &Path, metrics: Arc<Metrics>, options: WatchOptions) -> Arc<Targets> {
        let targets = Arc::new(Targets {
            state_dir: state_dir.to_path_buf(),
            metrics,
            options,
            running: Mutex::new(BTreeMap::new()),
            myself: Mutex::new(None),
        });
        *targets.myself.lock().unwrap_or_else(|p| p.into_inner()) = Some(Arc::downgrade(&targets));
        targets
    }

    fn persisted_path(state_dir: &Path) -> PathBuf {
        state_dir.join("agent").join("watched.json")
    }

    /// The set persisted by the last agent (empty if none, or unreadable:
    /// said so in the log, never fatal).
    pub fn load_persisted(state_dir: &Path) -> Vec<WatchedEntry> {
        let path = Self::persisted_path(state_dir);
        match std::fs::read(&path) {
            Ok(bytes) => serde_json::from_slice(&bytes).unwrap_or_else(|error| {
                tracing::warn!(path = %path.display(), %error, "ignoring an unreadable watched-target list");
                Vec::new()
            }),
            Err(_) => Vec::new(),
        }
    }

    fn persist(&self, running: &BTreeMap<i32, Running>) {
        let entries: Vec<&WatchedEntry> = running.values().map(|r| &r.entry).collect();
        let path = Self::persisted_path(&self.state_dir);
        let result = std::fs::create_dir_all(path.parent().expect("has a parent")).and_then(|()| {
            shadowpatch_mirror::store::write_atomically(&path, &serde_json::to_vec(&entries).expect("serializes"))
        });
        if let Err(error) = result {
            tracing::warn!(path = %path.display(), %error, "cannot persist the watched-target list");
        }
    }

    pub fn is_watched(&self, pid: i32) -> bool {
        self.lock().contains_key(&pid)
    }

    pub fn heal_of(&self, pid: i32) -> Option<bool> {
        self.lock().get(&pid).map(|r| r.entry.heal)
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, BTreeMap<i32, Running>> {
        self.running.lock().unwrap_or_else(|p| p.into_inner())
    }

    pub fn status(&self, pid: i32) -> Option<WatchedStatus> {
        self.lock().get(&pid).map(|r| {
            let stats = *r.stats.lock().unwrap_or_else(|p| p.into_inner());
            WatchedStatus {
                pid,
                start_time: r.entry.start_time,
                heal: r.entry.heal,
                passes: stats.passes,
                alerts: stats.alerts,
                heals: stats.heals,
                generation: stats.generation,
            }
        })
    }

    pub fn pids(&self) -> Vec<i32> {
        self.lock().keys().copied().collect()
    }

    /// Start (or restart, with `requests` registered first) the watcher of
    /// `pid`. The watcher's start runs here, so its errors reach the caller.
    pub fn watch(&self, pid: i32, heal: bool, requests: &[VariableRequest]) -> Result<WatchedStatus, AgentError> {
        self.unwatch_quietly(pid);
        let stats = Arc::new(Mutex::new(WatchStats::default()));
        let options = WatchOptions {
            heal,
            ..self.options.clone()
        };
        let sink = || counting_sink(pid, Arc::clone(&self.metrics), Arc::clone(&stats));
        // A child forked from a patched process takes its inherited state
        // first (see `ops::adopt`).
        shadowpatch_ops::adopt_if_forked(&self.state_dir, pid)?;
        let mut watcher = match Watcher::start(pid, &self.state_dir, requests, options.clone(), sink()) {
            // An unusable event history (corrupt, or written by a newer
            // shadowpatch) must not leave the target unwatched: watch on
            // without recording, and say so.
            Err(WatchError::Store(error)) => {
                tracing::warn!(pid, %error, "event history unusable: watching without recording events");
                let options = WatchOptions {
                    record_history: false,
                    ..options
                };
                Watcher::start(pid, &self.state_dir, requests, options, sink())?
            }
            other => other?,
        };
        watcher.set_healer(Arc::new(shadowpatch_ops::heal::OpsHealer));
        let entry = WatchedEntry {
            pid,
            start_time: watcher.identity().start_time,
            heal,
        };
        let exited_dir = self
            .state_dir
            .join("targets")
            .join(format!("{pid}-{}", entry.start_time));
        let start_time = entry.start_time;
        let stop = Arc::new(AtomicBool::new(false));
        let thread_stop = Arc::clone(&stop);
        let myself = self.myself.lock().unwrap_or_else(|p| p.into_inner()).clone();
        let thread = std::thread::Builder::new()
            .name(format!("watch-{pid}"))
            .spawn(move || {
                let outcome = watcher.run(&thread_stop);
                let exited = match &outcome {
                    Ok(shadowpatch_watch::StopReason::Requested) => false,
                    Ok(shadowpatch_watch::StopReason::TargetExited(reason)) => {
                        tracing::info!(pid, %reason, "watched target exited");
                        true
                    }
                    Err(error) => {
                        tracing::warn!(pid, %error, "watcher stopped on an error");
                        !shadowpatch_mirror::StateDir::describes_live(&exited_dir, pid, start_time)
                    }
                };
                if exited {
                    // Its registered variables (up to 16 MiB of copies)
                    // serve no one once it is gone.
                    let registry = shadowpatch_mirror::variables::VariableRegistry::path_in(&exited_dir);
                    if let Err(error) = std::fs::remove_file(&registry) {
                        if error.kind() != std::io::ErrorKind::NotFound {
                            tracing::warn!(pid, %error, "cannot remove the exited target's variables");
                        }
                    }
                }
                // Not asked to stop: the target went away, forget it.
                if !thread_stop.load(Ordering::Relaxed) {
                    if let Some(targets) = myself.and_then(|weak| weak.upgrade()) {
                        targets.forget(pid, &thread_stop);
                    }
                }
            })
            .map_err(|source| AgentError::File {
                path: PathBuf::from(format!("watcher thread of pid {pid}")),
                source,
            })?;
        let mut running = self.lock();
        running.insert(
            pid,
            Running {
                entry,
                stop,
                stats,
                thread: Some(thread),
            },
        );
        self.metrics
            .targets_watched
            .store(running.len() as u64, Ordering::Relaxed);
        self.persist(&running);
        drop(running);
        Ok(self.status(pid).expect("inserted above"))
    }

    /// Remove `pid`'s entry if it is still the watcher whose flag is `stop`.
    fn forget(&self, pid: i32, stop: &Arc<AtomicBool>) {
        let mut running = self.lock();
        if running.get(&pid).is_some_and(|r| Arc::ptr_eq(&r.stop, stop)) {
            running.remove(&pid);
            self.metrics
                .targets_watched
                .store(running.len() as u64, Ordering::Relaxed);
            self.persist(&running);
        }
    }

    /// Stop watching `pid`.
    pub fn unwatch(&self, pid: i32) -> Result<(), AgentError> {
        if self.unwatch_quietly(pid) {
            Ok(())
        } else {
            Err(AgentError::NotWatched { pid })
        }
    }

    fn unwatch_quietly(&self, pid: i32) -> bool {
        let removed = {
            let mut running = self.lock();
            let removed = running.remove(&pid);
            self.metrics
                .targets_watched
                .store(running.len() as u64, Ordering::Relaxed);
            if removed.is_some() {
                self.persist(&running);
            }
            removed
        };
        match removed {
            Some(mut running) => {
                running.stop.store(true, Ordering::Relaxed);
                if let Some(thread) = running.thread.take() {
                    let _ = thread.join();
                }
                true
            }
            None => false,
        }
    }

    /// Stop every watcher (at shutdown), keeping the persisted list so the
    /// next agent resumes them.
    pub fn stop_all(&self) {
        let running = std::mem::take(&mut *self.lock());
        for (_, mut running) in running {
            running.stop.store(true, Ordering::Relaxed);
            if let Some(thread) = running.thread.take() {
                let _ = thread.join();
            }
        }
    }
}

/// The watcher's event sink: counts passes, alerts and heals into the
/// agent's metrics and the target's own counters.
fn counting_sink(pid: i32, metrics: Arc<Metrics>, stats: Arc<Mutex<WatchStats>>) -> EventSink {
    Box::new(move |event: &WatchEvent| {
        let mut stats = stats.lock().unwrap_or_else(|p| p.into_inner());
        match event {
            WatchEvent::Pass {
                pass_us, generation, ..
            } => {
                metrics.swept(pid, *pass_us as f64 / 1e6);
                stats.passes += 1;
                stats.generation = *generation;
            }
            WatchEvent::Alert(_)
            | WatchEvent::PermissionsChanged { .. }
            | WatchEvent::NewExecutableMapping { .. }
            | WatchEvent::RegionUnmapped { .. } => {
                metrics.alerted(pid);
                stats.alerts += 1;
            }
            WatchEvent::Heal(_) => {
                metrics.healed(pid);
                stats.heals += 1;
            }
            WatchEvent::Started { generation, .. } | WatchEvent::GenerationSwitched { to: generation, .. } => {
                stats.generation = *generation
            }
            _ => {}
        }
    })
}
