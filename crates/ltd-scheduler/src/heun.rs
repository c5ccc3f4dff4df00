//! Heun's second-order method on the probability-flow ODE (Karras et al. 2022, algorithm 1),
//! as diffusers' `HeunDiscreteScheduler`.
//!
//! | code              | paper |
//! |-------------------|-------|
//! | `sigma`           | σᵢ (x = x₀ + σ ε) |
//! | `prev_derivative` | dᵢ, the slope at σᵢ (line 7) |
//! | `dt`              | σᵢ₊₁ − σᵢ |
//! | second stage      | d′ᵢ at (xᵢ₊₁, σᵢ₊₁), averaged with dᵢ (lines 9–11) |
//!
//! Each step but the last takes two model evaluations, so the schedule repeats every timestep
//! after the first (σ: [σ₀, σ₁, σ₁, …, σₙ₋₁, σₙ₋₁, 0]); the last step (to σ = 0) is Euler.
//!
//! Step, first stage: x₀ = D(xᵢ; σᵢ); dᵢ = (xᵢ − x₀)/σᵢ; x̃ = xᵢ + dᵢ dt (kept: dᵢ, dt, xᵢ).
//! Step, second stage: x₀ = D(x̃; σᵢ₊₁); d′ = (x̃ − x₀)/σᵢ₊₁; xᵢ₊₁ = xᵢ + (dᵢ + d′)/2 · dt.

use candle_core::Tensor;
use ltd_nn::{ConfigError, Result};

use crate::config::{PredictionType, SchedulerConfig, Unimplemented};
use crate::ops::{div, scale};
use crate::prediction::k_x0;
use crate::schedule::{BetaConfig, BetaDefaults};
use crate::sigma_schedule::KSchedule;
use crate::threshold::SampleClamp;
use crate::{check_steps, NoiseLevels, Scheduler, StepInput};

/// Heun's class defaults: the Stable Diffusion betas, but a linear schedule.
const HEUN_BETAS: BetaDefaults = BetaDefaults {
    beta_start: 0.00085,
    beta_end: 0.012,
    beta_schedule: crate::config::BetaSchedule::Linear,
    reads_zero_snr: false,
};

/// The first stage's state, kept for the second.
#[derive(Debug, Clone)]
struct FirstStage {
    derivative: Tensor,
    dt: f32,
    sample: Tensor,
}

/// diffusers' `HeunDiscreteScheduler`.
#[derive(Debug, Clone)]
pub struct HeunDiscreteScheduler {
    prediction: PredictionType,
    clip: SampleClamp,
    schedule: KSchedule,
    first: Option<FirstStage>,
}

impl HeunDiscreteScheduler {
    /// Reads the fields `HeunDiscreteScheduler.__init__` takes, with its defaults.
    pub fn from_config(cfg: &SchedulerConfig) -> std::result::Result<Self, ConfigError> {
        cfg.reject_unimplemented(Unimplemented::K_SIGMAS)?;
        let alphas_cumprod = BetaConfig::read(cfg, &HEUN_BETAS)?.alphas_cumprod();
        let clip = if cfg.clip_sample.unwrap_or(false) {
            SampleClamp::Clip { range: cfg.clip_sample_range.unwrap_or(1.0) }
        } else {
            SampleClamp::None
        };
        let num_train = alphas_cumprod.len();
        let mut this = Self {
            prediction: cfg.prediction_type()?,
            clip,
            schedule: KSchedule {
                karras: cfg.use_karras_sigmas.unwrap_or(false),
                ..KSchedule::read(cfg, alphas_cumprod)?
            },
            first: None,
        };
        // diffusers' __init__ runs set_timesteps(num_train_timesteps).
        this.make_schedule(num_train);
        Ok(this)
    }

    /// The k-diffusion schedule with every sigma and timestep after the first repeated, for
    /// the second stage (the final sigma once).
    fn make_schedule(&mut self, n: usize) {
        let s = &mut self.schedule;
        s.set_timesteps(n);
        let k = s.sigmas.len();
        s.sigmas = std::iter::once(s.sigmas[0])
            .chain(s.sigmas[1..k - 1].iter().flat_map(|&v| [v, v]))
            .chain([s.sigmas[k - 1]])
            .collect();
        s.timesteps = std::iter::once(s.timesteps[0])
            .chain(s.timesteps[1..].iter().flat_map(|&t| [t, t]))
            .collect();
        self.first = None;
    }
}

impl Scheduler for HeunDiscreteScheduler {
    fn class_name(&self) -> &'static str {
        "HeunDiscreteScheduler"
    }

    fn set_timesteps(&mut self, n: usize) -> Result<()> {
        check_steps(n, usize::MAX)?;
        self.make_schedule(n);
        Ok(())
    }

    fn step_f32(&mut self, input: StepInput<'_>) -> Result<Tensor> {
        let StepInput { model_output: out, timestep, sample: x, .. } = input;
        let (i, sigma) = self.schedule.begin_step(timestep)?;
        let prev = match self.first.take() {
            None => {
                let sigma_next = self.schedule.sigmas[i + 1];
                let x0 = self.clip.apply(&k_x0(self.prediction, &out, &x, sigma)?)?;
                let derivative = div(&(&x - x0)?, sigma)?;
                let dt = sigma_next - sigma;
                let prev = (&x + scale(&derivative, dt)?)?;
                self.first = Some(FirstStage { derivative, dt, sample: x });
                prev
            }
            Some(first) => {
                let sigma_next = sigma;
                let x0 = self.clip.apply(&k_x0(self.prediction, &out, &x, sigma_next)?)?;
                let derivative = div(&(&x - x0)?, sigma_next)?;
                let derivative = scale(&(first.derivative + derivative)?, 0.5)?;
                (first.sample + scale(&derivative, first.dt)?)?
            }
        };
        self.schedule.index.advance();
        Ok(prev)
    }

    fn order(&self) -> usize {
        2
    }

    fn noise_levels(&self) -> NoiseLevels<'_> {
        self.schedule.noise_levels(self.prediction)
    }
}
