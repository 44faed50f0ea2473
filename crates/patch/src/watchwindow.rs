//! The crash-proof watch window after an `apply --watch`: the target stays
//! seized, and a fatal signal (SIGSEGV, SIGBUS, SIGILL, SIGFPE, SIGABRT)
//! raised while a watched call is running is caught in its
//! signal-delivery-stop, before it is delivered. The patch is rolled back
//! in all threads in one stop and, in that same stop, the faulting thread
//! is rewound to the entry state its watch stub recorded (`watchstub.rs`)
//! at the original function's entry; it resumes with the signal
//! suppressed, so the call runs again in the original code. Side effects
//! the patch made before faulting are not undone.
//!
//! The window ends with [`WatchWindow::keep`] (trampolines re-pointed
//! straight at the new code, a `Repoint` transaction) or
//! [`WatchWindow::rollback`] (a regression verdict).

use crate::activate::{Activation, DEFAULT_ATTEMPTS};
use crate::journal::{PatchRecord, TxnKind, Write5};
use crate::rollback::RollbackOutcome;
use crate::state::TargetState;
use crate::trampoline::jump;
use crate::PatchError;
use nix::sys::signal::Signal;
use nix::unistd::Pid;
use shadowpatch_mirror::StateDir;
use shadowpatch_process::{Attached, ProcessIdentity, SignalEvent};
use std::path::{Path, PathBuf};
use std::time::Instant;

/// The signals the window catches.
pub const FATAL_SIGNALS: [Signal; 5] = [
    Signal::SIGSEGV,
    Signal::SIGBUS,
    Signal::SIGILL,
    Signal::SIGFPE,
    Signal::SIGABRT,
];

/// How far above the faulting stack pointer records are looked for when
/// the thread's stack mapping cannot be found.
const RECORD_SCAN_BYTES: usize = 256 * 1024;

/// The most of a stack read to find the outermost record (a stack limit
/// of `ulimit -s unlimited` could make a mapping of any size).
const MAX_STACK_SCAN_BYTES: u64 = 64 << 20;

/// How far below its mapping an overflowing stack pointer may be (the
/// kernel's stack guard gap, 256 pages by default, plus a margin).
const STACK_GAP_BYTES: u64 = 2 << 20;

/// A seized target whose newest patch goes through watch stubs.
#[derive(Debug)]
pub struct WatchWindow {
    attached: Attached,
    target: TargetState,
    state_dir: PathBuf,
    patch: PatchRecord,
    /// Set once a fault rolled the patch back: later faulting threads
    /// (held during that rollback's stop) are only rewound.
    rolled_back: Option<RollbackOutcome>,
}

/// A fault caught and survived.
#[derive(Debug, Clone, serde::Serialize, serde::Deserialize)]
pub struct Recovery {
    pub tid: i32,
    pub signal: String,
    /// Where the signal was raised.
    pub fault_address: u64,
    /// Whether that address lies in the patch's own mapping.
    pub in_patch_code: bool,
    /// The watched function whose call was re-run in the original.
    pub function: String,
    pub entry: u64,
    /// From the fault seen to the faulting thread resumed in the original.
    pub resumed_us: u64,
    pub rollback: RollbackOutcome,
}

/// Calls through one watched function's stub since activation.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct FunctionCalls {
    pub function: String,
    pub calls: u64,
}

/// What one poll of the window saw.
#[derive(Debug, Clone, serde::Serialize, serde::Deserialize)]
#[serde(tag = "event", rename_all = "snake_case")]
pub enum WindowEvent {
    Quiet,
    /// A fatal signal in a watched call: survived, the patch rolled back.
    Recovered(Recovery),
    /// A fatal signal with no watched call on the thread's stack: it was
    /// delivered (the patch rolled back first when it was raised in patch
    /// code).
    Delivered {
        tid: i32,
        signal: String,
        fault_address: u64,
        rolled_back: bool,
    },
    /// The process exited or was killed.
    Exited {
        code: Option<i32>,
        signal: Option<String>,
    },
}

impl WatchWindow {
    /// Seize `pid` for the window over its newest patch, `patch_id`, which
    /// must have been applied with watch stubs.
    pub fn open(state_dir: &Path, pid: i32, patch_id: &str) -> Result<Self, PatchError> {
        let identity = ProcessIdentity::of(pid)?;
        let attached = Attached::seize(&identity)?;
        Self::from_seized(state_dir, attached, patch_id)
    }

    /// The window over an already seized target (`apply_watched`).
    pub fn from_seized(state_dir: &Path, mut attached: Attached, patch_id: &str) -> Result<Self, PatchError> {
        attached.watch_signals(&FATAL_SIGNALS);
        let identity = attached.identity().clone();
        let pid = identity.pid;
        let state = StateDir::open(state_dir)?;
        let target = TargetState::open_existing(&state, &identity)?;
        let patch = target
            .journal_state
            .active
            .last()
            .filter(|p| p.id == patch_id && p.functions.iter().all(|f| f.watch_stub.is_some()))
            .cloned()
            .ok_or_else(|| PatchError::NoSuchPatch {
                pid,
                id: format!("{patch_id} (newest, applied with watch stubs)"),
                active: target
                    .journal_state
                    .active
                    .iter()
                    .map(|p| p.id.clone())
                    .collect::<Vec<_>>()
                    .join(", "),
            })?;
        Ok(WatchWindow {
            attached,
            target,
            state_dir: state_dir.to_path_buf(),
            patch,
            rolled_back: None,
        })
    }

