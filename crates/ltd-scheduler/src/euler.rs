//! Euler's method on the probability-flow ODE (Karras et al. 2022, algorithm 2 with γ = 0), as
//! diffusers' `EulerDiscreteScheduler`.
//!
//! | code          | paper |
//! |---------------|-------|
//! | `sigma`       | σᵢ, k-diffusion noise level: x = x₀ + σ ε |
//! | `x0`          | D_θ(x; σ), the denoised estimate |
//! | `derivative`  | dx/dσ = (x − D_θ)/σ (eq. 3) |
//! | `dt`          | σᵢ₊₁ − σᵢ |
//!
//! Schedule: inference timesteps by `timestep_spacing`, σ interpolated in the training sigmas
//! (`linear`) or spread log-linearly (`log_linear`); optionally re-spread à la Karras (eq. 5,
//! ρ = 7) with timesteps mapped back through log σ; a final σ of 0 or σ_min.
//!
//! Step:
//! 1. x₀ from the model output (ε: x − σ ε; v: Karras table 1 c_out/c_skip; or x₀ itself).
//! 2. d = (x − x₀)/σ.
//! 3. x ← x + d (σᵢ₊₁ − σᵢ).
//!
//! The model input is x/√(σ²+1) (the VP-scaled sample). Stochastic churn (`s_churn`) is a call
//! argument in diffusers that pipelines never pass; it is not offered.

use candle_core::Tensor;
use ltd_nn::{ConfigError, Result};

use crate::config::{PredictionType, SchedulerConfig, TimestepType, Unimplemented};
use crate::ops::{div, scale};
use crate::prediction::k_x0;
use crate::schedule::{fix_terminal_alpha, BetaConfig, DEFAULT_BETAS};
use crate::sigma_schedule::KSchedule;
use crate::{check_steps, NoiseLevels, Scheduler, StepInput};

/// diffusers' `EulerDiscreteScheduler`.
#[derive(Debug, Clone)]
pub struct EulerDiscreteScheduler {
    prediction: PredictionType,
    schedule: KSchedule,
    /// `timestep_type` `continuous` (with v-prediction): the model sees 0.25 ln σ.
    continuous_timesteps: bool,
}

impl EulerDiscreteScheduler {
    /// Reads the fields `EulerDiscreteScheduler.__init__` takes, with its defaults.
    pub fn from_config(cfg: &SchedulerConfig) -> std::result::Result<Self, ConfigError> {
        cfg.reject_unimplemented(Unimplemented::K_SIGMAS)?;
        let betas = BetaConfig::read(cfg, &DEFAULT_BETAS)?;
        let mut alphas_cumprod = betas.alphas_cumprod();
        fix_terminal_alpha(&mut alphas_cumprod, betas.rescale_betas_zero_snr);
        // diffusers also accepts the legacy spelling "original_sample".
        let prediction = match cfg.prediction_type.as_deref() {
            Some("original_sample") => PredictionType::Sample,
            _ => cfg.prediction_type()?,
        };
        let continuous_timesteps = cfg.timestep_type()? == TimestepType::Continuous
            && prediction == PredictionType::VPrediction;
        let mut this = Self {
            prediction,
            schedule: KSchedule {
                interpolation: cfg.interpolation_type()?,
                karras: cfg.use_karras_sigmas.unwrap_or(false),
                sigma_min: cfg.sigma_min,
                sigma_max: cfg.sigma_max,
                final_sigmas: cfg.final_sigmas_type()?,
                ..KSchedule::read(cfg, alphas_cumprod)?
            }
            .with_training_schedule(),
            continuous_timesteps,
        };
        this.use_continuous_timesteps();
        Ok(this)
    }

    /// With continuous timesteps, the model's timestep is 0.25 ln σ.
    fn use_continuous_timesteps(&mut self) {
        if self.continuous_timesteps {
            let sigmas = &self.schedule.sigmas;
            self.schedule.timesteps =
                sigmas[..sigmas.len() - 1].iter().map(|s| f64::from(0.25 * s.ln())).collect();
        }
    }
}

impl Scheduler for EulerDiscreteScheduler {
    fn class_name(&self) -> &'static str {
        "EulerDiscreteScheduler"
    }

    fn set_timesteps(&mut self, n: usize) -> Result<()> {
        check_steps(n, usize::MAX)?;
        self.schedule.set_timesteps(n);
        self.use_continuous_timesteps();
        Ok(())
    }

    fn step_f32(&mut self, input: StepInput<'_>) -> Result<Tensor> {
        let StepInput { model_output: out, timestep, sample: x, .. } = input;
        let (i, sigma) = self.schedule.begin_step(timestep)?;
        // 1.
        let x0 = k_x0(self.prediction, &out, &x, sigma)?;
        // 2.
        let derivative = div(&(&x - x0)?, sigma)?;
        // 3.
        let dt = self.schedule.sigmas[i + 1] - sigma;
        let prev = (x + scale(&derivative, dt)?)?;
        self.schedule.index.advance();
        Ok(prev)
    }

    fn noise_levels(&self) -> NoiseLevels<'_> {
        self.schedule.noise_levels(self.prediction)
    }
}
