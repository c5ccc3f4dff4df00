//! The sigma schedules of the samplers that keep one, with diffusers' step-index bookkeeping:
//! [`KSchedule`] for the k-diffusion classes (Euler, Euler a, Heun, LMS) and
//! [`SolverSchedule`] for the multistep solvers (DPM-Solver multi/singlestep, UniPC). Each holds
//! how its class lays the schedule out (read from the config), the current sigmas and
//! timesteps, and the step index, so that a sampler keeps only its own update's state.

use ltd_nn::{ConfigError, Result};

use crate::config::{
    FinalSigmasType, InterpolationType, PredictionType, SchedulerConfig, TimestepSpacing,
};
use crate::ops::{Lookup, StepIndex};
use crate::schedule::{
    k_timesteps, karras_sigmas, log_f32, np_interp, np_round, sigma_to_t, torch_linspace_f32,
    train_sigmas,
};
use crate::NoiseLevels;

/// A k-diffusion class's schedule: the timesteps by `timestep_spacing`, σ interpolated in the
/// training sigmas (or spread log-linearly), optionally re-spread à la Karras (eq. 5, ρ = 7)
/// with the timesteps mapped back through log σ, then the final σ. A timestep not in the
/// schedule is an error, as in diffusers' k-diffusion classes.
#[derive(Debug, Clone)]
pub(crate) struct KSchedule {
    pub spacing: TimestepSpacing,
    pub steps_offset: i64,
    /// `interpolation_type` (Euler; the others interpolate linearly).
    pub interpolation: InterpolationType,
    /// `use_karras_sigmas` (not Euler a).
    pub karras: bool,
    /// The Karras bounds (Euler); `None` takes the ends of the interpolated sigmas.
    pub sigma_min: Option<f64>,
    pub sigma_max: Option<f64>,
    /// `final_sigmas_type` (Euler; the others end at 0).
    pub final_sigmas: FinalSigmasType,
    /// ᾱ over the training timesteps.
    pub alphas_cumprod: Vec<f32>,
    /// The current sigmas, one more than the timesteps.
    pub sigmas: Vec<f32>,
    pub timesteps: Vec<f64>,
    pub index: StepIndex,
}

impl KSchedule {
    /// The fields every k-diffusion class reads (`timestep_spacing`, default `linspace`, and
    /// `steps_offset`); the rest as for a class that does not read them. No schedule yet.
    pub fn read(
        cfg: &SchedulerConfig,
        alphas_cumprod: Vec<f32>,
    ) -> std::result::Result<Self, ConfigError> {
        Ok(Self {
            spacing: cfg.timestep_spacing(TimestepSpacing::Linspace)?,
            steps_offset: cfg.steps_offset.unwrap_or(0),
            interpolation: InterpolationType::Linear,
            karras: false,
            sigma_min: None,
            sigma_max: None,
            final_sigmas: FinalSigmasType::Zero,
            alphas_cumprod,
            sigmas: Vec::new(),
            timesteps: Vec::new(),
            index: StepIndex::default(),
        })
    }

    /// The schedule `__init__` leaves in Euler and Euler a: every training timestep, descending,
    /// with its sigma, then 0.
    pub fn with_training_schedule(mut self) -> Self {
        let mut sigmas = train_sigmas(&self.alphas_cumprod);
        sigmas.reverse();
        sigmas.push(0.0);
        self.sigmas = sigmas;
        self.timesteps = (0..self.alphas_cumprod.len()).rev().map(|t| t as f64).collect();
        self
    }

    /// Lays out `n` inference steps: float32 sigmas (the final one included) and timesteps
    /// (float32 values); resets the step index.
    pub fn set_timesteps(&mut self, n: usize) {
        let num_train = self.alphas_cumprod.len();
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
        let last = self.final_sigmas.value(train[0]);
        self.sigmas = sigmas.iter().map(|&s| s as f32).chain([last]).collect();
        self.timesteps = timesteps.iter().map(|&t| f64::from(t as f32)).collect();
        self.index = StepIndex::default();
    }

    /// Starts a step at `timestep`: commits the step index and returns it with its sigma.
    pub fn begin_step(&mut self, timestep: f64) -> Result<(usize, f32)> {
        let i = self.index.init(timestep, &self.timesteps, Lookup::Strict)?;
        Ok((i, self.sigmas[i]))
    }

