//! The only crate of shadowpatch that contains `unsafe`: thin, documented
//! wrappers over the few syscalls that `nix` does not cover.
//!
//! Everything here follows nix's conventions: no hand-written `extern`
//! blocks, results checked with `Errno::result`, and every `unsafe` block
//! carries a `// SAFETY:` comment naming the invariant it relies on.

pub mod alarm;
pub mod pagemap;
pub mod pidfd;
pub mod ptrace_ext;
pub mod rlimit;
pub mod sched;
pub mod scratch;
pub mod siginfo;
pub mod stamp;
pub mod uffd;

pub use nix::errno::Errno;
