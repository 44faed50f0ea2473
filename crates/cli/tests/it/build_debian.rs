//! `shadowpatch build --debian` end to end on Debian's own memcached
//! (stripped, 2 dynamic symbols): from nothing but a source diff and the
//! PID, build finds the package and version, fetches the source, checks
//! the build dependencies, rebuilds the reference with the package's own
//! rules (with the archive's headers when the plain rebuild's build-id
//! differs) and builds a patch of the static `process_stat`. Applied under
//! a get/set load, `stats cachedump` is refused; rolled back, it answers
//! again. Then the harder diff (a string of the inlined `version`
//! handler): its caller is rebuilt, applied, answers the new version, and
//! is rolled back. No request of the load fails.
//!
//! Needs /usr/bin/memcached and its build dependencies (`.ci/run` installs
//! both). The source, the header overlays, the reference builds and the
//! build cache are kept in `$SHADOWPATCH_DEBSRC_CACHE` (default
//! `target/tmp/debsrc-cache`): a first run makes three full builds of
//! memcached (plain reference, reference with the archive's headers,
//! original: 112 s for the test with two shared cores at load 5, about
//! 4 minutes at load 13), later runs only the two patched ones (27 s).

use crate::common::shadowpatch;
use std::io::{BufRead, BufReader, Write};
use std::net::{TcpListener, TcpStream};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

const MEMCACHED: &str = "/usr/bin/memcached";
const DIFF: &str = concat!(
    env!("CARGO_MANIFEST_DIR"),
    "/../debsrc/tests/data/memcached-cachedump.diff"
);

fn cache_dir() -> PathBuf {
    std::env::var_os("SHADOWPATCH_DEBSRC_CACHE")
        .filter(|dir| !dir.is_empty())
        .map(PathBuf::from)
        .unwrap_or_else(|| PathBuf::from(env!("CARGO_TARGET_TMPDIR")).join("debsrc-cache"))
}

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
    while Client::connect(port).and_then(|mut c| c.command("version")).is_err() {
        assert!(Instant::now() < deadline, "memcached did not answer on port {port}");
        std::thread::sleep(Duration::from_millis(20));
    }
    server
}

/// One text-protocol connection.
struct Client {
    reader: BufReader<TcpStream>,
    stream: TcpStream,
}

impl Client {
    fn connect(port: u16) -> std::io::Result<Client> {
        let stream = TcpStream::connect(("127.0.0.1", port))?;
        stream.set_read_timeout(Some(Duration::from_secs(10)))?;
        Ok(Client {
            reader: BufReader::new(stream.try_clone()?),
            stream,
        })
    }

    fn line(&mut self) -> std::io::Result<String> {
        let mut text = String::new();
        if self.reader.read_line(&mut text)? == 0 {
            return Err(std::io::Error::other("connection closed"));
        }
        Ok(text.trim_end_matches("\r\n").to_string())
    }

    /// Send `line`; the reply up to its last line (`END`, a one-line
    /// reply, or an error), lines joined by "\n".
    fn command(&mut self, line: &str) -> std::io::Result<String> {
        self.stream.write_all(format!("{line}\r\n").as_bytes())?;
        let mut reply = Vec::new();
        loop {
            let text = self.line()?;
            let last = !(text.starts_with("ITEM ") || text.starts_with("STAT "));
            reply.push(text);
            if last {
                return Ok(reply.join("\n"));
            }
        }
    }

    fn set_then_get(&mut self, key: &str, value: &str) -> std::io::Result<()> {
        self.stream
            .write_all(format!("set {key} 0 0 {}\r\n{value}\r\n", value.len()).as_bytes())?;
        let stored = self.line()?;
        if stored != "STORED" {
            return Err(std::io::Error::other(format!("set {key}: {stored:?}")));
        }
        self.stream.write_all(format!("get {key}\r\n").as_bytes())?;
        let (header, data, end) = (self.line()?, self.line()?, self.line()?);
        if header != format!("VALUE {key} 0 {}", value.len()) || data != value || end != "END" {
            return Err(std::io::Error::other(format!("get {key}: {header:?} {data:?} {end:?}")));
        }
        Ok(())
    }
}

