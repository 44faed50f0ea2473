//! Shared helpers of the simulation tests: the sim.c and busy.rs fixtures
//! with their patch objects, manifests, and the checks every test ends with
//! (the live target served correctly, is untouched, has no child left).

#![allow(dead_code)]

use shadowpatch_fixtures::{build_patch, Fixture, Patch, Running};
use shadowpatch_predict::simulate::{
    simulate, CaptureLimit, Limits, Progress, SimulateError, SimulationOptions, SimulationReport,
};
use shadowpatch_predict::{Finding, Severity};
use std::net::UdpSocket;
use std::path::{Path, PathBuf};
use std::time::Duration;

/// A live fixture, its state directory, and what the sandbox must protect.
pub struct Live {
    pub target: Running,
    pub dir: tempfile::TempDir,
    /// The log file sim.c holds open for appending (empty, and must stay so).
    pub log: PathBuf,
    /// The receiving end of sim.c's connected UDP socket.
    pub udp: Option<UdpSocket>,
    pub object: PathBuf,
}

impl Live {
    /// sim.c with `threads` compute workers.
    pub fn sim(threads: usize) -> Live {
        let dir = tempfile::tempdir().unwrap();
        let log = dir.path().join("service.log");
        let udp = UdpSocket::bind("127.0.0.1:0").unwrap();
        udp.set_nonblocking(true).unwrap();
        let port = udp.local_addr().unwrap().port().to_string();
        let target = Running::start(Fixture::Sim, &[&threads.to_string(), log.to_str().unwrap(), &port]).unwrap();
        Live {
            target,
            dir,
            log,
            udp: Some(udp),
            object: build_patch(Patch::SimPatches).unwrap(),
        }
    }

    /// busy.rs with `threads` workers calling rust_work.
    pub fn rust(threads: usize) -> Live {
        let dir = tempfile::tempdir().unwrap();
        let log = dir.path().join("unused.log");
        let target = Running::start(Fixture::BusyRust, &[&threads.to_string()]).unwrap();
        Live {
            target,
            dir,
            log,
            udp: None,
            object: build_patch(Patch::RustSim).unwrap(),
        }
    }

    /// server.c with one worker: with DWARF (`debug`) or without.
    pub fn server(debug: bool) -> Live {
        let mut live = Live::server_before_any_command(debug);
        // One command runs the server's strstr, which binds its lazy GOT
        // slot: the patch object calls strstr (handle_command_libc), a
        // libc IFUNC whose implementation is read from that slot.
        live.target.check().unwrap();
        live
    }

    /// server.c as started: its lazily bound strstr slot not filled yet.
    pub fn server_before_any_command(debug: bool) -> Live {
        let dir = tempfile::tempdir().unwrap();
        let log = dir.path().join("unused.log");
        let fixture = if debug { Fixture::Server } else { Fixture::ServerNoDebug };
        let target = Running::start(fixture, &["1"]).unwrap();
        Live {
            target,
            dir,
            log,
            udp: None,
            object: build_patch(Patch::ServerPatches).unwrap(),
        }
    }

    pub fn pid(&self) -> i32 {
        self.target.pid()
    }

    pub fn state(&self) -> PathBuf {
        self.dir.path().join("state")
    }

    /// A manifest replacing `symbol` with `with` from this fixture's patch
    /// object.
    pub fn manifest(&self, id: &str, replacements: &[(&str, &str)]) -> PathBuf {
        let image = shadowpatch_symbols::ElfImage::open(&self.target.binary()).unwrap();
        let build_id = shadowpatch_symbols::hex(image.build_id.as_deref().unwrap());
        let mut text = format!(
            "id = \"{id}\"\nobject = \"{}\"\n[target]\nbuild_id = \"{build_id}\"\n",
            self.object.display()
        );
        for (symbol, with) in replacements {
            text.push_str(&format!("[[replace]]\nsymbol = \"{symbol}\"\nwith = \"{with}\"\n"));
        }
        let path = self.dir.path().join(format!("{id}.toml"));
        std::fs::write(&path, text).unwrap();
        path
    }

