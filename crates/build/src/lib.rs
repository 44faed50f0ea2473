//! Patches from a source diff (`shadowpatch build`): the tree is built
//! in copies through a recording compiler wrapper — pristine (the
//! reference, cached by source hash), then, from a copy of it with the
//! diff applied, the patched build (only what the diff touches is
//! recompiled, with a section per function and per variable); each
//! recompiled object's original is compiled again from the reference's
//! sources with the same arguments and sections. The two are compared
//! object by object, and the changed functions are written out as a patch
//! object whose references to unchanged code and data are bound to the
//! running binary, with the manifest `apply` takes.
//!
//! `driver.rs` builds, `unit.rs` parses objects, `source.rs` reads the
//! diff, `differ.rs` decides what changed, `target.rs` finds the target's
//! symbols and checks the reference against it, `emit.rs` writes the
//! patch object.

#![forbid(unsafe_code)]

pub mod cxx;
pub mod debian;
pub mod differ;
pub mod driver;
pub mod emit;
pub mod inlined;
pub mod matching;
pub mod reach;
pub mod source;
pub mod target;
pub mod unit;

use differ::Inclusion;
use driver::{CompiledObject, Flags, Wrapper};
use emit::{Binding, PatchFunction};
use shadowpatch_failure::{Classify, FailureClass};
use shadowpatch_patch::manifest::{BoundKind, BoundSymbol, Manifest, Replacement, TargetSpec};
use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::time::Instant;
use target::{SymbolMap, Target};
use unit::Unit;

/// Errors of a build, each one line naming what and where.
#[derive(Debug, thiserror::Error)]
pub enum BuildError {
    #[error("{0}")]
    Input(String),
    #[error("{path}: {source}")]
    Io { path: PathBuf, source: std::io::Error },
    #[error("diff {diff} does not apply: file {file}: {hunk}")]
    DiffDoesNotApply { diff: PathBuf, file: String, hunk: String },
    #[error("build failed: `{command}`: {tail} (log: {log})")]
    BuildFailed {
        command: String,
        tail: String,
        log: PathBuf,
    },
    #[error("the diff changes no function's code{detail}")]
    NoFunctionalChange { detail: String },
    #[error("refused: {symbol}: {reason}")]
    Refused { symbol: String, reason: String },
    #[error("pid {pid}: module {module} not found")]
    ModuleNotFound { pid: i32, module: String },
    #[error("the reference build does not match the running binary: {0}")]
    Mismatch(String),
    #[error("compiler differs: the target was built by {target:?}, this build uses {ours:?} (--allow-compiler-mismatch to go on)")]
    CompilerMismatch { target: String, ours: String },
}

impl BuildError {
    pub fn io(path: &Path, source: std::io::Error) -> BuildError {
        BuildError::Io {
            path: path.to_path_buf(),
            source,
        }
    }
}

impl Classify for BuildError {
    fn class(&self) -> FailureClass {
        // Every build error is about the input (tree, diff, target, tools):
        // nothing of any process was touched.
        FailureClass::BadInput
    }
}

/// What to build and for what.
#[derive(Debug, Clone, Default)]
pub struct BuildRequest {
    pub source: PathBuf,
    pub diffs: Vec<PathBuf>,
    /// A PID or a path.
    pub target: String,
    pub module: Option<String>,
    /// Default: chosen by what the tree is (`driver::default_build_command`).
    pub build_command: Option<String>,
    /// A reference tree already built elsewhere (e.g. a Debian package
    /// built with its own rules): used instead of building one.
    pub reference_tree: Option<PathBuf>,
    pub id: Option<String>,
    pub out: PathBuf,
    pub allow_compiler_mismatch: bool,
    /// Cache of reference and original builds (default
    /// `$XDG_CACHE_HOME/shadowpatch/build`).
    pub cache: Option<PathBuf>,
}

/// A function of the result.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct BuiltFunction {
    /// The name in the target (and the manifest).
    pub symbol: String,
    /// The object file it comes from, relative to the tree.
    pub object: PathBuf,
}

