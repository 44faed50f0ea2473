//! The `Watcher` (judging differences: `watcher/judge.rs`; the memory map:
//! `watcher/mappings.rs`): start (baseline if needed, register critical variables,
//! start dirty tracking of mirrored ones, re-key the active generation),
//! then verify slice by slice; each pass ends by copying the mirrored
//! variables' written pages (`mirrored.rs`). `step`
//! verifies one slice, `cycle` one full pass, `run` paces passes to the
//! interval and CPU budget until a stop flag is set or the target exits.
//!
//! A pass begins by checking the target is the same live process,
//! re-reading the journal and generation list (switching generation when an
//! authorised change published one) and comparing the memory map with the
//! mirror (unmapped regions, changed permissions, new executable memory).
//! Then each slice reads live memory with `process_vm_readv`, hashes each
//! page with the per-run key and, for a page that differs, compares bytes
//! with the stored page and judges every differing run (`authority.rs`)
//! before reporting it.

use crate::authority::Authority;
use crate::classify::classify;
use crate::config::WatchOptions;
use crate::event::{Location, WatchEvent};
use crate::mirrored::{Changed, MirroredVariables};
use crate::pacing::{sleep_unless_stopped, Pacer};
use crate::watched::{ActiveGeneration, WatchedVariable, CHUNK};
use crate::WatchError;
use shadowpatch_mirror::variables::{merge, resolve, VariableRegistry};
use shadowpatch_mirror::{
    CriticalVariable, MirrorError, PageHasher, StateDir, VariableMode, VariableRequest, PAGE_SIZE,
};
use shadowpatch_patch::state::{ensure_baseline, TargetState};
use shadowpatch_process::maps::read_maps;
use shadowpatch_process::{ProcessIdentity, TargetError, TargetMemory};
use shadowpatch_store::Store;
use shadowpatch_symbols::{modules_of, Module};
use std::collections::HashSet;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Instant;

mod judge;
mod mappings;

/// Receives every event, on the watcher's thread.
pub type EventSink = Box<dyn FnMut(&WatchEvent) + Send>;

/// Bytes of a differing run shown in an alert.
const SHOWN_BYTES: usize = 64;

/// What one `step` did.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum StepOutcome {
    /// A slice was verified; the pass goes on.
    Continue,
    /// The last slice of a pass was verified.
    PassDone,
    /// The target is gone (exited, or its pid names another process).
    TargetExited(String),
}

/// Why `run` returned.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum StopReason {
    /// The stop flag was set.
    Requested,
    TargetExited(String),
}

/// Counters since the watcher started.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct WatchStats {
    pub passes: u64,
    pub alerts: u64,
    pub heals: u64,
    pub generation: u32,
    pub bytes_per_pass: u64,
}

/// Which item the cursor is on.
enum Item {
    Region(usize),
    Variable(usize),
}

/// One unit (page or chunk) whose live bytes differ from the mirror.
struct DifferingUnit {
    unit: u64,
    address: u64,
    expected: Vec<u8>,
    live: Vec<u8>,
}

#[derive(Debug)]
struct Counters {
    passes: u64,
    alerts: u64,
    heals: u64,
}

/// A running verifier of one target.
pub struct Watcher {
    identity: ProcessIdentity,
    state_dir: PathBuf,
    target_dir: PathBuf,
    options: WatchOptions,
    memory: TargetMemory,
    modules: Vec<Module>,
    key: PageHasher,
    generation: ActiveGeneration,
    generation_file: Option<(u64, i64, i64)>,
    variables: Vec<WatchedVariable>,
    /// Mirrored variables and their dirty-page tracker (None: none declared).
    mirrored: Option<MirroredVariables>,
    authority: Authority,
    cursor_item: usize,
    cursor_offset: u64,
    pass_open: bool,
    epoch: Instant,
    sink: EventSink,
    store: Option<Store>,
    buffer: Vec<u8>,
    reported_mappings: HashSet<(u64, u64, String)>,
    heal_failed: HashSet<(u64, Vec<u8>)>,
    /// The operations layer's heal, given by the caller (`set_healer`).
    healer: Option<std::sync::Arc<dyn crate::heal::Healer>>,
    counters: Counters,
    pacer: Option<Pacer>,
    started: WatchEvent,
}

