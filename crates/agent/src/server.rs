//! The agent itself: start-up recovery of every target, the control socket
//! serving the CLI, and the threads behind the application socket and the
//! metrics endpoint. Every state-changing request is authenticated here and
//! carried out by the operations layer (`shadowpatch_ops`), the same code
//! the CLI runs acting directly.

use crate::inputs::PrivateInputs;
use crate::metrics::Metrics;
use crate::peer::{authorize, peer_of, Peer};
use crate::protocol::{serve_lines, ControlReply, ControlRequest, FailureKind};
use crate::targets::Targets;
use crate::AgentError;
use shadowpatch_mirror::StateDir;
use shadowpatch_ops::{ApplyRequest, ApplyResult, RollbackRequest};
use shadowpatch_patch::journal::Journal;
use shadowpatch_patch::manifest::{MAX_MANIFEST_BYTES, MAX_OBJECT_BYTES};
use shadowpatch_patch::Manifest;
use shadowpatch_store::{record_best_effort, EventKind, NewEvent};
use std::io::Write;
use std::net::{SocketAddr, TcpListener};
use std::os::unix::fs::PermissionsExt;
use std::os::unix::net::{UnixListener, UnixStream};
use std::path::{Path, PathBuf};
use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::Duration;

/// Connections served at once on the control socket (CLI commands are
/// short); more are answered "busy" and closed, so a flood cannot exhaust
/// the agent's threads.
const MAX_CONTROL_CONNECTIONS: usize = 64;
/// On the application socket, where each cooperating process keeps one
/// connection open (closed after `protocol::IDLE_TIMEOUT`, reopened on
/// next use).
const MAX_APP_CONNECTIONS: usize = 1024;
/// Connections one non-root uid may hold at once on the control socket
/// (a user's CLI needs one per command) and on the application socket
/// (one per cooperating process of that user).
const MAX_CONTROL_CONNECTIONS_PER_UID: usize = 16;
const MAX_APP_CONNECTIONS_PER_UID: usize = 64;
/// Slots of each socket only root may take: other users filling theirs
/// never make the root CLI "too many connections".
const ROOT_RESERVED_CONNECTIONS: usize = 8;

#[derive(Debug, Clone)]
pub struct AgentConfig {
    pub state_dir: PathBuf,
    pub control_socket: PathBuf,
    pub app_socket: PathBuf,
    /// None: no metrics endpoint.
    pub metrics_listen: Option<SocketAddr>,
    /// Permissions of the control socket (0600: root only; 0666 lets
    /// users reach it, and peer credentials then limit each to their own
    /// targets). The application socket is always 0666: any process may
    /// act on itself.
    pub control_socket_mode: u32,
    /// How the agent's watchers run (`heal` is set per target).
    pub watch: shadowpatch_watch::WatchOptions,
    /// The agent's default policy after each apply it makes: apply through
    /// watch stubs and watch the service this long (faults survived and
    /// rolled back, metrics judged; `health_watch`). `None`: plain apply.
    pub watch_after_apply: Option<shadowpatch_ops::health_watch::WatchArgs>,
    /// How often persisted patches' scopes are swept for new processes
    /// (`ops::persist`); `None`: never.
    pub persist_interval: Option<std::time::Duration>,
    /// How often patched targets' descendants are looked for processes to
    /// adopt (`ops::adopt_descendants`); `None`: never.
    pub follow_interval: Option<std::time::Duration>,
    /// The fleet predictor for applies whose request names none (and the
    /// persisted patches' sweeps); their outcomes are reported to it.
    pub predictor: Option<shadowpatch_predict::PredictorSettings>,
}

/// What happened to one target at start-up.
#[derive(Debug, Clone, serde::Serialize)]
pub struct TargetRecovery {
    pub pid: i32,
    pub start_time: u64,
    /// consistent, fully_applied, fully_rolled_back, error, exited
    pub outcome: String,
    pub message: Option<String>,
    pub watching: bool,
    /// A watch window the last agent left unfinished, and what this one
    /// does with it (`window.rs`).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub window: Option<shadowpatch_ops::window::LeftWindow>,
}

