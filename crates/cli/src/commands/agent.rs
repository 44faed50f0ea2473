//! `shadowpatch agent`: run the daemon until SIGTERM/SIGINT, and
//! `watch --agent` / `unwatch`, which hand a target's watcher to it.

use super::Context;
use crate::failure::BadInput;
use crate::output::print_json;
use shadowpatch_agent::{Agent, AgentConfig, ControlRequest};
use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::Duration;

#[derive(Debug, clap::Args)]
pub struct AgentArgs {
    /// Where applications linking the runtime library connect.
    #[arg(long, env = "SHADOWPATCH_APP_SOCKET", default_value = shadowpatch_agent::DEFAULT_APP_SOCKET)]
    pub app_socket: PathBuf,
    /// Prometheus endpoint (GET /metrics); `off` for none. Port 0 picks a free port (printed in the ready line).
    #[arg(long, default_value = "127.0.0.1:9464")]
    pub metrics_listen: String,
    /// Permissions of the control socket, octal: 600 lets only root in; 666 lets users act on their own processes.
    #[arg(long, default_value = "600")]
    pub socket_mode: String,
    /// Time between two verification passes of each watched target.
    #[arg(long, default_value = "1s")]
    pub watch_interval: String,
    /// CPU each watcher may use, in percent of one core.
    #[arg(long, default_value_t = 20.0)]
    pub watch_cpu_budget: f64,
    /// The default policy after each apply the agent makes: watch the service this long (a fault in patch code is survived and rolled back, CPU/RSS and --apply-metrics-url judged before vs after); 0 for a plain apply.
    #[arg(long, default_value = "10s", value_name = "DURATION")]
    pub watch_after_apply: String,
    /// A Prometheus endpoint of the targets the agent patches, judged by the watch after apply.
    #[arg(long, value_name = "URL")]
    pub apply_metrics_url: Option<String>,
    /// Calls needed through every replaced function before the watch after apply keeps a patch (0: no such rule).
    #[arg(long, default_value_t = 1, value_name = "N")]
    pub watch_min_calls: u64,
    /// The longest the watch after apply is extended waiting for --watch-min-calls (default 10m, at least --watch-after-apply).
    #[arg(long, value_name = "DURATION")]
    pub watch_max_window: Option<String>,
    /// What a window still short of calls at --watch-max-window does: rollback (default) or keep.
    #[arg(long, default_value = "rollback", value_name = "keep|rollback")]
    pub watch_unexercised: String,
    /// How often the scopes of persisted patches (`apply --persist`) are swept for new processes; 0 to never.
    #[arg(long, default_value = "1s", value_name = "DURATION")]
    pub persist_interval: String,
    /// How often the processes patched targets fork are looked for and adopted (a reload's or a respawn's new workers); 0 to never.
    #[arg(long, default_value = "200ms", value_name = "DURATION")]
    pub follow_interval: String,
    #[command(flatten)]
    pub predictor: super::analyze::PredictorArgs,
}

