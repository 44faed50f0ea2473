//! `shadowpatch bench --only build`: `shadowpatch build`'s time against
//! its floor measured in the same run: one pristine build of the tree plus
//! a rebuild of what the diff changes (plain `make`, no wrapper). Cold:
//! an empty cache (reference build, patched rebuild, originals of the
//! recompiled objects). Warm: the reference cached, as for a second patch
//! to the same binary. The tree is the build crate's test fixture (embedded).

use crate::support::{print_json, Context, Percentiles};
use serde::Serialize;
use std::path::Path;
use std::process::Command;
use std::time::Instant;

const TREE: [(&str, &str); 4] = [
    ("Makefile", include_str!("../../build/tests/data/calc/Makefile")),
    ("main.c", include_str!("../../build/tests/data/calc/main.c")),
    ("a.c", include_str!("../../build/tests/data/calc/a.c")),
    ("b.c", include_str!("../../build/tests/data/calc/b.c")),
];

#[derive(Debug, Serialize)]
pub struct BuildBench {
    pub rounds: usize,
    /// Pristine build + rebuild after the diff, ms.
    pub floor_ms: Percentiles,
    /// `build` with an empty cache, ms.
    pub cold_ms: Percentiles,
    /// `build` with the reference cached, ms.
    pub warm_ms: Percentiles,
    pub cold_ratio: f64,
    pub warm_ratio: f64,
}

fn make(dir: &Path) -> anyhow::Result<()> {
    let status = Command::new("make").arg("-s").arg("-j2").current_dir(dir).status()?;
    anyhow::ensure!(status.success(), "make failed in {}", dir.display());
    Ok(())
}

fn write_tree(dir: &Path) -> anyhow::Result<()> {
    std::fs::create_dir_all(dir)?;
    for (name, text) in TREE {
        std::fs::write(dir.join(name), text)?;
    }
    Ok(())
}

pub fn measure(context: &Context, quick: bool) -> anyhow::Result<BuildBench> {
    let rounds = if quick { 3 } else { 11 };
    let dir = tempfile::tempdir()?;
    let source = dir.path().join("calc");
    write_tree(&source)?;
    let shipped = dir.path().join("shipped");
    write_tree(&shipped)?;
    make(&shipped)?;
    let a = TREE[2].1;
    let patched_a = a.replacen("return x * 2;", "return x * 3;", 1);
    let diff = dir.path().join("scale.diff");
    std::fs::write(
        &diff,
        "--- a/a.c\n+++ b/a.c\n@@ -9,3 +9,3 @@\n {\n-    return x * 2;\n+    return x * 3;\n }\n",
    )?;
    let (mut floor, mut cold, mut warm) = (Vec::new(), Vec::new(), Vec::new());
    for round in 0..rounds {
        if !context.json {
            eprintln!("build: round {}/{rounds} ...", round + 1);
        }
        let tree = dir.path().join(format!("floor-{round}"));
        let started = Instant::now();
        write_tree(&tree)?;
        make(&tree)?;
        std::fs::write(tree.join("a.c"), &patched_a)?;
        make(&tree)?;
        floor.push(started.elapsed().as_micros() as u64);

        let mut request = shadowpatch_build::BuildRequest {
            source: source.clone(),
            diffs: vec![diff.clone()],
            target: shipped.join("calc").display().to_string(),
            out: dir.path().join(format!("cold-{round}")),
            cache: Some(dir.path().join(format!("cache-{round}"))),
            ..Default::default()
        };
        let started = Instant::now();
        shadowpatch_build::build(&request, &mut |_, _| {})?;
        cold.push(started.elapsed().as_micros() as u64);
        request.out = dir.path().join(format!("warm-{round}"));
        let started = Instant::now();
        shadowpatch_build::build(&request, &mut |_, _| {})?;
        warm.push(started.elapsed().as_micros() as u64);
    }
    let ms = |values: Vec<u64>| {
        let p = Percentiles::of(values);
        Percentiles {
            min: p.min / 1000,
            median: p.median / 1000,
            p99: p.p99 / 1000,
            max: p.max / 1000,
        }
    };
    let (floor, cold, warm) = (ms(floor), ms(cold), ms(warm));
    let ratio = |x: &Percentiles| x.median as f64 / floor.median.max(1) as f64;
    Ok(BuildBench {
        rounds,
        cold_ratio: ratio(&cold),
        warm_ratio: ratio(&warm),
        floor_ms: floor,
        cold_ms: cold,
        warm_ms: warm,
    })
}

pub fn run(context: &Context, quick: bool) -> anyhow::Result<i32> {
    let bench = measure(context, quick)?;
    if context.json {
        print_json(&bench);
        return Ok(0);
    }
    println!(
        "build from a diff ({} rounds, medians; floor: pristine make + rebuild after the diff)",
        bench.rounds
    );
    println!("  floor                      {:>6} ms", bench.floor_ms.median);
    println!(
        "  build, empty cache         {:>6} ms  {:.2}× the floor",
        bench.cold_ms.median, bench.cold_ratio
    );
    println!(
        "  build, reference cached    {:>6} ms  {:.2}× the floor",
        bench.warm_ms.median, bench.warm_ratio
    );
    Ok(0)
}
