//! DPM-Solver++ singlestep (Lu et al. 2022, algorithm 1 for DPM-Solver++(2S)/(3S)), as
//! diffusers' `DPMSolverSinglestepScheduler`.
//!
//! Notation as in [`crate::DPMSolverMultistepScheduler`]. Singlestep solvers group the
//! timesteps by the order list (e.g. `[1, 2, 1, 2, …]` for order 2): the group starts from the
//! sample `x_s` at its first timestep and every step of the group restarts from `x_s`, using
//! the model outputs at the group's intermediate timesteps. One model evaluation per timestep.
//!
//! Step:
//! 1. Convert the model output to x₀ (then threshold); push it into the history. With a
//!    learned `variance_type` and ε prediction only the first 3 channels count (diffusers'
//!    `[:, :3]`, see [`crate::DPMSolverMultistepScheduler`]).
//! 2. The order is the order list's entry (lowered while the history is short, e.g. when
//!    starting part-way for image-to-image); at order 1 the group's start sample is stored.
//! 3. 1st order: eq. 5 from x_s. 2nd order (2S): from x_s at σₛ₁ with D0 = m1,
//!    D1 = (m0 − m1)/r0, r0 = (λₛ₀ − λₛ₁)/(λₜ − λₛ₁). 3rd order (3S): from x_s at σₛ₂ with the
//!    divided differences of appendix B.
//!
//! `lower_order_final` is forced on (and stays on, as diffusers rewrites its config) when the
//! step count is not a multiple of the order or the final sigma is zero.

use candle_core::Tensor;
use ltd_nn::{ConfigError, Error, Result};

use crate::config::{
    DpmSolverType, FinalSigmasType, PredictionType, SchedulerConfig, Unimplemented,
};
use crate::dpm_multistep::{
    clipped_timesteps, mean_output, read_learned_variance, read_solver_order, vp_lambda, DpmFormula,
};
use crate::ops::{div, lincomb, scale, History};
use crate::prediction::vp_x0;
use crate::schedule::{
    np_linspace, np_round, vp_alpha_sigma, BetaConfig, BetaDefaults, DEFAULT_BETAS,
};
use crate::sigma_schedule::SolverSchedule;
use crate::threshold::SampleClamp;
use crate::{check_steps, NoiseLevels, Scheduler, StepInput};

/// diffusers' `DPMSolverSinglestepScheduler` (algorithms `dpmsolver++` and `sde-dpmsolver++`).
#[derive(Debug, Clone)]
pub struct DPMSolverSinglestepScheduler {
    formula: DpmFormula,
    solver_order: usize,
    prediction: PredictionType,
    /// `variance_type` is learned: the model output carries the variance after the mean.
    learned_variance: bool,
    clamp: SampleClamp,
    lower_order_final: bool,
    schedule: SolverSchedule,
    /// How many of the last training timesteps `lambda_min_clipped` cuts off.
    clipped: usize,
    order_list: Vec<usize>,
    model_outputs: History,
    group_sample: Option<Tensor>,
}

impl DPMSolverSinglestepScheduler {
    /// Reads the fields `DPMSolverSinglestepScheduler.__init__` takes, with its defaults.
    pub fn from_config(cfg: &SchedulerConfig) -> std::result::Result<Self, ConfigError> {
        cfg.reject_unimplemented(Unimplemented::SOLVER)?;
        let solver_order = read_solver_order(cfg)?;
        let defaults = BetaDefaults { reads_zero_snr: false, ..DEFAULT_BETAS };
        let alphas_cumprod = BetaConfig::read(cfg, &defaults)?.alphas_cumprod();
        Ok(Self {
            formula: DpmFormula::read(cfg)?,
            solver_order,
            prediction: cfg.prediction_type()?,
            learned_variance: read_learned_variance(cfg)?,
            clamp: SampleClamp::read(cfg, None)?,
            lower_order_final: cfg.lower_order_final.unwrap_or(false),
            clipped: clipped_timesteps(cfg, &alphas_cumprod),
            schedule: SolverSchedule::read(cfg, alphas_cumprod)?,
            order_list: Vec::new(),
            model_outputs: History::new(solver_order, "DPMSolverSinglestepScheduler"),
            group_sample: None,
        })
    }

    /// diffusers' `get_order_list`.
    fn order_list(&self, steps: usize) -> Vec<usize> {
        let order = self.solver_order;
        let mut orders: Vec<usize> = if self.lower_order_final {
            match order {
                3 => {
                    let mut v: Vec<usize> = match steps % 3 {
                        0 => [1, 2, 3].repeat((steps / 3).saturating_sub(1)),
                        _ => [1, 2, 3].repeat(steps / 3),
                    };
                    v.extend_from_slice(match steps % 3 {
                        0 => &[1, 2, 1],
                        1 => &[1],
                        _ => &[1, 2],
                    });
                    v
                }
                2 => {
                    if steps.is_multiple_of(2) {
                        let mut v = [1, 2].repeat(steps / 2 - 1);
                        v.extend([1, 1]);
                        v
                    } else {
                        let mut v = [1, 2].repeat(steps / 2);
                        v.push(1);
                        v
                    }
                }
                _ => vec![1; steps],
            }
        } else {
            match order {
                3 => [1, 2, 3].repeat(steps / 3),
                2 => [1, 2].repeat(steps / 2),
                _ => vec![1; steps],
            }
        };
        if self.schedule.final_sigmas == FinalSigmasType::Zero {
            if let Some(last) = orders.last_mut() {
                *last = 1;
            }
        }
        orders
    }

