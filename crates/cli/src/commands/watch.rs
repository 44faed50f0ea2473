//! `shadowpatch watch PID`: continuous verification until SIGINT/SIGTERM or
//! the target exits. A thin loop over `shadowpatch_watch::Watcher`: this
//! file parses options, prints events (one line each, or one JSON object
//! per line with `--json`), draws a status line on a terminal and feeds the
//! `--on-alert` hook.

use super::Context;
use crate::output::human_bytes;
use shadowpatch_mirror::{DirtyMethod, VariableMode, VariableRequest};
use shadowpatch_watch::event::ClassRow;
use shadowpatch_watch::pacing::pin_current_thread;
use shadowpatch_watch::{
    parse_duration, AlertHook, HookOutcome, StopReason, WatchConfig, WatchError, WatchEvent, WatchOptions, Watcher,
};
use std::io::{IsTerminal, Write};
use std::path::PathBuf;
use std::sync::atomic::AtomicBool;
use std::sync::Arc;

/// What the command line asked for.
#[derive(Debug, Clone, Default)]
pub struct WatchArgs {
    pub interval: Option<String>,
    pub cpu_budget: Option<f64>,
    pub pin_cpu: Option<usize>,
    pub heal: bool,
    pub on_alert: Option<String>,
    pub hook_timeout: String,
    pub config: Option<PathBuf>,
    pub guards: Vec<String>,
    pub mirror_vars: Vec<String>,
    /// A TOML file of `[[variable]]` tables only (the config file's format).
    pub vars: Option<PathBuf>,
    pub history: Option<usize>,
    pub dirty_method: Option<String>,
}

/// `--dirty-method` names: `auto` (None) or one method.
pub fn parse_dirty_method(text: &str) -> Result<Option<DirtyMethod>, WatchError> {
    match text {
        "auto" => Ok(None),
        "uffd" => Ok(Some(DirtyMethod::UffdWpAsync)),
        "soft-dirty" => Ok(Some(DirtyMethod::SoftDirty)),
        "sweep" => Ok(Some(DirtyMethod::FullSweep)),
        other => Err(WatchError::DirtyMethod(format!(
            "unknown method {other:?} (auto, uffd, soft-dirty or sweep)"
        ))),
    }
}

