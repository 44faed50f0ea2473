//! Debian's lighttpd as a test target: a configuration in a temporary
//! directory, a free loopback port, and a request helper.

use std::io::{Read, Write};
use std::net::{TcpListener, TcpStream};
use std::path::Path;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

pub const LIGHTTPD: &str = "/usr/sbin/lighttpd";
pub const BODY: &str = "hello from lighttpd under shadowpatch\n";

#[derive(Debug)]
pub struct Server {
    pub child: Child,
    pub port: u16,
}

impl Drop for Server {
    fn drop(&mut self) {
        // Workers (`server.max-worker`) are the master's children and
        // outlive a killed master; killed first, they were replaced by the
        // master before it died (orphans left running). So: note them,
        // kill the master, then them.
        let workers = shadowpatch_fixtures::children_of(self.child.id() as i32);
        let _ = self.child.kill();
        let _ = self.child.wait();
        for worker in workers {
            let _ = nix::sys::signal::kill(nix::unistd::Pid::from_raw(worker), nix::sys::signal::Signal::SIGKILL);
        }
    }
}

pub fn start_lighttpd(dir: &Path) -> Server {
    start_lighttpd_with(dir, "")
}

/// Start lighttpd with `extra` configuration lines appended.
pub fn start_lighttpd_with(dir: &Path, extra: &str) -> Server {
    assert!(
        Path::new(LIGHTTPD).exists(),
        "{LIGHTTPD} is missing: install Debian's lighttpd (apt-get install -y lighttpd), as .ci/run does"
    );
    let www = dir.join("www");
    std::fs::create_dir_all(&www).unwrap();
    std::fs::write(www.join("index.html"), BODY).unwrap();
    // A free loopback port: bind port 0, note the port, release it.
    let port = TcpListener::bind("127.0.0.1:0").unwrap().local_addr().unwrap().port();
    let config = dir.join("lighttpd.conf");
    std::fs::write(
        &config,
        format!(
            "server.document-root = \"{}\"\nserver.port = {port}\nserver.bind = \"127.0.0.1\"\n\
             server.errorlog = \"{}\"\nindex-file.names = (\"index.html\")\n{extra}",
            www.display(),
            dir.join("error.log").display()
        ),
    )
    .unwrap();
    let child = Command::new(LIGHTTPD)
        .arg("-D")
        .arg("-f")
        .arg(&config)
        .stdin(Stdio::null())
        .spawn()
        .expect("lighttpd starts");
    let server = Server { child, port };
    // lighttpd cannot signal readiness on a pipe: poll until it answers.
    let deadline = Instant::now() + Duration::from_secs(20);
    while get(port).is_err() {
        assert!(Instant::now() < deadline, "lighttpd did not answer on port {port}");
        std::thread::sleep(Duration::from_millis(20));
    }
    server
}

pub fn get(port: u16) -> std::io::Result<()> {
    let mut stream = TcpStream::connect(("127.0.0.1", port))?;
    stream.set_read_timeout(Some(Duration::from_secs(5)))?;
    stream.write_all(b"GET /index.html HTTP/1.0\r\nHost: localhost\r\n\r\n")?;
    let mut response = String::new();
    stream.read_to_string(&mut response)?;
    if response.starts_with("HTTP/1.0 200") && response.ends_with(BODY) {
        Ok(())
    } else {
        Err(std::io::Error::other(format!("bad response: {response:?}")))
    }
}

/// The Content-Type lighttpd answers for /index.html.
pub fn content_type(port: u16) -> String {
    let mut stream = TcpStream::connect(("127.0.0.1", port)).unwrap();
    stream
        .write_all(b"GET /index.html HTTP/1.0\r\nHost: localhost\r\n\r\n")
        .unwrap();
    let mut response = String::new();
    stream.read_to_string(&mut response).unwrap();
    response
        .lines()
        .find_map(|l| l.strip_prefix("Content-Type: "))
        .unwrap_or_else(|| panic!("no Content-Type in {response:?}"))
        .trim()
        .to_string()
}
