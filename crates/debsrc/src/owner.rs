//! Which installed package owns a binary, and at which exact version:
//! `dpkg-query -S` on the file's real path (symlinked commands and
//! alternatives followed) and on its /usr-merge alias (dpkg may have
//! `/bin/ls` registered while the file is reached as `/usr/bin/ls`), then
//! `dpkg-query -W` for the binary package's version and its source
//! package's name and version (they differ for binNMUs and for source
//! packages that build several binaries).

use std::path::{Path, PathBuf};
use std::process::Command;

use crate::command::{self, CommandError};
use crate::elf::{build_id_hex, BuildIdError};

/// A binary on this machine and the installed package it came from.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct InstalledBinary {
    /// The path asked about (a command, a symlink, a running module).
    pub path: PathBuf,
    /// The path dpkg has registered for the file.
    pub registered_path: PathBuf,
    /// The binary package, architecture-qualified when dpkg qualifies it
    /// (`libc6:amd64`).
    pub package: String,
    /// The installed version of the binary package.
    pub version: String,
    pub architecture: String,
    /// The source package and its version, which `apt-get source` takes.
    pub source_package: String,
    pub source_version: String,
    /// The GNU build-id (hex) of the image: for a process, of the image it
    /// is running.
    pub build_id: String,
}

/// Resolving a binary to its package failed.
#[derive(Debug, thiserror::Error)]
pub enum ResolveError {
    #[error("{}: {source}", .path.display())]
    Path {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("{} belongs to no installed package (dpkg-query -S found none of: {tried})", .path.display())]
    NotPackaged { path: PathBuf, tried: String },
    #[error("package {package} owns {} but is not installed (dpkg-query -W: {status})", .path.display())]
    NotInstalled {
        path: PathBuf,
        package: String,
        status: String,
    },
    #[error("unexpected dpkg-query output for {package}: {line:?}")]
    Unparsed { package: String, line: String },
    #[error(transparent)]
    Command(#[from] CommandError),
    #[error(transparent)]
    Elf(#[from] BuildIdError),
    #[error("process {pid}: {source}")]
    Process {
        pid: i32,
        #[source]
        source: procfs::ProcError,
    },
    #[error("process {pid} maps no module named {module:?}")]
    ModuleNotFound { pid: i32, module: String },
    #[error(
        "process {pid} runs {} with build-id {running} but the installed file has {installed} (upgraded since the process started?)",
        .path.display()
    )]
    RunningIsNotInstalled {
        pid: i32,
        path: PathBuf,
        running: String,
        installed: String,
    },
}

impl shadowpatch_failure::Classify for ResolveError {
    fn class(&self) -> shadowpatch_failure::FailureClass {
        match self {
            ResolveError::Path { source, .. } => shadowpatch_failure::class_of_io(source),
            ResolveError::Elf(error) => error.class(),
            _ => shadowpatch_failure::FailureClass::BadInput,
        }
    }
}

/// The top-level folders that /usr-merge turned into symlinks into /usr.
const MERGED: [&str; 6] = ["bin", "sbin", "lib", "lib32", "lib64", "libx32"];

/// The paths dpkg may have registered for the file at `real` (already
/// canonical): itself, then its alias on the other side of /usr-merge.
fn registration_candidates(real: &Path) -> Vec<PathBuf> {
    let mut candidates = vec![real.to_path_buf()];
    let mut parts = real
        .components()
        .skip(1)
        .map(|part| part.as_os_str().to_string_lossy().into_owned());
    let first = parts.next().unwrap_or_default();
    if first == "usr" {
        let second = parts.next().unwrap_or_default();
        if MERGED.contains(&second.as_str()) {
            candidates.push(Path::new("/").join(real.strip_prefix("/usr").unwrap_or(real)));
        }
    } else if MERGED.contains(&first.as_str()) {
        candidates.push(Path::new("/usr").join(real.strip_prefix("/").unwrap_or(real)));
    }
    candidates
}

/// The package that `dpkg-query -S` says owns exactly `path`, if any.
/// Its lines are `pkg[, pkg...]: /path`, plus `diversion by ...` lines.
fn owner_of(path: &Path) -> Result<Option<String>, CommandError> {
    let mut query = Command::new("dpkg-query");
    query.arg("-S").arg(path);
    let output = command::query(&mut query)?;
    let wanted = format!(": {}", path.display());
    Ok(String::from_utf8_lossy(&output.stdout)
        .lines()
        .filter(|line| !line.starts_with("diversion by "))
        .find_map(|line| line.strip_suffix(&wanted))
        .and_then(|packages| packages.split(", ").next())
        .map(str::to_string))
}

/// The package, version and source of the installed binary package.
fn installed(path: &Path, registered: &Path, package: &str, build_id: String) -> Result<InstalledBinary, ResolveError> {
    let mut query = Command::new("dpkg-query");
    query
        .arg("-W")
        .arg("-f=${db:Status-Abbrev}\t${Version}\t${Architecture}\t${source:Package}\t${source:Version}\n")
        .arg(package);
    let output = command::query(&mut query)?;
    command::check(&query, &output)?;
    let text = String::from_utf8_lossy(&output.stdout);
    let line = text.lines().next().unwrap_or("");
    let fields: Vec<&str> = line.split('\t').collect();
    let [status, version, architecture, source_package, source_version] = fields[..] else {
        return Err(ResolveError::Unparsed {
            package: package.to_string(),
            line: line.to_string(),
        });
    };
    // "ii " is installed; "rc" (config files only) and the like are not.
    if !status.starts_with("ii") {
        return Err(ResolveError::NotInstalled {
            path: path.to_path_buf(),
            package: package.to_string(),
            status: status.trim().to_string(),
        });
    }
    Ok(InstalledBinary {
        path: path.to_path_buf(),
        registered_path: registered.to_path_buf(),
        package: package.to_string(),
        version: version.to_string(),
        architecture: architecture.to_string(),
        source_package: source_package.to_string(),
        source_version: source_version.to_string(),
        build_id,
    })
}

