#!/usr/bin/python
# Gather shadowpatch facts: version, targets with state, persisted patches.
from __future__ import annotations

DOCUMENTATION = r"""
module: shadowpatch_facts
short_description: Facts about shadowpatch on a host
description:
  - Sets C(ansible_facts.shadowpatch) - C(version), C(targets) (C(shadowpatch list)), C(persisted)
    (C(shadowpatch persisted)) and, with pid, C(status) (C(shadowpatch status PID)). Reads only.
options:
  pid: {type: int}
  pidfile: {type: path}
  binary: {type: str, default: shadowpatch}
  state_dir: {type: path}
  agent_socket: {type: path}
"""

from ansible.module_utils.basic import AnsibleModule
from ansible_collections.shadowpatch.live.plugins.module_utils.shadowpatch import (
    COMMON_ARGS,
    EXIT_OK,
    error_line,
    resolve_pid,
    run,
)


def main():
    module = AnsibleModule(
        argument_spec=dict(pid=dict(type="int"), pidfile=dict(type="path"), **COMMON_ARGS),
        supports_check_mode=True,
    )
    rc, out, err = module.run_command([module.params["binary"], "--version"])
    if rc != 0:
        module.fail_json(msg=f"{module.params['binary']} --version failed: {err.strip() or out.strip()}")
    facts = dict(version=out.strip().split()[-1])
    for key, args in (("targets", ["list"]), ("persisted", ["persisted"])):
        rc, parsed, out, err = run(module, args)
        if rc != EXIT_OK:
            module.fail_json(msg=f"shadowpatch {args[0]} failed (exit {rc}): {error_line(parsed, out, err)}")
        facts[key] = parsed
    if module.params.get("pid") is not None or module.params.get("pidfile"):
        pid = resolve_pid(module)
        rc, parsed, out, err = run(module, ["status", pid])
        if rc != EXIT_OK:
            module.fail_json(msg=f"shadowpatch status {pid} failed (exit {rc}): {error_line(parsed, out, err)}")
        facts["status"] = parsed
    module.exit_json(changed=False, ansible_facts=dict(shadowpatch=facts))


if __name__ == "__main__":
    main()
