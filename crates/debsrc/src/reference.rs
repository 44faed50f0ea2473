//! The reference build: the package's own `debian/rules build`, run by
//! `dpkg-buildpackage -T build` (so dpkg-buildflags, the build profile and
//! SOURCE_DATE_EPOCH are set exactly as for a package build) in a copy of
//! the source tree, with `DEB_BUILD_OPTIONS=nocheck` and the caller's
//! extra environment (a compiler wrapper as CC/CXX). The `build` target
//! stops before `dh_strip`, so the binaries left in the tree keep
//! `.symtab` and DWARF. They are scanned and compared with the target: by
//! GNU build-id first, else by the bytes they load (every allocated
//! section but the build-id note), which a rebuild whose only difference
//! is in debug information still matches.

use std::ffi::OsString;
use std::io::Read;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::Instant;

use crate::builddeps::{check_build_deps, BuildDepsError, PROFILES};
use crate::command::{self, CommandError};
use crate::elf::{self, build_id_hex, BuildIdError};
use crate::{timed_step, ProgressFn, Step};

const DONE: &str = "reference.done";

/// How to run the reference build.
#[derive(Debug, Clone)]
pub struct ReferenceOptions {
    /// The build goes in `work_dir/TREE_NAME` (log: `work_dir/build.log`).
    /// A finished build there with the same tree and environment is reused;
    /// else an earlier build's tree, log and marker there are removed first.
    pub work_dir: PathBuf,
    /// Extra environment for the build, e.g. the caller's compiler wrapper
    /// as `CC` and `CXX`.
    pub env: Vec<(OsString, OsString)>,
    /// `parallel=N` in DEB_BUILD_OPTIONS; `None`: the available CPUs.
    pub jobs: Option<usize>,
    /// Unpacked `-dev` packages (see [`crate::header_overlay`]) whose
    /// headers replace the installed ones for this build: each root's
    /// `usr/include` (and its multiarch folder) is searched first and
    /// mapped back to `/usr/include` in the debug information, so the
    /// output is as if that version were installed.
    pub header_overlays: Vec<PathBuf>,
}

impl ReferenceOptions {
    pub fn new(work_dir: impl Into<PathBuf>) -> ReferenceOptions {
        ReferenceOptions {
            work_dir: work_dir.into(),
            env: Vec::new(),
            jobs: None,
            header_overlays: Vec::new(),
        }
    }
}

/// A linked ELF file the build left.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct BuiltBinary {
    pub path: PathBuf,
    pub build_id: Option<String>,
    /// Has `.symtab` (not stripped).
    pub has_symtab: bool,
    pub has_debug_info: bool,
}

/// How the reference binary matched the target.
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum BinaryMatch {
    /// Same GNU build-id: the same link output, debug information included.
    BuildId,
    /// Different build-id but every loaded byte equal (code, data, their
    /// addresses): the rebuild's symbols and DWARF describe the target.
    LoadedBytes,
    /// Nothing the build left loads the same bytes as the target.
    None,
}

/// What a reference build gave.
#[derive(Debug, Clone, PartialEq, serde::Serialize, serde::Deserialize)]
pub struct ReferenceBuild {
    /// The built copy of the tree.
    pub tree: PathBuf,
    pub log: PathBuf,
    /// The build command as run (in `tree`).
    pub command: String,
    /// The build's duration (0 when reused).
    pub build_seconds: f64,
    /// A finished build with the same inputs was found and reused.
    pub reused: bool,
    /// The header overlays it was built with, and the flags they added to
    /// CFLAGS and CXXFLAGS (`DEB_CFLAGS_APPEND`): a patched build must use
    /// the same to compile what the target runs.
    pub header_overlays: Vec<PathBuf>,
    pub overlay_flags: String,
    /// The target's build-id.
    pub target_build_id: String,
    pub how: BinaryMatch,
    /// The binary that matched the target, if one did.
    pub matched: Option<BuiltBinary>,
    /// Every linked ELF file in the built tree.
    pub binaries: Vec<BuiltBinary>,
}

