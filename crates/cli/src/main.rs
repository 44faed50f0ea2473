//! `shadowpatch`: live-patch running Linux processes safely. This file holds
//! the command line (clap); commands parse their arguments and render the
//! typed outcomes of the operations layer (`shadowpatch_ops`). Exit codes
//! are decided by `failure::Exit` alone (docs/exit-codes.md): 0 success,
//! 1 differences found or refused for safety, 2 bad input (target
//! untouched), 3 failed midway, 4 rolled back by the watch or the watched
//! process exited.

#![forbid(unsafe_code)]

mod commands;
mod failure;
mod output;
mod progress;

use clap::{Parser, Subcommand};
use std::path::PathBuf;

#[derive(Debug, Parser)]
#[command(
    name = "shadowpatch",
    version,
    about = "Live-patch running Linux processes, verified against a shadow mirror"
)]
struct Cli {
    /// Where mirrors and journals are kept.
    #[arg(
        long,
        global = true,
        env = "SHADOWPATCH_STATE_DIR",
        default_value = "/var/lib/shadowpatch"
    )]
    state_dir: PathBuf,
    /// Machine-readable JSON on stdout instead of text.
    #[arg(long, global = true)]
    json: bool,
    /// The agent's control socket: commands go through a running agent
    /// serving the same state directory, else act directly.
    #[arg(
        long,
        global = true,
        env = "SHADOWPATCH_AGENT_SOCKET",
        default_value = shadowpatch_agent::DEFAULT_CONTROL_SOCKET
    )]
    agent_socket: PathBuf,
    /// Act directly even if an agent runs.
    #[arg(long, global = true)]
    no_agent: bool,
    #[command(subcommand)]
    command: Command,
}

