//! `shadowpatch bench --only build-debian`: `shadowpatch build --debian`
//! on Debian's own lighttpd (stripped, as shipped) against its floor,
//! measured in the same run. The floor is what the package's build system
//! allows by hand: the package's own build of the pristine source
//! (`dpkg-buildpackage -T build`, nocheck, exactly as the reference build
//! runs it) plus the rebuild after the diff in that tree with the same
//! command `build` uses for its patched build (the package's build step:
//! `dh_auto_build` or the rules' override, else the whole build again).
//! Cold: empty reference and build caches (the fetched source and the apt
//! lists are kept: they are downloads, not builds). Warm: the reference
//! cached, as for a second patch to the same binary. The diff changes the
//! static, cold `http_response_static_errdoc` (the default error page).
//! Not part of the full run: one round is three package builds (minutes).

use crate::support::{print_json, BadInput, Context};
use serde::Serialize;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::Instant;

const BINARY: &str = "/usr/sbin/lighttpd";
const DIFF: &str = "--- a/src/response.c
+++ b/src/response.c
@@ -679,7 +679,7 @@
       \"</title>\\n\"
       \" </head>\\n\"
       \" <body>\\n\"
-      \"  <h1>\"));
+      \"  <h1>patched \"));
     http_status_append(b, r->http_status);
     buffer_append_string_len(b, CONST_STR_LEN(
       \"</h1>\\n\"
";

#[derive(Debug, Serialize)]
pub struct DebianBuildBench {
    pub package: String,
    pub version: String,
    pub rounds: usize,
    /// Per round: pristine package build, s.
    pub floor_pristine_s: Vec<f64>,
    /// Per round: the package build again after the diff, s.
    pub floor_rebuild_s: Vec<f64>,
    pub floor_s: Vec<f64>,
    /// `build --debian` with empty reference and build caches, s.
    pub cold_s: Vec<f64>,
    /// Of which the reference build (and its reproduction attempts), s.
    pub cold_reference_s: Vec<f64>,
    /// `build --debian` with the reference cached, s.
    pub warm_s: Vec<f64>,
    /// How the reference matched the target (`build_id`, `loaded_bytes`,
    /// `none`: symbols by function-by-function match).
    pub reference_how: String,
    pub tries: usize,
    pub cold_ratio: f64,
    pub warm_ratio: f64,
}

fn run_shell(dir: &Path, script: &str, log: &Path) -> anyhow::Result<f64> {
    let started = Instant::now();
    let file = std::fs::File::create(log)?;
    let status = Command::new("sh")
        .arg("-c")
        .arg(script)
        .current_dir(dir)
        .stdout(file.try_clone()?)
        .stderr(file)
        .status()?;
    anyhow::ensure!(
        status.success(),
        "`{script}` failed in {}: see {}",
        dir.display(),
        log.display()
    );
    Ok(started.elapsed().as_secs_f64())
}

fn median(values: &[f64]) -> f64 {
    let mut sorted = values.to_vec();
    sorted.sort_by(f64::total_cmp);
    sorted.get(sorted.len() / 2).copied().unwrap_or(0.0)
}

pub fn measure(context: &Context, quick: bool) -> anyhow::Result<DebianBuildBench> {
    let rounds = if quick { 1 } else { 2 };
    if !Path::new(BINARY).exists() {
        return Err(BadInput(format!("{BINARY} is missing: apt-get install -y lighttpd")).into());
    }
    let installed = shadowpatch_debsrc::resolve_binary(Path::new(BINARY))?;
    let shared_cache = std::env::var_os("SHADOWPATCH_DEBSRC_CACHE")
        .map(PathBuf::from)
        .unwrap_or_else(|| shadowpatch_debsrc::default_cache_dir(None));
    let note = |text: &str| {
        if !context.json {
            eprintln!("build-debian: {text}");
        }
    };
    note(&format!(
        "source of {} {} (cached in {})",
        installed.source_package,
        installed.source_version,
        shared_cache.display()
    ));
    let source = shadowpatch_debsrc::fetch_source(
        &installed.source_package,
        &installed.source_version,
        &shared_cache,
        &mut |_| {},
    )?;
    shadowpatch_debsrc::check_build_deps(&source.dir)?;
    // The binary lists stale_build_deps reads: copied, so the cold cache
    // pays no `apt-get update` (a download, not a build).
    let apt_lists = shared_cache.join("apt");

    let dir = tempfile::Builder::new().prefix("bench-build-debian-").tempdir()?;
    let diff = dir.path().join("errdoc.diff");
    std::fs::write(&diff, DIFF)?;
    let build_command = shadowpatch_build::debian::build_command("");
    let rebuild_command = shadowpatch_build::debian::rebuild_command(&source.dir, "");
    let mut bench = DebianBuildBench {
        package: installed.source_package.clone(),
        version: installed.source_version.clone(),
        rounds,
        floor_pristine_s: Vec::new(),
        floor_rebuild_s: Vec::new(),
        floor_s: Vec::new(),
        cold_s: Vec::new(),
        cold_reference_s: Vec::new(),
        warm_s: Vec::new(),
        reference_how: String::new(),
        tries: 0,
        cold_ratio: 0.0,
        warm_ratio: 0.0,
    };
    for round in 0..rounds {
        let work = dir.path().join(format!("round-{round}"));
        std::fs::create_dir_all(&work)?;

        note(&format!(
            "round {}/{rounds}: floor, pristine package build ...",
            round + 1
        ));
        let tree = work.join("floor");
        let status = Command::new("cp").arg("-a").arg(&source.dir).arg(&tree).status()?;
        anyhow::ensure!(status.success(), "copying {} failed", source.dir.display());
        let pristine = run_shell(&tree, &build_command, &work.join("floor-pristine.log"))?;
        note(&format!(
            "round {}/{rounds}: floor, rebuild after the diff ...",
            round + 1
        ));
        let patch = format!("patch -p1 --batch --forward < {}", diff.display());
        run_shell(&tree, &patch, &work.join("floor-patch.log"))?;
        let rebuild = run_shell(&tree, &rebuild_command, &work.join("floor-rebuild.log"))?;
        std::fs::remove_dir_all(&tree)?;

        let cache = work.join("debsrc");
        std::fs::create_dir_all(&cache)?;
        let status = Command::new("cp")
            .arg("-a")
            .arg(&apt_lists)
            .arg(cache.join("apt"))
            .status()?;
        anyhow::ensure!(status.success(), "copying {} failed", apt_lists.display());
        let debian = shadowpatch_build::debian::DebianRequest {
            target: BINARY.to_string(),
            module: None,
            source: Some(source.dir.clone()),
            cache: cache.clone(),
            max_overlay_builds: 3,
        };
        let mut cold_reference = 0.0;
        let mut timed_build = |name: &str| -> anyhow::Result<f64> {
            let started = Instant::now();
            let prepared = shadowpatch_build::debian::prepare(&debian, std::slice::from_ref(&diff), &mut |_, _| {})?;
            let mut request = shadowpatch_build::BuildRequest {
                diffs: vec![diff.clone()],
                target: BINARY.to_string(),
                out: work.join(name),
                cache: Some(work.join("build-cache")),
                ..Default::default()
            };
            prepared.fill(&mut request);
            shadowpatch_build::build(&request, &mut |_, _| {})?;
            if name == "cold" {
                cold_reference = prepared.reference_seconds;
                bench.reference_how = serde_json::to_value(prepared.reference_how)?
                    .as_str()
                    .unwrap_or_default()
                    .to_string();
                bench.tries = prepared.tries.len();
            }
            Ok(started.elapsed().as_secs_f64())
        };
        note(&format!(
            "round {}/{rounds}: build --debian, empty caches ...",
            round + 1
        ));
        let cold = timed_build("cold")?;
        note(&format!(
            "round {}/{rounds}: build --debian, reference cached ...",
            round + 1
        ));
        let warm = timed_build("warm")?;
        bench.floor_pristine_s.push(pristine);
        bench.floor_rebuild_s.push(rebuild);
        bench.floor_s.push(pristine + rebuild);
        bench.cold_s.push(cold);
        bench.cold_reference_s.push(cold_reference);
        bench.warm_s.push(warm);
        std::fs::remove_dir_all(&work)?;
    }
    let floor = median(&bench.floor_s).max(1e-9);
    bench.cold_ratio = median(&bench.cold_s) / floor;
    bench.warm_ratio = median(&bench.warm_s) / floor;
    Ok(bench)
}

pub fn run(context: &Context, quick: bool) -> anyhow::Result<i32> {
    let bench = measure(context, quick)?;
    if context.json {
        print_json(&bench);
        return Ok(0);
    }
    println!(
        "build --debian of {} {} ({} round(s), medians; reference: {}, {} build(s) tried)",
        bench.package, bench.version, bench.rounds, bench.reference_how, bench.tries
    );
    println!(
        "  floor: pristine package build   {:>7.1} s",
        median(&bench.floor_pristine_s)
    );
    println!(
        "  floor: rebuild after the diff   {:>7.1} s",
        median(&bench.floor_rebuild_s)
    );
    println!(
        "  floor                           {:>7.1} s  1.00×",
        median(&bench.floor_s)
    );
    println!(
        "  build, empty caches             {:>7.1} s  {:.2}× the floor (reference build {:.1} s)",
        median(&bench.cold_s),
        bench.cold_ratio,
        median(&bench.cold_reference_s)
    );
    println!(
        "  build, reference cached         {:>7.1} s  {:.2}× the floor",
        median(&bench.warm_s),
        bench.warm_ratio
    );
    Ok(0)
}
