/* A small TCP server that exercises a Debian library for the real-program
 * corpus (crates/trainer/src/programs): one connection at a time, the
 * request is everything the client sends before it shuts down its side,
 * the reply is a deterministic rendering of what the library made of it.
 *
 *   driver sqlite PORT  run the SQL on an in-memory database, answer each row
 *
 * The library is a Debian update (libsqlite3-0 3.40.1-2+deb12u2) built by
 * the gcc installed here, so `shadowpatch build --debian` can match its
 * code; libraries last built by an older gcc (jansson, libyaml) cannot be.
 */
#include <sqlite3.h>
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

int main(int argc, char **argv) {
    static char request[65536];
    if (argc != 3 || strcmp(argv[1], "sqlite")) {
        fprintf(stderr, "usage: driver sqlite PORT\n");
        return 2;
    }
    signal(SIGPIPE, SIG_IGN);
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
