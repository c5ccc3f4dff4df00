//! Rendering a trainer's progress events (a bar on a terminal, plain lines otherwise) and how
//! its run ended, for `train-vae` and `train-unet`.

use std::io::IsTerminal;
use std::path::Path;
use std::time::Instant;

use anyhow::{Context, Result};
use indicatif::{ProgressBar, ProgressStyle};
use ltd_train::progress::{Event, Sink};
use ltd_train::train_unet::UnetOutcome;
use ltd_train::train_vae::VaeOutcome;

/// Renders training events: a bar with loss and ETA on a terminal, plain lines otherwise.
pub struct Reporter {
    bar: Option<ProgressBar>,
    tty: bool,
    started: Instant,
}

impl Reporter {
    /// A reporter for stderr.
    pub fn new() -> Self {
        Self { bar: None, tty: std::io::stderr().is_terminal(), started: Instant::now() }
    }

    fn say(&self, line: &str) {
        match &self.bar {
            Some(bar) => bar.println(line),
            None => eprintln!("{line}"),
        }
    }

    /// Handles one event.
    pub fn event(&mut self, e: Event) {
        match e {
            Event::Phase(p) | Event::Note(p) => self.say(&p),
            Event::Started { total, done } => {
                self.started = Instant::now();
                if self.tty {
                    let bar = ProgressBar::new(total as u64);
                    bar.set_style(
                        ProgressStyle::with_template(
                            "[{bar:30}] {pos}/{len} loss {msg} ({elapsed} < {eta})",
                        )
                        .unwrap_or_else(|_| ProgressStyle::default_bar())
                        .progress_chars("=> "),
                    );
                    bar.set_position(done as u64);
                    bar.reset_eta();
                    self.bar = Some(bar);
                } else {
                    eprintln!("training: {done}/{total} steps done");
                }
            }
            Event::Step { step, smoothed, .. } => {
                if let Some(bar) = &self.bar {
                    bar.set_position(step as u64);
                    bar.set_message(format!("{smoothed:.5}"));
                }
            }
            Event::Checkpoint { step, path } => {
                let line = format!(
                    "step {step}: checkpoint {} ({:.0}s)",
                    path.display(),
                    self.started.elapsed().as_secs_f64()
                );
                self.say(&line);
            }
            Event::Stopped { step } => self.say(&format!("stopped after step {step}")),
        }
    }

    /// Clears the bar.
    pub fn finish(&mut self) {
        if let Some(bar) = self.bar.take() {
            bar.finish_and_clear();
        }
    }
}

/// What both trainers' outcomes tell about how a run ended.
pub trait Ended {
    /// The run stopped early on purpose (`--stop-after`); nothing was exported.
    fn stopped(&self) -> bool;
    /// Steps done in total.
    fn steps_done(&self) -> usize;
    /// Mean loss of the last steps.
    fn final_loss(&self) -> Option<f32>;
}

impl Ended for VaeOutcome {
    fn stopped(&self) -> bool {
        self.stopped
    }
    fn steps_done(&self) -> usize {
        self.steps_done
    }
    fn final_loss(&self) -> Option<f32> {
        self.final_loss
    }
}

impl Ended for UnetOutcome {
    fn stopped(&self) -> bool {
        self.stopped
    }
    fn steps_done(&self) -> usize {
        self.steps_done
    }
    fn final_loss(&self) -> Option<f32> {
        self.final_loss
    }
}

/// Runs a trainer under the progress reporter and says how it ended; `None` when it stopped
/// early on purpose (then there is nothing more to report).
pub fn drive<O: Ended>(
    what: &str,
    out: &Path,
    train: impl FnOnce(Sink) -> ltd_train::Result<O>,
) -> Result<Option<O>> {
    let start = Instant::now();
    let mut reporter = Reporter::new();
    let outcome = train(&mut |e| reporter.event(e));
    reporter.finish();
    let outcome = outcome.with_context(|| format!("training {what} into {}", out.display()))?;
    let secs = start.elapsed().as_secs_f64();
    if outcome.stopped() {
        eprintln!(
            "stopped after step {} in {secs:.0}s; continue with --resume",
            outcome.steps_done()
        );
        return Ok(None);
    }
    eprintln!(
        "trained {} steps in {secs:.0}s; final loss {:.5}",
        outcome.steps_done(),
        outcome.final_loss().unwrap_or(f32::NAN)
    );
    Ok(Some(outcome))
}
