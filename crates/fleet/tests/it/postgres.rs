//! The service over a real PostgreSQL, started by the test in a temporary
//! folder (unix socket only, its own port) and stopped on drop.

use crate::support::{outcome, round_trip, verdict_request, Service};
use std::path::{Path, PathBuf};
use std::process::Command;

/// Debian's PostgreSQL server binaries (the newest installed version).
fn postgres_bin() -> PathBuf {
    let mut versions: Vec<PathBuf> = std::fs::read_dir("/usr/lib/postgresql")
        .map(|entries| entries.filter_map(|e| e.ok()).map(|e| e.path().join("bin")).collect())
        .unwrap_or_default();
    versions.retain(|bin| bin.join("initdb").is_file());
    versions.sort();
    versions.pop().unwrap_or_else(|| {
        panic!(
            "PostgreSQL is not installed (no /usr/lib/postgresql/*/bin/initdb): `apt-get install postgresql` \
             (.ci/run installs it)"
        )
    })
}

/// A PostgreSQL cluster run as user `postgres` (initdb refuses root),
/// stopped (immediate mode) on drop.
struct Postgres {
    bin: PathBuf,
    data: PathBuf,
    socket_dir: PathBuf,
}

fn as_postgres(program: &Path) -> Command {
    let mut command = Command::new("runuser");
    command.args(["-u", "postgres", "--"]).arg(program);
    command
}

fn run(command: &mut Command) {
    let output = command.output().unwrap_or_else(|e| panic!("{command:?}: {e}"));
    assert!(
        output.status.success(),
        "{command:?}: {}{}",
        String::from_utf8_lossy(&output.stdout),
        String::from_utf8_lossy(&output.stderr)
    );
}

impl Postgres {
    fn start(dir: &Path) -> Postgres {
        let bin = postgres_bin();
        run(Command::new("chown").arg("postgres:").arg(dir));
        let data = dir.join("data");
        let socket_dir = dir.to_path_buf();
        run(as_postgres(&bin.join("initdb")).arg("-D").arg(&data).args([
            "-A",
            "trust",
            "-U",
            "postgres",
            "--no-sync",
            "-E",
            "UTF8",
        ]));
        let postgres = Postgres { bin, data, socket_dir };
        postgres.resume();
        postgres
    }

    /// `pg_ctl start` (waits until it accepts connections).
    fn resume(&self) {
        let options = format!(
            "-k {} -p 5432 -c listen_addresses= -c fsync=off",
            self.socket_dir.display()
        );
        run(as_postgres(&self.bin.join("pg_ctl"))
            .arg("-D")
            .arg(&self.data)
            .args(["-o", &options, "-l"])
            .arg(self.socket_dir.join("postgres.log"))
            .args(["-w", "start"]));
    }

    /// `pg_ctl stop -m immediate`: the database goes away under its clients.
    fn halt(&self) {
        run(as_postgres(&self.bin.join("pg_ctl"))
            .arg("-D")
            .arg(&self.data)
            .args(["-m", "immediate", "-w", "stop"]));
    }

    fn url(&self) -> String {
        format!(
            "postgres://postgres@localhost/postgres?host={}&port=5432",
            self.socket_dir.display()
        )
    }
}

impl Drop for Postgres {
    fn drop(&mut self) {
        let _ = as_postgres(&self.bin.join("pg_ctl"))
            .arg("-D")
            .arg(&self.data)
            .args(["-m", "immediate", "-w", "stop"])
            .output();
    }
}

#[test]
fn the_round_trip_on_postgresql_and_outcomes_survive_a_restart() {
    let dir = tempfile::tempdir().unwrap();
    let postgres = Postgres::start(dir.path());
    let url = postgres.url();
    let state = dir.path().join("state");
    let service = Service::start(&state, &["--database", &url]);
    round_trip(&service, "fix-parser");
    service.kill();
    // Restarted on the same database: migrations already applied, the
    // outcomes still there.
    let service = Service::start(&state, &["--database", &url]);
    let (_, verdict) = service.post("/v1/verdict", &verdict_request("host-z", "fix-parser"));
    assert_eq!(verdict["verdict"], "refuse", "{verdict}");
    assert_eq!(verdict["fleet_findings"][0]["evidence"]["outcomes"], 3, "{verdict}");
}

#[test]
fn a_database_outage_answers_503_acknowledges_nothing_and_the_service_recovers() {
    let dir = tempfile::tempdir().unwrap();
    let postgres = Postgres::start(dir.path());
    let url = postgres.url();
    let service = Service::start(
        &dir.path().join("state"),
        &["--database", &url, "--database-timeout", "1"],
    );
    assert_eq!(service.post("/v1/outcomes", &outcome("host-b", "p", "kept", 1)).0, 200);

    postgres.halt();
    let (status, body) = service.post("/v1/outcomes", &outcome("host-c", "p", "crashed", 2));
    assert_eq!(status, 503, "{body}");
    assert!(
        body["error"].as_str().unwrap().starts_with("storage unavailable"),
        "{body}"
    );
    let (status, body) = service.post("/v1/verdict", &verdict_request("host-a", "p"));
    assert_eq!(status, 503, "{body}");
    assert_eq!(service.request("GET", "/v1/health", None).0, 503);
    // What needs no database still answers.
    let (status, model) = service.request("GET", "/v1/model", None);
    assert_eq!((status, model["name"].as_str()), (200, Some("built-in")));

    postgres.resume();
    let (status, verdict) = service.post("/v1/verdict", &verdict_request("host-a", "p"));
    assert_eq!(status, 200, "{verdict}");
    // Only the acknowledged outcome is there: the crash sent during the
    // outage was answered 503 and not stored.
    let finding = &verdict["fleet_findings"][0];
    assert_eq!(
        finding["evidence"]["by_kind"],
        serde_json::json!({"kept": 1}),
        "{verdict}"
    );
    assert_ne!(verdict["verdict"], "refuse");
}
