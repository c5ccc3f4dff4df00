//! What both training loops share besides the [driver](crate::driver): the optimisation
//! options, the run folder (checkpoints, loss history, previews), starting fresh or resuming,
//! and the data order.
//!
//! A run folder `OUT/train/` holds `checkpoints/`, `loss.jsonl`, `loss.png` and
//! `samples/step-NNNNNNNN.png`; the trained model is written to `OUT/` itself.
//!
//! Resuming reproduces the uninterrupted run bit for bit: the weights, the optimiser moments,
//! the EMA weights and the generator state come from the checkpoint, the data order is a pure
//! function of the seed and the step, and the options are the checkpoint's own.

use std::path::{Path, PathBuf};

use ltd_nn::rng::TorchRngState;
use serde::{Deserialize, Serialize};

use crate::checkpoint::{Checkpoints, Loaded};
use crate::error::{Result, TrainError};
use crate::history::History;
use crate::optim::{learning_rate, AdamWConfig, LrSchedule};
use crate::progress::{Event, Sink};
use crate::rng::{derive_seed, Rng};
use crate::RunControl;

/// Optimisation options shared by both trainers (diffusers' training-script defaults where
/// they have one).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(default)]
pub struct OptimOptions {
    /// Examples per step.
    pub batch_size: usize,
    /// Optimisation steps in total.
    pub steps: usize,
    /// Peak learning rate.
    pub learning_rate: f64,
    /// Shape of the learning rate after warm-up.
    pub lr_schedule: LrSchedule,
    /// Linear warm-up steps.
    pub warmup_steps: usize,
    /// AdamW's β₁, β₂, ε and weight decay.
    pub adam: AdamWConfig,
    /// Gradients are scaled down to this global L2 norm (0 turns clipping off).
    pub max_grad_norm: f64,
    /// The seed of initialisation, data order and noise.
    pub seed: u64,
    /// Steps between checkpoints (the last step always gets one).
    pub checkpoint_every: usize,
    /// How many checkpoints to keep.
    pub keep_checkpoints: usize,
}

impl Default for OptimOptions {
    fn default() -> Self {
        Self {
            batch_size: 16,
            steps: 1000,
            learning_rate: 1e-4,
            lr_schedule: LrSchedule::Constant,
            warmup_steps: 100,
            adam: AdamWConfig::default(),
            max_grad_norm: 1.0,
            seed: 0,
            checkpoint_every: 500,
            keep_checkpoints: 2,
        }
    }
}

impl OptimOptions {
    /// Rejects values no run can use.
    pub fn check(&self) -> Result<()> {
        let positive = [
            ("batch-size", self.batch_size),
            ("steps", self.steps),
            ("checkpoint-every", self.checkpoint_every),
        ];
        for (name, v) in positive {
            if v == 0 {
                return Err(TrainError::option(name, "must be at least 1"));
            }
        }
        if !(self.learning_rate > 0.0 && self.learning_rate.is_finite()) {
            return Err(TrainError::option(
                "learning-rate",
                format!("{} is not positive", self.learning_rate),
            ));
        }
        if !(0.0..1.0).contains(&self.adam.beta1) || !(0.0..1.0).contains(&self.adam.beta2) {
            return Err(TrainError::option("adam-beta", "β₁ and β₂ must be in [0, 1)"));
        }
        if self.max_grad_norm < 0.0 {
            return Err(TrainError::option("max-grad-norm", "must not be negative"));
        }
        Ok(())
    }

    /// The learning rate of 0-based step `step`.
    pub fn lr_at(&self, step: usize) -> f64 {
        learning_rate(self.learning_rate, step, self.warmup_steps, self.steps, self.lr_schedule)
    }
}

/// What every checkpoint's `state.json` holds, with the trainer's own options `O`.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct SavedState<O> {
    /// `vae` or `unet`.
    pub kind: String,
    /// Steps done.
    pub step: usize,
    /// The options of the run (a resumed run uses these).
    pub options: O,
    /// The generator, after the last step.
    pub rng: TorchRngState,
    /// Number of examples in the dataset (a resumed run checks it).
    pub examples: usize,
    /// EMA updates so far (0 without EMA).
    #[serde(default)]
    pub ema_updates: usize,
}

/// The run folder of a training run.
#[derive(Debug)]
pub struct RunDir {
    /// `OUT/train`.
    pub dir: PathBuf,
    /// Its checkpoints.
    pub checkpoints: Checkpoints,
}

impl RunDir {
    /// The run folder under the output folder `out`.
    pub fn new(out: &Path) -> Self {
        let dir = out.join("train");
        let checkpoints = Checkpoints::new(dir.join("checkpoints"));
        Self { dir, checkpoints }
    }

    /// The loss history file.
    pub fn history_path(&self) -> PathBuf {
        self.dir.join("loss.jsonl")
    }

    /// The loss-curve image.
    pub fn plot_path(&self) -> PathBuf {
        self.dir.join("loss.png")
    }

    /// The preview image written with the checkpoint of `step`.
    pub fn sample_path(&self, step: usize) -> PathBuf {
        self.dir.join("samples").join(format!("step-{step:08}.png"))
    }

