//! `shadowpatch demo`: a narrated walk through the foundation on a real
//! process: build and start a sample multi-threaded service, stop the world,
//! run a syscall inside it, mirror it, verify it, tamper with one byte of its
//! code as an attacker would, detect exactly that byte, restore it, verify
//! clean; then live-patch it so its answers change, verify the new
//! generation, roll back, and show the service never missed a beat.

mod sample_service;

use super::pause::measure;
use super::verify::verify_process;
use super::Context;
use crate::output::{gb_per_s, human_bytes, print_json};
use sample_service::SampleService;
use shadowpatch_process::{Attached, ProcessIdentity, TargetMemory};
use std::time::Instant;

/// Prints the narration, or with `--json` collects it into one document.
#[derive(Debug, Default)]
struct Narrator {
    json: bool,
    steps: Vec<serde_json::Value>,
}

impl Narrator {
    fn step(&mut self, text: &str) {
        let number = self.steps.len() + 1;
        if !self.json {
            println!("\n[{number}] {text}");
        }
        self.steps
            .push(serde_json::json!({ "step": number, "title": text, "lines": [] }));
    }

    fn say(&mut self, line: String) {
        if !self.json {
            println!("{line}");
        }
        if let Some(step) = self.steps.last_mut() {
            step["lines"]
                .as_array_mut()
                .expect("lines is an array")
                .push(line.trim().into());
        }
    }
}

