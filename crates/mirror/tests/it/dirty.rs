//! Dirty-page tracking and the data mirror against real processes: every
//! method under continuous write load, exactness, undo on stop, drop and
//! tracer death, fallbacks and refusals.

use shadowpatch_fixtures::{Fixture, Running};
use shadowpatch_mirror::{detect, DataMirror, DirtyError, DirtyMethod, DirtyTracker, TrackedRange};
use shadowpatch_process::{Attached, ProcessIdentity, TargetMemory};
use std::collections::BTreeSet;
use std::io::{BufRead, BufReader};

const PAGE: u64 = 4096;

fn start_fixture(mib: u64) -> Running {
    Running::start(Fixture::DirtyData, &[&mib.to_string()]).unwrap()
}

/// The fixture's region and its two global tables, in address order (the
/// order of the tracker's and the mirror's ranges).
fn fixture_ranges(fixture: &Running) -> Vec<TrackedRange> {
    let mut ranges: Vec<TrackedRange> = ["region", "data", "bss"]
        .iter()
        .map(|name| TrackedRange::covering(fixture.number(name), fixture.number(&format!("{name}_len"))))
        .collect();
    ranges.sort();
    ranges
}

fn fixture_region(fixture: &Running) -> TrackedRange {
    TrackedRange::covering(fixture.number("region"), fixture.number("region_len"))
}

fn seize(fixture: &Running) -> Attached {
    Attached::seize(&ProcessIdentity::of(fixture.pid()).unwrap()).unwrap()
}

/// Descriptor numbers and what they point at.
fn fd_table(pid: i32) -> Vec<(String, std::path::PathBuf)> {
    let mut table: Vec<_> = std::fs::read_dir(format!("/proc/{pid}/fd"))
        .unwrap()
        .filter_map(|entry| {
            let entry = entry.ok()?;
            let target = std::fs::read_link(entry.path()).ok()?;
            Some((entry.file_name().to_string_lossy().into_owned(), target))
        })
        .collect();
    table.sort();
    table
}

/// The mappings (start, end) whose smaps VmFlags include `uw`: registered
/// with a userfaultfd in write-protect mode.
fn uffd_wp_mappings(pid: i32) -> Vec<(u64, u64)> {
    let smaps = std::fs::read_to_string(format!("/proc/{pid}/smaps")).unwrap();
    let mut current = (0, 0);
    let mut flagged = Vec::new();
    for line in smaps.lines() {
        let header = line
            .split_once(' ')
            .and_then(|(range, _)| range.split_once('-'))
            .and_then(|(start, end)| Some((u64::from_str_radix(start, 16).ok()?, u64::from_str_radix(end, 16).ok()?)));
        if let Some(range) = header {
            current = range;
        } else if let Some(flags) = line.strip_prefix("VmFlags:") {
            if flags.split_whitespace().any(|flag| flag == "uw") {
                flagged.push(current);
            }
        }
    }
    flagged
}

/// Whether every page of `range` is in a `uw` mapping.
fn is_registered(pid: i32, range: &TrackedRange) -> bool {
    let flagged = uffd_wp_mappings(pid);
    let mut address = range.start;
    while address < range.end {
        match flagged.iter().find(|(start, end)| (*start..*end).contains(&address)) {
            Some((_, end)) => address = *end,
            None => return false,
        }
    }
    true
}

fn tracer_pid(pid: i32) -> i32 {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap();
    status
        .lines()
        .find_map(|line| line.strip_prefix("TracerPid:"))
        .unwrap()
        .trim()
        .parse()
        .unwrap()
}

fn live_bytes(pid: i32, ranges: &[TrackedRange]) -> Vec<Vec<u8>> {
    let mut memory = TargetMemory::open(&ProcessIdentity::of(pid).unwrap()).unwrap();
    ranges
        .iter()
        .map(|r| memory.read_vec(r.start, r.len() as usize).unwrap())
        .collect()
}

fn mirrored_bytes(mirror: &DataMirror) -> Vec<Vec<u8>> {
    mirror.ranges().map(|(_, bytes)| bytes.to_vec()).collect()
}

