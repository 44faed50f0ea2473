//! Comparing the target's memory map with the mirror at the start of each
//! pass: mirrored regions unmapped or with other permissions, and
//! executable memory that no generation holds.

use super::{now_ms, Watcher};
use crate::event::WatchEvent;
use crate::WatchError;
use shadowpatch_process::{Mapping, MappingKind};
use shadowpatch_symbols::modules_of;

impl Watcher {
    /// Compare the memory map with the mirror: mirrored regions unmapped or
    /// with other permissions, executable memory no generation holds.
    pub(super) fn check_mappings(&mut self, maps: &[Mapping]) -> Result<(), WatchError> {
        let mut events = Vec::new();
        let may_wait = self.may_wait();
        for region in &mut self.generation.regions {
            if region.gone {
                continue;
            }
            let (start, end) = (region.spec.start, region.spec.end);
            let overlapping: Vec<&Mapping> = maps.iter().filter(|m| m.start < end && start < m.end).collect();
            let covered = covered(&overlapping, start, end);
            let explained = self.authority.explains_mapping(start, end).is_some() || may_wait;
            if !covered {
                if explained {
                    continue;
                }
                region.gone = true;
                events.push(WatchEvent::RegionUnmapped {
                    unix_ms: now_ms(),
                    start,
                    end,
                    module: region.spec.module.clone(),
                });
                continue;
            }
            let live: Vec<String> = overlapping.iter().map(|m| m.perms()).collect();
            match live.iter().find(|p| **p != region.spec.perms) {
                Some(changed) if !explained => {
                    if region.perms_reported.as_deref() != Some(changed.as_str()) {
                        region.perms_reported = Some(changed.clone());
                        events.push(WatchEvent::PermissionsChanged {
                            unix_ms: now_ms(),
                            start,
                            end,
                            module: region.spec.module.clone(),
                            mirrored: region.spec.perms.clone(),
                            live: changed.clone(),
                        });
                    }
                }
                Some(_) => {}
                None => region.perms_reported = None,
            }
        }
        let mut new_code = false;
        for mapping in maps.iter().filter(|m| m.executable) {
            if matches!(&mapping.kind, MappingKind::Special(name) if name == "[vsyscall]") {
                continue;
            }
            let mirrored = self
                .generation
                .regions
                .iter()
                .any(|r| !r.gone && r.spec.start < mapping.end && mapping.start < r.spec.end);
            if mirrored || may_wait || self.authority.explains_mapping(mapping.start, mapping.end).is_some() {
                continue;
            }
            let key = (mapping.start, mapping.end, mapping.perms());
            if self.reported_mappings.insert(key) {
                new_code = true;
                events.push(WatchEvent::NewExecutableMapping {
                    unix_ms: now_ms(),
                    start: mapping.start,
                    end: mapping.end,
                    perms: mapping.perms(),
                    name: mapping.display_name(),
                });
            }
        }
        if new_code {
            if let Ok(modules) = modules_of(self.identity.pid, maps) {
                self.modules = modules;
            }
        }
        for event in events {
            self.emit(event);
        }
        Ok(())
    }
}

/// Whether `mappings` cover `[start, end)` without a hole.
fn covered(mappings: &[&Mapping], start: u64, end: u64) -> bool {
    let mut at = start;
    let mut sorted: Vec<&&Mapping> = mappings.iter().collect();
    sorted.sort_by_key(|m| m.start);
    for mapping in sorted {
        if mapping.start > at {
            return false;
        }
        at = at.max(mapping.end);
        if at >= end {
            return true;
        }
    }
    at >= end
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn coverage_needs_every_byte() {
        let mapping = |start, end| Mapping {
            start,
            end,
            readable: true,
            writable: false,
            executable: true,
            shared: false,
            offset: 0,
            inode: 0,
            kind: MappingKind::Anonymous,
        };
        let (a, b) = (mapping(0x1000, 0x2000), mapping(0x2000, 0x3000));
        assert!(covered(&[&a, &b], 0x1000, 0x3000));
        assert!(!covered(&[&a], 0x1000, 0x3000));
        let c = mapping(0x2800, 0x3000);
        assert!(!covered(&[&a, &c], 0x1000, 0x3000));
    }
}
