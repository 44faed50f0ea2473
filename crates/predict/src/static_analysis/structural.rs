//! Structural risk flags: what makes hot patches fail in practice even
//! when the interface matches (init-only code, new system calls, new or
//! unbalanced allocations, recursion, added loops, globals used with
//! another type, state of the patch object's own that starts fresh).

use super::{finding, Totals};
use crate::abi;
use crate::callgraph::ModuleCallGraph;
use crate::code::{CodeFacts, CodeSpaces};
use crate::finding::{Finding, Severity};
use serde_json::json;
use shadowpatch_symbols::dwarf::{DebugInfo, DebugSource};
use std::collections::{BTreeMap, BTreeSet, HashSet};

/// Library functions that enter the kernel (directly or through stdio).
const SYSCALL_WRAPPERS: &[&str] = &[
    "read",
    "write",
    "pread",
    "pread64",
    "pwrite",
    "pwrite64",
    "readv",
    "writev",
    "open",
    "open64",
    "openat",
    "openat64",
    "creat",
    "close",
    "socket",
    "connect",
    "accept",
    "accept4",
    "bind",
    "listen",
    "send",
    "sendto",
    "sendmsg",
    "sendfile",
    "recv",
    "recvfrom",
    "recvmsg",
    "shutdown",
    "mmap",
    "mmap64",
    "munmap",
    "mprotect",
    "madvise",
    "brk",
    "sbrk",
    "fork",
    "vfork",
    "clone",
    "execve",
    "execvp",
    "system",
    "popen",
    "kill",
    "raise",
    "ioctl",
    "fcntl",
    "fsync",
    "fdatasync",
    "unlink",
    "unlinkat",
    "rename",
    "renameat",
    "mkdir",
    "rmdir",
    "stat",
    "fstat",
    "lstat",
    "fstatat",
    "statx",
    "poll",
    "ppoll",
    "select",
    "pselect",
    "epoll_wait",
    "epoll_ctl",
    "epoll_create",
    "epoll_create1",
    "nanosleep",
    "clock_nanosleep",
    "usleep",
    "sleep",
    "exit",
    "_exit",
    "abort",
    "syscall",
    "dup",
    "dup2",
    "dup3",
    "pipe",
    "pipe2",
    "chdir",
    "chmod",
    "chown",
    "truncate",
    "ftruncate",
    "lseek",
    "getdents64",
    "setsockopt",
    "getsockopt",
    "fopen",
    "fclose",
    "fread",
    "fwrite",
    "fflush",
    "fprintf",
    "printf",
    "vprintf",
    "vfprintf",
    "puts",
    "fputs",
    "fputc",
    "putchar",
    "perror",
    "syslog",
    "getrandom",
    "pthread_create",
    "signal",
    "sigaction",
    "prctl",
    "ptrace",
];
const ALLOCATORS: &[&str] = &[
    "malloc",
    "calloc",
    "realloc",
    "reallocarray",
    "aligned_alloc",
    "posix_memalign",
    "memalign",
    "valloc",
    "pvalloc",
    "strdup",
    "strndup",
    "asprintf",
    "_Znwm",
    "_Znam",
    "_ZnwmRKSt9nothrow_t",
    "_ZnamRKSt9nothrow_t",
    "_ZnwmSt11align_val_t",
];
const DEALLOCATORS: &[&str] = &[
    "free",
    "_ZdlPv",
    "_ZdaPv",
    "_ZdlPvm",
    "_ZdaPvm",
    "_ZdlPvSt11align_val_t",
];

