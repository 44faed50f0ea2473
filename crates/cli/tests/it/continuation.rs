//! Harm downstream of the function: a patched function that returns, but
//! with an answer its caller cannot live with. The fixture is an epoll
//! server that answers a request once `request_complete` says it has all
//! of it; a patch that flips that answer returns normally, and the server
//! then waits for more of a request that is already whole: the client
//! never gets its reply. The simulation resumes both callers after the
//! call and sees the original answer and the patched one wait; and a
//! pointer returned cleanly that the caller then crashes on.

use crate::common::{build_id_of, shadowpatch, write_manifest};
use std::io::{Read, Write};
use std::path::Path;
use std::process::{Child, Command, Stdio};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;

const SERVER: &str = r#"/* One-thread epoll server: "ask N\n" -> "answer 2N\n". */
#include <netinet/in.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/epoll.h>
#include <sys/socket.h>
#include <unistd.h>

struct conn { int fd; int len; char buf[128]; int out; char reply[64]; };

/* Whether the request so far is whole (it ends its line). */
__attribute__((noinline)) int request_complete(const char *buf, int len)
{
    return len > 0 && buf[len - 1] == '\n';
}

/* The reply's format. */
__attribute__((noinline)) const char *reply_format(void)
{
    __asm__ volatile("" ::: "memory");
    return "answer %d\n";
}

int main(int argc, char **argv)
{
    /* deferred: queue the reply and write it when epoll says the socket
       is writable (as libevent does), instead of at once. */
    int deferred = argc > 1;
    int listener = socket(AF_INET, SOCK_STREAM, 0), one = 1;
    setsockopt(listener, SOL_SOCKET, SO_REUSEADDR, &one, sizeof one);
    struct sockaddr_in at = { .sin_family = AF_INET, .sin_addr.s_addr = htonl(INADDR_LOOPBACK) };
    if (bind(listener, (struct sockaddr *)&at, sizeof at) || listen(listener, 64)) return 1;
    socklen_t size = sizeof at;
    getsockname(listener, (struct sockaddr *)&at, &size);
    printf("port %d\n", ntohs(at.sin_port));
    fflush(stdout);
    int poller = epoll_create1(0);
    struct epoll_event event = { .events = EPOLLIN, .data.ptr = NULL };
    epoll_ctl(poller, EPOLL_CTL_ADD, listener, &event);
    for (;;) {
        struct epoll_event ready[16];
        int n = epoll_wait(poller, ready, 16, -1);
        for (int i = 0; i < n; i++) {
            struct conn *c = ready[i].data.ptr;
            if (!c) {
                c = calloc(1, sizeof *c);
                c->fd = accept(listener, NULL, NULL);
                struct epoll_event e = { .events = EPOLLIN, .data.ptr = c };
                epoll_ctl(poller, EPOLL_CTL_ADD, c->fd, &e);
                continue;
            }
            if (ready[i].events & EPOLLOUT) {
                write(c->fd, c->reply, c->out);
                struct epoll_event e = { .events = EPOLLIN, .data.ptr = c };
                epoll_ctl(poller, EPOLL_CTL_MOD, c->fd, &e);
                continue;
            }
            int got = read(c->fd, c->buf + c->len, sizeof c->buf - 1 - c->len);
            if (got <= 0) { close(c->fd); free(c); continue; }
            c->len += got;
            if (!request_complete(c->buf, c->len)) continue;
            char reply[64];
            const char *format = reply_format();
            int length = snprintf(reply, sizeof reply, format, 2 * atoi(c->buf + 4));
            c->len = 0;
            if (deferred) {
                memcpy(c->reply, reply, length);
                c->out = length;
                struct epoll_event e = { .events = EPOLLIN | EPOLLOUT, .data.ptr = c };
                epoll_ctl(poller, EPOLL_CTL_MOD, c->fd, &e);
                continue;
            }
            write(c->fd, reply, length);
        }
    }
}
"#;

const PATCHES: &str = r#"/* Replacements for request_complete. */
int complete_same(const char *buf, int len)
{
    if (len <= 0) return 0;
    return buf[len - 1] == '\n' ? 1 : 0;
}

int complete_flipped(const char *buf, int len)
{
    return !(len > 0 && buf[len - 1] == '\n');
}

/* Returns cleanly; the caller's snprintf then reads through it. */
const char *format_gone(void)
{
    return (const char *)16;
}
"#;

struct Server(Child);

