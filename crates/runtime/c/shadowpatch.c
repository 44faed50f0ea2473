/* shadowpatch.c: the C runtime library, speaking the same line protocol as
 * the Rust crate shadowpatch-runtime (src/protocol.rs): one JSON object per
 * line each way. */
#define _GNU_SOURCE
#include "shadowpatch.h"

#include <errno.h>
#include <linux/futex.h>
#include <pthread.h>
#include <stdatomic.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/socket.h>
#include <sys/syscall.h>
#include <sys/time.h>
#include <sys/un.h>
#include <time.h>
#include <unistd.h>

#define PROTOCOL_VERSION 1
#define DEFAULT_SOCKET "/run/shadowpatch/app.sock"
#define MAX_LINE 4096

/* The safe-point mailbox the agent reads and writes: see the Rust crate. */
static _Atomic uint32_t sp_pending;
static _Atomic uint32_t sp_parked;
static _Atomic uint64_t sp_passed;

static pthread_mutex_t lock = PTHREAD_MUTEX_INITIALIZER;
static int agent_fd = -1;
static __thread char last_error[512];

static int fail(const char *what, const char *detail) {
    snprintf(last_error, sizeof last_error, "%s%s%s", what, detail ? ": " : "", detail ? detail : "");
    return -1;
}

const char *shadowpatch_last_error(void) { return last_error; }

/* Append s as a JSON string (quotes and escapes included). */
static int append_json_string(char *out, size_t cap, size_t *len, const char *s) {
    if (*len + 2 >= cap) return -1;
    out[(*len)++] = '"';
    for (; *s; s++) {
        unsigned char c = (unsigned char)*s;
        char esc[8];
        const char *piece = esc;
        if (c == '"') piece = "\\\"";
        else if (c == '\\') piece = "\\\\";
        else if (c < 0x20) snprintf(esc, sizeof esc, "\\u%04x", c);
        else { esc[0] = (char)c; esc[1] = 0; }
        size_t n = strlen(piece);
        if (*len + n + 2 >= cap) return -1;
        memcpy(out + *len, piece, n);
        *len += n;
    }
    out[(*len)++] = '"';
    out[*len] = 0;
    return 0;
}

static int write_all(int fd, const char *buf, size_t len) {
    while (len > 0) {
        ssize_t n = write(fd, buf, len);
        if (n < 0 && errno == EINTR) continue;
        if (n <= 0) return -1;
        buf += n;
        len -= (size_t)n;
    }
    return 0;
}

/* Send one line, read one line back into reply. Caller holds the lock. */
static int exchange_locked(const char *line, char *reply, size_t cap) {
    if (write_all(agent_fd, line, strlen(line)) != 0 || write_all(agent_fd, "\n", 1) != 0)
        return fail("writing to the shadowpatch agent", strerror(errno));
    size_t len = 0;
    while (len + 1 < cap) {
        ssize_t n = read(agent_fd, reply + len, 1);
        if (n < 0 && errno == EINTR) continue;
        if (n <= 0) return fail("reading from the shadowpatch agent", n == 0 ? "connection closed" : strerror(errno));
        if (reply[len] == '\n') break;
        len++;
    }
    reply[len] = 0;
    if (strstr(reply, "\"ok\":true") == NULL) {
        const char *error = strstr(reply, "\"error\":\"");
        return fail("the shadowpatch agent refused", error ? error + 9 : reply);
    }
    return 0;
}