/// The outcome of a build.
#[derive(Debug, Clone, PartialEq, serde::Serialize, serde::Deserialize)]
pub struct Built {
    pub out: PathBuf,
    pub manifest_path: PathBuf,
    pub functions_changed: Vec<BuiltFunction>,
    pub functions_new: Vec<BuiltFunction>,
    pub functions_included_for_inlining: Vec<BuiltFunction>,
    /// Functions that differ only in a line number (ignored).
    pub functions_line_only: Vec<String>,
    pub data_new: Vec<String>,
    pub bindings: Vec<Binding>,
    pub target_build_id: String,
    pub target_module: String,
    /// The reference build's binary's build-id (equal to the target's when
    /// the build is reproducible).
    pub reference_build_id: Option<String>,
    pub reference_cached: bool,
    pub compiler: Option<String>,
    pub build_seconds: f64,
    pub manifest: Manifest,
    pub notes: Vec<String>,
}

/// The steps reported to a progress display.
pub const STEPS: [&str; 6] = [
    "reference build",
    "patched build",
    "original objects",
    "comparing objects",
    "binding to the target",
    "writing the patch",
];

/// Build a patch. `step(i, name)` is called as each of [`STEPS`] starts.
/// Nothing is written to `request.out` unless the whole result is: it is
/// assembled in a temporary folder beside it and renamed into place.
pub fn build(request: &BuildRequest, step: &mut dyn FnMut(usize, &str)) -> Result<Built, BuildError> {
    let started = Instant::now();
    let mut notes = Vec::new();
    if request.out.exists()
        && std::fs::read_dir(&request.out)
            .map(|mut d| d.next().is_some())
            .unwrap_or(true)
    {
        return Err(BuildError::Input(format!(
            "{}: exists and is not empty; choose a new --out",
            request.out.display()
        )));
    }
    if request.diffs.is_empty() {
        return Err(BuildError::Input("no --diff given".into()));
    }
    let source = std::fs::canonicalize(&request.source).map_err(|e| BuildError::io(&request.source, e))?;
    let target = Target::open(&request.target, request.module.as_deref())?;
    refuse_rust(&source, &request.diffs, request.build_command.is_some())?;
    let command = match &request.build_command {
        Some(command) => command.clone(),
        None => driver::default_build_command(&source)?,
    };
    let cache = match &request.cache {
        Some(cache) => cache.clone(),
        None => default_cache(),
    };
    std::fs::create_dir_all(&cache).map_err(|e| BuildError::io(&cache, e))?;
    let cache = std::fs::canonicalize(&cache).map_err(|e| BuildError::io(&cache, e))?;
    let logs = cache.join("logs");
    std::fs::create_dir_all(&logs).map_err(|e| BuildError::io(&logs, e))?;
    let hash = driver::tree_hash(&source, &command)?;

    driver::check_diffs(&source, &request.diffs)?;
    step(0, STEPS[0]);
    let (reference_tree, reference_cached) = match &request.reference_tree {
        Some(tree) => (tree.clone(), true),
        None => cached_build(&cache, &logs, "reference", &hash, &source, &command, Flags::Pristine)?,
    };

    step(1, STEPS[1]);
    let work = tempfile::Builder::new()
        .prefix("patched-")
        .tempdir_in(&cache)
        .map_err(|e| BuildError::io(&cache, e))?;
    let patched_tree = work.path().join("tree");
    // From the reference build, so the build system recompiles only what
    // the diff touches (with sections added by the wrapper).
    driver::copy_tree(&reference_tree, &patched_tree)?;
    let mut diff_text = String::new();
    for diff in &request.diffs {
        driver::apply_diff(&patched_tree, diff)?;
        diff_text.push_str(&std::fs::read_to_string(diff).map_err(|e| BuildError::io(diff, e))?);
        diff_text.push('\n');
    }
    let wrapper = Wrapper::create(&work.path().join("wrapper"), Flags::Sections)?;
    let log = logs.join(format!("patched-{hash}.log"));
    let mut recompiled = wrapper.run(&patched_tree, &command, &log)?;
    let linked = wrapper.linked_into(&patched_tree, &target.name)?;
    if let Some(linked) = &linked {
        // Only the objects of the target's own link (not another program's
        // copy of the same file, compiled with other flags).
        recompiled.retain(|object, _| linked.contains(object));
    }
    // The target's objects the patched build did not recompile: they may
    // hold an old copy of an inline function of a changed header.
    let not_rebuilt: Vec<PathBuf> = match &linked {
        Some(linked) => linked
            .iter()
            .filter(|o| !recompiled.contains_key(*o))
            .cloned()
            .collect(),
        None => original_objects(&reference_tree)
            .into_iter()
            .filter(|o| !recompiled.contains_key(o))
            .collect(),
    };
    if recompiled.is_empty() {
        return Err(BuildError::NoFunctionalChange {
            detail: " (no object was recompiled)".into(),
        });
    }

    step(2, STEPS[2]);
    let originals = compile_originals(
        &recompiled,
        &patched_tree,
        &reference_tree,
        &work.path().join("original"),
        &logs,
        &hash,
    )?;

    step(3, STEPS[3]);
    let changed_lines = source::changed_lines(&diff_text);
    let mut units = Vec::new();
    let mut functions = Vec::new();
    let mut line_only = Vec::new();
    let mut origin_of = Vec::new();
    // Files of the diff that no recompiled object was compiled from:
    // headers (their functions are inline ones, in every includer).
    let headers: Vec<&PathBuf> = changed_lines
        .keys()
        .filter(|file| {
            !recompiled
                .values()
                .any(|c| c.source.ends_with(file) || file.ends_with(&c.source))
        })
        .collect();
    let mut header_touched = source::TouchedFunctions::default();
    for header in &headers {
        let text = std::fs::read_to_string(patched_tree.join(header)).unwrap_or_default();
        header_touched.extend(source::TouchedFunctions::of(&text, &changed_lines[*header]));
    }
    let mut included_globals = std::collections::HashSet::new();
    // Per unit: the functions whose source the diff changed.
    let mut touched_of: Vec<source::TouchedFunctions> = Vec::new();
    let mut cplusplus = false;
    for compiled in recompiled.values() {
        cplusplus |= driver::is_cplusplus(&compiled.source);
        let Some(original_object) = originals.get(&compiled.object) else {
            return Err(BuildError::Refused {
                symbol: compiled.object.display().to_string(),
                reason: "a new source file; add new code to an existing file".into(),
            });
        };
        let original = Unit::open(original_object)?;
        let patched = Unit::open(&patched_tree.join(&compiled.object))?;
        let patched_source = std::fs::read_to_string(patched_tree.join(&compiled.source)).unwrap_or_default();
        let mut touched = source::lines_for(&changed_lines, &compiled.source)
            .map(|lines| source::TouchedFunctions::of(&patched_source, lines))
            .unwrap_or_default();
        touched.extend(header_touched.clone());
        let diff = differ::diff_units(&original, &patched, &touched).map_err(demangled_error)?;
        line_only.extend(diff.line_only.iter().map(|name| cxx::demangle(name)));
        let unit_index = units.len();
        let with_lsda = patched.sections_with_lsda();
        for included in diff.functions {
            let symbol = &patched.symbols[included.symbol];
            if symbol.section.is_some_and(|s| with_lsda.contains(&s)) {
                return Err(BuildError::Refused {
                    symbol: cxx::demangle(&symbol.name),
                    reason: "has exception handling (landing pads in .gcc_except_table: a catch, or destructors run while an exception unwinds); patch code has no unwind table registered in the target, so they would never run: keep try/catch and objects with destructors out of the changed code, or write the patch by hand".into(),
                });
            }
            let comdat = patched.comdat_of(symbol).is_some();
            if comdat && included.inclusion != Inclusion::New && !headers.is_empty() && !not_rebuilt.is_empty() {
                return Err(BuildError::Refused {
                    symbol: cxx::demangle(&symbol.name),
                    reason: format!(
                        "an inline function or template instance (COMDAT group) changed through {}, and {} of the target's objects were not rebuilt ({}): they may hold the old version inlined; rebuild every includer (header dependencies in the build) or move the change out of the header",
                        headers.iter().map(|h| h.display().to_string()).collect::<Vec<_>>().join(", "),
                        not_rebuilt.len(),
                        not_rebuilt.iter().take(3).map(|o| o.display().to_string()).collect::<Vec<_>>().join(", ")
                    ),
                });
            }
            // A COMDAT instance compiled into several objects is one
            // function of the target: replaced once.
            if symbol.global && !included_globals.insert(symbol.name.clone()) {
                continue;
            }
            functions.push(PatchFunction {
                unit: unit_index,
                symbol: included.symbol,
                inclusion: included.inclusion,
            });
        }
        units.push(patched);
        touched_of.push(touched);
        origin_of.push(compiled.clone());
    }
    if cplusplus && functions.iter().any(|f| f.inclusion != Inclusion::New) {
        notes.push(
            "C++: patch code has no unwind table registered in the target: an exception thrown through a replaced function (by a function it calls) ends the process in std::terminate"
                .into(),
        );
    }
    if functions.is_empty() {
        let detail = if line_only.is_empty() {
            String::new()
        } else {
            format!(" (only line numbers changed in {})", line_only.join(", "))
        };
        return Err(BuildError::NoFunctionalChange { detail });
    }

    step(4, STEPS[4]);
    let reference_binary = find_reference_binary(&reference_tree, &target)?;
    let reference_bytes = reference_binary
        .as_ref()
        .map(|path| std::fs::read(path).map_err(|e| BuildError::io(path, e)))
        .transpose()?;
    let reference_build_id = reference_bytes.as_deref().and_then(target::build_id_of);
    let symbols = SymbolMap::for_target(&target, reference_bytes.as_deref()).ok_or_else(|| {
        BuildError::Mismatch(format!(
            "{} has no symbol table, no debug file is installed for build-id {}, and no function of the reference build's binary{} matches its code",
            target.name,
            target.build_id,
            reference_build_id.as_deref().map(|id| format!(" ({id})")).unwrap_or_default()
        ))
    })?;
    let compiler = units.iter().find_map(|u| u.producer.clone());
    check_compiler(
        &target,
        compiler.as_deref(),
        request.allow_compiler_mismatch,
        &mut notes,
    )?;
    // Each replaced function: the running code must be the reference
    // build's, relocation-masked.
    let reference_symbols = reference_bytes
        .as_deref()
        .and_then(|bytes| SymbolMap::of_file(bytes, target::SymbolOrigin::ReferenceBuild));
    for function in functions.iter().filter(|f| f.inclusion != Inclusion::New) {
        let unit = &units[function.unit];
        let symbol = &unit.symbols[function.symbol];
        let file = (!symbol.global).then_some(unit.file.as_str());
        let running = symbols.find(&symbol.name, file).map_err(|why| {
            BuildError::Mismatch(format!(
                "{} ({}): {why} in {}",
                cxx::demangle(&symbol.name),
                unit.file,
                target.name
            ))
        })?;
        let running_code = target::bytes_at(&target.bytes, running.address, running.size).unwrap_or(&[]);
        let reference = reference_symbols.as_ref().and_then(|m| m.find(&symbol.name, file).ok());
        let (Some(reference), Some(reference_bytes)) = (reference, reference_bytes.as_deref()) else {
            return Err(BuildError::Mismatch(format!(
                "{} is not in the reference build's binary",
                cxx::demangle(&symbol.name)
            )));
        };
        let reference_code = target::bytes_at(reference_bytes, reference.address, reference.size).unwrap_or(&[]);
        if !target::same_code_masked(reference_code, reference.address, running_code, running.address) {
            return Err(BuildError::Mismatch(format!(
                "{} differs from the running function at {:#x}: the running binary was not built from this source with these flags",
                cxx::demangle(&symbol.name),
                running.address
            )));
        }
    }

    step(5, STEPS[5]);
    let parent = request
        .out
        .parent()
        .filter(|p| !p.as_os_str().is_empty())
        .unwrap_or(Path::new("."));
    std::fs::create_dir_all(parent).map_err(|e| BuildError::io(parent, e))?;
    let staging = tempfile::Builder::new()
        .prefix(".shadowpatch-build-")
        .tempdir_in(parent)
        .map_err(|e| BuildError::io(parent, e))?;
    let emitted = emit::emit(
        &units,
        &functions,
        &symbols,
        &work.path().join("patch.o"),
        &staging.path().join("patch.so"),
    )?;
    let id = request.id.clone().unwrap_or_else(|| default_id(&request.diffs[0]));
    let mut bound: Vec<BoundSymbol> = emitted
        .bindings
        .values()
        .map(|b| BoundSymbol {
            name: b.symbol.clone(),
            address: b.address,
            size: b.size,
            kind: if b.function {
                BoundKind::Function
            } else {
                BoundKind::Object
            },
        })
        .collect();
    let mut replacements = Vec::new();
    let mut roots = Vec::new();
    // Each unit carrying inlined changes, linked alone once.
    let mut linked_units: std::collections::HashMap<usize, Result<inlined::LinkedUnit, String>> =
        std::collections::HashMap::new();
    for (function, (name, with)) in functions
        .iter()
        .filter(|f| f.inclusion != Inclusion::New)
        .zip(&emitted.names)
    {
        let unit = &units[function.unit];
        let symbol = &unit.symbols[function.symbol];
        if symbol.name.contains(".cold") {
            continue;
        }
        let file = (!symbol.global).then_some(unit.file.as_str());
        let running = symbols.find(&symbol.name, file).map_err(BuildError::Mismatch)?;
        roots.push(running.address);
        if !bound.iter().any(|b| &b.name == name) {
            bound.push(BoundSymbol {
                name: name.clone(),
                address: running.address,
                size: running.size,
                kind: BoundKind::Function,
            });
        }
        // A function carrying only inlined changed code: where that code
        // is, so that a simulated call that never runs it is not taken as
        // evidence about the change.
        let changed_code = if function.inclusion == Inclusion::Inlined {
            let linked = linked_units
                .entry(function.unit)
                .or_insert_with(|| inlined::LinkedUnit::link(&unit.path, &touched_of[function.unit], work.path()));
            match linked
                .as_ref()
                .map_err(Clone::clone)
                .and_then(|l| l.changed_code(&symbol.name))
            {
                Ok(ranges) if !ranges.is_empty() => ranges,
                Ok(_) => {
                    notes.push(format!(
                        "{name}: no inlined code of a changed function found in its debug information; every simulated call of it counts as running the change"
                    ));
                    Vec::new()
                }
                Err(why) => {
                    notes.push(format!(
                        "{name}: where the inlined change is was not found ({why}); every simulated call of it counts as running the change"
                    ));
                    Vec::new()
                }
            }
        } else {
            Vec::new()
        };
        replacements.push(Replacement {
            symbol: name.clone(),
            with: with.clone(),
            behaviour: Default::default(),
            expect: Vec::new(),
            changed_code,
        });
    }
    if symbols.origin != target::SymbolOrigin::TargetSymtab {
        reach::bind_reached(&mut bound, &target.bytes, &symbols, &roots);
    }
    bound.sort_by(|a, b| a.name.cmp(&b.name));
    let manifest = Manifest {
        id,
        object: PathBuf::from("patch.so"),
        target: TargetSpec {
            build_id: target.build_id.clone(),
            module: Some(target.name.clone()),
        },
        replacements,
        description: Some(format!(
            "built by shadowpatch build from {}",
            request
                .diffs
                .iter()
                .map(|d| d.file_name().unwrap_or_default().to_string_lossy().into_owned())
                .collect::<Vec<_>>()
                .join(", ")
        )),
        symbols: bound,
    };
    let text = toml::to_string(&manifest).map_err(|e| BuildError::Input(format!("manifest: {e}")))?;
    Manifest::parse(&text).map_err(|e| BuildError::Input(format!("the manifest written is invalid: {e}")))?;
    std::fs::write(staging.path().join("manifest.toml"), &text)
        .map_err(|e| BuildError::io(&staging.path().join("manifest.toml"), e))?;
    // The same checks apply makes of the object.
    shadowpatch_patch::object::PatchObject::load(&staging.path().join("patch.so"))
        .map_err(|e| BuildError::Input(format!("the patch object built is not loadable: {e}")))?;
    if request.out.exists() {
        std::fs::remove_dir(&request.out).map_err(|e| BuildError::io(&request.out, e))?;
    }
    let staged = staging.keep();
    std::fs::rename(&staged, &request.out).map_err(|e| BuildError::io(&request.out, e))?;

    let list = |wanted: Inclusion| -> Vec<BuiltFunction> {
        functions
            .iter()
            .filter(|f| f.inclusion == wanted)
            .map(|f| BuiltFunction {
                symbol: emit::public_name(&units[f.unit], f.symbol),
                object: origin_of[f.unit].object.clone(),
            })
            .collect()
    };
    if reference_build_id.as_deref() != Some(target.build_id.as_str()) {
        notes.push(format!(
            "the reference build's binary has build-id {}, the target {}: replaced functions were checked against the running code one by one",
            reference_build_id.as_deref().unwrap_or("(none)"),
            target.build_id
        ));
    }
    Ok(Built {
        out: request.out.clone(),
        manifest_path: request.out.join("manifest.toml"),
        functions_changed: list(Inclusion::Changed),
        functions_new: list(Inclusion::New),
        functions_included_for_inlining: list(Inclusion::Inlined),
        functions_line_only: line_only,
        data_new: emitted.new_data,
        bindings: emitted.bindings.into_values().collect(),
        target_build_id: target.build_id.clone(),
        target_module: target.name.clone(),
        reference_build_id,
        reference_cached,
        compiler,
        build_seconds: started.elapsed().as_secs_f64(),
        manifest,
        notes,
    })
}