/// The start-up report, printed as the agent's ready line.
#[derive(Debug, Clone, serde::Serialize)]
pub struct StartReport {
    pub event: &'static str,
    pub pid: u32,
    pub state_dir: PathBuf,
    pub control_socket: PathBuf,
    pub app_socket: PathBuf,
    pub metrics: Option<SocketAddr>,
    pub targets: Vec<TargetRecovery>,
}

#[derive(Debug)]
pub struct Agent {
    pub config: AgentConfig,
    /// The state directory, canonical, to compare with the CLI's.
    state_dir_canonical: PathBuf,
    pub metrics: Arc<Metrics>,
    pub targets: Arc<Targets>,
}

impl Agent {
    /// Apply every persisted patch to the new processes of its scope, about
    /// every `interval`, for as long as the agent runs. Each process is
    /// looked at once per rule (a refusal is not retried every second; it
    /// is in the history).
    fn persist_loop(&self, interval: std::time::Duration) {
        let mut seen: std::collections::BTreeMap<String, std::collections::BTreeSet<(i32, u64)>> =
            std::collections::BTreeMap::new();
        loop {
            match shadowpatch_ops::persist::rules(&self.config.state_dir) {
                Ok(rules) => {
                    seen.retain(|id, _| rules.iter().any(|r| &r.id == id));
                    for mut rule in rules {
                        if rule.request.analysis.predictor.is_none() {
                            rule.request.analysis.predictor = self.config.predictor.clone();
                        }
                        let sweep = shadowpatch_ops::persist::sweep(
                            &self.config.state_dir,
                            &rule,
                            seen.entry(rule.id.clone()).or_default(),
                        );
                        for pid in &sweep.applied {
                            tracing::info!(pid, patch = %rule.id, "persisted patch applied to a new process");
                        }
                        for (pid, error) in &sweep.failed {
                            tracing::warn!(pid, patch = %rule.id, %error, "persisted patch not applied");
                        }
                        let count = |n: usize| n as u64;
                        self.metrics
                            .persist_applies
                            .fetch_add(count(sweep.applied.len()), Ordering::Relaxed);
                        self.metrics
                            .applies
                            .fetch_add(count(sweep.applied.len()), Ordering::Relaxed);
                        self.metrics
                            .persist_build_id_changed
                            .fetch_add(count(sweep.build_id_changed.len()), Ordering::Relaxed);
                    }
                }
                Err(error) => tracing::warn!(%error, "cannot read the persisted patches"),
            }
            std::thread::sleep(interval);
        }
    }

    /// Adopt the processes patched targets fork, about every `interval`,
    /// for as long as the agent runs (`ops::adopt_descendants`).
    fn follow_loop(&self, interval: std::time::Duration) {
        let mut tried = std::collections::BTreeSet::new();
        loop {
            let followed = shadowpatch_ops::adopt_descendants(&self.config.state_dir, &mut tried);
            for adopted in &followed.adopted {
                tracing::info!(pid = adopted.pid, "{}", adopted.describe());
            }
            for (pid, error) in &followed.refused {
                tracing::warn!(pid, %error, "a forked process was not adopted");
            }
            self.metrics
                .adoptions
                .fetch_add(followed.adopted.len() as u64, Ordering::Relaxed);
            self.metrics
                .adoptions_refused
                .fetch_add(followed.refused.len() as u64, Ordering::Relaxed);
            std::thread::sleep(interval);
        }
    }

