//! The build driver: copies of the source tree (never the user's own),
//! a diff applied to one of them, and builds run through a recording
//! compiler wrapper.
//!
//! The wrapper is a small shell script written into a private folder put
//! first on `PATH` under the names `cc`, `gcc`, `c++`, `g++` (and their
//! `x86_64-linux-gnu-` forms), and passed
//! as `CC`/`CXX`. A script rather than the `shadowpatch` binary re-invoked
//! through argv[0]: the library is called from tests, the agent and the
//! CLI, none of which can promise where a `shadowpatch` executable is, and a
//! build system may run the compiler in a stripped environment; a script
//! beside the logs needs only `/bin/sh` and the real compiler's absolute
//! path, and a user can read exactly what it did. Each compile writes one
//! record file (its working directory and arguments), so parallel `make -j`
//! jobs never interleave in one file.

use crate::BuildError;
use std::collections::{BTreeMap, BTreeSet};
use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::process::Command;

/// One object compiled during a build: its source and output, relative to
/// the tree, and the arguments the build system gave.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct CompiledObject {
    pub source: PathBuf,
    pub object: PathBuf,
    pub arguments: Vec<String>,
    /// The compiler's working directory, relative to the tree (absolute
    /// when outside it).
    #[serde(default)]
    pub cwd: PathBuf,
}

/// What a build stage adds to each compile.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Flags {
    /// The reference: the tree's own flags, untouched.
    Pristine,
    /// Original and patched: one section per function and per variable.
    Sections,
}

impl Flags {
    fn extra(self) -> &'static str {
        match self {
            Flags::Pristine => "",
            Flags::Sections => "-ffunction-sections -fdata-sections",
        }
    }
}

/// The command that builds a tree, chosen by what the tree is when the
/// user gave none.
pub fn default_build_command(tree: &Path) -> Result<String, BuildError> {
    if tree.join("debian/rules").is_file() {
        // A Debian source package: its own rules honour dpkg-buildflags;
        // the package's test suite is not needed to get objects. dh's
        // build stamp (left by the original build the patched copy starts
        // from) would make it skip the build.
        return Ok(
            "rm -f debian/debhelper-build-stamp && DEB_BUILD_OPTIONS=\"nocheck $DEB_BUILD_OPTIONS\" debian/rules build"
                .into(),
        );
    }
    for makefile in ["GNUmakefile", "makefile", "Makefile"] {
        if tree.join(makefile).is_file() {
            return Ok("make -j2".into());
        }
    }
    // CMake and Meson record the absolute source and build folders when
    // they configure, and the patched build runs in a copy of the built
    // reference: reusing the copied build folder as is would compile the
    // reference's sources. CMake is configured again in place (its cache
    // removed; unchanged objects stay, so only what the diff touches is
    // recompiled); Meson's build folder cannot be moved, so it is made
    // anew (every object recompiled: correct, slower).
    if tree.join("CMakeLists.txt").is_file() {
        return Ok(format!(
            "rm -f {CONFIGURED}/CMakeCache.txt && cmake -S . -B {CONFIGURED} >/dev/null && cmake --build {CONFIGURED} -j2"
        ));
    }
    if tree.join("meson.build").is_file() {
        return Ok(format!(
            "rm -rf {CONFIGURED} && meson setup {CONFIGURED} >/dev/null && ninja -C {CONFIGURED}"
        ));
    }
    Err(BuildError::Input(format!(
        "{}: no Makefile, CMakeLists.txt, meson.build or debian/rules; give the build command with --build-cmd",
        tree.display()
    )))
}

/// The build folder of the default CMake and Meson commands, inside the
/// copy of the tree.
pub const CONFIGURED: &str = ".shadowpatch-build";

/// Copy `from` into a new folder `to` (which must not exist), keeping
/// modification times so a later `make` rebuilds only what changed.
pub fn copy_tree(from: &Path, to: &Path) -> Result<(), BuildError> {
    std::fs::create_dir_all(to).map_err(|e| BuildError::io(to, e))?;
    let status = Command::new("cp")
        .arg("-a")
        .arg(format!("{}/.", from.display()))
        .arg(to)
        .status()
        .map_err(|e| BuildError::io(Path::new("cp"), e))?;
    if !status.success() {
        return Err(BuildError::Input(format!(
            "cannot copy {} to {}",
            from.display(),
            to.display()
        )));
    }
    Ok(())
}

