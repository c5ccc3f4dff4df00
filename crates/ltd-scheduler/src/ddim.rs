//! DDIM (Song, Meng & Ermon 2021, "Denoising Diffusion Implicit Models"), as diffusers'
//! `DDIMScheduler`.
//!
//! | code            | paper |
//! |-----------------|-------|
//! | `alpha_prod_t`  | αₜ (ᾱₜ in DDPM notation) |
//! | `alpha_prev`    | αₜ₋₁, at the previous inference timestep (or 1 / ᾱ₀ after the last) |
//! | `eps`           | ε_θ(xₜ, t) |
//! | `x0`            | f_θ(xₜ, t), the predicted x₀ (eq. 12, first term) |
//! | `std_dev`       | σₜ(η) (eq. 16) |
//!
//! Step:
//! 1. t_prev = t − T / n (integer division, whatever the spacing, as diffusers).
//! 2. Predict x₀ and ε from the model output (eq. 12; v-prediction per Salimans & Ho).
//! 3. Clip or dynamically threshold x₀.
//! 4. σₜ = η √((1 − αₜ₋₁)/(1 − αₜ)) √(1 − αₜ/αₜ₋₁) (eq. 16).
//! 5. xₜ₋₁ = √αₜ₋₁ x₀ + √(1 − αₜ₋₁ − σₜ²) ε (+ σₜ z when η > 0) (eq. 12).

use candle_core::Tensor;
use ltd_nn::{ConfigError, Result};

use crate::config::{PredictionType, SchedulerConfig, TimestepSpacing};
use crate::ops::{div, lincomb, scale, train_index};
use crate::schedule::{discrete_timesteps, BetaConfig, DEFAULT_BETAS};
use crate::threshold::SampleClamp;
use crate::{check_steps, not_ready, NoiseLevels, Scheduler, StepInput};

/// diffusers' `DDIMScheduler`.
#[derive(Debug, Clone)]
pub struct DDIMScheduler {
    alphas_cumprod: Vec<f32>,
    final_alpha_cumprod: f32,
    prediction: PredictionType,
    clamp: SampleClamp,
    spacing: TimestepSpacing,
    steps_offset: i64,
    eta: f64,
    num_inference_steps: Option<usize>,
    timesteps: Vec<f64>,
}

impl DDIMScheduler {
    /// Reads the fields `DDIMScheduler.__init__` takes, with its defaults; `eta` is the
    /// pipeline's η.
    pub fn from_config(cfg: &SchedulerConfig, eta: f64) -> std::result::Result<Self, ConfigError> {
        let betas = BetaConfig::read(cfg, &DEFAULT_BETAS)?;
        let alphas_cumprod = betas.alphas_cumprod();
        let final_alpha_cumprod =
            if cfg.set_alpha_to_one.unwrap_or(true) { 1.0 } else { alphas_cumprod[0] };
        let num_train = alphas_cumprod.len();
        Ok(Self {
            final_alpha_cumprod,
            prediction: cfg.prediction_type()?,
            clamp: SampleClamp::read(cfg, Some(true))?,
            spacing: cfg.timestep_spacing(TimestepSpacing::Leading)?,
            steps_offset: cfg.steps_offset.unwrap_or(0),
            eta,
            num_inference_steps: None,
            timesteps: (0..num_train).rev().map(|t| t as f64).collect(),
            alphas_cumprod,
        })
    }

    fn alpha_at(&self, t: i64) -> f32 {
        if t >= 0 {
            self.alphas_cumprod[t as usize]
        } else {
            self.final_alpha_cumprod
        }
    }
}

impl Scheduler for DDIMScheduler {
    fn class_name(&self) -> &'static str {
        "DDIMScheduler"
    }

    fn set_timesteps(&mut self, n: usize) -> Result<()> {
        let num_train = self.alphas_cumprod.len();
        check_steps(n, num_train)?;
        self.num_inference_steps = Some(n);
        self.timesteps = discrete_timesteps(self.spacing, num_train, n, self.steps_offset);
        Ok(())
    }

    fn step_f32(&mut self, input: StepInput<'_>) -> Result<Tensor> {
        let StepInput { model_output: out, timestep, sample: x, mut noise } = input;
        let n = self.num_inference_steps.ok_or_else(|| not_ready(self.class_name()))?;
        let num_train = self.alphas_cumprod.len();
        let t = train_index(timestep, num_train)?;

        // 1.
        let prev_t = t as i64 - (num_train / n) as i64;
        let alpha_prod_t = self.alphas_cumprod[t];
        let alpha_prev = self.alpha_at(prev_t);
        let beta_prod_t = 1.0 - alpha_prod_t;
        let (sqrt_a, sqrt_b) = (alpha_prod_t.sqrt(), beta_prod_t.sqrt());

        // 2.
        let (x0, eps) = match self.prediction {
            PredictionType::Epsilon => (div(&(&x - scale(&out, sqrt_b)?)?, sqrt_a)?, out),
            PredictionType::Sample => {
                let eps = div(&(&x - scale(&out, sqrt_a)?)?, sqrt_b)?;
                (out, eps)
            }
            PredictionType::VPrediction => (
                lincomb(&[(sqrt_a, &x), (-sqrt_b, &out)])?,
                lincomb(&[(sqrt_a, &out), (sqrt_b, &x)])?,
            ),
        };

        // 3.
        let x0 = self.clamp.apply(&x0)?;

        // 4.
        let variance = ((1.0 - alpha_prev) / beta_prod_t) * (1.0 - alpha_prod_t / alpha_prev);
        let std_dev = self.eta as f32 * variance.sqrt();

        // 5.
        let direction = scale(&eps, (1.0 - alpha_prev - std_dev * std_dev).sqrt())?;
        let mut prev = (scale(&x0, alpha_prev.sqrt())? + direction)?;
        if self.eta > 0.0 {
            let z = noise.like_model_output()?;
            prev = (prev + scale(&z, std_dev)?)?;
        }
        Ok(prev)
    }

    fn noise_levels(&self) -> NoiseLevels<'_> {
        NoiseLevels::alphas_cumprod(self.prediction, &self.alphas_cumprod, &self.timesteps)
    }
}