/// A refusal names the symbol as people read it (C++ demangled).
fn demangled_error(error: BuildError) -> BuildError {
    match error {
        BuildError::Refused { symbol, reason } => BuildError::Refused {
            symbol: cxx::demangle(&symbol),
            reason,
        },
        other => other,
    }
}

/// The original of each object the patched build recompiled: compiled
/// again from the reference tree's sources with the same arguments and
/// sections added, into `folder` (see [`driver::recompile`]), a few at a
/// time. A source the reference tree lacks (a new file) has none.
fn compile_originals(
    recompiled: &BTreeMap<PathBuf, CompiledObject>,
    patched_tree: &Path,
    reference_tree: &Path,
    folder: &Path,
    logs: &Path,
    hash: &str,
) -> Result<BTreeMap<PathBuf, PathBuf>, BuildError> {
    std::fs::create_dir_all(folder).map_err(|e| BuildError::io(folder, e))?;
    let jobs: Vec<(usize, &CompiledObject)> = recompiled
        .values()
        .filter(|c| reference_tree.join(&c.source).is_file())
        .enumerate()
        .collect();
    let workers = std::thread::available_parallelism()
        .map_or(2, |n| n.get())
        .min(jobs.len().max(1));
    let results: Vec<Result<(PathBuf, PathBuf), BuildError>> = std::thread::scope(|scope| {
        let handles: Vec<_> = (0..workers)
            .map(|worker| {
                let jobs = &jobs;
                scope.spawn(move || {
                    jobs.iter()
                        .skip(worker)
                        .step_by(workers)
                        .map(|(index, compiled)| {
                            let output = folder.join(format!("{index}.o"));
                            let log = logs.join(format!("original-{hash}-{index}.log"));
                            driver::recompile(compiled, patched_tree, reference_tree, &output, Flags::Sections, &log)?;
                            Ok((compiled.object.clone(), output))
                        })
                        .collect::<Vec<_>>()
                })
            })
            .collect();
        handles
            .into_iter()
            .flat_map(|h| h.join().expect("an original compile thread does not panic"))
            .collect()
    });
    results.into_iter().collect()
}

