//! Self-heal, the watcher's side: which runs to write back, and the
//! [`Healer`] that writes them. The heal itself is a state-changing
//! operation and lives in the operations layer (`shadowpatch_ops::heal`):
//! journaled like a patch, the target lock taken and the target attached
//! only for the heal, the writes announced in the fsync'd journal, checked
//! to still hold the tampered bytes and switched in one stop of all
//! threads; an interrupted heal is finished by `recover`. The CLI and the
//! agent hand the watcher that operation ([`crate::Watcher::set_healer`]).

use crate::WatchError;
use shadowpatch_process::ProcessIdentity;
use std::path::Path;

/// One run to write back: where, the tampered bytes seen, the mirrored bytes.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct HealRun {
    pub address: u64,
    pub live: Vec<u8>,
    pub expected: Vec<u8>,
}

/// What a heal did.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct HealDone {
    pub txn: u64,
    pub pause_us: u64,
}

/// Why a heal was not made although nothing failed.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum HealSkipped {
    /// The journal changed since the difference was judged (an authorised
    /// change may explain it): re-verify first.
    JournalMoved,
    /// Some run's live bytes are what a committed transaction of ours put
    /// there (an active patch's entry, e.g. after a kept watch window):
    /// never written over.
    Committed { address: u64 },
}

/// One heal the watcher asks for.
#[derive(Debug, Clone, Copy)]
pub struct HealRequest<'a> {
    pub state_dir: &'a Path,
    pub identity: &'a ProcessIdentity,
    pub runs: &'a [HealRun],
    /// The journal length the differences were judged against: if another
    /// process changed the journal since, the heal is skipped.
    pub journal_len: u64,
    /// Stops to try while a thread sits in the bytes to rewrite.
    pub attempts: u32,
}

/// Writes mirrored bytes back: the operations layer's heal. Errors that
/// say the target is gone are `WatchError::Target`, so the watcher ends.
pub trait Healer: Send + Sync {
    fn heal(&self, request: HealRequest<'_>) -> Result<Result<HealDone, HealSkipped>, WatchError>;
}