#[derive(Debug, Subcommand)]
enum Command {
    /// Copy a process's code and read-only data into a new baseline mirror (generation 0).
    Mirror {
        pid: i32,
        /// Only this module (file name, name without version, or path).
        #[arg(long)]
        module: Option<String>,
    },
    /// Compare live memory with the mirror; exit 1 if any byte differs.
    Verify {
        #[arg(required_unless_present_any = ["cgroup", "unit", "all"])]
        pid: Option<i32>,
        #[command(flatten)]
        set: commands::sets::SetFlags,
        /// Verify against this generation instead of the latest.
        #[arg(long)]
        generation: Option<u32>,
    },
    /// Make a patch from a source diff for the binary that is running (manifest + object in --out).
    Build {
        #[command(flatten)]
        args: commands::build::BuildArgs,
    },
    /// Analyse a patch, then load it into a running process and switch its functions in one stop.
    Apply {
        /// PID and the patch manifest (TOML); with --cgroup or --unit, only the manifest.
        #[arg(value_names = ["PID", "MANIFEST"], num_args = 0..=2)]
        positionals: Vec<String>,
        #[command(flatten)]
        set: commands::sets::SetFlags,
        /// With a set: if a member fails, keep the patch on the members already done (default: roll them back).
        #[arg(long)]
        partial: bool,
        /// Stops to try while a thread sits inside an entry being rewritten.
        #[arg(long, default_value_t = shadowpatch_patch::activate::DEFAULT_ATTEMPTS)]
        attempts: u32,
        /// Apply even when the prediction engine refuses the patch.
        #[arg(long)]
        force: bool,
        #[command(flatten)]
        analysis: commands::analyze::AnalysisArgs,
        #[command(flatten)]
        watch: WatchFlags,
        #[command(flatten)]
        persist: commands::persist::PersistFlags,
    },
    /// Predict whether a patch will misbehave in a running process, and why (writes nothing to it).
    Analyze {
        /// PID and the patch manifest (TOML); with --cgroup or --unit, only the manifest.
        #[arg(value_names = ["PID", "MANIFEST"], num_args = 0..=2)]
        positionals: Vec<String>,
        /// Analyse for every process of the set that maps the manifest's module, one report each.
        #[command(flatten)]
        set: commands::sets::SetFlags,
        #[command(flatten)]
        analysis: commands::analyze::AnalysisArgs,
    },
    /// Restore the functions of the latest patch (or PATCH_ID, if it is the latest).
    Rollback {
        /// PID and optionally PATCH_ID (the latest patch if omitted); with --cgroup or --unit, only PATCH_ID.
        #[arg(value_names = ["PID", "PATCH_ID"], num_args = 0..=2)]
        positionals: Vec<String>,
        #[command(flatten)]
        set: commands::sets::SetFlags,
        /// Also write back the mirrored variables as they were just before the patch was activated (journaled, one stop).
        #[arg(long)]
        restore_state: bool,
    },
    /// Copy the registered critical variables now and keep the copy in their history.
    Snapshot {
        pid: i32,
        /// Only this variable (MODULE!SYMBOL, SYMBOL or 0xADDR:SIZE as registered).
        #[arg(long)]
        var: Option<String>,
    },
    /// Finish or undo a patch transaction that was interrupted.
    Recover { pid: i32 },
    /// Show a target's identity, modules and mirror generations.
    Status {
        #[arg(required_unless_present_any = ["cgroup", "unit", "all"])]
        pid: Option<i32>,
        #[command(flatten)]
        set: commands::sets::SetFlags,
    },
    /// List the persisted patches (`apply --persist`): which patch, where new processes get it, the build-id.
    Persisted,
    /// End a persisted patch: new processes are no longer patched (where it is applied, it stays).
    Unpersist {
        /// The patch id.
        id: String,
    },
    /// List the targets with state: alive, dead or exec'd, generations, active patches, watch window, agent, size (reads only).
    List,
    /// Remove the state of dead and exec'd targets, recording each in the history (which is kept); live targets are never touched.
    Gc {
        /// Say what would be removed and remove nothing.
        #[arg(long)]
        dry_run: bool,
        /// Also remove dead targets whose journal has an uncommitted transaction or is damaged (kept by default).
        #[arg(long)]
        interrupted: bool,
    },
    /// Stop and resume every thread of a process, reporting the pause.
    Pause {
        pid: i32,
        /// How many stop/resume rounds.
        #[arg(long, default_value_t = 1)]
        rounds: u32,
        /// Run the stop window at normal priority instead of SCHED_FIFO.
        #[arg(long)]
        normal_priority: bool,
    },
    /// Resolve a symbol name to addresses, or an address to symbol+offset.
    Lookup {
        pid: i32,
        /// A symbol name (MODULE!NAME for one module), or an address (0x...).
        what: String,
    },
    /// Measure stop-the-world latency, mirror/verify throughput and more (runs `shadowpatch-bench ARGS`).
    #[command(disable_help_flag = true)]
    Bench {
        /// --quick, --region-mib MIB, --only SECTION (see `shadowpatch-bench --help`).
        #[arg(trailing_var_arg = true, allow_hyphen_values = true)]
        args: Vec<String>,
    },
    /// Verify a process continuously until SIGINT/SIGTERM: alert (and heal) on any change of its immutable memory.
    Watch {
        #[arg(required_unless_present_any = ["cgroup", "unit"])]
        pid: Option<i32>,
        /// With --agent: the agent watches every process of the set, each with its own watcher.
        #[command(flatten)]
        set: commands::sets::SetFlags,
        /// Time between the starts of two full passes (e.g. 100ms, 2s; 0: back to back).
        #[arg(long)]
        interval: Option<String>,
        /// CPU the verifier may use, in percent of one core (0.1 to 100; default 20).
        #[arg(long)]
        cpu_budget: Option<f64>,
        /// Run the verifier on this CPU only.
        #[arg(long)]
        pin_cpu: Option<usize>,
        /// Write the mirrored bytes back over tampered immutable bytes (journaled, one stop).
        #[arg(long)]
        heal: bool,
        /// Shell command run for each alert (alert JSON on stdin and in SHADOWPATCH_* variables).
        #[arg(long)]
        on_alert: Option<String>,
        /// Kill an --on-alert hook still running after this long.
        #[arg(long, default_value = "10s")]
        hook_timeout: String,
        /// TOML file with options and critical variables.
        #[arg(long)]
        config: Option<PathBuf>,
        /// A critical variable that must never change: SYMBOL, MODULE!SYMBOL or 0xADDR:SIZE (repeatable).
        #[arg(long = "guard")]
        guards: Vec<String>,
        /// A critical variable that changes: copied each pass (written pages only) with a history (repeatable).
        #[arg(long = "mirror-var")]
        mirror_vars: Vec<String>,
        /// TOML file of critical variables: [[variable]] name=.. | address=.., size=.., mode="guarded"|"mirrored".
        #[arg(long)]
        vars: Option<PathBuf>,
        /// Snapshots kept per mirrored variable (1 to 1024; default 16).
        #[arg(long)]
        history: Option<usize>,
        /// How written pages of mirrored variables are found: auto, uffd, soft-dirty or sweep.
        #[arg(long)]
        dirty_method: Option<String>,
        /// Hand the watch to the running agent (returns at once; `unwatch` ends it; the agent's own interval and budget apply).
        #[arg(long, conflicts_with_all = ["interval", "cpu_budget", "pin_cpu", "on_alert", "config", "guards", "mirror_vars", "vars", "history", "dirty_method"])]
        agent: bool,
    },
    /// Stop the agent's watcher of a process.
    Unwatch { pid: i32 },
    /// Run the agent: a daemon that recovers, watches and patches many targets, serves the CLI, applications and metrics.
    Agent {
        #[command(flatten)]
        args: commands::agent::AgentArgs,
    },
    /// Show the event history (attaches, mirrors, alerts, heals, analyses, applies, rollbacks), or with VAR the snapshots of one critical variable.
    History {
        /// Only events of this process id.
        pid: Option<i32>,
        /// The snapshots of this critical variable of PID instead of events.
        var: Option<String>,
        /// Only events since: a duration (15m, 2h, 3d), an RFC 3339 time, or Unix ms.
        #[arg(long)]
        since: Option<String>,
        /// Only events of this kind (repeatable): apply, rollback, alert, heal, ...
        #[arg(long = "kind")]
        kinds: Vec<String>,
        /// Only the newest N events.
        #[arg(long)]
        limit: Option<u64>,
    },
    /// Make an ed25519 key pair for signing patches: NAME.key (secret, 0600) and NAME.pub.
    Keygen {
        name: String,
        /// The folder to write the key pair into.
        #[arg(long, default_value = ".")]
        dir: PathBuf,
    },
    /// Sign a patch (manifest, object and the target's build-id) with a secret key; writes MANIFEST.sig.
    Sign {
        manifest: PathBuf,
        /// The secret key file written by `shadowpatch keygen`.
        #[arg(long, value_name = "FILE")]
        key: PathBuf,
    },
    /// Start a sample service and walk through mirror, verify, tamper, detect, restore.
    Demo,
    /// The learned risk model: build its corpus, train, evaluate, show (runs `shadowpatch-train ARGS`); `serve` runs the fleet service (`shadowpatch-predictor serve ARGS`).
    #[command(disable_help_flag = true)]
    Predictor {
        /// corpus | train | evaluate | show, and their flags (see `shadowpatch-train --help`), or serve (see `shadowpatch-predictor serve --help`).
        #[arg(trailing_var_arg = true, allow_hyphen_values = true)]
        args: Vec<String>,
    },
}

