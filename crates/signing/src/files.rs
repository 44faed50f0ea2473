//! Small files read and written safely: bounded reads that refuse FIFOs and
//! devices, new files created exclusively, replacements made atomically.

use std::fs::{File, OpenOptions};
use std::io::{Read, Write};
use std::os::unix::fs::{FileTypeExt, OpenOptionsExt};
use std::path::Path;

use crate::SigningError;

fn io(path: &Path) -> impl FnOnce(std::io::Error) -> SigningError + '_ {
    move |source| SigningError::Io {
        path: path.to_path_buf(),
        source,
    }
}

/// Reads a whole regular file of at most `limit` bytes. Opened with
/// `O_NONBLOCK` so that a FIFO cannot block the open, then checked with
/// `fstat` on that same descriptor (no window between check and read) and
/// read through it, never more than `limit + 1` bytes.
pub fn read_bounded(path: &Path, limit: u64) -> Result<Vec<u8>, SigningError> {
    let file = OpenOptions::new()
        .read(true)
        .custom_flags(libc::O_NONBLOCK | libc::O_CLOEXEC)
        .open(path)
        .map_err(io(path))?;
    let metadata = file.metadata().map_err(io(path))?;
    let file_type = metadata.file_type();
    if !file_type.is_file() {
        let kind = if file_type.is_fifo() {
            "a FIFO"
        } else if file_type.is_char_device() || file_type.is_block_device() {
            "a device"
        } else if file_type.is_dir() {
            "a directory"
        } else if file_type.is_socket() {
            "a socket"
        } else {
            "not a file"
        };
        return Err(SigningError::NotRegular {
            path: path.to_path_buf(),
            kind,
        });
    }
    if metadata.len() > limit {
        return Err(SigningError::TooLarge {
            path: path.to_path_buf(),
            size: metadata.len(),
            limit,
        });
    }
    let mut bytes = Vec::with_capacity(metadata.len() as usize);
    file.take(limit + 1).read_to_end(&mut bytes).map_err(io(path))?;
    if bytes.len() as u64 > limit {
        // It grew between fstat and read.
        return Err(SigningError::TooLarge {
            path: path.to_path_buf(),
            size: bytes.len() as u64,
            limit,
        });
    }
    Ok(bytes)
}

/// Creates `path` with `mode`, refusing if it exists, and fsyncs it.
pub(crate) fn write_new(path: &Path, bytes: &[u8], mode: u32) -> Result<(), SigningError> {
    let mut file = OpenOptions::new()
        .write(true)
        .create_new(true)
        .mode(mode)
        .open(path)
        .map_err(|source| {
            if source.kind() == std::io::ErrorKind::AlreadyExists {
                SigningError::KeyExists {
                    path: path.to_path_buf(),
                }
            } else {
                SigningError::Io {
                    path: path.to_path_buf(),
                    source,
                }
            }
        })?;
    file.write_all(bytes).map_err(io(path))?;
    file.sync_all().map_err(io(path))
}

/// Replaces `path` atomically: a temporary file beside it, fsync, rename.
pub(crate) fn write_replace(path: &Path, bytes: &[u8]) -> Result<(), SigningError> {
    let mut temporary = path.as_os_str().to_owned();
    temporary.push(".tmp");
    let temporary = std::path::PathBuf::from(temporary);
    let mut file = File::create(&temporary).map_err(io(&temporary))?;
    file.write_all(bytes).map_err(io(&temporary))?;
    file.sync_all().map_err(io(&temporary))?;
    std::fs::rename(&temporary, path).map_err(io(path))
}
