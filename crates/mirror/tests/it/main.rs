//! The mirror's integration tests, as one test binary: each file
//! here is a module, so the dependency tree is linked once for the crate
//! rather than once per file. A new test file `foo.rs` goes beside this
//! one with a `mod foo;` line below (see docs/testing.md).

mod dirty;
mod exec_id;
mod file_format;