/// Structural risk flags of one replacement.
#[allow(clippy::too_many_arguments)]
pub(super) fn structural(
    spaces: &CodeSpaces,
    graph: &ModuleCallGraph,
    symbol: &str,
    with: &str,
    entry: u64,
    old: &CodeFacts,
    new: &CodeFacts,
    shared: &[String],
    totals: &mut Totals,
) -> Vec<Finding> {
    let mut findings = Vec::new();
    let flag = |code: &str, severity: Severity, message: String, evidence: serde_json::Value| {
        finding(code, severity, message).symbol(symbol).evidence(evidence)
    };
    totals.new_bytes += new.bytes;

    // Init-only code.
    if let Some(constructors) = graph.init_only.get(&entry) {
        findings.push(flag(
            "init-only-function",
            Severity::Warning,
            format!(
                "{symbol} is only reached from constructors ({}), which already ran: the patch would never run",
                constructors.join(", ")
            ),
            json!({ "constructors": constructors }),
        ));
    }
    let init_called: Vec<(&String, &Vec<String>)> = new
        .target_functions
        .iter()
        .filter_map(|(address, name)| graph.init_only.get(address).map(|c| (name, c)))
        .collect();
    if !init_called.is_empty() {
        let names: Vec<&str> = init_called.iter().map(|(n, _)| n.as_str()).collect();
        findings.push(flag(
            "calls-init-only",
            Severity::Warning,
            format!(
                "{with} calls {}, which only constructors call: it re-runs initialisation on live state",
                names.join(", ")
            ),
            json!({ "functions": names, "constructors": init_called.iter().map(|(_, c)| c).collect::<Vec<_>>() }),
        ));
    }

    // System calls.
    let syscalls = |facts: &CodeFacts| -> BTreeSet<String> {
        facts
            .imports
            .iter()
            .filter(|name| SYSCALL_WRAPPERS.contains(&name.as_str()))
            .cloned()
            .collect()
    };
    let (old_syscalls, new_syscalls) = (syscalls(old), syscalls(new));
    let added: Vec<&String> = new_syscalls.difference(&old_syscalls).collect();
    let raw_added = new.syscall_instructions.saturating_sub(old.syscall_instructions);
    if !added.is_empty() || raw_added > 0 {
        totals.syscalls_added += added.len() + raw_added as usize;
        let mut what = Vec::new();
        if !added.is_empty() {
            what.push(format!(
                "calls {}",
                added.iter().map(|s| s.as_str()).collect::<Vec<_>>().join(", ")
            ));
        }
        if raw_added > 0 {
            what.push(format!(
                "has {raw_added} direct syscall instruction{}",
                if raw_added == 1 { "" } else { "s" }
            ));
        }
        findings.push(flag(
            "new-syscall",
            Severity::Warning,
            format!(
                "{with} {} that {symbol} did not: new interactions with the kernel (files, sockets, signals) the service was not tested with",
                what.join(" and ")
            ),
            json!({
                "added_wrappers": added,
                "old_wrappers": old_syscalls,
                "new_syscall_instructions": new.syscall_instructions,
                "old_syscall_instructions": old.syscall_instructions,
            }),
        ));
    }

    // Allocation.
    let named = |facts: &CodeFacts, list: &[&str]| -> BTreeSet<String> {
        facts
            .imports
            .iter()
            .filter(|name| list.contains(&name.as_str()))
            .cloned()
            .collect()
    };
    let (old_alloc, new_alloc) = (named(old, ALLOCATORS), named(new, ALLOCATORS));
    let (old_free, new_free) = (named(old, DEALLOCATORS), named(new, DEALLOCATORS));
    let evidence = json!({
        "old_allocates": old_alloc, "old_frees": old_free,
        "new_allocates": new_alloc, "new_frees": new_free,
    });
    if !new_alloc.is_subset(&old_alloc) || !new_free.is_subset(&old_free) {
        findings.push(flag(
            "new-allocation",
            Severity::Warning,
            format!("{with} allocates or frees heap memory in ways {symbol} did not"),
            evidence.clone(),
        ));
    }
    let balanced = |alloc: &BTreeSet<String>, free: &BTreeSet<String>| alloc.is_empty() == free.is_empty();
    if balanced(&old_alloc, &old_free) && !balanced(&new_alloc, &new_free) {
        let message = if new_free.is_empty() {
            format!("{with} allocates memory and never frees it: a leak on every call, unless ownership passes on")
        } else {
            format!("{with} frees memory it did not allocate: a double free unless the caller gave it up")
        };
        findings.push(flag("allocation-unbalanced", Severity::Warning, message, evidence));
    }

    // Recursion.
    if new.calls_replaced.contains(symbol) && !old.reaches_entry {
        findings.push(flag(
            "recursion-through-patch",
            Severity::Blocking,
            format!(
                "{with} calls {symbol}, which this patch redirects to {with}: unbounded recursion (call the old code through a copy, not through its patched entry)"
            ),
            json!({ "calls": new.calls_replaced }),
        ));
    }
    if new.reaches_entry && !old.reaches_entry {
        findings.push(flag(
            "recursion",
            Severity::Warning,
            format!("{with} is recursive and {symbol} was not: stack depth now depends on the input"),
            json!({ "old_recursive": old.reaches_entry, "new_recursive": new.reaches_entry }),
        ));
    }

    // Loops.
    if new.backward_branches > old.backward_branches {
        totals.loops_added += new.backward_branches - old.backward_branches;
        findings.push(flag(
            "added-loop",
            Severity::Warning,
            format!(
                "{with} has {} backward branch{} (loops) where {symbol} has {}: its running time may now depend on the input",
                new.backward_branches,
                if new.backward_branches == 1 { "" } else { "es" },
                old.backward_branches
            ),
            json!({
                "old_backward_branches": old.backward_branches,
                "new_backward_branches": new.backward_branches,
                "old_functions": old.functions,
                "new_functions": new.functions,
                "new_target_functions": new.target_functions.values().collect::<Vec<_>>(),
                "shared_functions_not_counted": shared,
            }),
        ));
    }

    // Globals accessed with another width or offset pattern.
    for (name, accesses) in &new.globals {
        let size = spaces
            .module
            .symbol_addresses(name)
            .into_iter()
            .map(|(_, s)| s.size)
            .find(|s| *s > 0);
        let out_of_bounds: Vec<_> = accesses
            .iter()
            .filter(|a| size.is_some_and(|size| a.offset < 0 || (a.offset as u64 + a.width as u64) > size))
            .collect();
        let old_accesses = old.globals.get(name);
        if !out_of_bounds.is_empty() {
            findings.push(flag(
                "global-access-changed",
                Severity::Blocking,
                format!(
                    "{with} accesses {name} at offset {} ({} bytes), past its {} bytes in the target: the patch assumes another layout",
                    out_of_bounds[0].offset,
                    out_of_bounds[0].width,
                    size.unwrap_or(0)
                ),
                json!({ "global": name, "size": size, "new_accesses": accesses, "old_accesses": old_accesses, "shared_functions_not_counted": shared }),
            ));
            continue;
        }
        let Some(old_accesses) = old_accesses else { continue };
        let conflicting: Vec<_> = accesses
            .iter()
            .filter(|a| {
                old_accesses.iter().any(|o| {
                    let overlap = a.offset < o.offset + o.width as i64 && o.offset < a.offset + a.width as i64;
                    overlap && (a.offset, a.width) != (o.offset, o.width)
                })
            })
            .collect();
        if !conflicting.is_empty() {
            findings.push(flag(
                "global-access-changed",
                Severity::Warning,
                format!(
                    "{with} accesses {name} as {} bytes at offset {} where {symbol} uses {}: a changed width or layout",
                    conflicting[0].width,
                    conflicting[0].offset,
                    old_accesses
                        .iter()
                        .map(|o| format!("{} bytes at offset {}", o.width, o.offset))
                        .collect::<Vec<_>>()
                        .join(", ")
                ),
                json!({ "global": name, "size": size, "new_accesses": accesses, "old_accesses": old_accesses, "method": "access pattern", "shared_functions_not_counted": shared }),
            ));
        }
    }
    findings
}

