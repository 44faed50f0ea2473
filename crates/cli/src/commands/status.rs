//! `shadowpatch status PID`: identity, modules and mirror generations.

use super::Context;
use crate::output::{human_bytes, print_json};
use serde::Serialize;
use shadowpatch_mirror::{MirrorFile, StateDir, VariableMode, VariableRegistry};
use shadowpatch_process::attach::list_threads;
use shadowpatch_process::maps::read_maps;
use shadowpatch_process::ProcessIdentity;
use shadowpatch_symbols::modules_of;
use std::path::PathBuf;

#[derive(Debug, Serialize)]
struct Status {
    pid: i32,
    start_time: u64,
    comm: String,
    exe: Option<PathBuf>,
    threads: usize,
    modules: Vec<ModuleStatus>,
    state_dir: PathBuf,
    mirror_dir: Option<PathBuf>,
    generations: Vec<GenerationStatus>,
    /// State kept for earlier processes that had this pid.
    other_incarnations: Vec<u64>,
    /// Active patches, oldest first.
    patches: Vec<PatchStatus>,
    /// A transaction interrupted by a crash, if any (`recover` fixes it).
    interrupted: Option<String>,
    /// Patch mappings a rollback left in place because a thread might
    /// still use them (unmapped by a later transaction or `recover`).
    retired: Vec<String>,
    /// Critical variables registered (by `watch --guard`, config files).
    variables: Vec<VariableStatus>,
    /// What a running agent knows of the target (None: no agent).
    agent: Option<serde_json::Value>,
}

#[derive(Debug, Serialize)]
struct VariableStatus {
    name: String,
    mode: VariableMode,
    address: u64,
    size: u64,
    origin: String,
}

#[derive(Debug, Serialize)]
struct PatchStatus {
    id: String,
    generation: u32,
    module: String,
    functions: Vec<String>,
    mapping: String,
}

#[derive(Debug, Serialize)]
struct ModuleStatus {
    name: String,
    path: PathBuf,
    base: String,
    bias: String,
    build_id: Option<String>,
    symbols: usize,
    has_symtab: bool,
    main: bool,
}

#[derive(Debug, Serialize)]
struct GenerationStatus {
    generation: u32,
    created_unix_ms: u64,
    regions: usize,
    bytes: u64,
    file_bytes: u64,
    error: Option<String>,
}

