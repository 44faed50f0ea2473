//! `build --debian`: the tree and the reference for a binary of an
//! installed Debian package, prepared with `shadowpatch_debsrc` so the
//! user has nothing to prepare. The package and version come from the
//! running module (`resolve_process`), the source is fetched and cached
//! (`fetch_source`) unless the user gives an `apt-get source` tree, its
//! build dependencies are checked (one line naming the missing ones), and
//! the reference is the package's own build (`reproduce`: its rules, then,
//! if the build-id differs, the archive's headers of stale `-dev` build
//! dependencies). The result fills a [`BuildRequest`]: the reference tree,
//! and a build command for the original and patched builds that compiles
//! with the same rules and the same header overlay as the reference.

use crate::BuildRequest;
use shadowpatch_debsrc::{
    check_build_deps, fetch_source, reproduce, resolve_binary, resolve_process, BinaryMatch, BuildDepsError,
    FetchError, InstalledBinary, Progress, ReferenceError, ReferenceOptions, ReproductionTry, ResolveError, Step,
};
use shadowpatch_failure::{Classify, FailureClass};
use std::path::{Path, PathBuf};
use std::time::Instant;

/// What to prepare.
#[derive(Debug, Clone)]
pub struct DebianRequest {
    /// A PID or a path, as [`BuildRequest::target`].
    pub target: String,
    pub module: Option<String>,
    /// An unpacked source tree (`apt-get source`) to use instead of
    /// fetching one; its version must be the installed one.
    pub source: Option<PathBuf>,
    /// The debsrc cache: fetched sources, header overlays, and the
    /// reference builds (`CACHE/reference/PACKAGE_VERSION`).
    pub cache: PathBuf,
    /// How many header-overlay rebuilds to try when the plain rebuild's
    /// build-id is not the target's.
    pub max_overlay_builds: usize,
}

/// What was prepared, for the output (`--json`: the `debian` object).
#[derive(Debug, Clone, PartialEq, serde::Serialize, serde::Deserialize)]
pub struct DebianSource {
    /// The binary package owning the target, and its version.
    pub package: String,
    pub version: String,
    pub source_package: String,
    pub source_version: String,
    /// The installed file (the running module's path).
    pub binary: PathBuf,
    /// The unpacked source tree the builds copy.
    pub tree: PathBuf,
    /// The tree came from the cache (or from `--source`).
    pub source_cached: bool,
    pub fetch_seconds: f64,
    /// The package's own build, as the reference.
    pub reference_tree: PathBuf,
    pub reference_log: PathBuf,
    pub reference_how: BinaryMatch,
    pub reference_reused: bool,
    /// The header overlay (`package=version`) the reference, the original
    /// and the patched builds compile with, if one was needed.
    pub overlay: Option<String>,
    pub overlay_flags: String,
    /// Each reference build tried (plain, then overlays).
    pub tries: Vec<ReproductionTry>,
    /// Stale `-dev` build dependencies not tried as overlays: the
    /// target's binary was compiled from none of their headers.
    #[serde(default)]
    pub overlays_not_tried: Vec<String>,
    pub reference_seconds: f64,
    /// The command the original and patched builds run.
    pub build_command: String,
}

