//! The fleet prediction service (`shadowpatch predictor serve`, binary
//! `shadowpatch-predictor`): hosts send the evidence of their analyses and
//! the outcomes of their patches; the service answers verdicts with the
//! fleet's model and history, stores both in SQLite or PostgreSQL, and
//! retrains and promotes its model from the outcomes.
//!
//! The wire protocol is `shadowpatch_predict::remote`, shared with the
//! hosts' client. This crate links the trainer (its fitting code), so the
//! shipped `shadowpatch` never links it: the CLI execs this binary.

#![forbid(unsafe_code)]

pub mod retrain;
pub mod serve;
pub mod server;
pub mod storage;
pub mod verdict;
