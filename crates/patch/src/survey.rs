//! The survey: every check `apply` makes without writing to the target —
//! manifest, patch object, the module by build-id (and its name hint),
//! each entry's patchability, the registers a replacement clobbers —
//! gathered without stopping at the first problem. `prepare` turns a
//! clean survey into the [`Prepared`] value the transaction acts on; the
//! prediction engine reports every problem as a finding.

use crate::clobber::{clobbered, CodeSource, RegisterSet};
use crate::manifest::PatchInput;
use crate::object::{DefinedSymbol, PatchObject};
use crate::trampoline::{examine_site, EntryProblem, FunctionSite};
use crate::{Manifest, PatchError};
use shadowpatch_process::maps::read_maps;
use shadowpatch_process::ProcessIdentity;
use shadowpatch_symbols::{modules_of, Module};
use std::path::{Path, PathBuf};

/// The target module's functions, read live, with the entries that active
/// patches rewrote shown as they were originally (callers were compiled
/// against the original code, so that is what the analysis must see).
pub struct ModuleCode<'a> {
    pub module: &'a Module,
    pub memory: &'a mut shadowpatch_process::TargetMemory,
    pub originals: &'a [(u64, Vec<u8>)],
}

impl std::fmt::Debug for ModuleCode<'_> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ModuleCode").field("module", &self.module.name).finish()
    }
}

impl CodeSource for ModuleCode<'_> {
    fn function_at(&mut self, address: u64) -> Option<(u64, Vec<u8>)> {
        let (symbol, _) = self.module.symbolize(address)?;
        if symbol.kind != shadowpatch_symbols::SymbolKind::Function || symbol.size == 0 || symbol.size > 1 << 20 {
            return None;
        }
        let start = symbol.address + self.module.bias;
        let mut bytes = self.memory.read_vec(start, symbol.size as usize).ok()?;
        overlay_originals(start, &mut bytes, self.originals);
        Some((start, bytes))
    }
}

/// Put back, in `bytes` read at `start`, the original bytes of entries
/// that active patches rewrote.
pub fn overlay_originals(start: u64, bytes: &mut [u8], originals: &[(u64, Vec<u8>)]) {
    for (at, original) in originals {
        if *at >= start && at + (original.len() as u64) <= start + bytes.len() as u64 {
            let offset = (at - start) as usize;
            bytes[offset..offset + original.len()].copy_from_slice(original);
        }
    }
}

/// Entries rewritten by the active patches, as they were before the first
/// patch: `(address, original bytes)`.
pub fn originals_of(journal_state: &crate::journal::JournalState) -> Vec<(u64, Vec<u8>)> {
    let mut originals: Vec<(u64, Vec<u8>)> = Vec::new();
    for patch in &journal_state.active {
        for f in &patch.functions {
            if !originals.iter().any(|(at, _)| *at == f.write.address) {
                originals.push((f.write.address, f.write.original.clone()));
            }
        }
    }
    originals
}

/// The patch object's own functions (object addresses, before relocation:
/// only direct, PC-relative branches are followed, which need none).
#[derive(Debug)]
pub struct ObjectCode<'a> {
    pub object: &'a PatchObject,
    pub image: Vec<u8>,
}

impl<'a> ObjectCode<'a> {
    pub fn new(object: &'a PatchObject) -> Self {
        ObjectCode {
            object,
            image: object.initial_image(),
        }
    }
}

impl CodeSource for ObjectCode<'_> {
    fn function_at(&mut self, address: u64) -> Option<(u64, Vec<u8>)> {
        let symbol = self
            .object
            .symbols
            .values()
            .find(|s| s.function && s.size > 0 && (s.address..s.address + s.size).contains(&address))?;
        let bytes = self
            .image
            .get(symbol.address as usize..(symbol.address + symbol.size) as usize)?;
        Some((symbol.address, bytes.to_vec()))
    }
}

/// How deep the register analysis follows calls.
pub const CLOBBER_DEPTH: u32 = 8;