/// `dirty PERCENT SEED`, then the pages it wrote.
fn dirty_and_list(fixture: &mut Running, percent: f64, seed: u64) -> BTreeSet<u64> {
    let answer = fixture.command(&format!("dirty {percent} {seed}")).unwrap();
    assert!(answer.starts_with("pages="), "{answer}");
    let list = fixture.command("list").unwrap();
    list.split_whitespace()
        .skip(1)
        .map(|hex| u64::from_str_radix(hex.trim_start_matches("0x"), 16).unwrap())
        .collect()
}

fn assert_target_healthy(fixture: &mut Running) {
    assert!(fixture.is_running());
    let check = fixture.check().unwrap();
    assert_eq!(check["errors"], 0, "{check:?}");
    // Writes still work everywhere (no SIGBUS, no lost protection state).
    assert!(fixture.command("dirty 5 99").unwrap().starts_with("pages="));
}

#[test]
fn every_method_mirrors_under_load_identically_and_reports_every_written_page() {
    let mut fixture = start_fixture(32);
    let pid = fixture.pid();
    let ranges = fixture_ranges(&fixture);
    let fds_before = fd_table(pid);
    let detection = detect();
    let available = detection.available();
    assert!(
        available.contains(&DirtyMethod::UffdWpAsync),
        "this machine has userfaultfd WP_ASYNC and PAGEMAP_SCAN: {detection:?}"
    );
    let mut attached = seize(&fixture);
    // All available methods at once on the same target, so their mirrors
    // can be compared with each other at the same instant.
    let mut tracked: Vec<(DirtyTracker, DataMirror)> = available
        .iter()
        .map(|&method| {
            let tracker = DirtyTracker::start(&mut attached, &ranges, Some(method)).unwrap();
            assert_eq!(tracker.method(), method);
            assert!(tracker.skipped().is_empty());
            let mirror = DataMirror::capture(&tracker, attached.memory()).unwrap();
            (tracker, mirror)
        })
        .collect();
    assert_eq!(
        fd_table(pid),
        fds_before,
        "the userfaultfd lives in our process, not the target's"
    );
    assert!(ranges.iter().all(|range| is_registered(pid, range)));
    // Collecting needs no attach: detach now, as the watcher does, so the
    // target's signals are never held between cycles.
    attached.detach().unwrap();
    assert_eq!(tracer_pid(pid), 0);
    let mut memory = TargetMemory::open(&ProcessIdentity::of(pid).unwrap()).unwrap();

    assert_eq!(fixture.command("spin 2").unwrap(), "spinning threads=2");
    let mut copied = vec![0u64; tracked.len()];
    for _round in 0..8 {
        for (index, (tracker, mirror)) in tracked.iter_mut().enumerate() {
            let report = mirror.refresh(tracker, &mut memory).unwrap();
            assert_eq!(report.method, Some(tracker.method()));
            assert_eq!(report.pages_tracked, tracker.page_count() as u64);
            copied[index] += report.pages_copied;
        }
        assert_eq!(fixture.check().unwrap()["errors"], 0);
        assert_eq!(tracer_pid(pid), 0, "collecting does not attach");
    }
    assert!(copied.iter().all(|&n| n > 0), "writes under load were seen: {copied:?}");
    assert!(fixture.command("quiet").unwrap().starts_with("quiet writes="));

    // Quiescent: one refresh brings every mirror to the live bytes.
    for (tracker, mirror) in tracked.iter_mut() {
        mirror.refresh(tracker, &mut memory).unwrap();
    }
    let live = live_bytes(pid, &ranges);
    for (tracker, mirror) in &tracked {
        assert!(
            mirrored_bytes(mirror) == live,
            "{} mirror differs from the target",
            tracker.method()
        );
    }

    // Exactness: the pages one command writes, some never touched before
    // (the region's last quarter is unpopulated until now).
    let region = fixture_region(&fixture);
    let region_index = ranges.iter().position(|r| *r == region).unwrap();
    let written = dirty_and_list(&mut fixture, 1.0, 42);
    let untouched_quarter = region.start + region.len() * 3 / 4;
    assert!(written
        .iter()
        .any(|&page| page >= untouched_quarter && region.contains(page)));
    for (tracker, mirror) in tracked.iter_mut() {
        let dirty = tracker.collect(&mut memory).unwrap();
        let reported: BTreeSet<u64> = dirty.pages.iter().copied().collect();
        let missed: Vec<_> = written.difference(&reported).collect();
        assert!(missed.is_empty(), "{} missed pages {missed:x?}", tracker.method());
        let extra: Vec<_> = reported.difference(&written).collect();
        assert!(
            extra.is_empty(),
            "{} reported unwritten pages {extra:x?}",
            tracker.method()
        );
        let report = mirror.refresh_pages(&dirty, &mut memory).unwrap();
        assert_eq!(report.pages_changed, written.len() as u64);
    }
    let live = live_bytes(pid, &ranges);
    for (tracker, mirror) in &tracked {
        assert!(
            mirrored_bytes(mirror) == live,
            "{} mirror differs after exact refresh",
            tracker.method()
        );
        assert_eq!(mirror.read(region.start, 16).unwrap(), &live[region_index][..16]);
    }
    // A full refresh gives the same bytes whatever the method.
    for (_, mirror) in tracked.iter_mut() {
        let report = mirror.refresh_all(&mut memory).unwrap();
        assert_eq!(report.pages_changed, 0);
    }

    for (tracker, _) in tracked {
        tracker.stop().unwrap();
    }
    assert_eq!(
        uffd_wp_mappings(pid),
        Vec::<(u64, u64)>::new(),
        "registration undone by stop"
    );
    assert_eq!(fd_table(pid), fds_before);
    assert_eq!(tracer_pid(pid), 0, "never attached after the start");
    assert_target_healthy(&mut fixture);
}

