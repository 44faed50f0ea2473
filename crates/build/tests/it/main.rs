//! `shadowpatch build`'s integration tests, as one test binary: each file
//! here is a module (see docs/testing.md). They build the small C tree in
//! `tests/data/calc` and the C++ tree in `tests/data/shapes` with the real
//! gcc/g++ and make.

mod build_systems;
mod common;
mod cxx;
mod differ;
mod end_to_end;
mod reach;