#[test]
fn a_target_from_no_package_is_one_line_and_exit_two() {
    let dir = tempfile::tempdir().unwrap();
    let out = dir.path().join("out");
    let run = shadowpatch(
        &dir.path().join("state"),
        &[
            "build",
            "--debian",
            "--diff",
            DIFF,
            "--target",
            env!("CARGO_BIN_EXE_shadowpatch"),
            "--out",
            out.to_str().unwrap(),
            "--debsrc-cache",
            dir.path().join("cache").to_str().unwrap(),
        ],
    );
    crate::common::assert_bad_input(&run, "belongs to no installed package");
    assert!(!out.exists());
}

/// A diff that does not apply to the package's source is one line naming
/// the file and the hunk, found before the build dependencies and the
/// minutes of the reference build (the source comes from the shared
/// cache, fetched once).
#[test]
fn a_diff_that_does_not_apply_is_refused_before_any_build() {
    let dir = tempfile::tempdir().unwrap();
    let stale = dir.path().join("stale.diff");
    let text = std::fs::read_to_string(DIFF)
        .unwrap()
        .replace("if (!settings.dump_enabled) {", "if (!settings.dump_enabled_typo) {");
    std::fs::write(&stale, text).unwrap();
    let out = dir.path().join("out");
    let started = Instant::now();
    let run = shadowpatch(
        &dir.path().join("state"),
        &[
            "build",
            "--debian",
            "--diff",
            stale.to_str().unwrap(),
            "--target",
            MEMCACHED,
            "--out",
            out.to_str().unwrap(),
            "--debsrc-cache",
            cache_dir().to_str().unwrap(),
        ],
    );
    crate::common::assert_bad_input(&run, "proto_text.c");
    assert!(run.stderr.contains("Hunk #1"), "{}", run.stderr);
    assert!(!out.exists());
    eprintln!("refused in {:.1} s", started.elapsed().as_secs_f64());
}

