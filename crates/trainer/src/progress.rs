//! The progress bar (`shadowpatch_report::Progress`, shared with the
//! `shadowpatch` and bench binaries).

pub use shadowpatch_report::Progress;