    /// Recover every target, resume the persisted watchers, bind the
    /// sockets and the metrics port, and start serving on threads.
    pub fn start(config: AgentConfig) -> Result<(Arc<Agent>, StartReport), AgentError> {
        StateDir::create(&config.state_dir)?;
        let state_dir_canonical = config.state_dir.canonicalize().map_err(|source| AgentError::File {
            path: config.state_dir.clone(),
            source,
        })?;
        let metrics = Arc::new(Metrics::default());
        let targets = Targets::new(&config.state_dir, Arc::clone(&metrics), config.watch.clone());
        let agent = Arc::new(Agent {
            state_dir_canonical,
            metrics,
            targets,
            config: config.clone(),
        });
        // Bind first: a second agent is refused before it touches any
        // target. Connections wait in the backlog until recovery is done
        // and the accept threads start.
        let control = bind(&config.control_socket, config.control_socket_mode)?;
        let app = bind(&config.app_socket, 0o666)?;
        // Private copies a killed agent left (`inputs.rs`): this agent
        // owns the state directory now that it holds the sockets.
        let _ = std::fs::remove_dir_all(config.state_dir.join("agent-inputs"));
        let recoveries = agent.recover_all();
        record_best_effort(
            &config.state_dir,
            &NewEvent::new(EventKind::Agent)
                .outcome("started")
                .details(serde_json::json!({ "pid": std::process::id(), "targets": recoveries })),
        );
        let metrics_address = match config.metrics_listen {
            None => None,
            Some(address) => {
                let listener = TcpListener::bind(address).map_err(|source| AgentError::Metrics {
                    address: address.to_string(),
                    source,
                })?;
                let bound = listener.local_addr().map_err(|source| AgentError::Metrics {
                    address: address.to_string(),
                    source,
                })?;
                let scraped = Arc::clone(&agent);
                spawn("metrics", move || {
                    crate::metrics::serve(listener, move || scraped.metrics.render(&scraped.patches_active()))
                })?;
                Some(bound)
            }
        };
        let served = Arc::clone(&agent);
        spawn("control", move || {
            accept_loop(
                control,
                &served,
                Limits {
                    total: MAX_CONTROL_CONNECTIONS,
                    per_uid: MAX_CONTROL_CONNECTIONS_PER_UID,
                },
                Agent::serve_control,
            )
        })?;
        let served = Arc::clone(&agent);
        spawn("app", move || {
            accept_loop(
                app,
                &served,
                Limits {
                    total: MAX_APP_CONNECTIONS,
                    per_uid: MAX_APP_CONNECTIONS_PER_UID,
                },
                crate::app::serve_app,
            )
        })?;
        if let Some(interval) = config.persist_interval {
            let persisting = Arc::clone(&agent);
            spawn("persist", move || persisting.persist_loop(interval))?;
        }
        if let Some(interval) = config.follow_interval {
            let following = Arc::clone(&agent);
            spawn("follow", move || following.follow_loop(interval))?;
        }
        let report = StartReport {
            event: "ready",
            pid: std::process::id(),
            state_dir: config.state_dir.clone(),
            control_socket: config.control_socket.clone(),
            app_socket: config.app_socket.clone(),
            metrics: metrics_address,
            targets: recoveries,
        };
        Ok((agent, report))
    }

    /// Every live target with state here: finish or undo its interrupted
    /// transaction (`recover`), then resume its watcher if the last agent
    /// ran one. One target's damage (a corrupt journal) is reported and
    /// the others are still served.
    fn recover_all(&self) -> Vec<TargetRecovery> {
        let persisted = Targets::load_persisted(&self.config.state_dir);
        let mut report = Vec::new();
        for (pid, start_time, dir) in target_dirs(&self.config.state_dir) {
            // A pid that exec'd since is a dead target too.
            if !shadowpatch_mirror::StateDir::describes_live(&dir, pid, start_time) {
                continue;
            }
            let mut entry = TargetRecovery {
                pid,
                start_time,
                outcome: "consistent".into(),
                message: None,
                watching: false,
                window: None,
            };
            match Journal::replay(&dir) {
                Err(error) => {
                    entry.outcome = "error".into();
                    entry.message = Some(error.to_string());
                }
                Ok(journal) if journal.open.is_none() && journal.retired.is_empty() => {}
                Ok(_) => match shadowpatch_ops::recover(&self.config.state_dir, pid) {
                    Ok(outcome) => {
                        self.metrics.recoveries.fetch_add(1, Ordering::Relaxed);
                        entry.outcome = serde_json::to_value(outcome.state)
                            .ok()
                            .and_then(|v| v.as_str().map(str::to_string))
                            .unwrap_or_default();
                    }
                    Err(error) => {
                        entry.outcome = "error".into();
                        entry.message = Some(error.to_string());
                    }
                },
            }
            if let Some(watched) = persisted.iter().find(|w| w.pid == pid && w.start_time == start_time) {
                match self.targets.watch(pid, watched.heal, &[]) {
                    Ok(_) => entry.watching = true,
                    Err(error) => {
                        entry.message = Some(match entry.message.take() {
                            Some(previous) => format!("{previous}; watch: {error}"),
                            None => format!("watch: {error}"),
                        })
                    }
                }
            }
            // A kept window's generation a kill left unpublished, then a
            // window left unfinished (after the watcher took the lock it
            // needs at start: the window holds it while it runs).
            if let Err(error) = shadowpatch_patch::republish::republish_for(&self.config.state_dir, pid) {
                tracing::warn!(pid, %error, "could not publish the kept generation");
            }
            if let Some((left, _thread)) = shadowpatch_ops::window::finish_left_window(&self.config.state_dir, pid) {
                tracing::info!(pid, action = %left.action, reason = %left.reason, "watch window left by the last agent");
                entry.window = Some(left);
            }
            if let Some(message) = &entry.message {
                tracing::warn!(pid, %message, "target needs attention");
            }
            report.push(entry);
        }
        report
    }