pub fn run(context: &Context, args: &AgentArgs) -> anyhow::Result<i32> {
    let control_socket = context
        .agent_socket
        .clone()
        .ok_or_else(|| BadInput("`agent` needs a control socket (drop --no-agent)".into()))?;
    let metrics_listen = match args.metrics_listen.as_str() {
        "off" | "" => None,
        text => Some(
            text.parse::<SocketAddr>()
                .map_err(|e| BadInput(format!("--metrics-listen {text}: {e} (want ADDRESS:PORT or off)")))?,
        ),
    };
    let control_socket_mode = u32::from_str_radix(&args.socket_mode, 8)
        .ok()
        .filter(|mode| *mode <= 0o777)
        .ok_or_else(|| {
            BadInput(format!(
                "--socket-mode {}: want octal permissions such as 600",
                args.socket_mode
            ))
        })?;
    let watch = shadowpatch_watch::WatchOptions {
        interval: shadowpatch_watch::parse_duration(&args.watch_interval, "--watch-interval")
            .map_err(|e| BadInput(e.to_string()))?,
        cpu_budget_percent: args.watch_cpu_budget,
        ..shadowpatch_watch::WatchOptions::default()
    };
    watch.validate().map_err(|e| BadInput(e.to_string()))?;
    let after = humantime::parse_duration(&args.watch_after_apply)
        .map_err(|e| BadInput(format!("--watch-after-apply {}: {e}", args.watch_after_apply)))?;
    let watch_after_apply = if after.is_zero() {
        None
    } else {
        let secs = after.as_secs_f64();
        Some(
            super::apply_watch::check_args(secs, secs.min(1.0), 100, None, 5.0, args.apply_metrics_url.clone())
                .and_then(|watch| {
                    super::apply_watch::exercise_args_named(
                        watch,
                        args.watch_min_calls,
                        args.watch_max_window.as_deref(),
                        &args.watch_unexercised,
                        "--watch-",
                    )
                })?,
        )
    };
    let persist_interval = interval("--persist-interval", &args.persist_interval)?;
    let follow_interval = interval("--follow-interval", &args.follow_interval)?;
    let predictor = args.predictor.settings();
    if let Some(settings) = &predictor {
        settings.check().map_err(|e| BadInput(e.to_string()))?;
    }
    let stop = Arc::new(AtomicBool::new(false));
    for signal in [signal_hook::consts::SIGTERM, signal_hook::consts::SIGINT] {
        signal_hook::flag::register(signal, Arc::clone(&stop))?;
    }
    let (agent, report) = Agent::start(AgentConfig {
        state_dir: context.state_dir.clone(),
        control_socket,
        app_socket: args.app_socket.clone(),
        metrics_listen,
        control_socket_mode,
        watch,
        watch_after_apply,
        persist_interval,
        follow_interval,
        predictor,
    })
    .map_err(|e| match e.failure_kind() {
        shadowpatch_agent::FailureKind::BadInput => anyhow::Error::new(BadInput(e.to_string())),
        _ => anyhow::Error::new(e),
    })?;
    // The ready line: one line of JSON always (tests and supervisors read
    // it), one line per target that needed attention on a terminal too.
    println!("{}", serde_json::to_string(&report)?);
    if !context.json {
        for target in report.targets.iter().filter(|t| t.message.is_some()) {
            eprintln!(
                "shadowpatch agent: pid {}: {}",
                target.pid,
                target.message.as_deref().unwrap_or_default()
            );
        }
    }
    if let Err(error) = shadowpatch_agent::notify::ready() {
        eprintln!("shadowpatch agent: cannot notify systemd: {error}");
    }
    // Everything is served on the agent's threads; this one waits for a
    // signal. The flag is set by the handler, checked 10 times a second.
    while !stop.load(Ordering::Relaxed) {
        std::thread::sleep(Duration::from_millis(100));
    }
    agent.shutdown();
    Ok(0)
}

/// `watch PID --agent`: the agent verifies the target from now on.
pub fn run_watch(context: &Context, pid: i32, heal: bool) -> anyhow::Result<i32> {
    let request = ControlRequest::Watch {
        state_dir: context.state_dir.clone(),
        pid,
        heal,
    };
    let watched = context.through_agent(&request)?.ok_or_else(|| {
        BadInput(format!(
            "watch --agent: no agent serves {}",
            context.state_dir.display()
        ))
    })?;
    if context.json {
        print_json(&watched);
    } else {
        println!(
            "the agent watches pid {pid} (generation {}){}",
            watched["generation"],
            if heal { ", heal on" } else { "" }
        );
    }
    Ok(0)
}

/// `unwatch PID`: the agent stops verifying the target.
pub fn run_unwatch(context: &Context, pid: i32) -> anyhow::Result<i32> {
    let request = ControlRequest::Unwatch {
        state_dir: context.state_dir.clone(),
        pid,
    };
    let answer = context
        .through_agent(&request)?
        .ok_or_else(|| BadInput(format!("unwatch: no agent serves {}", context.state_dir.display())))?;
    if context.json {
        print_json(&answer);
    } else {
        println!("the agent no longer watches pid {pid}");
    }
    Ok(0)
}

/// A period flag's value; 0 turns the loop off.
fn interval(flag: &str, text: &str) -> Result<Option<std::time::Duration>, BadInput> {
    let period = humantime::parse_duration(text).map_err(|e| BadInput(format!("{flag} {text}: {e}")))?;
    Ok((!period.is_zero()).then_some(period))
}