    /// Whether a fault already rolled the patch back.
    pub fn is_rolled_back(&self) -> bool {
        self.rolled_back.is_some()
    }

    pub fn patch(&self) -> &PatchRecord {
        &self.patch
    }

    /// Calls counted by each watched function's stub so far, read from
    /// the target's memory (functions of a record written before stubs
    /// counted are left out).
    pub fn calls(&mut self) -> Result<Vec<FunctionCalls>, PatchError> {
        read_calls(self.attached.memory(), &self.patch)
    }

    /// Look (without blocking) for a fault or an exit, and survive a fault.
    /// After `Recovered` or `Delivered` the window is over: the patch is
    /// rolled back.
    pub fn poll(&mut self) -> Result<WindowEvent, PatchError> {
        let event = self.attached.poll_signals(&FATAL_SIGNALS)?;
        let Some(event) = event else {
            return Ok(WindowEvent::Quiet);
        };
        let (tid, signal, regs) = match event {
            SignalEvent::Exited { code, signal, .. } => {
                return Ok(WindowEvent::Exited {
                    code,
                    signal: signal.map(|s| s.as_str().to_string()),
                })
            }
            SignalEvent::Held { tid, signal, regs } => (tid, signal, *regs),
        };
        let seen = Instant::now();
        let (start, len) = (self.patch.mapping_address, self.patch.mapping_len);
        let in_patch_code = (start..start + len).contains(&regs.rip);
        let entries: Vec<u64> = self.patch.functions.iter().map(|f| f.site.patch_at).collect();
        let (stack_address, stack) = self.read_stack(regs.rsp);
        let record = crate::watchstub::find_outermost(stack_address, &stack, &entries);
        let Some(record) = record else {
            let rolled_back = if in_patch_code && self.rolled_back.is_none() {
                self.rollback_inner("crash", None).is_ok()
            } else {
                false
            };
            self.attached.release_held(tid, Some(signal))?;
            return Ok(WindowEvent::Delivered {
                tid: tid.as_raw(),
                signal: signal.as_str().to_string(),
                fault_address: regs.rip,
                rolled_back,
            });
        };
        let mut rewound = regs;
        let [rax, rdi, rsi, rdx, rcx, r8, r9, r10, r11, rbx, rbp, r12, r13, r14, r15] = record.gprs;
        (rewound.rax, rewound.rdi, rewound.rsi, rewound.rdx, rewound.rcx) = (rax, rdi, rsi, rdx, rcx);
        (rewound.r8, rewound.r9, rewound.r10, rewound.r11) = (r8, r9, r10, r11);
        (rewound.rbx, rewound.rbp, rewound.r12, rewound.r13) = (rbx, rbp, r12, r13);
        (rewound.r14, rewound.r15) = (r14, r15);
        rewound.rsp = record.entry_rsp;
        rewound.rip = record.entry;
        // Not in a system call: nothing for the kernel to restart.
        rewound.orig_rax = u64::MAX;
        let rollback = if let Some(done) = &self.rolled_back {
            // Already rolled back (by another thread's fault): only rewind.
            let done = done.clone();
            self.attached.set_held_registers(tid, rewound, &record.xmms)?;
            self.attached.release_held(tid, None)?;
            (done, seen.elapsed().as_micros() as u64)
        } else {
            match self.rollback_inner("crash", Some((tid, rewound, record.xmms, seen))) {
                Ok(rollback) => rollback,
                Err(error) => {
                    // Could not roll back: the signal goes where it was going.
                    let _ = self.attached.release_held(tid, Some(signal));
                    return Err(error);
                }
            }
        };
        self.rolled_back = Some(rollback.0.clone());
        let function = self
            .patch
            .functions
            .iter()
            .find(|f| f.site.patch_at == record.entry)
            .map(|f| f.site.symbol.clone())
            .unwrap_or_default();
        Ok(WindowEvent::Recovered(Recovery {
            tid: tid.as_raw(),
            signal: signal.as_str().to_string(),
            fault_address: regs.rip,
            in_patch_code,
            function,
            entry: record.entry,
            resumed_us: rollback.1,
            rollback: rollback.0,
        }))
    }

