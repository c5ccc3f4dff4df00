//! DPM-Solver++ multistep (Lu et al. 2022, "DPM-Solver++: Fast Solver for Guided Sampling of
//! Diffusion Probabilistic Models"), deterministic and SDE, as diffusers'
//! `DPMSolverMultistepScheduler`.
//!
//! | code               | paper |
//! |--------------------|-------|
//! | `alpha_t`,`sigma_t`| αₜ, σₜ of the VP process, from the k-sigma: α = 1/√(σ²+1), σₜ = σα |
//! | `lambda`           | λₜ = ln(αₜ/σₜ), the half log-SNR |
//! | `h`                | hᵢ = λₜᵢ − λₜᵢ₋₁ |
//! | `m0, m1, m2`       | the data predictions x_θ at the last three timesteps, newest first |
//! | `r0, r1`           | rᵢ = hᵢ₋₁/hᵢ |
//! | `d0, d1, d2`       | the divided differences of algorithm 2 / eq. (5)-(6) |
//!
//! Step:
//! 1. Convert the model output to x₀ (then threshold it if configured); with a learned
//!    `variance_type` and ε prediction, only the first 3 channels (diffusers' `[:, :3]`).
//! 2. Shift it into the history; draw z for the SDE variant.
//! 3. Take the highest-order update the history allows: first order on the first step, at the
//!    final step (when `euler_at_final`, when `final_sigmas_type` is `zero`, or when
//!    `lower_order_final` and fewer than 15 steps) and when `solver_order` is 1; second order on
//!    the second step and the penultimate one under `lower_order_final`; else third.
//!    - 1st order (eq. 5): xₜ = (σₜ/σₛ) x − αₜ (e^{−h} − 1) x₀.
//!    - 2nd order multistep (algorithm 2, midpoint or Heun form).
//!    - 3rd order multistep (appendix B).
//!    - SDE variants (Lu et al. 2022b, eq. 19–20): x scaled by e^{−h} as well, (1 − e^{−2h})
//!      weights, plus σₜ √(1 − e^{−2h}) z.

use candle_core::Tensor;
use ltd_nn::{ConfigError, Result};

use crate::config::{
    DpmAlgorithm, DpmSolverType, FinalSigmasType, PredictionType, SchedulerConfig, TimestepSpacing,
    Unimplemented,
};
use crate::ops::{lincomb, History};
use crate::prediction::vp_x0;
use crate::schedule::{
    fix_terminal_alpha, lambda, solver_timesteps, vp_alpha_sigma, BetaConfig, DEFAULT_BETAS,
};
use crate::sigma_schedule::SolverSchedule;
use crate::threshold::SampleClamp;
use crate::{check_steps, BetaSchedule, NoiseLevels, Scheduler, StepInput};

/// The update formulas DPM-Solver multistep and singlestep share.
#[derive(Debug, Clone, Copy, PartialEq)]
pub(crate) struct DpmFormula {
    pub algorithm: DpmAlgorithm,
    pub solver_type: DpmSolverType,
}

/// `solver_order` (1–3, default 2) of the DPM-Solvers.
pub(crate) fn read_solver_order(cfg: &SchedulerConfig) -> std::result::Result<usize, ConfigError> {
    let solver_order = cfg.solver_order.unwrap_or(2);
    if !(1..=3).contains(&solver_order) {
        return Err(ConfigError::unsupported("solver_order", solver_order));
    }
    Ok(solver_order)
}

/// `variance_type` as the DPM-Solvers read it: `learned` / `learned_range` (a model that also
/// predicts its variance, DeepFloyd IF) means an ε prediction keeps only `model_output[:, :3]`;
/// DDPM's fixed variances (a DDPM config swapped in) mean nothing to them, as in diffusers.
pub(crate) fn read_learned_variance(
    cfg: &SchedulerConfig,
) -> std::result::Result<bool, ConfigError> {
    match cfg.variance_type.as_deref() {
        None | Some("fixed_small" | "fixed_small_log" | "fixed_large" | "fixed_large_log") => {
            Ok(false)
        }
        Some("learned" | "learned_range") => Ok(true),
        Some(other) => Err(ConfigError::unsupported("variance_type", other)),
    }
}