/// The objects a (cached) build compiled, from its `objects.json`.
fn original_objects(tree: &Path) -> Vec<PathBuf> {
    let Some(folder) = tree.parent() else { return Vec::new() };
    std::fs::read(folder.join("objects.json"))
        .ok()
        .and_then(|bytes| serde_json::from_slice::<Vec<CompiledObject>>(&bytes).ok())
        .map(|objects| objects.into_iter().map(|o| o.object).collect())
        .unwrap_or_default()
}

fn default_cache() -> PathBuf {
    if let Some(dir) = std::env::var_os("XDG_CACHE_HOME").filter(|d| !d.is_empty()) {
        return PathBuf::from(dir).join("shadowpatch/build");
    }
    match std::env::var_os("HOME") {
        Some(home) => PathBuf::from(home).join(".cache/shadowpatch/build"),
        None => std::env::temp_dir().join("shadowpatch-build"),
    }
}

fn default_id(diff: &Path) -> String {
    let stem = diff.file_stem().unwrap_or_default().to_string_lossy();
    let id: String = stem
        .chars()
        .map(|c| {
            if c.is_ascii_alphanumeric() || "-_.".contains(c) {
                c
            } else {
                '-'
            }
        })
        .take(64)
        .collect();
    if id.is_empty() {
        "built".into()
    } else {
        id
    }
}

