//! The flags `train-vae` and `train-unet` share: optimisation, seed, checkpoints, resuming
//! and the device.

use ltd_nn::DeviceChoice;
use ltd_train::common::OptimOptions;
use ltd_train::optim::{AdamWConfig, LrSchedule};
use ltd_train::RunControl;

/// Optimisation flags shared by both trainers.
#[derive(Debug, Clone, clap::Args)]
pub struct OptimArgs {
    /// Examples per step.
    #[arg(long, default_value_t = 16)]
    pub batch_size: usize,
    /// Optimisation steps in total.
    #[arg(long, default_value_t = 1000)]
    pub steps: usize,
    /// Peak learning rate (after warm-up).
    #[arg(long)]
    pub learning_rate: Option<f64>,
    /// constant or cosine (to zero at the last step), after the warm-up.
    #[arg(long, default_value = "constant")]
    pub lr_schedule: LrSchedule,
    /// Linear warm-up steps.
    #[arg(long, default_value_t = 100)]
    pub warmup_steps: usize,
    /// AdamW β₁.
    #[arg(long, default_value_t = 0.9)]
    pub adam_beta1: f64,
    /// AdamW β₂.
    #[arg(long, default_value_t = 0.999)]
    pub adam_beta2: f64,
    /// AdamW ε.
    #[arg(long, default_value_t = 1e-8)]
    pub adam_epsilon: f64,
    /// AdamW decoupled weight decay.
    #[arg(long, default_value_t = 1e-2)]
    pub weight_decay: f64,
    /// Clip gradients to this global L2 norm (0: no clipping).
    #[arg(long, default_value_t = 1.0)]
    pub max_grad_norm: f64,
    /// Seed of initialisation, data order and noise.
    #[arg(long, default_value_t = 0)]
    pub seed: u64,
    /// Steps between checkpoints.
    #[arg(long, default_value_t = 500)]
    pub checkpoint_every: usize,
    /// Checkpoints to keep.
    #[arg(long, default_value_t = 2)]
    pub keep_checkpoints: usize,
    /// Continue the run in --out from its newest checkpoint (with the options it was started
    /// with): the result is the same as if it had never stopped.
    #[arg(long)]
    pub resume: bool,
    /// Stop after this many steps in total, without exporting (continue later with --resume).
    #[arg(long)]
    pub stop_after: Option<usize>,
    /// Device: auto, cpu, cuda[:N], metal[:N].
    #[arg(long, default_value = "cpu")]
    pub device: DeviceChoice,
}

impl OptimArgs {
    /// The library's options, with `default_lr` when no learning rate was given.
    pub fn options(&self, default_lr: f64) -> OptimOptions {
        OptimOptions {
            batch_size: self.batch_size,
            steps: self.steps,
            learning_rate: self.learning_rate.unwrap_or(default_lr),
            lr_schedule: self.lr_schedule,
            warmup_steps: self.warmup_steps,
            adam: AdamWConfig {
                beta1: self.adam_beta1,
                beta2: self.adam_beta2,
                eps: self.adam_epsilon,
                weight_decay: self.weight_decay,
            },
            max_grad_norm: self.max_grad_norm,
            seed: self.seed,
            checkpoint_every: self.checkpoint_every,
            keep_checkpoints: self.keep_checkpoints,
        }
    }

    /// The run control flags.
    pub fn control(&self) -> RunControl {
        RunControl { resume: self.resume, stop_after: self.stop_after }
    }
}