/// diffusers' `model_output[:, :3]` for a learned variance under ε prediction: DPM-Solver
/// needs only the mean. diffusers hardcodes the 3 pixel channels of DeepFloyd IF.
pub(crate) fn mean_output(
    out: Tensor,
    learned_variance: bool,
    prediction: PredictionType,
) -> Result<Tensor> {
    if learned_variance && prediction == PredictionType::Epsilon {
        return Ok(out.narrow(1, 0, 3)?);
    }
    Ok(out)
}

/// αₜ, σₜ and λₜ for a k-sigma, in float32 as torch computes them.
pub(crate) fn vp_lambda(sigma: f32) -> (f32, f32, f32) {
    let (alpha, sigma_t) = vp_alpha_sigma(sigma);
    (alpha, sigma_t, lambda(alpha, sigma_t))
}

impl DpmFormula {
    /// Reads `algorithm_type` and `solver_type` with diffusers' aliases (`deis` →
    /// `dpmsolver++`; UniPC's `logrho`/`bh1`/`bh2` → `midpoint`).
    pub(crate) fn read(cfg: &SchedulerConfig) -> std::result::Result<Self, ConfigError> {
        let algorithm = cfg.dpm_algorithm_type()?;
        let solver_type = cfg.dpm_solver_type()?;
        Ok(Self { algorithm, solver_type })
    }

    pub(crate) fn sde(self) -> bool {
        self.algorithm == DpmAlgorithm::SdeDpmSolverPlusPlus
    }

    /// First-order update from `sigma_s` to `sigma_t`.
    pub(crate) fn first_order(
        self,
        sigma_t: f32,
        sigma_s: f32,
        x: &Tensor,
        m0: &Tensor,
        z: Option<&Tensor>,
    ) -> Result<Tensor> {
        let (alpha_t, sig_t, lambda_t) = vp_lambda(sigma_t);
        let (_, sig_s, lambda_s) = vp_lambda(sigma_s);
        let h = lambda_t - lambda_s;
        match (self.algorithm, z) {
            (DpmAlgorithm::SdeDpmSolverPlusPlus, Some(z)) => lincomb(&[
                (sig_t / sig_s * (-h).exp(), x),
                (alpha_t * (1.0 - (-2.0 * h).exp()), m0),
                (sig_t * (1.0 - (-2.0 * h).exp()).sqrt(), z),
            ]),
            _ => lincomb(&[(sig_t / sig_s, x), (-(alpha_t * ((-h).exp() - 1.0)), m0)]),
        }
    }

    /// Second-order update: `x` at `sigma_s0`, with `d0` and the divided difference `d1`
    /// (already divided by r0) over step `h` to `sigma_t`, in the `solver` form.
    #[allow(clippy::too_many_arguments)]
    pub(crate) fn second_order_terms(
        self,
        solver: DpmSolverType,
        sigma_t: f32,
        sigma_s0: f32,
        h: f32,
        x: &Tensor,
        d0: &Tensor,
        d1: &Tensor,
        z: Option<&Tensor>,
    ) -> Result<Tensor> {
        let (alpha_t, sig_t, _) = vp_lambda(sigma_t);
        let (_, sig_s0, _) = vp_lambda(sigma_s0);
        let em = (-h).exp() - 1.0;
        match (self.algorithm, solver, z) {
            (DpmAlgorithm::SdeDpmSolverPlusPlus, solver, Some(z)) => {
                let e2 = 1.0 - (-2.0 * h).exp();
                let c1 = match solver {
                    DpmSolverType::Midpoint => 0.5 * (alpha_t * e2),
                    DpmSolverType::Heun => alpha_t * (e2 / (-2.0 * h) + 1.0),
                };
                lincomb(&[
                    (sig_t / sig_s0 * (-h).exp(), x),
                    (alpha_t * e2, d0),
                    (c1, d1),
                    (sig_t * e2.sqrt(), z),
                ])
            }
            (_, DpmSolverType::Midpoint, _) => lincomb(&[
                (sig_t / sig_s0, x),
                (-(alpha_t * em), d0),
                (-(0.5 * (alpha_t * em)), d1),
            ]),
            (_, DpmSolverType::Heun, _) => lincomb(&[
                (sig_t / sig_s0, x),
                (-(alpha_t * em), d0),
                (alpha_t * (em / h + 1.0), d1),
            ]),
        }
    }

