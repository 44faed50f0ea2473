//! From one copy of the target at a call's entry to the pair that runs it:
//! the copy keeps the original code and runs the original function; a
//! second copy, cloned from it before anything runs, gets the patch loaded
//! and its entries redirected (in that copy only) and runs the patched one.
//!
//! Before the second copy is made, the first is made safe to run: the
//! breakpoints are taken out of its memory, the sentinel return address is
//! written where the call returns, and every writable mapping it shares
//! with the service (`MAP_SHARED`: shared memory, shared file mappings) is
//! made read-only in the copy. A store there is no syscall the sandbox could
//! stop; read-only, it faults and the run ends as a shared-memory write.

use super::SimulateError;
use nix::unistd::Pid;
use shadowpatch_patch::load::{map_image, LoadPlan};
use shadowpatch_process::maps::read_maps;
use shadowpatch_process::ProcessCopy;
use std::collections::BTreeSet;

/// The two copies of one call, ready at the function's entry.
#[derive(Debug)]
pub struct CallPair {
    pub original: ProcessCopy,
    pub patched: ProcessCopy,
    /// Shared writable mappings made read-only in both.
    pub shared: Vec<(u64, u64)>,
    /// Descriptors both inherited from the service.
    pub inherited: BTreeSet<i32>,
    /// The call's real return address (the sentinel replaced it): where
    /// a continuation resumes the caller.
    pub return_address: u64,
}

/// What every pair of a simulation shares.
#[derive(Debug, Clone, Copy)]
pub struct PairSetup<'a> {
    /// `(address, original byte)` of breakpoints to take out of the copy.
    pub breakpoints: &'a [(u64, u8)],
    pub plan: &'a LoadPlan,
    pub sentinel: u64,
}

/// Turn `copy` into a pair whose registers are `entry` (rip at the
/// function, rsp at its return address). `made` hears of the second copy
/// as soon as it exists (its pid in the target), so that it is reaped
/// whatever happens next. On error both copies are killed (dropped).
pub fn prepare_pair(
    mut copy: ProcessCopy,
    entry: libc::user_regs_struct,
    setup: PairSetup<'_>,
    made: &mut dyn FnMut(i64),
) -> Result<CallPair, SimulateError> {
    for &(address, original) in setup.breakpoints {
        copy.memory().write(address, &[original])?;
    }
    let return_address = copy.memory().read_vec(entry.rsp, 8)?;
    let return_address = u64::from_le_bytes(return_address.try_into().expect("8 bytes"));
    copy.memory().write(entry.rsp, &setup.sentinel.to_le_bytes())?;
    let mut shared = Vec::new();
    for mapping in read_maps(copy.pid().as_raw())? {
        if mapping.shared && mapping.writable {
            let protection = libc::PROT_READ | if mapping.executable { libc::PROT_EXEC } else { 0 };
            let rc = copy.remote_syscall(
                libc::SYS_mprotect,
                [mapping.start, mapping.len(), protection as u64, 0, 0, 0],
            )?;
            if rc != 0 {
                return Err(SimulateError::Copy {
                    pid: copy.pid().as_raw(),
                    message: format!(
                        "cannot make the shared mapping at {:#x} read-only (errno {})",
                        mapping.start, -rc
                    ),
                });
            }
            shared.push((mapping.start, mapping.end));
        }
    }
    copy.set_regs(entry)?;
    let mut patched = copy.remote_clone()?;
    made(patched.pid_in_target());
    patched.set_regs(entry)?;
    let plan = setup.plan;
    map_image(&mut patched, &plan.protections, plan.address, &plan.image)?;
    for function in &plan.functions {
        patched.memory().write(function.write.address, &function.write.new)?;
    }
    let inherited = open_descriptors(copy.pid());
    Ok(CallPair {
        original: copy,
        patched,
        shared,
        inherited,
        return_address,
    })
}

/// The registers of an explicit call of `entry` with `arguments`, made
/// from `live` (the registers of the thread the copy was made from): its
/// stack, below the red zone, with room, holds the return address.
pub fn explicit_entry(live: &libc::user_regs_struct, entry: u64, arguments: &[u64]) -> libc::user_regs_struct {
    let mut regs = *live;
    let stack = (live.rsp - 128 - 512) & !15;
    // As right after a `call`: rsp ≡ 8 (mod 16), the return address at [rsp].
    regs.rsp = stack - 8;
    regs.rip = entry;
    regs.rax = 0;
    // Not in a syscall: no restart logic applies when the copy resumes.
    regs.orig_rax = u64::MAX;
    let mut values = [0u64; 6];
    values[..arguments.len()].copy_from_slice(arguments);
    regs.rdi = values[0];
    regs.rsi = values[1];
    regs.rdx = values[2];
    regs.rcx = values[3];
    regs.r8 = values[4];
    regs.r9 = values[5];
    regs
}

