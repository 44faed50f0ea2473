//! The signal frame that makes a borrowed thread restore itself.
//!
//! Before a remote system call changes a thread's registers, an x86_64
//! `rt_sigframe` holding the thread's own registers, extended FPU state
//! (XSAVE layout) and blocked-signal mask is written on its stack below the
//! red zone, and the call's stack pointer points at it. The call runs at a
//! `syscall; ret` sequence of the target's libc; the `ret` pops the frame's
//! first word, the address of libc's `__restore_rt` (`mov $15, %rax;
//! syscall`), whose `rt_sigreturn` loads every register from the frame —
//! exactly what the kernel does when a signal handler returns. So a thread
//! that is let go at any instant of the call (its tracer killed) finishes
//! the call and continues its own code as if it had never been borrowed.
//! CRIU's compel ends its parasite the same way (a sigframe built by the
//! tracer, restored by the parasite's own `rt_sigreturn`).
//!
//! The layout is the kernel's (arch/x86/include/asm/sigframe.h,
//! uapi/asm/sigcontext.h, ucontext.h); `rt_sigreturn` reads the frame at
//! `rsp - 8` once the `ret` has popped the return address.

/// `rt_sigframe`: `pretcode` (8) + `ucontext` (304) + `siginfo` (128). The
/// kernel checks the whole structure is accessible.
pub(crate) const FRAME_SIZE: u64 = 8 + 304 + 128;
/// Offsets inside the frame (from `pretcode`).
const UC_FLAGS: usize = 8;
const UC_MCONTEXT: usize = 8 + 40;
pub(crate) const UC_SIGMASK: u64 = 8 + 296;
/// `uc_flags`: the FPU state is XSAVE-format, and `ss` is restored as saved.
const UC_FP_XSTATE: u64 = 0x1;
const UC_SIGCONTEXT_SS: u64 = 0x2;
const UC_STRICT_RESTORE_SS: u64 = 0x4;
/// The x86_64 red zone: 128 bytes below `rsp` that leaf code may use.
const RED_ZONE: u64 = 128;
/// `_fpx_sw_bytes` magic words: the frame's FPU state is a full XSAVE area.
const FP_XSTATE_MAGIC1: u32 = 0x4650_5853;
const FP_XSTATE_MAGIC2: u32 = 0x4650_5845;
/// Where `_fpx_sw_bytes` sits in the FXSAVE area (its software-reserved
/// bytes 464..512). In the `NT_X86_XSTATE` regset the first 8 hold XCR0.
const SW_BYTES: usize = 464;
/// The legacy FXSAVE area plus the XSAVE header: the least an XSAVE area is.
const MIN_XSTATE: usize = 512 + 64;

/// Kernel restart codes a thread stopped inside a system call carries in
/// `rax` (include/linux/errno.h).
const ERESTARTSYS: i64 = -512;
const ERESTARTNOINTR: i64 = -513;
const ERESTARTNOHAND: i64 = -514;
const ERESTART_RESTARTBLOCK: i64 = -516;
const EINTR: i64 = -4;

/// A frame ready to be written at `address`, and the stack pointer the
/// remote call starts with (the frame's `pretcode` slot).
#[derive(Debug, Clone)]
pub(crate) struct SigFrame {
    pub address: u64,
    pub bytes: Vec<u8>,
}

