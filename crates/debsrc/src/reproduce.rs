//! Reproducing the installed build-id when the plain reference build does
//! not: Debian built the package against the headers of its build
//! dependencies *at build time*, and a `-dev` package installed here may
//! be at a version the archive no longer has (memcached 1.6.18-1+deb12u1
//! was built with libssl-dev 3.0.20; this machine has 3.0.19, which the
//! rebuild's DWARF records). Such "stale" `-dev` build dependencies are
//! found by comparing the installed version with the archive's, and each
//! archive version is tried as a header overlay (downloaded with
//! `apt-get download`, unpacked with `dpkg-deb -x`, never installed)
//! until one rebuild has the target's build-id.

use std::cmp::Ordering;
use std::path::{Path, PathBuf};
use std::process::Command;

use crate::apt::{io_error, Archives, PrivateApt};
use crate::builddeps::BuildDepsError;
use crate::command::{self, CommandError};
use crate::fetch::{cache_key, lock_cache, FetchError};
use crate::reference::{reference_build, BinaryMatch, ReferenceBuild, ReferenceError, ReferenceOptions};
use crate::{ProgressFn, Step};

/// A `-dev` build dependency installed at a version the archive does not
/// carry.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct StaleBuildDep {
    pub package: String,
    pub installed: String,
    /// The archive's versions, in the order they are worth trying: newer
    /// than the installed one first (nearest first; a package built after
    /// the installed version's release was built with it or a later one),
    /// then older ones (nearest first).
    pub archive_versions: Vec<String>,
}

/// One build of [`reproduce`].
#[derive(Debug, Clone, PartialEq, serde::Serialize, serde::Deserialize)]
pub struct ReproductionTry {
    /// `package=version` of the overlaid headers; `None` for the plain build.
    pub overlay: Option<String>,
    pub build_id: Option<String>,
    pub how: BinaryMatch,
    pub build_seconds: f64,
}

/// What [`reproduce`] found.
#[derive(Debug, Clone, PartialEq, serde::Serialize, serde::Deserialize)]
pub struct Reproduction {
    /// The build that matched best: by build-id if any did, else the plain one.
    pub build: ReferenceBuild,
    /// The header overlay that gave `build`, as `package=version`.
    pub overlay: Option<String>,
    pub stale: Vec<StaleBuildDep>,
    pub tries: Vec<ReproductionTry>,
}

/// The package names of the `Build-Depends` and `Build-Depends-Arch`
/// fields of a `debian/control` (every alternative; architecture
/// qualifiers, versions, restrictions and profiles dropped).
pub(crate) fn build_dep_names(control: &str) -> Vec<String> {
    let source_stanza = control.split("\n\n").next().unwrap_or("");
    let mut fields = String::new();
    let mut inside = false;
    for line in source_stanza.lines() {
        if line.starts_with(' ') || line.starts_with('\t') {
            if inside {
                fields.push(' ');
                fields.push_str(line.trim());
            }
            continue;
        }
        let name = line.split(':').next().unwrap_or("");
        inside = name.eq_ignore_ascii_case("Build-Depends") || name.eq_ignore_ascii_case("Build-Depends-Arch");
        if inside {
            fields.push(',');
            fields.push_str(line.split_once(':').map_or("", |(_, value)| value));
        }
    }
    let mut names: Vec<String> = fields
        .split([',', '|'])
        .filter_map(|relation| relation.split_whitespace().next())
        .map(|name| name.split(['(', '[', '<', ':']).next().unwrap_or("").to_string())
        .filter(|name| !name.is_empty() && !name.starts_with('$'))
        .collect();
    names.dedup();
    names
}

fn installed_version(package: &str) -> Result<Option<String>, CommandError> {
    let mut query = Command::new("dpkg-query");
    query.args(["-W", "-f=${db:Status-Abbrev}\t${Version}\n", package]);
    let output = command::query(&mut query)?;
    let text = String::from_utf8_lossy(&output.stdout);
    Ok(text
        .lines()
        .filter_map(|line| line.split_once('\t'))
        .find(|(status, _)| status.starts_with("ii"))
        .map(|(_, version)| version.to_string()))
}

/// Whether the installed `package` ships headers (files under
/// /usr/include): `dpkg-dev` ends in `-dev` but an overlay of it changes
/// nothing.
fn ships_headers(package: &str) -> Result<bool, CommandError> {
    let mut list = Command::new("dpkg-query");
    list.args(["-L", package]);
    let output = command::query(&mut list)?;
    Ok(String::from_utf8_lossy(&output.stdout)
        .lines()
        .any(|line| line.starts_with("/usr/include/")))
}