impl std::fmt::Debug for Watcher {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Watcher")
            .field("pid", &self.identity.pid)
            .field("generation", &self.generation.number)
            .field("regions", &self.generation.regions.len())
            .field("variables", &self.variables.len())
            .finish_non_exhaustive()
    }
}

fn now_ms() -> u64 {
    shadowpatch_store::now_ms()
}

impl Watcher {
    /// Prepare to watch `pid`: check options and variables (nothing is
    /// written before they are valid), capture generation 0 if the process
    /// was never mirrored, register new guarded variables, and re-key the
    /// latest generation. Emits `Started` through `sink`.
    pub fn start(
        pid: i32,
        state_dir: &Path,
        requests: &[VariableRequest],
        options: WatchOptions,
        sink: EventSink,
    ) -> Result<Watcher, WatchError> {
        options.validate()?;
        if let Some(method) = options.dirty_method {
            // Refused before anything is written (the target untouched).
            method.probe().map_err(|reason| {
                WatchError::DirtyMethod(format!("{method} is unavailable on this kernel: {reason}"))
            })?;
        }
        let identity = ProcessIdentity::of(pid)?;
        let maps = read_maps(pid)?;
        let modules = modules_of(pid, &maps)?;
        let resolved = resolve(requests, pid, &maps, &modules)?;

        let state = StateDir::create(state_dir)?;
        let target_dir = state.target_dir(pid, identity.start_time);
        probe_writable(&target_dir)?;
        let mut memory = TargetMemory::open(&identity)?;
        let (baseline_taken, registry) = {
            // The lock only while the baseline and registry are written.
            let target = TargetState::open(&state, &identity)?;
            let baseline_taken = StateDir::generations(&target.dir).is_empty();
            ensure_baseline(&state, &target, &identity, &maps, &modules, None)?;
            let mut registry =
                VariableRegistry::load(&target.dir)?.unwrap_or_else(|| VariableRegistry::new(pid, identity.start_time));
            let added = merge(&mut registry, resolved, now_ms(), &mut |address, size| {
                memory.read_vec(address, size as usize).map_err(MirrorError::from)
            })?;
            if added > 0 {
                registry.save(&target.dir)?;
            }
            (baseline_taken, registry)
        };
        let store = if options.record_history {
            Some(Store::open(state_dir)?)
        } else {
            None
        };
        let key = PageHasher::random();
        let mut attempts = 0;
        let (authority, generation) = loop {
            let authority = Authority::open(&target_dir)?;
            let latest = authority.latest_generation().ok_or_else(|| MirrorError::NoMirror {
                pid,
                state_dir: state_dir.to_path_buf(),
            })?;
            match ActiveGeneration::open(&target_dir, latest, &identity, &modules, &key) {
                Ok(generation) => break (authority, generation),
                // A rollback removed it since it was listed: list again.
                Err(WatchError::Mirror(MirrorError::Io { source, .. }))
                    if source.kind() == std::io::ErrorKind::NotFound && attempts < 10 =>
                {
                    attempts += 1
                }
                Err(other) => return Err(other),
            }
        };
        let mirrored_list: Vec<CriticalVariable> = registry
            .variables
            .iter()
            .filter(|v| v.mode == VariableMode::Mirrored)
            .cloned()
            .collect();
        let (mirrored, first_snapshots) = if mirrored_list.is_empty() {
            (None, Vec::new())
        } else {
            let (mirrored, changed) = MirroredVariables::start(
                &identity,
                &mut memory,
                mirrored_list,
                options.dirty_method,
                &target_dir,
                options.history_keep,
            )?;
            (Some(mirrored), changed)
        };
        let variables: Vec<WatchedVariable> = registry
            .guarded()
            .cloned()
            .map(|v| WatchedVariable::new(v, &key))
            .collect();
        let classification = classify(&maps, &modules, &generation, &variables);
        let started = WatchEvent::Started {
            unix_ms: now_ms(),
            pid,
            start_time: identity.start_time,
            generation: generation.number,
            baseline_taken,
            regions: generation.regions.len(),
            pages: generation.pages(),
            bytes: generation.bytes(),
            guarded_variables: variables.iter().map(|v| v.variable.name.clone()).collect(),
            guarded_bytes: variables.iter().map(|v| v.variable.size).sum(),
            mirrored_variables: mirrored.as_ref().map(MirroredVariables::names).unwrap_or_default(),
            mirrored_bytes: mirrored.as_ref().map_or(0, MirroredVariables::bytes),
            dirty_method: mirrored.as_ref().map(MirroredVariables::method),
            dirty_skipped: mirrored
                .as_ref()
                .map(|m| {
                    m.skipped()
                        .iter()
                        .map(|s| format!("{}: {}", s.method, s.reason.as_deref().unwrap_or("unavailable")))
                        .collect()
                })
                .unwrap_or_default(),
            history: options.history_keep,
            classification,
            interval_ms: options.interval.as_millis() as u64,
            cpu_budget_percent: options.cpu_budget_percent,
            heal: options.heal,
            rehash_us: generation.rehash_us,
        };
        let generation_file = authority.latest_file_identity();
        let mut watcher = Watcher {
            identity,
            state_dir: state_dir.to_path_buf(),
            target_dir,
            buffer: vec![0u8; options.slice_bytes],
            options,
            memory,
            modules,
            key,
            generation,
            generation_file,
            variables,
            mirrored,
            authority,
            cursor_item: 0,
            cursor_offset: 0,
            pass_open: false,
            epoch: Instant::now(),
            sink,
            store,
            reported_mappings: HashSet::new(),
            heal_failed: HashSet::new(),
            healer: None,
            counters: Counters {
                passes: 0,
                alerts: 0,
                heals: 0,
            },
            pacer: None,
            started: started.clone(),
        };
        watcher.emit(started);
        watcher.emit_snapshots(first_snapshots);
        Ok(watcher)
    }

