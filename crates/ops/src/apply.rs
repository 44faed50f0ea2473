//! `apply`, whole: the analysis gate (refusing what the prediction engine
//! refuses unless `force`), the mirrored variables read just before
//! activation, one survey of the parsed manifest flowing into the
//! transaction, the optional watch window, and the history event that
//! records who asked, whether `force` overrode a refusal, and the outcome.
//! The CLI and the agent run exactly this.

use crate::analysis::{
    analysis_event, analyze_surveyed_unrecorded, refusal, AnalysisReport, AnalysisSettings, ProgressSink,
};
use crate::fleet::FleetContext;
use crate::health_watch::{apply_and_watch, WatchArgs, WatchReport};
use crate::variables::{after_apply, before_apply};
use crate::OpsError;
use shadowpatch_failure::{Classify, FailureClass};
use shadowpatch_health::Decision;
use shadowpatch_patch::survey::{originals_of, prepare_survey, survey_input_of, Survey};
use shadowpatch_patch::{ApplyOptions, ApplyOutcome, PatchInput};
use shadowpatch_predict::remote::OutcomeKind;
use shadowpatch_predict::Verdict;
use shadowpatch_process::ProcessIdentity;
use shadowpatch_signing::SignatureCheck;
use shadowpatch_store::{record_all_best_effort, EventKind, NewEvent};
use std::path::{Path, PathBuf};

/// One apply to make.
#[derive(Debug, Clone, serde::Serialize, serde::Deserialize)]
pub struct ApplyRequest {
    pub pid: i32,
    /// The manifest, absolute (the agent's working directory is not the
    /// requester's).
    pub manifest: PathBuf,
    /// Stops to try while a thread sits in an entry being rewritten.
    pub attempts: u32,
    /// Apply even if the analysis refuses; recorded in the history.
    pub force: bool,
    pub analysis: AnalysisSettings,
    /// Who asked (`cli`, or `agent` with the peer's uid), for the history.
    pub requested_by: String,
    /// A target not mirrored yet is mirrored for the patched module only
    /// (host-wide sets: see `ApplyOptions::baseline_module_only`).
    #[serde(default)]
    pub baseline_module_only: bool,
    /// Set only by a set operation, never taken from the wire: from one
    /// process table and one listing of `targets/`, read before any member
    /// was worked on, no ancestor of the target had state, so there is
    /// nothing to adopt (an ancestor patched later, within the set, was
    /// patched after the target forked) and the walk up its ancestors,
    /// two reads of /proc per level, is skipped.
    #[serde(skip)]
    pub no_ancestor_state: bool,
}

/// The patch is live (or was, until the watch window rolled it back).
#[derive(Debug, Clone, serde::Serialize, serde::Deserialize)]
pub struct Applied {
    #[serde(flatten)]
    pub apply: ApplyOutcome,
    pub analysis: AnalysisReport,
    /// `force` overrode a refusal of the analysis.
    pub forced: bool,
    /// Said to the user, never refusals (e.g. a module-name hint that
    /// names another file than the one with the build-id).
    pub warnings: Vec<String>,
    /// Mirrored variables kept for `rollback --restore-state`.
    pub state_snapshot: Vec<String>,
    /// What the trust policy made of the patch's signature.
    pub signature: SignatureCheck,
    /// The watch window's verdict, when the apply was watched.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub watch: Option<WatchReport>,
    /// The target, forked from a patched process, adopted its state first.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub adopted: Option<crate::adopt::Adopted>,
}

impl Applied {
    /// The watch window rolled the patch back.
    pub fn rolled_back_by_watch(&self) -> bool {
        self.watch.as_ref().is_some_and(|w| w.decision == Decision::Rollback)
    }
}

/// The analysis refused the patch and `force` was not given: nothing was
/// written to the target.
#[derive(Debug, Clone, serde::Serialize, serde::Deserialize)]
pub struct Refused {
    pub message: String,
    /// Bad input (a blocking finding apply itself would class so) or
    /// refused for safety.
    pub class: FailureClass,
    pub analysis: AnalysisReport,
}