    /// The faulting thread's stack from `rsp` up to the end of its
    /// mapping: the outermost record may lie megabytes above a stack
    /// pointer that ran into the guard gap (endless recursion). The rewind
    /// needs no stack of its own: it only sets registers, rsp back at the
    /// outermost record's entry, far above the overflow. When rsp is below
    /// the stack mapping (the overflowing push or call), reading starts at
    /// the mapping. Without the maps, the fixed scan of the past.
    fn read_stack(&mut self, rsp: u64) -> (u64, Vec<u8>) {
        let mapping = shadowpatch_process::maps::read_maps(self.attached.pid())
            .ok()
            .and_then(|maps| {
                // A thread's guard page is a mapping of its own, unreadable.
                maps.iter()
                    .find(|m| m.readable && m.start <= rsp && rsp < m.end)
                    .or_else(|| {
                        // The first mapping above rsp, if it is close (the
                        // guard gap is 256 pages by default).
                        maps.iter()
                            .filter(|m| m.readable && m.start > rsp && m.start - rsp <= STACK_GAP_BYTES)
                            .min_by_key(|m| m.start)
                    })
                    .map(|m| (m.start, m.end))
            });
        let (from, to) = match mapping {
            Some((start, end)) if end - rsp.max(start) <= MAX_STACK_SCAN_BYTES => (rsp.max(start), end),
            Some((start, _)) => (rsp.max(start), rsp.max(start) + MAX_STACK_SCAN_BYTES),
            None => (rsp, rsp + RECORD_SCAN_BYTES as u64),
        };
        let mut stack = vec![0u8; (to - from) as usize];
        let read = self.attached.memory().read_partial(from, &mut stack).unwrap_or(0);
        stack.truncate(read);
        (from, stack)
    }

    /// Roll back in the window's own seizure; with `rewind`, restore that
    /// held thread's entry state in the rollback's stop and resume it (with
    /// its signal suppressed) as soon as the entries are restored. Returns
    /// the outcome and, with `rewind`, microseconds from fault to resume.
    fn rollback_inner(
        &mut self,
        cause: &str,
        rewind: Option<(Pid, libc::user_regs_struct, [[u8; 16]; 8], Instant)>,
    ) -> Result<(RollbackOutcome, u64), PatchError> {
        let mut resumed_us = 0;
        let result = crate::rollback::rollback_seized(
            &mut self.attached,
            &mut self.target,
            &self.patch,
            crate::rollback::Release::Never,
            &mut |stopped| {
                if let Some((tid, regs, xmms, _)) = &rewind {
                    stopped.attached().set_held_registers(*tid, *regs, xmms)?;
                }
                Ok(())
            },
            &mut |attached| {
                if let Some((tid, _, _, seen)) = &rewind {
                    attached.release_held(*tid, None)?;
                    resumed_us = seen.elapsed().as_micros() as u64;
                }
                Ok(())
            },
        );
        crate::history::record_rollback(&self.state_dir, self.attached.pid(), cause, &result);
        result.map(|outcome| (outcome, resumed_us))
    }

    /// A regression verdict: roll back, then detach.
    pub fn rollback(mut self, cause: &str) -> Result<RollbackOutcome, PatchError> {
        if let Some(done) = self.rolled_back.take() {
            self.attached.detach()?;
            return Ok(done);
        }
        let (outcome, _) = self.rollback_inner(cause, None)?;
        self.attached.detach()?;
        Ok(outcome)
    }

    /// A keep verdict: re-point every trampoline from its stub straight at
    /// the new code (one journaled stop), then detach.
    pub fn keep(mut self) -> Result<Activation, PatchError> {
        if self.rolled_back.is_some() {
            return Err(PatchError::NothingToRollback {
                pid: self.attached.pid(),
            });
        }
        let mut writes = Vec::new();
        for function in &self.patch.functions {
            let stub = function.watch_stub.expect("checked at open");
            writes.push(Write5 {
                address: function.write.address,
                original: function.write.new.clone(),
                new: jump(&function.site.symbol, function.write.address, stub.direct)?,
            });
        }
        let activation = crate::writes::write_in_one_stop(
            &mut self.attached,
            &mut self.target,
            TxnKind::Repoint,
            &self.patch.id,
            writes,
            Some(&self.patch.id),
            DEFAULT_ATTEMPTS,
        )?;
        crate::fault::point("kept-unpublished");
        // The kept bytes are a generation: verify and watchers compare
        // against them from now on (`republish.rs`; a kill before this
        // line is finished by `recover`).
        crate::republish::republish_committed(&self.target.dir, &self.target.journal_state)?;
        self.attached.detach()?;
        Ok(activation)
    }

    /// End the window without a verdict (the process is gone).
    pub fn close(self) -> Result<(), PatchError> {
        Ok(self.attached.detach()?)
    }
}

/// The call counters of `patch`'s watch stubs, read from `memory`.
pub fn read_calls(
    memory: &mut shadowpatch_process::TargetMemory,
    patch: &PatchRecord,
) -> Result<Vec<FunctionCalls>, PatchError> {
    let mut out = Vec::new();
    for function in &patch.functions {
        let Some(counter) = function.watch_stub.and_then(|stub| stub.calls) else {
            continue;
        };
        let bytes = memory.read_vec(counter, crate::watchstub::COUNTER_BYTES as usize)?;
        out.push(FunctionCalls {
            function: function.site.symbol.clone(),
            calls: u64::from_le_bytes(bytes.try_into().expect("8 bytes")),
        });
    }
    Ok(out)
}