    /// Active patches of every live target (pid, start time, count), read
    /// from the journals.
    pub fn patches_active(&self) -> Vec<(i32, u64, u64)> {
        target_dirs(&self.config.state_dir)
            .into_iter()
            .filter(|(pid, start_time, dir)| shadowpatch_mirror::StateDir::describes_live(dir, *pid, *start_time))
            .filter_map(|(pid, start_time, dir)| {
                Journal::replay(&dir)
                    .ok()
                    .map(|journal| (pid, start_time, journal.active.len() as u64))
            })
            .collect()
    }

    /// Serve one CLI connection: one reply line per request line, until
    /// the client closes.
    fn serve_control(self: &Arc<Self>, stream: UnixStream, peer: Peer) -> std::io::Result<()> {
        serve_lines(
            stream,
            &self.metrics,
            |reason| ControlReply::failure(FailureKind::BadInput, reason),
            |request: ControlRequest| self.handle(&request, &peer),
        )
    }

    fn handle(&self, request: &ControlRequest, peer: &Peer) -> ControlReply {
        let asked = request
            .state_dir()
            .canonicalize()
            .unwrap_or_else(|_| request.state_dir().into());
        if asked != self.state_dir_canonical {
            return ControlReply::failure(
                FailureKind::WrongStateDir,
                format!(
                    "the agent serves state directory {}, not {}",
                    self.config.state_dir.display(),
                    request.state_dir().display()
                ),
            );
        }
        let result = authorize(peer, request.pid()).and_then(|()| self.perform(request, peer));
        match result {
            Ok(value) => ControlReply::success(value),
            // The refusal goes back whole: the CLI shows its analysis.
            Err(AgentError::ApplyRefused(refused)) => {
                let mut reply = ControlReply::failure(refused.class.into(), refused.message.clone());
                reply.result = to_json(&ApplyResult::Refused(refused));
                reply
            }
            Err(error) => {
                if matches!(error, AgentError::Unauthorised { .. }) {
                    self.metrics.bad_requests.fetch_add(1, Ordering::Relaxed);
                    tracing::warn!(uid = peer.uid, peer_pid = peer.pid, %error, "refused");
                }
                ControlReply::failure(error.failure_kind(), error.to_string())
            }
        }
    }