impl SigFrame {
    /// Build the frame that restores `saved` (a thread stopped by us),
    /// whose FPU state is `fpu` (`NT_X86_XSTATE` bytes, or the 512-byte
    /// `NT_PRFPREG` area when the CPU has no XSAVE) and blocked mask `mask`;
    /// `restore_rt` is the address of a `mov $15, %rax; syscall` sequence.
    pub fn new(saved: &libc::user_regs_struct, fpu: &[u8], mask: u64, restore_rt: u64) -> SigFrame {
        let resumed = resumed_registers(saved);
        let xsave = fpu.len() >= MIN_XSTATE;
        // The FPU area: 64-byte aligned (XRSTOR faults otherwise), with the
        // second magic word after an XSAVE area.
        let fpu_size = if xsave { fpu.len() + 4 } else { fpu.len() };
        let top = saved.rsp - RED_ZONE;
        let fpu_address = (top - fpu_size as u64) & !63;
        let address = (fpu_address - FRAME_SIZE) & !15;
        let mut bytes = vec![0u8; (fpu_address + fpu_size as u64 - address) as usize];
        let fpu_offset = (fpu_address - address) as usize;

        put(&mut bytes, 0, restore_rt);
        let uc_flags = UC_SIGCONTEXT_SS | UC_STRICT_RESTORE_SS | if xsave { UC_FP_XSTATE } else { 0 };
        put(&mut bytes, UC_FLAGS, uc_flags);
        // uc_stack stays all zero: rt_sigreturn's restore_altstack() then
        // changes nothing (a zero-sized stack is refused, and the refusal
        // ignored, unless the thread has no alternate stack, which zero
        // describes already).
        let r = &resumed;
        let words = [
            r.r8, r.r9, r.r10, r.r11, r.r12, r.r13, r.r14, r.r15, r.rdi, r.rsi, r.rbp, r.rbx, r.rdx, r.rax, r.rcx,
            r.rsp, r.rip, r.eflags,
        ];
        for (index, word) in words.iter().enumerate() {
            put(&mut bytes, UC_MCONTEXT + 8 * index, *word);
        }
        // cs, gs, fs, ss (u16 each); err, trapno, oldmask, cr2 stay zero.
        let segments = UC_MCONTEXT + 8 * words.len();
        bytes[segments..segments + 2].copy_from_slice(&(r.cs as u16).to_le_bytes());
        bytes[segments + 6..segments + 8].copy_from_slice(&(r.ss as u16).to_le_bytes());
        put(&mut bytes, UC_MCONTEXT + 184, fpu_address);
        put(&mut bytes, UC_SIGMASK as usize, mask);

        bytes[fpu_offset..fpu_offset + fpu.len()].copy_from_slice(fpu);
        if xsave {
            // The regset's software bytes hold XCR0 (the enabled features);
            // the frame's must say "a full XSAVE area of this size follows".
            let xcr0 = u64::from_le_bytes(fpu[SW_BYTES..SW_BYTES + 8].try_into().expect("8 bytes"));
            let sw = fpu_offset + SW_BYTES;
            bytes[sw..sw + 48].fill(0);
            bytes[sw..sw + 4].copy_from_slice(&FP_XSTATE_MAGIC1.to_le_bytes());
            bytes[sw + 4..sw + 8].copy_from_slice(&(fpu_size as u32).to_le_bytes());
            bytes[sw + 8..sw + 16].copy_from_slice(&xcr0.to_le_bytes());
            bytes[sw + 16..sw + 20].copy_from_slice(&(fpu.len() as u32).to_le_bytes());
            let end = fpu_offset + fpu.len();
            bytes[end..end + 4].copy_from_slice(&FP_XSTATE_MAGIC2.to_le_bytes());
        }
        SigFrame { address, bytes }
    }
}

/// The registers a thread stopped by us would resume with if let go now,
/// with the kernel's restart decision already taken: `rt_sigreturn` sets
/// `orig_rax = -1`, so the restart the kernel would apply on resume (a
/// thread stopped inside an interrupted `read`, `futex`, `nanosleep`...)
/// must be in the frame. As for a stop resumed without a signal handler
/// (arch_do_signal_or_restart): the call is re-issued (`rip` back over the
/// 2-byte `syscall`, `rax` its number). `-ERESTART_RESTARTBLOCK` calls
/// (relative sleeps and timeouts) return `EINTR` instead: `rt_sigreturn`
/// resets the restart block, as after any signal handler.
pub(crate) fn resumed_registers(saved: &libc::user_regs_struct) -> libc::user_regs_struct {
    let mut resumed = *saved;
    if saved.orig_rax as i64 >= 0 {
        match saved.rax as i64 {
            ERESTARTSYS | ERESTARTNOINTR | ERESTARTNOHAND => {
                resumed.rax = saved.orig_rax;
                resumed.rip = saved.rip - 2;
            }
            ERESTART_RESTARTBLOCK => resumed.rax = EINTR as u64,
            _ => {}
        }
    }
    resumed.orig_rax = u64::MAX;
    resumed
}

