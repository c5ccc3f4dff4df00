//! Diffusion samplers at diffusers 0.42.1 parity, as plain numeric code over candle tensors.
//!
//! A model ships a `scheduler_config.json` whose `_class_name` names a diffusers scheduler;
//! [`load_scheduler`] builds that one. A user may instead pick a sampler by name
//! ([`SamplerKind`], e.g. `dpm++2m-karras`); [`build_scheduler`] then builds it from the same
//! config the way diffusers' `from_config` swaps classes: the new class reads only the fields
//! it knows, with its own defaults for those the file did not have.
//!
//! Every sampler implements [`Scheduler`], and the denoising loop is the same for all of them,
//! including the ones that evaluate the model more than once per step (Heun, PNDM's Runge-Kutta
//! warm-up), whose [`Scheduler::timesteps`] simply repeat entries:
//!
//! ```text
//! scheduler.set_timesteps(n)?;
//! let mut x = noise * scheduler.init_noise_sigma();
//! for &t in scheduler.timesteps().to_vec().iter() {
//!     let x_in = scheduler.scale_model_input(&x, t)?;
//!     let e = model(&x_in, t)?;
//!     x = scheduler.step(&e, t, &x, rng)?;
//! }
//! ```
//!
//! Stochastic samplers draw their noise from the caller's [`NoiseSource`] exactly when and with
//! the shape diffusers calls `randn_tensor`, so a torch-compatible source reproduces diffusers'
//! seeds. Samplers compute in float32 (as diffusers' upcasting samplers do) and return the
//! sample's dtype. The training side lives in [`NoiseSchedule`].

mod config;
mod ddim;
mod ddpm;
mod dpm_multistep;
mod dpm_singlestep;
mod euler;
mod euler_ancestral;
mod heun;
mod lcm;
mod lms;
mod noise_levels;
mod noise_schedule;
mod ops;
mod pndm;
mod prediction;
mod schedule;
mod sigma_schedule;
mod step;
mod threshold;
mod unipc;

use std::path::Path;
use std::str::FromStr;

use candle_core::Tensor;
pub use ltd_nn::NoiseSource;
use ltd_nn::{ConfigError, Error, Result};

pub use config::{
    BetaSchedule, DdpmVarianceType, DpmAlgorithm, DpmSolverType, FinalSigmasType,
    InterpolationType, PredictionType, SchedulerClass, SchedulerConfig, TimestepSpacing,
    TimestepType, UniPcSolverType,
};
pub use ddim::DDIMScheduler;
pub use ddpm::DDPMScheduler;
pub use dpm_multistep::DPMSolverMultistepScheduler;
pub use dpm_singlestep::DPMSolverSinglestepScheduler;
pub use euler::EulerDiscreteScheduler;
pub use euler_ancestral::EulerAncestralDiscreteScheduler;
pub use heun::HeunDiscreteScheduler;
pub use lcm::LCMScheduler;
pub use lms::LMSDiscreteScheduler;
pub use noise_levels::NoiseLevels;
pub use noise_schedule::NoiseSchedule;
pub use pndm::PNDMScheduler;
pub use schedule::BetaConfig;
pub use step::{StepInput, StepNoise};
pub use threshold::{clip_sample, dynamic_threshold, quantile_linear, SampleClamp};
pub use unipc::UniPCMultistepScheduler;

/// A sampler: turns model outputs into the next sample along a fixed timestep schedule.
///
/// A sampler implements what makes its algorithm different — the schedule
/// ([`Scheduler::set_timesteps`]), the update ([`Scheduler::step_f32`]) and a description of its
/// noise levels ([`Scheduler::noise_levels`]); the rest defaults to what that description
/// implies, and a sampler overrides it only where its diffusers class does something else.
///
/// Timesteps are `f64` because some samplers feed the model fractional timesteps (Euler with
/// `linspace` spacing or Karras sigmas); they hold exactly the values of diffusers'
/// `scheduler.timesteps` (float32 or integer), so they can be compared for equality.
pub trait Scheduler: Send {
    /// The diffusers class this sampler reproduces (`"EulerDiscreteScheduler"`).
    fn class_name(&self) -> &'static str;

