//! The progress bar: steps and steps/s on a terminal, nothing otherwise.

use indicatif::{ProgressBar, ProgressStyle};
use ltd_pipeline::Progress;

/// Renders the pipeline's step callbacks.
pub struct Bar {
    bar: Option<ProgressBar>,
}

impl Bar {
    /// A bar when `visible`, else a no-op.
    pub fn new(visible: bool) -> Self {
        Self { bar: visible.then(ProgressBar::hidden) }
    }

    /// Called by the pipeline after each model evaluation.
    pub fn update(&mut self, p: Progress<'_>) {
        let Some(bar) = &self.bar else { return };
        if bar.is_hidden() {
            let fresh = ProgressBar::new(p.total as u64);
            fresh.set_style(
                ProgressStyle::with_template(
                    "{prefix} [{bar:30}] {pos}/{len} steps, {per_sec} ({elapsed} < {eta})",
                )
                .unwrap_or_else(|_| ProgressStyle::default_bar())
                .progress_chars("=> "),
            );
            fresh.set_prefix("denoising");
            self.bar = Some(fresh);
        }
        if let Some(bar) = &self.bar {
            bar.set_length(p.total as u64);
            bar.set_position(p.step as u64);
        }
    }

    /// Clears the bar.
    pub fn finish(&mut self) {
        if let Some(bar) = self.bar.take() {
            bar.finish_and_clear();
        }
    }
}