    pub fn identity(&self) -> &ProcessIdentity {
        &self.identity
    }

    /// The `Started` event (what is watched and how it was classified).
    /// The heal operation to call when `heal` is on (the operations
    /// layer's `OpsHealer`; the watcher never writes to the target itself).
    pub fn set_healer(&mut self, healer: std::sync::Arc<dyn crate::heal::Healer>) {
        self.healer = Some(healer);
    }

    pub fn started_event(&self) -> &WatchEvent {
        &self.started
    }

    pub fn target_dir(&self) -> &Path {
        &self.target_dir
    }

    pub fn stats(&self) -> WatchStats {
        WatchStats {
            passes: self.counters.passes,
            alerts: self.counters.alerts,
            heals: self.counters.heals,
            generation: self.generation.number,
            bytes_per_pass: self.generation.bytes() + self.variables.iter().map(|v| v.variable.size).sum::<u64>(),
        }
    }

    fn emit(&mut self, event: WatchEvent) {
        if let Some(store) = &self.store {
            if let Some(row) = event.history_row(self.identity.pid, self.identity.start_time) {
                if let Err(error) = store.record(&row) {
                    // Keep watching; say so once and stop trying.
                    self.store = None;
                    let warning = WatchEvent::Warning {
                        unix_ms: now_ms(),
                        message: format!("cannot record events any more ({error}); alerts are still reported here"),
                    };
                    (self.sink)(&warning);
                }
            }
        }
        (self.sink)(&event);
    }

    fn emit_snapshots(&mut self, changed: Vec<Changed>) {
        for changed in changed {
            let event = WatchEvent::Snapshot {
                unix_ms: changed.snapshot.unix_ms,
                variable: changed.name,
                address: changed.address,
                size: changed.snapshot.size,
                value: changed.snapshot.integer(),
                hash: changed.snapshot.hash,
            };
            self.emit(event);
        }
    }