/// The reference build failed.
#[derive(Debug, thiserror::Error)]
pub enum ReferenceError {
    #[error("{}: {source}", .path.display())]
    Io {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error(transparent)]
    BuildDeps(#[from] BuildDepsError),
    #[error("reference build of {}: {source}", .tree.display())]
    Build {
        tree: PathBuf,
        #[source]
        source: CommandError,
    },
    #[error(transparent)]
    Command(#[from] CommandError),
    #[error(transparent)]
    Target(#[from] BuildIdError),
}

impl shadowpatch_failure::Classify for ReferenceError {
    fn class(&self) -> shadowpatch_failure::FailureClass {
        match self {
            ReferenceError::Io { source, .. } => shadowpatch_failure::class_of_io(source),
            ReferenceError::BuildDeps(error) => error.class(),
            ReferenceError::Target(error) => error.class(),
            _ => shadowpatch_failure::FailureClass::BadInput,
        }
    }
}

/// What a reused build must have been built from.
fn inputs_key(source: &Path, env: &[(OsString, OsString)]) -> String {
    let mut key = format!("tree={}\n", source.display());
    for (name, value) in env {
        key.push_str(&format!("env {}={}\n", name.to_string_lossy(), value.to_string_lossy()));
    }
    key
}

/// The compiler flags that put the overlays' headers first and map their
/// folders back to the installed ones (`-isystem` and `-ffile-prefix-map`
/// are not recorded in DW_AT_producer, so only the headers' contents reach
/// the output).
fn overlay_flags(overlays: &[PathBuf]) -> String {
    let mut flags = Vec::new();
    for root in overlays {
        let include = root.join("usr/include");
        let mut multiarch: Vec<PathBuf> = std::fs::read_dir(&include)
            .map(|entries| {
                entries
                    .flatten()
                    .filter(|entry| entry.file_name().to_string_lossy().contains("-linux-"))
                    .map(|entry| entry.path())
                    .collect()
            })
            .unwrap_or_default();
        multiarch.sort();
        // The compiler's own order: the multiarch folder before the generic one.
        for folder in multiarch.into_iter().chain([include.clone()]) {
            if !folder.is_dir() {
                continue;
            }
            let installed = Path::new("/").join(folder.strip_prefix(root).unwrap_or(&folder));
            flags.push(format!("-isystem {}", folder.display()));
            flags.push(format!(
                "-ffile-prefix-map={}={}",
                folder.display(),
                installed.display()
            ));
        }
    }
    flags.join(" ")
}

/// DEB_BUILD_OPTIONS: the caller's, plus `nocheck` and `parallel=N`.
fn build_options(jobs: usize) -> String {
    let inherited = std::env::var("DEB_BUILD_OPTIONS").unwrap_or_default();
    let mut words: Vec<String> = inherited
        .split_whitespace()
        .filter(|word| !word.starts_with("parallel="))
        .map(str::to_string)
        .collect();
    if !words.iter().any(|word| word == "nocheck") {
        words.push("nocheck".into());
    }
    words.push(format!("parallel={jobs}"));
    words.join(" ")
}

/// Builds `source` (an unpacked Debian source tree, left untouched) with
/// its own rules in a copy under `options.work_dir`, and finds the binary
/// that matches `target` (the installed file, or `/proc/PID/exe`).
pub fn reference_build(
    source: &Path,
    target: &Path,
    options: &ReferenceOptions,
    progress: ProgressFn<'_>,
) -> Result<ReferenceBuild, ReferenceError> {
    let io = |path: &Path| {
        let path = path.to_path_buf();
        move |source| ReferenceError::Io { path, source }
    };
    let target_build_id = build_id_hex(target)?;
    check_build_deps(source)?;
    let source = std::fs::canonicalize(source).map_err(io(source))?;
    let name = source
        .file_name()
        .map(PathBuf::from)
        .unwrap_or_else(|| PathBuf::from("source"));
    let work = &options.work_dir;
    let tree = work.join(&name);
    let log = work.join("build.log");
    let done = work.join(DONE);
    let mut env = options.env.clone();
    let flags = overlay_flags(&options.header_overlays);
    if !flags.is_empty() {
        // dpkg-buildflags appends these to CFLAGS and CXXFLAGS.
        env.push(("DEB_CFLAGS_APPEND".into(), flags.clone().into()));
        env.push(("DEB_CXXFLAGS_APPEND".into(), flags.clone().into()));
    }
    let key = inputs_key(&source, &env);
    let jobs = options
        .jobs
        .unwrap_or_else(|| std::thread::available_parallelism().map_or(1, |count| count.get()));
    let mut build = Command::new("dpkg-buildpackage");
    // -T build: debian/rules build with the package-build environment, no
    // binary packages; -nc: the fresh copy needs no clean; -d: checked above.
    build.args(["-T", "build", "-us", "-uc", "-nc", "-d", &format!("-P{PROFILES}")]);
    build
        .current_dir(&tree)
        .env("DEB_BUILD_OPTIONS", build_options(jobs))
        .envs(env.iter().cloned());
    let command_line = command::display(&build);

    let reused = std::fs::read_to_string(&done).is_ok_and(|previous| previous == key) && tree.is_dir();
    let mut build_seconds = 0.0;
    if !reused {
        // Only what an earlier build here left: the folder is the caller's.
        if tree.exists() {
            std::fs::remove_dir_all(&tree).map_err(io(&tree))?;
        }
        for stale in [&done, &log] {
            if stale.exists() {
                std::fs::remove_file(stale).map_err(io(stale))?;
            }
        }
        std::fs::create_dir_all(work).map_err(io(work))?;
        let mut copy = Command::new("cp");
        // -a keeps timestamps: a copy with fresh ones would make autotools
        // regenerate configure, and the build would no longer be Debian's.
        copy.args(["-a", "--reflink=auto"]).arg(&source).arg(&tree);
        timed_step(progress, Step::CopyingTree, |_| -> Result<(), ReferenceError> {
            let output = command::query(&mut copy)?;
            Ok(command::check(&copy, &output)?)
        })?;
        let started = Instant::now();
        timed_step(
            progress,
            Step::Building {
                command: command_line.clone(),
            },
            |progress| command::run_logged(&mut build, &log, progress),
        )
        .map_err(|source| ReferenceError::Build {
            tree: tree.clone(),
            source,
        })?;
        build_seconds = started.elapsed().as_secs_f64();
        std::fs::write(&done, &key).map_err(io(&done))?;
    }

    let binaries = timed_step(progress, Step::ScanningBinaries, |_| linked_binaries(&tree));
    let (how, matched) = find_match(&binaries, target, &target_build_id)?;
    Ok(ReferenceBuild {
        tree,
        log,
        command: command_line,
        build_seconds,
        reused,
        header_overlays: options.header_overlays.clone(),
        overlay_flags: flags,
        target_build_id,
        how,
        matched,
        binaries,
    })
}

/// The binary matching the target: by build-id, else by loaded bytes
/// (binaries of the target's file name first).
fn find_match(
    binaries: &[BuiltBinary],
    target: &Path,
    target_build_id: &str,
) -> Result<(BinaryMatch, Option<BuiltBinary>), ReferenceError> {
    if let Some(same) = binaries
        .iter()
        .find(|binary| binary.build_id.as_deref() == Some(target_build_id))
    {
        return Ok((BinaryMatch::BuildId, Some(same.clone())));
    }
    let target_name = std::fs::canonicalize(target)
        .ok()
        .and_then(|real| real.file_name().map(ToOwned::to_owned));
    let mut ordered: Vec<&BuiltBinary> = binaries.iter().collect();
    ordered.sort_by_key(|binary| binary.path.file_name() != target_name.as_deref());
    for binary in ordered {
        if elf::same_loaded_bytes(&binary.path, target)? {
            return Ok((BinaryMatch::LoadedBytes, Some(binary.clone())));
        }
    }
    Ok((BinaryMatch::None, None))
}

fn starts_with_elf_magic(path: &Path) -> bool {
    let mut magic = [0u8; 4];
    std::fs::File::open(path)
        .and_then(|mut file| file.read_exact(&mut magic))
        .is_ok()
        && magic == *b"\x7fELF"
}

/// Every linked ELF file under `dir` (symlinks not followed), sorted.
fn linked_binaries(dir: &Path) -> Vec<BuiltBinary> {
    let mut found = Vec::new();
    let mut pending = vec![dir.to_path_buf()];
    while let Some(folder) = pending.pop() {
        let Ok(entries) = std::fs::read_dir(&folder) else {
            continue;
        };
        for entry in entries.flatten() {
            let Ok(kind) = entry.file_type() else { continue };
            let path = entry.path();
            if kind.is_dir() {
                pending.push(path);
            } else if kind.is_file() && starts_with_elf_magic(&path) {
                if let Some(facts) = elf::facts(&path).filter(|facts| facts.linked) {
                    found.push(BuiltBinary {
                        path,
                        build_id: facts.build_id,
                        has_symtab: facts.has_symtab,
                        has_debug_info: facts.has_debug_info,
                    });
                }
            }
        }
    }
    found.sort_by(|left, right| left.path.cmp(&right.path));
    found
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn build_options_add_nocheck_once_and_set_the_jobs() {
        // Reads the environment: only asserts what holds whatever it is.
        let options = build_options(3);
        assert!(options.ends_with("parallel=3"), "{options}");
        assert_eq!(
            options.split_whitespace().filter(|word| *word == "nocheck").count(),
            1,
            "{options}"
        );
    }
}