/// `apply`'s watch flags (see `commands::apply_watch`).
#[derive(Debug, Clone, clap::Args)]
struct WatchFlags {
    /// Watch the patched process for SECS after activation (faults in patch code are survived; a regression rolls back).
    #[arg(long, value_name = "SECS")]
    watch: Option<f64>,
    /// Seconds of metric samples taken before activation, the control (default: min(--watch, 3)).
    #[arg(long, value_name = "SECS")]
    baseline: Option<f64>,
    /// Interval between metric samples (and health command runs), in milliseconds.
    #[arg(long, default_value_t = 200, value_name = "MS")]
    sample_ms: u64,
    /// A shell command that exits 0 while the service is healthy (run before the patch and during the watch).
    #[arg(long, value_name = "CMD")]
    health_cmd: Option<String>,
    /// Seconds a health command may take; longer is a failure.
    #[arg(long, default_value_t = 5.0, value_name = "SECS")]
    health_timeout: f64,
    /// Calls needed through every replaced function for a keep verdict (0: no such rule); short of them the window is extended.
    #[arg(long, default_value_t = 1, value_name = "N")]
    min_calls: u64,
    /// The longest the window is extended waiting for --min-calls (e.g. 90s, 10m; default 10m, at least --watch).
    #[arg(long, value_name = "DURATION")]
    max_window: Option<String>,
    /// What a window still short of --min-calls at --max-window does: rollback (default: an unexercised patch was never judged) or keep.
    #[arg(long, default_value = "rollback", value_name = "keep|rollback")]
    unexercised: String,
}