    /// Copy the mirrored variables' written pages and snapshot those that
    /// changed (once per pass).
    fn refresh_mirrored(&mut self) -> Result<(), WatchError> {
        let Some(mirrored) = &mut self.mirrored else {
            return Ok(());
        };
        let (changed, _pages) = mirrored.refresh(&mut self.memory)?;
        self.emit_snapshots(changed);
        Ok(())
    }

    /// Undo the dirty-tracking method in the target; whether it was undone
    /// (None: no mirrored variable). Also done on drop, as a best effort.
    pub fn stop_dirty_tracking(&mut self) -> Option<bool> {
        let mut mirrored = self.mirrored.take()?;
        if let Err(error) = mirrored.persist() {
            self.warn(format!("the last variable snapshots could not be written: {error}"));
        }
        match mirrored.stop() {
            Ok(()) => Some(true),
            // The process is gone, and its memory with the registration.
            Err(_) if self.identity.check_alive().is_err_and(|e| gone(&e)) => Some(true),
            Err(error) => {
                self.warn(format!("dirty-page tracking could not be undone: {error}"));
                Some(false)
            }
        }
    }

    fn warn(&mut self, message: String) {
        self.emit(WatchEvent::Warning {
            unix_ms: now_ms(),
            message,
        });
    }

    fn now_ns(&self) -> u64 {
        self.epoch.elapsed().as_nanos() as u64
    }

    /// One full pass, unpaced.
    pub fn cycle(&mut self) -> Result<StepOutcome, WatchError> {
        loop {
            match self.step()? {
                StepOutcome::Continue => continue,
                other => return Ok(other),
            }
        }
    }

    /// Verify passes paced to the interval and CPU budget until `stop` is
    /// set or the target exits. Emits `Pass` after each pass and `Stopped`
    /// at the end.
    pub fn run(&mut self, stop: &AtomicBool) -> Result<StopReason, WatchError> {
        if self.options.heal && self.healer.is_none() {
            return Err(WatchError::NoHealer);
        }
        self.pacer = Some(Pacer::new(self.options.cpu_budget_percent));
        let mut pass_started = Instant::now();
        let reason = loop {
            if stop.load(Ordering::Relaxed) {
                break StopReason::Requested;
            }
            match self.step()? {
                StepOutcome::Continue => self.pace(stop),
                StepOutcome::PassDone => {
                    self.pace(stop);
                    let pass = WatchEvent::Pass {
                        pass: self.counters.passes,
                        generation: self.generation.number,
                        bytes: self.stats().bytes_per_pass,
                        pass_us: pass_started.elapsed().as_micros() as u64,
                        cpu_percent: self.cpu_percent(),
                        alerts: self.counters.alerts,
                        heals: self.counters.heals,
                    };
                    self.emit(pass);
                    let wait = self.options.interval.saturating_sub(pass_started.elapsed());
                    if !wait.is_zero() {
                        let slept = sleep_unless_stopped(wait, Some(stop));
                        if let Some(pacer) = &mut self.pacer {
                            pacer.idled(slept);
                        }
                    }
                    pass_started = Instant::now();
                }
                StepOutcome::TargetExited(reason) => break StopReason::TargetExited(reason),
            }
        };
        let dirty_method_undone = self.stop_dirty_tracking();
        let stopped = WatchEvent::Stopped {
            unix_ms: now_ms(),
            dirty_method_undone,
            reason: match &reason {
                StopReason::Requested => "requested".into(),
                StopReason::TargetExited(_) => "target_exited".into(),
            },
            passes: self.counters.passes,
            alerts: self.counters.alerts,
            heals: self.counters.heals,
            cpu_percent: self.cpu_percent(),
        };
        self.emit(stopped);
        Ok(reason)
    }

    fn pace(&mut self, stop: &AtomicBool) {
        if let Some(pacer) = &mut self.pacer {
            pacer.pace(Some(stop));
        }
    }

    fn cpu_percent(&self) -> f64 {
        self.pacer.as_ref().map_or(0.0, Pacer::cpu_percent)
    }

