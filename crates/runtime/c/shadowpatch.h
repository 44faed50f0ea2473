/* shadowpatch.h: cooperate with the shadowpatch agent from C.
 *
 * Link with libshadowpatch.a (build: see README.md beside this file).
 * Every function talks to the agent's application socket
 * ($SHADOWPATCH_APP_SOCKET, default /run/shadowpatch/app.sock); the agent
 * knows the caller from the socket's peer credentials, so a process can
 * only act on itself. Thread-safe. Functions returning int give 0 on
 * success and -1 on failure, with a message from shadowpatch_last_error().
 */
#ifndef SHADOWPATCH_H
#define SHADOWPATCH_H

#include <stddef.h>

#ifdef __cplusplus
extern "C" {
#endif

enum shadowpatch_mode {
    /* Must never change after registration: a change is an alert. */
    SHADOWPATCH_GUARDED = 0,
    /* Changes legitimately: copied periodically, with a history. */
    SHADOWPATCH_MIRRORED = 1,
};

/* Connect now (otherwise the first call does) so the agent learns this
 * process's safe-point mailbox. */
int shadowpatch_connect(void);

/* Declare a critical variable by name, address and size. */
int shadowpatch_register_variable(const char *name, const void *address, size_t size, enum shadowpatch_mode mode);

/* A safe point: call it where this thread holds no state a patch could
 * trip over (e.g. between requests). One atomic load, unless the agent is
 * switching a patch: then the thread waits here until it is done. */
void shadowpatch_safe_point(void);

/* Ask the agent to roll back this process's latest patch. On success, the
 * rolled-back patch's id is copied into patch_id (if not NULL, at most
 * patch_id_len bytes, NUL-terminated). */
int shadowpatch_request_rollback(const char *reason, char *patch_id, size_t patch_id_len);

/* The last error of the calling thread, or "" if none. */
const char *shadowpatch_last_error(void);

#ifdef __cplusplus
}
#endif

#endif
