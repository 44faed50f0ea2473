//! A private apt configuration: the system's Debian entries (from
//! /etc/apt/sources.list and /etc/apt/sources.list.d/*.{list,sources})
//! rewritten to the types we need, in a folder of our own, with lists and
//! archives folders of our own. apt is pointed at them with `-o` options,
//! so the machine's sources, lists and caches are read but never written.

use std::path::{Path, PathBuf};
use std::process::Command;

use crate::command::{self, CommandError};
use crate::fetch::FetchError;
use crate::{timed_step, ProgressFn, Step};

/// Which archives a private configuration reads.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Archives {
    /// `deb-src` only: enough for `apt-get source`.
    Source,
    /// `deb` only: what `apt-get build-dep ./TREE` needs to install.
    Binary,
}

impl Archives {
    fn types(self) -> &'static str {
        match self {
            Archives::Source => "deb-src",
            Archives::Binary => "deb",
        }
    }
    fn name(self) -> &'static str {
        match self {
            Archives::Source => "source",
            Archives::Binary => "binary",
        }
    }
}

/// The private apt folders under a cache folder (`CACHE/apt`).
#[derive(Debug, Clone)]
pub struct PrivateApt {
    root: PathBuf,
    etc_apt: PathBuf,
}

pub(crate) fn io_error(path: &Path) -> impl FnOnce(std::io::Error) -> FetchError + '_ {
    move |source| FetchError::Io {
        path: path.to_path_buf(),
        source,
    }
}

impl PrivateApt {
    /// The private configuration under `cache_dir`, copying its entries
    /// from `/etc/apt`.
    pub fn new(cache_dir: &Path) -> PrivateApt {
        PrivateApt {
            root: cache_dir.join("apt"),
            etc_apt: PathBuf::from("/etc/apt"),
        }
    }

    /// The same, copying entries from another folder laid out as /etc/apt.
    pub fn with_etc_apt(cache_dir: &Path, etc_apt: &Path) -> PrivateApt {
        PrivateApt {
            root: cache_dir.join("apt"),
            etc_apt: etc_apt.to_path_buf(),
        }
    }

    fn dir(&self, archives: Archives, what: &str) -> PathBuf {
        self.root.join(archives.name()).join(what)
    }

    /// The `-o` options that make apt use only our folders.
    pub(crate) fn options(&self, archives: Archives) -> Vec<String> {
        vec![
            "-o".into(),
            "Dir::Etc::SourceList=/dev/null".into(),
            "-o".into(),
            format!(
                "Dir::Etc::SourceParts={}",
                self.dir(archives, "sources.list.d").display()
            ),
            "-o".into(),
            format!("Dir::State::Lists={}", self.dir(archives, "lists").display()),
            "-o".into(),
            format!("Dir::Cache={}", self.dir(archives, "cache").display()),
        ]
    }

    /// Writes the rewritten entries and creates the folders apt expects.
    /// Rewritten every time: the system's entries may have changed.
    pub(crate) fn prepare(&self, archives: Archives) -> Result<(), FetchError> {
        let entries = debian_entries(&self.etc_apt, archives.types())?;
        if entries.is_empty() {
            return Err(FetchError::NoDebianSources {
                etc_apt: self.etc_apt.clone(),
            });
        }
        let parts = self.dir(archives, "sources.list.d");
        for folder in [
            parts.clone(),
            self.dir(archives, "lists").join("partial"),
            self.dir(archives, "cache").join("archives/partial"),
        ] {
            std::fs::create_dir_all(&folder).map_err(io_error(&folder))?;
        }
        for stale in std::fs::read_dir(&parts).map_err(io_error(&parts))? {
            let stale = stale.map_err(io_error(&parts))?.path();
            std::fs::remove_file(&stale).map_err(io_error(&stale))?;
        }
        for (name, text) in entries {
            let path = parts.join(name);
            std::fs::write(&path, text).map_err(io_error(&path))?;
        }
        Ok(())
    }

    /// Whether the private lists hold any index yet.
    pub(crate) fn has_lists(&self, archives: Archives) -> bool {
        let marker = match archives {
            Archives::Source => "_source_Sources",
            Archives::Binary => "_Packages",
        };
        std::fs::read_dir(self.dir(archives, "lists"))
            .map(|entries| {
                entries
                    .flatten()
                    .any(|entry| entry.file_name().to_string_lossy().contains(marker))
            })
            .unwrap_or(false)
    }

    /// `apt-get update` into the private lists folder.
    pub(crate) fn update(&self, archives: Archives, log: &Path, progress: ProgressFn<'_>) -> Result<(), FetchError> {
        let mut update = self.apt_get(archives);
        update.arg("update");
        timed_step(progress, Step::UpdatingLists, |progress| {
            command::run_logged(&mut update, log, progress)
        })?;
        Ok(())
    }