/// What was checked before touching the target: every fact apply acts on.
#[derive(Debug)]
pub struct Prepared {
    pub manifest: Manifest,
    pub manifest_path: PathBuf,
    pub object: PatchObject,
    pub identity: ProcessIdentity,
    pub module: Module,
    pub modules: Vec<Module>,
    pub maps: Vec<shadowpatch_process::Mapping>,
    /// Per replacement: where the jump goes, and the new function's name.
    pub sites: Vec<(FunctionSite, String)>,
    /// Per replacement: registers the new function changes that the
    /// original did not (empty: jump straight to the new function).
    pub extra: Vec<RegisterSet>,
    /// The entries active patches had rewritten when this was surveyed,
    /// as they were originally: the transaction checks they still are.
    pub originals: Vec<(u64, Vec<u8>)>,
    /// Said to the user, never a refusal (e.g. a module-name hint that
    /// names another file than the one with the build-id).
    pub warnings: Vec<String>,
}

/// One `[[replace]]` entry as the survey found it.
#[derive(Debug, Clone)]
pub struct SurveyedReplacement {
    pub symbol: String,
    pub with: String,
    /// The target function, when it was found (even if unpatchable).
    pub site: Option<FunctionSite>,
    /// Why a jump cannot be written at its entry (empty: it can).
    pub entry_problems: Vec<EntryProblem>,
    /// The new function in the patch object, when it exists.
    pub new_function: Option<DefinedSymbol>,
    /// Registers the new function changes that the original did not;
    /// `None` when either side is unknown.
    pub extra: Option<RegisterSet>,
}

/// Everything apply checks without writing to the target, gathered without
/// stopping at the first problem: `prepare` turns the first problem into
/// apply's error, the prediction engine reports them all.
#[derive(Debug)]
pub struct Survey {
    pub manifest: Manifest,
    pub manifest_path: PathBuf,
    pub object_path: PathBuf,
    /// The object's bytes as read (kept for [`Survey::again`] when the
    /// object could not be loaded).
    pub object_bytes: std::sync::Arc<[u8]>,
    pub identity: ProcessIdentity,
    pub maps: Vec<shadowpatch_process::Mapping>,
    pub modules: Vec<Module>,
    /// `None` when the object uses an unsupported feature (see `problems`).
    pub object: Option<PatchObject>,
    /// The module whose build-id the manifest names, if loaded.
    pub module: Option<Module>,
    pub replacements: Vec<SurveyedReplacement>,
    /// Every problem, in the order apply meets them.
    pub problems: Vec<PatchError>,
    /// What the user is told without a refusal.
    pub warnings: Vec<String>,
    /// The entries rewritten by active patches this survey saw.
    pub originals: Vec<(u64, Vec<u8>)>,
}

/// Survey a patch against process `pid`. Errors (rather than problems)
/// are what leaves nothing to survey: an unreadable or malformed manifest
/// or object, a process that is gone or cannot be read.
pub fn survey(pid: i32, manifest_path: &Path, originals: &[(u64, Vec<u8>)]) -> Result<Survey, PatchError> {
    survey_input(pid, &PatchInput::read(manifest_path)?, originals)
}

/// [`survey`] of a patch already read (the operations layer reads it once).
pub fn survey_input(pid: i32, input: &PatchInput, originals: &[(u64, Vec<u8>)]) -> Result<Survey, PatchError> {
    survey_input_of(&ProcessIdentity::of(pid)?, input, originals)
}

/// [`survey_input`] of a process whose identity the caller has just read
/// (an apply reads it once and passes it down).
pub fn survey_input_of(
    identity: &ProcessIdentity,
    input: &PatchInput,
    originals: &[(u64, Vec<u8>)],
) -> Result<Survey, PatchError> {
    survey_parsed(
        Whom::Known(identity.clone()),
        input.manifest.clone(),
        &input.manifest_path,
        &input.object_path,
        input.object_bytes.clone(),
        originals,
    )
}

/// Whose memory a survey reads: a pid to identify, or an identity just read.
enum Whom {
    Pid(i32),
    Known(ProcessIdentity),
}