pub fn run(context: &Context) -> anyhow::Result<i32> {
    let mut n = Narrator {
        json: context.json,
        steps: Vec::new(),
    };
    let state = tempfile::Builder::new().prefix("shadowpatch-demo-").tempdir()?;
    // The sample service is compiled beside the state directory, never in
    // it: a state directory holds only what shadowpatch writes.
    let build = tempfile::Builder::new().prefix("shadowpatch-demo-build-").tempdir()?;
    if !context.json {
        println!("shadowpatch demo — state directory {}", state.path().display());
    }

    n.step("Build and start a sample service: 8 worker threads calling work_fn() in a loop.");
    let started = Instant::now();
    let binary = sample_service::build_service(build.path())?;
    let mut service = SampleService::start(&binary, &["8", "--blockers"])?;
    let pid = service.pid();
    n.say(format!(
        "    pid {pid} ready in {:.0} ms (built with gcc, started, ready line read from its pipe)",
        ms(started)
    ));

    n.step("Attach to every thread (PTRACE_SEIZE) and stop the world 100 times.");
    let identity = ProcessIdentity::of(pid)?;
    n.say(format!(
        "    identity: pid {pid} + start time {} (a recycled pid is never mistaken for it)",
        identity.start_time
    ));
    let mut attached = Attached::seize(&identity)?;
    let summary = measure(&mut attached, 100)?;
    let priority = if summary.realtime {
        "SCHED_FIFO"
    } else {
        "normal priority"
    };
    n.say(format!(
        "    {} threads; pause (first interrupt → last resumed): median {} µs, p99 {} µs, tracer at {priority}",
        summary.threads, summary.pause_us.median, summary.pause_us.p99,
    ));

    n.step("Borrow a thread blocked in read() to run mmap/munmap inside the service.");
    let blocked = nix::unistd::Pid::from_raw(service.number("tid_read")? as i32);
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
    n.say(format!(
        "    mapped and unmapped {page:#x} in {} µs (pause {} µs); the thread's read() resumes untouched",
        started.elapsed().as_micros(),
        report.pause_us
    ));
    attached.detach()?;

    n.step("Mirror generation 0: every executable and read-only mapping, hashed per page.");
    let outcome = super::mirror::mirror_process(state.path(), pid, None, !context.json)?;
    n.say(format!(
        "    {} regions, {} pages, {} in {:.1} ms → {}",
        outcome.regions,
        outcome.pages,
        human_bytes(outcome.bytes),
        outcome.capture_us as f64 / 1000.0,
        outcome.path.display()
    ));
    for module in &outcome.modules {
        let build_id = module.build_id.as_deref().unwrap_or("-");
        n.say(format!(
            "      {:<24} {:>10}  build-id {build_id}",
            module.name,
            human_bytes(module.bytes)
        ));
    }

    n.step("Verify live memory against the mirror.");
    let clean = verify_process(state.path(), pid, None, !context.json)?;
    n.say(format!(
        "    {} in {:.2} ms ({:.2} GB/s): {}",
        human_bytes(clean.bytes),
        clean.elapsed_us as f64 / 1000.0,
        gb_per_s(clean.bytes, clean.elapsed_us),
        if clean.clean { "clean" } else { "DIFFERS" }
    ));

    n.step("Tamper: flip one byte of cold_path()'s code through /proc/PID/mem, as an attacker could.");
    let target = service.number("cold")? + 5;
    let mut memory = TargetMemory::open(&identity)?;
    let original = memory.read_vec(target, 1)?[0];
    memory.write(target, &[original ^ 0xff])?;
    n.say(format!(
        "    wrote {:02x} over {original:02x} at {target:#x}",
        original ^ 0xff
    ));

    n.step("Verify again: the difference is found, located and shown.");
    let dirty = verify_process(state.path(), pid, None, !context.json)?;
    for d in &dirty.differences {
        n.say(format!("    {}", d.describe()));
    }

    n.step("Restore the mirrored byte and verify clean.");
    memory.write(target, &[original])?;
    let restored = verify_process(state.path(), pid, None, !context.json)?;
    n.say(format!("    {}", if restored.clean { "clean" } else { "DIFFERS" }));

    n.step("Live-patch the service: banner() and work_fn() replaced from a patch object, in one stop.");
    let object = sample_service::build_fix(build.path())?;
    let build_id = outcome
        .modules
        .iter()
        .find(|m| m.name == sample_service::SERVICE_NAME)
        .and_then(|m| m.build_id.clone());
    let manifest = state.path().join("demo-fix.toml");
    std::fs::write(
        &manifest,
        format!(
            "id = \"demo-fix\"\nobject = \"{}\"\n[target]\nbuild_id = \"{}\"\n\
             [[replace]]\nsymbol = \"banner\"\nwith = \"banner_v2\"\n\
             [[replace]]\nsymbol = \"work_fn\"\nwith = \"work_fn_v2\"\n",
            object.display(),
            build_id.unwrap_or_default()
        ),
    )?;
    let before = service.command("banner")?;
    // As `shadowpatch apply` does it: the analysis gate first.
    let request = shadowpatch_ops::ApplyRequest {
        pid,
        manifest: manifest.clone(),
        attempts: shadowpatch_patch::activate::DEFAULT_ATTEMPTS,
        force: false,
        analysis: shadowpatch_ops::AnalysisSettings {
            context_secs: 0.0,
            ..Default::default()
        },
        requested_by: "demo".into(),
        baseline_module_only: false,
        no_ancestor_state: false,
    };
    let applied = match shadowpatch_ops::apply(state.path(), &request, None, None)? {
        shadowpatch_ops::ApplyResult::Applied(applied) => applied.apply,
        shadowpatch_ops::ApplyResult::Refused(refused) => {
            anyhow::bail!("the analysis refused the demo's patch: {}", refused.message)
        }
    };
    n.say(format!(
        "    applied {} as generation {}: pause {} µs for {} threads (load stop {} µs, total {:.1} ms)",
        applied.patch_id,
        applied.generation,
        applied.pause_us,
        applied.activation.pause.threads,
        applied.load_pause_us,
        applied.total_us as f64 / 1000.0
    ));
    for f in &applied.functions {
        let via = f
            .preserved
            .as_ref()
            .map(|r| format!(" via a thunk preserving {r}"))
            .unwrap_or_default();
        n.say(format!("      {} → {} at {:#x}{via}", f.symbol, f.with, f.new_address));
    }
    let after = service.command("banner")?;
    n.say(format!("    banner before: {before:?}  after: {after:?}"));
    n.say(format!("    work_fn(5) now answers {}", service.command("ask 5")?));

    n.step("Verify against generation 1 (the patch's code and trampolines are mirrored too).");
    let patched = verify_process(state.path(), pid, None, !context.json)?;
    n.say(format!(
        "    generation {}: {} in {} regions: {}",
        patched.generation,
        human_bytes(patched.bytes),
        patched.regions,
        if patched.clean { "clean" } else { "DIFFERS" }
    ));

    n.step("Roll the patch back in one stop.");
    let rolled = shadowpatch_ops::rollback(
        state.path(),
        &shadowpatch_ops::RollbackRequest {
            pid,
            patch_id: None,
            restore_state: false,
            cause: "command".into(),
        },
    )?
    .rollback;
    n.say(format!(
        "    rolled back {}: pause {} µs, patch memory {}",
        rolled.patch_id,
        rolled.pause_us,
        if rolled.unmapped {
            "unmapped"
        } else {
            "left mapped (still in use)"
        }
    ));
    let back = service.command("banner")?;
    n.say(format!(
        "    banner: {back:?}, work_fn(5) = {}",
        service.command("ask 5")?
    ));
    let unpatched = verify_process(state.path(), pid, None, !context.json)?;
    n.say(format!(
        "    verify generation {}: {}",
        unpatched.generation,
        if unpatched.clean { "clean" } else { "DIFFERS" }
    ));

    n.step("The service kept working throughout.");
    let check = service.check()?;
    n.say(format!(
        "    worker errors {}, work_fn calls {}, of which answered by the patch {}",
        check["errors"], check["calls"], check["patched"]
    ));
    let ok = clean.clean
        && !dirty.clean
        && restored.clean
        && after != before
        && back == before
        && patched.clean
        && unpatched.clean
        && check["errors"] == 0;
    if context.json {
        print_json(&serde_json::json!({
            "ok": ok,
            "steps": n.steps,
            "pause_us_median": summary.pause_us.median,
            "threads": summary.threads,
            "mirror_bytes": outcome.bytes,
            "verify_us": clean.elapsed_us,
            "differences_found": dirty.differences.len(),
            "apply_pause_us": applied.pause_us,
            "rollback_pause_us": rolled.pause_us,
        }));
    } else {
        println!(
            "\ndemo {}",
            if ok {
                "complete: all steps behaved as expected"
            } else {
                "FAILED"
            }
        );
    }
    Ok(if ok { 0 } else { 3 })
}

fn ms(since: Instant) -> f64 {
    since.elapsed().as_secs_f64() * 1000.0
}