    /// Runs the apt-get command `make` builds from a bare one, as `step`:
    /// the private lists are updated first when empty, and once more after
    /// a first failure (a stale list names versions the archive dropped)
    /// before the one retry.
    pub(crate) fn run_fresh(
        &self,
        archives: Archives,
        log: &Path,
        step: Step,
        progress: ProgressFn<'_>,
        make: impl Fn(&mut Command),
    ) -> Result<(), FetchError> {
        let mut updated = false;
        if !self.has_lists(archives) {
            self.update(archives, log, progress)?;
            updated = true;
        }
        loop {
            let mut apt = self.apt_get(archives);
            make(&mut apt);
            match timed_step(progress, step.clone(), |progress| {
                command::run_logged(&mut apt, log, progress)
            }) {
                Ok(_) => return Ok(()),
                Err(CommandError::Failed { .. }) if !updated => {
                    self.update(archives, log, progress)?;
                    updated = true;
                }
                Err(error) => return Err(error.into()),
            }
        }
    }

    /// An `apt-get` command reading only our configuration.
    pub(crate) fn apt_get(&self, archives: Archives) -> Command {
        let mut apt = Command::new("apt-get");
        apt.args(self.options(archives))
            .env("DEBIAN_FRONTEND", "noninteractive");
        apt
    }
}

/// Whether an entry is one of Debian's: signed by the Debian archive
/// keyring, or (with no Signed-By) served from a debian.org host or from
/// a mirror's top-level `/debian` or `/debian-security` folder. Third-party
/// repositories rarely publish sources and would make `apt-get update` fail.
fn is_debian(uris: &str, signed_by: Option<&str>) -> bool {
    if let Some(keyring) = signed_by {
        return keyring.contains("debian-archive");
    }
    uris.split_whitespace().any(|uri| {
        let without_scheme = uri.split_once("://").map_or(uri, |(_, rest)| rest);
        let (host, path) = without_scheme.split_once('/').unwrap_or((without_scheme, ""));
        let first_folder = path.split('/').next().unwrap_or("");
        host.ends_with("debian.org") || first_folder == "debian" || first_folder == "debian-security"
    })
}

/// Rewrites one deb822 `.sources` file: Debian stanzas only, enabled
/// ones only, each with `Types:` set to `types`.
fn rewrite_deb822(text: &str, types: &str) -> String {
    let mut kept = Vec::new();
    for stanza in text.split("\n\n").filter(|stanza| !stanza.trim().is_empty()) {
        let field = |name: &str| {
            stanza.lines().find_map(|line| {
                let (key, value) = line.split_once(':')?;
                key.trim().eq_ignore_ascii_case(name).then(|| value.trim().to_string())
            })
        };
        let binary_entry = field("Types").is_some_and(|value| value.split_whitespace().any(|kind| kind == "deb"));
        let enabled = field("Enabled").is_none_or(|value| !value.eq_ignore_ascii_case("no"));
        let uris = field("URIs").unwrap_or_default();
        if !binary_entry || !enabled || !is_debian(&uris, field("Signed-By").as_deref()) {
            continue;
        }
        let rewritten: Vec<String> = stanza
            .lines()
            .map(|line| match line.split_once(':') {
                Some((key, _)) if key.trim().eq_ignore_ascii_case("Types") => format!("Types: {types}"),
                _ => line.to_string(),
            })
            .collect();
        kept.push(rewritten.join("\n"));
    }
    if kept.is_empty() {
        String::new()
    } else {
        kept.join("\n\n") + "\n"
    }
}

/// Rewrites one-line-format entries: each Debian `deb` line becomes a
/// `types` line (`deb-src ...` or itself).
fn rewrite_one_line(text: &str, types: &str) -> String {
    let mut kept = String::new();
    for line in text.lines().map(str::trim) {
        let Some(rest) = line.strip_prefix("deb ").or_else(|| line.strip_prefix("deb\t")) else {
            continue;
        };
        let rest = rest.trim_start();
        // `[signed-by=... arch=...]` options come before the URI.
        let (options, after) = match rest.strip_prefix('[').and_then(|inner| inner.split_once(']')) {
            Some((options, after)) => (Some(options), after.trim_start()),
            None => (None, rest),
        };
        let signed_by = options.and_then(|options| {
            options.split_whitespace().find_map(|option| {
                option
                    .strip_prefix("signed-by=")
                    .or_else(|| option.strip_prefix("Signed-By="))
            })
        });
        let uri = after.split_whitespace().next().unwrap_or("");
        if is_debian(uri, signed_by) {
            kept.push_str(&format!("{types} {rest}\n"));
        }
    }
    kept
}

