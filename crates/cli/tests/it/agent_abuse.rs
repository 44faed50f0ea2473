//! The agent as a local user other than root sees it (issue 15, privilege
//! and denial of service): a path the user cannot see is refused with the
//! same line whether it exists or not, a final symlink and a FIFO are
//! refused without blocking, and slow or idle connections of one user do
//! not keep root's CLI out.

use crate::common::agent::Agent;
use std::io::{BufRead, BufReader, Write};
use std::os::unix::fs::PermissionsExt;
use std::os::unix::net::UnixStream;
use std::os::unix::process::CommandExt;
use std::path::Path;
use std::process::{Child, Command, Stdio};

/// An agent whose control socket any user may reach (mode 0666).
fn open_agent(dir: &Path) -> Agent {
    Agent::start_with(dir, &["--socket-mode", "666"], &[])
}

/// A process owned by uid 65534, killed on drop: a target that user may
/// name, so requests get past the pid check to the file checks.
struct NobodysProcess(Child);

impl NobodysProcess {
    fn start() -> NobodysProcess {
        NobodysProcess(Command::new("sleep").arg("600").uid(65534).gid(65534).spawn().unwrap())
    }
}

impl Drop for NobodysProcess {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

/// `shadowpatch apply PID MANIFEST` run as uid 65534 through the agent.
fn apply_as_nobody(dir: &Path, agent: &Agent, pid: u32, manifest: &Path) -> crate::common::Run {
    let (_bin_dir, binary) = crate::common::binary_runnable_by_anyone();
    let mut attempts = 0;
    loop {
        let output = Command::new(&binary)
            .args(["apply", &pid.to_string()])
            .arg(manifest)
            .env("SHADOWPATCH_STATE_DIR", dir.join("state"))
            .env("SHADOWPATCH_AGENT_SOCKET", &agent.socket)
            .current_dir("/")
            .uid(65534)
            .gid(65534)
            .output();
        match output {
            Ok(output) => return crate::common::from_output(output),
            // The fresh copy is still open for writing in a child another
            // test thread forked meanwhile (ETXTBSY): that child execs soon.
            Err(error) if error.raw_os_error() == Some(libc::ETXTBSY) && attempts < 50 => {
                attempts += 1;
                std::thread::sleep(std::time::Duration::from_millis(20));
            }
            Err(error) => panic!("running {}: {error}", binary.display()),
        }
    }
}

fn world_enterable_dir() -> tempfile::TempDir {
    let dir = tempfile::tempdir().unwrap();
    std::fs::set_permissions(dir.path(), std::fs::Permissions::from_mode(0o755)).unwrap();
    dir
}

#[test]
fn a_path_nobody_cannot_see_is_refused_the_same_whether_it_exists_or_not() {
    let dir = world_enterable_dir();
    let agent = open_agent(dir.path());
    let target = NobodysProcess::start();
    // Root's 0700 directory with one manifest in it.
    let hidden = dir.path().join("roots-only");
    std::fs::create_dir(&hidden).unwrap();
    std::fs::set_permissions(&hidden, std::fs::Permissions::from_mode(0o700)).unwrap();
    std::fs::write(hidden.join("secret.toml"), "id = \"x\"\n").unwrap();
    let present = apply_as_nobody(dir.path(), &agent, target.0.id(), &hidden.join("secret.toml"));
    let missing = apply_as_nobody(dir.path(), &agent, target.0.id(), &hidden.join("absent.toml"));
    assert_eq!(present.code, 2, "{}", present.stderr);
    assert_eq!(missing.code, 2, "{}", missing.stderr);
    assert!(present.stderr.contains("not found or not yours"), "{}", present.stderr);
    assert_eq!(
        present.stderr.replace("secret.toml", "NAME"),
        missing.stderr.replace("absent.toml", "NAME"),
        "the two refusals differ only by the name asked"
    );
    assert!(!present.stderr.contains("uid 0"), "{}", present.stderr);
    assert_eq!(present.stderr.lines().count(), 1, "one line: {}", present.stderr);
}

#[test]
fn a_symlink_to_roots_file_and_a_fifo_are_refused_without_blocking() {
    let dir = world_enterable_dir();
    let agent = open_agent(dir.path());
    let target = NobodysProcess::start();
    let own = dir.path().join("nobodys");
    std::fs::create_dir(&own).unwrap();
    std::os::unix::fs::chown(&own, Some(65534), Some(65534)).unwrap();
    let root_file = dir.path().join("root.toml");
    std::fs::write(&root_file, "id = \"root\"\n").unwrap();
    std::fs::set_permissions(&root_file, std::fs::Permissions::from_mode(0o600)).unwrap();
    let link = own.join("link.toml");
    std::os::unix::fs::symlink(&root_file, &link).unwrap();
    std::os::unix::fs::lchown(&link, Some(65534), Some(65534)).unwrap();
    let refused = apply_as_nobody(dir.path(), &agent, target.0.id(), &link);
    assert_eq!(refused.code, 2, "{}", refused.stderr);
    assert!(refused.stderr.contains("not found or not yours"), "{}", refused.stderr);

    let fifo = own.join("fifo.toml");
    nix::unistd::mkfifo(&fifo, nix::sys::stat::Mode::from_bits_truncate(0o644)).unwrap();
    std::os::unix::fs::chown(&fifo, Some(65534), Some(65534)).unwrap();
    let refused = apply_as_nobody(dir.path(), &agent, target.0.id(), &fifo);
    assert_eq!(refused.code, 2, "{}", refused.stderr);
    assert!(refused.stderr.contains("not a regular file"), "{}", refused.stderr);
}

/// As uid 65534: open `count` connections to `socket`, each sending one
/// byte of a request and no more (a slowloris), then read the answer of
/// one more and print it, then print "ready" and hold them all until
/// stdin closes.
fn hold_connections_as_nobody(socket: &Path, count: usize) -> (Child, String) {
    const SCRIPT: &str = r#"
        use IO::Socket::UNIX;
        # Connections past the user's share are answered and closed:
        # writing to them must not kill the holder.
        $SIG{PIPE} = 'IGNORE';
        my ($path, $count) = @ARGV;
        my @held;
        for (1..$count) {
            my $s = IO::Socket::UNIX->new(Peer => $path) or die "connect: $!";
            $s->autoflush(1);
            print $s "{";
            push @held, $s;
        }
        my $extra = IO::Socket::UNIX->new(Peer => $path) or die "connect: $!";
        my $answer = <$extra>;
        $answer = "(closed)\n" unless defined $answer;
        $| = 1;
        print $answer;
        print "ready\n";
        my $wait = <STDIN>;
    "#;
    let mut child = Command::new("perl")
        .args(["-e", SCRIPT])
        .arg(socket)
        .arg(count.to_string())
        .uid(65534)
        .gid(65534)
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .spawn()
        .unwrap();
    let mut lines = BufReader::new(child.stdout.take().unwrap()).lines();
    let answer = lines.next().unwrap().unwrap();
    assert_eq!(lines.next().unwrap().unwrap(), "ready");
    (child, answer)
}

fn threads_of(pid: u32) -> usize {
    std::fs::read_to_string(format!("/proc/{pid}/status"))
        .unwrap()
        .lines()
        .find_map(|line| line.strip_prefix("Threads:"))
        .unwrap()
        .trim()
        .parse()
        .unwrap()
}

#[test]
fn one_users_slow_connections_never_keep_root_out() {
    let dir = world_enterable_dir();
    let agent = open_agent(dir.path());
    let (mut holder, answer) = hold_connections_as_nobody(&agent.socket, 70);
    assert!(answer.contains("too many connections from this uid"), "{answer}");
    // Root's request is served while nobody holds every slot they may.
    let mut stream = UnixStream::connect(&agent.socket).unwrap();
    let request = serde_json::json!({
        "op": "status",
        "state_dir": dir.path().join("state"),
        "pid": std::process::id(),
    });
    let mut line = serde_json::to_vec(&request).unwrap();
    line.push(b'\n');
    stream.write_all(&line).unwrap();
    let mut reply = String::new();
    BufReader::new(&stream).read_line(&mut reply).unwrap();
    let reply: serde_json::Value = serde_json::from_str(&reply).unwrap();
    assert_eq!(reply["ok"], true, "{reply}");
    drop(holder.stdin.take());
    let _ = holder.wait();
}

#[test]
fn idle_application_connections_of_one_user_take_a_bounded_number_of_threads() {
    let dir = world_enterable_dir();
    let agent = open_agent(dir.path());
    let before = threads_of(agent.pid());
    let (mut holder, answer) = hold_connections_as_nobody(&agent.app_socket, 200);
    assert!(answer.contains("too many connections from this uid"), "{answer}");
    let after = threads_of(agent.pid());
    assert!(
        after <= before + 64,
        "{before} threads before, {after} with 200 idle connections"
    );
    drop(holder.stdin.take());
    let _ = holder.wait();
}

/// One request line on the application socket, as this test process.
fn ask_app(socket: &Path, request: &serde_json::Value) -> serde_json::Value {
    let mut stream = UnixStream::connect(socket).unwrap();
    let mut line = serde_json::to_vec(request).unwrap();
    line.push(b'\n');
    stream.write_all(&line).unwrap();
    let mut answer = String::new();
    BufReader::new(&stream).read_line(&mut answer).unwrap();
    serde_json::from_str(&answer).unwrap()
}

#[test]
fn an_oversized_variable_is_refused_and_an_exited_processes_variables_are_removed() {
    let dir = world_enterable_dir();
    let agent = open_agent(dir.path());
    let huge = ask_app(
        &agent.app_socket,
        &serde_json::json!({
            "op": "register_variable", "name": "huge", "address": 4096,
            "size": 256u64 << 20, "mode": "mirrored",
        }),
    );
    assert_eq!(huge["ok"], false, "{huge}");
    assert!(
        huge["error"].as_str().unwrap().contains("more than the 1048576 bytes"),
        "{huge}"
    );

    // A process registers a small variable (its first readable page),
    // then exits: its variables.json goes with it.
    const SCRIPT: &str = r#"
        use IO::Socket::UNIX;
        open(my $maps, "<", "/proc/self/maps") or die;
        my ($start) = map { /^([0-9a-f]+)-[0-9a-f]+ r/ ? hex($1) : () } <$maps>;
        my $s = IO::Socket::UNIX->new(Peer => $ARGV[0]) or die "connect: $!";
        $s->autoflush(1);
        print $s "{\"op\":\"register_variable\",\"name\":\"page\",\"address\":$start,\"size\":64,\"mode\":\"guarded\"}\n";
        my $answer = <$s>;
        $| = 1;
        print $answer;
        my $wait = <STDIN>;
    "#;
    let mut app = Command::new("perl")
        .args(["-e", SCRIPT])
        .arg(&agent.app_socket)
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .spawn()
        .unwrap();
    let mut answer = String::new();
    BufReader::new(app.stdout.take().unwrap())
        .read_line(&mut answer)
        .unwrap();
    assert!(answer.contains("\"ok\":true"), "{answer}");
    let targets = dir.path().join("state").join("targets");
    let registry = std::fs::read_dir(&targets)
        .unwrap()
        .map(|entry| entry.unwrap().path())
        .find(|path| {
            let name = path.file_name().unwrap().to_string_lossy().into_owned();
            name.starts_with(&format!("{}-", app.id()))
        })
        .expect("the application's target directory")
        .join("variables.json");
    assert!(registry.exists());
    drop(app.stdin.take());
    app.wait().unwrap();
    // The watcher notices the exit on its next pass.
    for _ in 0..600 {
        if !registry.exists() {
            break;
        }
        std::thread::sleep(std::time::Duration::from_millis(100));
    }
    assert!(!registry.exists(), "{} is left behind", registry.display());
}
