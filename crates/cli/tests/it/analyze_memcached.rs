//! `analyze` on Debian's memcached (stripped) and the libevent it links,
//! as a new user would patch it (docs/writing-patches.md): a benign patch
//! of `event_get_version` that returns another string warns as an
//! undeclared behaviour change and proceeds once declared; a NULL
//! dereference in the same function is harm and is refused; a capture
//! that catches no call gives the static verdict and risk, never a lower
//! one; a replacement calling back into libevent (through the PLT, as
//! libevent itself does) is compared like with like.

use crate::common::{assert_untouched, build_id_of, shadowpatch};
use std::io::{Read, Write};
use std::net::{TcpListener, TcpStream};
use std::path::Path;
use std::process::{Child, Command, Stdio};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

const MEMCACHED: &str = "/usr/bin/memcached";

struct Memcached {
    child: Child,
    port: u16,
}

impl Drop for Memcached {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// One `stats` request (which calls event_get_version); its reply.
fn stats(port: u16) -> std::io::Result<String> {
    let mut stream = TcpStream::connect(("127.0.0.1", port))?;
    stream.set_read_timeout(Some(Duration::from_secs(10)))?;
    stream.write_all(b"stats\r\n")?;
    let mut reply = Vec::new();
    let mut chunk = [0u8; 4096];
    while !reply.ends_with(b"END\r\n") {
        let read = stream.read(&mut chunk)?;
        if read == 0 {
            break;
        }
        reply.extend_from_slice(&chunk[..read]);
    }
    Ok(String::from_utf8_lossy(&reply).into_owned())
}

fn start_memcached() -> Memcached {
    assert!(
        Path::new(MEMCACHED).exists(),
        "{MEMCACHED} is missing: install Debian's memcached (apt-get install -y memcached), as .ci/run does"
    );
    let port = TcpListener::bind("127.0.0.1:0").unwrap().local_addr().unwrap().port();
    let mut command = Command::new(MEMCACHED);
    command.args(["-U", "0", "-l", "127.0.0.1", "-p", &port.to_string()]);
    if nix::unistd::geteuid().is_root() {
        command.args(["-u", "nobody"]);
    }
    let child = command.stdin(Stdio::null()).spawn().expect("memcached starts");
    let server = Memcached { child, port };
    let deadline = Instant::now() + Duration::from_secs(20);
    while stats(port).is_err() {
        assert!(Instant::now() < deadline, "memcached did not answer on port {port}");
        std::thread::sleep(Duration::from_millis(20));
    }
    server
}

/// Clients sending `stats` until dropped.
struct Traffic {
    stop: Arc<AtomicBool>,
    thread: Option<std::thread::JoinHandle<()>>,
}

impl Traffic {
    fn start(port: u16) -> Traffic {
        let stop = Arc::new(AtomicBool::new(false));
        let flag = stop.clone();
        let thread = std::thread::spawn(move || {
            while !flag.load(Ordering::Relaxed) {
                let reply = stats(port).expect("memcached answers stats");
                assert!(reply.contains("STAT libevent 2.1"), "{reply}");
                std::thread::sleep(Duration::from_millis(50));
            }
        });
        Traffic {
            stop,
            thread: Some(thread),
        }
    }
}

impl Drop for Traffic {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Relaxed);
        if let Some(thread) = self.thread.take() {
            thread.join().expect("every stats request was answered");
        }
    }
}

/// The libevent memcached maps.
fn libevent_of(pid: u32) -> std::path::PathBuf {
    let maps = std::fs::read_to_string(format!("/proc/{pid}/maps")).unwrap();
    let path = maps
        .lines()
        .filter_map(|line| line.split_whitespace().nth(5))
        .find(|path| path.contains("libevent-2.1"))
        .expect("memcached maps libevent");
    Path::new(path).to_path_buf()
}

