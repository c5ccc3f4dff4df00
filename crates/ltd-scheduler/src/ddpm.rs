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
//! | `v`              | the predicted variance channels: v of Nichol & Dhariwal (2021, eq. 15) for `learned_range`, Σ itself for `learned` |
//!
//! Step:
//! 1. The previous timestep is the next entry of the schedule (−1 after the last). With a
//!    learned variance and a model output of twice the sample's channels (DeepFloyd IF),
//!    split it into the prediction and v, as diffusers' `torch.split` does.
//! 2. Predict x₀ from the model output; threshold it if `thresholding`, else clip it if
//!    `clip_sample` (thresholding wins when both are set, as in diffusers).
//! 3. Posterior mean μ̃ₜ = √ᾱₜ₋₁ βₜ/(1−ᾱₜ) x₀ + √αₜ (1−ᾱₜ₋₁)/(1−ᾱₜ) xₜ (eq. 7).
//! 4. For t > 0, draw z in the sample's shape (drawn even when the variance is tiny) and add
//!    σ · z: σ = √β̃ₜ, √βₜ, or for `learned_range`
//!    σ = exp(½ (f ln βₜ + (1 − f) ln β̃ₜ)) with f = (v + 1)/2, per element; for `learned`
//!    σ = √v (NaN where v < 0, as diffusers).
//!
//! `fixed_large_log` is rejected: diffusers 0.42.1 takes `log(beta) ** 0.5` there, which is NaN,
//! so every noised step would be NaN.

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

    /// diffusers' `torch.split` at the start of `step`: with a learned variance the model
    /// output has twice the sample's channels, the first half the prediction and the second
    /// the variance (anything else is an error here; diffusers fails later, on `None`).
    /// Otherwise the output is the prediction alone.
    fn split_variance(&self, out: Tensor, x: &Tensor) -> Result<(Tensor, Option<Tensor>)> {
        let learned = matches!(
            self.variance_type,
            DdpmVarianceType::Learned | DdpmVarianceType::LearnedRange
        );
        let channels = x.dim(1)?;
        if !learned {
            return Ok((out, None));
        }
        if out.dim(1)? != 2 * channels {
            return Err(missing_variance(self.variance_type, x));
        }
        let v = out.narrow(1, channels, channels)?;
        Ok((out.narrow(1, 0, channels)?, Some(v)))
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

/// A learned variance with a model output of the sample's own channel count: there is no
/// variance to read (diffusers fails on `None + 1` there).
fn missing_variance(variance_type: DdpmVarianceType, x: &Tensor) -> ltd_nn::Error {
    ltd_nn::Error::msg(format!(
        "DDPMScheduler with variance_type \"{}\" needs a model output with twice the sample's \
         channels ({:?}): the second half is the predicted variance",
        variance_type.as_str(),
        x.dims()
    ))
}

impl Scheduler for DDPMScheduler {
    fn class_name(&self) -> &'static str {
        "DDPMScheduler"
    }

    fn takes_learned_variance(&self) -> bool {
        matches!(self.variance_type, DdpmVarianceType::Learned | DdpmVarianceType::LearnedRange)
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
        let (out, predicted_variance) = self.split_variance(out, &x)?;
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
            let z = noise.like_model_output_shaped(out.dims())?;
            let variance = (beta_prod_prev / beta_prod_t * current_beta).max(1e-20);
            let std = match (self.variance_type, predicted_variance) {
                (DdpmVarianceType::FixedSmall, _) => variance.sqrt(),
                (DdpmVarianceType::FixedSmallLog, _) => (0.5 * variance.ln()).exp(),
                (DdpmVarianceType::FixedLarge, _) => current_beta.sqrt(),
                (DdpmVarianceType::LearnedRange, Some(v)) => {
                    // diffusers' `_get_variance`: frac·max_log + (1 − frac)·min_log, then
                    // exp(0.5·variance) times the noise, elementwise in float32.
                    let (min_log, max_log) = (variance.ln(), current_beta.ln());
                    let frac = v.affine(1.0, 1.0)?.affine(0.5, 0.0)?;
                    let log_var =
                        lincomb(&[(max_log, &frac), (min_log, &frac.affine(-1.0, 1.0)?)])?;
                    let std = scale(&log_var, 0.5)?.exp()?;
                    return Ok((prev + (std * z)?)?);
                }
                (DdpmVarianceType::Learned, Some(v)) => return Ok((prev + (v.sqrt()? * z)?)?),
                (DdpmVarianceType::Learned | DdpmVarianceType::LearnedRange, None) => {
                    return Err(missing_variance(self.variance_type, &x));
                }
            };
            prev = (prev + scale(&z, std)?)?;
        }
        Ok(prev)
    }

    fn noise_levels(&self) -> NoiseLevels<'_> {
        NoiseLevels::alphas_cumprod(self.prediction, &self.alphas_cumprod, &self.timesteps)
    }
}
