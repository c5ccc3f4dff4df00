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
use ltd_nn::{ConfigError, NoiseSource, Result};

use crate::config::{parse_or, PredictionType, SchedulerConfig, TimestepSpacing};
use crate::ops::{div, scale, upcast, Lookup, StepIndex};
use crate::prediction::{k_output_from_x0, k_x0};
use crate::schedule::{
    fix_terminal_alpha, k_timesteps, np_interp, train_sigmas, BetaConfig, DEFAULT_BETAS,
};
use crate::{check_steps, Scheduler};

/// diffusers' `EulerAncestralDiscreteScheduler`.
#[derive(Debug, Clone)]
pub struct EulerAncestralDiscreteScheduler {
    alphas_cumprod: Vec<f32>,
    prediction: PredictionType,
    spacing: TimestepSpacing,
    steps_offset: i64,
    sigmas: Vec<f32>,
    timesteps: Vec<f64>,
    index: StepIndex,
}

impl EulerAncestralDiscreteScheduler {
    /// Reads the fields `EulerAncestralDiscreteScheduler.__init__` takes, with its defaults.
    pub fn from_config(cfg: &SchedulerConfig) -> std::result::Result<Self, ConfigError> {
        let betas = BetaConfig::read(cfg, &DEFAULT_BETAS)?;
        let mut alphas_cumprod = betas.alphas_cumprod();
        fix_terminal_alpha(&mut alphas_cumprod, betas.rescale_betas_zero_snr);
        let prediction = parse_or(
            "prediction_type",
            &cfg.prediction_type,
            PredictionType::Epsilon,
            PredictionType::parse,
        )?;
        if prediction == PredictionType::Sample {
            return Err(ConfigError::new(
                "prediction_type",
                "unsupported value \"sample\" (not implemented by EulerAncestralDiscreteScheduler)",
            ));
        }
        let mut sigmas = train_sigmas(&alphas_cumprod);
        sigmas.reverse();
        sigmas.push(0.0);
        Ok(Self {
            prediction,
            spacing: parse_or(
                "timestep_spacing",
                &cfg.timestep_spacing,
                TimestepSpacing::Linspace,
                TimestepSpacing::parse,
            )?,
            steps_offset: cfg.steps_offset.unwrap_or(0),
            sigmas,
            timesteps: (0..alphas_cumprod.len()).rev().map(|t| t as f64).collect(),
            index: StepIndex::default(),
            alphas_cumprod,
        })
    }

    fn sigma_for(&self, timestep: f64) -> Result<f32> {
        Ok(self.sigmas[self.index.current(timestep, &self.timesteps, Lookup::Strict)?])
    }
}

impl Scheduler for EulerAncestralDiscreteScheduler {
    fn class_name(&self) -> &'static str {
        "EulerAncestralDiscreteScheduler"
    }

    fn set_timesteps(&mut self, n: usize) -> Result<()> {
        check_steps(n, usize::MAX)?;
        let timesteps = k_timesteps(self.spacing, self.alphas_cumprod.len(), n, self.steps_offset);
        let train = train_sigmas(&self.alphas_cumprod);
        self.sigmas = timesteps
            .iter()
            .map(|&t| np_interp(f64::from(t), &train) as f32)
            .chain([0.0])
            .collect();
        self.timesteps = timesteps.into_iter().map(f64::from).collect();
        self.index = StepIndex::default();
        Ok(())
    }

    fn timesteps(&self) -> &[f64] {
        &self.timesteps
    }

    fn init_noise_sigma(&self) -> f64 {
        let max = self.sigmas.iter().copied().fold(f32::NEG_INFINITY, f32::max);
        match self.spacing {
            TimestepSpacing::Linspace | TimestepSpacing::Trailing => f64::from(max),
            TimestepSpacing::Leading => f64::from((max * max + 1.0).sqrt()),
        }
    }

    fn scale_model_input(&self, sample: &Tensor, timestep: f64) -> Result<Tensor> {
        let sigma = self.sigma_for(timestep)?;
        let x = div(&upcast(sample)?, (sigma * sigma + 1.0).sqrt())?;
        Ok(x.to_dtype(sample.dtype())?)
    }

    fn step(
        &mut self,
        model_output: &Tensor,
        timestep: f64,
        sample: &Tensor,
        noise: &mut dyn NoiseSource,
    ) -> Result<Tensor> {
        let i = self.index.init(timestep, &self.timesteps, Lookup::Strict)?;
        let (out, x) = (upcast(model_output)?, upcast(sample)?);
        let sigma = self.sigmas[i];
        // 1.
        let x0 = k_x0(self.prediction, &out, &x, sigma)?;
        let (from, to) = (sigma, self.sigmas[i + 1]);
        let sigma_up = (to * to * (from * from - to * to) / (from * from)).sqrt();
        let sigma_down = (to * to - sigma_up * sigma_up).sqrt();
        // 2.
        let derivative = div(&(&x - x0)?, sigma)?;
        let prev = (x + scale(&derivative, sigma_down - sigma)?)?;
        // 3.
        let z = noise.randn(model_output.dims(), model_output.dtype(), model_output.device())?;
        let prev = (prev + scale(&upcast(&z)?, sigma_up)?)?;
        self.index.advance();
        Ok(prev.to_dtype(sample.dtype())?)
    }

    fn add_noise(&self, original: &Tensor, noise: &Tensor, timestep: f64) -> Result<Tensor> {
        let i = self.index.for_add_noise(timestep, &self.timesteps, Lookup::Strict)?;
        Ok((original + scale(noise, self.sigmas[i])?)?)
    }

    fn order(&self) -> usize {
        1
    }

    fn set_begin_index(&mut self, begin_index: usize) {
        self.index.begin = Some(begin_index);
    }

    fn prediction_type(&self) -> PredictionType {
        self.prediction
    }

    fn pred_original_sample(&self, out: &Tensor, timestep: f64, sample: &Tensor) -> Result<Tensor> {
        k_x0(self.prediction, out, sample, self.sigma_for(timestep)?)
    }

    fn model_output_from_pred_original(
        &self,
        x0: &Tensor,
        timestep: f64,
        sample: &Tensor,
    ) -> Result<Tensor> {
        k_output_from_x0(self.prediction, x0, sample, self.sigma_for(timestep)?)
    }

    fn supports_thresholding(&self) -> bool {
        false
    }

    fn sigmas(&self) -> Option<&[f32]> {
        Some(&self.sigmas)
    }
}
