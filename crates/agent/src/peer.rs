//! Who is on the other end of a socket (SO_PEERCRED) and whether they may
//! act on a target: root, or the user owning the target process.

use crate::AgentError;
use nix::sys::socket::{getsockopt, sockopt::PeerCredentials};
use std::os::unix::fs::MetadataExt;
use std::os::unix::net::UnixStream;

/// The peer's credentials, as the kernel recorded them at connect time.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Peer {
    pub pid: i32,
    pub uid: u32,
}

pub fn peer_of(stream: &UnixStream) -> Result<Peer, AgentError> {
    let credentials = getsockopt(stream, PeerCredentials).map_err(|errno| AgentError::PeerCredentials {
        source: std::io::Error::from(errno),
    })?;
    Ok(Peer {
        pid: credentials.pid(),
        uid: credentials.uid(),
    })
}

/// The uid owning process `pid` (the owner of /proc/PID, its effective uid).
pub fn owner_of(pid: i32) -> Result<u32, AgentError> {
    std::fs::metadata(format!("/proc/{pid}"))
        .map(|m| m.uid())
        .map_err(|_| AgentError::NoSuchProcess { pid })
}

/// Only root or the target's owner may act on it.
pub fn authorize(peer: &Peer, pid: i32) -> Result<(), AgentError> {
    if pid <= 0 {
        return Err(AgentError::NoSuchProcess { pid });
    }
    let owner = owner_of(pid)?;
    if peer.uid == 0 || peer.uid == owner {
        Ok(())
    } else {
        Err(AgentError::Unauthorised {
            peer_uid: peer.uid,
            peer_pid: peer.pid,
            pid,
            owner,
        })
    }
}

// Files read on a requester's behalf are checked on their descriptor
// (`inputs.rs`), never by path.

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn root_and_the_owner_may_act_others_may_not() {
        let me = std::process::id() as i32;
        let my_uid = owner_of(me).unwrap();
        assert!(authorize(&Peer { pid: 1, uid: 0 }, me).is_ok());
        assert!(authorize(&Peer { pid: 1, uid: my_uid }, me).is_ok());
        let other = my_uid.wrapping_add(12345);
        let error = authorize(&Peer { pid: 1, uid: other }, me).unwrap_err();
        assert!(error.to_string().contains(&format!("uid {other}")), "{error}");
        assert!(matches!(
            authorize(&Peer { pid: 1, uid: 0 }, -4),
            Err(AgentError::NoSuchProcess { pid: -4 })
        ));
    }

    #[test]
    fn peer_credentials_name_this_process() {
        let (a, _b) = UnixStream::pair().unwrap();
        let peer = peer_of(&a).unwrap();
        assert_eq!(peer.pid, std::process::id() as i32);
    }
}
