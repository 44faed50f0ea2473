//! Test-only fault injection: with `SHADOWPATCH_FAULT=<point>` in the
//! environment the tool kills itself (SIGKILL, as `kill -9` would) when it
//! reaches that point. The process layer's points are inside a remote
//! system call (`remote::REMOTE_CALL_POINTS`); `shadowpatch_patch::fault`
//! names the transaction's.

/// Die here if the environment asks for it.
pub fn point(name: &str) {
    if std::env::var("SHADOWPATCH_FAULT").is_ok_and(|wanted| wanted == name) {
        tracing::warn!(point = name, "fault injection: killing shadowpatch");
        let _ = nix::sys::signal::raise(nix::sys::signal::Signal::SIGKILL);
    }
}