/// Give every source file of `tree` the current time, so a build system
/// recompiles every object even if the tree was copied already built (its
/// objects would lack the flags the stage adds, and nothing would be
/// recorded).
pub fn touch_sources(tree: &Path) -> Result<(), BuildError> {
    let mut files = Vec::new();
    walk(tree, tree, &mut files)?;
    let now = std::time::SystemTime::now();
    for relative in files {
        let is_source = relative
            .extension()
            .and_then(|e| e.to_str())
            .is_some_and(|e| is_source(&format!("x.{e}")) || matches!(e, "h" | "hh" | "hpp" | "hxx"));
        if !is_source {
            continue;
        }
        let path = tree.join(&relative);
        let file = std::fs::OpenOptions::new()
            .write(true)
            .open(&path)
            .map_err(|e| BuildError::io(&path, e))?;
        file.set_modified(now).map_err(|e| BuildError::io(&path, e))?;
    }
    Ok(())
}

/// A content hash of a source tree (paths, modes and bytes; `.git` and
/// the build's own outputs excluded), keyed by `salt` (the build command).
pub fn tree_hash(tree: &Path, salt: &str) -> Result<String, BuildError> {
    let mut files = Vec::new();
    walk(tree, tree, &mut files)?;
    files.sort();
    let mut hasher = blake3::Hasher::new();
    hasher.update(salt.as_bytes());
    for relative in files {
        let path = tree.join(&relative);
        let metadata = std::fs::symlink_metadata(&path).map_err(|e| BuildError::io(&path, e))?;
        hasher.update(relative.to_string_lossy().as_bytes());
        hasher.update(&[0]);
        hasher.update(&metadata.permissions().mode().to_le_bytes());
        if metadata.file_type().is_symlink() {
            let target = std::fs::read_link(&path).map_err(|e| BuildError::io(&path, e))?;
            hasher.update(target.to_string_lossy().as_bytes());
        } else {
            hasher.update(&std::fs::read(&path).map_err(|e| BuildError::io(&path, e))?);
        }
        hasher.update(&[0]);
    }
    Ok(hasher.finalize().to_hex()[..32].to_string())
}

fn walk(root: &Path, dir: &Path, files: &mut Vec<PathBuf>) -> Result<(), BuildError> {
    for entry in std::fs::read_dir(dir).map_err(|e| BuildError::io(dir, e))? {
        let entry = entry.map_err(|e| BuildError::io(dir, e))?;
        let name = entry.file_name();
        if name == ".git" {
            continue;
        }
        let path = entry.path();
        let kind = entry.file_type().map_err(|e| BuildError::io(&path, e))?;
        if kind.is_dir() {
            walk(root, &path, files)?;
        } else {
            let relative = path.strip_prefix(root).unwrap_or(&path).to_path_buf();
            files.push(relative);
        }
    }
    Ok(())
}

/// Whether `diff`'s paths carry `a/` and `b/` (`patch -p1`), else `-p0`.
fn strips_one(text: &str) -> bool {
    text.lines().any(|l| l.starts_with("--- a/") || l.starts_with("+++ b/"))
}

/// Apply `diffs` in order to a scratch copy of the files they touch in
/// `tree`, so a diff that does not apply is reported (file and hunk)
/// before any build: a package's reference build takes minutes.
pub fn check_diffs(tree: &Path, diffs: &[PathBuf]) -> Result<(), BuildError> {
    let scratch = tempfile::Builder::new()
        .prefix("shadowpatch-diff-check-")
        .tempdir()
        .map_err(|e| BuildError::io(&std::env::temp_dir(), e))?;
    for diff in diffs {
        let text = std::fs::read_to_string(diff).map_err(|e| BuildError::io(diff, e))?;
        let strip = strips_one(&text);
        for line in text.lines() {
            let Some(name) = line.strip_prefix("--- ").or_else(|| line.strip_prefix("+++ ")) else {
                continue;
            };
            let name = name.split('\t').next().unwrap_or(name).trim();
            let relative = if strip {
                name.split_once('/').map(|(_, rest)| rest)
            } else {
                Some(name)
            };
            let Some(relative) = relative.filter(|r| !r.is_empty() && !r.split('/').any(|part| part == "..")) else {
                continue;
            };
            let (from, to) = (tree.join(relative), scratch.path().join(relative));
            if from.is_file() && !to.exists() {
                if let Some(parent) = to.parent() {
                    std::fs::create_dir_all(parent).map_err(|e| BuildError::io(parent, e))?;
                }
                std::fs::copy(&from, &to).map_err(|e| BuildError::io(&from, e))?;
            }
        }
    }
    for diff in diffs {
        apply_diff(scratch.path(), diff)?;
    }
    Ok(())
}

