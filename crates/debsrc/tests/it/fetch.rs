//! The installed memcached's exact source comes from the Debian archive
//! through the private apt configuration, unpacked with Debian's patches
//! applied, and a second fetch is served from the cache; a version the
//! archive does not have is a one-line error.

use shadowpatch_debsrc::{fetch_source, resolve_binary, FetchError};
use shadowpatch_failure::Classify;

use crate::common::{cache_dir, memcached_source, MEMCACHED};

#[test]
fn memcached_source_is_fetched_at_the_installed_version_and_cached() {
    let installed = resolve_binary(MEMCACHED.as_ref()).unwrap();
    let first = memcached_source();
    let changelog = std::fs::read_to_string(first.dir.join("debian/changelog")).unwrap();
    let top = changelog.lines().next().unwrap();
    assert!(
        top.starts_with(&format!("memcached ({})", installed.source_version)),
        "{top}"
    );
    // dpkg-source -x applied Debian's patches (format 3.0 (quilt)).
    assert!(first.dir.join(".pc/applied-patches").is_file());
    assert!(first.dir.join("memcached.c").is_file());

    let second = fetch_source(
        &installed.source_package,
        &installed.source_version,
        &cache_dir(),
        &mut |_| {},
    )
    .unwrap();
    assert!(second.from_cache);
    assert_eq!(second.dir, first.dir);

    // The machine's own lists were not given deb-src indexes.
    let system_lists: Vec<String> = std::fs::read_dir("/var/lib/apt/lists")
        .unwrap()
        .flatten()
        .map(|entry| entry.file_name().to_string_lossy().into_owned())
        .collect();
    assert!(
        !system_lists.iter().any(|name| name.contains("_Sources")),
        "{system_lists:?}"
    );
}

#[test]
fn a_version_the_archive_does_not_have_is_a_one_line_error() {
    let error = fetch_source("memcached", "0.0.1-0shadowpatch", &cache_dir(), &mut |_| {}).unwrap_err();
    assert!(matches!(error, FetchError::VersionNotFound { .. }), "{error}");
    let message = error.to_string();
    assert!(message.contains("memcached 0.0.1-0shadowpatch"), "{message}");
    assert!(!message.contains('\n'), "{message}");
    assert!(error.is_bad_input());
}
