//! For CI: installs the build dependencies of the package that owns a
//! binary, when any are missing (`.ci/run` runs it for memcached before
//! the tests). Fetches the source into `$SHADOWPATCH_DEBSRC_CACHE` (the
//! tests' cache), checks with dpkg-checkbuilddeps, and only then runs
//! `apt-get build-dep` through the private apt configuration.
//!
//! `cargo run -p shadowpatch-debsrc --example install_build_deps -- /usr/bin/memcached`

use std::path::PathBuf;

use shadowpatch_debsrc::{
    check_build_deps, default_cache_dir, fetch_source, install_build_deps, resolve_binary, BuildDepsError,
};

fn main() -> Result<(), Box<dyn std::error::Error>> {
    let binary = std::env::args_os()
        .nth(1)
        .map(PathBuf::from)
        .ok_or("usage: install_build_deps BINARY")?;
    let cache = std::env::var_os("SHADOWPATCH_DEBSRC_CACHE")
        .filter(|dir| !dir.is_empty())
        .map(PathBuf::from)
        .unwrap_or_else(|| default_cache_dir(None));
    let installed = resolve_binary(&binary)?;
    let source = fetch_source(
        &installed.source_package,
        &installed.source_version,
        &cache,
        &mut |_| {},
    )?;
    match check_build_deps(&source.dir) {
        Ok(()) => println!(
            "{} {}: build dependencies present",
            installed.source_package, installed.source_version
        ),
        Err(BuildDepsError::Unmet { names, .. }) => {
            println!("installing build dependencies of {}: {names}", installed.source_package);
            install_build_deps(&source.dir, &cache, &mut |_| {})?;
            check_build_deps(&source.dir)?;
        }
        Err(error) => return Err(error.into()),
    }
    Ok(())
}