    pub fn simulate(&self, manifest: &Path, options: &SimulationOptions) -> Result<SimulationReport, SimulateError> {
        let survey = shadowpatch_patch::survey::survey(self.pid(), manifest, &[])?;
        simulate(&self.state(), &survey, options, &mut |_: Progress| {})
    }

    /// The live service answered correctly all along, nobody traces it, no
    /// thread is stopped, it has no child (no copy, not even a zombie), no
    /// probe is left open, and the first byte of each of `functions` is
    /// the original one again.
    pub fn assert_untouched(&mut self, functions: &[(u64, u8)]) {
        assert!(self.target.is_running(), "the live fixture is still running");
        assert_eq!(
            self.target.check().unwrap()["errors"],
            0,
            "the live fixture served correctly"
        );
        let pid = self.pid();
        let status = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap();
        assert!(status.contains("TracerPid:\t0"), "left traced:\n{status}");
        for entry in std::fs::read_dir(format!("/proc/{pid}/task")).unwrap() {
            let path = entry.unwrap().path();
            let stat = std::fs::read_to_string(path.join("stat")).unwrap_or_default();
            let state = stat
                .rsplit_once(") ")
                .map(|(_, r)| r.chars().next().unwrap())
                .unwrap_or('?');
            assert!(state != 't' && state != 'T', "a thread was left stopped ({state})");
        }
        let children = shadowpatch_fixtures::children_of(pid);
        assert!(
            children.is_empty(),
            "children left behind (not even a zombie may stay): {children:?}"
        );
        let identity = shadowpatch_process::ProcessIdentity::of(pid).unwrap();
        let mut live = shadowpatch_process::TargetMemory::open(&identity).unwrap();
        for &(address, original) in functions {
            assert_eq!(
                live.read_vec(address, 1).unwrap()[0],
                original,
                "breakpoint at {address:#x} removed"
            );
        }
        let dir = std::fs::read_dir(self.state().join("targets"))
            .ok()
            .and_then(|mut d| d.next())
            .map(|e| e.unwrap().path());
        if let Some(dir) = dir {
            let journal = shadowpatch_patch::journal::Journal::replay(&dir).unwrap();
            assert!(journal.open.is_none(), "no transaction left open");
            assert!(
                !shadowpatch_patch::state::copies_log_path(&dir).exists(),
                "every copy reaped"
            );
        }
    }

    /// The first byte of the function at `address`, read live.
    pub fn byte_at(&self, address: u64) -> u8 {
        let identity = shadowpatch_process::ProcessIdentity::of(self.pid()).unwrap();
        shadowpatch_process::TargetMemory::open(&identity)
            .unwrap()
            .read_vec(address, 1)
            .unwrap()[0]
    }
}

/// Capture `calls` live calls per function, short budgets.
pub fn capturing(calls: u32) -> SimulationOptions {
    SimulationOptions {
        capture: Some(CaptureLimit {
            calls,
            within: Some(Duration::from_secs(30)),
            spread: false,
        }),
        limits: Limits {
            cpu: Duration::from_millis(300),
            wall: Duration::from_secs(10),
            syscalls: 1000,
        },
        ..SimulationOptions::default()
    }
}

pub fn codes(report: &SimulationReport) -> Vec<String> {
    report.findings.iter().map(|f| f.code.clone()).collect()
}

pub fn finding<'a>(report: &'a SimulationReport, code: &str) -> &'a Finding {
    report
        .findings
        .iter()
        .find(|f| f.code == code)
        .unwrap_or_else(|| panic!("no {code} finding in {:#?}", report.findings))
}

pub fn blocking(report: &SimulationReport) -> Vec<&Finding> {
    report
        .findings
        .iter()
        .filter(|f| f.severity == Severity::Blocking)
        .collect()
}
