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
use std::collections::{HashMap, HashSet};
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
    /// The headers it ships (installed version).
    #[serde(default)]
    pub headers: Vec<String>,
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
    /// Stale build dependencies not tried: the plain rebuild of the
    /// target's binary read none of their headers.
    #[serde(default)]
    pub unused: Vec<String>,
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

/// The files the installed `package` ships under /usr/include (none:
/// `dpkg-dev` ends in `-dev` but an overlay of it changes nothing).
fn header_files(package: &str) -> Result<Vec<String>, CommandError> {
    let mut list = Command::new("dpkg-query");
    list.args(["-L", package]);
    let output = command::query(&mut list)?;
    Ok(String::from_utf8_lossy(&output.stdout)
        .lines()
        .filter(|line| line.starts_with("/usr/include/"))
        .map(str::to_string)
        .collect())
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

/// The archive's versions of each of `packages` (binary archives of the
/// private configuration), newest first, from one `apt-cache madison`
/// (one run per package took about a second each: 20 s for lighttpd's
/// build dependencies).
fn archive_versions(apt: &PrivateApt, packages: &[&str]) -> Result<HashMap<String, Vec<String>>, CommandError> {
    let mut versions: HashMap<String, Vec<String>> = HashMap::new();
    if packages.is_empty() {
        return Ok(versions);
    }
    let mut madison = Command::new("apt-cache");
    madison
        .args(apt.options(Archives::Binary))
        .arg("madison")
        .args(packages);
    let output = command::query(&mut madison)?;
    command::check(&madison, &output)?;
    for line in String::from_utf8_lossy(&output.stdout).lines() {
        let mut fields = line.split('|').map(str::trim);
        let (Some(package), Some(version)) = (fields.next(), fields.next()) else {
            continue;
        };
        let known = versions.entry(package.to_string()).or_default();
        if known.last().map(String::as_str) != Some(version) {
            known.push(version.to_string());
        }
    }
    Ok(versions)
}

/// The files a linked binary was compiled from, headers included, as
/// its DWARF line tables name them (absolute paths; relative ones joined
/// to their directory and compilation directory). `None` when it has no
/// line tables to read (no overlay can then be ruled out).
pub fn compiled_files(binary: &Path) -> Option<HashSet<PathBuf>> {
    use object::{Object, ObjectSection};
    let bytes = std::fs::read(binary).ok()?;
    let file = object::File::parse(&*bytes).ok()?;
    let load = |id: gimli::SectionId| -> Result<std::borrow::Cow<'_, [u8]>, gimli::Error> {
        Ok(file
            .section_by_name(id.name())
            .and_then(|section| section.uncompressed_data().ok())
            .unwrap_or(std::borrow::Cow::Borrowed(&[])))
    };
    let sections = gimli::DwarfSections::load(load).ok()?;
    let dwarf = sections.borrow(|section| gimli::EndianSlice::new(section, gimli::LittleEndian));
    let mut files = HashSet::new();
    let mut units = dwarf.units();
    while let Ok(Some(header)) = units.next() {
        let Ok(unit) = dwarf.unit(header) else { continue };
        let Some(program) = unit.line_program.as_ref() else {
            continue;
        };
        let header = program.header();
        let comp_dir = unit
            .comp_dir
            .map(|dir| PathBuf::from(dir.to_string_lossy().into_owned()))
            .unwrap_or_default();
        for entry in header.file_names() {
            let name = dwarf.attr_string(&unit, entry.path_name()).ok();
            let dir = entry
                .directory(header)
                .and_then(|dir| dwarf.attr_string(&unit, dir).ok());
            let Some(name) = name else { continue };
            let mut path = comp_dir.clone();
            if let Some(dir) = dir {
                path.push(dir.to_string_lossy().as_ref());
            }
            path.push(name.to_string_lossy().as_ref());
            files.insert(path);
        }
    }
    (!files.is_empty()).then_some(files)
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
    let mut candidates = Vec::new();
    for package in build_dep_names(&control)
        .into_iter()
        .filter(|name| name.ends_with("-dev"))
    {
        let Some(installed) = installed_version(&package)? else {
            continue;
        };
        let headers = header_files(&package)?;
        if !headers.is_empty() {
            candidates.push((package, installed, headers));
        }
    }
    let names: Vec<&str> = candidates.iter().map(|(package, _, _)| package.as_str()).collect();
    let mut versions = archive_versions(&apt, &names)?;
    let mut stale = Vec::new();
    for (package, installed, headers) in candidates {
        let versions = versions.remove(&package).unwrap_or_default();
        if versions.is_empty() || versions.contains(&installed) {
            continue;
        }
        let archive_versions = try_order(&installed, &versions)?;
        stale.push(StaleBuildDep {
            package,
            installed,
            archive_versions,
            headers,
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
            unused: Vec::new(),
            tries,
        });
    }
    let stale = stale_build_deps(source, cache_dir, progress)?;
    // An overlay of headers the target's binary was not compiled from
    // cannot change it (lighttpd's TLS `-dev` packages are for its
    // modules, not /usr/sbin/lighttpd): each would be a whole package
    // build for nothing.
    let target_name = target.file_name();
    let compiled = plain
        .binaries
        .iter()
        .find(|binary| binary.path.file_name() == target_name)
        .and_then(|binary| compiled_files(&binary.path));
    let (relevant, unused): (Vec<&StaleBuildDep>, Vec<&StaleBuildDep>) =
        stale.iter().partition(|dep| match &compiled {
            Some(files) => dep.headers.iter().any(|header| files.contains(Path::new(header))),
            None => true,
        });
    let unused: Vec<String> = unused.iter().map(|dep| dep.package.clone()).collect();
    let candidates = relevant
        .into_iter()
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
                unused,
                tries,
            });
        }
    }
    Ok(Reproduction {
        build: plain,
        overlay: None,
        stale,
        unused,
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