/// Globals the patch declares `extern` with another type than the target's.
pub(super) fn global_types(
    spaces: &CodeSpaces,
    target: &Option<(DebugInfo, DebugSource)>,
    patch: &Option<(DebugInfo, DebugSource)>,
    used: &HashSet<String>,
) -> Vec<Finding> {
    let (Some((target, target_source)), Some((patch, patch_source))) = (target, patch) else {
        return Vec::new();
    };
    let mut findings = Vec::new();
    let mut names: Vec<&String> = used.iter().collect();
    names.sort();
    for name in names {
        let Some(&address) = spaces.resolved.get(name) else {
            continue;
        };
        if !spaces.module.contains(address) {
            continue;
        }
        let Some(declared) = patch.variable(name, None) else {
            continue;
        };
        let Some(defined) = target.variable(name, Some(address.wrapping_sub(spaces.module.bias))) else {
            continue;
        };
        let (old, new) = (&defined.type_shape, &declared.type_shape);
        let evidence = json!({
            "method": abi::METHOD_DWARF,
            "global": name,
            "target_type": old,
            "patch_type": new,
            "target_dwarf": target_source.describe(),
            "patch_dwarf": patch_source.describe(),
        });
        let severity_and_message = if old.size.is_some() && new.size.is_some() && old.size != new.size {
            Some((
                Severity::Blocking,
                format!(
                    "the patch declares {name} as {} ({} bytes); in the target it is {} ({} bytes)",
                    new.name,
                    new.size.unwrap_or(0),
                    old.name,
                    old.size.unwrap_or(0)
                ),
            ))
        } else if old.class != new.class
            || (!old.members.is_empty() && !new.members.is_empty() && old.members != new.members)
        {
            Some((
                Severity::Blocking,
                format!(
                    "the patch declares {name} as {} with another layout or meaning than the target's {}",
                    new.name, old.name
                ),
            ))
        } else if old.name != new.name {
            Some((
                Severity::Warning,
                format!(
                    "the patch declares {name} as {}, the target defines it as {} (same size: check the meaning)",
                    new.name, old.name
                ),
            ))
        } else {
            None
        };
        if let Some((severity, message)) = severity_and_message {
            findings.push(finding("global-type-changed", severity, message).evidence(evidence));
        }
    }
    findings
}

/// Writable data of the patch object that the replacements use (name →
/// written): state that starts fresh.
pub(super) fn patch_state(spaces: &CodeSpaces, used: &BTreeMap<String, bool>) -> Vec<Finding> {
    if used.is_empty() {
        return Vec::new();
    }
    let data: Vec<serde_json::Value> = spaces
        .object_data()
        .iter()
        .filter(|(_, _, name)| used.contains_key(name))
        .map(|(address, size, name)| json!({ "name": name, "address": address, "size": size }))
        .collect();
    let written: Vec<&str> = used.iter().filter(|(_, w)| **w).map(|(n, _)| n.as_str()).collect();
    if written.is_empty() {
        let names: Vec<&str> = used.keys().map(String::as_str).collect();
        return vec![finding(
            "patch-data",
            Severity::Info,
            format!(
                "the replacements read the patch object's own data ({}): initialised from the object, not from the process",
                names.join(", ")
            ),
        )
        .evidence(json!({ "data": data }))];
    }
    // Static locals, counters, caches: their state starts from the
    // object's initial value, not from the process's history.
    vec![finding(
        "patch-global-state",
        Severity::Warning,
        format!(
            "the patch keeps its own state in {} (static locals or globals of the object): it starts fresh at apply, not from the live process, and is lost at rollback",
            written.join(", ")
        ),
    )
    .evidence(json!({ "written": written, "data": data }))]
}