    /// Finds the checkpoint to resume from, or checks that a fresh run will not mix with an
    /// old one. `Ok(None)`: start fresh.
    pub fn start<O: serde::de::DeserializeOwned>(
        &self,
        kind: &str,
        control: &RunControl,
        examples: usize,
        sink: Sink,
    ) -> Result<Option<Loaded<SavedState<O>>>> {
        let latest = self.checkpoints.latest::<SavedState<O>>()?;
        match (control.resume, latest) {
            (true, Some(ck)) => {
                if ck.state.kind != kind {
                    return Err(TrainError::checkpoint(
                        &ck.path,
                        format!("is a {} run, not a {kind} run", ck.state.kind),
                    ));
                }
                if ck.state.examples != examples {
                    return Err(TrainError::checkpoint(
                        &ck.path,
                        format!(
                            "was trained on {} examples but the dataset now has {examples}: \
                             resuming would not continue the same run",
                            ck.state.examples
                        ),
                    ));
                }
                sink(Event::Note(format!(
                    "resuming from {} (step {}) with its saved options",
                    ck.path.display(),
                    ck.state.step
                )));
                Ok(Some(ck))
            }
            (true, None) => {
                sink(Event::Note(format!(
                    "no checkpoint in {}: starting from scratch",
                    self.checkpoints.dir().display()
                )));
                Ok(None)
            }
            (false, Some(ck)) => Err(TrainError::checkpoint(
                &ck.path,
                "an earlier run left checkpoints in this output folder: pass --resume to \
                 continue it, or choose another --out",
            )),
            (false, None) => Ok(None),
        }
    }

    /// The history: new, or cut back to `step` when resuming.
    pub fn history(&self, resumed_at: Option<usize>) -> Result<History> {
        std::fs::create_dir_all(&self.dir).map_err(|e| TrainError::io(&self.dir, e))?;
        match resumed_at {
            Some(step) => History::resume(&self.history_path(), step),
            None => History::create(&self.history_path()),
        }
    }
}

/// The example indices of 0-based `step`: consecutive slices of per-epoch shuffles of
/// `train`, each shuffle a pure function of the seed and the epoch (so a resumed run needs no
/// extra state to continue the same order).
pub fn batch_indices(train: &[usize], batch: usize, step: usize, seed: u64) -> Vec<usize> {
    let n = train.len().max(1);
    let mut out = Vec::with_capacity(batch);
    let mut cached: Option<(usize, Vec<usize>)> = None;
    for k in 0..batch {
        let pos = step * batch + k;
        let (epoch, within) = (pos / n, pos % n);
        if cached.as_ref().is_none_or(|(e, _)| *e != epoch) {
            let mut perm = train.to_vec();
            Rng::new(derive_seed(seed, 1000 + epoch as u64)).shuffle(&mut perm);
            cached = Some((epoch, perm));
        }
        if let Some((_, perm)) = &cached {
            if let Some(&i) = perm.get(within) {
                out.push(i);
            }
        }
    }
    out
}

/// Splits `n` examples into training and held-out indices: `held_out` of them (at most a
/// tenth, and none when there are fewer than 2), chosen by the seed.
pub fn split(n: usize, held_out: usize, seed: u64) -> (Vec<usize>, Vec<usize>) {
    let k = if n < 2 { 0 } else { held_out.min(n / 10).max(usize::from(held_out > 0)) };
    let mut all: Vec<usize> = (0..n).collect();
    Rng::new(derive_seed(seed, 7)).shuffle(&mut all);
    let mut eval = all.split_off(n - k);
    let mut train = all;
    train.sort_unstable();
    eval.sort_unstable();
    (train, eval)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn batches_cover_each_epoch_once() {
        let train: Vec<usize> = (10..20).collect();
        let mut seen: Vec<usize> = (0..5).flat_map(|s| batch_indices(&train, 2, s, 4)).collect();
        seen.sort_unstable();
        assert_eq!(seen, train);
        // Steps straddling an epoch boundary, and determinism.
        assert_eq!(batch_indices(&train, 3, 3, 4), batch_indices(&train, 3, 3, 4));
        assert_eq!(batch_indices(&train, 3, 3, 4).len(), 3);
        assert_ne!(batch_indices(&train, 10, 0, 4), batch_indices(&train, 10, 1, 4));
    }

    #[test]
    fn split_holds_out_a_few() {
        let (train, eval) = split(100, 8, 1);
        assert_eq!((train.len(), eval.len()), (92, 8));
        assert!(eval.iter().all(|i| !train.contains(i)));
        assert_eq!(split(1, 8, 1), (vec![0], vec![]));
        assert_eq!(split(5, 8, 1).1.len(), 1);
    }

    #[test]
    fn options_are_checked() {
        let o = OptimOptions { batch_size: 0, ..Default::default() };
        assert!(o.check().unwrap_err().to_string().starts_with("--batch-size"));
        let o = OptimOptions { learning_rate: f64::NAN, ..Default::default() };
        assert!(o.check().unwrap_err().to_string().starts_with("--learning-rate"));
        assert!(OptimOptions::default().check().is_ok());
    }
}