    /// Verify one slice (at most `slice_bytes` of one region or variable).
    /// Any error while the target is gone is its exit, whichever read
    /// noticed it first (maps, pagemap, memory, the mirror of a module
    /// that vanished with it): an exit is never a watcher failure.
    pub fn step(&mut self) -> Result<StepOutcome, WatchError> {
        match self.step_once() {
            Err(error) => match self.identity.check_alive() {
                Err(gone_error) if gone(&gone_error) => {
                    let reason = gone_error.to_string();
                    self.emit(WatchEvent::TargetExited {
                        unix_ms: now_ms(),
                        pid: self.identity.pid,
                        reason: reason.clone(),
                    });
                    Ok(StepOutcome::TargetExited(reason))
                }
                _ => Err(error),
            },
            done => done,
        }
    }

    fn step_once(&mut self) -> Result<StepOutcome, WatchError> {
        if !self.pass_open {
            if let Some(reason) = self.begin_pass()? {
                self.emit(WatchEvent::TargetExited {
                    unix_ms: now_ms(),
                    pid: self.identity.pid,
                    reason: reason.clone(),
                });
                return Ok(StepOutcome::TargetExited(reason));
            }
            self.pass_open = true;
        }
        let regions = self.generation.regions.len();
        let item = if self.cursor_item < regions {
            Item::Region(self.cursor_item)
        } else if self.cursor_item < regions + self.variables.len() {
            Item::Variable(self.cursor_item - regions)
        } else {
            // A pagemap or read error may only mean the target just
            // exited: `step` tells.
            self.refresh_mirrored()?;
            self.counters.passes += 1;
            self.cursor_item = 0;
            self.cursor_offset = 0;
            self.pass_open = false;
            return Ok(StepOutcome::PassDone);
        };
        let outcome = match item {
            Item::Region(index) => self.verify_region_slice(index),
            Item::Variable(index) => self.verify_variable_slice(index),
        };
        match outcome {
            Ok(()) => Ok(StepOutcome::Continue),
            Err(WatchError::Target(error)) if gone(&error) => {
                let reason = error.to_string();
                self.emit(WatchEvent::TargetExited {
                    unix_ms: now_ms(),
                    pid: self.identity.pid,
                    reason: reason.clone(),
                });
                Ok(StepOutcome::TargetExited(reason))
            }
            Err(other) => Err(other),
        }
    }

    /// Checks at the start of a pass; `Some(reason)` when the target is gone.
    fn begin_pass(&mut self) -> Result<Option<String>, WatchError> {
        if let Err(error) = self.identity.check_alive() {
            return if gone(&error) {
                Ok(Some(error.to_string()))
            } else {
                Err(error.into())
            };
        }
        // The map first, the journal after: whatever changed the map was
        // journaled before it did, so this order never misses the record.
        let maps = match read_maps(self.identity.pid) {
            Ok(maps) => maps,
            Err(error) if gone(&error) => return Ok(Some(error.to_string())),
            Err(error) => return Err(error.into()),
        };
        self.authority.refresh(self.options.grace)?;
        self.maybe_switch()?;
        self.check_mappings(&maps)?;
        Ok(None)
    }