    /// Prepares the schedule for `num_inference_steps` steps and resets all per-run state;
    /// 0 steps, or more than the sampler can take, is an error.
    fn set_timesteps(&mut self, num_inference_steps: usize) -> Result<()>;

    /// The schedule's noise levels: what the model predicts and how noisy the sample is at
    /// each timestep. This is all the methods below need; they default to reading it, so a
    /// sampler implements them only where its diffusers class differs.
    fn noise_levels(&self) -> NoiseLevels<'_>;

    /// The algorithm of one step, on float32 inputs: the float32 sample for the next
    /// timestep. [`Scheduler::step`] upcasts for it and casts its result back.
    fn step_f32(&mut self, input: StepInput<'_>) -> Result<Tensor>;

    /// One step: the sample for the next timestep, given the model output at `timestep` for
    /// `sample` (the sample as given to this call, not the scaled model input). Draws noise
    /// from `noise` exactly where diffusers calls `randn_tensor` (same shape, same order).
    /// Computes in float32 and returns the sample's dtype, as diffusers' upcasting samplers.
    fn step(
        &mut self,
        model_output: &Tensor,
        timestep: f64,
        sample: &Tensor,
        noise: &mut dyn NoiseSource,
    ) -> Result<Tensor> {
        let prev = self.step_f32(StepInput::new(model_output, timestep, sample, noise)?)?;
        Ok(prev.to_dtype(sample.dtype())?)
    }

    /// One entry per model evaluation, as diffusers' `scheduler.timesteps` (Heun and PNDM's
    /// Runge-Kutta warm-up repeat entries).
    fn timesteps(&self) -> &[f64] {
        self.noise_levels().timesteps()
    }

    /// The standard deviation of the initial noise: latents start as `noise * init_noise_sigma`.
    fn init_noise_sigma(&self) -> f64 {
        self.noise_levels().init_noise_sigma()
    }

    /// The model input for `sample` at `timestep` (k-diffusion samplers divide by √(σ²+1)).
    fn scale_model_input(&self, sample: &Tensor, timestep: f64) -> Result<Tensor> {
        self.noise_levels().scale_model_input(sample, timestep)
    }

    /// Noises a clean sample to `timestep` for image-to-image, as diffusers' `add_noise` for
    /// this scheduler (same batch timestep for every element).
    fn add_noise(&self, original: &Tensor, noise: &Tensor, timestep: f64) -> Result<Tensor> {
        self.noise_levels().add_noise(original, noise, timestep)
    }

    /// diffusers' `scheduler.order`: model evaluations per step (2 for Heun, else 1); an
    /// image-to-image run skipping `k` steps starts at timestep index `k * order()`.
    fn order(&self) -> usize {
        1
    }

    /// Starts the next run at timestep index `begin_index` (image-to-image), as diffusers'
    /// `set_begin_index`; a no-op for the classes that do not have it (DDPM, DDIM, PNDM), which
    /// look their position up from the timestep value anyway.
    fn set_begin_index(&mut self, begin_index: usize) {
        self.noise_levels().set_begin_index(begin_index);
    }

    /// What the model predicts.
    fn prediction_type(&self) -> PredictionType {
        self.noise_levels().prediction_type()
    }

    /// The clean sample x₀ implied by `model_output` at `timestep` for `sample` (same
    /// conventions as [`Scheduler::step`]), without any clipping or thresholding.
    fn pred_original_sample(
        &self,
        model_output: &Tensor,
        timestep: f64,
        sample: &Tensor,
    ) -> Result<Tensor> {
        self.noise_levels().pred_original_sample(model_output, timestep, sample)
    }

    /// The inverse of [`Scheduler::pred_original_sample`]: the model output implying
    /// `pred_original` (used to apply thresholding or guidance on x₀ uniformly).
    fn model_output_from_pred_original(
        &self,
        pred_original: &Tensor,
        timestep: f64,
        sample: &Tensor,
    ) -> Result<Tensor> {
        self.noise_levels().model_output_from_pred_original(pred_original, timestep, sample)
    }

    /// Whether the diffusers class supports `thresholding` in its own `step` (then the config
    /// decides and the pipeline should not threshold again): all but the k-diffusion ones and
    /// PNDM.
    fn supports_thresholding(&self) -> bool {
        self.noise_levels().supports_thresholding()
    }

    /// The k-diffusion sigmas of the current schedule (one more than the steps), for the
    /// samplers that keep one; `None` for the ᾱ-indexed ones (DDPM, DDIM, PNDM, LCM).
    fn sigmas(&self) -> Option<&[f32]> {
        self.noise_levels().sigmas()
    }
    /// Whether `step` takes a model output that also carries the predicted variance (twice
    /// the sample's channels, as DeepFloyd IF's U-Nets output): DDPM with a learned
    /// `variance_type` (it reads the variance) and the DPM-Solvers with one (they keep the
    /// first 3 channels). Every other sampler needs the pipeline to pass the prediction half
    /// only (diffusers' IF pipelines split when the config's `variance_type` is not learned).
    ///
    /// What an IF pipeline does with the 6-channel output (`pipeline_if.py`,
    /// `pipeline_if_superresolution.py`): guidance on the first 3 channels of `[uncond, cond]`
    /// only, the variance (last 3) taken from the conditional half, `[guided, variance]`
    /// concatenated back for a sampler where this is true, else the 3 guided channels alone.
    /// diffusers runs IF only with DDPM and the DPM-Solvers: every other class inherits
    /// `variance_type: "learned_range"` through `from_config` and fails on the shape. Stage II
    /// draws, from one generator, the initial noise, then the noise of the upscaled image
    /// (`image_noising_scheduler.add_noise` at `noise_level`, default 250, passed to the U-Net
    /// as `class_labels`, doubled under guidance), then each step's noise. Thresholding stays
    /// in the sampler (the pipeline does not threshold again).
    fn takes_learned_variance(&self) -> bool {
        false
    }
}

/// Sampling options that are call arguments in diffusers rather than config fields.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct SamplerOptions {
    /// DDIM's η (0 = deterministic DDIM, 1 = DDPM-like); ignored by the other samplers, as
    /// diffusers' pipelines only pass it to schedulers whose `step` takes it.
    pub eta: f64,
}