pub fn run(context: &Context, pid: i32, args: &WatchArgs) -> anyhow::Result<i32> {
    // Everything the user gave is checked before anything is written.
    let config = match &args.config {
        Some(path) => WatchConfig::load(path).map_err(WatchError::from)?,
        None => WatchConfig::default(),
    };
    let mut options = WatchOptions::default();
    if let Some(interval) = config.interval {
        options.interval = interval;
    }
    if let Some(text) = &args.interval {
        options.interval = parse_duration(text, "--interval").map_err(WatchError::from)?;
    }
    if let Some(budget) = config.cpu_budget_percent {
        options.cpu_budget_percent = budget;
    }
    if let Some(budget) = args.cpu_budget {
        options.cpu_budget_percent = budget;
    }
    options.heal = args.heal || config.heal.unwrap_or(false);
    let hook_timeout = parse_duration(&args.hook_timeout, "--hook-timeout").map_err(WatchError::from)?;
    if let Some(keep) = args.history {
        options.history_keep = keep;
    }
    if let Some(method) = &args.dirty_method {
        options.dirty_method = parse_dirty_method(method)?;
    }
    options.validate().map_err(WatchError::from)?;
    let mut requests = config.variables.clone();
    if let Some(path) = &args.vars {
        let vars = WatchConfig::load(path).map_err(WatchError::from)?;
        if vars
            != (WatchConfig {
                variables: vars.variables.clone(),
                ..WatchConfig::default()
            })
        {
            return Err(WatchError::from(shadowpatch_watch::ConfigError::File {
                path: path.clone(),
                message: "a --vars file holds [[variable]] tables only (options go in --config)".into(),
            })
            .into());
        }
        requests.extend(vars.variables);
    }
    for text in &args.guards {
        requests.push(
            VariableRequest::parse(text, VariableMode::Guarded, &format!("--guard {text}"))
                .map_err(WatchError::from)?,
        );
    }
    for text in &args.mirror_vars {
        requests.push(
            VariableRequest::parse(text, VariableMode::Mirrored, &format!("--mirror-var {text}"))
                .map_err(WatchError::from)?,
        );
    }
    let pin_cpu = args.pin_cpu.or(config.pin_cpu);
    if let Some(cpu) = pin_cpu {
        pin_current_thread(cpu).map_err(|errno| {
            crate::failure::BadInput(format!(
                "--pin-cpu {cpu}: cannot run on that CPU ({errno}; this machine has {} CPUs)",
                std::thread::available_parallelism().map_or(0, |n| n.get())
            ))
        })?;
    }
    let on_alert = args.on_alert.clone().or(config.on_alert.clone());

    let json = context.json;
    let hook = on_alert.map(|command| {
        AlertHook::start(command, hook_timeout, move |command, outcome| {
            let message = match outcome {
                HookOutcome::Exited(code) => format!("--on-alert hook {command:?} exited with {code}"),
                HookOutcome::Signalled => format!("--on-alert hook {command:?} was killed by a signal"),
                HookOutcome::TimedOut => format!("--on-alert hook {command:?} timed out and was killed"),
                HookOutcome::Failed(error) => format!("--on-alert hook {command:?} failed: {error}"),
                HookOutcome::Dropped => format!("--on-alert hook {command:?}: alert dropped"),
            };
            warn(json, &message);
        })
    });
    let status_line = !json && std::io::stderr().is_terminal();
    let mut printer = Printer {
        last_pass_line: None,
        json,
        status_line,
        hook,
        pid,
    };
    let stop = Arc::new(AtomicBool::new(false));
    for signal in [signal_hook::consts::SIGINT, signal_hook::consts::SIGTERM] {
        signal_hook::flag::register(signal, stop.clone())?;
    }
    // A child forked from a patched process is watched against the
    // generation it inherited (a baseline would call its patch clean).
    if let Some(adopted) = shadowpatch_ops::adopt_if_forked(&context.state_dir, pid)? {
        warn(json, &adopted.describe());
    }
    let mut watcher = Watcher::start(
        pid,
        &context.state_dir,
        &requests,
        options,
        Box::new(move |event: &WatchEvent| printer.print(event)),
    )?;
    // A heal is the operations layer's to make; the watcher only asks.
    watcher.set_healer(Arc::new(shadowpatch_ops::heal::OpsHealer));
    let reason = watcher.run(&stop)?;
    let alerts = watcher.stats().alerts;
    // Dropping the watcher drops the printer and lets queued hooks finish.
    drop(watcher);
    use crate::failure::Exit;
    Ok(match reason {
        StopReason::TargetExited(_) => Exit::TargetExited,
        StopReason::Requested if alerts > 0 => Exit::Differences,
        StopReason::Requested => Exit::Ok,
    }
    .code())
}

fn warn(json: bool, message: &str) {
    if json {
        let event = WatchEvent::Warning {
            unix_ms: shadowpatch_store::now_ms(),
            message: message.to_string(),
        };
        println!("{}", serde_json::to_string(&event).expect("events serialize"));
    } else {
        eprintln!("\r\x1b[Kshadowpatch: warning: {message}");
    }
}

/// In JSON, at most one `pass` line per this long.
const PASS_LINE_EVERY: std::time::Duration = std::time::Duration::from_secs(1);

struct Printer {
    last_pass_line: Option<std::time::Instant>,
    json: bool,
    status_line: bool,
    hook: Option<AlertHook>,
    pid: i32,
}