#[test]
fn debian_memcached_patched_from_a_diff_under_load() {
    let started = Instant::now();
    let dir = tempfile::tempdir().unwrap();
    let state = dir.path().join("state");
    let server = start_memcached();
    let pid = server.child.id().to_string();
    let port = server.port;
    let mut client = Client::connect(port).unwrap();
    let before = client.command("stats cachedump 1 10").unwrap();
    assert!(before.ends_with("END") && !before.contains("ERROR"), "{before:?}");

    // Sets and gets on one connection, reconnecting after a failure.
    let stop = Arc::new(AtomicBool::new(false));
    let ok = Arc::new(AtomicU64::new(0));
    let failed = Arc::new(AtomicU64::new(0));
    let errors = Arc::new(std::sync::Mutex::new(Vec::<String>::new()));
    let load = {
        let (stop, ok, failed, errors) = (stop.clone(), ok.clone(), failed.clone(), errors.clone());
        std::thread::spawn(move || {
            let deadline = Instant::now() + Duration::from_secs(600);
            let mut connection: Option<Client> = None;
            let mut i = 0u64;
            while !stop.load(Ordering::Relaxed) && Instant::now() < deadline {
                i += 1;
                let result = match connection.as_mut() {
                    Some(client) => client.set_then_get(&format!("k{}", i % 100), &format!("v{i}")),
                    None => match Client::connect(port) {
                        Ok(client) => {
                            connection = Some(client);
                            continue;
                        }
                        Err(error) => Err(error),
                    },
                };
                match result {
                    Ok(()) => ok.fetch_add(1, Ordering::Relaxed),
                    Err(error) => {
                        errors.lock().unwrap().push(error.to_string());
                        connection = None;
                        failed.fetch_add(1, Ordering::Relaxed)
                    }
                };
                // A steady load, not a saturating one: the builds share the cores.
                std::thread::sleep(Duration::from_millis(2));
            }
        })
    };

    let cache = cache_dir();
    let build_cache = cache.join("build");
    let out = dir.path().join("cachedump");
    let build_started = Instant::now();
    let built = shadowpatch(
        &state,
        &[
            "--json",
            "build",
            "--debian",
            "--diff",
            DIFF,
            "--target",
            &pid,
            "--out",
            out.to_str().unwrap(),
            "--debsrc-cache",
            cache.to_str().unwrap(),
            "--cache",
            build_cache.to_str().unwrap(),
        ],
    );
    let build_seconds = build_started.elapsed().as_secs_f64();
    assert_eq!(built.code, 0, "{}{}", built.stdout, built.stderr);
    let json = built.json();
    assert_eq!(json["debian"]["source_package"], "memcached");
    assert_eq!(json["debian"]["binary"], MEMCACHED);
    // The reference is Debian's build, bit for bit (with the archive's
    // headers if this machine's -dev packages are older or newer).
    assert_eq!(json["debian"]["reference_how"], "build_id", "{:#}", json["debian"]);
    assert_eq!(json["reference_build_id"], json["target_build_id"]);
    let changed: Vec<&str> = json["functions_changed"]
        .as_array()
        .unwrap()
        .iter()
        .map(|f| f["symbol"].as_str().unwrap())
        .collect();
    assert_eq!(changed, ["proto_text.c::process_stat"], "{:#}", json);
    assert!(json["functions_included_for_inlining"].as_array().unwrap().is_empty());
    let reference_reused = json["debian"]["reference_reused"].clone();
    let manifest = out.join("manifest.toml");

    let applied = shadowpatch(&state, &["apply", &pid, manifest.to_str().unwrap()]);
    assert_eq!(applied.code, 0, "{}{}", applied.stdout, applied.stderr);
    let refused = client.command("stats cachedump 1 10").unwrap();
    assert_eq!(refused, "CLIENT_ERROR stats cachedump not allowed");
    // The other stats subcommands of the replaced function still answer.
    assert_eq!(client.command("stats reset").unwrap(), "RESET");
    let verify = shadowpatch(&state, &["verify", &pid]);
    assert_eq!(verify.code, 0, "{}{}", verify.stdout, verify.stderr);

    let rolled_back = shadowpatch(&state, &["rollback", &pid]);
    assert_eq!(rolled_back.code, 0, "{}{}", rolled_back.stdout, rolled_back.stderr);
    let after = client.command("stats cachedump 1 10").unwrap();
    assert!(after.ends_with("END") && !after.contains("ERROR"), "{after:?}");
    let verify = shadowpatch(&state, &["verify", &pid]);
    assert_eq!(verify.code, 0, "{}{}", verify.stdout, verify.stderr);

    // The harder case: the `version` handler is inlined into
    // process_command_ascii.part.0, and the diff changes only the string
    // it points to; the caller is rebuilt and included for inlining.
    let version_diff = DIFF.replace("memcached-cachedump.diff", "memcached-version.diff");
    let version_out = dir.path().join("version");
    let built = shadowpatch(
        &state,
        &[
            "--json",
            "build",
            "--debian",
            "--diff",
            &version_diff,
            "--target",
            &pid,
            "--out",
            version_out.to_str().unwrap(),
            "--debsrc-cache",
            cache.to_str().unwrap(),
            "--cache",
            build_cache.to_str().unwrap(),
        ],
    );
    assert_eq!(built.code, 0, "{}{}", built.stdout, built.stderr);
    let json = built.json();
    let included: Vec<&str> = json["functions_included_for_inlining"]
        .as_array()
        .unwrap()
        .iter()
        .map(|f| f["symbol"].as_str().unwrap())
        .collect();
    assert_eq!(included, ["proto_text.c::process_command_ascii.part.0"], "{:#}", json);
    assert_eq!(client.command("version").unwrap(), "VERSION 1.6.18");
    let manifest = version_out.join("manifest.toml");
    let applied = shadowpatch(&state, &["apply", &pid, manifest.to_str().unwrap()]);
    assert_eq!(applied.code, 0, "{}{}", applied.stdout, applied.stderr);
    assert_eq!(client.command("version").unwrap(), "VERSION 1.6.18 (live-patched)");
    let rolled_back = shadowpatch(&state, &["rollback", &pid]);
    assert_eq!(rolled_back.code, 0, "{}{}", rolled_back.stdout, rolled_back.stderr);
    assert_eq!(client.command("version").unwrap(), "VERSION 1.6.18");

    stop.store(true, Ordering::Relaxed);
    load.join().unwrap();
    let (ok, failed) = (ok.load(Ordering::Relaxed), failed.load(Ordering::Relaxed));
    eprintln!(
        "first build --debian: {build_seconds:.1} s (reference reused: {reference_reused}), {ok} requests, {failed} failed, test {:.1} s",
        started.elapsed().as_secs_f64()
    );
    assert!(ok > 0, "the load made no request");
    assert_eq!(failed, 0, "failed requests: {:?}", errors.lock().unwrap());
}