/// `dpkg --compare-versions`, as an ordering.
fn compare_versions(left: &str, right: &str) -> Result<Ordering, CommandError> {
    if left == right {
        return Ok(Ordering::Equal);
    }
    let mut compare = Command::new("dpkg");
    compare.args(["--compare-versions", left, "lt", right]);
    let output = command::query(&mut compare)?;
    Ok(if output.status.success() {
        Ordering::Less
    } else {
        Ordering::Greater
    })
}

/// The archive's versions of `package` (binary archives of the private
/// configuration), newest first.
fn archive_versions(apt: &PrivateApt, package: &str) -> Result<Vec<String>, CommandError> {
    let mut madison = Command::new("apt-cache");
    madison.args(apt.options(Archives::Binary)).args(["madison", package]);
    let output = command::query(&mut madison)?;
    command::check(&madison, &output)?;
    let text = String::from_utf8_lossy(&output.stdout);
    let mut versions: Vec<String> = text
        .lines()
        .filter_map(|line| line.split('|').nth(1))
        .map(|version| version.trim().to_string())
        .collect();
    versions.dedup();
    Ok(versions)
}

/// Orders versions to try: newer than `installed` ascending, then older
/// descending.
fn try_order(installed: &str, versions: &[String]) -> Result<Vec<String>, CommandError> {
    let mut newer = Vec::new();
    let mut older = Vec::new();
    for version in versions {
        match compare_versions(version, installed)? {
            Ordering::Greater => newer.push(version.clone()),
            Ordering::Less => older.push(version.clone()),
            Ordering::Equal => {}
        }
    }
    // apt-cache madison lists newest first.
    newer.reverse();
    Ok(newer.into_iter().chain(older).collect())
}

/// The `-dev` build dependencies of `tree` that ship headers and are
/// installed at a version the archive does not carry (their headers may
/// differ from Debian's build).
/// Reads binary package lists through the private configuration under
/// `cache_dir` (updated when empty).
pub fn stale_build_deps(
    tree: &Path,
    cache_dir: &Path,
    progress: ProgressFn<'_>,
) -> Result<Vec<StaleBuildDep>, BuildDepsError> {
    let control_path = tree.join("debian/control");
    let control = std::fs::read_to_string(&control_path).map_err(|_| BuildDepsError::NotDebianTree {
        tree: tree.to_path_buf(),
    })?;
    let _lock = lock_cache(cache_dir)?;
    let apt = PrivateApt::new(cache_dir);
    apt.prepare(Archives::Binary)?;
    if !apt.has_lists(Archives::Binary) {
        apt.update(Archives::Binary, &cache_dir.join("update-binary.log"), progress)?;
    }
    let mut stale = Vec::new();
    for package in build_dep_names(&control)
        .into_iter()
        .filter(|name| name.ends_with("-dev"))
    {
        let Some(installed) = installed_version(&package)? else {
            continue;
        };
        if !ships_headers(&package)? {
            continue;
        }
        let versions = archive_versions(&apt, &package)?;
        if versions.is_empty() || versions.contains(&installed) {
            continue;
        }
        let archive_versions = try_order(&installed, &versions)?;
        stale.push(StaleBuildDep {
            package,
            installed,
            archive_versions,
        });
    }
    Ok(stale)
}

