#!/usr/bin/python
# Roll back a shadowpatch live patch in one process.
from __future__ import annotations

DOCUMENTATION = r"""
module: shadowpatch_rollback
short_description: Roll back a live patch with shadowpatch
description:
  - Runs C(shadowpatch rollback PID [PATCH_ID]). Idempotent - a patch not active (or no patch at all) is C(ok).
  - Check mode reports what would be rolled back; diff mode shows the active patches before and after.
options:
  pid: {type: int}
  pidfile: {type: path}
  patch_id: {type: str, description: The patch to roll back (it must be the latest); default the latest.}
  binary: {type: str, default: shadowpatch}
  state_dir: {type: path}
  agent_socket: {type: path}
"""

RETURN = r"""
rolled_back: {type: str, description: The patch id rolled back, if any.}
result: {type: dict, description: The CLI's JSON result.}
"""

from ansible.module_utils.basic import AnsibleModule
from ansible_collections.shadowpatch.live.plugins.module_utils.shadowpatch import (
    COMMON_ARGS,
    EXIT_OK,
    active_patches,
    error_line,
    resolve_pid,
    run,
)


def main():
    module = AnsibleModule(
        argument_spec=dict(pid=dict(type="int"), pidfile=dict(type="path"), patch_id=dict(type="str"), **COMMON_ARGS),
        required_one_of=[["pid", "pidfile"]],
        supports_check_mode=True,
    )
    pid = resolve_pid(module)
    wanted = module.params["patch_id"]
    before = active_patches(module, pid)
    target = wanted if wanted else (before[-1] if before else None)
    result = dict(changed=False, pid=pid, rolled_back=None)
    if target is None or target not in before:
        result["msg"] = f"nothing to roll back in pid {pid}" + (f" ({wanted} is not active)" if wanted else "")
        module.exit_json(**result)
    after = [p for p in before if p != target]
    result["diff"] = dict(before={"active": before}, after={"active": after})
    result["changed"] = True
    if module.check_mode:
        result["msg"] = f"would roll back {target} in pid {pid}"
        module.exit_json(**result)
    rc, rolled, out, err = run(module, ["rollback", pid, target])
    result["result"] = rolled
    if rc != EXIT_OK:
        result.pop("diff")
        result["changed"] = False
        module.fail_json(msg=f"shadowpatch rollback failed (exit {rc}): {error_line(rolled, out, err)}", rc=rc, **result)
    result["rolled_back"] = target
    result["msg"] = f"rolled back {target} in pid {pid}"
    module.exit_json(**result)


if __name__ == "__main__":
    main()