impl Default for SamplerOptions {
    fn default() -> Self {
        Self { eta: 0.0 }
    }
}

/// Samplers by their command-line names.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum SamplerKind {
    /// `ddpm`: DDPMScheduler.
    Ddpm,
    /// `ddim`: DDIMScheduler.
    Ddim,
    /// `pndm`: PNDMScheduler (PLMS, with Runge-Kutta warm-up unless `skip_prk_steps`).
    Pndm,
    /// `euler`: EulerDiscreteScheduler.
    Euler,
    /// `euler-a`: EulerAncestralDiscreteScheduler.
    EulerAncestral,
    /// `heun`: HeunDiscreteScheduler.
    Heun,
    /// `lms`: LMSDiscreteScheduler.
    Lms,
    /// `dpm++2m`: DPMSolverMultistepScheduler, dpmsolver++, order 2, no Karras sigmas.
    DpmPp2m,
    /// `dpm++2m-karras`: as `dpm++2m` with Karras sigmas.
    DpmPp2mKarras,
    /// `dpm++2m-sde`: DPMSolverMultistepScheduler, sde-dpmsolver++, order 2, no Karras sigmas.
    DpmPp2mSde,
    /// `dpm++2s`: DPMSolverSinglestepScheduler, dpmsolver++, order 2, no Karras sigmas.
    DpmPp2s,
    /// `unipc`: UniPCMultistepScheduler.
    UniPc,
    /// `lcm`: LCMScheduler.
    Lcm,
}