/// Apply `diff` inside `tree` (`-p1` when its paths carry `a/` and `b/`,
/// else `-p0`); a diff that does not apply names the file and the hunk.
pub fn apply_diff(tree: &Path, diff: &Path) -> Result<(), BuildError> {
    let text = std::fs::read_to_string(diff).map_err(|e| BuildError::io(diff, e))?;
    if !text.lines().any(|l| l.starts_with("@@")) {
        return Err(BuildError::Input(format!(
            "{}: not a unified diff (no @@ hunks)",
            diff.display()
        )));
    }
    let strip = if strips_one(&text) { "-p1" } else { "-p0" };
    let output = Command::new("patch")
        .args([
            strip,
            "--batch",
            "--forward",
            "--no-backup-if-mismatch",
            "-r",
            "-",
            "-d",
        ])
        .arg(tree)
        .arg("-i")
        .arg(std::path::absolute(diff).map_err(|e| BuildError::io(diff, e))?)
        .output()
        .map_err(|e| BuildError::io(Path::new("patch"), e))?;
    if output.status.success() {
        return Ok(());
    }
    let stdout = String::from_utf8_lossy(&output.stdout);
    let mut file = None;
    for line in stdout.lines() {
        if let Some(name) = line.strip_prefix("patching file ") {
            file = Some(name.trim_matches('\'').to_string());
        }
        if line.starts_with("Hunk #") && line.contains("FAILED") {
            return Err(BuildError::DiffDoesNotApply {
                diff: diff.to_path_buf(),
                file: file.unwrap_or_else(|| "?".into()),
                hunk: line.trim_end_matches('.').to_string(),
            });
        }
        if line.starts_with("can't find file") || line.contains("No file to patch") {
            return Err(BuildError::DiffDoesNotApply {
                diff: diff.to_path_buf(),
                file: file.unwrap_or_else(|| "?".into()),
                hunk: "the file it patches is not in the tree".into(),
            });
        }
    }
    let last = stdout
        .lines()
        .chain(String::from_utf8_lossy(&output.stderr).lines())
        .rfind(|l| !l.trim().is_empty())
        .unwrap_or("patch failed")
        .to_string();
    Err(BuildError::DiffDoesNotApply {
        diff: diff.to_path_buf(),
        file: file.unwrap_or_else(|| "?".into()),
        hunk: last,
    })
}

/// The recording wrapper for one build, in its own folder.
#[derive(Debug)]
pub struct Wrapper {
    pub folder: PathBuf,
    pub records: PathBuf,
}