    fn perform(&self, request: &ControlRequest, peer: &Peer) -> Result<serde_json::Value, AgentError> {
        let state_dir = &self.config.state_dir;
        match request {
            ControlRequest::Status { pid, .. } => Ok(serde_json::json!({
                "agent_pid": std::process::id(),
                "watched": self.targets.status(*pid),
            })),
            ControlRequest::Apply {
                pid,
                manifest,
                attempts,
                force,
                analysis,
                ..
            } => {
                // Every input is opened once, checked on its descriptor
                // and copied privately; ops reads only the copies.
                let private = PrivateInputs::create(state_dir)?;
                let manifest = crate::inputs::normal_absolute(manifest)?;
                let (manifest_bytes, manifest_copy) = private.take(peer.uid, &manifest, MAX_MANIFEST_BYTES)?;
                let (parsed, _) = Manifest::from_bytes(&manifest, &manifest_bytes)?;
                if parsed.object.is_absolute() && peer.uid != 0 {
                    return Err(AgentError::Input {
                        path: manifest.clone(),
                        message: format!(
                            "names its object {} by an absolute path: through the agent a user's manifest names its object relative to the manifest",
                            parsed.object.display()
                        ),
                    });
                }
                if !parsed.object.is_absolute() {
                    let parent = manifest.parent().unwrap_or(Path::new("/"));
                    let object = crate::inputs::normal_absolute(&parent.join(&parsed.object))?;
                    private.take(peer.uid, &object, MAX_OBJECT_BYTES)?;
                    // The copy's tree must hold every directory a `..` in
                    // the object's name passes through.
                    if let Some(through) = manifest_copy.parent().map(|p| p.join(&parsed.object)) {
                        if let Some(directory) = through.parent() {
                            let _ = std::fs::create_dir_all(directory);
                        }
                    }
                }
                // A signature beside the manifest is optional: copied when
                // it is the requester's, otherwise the apply is unsigned.
                let signature = shadowpatch_signing::signature_path(&manifest);
                if let Err(error) = private.take(peer.uid, &signature, MAX_MANIFEST_BYTES) {
                    tracing::debug!(%error, "no signature taken");
                }
                let mut analysis = (**analysis).clone();
                // The log may grow while the analysis samples it: not
                // copied, but read through the agent's own descriptor of
                // the file checked (`/proc/self/fd/N` reopens that inode,
                // not the path), held open until the apply is done.
                let mut held_logs = Vec::new();
                if let Some(log) = analysis.log.as_mut() {
                    let (file, _) = crate::inputs::open_own(peer.uid, &crate::inputs::normal_absolute(log)?)?;
                    *log = PathBuf::from(format!("/proc/self/fd/{}", std::os::fd::AsRawFd::as_raw_fd(&file)));
                    held_logs.push(file);
                }
                let token = analysis.predictor.as_mut().and_then(|p| p.token_file.as_mut());
                for file in [analysis.model.as_mut(), analysis.vectors.as_mut(), token]
                    .into_iter()
                    .flatten()
                {
                    let original = crate::inputs::normal_absolute(file)?;
                    *file = private.take(peer.uid, &original, MAX_OBJECT_BYTES)?.1;
                }
                if analysis.predictor.is_none() {
                    // The agent's own predictor (its token is the agent's file).
                    analysis.predictor = self.config.predictor.clone();
                }
                let request = ApplyRequest {
                    pid: *pid,
                    manifest: manifest_copy,
                    attempts: *attempts,
                    force: *force,
                    analysis,
                    requested_by: format!(
                        "agent (uid {}, pid {}, manifest {})",
                        peer.uid,
                        peer.pid,
                        manifest.display()
                    ),
                    baseline_module_only: false,
                    no_ancestor_state: false,
                };
                // With a watch policy the connection's thread is the
                // tracer for the window: the reply comes with the verdict.
                let policy = self.config.watch_after_apply.as_ref();
                match shadowpatch_ops::apply(state_dir, &request, policy, None)? {
                    ApplyResult::Refused(refused) => Err(AgentError::ApplyRefused(refused)),
                    ApplyResult::Applied(applied) => {
                        self.metrics.applied(*pid, applied.apply.pause_us);
                        if let Some(report) = applied.watch.as_ref().filter(|_| applied.rolled_back_by_watch()) {
                            self.metrics.rolled_back(
                                *pid,
                                &report.cause,
                                report.rollback.as_ref().map_or(0, |r| r.pause_us),
                            );
                        }
                        Ok(to_json(&ApplyResult::Applied(applied)))
                    }
                }
            }
            ControlRequest::Rollback {
                pid,
                patch_id,
                restore_state,
                ..
            } => {
                let request = RollbackRequest {
                    pid: *pid,
                    patch_id: patch_id.clone(),
                    restore_state: *restore_state,
                    cause: "command".into(),
                };
                let outcome = shadowpatch_ops::rollback(state_dir, &request).inspect_err(|_| {
                    self.metrics.rollback_refused(*pid, "command");
                })?;
                self.metrics.rolled_back(*pid, "command", outcome.rollback.pause_us);
                Ok(to_json(&outcome))
            }
            ControlRequest::Recover { pid, .. } => {
                let outcome = shadowpatch_ops::recover(state_dir, *pid)?;
                self.metrics.recoveries.fetch_add(1, Ordering::Relaxed);
                Ok(to_json(&outcome))
            }
            ControlRequest::Watch { pid, heal, .. } => Ok(to_json(&self.targets.watch(*pid, *heal, &[])?)),
            ControlRequest::Unwatch { pid, .. } => {
                self.targets.unwatch(*pid)?;
                Ok(serde_json::json!({ "pid": pid, "watched": false }))
            }
        }
    }

