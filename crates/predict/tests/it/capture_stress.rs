//! A capture never harms the live process: thousands of breakpoint hits
//! and captures, in hundreds of short capture sessions (each one arming,
//! disarming per function and detaching: the world stops where a hit can
//! race the breakpoint's removal), on a busy multi-threaded target that
//! also keeps creating threads and processes. Every captured copy is run
//! to its return and its result checked; the target must never die and
//! never compute a wrong result. The long run is `shadowpatch bench
//! --only capture-stress`.

use shadowpatch_fixtures::{Fixture, Running};
use shadowpatch_predict::simulate::bench::{capture_stress, StressFunction};

#[test]
fn thousands_of_captures_never_kill_or_corrupt_a_busy_target() {
    let dir = tempfile::tempdir().unwrap();
    let log = dir.path().join("service.log");
    let udp = std::net::UdpSocket::bind("127.0.0.1:0").unwrap();
    let port = udp.local_addr().unwrap().port().to_string();
    // Three compute workers, a note worker, and a churner creating threads
    // (each calling compute at once) and processes all along.
    let mut target = Running::start(Fixture::Sim, &["3", log.to_str().unwrap(), &port]).unwrap();
    assert_eq!(target.command("churn").unwrap(), "churning");
    // compute, compute_cet (starts with endbr64: stepped past without
    // touching memory) and note, each result checked in the copies.
    let functions = StressFunction::sim_fixture();
    // 2 captures of each function per session, one hit in 3 captured.
    let figures = capture_stress(&dir.path().join("state"), target.pid(), &functions, 750, 2, 3).unwrap();
    eprintln!("{figures:?}");
    assert_eq!(figures.deaths, 0, "the target died: {figures:?}");
    assert!(target.is_running(), "{figures:?}");
    assert_eq!(figures.wrong, 0, "captured calls gave wrong results: {figures:?}");
    assert!(figures.captures >= 750, "{figures:?}");
    assert!(figures.hits >= 2250, "{figures:?}");
    assert!(figures.sessions >= 100, "{figures:?}");
    assert!(
        figures.new_threads > 0 && figures.new_processes > 0,
        "threads and processes were born while armed: {figures:?}"
    );
    let check = target.check().unwrap();
    assert_eq!(check["errors"], 0, "the live target computed wrong results: {check:?}");
    assert!(check["churned"] > 0 && check["forked"] > 0, "{check:?}");
    drop(udp);
}