impl Wrapper {
    /// Write the wrapper scripts into `folder` (created), recording into
    /// `folder/records`.
    pub fn create(folder: &Path, flags: Flags) -> Result<Wrapper, BuildError> {
        let bin = folder.join("bin");
        let records = folder.join("records");
        for dir in [&bin, &records] {
            std::fs::create_dir_all(dir).map_err(|e| BuildError::io(dir, e))?;
        }
        // Debian's tools call the compiler by its triplet name too.
        let c_names = ["cc", "gcc", "x86_64-linux-gnu-gcc"];
        let cxx_names = ["c++", "g++", "x86_64-linux-gnu-g++"];
        for (names, real) in [(c_names, "gcc"), (cxx_names, "g++")] {
            let real = find_in_path(real).ok_or_else(|| BuildError::Input(format!("{real} is not installed")))?;
            // Shell builtins only: a compile costs the wrapper's `sh` and
            // nothing else (each `date`, `tr` or `mv` spawned per compile
            // was most of a small tree's build time). One file per
            // process, named by its pid (a pid is never two live
            // compilers at once; a reused one gets a `+`), NUL-separated
            // (arguments may hold newlines), ordered by mtime when read.
            let script = format!(
                "#!/bin/sh\n# shadowpatch build: records each compile, then runs the real compiler.\n\
                 rec=\"{records}/$$\"\n\
                 while [ -e \"$rec\" ]; do rec=\"$rec+\"; done\n\
                 printf '%s\\000' \"$PWD\" \"$@\" > \"$rec\"\n\
                 exec {real} \"$@\" {extra}\n",
                records = records.display(),
                real = real.display(),
                extra = flags.extra(),
            );
            for name in names {
                let path = bin.join(name);
                std::fs::write(&path, &script).map_err(|e| BuildError::io(&path, e))?;
                std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o755))
                    .map_err(|e| BuildError::io(&path, e))?;
            }
        }
        Ok(Wrapper {
            folder: folder.to_path_buf(),
            records,
        })
    }

    /// Run `command` in `tree` with the wrapper first; its output goes to
    /// `log`. Returns the objects compiled, by object path.
    pub fn run(&self, tree: &Path, command: &str, log: &Path) -> Result<BTreeMap<PathBuf, CompiledObject>, BuildError> {
        let log_file = std::fs::File::create(log).map_err(|e| BuildError::io(log, e))?;
        let path = format!(
            "{}:{}",
            self.folder.join("bin").display(),
            std::env::var("PATH").unwrap_or_else(|_| "/usr/bin:/bin".into())
        );
        let status = Command::new("sh")
            .arg("-c")
            .arg(command)
            .current_dir(tree)
            .env("PATH", path)
            .env("CC", self.folder.join("bin/cc"))
            .env("CXX", self.folder.join("bin/c++"))
            .stdin(std::process::Stdio::null())
            .stdout(log_file.try_clone().map_err(|e| BuildError::io(log, e))?)
            .stderr(log_file)
            .status()
            .map_err(|e| BuildError::io(Path::new("sh"), e))?;
        if !status.success() {
            let text = std::fs::read_to_string(log).unwrap_or_default();
            // The first compiler error says why; the last line says who stopped.
            let lines: Vec<&str> = text.lines().map(str::trim).filter(|l| !l.is_empty()).collect();
            let mut tail: Vec<&str> = lines.iter().copied().filter(|l| l.contains("error:")).take(1).collect();
            tail.extend(lines.last().copied().filter(|last| !tail.contains(last)));
            if tail.len() < 2 {
                tail = lines[lines.len().saturating_sub(3)..].to_vec();
            }
            let tail = tail.join(" | ");
            return Err(BuildError::BuildFailed {
                command: command.to_string(),
                tail,
                log: log.to_path_buf(),
            });
        }
        self.compiled(tree)
    }

    fn compiled(&self, tree: &Path) -> Result<BTreeMap<PathBuf, CompiledObject>, BuildError> {
        let mut objects = BTreeMap::new();
        for (cwd, arguments) in self.records()? {
            if let Some(compiled) = compiled_object(&cwd, tree, &arguments) {
                // Objects gone after the build are a configure script's
                // probes (conftest.o), not part of any binary.
                if tree.join(&compiled.object).is_file() {
                    objects.insert(compiled.object.clone(), compiled);
                }
            }
        }
        Ok(objects)
    }

    /// The objects (relative to `tree`) of the link this build ran whose
    /// output is named `binary`, if it ran one: a tree that builds several
    /// programs from one source (memcached and memcached-debug) compiles
    /// each file once per program, and only the target's objects count.
    /// `None` when no link names it, or when it links archives or
    /// libraries of the tree (their members are not named).
    pub fn linked_into(&self, tree: &Path, binary: &str) -> Result<Option<BTreeSet<PathBuf>>, BuildError> {
        let mut linked = None;
        for (cwd, arguments) in self.records()? {
            if arguments.iter().any(|a| a == "-c") {
                continue;
            }
            let output = arguments
                .iter()
                .position(|a| a == "-o")
                .and_then(|i| arguments.get(i + 1));
            if output
                .and_then(|o| Path::new(o).file_name())
                .is_none_or(|name| name != binary)
            {
                continue;
            }
            // Objects may also come from archives or libraries of the
            // tree, whose members this record does not name: no filter.
            let from_tree = |a: &String| {
                a.strip_prefix("-L")
                    .is_some_and(|dir| cwd.join(dir).starts_with(tree) && !dir.is_empty())
            };
            if arguments
                .iter()
                .any(|a| (!a.starts_with('-') && (a.ends_with(".a") || a.ends_with(".la"))) || from_tree(a))
            {
                return Ok(None);
            }
            let objects: BTreeSet<PathBuf> = arguments
                .iter()
                .filter(|a| !a.starts_with('-') && a.ends_with(".o"))
                .map(|a| {
                    let path = cwd.join(a);
                    path.strip_prefix(tree).map(Path::to_path_buf).unwrap_or(path)
                })
                .collect();
            linked.get_or_insert_with(BTreeSet::new).extend(objects);
        }
        Ok(linked)
    }

    /// Each compiler invocation recorded: its working directory and
    /// arguments, in the order they were written.
    fn records(&self) -> Result<Vec<(PathBuf, Vec<String>)>, BuildError> {
        let mut entries = Vec::new();
        for entry in std::fs::read_dir(&self.records).map_err(|e| BuildError::io(&self.records, e))? {
            let entry = entry.map_err(|e| BuildError::io(&self.records, e))?;
            let written = entry.metadata().and_then(|m| m.modified()).ok();
            entries.push((written, entry.path()));
        }
        entries.sort();
        let mut records = Vec::new();
        for (_, record) in entries {
            let bytes = std::fs::read(&record).map_err(|e| BuildError::io(&record, e))?;
            let mut fields = bytes
                .split(|b| *b == 0)
                .map(|field| String::from_utf8_lossy(field).into_owned());
            let Some(cwd) = fields.next().filter(|cwd| !cwd.is_empty()) else {
                continue;
            };
            let mut arguments: Vec<String> = fields.collect();
            // The terminator after the last argument leaves one empty field.
            if arguments.last().is_some_and(String::is_empty) {
                arguments.pop();
            }
            records.push((PathBuf::from(cwd), arguments));
        }
        Ok(records)
    }
}

