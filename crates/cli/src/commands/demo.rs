//! `shadowpatch demo`: a narrated walk through the foundation on a real
//! process: build and start a sample multi-threaded service, stop the world,
//! run a syscall inside it, mirror it, verify it, tamper with one byte of its
//! code as an attacker would, detect exactly that byte, restore it, verify
//! clean, and show the service never missed a beat.

use super::pause::measure;
use super::verify::{print_outcome, verify_process};
use super::Context;
use crate::output::{gb_per_s, human_bytes};
use shadowpatch_fixtures::{Fixture, Running};
use shadowpatch_target::{Attached, ProcessIdentity, TargetMemory};
use std::time::Instant;

fn step(number: u32, text: &str) {
    println!("\n[{number}] {text}");
}

pub fn run(context: &Context) -> anyhow::Result<i32> {
    if context.json {
        anyhow::bail!(crate::failure::BadInput(
            "demo narrates for people; it has no --json output".into()
        ));
    }
    let state = tempfile::Builder::new().prefix("shadowpatch-demo-").tempdir()?;
    println!("shadowpatch demo — state directory {}", state.path().display());

    step(
        1,
        "Build and start a sample service: 8 worker threads calling work_fn() in a loop.",
    );
    let started = Instant::now();
    let mut service = Running::start(Fixture::BusyC, &["8", "--blockers"])?;
    let pid = service.pid();
    println!(
        "    pid {pid} ready in {:.0} ms (built with gcc, started, ready line read from its pipe)",
        ms(started)
    );

    step(2, "Attach to every thread (PTRACE_SEIZE) and stop the world 100 times.");
    let identity = ProcessIdentity::of(pid)?;
    println!(
        "    identity: pid {pid} + start time {} (a recycled pid is never mistaken for it)",
        identity.start_time
    );
    let mut attached = Attached::seize(&identity)?;
    let summary = measure(&mut attached, 100)?;
    println!(
        "    {} threads; pause (first interrupt → last resumed): median {} µs, p99 {} µs, tracer at {}",
        summary.threads,
        summary.pause_us.median,
        summary.pause_us.p99,
        if summary.realtime {
            "SCHED_FIFO"
        } else {
            "normal priority"
        }
    );

    step(
        3,
        "Borrow a thread blocked in read() to run mmap/munmap inside the service.",
    );
    let blocked = nix::unistd::Pid::from_raw(service.number("tid_read") as i32);
    let started = Instant::now();
    let mut stopped = attached.stop()?;
    let page = stopped.remote_mmap(
        blocked,
        0,
        4096,
        libc::PROT_READ,
        libc::MAP_PRIVATE | libc::MAP_ANONYMOUS,
    )?;
    stopped.remote_munmap(blocked, page, 4096)?;
    let report = stopped.resume()?;
    println!(
        "    mapped and unmapped {page:#x} in {:.0} µs (pause {} µs); the thread's read() resumes untouched",
        started.elapsed().as_micros(),
        report.pause_us
    );
    attached.detach()?;

    step(
        4,
        "Mirror generation 0: every executable and read-only mapping, hashed per page.",
    );
    let outcome = super::mirror::mirror_process(state.path(), pid, None, true)?;
    println!(
        "    {} regions, {} pages, {} in {:.1} ms → {}",
        outcome.regions,
        outcome.pages,
        human_bytes(outcome.bytes),
        outcome.capture_us as f64 / 1000.0,
        outcome.path.display()
    );
    for module in &outcome.modules {
        println!(
            "      {:<24} {:>10}  build-id {}",
            module.name,
            human_bytes(module.bytes),
            module.build_id.as_deref().unwrap_or("-")
        );
    }

    step(5, "Verify live memory against the mirror.");
    let clean = verify_process(state.path(), pid, None, true)?;
    println!(
        "    {} in {:.2} ms ({:.2} GB/s): {}",
        human_bytes(clean.bytes),
        clean.elapsed_us as f64 / 1000.0,
        gb_per_s(clean.bytes, clean.elapsed_us),
        if clean.clean { "clean" } else { "DIFFERS" }
    );

    step(
        6,
        "Tamper: flip one byte of cold_path()'s code through /proc/PID/mem, as an attacker could.",
    );
    let target = service.number("cold") + 5;
    let mut memory = TargetMemory::open(&identity)?;
    let original = memory.read_vec(target, 1)?[0];
    memory.write(target, &[original ^ 0xff])?;
    println!("    wrote {:02x} over {original:02x} at {target:#x}", original ^ 0xff);

    step(7, "Verify again: the difference is found, located and shown.");
    let dirty = verify_process(state.path(), pid, None, true)?;
    print_outcome(&dirty);

    step(8, "Restore the mirrored byte and verify clean.");
    memory.write(target, &[original])?;
    let restored = verify_process(state.path(), pid, None, true)?;
    println!("    {}", if restored.clean { "clean" } else { "DIFFERS" });

    step(9, "The service kept working throughout.");
    let check = service.check()?;
    println!(
        "    worker errors {}, work_fn calls {}",
        check["errors"], check["calls"]
    );
    let ok = clean.clean && !dirty.clean && restored.clean && check["errors"] == 0;
    println!(
        "\ndemo {}",
        if ok {
            "complete: all steps behaved as expected"
        } else {
            "FAILED"
        }
    );
    Ok(if ok { 0 } else { 3 })
}

fn ms(since: Instant) -> f64 {
    since.elapsed().as_secs_f64() * 1000.0
}
