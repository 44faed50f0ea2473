# Shared by the shadowpatch modules: run the shadowpatch CLI with --json.
# The CLI is the interface: every state-changing call goes through its
# operations layer (journal, analysis gate, history), never around it.
from __future__ import annotations

import json
import os

try:
    import tomllib
except ImportError:  # Python < 3.11 on the managed host
    tomllib = None

COMMON_ARGS = dict(
    binary=dict(type="str", default="shadowpatch"),
    state_dir=dict(type="path"),
    agent_socket=dict(type="path"),
)

# The CLI's exit codes (docs/exit-codes.md).
EXIT_OK, EXIT_DIFFERENCES, EXIT_BAD_INPUT, EXIT_MIDWAY, EXIT_ROLLED_BACK = 0, 1, 2, 3, 4


def run(module, args):
    """Run `shadowpatch --json ARGS`; returns (rc, parsed JSON or None, stdout, stderr)."""
    command = [module.params["binary"], "--json"]
    if module.params.get("state_dir"):
        command += ["--state-dir", module.params["state_dir"]]
    if module.params.get("agent_socket"):
        command += ["--agent-socket", module.params["agent_socket"]]
    rc, out, err = module.run_command(command + [str(a) for a in args])
    parsed = None
    text = out.strip()
    if text:
        try:
            parsed = json.loads(text)
        except ValueError:
            # Several documents (one per member of a set): the last.
            for line in reversed(text.splitlines()):
                try:
                    parsed = json.loads(line)
                    break
                except ValueError:
                    continue
    return rc, parsed, out, err


def resolve_pid(module):
    pid = module.params.get("pid")
    pidfile = module.params.get("pidfile")
    if pid is None and pidfile:
        try:
            with open(pidfile, encoding="utf-8") as f:
                pid = int(f.read().strip())
        except (OSError, ValueError) as error:
            module.fail_json(msg=f"pidfile {pidfile}: {error}")
    if pid is None:
        module.fail_json(msg="one of pid or pidfile is required")
    if not os.path.exists(f"/proc/{pid}"):
        module.fail_json(msg=f"pid {pid}: no such process")
    return pid


def manifest_id(module, path):
    """The patch id a manifest declares (its `id`)."""
    try:
        with open(path, "rb") as f:
            data = f.read()
    except OSError as error:
        module.fail_json(msg=f"manifest {path}: {error}")
    if tomllib is not None:
        try:
            return tomllib.loads(data.decode("utf-8"))["id"]
        except (ValueError, KeyError) as error:
            module.fail_json(msg=f"manifest {path}: no id ({error})")
    for line in data.decode("utf-8", "replace").splitlines():
        key, _, value = line.partition("=")
        if key.strip() == "id":
            return value.strip().strip('"')
    module.fail_json(msg=f"manifest {path}: no id")


def active_patches(module, pid):
    rc, status, out, err = run(module, ["status", pid])
    if rc != EXIT_OK or not isinstance(status, dict):
        module.fail_json(msg=f"shadowpatch status {pid} failed (exit {rc}): {err.strip() or out.strip()}")
    return [p.get("id") for p in status.get("patches") or []]


def error_line(parsed, out, err):
    if isinstance(parsed, dict) and parsed.get("error"):
        return parsed["error"]
    return (err.strip() or out.strip()).splitlines()[-1] if (err.strip() or out.strip()) else "no output"
