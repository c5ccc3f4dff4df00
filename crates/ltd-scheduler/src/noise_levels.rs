//! [`NoiseLevels`]: the one thing the [`Scheduler`](crate::Scheduler) trait's default methods
//! need to know about a sampler — its timesteps, how noisy the sample is at each of them, and
//! what the model predicts.
//!
//! diffusers' schedulers describe the noise level in one of three ways, and the tail every class
//! repeats (`add_noise`, `scale_model_input`, `init_noise_sigma`, the x₀ conversions) follows
//! from which:
//!
//! | table                | classes                              | noisy sample                         | found by |
//! |----------------------|--------------------------------------|--------------------------------------|----------|
//! | k-diffusion sigmas   | Euler, Euler a, Heun, LMS            | x = x₀ + σ ε                         | step index; an unknown timestep is an error |
//! | VP form of k-sigmas  | DPM-Solver multi/singlestep, UniPC   | x = α x₀ + σₜ ε, α = 1/√(σ²+1), σₜ = σα | step index; an unknown timestep means the last step |
//! | ᾱ                    | DDPM, DDIM, PNDM, LCM                | x = √ᾱₜ x₀ + √(1−ᾱₜ) ε               | the training timestep itself |
//!
//! "Step index" is diffusers' `_step_index` / `_begin_index` bookkeeping ([`StepIndex`]): the
//! position the next `step` will use, or the timestep's position in the schedule before the
//! first step. `add_noise` alone looks the timestep up whenever no begin index was set
//! (diffusers' training path), as diffusers does.

use candle_core::Tensor;
use ltd_nn::Result;

use crate::config::{PredictionType, TimestepSpacing};
use crate::ops::{div, lincomb, scale, train_index, upcast, Lookup, StepIndex};
use crate::prediction::{k_output_from_x0, k_x0, vp_output_from_x0, vp_x0};
use crate::schedule::vp_alpha_sigma;

/// A read-only view of a sampler's noise schedule (see the module docs); built by this crate's
/// samplers in [`Scheduler::noise_levels`](crate::Scheduler::noise_levels).
#[derive(Debug, Clone, Copy)]
pub struct NoiseLevels<'a> {
    prediction: PredictionType,
    timesteps: &'a [f64],
    table: Table<'a>,
}

/// Where the noise level of a timestep is read.
#[derive(Debug, Clone, Copy)]
enum Table<'a> {
    /// k-diffusion sigmas, one per timestep plus the final one; `spacing` decides
    /// `init_noise_sigma`.
    KSigmas { sigmas: &'a [f32], index: &'a StepIndex, spacing: TimestepSpacing },
    /// k-diffusion sigmas used in VP form.
    VpSigmas { sigmas: &'a [f32], index: &'a StepIndex },
    /// ᾱ over the training timesteps; `index` for the classes that keep a step index anyway
    /// (LCM), so that `set_begin_index` reaches it.
    AlphasCumprod { alphas_cumprod: &'a [f32], index: Option<&'a StepIndex> },
}

/// Who asks for a noise level: they find the step index differently.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Caller {
    /// `step` and the x₀ conversions: the index the next step uses.
    Step,
    /// `add_noise`: looks the timestep up unless a begin index was set.
    AddNoise,
}

/// The noise level at one timestep.
#[derive(Debug, Clone, Copy)]
enum Level {
    /// x = x₀ + s ε.
    K(f32),
    /// x = α x₀ + σ ε.
    Vp { alpha: f32, sigma: f32 },
}

impl<'a> NoiseLevels<'a> {
    /// k-diffusion sigmas (Euler, Euler a, Heun, LMS): as diffusers' k-diffusion classes, a
    /// timestep not in the schedule is an error (their `index_for_timestep` raises).
    /// `init_noise_sigma` follows `timestep_spacing`: set it with
    /// [`NoiseLevels::timestep_spacing`] unless it is `linspace`.
    pub(crate) fn k_sigmas(
        prediction: PredictionType,
        sigmas: &'a [f32],
        timesteps: &'a [f64],
        index: &'a StepIndex,
    ) -> Self {
        let spacing = TimestepSpacing::Linspace;
        Self { prediction, timesteps, table: Table::KSigmas { sigmas, index, spacing } }
    }

    /// The `timestep_spacing` of a k-diffusion class, which decides its `init_noise_sigma`.
    pub(crate) fn timestep_spacing(mut self, timestep_spacing: TimestepSpacing) -> Self {
        if let Table::KSigmas { spacing, .. } = &mut self.table {
            *spacing = timestep_spacing;
        }
        self
    }

    /// k-diffusion sigmas in VP form (DPM-Solver, UniPC): a timestep not in the schedule means
    /// the last step, as their `index_for_timestep`.
    pub(crate) fn vp_sigmas(
        prediction: PredictionType,
        sigmas: &'a [f32],
        timesteps: &'a [f64],
        index: &'a StepIndex,
    ) -> Self {
        Self { prediction, timesteps, table: Table::VpSigmas { sigmas, index } }
    }

    /// ᾱ at the (integer) training timestep (DDPM, DDIM, PNDM, LCM); `set_begin_index` does
    /// nothing unless [`NoiseLevels::with_step_index`] gives it an index to set.
    pub(crate) fn alphas_cumprod(
        prediction: PredictionType,
        alphas_cumprod: &'a [f32],
        timesteps: &'a [f64],
    ) -> Self {
        Self { prediction, timesteps, table: Table::AlphasCumprod { alphas_cumprod, index: None } }
    }

