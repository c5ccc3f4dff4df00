//! Euler ancestral sampling (k-diffusion's `sample_euler_ancestral`, Karras et al. 2022 §3 with
//! DDPM-style ancestral noise), as diffusers' `EulerAncestralDiscreteScheduler`.
//!
//! | code         | meaning |
//! |--------------|---------|
//! | `sigma`      | σᵢ (x = x₀ + σ ε) |
//! | `sigma_up`   | σ_up = √(σᵢ₊₁² (σᵢ² − σᵢ₊₁²) / σᵢ²), the fresh noise added |
//! | `sigma_down` | σ_down = √(σᵢ₊₁² − σ_up²), where the deterministic step lands |
//!
//! Step:
//! 1. x₀ from the model output (ε or v; diffusers has no `sample` prediction here).
//! 2. d = (x − x₀)/σ; x ← x + d (σ_down − σ).
//! 3. Draw z (on every step, the last included) and add σ_up z.

use candle_core::Tensor;
use ltd_nn::{ConfigError, Result};

use crate::config::{PredictionType, SchedulerConfig};
use crate::ops::{div, scale};
use crate::prediction::k_x0;
use crate::schedule::{fix_terminal_alpha, BetaConfig, DEFAULT_BETAS};
use crate::sigma_schedule::KSchedule;
use crate::{check_steps, NoiseLevels, Scheduler, StepInput};

/// diffusers' `EulerAncestralDiscreteScheduler`.
#[derive(Debug, Clone)]
pub struct EulerAncestralDiscreteScheduler {
    prediction: PredictionType,
    schedule: KSchedule,
}

impl EulerAncestralDiscreteScheduler {
    /// Reads the fields `EulerAncestralDiscreteScheduler.__init__` takes, with its defaults.
    pub fn from_config(cfg: &SchedulerConfig) -> std::result::Result<Self, ConfigError> {
        let betas = BetaConfig::read(cfg, &DEFAULT_BETAS)?;
        let mut alphas_cumprod = betas.alphas_cumprod();
        fix_terminal_alpha(&mut alphas_cumprod, betas.rescale_betas_zero_snr);
        let prediction = cfg
            .prediction_type_except_sample("not implemented by EulerAncestralDiscreteScheduler")?;
        let schedule = KSchedule::read(cfg, alphas_cumprod)?.with_training_schedule();
        Ok(Self { prediction, schedule })
    }
}

impl Scheduler for EulerAncestralDiscreteScheduler {
    fn class_name(&self) -> &'static str {
        "EulerAncestralDiscreteScheduler"
    }

    fn set_timesteps(&mut self, n: usize) -> Result<()> {
        check_steps(n, usize::MAX)?;
        self.schedule.set_timesteps(n);
        Ok(())
    }

    fn step_f32(&mut self, input: StepInput<'_>) -> Result<Tensor> {
        let StepInput { model_output: out, timestep, sample: x, mut noise } = input;
        let (i, sigma) = self.schedule.begin_step(timestep)?;
        // 1.
        let x0 = k_x0(self.prediction, &out, &x, sigma)?;
        let (from, to) = (sigma, self.schedule.sigmas[i + 1]);
        let sigma_up = (to * to * (from * from - to * to) / (from * from)).sqrt();
        let sigma_down = (to * to - sigma_up * sigma_up).sqrt();
        // 2.
        let derivative = div(&(&x - x0)?, sigma)?;
        let prev = (x + scale(&derivative, sigma_down - sigma)?)?;
        // 3.
        let z = noise.like_model_output()?;
        let prev = (prev + scale(&z, sigma_up)?)?;
        self.schedule.index.advance();
        Ok(prev)
    }

    fn noise_levels(&self) -> NoiseLevels<'_> {
        self.schedule.noise_levels(self.prediction)
    }
}
