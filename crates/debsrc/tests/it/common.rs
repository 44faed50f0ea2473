//! Helpers shared by the Debian source tests: the kept cache folder and
//! the installed memcached.

use std::path::PathBuf;

pub const MEMCACHED: &str = "/usr/bin/memcached";

/// The cache kept between runs: `$SHADOWPATCH_DEBSRC_CACHE`, else
/// `target/tmp/debsrc-cache` (cargo's folder for integration tests).
pub fn cache_dir() -> PathBuf {
    std::env::var_os("SHADOWPATCH_DEBSRC_CACHE")
        .filter(|dir| !dir.is_empty())
        .map(PathBuf::from)
        .unwrap_or_else(|| PathBuf::from(env!("CARGO_TARGET_TMPDIR")).join("debsrc-cache"))
}

/// The memcached source tree, fetched once into the kept cache.
pub fn memcached_source() -> shadowpatch_debsrc::SourceTree {
    let installed = shadowpatch_debsrc::resolve_binary(MEMCACHED.as_ref()).unwrap();
    shadowpatch_debsrc::fetch_source(
        &installed.source_package,
        &installed.source_version,
        &cache_dir(),
        &mut |_| {},
    )
    .unwrap()
}
