//! What identifies a file's contents without reading it: its device,
//! inode, size and modification time, from one `stat`. A file replaced
//! (renamed over) has another inode; one rewritten in place another size
//! or mtime. Kept by callers that reuse what they read from a file until
//! it changes (the state directory's marker, an open event history).

use std::os::unix::fs::MetadataExt;
use std::path::Path;

#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct FileStamp {
    pub device: u64,
    pub inode: u64,
    pub size: u64,
    pub mtime_ns: i128,
}

impl FileStamp {
    pub fn of_metadata(meta: &std::fs::Metadata) -> Self {
        FileStamp {
            device: meta.dev(),
            inode: meta.ino(),
            size: meta.size(),
            mtime_ns: i128::from(meta.mtime()) * 1_000_000_000 + i128::from(meta.mtime_nsec()),
        }
    }

    /// The stamp of the file at `path` (following symlinks); `None` when
    /// it cannot be stat'ed.
    pub fn of(path: &Path) -> Option<Self> {
        std::fs::metadata(path).ok().map(|meta| Self::of_metadata(&meta))
    }
}