impl Printer {
    fn print(&mut self, event: &WatchEvent) {
        if let Some(hook) = &self.hook {
            if is_alarm(event) {
                let json = serde_json::to_string(event).expect("events serialize");
                if hook.fire(json, hook_env(self.pid, event)).is_err() {
                    warn(self.json, "--on-alert hook is behind: an alert was not passed to it");
                }
            }
        }
        if self.json {
            // Passes are a heartbeat in JSON: the first, then one a second.
            if let WatchEvent::Pass { .. } = event {
                if self.last_pass_line.is_some_and(|at| at.elapsed() < PASS_LINE_EVERY) {
                    return;
                }
                self.last_pass_line = Some(std::time::Instant::now());
            }
            println!("{}", serde_json::to_string(event).expect("events serialize"));
            return;
        }
        if let WatchEvent::Pass {
            pass,
            generation,
            pass_us,
            cpu_percent,
            alerts,
            bytes,
            ..
        } = event
        {
            if self.status_line {
                eprint!(
                    "\r\x1b[Kwatching pid {} generation {generation}: pass {pass}, {} in {:.1} ms, cpu {cpu_percent:.1}%, {alerts} alert{}",
                    self.pid,
                    human_bytes(*bytes),
                    *pass_us as f64 / 1000.0,
                    if *alerts == 1 { "" } else { "s" }
                );
                let _ = std::io::stderr().flush();
            }
            return;
        }
        if self.status_line {
            eprint!("\r\x1b[K");
        }
        match event {
            WatchEvent::Warning { message, .. } => eprintln!("shadowpatch: warning: {message}"),
            other => println!("{}", describe(other)),
        }
    }
}

/// Events passed to the `--on-alert` hook.
fn is_alarm(event: &WatchEvent) -> bool {
    matches!(
        event,
        WatchEvent::Alert(_)
            | WatchEvent::PermissionsChanged { .. }
            | WatchEvent::NewExecutableMapping { .. }
            | WatchEvent::RegionUnmapped { .. }
    )
}

fn hook_env(pid: i32, event: &WatchEvent) -> Vec<(String, String)> {
    let mut env = vec![
        ("SHADOWPATCH_EVENT".to_string(), event.name().to_string()),
        ("SHADOWPATCH_PID".to_string(), pid.to_string()),
    ];
    if let WatchEvent::Alert(alert) = event {
        env.push(("SHADOWPATCH_ADDRESS".into(), alert.address_hex.clone()));
        env.push(("SHADOWPATCH_LOCATION".into(), alert.location.location.clone()));
        env.push(("SHADOWPATCH_EXPECTED".into(), alert.expected.clone()));
        env.push(("SHADOWPATCH_LIVE".into(), alert.live.clone()));
        env.push(("SHADOWPATCH_LATENCY_US".into(), alert.latency_us.to_string()));
    }
    env
}

fn rows(rows: &[ClassRow]) -> String {
    rows.iter()
        .map(|r| format!("{} {} in {}", r.reason, human_bytes(r.bytes), r.regions))
        .collect::<Vec<_>>()
        .join("; ")
}

