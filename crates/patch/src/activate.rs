//! Switching a set of function entries in one stop of all threads: check no
//! thread's instruction pointer lies inside the bytes being rewritten (retry
//! a bounded number of times if one does), check the live bytes are exactly
//! what we expect (never overwrite someone else's change), write them all,
//! read them back, resume. All entries switch or none do.

use crate::fault;
use crate::journal::Write5;
use crate::PatchError;
use shadowpatch_process::{Attached, PauseReport, StepOut, Stopped};

/// Picks the expected or the new bytes of a write.
type BytesOf = fn(&Write5) -> &[u8];

/// Which way the writes go.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Direction {
    /// Expect `original`, write `new` (apply).
    Forward,
    /// Expect `new`, write `original` (rollback).
    Backward,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct Activation {
    pub pause: PauseReport,
    /// Stops needed until no thread was inside the rewritten bytes.
    pub attempts: u32,
}

/// Default bound on stops before giving up because a thread keeps sitting
/// inside the bytes to rewrite.
pub const DEFAULT_ATTEMPTS: u32 = 50;

/// Switch `writes` in one stop. `during` runs inside the same stop after
/// the writes (used by rollback to unmap the patch).
pub fn switch(
    attached: &mut Attached,
    writes: &[Write5],
    direction: Direction,
    max_attempts: u32,
    fault_prefix: &str,
    during: &mut dyn FnMut(&mut Stopped) -> Result<(), PatchError>,
) -> Result<Activation, PatchError> {
    // Everything that does not depend on the stopped threads is done
    // before stopping them.
    let spans = Span::cover(writes);
    let ranges: Vec<(u64, usize)> = spans.iter().map(|s| (s.start, s.len)).collect();
    // The first read in the stop also covers the code a thread inside an
    // entry may run to leave it (an instruction starting in the span runs
    // at most 15 bytes past it), on the pages already read.
    let read_ranges: Vec<(u64, usize)> = spans.iter().map(Span::with_code_after).collect();
    let entries = Entries::of(writes);
    for attempt in 1..=max_attempts.max(1) {
        let mut stopped = attached.stop()?;
        let inside = entries.threads_inside(&stopped)?;
        let (expected_of, new_of): (BytesOf, BytesOf) = match direction {
            Direction::Forward => (|w| &w.original, |w| &w.new),
            Direction::Backward => (|w| &w.new, |w| &w.original),
        };
        let mut live_spans = stopped.memory().read_many(&read_ranges)?;
        for (span, live) in spans.iter().zip(&live_spans) {
            for &index in &span.writes {
                let write = &writes[index];
                let at = (write.address - span.start) as usize;
                let live = &live[at..at + write.new.len()];
                if live != expected_of(write) {
                    return Err(PatchError::Tampered {
                        address: write.address,
                        expected: shadowpatch_symbols::hex(expected_of(write)),
                        live: shadowpatch_symbols::hex(live),
                    });
                }
            }
        }
        let moves: Vec<StepOut> = inside
            .iter()
            .map(|&(tid, regs, write)| StepOut {
                tid,
                regs,
                start: write.address + 1,
                end: write.address + write.new.len() as u64,
            })
            .collect();
        // Move them past the bytes rather than wait for the scheduler to,
        // over the code just read and checked.
        let moved = if moves.is_empty() {
            Vec::new()
        } else {
            let known: Vec<(u64, &[u8])> = spans
                .iter()
                .zip(&live_spans)
                .map(|(span, live)| (span.start, live.as_slice()))
                .collect();
            stopped.step_out_of_many_over(&moves, &known, STEP_OUT_LIMIT)?
        };
        let busy = inside
            .iter()
            .zip(&moved)
            .find(|(_, &moved)| !moved)
            .map(|(&(_, _, write), _)| write.address);
        if let Some(busy) = busy {
            drop(stopped);
            if attempt == max_attempts.max(1) {
                return Err(PatchError::Busy {
                    address: busy,
                    attempts: attempt,
                });
            }
            // Let the thread run on past the entry before trying again.
            std::thread::yield_now();
            continue;
        }
        for (live, span) in live_spans.iter_mut().zip(&spans) {
            live.truncate(span.len);
        }
        // Each span's bytes as read in this stop with the writes laid in:
        // one write per span instead of one per function.
        let (before, after): (Vec<Vec<u8>>, Vec<Vec<u8>>) = spans
            .iter()
            .zip(live_spans)
            .map(|(span, live)| {
                let mut laid = live.clone();
                for &index in &span.writes {
                    let write = &writes[index];
                    let at = (write.address - span.start) as usize;
                    laid[at..at + write.new.len()].copy_from_slice(new_of(write));
                }
                (live, laid)
            })
            .unzip();
        let undo = |stopped: &mut Stopped, done: usize| {
            for (span, bytes) in spans[..done].iter().zip(&before) {
                let _ = stopped.memory().write(span.start, bytes);
            }
        };
        for (index, (span, bytes)) in spans.iter().zip(&after).enumerate() {
            if index == 1 {
                fault::point(&format!("{fault_prefix}partial-write"));
            }
            if let Err(error) = stopped.memory().write(span.start, bytes) {
                // Undo what this stop already wrote, so none switch.
                undo(&mut stopped, index);
                return Err(error.into());
            }
        }
        let written = stopped.memory().read_many(&ranges)?;
        for ((span, live), laid) in spans.iter().zip(&written).zip(&after) {
            if live != laid {
                undo(&mut stopped, spans.len());
                let at = live.iter().zip(laid).position(|(a, b)| a != b).unwrap_or(0);
                let write = span
                    .writes
                    .iter()
                    .map(|&i| &writes[i])
                    .find(|w| w.address + w.new.len() as u64 > span.start + at as u64)
                    .unwrap_or(&writes[span.writes[0]]);
                let offset = (write.address - span.start) as usize;
                return Err(PatchError::Tampered {
                    address: write.address,
                    expected: shadowpatch_symbols::hex(new_of(write)),
                    live: shadowpatch_symbols::hex(&live[offset..offset + write.new.len()]),
                });
            }
        }
        fault::point(&format!("{fault_prefix}written"));
        during(&mut stopped)?;
        let pause = stopped.resume()?;
        return Ok(Activation {
            pause,
            attempts: attempt,
        });
    }
    unreachable!("the loop returns on its last attempt")
}