/// The object a compiler invocation writes, if it compiles one source
/// file with `-c`.
fn compiled_object(cwd: &Path, tree: &Path, arguments: &[String]) -> Option<CompiledObject> {
    if !arguments.iter().any(|a| a == "-c") {
        return None;
    }
    let mut output = None;
    let mut sources = Vec::new();
    let mut i = 0;
    while i < arguments.len() {
        let a = &arguments[i];
        if a == "-o" {
            output = arguments.get(i + 1).cloned();
            i += 2;
            continue;
        }
        if let Some(rest) = a.strip_prefix("-o") {
            output = Some(rest.to_string());
        } else if !a.starts_with('-') && is_source(a) {
            sources.push(a.clone());
        }
        i += 1;
    }
    let [source] = sources.as_slice() else { return None };
    let object = match output {
        Some(o) => cwd.join(o),
        None => cwd.join(Path::new(source).with_extension("o").file_name()?),
    };
    let relative = |p: PathBuf| p.strip_prefix(tree).map(Path::to_path_buf).unwrap_or(p);
    Some(CompiledObject {
        source: relative(cwd.join(source)),
        object: relative(object),
        arguments: arguments.to_vec(),
        cwd: relative(cwd.to_path_buf()),
    })
}

/// Compile `compiled` (recorded by a build of `built_in`) again from the
/// sources of `tree`, with `flags` added, into `output`; nothing is
/// written inside `tree`. This gives the original side of the comparison
/// for exactly the objects the patched build recompiled, with the same
/// arguments, instead of a second whole build of the tree: `tree` is the
/// reference build (its generated headers are there), so the compiler
/// sees the unpatched sources. Paths into `built_in` in the arguments are
/// mapped into `tree`; dependency-file options are dropped (they would
/// write beside the sources).
pub fn recompile(
    compiled: &CompiledObject,
    built_in: &Path,
    tree: &Path,
    output: &Path,
    flags: Flags,
    log: &Path,
) -> Result<(), BuildError> {
    let from = built_in.to_string_lossy().into_owned();
    let to = tree.to_string_lossy().into_owned();
    let map = |a: &str| {
        if from.is_empty() {
            a.to_string()
        } else {
            a.replace(&from, &to)
        }
    };
    let mut arguments = Vec::new();
    let mut i = 0;
    while i < compiled.arguments.len() {
        let a = compiled.arguments[i].as_str();
        match a {
            "-o" | "-MF" | "-MT" | "-MQ" => i += 2,
            "-MD" | "-MMD" | "-MP" | "-M" | "-MM" => i += 1,
            _ if a.starts_with("-o")
                || a.starts_with("-MF")
                || a.starts_with("-MT")
                || a.starts_with("-MQ")
                || a.starts_with("-Wp,-MD")
                || a.starts_with("-Wp,-MMD") =>
            {
                i += 1
            }
            _ => {
                arguments.push(map(a));
                i += 1;
            }
        }
    }
    arguments.extend(flags.extra().split_whitespace().map(str::to_string));
    arguments.push("-o".into());
    arguments.push(output.to_string_lossy().into_owned());
    let cwd = tree.join(&compiled.cwd);
    let compiler = if is_cplusplus(&compiled.source) { "g++" } else { "gcc" };
    let real = find_in_path(compiler).ok_or_else(|| BuildError::Input(format!("{compiler} is not installed")))?;
    let result = Command::new(&real)
        .args(&arguments)
        .current_dir(&cwd)
        .stdin(std::process::Stdio::null())
        .output()
        .map_err(|e| BuildError::io(&real, e))?;
    if result.status.success() {
        return Ok(());
    }
    let mut text = format!("cd {} && {} {}\n", cwd.display(), real.display(), arguments.join(" ")).into_bytes();
    text.extend_from_slice(&result.stderr);
    let _ = std::fs::write(log, &text);
    let stderr = String::from_utf8_lossy(&result.stderr);
    let tail = stderr
        .lines()
        .find(|l| l.contains("error:"))
        .or_else(|| stderr.lines().rfind(|l| !l.trim().is_empty()))
        .unwrap_or("failed")
        .trim()
        .to_string();
    Err(BuildError::BuildFailed {
        command: format!("{compiler} (the original of {})", compiled.object.display()),
        tail,
        log: log.to_path_buf(),
    })
}

