//! The exact source of an installed package: `apt-get source PKG=VERSION`
//! through the private apt configuration, unpacked (with Debian's patches
//! applied, by `dpkg-source -x`) under `CACHE/source/PKG_VERSION/`. A
//! finished fetch leaves a `.complete` marker naming the tree, so the
//! second call for the same package and version returns at once; a fetch
//! is done in a `.partial-*` folder and renamed into place, so an
//! interrupted one is never mistaken for a tree.

use std::fs::File;
use std::path::{Path, PathBuf};
use std::time::Instant;

use nix::fcntl::{Flock, FlockArg};

use crate::apt::{io_error, Archives, PrivateApt};
use crate::command::CommandError;
use crate::{ProgressFn, Step};

const COMPLETE: &str = ".complete";

/// An unpacked Debian source tree in the cache.
#[derive(Debug, Clone, PartialEq, serde::Serialize, serde::Deserialize)]
pub struct SourceTree {
    pub package: String,
    pub version: String,
    /// The unpacked tree (`.../memcached-1.6.18`), patches applied.
    pub dir: PathBuf,
    /// Whether it was already in the cache.
    pub from_cache: bool,
    /// Time taken by this call.
    pub seconds: f64,
}

/// Fetching a source package failed.
#[derive(Debug, thiserror::Error)]
pub enum FetchError {
    #[error("{}: {source}", .path.display())]
    Io {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("no Debian entries in {}/sources.list or sources.list.d to take deb-src entries from", .etc_apt.display())]
    NoDebianSources { etc_apt: PathBuf },
    #[error("`{tool}` is not installed (apt-get source needs it to unpack): install the {package} package")]
    ToolMissing { tool: &'static str, package: &'static str },
    #[error(
        "source {package} {version} is not in the configured Debian archives, or its mirror does not serve its files (superseded by a newer upload? see snapshot.debian.org; or give --source with a tree of that version) (log: {})",
        .log.display()
    )]
    VersionNotFound {
        package: String,
        version: String,
        log: PathBuf,
    },
    #[error("apt-get source {package}={version} unpacked no tree in {}", .dir.display())]
    NoTree {
        package: String,
        version: String,
        dir: PathBuf,
    },
    #[error("cannot lock {}: {source}", .path.display())]
    Lock {
        path: PathBuf,
        #[source]
        source: nix::Error,
    },
    #[error(transparent)]
    Command(#[from] CommandError),
}

impl shadowpatch_failure::Classify for FetchError {
    fn class(&self) -> shadowpatch_failure::FailureClass {
        match self {
            FetchError::Io { source, .. } => shadowpatch_failure::class_of_io(source),
            _ => shadowpatch_failure::FailureClass::BadInput,
        }
    }
}

/// The cache key of a package version: safe in a path and in a Makefile
/// (an epoch's `:` is not).
pub(crate) fn cache_key(package: &str, version: &str) -> String {
    format!("{package}_{version}").replace([':', '/'], "_")
}

/// Whether an executable named `tool` is on PATH.
pub(crate) fn on_path(tool: &str) -> bool {
    std::env::var_os("PATH")
        .map(|path| std::env::split_paths(&path).any(|dir| dir.join(tool).is_file()))
        .unwrap_or(false)
}

/// Holds the cache's apt lock (one apt run at a time on the private
/// lists) until dropped.
pub(crate) fn lock_cache(cache_dir: &Path) -> Result<Flock<File>, FetchError> {
    std::fs::create_dir_all(cache_dir).map_err(|source| FetchError::Io {
        path: cache_dir.to_path_buf(),
        source,
    })?;
    let path = cache_dir.join(".lock");
    let file = File::options()
        .create(true)
        .truncate(false)
        .write(true)
        .open(&path)
        .map_err(|source| FetchError::Io {
            path: path.clone(),
            source,
        })?;
    Flock::lock(file, FlockArg::LockExclusive).map_err(|(_, source)| FetchError::Lock { path, source })
}

fn cached(folder: &Path) -> Option<PathBuf> {
    let name = std::fs::read_to_string(folder.join(COMPLETE)).ok()?;
    let dir = folder.join(name.trim());
    dir.is_dir().then_some(dir)
}