/// Instructions a thread may be single-stepped to leave the bytes to
/// rewrite (the jump covers at most five one-byte instructions). On a busy
/// target with a hot tiny function some thread is almost always inside its
/// first bytes, and waiting for the scheduler to move it may never work.
const STEP_OUT_LIMIT: u32 = 16;

/// The writes in address order, to find the one a thread's instruction
/// pointer is inside by binary search: a stop of 64 threads and 100
/// entries asks 64 times, not 6,400.
struct Entries<'w> {
    sorted: Vec<&'w Write5>,
    /// The longest write: only writes starting less than this before an
    /// address can cover it.
    longest: u64,
}

impl<'w> Entries<'w> {
    fn of(writes: &'w [Write5]) -> Self {
        let mut sorted: Vec<&Write5> = writes.iter().collect();
        sorted.sort_by_key(|w| w.address);
        let longest = writes.iter().map(|w| w.new.len() as u64).max().unwrap_or(0);
        Entries { sorted, longest }
    }

    /// The write whose bytes `rip` lies strictly inside (at the first byte
    /// is fine: the thread will execute the new instruction whole).
    fn covering(&self, rip: u64) -> Option<&'w Write5> {
        let from = self.sorted.partition_point(|w| w.address + self.longest <= rip);
        let to = self.sorted.partition_point(|w| w.address < rip);
        self.sorted[from..to.max(from)]
            .iter()
            .find(|w| rip < w.address + w.new.len() as u64)
            .copied()
    }

    /// Threads whose instruction pointer sits strictly inside bytes to
    /// rewrite, with their registers and the write concerned. Only the
    /// instruction pointer of each thread is read; all the registers only
    /// of the threads to move.
    fn threads_inside(
        &self,
        stopped: &Stopped,
    ) -> Result<Vec<(nix::unistd::Pid, libc::user_regs_struct, &'w Write5)>, PatchError> {
        let mut inside = Vec::new();
        for tid in stopped.threads() {
            if let Some(write) = self.covering(stopped.instruction_pointer(tid)?) {
                inside.push((tid, stopped.regs(tid)?, write));
            }
        }
        Ok(inside)
    }
}

