//! Plain journaled writes into a target: heals (mirrored bytes written back
//! over tampered ones), probes (temporary breakpoints) and repoints (an
//! active patch's entries re-aimed). The same rules as a patch: the writes
//! are announced in the journal (fsync'd) before the first one, they switch
//! in one stop after checking the live bytes are the expected ones, and an
//! interrupted transaction is finished or undone by `recover`.

use crate::activate::{switch, Activation, Direction};
use crate::journal::{Record, TxnKind, Write5};
use crate::state::{now_ms, TargetState};
use crate::PatchError;
use shadowpatch_process::{Attached, ProcessIdentity};

/// An announced, not yet finished, plain-writes transaction.
#[derive(Debug)]
#[must_use = "a begun transaction must be committed or aborted"]
pub struct PlainWrites {
    pub txn: u64,
    pub kind: TxnKind,
    pub writes: Vec<Write5>,
}

impl PlainWrites {
    /// Journal `Begin` and `Writes` (each fsync'd). Nothing is written to
    /// the target yet. `label` names the transaction in the journal (the
    /// patch id for a repoint or probe, `heal` for a heal).
    pub fn begin(
        target: &mut TargetState,
        identity: &ProcessIdentity,
        kind: TxnKind,
        label: &str,
        writes: Vec<Write5>,
        patch_id: Option<&str>,
    ) -> Result<Self, PatchError> {
        assert!(kind.is_plain_writes(), "{kind:?} is a patch transaction");
        if let Some(open) = &target.journal_state.open {
            return Err(PatchError::OpenTransaction {
                pid: identity.pid,
                patch_id: open.patch_id.clone(),
            });
        }
        let txn = target.journal_state.next_txn;
        target.journal.append(&Record::Begin {
            txn,
            kind,
            patch_id: label.to_string(),
            pid: identity.pid,
            start_time: identity.start_time,
            unix_ms: now_ms(),
            boot_ns: Some(crate::journal::boot_ns()),
        })?;
        target.journal.append(&Record::Writes {
            txn,
            writes: writes.clone(),
            patch_id: patch_id.map(str::to_string),
        })?;
        // Keep the in-memory replay in step with the file.
        target.journal_state.next_txn = txn + 1;
        Ok(PlainWrites { txn, kind, writes })
    }

    /// The transaction took full effect.
    pub fn commit(self, target: &mut TargetState, pause_us: u64) -> Result<(), PatchError> {
        target.journal.append(&Record::Commit {
            txn: self.txn,
            pause_us,
            boot_ns: Some(crate::journal::boot_ns()),
        })?;
        target.journal_state = crate::journal::Journal::replay(&target.dir)?;
        Ok(())
    }

    /// The target is as before the transaction.
    pub fn abort(self, target: &mut TargetState, reason: &str) -> Result<(), PatchError> {
        target.journal.append(&Record::Abort {
            txn: self.txn,
            reason: reason.to_string(),
        })?;
        target.journal_state = crate::journal::Journal::replay(&target.dir)?;
        Ok(())
    }
}

/// Announce `writes`, switch them all in one stop (each live range must
/// hold its `original` bytes), and commit; on failure nothing is switched
/// and the transaction is aborted.
pub fn write_in_one_stop(
    attached: &mut Attached,
    target: &mut TargetState,
    kind: TxnKind,
    label: &str,
    writes: Vec<Write5>,
    patch_id: Option<&str>,
    max_attempts: u32,
) -> Result<Activation, PatchError> {
    let identity = attached.identity().clone();
    let transaction = PlainWrites::begin(target, &identity, kind, label, writes, patch_id)?;
    match switch(
        attached,
        &transaction.writes,
        Direction::Forward,
        max_attempts,
        "writes-",
        &mut |_| Ok(()),
    ) {
        Ok(activation) => {
            transaction.commit(target, activation.pause.pause_us)?;
            Ok(activation)
        }
        Err(error) => {
            transaction.abort(target, &error.to_string())?;
            Err(error)
        }
    }
}
