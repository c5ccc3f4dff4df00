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
use ltd_nn::{ConfigError, NoiseSource, Result};

use crate::config::{parse_or, reject_flag, PredictionType, SchedulerConfig, TimestepSpacing};
use crate::ops::{div, scale, upcast, Lookup, StepIndex};
use crate::prediction::{k_output_from_x0, k_x0};
use crate::schedule::{
    k_timesteps, karras_sigmas, log_f32, np_interp, sigma_to_t, train_sigmas, BetaConfig,
    BetaDefaults,
};
use crate::threshold::SampleClamp;
use crate::{check_steps, Scheduler};

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
    alphas_cumprod: Vec<f32>,
    prediction: PredictionType,
    karras: bool,
    clip: SampleClamp,
    spacing: TimestepSpacing,
    steps_offset: i64,
    sigmas: Vec<f32>,
    timesteps: Vec<f64>,
    index: StepIndex,
    first: Option<FirstStage>,
}

impl HeunDiscreteScheduler {
    /// Reads the fields `HeunDiscreteScheduler.__init__` takes, with its defaults.
    pub fn from_config(cfg: &SchedulerConfig) -> std::result::Result<Self, ConfigError> {
        reject_flag("use_exponential_sigmas", cfg.use_exponential_sigmas)?;
        reject_flag("use_beta_sigmas", cfg.use_beta_sigmas)?;
        let alphas_cumprod = BetaConfig::read(cfg, &HEUN_BETAS)?.alphas_cumprod();
        let clip = if cfg.clip_sample.unwrap_or(false) {
            SampleClamp::Clip { range: cfg.clip_sample_range.unwrap_or(1.0) }
        } else {
            SampleClamp::None
        };
        let num_train = alphas_cumprod.len();
        let mut this = Self {
            prediction: parse_or(
                "prediction_type",
                &cfg.prediction_type,
                PredictionType::Epsilon,
                PredictionType::parse,
            )?,
            karras: cfg.use_karras_sigmas.unwrap_or(false),
            clip,
            spacing: parse_or(
                "timestep_spacing",
                &cfg.timestep_spacing,
                TimestepSpacing::Linspace,
                TimestepSpacing::parse,
            )?,
            steps_offset: cfg.steps_offset.unwrap_or(0),
            sigmas: Vec::new(),
            timesteps: Vec::new(),
            index: StepIndex::default(),
            first: None,
            alphas_cumprod,
        };
        // diffusers' __init__ runs set_timesteps(num_train_timesteps).
        this.make_schedule(num_train);
        Ok(this)
    }

    fn make_schedule(&mut self, n: usize) {
        let num_train = self.alphas_cumprod.len();
        let mut timesteps: Vec<f64> = k_timesteps(self.spacing, num_train, n, self.steps_offset)
            .into_iter()
            .map(f64::from)
            .collect();
        let train = train_sigmas(&self.alphas_cumprod);
        let mut sigmas: Vec<f64> = timesteps.iter().map(|&t| np_interp(t, &train)).collect();
        if self.karras {
            let log_sigmas = log_f32(&train);
            sigmas = karras_sigmas(sigmas[sigmas.len() - 1], sigmas[0], n);
            timesteps = sigmas.iter().map(|&s| sigma_to_t(s, &log_sigmas)).collect();
        }
        let sigmas: Vec<f32> = sigmas.iter().map(|&s| s as f32).chain([0.0]).collect();
        let k = sigmas.len();
        self.sigmas = std::iter::once(sigmas[0])
            .chain(sigmas[1..k - 1].iter().flat_map(|&s| [s, s]))
            .chain([sigmas[k - 1]])
            .collect();
        let t32: Vec<f64> = timesteps.iter().map(|&t| f64::from(t as f32)).collect();
        self.timesteps =
            std::iter::once(t32[0]).chain(t32[1..].iter().flat_map(|&t| [t, t])).collect();
        self.first = None;
        self.index = StepIndex::default();
    }

    fn sigma_for(&self, timestep: f64) -> Result<f32> {
        Ok(self.sigmas[self.index.current(timestep, &self.timesteps, Lookup::Strict)?])
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
        _noise: &mut dyn NoiseSource,
    ) -> Result<Tensor> {
        let i = self.index.init(timestep, &self.timesteps, Lookup::Strict)?;
        let (out, x) = (upcast(model_output)?, upcast(sample)?);
        let prev = match self.first.take() {
            None => {
                let (sigma, sigma_next) = (self.sigmas[i], self.sigmas[i + 1]);
                let x0 = self.clip.apply(&k_x0(self.prediction, &out, &x, sigma)?)?;
                let derivative = div(&(&x - x0)?, sigma)?;
                let dt = sigma_next - sigma;
                let prev = (&x + scale(&derivative, dt)?)?;
                self.first = Some(FirstStage { derivative, dt, sample: x });
                prev
            }
            Some(first) => {
                let sigma_next = self.sigmas[i];
                let x0 = self.clip.apply(&k_x0(self.prediction, &out, &x, sigma_next)?)?;
                let derivative = div(&(&x - x0)?, sigma_next)?;
                let derivative = scale(&(first.derivative + derivative)?, 0.5)?;
                (first.sample + scale(&derivative, first.dt)?)?
            }
        };
        self.index.advance();
        Ok(prev.to_dtype(sample.dtype())?)
    }

    fn add_noise(&self, original: &Tensor, noise: &Tensor, timestep: f64) -> Result<Tensor> {
        let i = self.index.for_add_noise(timestep, &self.timesteps, Lookup::Strict)?;
        Ok((original + scale(noise, self.sigmas[i])?)?)
    }

    fn order(&self) -> usize {
        2
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
