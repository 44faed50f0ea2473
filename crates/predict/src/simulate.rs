//! The simulation as a part of the analysis engine: a [`Section`] that runs
//! [`simulate`] (the `shadowpatch-simulate` crate, re-exported here whole so
//! `shadowpatch_predict::simulate::...` names it) on the request's target and
//! hands its findings and `sim_*` features to the verdict and the risk model.

use crate::engine::{Contribution, Section, SectionInput};
use crate::PredictError;
pub use shadowpatch_simulate::*;

/// Simulation with fixed options (what to capture or call, budgets), plus
/// the calls the manifest's `expect` entries give.
pub struct SimulationSection {
    options: SimulationOptions,
    progress: Option<Box<dyn FnMut(Progress)>>,
}

impl std::fmt::Debug for SimulationSection {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("SimulationSection")
            .field("options", &self.options)
            .finish()
    }
}

impl SimulationSection {
    pub fn new(options: SimulationOptions) -> SimulationSection {
        SimulationSection {
            options,
            progress: None,
        }
    }

    /// Report capture and simulation progress (e.g. to a progress bar).
    pub fn with_progress(mut self, progress: Box<dyn FnMut(Progress)>) -> SimulationSection {
        self.progress = Some(progress);
        self
    }
}

impl Section for SimulationSection {
    fn name(&self) -> &'static str {
        "simulation"
    }

    fn run(&mut self, input: &SectionInput) -> Result<Contribution, PredictError> {
        let mut ignore = |_: Progress| {};
        let progress: &mut dyn FnMut(Progress) = match &mut self.progress {
            Some(progress) => progress.as_mut(),
            None => &mut ignore,
        };
        // The manifest's expected results run as explicit calls.
        let mut options = self.options.clone();
        options.calls.extend(crate::intent::expectation_calls(input.survey));
        let report = simulate(input.state_dir, input.survey, &options, progress)
            .map_err(|error| PredictError::Simulation(Box::new(error)))?;
        let mut findings = report.findings;
        crate::intent::review(input.survey, &report.calls, &mut findings);
        Ok(Contribution {
            findings,
            features: report.features,
            unavailable: report.unavailable,
        })
    }
}

impl From<SimulateError> for PredictError {
    fn from(error: SimulateError) -> Self {
        PredictError::Simulation(Box::new(error))
    }
}
