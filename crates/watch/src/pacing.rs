//! Keeping the verifier within its CPU budget: the watcher thread's own CPU
//! time (`CLOCK_THREAD_CPUTIME_ID`, which counts the kernel time of its
//! `process_vm_readv` copies too) is measured after every slice of work,
//! and the thread sleeps long enough that busy / (busy + idle) stays at or
//! under the budget. Idle time is not banked beyond one sleep, so a watcher
//! that waited for its interval does not then burst at 100 %.

use nix::time::{clock_gettime, ClockId};
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};

/// Sleeps shorter than this are deferred and added up (the kernel's timer
/// slack makes tiny sleeps cost more than they pace).
const MIN_SLEEP: Duration = Duration::from_millis(1);
/// A long sleep is cut into pieces this long to notice the stop flag.
const STOP_CHECK: Duration = Duration::from_millis(20);

/// CPU time consumed by the calling thread so far.
pub fn thread_cpu_time() -> Duration {
    clock_gettime(ClockId::CLOCK_THREAD_CPUTIME_ID)
        .map(Duration::from)
        .unwrap_or_default()
}

/// Pin the calling thread to one CPU, as the concept's dedicated
/// verification processor would be.
pub fn pin_current_thread(cpu: usize) -> Result<(), nix::errno::Errno> {
    let mut set = nix::sched::CpuSet::new();
    set.set(cpu)?;
    nix::sched::sched_setaffinity(nix::unistd::Pid::from_raw(0), &set)
}

/// Paces one thread to a CPU budget.
#[derive(Debug)]
pub struct Pacer {
    /// Fraction of one core, in (0, 1].
    budget: f64,
    last_cpu: Duration,
    /// Idle time still owed for work already done.
    owed: Duration,
    started_wall: Instant,
    started_cpu: Duration,
}

impl Pacer {
    /// Start pacing the calling thread at `budget_percent` of one core.
    pub fn new(budget_percent: f64) -> Self {
        let now = thread_cpu_time();
        Pacer {
            budget: (budget_percent / 100.0).clamp(0.001, 1.0),
            last_cpu: now,
            owed: Duration::ZERO,
            started_wall: Instant::now(),
            started_cpu: now,
        }
    }

    /// Account for the work done since the last call and sleep what the
    /// budget requires (in pieces, returning early when `stop` is set).
    pub fn pace(&mut self, stop: Option<&AtomicBool>) {
        let now = thread_cpu_time();
        let busy = now.saturating_sub(self.last_cpu);
        self.last_cpu = now;
        if self.budget >= 1.0 {
            return;
        }
        self.owed += busy.mul_f64((1.0 - self.budget) / self.budget);
        if self.owed >= MIN_SLEEP {
            let owed = std::mem::take(&mut self.owed);
            let slept = sleep_unless_stopped(owed, stop);
            // Oversleeping pays ahead only for this sleep, not for later
            // work. (The sleep's own CPU is counted with the next slice.)
            self.owed = owed.saturating_sub(slept);
        }
    }

    /// Idle time (e.g. waiting for the next interval) counts as paid.
    pub fn idled(&mut self, idle: Duration) {
        self.owed = self.owed.saturating_sub(idle);
    }

    /// CPU time of this thread since the pacer started, over wall time, in percent.
    pub fn cpu_percent(&self) -> f64 {
        let wall = self.started_wall.elapsed().as_secs_f64();
        if wall <= 0.0 {
            return 0.0;
        }
        thread_cpu_time().saturating_sub(self.started_cpu).as_secs_f64() / wall * 100.0
    }

    /// CPU time of this thread since the pacer started.
    pub fn cpu_used(&self) -> Duration {
        thread_cpu_time().saturating_sub(self.started_cpu)
    }
}

/// Sleep `duration` in pieces, returning early once `stop` is set; returns
/// the time actually slept.
pub fn sleep_unless_stopped(duration: Duration, stop: Option<&AtomicBool>) -> Duration {
    let started = Instant::now();
    loop {
        if stop.is_some_and(|s| s.load(Ordering::Relaxed)) {
            break;
        }
        let left = duration.saturating_sub(started.elapsed());
        if left.is_zero() {
            break;
        }
        std::thread::sleep(left.min(STOP_CHECK));
    }
    started.elapsed()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn spin(duration: Duration) {
        let started = thread_cpu_time();
        while thread_cpu_time() - started < duration {
            std::hint::black_box(0);
        }
    }

    #[test]
    fn pacing_keeps_the_thread_near_its_budget() {
        let mut pacer = Pacer::new(25.0);
        for _ in 0..40 {
            spin(Duration::from_micros(500));
            pacer.pace(None);
        }
        // At most the budget; a loaded machine only lowers the share.
        let share = pacer.cpu_percent();
        assert!(share <= 27.0, "cpu share {share:.1}% over a 25% budget");
    }

    #[test]
    fn a_set_stop_flag_cuts_a_sleep_short() {
        let stop = AtomicBool::new(true);
        let slept = sleep_unless_stopped(Duration::from_secs(5), Some(&stop));
        assert!(slept < Duration::from_secs(1));
    }
}
