//! The progress bar: the user's steps and their rate on a terminal, nothing otherwise.
//!
//! The bar counts steps as `--steps` does (the pipeline maps Heun's and PNDM's extra model
//! evaluations to steps), and shows the rate as tqdm does, so it reads like diffusers' bar:
//! `3.52it/s` at one step a second or faster, `1.84s/it` below.

use indicatif::{ProgressBar, ProgressState, ProgressStyle};
use ltd_pipeline::Progress;

/// A rate as tqdm shows it: iterations per second with two decimals from 1 it/s up, seconds
/// per iteration below; `?it/s` before there is a rate.
pub fn format_rate(per_sec: f64) -> String {
    if !per_sec.is_finite() || per_sec <= 0.0 {
        "?it/s".to_string()
    } else if per_sec >= 1.0 {
        format!("{per_sec:.2}it/s")
    } else {
        format!("{:.2}s/it", 1.0 / per_sec)
    }
}

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
                    "{prefix} [{bar:30}] {pos}/{len} steps, {rate} ({elapsed} < {eta})",
                )
                .unwrap_or_else(|_| ProgressStyle::default_bar())
                .with_key("rate", |s: &ProgressState, w: &mut dyn std::fmt::Write| {
                    let _ = w.write_str(&format_rate(s.per_sec()));
                })
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

/// The rate of `steps` done in `secs`, for the summary line.
pub fn rate_of(steps: usize, secs: f64) -> String {
    format_rate(if secs > 0.0 { steps as f64 / secs } else { f64::NAN })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn rates_read_as_tqdm_writes_them() {
        for (per_sec, want) in [
            (1876.8905, "1876.89it/s"),
            (3.5234, "3.52it/s"),
            (1.0, "1.00it/s"),
            (0.0545, "18.35s/it"),
            (1.0 / 1.84, "1.84s/it"),
            (0.0, "?it/s"),
            (f64::NAN, "?it/s"),
            (f64::INFINITY, "?it/s"),
        ] {
            assert_eq!(format_rate(per_sec), want, "{per_sec}");
        }
        assert_eq!(rate_of(4, 2.0), "2.00it/s");
        assert_eq!(rate_of(4, 0.0), "?it/s");
    }
}