    /// The third-order update's x, D0, D1, D2 weights (DPM-Solver++ form, appendix B).
    pub(crate) fn third_order_terms(
        self,
        sigma_t: f32,
        sigma_s0: f32,
        h: f32,
        terms: [&Tensor; 4],
        z: Option<&Tensor>,
    ) -> Result<Tensor> {
        let [x, d0, d1, d2] = terms;
        let (alpha_t, sig_t, _) = vp_lambda(sigma_t);
        let (_, sig_s0, _) = vp_lambda(sigma_s0);
        match z {
            Some(z) if self.sde() => {
                let e2 = 1.0 - (-2.0 * h).exp();
                let hh = -2.0 * h;
                lincomb(&[
                    (sig_t / sig_s0 * (-h).exp(), x),
                    (alpha_t * e2, d0),
                    (alpha_t * (e2 / hh + 1.0), d1),
                    (alpha_t * ((e2 + hh) / (hh * hh) - 0.5), d2),
                    (sig_t * e2.sqrt(), z),
                ])
            }
            _ => {
                let em = (-h).exp() - 1.0;
                lincomb(&[
                    (sig_t / sig_s0, x),
                    (-(alpha_t * em), d0),
                    (alpha_t * (em / h + 1.0), d1),
                    (-(alpha_t * ((em + h) / (h * h) - 0.5)), d2),
                ])
            }
        }
    }
}

/// diffusers' `DPMSolverMultistepScheduler` (algorithms `dpmsolver++` and `sde-dpmsolver++`).
#[derive(Debug, Clone)]
pub struct DPMSolverMultistepScheduler {
    formula: DpmFormula,
    solver_order: usize,
    prediction: PredictionType,
    /// `variance_type` is learned: the model output carries the variance after the mean.
    learned_variance: bool,
    clamp: SampleClamp,
    lower_order_final: bool,
    euler_at_final: bool,
    schedule: SolverSchedule,
    /// How many of the last training timesteps `lambda_min_clipped` cuts off.
    clipped: usize,
    spacing: TimestepSpacing,
    steps_offset: i64,
    model_outputs: History,
    lower_order_nums: usize,
}

impl DPMSolverMultistepScheduler {
    /// Reads the fields `DPMSolverMultistepScheduler.__init__` takes, with its defaults.
    pub fn from_config(cfg: &SchedulerConfig) -> std::result::Result<Self, ConfigError> {
        use Unimplemented::*;
        cfg.reject_unimplemented(&[
            ExponentialSigmas,
            BetaSigmas,
            LuLambdas,
            FlowSigmas,
            DynamicShifting,
        ])?;
        let solver_order = read_solver_order(cfg)?;
        let betas = BetaConfig::read(cfg, &DEFAULT_BETAS)?;
        let mut alphas_cumprod = betas.alphas_cumprod();
        fix_terminal_alpha(&mut alphas_cumprod, betas.rescale_betas_zero_snr);
        Ok(Self {
            formula: DpmFormula::read(cfg)?,
            solver_order,
            prediction: cfg.prediction_type()?,
            learned_variance: read_learned_variance(cfg)?,
            clamp: SampleClamp::read(cfg, None)?,
            lower_order_final: cfg.lower_order_final.unwrap_or(true),
            euler_at_final: cfg.euler_at_final.unwrap_or(false),
            clipped: clipped_timesteps(cfg, &alphas_cumprod),
            schedule: SolverSchedule {
                round_karras_timesteps: betas.beta_schedule != BetaSchedule::SquaredCosCapV2,
                ..SolverSchedule::read(cfg, alphas_cumprod)?
            },
            spacing: cfg.timestep_spacing(TimestepSpacing::Linspace)?,
            steps_offset: cfg.steps_offset.unwrap_or(0),
            model_outputs: History::new(solver_order, "DPMSolverMultistepScheduler"),
            lower_order_nums: 0,
        })
    }
}

/// How many of the last training timesteps `lambda_min_clipped` cuts off:
/// `torch.searchsorted(torch.flip(lambda_t), lambda_min_clipped)`, the number of flipped
/// λₜ = ln √ᾱₜ − ln √(1−ᾱₜ) below it.
pub(crate) fn clipped_timesteps(cfg: &SchedulerConfig, alphas_cumprod: &[f32]) -> usize {
    let value = cfg.lambda_min_clipped.unwrap_or(f64::NEG_INFINITY);
    let lambdas = alphas_cumprod.iter().map(|&a| lambda(a.sqrt(), (1.0 - a).sqrt()));
    lambdas.rev().take_while(|&l| f64::from(l) < value).count()
}

