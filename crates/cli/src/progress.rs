//! The progress bar (`shadowpatch_report::Progress`, shared with the bench
//! and trainer binaries).

pub use shadowpatch_report::Progress;
