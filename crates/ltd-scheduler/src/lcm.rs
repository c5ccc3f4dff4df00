//! Latent Consistency Model multistep sampling (Luo et al. 2023, algorithm 1), as diffusers'
//! `LCMScheduler`.
//!
//! | code          | paper |
//! |---------------|-------|
//! | `c_skip`,`c_out` | the consistency boundary-condition scalings, σ_data = 0.5, with the timestep scaled by `timestep_scaling` |
//! | `x0`          | the predicted x₀ of the underlying parameterisation |
//! | `denoised`    | f_θ(xₜ, t) = c_skip xₜ + c_out x₀ |
//!
//! Schedule: the distillation schedule has `original_inference_steps` evenly spaced timesteps
//! k·i − 1 (k = T / original steps); inference takes `n` of them at evenly spaced indices.
//!
//! Step:
//! 1. ᾱ at this and the next schedule timestep (the last step reuses this one).
//! 2. x₀ from the model output; clip or threshold; denoised = c_out x₀ + c_skip x.
//! 3. Unless this is the last step: draw z and re-noise, √ᾱₜ₋₁ denoised + √(1−ᾱₜ₋₁) z.

use candle_core::Tensor;
use ltd_nn::{ConfigError, Error, Result};

use crate::config::{BetaSchedule, PredictionType, SchedulerConfig};
use crate::ops::{lincomb, train_index, Lookup, StepIndex};
use crate::prediction::vp_x0;
use crate::schedule::{np_linspace_open, BetaConfig, BetaDefaults};
use crate::threshold::SampleClamp;
use crate::{check_steps, not_ready, NoiseLevels, Scheduler, StepInput};

/// LCM's class defaults: the Stable Diffusion schedule.
const LCM_BETAS: BetaDefaults = BetaDefaults {
    beta_start: 0.00085,
    beta_end: 0.012,
    beta_schedule: BetaSchedule::ScaledLinear,
    reads_zero_snr: true,
};

/// diffusers' `LCMScheduler`.
#[derive(Debug, Clone)]
pub struct LCMScheduler {
    alphas_cumprod: Vec<f32>,
    final_alpha_cumprod: f32,
    original_inference_steps: usize,
    prediction: PredictionType,
    clamp: SampleClamp,
    timestep_scaling: f64,
    num_inference_steps: Option<usize>,
    timesteps: Vec<f64>,
    index: StepIndex,
}

impl LCMScheduler {
    /// Reads the fields `LCMScheduler.__init__` takes, with its defaults.
    pub fn from_config(cfg: &SchedulerConfig) -> std::result::Result<Self, ConfigError> {
        let alphas_cumprod = BetaConfig::read(cfg, &LCM_BETAS)?.alphas_cumprod();
        let final_alpha_cumprod =
            if cfg.set_alpha_to_one.unwrap_or(true) { 1.0 } else { alphas_cumprod[0] };
        let original_inference_steps = cfg.original_inference_steps.unwrap_or(50);
        if original_inference_steps == 0 || original_inference_steps > alphas_cumprod.len() {
            return Err(ConfigError::new(
                "original_inference_steps",
                format!(
                    "must be in 1..={} (num_train_timesteps), got {original_inference_steps}",
                    alphas_cumprod.len()
                ),
            ));
        }
        Ok(Self {
            final_alpha_cumprod,
            original_inference_steps,
            prediction: cfg.prediction_type()?,
            clamp: SampleClamp::read(cfg, Some(false))?,
            timestep_scaling: cfg.timestep_scaling.unwrap_or(10.0),
            num_inference_steps: None,
            timesteps: (0..alphas_cumprod.len()).rev().map(|t| t as f64).collect(),
            index: StepIndex::default(),
            alphas_cumprod,
        })
    }

    /// The boundary-condition scalings at `t` (float32, as torch with a tensor timestep).
    fn scalings(&self, t: usize) -> (f32, f32) {
        let sigma_data = 0.5f32;
        let scaled = t as f32 * self.timestep_scaling as f32;
        let denom = scaled * scaled + sigma_data * sigma_data;
        let c_skip = sigma_data * sigma_data / denom;
        let c_out = scaled / denom.sqrt();
        (c_skip, c_out)
    }
}

impl Scheduler for LCMScheduler {
    fn class_name(&self) -> &'static str {
        "LCMScheduler"
    }

    fn set_timesteps(&mut self, n: usize) -> Result<()> {
        let num_train = self.alphas_cumprod.len();
        let original = self.original_inference_steps;
        check_steps(n, original)?;
        let k = num_train / original;
        // The distillation schedule, descending: k·i − 1 for i = original..1.
        let origin: Vec<i64> = (1..=original as i64).rev().map(|i| i * k as i64 - 1).collect();
        if origin.len() / n < 1 {
            return Err(Error::msg(format!(
                "LCMScheduler: {n} steps is more than the {} distillation timesteps",
                origin.len()
            )));
        }
        self.timesteps = np_linspace_open(0.0, origin.len() as f64, n)
            .into_iter()
            .map(|i| origin[i.floor() as usize] as f64)
            .collect();
        self.num_inference_steps = Some(n);
        self.index = StepIndex::default();
        Ok(())
    }

    fn step_f32(&mut self, input: StepInput<'_>) -> Result<Tensor> {
        let StepInput { model_output: out, timestep, sample: x, mut noise } = input;
        let n = self.num_inference_steps.ok_or_else(|| not_ready(self.class_name()))?;
        let i = self.index.init(timestep, &self.timesteps, Lookup::Strict)?;
        let t = train_index(timestep, self.alphas_cumprod.len())?;
        // 1.
        let prev_t = self.timesteps.get(i + 1).copied().unwrap_or(timestep);
        let alpha_prod_t = self.alphas_cumprod[t];
        let alpha_prev = if prev_t >= 0.0 {
            self.alphas_cumprod[train_index(prev_t, self.alphas_cumprod.len())?]
        } else {
            self.final_alpha_cumprod
        };
        let (c_skip, c_out) = self.scalings(t);
        // 2.
        let x0 =
            vp_x0(self.prediction, &out, &x, alpha_prod_t.sqrt(), (1.0 - alpha_prod_t).sqrt())?;
        let x0 = self.clamp.apply(&x0)?;
        let denoised = lincomb(&[(c_out, &x0), (c_skip, &x)])?;
        // 3.
        let prev = if i + 1 != n {
            let z = noise.like_model_output()?;
            lincomb(&[(alpha_prev.sqrt(), &denoised), ((1.0 - alpha_prev).sqrt(), &z)])?
        } else {
            denoised
        };
        self.index.advance();
        Ok(prev)
    }

    fn noise_levels(&self) -> NoiseLevels<'_> {
        NoiseLevels::alphas_cumprod(self.prediction, &self.alphas_cumprod, &self.timesteps)
            .with_step_index(&self.index)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn lcm_schedule_matches_diffusers_for_four_steps() {
        // diffusers: LCMScheduler().set_timesteps(4) -> [999, 759, 499, 259]
        let mut s = LCMScheduler::from_config(&SchedulerConfig::default()).unwrap();
        s.set_timesteps(4).unwrap();
        assert_eq!(s.timesteps(), &[999.0, 759.0, 499.0, 259.0]);
    }
}