pub fn run(context: &Context, pid: i32) -> anyhow::Result<i32> {
    let identity = ProcessIdentity::of(pid)?;
    // A child forked from a patched process shows the patches it carries.
    if let Some(adopted) = shadowpatch_ops::adopt_if_forked(&context.state_dir, pid)? {
        if !context.json {
            println!("{}", adopted.describe());
        }
    }
    let modules = modules_of(pid, &read_maps(pid)?)?;
    let threads = list_threads(pid)?.len();
    let mut status = Status {
        pid,
        start_time: identity.start_time,
        comm: identity.comm.clone(),
        exe: identity.exe.clone(),
        threads,
        modules: modules
            .iter()
            .map(|m| ModuleStatus {
                name: m.name.clone(),
                path: m.path.clone(),
                base: format!("{:#x}", m.base),
                bias: format!("{:#x}", m.bias),
                build_id: m.build_id_hex(),
                symbols: m.image.symbols.len(),
                has_symtab: m.image.has_symtab,
                main: m.main,
            })
            .collect(),
        state_dir: context.state_dir.clone(),
        mirror_dir: None,
        generations: Vec::new(),
        other_incarnations: Vec::new(),
        patches: Vec::new(),
        interrupted: None,
        retired: Vec::new(),
        variables: Vec::new(),
        agent: context.through_agent(&shadowpatch_agent::ControlRequest::Status {
            state_dir: context.state_dir.clone(),
            pid,
        })?,
    };
    // A missing state directory just means nothing was mirrored yet; a
    // foreign or corrupt one is an error worth reporting.
    if let Some(state) = StateDir::open_if_present(&context.state_dir)? {
        for (start_time, dir) in state.incarnations(pid) {
            // A pid that exec'd since keeps its start time: its old state
            // is a dead target's, like another incarnation's.
            if start_time != identity.start_time || StateDir::check_same_program(&dir, &identity).is_err() {
                status.other_incarnations.push(start_time);
                continue;
            }
            for generation in StateDir::generations(&dir) {
                let path = StateDir::generation_path(&dir, generation);
                let file_bytes = std::fs::metadata(&path).map(|m| m.len()).unwrap_or(0);
                status.generations.push(match MirrorFile::open(&path) {
                    Ok(mirror) => GenerationStatus {
                        generation,
                        created_unix_ms: mirror.header.created_unix_ms,
                        regions: mirror.header.regions.len(),
                        bytes: mirror.header.total_bytes,
                        file_bytes,
                        error: None,
                    },
                    Err(error) => GenerationStatus {
                        generation,
                        created_unix_ms: 0,
                        regions: 0,
                        bytes: 0,
                        file_bytes,
                        error: Some(error.to_string()),
                    },
                });
            }
            let journal = shadowpatch_patch::journal::Journal::replay(&dir)?;
            status.patches = journal
                .active
                .iter()
                .map(|p| PatchStatus {
                    id: p.id.clone(),
                    generation: p.generation,
                    module: p.module.clone(),
                    functions: p
                        .functions
                        .iter()
                        .map(|f| format!("{} → {}", f.site.symbol, f.with))
                        .collect(),
                    mapping: format!("{:#x}+{:#x}", p.mapping_address, p.mapping_len),
                })
                .collect();
            status.retired = journal
                .retired
                .iter()
                .map(|(address, len)| format!("{address:#x}+{len:#x}"))
                .collect();
            status.interrupted = journal.open.map(|t| format!("{:?} of {}", t.kind, t.patch_id));
            if let Some(registry) = VariableRegistry::load(&dir)? {
                status.variables = registry
                    .variables
                    .into_iter()
                    .map(|v| VariableStatus {
                        name: v.name,
                        mode: v.mode,
                        address: v.address,
                        size: v.size,
                        origin: v.origin,
                    })
                    .collect();
            }
            status.mirror_dir = Some(dir);
        }
    }
    if context.json {
        print_json(&status);
        return Ok(0);
    }
    println!(
        "pid {} ({}), start time {}, {} threads",
        status.pid, status.comm, status.start_time, status.threads
    );
    if let Some(exe) = &status.exe {
        println!("  exe {}", exe.display());
    }
    println!("modules:");
    for m in &status.modules {
        println!(
            "  {:<28} base {:>14} bias {:>14} {:>6} symbols{} build-id {}",
            m.name,
            m.base,
            m.bias,
            m.symbols,
            if m.has_symtab { " (symtab)" } else { " (dynsym)" },
            m.build_id.as_deref().unwrap_or("-")
        );
    }
    match &status.mirror_dir {
        None => println!("mirror: none in {}", status.state_dir.display()),
        Some(dir) => {
            println!("mirror: {}", dir.display());
            for g in &status.generations {
                match &g.error {
                    None => println!(
                        "  generation {}: {} regions, {} mirrored, {} on disk",
                        g.generation,
                        g.regions,
                        human_bytes(g.bytes),
                        human_bytes(g.file_bytes)
                    ),
                    Some(error) => println!("  generation {}: unreadable: {error}", g.generation),
                }
            }
        }
    }
    if !status.patches.is_empty() {
        println!("active patches (oldest first):");
        for p in &status.patches {
            println!(
                "  {} generation {} in {} at {}: {}",
                p.id,
                p.generation,
                p.module,
                p.mapping,
                p.functions.join(", ")
            );
        }
    }
    for retired in &status.retired {
        println!("retired patch mapping {retired}: left in place while a thread may use it");
    }
    if !status.variables.is_empty() {
        println!("critical variables:");
        for v in &status.variables {
            println!(
                "  {} {} at {:#x} ({} bytes), from {}",
                v.mode.as_str(),
                v.name,
                v.address,
                v.size,
                v.origin
            );
        }
    }
    match status
        .agent
        .as_ref()
        .map(|agent| (agent["agent_pid"].clone(), &agent["watched"]))
    {
        None => {}
        Some((agent_pid, serde_json::Value::Null)) => println!("agent (pid {agent_pid}): not watching"),
        Some((agent_pid, watched)) => println!(
            "agent (pid {agent_pid}): watching generation {}, {} passes, {} alerts, {} heals{}",
            watched["generation"],
            watched["passes"],
            watched["alerts"],
            watched["heals"],
            if watched["heal"] == true { ", heal on" } else { "" }
        ),
    }
    if let Some(interrupted) = &status.interrupted {
        println!("INTERRUPTED transaction: {interrupted}; run `shadowpatch recover {pid}`");
    }
    if !status.other_incarnations.is_empty() {
        println!(
            "  (stale state of earlier processes with pid {pid}: start times {:?})",
            status.other_incarnations
        );
    }
    Ok(0)
}
