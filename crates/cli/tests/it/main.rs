//! The `shadowpatch` binary's end-to-end tests, as one test binary: each file
//! here is a module, so the dependency tree is linked once for the crate
//! rather than once per file. A new test file `foo.rs` goes beside this
//! one with a `mod foo;` line below (see docs/testing.md).

mod common;

mod agent;
mod agent_abuse;
mod agent_gate;
mod analyze;
mod analyze_memcached;
mod ansible;
mod apply_watch;
mod build;
mod build_debian;
mod carried_state;
mod continuation;
mod demo;
mod exit_codes;
mod fleet;
mod fleet_host;
mod fork_adoption;
mod history;
mod inlined_change;
mod keep_generation;
mod kill_anywhere;
mod lighttpd;
mod list_gc;
mod mirror_verify;
mod module_names;
mod patching;
mod persist;
mod recover;
mod redis_upstream;
mod sets;
mod signing;
mod trust;
mod variables;
mod watch;
mod window_lifecycle;
