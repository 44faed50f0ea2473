//! Judging the differences a slice found: each differing run is either
//! explained by an authorised change (`authority.rs`), or an alert. New
//! alerts are reported (once per live bytes), and healed when asked.

use super::{gone, now_ms, DifferingUnit, Item, Watcher, SHOWN_BYTES};
use crate::event::{Alert, Heal, Scope, WatchEvent};
use crate::heal::{HealRequest, HealRun, HealSkipped};
use crate::WatchError;
use shadowpatch_mirror::differing_runs;

impl Watcher {
    /// Judge each differing run of `units` (authorised change, or an
    /// alert), report new alerts, heal them if asked. Returns true when the
    /// generation was switched instead (the pass restarts).
    pub(super) fn judge_and_report(&mut self, item: Item, units: Vec<DifferingUnit>) -> Result<bool, WatchError> {
        // Everything that could explain these bytes was journaled before
        // they were written: look again now.
        self.authority.refresh(self.options.grace)?;
        if self.maybe_switch()? {
            return Ok(true);
        }
        let may_wait = self.may_wait();
        let now = self.now_ns();
        let mut alerts = Vec::new();
        let mut to_heal = Vec::new();
        for unit in units {
            let mut reportable: Vec<(u64, Vec<u8>, Vec<u8>)> = Vec::new();
            let mut deferred = false;
            for (start, end) in differing_runs(&unit.expected, &unit.live) {
                let address = unit.address + start as u64;
                let live = &unit.live[start..end];
                if self.authority.explains_bytes(address, live).is_some()
                    || self.authority.in_flux(address, address + live.len() as u64)
                    || may_wait
                {
                    deferred = true;
                    continue;
                }
                reportable.push((address, unit.expected[start..end].to_vec(), live.to_vec()));
            }
            let (alerted, last_clean, scope, variable) = match item {
                Item::Region(index) => {
                    let region = &mut self.generation.regions[index];
                    let scope = match region.spec.kind {
                        shadowpatch_mirror::RegionKind::Code => Scope::Code,
                        shadowpatch_mirror::RegionKind::ReadOnlyData => Scope::ReadOnlyData,
                    };
                    (&mut region.alerted, region.last_clean[unit.unit as usize], scope, None)
                }
                Item::Variable(index) => {
                    let watched = &mut self.variables[index];
                    (
                        &mut watched.alerted,
                        watched.last_clean[unit.unit as usize],
                        Scope::GuardedVariable,
                        Some(watched.variable.name.clone()),
                    )
                }
            };
            if reportable.is_empty() {
                if !deferred {
                    alerted.remove(&unit.unit);
                }
                continue;
            }
            let before = alerted.remove(&unit.unit).unwrap_or_default();
            let current: Vec<(u64, Vec<u8>)> = reportable.iter().map(|(a, _, l)| (*a, l.clone())).collect();
            for (address, expected, live) in &reportable {
                if before.iter().any(|(a, l)| a == address && l == live) {
                    continue;
                }
                alerts.push((
                    *address,
                    expected.clone(),
                    live.clone(),
                    scope,
                    variable.clone(),
                    now - last_clean.min(now),
                ));
            }
            alerted.insert(unit.unit, current);
            if self.options.heal {
                for (address, expected, live) in reportable {
                    if !self.heal_failed.contains(&(address, live.clone())) {
                        to_heal.push(HealRun {
                            address,
                            live,
                            expected,
                        });
                    }
                }
            }
        }
        for (address, expected, live, scope, variable, latency_ns) in alerts {
            self.counters.alerts += 1;
            let alert = Alert {
                unix_ms: now_ms(),
                pid: self.identity.pid,
                start_time: self.identity.start_time,
                generation: self.generation.number,
                scope,
                address,
                address_hex: format!("{address:#x}"),
                len: live.len() as u64,
                location: self.locate(address),
                variable,
                expected: shadowpatch_symbols::hex(&expected[..expected.len().min(SHOWN_BYTES)]),
                live: shadowpatch_symbols::hex(&live[..live.len().min(SHOWN_BYTES)]),
                latency_us: latency_ns / 1000,
            };
            self.emit(WatchEvent::Alert(alert));
        }
        if !to_heal.is_empty() {
            self.heal(&item, to_heal)?;
        }
        Ok(false)
    }

    /// Write mirrored bytes back over the tampered runs, in one journaled stop.
    fn heal(&mut self, item: &Item, runs: Vec<HealRun>) -> Result<(), WatchError> {
        let journal_len = self.authority.journal_len();
        let healer = self.healer.clone().ok_or(WatchError::NoHealer)?;
        let outcome = healer.heal(HealRequest {
            state_dir: &self.state_dir,
            identity: &self.identity,
            runs: &runs,
            journal_len,
            attempts: self.options.heal_attempts,
        });
        let bytes = runs.iter().map(|r| r.expected.len() as u64).sum();
        let report = |ok: bool, pause_us: u64, txn: Option<u64>, error: Option<String>, generation: u32| Heal {
            unix_ms: now_ms(),
            pid: self.identity.pid,
            start_time: self.identity.start_time,
            generation,
            ok,
            runs: runs.iter().map(|r| (r.address, r.expected.len() as u64)).collect(),
            bytes,
            pause_us,
            txn,
            error,
        };
        let generation = self.generation.number;
        match outcome {
            Ok(Ok(done)) => {
                let event = report(true, done.pause_us, Some(done.txn), None, generation);
                self.counters.heals += 1;
                // Healed pages are clean again: a new tamper is a new alert.
                self.forget_alerts(item, &runs);
                self.emit(WatchEvent::Heal(event));
            }
            Ok(Err(HealSkipped::Committed { address })) => {
                // Unreachable through `authority` (which excuses committed
                // bytes), but a heal never writes over them whatever led here.
                tracing::warn!("not healing {address:#x}: its live bytes are an active patch's committed entry");
            }
            Ok(Err(HealSkipped::JournalMoved)) => {
                // Judged on a journal that has moved on: the next pass
                // judges again and, if the bytes are still unexplained,
                // heals them then (the alert stands, it is not repeated).
            }
            Err(error) => {
                if let WatchError::Target(target_error) = &error {
                    if gone(target_error) {
                        return Err(error);
                    }
                }
                for run in &runs {
                    self.heal_failed.insert((run.address, run.live.clone()));
                }
                let event = report(false, 0, None, Some(error.to_string()), generation);
                self.emit(WatchEvent::Heal(event));
            }
        }
        Ok(())
    }

    /// Forget the alerts of `runs` (healed, or to be judged again).
    fn forget_alerts(&mut self, item: &Item, runs: &[HealRun]) {
        let alerted = match item {
            Item::Region(index) => &mut self.generation.regions[*index].alerted,
            Item::Variable(index) => &mut self.variables[*index].alerted,
        };
        for runs_of_unit in alerted.values_mut() {
            runs_of_unit.retain(|(address, _)| !runs.iter().any(|r| r.address == *address));
        }
        alerted.retain(|_, runs| !runs.is_empty());
    }
}
