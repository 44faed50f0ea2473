//! Harm downstream of the function: a patched function that returns, but
//! with an answer its caller cannot live with. The fixture is an epoll
//! server that answers a request once `request_complete` says it has all
//! of it; a patch that flips that answer returns normally, and the server
//! then waits for more of a request that is already whole: the client
//! never gets its reply. The simulation resumes both callers after the
//! call and sees the original answer and the patched one wait; and a
//! pointer returned cleanly that the caller then crashes on.

use crate::common::{analyze_three_live_calls, build_id_of, finding_codes, gcc, write_manifest, Killed};
use std::io::{Read, Write};
use std::process::{Command, Stdio};
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

struct conn { int fd; int len; char buf[128]; int out; char reply[64]; int close; };

/* Whether the client asked the connection to end after the reply. */
__attribute__((noinline)) int connection_close(const char *buf)
{
    return strstr(buf, " close") != NULL;
}

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
                if (c->close) { close(c->fd); free(c); continue; }
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
            c->buf[c->len] = 0;
            c->close = connection_close(c->buf);
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

const PATCHES: &str = r#"/* Replacements for request_complete and connection_close. */
#include <string.h>

int complete_same(const char *buf, int len)
{
    if (len <= 0) return 0;
    return buf[len - 1] == '\n' ? 1 : 0;
}

int complete_flipped(const char *buf, int len)
{
    return !(len > 0 && buf[len - 1] == '\n');
}

int close_same(const char *buf)
{
    return strstr(buf, " close") ? 1 : 0;
}

/* Never ends a connection: a client reading its reply to the end waits. */
int close_never(const char *buf)
{
    (void)buf;
    return 0;
}

/* Returns cleanly; the caller's snprintf then reads through it. */
const char *format_gone(void)
{
    return (const char *)16;
}
"#;

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

/// The server under load, and `analyze` of its patches.
struct Fixture {
    dir: tempfile::TempDir,
    binary: std::path::PathBuf,
    patches: std::path::PathBuf,
    server: Killed,
    port: u16,
    running: Arc<AtomicBool>,
    load: std::thread::JoinHandle<(u32, u32)>,
}

impl Fixture {
    /// The server (`deferred`: replies queued for the next loop turn),
    /// and a client asking one request per connection; with `close`, each
    /// request asks the server to end the connection after its reply, and
    /// the client reads the reply to the end of the connection.
    fn start(deferred: bool, close: bool) -> Fixture {
        let dir = tempfile::tempdir().unwrap();
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
        let server = Killed(child);
        let port: u16 = line.trim().strip_prefix("port ").unwrap().parse().unwrap();
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
                    let ending = if close { " close" } else { "" };
                    socket.write_all(format!("ask {n}{ending}\n").as_bytes()).unwrap();
                    let mut reply = Vec::new();
                    let read = if close {
                        socket.read_to_end(&mut reply).map(|_| ())
                    } else {
                        let mut some = [0u8; 64];
                        socket.read(&mut some).map(|got| reply.extend_from_slice(&some[..got]))
                    };
                    match read {
                        Ok(()) if String::from_utf8_lossy(&reply) == format!("answer {}\n", 2 * n) => answered += 1,
                        _ => failed += 1,
                    }
                    std::thread::sleep(std::time::Duration::from_millis(2));
                }
                (answered, failed)
            })
        };
        Fixture {
            dir,
            binary,
            patches,
            server,
            port,
            running,
            load,
        }
    }

    /// `analyze --capture 3` of `symbol` replaced by `with`.
    fn analyze(&self, symbol: &str, with: &str) -> serde_json::Value {
        let build_id = build_id_of(&self.binary);
        let manifest = write_manifest(self.dir.path(), with, &self.patches, &build_id, &[(symbol, with)]);
        analyze_three_live_calls(&self.dir.path().join("state"), self.server.0.id(), &manifest)
    }

    /// The load stopped: captures never harmed the live server (every
    /// request answered right: a copy holding a socket the server closed
    /// once made this epoll server free a connection twice), and it was
    /// never patched.
    fn finish(self) {
        self.running.store(false, Ordering::Relaxed);
        let (answered, failed) = self.load.join().unwrap();
        assert!(answered > 100 && failed == 0, "{answered} answered, {failed} failed");
        let mut socket = std::net::TcpStream::connect(("127.0.0.1", self.port)).unwrap();
        socket.write_all(b"ask 21\n").unwrap();
        let mut reply = [0u8; 64];
        let got = socket.read(&mut reply).unwrap();
        assert_eq!(&reply[..got], b"answer 42\n");
    }
}