    fn update(&self, order: usize, i: usize, x: &Tensor, z: Option<&Tensor>) -> Result<Tensor> {
        let (f, sigmas) = (self.formula, &self.schedule.sigmas);
        let sigma_t = sigmas[i + 1];
        let lam = |k: usize| vp_lambda(sigmas[k]).2;
        match order {
            1 => f.first_order(sigma_t, sigmas[i], x, self.model_outputs.get(0)?, z),
            2 => {
                let (m0, m1) = (self.model_outputs.get(0)?, self.model_outputs.get(1)?);
                let (lambda_t, lambda_s0, lambda_s1) = (lam(i + 1), lam(i), lam(i - 1));
                let (h, h0) = (lambda_t - lambda_s1, lambda_s0 - lambda_s1);
                let d1 = scale(&(m0 - m1)?, 1.0 / (h0 / h))?;
                f.second_order_terms(f.solver_type, sigma_t, sigmas[i - 1], h, x, m1, &d1, z)
            }
            _ => {
                let (m0, m1, m2) = (
                    self.model_outputs.get(0)?,
                    self.model_outputs.get(1)?,
                    self.model_outputs.get(2)?,
                );
                let (lambda_t, lambda_s0, lambda_s1, lambda_s2) =
                    (lam(i + 1), lam(i), lam(i - 1), lam(i - 2));
                let h = lambda_t - lambda_s2;
                let (r0, r1) = ((lambda_s0 - lambda_s2) / h, (lambda_s1 - lambda_s2) / h);
                let d1_0 = scale(&(m1 - m2)?, 1.0 / r1)?;
                let d1_1 = scale(&(m0 - m2)?, 1.0 / r0)?;
                let sigma_s2 = sigmas[i - 2];
                match f.solver_type {
                    // The midpoint 3S update has the Heun-form 2nd-order shape in D0, D1_1.
                    DpmSolverType::Midpoint => f.second_order_terms(
                        DpmSolverType::Heun,
                        sigma_t,
                        sigma_s2,
                        h,
                        x,
                        m2,
                        &d1_1,
                        z,
                    ),
                    DpmSolverType::Heun => {
                        let d1 = div(&lincomb(&[(r0, &d1_0), (-r1, &d1_1)])?, r0 - r1)?;
                        let d2 = div(&scale(&(&d1_1 - &d1_0)?, 2.0)?, r0 - r1)?;
                        f.third_order_terms(sigma_t, sigma_s2, h, [x, m2, &d1, &d2], z)
                    }
                }
            }
        }
    }
}

impl Scheduler for DPMSolverSinglestepScheduler {
    fn class_name(&self) -> &'static str {
        "DPMSolverSinglestepScheduler"
    }

    fn takes_learned_variance(&self) -> bool {
        self.learned_variance
    }

    fn set_timesteps(&mut self, n: usize) -> Result<()> {
        check_steps(n, usize::MAX)?;
        let num_train = self.schedule.alphas_cumprod.len();
        let spaced: Vec<f64> = np_linspace(0.0, (num_train - 1 - self.clipped) as f64, n + 1)
            .into_iter()
            .rev()
            .take(n)
            .map(np_round)
            .collect();
        self.schedule.set_timesteps(spaced, n);
        self.model_outputs.clear();
        self.group_sample = None;
        if !self.lower_order_final
            && (!n.is_multiple_of(self.solver_order)
                || self.schedule.final_sigmas == FinalSigmasType::Zero)
        {
            tracing::debug!("DPMSolverSinglestepScheduler: turning lower_order_final on");
            self.lower_order_final = true;
        }
        self.order_list = self.order_list(n);
        Ok(())
    }

    fn step_f32(&mut self, input: StepInput<'_>) -> Result<Tensor> {
        let StepInput { model_output: out, timestep, sample: x, mut noise } = input;
        let i = self.schedule.begin_step(self.class_name(), timestep)?;
        // 1.
        let (alpha, sigma) = vp_alpha_sigma(self.schedule.sigmas[i]);
        let out = mean_output(out, self.learned_variance, self.prediction)?;
        let x0 = vp_x0(self.prediction, &out, &x, alpha, sigma)?;
        let x0 = self.clamp.apply(&x0)?;
        // diffusers draws in the shape of the converted output, x₀.
        let z = if self.formula.sde() {
            Some(noise.like_model_output_shaped(x0.dims())?)
        } else {
            None
        };
        self.model_outputs.push(x0);
        // 2.
        let mut order = self.order_list.get(i).copied().unwrap_or(1);
        while order > 1 && !self.model_outputs.has(order - 1) {
            order -= 1;
        }
        if order == 1 {
            self.group_sample = Some(x);
        }
        // 3.
        let start = self
            .group_sample
            .clone()
            .ok_or_else(|| Error::msg("DPMSolverSinglestepScheduler: missing group sample"))?;
        let prev = self.update(order, i, &start, z.as_ref())?;
        self.schedule.index.advance();
        Ok(prev)
    }

    fn noise_levels(&self) -> NoiseLevels<'_> {
        self.schedule.noise_levels(self.prediction)
    }
}
