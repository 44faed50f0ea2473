use shadowpatch_fixtures::{build_patch, Fixture, Patch, Running};
#[test]
fn explore() {
    for (fixture, patch) in [(Fixture::AnalysisTarget, Patch::Analysis), (Fixture::AnalysisTargetNoDebug, Patch::AnalysisNoDebug)] {
    let target = Running::start(fixture, &[]).unwrap();
    let object = build_patch(patch).unwrap();
    let image = shadowpatch_symbols::ElfImage::open(&target.binary()).unwrap();
    let build_id = shadowpatch_symbols::hex(image.build_id.as_deref().unwrap());
    let dir = tempfile::tempdir().unwrap();
    let pairs = [("add_values","add_values_ok"),("plain_compute","plain_compute_ok")];
    let all = [("add_values","add_values_three"),("add_values","add_values_narrow"),("add_values","add_values_double"),("scale_value","scale_value_long"),("sum_point","sum_point_v2"),("cc_target","cc_target_ms"),("read_counter","read_counter_narrow"),("read_limit","read_limit_v2"),("plain_compute","plain_compute_syscall"),("plain_compute","plain_compute_raw_syscall"),("plain_compute","plain_compute_alloc"),("plain_compute","plain_compute_state"),("plain_compute","plain_compute_recursive"),("plain_compute","plain_compute_via_old"),("plain_compute","plain_compute_loop"),("lookup","lookup_reinit"),("init_table","init_table_replacement"), ("make_buffer", "plain_compute_ok")];
    let only = std::env::var("ONLY").unwrap_or_default();
    for (i, (symbol, with)) in pairs.iter().chain(all.iter()).enumerate() {
        if !only.is_empty() && !with.contains(only.as_str()) { continue; }
        let manifest = dir.path().join(format!("m{i}.toml"));
        std::fs::write(&manifest, format!("id = \"p{i}\"\nobject = \"{}\"\n[target]\nbuild_id = \"{build_id}\"\n[[replace]]\nsymbol = \"{symbol}\"\nwith = \"{with}\"\n", object.display())).unwrap();
        let started = std::time::Instant::now();
        let report = shadowpatch_predict::analyze_static(target.pid(), &manifest, dir.path()).unwrap();
        println!("== {fixture:?} {symbol} -> {with} ({} µs)", started.elapsed().as_micros());
        for f in &report.findings { println!("   {:?} {} : {} | {}", f.severity, f.code, f.message, f.evidence); }
    }
    }
}
