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
use ltd_nn::{ConfigError, NoiseSource, Result};

use crate::config::{
    parse_or, reject_flag, FinalSigmasType, InterpolationType, PredictionType, SchedulerConfig,
    TimestepSpacing, TimestepType,
};
use crate::ops::{div, scale, upcast, Lookup, StepIndex};
use crate::prediction::{k_output_from_x0, k_x0};
use crate::schedule::{
    fix_terminal_alpha, k_timesteps, karras_sigmas, log_f32, np_interp, sigma_to_t,
    torch_linspace_f32, train_sigmas, BetaConfig, DEFAULT_BETAS,
};
use crate::{check_steps, Scheduler};

/// diffusers' `EulerDiscreteScheduler`.
#[derive(Debug, Clone)]
pub struct EulerDiscreteScheduler {
    alphas_cumprod: Vec<f32>,
    prediction: PredictionType,
    interpolation: InterpolationType,
    karras: bool,
    sigma_min: Option<f64>,
    sigma_max: Option<f64>,
    spacing: TimestepSpacing,
    continuous_timesteps: bool,
    steps_offset: i64,
    final_sigmas: FinalSigmasType,
    sigmas: Vec<f32>,
    timesteps: Vec<f64>,
    index: StepIndex,
}

impl EulerDiscreteScheduler {
    /// Reads the fields `EulerDiscreteScheduler.__init__` takes, with its defaults.
    pub fn from_config(cfg: &SchedulerConfig) -> std::result::Result<Self, ConfigError> {
        reject_flag("use_exponential_sigmas", cfg.use_exponential_sigmas)?;
        reject_flag("use_beta_sigmas", cfg.use_beta_sigmas)?;
        let betas = BetaConfig::read(cfg, &DEFAULT_BETAS)?;
        let mut alphas_cumprod = betas.alphas_cumprod();
        fix_terminal_alpha(&mut alphas_cumprod, betas.rescale_betas_zero_snr);
        // diffusers also accepts the legacy spelling "original_sample".
        let prediction = match cfg.prediction_type.as_deref() {
            Some("original_sample") => PredictionType::Sample,
            _ => parse_or(
                "prediction_type",
                &cfg.prediction_type,
                PredictionType::Epsilon,
                PredictionType::parse,
            )?,
        };
        let timestep_type = parse_or(
            "timestep_type",
            &cfg.timestep_type,
            TimestepType::Discrete,
            TimestepType::parse,
        )?;
        let continuous_timesteps =
            timestep_type == TimestepType::Continuous && prediction == PredictionType::VPrediction;
        let mut sigmas = train_sigmas(&alphas_cumprod);
        sigmas.reverse();
        let timesteps = if continuous_timesteps {
            sigmas.iter().map(|s| f64::from(0.25 * s.ln())).collect()
        } else {
            (0..alphas_cumprod.len()).rev().map(|t| t as f64).collect()
        };
        sigmas.push(0.0);
        Ok(Self {
            prediction,
            interpolation: parse_or(
                "interpolation_type",
                &cfg.interpolation_type,
                InterpolationType::Linear,
                InterpolationType::parse,
            )?,
            karras: cfg.use_karras_sigmas.unwrap_or(false),
            sigma_min: cfg.sigma_min,
            sigma_max: cfg.sigma_max,
            spacing: parse_or(
                "timestep_spacing",
                &cfg.timestep_spacing,
                TimestepSpacing::Linspace,
                TimestepSpacing::parse,
            )?,
            continuous_timesteps,
            steps_offset: cfg.steps_offset.unwrap_or(0),
            final_sigmas: parse_or(
                "final_sigmas_type",
                &cfg.final_sigmas_type,
                FinalSigmasType::Zero,
                FinalSigmasType::parse,
            )?,
            sigmas,
            timesteps,
            index: StepIndex::default(),
            alphas_cumprod,
        })
    }

    fn sigma_for(&self, timestep: f64) -> Result<f32> {
        Ok(self.sigmas[self.index.current(timestep, &self.timesteps, Lookup::Strict)?])
    }
}

impl Scheduler for EulerDiscreteScheduler {
    fn class_name(&self) -> &'static str {
        "EulerDiscreteScheduler"
    }

    fn set_timesteps(&mut self, n: usize) -> Result<()> {
        let num_train = self.alphas_cumprod.len();
        check_steps(n, usize::MAX)?;
        let mut timesteps: Vec<f64> = k_timesteps(self.spacing, num_train, n, self.steps_offset)
            .into_iter()
            .map(f64::from)
            .collect();
        let train = train_sigmas(&self.alphas_cumprod);
        let log_sigmas = log_f32(&train);
        let mut sigmas: Vec<f64> = match self.interpolation {
            InterpolationType::Linear => timesteps.iter().map(|&t| np_interp(t, &train)).collect(),
            InterpolationType::LogLinear => {
                // From ln σ_max down to ln σ_min: n + 1 sigmas, so the schedule ends at σ_min
                // before the final sigma (diffusers' quirk, kept).
                let (start, end) = (log_sigmas[num_train - 1], log_sigmas[0]);
                torch_linspace_f32(f64::from(start), f64::from(end), n + 1)
                    .into_iter()
                    .map(|l| f64::from(l.exp()))
                    .collect()
            }
        };
        if self.karras {
            let sigma_min = self.sigma_min.unwrap_or(sigmas[sigmas.len() - 1]);
            let sigma_max = self.sigma_max.unwrap_or(sigmas[0]);
            sigmas = karras_sigmas(sigma_min, sigma_max, n);
            timesteps = sigmas.iter().map(|&s| sigma_to_t(s, &log_sigmas)).collect();
        }
        let last = match self.final_sigmas {
            FinalSigmasType::Zero => 0.0,
            FinalSigmasType::SigmaMin => train[0],
        };
        self.sigmas = sigmas.iter().map(|&s| s as f32).chain([last]).collect();
        self.timesteps = if self.continuous_timesteps {
            self.sigmas[..self.sigmas.len() - 1].iter().map(|s| f64::from(0.25 * s.ln())).collect()
        } else {
            timesteps.iter().map(|&t| f64::from(t as f32)).collect()
        };
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
        _noise: &mut dyn NoiseSource,
    ) -> Result<Tensor> {
        let i = self.index.init(timestep, &self.timesteps, Lookup::Strict)?;
        let (out, x) = (upcast(model_output)?, upcast(sample)?);
        let sigma = self.sigmas[i];
        // 1.
        let x0 = k_x0(self.prediction, &out, &x, sigma)?;
        // 2.
        let derivative = div(&(&x - x0)?, sigma)?;
        // 3.
        let dt = self.sigmas[i + 1] - sigma;
        let prev = (x + scale(&derivative, dt)?)?;
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