/// A build of `source` with `flags`, cached under `cache/<stage>-<hash>`:
/// the tree after the build and the objects it compiled. Returns the tree
/// and whether it came from the cache.
fn cached_build(
    cache: &Path,
    logs: &Path,
    stage: &str,
    hash: &str,
    source: &Path,
    command: &str,
    flags: Flags,
) -> Result<(PathBuf, bool), BuildError> {
    let folder = cache.join(format!("{stage}-{hash}"));
    let done = folder.join("objects.json");
    if done.is_file() {
        return Ok((folder.join("tree"), true));
    }
    let work = tempfile::Builder::new()
        .prefix(&format!(".{stage}-"))
        .tempdir_in(cache)
        .map_err(|e| BuildError::io(cache, e))?;
    let tree = work.path().join("tree");
    driver::copy_tree(source, &tree)?;
    driver::touch_sources(&tree)?;
    let wrapper = Wrapper::create(&work.path().join("wrapper"), flags)?;
    let log = logs.join(format!("{stage}-{hash}.log"));
    let objects: BTreeMap<PathBuf, CompiledObject> = wrapper.run(&tree, command, &log)?;
    if objects.is_empty() {
        return Err(BuildError::Input(format!(
            "`{command}` compiled no object through the compiler wrapper (does the build honour CC or call gcc/cc by name? log: {})",
            log.display()
        )));
    }
    let json = serde_json::to_vec_pretty(&objects.values().collect::<Vec<_>>())
        .map_err(|e| BuildError::Input(format!("objects list: {e}")))?;
    std::fs::write(work.path().join("objects.json"), json)
        .map_err(|e| BuildError::io(&work.path().join("objects.json"), e))?;
    // A finished build takes its place in one rename; a concurrent build of
    // the same tree that finished first wins and this one is dropped.
    let kept = work.keep();
    if std::fs::rename(&kept, &folder).is_err() {
        let _ = std::fs::remove_dir_all(&kept);
    }
    Ok((folder.join("tree"), false))
}