#[test]
fn dropping_the_tracker_unregisters_and_the_target_runs_on() {
    let mut fixture = start_fixture(8);
    let pid = fixture.pid();
    let ranges = fixture_ranges(&fixture);
    let fds_before = fd_table(pid);
    {
        let mut attached = seize(&fixture);
        let mut tracker = DirtyTracker::start(&mut attached, &ranges, None).unwrap();
        assert_eq!(tracker.method(), DirtyMethod::UffdWpAsync, "the best method here");
        assert_eq!(fixture.command("spin 1").unwrap(), "spinning threads=1");
        let mut mirror = DataMirror::capture(&tracker, attached.memory()).unwrap();
        mirror.refresh(&mut tracker, attached.memory()).unwrap();
        for range in &ranges {
            assert!(is_registered(pid, range), "{range:x?} in {:x?}", uffd_wp_mappings(pid));
        }
        // Tracker and attach guard dropped here, with writers running.
    }
    assert_eq!(uffd_wp_mappings(pid), Vec::<(u64, u64)>::new());
    assert_eq!(fd_table(pid), fds_before);
    assert_eq!(tracer_pid(pid), 0);
    assert!(fixture.command("quiet").unwrap().starts_with("quiet writes="));
    assert_target_healthy(&mut fixture);
}

/// Not a test on its own: the body of the tracking process that
/// `a_dying_tracer_leaves_the_target_working_and_unregistered` starts and
/// kills. Does nothing unless that test set the environment.
#[test]
fn helper_process_tracks_until_killed() {
    let Ok(pid) = std::env::var("SHADOWPATCH_DIRTY_HELPER_TARGET") else {
        return;
    };
    let range: Vec<u64> = std::env::var("SHADOWPATCH_DIRTY_HELPER_RANGE")
        .unwrap()
        .split(',')
        .map(|n| n.parse().unwrap())
        .collect();
    let mut attached = Attached::seize(&ProcessIdentity::of(pid.parse().unwrap()).unwrap()).unwrap();
    let ranges = [TrackedRange {
        start: range[0],
        end: range[1],
    }];
    let mut tracker = DirtyTracker::start(&mut attached, &ranges, Some(DirtyMethod::UffdWpAsync)).unwrap();
    tracker.collect_attached(&mut attached).unwrap();
    // After libtest's "test NAME ... " on the same line.
    println!("tracking");
    // Block until killed.
    let mut line = String::new();
    let _ = std::io::stdin().read_line(&mut line);
    panic!("the helper was meant to be killed, not to return");
}

