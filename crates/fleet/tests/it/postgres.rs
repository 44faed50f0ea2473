//! The service over a real PostgreSQL, started by the test in a temporary
//! folder (unix socket only, its own port) and stopped on drop.

use crate::support::{round_trip, Service};
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
        let options = format!("-k {} -p 5432 -c listen_addresses= -c fsync=off", socket_dir.display());
        run(as_postgres(&bin.join("pg_ctl"))
            .arg("-D")
            .arg(&data)
            .args(["-o", &options, "-l"])
            .arg(dir.join("postgres.log"))
            .args(["-w", "start"]));
        Postgres { bin, data, socket_dir }
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
    let (_, verdict) = service.post("/v1/verdict", &crate::support::verdict_request("host-z", "fix-parser"));
    assert_eq!(verdict["verdict"], "refuse", "{verdict}");
    assert_eq!(verdict["fleet_findings"][0]["evidence"]["outcomes"], 3, "{verdict}");
}