/// Writes that share a page, read and written as one range: a write to
/// /proc/PID/mem costs about the same for 5 bytes as for a page (the page
/// walk and copy-on-write dominate), so a patch of 100 neighbouring
/// functions pays for a few writes, not 100. A span grows only while the
/// next write starts on the page its last byte is on, so every byte it
/// covers is on a page a write touches: mapped, and ours to rewrite (its
/// other bytes go back as they were read in the same stop).
#[derive(Debug, PartialEq, Eq)]
struct Span {
    start: u64,
    len: usize,
    /// Indices into the writes, in address order.
    writes: Vec<usize>,
}

const PAGE: u64 = 4096;
const LONGEST_INSTRUCTION: u64 = 15;

impl Span {
    /// The span and up to 15 bytes after it, not past the page its last
    /// byte is on (that page is mapped; the next may not be).
    fn with_code_after(&self) -> (u64, usize) {
        let end = self.start + self.len as u64;
        let page_end = ((end - 1) | (PAGE - 1)) + 1;
        (
            self.start,
            ((end + LONGEST_INSTRUCTION).min(page_end) - self.start) as usize,
        )
    }

    fn cover(writes: &[Write5]) -> Vec<Span> {
        let mut order: Vec<usize> = (0..writes.len()).collect();
        order.sort_by_key(|&i| writes[i].address);
        let mut spans: Vec<Span> = Vec::new();
        for index in order {
            let write = &writes[index];
            let end = write.address + write.new.len() as u64;
            match spans.last_mut() {
                Some(span)
                    if write.address >= span.start + span.len as u64
                        && write.address / PAGE == (span.start + span.len as u64 - 1) / PAGE =>
                {
                    span.len = (end - span.start) as usize;
                    span.writes.push(index);
                }
                _ => spans.push(Span {
                    start: write.address,
                    len: write.new.len(),
                    writes: vec![index],
                }),
            }
        }
        spans
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn write(address: u64) -> Write5 {
        Write5 {
            address,
            original: vec![0x90; 5],
            new: vec![0xe9, 0, 0, 0, 0],
        }
    }

    #[test]
    fn neighbours_on_a_page_share_one_write_and_pages_apart_do_not() {
        let writes = [
            write(0x1040),
            write(0x1000),
            write(0x1ffd),
            write(0x2010),
            write(0x5000),
        ];
        let spans = Span::cover(&writes);
        // 0x1000, 0x1040 and 0x1ffd start on page 0x1000; 0x1ffd's bytes
        // run onto page 0x2000, where 0x2010 starts; 0x5000 is pages away.
        assert_eq!(
            spans,
            vec![
                Span {
                    start: 0x1000,
                    len: 0x2015 - 0x1000,
                    writes: vec![1, 0, 2, 3]
                },
                Span {
                    start: 0x5000,
                    len: 5,
                    writes: vec![4]
                },
            ]
        );
    }

    #[test]
    fn an_instruction_pointer_is_inside_a_write_after_its_first_byte_only() {
        let long = Write5 {
            address: 0x3000,
            original: vec![0x90; 8],
            new: vec![0x90; 8],
        };
        let writes = [write(0x1005), write(0x1000), long, write(0x3002)];
        let entries = Entries::of(&writes);
        let covering = |rip| entries.covering(rip).map(|w| w.address);
        assert_eq!(covering(0x0fff), None);
        assert_eq!(covering(0x1000), None);
        assert_eq!(covering(0x1001), Some(0x1000));
        assert_eq!(covering(0x1004), Some(0x1000));
        assert_eq!(covering(0x1005), None);
        assert_eq!(covering(0x1009), Some(0x1005));
        assert_eq!(covering(0x100a), None);
        // A longer write still covers bytes past a shorter one inside it.
        assert_eq!(covering(0x3001), Some(0x3000));
        assert_eq!(covering(0x3007), Some(0x3000));
        assert_eq!(covering(0x3008), None);
    }

    #[test]
    fn the_first_read_covers_15_bytes_after_a_span_but_not_the_next_page() {
        let span = |start, len| Span {
            start,
            len,
            writes: vec![0],
        };
        assert_eq!(span(0x1000, 5).with_code_after(), (0x1000, 20));
        assert_eq!(span(0x1ff0, 5).with_code_after(), (0x1ff0, 16));
        // Ending on the last byte of a page: nothing after it.
        assert_eq!(span(0x1ffb, 5).with_code_after(), (0x1ffb, 5));
    }

    #[test]
    fn overlapping_writes_are_never_merged() {
        let spans = Span::cover(&[write(0x1000), write(0x1002)]);
        assert_eq!(spans.len(), 2);
    }
}
