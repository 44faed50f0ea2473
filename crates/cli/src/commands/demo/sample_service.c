/* sample_service.c: the demo's sample service (`shadowpatch demo`), kept
 * with the demo so the shipped binary does not carry the test fixtures; the
 * test fixtures build it too, as `busy` (crates/fixtures).
 *
 * Usage: sample-service [THREADS] [--blockers] [--metrics]
 *   THREADS worker threads call work_fn() in a tight loop and check every
 *   result; --blockers adds three threads that block in read(), nanosleep()
 *   and futex() so tests can interrupt real system calls.
 * Protocol: prints one "ready key=value ..." line on stdout, then answers
 * commands read from stdin, one line each:
 *   check -> "errors=N calls=N reads=N sleeps=N wakes=N usr1=N patched=N"
 *   banner -> the string banner() returns
 *   ask N  -> work_fn(N)
 * --metrics serves a Prometheus text exposition on an ephemeral loopback
 * port (metrics_port=N in the ready line; 0 without --metrics):
 * busy_errors_total and busy_calls_total.
 * SIGUSR1 is counted (usr1=N), so tests can check no signal is lost.
 *   wake  -> wakes the read and futex blockers once, answers "woken"
 *   spawn -> starts one more worker thread, answers "spawned"
 *   EOF   -> exits 0.
 */
#define _GNU_SOURCE
#include <errno.h>
#include <linux/futex.h>
#include <pthread.h>
#include <signal.h>
#include <stdatomic.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/syscall.h>
#include <arpa/inet.h>
#include <netinet/in.h>
#include <sys/socket.h>
#include <time.h>
#include <unistd.h>

/* A patched work_fn may return the original result plus PATCH_MARK; any
 * other result is wrong and counted as an error. */
#define PATCH_MARK 1000000L

static atomic_long errors;
static atomic_long calls;
static atomic_long patched;
static atomic_long reads;
static atomic_long sleeps;
static atomic_long wakes;
static atomic_long usr1;

static void on_usr1(int sig) { (void)sig; atomic_fetch_add(&usr1, 1); }

/* Blockers must not take SIGUSR1: a handler makes nanosleep fail with EINTR,
 * which would count as an error the tests blame on shadowpatch. */
static void block_usr1(void) {
    sigset_t set;
    sigemptyset(&set);
    sigaddset(&set, SIGUSR1);
    pthread_sigmask(SIG_BLOCK, &set, NULL);
}
static atomic_int started;
static int wake_pipe[2];
static atomic_int futex_word;
static pid_t tid_read, tid_sleep, tid_futex;

/* A static variable and a static helper: patches may use them. */
static __attribute__((used)) long scale = 3;
static __attribute__((noinline)) long scaled(long x) { return x * scale; }

__attribute__((noinline, used)) long work_fn(long x) {
    __asm__ volatile("" ::: "memory");
    return scaled(x) + 1;
}

/* Too short for a 5-byte jump: patching it must be refused. */
__attribute__((noinline, used)) long tiny(void) { return 0; }

/* A loop branches back to entry+1, inside the bytes a jump would overwrite:
 * patching it must be refused. */
__asm__(".text\n.globl branchy\n.type branchy,@function\nbranchy:\n"
        "  push %rbp\n1:\n  dec %rdi\n  jnz 1b\n  pop %rbp\n  mov %rdi, %rax\n  ret\n"
        ".size branchy, .-branchy\n");

/* Never called by the workers: tests tamper with its bytes safely. */
__attribute__((noinline, used)) long cold_path(long x) {
    __asm__ volatile("" ::: "memory");
    return x * 7 - 5;
}

/* What the service answers to "banner"; the demo patches it. On a page of
 * its own, away from work_fn: a patch of both then needs two writes, so a
 * crash can fall between them (the recover tests rely on it). */
__attribute__((noinline, used, aligned(4096))) const char *banner(void) {
    __asm__ volatile("" ::: "memory");
    return "sample service v1";
}

const char greeting[] = "shadowpatch fixture: immutable read-only data";

static void *worker(void *arg) {
    long seed = (long)(intptr_t)arg;
    atomic_fetch_add(&started, 1);
    for (long i = seed;; i++) {
        long expected = (i & 0xffff) * 3 + 1;
        long r = work_fn(i & 0xffff);
        if (r == expected + PATCH_MARK) atomic_fetch_add_explicit(&patched, 1, memory_order_relaxed);
        else if (r != expected) atomic_fetch_add(&errors, 1);
        atomic_fetch_add_explicit(&calls, 1, memory_order_relaxed);
    }
    return NULL;
}

static void *read_blocker(void *arg) {
    (void)arg;
    block_usr1();
    tid_read = (pid_t)syscall(SYS_gettid);
    atomic_fetch_add(&started, 1);
    for (;;) {
        char c;
        ssize_t n = read(wake_pipe[0], &c, 1);
        if (n != 1 || c != 'w') atomic_fetch_add(&errors, 1);
        else atomic_fetch_add(&reads, 1);
    }
    return NULL;
}

static long elapsed_ns(const struct timespec *a, const struct timespec *b) {
    return (b->tv_sec - a->tv_sec) * 1000000000L + (b->tv_nsec - a->tv_nsec);
}

static void *sleep_blocker(void *arg) {
    (void)arg;
    block_usr1();
    tid_sleep = (pid_t)syscall(SYS_gettid);
    atomic_fetch_add(&started, 1);
    for (;;) {
        struct timespec req = {0, 200 * 1000 * 1000}, rem, t0, t1;
        clock_gettime(CLOCK_MONOTONIC, &t0);
        long rc = syscall(SYS_nanosleep, &req, &rem);
        clock_gettime(CLOCK_MONOTONIC, &t1);
        /* An interrupted sleep must neither fail nor end early. */
        if (rc != 0 || elapsed_ns(&t0, &t1) < 200 * 1000 * 1000) atomic_fetch_add(&errors, 1);
        else atomic_fetch_add(&sleeps, 1);
    }
    return NULL;
}