/// The integer arguments a call was made with (System V registers).
pub fn register_arguments(regs: &libc::user_regs_struct) -> [u64; 6] {
    [regs.rdi, regs.rsi, regs.rdx, regs.rcx, regs.r8, regs.r9]
}

/// Give a fresh copy its own stand-ins for the service's sockets and
/// pipes, at the same numbers: one unconnected `AF_UNIX` datagram socket
/// of its own `dup3`'d over each (which closes the copy's reference to
/// the service's). A copy is a fork: left alone it holds the service's
/// connections open for as long as it lives, so a client the service has
/// answered and closed waits for its end of file until the simulation is
/// over (on Debian's tinyproxy, an error page sent without a length: each
/// such request hung while copies existed, and a capture window's load
/// stalled). The sandbox never reads, writes or connects through an
/// inherited descriptor, so the stand-in changes nothing it lets a call
/// see, and both copies of a pair see the same one. Files, terminals and
/// other kinds keep their descriptions. Returns the descriptors that were
/// the service's sockets (where its replies go: `continuation`).
pub fn release_descriptors(copy: &mut ProcessCopy) -> Result<BTreeSet<i32>, SimulateError> {
    let listed = descriptors(copy.pid().as_raw()).map_err(|(dir, source)| SimulateError::Copy {
        pid: copy.pid().as_raw(),
        message: format!("cannot list {dir}: {source}"),
    })?;
    let sockets: BTreeSet<i32> = listed
        .iter()
        .filter(|(_, target)| target.starts_with("socket:["))
        .map(|(fd, _)| *fd)
        .collect();
    let shared: Vec<i32> = listed
        .iter()
        .filter(|(_, target)| target.starts_with("socket:[") || target.starts_with("pipe:["))
        .map(|(fd, _)| *fd)
        .collect();
    if shared.is_empty() {
        return Ok(sockets);
    }
    let failed = |copy: &ProcessCopy, what: String, rc: i64| SimulateError::Copy {
        pid: copy.pid().as_raw(),
        message: format!("{what} (errno {})", -rc),
    };
    let stand_in = copy.remote_syscall(
        libc::SYS_socket,
        [
            libc::AF_UNIX as u64,
            (libc::SOCK_DGRAM | libc::SOCK_CLOEXEC) as u64,
            0,
            0,
            0,
            0,
        ],
    )?;
    if stand_in < 0 {
        return Err(failed(copy, "cannot make a stand-in socket".into(), stand_in));
    }
    for &fd in &shared {
        let rc = copy.remote_syscall(libc::SYS_dup3, [stand_in as u64, fd as u64, 0, 0, 0, 0])?;
        if rc < 0 {
            return Err(failed(copy, format!("cannot replace descriptor {fd}"), rc));
        }
    }
    copy.remote_syscall(libc::SYS_close, [stand_in as u64, 0, 0, 0, 0, 0])?;
    Ok(sockets)
}

/// `release_descriptors`, a failure logged: the copy then holds the
/// service's descriptors as any fork does, which delays a close, never
/// changes what the service reads or writes.
pub fn release_descriptors_or_warn(copy: &mut ProcessCopy) -> BTreeSet<i32> {
    release_descriptors(copy).unwrap_or_else(|error| {
        tracing::warn!("copy {} keeps the service's sockets and pipes: {error}", copy.pid());
        BTreeSet::new()
    })
}

fn open_descriptors(pid: Pid) -> BTreeSet<i32> {
    descriptors(pid.as_raw())
        .map(|list| list.into_iter().map(|(fd, _)| fd).collect())
        .unwrap_or_default()
}

/// A process's open descriptors and what each refers to (`socket:[…]`,
/// `pipe:[…]`, a path; empty when the link cannot be read), from
/// `/proc/PID/fd`; the error names the folder.
pub fn descriptors(pid: i32) -> Result<Vec<(i32, String)>, (String, std::io::Error)> {
    let dir = format!("/proc/{pid}/fd");
    let entries = std::fs::read_dir(&dir).map_err(|source| (dir.clone(), source))?;
    Ok(entries
        .filter_map(|entry| {
            let entry = entry.ok()?;
            let fd = entry.file_name().to_str()?.parse().ok()?;
            let target = std::fs::read_link(entry.path())
                .map(|t| t.to_string_lossy().into_owned())
                .unwrap_or_default();
            Some((fd, target))
        })
        .collect())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn explicit_calls_get_an_aligned_stack_and_their_arguments() {
        let mut live = shadowpatch_process::zeroed_regs();
        live.rsp = 0x7ffd_0000_1234;
        let regs = explicit_entry(&live, 0x401000, &[1, 2, 3]);
        assert_eq!(regs.rip, 0x401000);
        assert_eq!(regs.rsp % 16, 8);
        assert!(regs.rsp < live.rsp - 128);
        assert_eq!((regs.rdi, regs.rsi, regs.rdx, regs.rcx), (1, 2, 3, 0));
        assert_eq!(regs.orig_rax, u64::MAX);
    }
}
