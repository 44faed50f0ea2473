//! The target process: who it is (pid + start time), how to stop and resume
//! all of its threads (`attach`), how to follow it while it runs (`events`),
//! its memory map (`maps`), how to read and write its memory (`memory`), how
//! to run a syscall inside it (`remote`, self-restoring through the signal
//! frame of `sigframe`), and the copies of it a remote `clone` makes
//! (`copy`).
//!
//! Everything that touches a live process goes through this crate; the
//! crates above it work on what it returns.

#![forbid(unsafe_code)]

pub mod attach;
pub mod copy;
pub mod durable;
mod emulate;
pub mod error;
pub mod events;
pub mod fault;
pub mod identity;
pub mod maps;
pub mod memory;
pub mod remote;
mod sigframe;

pub use attach::{Attached, PauseReport, SignalEvent, Stopped};
pub use copy::{CopyStop, Deadline, ProcessCopy, Resume};
pub use error::TargetError;
pub use events::Event;
pub use identity::ProcessIdentity;
pub use maps::{Mapping, MappingKind};
pub use memory::{MemoryBackend, TargetMemory};
pub use remote::{RemoteCall, StepOut};
pub use sigframe::zeroed_regs;