impl Survey {
    /// Survey the same parsed patch again with other active patches'
    /// originals (read under the target's lock): the target is read again,
    /// the patch files are not.
    pub fn again(&self, originals: &[(u64, Vec<u8>)]) -> Result<Survey, PatchError> {
        survey_parsed(
            Whom::Pid(self.identity.pid),
            self.manifest.clone(),
            &self.manifest_path,
            &self.object_path,
            self.object_bytes.clone(),
            originals,
        )
    }
}

/// A stale [`Prepared`] surveyed again from its parsed manifest and the
/// object bytes it holds.
pub fn survey_prepared(prepared: Prepared, originals: &[(u64, Vec<u8>)]) -> Result<Survey, PatchError> {
    survey_parsed(
        Whom::Pid(prepared.identity.pid),
        prepared.manifest,
        &prepared.manifest_path,
        &prepared.object.path,
        prepared.object.bytes.into(),
        originals,
    )
}

/// The survey proper, of a parsed manifest and the object's bytes.
fn survey_parsed(
    whom: Whom,
    manifest: Manifest,
    manifest_path: &Path,
    object_path: &Path,
    object_bytes: std::sync::Arc<[u8]>,
    originals: &[(u64, Vec<u8>)],
) -> Result<Survey, PatchError> {
    let mut problems = Vec::new();
    let mut warnings = Vec::new();
    let object = match PatchObject::parse(object_path, object_bytes.to_vec()) {
        Ok(object) => Some(object),
        Err(unsupported @ PatchError::Unsupported { .. }) => {
            problems.push(unsupported);
            None
        }
        Err(other) => return Err(other),
    };
    let mut replacements: Vec<SurveyedReplacement> = manifest
        .replacements
        .iter()
        .map(|r| SurveyedReplacement {
            symbol: r.symbol.clone(),
            with: r.with.clone(),
            site: None,
            entry_problems: Vec::new(),
            new_function: None,
            extra: None,
        })
        .collect();
    if let Some(object) = &object {
        for (replacement, declared) in replacements.iter_mut().zip(&manifest.replacements) {
            match object.function(&replacement.with) {
                Ok(function) => {
                    if let Some(range) = declared
                        .changed_code
                        .iter()
                        .find(|range| range.offset + range.size > function.size)
                    {
                        problems.push(PatchError::Manifest {
                            path: manifest_path.to_path_buf(),
                            message: format!(
                                "replace {}: changed_code of {} ends at offset {:#x}, past the end of {} ({:#x} bytes)",
                                replacement.symbol,
                                range.function,
                                range.offset + range.size,
                                replacement.with,
                                function.size
                            ),
                        });
                    }
                    replacement.new_function = Some(function.clone());
                }
                Err(problem) => problems.push(problem),
            }
        }
    }
    let identity = match whom {
        Whom::Pid(pid) => ProcessIdentity::of(pid)?,
        Whom::Known(identity) => identity,
    };
    let pid = identity.pid;
    let maps = read_maps(pid)?;
    let modules = modules_of(pid, &maps)?;
    let module = match find_target_module(pid, &manifest, &modules) {
        Ok((module, warning)) => {
            warnings.extend(warning);
            Some(module.with_symbols(manifest.bound_symbols()))
        }
        Err(problem) => {
            problems.push(problem);
            None
        }
    };
    if let Some(module) = &module {
        let mut memory = shadowpatch_process::TargetMemory::open(&identity)?;
        for replacement in &mut replacements {
            let mut read = |address: u64, len: usize| memory.read_vec(address, len).map_err(PatchError::from);
            match examine_site(module, &replacement.symbol, &mut read) {
                Ok(examined) => {
                    problems.extend(
                        examined
                            .problems
                            .iter()
                            .map(|p| p.clone().into_error(&replacement.symbol, examined.site.entry)),
                    );
                    replacement.site = Some(examined.site);
                    replacement.entry_problems = examined.problems;
                }
                Err(PatchError::Target(error)) => return Err(PatchError::Target(error)),
                Err(problem) => problems.push(problem),
            }
        }
        if let Some(object) = &object {
            let mut object_code = ObjectCode::new(object);
            for replacement in &mut replacements {
                let (Some(site), Some(new)) = (&replacement.site, &replacement.new_function) else {
                    continue;
                };
                let mut module_code = ModuleCode {
                    module,
                    memory: &mut memory,
                    originals,
                };
                let old = clobbered(&mut module_code, site.entry, CLOBBER_DEPTH);
                let new = clobbered(&mut object_code, new.address, CLOBBER_DEPTH);
                replacement.extra = Some(new.minus(old));
            }
        }
    }
    Ok(Survey {
        manifest,
        manifest_path: manifest_path.to_path_buf(),
        object_path: object_path.to_path_buf(),
        object_bytes,
        identity,
        maps,
        modules,
        object,
        module,
        replacements,
        problems,
        warnings,
        originals: originals.to_vec(),
    })
}