fn resolve_with_build_id(path: &Path, build_id: String) -> Result<InstalledBinary, ResolveError> {
    let real = std::fs::canonicalize(path).map_err(|source| ResolveError::Path {
        path: path.to_path_buf(),
        source,
    })?;
    let mut candidates = registration_candidates(&real);
    // A package may ship the symlink itself and the file reached through it
    // may be nobody's (a hand-made link): ask about the path given last.
    if !candidates.iter().any(|candidate| candidate == path) && path.is_absolute() {
        candidates.push(path.to_path_buf());
    }
    for candidate in &candidates {
        if let Some(package) = owner_of(candidate)? {
            return installed(path, candidate, &package, build_id);
        }
    }
    let tried = candidates
        .iter()
        .map(|candidate| candidate.display().to_string())
        .collect::<Vec<_>>()
        .join(", ");
    Err(ResolveError::NotPackaged {
        path: path.to_path_buf(),
        tried,
    })
}

/// The installed package that owns the binary at `path` (a command name
/// must already be resolved to a path; symlinks are followed).
pub fn resolve_binary(path: &Path) -> Result<InstalledBinary, ResolveError> {
    let build_id = build_id_hex(path)?;
    resolve_with_build_id(path, build_id)
}

/// Whether the mapped file is the module asked for: its full path, its
/// file name, or a name the file name extends with a version
/// (`libevent-2.1.so.7` maps as `libevent-2.1.so.7.0.1`).
fn module_matches(mapped: &Path, module: &str) -> bool {
    let name = mapped
        .file_name()
        .map(|name| name.to_string_lossy())
        .unwrap_or_default();
    mapped.as_os_str() == module
        || name == module
        || name.strip_prefix(module).is_some_and(|rest| rest.starts_with('.'))
}

/// The installed package of the module a running process maps: its main
/// executable when `module` is `None`, else the first mapped file that
/// `module_matches` `module`. The build-id is the running image's (read
/// through /proc, so a file replaced on disk since is not mistaken for
/// it); a mismatch with the installed file is an error.
pub fn resolve_process(pid: i32, module: Option<&str>) -> Result<InstalledBinary, ResolveError> {
    let process_error = |source| ResolveError::Process { pid, source };
    let process = procfs::process::Process::new(pid).map_err(process_error)?;
    let (path, running_image) = match module {
        None => {
            let exe = process.exe().map_err(process_error)?;
            (exe, PathBuf::from(format!("/proc/{pid}/exe")))
        }
        Some(module) => {
            let maps = process.maps().map_err(process_error)?;
            let found = maps.iter().find_map(|map| match &map.pathname {
                procfs::process::MMapPath::Path(mapped) if module_matches(mapped, module) => {
                    Some((mapped.clone(), map.address))
                }
                _ => None,
            });
            let (mapped, (start, end)) = found.ok_or_else(|| ResolveError::ModuleNotFound {
                pid,
                module: module.to_string(),
            })?;
            (
                mapped,
                PathBuf::from(format!("/proc/{pid}/map_files/{start:x}-{end:x}")),
            )
        }
    };
    // The kernel marks an unlinked image " (deleted)"; the installed file,
    // if any, is at the path without it.
    let path = match path.to_str().and_then(|text| text.strip_suffix(" (deleted)")) {
        Some(stripped) => PathBuf::from(stripped),
        None => path,
    };
    let on_disk = build_id_hex(&path)?;
    let running = match build_id_hex(&running_image) {
        Ok(running) => running,
        // map_files needs CAP_SYS_ADMIN, and another user's exe link
        // ptrace access: without them the file on disk is all we can read.
        Err(BuildIdError::Read { source, .. }) if source.kind() == std::io::ErrorKind::PermissionDenied => {
            on_disk.clone()
        }
        Err(error) => return Err(error.into()),
    };
    if running != on_disk {
        return Err(ResolveError::RunningIsNotInstalled {
            pid,
            path,
            running,
            installed: on_disk,
        });
    }
    resolve_with_build_id(&path, running)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn usr_merge_aliases_go_both_ways() {
        assert_eq!(
            registration_candidates(Path::new("/usr/bin/memcached")),
            [PathBuf::from("/usr/bin/memcached"), PathBuf::from("/bin/memcached")]
        );
        assert_eq!(
            registration_candidates(Path::new("/lib/x86_64-linux-gnu/libc.so.6")),
            [
                PathBuf::from("/lib/x86_64-linux-gnu/libc.so.6"),
                PathBuf::from("/usr/lib/x86_64-linux-gnu/libc.so.6")
            ]
        );
        assert_eq!(
            registration_candidates(Path::new("/usr/share/x")),
            [PathBuf::from("/usr/share/x")]
        );
        assert_eq!(
            registration_candidates(Path::new("/opt/bin/x")),
            [PathBuf::from("/opt/bin/x")]
        );
    }
}
