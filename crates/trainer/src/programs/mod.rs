//! The real-program corpus (issue 12, item 6): patches of functions of
//! Debian programs as installed (servers, and libraries through a small
//! driver), built from their own Debian source with `shadowpatch build
//! --debian`, labelled by applying each to a live instance under a fixed
//! set of requests, and analysed by the engine on another live instance
//! under the same requests. The programs and their requests are in
//! `crates/trainer/programs/programs.toml`; the labelled samples are
//! committed as `crates/trainer/programs/samples.jsonl` (features
//! included, so the evaluation runs without the programs).
//!
//! Labels: `crash` (killed by a signal), `exit` (exited), `hang` (a
//! request got no answer in time), `leak` (resident memory grew well
//! beyond the unpatched program's growth on the same requests) are harm;
//! `wrong` (replies differ from the unpatched program's) is a change of
//! behaviour; `ok` is the same behaviour.

pub mod generate;
pub mod mutate;
pub mod workload;

use serde::{Deserialize, Serialize};
use std::path::Path;

/// The spec file compiled into the trainer.
pub const EMBEDDED_PROGRAMS: &str = include_str!("../../programs/programs.toml");
/// The driver's source (built with gcc by the generator).
pub const DRIVER_SOURCE: &str = include_str!("../../programs/driver.c");
/// The labelled samples of the real programs (committed).
pub const EMBEDDED_SAMPLES: &str = include_str!("../../programs/samples.jsonl");

/// `programs.toml`.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Spec {
    pub program: Vec<Program>,
}

/// One program of the corpus.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Program {
    pub name: String,
    /// The installed file patched: the program, or the library the driver maps.
    pub target: String,
    /// The command that starts one instance in the foreground.
    pub start: Vec<String>,
    #[serde(default)]
    pub config: Option<ConfigFile>,
    pub functions: Vec<FunctionRef>,
    pub requests: Vec<String>,
    #[serde(default)]
    pub half_close: bool,
    /// Each request is one UDP datagram and its reply one datagram (DNS).
    #[serde(default)]
    pub udp: bool,
    #[serde(default)]
    pub mask: Vec<String>,
}

/// A file written into the instance's folder before it starts.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ConfigFile {
    pub path: String,
    pub text: String,
}

/// A function, by its source file in the package's tree.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct FunctionRef {
    pub file: String,
    pub name: String,
}

impl Program {
    /// Whether the patched module is a library the driver maps.
    pub fn uses_driver(&self) -> bool {
        self.start.iter().any(|a| a == "{driver}")
    }
}

/// Errors of the real-program corpus.
#[derive(Debug, thiserror::Error)]
pub enum ProgramsError {
    #[error("{path}: {message}")]
    Spec { path: String, message: String },
    #[error("{program}: {message}")]
    Program { program: String, message: String },
    #[error("{path}: {source}")]
    Io { path: String, source: std::io::Error },
}

impl ProgramsError {
    /// A bad programs file, or a program of it that cannot be fetched,
    /// built or started: input the user can fix (exit 2).
    pub fn is_bad_input(&self) -> bool {
        matches!(self, ProgramsError::Spec { .. } | ProgramsError::Program { .. })
    }
}

/// Parse a spec; `origin` names it in errors.
pub fn parse_spec(text: &str, origin: &str) -> Result<Spec, ProgramsError> {
    let spec: Spec = toml::from_str(text).map_err(|e| ProgramsError::Spec {
        path: origin.to_string(),
        message: e
            .to_string()
            .lines()
            .next()
            .unwrap_or("not a programs file")
            .to_string(),
    })?;
    for program in &spec.program {
        let bad = |message: String| ProgramsError::Spec {
            path: origin.to_string(),
            message: format!("program {}: {message}", program.name),
        };
        if program.functions.is_empty() || program.requests.is_empty() {
            return Err(bad("needs at least one function and one request".into()));
        }
        let in_config = program.config.as_ref().is_some_and(|c| c.text.contains("{port}"));
        if !in_config && !program.start.iter().any(|a| a.contains("{port}")) {
            return Err(bad("its start command or config must take {port}".into()));
        }
        for pattern in &program.mask {
            regex::Regex::new(pattern).map_err(|e| bad(format!("mask {pattern:?}: {e}")))?;
        }
    }
    Ok(spec)
}

/// Read a spec file.
pub fn read_spec(path: &Path) -> Result<Spec, ProgramsError> {
    let text = std::fs::read_to_string(path).map_err(|source| ProgramsError::Io {
        path: path.display().to_string(),
        source,
    })?;
    parse_spec(&text, &path.display().to_string())
}

/// One line of `samples.jsonl`: a variant, how it was built, its label,
/// the shipped engine's verdict on it, and its analysed sample.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct ProgramRecord {
    pub id: String,
    pub program: String,
    pub function: String,
    pub template: mutate::Template,
    pub intent: mutate::Intent,
    /// blake3 of the diff.
    pub diff_hash: String,
    /// `ok`, `wrong`, `crash`, `exit`, `hang`, `leak`; `build-refused`
    /// and `not-applied` have no label.
    pub outcome: String,
    /// Why, in one line.
    pub reason: String,
    /// What `build` reported: functions changed, new, included for inlining.
    #[serde(default)]
    pub build: serde_json::Value,
    /// The verdict and risk of the engine that analysed it (the model embedded then).
    #[serde(default)]
    pub verdict: Option<String>,
    #[serde(default)]
    pub risk: Option<f64>,
    #[serde(default)]
    pub sample: Option<crate::corpus::dataset::Sample>,
    #[serde(default)]
    pub timings_s: std::collections::BTreeMap<String, f64>,
}