static int connect_locked(void) {
    if (agent_fd >= 0) return 0;
    const char *path = getenv("SHADOWPATCH_APP_SOCKET");
    if (!path || !*path) path = DEFAULT_SOCKET;
    struct sockaddr_un address = {.sun_family = AF_UNIX};
    if (strlen(path) >= sizeof address.sun_path) return fail("socket path too long", path);
    strcpy(address.sun_path, path);
    int fd = socket(AF_UNIX, SOCK_STREAM | SOCK_CLOEXEC, 0);
    if (fd < 0) return fail("creating a socket", strerror(errno));
    if (connect(fd, (struct sockaddr *)&address, sizeof address) != 0) {
        int saved = errno;
        close(fd);
        char detail[300];
        snprintf(detail, sizeof detail, "%s: %s", path, strerror(saved));
        return fail("cannot reach the shadowpatch agent", detail);
    }
    struct timeval timeout = {.tv_sec = 10};
    setsockopt(fd, SOL_SOCKET, SO_RCVTIMEO, &timeout, sizeof timeout);
    agent_fd = fd;
    char line[256], reply[MAX_LINE];
    snprintf(line, sizeof line,
             "{\"op\":\"hello\",\"version\":%d,\"pending_address\":%lu,\"parked_address\":%lu,\"passed_address\":%lu}",
             PROTOCOL_VERSION, (unsigned long)(uintptr_t)&sp_pending, (unsigned long)(uintptr_t)&sp_parked,
             (unsigned long)(uintptr_t)&sp_passed);
    if (exchange_locked(line, reply, sizeof reply) != 0) {
        close(agent_fd);
        agent_fd = -1;
        return -1;
    }
    return 0;
}

/* One request, reconnecting once if the agent restarted. */
static int request(const char *line, char *reply, size_t cap) {
    pthread_mutex_lock(&lock);
    int rc = -1;
    for (int attempt = 0; attempt < 2; attempt++) {
        if (connect_locked() != 0) break;
        rc = exchange_locked(line, reply, cap);
        if (rc == 0 || strncmp(last_error, "the shadowpatch agent refused", 29) == 0) break;
        close(agent_fd);
        agent_fd = -1;
    }
    pthread_mutex_unlock(&lock);
    return rc;
}

int shadowpatch_connect(void) {
    char reply[MAX_LINE];
    return request("{\"op\":\"ping\"}", reply, sizeof reply);
}

int shadowpatch_register_variable(const char *name, const void *address, size_t size, enum shadowpatch_mode mode) {
    char line[MAX_LINE], reply[MAX_LINE];
    size_t len = (size_t)snprintf(line, sizeof line, "{\"op\":\"register_variable\",\"name\":");
    if (append_json_string(line, sizeof line, &len, name ? name : "") != 0) return fail("variable name too long", NULL);
    snprintf(line + len, sizeof line - len, ",\"address\":%lu,\"size\":%lu,\"mode\":\"%s\"}",
             (unsigned long)(uintptr_t)address, (unsigned long)size,
             mode == SHADOWPATCH_MIRRORED ? "mirrored" : "guarded");
    return request(line, reply, sizeof reply);
}

void shadowpatch_safe_point(void) {
    atomic_fetch_add_explicit(&sp_passed, 1, memory_order_relaxed);
    if (atomic_load_explicit(&sp_pending, memory_order_acquire) == 0) return;
    atomic_fetch_add(&sp_parked, 1);
    while (atomic_load_explicit(&sp_pending, memory_order_acquire) != 0) {
        /* Sleep on the word itself; the timeout bounds the wait in case
         * the agent's wake-up is lost (it only clears the word). */
        struct timespec timeout = {0, 100 * 1000};
        syscall(SYS_futex, &sp_pending, FUTEX_WAIT_PRIVATE, 1, &timeout, NULL, 0);
    }
    atomic_fetch_sub(&sp_parked, 1);
}

int shadowpatch_request_rollback(const char *reason, char *patch_id, size_t patch_id_len) {
    char line[MAX_LINE], reply[MAX_LINE];
    size_t len = (size_t)snprintf(line, sizeof line, "{\"op\":\"request_rollback\",\"reason\":");
    if (append_json_string(line, sizeof line, &len, reason ? reason : "") != 0) return fail("reason too long", NULL);
    if (len + 2 >= sizeof line) return fail("reason too long", NULL);
    line[len++] = '}';
    line[len] = 0;
    if (request(line, reply, sizeof reply) != 0) return -1;
    if (patch_id && patch_id_len > 0) {
        patch_id[0] = 0;
        const char *found = strstr(reply, "\"patch_id\":\"");
        if (found) {
            found += 12;
            size_t n = 0;
            while (found[n] && found[n] != '"' && n + 1 < patch_id_len) n++;
            memcpy(patch_id, found, n);
            patch_id[n] = 0;
        }
    }
    return 0;
}