/// How an apply ended, short of an error.
#[derive(Debug, Clone, serde::Serialize, serde::Deserialize)]
#[serde(tag = "result", rename_all = "snake_case")]
pub enum ApplyResult {
    Applied(Box<Applied>),
    Refused(Box<Refused>),
}

/// Run the whole apply. `watch`: watch the patched process (the target
/// stays seized by this thread for the window); `progress`: where a
/// simulation reports its progress.
pub fn apply(
    state_dir: &Path,
    request: &ApplyRequest,
    watch: Option<&WatchArgs>,
    progress: Option<ProgressSink>,
) -> Result<ApplyResult, OpsError> {
    let pid = request.pid;
    // The target first (the first argument): a wrong pid is named as such.
    // Read once here and passed down to what only needs to know who it is
    // (the transaction checks it again under the lock, before any write).
    // Probed: the survey, analysis and transaction check it again about
    // ten times, each then two system calls (`Probe`).
    let identity = ProcessIdentity::of_probed(pid)?;
    // Read once, bounded: the bytes the signature policy checks are the
    // bytes parsed, surveyed and loaded. The policy decides before the
    // analysis, whose simulation would put breakpoints into the target.
    let (input, signature) = crate::signature::read_and_check(state_dir, &request.manifest)?;
    // A child forked from a patched process is patched already: it takes
    // its ancestor's state first, so the new patch stacks on it.
    let adopted = if request.no_ancestor_state {
        None
    } else {
        crate::adopt::adopt_if_forked_of(state_dir, &identity)?
    };
    // Surveyed once: the analysis judges this survey and the transaction
    // acts on it (surveyed again under the lock only if a patch came or
    // went meanwhile).
    let survey = survey_once(state_dir, &identity, &input)?;
    // Its history event is recorded with the apply's, in one transaction.
    let analysis = analyze_surveyed_unrecorded(state_dir, &survey, &request.analysis, progress)?;
    let analysis_event = analysis_event(&analysis, "apply");
    // What recording the analysis did first, best effort as it was: the
    // folder is a state directory from here on, whatever the apply's
    // outcome (the transaction names the folder if it cannot be one).
    if let Err(error) = shadowpatch_mirror::StateDir::create(state_dir) {
        tracing::warn!("could not make {} a state directory: {error}", state_dir.display());
    }
    let refused = analysis.analysis.verdict == Verdict::Refuse;
    let fleet = FleetContext::of(&request.analysis, &analysis);
    if refused && !request.force {
        let (message, class) = refusal(&analysis.analysis);
        if let Some(context) = &fleet {
            crate::fleet::report(state_dir, context, OutcomeKind::Refused, Some(message.clone()));
        }
        record(
            state_dir,
            analysis_event,
            request,
            &analysis,
            &signature,
            false,
            &Err(Failure {
                class,
                message: message.clone(),
            }),
        );
        return Ok(ApplyResult::Refused(Box::new(Refused {
            message,
            class,
            analysis,
        })));
    }
    let forced = refused && request.force;
    let options = ApplyOptions {
        max_attempts: request.attempts,
        baseline_module_only: request.baseline_module_only,
        ..ApplyOptions::default()
    };
    // The mirrored variables as they are just before activation, kept for
    // `rollback --restore-state` once the patch is active.
    let before = before_apply(state_dir, &identity)?;
    // The watch's verdict goes to the predictor that judged the patch.
    let watch = watch.map(|args| WatchArgs {
        fleet: fleet.clone(),
        ..args.clone()
    });
    let watch = watch.as_ref();
    let result = prepare_survey(survey).map_err(OpsError::from).and_then(|prepared| {
        let warnings = prepared.warnings.clone();
        let (outcome, report) = match watch {
            Some(args) => {
                let (outcome, report) = apply_and_watch(state_dir, pid, prepared, &options, args)?;
                (outcome, Some(report))
            }
            None => (shadowpatch_patch::apply_prepared(state_dir, prepared, &options)?, None),
        };
        Ok((outcome, report, warnings))
    });
    let recorded = result
        .as_ref()
        .map(|(outcome, _, warnings)| (outcome, warnings.as_slice()));
    let failure = match &recorded {
        Ok(_) => None,
        Err(error) => Some(Failure {
            class: error.class(),
            message: error.to_string(),
        }),
    };
    record(
        state_dir,
        analysis_event,
        request,
        &analysis,
        &signature,
        forced,
        &match (&recorded, failure) {
            (Ok(done), _) => Ok(*done),
            (Err(_), Some(failure)) => Err(failure),
            (Err(_), None) => unreachable!("a failure was made for each error"),
        },
    );
    let (outcome, watch, warnings) = result?;
    if let (Some(context), None) = (&fleet, &watch) {
        // A watched apply reports its window's verdict instead (`run_window`).
        crate::fleet::remember(state_dir, pid, analysis.start_time, context);
        let cause = forced.then(|| "applied with --force over the analysis's refusal".to_string());
        crate::fleet::report(state_dir, context, OutcomeKind::Applied, cause);
    }
    let kept = watch.as_ref().is_none_or(|w| w.decision == Decision::Keep);
    let state_snapshot = match before {
        Some(taken) if kept => after_apply(state_dir, pid, &outcome.patch_id, taken)?,
        _ => Vec::new(),
    };
    Ok(ApplyResult::Applied(Box::new(Applied {
        apply: outcome,
        analysis,
        forced,
        warnings,
        state_snapshot,
        signature,
        watch,
        adopted,
    })))
}