impl Drop for Server {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

fn gcc(dir: &Path, source: &str, text: &str, out: &str, extra: &[&str]) -> std::path::PathBuf {
    let path = dir.join(source);
    std::fs::write(&path, text).unwrap();
    let output = dir.join(out);
    let built = Command::new("gcc")
        .args(["-O2", "-g", "-Wl,--build-id"])
        .args(extra)
        .arg("-o")
        .arg(&output)
        .arg(&path)
        .status()
        .unwrap();
    assert!(built.success());
    output
}

#[test]
fn a_reply_the_patched_caller_never_writes_is_harm_caught_after_the_call() {
    judged_after_the_call(false);
}

/// The same when the server queues its reply for the next turn of its
/// loop (it asks epoll to report the socket writable), as libevent does.
#[test]
fn a_reply_the_patched_caller_never_queues_is_harm_caught_after_the_call() {
    judged_after_the_call(true);
}

fn judged_after_the_call(deferred: bool) {
    let dir = tempfile::tempdir().unwrap();
    let state = dir.path().join("state");
    let binary = gcc(dir.path(), "server.c", SERVER, "server", &[]);
    let patches = gcc(dir.path(), "patches.c", PATCHES, "patches.so", &["-shared", "-fPIC"]);
    let mut command = Command::new(&binary);
    if deferred {
        command.arg("deferred");
    }
    let mut child = command.stdout(Stdio::piped()).spawn().unwrap();
    let mut line = String::new();
    let mut stdout = child.stdout.take().unwrap();
    let mut byte = [0u8; 1];
    while !line.ends_with('\n') {
        assert_eq!(stdout.read(&mut byte).unwrap(), 1);
        line.push(byte[0] as char);
    }
    let server = Server(child);
    let port: u16 = line.trim().strip_prefix("port ").unwrap().parse().unwrap();
    // Clients: one request per connection, each reply read.
    let running = Arc::new(AtomicBool::new(true));
    let load = {
        let running = running.clone();
        std::thread::spawn(move || {
            let (mut answered, mut failed) = (0u32, 0u32);
            let mut n = 0;
            while running.load(Ordering::Relaxed) {
                n += 1;
                let Ok(mut socket) = std::net::TcpStream::connect(("127.0.0.1", port)) else {
                    continue;
                };
                socket
                    .set_read_timeout(Some(std::time::Duration::from_secs(2)))
                    .unwrap();
                socket.write_all(format!("ask {n}\n").as_bytes()).unwrap();
                let mut reply = [0u8; 64];
                match socket.read(&mut reply) {
                    Ok(got) if String::from_utf8_lossy(&reply[..got]) == format!("answer {}\n", 2 * n) => answered += 1,
                    _ => failed += 1,
                }
                std::thread::sleep(std::time::Duration::from_millis(2));
            }
            (answered, failed)
        })
    };
    let build_id = build_id_of(&binary);
    let pid = server.0.id().to_string();
    let analyze = |with: &str| {
        let symbol = if with == "format_gone" {
            "reply_format"
        } else {
            "request_complete"
        };
        let manifest = write_manifest(dir.path(), with, &patches, &build_id, &[(symbol, with)]);
        let run = shadowpatch(
            &state,
            &[
                "--json",
                "analyze",
                &pid,
                manifest.to_str().unwrap(),
                "--capture",
                "3",
                "--capture-for",
                "20",
            ],
        );
        assert!(run.code == 0 || run.code == 1, "{}{}", run.stdout, run.stderr);
        run.json()
    };
    let codes = |json: &serde_json::Value| -> Vec<String> {
        json["findings"]
            .as_array()
            .unwrap()
            .iter()
            .map(|f| f["code"].as_str().unwrap().to_string())
            .collect()
    };

    // Same answers: both callers write the reply, then wait.
    let same = analyze("complete_same");
    assert_eq!(same["features"]["sim_continued_calls"], 3.0, "{same:#}");
    assert_eq!(same["features"]["sim_callers_left_waiting"], 0.0, "{same:#}");
    assert!(!codes(&same).iter().any(|c| c.starts_with("sim-patched")), "{same:#}");

    // The flipped answer: the function returns, the caller waits for more
    // of a request that is whole, and the client never hears back.
    let flipped = analyze("complete_flipped");
    let found = flipped["findings"]
        .as_array()
        .unwrap()
        .iter()
        .find(|f| f["code"] == "sim-patched-leaves-client-waiting")
        .unwrap_or_else(|| panic!("{flipped:#}"));
    assert_eq!(found["class"], "harm", "{found:#}");
    assert!(
        found["message"]
            .as_str()
            .unwrap()
            .contains("went back to waiting (epoll_wait)"),
        "{found:#}"
    );
    assert_eq!(flipped["verdict"], "refuse", "{flipped:#}");

    // A bad pointer returned cleanly: the caller crashes on it after the
    // call, where the original's caller went on to answer and wait.
    let gone = analyze("format_gone");
    assert!(codes(&gone).iter().any(|c| c == "sim-patched-caller-fails"), "{gone:#}");
    assert!(!codes(&gone).iter().any(|c| c == "sim-patched-crashes"), "{gone:#}");
    assert_eq!(gone["verdict"], "refuse", "{gone:#}");

    running.store(false, Ordering::Relaxed);
    let (answered, failed) = load.join().unwrap();
    // Captures never harmed the live server: every request was answered
    // right (a copy holding a socket the server closed once made this
    // epoll server free a connection twice).
    assert!(answered > 100 && failed == 0, "{answered} answered, {failed} failed");
    // The live server was never patched: it answers as before.
    let mut socket = std::net::TcpStream::connect(("127.0.0.1", port)).unwrap();
    socket.write_all(b"ask 21\n").unwrap();
    let mut reply = [0u8; 64];
    let got = socket.read(&mut reply).unwrap();
    assert_eq!(&reply[..got], b"answer 42\n");
}
