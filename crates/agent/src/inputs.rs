//! Files the agent reads on a requester's behalf (the manifest, its
//! object and signature, analysis inputs): each is opened once, checked on
//! that descriptor (`fstat`: a regular file the requester owns), read from
//! it, and written to a private copy under the agent's state directory.
//! The operations layer is then handed the copy's path, so every later
//! read (signature check, analysis, survey) sees the very bytes that were
//! checked: swapping the requester's path afterwards changes nothing.
//!
//! A refusal never says whether a path the requester cannot see exists:
//! missing, unreachable, a symlink, or another user's file all answer the
//! same line.

use crate::AgentError;
use std::io::Read;
use std::os::unix::fs::{DirBuilderExt, MetadataExt, OpenOptionsExt};
use std::path::{Component, Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};

/// Private copies of one request's inputs, removed when dropped.
#[derive(Debug)]
pub struct PrivateInputs {
    root: PathBuf,
}

static NEXT_REQUEST: AtomicU64 = AtomicU64::new(0);

impl PrivateInputs {
    /// A fresh 0700 directory under `STATE/agent-inputs`.
    pub fn create(state_dir: &Path) -> Result<PrivateInputs, AgentError> {
        let parent = state_dir.join("agent-inputs");
        let made = |path: &Path, result: std::io::Result<()>| {
            result.map_err(|source| AgentError::File {
                path: path.to_path_buf(),
                source,
            })
        };
        match std::fs::DirBuilder::new().mode(0o700).create(&parent) {
            Err(error) if error.kind() == std::io::ErrorKind::AlreadyExists => {}
            other => made(&parent, other)?,
        }
        let root = parent.join(format!(
            "{}-{}",
            std::process::id(),
            NEXT_REQUEST.fetch_add(1, Ordering::Relaxed)
        ));
        // A left-over from an agent killed mid-request with the same pid.
        let _ = std::fs::remove_dir_all(&root);
        made(&root, std::fs::DirBuilder::new().mode(0o700).create(&root))?;
        Ok(PrivateInputs { root })
    }

    /// Where the copy of the requester's `original` (absolute, lexically
    /// normal) lives: the same path below this directory, so a manifest's
    /// object named relative to it resolves to the object's copy.
    pub fn copy_path(&self, original: &Path) -> PathBuf {
        let mut copy = self.root.join("root");
        copy.extend(original.components().filter(|c| matches!(c, Component::Normal(_))));
        copy
    }

    /// Open `original` for `uid`, check it, read it (at most `limit`
    /// bytes) and write the private copy; returns the bytes and the copy.
    pub fn take(&self, uid: u32, original: &Path, limit: u64) -> Result<(Vec<u8>, PathBuf), AgentError> {
        let bytes = read_own(uid, original, limit)?;
        let copy = self.copy_path(original);
        let written = copy
            .parent()
            .map_or(Ok(()), |parent| {
                std::fs::DirBuilder::new().recursive(true).mode(0o700).create(parent)
            })
            .and_then(|()| {
                std::fs::OpenOptions::new()
                    .write(true)
                    .create_new(true)
                    .mode(0o600)
                    .open(&copy)
                    .and_then(|mut file| std::io::Write::write_all(&mut file, &bytes))
            });
        written.map_err(|source| AgentError::File {
            path: copy.clone(),
            source,
        })?;
        Ok((bytes, copy))
    }
}

impl Drop for PrivateInputs {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.root);
    }
}

/// `path` made absolute (a relative path is refused: the agent's working
/// directory is not the requester's) and lexically normal (`..` removed).
pub fn normal_absolute(path: &Path) -> Result<PathBuf, AgentError> {
    if !path.is_absolute() {
        return Err(AgentError::Input {
            path: path.to_path_buf(),
            message: "must be an absolute path".into(),
        });
    }
    let mut normal = PathBuf::from("/");
    for component in path.components() {
        match component {
            Component::Normal(part) => normal.push(part),
            Component::ParentDir => {
                // Above "/" the private copy's tree would resolve outside
                // itself: refused rather than clamped.
                if !normal.pop() {
                    return Err(AgentError::Input {
                        path: path.to_path_buf(),
                        message: "climbs above / with '..'".into(),
                    });
                }
            }
            Component::RootDir | Component::CurDir | Component::Prefix(_) => {}
        }
    }
    Ok(normal)
}