/// Preparing a Debian build failed; one line each.
#[derive(Debug, thiserror::Error)]
pub enum DebianError {
    #[error(transparent)]
    Resolve(#[from] ResolveError),
    #[error(transparent)]
    Fetch(#[from] FetchError),
    #[error(transparent)]
    BuildDeps(#[from] BuildDepsError),
    #[error(transparent)]
    Reference(#[from] ReferenceError),
    #[error(transparent)]
    Diff(#[from] Box<crate::BuildError>),
    #[error("{}: source version {found}, but {binary} is from {package} {wanted}: fetch the installed version (omit --source)", .tree.display())]
    WrongVersion {
        tree: PathBuf,
        found: String,
        binary: String,
        package: String,
        wanted: String,
    },
    #[error("{}: not a Debian source tree (no debian/changelog)", .tree.display())]
    NotDebianTree { tree: PathBuf },
    #[error(
        "the package's own rebuild of {} left no binary of that name (tried: {tries}): the installed binary was not built from this source here; see {}",
        .binary.display(), .log.display()
    )]
    NotReproduced {
        binary: PathBuf,
        tries: String,
        log: PathBuf,
    },
}

impl Classify for DebianError {
    fn class(&self) -> FailureClass {
        match self {
            DebianError::Resolve(e) => e.class(),
            DebianError::Fetch(e) => e.class(),
            DebianError::BuildDeps(e) => e.class(),
            DebianError::Reference(e) => e.class(),
            DebianError::Diff(e) => e.class(),
            _ => FailureClass::BadInput,
        }
    }
}

/// The stages [`prepare`] reports, before the build's own [`crate::STEPS`]
/// (whose reference build is then the one made here).
pub const DEBIAN_STEPS: [&str; 4] = [
    "finding the package",
    "fetching the source",
    "checking build dependencies",
    "reference build (the package's rules)",
];

/// The debsrc cache when none is given: `$XDG_CACHE_HOME/shadowpatch/debsrc`
/// or `~/.cache/shadowpatch/debsrc` (beside the build cache).
pub fn default_cache() -> PathBuf {
    shadowpatch_debsrc::default_cache_dir(None)
}

/// Resolve, fetch, check (build dependencies, and that `diffs` apply) and
/// build the reference for `request`.
/// `progress(stage, note)`: `stage` indexes [`DEBIAN_STEPS`]; `note` is
/// the step or output line debsrc reports (empty as a stage starts).
pub fn prepare(
    request: &DebianRequest,
    diffs: &[PathBuf],
    progress: &mut dyn FnMut(usize, &str),
) -> Result<DebianSource, DebianError> {
    progress(0, "");
    let installed = match request.target.parse::<i32>() {
        Ok(pid) => resolve_process(pid, request.module.as_deref())?,
        Err(_) => resolve_binary(Path::new(&request.target))?,
    };

    progress(1, "");
    let started = Instant::now();
    let (tree, source_cached) = match &request.source {
        Some(tree) => {
            check_version(tree, &installed)?;
            (tree.clone(), true)
        }
        None => {
            let mut forward = |p: Progress| progress(1, &describe(&p));
            let fetched = fetch_source(
                &installed.source_package,
                &installed.source_version,
                &request.cache,
                &mut forward,
            )?;
            (fetched.dir, fetched.from_cache)
        }
    };
    let fetch_seconds = started.elapsed().as_secs_f64();

    // Before the minutes of the reference build: do the diffs apply?
    crate::driver::check_diffs(&tree, diffs).map_err(Box::new)?;
    progress(2, "");
    check_build_deps(&tree)?;

    progress(3, "");
    let started = Instant::now();
    let key = format!("{}_{}", installed.source_package, installed.source_version).replace([':', '/'], "_");
    let options = ReferenceOptions::new(request.cache.join("reference").join(key));
    let mut forward = |p: Progress| progress(3, &describe(&p));
    // The file itself, not a symlink to it: a library is named by its
    // soname link (libjansson.so.4 -> libjansson.so.4.14.0), and the
    // rebuild's binaries are found by the real file's name.
    let target_file = std::fs::canonicalize(&installed.path).unwrap_or_else(|_| installed.path.clone());
    let reproduction = reproduce(
        &tree,
        &target_file,
        &options,
        &request.cache,
        request.max_overlay_builds,
        &mut forward,
    )?;
    let reference = reproduction.build;
    // No rebuild has the target's build-id (the archive built it with
    // other headers or tools than any we tried): the build goes on with the
    // plain rebuild, whose functions are matched one by one against the
    // running code (relocation-masked, unique matches only, see
    // `matching`), and every replaced function is checked against the
    // running one before anything is emitted. Only a rebuild that left no
    // binary of the target's name has nothing to match with.
    let name = target_file.file_name();
    if reference.how == BinaryMatch::None && !reference.binaries.iter().any(|b| b.path.file_name() == name) {
        return Err(DebianError::NotReproduced {
            binary: installed.path.clone(),
            tries: reproduction
                .tries
                .iter()
                .map(|t| t.overlay.clone().unwrap_or_else(|| "plain".into()))
                .collect::<Vec<_>>()
                .join(", "),
            log: reference.log.clone(),
        });
    }
    let build_command = rebuild_command(&tree, &reference.overlay_flags);
    Ok(DebianSource {
        package: installed.package,
        version: installed.version,
        source_package: installed.source_package,
        source_version: installed.source_version,
        binary: installed.path,
        tree,
        source_cached,
        fetch_seconds,
        reference_tree: reference.tree,
        reference_log: reference.log,
        reference_how: reference.how,
        reference_reused: reference.reused,
        overlay: reproduction.overlay,
        overlay_flags: reference.overlay_flags,
        tries: reproduction.tries,
        overlays_not_tried: reproduction.unused,
        reference_seconds: started.elapsed().as_secs_f64(),
        build_command,
    })
}

impl DebianSource {
    /// `request` with this tree, reference and build command.
    pub fn fill(&self, request: &mut BuildRequest) {
        request.source = self.tree.clone();
        request.reference_tree = Some(self.reference_tree.clone());
        request.build_command = Some(self.build_command.clone());
    }
}

/// The original and patched builds: the package's rules run as the
/// reference was (`dpkg-buildpackage -T build`, so dpkg-buildflags and
/// SOURCE_DATE_EPOCH are the same), with the reference's header overlay.
/// dh's build stamp is removed first: the patched build starts from the
/// built original, and with the stamp dh would skip the build.
pub fn build_command(overlay_flags: &str) -> String {
    let mut command =
        String::from("rm -f debian/debhelper-build-stamp && DEB_BUILD_OPTIONS=\"nocheck $DEB_BUILD_OPTIONS\"");
    if !overlay_flags.is_empty() {
        let quoted = shell_quote(overlay_flags);
        command.push_str(&format!(" DEB_CFLAGS_APPEND={quoted} DEB_CXXFLAGS_APPEND={quoted}"));
    }
    command.push_str(" dpkg-buildpackage -T build -us -uc -nc -d -Pnocheck");
    command
}

/// The patched build: only the package's build step (`dh_auto_build`,
/// or the rules' `override_dh_auto_build`) in the copy of the built
/// reference, so the build system recompiles what the diff touched and
/// relinks, where [`build_command`] would run the whole `dh build`
/// sequence again (lighttpd's `configure`: about 50 of a 74 s rebuild).
/// The flags were fixed when the reference was configured, overlay
/// included. When the rules are not a plain dh sequence, or the short way
/// fails, the whole [`build_command`] runs.
pub fn rebuild_command(tree: &Path, overlay_flags: &str) -> String {
    let full = build_command(overlay_flags);
    let rules = std::fs::read_to_string(tree.join("debian/rules")).unwrap_or_default();
    let Some(short) = build_step(&rules) else {
        return full;
    };
    format!("{{ {short}; }} || {{ {full}; }}")
}

/// The build step of dh-based `rules`, as a shell command; `None` when
/// they are not a plain `dh $@` sequence.
fn build_step(rules: &str) -> Option<String> {
    let environment = "DEB_BUILD_OPTIONS=\"nocheck $DEB_BUILD_OPTIONS\"";
    for target in ["override_dh_auto_build", "override_dh_auto_build-arch"] {
        if rules.lines().any(|line| {
            line.strip_prefix(target)
                .is_some_and(|rest| rest.trim_start().starts_with(':'))
        }) {
            return Some(format!(
                "{environment} dpkg-buildpackage -T {target} -us -uc -nc -d -Pnocheck"
            ));
        }
    }
    let dh = rules
        .lines()
        .map(str::trim)
        .find_map(|line| line.strip_prefix("dh $@").or_else(|| line.strip_prefix("dh $(@)")))?;
    // dh passes its options to every command; dh_auto_build takes those
    // that place the build (the rest, such as --with, are dh's own).
    let mut options = Vec::new();
    let mut words = dh.split_whitespace();
    while let Some(word) = words.next() {
        let places = ["--buildsystem", "--builddirectory", "--sourcedirectory", "--sourcedir"];
        if places.iter().any(|name| word.starts_with(&format!("{name}="))) {
            options.push(word.to_string());
        } else if places.contains(&word) || ["-S", "-B", "-D"].contains(&word) {
            options.push(format!("{word} {}", words.next()?));
        } else if word.contains('$') || word == "\\" {
            // A variable or a continued line: not understood, so not shortened.
            return None;
        }
    }
    Some(format!(
        "{environment} SOURCE_DATE_EPOCH=\"${{SOURCE_DATE_EPOCH:-$(dpkg-parsechangelog -STimestamp)}}\" dh_auto_build {}",
        options.join(" ")
    ).trim_end().to_string())
}

fn shell_quote(text: &str) -> String {
    format!("'{}'", text.replace('\'', r"'\''"))
}

/// A step or output line of debsrc, shortened for a progress note.
fn describe(progress: &Progress) -> String {
    let line = match progress {
        Progress::Started(step) => match step {
            Step::UpdatingLists => "apt-get update (private lists)".to_string(),
            Step::FetchingSource { package, version } => format!("apt-get source {package}={version}"),
            Step::DownloadingOverlay { package, version } => format!("headers of {package} {version}"),
            Step::InstallingBuildDeps { package } => format!("installing build dependencies of {package}"),
            Step::CopyingTree => "copying the tree".to_string(),
            Step::Building { .. } => "dpkg-buildpackage -T build".to_string(),
            Step::ScanningBinaries => "reading the binaries built".to_string(),
        },
        Progress::Output(line) => line.trim().to_string(),
        Progress::Finished(..) => String::new(),
    };
    line.chars().take(60).collect()
}

/// The tree's version (debian/changelog's first entry) must be the
/// installed source version.
fn check_version(tree: &Path, installed: &InstalledBinary) -> Result<(), DebianError> {
    let changelog = tree.join("debian/changelog");
    let text = std::fs::read_to_string(&changelog).map_err(|_| DebianError::NotDebianTree {
        tree: tree.to_path_buf(),
    })?;
    // "memcached (1.6.18-1+deb12u1) bookworm-security; urgency=medium"
    let found = text
        .lines()
        .next()
        .and_then(|line| line.split_once('(').and_then(|(_, rest)| rest.split_once(')')))
        .map(|(version, _)| version.to_string())
        .unwrap_or_default();
    if found == installed.source_version {
        return Ok(());
    }
    Err(DebianError::WrongVersion {
        tree: tree.to_path_buf(),
        found,
        binary: installed.path.display().to_string(),
        package: installed.source_package.clone(),
        wanted: installed.source_version.clone(),
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_rebuild_runs_only_the_build_step_of_plain_dh_rules() {
        let step = build_step("%:\n\tdh $@\n").unwrap();
        assert!(step.ends_with("dh_auto_build"), "{step}");
        assert!(step.contains("SOURCE_DATE_EPOCH") && step.contains("nocheck"), "{step}");
        let placed = build_step("%:\n\tdh $@ --with autoreconf --buildsystem=cmake -B obj\n").unwrap();
        assert!(placed.ends_with("dh_auto_build --buildsystem=cmake -B obj"), "{placed}");
        let overridden = build_step("%:\n\tdh $@\noverride_dh_auto_build:\n\tdh_auto_build -- all\n").unwrap();
        assert!(
            overridden.contains("dpkg-buildpackage -T override_dh_auto_build "),
            "{overridden}"
        );
        assert_eq!(build_step("build:\n\t$(MAKE)\n"), None, "not dh");
        assert_eq!(
            build_step("%:\n\tdh $@ $(DH_OPTIONS)\n"),
            None,
            "options not understood"
        );
        let dir = tempfile::tempdir().unwrap();
        std::fs::create_dir_all(dir.path().join("debian")).unwrap();
        std::fs::write(dir.path().join("debian/rules"), "%:\n\tdh $@\n").unwrap();
        let command = rebuild_command(dir.path(), "");
        assert!(command.starts_with("{ DEB_BUILD_OPTIONS="), "{command}");
        assert!(
            command.ends_with(&format!("|| {{ {}; }}", build_command(""))),
            "{command}"
        );
    }

    #[test]
    fn the_build_command_carries_the_overlay_quoted() {
        let plain = build_command("");
        assert!(plain.starts_with("rm -f debian/debhelper-build-stamp && "), "{plain}");
        assert!(!plain.contains("DEB_CFLAGS_APPEND"), "{plain}");
        let flags = "-isystem /c/o's/usr/include -ffile-prefix-map=/c/o's/usr/include=/usr/include";
        let overlaid = build_command(flags);
        assert!(
            overlaid.contains(r"DEB_CFLAGS_APPEND='-isystem /c/o'\''s/usr/include -ffile-prefix-map="),
            "{overlaid}"
        );
        // What the shell hands dpkg-buildpackage: the flags intact.
        let dir = tempfile::tempdir().unwrap();
        let shown = overlaid.replace(" dpkg-buildpackage -T build -us -uc -nc -d -Pnocheck", " env");
        let output = std::process::Command::new("sh")
            .arg("-c")
            .arg(&shown)
            .current_dir(dir.path())
            .output()
            .unwrap();
        let env = String::from_utf8_lossy(&output.stdout);
        assert!(env.lines().any(|l| l == format!("DEB_CFLAGS_APPEND={flags}")), "{env}");
        assert!(env.lines().any(|l| l.starts_with("DEB_BUILD_OPTIONS=nocheck")), "{env}");
    }
}
