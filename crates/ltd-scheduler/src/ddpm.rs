//! DDPM ancestral sampling (Ho, Jain & Abbeel 2020), as diffusers' `DDPMScheduler`.
//!
//! | code             | paper |
//! |------------------|-------|
//! | `alpha_prod_t`   | ᾱₜ |
//! | `alpha_prev`     | ᾱₜ₋₁ at the previous inference timestep (1 after the last) |
//! | `current_alpha`  | αₜ = ᾱₜ / ᾱₜ₋₁ (the step's effective α) |
//! | `current_beta`   | βₜ = 1 − αₜ |
//! | `x0`             | x̂₀ predicted from the model output (eq. 15 rearranged) |
//! | `variance`       | β̃ₜ = (1 − ᾱₜ₋₁)/(1 − ᾱₜ) βₜ (eq. 7), or βₜ |
//!
//! Step:
//! 1. The previous timestep is the next entry of the schedule (−1 after the last).
//! 2. Predict x₀ from the model output; clip or threshold it.
//! 3. Posterior mean μ̃ₜ = √ᾱₜ₋₁ βₜ/(1−ᾱₜ) x₀ + √αₜ (1−ᾱₜ₋₁)/(1−ᾱₜ) xₜ (eq. 7).
//! 4. For t > 0, add √variance · z (z drawn even when the variance is tiny).
//!
//! `fixed_large_log` is rejected: diffusers 0.42.1 takes `log(beta) ** 0.5` there, which is NaN,
//! so every noised step would be NaN. The learned variances need a model with twice the
//! channels and are not supported either.

use candle_core::Tensor;
use ltd_nn::{ConfigError, Result};

use crate::config::{DdpmVarianceType, PredictionType, SchedulerConfig, TimestepSpacing};
use crate::ops::{lincomb, scale, train_index};
use crate::prediction::vp_x0;
use crate::schedule::{discrete_timesteps, BetaConfig, DEFAULT_BETAS};
use crate::threshold::SampleClamp;
use crate::{check_steps, NoiseLevels, Scheduler, StepInput};

/// diffusers' `DDPMScheduler`.
#[derive(Debug, Clone)]
pub struct DDPMScheduler {
    alphas_cumprod: Vec<f32>,
    variance_type: DdpmVarianceType,
    prediction: PredictionType,
    clamp: SampleClamp,
    spacing: TimestepSpacing,
    steps_offset: i64,
    /// Set once `set_timesteps` ran: the previous timestep then comes from the schedule.
    custom_schedule: bool,
    timesteps: Vec<f64>,
}

impl DDPMScheduler {
    /// Reads the fields `DDPMScheduler.__init__` takes, with its defaults.
    pub fn from_config(cfg: &SchedulerConfig) -> std::result::Result<Self, ConfigError> {
        let variance_type = cfg.ddpm_variance_type()?;
        let alphas_cumprod = BetaConfig::read(cfg, &DEFAULT_BETAS)?.alphas_cumprod();
        let num_train = alphas_cumprod.len();
        Ok(Self {
            variance_type,
            prediction: cfg.prediction_type()?,
            clamp: SampleClamp::read(cfg, Some(true))?,
            spacing: cfg.timestep_spacing(TimestepSpacing::Leading)?,
            steps_offset: cfg.steps_offset.unwrap_or(0),
            custom_schedule: false,
            timesteps: (0..num_train).rev().map(|t| t as f64).collect(),
            alphas_cumprod,
        })
    }

    /// diffusers' `previous_timestep`: the next schedule entry, or −1 after the last.
    fn previous_timestep(&self, t: usize) -> Result<i64> {
        if !self.custom_schedule {
            return Ok(t as i64 - 1);
        }
        let index =
            self.timesteps.iter().position(|&s| s == t as f64).ok_or_else(|| {
                ltd_nn::Error::msg(format!("timestep {t} is not in the schedule"))
            })?;
        Ok(self.timesteps.get(index + 1).map_or(-1, |&s| s as i64))
    }
}

impl Scheduler for DDPMScheduler {
    fn class_name(&self) -> &'static str {
        "DDPMScheduler"
    }

    fn set_timesteps(&mut self, n: usize) -> Result<()> {
        let num_train = self.alphas_cumprod.len();
        check_steps(n, num_train)?;
        self.custom_schedule = true;
        self.timesteps = discrete_timesteps(self.spacing, num_train, n, self.steps_offset);
        Ok(())
    }

    fn step_f32(&mut self, input: StepInput<'_>) -> Result<Tensor> {
        let StepInput { model_output: out, timestep, sample: x, mut noise } = input;
        let t = train_index(timestep, self.alphas_cumprod.len())?;

        // 1.
        let prev_t = self.previous_timestep(t)?;
        let alpha_prod_t = self.alphas_cumprod[t];
        let alpha_prev = if prev_t >= 0 { self.alphas_cumprod[prev_t as usize] } else { 1.0 };
        let beta_prod_t = 1.0 - alpha_prod_t;
        let beta_prod_prev = 1.0 - alpha_prev;
        let current_alpha = alpha_prod_t / alpha_prev;
        let current_beta = 1.0 - current_alpha;

        // 2.
        let x0 = vp_x0(self.prediction, &out, &x, alpha_prod_t.sqrt(), beta_prod_t.sqrt())?;
        let x0 = self.clamp.apply(&x0)?;

        // 3.
        let x0_coeff = (alpha_prev.sqrt() * current_beta) / beta_prod_t;
        let sample_coeff = current_alpha.sqrt() * beta_prod_prev / beta_prod_t;
        let mut prev = lincomb(&[(x0_coeff, &x0), (sample_coeff, &x)])?;

        // 4.
        if t > 0 {
            let z = noise.like_model_output()?;
            let variance = (beta_prod_prev / beta_prod_t * current_beta).max(1e-20);
            let std = match self.variance_type {
                DdpmVarianceType::FixedSmall => variance.sqrt(),
                DdpmVarianceType::FixedSmallLog => (0.5 * variance.ln()).exp(),
                DdpmVarianceType::FixedLarge => current_beta.sqrt(),
            };
            prev = (prev + scale(&z, std)?)?;
        }
        Ok(prev)
    }

    fn noise_levels(&self) -> NoiseLevels<'_> {
        NoiseLevels::alphas_cumprod(self.prediction, &self.alphas_cumprod, &self.timesteps)
    }
}