static void *futex_blocker(void *arg) {
    (void)arg;
    block_usr1();
    tid_futex = (pid_t)syscall(SYS_gettid);
    atomic_fetch_add(&started, 1);
    for (;;) {
        long rc = syscall(SYS_futex, &futex_word, FUTEX_WAIT_PRIVATE, 0, NULL, NULL, 0);
        if (rc != 0 && errno != EAGAIN) { atomic_fetch_add(&errors, 1); continue; }
        if (atomic_exchange(&futex_word, 0) == 1) atomic_fetch_add(&wakes, 1);
    }
    return NULL;
}

static int metrics_socket = -1;

/* One request per connection: read it (ignored), answer, close. */
static void *metrics_server(void *arg) {
    (void)arg;
    block_usr1();
    atomic_fetch_add(&started, 1);
    for (;;) {
        int client = accept(metrics_socket, NULL, NULL);
        if (client < 0) continue;
        char request[1024];
        ssize_t got = read(client, request, sizeof request);
        (void)got;
        char body[256], reply[512];
        int body_len = snprintf(body, sizeof body,
                                "# TYPE busy_errors_total counter\nbusy_errors_total %ld\n"
                                "# TYPE busy_calls_total counter\nbusy_calls_total %ld\n",
                                atomic_load(&errors), atomic_load(&calls));
        int len = snprintf(reply, sizeof reply,
                           "HTTP/1.0 200 OK\r\nContent-Type: text/plain; version=0.0.4\r\n"
                           "Content-Length: %d\r\n\r\n%s",
                           body_len, body);
        ssize_t sent = write(client, reply, (size_t)len);
        (void)sent;
        close(client);
    }
    return NULL;
}

/* Listen on 127.0.0.1, ephemeral port; returns the port. */
static int start_metrics(void) {
    metrics_socket = socket(AF_INET, SOCK_STREAM, 0);
    struct sockaddr_in address = {.sin_family = AF_INET, .sin_port = 0};
    address.sin_addr.s_addr = htonl(INADDR_LOOPBACK);
    socklen_t len = sizeof address;
    if (bind(metrics_socket, (struct sockaddr *)&address, sizeof address) != 0 || listen(metrics_socket, 16) != 0 ||
        getsockname(metrics_socket, (struct sockaddr *)&address, &len) != 0)
        exit(4);
    return ntohs(address.sin_port);
}

int main(int argc, char **argv) {
    int threads = argc > 1 ? atoi(argv[1]) : 1;
    int blockers = 0, metrics = 0;
    for (int i = 2; i < argc; i++) {
        if (strcmp(argv[i], "--blockers") == 0) blockers = 1;
        if (strcmp(argv[i], "--metrics") == 0) metrics = 1;
    }
    if (pipe(wake_pipe) != 0) return 3;
    signal(SIGUSR1, on_usr1);
    int expected = threads + (blockers ? 3 : 0) + metrics;
    int metrics_port = metrics ? start_metrics() : 0;
    pthread_t t;
    for (int i = 0; i < threads; i++) pthread_create(&t, NULL, worker, (void *)(intptr_t)(i * 1000));
    if (blockers) {
        pthread_create(&t, NULL, read_blocker, NULL);
        pthread_create(&t, NULL, sleep_blocker, NULL);
        pthread_create(&t, NULL, futex_blocker, NULL);
    }
    if (metrics) pthread_create(&t, NULL, metrics_server, NULL);
    while (atomic_load(&started) < expected) sched_yield();
    printf("ready pid=%d work=%p cold=%p greeting=%p threads=%d tid_read=%d tid_sleep=%d tid_futex=%d "
           "metrics_port=%d\n",
           getpid(), (void *)work_fn, (void *)cold_path, (void *)greeting, threads, tid_read, tid_sleep,
           tid_futex, metrics_port);
    fflush(stdout);
    char line[64];
    while (fgets(line, sizeof line, stdin)) {
        if (strncmp(line, "check", 5) == 0) {
            printf("errors=%ld calls=%ld reads=%ld sleeps=%ld wakes=%ld usr1=%ld patched=%ld\n",
                   atomic_load(&errors), atomic_load(&calls), atomic_load(&reads), atomic_load(&sleeps),
                   atomic_load(&wakes), atomic_load(&usr1), atomic_load(&patched));
        } else if (strncmp(line, "banner", 6) == 0) {
            printf("%s\n", banner());
        } else if (strncmp(line, "ask ", 4) == 0) {
            printf("%ld\n", work_fn(atol(line + 4)));
        } else if (strncmp(line, "wake", 4) == 0) {
            if (write(wake_pipe[1], "w", 1) != 1) atomic_fetch_add(&errors, 1);
            atomic_store(&futex_word, 1);
            syscall(SYS_futex, &futex_word, FUTEX_WAKE_PRIVATE, 1, NULL, NULL, 0);
            printf("woken\n");
        } else if (strncmp(line, "spawn", 5) == 0) {
            int before = atomic_load(&started);
            pthread_create(&t, NULL, worker, (void *)(intptr_t)7);
            while (atomic_load(&started) == before) sched_yield();
            printf("spawned\n");
        } else {
            printf("unknown command\n");
        }
        fflush(stdout);
    }
    return 0;
}