/// The unpacked source of `package` at exactly `version` (a source
/// package name and version, as [`crate::InstalledBinary`] gives them),
/// from the cache under `cache_dir` or fetched into it.
pub fn fetch_source(
    package: &str,
    version: &str,
    cache_dir: &Path,
    progress: ProgressFn<'_>,
) -> Result<SourceTree, FetchError> {
    let started = Instant::now();
    let folder = cache_dir.join("source").join(cache_key(package, version));
    let tree = |dir: PathBuf, from_cache: bool| SourceTree {
        package: package.to_string(),
        version: version.to_string(),
        dir,
        from_cache,
        seconds: started.elapsed().as_secs_f64(),
    };
    if let Some(dir) = cached(&folder) {
        return Ok(tree(dir, true));
    }
    let _lock = lock_cache(cache_dir)?;
    // Another process may have fetched it while we waited for the lock.
    if let Some(dir) = cached(&folder) {
        return Ok(tree(dir, true));
    }
    if !on_path("dpkg-source") {
        return Err(FetchError::ToolMissing {
            tool: "dpkg-source",
            package: "dpkg-dev",
        });
    }
    let apt = PrivateApt::new(cache_dir);
    apt.prepare(Archives::Source)?;
    let sources = cache_dir.join("source");
    std::fs::create_dir_all(&sources).map_err(io_error(&sources))?;
    // We hold the lock: any partial fetch here is an interrupted one.
    for entry in std::fs::read_dir(&sources).map_err(io_error(&sources))?.flatten() {
        if entry.file_name().to_string_lossy().starts_with(".partial-") {
            std::fs::remove_dir_all(entry.path()).map_err(io_error(&entry.path()))?;
        }
    }
    let partial = sources.join(format!(".partial-{}", cache_key(package, version)));
    std::fs::create_dir_all(&partial).map_err(io_error(&partial))?;
    let log = partial.join("fetch.log");
    let step = Step::FetchingSource {
        package: package.to_string(),
        version: version.to_string(),
    };
    let fetched = apt.run_fresh(Archives::Source, &log, step, progress, |apt| {
        apt.arg("source")
            .arg("--only-source")
            .arg(format!("{package}={version}"))
            .current_dir(&partial);
    });
    match fetched {
        Ok(()) => {}
        // Listed but not served: the archive's index names the version and
        // the mirror has not its files (a 404); as unusable as unlisted.
        Err(FetchError::Command(CommandError::Failed { tail, .. }))
            if tail.contains("Can not find version")
                || tail.contains("Unable to find a source package")
                || (tail.contains("Failed to fetch") && tail.contains("404")) =>
        {
            let kept = cache_dir
                .join("source")
                .join(format!("{}.fetch.log", cache_key(package, version)));
            std::fs::rename(&log, &kept).map_err(io_error(&log))?;
            std::fs::remove_dir_all(&partial).map_err(io_error(&partial))?;
            return Err(FetchError::VersionNotFound {
                package: package.to_string(),
                version: version.to_string(),
                log: kept,
            });
        }
        Err(error) => return Err(error),
    }
    let unpacked: Vec<PathBuf> = std::fs::read_dir(&partial)
        .map_err(io_error(&partial))?
        .flatten()
        .filter(|entry| entry.file_type().is_ok_and(|kind| kind.is_dir()))
        .map(|entry| entry.path())
        .collect();
    let [dir] = &unpacked[..] else {
        return Err(FetchError::NoTree {
            package: package.to_string(),
            version: version.to_string(),
            dir: partial,
        });
    };
    let name = dir.file_name().unwrap_or_default().to_string_lossy().into_owned();
    std::fs::write(partial.join(COMPLETE), format!("{name}\n")).map_err(io_error(&partial))?;
    if folder.exists() {
        // A leftover without its marker: an older interrupted layout.
        std::fs::remove_dir_all(&folder).map_err(io_error(&folder))?;
    }
    std::fs::rename(&partial, &folder).map_err(io_error(&folder))?;
    Ok(tree(folder.join(name), false))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn an_epoch_does_not_reach_the_path() {
        assert_eq!(cache_key("nginx", "1:1.22.1-9"), "nginx_1_1.22.1-9");
        assert_eq!(cache_key("memcached", "1.6.18-1+deb12u1"), "memcached_1.6.18-1+deb12u1");
    }
}