/// The binary of the reference tree that is the target: its build-id
/// first, else its file name, else the tree's only linked binary.
fn find_reference_binary(tree: &Path, target: &Target) -> Result<Option<PathBuf>, BuildError> {
    let mut by_name = None;
    let mut linked = Vec::new();
    let mut stack = vec![tree.to_path_buf()];
    while let Some(dir) = stack.pop() {
        let Ok(entries) = std::fs::read_dir(&dir) else { continue };
        for entry in entries.flatten() {
            let path = entry.path();
            let Ok(kind) = entry.file_type() else { continue };
            if kind.is_dir() {
                stack.push(path);
                continue;
            }
            if !kind.is_file() {
                continue;
            }
            let mut head = [0u8; 18];
            let is_linked_elf = std::fs::File::open(&path)
                .and_then(|mut f| std::io::Read::read_exact(&mut f, &mut head))
                .is_ok()
                && &head[..4] == b"\x7fELF"
                && matches!(u16::from_le_bytes([head[16], head[17]]), 2 | 3);
            if !is_linked_elf {
                continue;
            }
            let Ok(bytes) = std::fs::read(&path) else { continue };
            if target::build_id_of(&bytes).as_deref() == Some(target.build_id.as_str()) {
                return Ok(Some(path));
            }
            if path.file_name().is_some_and(|n| n.to_string_lossy() == target.name) {
                by_name = Some(path.clone());
            }
            linked.push(path);
        }
    }
    if by_name.is_none() && linked.len() == 1 {
        return Ok(linked.pop());
    }
    Ok(by_name)
}