    /// Switch to the latest published generation when the journal is
    /// settled on one other than the one verified. Returns whether it did
    /// (the pass then starts over).
    fn maybe_switch(&mut self) -> Result<bool, WatchError> {
        if !self.authority.is_settled() {
            return Ok(false);
        }
        let Some(latest) = self.authority.latest_generation() else {
            return Ok(false);
        };
        let file = self.authority.latest_file_identity();
        if latest == self.generation.number && file == self.generation_file {
            return Ok(false);
        }
        if let Ok(maps) = read_maps(self.identity.pid) {
            if let Ok(modules) = modules_of(self.identity.pid, &maps) {
                self.modules = modules;
            }
        }
        let mut next = match ActiveGeneration::open(&self.target_dir, latest, &self.identity, &self.modules, &self.key)
        {
            Ok(next) => next,
            // Removed since we listed it (a rollback right after its
            // apply): the journal view is stale; look again next time.
            Err(WatchError::Mirror(MirrorError::Io { source, .. }))
                if source.kind() == std::io::ErrorKind::NotFound =>
            {
                return Ok(false)
            }
            Err(other) => return Err(other),
        };
        next.inherit(&mut self.generation);
        let from = self.generation.number;
        self.generation = next;
        self.generation_file = file;
        self.cursor_item = 0;
        self.cursor_offset = 0;
        let event = WatchEvent::GenerationSwitched {
            unix_ms: now_ms(),
            from,
            to: latest,
            regions: self.generation.regions.len(),
            bytes: self.generation.bytes(),
            rehash_us: self.generation.rehash_us,
        };
        self.emit(event);
        Ok(true)
    }

    /// Every difference may wait while a committed transaction's
    /// generation is not yet published, up to the timeout. (While a
    /// transaction is open, only the bytes it announced are excused.)
    fn may_wait(&self) -> bool {
        self.authority.awaiting_publication() && !self.authority.unsettled_too_long(self.options.settle_timeout)
    }

    fn advance(&mut self, done: u64, item_len: u64) {
        self.cursor_offset += done;
        if done == 0 || self.cursor_offset >= item_len {
            self.cursor_item += 1;
            self.cursor_offset = 0;
        }
    }

    fn verify_region_slice(&mut self, index: usize) -> Result<(), WatchError> {
        let region = &self.generation.regions[index];
        if region.gone {
            self.advance(0, 0);
            return Ok(());
        }
        let region_len = region.spec.len();
        let address = region.spec.start + self.cursor_offset;
        let len = ((region_len - self.cursor_offset) as usize).min(self.buffer.len());
        let read = read_or_zero(&mut self.memory, address, &mut self.buffer[..len])?;
        let whole = read - read % PAGE_SIZE;
        let now = self.now_ns();
        let first_page = self.cursor_offset / PAGE_SIZE as u64;
        let mut differing = Vec::new();
        let mut cleared = Vec::new();
        let region = &mut self.generation.regions[index];
        for (i, live) in self.buffer[..whole].chunks_exact(PAGE_SIZE).enumerate() {
            let page = first_page + i as u64;
            if self.key.hash(live) == region.hashes[page as usize] {
                region.last_clean[page as usize] = now;
                // (Most passes have nothing alerted: skip the lookup.)
                if !region.alerted.is_empty() && region.alerted.remove(&page).is_some() {
                    cleared.push(region.spec.start + page * PAGE_SIZE as u64);
                }
            } else {
                differing.push((page, live.to_vec()));
            }
        }
        for page_address in cleared {
            self.emit_cleared(page_address);
        }
        if !differing.is_empty() {
            let mut units = Vec::with_capacity(differing.len());
            for (page, live) in differing {
                let region = &self.generation.regions[index];
                units.push(DifferingUnit {
                    unit: page,
                    address: region.spec.start + page * PAGE_SIZE as u64,
                    expected: self.generation.mirror.read_page(region.index, page)?,
                    live,
                });
            }
            if self.judge_and_report(Item::Region(index), units)? {
                // The generation changed: the pass starts over on the new one.
                return Ok(());
            }
        }
        self.advance(whole as u64, region_len);
        Ok(())
    }