fn put(bytes: &mut [u8], offset: usize, word: u64) {
    bytes[offset..offset + 8].copy_from_slice(&word.to_le_bytes());
}

/// All-zero registers: a starting point for building a register set (in
/// tests, and where a caller fills in every field it needs).
pub fn zeroed_regs() -> libc::user_regs_struct {
    libc::user_regs_struct {
        r15: 0,
        r14: 0,
        r13: 0,
        r12: 0,
        rbp: 0,
        rbx: 0,
        r11: 0,
        r10: 0,
        r9: 0,
        r8: 0,
        rax: 0,
        rcx: 0,
        rdx: 0,
        rsi: 0,
        rdi: 0,
        orig_rax: 0,
        rip: 0,
        cs: 0,
        eflags: 0,
        rsp: 0,
        ss: 0,
        fs_base: 0,
        gs_base: 0,
        ds: 0,
        es: 0,
        fs: 0,
        gs: 0,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn regs() -> libc::user_regs_struct {
        let mut regs = zeroed_regs();
        regs.rsp = 0x7fff_0000_1008;
        regs.rip = 0x0040_1002;
        regs.cs = 0x33;
        regs.ss = 0x2b;
        regs.eflags = 0x246;
        regs.orig_rax = u64::MAX;
        regs
    }

    fn word(bytes: &[u8], offset: usize) -> u64 {
        u64::from_le_bytes(bytes[offset..offset + 8].try_into().unwrap())
    }

    #[test]
    fn the_frame_sits_below_the_red_zone_with_an_aligned_fpu_area() {
        let saved = regs();
        let mut fpu = vec![0u8; 832];
        fpu[SW_BYTES..SW_BYTES + 8].copy_from_slice(&7u64.to_le_bytes());
        let frame = SigFrame::new(&saved, &fpu, 0x4000, 0x7f00_0000_1234);
        let end = frame.address + frame.bytes.len() as u64;
        assert!(end <= saved.rsp - RED_ZONE, "frame ends {end:#x}");
        assert_eq!(frame.address % 16, 0);
        assert_eq!(word(&frame.bytes, 0), 0x7f00_0000_1234, "pretcode: __restore_rt");
        let fpstate = word(&frame.bytes, UC_MCONTEXT + 184);
        assert_eq!(fpstate % 64, 0);
        let fpu_offset = (fpstate - frame.address) as usize;
        let sw = fpu_offset + SW_BYTES;
        assert_eq!(&frame.bytes[sw..sw + 4], &FP_XSTATE_MAGIC1.to_le_bytes());
        assert_eq!(word(&frame.bytes, sw + 8), 7, "xfeatures = XCR0 from the regset");
        assert_eq!(
            &frame.bytes[fpu_offset + 832..fpu_offset + 836],
            &FP_XSTATE_MAGIC2.to_le_bytes()
        );
        assert_eq!(word(&frame.bytes, UC_SIGMASK as usize), 0x4000);
        assert_eq!(word(&frame.bytes, UC_MCONTEXT + 15 * 8), saved.rsp, "rsp");
        assert_eq!(word(&frame.bytes, UC_MCONTEXT + 16 * 8), saved.rip, "rip");
    }

    #[test]
    fn an_interrupted_call_is_reissued_and_a_restart_block_fails_with_eintr() {
        let mut saved = regs();
        saved.orig_rax = libc::SYS_read as u64;
        saved.rax = ERESTARTSYS as u64;
        let resumed = resumed_registers(&saved);
        assert_eq!(
            (resumed.rip, resumed.rax, resumed.orig_rax),
            (saved.rip - 2, 0, u64::MAX)
        );
        saved.rax = ERESTART_RESTARTBLOCK as u64;
        let resumed = resumed_registers(&saved);
        assert_eq!((resumed.rip, resumed.rax as i64), (saved.rip, EINTR));
        saved.rax = 5;
        assert_eq!(resumed_registers(&saved).rax, 5, "a finished call keeps its result");
    }
}