/// `package` at `version`, unpacked (not installed) under
/// `CACHE/overlays/PACKAGE_VERSION/root`, for [`ReferenceOptions::header_overlays`].
/// Cached: a second call returns at once.
pub fn header_overlay(
    package: &str,
    version: &str,
    cache_dir: &Path,
    progress: ProgressFn<'_>,
) -> Result<PathBuf, FetchError> {
    let folder = cache_dir.join("overlays").join(cache_key(package, version));
    let root = folder.join("root");
    if root.is_dir() {
        return Ok(root);
    }
    let _lock = lock_cache(cache_dir)?;
    let apt = PrivateApt::new(cache_dir);
    apt.prepare(Archives::Binary)?;
    let download = folder.join("download");
    if download.exists() {
        std::fs::remove_dir_all(&download).map_err(io_error(&download))?;
    }
    std::fs::create_dir_all(&download).map_err(io_error(&download))?;
    let log = folder.join("download.log");
    let step = Step::DownloadingOverlay {
        package: package.to_string(),
        version: version.to_string(),
    };
    apt.run_fresh(Archives::Binary, &log, step, progress, |apt| {
        apt.arg("download")
            .arg(format!("{package}={version}"))
            .current_dir(&download);
    })?;
    let deb = std::fs::read_dir(&download)
        .map_err(io_error(&download))?
        .flatten()
        .map(|entry| entry.path())
        .find(|path| path.extension().is_some_and(|extension| extension == "deb"))
        .ok_or_else(|| FetchError::NoTree {
            package: package.to_string(),
            version: version.to_string(),
            dir: download.clone(),
        })?;
    let unpacking = folder.join("root.partial");
    if unpacking.exists() {
        std::fs::remove_dir_all(&unpacking).map_err(io_error(&unpacking))?;
    }
    let mut unpack = Command::new("dpkg-deb");
    unpack.arg("-x").arg(&deb).arg(&unpacking);
    let output = command::query(&mut unpack)?;
    command::check(&unpack, &output)?;
    std::fs::rename(&unpacking, &root).map_err(io_error(&root))?;
    std::fs::remove_dir_all(&download).map_err(io_error(&download))?;
    Ok(root)
}

/// The reference build, then, if its build-id is not the target's, one
/// rebuild per archive version of each stale `-dev` build dependency
/// (as a header overlay, at most `max_overlay_builds` of them) until one
/// has the target's build-id. Each build goes in its own folder beside
/// `options.work_dir` (`WORK`, `WORK-PACKAGE_VERSION`).
pub fn reproduce(
    source: &Path,
    target: &Path,
    options: &ReferenceOptions,
    cache_dir: &Path,
    max_overlay_builds: usize,
    progress: ProgressFn<'_>,
) -> Result<Reproduction, ReferenceError> {
    let record = |build: &ReferenceBuild, overlay: Option<String>| ReproductionTry {
        overlay,
        build_id: build
            .matched
            .as_ref()
            .and_then(|binary| binary.build_id.clone())
            .or_else(|| {
                let name = target.file_name();
                build
                    .binaries
                    .iter()
                    .find(|binary| binary.path.file_name() == name)
                    .and_then(|binary| binary.build_id.clone())
            }),
        how: build.how,
        build_seconds: build.build_seconds,
    };
    let plain = reference_build(source, target, options, progress)?;
    let mut tries = vec![record(&plain, None)];
    if plain.how == BinaryMatch::BuildId {
        return Ok(Reproduction {
            build: plain,
            overlay: None,
            stale: Vec::new(),
            tries,
        });
    }
    let stale = stale_build_deps(source, cache_dir, progress)?;
    let candidates = stale
        .iter()
        .flat_map(|dep| {
            dep.archive_versions
                .iter()
                .map(move |version| (dep.package.as_str(), version.as_str()))
        })
        .take(max_overlay_builds);
    for (package, version) in candidates {
        let root = header_overlay(package, version, cache_dir, progress).map_err(BuildDepsError::from)?;
        let mut overlaid = options.clone();
        let mut work = options.work_dir.clone().into_os_string();
        work.push(format!("-{}", cache_key(package, version)));
        overlaid.work_dir = PathBuf::from(work);
        overlaid.header_overlays.push(root);
        let build = reference_build(source, target, &overlaid, progress)?;
        let overlay = format!("{package}={version}");
        tries.push(record(&build, Some(overlay.clone())));
        if build.how == BinaryMatch::BuildId {
            return Ok(Reproduction {
                build,
                overlay: Some(overlay),
                stale,
                tries,
            });
        }
    }
    Ok(Reproduction {
        build: plain,
        overlay: None,
        stale,
        tries,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn build_dependency_names_drop_versions_qualifiers_and_profiles() {
        let control = "Source: memcached\nSection: web\nBuild-Depends:\n adduser,\n debhelper-compat (= 13),\n libevent-dev,\n libio-socket-ssl-perl <!nocheck>,\n libsasl2-dev, libssl-dev | libssl1.0-dev [amd64], python3:any\nBuild-Depends-Indep: doc-only\nStandards-Version: 4.6.1\n\nPackage: memcached\nDepends: libc6\n";
        assert_eq!(
            build_dep_names(control),
            [
                "adduser",
                "debhelper-compat",
                "libevent-dev",
                "libio-socket-ssl-perl",
                "libsasl2-dev",
                "libssl-dev",
                "libssl1.0-dev",
                "python3"
            ]
        );
    }
}
