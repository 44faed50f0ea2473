//! The prediction engine's integration tests, as one test binary: each file
//! here is a module, so the dependency tree is linked once for the crate
//! rather than once per file. A new test file `foo.rs` goes beside this
//! one with a `mod foo;` line below (see docs/testing.md).

mod common;

mod capture_stress;
mod context;
mod interrupted;
mod libc_ifunc;
mod simulate;
mod simulate_returns;
mod static_checks;
mod verdict;