/// The system's Debian entries, rewritten to `types`, as (file name,
/// contents) pairs ready to go into a private `sources.list.d`.
pub fn debian_entries(etc_apt: &Path, types: &str) -> Result<Vec<(String, String)>, FetchError> {
    let mut files = vec![etc_apt.join("sources.list")];
    let parts = etc_apt.join("sources.list.d");
    if let Ok(entries) = std::fs::read_dir(&parts) {
        let mut named: Vec<PathBuf> = entries.flatten().map(|entry| entry.path()).collect();
        named.sort();
        files.extend(named);
    }
    let mut rewritten = Vec::new();
    for (index, file) in files.iter().enumerate() {
        let name = file
            .file_name()
            .map(|name| name.to_string_lossy().into_owned())
            .unwrap_or_default();
        let deb822 = name.ends_with(".sources");
        if !deb822 && !name.ends_with(".list") {
            continue; // apt itself ignores other names (.disabled, .save...)
        }
        let text = match std::fs::read_to_string(file) {
            Ok(text) => text,
            Err(error) if error.kind() == std::io::ErrorKind::NotFound => continue,
            Err(source) => {
                return Err(FetchError::Io {
                    path: file.clone(),
                    source,
                })
            }
        };
        let body = if deb822 {
            rewrite_deb822(&text, types)
        } else {
            rewrite_one_line(&text, types)
        };
        if body.is_empty() {
            continue;
        }
        let extension = if deb822 { "sources" } else { "list" };
        let header = format!("# written by shadowpatch from {} with Types: {types}\n", file.display());
        rewritten.push((format!("{index:02}-shadowpatch.{extension}"), header + &body));
    }
    Ok(rewritten)
}

#[cfg(test)]
mod tests {
    use super::*;

    const DEBIAN_SOURCES: &str = "Types: deb\n# http://snapshot.debian.org/archive/debian/20250520T000000Z\nURIs: http://deb.debian.org/debian\nSuites: bookworm bookworm-updates\nComponents: main\nSigned-By: /usr/share/keyrings/debian-archive-keyring.gpg\n\nTypes: deb\nURIs: https://deb.nodesource.com/node_20.x\nSuites: nodistro\nComponents: main\nSigned-By: /usr/share/keyrings/nodesource.gpg\n\nTypes: deb\nEnabled: no\nURIs: http://deb.debian.org/debian\nSuites: bookworm-backports\nComponents: main\n";

    #[test]
    fn deb822_keeps_enabled_debian_stanzas_with_the_types_replaced() {
        let rewritten = rewrite_deb822(DEBIAN_SOURCES, "deb-src");
        assert!(
            rewritten.starts_with("Types: deb-src\n# http://snapshot"),
            "{rewritten}"
        );
        assert!(rewritten.contains("Suites: bookworm bookworm-updates\n"), "{rewritten}");
        assert!(!rewritten.contains("nodesource"), "{rewritten}");
        assert!(!rewritten.contains("backports"), "{rewritten}");
    }

    #[test]
    fn one_line_entries_become_deb_src_lines() {
        let list = "# comment\ndeb [arch=amd64 signed-by=/usr/share/keyrings/debian-archive-keyring.gpg] http://deb.debian.org/debian bookworm main\ndeb-src http://deb.debian.org/debian bookworm main\ndeb https://download.docker.com/linux/debian bookworm stable\ndeb http://ftp.fr.debian.org/debian bookworm-updates main contrib\n";
        let rewritten = rewrite_one_line(list, "deb-src");
        assert_eq!(
            rewritten,
            "deb-src [arch=amd64 signed-by=/usr/share/keyrings/debian-archive-keyring.gpg] http://deb.debian.org/debian bookworm main\n\
             deb-src http://ftp.fr.debian.org/debian bookworm-updates main contrib\n"
        );
    }

    #[test]
    fn entries_are_read_from_both_formats_and_other_names_are_ignored() {
        let etc = tempfile::tempdir().unwrap();
        std::fs::create_dir(etc.path().join("sources.list.d")).unwrap();
        std::fs::write(etc.path().join("sources.list.d/debian.sources"), DEBIAN_SOURCES).unwrap();
        std::fs::write(
            etc.path().join("sources.list.d/old.list.disabled"),
            "deb http://deb.debian.org/debian sid main\n",
        )
        .unwrap();
        std::fs::write(
            etc.path().join("sources.list"),
            "deb http://deb.debian.org/debian-security bookworm-security main\n",
        )
        .unwrap();
        let entries = debian_entries(etc.path(), "deb-src").unwrap();
        let names: Vec<&str> = entries.iter().map(|(name, _)| name.as_str()).collect();
        assert_eq!(names, ["00-shadowpatch.list", "01-shadowpatch.sources"]);
        assert!(entries[0]
            .1
            .ends_with("deb-src http://deb.debian.org/debian-security bookworm-security main\n"));
        assert!(!entries.iter().any(|(_, text)| text.contains("sid")));
    }
}
