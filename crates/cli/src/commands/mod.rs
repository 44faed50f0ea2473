//! The subcommands, one file each, and what they share.

pub mod analyze;
pub mod bench;
pub mod bench_dirty;
pub mod demo;
pub mod history;
pub mod lookup;
pub mod mirror;
pub mod patching;
pub mod pause;
pub mod predictor;
pub mod status;
pub mod verify;

use serde::Serialize;
use shadowpatch_symbols::Module;
use std::path::PathBuf;

/// Options every command receives.
#[derive(Debug, Clone)]
pub struct Context {
    pub state_dir: PathBuf,
    pub json: bool,
}

/// Where an address lies: module, symbol and offset.
#[derive(Debug, Clone, Serialize, PartialEq, Eq)]
pub struct Location {
    pub module: Option<String>,
    pub symbol: Option<String>,
    pub offset: Option<u64>,
}

impl Location {
    pub fn of(address: u64, modules: &[Module]) -> Location {
        let Some(module) = modules.iter().find(|m| m.contains(address)) else {
            return Location {
                module: None,
                symbol: None,
                offset: None,
            };
        };
        match module.symbolize(address) {
            Some((symbol, offset)) => Location {
                module: Some(module.name.clone()),
                symbol: Some(symbol.name.clone()),
                offset: Some(offset),
            },
            None => Location {
                module: Some(module.name.clone()),
                symbol: None,
                offset: None,
            },
        }
    }

    /// `module!symbol+0x12`, `module+0x1234` or `?`.
    pub fn display(&self, address: u64, modules: &[Module]) -> String {
        match (&self.module, &self.symbol, self.offset) {
            (Some(m), Some(s), Some(o)) => format!("{m}!{s}+{o:#x}"),
            (Some(m), _, _) => {
                let base = modules
                    .iter()
                    .find(|x| x.contains(address))
                    .map(|x| x.base)
                    .unwrap_or(0);
                format!("{m}+{:#x}", address - base)
            }
            _ => "?".to_string(),
        }
    }
}