impl SamplerKind {
    /// Every sampler, in the order `--help` lists them.
    pub const ALL: &'static [SamplerKind] = &[
        Self::Ddpm,
        Self::Ddim,
        Self::Pndm,
        Self::Euler,
        Self::EulerAncestral,
        Self::Heun,
        Self::Lms,
        Self::DpmPp2m,
        Self::DpmPp2mKarras,
        Self::DpmPp2mSde,
        Self::DpmPp2s,
        Self::UniPc,
        Self::Lcm,
    ];

    /// The command-line name.
    pub fn name(self) -> &'static str {
        match self {
            Self::Ddpm => "ddpm",
            Self::Ddim => "ddim",
            Self::Pndm => "pndm",
            Self::Euler => "euler",
            Self::EulerAncestral => "euler-a",
            Self::Heun => "heun",
            Self::Lms => "lms",
            Self::DpmPp2m => "dpm++2m",
            Self::DpmPp2mKarras => "dpm++2m-karras",
            Self::DpmPp2mSde => "dpm++2m-sde",
            Self::DpmPp2s => "dpm++2s",
            Self::UniPc => "unipc",
            Self::Lcm => "lcm",
        }
    }

    /// The name AUTOMATIC1111 writes in an image's `parameters` (`Sampler: DPM++ 2M`).
    pub fn a1111_name(self) -> &'static str {
        match self {
            Self::Ddpm => "DDPM",
            Self::Ddim => "DDIM",
            Self::Pndm => "PLMS",
            Self::Euler => "Euler",
            Self::EulerAncestral => "Euler a",
            Self::Heun => "Heun",
            Self::Lms => "LMS",
            Self::DpmPp2m | Self::DpmPp2mKarras => "DPM++ 2M",
            Self::DpmPp2mSde => "DPM++ 2M SDE",
            Self::DpmPp2s => "DPM++ 2S",
            Self::UniPc => "UniPC",
            Self::Lcm => "LCM",
        }
    }

    /// AUTOMATIC1111's `Schedule type`, where it is not the sampler's default.
    pub fn a1111_schedule_type(self) -> Option<&'static str> {
        match self {
            Self::DpmPp2mKarras => Some("Karras"),
            _ => None,
        }
    }

    /// Whether the sampler reads [`SamplerOptions::eta`]: a property of its diffusers class
    /// ([`SchedulerClass::uses_eta`]).
    pub fn uses_eta(self) -> bool {
        self.scheduler_class().uses_eta()
    }

    /// All command-line names, for `--help` and error messages.
    pub fn names() -> Vec<&'static str> {
        Self::ALL.iter().map(|k| k.name()).collect()
    }

    /// The diffusers class this sampler is.
    pub fn scheduler_class(self) -> SchedulerClass {
        match self {
            Self::Ddpm => SchedulerClass::Ddpm,
            Self::Ddim => SchedulerClass::Ddim,
            Self::Pndm => SchedulerClass::Pndm,
            Self::Euler => SchedulerClass::EulerDiscrete,
            Self::EulerAncestral => SchedulerClass::EulerAncestralDiscrete,
            Self::Heun => SchedulerClass::HeunDiscrete,
            Self::Lms => SchedulerClass::LmsDiscrete,
            Self::DpmPp2m | Self::DpmPp2mKarras | Self::DpmPp2mSde => {
                SchedulerClass::DpmSolverMultistep
            }
            Self::DpmPp2s => SchedulerClass::DpmSolverSinglestep,
            Self::UniPc => SchedulerClass::UniPcMultistep,
            Self::Lcm => SchedulerClass::Lcm,
        }
    }

    /// The config overrides the name implies (the `from_config(..., **kwargs)` diffusers' docs
    /// use for "DPM++ 2M Karras" and friends); the rest of the config is kept.
    pub fn apply_overrides(self, cfg: &mut SchedulerConfig) {
        let dpm = |cfg: &mut SchedulerConfig, algorithm: DpmAlgorithm, karras: bool| {
            cfg.algorithm_type = Some(algorithm.as_str().to_owned());
            cfg.solver_order = Some(2);
            cfg.use_karras_sigmas = Some(karras);
        };
        match self {
            Self::DpmPp2m | Self::DpmPp2s => dpm(cfg, DpmAlgorithm::DpmSolverPlusPlus, false),
            Self::DpmPp2mKarras => dpm(cfg, DpmAlgorithm::DpmSolverPlusPlus, true),
            Self::DpmPp2mSde => dpm(cfg, DpmAlgorithm::SdeDpmSolverPlusPlus, false),
            _ => {}
        }
    }
}

impl std::fmt::Display for SamplerKind {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.name())
    }
}

