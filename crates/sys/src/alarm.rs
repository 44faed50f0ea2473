//! A deadline for one blocking system call of the calling thread.
//!
//! A per-thread timer (`timer_create` with `SIGEV_THREAD_ID`) sends the
//! thread `SIGURG`, whose handler does nothing and is installed without
//! `SA_RESTART`: a call blocked when the deadline passes returns `EINTR`.
//! The tracer uses it to block in `waitpid` for a thread-group leader's
//! stop, woken the moment the leader stops, instead of polling the leader
//! with short sleeps (each poll a wake-up and a context switch, a twentieth
//! of a host-wide apply's CPU), while still noticing, once the deadline
//! passes, a leader that will never report (a zombie whose other threads
//! it holds stopped).
//!
//! The timer is disarmed before [`interrupt_after`] returns: a signal sent
//! in between is handled on the way back from the disarming call, so no
//! later system call of the thread is interrupted by it.
//!
//! `SIGURG` because its default action is to ignore it (a stray one is
//! harmless) and nothing in shadowpatch uses it otherwise.

use nix::sys::signal::{SaFlags, SigAction, SigEvent, SigHandler, SigSet, SigevNotify, Signal};
use nix::sys::time::TimeSpec;
use nix::sys::timer::{Expiration, Timer, TimerSetTimeFlags};
use nix::time::ClockId;
use std::cell::RefCell;
use std::sync::OnceLock;
use std::time::Duration;

const SIGNAL: Signal = Signal::SIGURG;

extern "C" fn nothing(_: libc::c_int) {}

/// The handler, installed once per process; `false` if it could not be.
fn installed() -> bool {
    static INSTALLED: OnceLock<bool> = OnceLock::new();
    *INSTALLED.get_or_init(|| {
        let action = SigAction::new(SigHandler::Handler(nothing), SaFlags::empty(), SigSet::empty());
        // SAFETY: the handler does nothing, so it is async-signal-safe and
        // cannot break any invariant of the code it interrupts; SIGURG is
        // used by nothing else in this process (its default action is to
        // ignore it, which this handler keeps in effect).
        unsafe { nix::sys::signal::sigaction(SIGNAL, &action) }.is_ok()
    })
}

thread_local! {
    /// The calling thread's timer, made on first use.
    static TIMER: RefCell<Option<Timer>> = const { RefCell::new(None) };
}

/// Disarms the timer when dropped (also if the call panics).
struct Armed<'a>(&'a mut Timer);

impl Drop for Armed<'_> {
    fn drop(&mut self) {
        let _ = self
            .0
            .set(Expiration::OneShot(TimeSpec::new(0, 0)), TimerSetTimeFlags::empty());
    }
}

/// Run `call` with the calling thread's timer set to interrupt whatever
/// system call it blocks in after `after` (it then fails with `EINTR`).
/// `None`: no timer could be set, and `call` was not run.
pub fn interrupt_after<T>(after: Duration, call: impl FnOnce() -> T) -> Option<T> {
    if !installed() {
        return None;
    }
    TIMER.with(|cell| {
        let mut timer = cell.try_borrow_mut().ok()?;
        if timer.is_none() {
            let notify = SigevNotify::SigevThreadId {
                signal: SIGNAL,
                thread_id: nix::unistd::gettid().as_raw(),
                si_value: 0,
            };
            *timer = Some(Timer::new(ClockId::CLOCK_MONOTONIC, SigEvent::new(notify)).ok()?);
        }
        let timer = timer.as_mut()?;
        // A zero expiration would disarm the timer instead.
        let after = after.max(Duration::from_nanos(1));
        timer
            .set(
                Expiration::OneShot(TimeSpec::from_duration(after)),
                TimerSetTimeFlags::empty(),
            )
            .ok()?;
        let _armed = Armed(timer);
        Some(call())
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use nix::errno::Errno;
    use std::time::Instant;

    #[test]
    fn a_blocked_call_is_interrupted_at_the_deadline_and_later_calls_are_not() {
        let (reader, _writer) = nix::unistd::pipe().unwrap();
        let started = Instant::now();
        let mut byte = [0u8; 1];
        let read = interrupt_after(Duration::from_millis(20), || nix::unistd::read(&reader, &mut byte)).unwrap();
        assert_eq!(read, Err(Errno::EINTR));
        assert!(started.elapsed() >= Duration::from_millis(20));
        // A call that returns before the deadline: the timer is disarmed,
        // so a blocking call after it is not interrupted.
        assert_eq!(interrupt_after(Duration::from_millis(5), || 7), Some(7));
        let (reader, writer) = nix::unistd::pipe().unwrap();
        let feeder = std::thread::spawn(move || {
            std::thread::sleep(Duration::from_millis(30));
            nix::unistd::write(&writer, b"x").unwrap();
        });
        assert_eq!(nix::unistd::read(&reader, &mut byte), Ok(1));
        feeder.join().unwrap();
    }

    #[test]
    fn each_thread_has_its_own_timer() {
        let handles: Vec<_> = (0..4)
            .map(|i| {
                std::thread::spawn(move || {
                    let (reader, _writer) = nix::unistd::pipe().unwrap();
                    let mut byte = [0u8; 1];
                    let after = Duration::from_millis(10 + 10 * i);
                    let started = Instant::now();
                    let read = interrupt_after(after, || nix::unistd::read(&reader, &mut byte)).unwrap();
                    (read, started.elapsed() >= after)
                })
            })
            .collect();
        for handle in handles {
            assert_eq!(handle.join().unwrap(), (Err(Errno::EINTR), true));
        }
    }
}