/// Compile `source` into `dir/name.so` and write `dir/name.toml`
/// replacing `symbol` with `with`, plus `extra` manifest lines.
pub(crate) fn patch(
    dir: &Path,
    build_id: &str,
    name: &str,
    source: &str,
    symbol: &str,
    with: &str,
    extra: &str,
) -> String {
    let c = dir.join(format!("{name}.c"));
    std::fs::write(&c, source).unwrap();
    let object = dir.join(format!("{name}.so"));
    let status = Command::new("gcc")
        .args(["-O2", "-g", "-fPIC", "-shared", "-o"])
        .arg(&object)
        .arg(&c)
        .status()
        .unwrap();
    assert!(status.success());
    let manifest = dir.join(format!("{name}.toml"));
    std::fs::write(
        &manifest,
        format!(
            "id = \"{name}\"\nobject = \"{}\"\n[target]\nbuild_id = \"{build_id}\"\n[[replace]]\nsymbol = \"{symbol}\"\nwith = \"{with}\"\n{extra}",
            object.display()
        ),
    )
    .unwrap();
    manifest.display().to_string()
}

#[test]
fn debian_memcached_verdicts_tell_harm_from_intended_change_and_no_evidence_from_evidence() {
    let server = start_memcached();
    let pid = server.child.id();
    let pid_text = pid.to_string();
    let dir = tempfile::tempdir().unwrap();
    let state = dir.path().join("state");
    let build_id = build_id_of(&libevent_of(pid));
    const VERSION: &str = "const char *event_get_version_v2(void) { return \"2.1.12-stable-patched\"; }\n";
    let benign = patch(
        dir.path(),
        &build_id,
        "ver",
        VERSION,
        "event_get_version",
        "event_get_version_v2",
        "",
    );
    let declared = patch(
        dir.path(),
        &build_id,
        "verd",
        VERSION,
        "event_get_version",
        "event_get_version_v2",
        "behaviour = \"changed\"\n",
    );
    let null = patch(
        dir.path(),
        &build_id,
        "null",
        "const char *event_get_version_null(void) { return *(const char *volatile *)0; }\n",
        "event_get_version",
        "event_get_version_null",
        "",
    );
    let analyze = |manifest: &str, extra: &[&str]| {
        let mut args = vec!["analyze", &pid_text, manifest, "--json"];
        args.extend_from_slice(extra);
        let run = shadowpatch(&state, &args);
        assert!(run.code == 0 || run.code == 1, "{}{}", run.stdout, run.stderr);
        run.json()
    };
    let classes = |report: &serde_json::Value, code: &str| -> Vec<(String, String)> {
        report["findings"]
            .as_array()
            .unwrap()
            .iter()
            .filter(|f| f["code"] == code)
            .map(|f| {
                (
                    f["severity"].as_str().unwrap().into(),
                    f["class"].as_str().unwrap().into(),
                )
            })
            .collect()
    };

    // No traffic: a capture that catches no call is no evidence.
    let alone = analyze(&benign, &[]);
    let nothing = analyze(&benign, &["--capture", "2", "--capture-for", "1"]);
    assert_eq!(nothing["features"]["sim_calls"], 0.0, "{nothing}");
    assert_eq!(nothing["verdict"], alone["verdict"], "{nothing}");
    assert!(
        nothing["risk"].as_f64().unwrap() >= alone["risk"].as_f64().unwrap() - 1e-9,
        "asking for evidence and getting none lowered the risk: {} < {}",
        nothing["risk"],
        alone["risk"]
    );
    let notes = nothing["unavailable"].to_string();
    assert!(notes.contains("no call was simulated"), "{notes}");

    // Live calls: the undeclared change warns with examples; declared, it
    // proceeds; a NULL dereference is harm.
    let traffic = Traffic::start(server.port);
    let undeclared = analyze(&benign, &["--capture", "3"]);
    assert_eq!(undeclared["verdict"], "warn", "{undeclared}");
    assert_eq!(
        classes(&undeclared, "sim-return-differs"),
        vec![("warning".to_string(), "behaviour_change".to_string())]
    );
    let report = analyze(&declared, &["--capture", "3"]);
    assert_eq!(report["verdict"], "proceed", "{report}");
    assert_eq!(
        classes(&report, "sim-return-differs"),
        vec![("info".to_string(), "behaviour_change".to_string())]
    );
    assert!(
        report["explanation"]["basis"]
            .as_str()
            .unwrap()
            .contains("3 live calls"),
        "{report}"
    );
    let crash = analyze(&null, &["--capture", "3"]);
    assert_eq!(crash["verdict"], "refuse", "{crash}");
    assert_eq!(classes(&crash, "sim-patched-crashes")[0].1, "harm");
    assert!(
        crash["risk"].as_f64().unwrap() > undeclared["risk"].as_f64().unwrap(),
        "the crashing patch scored less risky than the benign one: {} vs {}",
        crash["risk"],
        undeclared["risk"]
    );

    // Harm one call does not show: right twice, then a NULL dereference
    // (a counter of the patch's own). Each call's copies are made afresh,
    // but the patch's own statics go from each simulated call to the next
    // as they would live: without repeats, the third captured call
    // crashes; with them, the repeats of the first call in the same copies
    // crash on its third run. Either refuses.
    let third = patch(
        dir.path(),
        &build_id,
        "third",
        "const char *event_get_version_third(void) {\n\
         static volatile unsigned calls;\n\
         if (++calls % 3 == 0) return *(const char *volatile *)0;\n\
         return \"2.1.12-stable\";\n}\n",
        "event_get_version",
        "event_get_version_third",
        "",
    );
    let once = analyze(&third, &["--capture", "3", "--sim-repeat", "0"]);
    assert_eq!(
        classes(&once, "sim-patched-crashes"),
        vec![("blocking".to_string(), "harm".to_string())],
        "{once}"
    );
    assert!(classes(&once, "sim-patched-fails-on-repeat").is_empty(), "{once}");
    assert_eq!(once["verdict"], "refuse", "{once}");
    let repeated = analyze(&third, &["--capture", "3"]);
    assert_eq!(repeated["verdict"], "refuse", "{repeated}");
    assert_eq!(
        classes(&repeated, "sim-patched-fails-on-repeat"),
        vec![("blocking".to_string(), "harm".to_string())]
    );
    // A benign counter keeps state of its own too (a risk finding); live
    // calls, each repeated without harm, warn with it, never refuse.
    let counter = patch(
        dir.path(),
        &build_id,
        "counter",
        "const char *event_get_version_counted(void) {\n\
         static volatile unsigned long calls;\n\
         calls++;\n\
         return \"2.1.12-stable\";\n}\n",
        "event_get_version",
        "event_get_version_counted",
        "",
    );
    let counted = analyze(&counter, &["--capture", "3"]);
    assert_eq!(counted["verdict"], "warn", "{counted}");
    assert_eq!(classes(&counted, "patch-global-state").len(), 1, "{counted}");
    assert_eq!(counted["features"]["sim_live_repeated_clean"], 3.0, "{counted}");
    drop(traffic);

    // Like with like: libevent calls its own exported evbuffer_add_vprintf
    // through its PLT; a replacement calling it too adds no loop.
    let printf = patch(
        dir.path(),
        &build_id,
        "printf",
        "#include <stdarg.h>\nstruct evbuffer;\nextern int evbuffer_add_vprintf(struct evbuffer *, const char *, va_list);\n\
         int evbuffer_add_printf_v2(struct evbuffer *b, const char *f, ...) {\n\
         va_list ap; va_start(ap, f); int r = evbuffer_add_vprintf(b, f, ap); va_end(ap); return r; }\n",
        "evbuffer_add_printf",
        "evbuffer_add_printf_v2",
        "",
    );
    let report = analyze(&printf, &[]);
    assert!(classes(&report, "added-loop").is_empty(), "{report}");
    assert_untouched(pid as i32);
    assert!(stats(server.port).unwrap().contains("STAT libevent 2.1.12-stable\r\n"));
}