/// One human line (or a few) per event.
fn describe(event: &WatchEvent) -> String {
    match event {
        WatchEvent::Started {
            pid,
            generation,
            baseline_taken,
            regions,
            bytes,
            guarded_variables,
            guarded_bytes,
            mirrored_variables,
            mirrored_bytes,
            dirty_method,
            dirty_skipped,
            history,
            classification,
            interval_ms,
            cpu_budget_percent,
            heal,
            ..
        } => {
            let mut text = String::new();
            if *baseline_taken {
                text.push_str(&format!(
                    "no mirror of pid {pid} existed: took generation 0 first\n"
                ));
            }
            text.push_str(&format!(
                "watching pid {pid} generation {generation}: {regions} regions ({}), {} guarded variable{} ({}); \
                 every {interval_ms} ms within {cpu_budget_percent}% of one core; heal {}",
                human_bytes(*bytes),
                guarded_variables.len(),
                if guarded_variables.len() == 1 { "" } else { "s" },
                human_bytes(*guarded_bytes),
                if *heal { "on" } else { "off" }
            ));
            if let Some(method) = dirty_method {
                text.push_str(&format!(
                    "\n  {} mirrored variable{} ({}): copied each pass, last {history} snapshots kept; \
                     dirty pages found by {method}{}",
                    mirrored_variables.len(),
                    if mirrored_variables.len() == 1 { "" } else { "s" },
                    human_bytes(*mirrored_bytes),
                    if dirty_skipped.is_empty() {
                        String::new()
                    } else {
                        format!(" ({})", dirty_skipped.join("; "))
                    }
                ));
            }
            let (_, immutable) = shadowpatch_watch::Classification::total(&classification.immutable);
            let (_, mutable) = shadowpatch_watch::Classification::total(&classification.mutable);
            let (_, unverified) = shadowpatch_watch::Classification::total(&classification.unverified);
            text.push_str(&format!(
                "\n  immutable {} (verified): {}",
                human_bytes(immutable),
                rows(&classification.immutable)
            ));
            text.push_str(&format!(
                "\n  mutable {} (never compared or healed): {}",
                human_bytes(mutable),
                rows(&classification.mutable)
            ));
            text.push_str(&format!(
                "\n  unverified {}: {}",
                human_bytes(unverified),
                rows(&classification.unverified)
            ));
            text
        }
        WatchEvent::Alert(alert) => format!(
            "ALERT {} {} ({} byte{}, {}{}): expected {} live {}, detected within {:.1} ms",
            alert.address_hex,
            alert.location.location,
            alert.len,
            if alert.len == 1 { "" } else { "s" },
            serde_json::to_value(alert.scope).expect("serializes").as_str().unwrap_or("?"),
            alert
                .variable
                .as_ref()
                .map(|v| format!(" {v}"))
                .unwrap_or_default(),
            alert.expected,
            alert.live,
            alert.latency_us as f64 / 1000.0
        ),
        WatchEvent::Heal(heal) if heal.ok => format!(
            "healed {} run{} ({} byte{}) at {} in a {} µs stop (journal transaction {})",
            heal.runs.len(),
            if heal.runs.len() == 1 { "" } else { "s" },
            heal.bytes,
            if heal.bytes == 1 { "" } else { "s" },
            heal.runs
                .iter()
                .map(|(a, _)| format!("{a:#x}"))
                .collect::<Vec<_>>()
                .join(", "),
            heal.pause_us,
            heal.txn.map_or("-".into(), |t| t.to_string())
        ),
        WatchEvent::Heal(heal) => format!(
            "heal FAILED at {}: {}",
            heal.runs
                .iter()
                .map(|(a, _)| format!("{a:#x}"))
                .collect::<Vec<_>>()
                .join(", "),
            heal.error.as_deref().unwrap_or("?")
        ),
        WatchEvent::Cleared {
            address_hex, location, ..
        } => format!(
            "cleared {address_hex} {}: the mirrored bytes are back",
            location.location
        ),
        WatchEvent::PermissionsChanged {
            start,
            end,
            module,
            mirrored,
            live,
            ..
        } => format!("PERMISSIONS CHANGED {module} {start:#x}-{end:#x}: mirrored {mirrored}, now {live}"),
        WatchEvent::NewExecutableMapping {
            start, end, perms, name, ..
        } => format!("NEW EXECUTABLE MAPPING {start:#x}-{end:#x} {perms} {name}: in no mirror generation"),
        WatchEvent::RegionUnmapped { start, end, module, .. } => {
            format!("REGION UNMAPPED {module} {start:#x}-{end:#x}: no longer verified")
        }
        WatchEvent::GenerationSwitched {
            from, to, regions, bytes, ..
        } => format!(
            "generation {from} → {to} (authorised change): {regions} regions, {}",
            human_bytes(*bytes)
        ),
        WatchEvent::TargetExited { pid, reason, .. } => format!("pid {pid} is gone: {reason}"),
        WatchEvent::Snapshot {
            variable,
            address,
            size,
            hash,
            value,
            ..
        } => format!(
            "snapshot {variable} ({address:#x}, {size} byte{}): {}blake3 {}",
            if *size == 1 { "" } else { "s" },
            value.map(|v| format!("value {v}, ")).unwrap_or_default(),
            &hash[..16]
        ),
        WatchEvent::Stopped {
            reason,
            dirty_method_undone,
            passes,
            alerts,
            heals,
            cpu_percent,
            ..
        } => format!(
            "stopped ({reason}): {passes} passes, {alerts} alert{}, {heals} heal{}, watcher CPU {cpu_percent:.1}% of one core",
            if *alerts == 1 { "" } else { "s" },
            if *heals == 1 { "" } else { "s" }
        ) + match dirty_method_undone {
            Some(true) => "; dirty tracking undone",
            Some(false) => "; dirty tracking NOT undone",
            None => "",
        },
        WatchEvent::Pass { .. } | WatchEvent::Warning { .. } => String::new(),
    }
}