    /// Roll back (through the operations layer) and count it by cause.
    pub fn rollback(
        &self,
        pid: i32,
        patch_id: Option<&str>,
        cause: &str,
    ) -> Result<shadowpatch_patch::RollbackOutcome, AgentError> {
        let request = RollbackRequest {
            pid,
            patch_id: patch_id.map(str::to_string),
            restore_state: false,
            cause: cause.to_string(),
        };
        let outcome = shadowpatch_ops::rollback(&self.config.state_dir, &request)
            .inspect_err(|_| self.metrics.rollback_refused(pid, cause))?
            .rollback;
        self.metrics.rolled_back(pid, cause, outcome.pause_us);
        Ok(outcome)
    }

    /// Stop the watchers (their list stays persisted) and remove the
    /// sockets, at an orderly shutdown.
    pub fn shutdown(&self) {
        self.targets.stop_all();
        let _ = std::fs::remove_file(&self.config.control_socket);
        let _ = std::fs::remove_file(&self.config.app_socket);
        record_best_effort(
            &self.config.state_dir,
            &NewEvent::new(EventKind::Agent)
                .outcome("stopped")
                .details(serde_json::json!({ "pid": std::process::id() })),
        );
    }
}

fn to_json<T: serde::Serialize>(value: &T) -> serde_json::Value {
    serde_json::to_value(value).expect("outcomes serialize")
}

fn write_reply(writer: &mut UnixStream, reply: &ControlReply) -> std::io::Result<()> {
    let mut line = serde_json::to_vec(reply).expect("replies serialize");
    line.push(b'\n');
    writer.write_all(&line)
}

/// Every `targets/<pid>-<start_time>` directory under the state directory.
pub fn target_dirs(state_dir: &Path) -> Vec<(i32, u64, PathBuf)> {
    let Ok(entries) = std::fs::read_dir(state_dir.join("targets")) else {
        return Vec::new();
    };
    let mut found: Vec<(i32, u64, PathBuf)> = entries
        .filter_map(|e| {
            let entry = e.ok()?;
            let name = entry.file_name().into_string().ok()?;
            let (pid, start) = name.split_once('-')?;
            Some((pid.parse().ok()?, start.parse().ok()?, entry.path()))
        })
        .collect();
    found.sort();
    found
}

/// Bind a Unix socket at `path` with `mode`, replacing a stale socket file
/// (left by an agent that was killed) but refusing when an agent answers.
fn bind(path: &Path, mode: u32) -> Result<UnixListener, AgentError> {
    let socket_error = |source| AgentError::Socket {
        path: path.to_path_buf(),
        source,
    };
    if let Some(parent) = path.parent() {
        std::fs::create_dir_all(parent).map_err(socket_error)?;
    }
    if path.exists() {
        if UnixStream::connect(path).is_ok() {
            return Err(AgentError::AlreadyRunning {
                path: path.to_path_buf(),
            });
        }
        std::fs::remove_file(path).map_err(socket_error)?;
    }
    // The socket is created with the umask's permissions and then
    // narrowed; a restrictive umask meanwhile closes the window in which
    // another user could connect. Start-up is single-threaded here, so the
    // process-wide umask is not raced.
    let previous = nix::sys::stat::umask(nix::sys::stat::Mode::from_bits_truncate(0o177));
    let bound = UnixListener::bind(path);
    nix::sys::stat::umask(previous);
    let listener = bound.map_err(socket_error)?;
    std::fs::set_permissions(path, std::fs::Permissions::from_mode(mode)).map_err(socket_error)?;
    Ok(listener)
}

fn spawn(name: &str, work: impl FnOnce() + Send + 'static) -> Result<(), AgentError> {
    std::thread::Builder::new()
        .name(name.to_string())
        .spawn(work)
        .map(drop)
        .map_err(|source| AgentError::File {
            path: PathBuf::from(format!("{name} thread")),
            source,
        })
}

