//! A source tree's build dependencies: checked with `dpkg-checkbuilddeps`
//! (one line naming what is missing), or installed with `apt-get
//! build-dep` through the private apt configuration (binary archives this
//! time) for CI and throwaway machines. Both use the `nocheck` build
//! profile: the package's test suite is never run, so its test-only
//! dependencies are not needed.

use std::path::{Path, PathBuf};
use std::process::Command;

use crate::apt::{Archives, PrivateApt};
use crate::command::{self, CommandError};
use crate::fetch::{lock_cache, on_path, FetchError};
use crate::{ProgressFn, Step};

/// The build profile every build here uses (and so every check).
pub(crate) const PROFILES: &str = "nocheck";

/// Checking or installing build dependencies failed.
#[derive(Debug, thiserror::Error)]
pub enum BuildDepsError {
    #[error("{} is not a Debian source tree (no debian/control)", .tree.display())]
    NotDebianTree { tree: PathBuf },
    #[error("`dpkg-checkbuilddeps` is not installed: install the dpkg-dev package")]
    ToolMissing,
    #[error(
        "{package}: {what}: {names} (install with `apt-get build-dep {}`, or shadowpatch's install_build_deps for CI)",
        .tree.display()
    )]
    Unmet {
        package: String,
        tree: PathBuf,
        what: &'static str,
        names: String,
    },
    #[error(transparent)]
    Command(#[from] CommandError),
    #[error(transparent)]
    Fetch(#[from] FetchError),
}

impl shadowpatch_failure::Classify for BuildDepsError {
    fn class(&self) -> shadowpatch_failure::FailureClass {
        match self {
            BuildDepsError::Fetch(error) => error.class(),
            _ => shadowpatch_failure::FailureClass::BadInput,
        }
    }
}

fn tree_name(tree: &Path) -> String {
    tree.file_name()
        .map(|name| name.to_string_lossy().into_owned())
        .unwrap_or_else(|| tree.display().to_string())
}

/// What dpkg-checkbuilddeps complained of: (what, names) per error line.
fn unmet(stderr: &str) -> Option<(&'static str, String)> {
    for line in stderr.lines() {
        let line = line.trim().strip_prefix("dpkg-checkbuilddeps: error: ").unwrap_or(line);
        if let Some(names) = line.strip_prefix("Unmet build dependencies: ") {
            return Some(("missing build dependencies", names.trim().to_string()));
        }
        if let Some(names) = line.strip_prefix("Build conflicts: ") {
            return Some(("conflicting packages installed", names.trim().to_string()));
        }
    }
    None
}

/// Whether this machine can build `tree` (the `nocheck` profile): `Ok`, or
/// one line naming the missing packages.
pub fn check_build_deps(tree: &Path) -> Result<(), BuildDepsError> {
    if !tree.join("debian/control").is_file() {
        return Err(BuildDepsError::NotDebianTree {
            tree: tree.to_path_buf(),
        });
    }
    if !on_path("dpkg-checkbuilddeps") {
        return Err(BuildDepsError::ToolMissing);
    }
    let mut check = Command::new("dpkg-checkbuilddeps");
    check.arg(format!("-P{PROFILES}")).current_dir(tree);
    let output = command::query(&mut check)?;
    if output.status.success() {
        return Ok(());
    }
    match unmet(&String::from_utf8_lossy(&output.stderr)) {
        Some((what, names)) => Err(BuildDepsError::Unmet {
            package: tree_name(tree),
            tree: tree.to_path_buf(),
            what,
            names,
        }),
        // Not a dependency problem (a malformed debian/control...): its own words.
        None => command::check(&check, &output).map_err(BuildDepsError::from),
    }
}

/// Installs `tree`'s build dependencies on this machine with `apt-get
/// build-dep` (the `nocheck` profile), reading binary package lists from
/// the private configuration under `cache_dir` (updated when missing, and
/// once more when the install fails: a stale list names removed
/// versions). Changes the system: meant for CI.
pub fn install_build_deps(tree: &Path, cache_dir: &Path, progress: ProgressFn<'_>) -> Result<(), BuildDepsError> {
    if !tree.join("debian/control").is_file() {
        return Err(BuildDepsError::NotDebianTree {
            tree: tree.to_path_buf(),
        });
    }
    let tree = std::fs::canonicalize(tree).map_err(|source| FetchError::Io {
        path: tree.to_path_buf(),
        source,
    })?;
    let _lock = lock_cache(cache_dir)?;
    let apt = PrivateApt::new(cache_dir);
    apt.prepare(Archives::Binary)?;
    let log = cache_dir.join(format!("build-dep-{}.log", tree_name(&tree)));
    let step = Step::InstallingBuildDeps {
        package: tree_name(&tree),
    };
    apt.run_fresh(Archives::Binary, &log, step, progress, |apt| {
        apt.args(["build-dep", "-y", "-q", &format!("-P{PROFILES}")]).arg(&tree);
    })?;
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn unmet_dependencies_are_read_from_the_error_line() {
        let stderr = "dpkg-checkbuilddeps: error: Unmet build dependencies: debhelper-compat (= 13) libevent-dev\n";
        assert_eq!(
            unmet(stderr),
            Some((
                "missing build dependencies",
                "debhelper-compat (= 13) libevent-dev".to_string()
            ))
        );
        assert_eq!(unmet("something else\n"), None);
    }
}