/// The modules a build-id mismatch lists: those the manifest's module hint
/// names, else every mapped module (a hint that names none of them says so:
/// an empty list would hide what is there).
fn available_modules(hint: Option<&str>, modules: &[Module]) -> String {
    let describe = |m: &Module| format!("{} {}", m.name, m.build_id_hex().unwrap_or_else(|| "(none)".into()));
    let named: Vec<String> = modules
        .iter()
        .filter(|m| hint.is_none_or(|hint| m.matches_name(hint)))
        .map(describe)
        .collect();
    if !named.is_empty() {
        return named.join(", ");
    }
    let all: Vec<String> = modules.iter().map(describe).collect();
    let all = if all.is_empty() {
        "none mapped".to_string()
    } else {
        all.join(", ")
    };
    match hint {
        Some(hint) => format!("none named {hint}; mapped: {all}"),
        None => all,
    }
}

/// The loaded module with the manifest's build-id. The build-id is the
/// identity; the manifest's optional module-name hint is checked with
/// [`Module::matches_name`] (file name, name without version, soname, the
/// command the main executable was started as), and a hint that names
/// another file is a warning naming the real one, never a refusal.
pub fn find_target_module(
    pid: i32,
    manifest: &Manifest,
    modules: &[Module],
) -> Result<(Module, Option<String>), PatchError> {
    let wanted = manifest.build_id_lowercase();
    let module = modules
        .iter()
        .find(|m| m.build_id_hex().as_deref() == Some(wanted.as_str()))
        .cloned()
        .ok_or_else(|| PatchError::BuildIdMismatch {
            pid,
            wanted: wanted.clone(),
            available: available_modules(manifest.target.module.as_deref(), modules),
        })?;
    let warning = match &manifest.target.module {
        Some(hint) if !module.matches_name(hint) => Some(
            PatchError::ModuleHint {
                hint: hint.clone(),
                module: module.name.clone(),
                path: module.path.display().to_string(),
            }
            .to_string(),
        ),
        _ => None,
    };
    Ok((module, warning))
}

/// Everything apply checks without writing to the target, failing on the
/// first problem: used by `apply`, and as the floor the prediction
/// engine's static analysis is measured against.
pub fn prepare(pid: i32, manifest_path: &Path, originals: &[(u64, Vec<u8>)]) -> Result<Prepared, PatchError> {
    prepare_survey(survey(pid, manifest_path, originals)?)
}

/// A survey without problems as the [`Prepared`] value the transaction
/// acts on; the first problem, as apply's error, otherwise.
pub fn prepare_survey(survey: Survey) -> Result<Prepared, PatchError> {
    if let Some(first) = survey.problems.into_iter().next() {
        return Err(first);
    }
    let (Some(object), Some(module)) = (survey.object, survey.module) else {
        unreachable!("a survey without problems has its object and module");
    };
    let mut sites = Vec::new();
    let mut extra = Vec::new();
    for replacement in survey.replacements {
        let (Some(site), Some(registers)) = (replacement.site, replacement.extra) else {
            unreachable!("a survey without problems planned every site");
        };
        sites.push((site, replacement.with));
        extra.push(registers);
    }
    Ok(Prepared {
        manifest: survey.manifest,
        manifest_path: survey.manifest_path,
        object,
        identity: survey.identity,
        module,
        modules: survey.modules,
        maps: survey.maps,
        sites,
        extra,
        originals: survey.originals,
        warnings: survey.warnings,
    })
}
