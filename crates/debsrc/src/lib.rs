//! Debian source packages for the binary that is running: which installed
//! package owns a binary and at which exact version ([`resolve_binary`],
//! [`resolve_process`]), that version's source fetched with `apt-get source`
//! against a private sources list and private lists folder and cached by
//! package and version ([`fetch_source`]), its build dependencies checked
//! or installed ([`check_build_deps`], [`install_build_deps`]), and a
//! reference build with the package's own `debian/rules` in a copy of the
//! tree, whose unstripped binaries are compared with the installed one by
//! GNU build-id ([`reference_build`]); when the build-id differs, the
//! headers of `-dev` build dependencies installed at versions the archive
//! no longer carries are swapped for the archive's, one version at a time,
//! until it matches ([`reproduce`]).
//!
//! The machine's apt state is never written: every apt command runs with
//! `Dir::Etc::SourceList=/dev/null`, `Dir::Etc::SourceParts` pointing at a
//! folder of our own (the system's Debian entries rewritten to
//! `Types: deb-src`), and `Dir::State::Lists` / `Dir::Cache` inside the
//! cache folder. Only [`install_build_deps`] changes the system, on
//! purpose: it installs packages (for CI and throwaway machines).
//!
//! `shadowpatch build` (crates/build) calls this crate; docs/debian-source.md
//! is the user guide.

#![forbid(unsafe_code)]

mod apt;
mod builddeps;
mod command;
mod elf;
mod fetch;
mod owner;
mod reference;
mod reproduce;

use std::path::{Path, PathBuf};
use std::time::Duration;

pub use apt::{debian_entries, PrivateApt};
pub use builddeps::{check_build_deps, install_build_deps, BuildDepsError};
pub use command::CommandError;
pub use elf::{build_id_hex, BuildIdError};
pub use fetch::{fetch_source, FetchError, SourceTree};
pub use owner::{resolve_binary, resolve_process, InstalledBinary, ResolveError};
pub use reference::{reference_build, BinaryMatch, BuiltBinary, ReferenceBuild, ReferenceError, ReferenceOptions};
pub use reproduce::{
    compiled_files, header_overlay, reproduce, stale_build_deps, Reproduction, ReproductionTry, StaleBuildDep,
};

/// A long step this crate is taking, for a progress display.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Step {
    /// `apt-get update` into the private lists folder.
    UpdatingLists,
    /// `apt-get source PACKAGE=VERSION` (download and unpack).
    FetchingSource { package: String, version: String },
    /// `apt-get download PACKAGE=VERSION` of a header overlay (not installed).
    DownloadingOverlay { package: String, version: String },
    /// `apt-get build-dep` (installs packages on this machine).
    InstallingBuildDeps { package: String },
    /// Copying the source tree to the build folder.
    CopyingTree,
    /// The package's own build (`dpkg-buildpackage -T build`).
    Building { command: String },
    /// Reading the ELF files the build left, for their build-ids.
    ScanningBinaries,
}

/// What the progress callback is told.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Progress {
    Started(Step),
    /// One line of the running command's output (also written to its log).
    Output(String),
    Finished(Step, Duration),
}

/// The callback type every long operation takes; `&mut |_| {}` for none.
pub type ProgressFn<'a> = &'a mut dyn FnMut(Progress);

/// The cache folder when the caller names none: `STATE_DIR/debsrc` when a
/// shadowpatch state folder is given, else `$XDG_CACHE_HOME/shadowpatch/debsrc`,
/// else `$HOME/.cache/shadowpatch/debsrc`, else `/var/cache/shadowpatch/debsrc`.
pub fn default_cache_dir(state_dir: Option<&Path>) -> PathBuf {
    if let Some(state) = state_dir {
        return state.join("debsrc");
    }
    let non_empty = |name: &str| std::env::var_os(name).filter(|value| !value.is_empty());
    if let Some(cache) = non_empty("XDG_CACHE_HOME") {
        return PathBuf::from(cache).join("shadowpatch/debsrc");
    }
    if let Some(home) = non_empty("HOME") {
        return PathBuf::from(home).join(".cache/shadowpatch/debsrc");
    }
    PathBuf::from("/var/cache/shadowpatch/debsrc")
}

/// Times `work` as one [`Step`], telling `progress` when it starts and ends.
pub(crate) fn timed_step<T>(progress: ProgressFn<'_>, step: Step, work: impl FnOnce(ProgressFn<'_>) -> T) -> T {
    let started = std::time::Instant::now();
    progress(Progress::Started(step.clone()));
    let result = work(&mut *progress);
    progress(Progress::Finished(step, started.elapsed()));
    result
}
