//! A progress bar that appears only when work takes longer than a moment
//! and stderr is a terminal.

use indicatif::{ProgressBar, ProgressDrawTarget, ProgressStyle};
use std::time::{Duration, Instant};

/// How long work may run before a bar is drawn.
const SHOW_AFTER: Duration = Duration::from_millis(300);

#[derive(Debug)]
pub struct Progress {
    bar: ProgressBar,
    started: Instant,
    shown: bool,
    enabled: bool,
}

impl Progress {
    pub fn bytes(message: &str, enabled: bool) -> Self {
        Self::styled(
            "{msg} [{bar:30}] {bytes}/{total_bytes} {bytes_per_sec} eta {eta}",
            message,
            enabled,
        )
    }

    /// A bar counting items (variants labelled, samples analysed).
    pub fn count(message: &str, enabled: bool) -> Self {
        Self::styled("{msg} [{bar:30}] {pos}/{len} eta {eta} {prefix}", message, enabled)
    }

    fn styled(template: &str, message: &str, enabled: bool) -> Self {
        let bar = ProgressBar::with_draw_target(Some(0), ProgressDrawTarget::hidden());
        bar.set_style(
            ProgressStyle::with_template(template)
                .expect("valid template")
                .progress_chars("=> "),
        );
        bar.set_message(message.to_string());
        Progress {
            bar,
            started: Instant::now(),
            shown: false,
            enabled,
        }
    }

    /// A short note after the bar (the item just finished).
    pub fn note(&self, note: &str) {
        self.bar.set_prefix(note.to_string());
    }

    pub fn update(&mut self, done: u64, total: u64) {
        self.bar.set_length(total);
        self.bar.set_position(done);
        if self.enabled && !self.shown && self.started.elapsed() > SHOW_AFTER {
            self.shown = true;
            self.bar.set_draw_target(ProgressDrawTarget::stderr());
        }
    }

    pub fn finish(self) {
        self.bar.finish_and_clear();
    }
}