/// Open `path` for `uid` and check on the descriptor: the requester's own
/// regular file (root: any regular file).
pub fn open_own(uid: u32, path: &Path) -> Result<(std::fs::File, std::fs::Metadata), AgentError> {
    let hidden = || AgentError::NotFoundOrNotYours {
        path: path.to_path_buf(),
    };
    let mut flags = libc::O_NONBLOCK | libc::O_CLOEXEC | libc::O_NOCTTY;
    if uid != 0 {
        flags |= libc::O_NOFOLLOW;
    }
    let opened = std::fs::OpenOptions::new().read(true).custom_flags(flags).open(path);
    let file = match opened {
        Ok(file) => file,
        // Root sees the real reason; anyone else the same line for every
        // failure, since the agent (root) could open what they cannot.
        Err(source) if uid == 0 => {
            return Err(AgentError::File {
                path: path.to_path_buf(),
                source,
            })
        }
        Err(_) => return Err(hidden()),
    };
    let metadata = file.metadata().map_err(|source| AgentError::File {
        path: path.to_path_buf(),
        source,
    })?;
    if uid != 0 && metadata.uid() != uid {
        return Err(hidden());
    }
    if !metadata.file_type().is_file() {
        return Err(AgentError::Input {
            path: path.to_path_buf(),
            message: "is not a regular file; refusing to read it".into(),
        });
    }
    Ok((file, metadata))
}

/// Read `path` for `uid`: opened once (never following a final symlink
/// for a non-root requester, never blocking on a FIFO), then `fstat` on
/// that descriptor decides: the requester's own regular file, at most
/// `limit` bytes. Root may read any regular file.
pub fn read_own(uid: u32, path: &Path, limit: u64) -> Result<Vec<u8>, AgentError> {
    let (file, metadata) = open_own(uid, path)?;
    if metadata.len() > limit {
        return Err(AgentError::Input {
            path: path.to_path_buf(),
            message: format!("is {} bytes, more than the {limit} bytes allowed", metadata.len()),
        });
    }
    let mut bytes = Vec::with_capacity(metadata.len() as usize);
    file.take(limit + 1)
        .read_to_end(&mut bytes)
        .map_err(|source| AgentError::File {
            path: path.to_path_buf(),
            source,
        })?;
    if bytes.len() as u64 > limit {
        return Err(AgentError::Input {
            path: path.to_path_buf(),
            message: format!("grew past the {limit} bytes allowed while being read"),
        });
    }
    Ok(bytes)
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::unix::fs::PermissionsExt;

    #[test]
    fn paths_are_made_normal_and_relative_ones_refused() {
        assert_eq!(
            normal_absolute(Path::new("/a/./b/../c")).unwrap(),
            PathBuf::from("/a/c")
        );
        assert!(normal_absolute(Path::new("/a/../../x")).is_err());
        assert!(normal_absolute(Path::new("a/b")).is_err());
    }

    #[test]
    fn the_copy_keeps_the_bytes_checked_whatever_the_original_becomes() {
        // Removed with the test, whatever it ends with (a folder per run
        // was left in the temporary directory).
        let folder = tempfile::tempdir().unwrap();
        // Open to every user, as the temporary directory's own folders
        // were: the refusal below is the final symlink's, not the path's.
        std::fs::set_permissions(folder.path(), std::fs::Permissions::from_mode(0o755)).unwrap();
        let state = folder.path().join("state");
        std::fs::create_dir(&state).unwrap();
        let original = folder.path().join("manifest.toml");
        std::fs::write(&original, "checked").unwrap();
        let private = PrivateInputs::create(&state).unwrap();
        let (bytes, copy) = private.take(0, &original, 100).unwrap();
        assert_eq!(bytes, b"checked");
        std::fs::remove_file(&original).unwrap();
        std::os::unix::fs::symlink("/etc/shadow", &original).unwrap();
        assert_eq!(std::fs::read(&copy).unwrap(), b"checked");
        let root = private.root.clone();
        assert_eq!(std::fs::metadata(&root).unwrap().permissions().mode() & 0o777, 0o700);
        drop(private);
        assert!(!root.exists(), "removed with the request");
        // A final symlink is never followed for a user.
        assert!(matches!(
            read_own(4_000_000, &original, 100),
            Err(AgentError::NotFoundOrNotYours { .. })
        ));
    }

    #[test]
    fn a_missing_file_and_another_users_file_read_the_same() {
        let dir = std::env::temp_dir();
        let missing = dir.join("shadowpatch-inputs-test-missing");
        let other_uid = 4_000_000;
        let mine = std::env::current_exe().unwrap();
        let a = read_own(other_uid, &missing, 10).unwrap_err().to_string();
        let b = read_own(other_uid, &mine, 10).unwrap_err().to_string();
        assert_eq!(
            a.replace(missing.to_str().unwrap(), "P"),
            b.replace(mine.to_str().unwrap(), "P")
        );
    }
}
