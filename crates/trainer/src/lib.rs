//! The risk model's trainer: the corpus the model learns from (patch
//! variants of a fixture service, labelled by running them patched on live
//! copies of it) and the training, selection, calibration and evaluation
//! that turn its analysed samples into a model file. The shipped
//! `shadowpatch` only loads and scores model files (`shadowpatch_predict::model`);
//! this crate and its `shadowpatch-train` binary are never linked into it.
//!
//! Dependency direction: trainer → predict (the engine analyses each
//! variant) → simulate; nothing in predict imports the corpus.

#![forbid(unsafe_code)]

pub mod corpus;
pub mod programs;
pub mod training;