/// How many connections a socket serves at once, in all and per uid.
#[derive(Debug, Clone, Copy)]
struct Limits {
    total: usize,
    per_uid: usize,
}

/// Connections open on one socket, counted per uid.
#[derive(Debug, Default)]
pub struct ConnectionCounts {
    by_uid: std::sync::Mutex<std::collections::HashMap<u32, usize>>,
}

impl ConnectionCounts {
    /// Take a slot for `uid`, or say why not. Root may take every slot;
    /// any other uid at most `per_uid`, and never the last
    /// `ROOT_RESERVED_CONNECTIONS` of `total`.
    fn admit(&self, uid: u32, total: usize, per_uid: usize) -> Result<(), &'static str> {
        let mut by_uid = self.by_uid.lock().unwrap_or_else(|poisoned| poisoned.into_inner());
        let open: usize = by_uid.values().sum();
        let mine = by_uid.get(&uid).copied().unwrap_or(0);
        if uid == 0 {
            if open >= total {
                return Err("the agent is busy: too many connections");
            }
        } else if mine >= per_uid {
            return Err("too many connections from this uid");
        } else if open + ROOT_RESERVED_CONNECTIONS.min(total) >= total {
            return Err("the agent is busy: too many connections");
        }
        *by_uid.entry(uid).or_insert(0) += 1;
        Ok(())
    }

    fn release(&self, uid: u32) {
        let mut by_uid = self.by_uid.lock().unwrap_or_else(|poisoned| poisoned.into_inner());
        if let Some(count) = by_uid.get_mut(&uid) {
            *count -= 1;
            if *count == 0 {
                by_uid.remove(&uid);
            }
        }
    }
}

/// Accept connections, each served on its own thread with its peer's
/// credentials, within `limits`: a user's slow or idle connections take
/// only that user's slots, and root always finds one.
fn accept_loop(
    listener: UnixListener,
    agent: &Arc<Agent>,
    limits: Limits,
    serve: fn(&Arc<Agent>, UnixStream, Peer) -> std::io::Result<()>,
) {
    let counts = Arc::new(ConnectionCounts::default());
    for stream in listener.incoming() {
        let Ok(mut stream) = stream else { continue };
        let peer = match peer_of(&stream) {
            Ok(peer) => peer,
            Err(error) => {
                tracing::warn!(%error, "dropping a connection");
                continue;
            }
        };
        if let Err(reason) = counts.admit(peer.uid, limits.total, limits.per_uid) {
            // Never block the accept loop on a client that does not read.
            let _ = stream.set_write_timeout(Some(Duration::from_millis(100)));
            let _ = write_reply(&mut stream, &ControlReply::failure(FailureKind::Failed, reason));
            continue;
        }
        let agent = Arc::clone(agent);
        let released = Arc::clone(&counts);
        let spawned = std::thread::Builder::new().name("connection".into()).spawn(move || {
            if let Err(error) = serve(&agent, stream, peer) {
                tracing::debug!(%error, peer_pid = peer.pid, "connection ended");
            }
            released.release(peer.uid);
        });
        if spawned.is_err() {
            counts.release(peer.uid);
            tracing::warn!("cannot start a connection thread");
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn one_user_fills_only_their_slots_and_root_always_finds_one() {
        let counts = ConnectionCounts::default();
        for _ in 0..4 {
            counts.admit(1000, 20, 4).unwrap();
        }
        assert!(counts.admit(1000, 20, 4).is_err(), "per uid");
        for _ in 0..4 {
            counts.admit(1001, 20, 4).unwrap();
        }
        for _ in 0..4 {
            counts.admit(1002, 20, 4).unwrap();
        }
        // 12 open: other users stop at total - reserved (20 - 8).
        assert!(counts.admit(1003, 20, 4).is_err(), "reserved for root");
        for _ in 0..8 {
            counts.admit(0, 20, 4).unwrap();
        }
        assert!(counts.admit(0, 20, 4).is_err(), "the total holds for root too");
        // Slots come back when connections end.
        counts.release(0);
        counts.admit(0, 20, 4).unwrap();
        for _ in 0..8 {
            counts.release(0);
        }
        counts.release(1000);
        counts.admit(1000, 20, 4).unwrap();
    }
}