    /// The noise levels of the current schedule.
    pub fn noise_levels(&self, prediction: PredictionType) -> NoiseLevels<'_> {
        NoiseLevels::k_sigmas(prediction, &self.sigmas, &self.timesteps, &self.index)
            .timestep_spacing(self.spacing)
    }
}

/// A solver's schedule: sigmas at the integer timesteps it chose, interpolated in the training
/// sigmas, or Karras sigmas (eq. 5, ρ = 7) with the timesteps mapped back through log σ; then
/// the final sigma. Empty until `set_timesteps`; a timestep not in the schedule means the last
/// step, as in diffusers' solvers.
#[derive(Debug, Clone)]
pub(crate) struct SolverSchedule {
    /// `use_karras_sigmas`.
    pub karras: bool,
    /// The Karras bounds (UniPC); `None` takes the ends of the training sigmas.
    pub sigma_min: Option<f64>,
    pub sigma_max: Option<f64>,
    /// Whether the Karras timesteps are rounded (all but DPM-Solver multistep on a
    /// `squaredcos_cap_v2` schedule, which only truncates them).
    pub round_karras_timesteps: bool,
    /// `final_sigmas_type`.
    pub final_sigmas: FinalSigmasType,
    /// Whether a `sigma_min` final sigma is the last Karras sigma (UniPC) rather than the
    /// smallest training sigma, under Karras spacing.
    pub final_from_karras: bool,
    /// ᾱ over the training timesteps.
    pub alphas_cumprod: Vec<f32>,
    /// The current sigmas (the training sigmas before `set_timesteps`).
    pub sigmas: Vec<f32>,
    pub timesteps: Vec<f64>,
    pub index: StepIndex,
}

impl SolverSchedule {
    /// The fields every solver reads (`use_karras_sigmas`, `final_sigmas_type`); the rest as
    /// DPM-Solver has them.
    pub fn read(
        cfg: &SchedulerConfig,
        alphas_cumprod: Vec<f32>,
    ) -> std::result::Result<Self, ConfigError> {
        Ok(Self {
            karras: cfg.use_karras_sigmas.unwrap_or(false),
            sigma_min: None,
            sigma_max: None,
            round_karras_timesteps: true,
            final_sigmas: cfg.final_sigmas_type()?,
            final_from_karras: false,
            sigmas: train_sigmas(&alphas_cumprod),
            alphas_cumprod,
            timesteps: Vec::new(),
            index: StepIndex::default(),
        })
    }

    /// Lays out `n` steps at the timesteps `spaced`: float32 sigmas (the final one included)
    /// and integer timesteps (as `int64` truncates); resets the step index.
    pub fn set_timesteps(&mut self, spaced: Vec<f64>, n: usize) {
        let train = train_sigmas(&self.alphas_cumprod);
        let (sigmas, timesteps, last) = if self.karras {
            let log_sigmas = log_f32(&train);
            let sigma_min = self.sigma_min.unwrap_or(f64::from(train[0]));
            let sigma_max = self.sigma_max.unwrap_or(f64::from(train[train.len() - 1]));
            let sigmas = karras_sigmas(sigma_min, sigma_max, n);
            let ts = sigmas
                .iter()
                .map(|&s| sigma_to_t(s, &log_sigmas))
                .map(|t| if self.round_karras_timesteps { np_round(t) } else { t })
                .collect();
            let smallest = if self.final_from_karras { sigmas[n - 1] as f32 } else { train[0] };
            (sigmas, ts, self.final_sigmas.value(smallest))
        } else {
            let sigmas = spaced.iter().map(|&t| np_interp(t, &train)).collect();
            (sigmas, spaced, self.final_sigmas.value(train[0]))
        };
        self.sigmas = sigmas.iter().map(|&s| s as f32).chain([last]).collect();
        self.timesteps = timesteps.iter().map(|&t| t.trunc()).collect();
        self.index = StepIndex::default();
    }

    /// Starts a step at `timestep` and commits the step index; before `set_timesteps`, the
    /// error `step` gives for `class`.
    pub fn begin_step(&mut self, class: &str, timestep: f64) -> Result<usize> {
        self.index.init_scheduled(class, timestep, &self.timesteps, Lookup::LastIfMissing)
    }

    /// The noise levels of the current schedule.
    pub fn noise_levels(&self, prediction: PredictionType) -> NoiseLevels<'_> {
        NoiseLevels::vp_sigmas(prediction, &self.sigmas, &self.timesteps, &self.index)
    }
}