/// `apply`'s positionals (`PID MANIFEST`, or `MANIFEST` with a cgroup or
/// unit) and its set, if any.
#[allow(clippy::too_many_arguments)]
fn run_apply_positionals(
    context: &commands::Context,
    positionals: &[String],
    set: &commands::sets::SetFlags,
    partial: bool,
    attempts: u32,
    force: bool,
    analysis: &commands::analyze::AnalysisArgs,
    watch: WatchFlags,
) -> anyhow::Result<i32> {
    let (pid, manifest) = commands::sets::positionals("apply", positionals, set, "<MANIFEST>", true)?;
    let manifest = PathBuf::from(manifest.expect("required"));
    match set.selector(pid) {
        Some(_) if watch.watch.is_some() => Err(failure::BadInput(
            "--watch applies to one process; a set (--tree, --cgroup, --unit, --all) is applied without it".into(),
        )
        .into()),
        Some(selector) => commands::sets::run_apply(
            context, &selector, &manifest, attempts, force, analysis, partial, set.jobs,
        ),
        None if partial => {
            Err(failure::BadInput("--partial needs a set (--tree, --cgroup, --unit or --all)".into()).into())
        }
        None => run_apply_command(
            context,
            pid.expect("a PID without a set"),
            &manifest,
            attempts,
            force,
            analysis,
            watch,
        ),
    }
}

/// `apply`, then with `--persist` the rule the agent follows. The scope is
/// checked first, so bad input leaves the target untouched.
#[allow(clippy::too_many_arguments)]
fn run_apply_persisting(
    context: &commands::Context,
    positionals: &[String],
    set: &commands::sets::SetFlags,
    partial: bool,
    attempts: u32,
    force: bool,
    analysis: &commands::analyze::AnalysisArgs,
    watch: WatchFlags,
    persist: &commands::persist::PersistFlags,
) -> anyhow::Result<i32> {
    let parsed = commands::sets::positionals("apply", positionals, set, "<MANIFEST>", true).ok();
    let scope = match &parsed {
        Some((pid, _)) => persist.scope(*pid, set)?,
        None => None,
    };
    let code = run_apply_positionals(context, positionals, set, partial, attempts, force, analysis, watch)?;
    if let (0, Some(scope), Some((_, Some(manifest)))) = (code, scope, parsed) {
        let request = shadowpatch_ops::ApplyRequest {
            pid: 0,
            manifest: PathBuf::from(&manifest),
            attempts,
            force,
            analysis: analysis.settings(),
            requested_by: "cli".into(),
            baseline_module_only: false,
            no_ancestor_state: false,
        };
        commands::persist::add(context, scope, std::path::Path::new(&manifest), request)?;
    }
    Ok(code)
}

/// `rollback`'s positionals (`PID [PATCH_ID]`, or `[PATCH_ID]` with a
/// cgroup or unit) and its set, if any.
fn run_rollback_positionals(
    context: &commands::Context,
    positionals: &[String],
    set: &commands::sets::SetFlags,
    restore_state: bool,
) -> anyhow::Result<i32> {
    let (pid, patch_id) = commands::sets::positionals("rollback", positionals, set, "PATCH_ID", false)?;
    match set.selector(pid) {
        Some(_) if restore_state => {
            Err(failure::BadInput("--restore-state applies to one process; roll a set back without it".into()).into())
        }
        Some(selector) => commands::sets::run_rollback(context, &selector, patch_id.as_deref(), set.jobs),
        None => commands::patching::run_rollback(
            context,
            pid.expect("a PID without a set"),
            patch_id.as_deref(),
            restore_state,
        ),
    }
}

