//! `apply … --persist`, `shadowpatch persisted` and `shadowpatch
//! unpersist ID`: the rules of `shadowpatch_ops::persist`, which the agent
//! sweeps to patch new processes (a restarted service, a fresh worker).

use super::sets::SetFlags;
use super::Context;
use crate::failure::BadInput;
use crate::output::print_json;
use shadowpatch_ops::persist::{self, Rule, Scope};
use shadowpatch_ops::set::Selector;
use shadowpatch_ops::ApplyRequest;
use std::path::{Path, PathBuf};

#[derive(clap::Args, Debug, Clone, Default)]
pub struct PersistFlags {
    /// After the apply, have the agent apply this patch to every new process of the unit or cgroup given (--unit, --cgroup), or of the program (--program; default the one PID runs), that maps the module with the patch's build-id: restarts and new workers are patched too. `shadowpatch unpersist ID` ends it.
    #[arg(long)]
    pub persist: bool,
    /// With --persist: the program whose new processes get the patch.
    #[arg(long, value_name = "PATH", requires = "persist")]
    pub program: Option<PathBuf>,
}

impl PersistFlags {
    /// The scope to persist to, checked before anything is applied (bad
    /// input leaves the target untouched).
    pub fn scope(&self, pid: Option<i32>, set: &SetFlags) -> anyhow::Result<Option<Scope>> {
        if !self.persist {
            return Ok(None);
        }
        let scope = match (&self.program, set.selector(pid)) {
            (Some(program), _) => Scope::Program(program.clone()),
            (None, Some(selector @ (Selector::Cgroup(_) | Selector::Unit(_)))) => Scope::Set(selector),
            (None, _) => {
                let pid = pid.ok_or_else(|| BadInput("--persist needs a PID, --unit, --cgroup or --program".into()))?;
                let exe = std::fs::read_link(format!("/proc/{pid}/exe"))
                    .map_err(|e| BadInput(format!("--persist: the program of pid {pid}: {e}")))?;
                Scope::Program(exe)
            }
        };
        persist::check_scope(scope)
            .map(Some)
            .map_err(|e| BadInput(e.to_string()).into())
    }
}

/// Record the rule once the apply succeeded; said on stderr so `--json`
/// keeps one document on stdout.
pub fn add(context: &Context, scope: Scope, manifest: &Path, request: ApplyRequest) -> anyhow::Result<()> {
    let (parsed, _) = shadowpatch_patch::manifest::Manifest::load(manifest)?;
    let rule = Rule {
        id: parsed.id.clone(),
        scope,
        build_id: parsed.build_id_lowercase(),
        request: ApplyRequest {
            manifest: std::path::absolute(manifest)?,
            ..request
        },
        created_unix_ms: std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map_or(0, |d| d.as_millis() as u64),
        boot_id: String::new(),
        since_ticks: 0,
    };
    let (rule, path) = persist::add(&context.state_dir, rule)?;
    eprintln!(
        "persisted {}: the agent applies it to every process of {} with build-id {} that starts from now on (rule {}; `shadowpatch unpersist {}` ends it)",
        rule.id,
        rule.scope,
        rule.build_id,
        path.display(),
        rule.id
    );
    Ok(())
}

/// `shadowpatch persisted`: the rules.
pub fn run_list(context: &Context) -> anyhow::Result<i32> {
    let rules = persist::rules(&context.state_dir)?;
    if context.json {
        print_json(&rules);
        return Ok(0);
    }
    if rules.is_empty() {
        println!("no persisted patches in {}", context.state_dir.display());
        return Ok(0);
    }
    for rule in &rules {
        println!(
            "{}  {}  build-id {}  manifest {}",
            rule.id,
            rule.scope,
            rule.build_id,
            rule.request.manifest.display()
        );
    }
    Ok(0)
}

/// `shadowpatch unpersist ID`.
pub fn run_remove(context: &Context, id: &str) -> anyhow::Result<i32> {
    let rule = persist::remove(&context.state_dir, id)?;
    if context.json {
        print_json(&rule);
    } else {
        println!(
            "unpersisted {}: new processes of {} are no longer patched (where it is applied, it stays: `shadowpatch rollback` removes it)",
            rule.id, rule.scope
        );
    }
    Ok(0)
}