/// Rust is refused in one line before anything is built: rustc goes
/// through no CC wrapper, its codegen units and generic instances cross
/// crate and file boundaries, and its symbol names carry a hash of the
/// crate's build, so a patched rebuild neither records its objects nor
/// names its functions as the running binary does. The signs: a diff of
/// a `.rs` file, or a Cargo tree when no build command is given (the C
/// part of a mixed tree builds with `--build-cmd`).
fn refuse_rust(source: &Path, diffs: &[PathBuf], build_command_given: bool) -> Result<(), BuildError> {
    let advice = "build makes patches of C and C++ code only; write a Rust patch by hand as a #![no_std] cdylib exporting #[no_mangle] extern \"C\" replacements (docs/writing-patches.md)";
    for diff in diffs {
        let text = std::fs::read_to_string(diff).unwrap_or_default();
        let rust_file = text
            .lines()
            .filter_map(|line| line.strip_prefix("+++ "))
            .map(|name| name.split('\t').next().unwrap_or(name).trim())
            .find(|name| name.ends_with(".rs"));
        if let Some(file) = rust_file {
            return Err(BuildError::Input(format!(
                "{}: changes the Rust file {file}: {advice}",
                diff.display()
            )));
        }
    }
    if source.join("Cargo.toml").is_file() && !build_command_given {
        return Err(BuildError::Input(format!(
            "{}: a Cargo tree: {advice}, or give --build-cmd for the C part of a mixed tree",
            source.display()
        )));
    }
    Ok(())
}