fn is_source(argument: &str) -> bool {
    let extension = Path::new(argument).extension().and_then(|e| e.to_str()).unwrap_or("");
    matches!(
        extension,
        "c" | "cc" | "cpp" | "cxx" | "C" | "c++" | "i" | "ii" | "s" | "S"
    )
}

/// Whether a source is C++.
pub fn is_cplusplus(source: &Path) -> bool {
    matches!(
        source.extension().and_then(|e| e.to_str()).unwrap_or(""),
        "cc" | "cpp" | "cxx" | "C" | "c++" | "ii"
    )
}

fn find_in_path(name: &str) -> Option<PathBuf> {
    let path = std::env::var_os("PATH")?;
    std::env::split_paths(&path)
        .map(|dir| dir.join(name))
        .find(|candidate| candidate.is_file())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn finds_the_object_a_compile_writes() {
        let args = |s: &str| s.split(' ').map(str::to_string).collect::<Vec<_>>();
        let tree = Path::new("/t");
        let c = compiled_object(Path::new("/t/src"), tree, &args("-O2 -c -o a.o a.c")).unwrap();
        assert_eq!(c.object, Path::new("src/a.o"));
        assert_eq!(c.source, Path::new("src/a.c"));
        let c = compiled_object(Path::new("/t"), tree, &args("-c lib/b.c")).unwrap();
        assert_eq!(c.object, Path::new("b.o"));
        assert!(compiled_object(Path::new("/t"), tree, &args("-o calc a.o b.o")).is_none());
    }

    #[test]
    fn the_target_link_names_the_objects_that_count() {
        let dir = tempfile::tempdir().unwrap();
        let tree = dir.path().join("tree");
        let wrapper = Wrapper::create(&dir.path().join("wrapper"), Flags::Sections).unwrap();
        let record = |name: &str, cwd: &Path, arguments: &str| {
            let lines: Vec<&str> = arguments.split(' ').collect();
            std::fs::write(
                wrapper.records.join(name),
                format!("{}\0{}\0", cwd.display(), lines.join("\0")),
            )
            .unwrap();
        };
        record("1", &tree, "-g -O2 -c -o memcached-proto_text.o proto_text.c");
        record(
            "2",
            &tree,
            "-g -O2 -o memcached memcached-memcached.o memcached-proto_text.o -levent",
        );
        record(
            "3",
            &tree,
            "-g -O2 -o memcached-debug memcached_debug-proto_text.o -levent",
        );
        let linked = wrapper.linked_into(&tree, "memcached").unwrap().unwrap();
        assert_eq!(
            linked.into_iter().collect::<Vec<_>>(),
            [
                PathBuf::from("memcached-memcached.o"),
                PathBuf::from("memcached-proto_text.o")
            ]
        );
        assert_eq!(wrapper.linked_into(&tree, "calc-stripped").unwrap(), None);
        // A link taking an archive of the tree: its members are unnamed.
        record("4", &tree.join("src"), "-o prog main.o ../lib/libcalc.a");
        assert_eq!(wrapper.linked_into(&tree, "prog").unwrap(), None);
        record("5", &tree, "-o tool tool.o -Llib -lcalc");
        assert_eq!(wrapper.linked_into(&tree, "tool").unwrap(), None);
    }
}