    /// The step index `set_begin_index` sets, for an ᾱ-indexed class that keeps one (LCM).
    pub(crate) fn with_step_index(mut self, step_index: &'a StepIndex) -> Self {
        if let Table::AlphasCumprod { index, .. } = &mut self.table {
            *index = Some(step_index);
        }
        self
    }

    /// What the model predicts.
    pub fn prediction_type(&self) -> PredictionType {
        self.prediction
    }

    /// The schedule's timesteps, as [`Scheduler::timesteps`](crate::Scheduler::timesteps).
    pub fn timesteps(&self) -> &'a [f64] {
        self.timesteps
    }

    /// The k-diffusion sigmas (one more than the timesteps), for the samplers that keep them.
    pub fn sigmas(&self) -> Option<&'a [f32]> {
        match self.table {
            Table::KSigmas { sigmas, .. } | Table::VpSigmas { sigmas, .. } => Some(sigmas),
            Table::AlphasCumprod { .. } => None,
        }
    }

    /// The step index, where the sampler keeps one.
    fn step_index(&self) -> Option<&'a StepIndex> {
        match self.table {
            Table::KSigmas { index, .. } | Table::VpSigmas { index, .. } => Some(index),
            Table::AlphasCumprod { index, .. } => index,
        }
    }

    /// The noise level `step` would use for `timestep` now (or `add_noise`, which looks the
    /// timestep up when no begin index is set).
    fn level(&self, timestep: f64, caller: Caller) -> Result<Level> {
        let position = |index: &StepIndex, lookup| {
            if caller == Caller::AddNoise {
                index.for_add_noise(timestep, self.timesteps, lookup)
            } else {
                index.current(timestep, self.timesteps, lookup)
            }
        };
        Ok(match self.table {
            Table::KSigmas { sigmas, index, .. } => {
                Level::K(sigmas[position(index, Lookup::Strict)?])
            }
            Table::VpSigmas { sigmas, index } => {
                let (alpha, sigma) =
                    vp_alpha_sigma(sigmas[position(index, Lookup::LastIfMissing)?]);
                Level::Vp { alpha, sigma }
            }
            Table::AlphasCumprod { alphas_cumprod, .. } => {
                let a = alphas_cumprod[train_index(timestep, alphas_cumprod.len())?];
                Level::Vp { alpha: a.sqrt(), sigma: (1.0 - a).sqrt() }
            }
        })
    }

    /// diffusers' `set_begin_index`; nothing for the classes without it (DDPM, DDIM, PNDM).
    pub(crate) fn set_begin_index(&self, begin_index: usize) {
        if let Some(index) = self.step_index() {
            index.set_begin(begin_index);
        }
    }

    /// `init_noise_sigma`: the largest sigma for the k-diffusion classes (as a VP-scaled
    /// sample's deviation under `leading` spacing), 1 otherwise.
    pub(crate) fn init_noise_sigma(&self) -> f64 {
        match self.table {
            Table::KSigmas { sigmas, spacing, .. } => {
                let max = sigmas.iter().copied().fold(f32::NEG_INFINITY, f32::max);
                match spacing {
                    TimestepSpacing::Linspace | TimestepSpacing::Trailing => f64::from(max),
                    TimestepSpacing::Leading => f64::from((max * max + 1.0).sqrt()),
                }
            }
            Table::VpSigmas { .. } | Table::AlphasCumprod { .. } => 1.0,
        }
    }

    /// `scale_model_input`: x/√(σ²+1) (in float32) for the k-diffusion classes, else `sample`.
    pub(crate) fn scale_model_input(&self, sample: &Tensor, timestep: f64) -> Result<Tensor> {
        match self.table {
            Table::KSigmas { sigmas, index, .. } => {
                let sigma = sigmas[index.current(timestep, self.timesteps, Lookup::Strict)?];
                let x = div(&upcast(sample)?, (sigma * sigma + 1.0).sqrt())?;
                Ok(x.to_dtype(sample.dtype())?)
            }
            Table::VpSigmas { .. } | Table::AlphasCumprod { .. } => Ok(sample.clone()),
        }
    }

    /// Whether the diffusers class thresholds in its own `step`: none of the k-diffusion ones.
    pub(crate) fn supports_thresholding(&self) -> bool {
        !matches!(self.table, Table::KSigmas { .. })
    }

    /// `add_noise`: x₀ + σ ε, or α x₀ + σ ε.
    pub(crate) fn add_noise(
        &self,
        original: &Tensor,
        noise: &Tensor,
        timestep: f64,
    ) -> Result<Tensor> {
        match self.level(timestep, Caller::AddNoise)? {
            Level::K(s) => Ok((original + scale(noise, s)?)?),
            Level::Vp { alpha, sigma } => lincomb(&[(alpha, original), (sigma, noise)]),
        }
    }

    /// x₀ from a model output at `timestep`.
    pub(crate) fn pred_original_sample(
        &self,
        output: &Tensor,
        timestep: f64,
        sample: &Tensor,
    ) -> Result<Tensor> {
        match self.level(timestep, Caller::Step)? {
            Level::K(s) => k_x0(self.prediction, output, sample, s),
            Level::Vp { alpha, sigma } => vp_x0(self.prediction, output, sample, alpha, sigma),
        }
    }

    /// The model output implying `x0` at `timestep`.
    pub(crate) fn model_output_from_pred_original(
        &self,
        x0: &Tensor,
        timestep: f64,
        sample: &Tensor,
    ) -> Result<Tensor> {
        match self.level(timestep, Caller::Step)? {
            Level::K(s) => k_output_from_x0(self.prediction, x0, sample, s),
            Level::Vp { alpha, sigma } => {
                vp_output_from_x0(self.prediction, x0, sample, alpha, sigma)
            }
        }
    }
}