impl ProgramRecord {
    /// Harm (refuse), change of behaviour or same behaviour (`None`: no label).
    pub fn harm(&self) -> Option<bool> {
        match self.outcome.as_str() {
            "crash" | "exit" | "hang" | "leak" => Some(true),
            "ok" | "wrong" => Some(false),
            _ => None,
        }
    }
}

/// The analysed samples of the labelled records, `harmful` meaning harm
/// (a change of behaviour is not).
pub fn harm_samples(records: &[ProgramRecord]) -> Vec<crate::corpus::dataset::Sample> {
    records
        .iter()
        .filter_map(|r| {
            let mut sample = r.sample.clone()?;
            sample.harmful = r.harm()?;
            Some(sample)
        })
        .collect()
}

/// Parse `samples.jsonl` text.
pub fn parse_records(text: &str, origin: &str) -> Result<Vec<ProgramRecord>, ProgramsError> {
    text.lines()
        .enumerate()
        .filter(|(_, line)| !line.trim().is_empty())
        .map(|(n, line)| {
            serde_json::from_str(line).map_err(|e| ProgramsError::Spec {
                path: origin.to_string(),
                message: format!("line {}: {e}", n + 1),
            })
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_committed_spec_parses() {
        let spec = parse_spec(EMBEDDED_PROGRAMS, "programs.toml").unwrap();
        assert!(spec.program.len() >= 5);
        let names: Vec<&str> = spec.program.iter().map(|p| p.name.as_str()).collect();
        assert!(names.contains(&"memcached") && names.contains(&"lighttpd"), "{names:?}");
        // A library is named by its real file (the name its link
        // writes), not by its soname link: `build` keeps only the
        // objects of the link that wrote the target's name.
        let libevent = spec.program.iter().find(|p| p.name == "libevent").unwrap();
        assert!(
            libevent.uses_driver() && libevent.target.ends_with(".so.7.0.1"),
            "{libevent:?}"
        );
    }

    #[test]
    fn a_bad_spec_is_one_line_naming_the_file() {
        let error = parse_spec("[[program]]\nname = 1\n", "x.toml").unwrap_err();
        assert!(error.is_bad_input());
        let text = error.to_string();
        assert!(text.starts_with("x.toml: ") && !text.contains('\n'), "{text}");
        let no_port = "[[program]]\nname = \"p\"\ntarget = \"/bin/true\"\nstart = [\"/bin/true\"]\nfunctions = [{ file = \"a.c\", name = \"f\" }]\nrequests = [\"x\"]\n";
        let error = parse_spec(no_port, "y.toml").unwrap_err().to_string();
        assert!(error.contains("program p") && error.contains("{port}"), "{error}");
    }

    #[test]
    fn committed_samples_parse() {
        parse_records(EMBEDDED_SAMPLES, "samples.jsonl").unwrap();
    }

    /// On the committed samples, a model that never saw the program, with
    /// the findings that block, refuses the patches made to crash or hang
    /// in the function itself (on every call, and on every third: the
    /// simulation's repeats) in every program but one (memcached's delete
    /// handler, inlined into a dispatcher that consumes its input: its
    /// third run is never reached), refuses no patch that keeps behaviour
    /// and no change, and the samples rank harm above the rest (pooled
    /// AUC). A flipped comparison whose harm comes a loop turn later
    /// (libevent keeps a connection the client asked to close) is not
    /// asked here (PREDICTION.md).
    #[test]
    fn leave_one_program_out_refuses_every_crash_and_hang_made_in_the_function() {
        let records = parse_records(EMBEDDED_SAMPLES, "samples.jsonl").unwrap();
        let samples = harm_samples(&records);
        let lopo =
            crate::training::lopo::leave_one_program_out(&samples, &[], &crate::training::TrainOptions::default())
                .unwrap();
        assert!(lopo.rows.len() >= 5);
        assert!(samples.iter().filter(|s| s.kind == "crash-sometimes").count() >= 12);
        let mut missed_made = Vec::new();
        for row in &lopo.rows {
            assert!(row.samples >= 20 && row.harm >= 10 && row.same >= 5, "{row:?}");
            for missed in &row.model.missed {
                if [":crash-always ", ":crash-sometimes ", ":hang-always "]
                    .iter()
                    .any(|made| missed.contains(made))
                {
                    missed_made.push(missed.clone());
                }
            }
            // By the whole verdict rule, no hang made in the function is let through.
            assert!(
                !row.verdict.missed.iter().any(|m| m.contains(":hang-always ")),
                "{row:#?}"
            );
            // No patch that keeps behaviour is refused, by either rule
            // (memcached's -O1 dispatcher was, before stripped targets'
            // reached functions were bound; lighttpd's ETag leak was
            // labelled ok before its requests reached new files).
            assert!(row.model.refused_same == 0 && row.verdict.refused_same == 0, "{row:#?}");
            // No change of behaviour is refused: it warns.
            assert_eq!(row.verdict.refused_change, 0, "{row:#?}");
        }
        // At most one: memcached's delete handler's crash on every third
        // delete (see above).
        assert!(missed_made.len() <= 1, "{missed_made:?}");
        assert!(lopo.pooled_auc.unwrap() >= 0.95, "{lopo:#?}");
    }
}