/// An unknown sampler name; the message lists the known ones.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("unknown sampler {name:?} (known samplers: {})", SamplerKind::names().join(", "))]
pub struct UnknownSampler {
    /// The name that was given.
    pub name: String,
}

impl FromStr for SamplerKind {
    type Err = UnknownSampler;

    fn from_str(s: &str) -> std::result::Result<Self, Self::Err> {
        Self::ALL
            .iter()
            .copied()
            .find(|k| k.name() == s)
            .ok_or_else(|| UnknownSampler { name: s.to_owned() })
    }
}

/// Builds the sampler a model ships: the class its `scheduler_config.json` names.
pub fn load_scheduler(path: &Path) -> Result<Box<dyn Scheduler>> {
    let cfg = SchedulerConfig::load(path)?;
    build(&cfg, None, &SamplerOptions::default()).map_err(|e| with_path(e, path))
}

/// Builds sampler `kind` from a (possibly other class's) config, as diffusers' `from_config`.
pub fn build_scheduler(kind: SamplerKind, cfg: &SchedulerConfig) -> Result<Box<dyn Scheduler>> {
    build(cfg, Some(kind), &SamplerOptions::default())
}

/// The general builder: `kind` overrides the config's `_class_name` (a swap, with the kind's
/// config overrides); `None` builds the class the config names.
pub fn build(
    cfg: &SchedulerConfig,
    kind: Option<SamplerKind>,
    options: &SamplerOptions,
) -> Result<Box<dyn Scheduler>> {
    let mut cfg = cfg.clone();
    let class = match kind {
        Some(kind) => {
            kind.apply_overrides(&mut cfg);
            kind.scheduler_class()
        }
        None => cfg.scheduler_class()?,
    };
    build_class(class, &cfg, options).map_err(Error::InvalidConfig)
}

fn build_class(
    class: SchedulerClass,
    cfg: &SchedulerConfig,
    options: &SamplerOptions,
) -> std::result::Result<Box<dyn Scheduler>, ConfigError> {
    Ok(match class {
        SchedulerClass::Ddpm => Box::new(DDPMScheduler::from_config(cfg)?),
        SchedulerClass::Ddim => Box::new(DDIMScheduler::from_config(cfg, options.eta)?),
        SchedulerClass::Pndm => Box::new(PNDMScheduler::from_config(cfg)?),
        SchedulerClass::EulerDiscrete => Box::new(EulerDiscreteScheduler::from_config(cfg)?),
        SchedulerClass::EulerAncestralDiscrete => {
            Box::new(EulerAncestralDiscreteScheduler::from_config(cfg)?)
        }
        SchedulerClass::HeunDiscrete => Box::new(HeunDiscreteScheduler::from_config(cfg)?),
        SchedulerClass::LmsDiscrete => Box::new(LMSDiscreteScheduler::from_config(cfg)?),
        SchedulerClass::DpmSolverMultistep => {
            Box::new(DPMSolverMultistepScheduler::from_config(cfg)?)
        }
        SchedulerClass::DpmSolverSinglestep => {
            Box::new(DPMSolverSinglestepScheduler::from_config(cfg)?)
        }
        SchedulerClass::UniPcMultistep => Box::new(UniPCMultistepScheduler::from_config(cfg)?),
        SchedulerClass::Lcm => Box::new(LCMScheduler::from_config(cfg)?),
    })
}

/// Attaches the config file to a validation error.
fn with_path(err: Error, path: &Path) -> Error {
    match err {
        Error::InvalidConfig(source) => Error::Config { path: path.to_path_buf(), source },
        other => other,
    }
}

/// The error for a zero or too-large step count.
pub(crate) fn check_steps(num_inference_steps: usize, max: usize) -> Result<()> {
    if num_inference_steps == 0 {
        return Err(Error::msg("num_inference_steps must be at least 1"));
    }
    if num_inference_steps > max {
        return Err(Error::msg(format!(
            "num_inference_steps {num_inference_steps} is more than this scheduler can take ({max})"
        )));
    }
    Ok(())
}

/// The error for `step` before `set_timesteps`.
pub(crate) fn not_ready(class: &str) -> Error {
    Error::msg(format!("{class}: call set_timesteps before step"))
}
