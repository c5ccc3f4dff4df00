//! Progress reporting: the training loops describe what happens as [`Event`]s and the caller
//! renders them (a progress bar on a terminal, nothing in tests).

use std::path::PathBuf;

/// Something a training run reports.
#[derive(Debug, Clone, PartialEq)]
pub enum Event {
    /// A phase that takes a while without steps (decoding images, caching latents).
    Phase(String),
    /// The loop starts: `total` steps, of which `done` were already taken (resume).
    Started {
        /// Total steps of the run.
        total: usize,
        /// Steps already done before this process started.
        done: usize,
    },
    /// A step finished.
    Step {
        /// 1-based step number.
        step: usize,
        /// Its loss.
        loss: f32,
        /// Mean loss of the last steps, for display.
        smoothed: f32,
        /// The learning rate it used.
        lr: f64,
    },
    /// A checkpoint was written.
    Checkpoint {
        /// After this step.
        step: usize,
        /// Its folder.
        path: PathBuf,
    },
    /// The run stopped before its last step because it was asked to (see
    /// [`crate::RunControl::stop_after`]).
    Stopped {
        /// The last step taken.
        step: usize,
    },
    /// A message worth showing (resumed from …, scaling factor …).
    Note(String),
}

/// Where events go.
pub type Sink<'a> = &'a mut dyn FnMut(Event);

/// A sink that drops everything.
pub fn ignore(_: Event) {}