/// The compiler of the patch's objects against the target's `.comment`.
fn check_compiler(target: &Target, ours: Option<&str>, allow: bool, notes: &mut Vec<String>) -> Result<(), BuildError> {
    let (Some(theirs), Some(ours)) = (target.comment(), ours) else {
        notes.push("the target names no compiler (.comment stripped): the compiler was not checked".into());
        return Ok(());
    };
    let same = ours.split("; ").all(|compiler| theirs.contains(compiler));
    if same {
        return Ok(());
    }
    if allow {
        notes.push(format!("compiler differs (allowed): target {theirs:?}, build {ours:?}"));
        return Ok(());
    }
    Err(BuildError::CompilerMismatch {
        target: theirs,
        ours: ours.to_string(),
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn target_with_comment(comment: Option<&str>) -> Target {
        // A relocatable object with (or without) a `.comment` section.
        let mut object = object::write::Object::new(
            object::BinaryFormat::Elf,
            object::Architecture::X86_64,
            object::Endianness::Little,
        );
        if let Some(comment) = comment {
            let section = object.add_section(Vec::new(), b".comment".to_vec(), object::SectionKind::OtherString);
            object
                .section_mut(section)
                .set_data(format!("{comment}\0").into_bytes(), 1);
        }
        Target {
            name: "t".into(),
            path: PathBuf::from("t"),
            build_id: "00".into(),
            bytes: object.write().unwrap(),
            pid: None,
        }
    }

    #[test]
    fn another_compiler_is_refused_unless_allowed() {
        let ours = "GCC: (Debian 12.2.0-14+deb12u1) 12.2.0";
        let mut notes = Vec::new();
        let same = target_with_comment(Some(ours));
        assert!(check_compiler(&same, Some(ours), false, &mut notes).is_ok());
        let other = target_with_comment(Some("GCC: (Debian 13.2.0-4) 13.2.0"));
        let error = check_compiler(&other, Some(ours), false, &mut notes).unwrap_err();
        assert!(error.to_string().contains("--allow-compiler-mismatch"), "{error}");
        assert!(check_compiler(&other, Some(ours), true, &mut notes).is_ok());
        assert!(notes.iter().any(|n| n.contains("compiler differs (allowed)")));
        let stripped = target_with_comment(None);
        assert!(check_compiler(&stripped, Some(ours), false, &mut notes).is_ok());
        assert!(notes.iter().any(|n| n.contains("not checked")));
    }
}
