/* A small TCP server that exercises a Debian library for the real-program
 * corpus (crates/trainer/src/programs): the reply is a deterministic
 * rendering of what the library made of the request.
 *
 *   driver sqlite PORT    one connection at a time, the request everything
 *                         the client sends before it shuts down its side:
 *                         run the SQL on an in-memory database, answer
 *                         each row
 *   driver libevent PORT  an evhttp server (libevent's own HTTP parser and
 *                         connection handling): each request answered with
 *                         its decoded, HTML-escaped path, its query's
 *                         pairs and its body; /missing* with a 404
 *
 * The libraries are Debian updates (libsqlite3-0 3.40.1-2+deb12u2,
 * libevent-2.1-7 2.1.12-stable-8+deb12u1) built by the gcc installed
 * here, so `shadowpatch build --debian` can match their code; libraries
 * last built by an older gcc (jansson, libyaml) cannot be.
 */
#include <sqlite3.h>
#include <event2/buffer.h>
#include <event2/event.h>
#include <event2/http.h>
#include <event2/keyvalq_struct.h>
#include <netinet/in.h>
#include <arpa/inet.h>
#include <signal.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/socket.h>
#include <unistd.h>

static size_t read_all(int fd, char *buffer, size_t size) {
    size_t used = 0;
    while (used + 1 < size) {
        ssize_t n = read(fd, buffer + used, size - 1 - used);
        if (n <= 0)
            break;
        used += (size_t)n;
    }
    buffer[used] = 0;
    return used;
}

static void write_all(int fd, const char *text, size_t length) {
    while (length > 0) {
        ssize_t n = write(fd, text, length);
        if (n <= 0)
            return;
        text += n;
        length -= (size_t)n;
    }
}

static int on_row(void *data, int columns, char **values, char **names) {
    int fd = *(int *)data;
    (void)names;
    for (int i = 0; i < columns; i++) {
        const char *value = values[i] ? values[i] : "NULL";
        write_all(fd, value, strlen(value));
        write_all(fd, i + 1 < columns ? "|" : "\n", 1);
    }
    return 0;
}

static void answer_sqlite(int fd, const char *request) {
    sqlite3 *db;
    char *error = NULL;
    if (sqlite3_open(":memory:", &db) != SQLITE_OK)
        return;
    if (sqlite3_exec(db, request, on_row, &fd, &error) != SQLITE_OK) {
        char line[256];
        int n = snprintf(line, sizeof line, "error %s\n", error ? error : "?");
        write_all(fd, line, (size_t)n);
        sqlite3_free(error);
    }
    sqlite3_close(db);
}

static void on_http(struct evhttp_request *request, void *unused) {
    (void)unused;
    const struct evhttp_uri *uri = evhttp_request_get_evhttp_uri(request);
    const char *path = uri ? evhttp_uri_get_path(uri) : NULL;
    const char *query = uri ? evhttp_uri_get_query(uri) : NULL;
    char *decoded = evhttp_decode_uri(path ? path : "");
    if (!decoded || !strncmp(decoded, "/missing", 8)) {
        evhttp_send_error(request, HTTP_NOTFOUND, NULL);
        free(decoded);
        return;
    }
    struct evbuffer *body = evbuffer_new();
    char *escaped = evhttp_htmlescape(decoded);
    evbuffer_add_printf(body, "<p>%s</p>\n", escaped ? escaped : "?");
    free(escaped);
    free(decoded);
    struct evkeyvalq pairs;
    if (query && evhttp_parse_query_str(query, &pairs) == 0) {
        for (struct evkeyval *pair = pairs.tqh_first; pair; pair = pair->next.tqe_next)
            evbuffer_add_printf(body, "%s=%s\n", pair->key, pair->value);
        evhttp_clear_headers(&pairs);
    }
    struct evbuffer *input = evhttp_request_get_input_buffer(request);
    size_t length = evbuffer_get_length(input);
    if (length > 0) {
        evbuffer_add_printf(body, "body %zu: ", length);
        evbuffer_add_buffer(body, input);
        evbuffer_add(body, "\n", 1);
    }
    evhttp_add_header(evhttp_request_get_output_headers(request), "Content-Type", "text/html");
    evhttp_send_reply(request, HTTP_OK, "OK", body);
    evbuffer_free(body);
}

static int serve_libevent(const char *port) {
    struct event_base *base = event_base_new();
    struct evhttp *http = base ? evhttp_new(base) : NULL;
    if (!http || evhttp_bind_socket(http, "127.0.0.1", (unsigned short)atoi(port))) {
        fprintf(stderr, "driver: libevent could not listen on %s\n", port);
        return 1;
    }
    evhttp_set_gencb(http, on_http, NULL);
    return event_base_dispatch(base) < 0;
}

int main(int argc, char **argv) {
    static char request[65536];
    if (argc != 3 || (strcmp(argv[1], "sqlite") && strcmp(argv[1], "libevent"))) {
        fprintf(stderr, "usage: driver sqlite|libevent PORT\n");
        return 2;
    }
    signal(SIGPIPE, SIG_IGN);
    if (!strcmp(argv[1], "libevent"))
        return serve_libevent(argv[2]);
    int listener = socket(AF_INET, SOCK_STREAM, 0);
    int one = 1;
    setsockopt(listener, SOL_SOCKET, SO_REUSEADDR, &one, sizeof one);
    struct sockaddr_in address = {0};
    address.sin_family = AF_INET;
    address.sin_port = htons((unsigned short)atoi(argv[2]));
    address.sin_addr.s_addr = htonl(INADDR_LOOPBACK);
    if (bind(listener, (struct sockaddr *)&address, sizeof address) || listen(listener, 64)) {
        perror("driver: bind");
        return 1;
    }
    for (;;) {
        int fd = accept(listener, NULL, NULL);
        if (fd < 0)
            continue;
        size_t length = read_all(fd, request, sizeof request);
        (void)length;
        answer_sqlite(fd, request);
        close(fd);
    }
}
