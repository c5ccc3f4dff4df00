//! The training side: the forward process q(xₜ | x₀) = N(√ᾱₜ x₀, (1 − ᾱₜ) I) (Ho et al. 2020,
//! eq. 4) with per-sample integer timesteps, the v target, SNR for min-SNR weighting, and the
//! conversions between ε, v and x₀ predictions.
//!
//! It reads a scheduler config the way diffusers' training scripts do
//! (`DDPMScheduler.from_pretrained(model, subfolder="scheduler")`): DDPM's fields and defaults,
//! so `rescale_betas_zero_snr` and `prediction_type` are honoured.

use candle_core::{Device, Tensor};
use ltd_nn::{ConfigError, Error, Result};

use crate::config::{PredictionType, SchedulerConfig};
use crate::prediction::{vp_output_from_x0, vp_x0};
use crate::schedule::{BetaConfig, DEFAULT_BETAS};

/// ᾱ over the training timesteps, and the forward-process helpers built on it.
#[derive(Debug, Clone)]
pub struct NoiseSchedule {
    betas: Vec<f32>,
    alphas_cumprod: Vec<f32>,
    prediction: PredictionType,
}

impl NoiseSchedule {
    /// Reads the config as diffusers' `DDPMScheduler` does (its fields and defaults).
    pub fn from_config(cfg: &SchedulerConfig) -> std::result::Result<Self, ConfigError> {
        let betas = BetaConfig::read(cfg, &DEFAULT_BETAS)?.betas();
        let alphas_cumprod = crate::schedule::alphas_cumprod(&betas);
        Ok(Self { betas, alphas_cumprod, prediction: cfg.prediction_type()? })
    }

    /// Number of training timesteps T.
    pub fn num_train_timesteps(&self) -> usize {
        self.alphas_cumprod.len()
    }

    /// βₜ (float32, as diffusers).
    pub fn betas(&self) -> &[f32] {
        &self.betas
    }

    /// ᾱₜ (float32, as diffusers).
    pub fn alphas_cumprod(&self) -> &[f32] {
        &self.alphas_cumprod
    }

    /// What the model is trained to predict (the config's `prediction_type`).
    pub fn prediction_type(&self) -> PredictionType {
        self.prediction
    }

    /// (√ᾱₜ, √(1−ᾱₜ)) at a training timestep.
    pub fn coefficients(&self, t: usize) -> Result<(f32, f32)> {
        let a = *self.alphas_cumprod.get(t).ok_or_else(|| {
            Error::msg(format!("timestep {t} is out of range 0..{}", self.alphas_cumprod.len()))
        })?;
        Ok((a.sqrt(), (1.0 - a).sqrt()))
    }

    /// The signal-to-noise ratio ᾱₜ/(1−ᾱₜ), as diffusers' `compute_snr` (for min-SNR-γ
    /// weighting, Hang et al. 2023).
    pub fn snr(&self, t: usize) -> Result<f64> {
        let (alpha, sigma) = self.coefficients(t)?;
        let r = alpha / sigma;
        Ok(f64::from(r * r))
    }

    /// Per-sample coefficients as `[B, 1, …, 1]` tensors broadcastable against `like`.
    fn per_sample(&self, timesteps: &[usize], like: &Tensor) -> Result<(Tensor, Tensor)> {
        let batch = like.dims().first().copied().unwrap_or(0);
        if timesteps.len() != batch {
            return Err(Error::msg(format!(
                "{} timesteps for a batch of {batch}",
                timesteps.len()
            )));
        }
        let mut shape = vec![1usize; like.rank()];
        if let Some(first) = shape.first_mut() {
            *first = batch;
        }
        let (mut alphas, mut sigmas) = (Vec::with_capacity(batch), Vec::with_capacity(batch));
        for &t in timesteps {
            let (a, s) = self.coefficients(t)?;
            alphas.push(a);
            sigmas.push(s);
        }
        let make = |v: Vec<f32>, device: &Device| -> Result<Tensor> {
            Ok(Tensor::from_vec(v, shape.as_slice(), device)?.to_dtype(like.dtype())?)
        };
        Ok((make(alphas, like.device())?, make(sigmas, like.device())?))
    }

    /// xₜ = √ᾱₜ x₀ + √(1−ᾱₜ) ε, each batch element at its own timestep (diffusers' `add_noise`).
    pub fn add_noise(
        &self,
        original: &Tensor,
        noise: &Tensor,
        timesteps: &[usize],
    ) -> Result<Tensor> {
        let (alpha, sigma) = self.per_sample(timesteps, original)?;
        Ok((original.broadcast_mul(&alpha)? + noise.broadcast_mul(&sigma)?)?)
    }

    /// The v-prediction target v = √ᾱₜ ε − √(1−ᾱₜ) x₀ (diffusers' `get_velocity`).
    pub fn get_velocity(
        &self,
        sample: &Tensor,
        noise: &Tensor,
        timesteps: &[usize],
    ) -> Result<Tensor> {
        let (alpha, sigma) = self.per_sample(timesteps, sample)?;
        Ok((noise.broadcast_mul(&alpha)? - sample.broadcast_mul(&sigma)?)?)
    }

    /// The training target for this schedule's prediction type: ε, v or x₀.
    pub fn target(&self, original: &Tensor, noise: &Tensor, timesteps: &[usize]) -> Result<Tensor> {
        match self.prediction {
            PredictionType::Epsilon => Ok(noise.clone()),
            PredictionType::VPrediction => self.get_velocity(original, noise, timesteps),
            PredictionType::Sample => Ok(original.clone()),
        }
    }

    /// Converts a model output of kind `from`, for the noisy `sample` at training timestep `t`
    /// (one timestep for the whole batch), into the equivalent output of kind `to`.
    pub fn convert(
        &self,
        output: &Tensor,
        from: PredictionType,
        to: PredictionType,
        sample: &Tensor,
        t: usize,
    ) -> Result<Tensor> {
        if from == to {
            return Ok(output.clone());
        }
        let (alpha, sigma) = self.coefficients(t)?;
        let x0 = vp_x0(from, output, sample, alpha, sigma)?;
        vp_output_from_x0(to, &x0, sample, alpha, sigma)
    }
}