fn run_apply_command(
    context: &commands::Context,
    pid: i32,
    manifest: &std::path::Path,
    attempts: u32,
    force: bool,
    analysis: &commands::analyze::AnalysisArgs,
    watch: WatchFlags,
) -> anyhow::Result<i32> {
    let watch_args = match watch.watch {
        None => {
            if watch.health_cmd.is_some() || watch.baseline.is_some() || watch.max_window.is_some() {
                return Err(
                    failure::BadInput("--health-cmd, --baseline and --max-window need --watch SECS".into()).into(),
                );
            }
            None
        }
        Some(secs) => Some(
            commands::apply_watch::check_args(
                secs,
                watch.baseline.unwrap_or(secs.min(3.0)),
                watch.sample_ms,
                watch.health_cmd,
                watch.health_timeout,
                analysis.metrics_url.clone(),
            )
            .and_then(|args| {
                commands::apply_watch::exercise_args(
                    args,
                    watch.min_calls,
                    watch.max_window.as_deref(),
                    &watch.unexercised,
                )
            })?,
        ),
    };
    commands::patching::run_apply(
        context,
        commands::patching::ApplyArgs {
            pid,
            manifest,
            attempts,
            force,
            analysis,
            watch: watch_args,
        },
    )
}

/// `shadowpatch … | head`: once the reader has gone, the print macros
/// panic with "failed printing to stdout: Broken pipe". That is not a
/// failure of ours: end quietly with the shell's SIGPIPE status (141).
/// SIGPIPE itself stays ignored (Rust's default) rather than restored: a
/// signal death in the middle of an apply could leave a target stopped,
/// while output is only printed between operations.
fn quiet_on_closed_stdout() {
    let default = std::panic::take_hook();
    std::panic::set_hook(Box::new(move |info| {
        let message = info
            .payload()
            .downcast_ref::<String>()
            .map(String::as_str)
            .or_else(|| info.payload().downcast_ref::<&str>().copied())
            .unwrap_or("");
        if message.starts_with("failed printing to stdout") && message.contains("Broken pipe") {
            std::process::exit(141);
        }
        default(info);
    }));
}