fn finding<'a>(json: &'a serde_json::Value, code: &str) -> &'a serde_json::Value {
    json["findings"]
        .as_array()
        .unwrap()
        .iter()
        .find(|f| f["code"] == code)
        .unwrap_or_else(|| panic!("no {code}: {json:#}"))
}

fn judged_after_the_call(deferred: bool) {
    let fixture = Fixture::start(deferred, false);

    // Same answers: both callers write the reply, then wait.
    let same = fixture.analyze("request_complete", "complete_same");
    assert_eq!(same["features"]["sim_continued_calls"], 3.0, "{same:#}");
    assert_eq!(same["features"]["sim_callers_left_waiting"], 0.0, "{same:#}");
    assert!(
        !finding_codes(&same).iter().any(|c| c.starts_with("sim-patched")),
        "{same:#}"
    );

    // The flipped answer: the function returns, the caller waits for more
    // of a request that is whole, and the client never hears back.
    let flipped = fixture.analyze("request_complete", "complete_flipped");
    let found = finding(&flipped, "sim-patched-leaves-client-waiting");
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
    let gone = fixture.analyze("reply_format", "format_gone");
    assert!(
        finding_codes(&gone).iter().any(|c| c == "sim-patched-caller-fails"),
        "{gone:#}"
    );
    assert!(
        !finding_codes(&gone).iter().any(|c| c == "sim-patched-crashes"),
        "{gone:#}"
    );
    assert_eq!(gone["verdict"], "refuse", "{gone:#}");
    fixture.finish();
}

/// The request asks the connection closed after its reply, which the
/// server queues; a patch that never reads that request still queues the
/// reply (the same first turn as the original's), and in the loop's next
/// turn writes it, and keeps the connection open where the original's
/// caller closed it: the client reading its reply to the end waits for
/// ever (libevent's `evhttp_find_header` with a flipped comparison, which
/// no longer finds `Connection: close`). Seen by running both copies'
/// next loop turn with their queued sockets writable.
#[test]
fn a_connection_the_patched_caller_keeps_open_is_harm_caught_in_the_next_loop_turn() {
    let fixture = Fixture::start(true, true);
    let same = fixture.analyze("connection_close", "close_same");
    assert!(
        !finding_codes(&same).iter().any(|c| c.starts_with("sim-patched")),
        "{same:#}"
    );
    assert_eq!(same["features"]["sim_callers_left_waiting"], 0.0, "{same:#}");

    let never = fixture.analyze("connection_close", "close_never");
    let found = finding(&never, "sim-patched-leaves-client-waiting");
    assert_eq!(found["class"], "harm", "{found:#}");
    let message = found["message"].as_str().unwrap();
    assert!(
        message.contains("closed the connection in the event loop's next turn") && message.contains("kept it open"),
        "{found:#}"
    );
    assert_eq!(never["verdict"], "refuse", "{never:#}");
    // The evidence shows the turn: the original closed the socket it wrote
    // to, the patched one wrote and closed nothing.
    let turn = &found["evidence"]["examples"][0]["continuation"]["next_turn"];
    let written = turn["original_writes"][0][0].clone();
    assert_eq!(turn["original_closed"], serde_json::json!([written]), "{turn:#}");
    assert_eq!(turn["patched_writes"][0][0], written, "{turn:#}");
    assert_eq!(turn["patched_closed"], serde_json::json!([]), "{turn:#}");
    fixture.finish();
}