    fn verify_variable_slice(&mut self, index: usize) -> Result<(), WatchError> {
        let variable = &self.variables[index];
        let size = variable.variable.size;
        let address = variable.variable.address + self.cursor_offset;
        let len = ((size - self.cursor_offset) as usize).min(self.buffer.len());
        let read = read_or_zero(&mut self.memory, address, &mut self.buffer[..len])?;
        if read < len {
            if !self.variables[index].unreadable_reported {
                self.variables[index].unreadable_reported = true;
                let name = self.variables[index].variable.name.clone();
                self.warn(format!(
                    "guarded variable {name} cannot be read from {:#x} on (unmapped or protected)",
                    address + read as u64
                ));
            }
            self.advance(0, 0);
            return Ok(());
        }
        let now = self.now_ns();
        let first_chunk = self.cursor_offset / CHUNK as u64;
        let mut differing = Vec::new();
        let mut cleared = Vec::new();
        let variable = &mut self.variables[index];
        for (i, live) in self.buffer[..len].chunks(CHUNK).enumerate() {
            let chunk = first_chunk + i as u64;
            if self.key.hash(live) == variable.hashes[chunk as usize] {
                variable.last_clean[chunk as usize] = now;
                if !variable.alerted.is_empty() && variable.alerted.remove(&chunk).is_some() {
                    cleared.push(variable.variable.address + chunk * CHUNK as u64);
                }
            } else {
                let offset = chunk as usize * CHUNK;
                differing.push(DifferingUnit {
                    unit: chunk,
                    address: variable.variable.address + offset as u64,
                    expected: variable.expected[offset..offset + live.len()].to_vec(),
                    live: live.to_vec(),
                });
            }
        }
        for address in cleared {
            self.emit_cleared(address);
        }
        if !differing.is_empty() && self.judge_and_report(Item::Variable(index), differing)? {
            return Ok(());
        }
        self.advance(len as u64, size);
        Ok(())
    }

    fn emit_cleared(&mut self, address: u64) {
        let location = self.locate(address);
        self.emit(WatchEvent::Cleared {
            unix_ms: now_ms(),
            address,
            address_hex: format!("{address:#x}"),
            location,
        });
    }

    fn locate(&self, address: u64) -> Location {
        let location = Location::of(address, &self.modules);
        if location.module.is_some() {
            return location;
        }
        match self
            .generation
            .regions
            .iter()
            .find(|r| (r.spec.start..r.spec.end).contains(&address))
        {
            Some(region) => Location::in_region(&region.spec.module, region.spec.start, address),
            None => location,
        }
    }
}

impl Drop for Watcher {
    fn drop(&mut self) {
        // Snapshots still queued reach the file (best effort; `run` and
        // `stop_dirty_tracking` write them and report failures).
        if let Some(mirrored) = &mut self.mirrored {
            let _ = mirrored.persist();
        }
    }
}

/// Whether a target error means the process is gone (exited, zombie, or
/// its pid recycled).
fn gone(error: &TargetError) -> bool {
    matches!(
        error,
        TargetError::NoSuchProcess { .. }
            | TargetError::Zombie { .. }
            | TargetError::Exited { .. }
            | TargetError::Recycled { .. }
            | TargetError::Execd { .. }
    )
}

/// Read what is readable; an unreadable start reads as nothing.
fn read_or_zero(memory: &mut TargetMemory, address: u64, buffer: &mut [u8]) -> Result<usize, WatchError> {
    match memory.read_partial(address, buffer) {
        Ok(n) => Ok(n),
        Err(TargetError::Read { .. }) => Ok(0),
        Err(other) => Err(other.into()),
    }
}

/// Fail early, naming the directory, when the state directory cannot take
/// a write (read-only file system, full disk, no permission).
fn probe_writable(target_dir: &Path) -> Result<(), WatchError> {
    use std::io::Write;
    use std::os::unix::fs::DirBuilderExt;
    let not_writable = |message: String| WatchError::StateNotWritable {
        path: target_dir.to_path_buf(),
        message,
    };
    std::fs::DirBuilder::new()
        .recursive(true)
        .mode(0o700)
        .create(target_dir)
        .map_err(|e| not_writable(e.to_string()))?;
    let probe = target_dir.join(format!(".watch-probe-{}", std::process::id()));
    let result = std::fs::File::create(&probe).and_then(|mut file| {
        file.write_all(&[0u8; 4096])?;
        file.sync_all()
    });
    let _ = std::fs::remove_file(&probe);
    result.map_err(|e| not_writable(e.to_string()))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_watcher_can_move_to_another_thread() {
        fn is_send<T: Send>() {}
        is_send::<Watcher>();
    }
}