impl Scheduler for DPMSolverMultistepScheduler {
    fn class_name(&self) -> &'static str {
        "DPMSolverMultistepScheduler"
    }

    fn takes_learned_variance(&self) -> bool {
        self.learned_variance
    }

    fn set_timesteps(&mut self, n: usize) -> Result<()> {
        check_steps(n, usize::MAX)?;
        let num_train = self.schedule.alphas_cumprod.len();
        let last_timestep = num_train - self.clipped;
        let spaced = solver_timesteps(self.spacing, num_train, last_timestep, n, self.steps_offset);
        self.schedule.set_timesteps(spaced, n);
        self.model_outputs.clear();
        self.lower_order_nums = 0;
        Ok(())
    }

    fn step_f32(&mut self, input: StepInput<'_>) -> Result<Tensor> {
        let StepInput { model_output: out, timestep, sample: x, mut noise } = input;
        let i = self.schedule.begin_step(self.class_name(), timestep)?;
        let sigmas = &self.schedule.sigmas;
        let len = self.schedule.timesteps.len();
        let lower_order_final = i == len - 1
            && (self.euler_at_final
                || (self.lower_order_final && len < 15)
                || self.schedule.final_sigmas == FinalSigmasType::Zero);
        let lower_order_second = i + 2 == len && self.lower_order_final && len < 15;

        // 1.
        let (alpha, sigma) = vp_alpha_sigma(sigmas[i]);
        let out = mean_output(out, self.learned_variance, self.prediction)?;
        let x0 = vp_x0(self.prediction, &out, &x, alpha, sigma)?;
        let x0 = self.clamp.apply(&x0)?;

        // 2.
        self.model_outputs.push(x0.clone());
        let order = self.solver_order;
        // diffusers draws in the shape of the converted output, x₀.
        let z = if self.formula.sde() { Some(noise.float32_shaped(x0.dims())?) } else { None };

        // 3.
        let (sigma_t, sigma_s0) = (sigmas[i + 1], sigmas[i]);
        let prev = if order == 1 || self.lower_order_nums < 1 || lower_order_final {
            self.formula.first_order(sigma_t, sigma_s0, &x, &x0, z.as_ref())?
        } else if order == 2 || self.lower_order_nums < 2 || lower_order_second {
            let history = &self.model_outputs;
            let (m0, m1) = (history.get(0)?, history.get(1)?);
            let (_, _, lambda_t) = vp_lambda(sigma_t);
            let (_, _, lambda_s0) = vp_lambda(sigma_s0);
            let (_, _, lambda_s1) = vp_lambda(sigmas[i - 1]);
            let (h, h0) = (lambda_t - lambda_s0, lambda_s0 - lambda_s1);
            let r0 = h0 / h;
            let d1 = lincomb(&[(1.0 / r0, &(m0 - m1)?)])?;
            let solver = self.formula.solver_type;
            self.formula.second_order_terms(
                solver,
                sigma_t,
                sigma_s0,
                h,
                &x,
                m0,
                &d1,
                z.as_ref(),
            )?
        } else {
            let history = &self.model_outputs;
            let (m0, m1, m2) = (history.get(0)?, history.get(1)?, history.get(2)?);
            let (_, _, lambda_t) = vp_lambda(sigma_t);
            let (_, _, lambda_s0) = vp_lambda(sigma_s0);
            let (_, _, lambda_s1) = vp_lambda(sigmas[i - 1]);
            let (_, _, lambda_s2) = vp_lambda(sigmas[i - 2]);
            let (h, h0, h1) = (lambda_t - lambda_s0, lambda_s0 - lambda_s1, lambda_s1 - lambda_s2);
            let (r0, r1) = (h0 / h, h1 / h);
            let d1_0 = lincomb(&[(1.0 / r0, &(m0 - m1)?)])?;
            let d1_1 = lincomb(&[(1.0 / r1, &(m1 - m2)?)])?;
            let diff = (&d1_0 - &d1_1)?;
            let d1 = (&d1_0 + lincomb(&[(r0 / (r0 + r1), &diff)])?)?;
            let d2 = lincomb(&[(1.0 / (r0 + r1), &diff)])?;
            self.formula.third_order_terms(sigma_t, sigma_s0, h, [&x, m0, &d1, &d2], z.as_ref())?
        };
        self.lower_order_nums = (self.lower_order_nums + 1).min(order);
        self.schedule.index.advance();
        Ok(prev)
    }

    fn noise_levels(&self) -> NoiseLevels<'_> {
        self.schedule.noise_levels(self.prediction)
    }
}
