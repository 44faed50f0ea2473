#!/usr/bin/python
# Apply a shadowpatch live patch to one process.
from __future__ import annotations

DOCUMENTATION = r"""
module: shadowpatch_apply
short_description: Apply a live patch to a running process with shadowpatch
description:
  - Runs C(shadowpatch apply PID MANIFEST) (analysis gate, journal, history), optionally watching the
    process afterwards and rolling back on a regression.
  - Idempotent: a patch whose id is already active in the process is C(ok), not applied again.
  - Check mode runs the read-only analysis (C(shadowpatch analyze)) and reports what would change.
  - Diff mode shows the active patches before and after.
options:
  pid: {type: int, description: The process to patch.}
  pidfile: {type: path, description: A file holding the pid (used when pid is not given).}
  manifest: {type: path, required: true, description: The patch manifest (TOML).}
  watch: {type: float, description: Seconds to watch after applying (apply --watch); a regression rolls back and fails the task with rolled_back true.}
  health_cmd: {type: str, description: With watch, a command that must keep passing (apply --health-cmd).}
  force: {type: bool, default: false, description: Apply even when the analysis refuses.}
  extra_args: {type: list, elements: str, default: [], description: More arguments for apply.}
  binary: {type: str, default: shadowpatch}
  state_dir: {type: path}
  agent_socket: {type: path}
"""

RETURN = r"""
patch_id: {type: str, description: The manifest's patch id.}
pid: {type: int}
rolled_back: {type: bool, description: The watch rolled the patch back.}
result: {type: dict, description: The CLI's JSON result (apply or, in check mode, analyze).}
"""

from ansible.module_utils.basic import AnsibleModule
from ansible_collections.shadowpatch.live.plugins.module_utils.shadowpatch import (
    COMMON_ARGS,
    EXIT_OK,
    EXIT_ROLLED_BACK,
    active_patches,
    error_line,
    manifest_id,
    resolve_pid,
    run,
)


def main():
    module = AnsibleModule(
        argument_spec=dict(
            pid=dict(type="int"),
            pidfile=dict(type="path"),
            manifest=dict(type="path", required=True),
            watch=dict(type="float"),
            health_cmd=dict(type="str"),
            force=dict(type="bool", default=False),
            extra_args=dict(type="list", elements="str", default=[]),
            **COMMON_ARGS,
        ),
        required_one_of=[["pid", "pidfile"]],
        supports_check_mode=True,
    )
    pid = resolve_pid(module)
    manifest = module.params["manifest"]
    patch_id = manifest_id(module, manifest)
    before = active_patches(module, pid)
    result = dict(changed=False, pid=pid, patch_id=patch_id, rolled_back=False)
    if patch_id in before:
        result["msg"] = f"patch {patch_id} is already active in pid {pid}"
        module.exit_json(**result)
    result["diff"] = dict(before={"active": before}, after={"active": before + [patch_id]})
    if module.check_mode:
        rc, analysis, out, err = run(module, ["analyze", pid, manifest])
        result["result"] = analysis
        verdict = (analysis or {}).get("verdict") if isinstance(analysis, dict) else None
        if rc not in (EXIT_OK, 1) or (rc == 1 and not module.params["force"]):
            module.fail_json(msg=f"the analysis refuses patch {patch_id} for pid {pid}: {error_line(analysis, out, err)}", **result)
        result["changed"] = True
        result["msg"] = f"would apply {patch_id} to pid {pid} (analysis: {verdict})"
        module.exit_json(**result)
    args = ["apply", pid, manifest]
    if module.params["watch"] is not None:
        args += ["--watch", module.params["watch"]]
    if module.params["health_cmd"]:
        args += ["--health-cmd", module.params["health_cmd"]]
    if module.params["force"]:
        args.append("--force")
    args += module.params["extra_args"]
    rc, applied, out, err = run(module, args)
    result["result"] = applied
    if rc == EXIT_OK:
        result["changed"] = True
        result["msg"] = f"applied {patch_id} to pid {pid}"
        module.exit_json(**result)
    if rc == EXIT_ROLLED_BACK:
        result["changed"] = True
        result["rolled_back"] = True
        result["diff"]["after"] = {"active": before}
        watch = applied.get("watch") if isinstance(applied, dict) else None
        why = (
            f"{watch.get('cause')}: {watch.get('reason')}"
            if isinstance(watch, dict) and watch.get("reason")
            else error_line(applied, out, err)
        )
        module.fail_json(msg=f"the watch rolled {patch_id} back in pid {pid} ({why})", **result)
    result.pop("diff")
    module.fail_json(msg=f"shadowpatch apply failed (exit {rc}): {error_line(applied, out, err)}", rc=rc, **result)


if __name__ == "__main__":
    main()
