//! The target process: who it is (pid + start time), how to stop and resume
//! all of its threads (`attach`), its memory map (`maps`), how to read and
//! write its memory (`memory`), and how to run a syscall inside it (`remote`).
//!
//! Everything that touches a live process goes through this crate; the
//! crates above it work on what it returns.

#![forbid(unsafe_code)]

pub mod attach;
pub mod error;
pub mod identity;
pub mod maps;
pub mod memory;
pub mod remote;

pub use attach::{Attached, PauseReport, SignalEvent, Stopped};
pub use error::TargetError;
pub use identity::ProcessIdentity;
pub use maps::{Mapping, MappingKind};
pub use memory::{MemoryBackend, TargetMemory};