/// Survey the patch read once against the live target, as the journal
/// says its active patches rewrote it (read without the lock: the
/// transaction surveys again if a patch came or went since).
fn survey_once(state_dir: &Path, identity: &ProcessIdentity, input: &PatchInput) -> Result<Survey, OpsError> {
    let originals = crate::journal_if_any(state_dir, identity)?
        .map(|journal| originals_of(&journal))
        .unwrap_or_default();
    Ok(survey_input_of(identity, input, &originals)?)
}

/// An apply that did not happen, as the history records it.
struct Failure {
    class: FailureClass,
    message: String,
}

fn class_name(class: FailureClass) -> &'static str {
    match class {
        FailureClass::BadInput => "bad_input",
        FailureClass::RefusedForSafety => "refused",
        FailureClass::FailedMidway => "failed",
    }
}

/// The apply event: who asked, whether `force` overrode a refusal, the
/// analysis verdict, and the outcome. Best effort (a history that cannot
/// be written never fails the apply).
fn record(
    state_dir: &Path,
    analysis_event: NewEvent,
    request: &ApplyRequest,
    analysis: &AnalysisReport,
    signature: &SignatureCheck,
    forced: bool,
    result: &Result<(&ApplyOutcome, &[String]), Failure>,
) {
    let event = NewEvent::new(EventKind::Apply)
        .target(analysis.pid, analysis.start_time)
        .patch(analysis.patch_id.as_str())
        .cause(request.requested_by.clone());
    let common = serde_json::json!({
        "manifest": request.manifest,
        "force": request.force,
        "forced": forced,
        "requested_by": request.requested_by,
        "verdict": crate::analysis::verdict_name(analysis.analysis.verdict),
        "risk": analysis.analysis.risk,
        "signature": signature,
        "signer_key_id": signature.key_id(),
    });
    let (event, mut details) = match result {
        Ok((outcome, warnings)) => (
            event.outcome("ok").duration_us(outcome.pause_us),
            serde_json::json!({
                "summary": format!(
                    "{} function(s), generation {}{}",
                    outcome.functions.len(),
                    outcome.generation,
                    if forced { ", forced over the analysis's refusal" } else { "" }
                ),
                "functions": outcome.functions.iter().map(|f| &f.symbol).collect::<Vec<_>>(),
                "generation": outcome.generation,
                "pause_us": outcome.pause_us,
                "load_pause_us": outcome.load_pause_us,
                "total_us": outcome.total_us,
                "threads": outcome.activation.pause.threads,
                "warnings": warnings,
            }),
        ),
        Err(failure) => (
            event.outcome(class_name(failure.class)),
            serde_json::json!({ "summary": failure.message }),
        ),
    };
    if let (Some(details), serde_json::Value::Object(common)) = (details.as_object_mut(), common) {
        details.extend(common);
    }
    record_all_best_effort(state_dir, &[&analysis_event, &event.details(details)]);
}