fn main() {
    // Usage errors on one line, like every other bad input (exit 2).
    let cli: Cli = shadowpatch_report::parse_args("shadowpatch");
    tracing_subscriber::fmt()
        .with_env_filter(tracing_subscriber::EnvFilter::from_env("SHADOWPATCH_LOG"))
        .with_writer(std::io::stderr)
        .init();
    quiet_on_closed_stdout();
    let context = commands::Context {
        state_dir: cli.state_dir.clone(),
        json: cli.json,
        agent_socket: (!cli.no_agent).then(|| cli.agent_socket.clone()),
    };
    let result = match cli.command {
        Command::Mirror { pid, module } => commands::mirror::run(&context, pid, module.as_deref()),
        Command::Verify { pid, set, generation } => match set.selector_without_pid("verify", pid) {
            Err(error) => Err(error.into()),
            Ok(Some(selector)) => commands::sets::for_each_member(&context, &selector, |pid| {
                commands::verify::run(&context, pid, generation)
            }),
            Ok(None) => commands::verify::run(&context, pid.expect("clap requires a PID without a set"), generation),
        },
        Command::Build { args } => commands::build::run(&context, &args),
        Command::Apply {
            positionals,
            set,
            partial,
            attempts,
            force,
            analysis,
            watch,
            persist,
        } => run_apply_persisting(
            &context,
            &positionals,
            &set,
            partial,
            attempts,
            force,
            &analysis,
            watch,
            &persist,
        ),
        Command::Persisted => commands::persist::run_list(&context),
        Command::Unpersist { id } => commands::persist::run_remove(&context, &id),
        Command::Analyze {
            positionals,
            set,
            analysis,
        } => commands::sets::positionals("analyze", &positionals, &set, "<MANIFEST>", true)
            .map_err(anyhow::Error::from)
            .and_then(|(pid, manifest)| {
                let manifest = PathBuf::from(manifest.expect("required"));
                match set.selector(pid) {
                    Some(selector) => commands::sets::for_each_target(&context, &selector, &manifest, |pid| {
                        commands::analyze::run(&context, pid, &manifest, &analysis)
                    }),
                    None => commands::analyze::run(&context, pid.expect("a PID without a set"), &manifest, &analysis),
                }
            }),
        Command::Rollback {
            positionals,
            set,
            restore_state,
        } => run_rollback_positionals(&context, &positionals, &set, restore_state),
        Command::Snapshot { pid, var } => commands::variables::run_snapshot(&context, pid, var.as_deref()),
        Command::Recover { pid } => commands::patching::run_recover(&context, pid),
        Command::Status { pid, set } => match set.selector_without_pid("status", pid) {
            Err(error) => Err(error.into()),
            Ok(Some(selector)) => {
                commands::sets::for_each_member(&context, &selector, |pid| commands::status::run(&context, pid))
            }
            Ok(None) => commands::status::run(&context, pid.expect("clap requires a PID without a set")),
        },
        Command::List => commands::targets::run_list(&context),
        Command::Gc { dry_run, interrupted } => commands::targets::run_gc(&context, dry_run, interrupted),
        Command::Pause {
            pid,
            rounds,
            normal_priority,
        } => commands::pause::run(&context, pid, rounds, normal_priority),
        Command::Keygen { name, dir } => commands::signing::keygen(&context, &name, &dir),
        Command::Sign { manifest, key } => commands::signing::sign(&context, &manifest, &key),
        Command::Lookup { pid, what } => commands::lookup::run(&context, pid, &what),
        Command::Bench { args } => commands::external::run_bench(&context, &args),
        Command::Watch {
            pid,
            set,
            heal,
            agent: true,
            ..
        } => match set.selector(pid) {
            Some(selector) => commands::sets::for_each_member(&context, &selector, |pid| {
                commands::agent::run_watch(&context, pid, heal)
            }),
            None => commands::agent::run_watch(&context, pid.expect("clap requires a PID without a set"), heal),
        },
        Command::Watch { pid, set, .. } if set.selector(pid).is_some() => Err(failure::BadInput(
            "a set (--tree, --cgroup, --unit) is watched by the agent, one watcher per process: add --agent".into(),
        )
        .into()),
        Command::Watch {
            pid,
            set: _,
            interval,
            cpu_budget,
            pin_cpu,
            heal,
            on_alert,
            hook_timeout,
            config,
            guards,
            mirror_vars,
            vars,
            history,
            dirty_method,
            agent: false,
        } => commands::watch::run(
            &context,
            pid.expect("clap requires a PID without a set"),
            &commands::watch::WatchArgs {
                interval,
                cpu_budget,
                pin_cpu,
                heal,
                on_alert,
                hook_timeout,
                config,
                guards,
                mirror_vars,
                vars,
                history,
                dirty_method,
            },
        ),
        Command::History {
            pid: Some(pid),
            var: Some(var),
            since,
            kinds,
            limit,
        } => commands::variables::run_variable_history(
            &context,
            pid,
            &var,
            &commands::history::HistoryQuery {
                pid: Some(pid),
                since,
                kinds,
                limit,
            },
        ),
        Command::History {
            pid,
            var: _,
            since,
            kinds,
            limit,
        } => commands::history::run(
            &context,
            &commands::history::HistoryQuery {
                pid,
                since,
                kinds,
                limit,
            },
        ),
        Command::Demo => commands::demo::run(&context),
        Command::Predictor { args } => commands::external::run_trainer(&context, &args),
        Command::Unwatch { pid } => commands::agent::run_unwatch(&context, pid),
        Command::Agent { args } => commands::agent::run(&context, &args),
    };
    match result {
        Ok(code) => std::process::exit(code),
        Err(error) => {
            let code = failure::exit_code(&error);
            let message = failure::one_line(&error);
            if context.json {
                println!("{}", serde_json::json!({ "error": message, "exit_code": code }));
            }
            eprintln!("shadowpatch: error: {message}");
            std::process::exit(code);
        }
    }
}