#[test]
fn a_dying_tracer_leaves_the_target_working_and_unregistered() {
    let mut fixture = start_fixture(8);
    let pid = fixture.pid();
    let region = fixture_region(&fixture);
    let fds_before = fd_table(pid);
    assert_eq!(fixture.command("spin 1").unwrap(), "spinning threads=1");
    let mut helper = std::process::Command::new(std::env::current_exe().unwrap())
        .args([
            "--exact",
            // Its name in the crate's one test binary (tests/it/main.rs).
            "dirty::helper_process_tracks_until_killed",
            "--nocapture",
            "--test-threads=1",
        ])
        .env("SHADOWPATCH_DIRTY_HELPER_TARGET", pid.to_string())
        .env(
            "SHADOWPATCH_DIRTY_HELPER_RANGE",
            format!("{},{}", region.start, region.end),
        )
        .stdin(std::process::Stdio::piped())
        .stdout(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    let mut lines = BufReader::new(helper.stdout.take().unwrap()).lines();
    loop {
        let line = lines.next().expect("the helper exited before tracking").unwrap();
        if line.ends_with("tracking") {
            break;
        }
    }
    assert_ne!(tracer_pid(pid), 0);
    assert!(is_registered(pid, &region));
    assert_eq!(fd_table(pid), fds_before);
    nix::sys::signal::kill(
        nix::unistd::Pid::from_raw(helper.id() as i32),
        nix::sys::signal::Signal::SIGKILL,
    )
    .unwrap();
    helper.wait().unwrap();
    // The kernel closed the helper's descriptor (the only reference to the
    // userfaultfd) and ended its ptrace before reporting its death.
    assert_eq!(uffd_wp_mappings(pid), Vec::<(u64, u64)>::new());
    assert_eq!(tracer_pid(pid), 0);
    assert_eq!(fd_table(pid), fds_before);
    assert!(fixture.command("quiet").unwrap().starts_with("quiet writes="));
    assert_target_healthy(&mut fixture);
}

#[test]
fn soft_dirty_is_detected_by_behaviour_and_an_unavailable_method_is_refused_untouched() {
    let mut fixture = start_fixture(4);
    let pid = fixture.pid();
    let ranges = fixture_ranges(&fixture);
    let status = detect()
        .methods
        .into_iter()
        .find(|s| s.method == DirtyMethod::SoftDirty)
        .unwrap();
    let mut attached = seize(&fixture);
    if status.available {
        // A kernel with CONFIG_MEM_SOFT_DIRTY: the method must then work.
        let mut tracker = DirtyTracker::start(&mut attached, &ranges, Some(DirtyMethod::SoftDirty)).unwrap();
        let mut mirror = DataMirror::capture(&tracker, attached.memory()).unwrap();
        let written = dirty_and_list(&mut fixture, 2.0, 5);
        let dirty = tracker.collect_attached(&mut attached).unwrap();
        assert!(written.iter().all(|page| dirty.pages.contains(page)));
        mirror.refresh_pages(&dirty, attached.memory()).unwrap();
        assert!(mirrored_bytes(&mirror) == live_bytes(pid, &ranges));
        return;
    }
    let reason = status.reason.unwrap();
    assert!(reason.contains("CONFIG_MEM_SOFT_DIRTY"), "{reason}");
    let fds_before = fd_table(pid);
    let maps_before = std::fs::read_to_string(format!("/proc/{pid}/maps")).unwrap();
    let error = DirtyTracker::start(&mut attached, &ranges, Some(DirtyMethod::SoftDirty)).unwrap_err();
    assert!(matches!(
        error,
        DirtyError::MethodUnavailable {
            method: DirtyMethod::SoftDirty,
            ..
        }
    ));
    assert!(error.is_bad_input());
    let message = error.to_string();
    assert!(message.starts_with(&format!(
        "dirty-page tracking method soft_dirty is unavailable for pid {pid}: "
    )));
    assert!(!message.contains('\n'), "one line: {message}");
    assert_eq!(fd_table(pid), fds_before);
    assert_eq!(
        std::fs::read_to_string(format!("/proc/{pid}/maps")).unwrap(),
        maps_before
    );
    drop(attached);
    assert_target_healthy(&mut fixture);
}

#[test]
fn a_target_already_using_userfaultfd_falls_back_to_the_sweep_with_the_reason() {
    let mut fixture = start_fixture(4);
    let pid = fixture.pid();
    let ranges = fixture_ranges(&fixture);
    assert_eq!(fixture.command("ownuffd").unwrap(), "ownuffd ok");
    let fds_before = fd_table(pid);
    let own_registration = uffd_wp_mappings(pid);
    assert!(is_registered(pid, &fixture_region(&fixture)));
    let mut attached = seize(&fixture);

    let error = DirtyTracker::start(&mut attached, &ranges, Some(DirtyMethod::UffdWpAsync)).unwrap_err();
    assert!(error.is_bad_input());
    assert!(error.to_string().contains("EBUSY"), "{error}");
    assert_eq!(
        uffd_wp_mappings(pid),
        own_registration,
        "the target's own registration stays, ours is undone"
    );

    let mut tracker = DirtyTracker::start(&mut attached, &ranges, None).unwrap();
    assert_eq!(tracker.method(), DirtyMethod::FullSweep);
    let skipped: Vec<_> = tracker.skipped().iter().map(|s| s.method).collect();
    assert_eq!(skipped, vec![DirtyMethod::UffdWpAsync, DirtyMethod::SoftDirty]);
    assert!(tracker.skipped()[0].reason.as_ref().unwrap().contains("EBUSY"));
    let mut mirror = DataMirror::capture(&tracker, attached.memory()).unwrap();
    let written = dirty_and_list(&mut fixture, 3.0, 11);
    let dirty = tracker.collect_attached(&mut attached).unwrap();
    assert_eq!(dirty.pages.iter().copied().collect::<BTreeSet<_>>(), written);
    assert_eq!(dirty.bytes_read, ranges.iter().map(|r| r.len()).sum::<u64>());
    mirror.refresh_pages(&dirty, attached.memory()).unwrap();
    assert!(mirrored_bytes(&mirror) == live_bytes(pid, &ranges));
    tracker.stop().unwrap();
    assert_eq!(fd_table(pid), fds_before);
    assert_eq!(uffd_wp_mappings(pid), own_registration);
    drop(attached);
    assert_target_healthy(&mut fixture);
}

#[test]
fn bad_ranges_are_refused_with_one_line_and_the_target_untouched() {
    let mut fixture = start_fixture(4);
    let pid = fixture.pid();
    let region = fixture_region(&fixture);
    let fds_before = fd_table(pid);
    let text = shadowpatch_process::maps::read_maps(pid)
        .unwrap()
        .into_iter()
        .find(|m| m.executable && m.file().is_some())
        .unwrap();
    let mut attached = seize(&fixture);
    let cases = [
        (
            TrackedRange {
                start: region.start + 8,
                end: region.end,
            },
            "not page-aligned",
        ),
        (
            // Below vm.mmap_min_addr: never mapped.
            TrackedRange {
                start: PAGE,
                end: 3 * PAGE,
            },
            "not entirely mapped",
        ),
        (
            TrackedRange {
                start: text.start,
                end: text.start + PAGE,
            },
            "not writable (only mutable memory is tracked)",
        ),
    ];
    for (range, problem) in cases {
        for method in [None, Some(DirtyMethod::UffdWpAsync), Some(DirtyMethod::FullSweep)] {
            let error = DirtyTracker::start(&mut attached, &[range], method).unwrap_err();
            assert!(error.is_bad_input(), "{error}");
            assert_eq!(
                error.to_string(),
                format!(
                    "tracked range {:#x}..{:#x} of pid {pid}: {problem}",
                    range.start, range.end
                )
            );
        }
    }
    assert_eq!(uffd_wp_mappings(pid), Vec::<(u64, u64)>::new());
    assert_eq!(fd_table(pid), fds_before);
    drop(attached);
    assert_target_healthy(&mut fixture);
}
