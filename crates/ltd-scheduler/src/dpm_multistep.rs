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
//! 1. Convert the model output to x₀ (then threshold it if configured).
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

use candle_core::{DType, Tensor};
use ltd_nn::{ConfigError, NoiseSource, Result};

use crate::config::{
    parse_or, reject_flag, DpmAlgorithm, DpmSolverType, FinalSigmasType, PredictionType,
    SchedulerConfig, TimestepSpacing,
};
use crate::ops::{lincomb, upcast, Lookup, StepIndex};
use crate::prediction::{vp_output_from_x0, vp_x0};
use crate::schedule::{
    fix_terminal_alpha, karras_sigmas, lambda, log_f32, np_interp, sigma_to_t, solver_timesteps,
    train_sigmas, vp_alpha_sigma, BetaConfig, DEFAULT_BETAS,
};
use crate::threshold::SampleClamp;
use crate::{check_steps, not_ready, BetaSchedule, Scheduler};

/// The update formulas DPM-Solver multistep and singlestep share.
#[derive(Debug, Clone, Copy, PartialEq)]
pub(crate) struct DpmFormula {
    pub algorithm: DpmAlgorithm,
    pub solver_type: DpmSolverType,
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
        let algorithm = match cfg.algorithm_type.as_deref() {
            Some("deis") => DpmAlgorithm::DpmSolverPlusPlus,
            Some(a @ ("dpmsolver" | "sde-dpmsolver")) => {
                return Err(ConfigError::new(
                    "algorithm_type",
                    format!(
                        "unsupported value {a:?} (deprecated in diffusers; use dpmsolver++ or \
                         sde-dpmsolver++)"
                    ),
                ))
            }
            other => parse_or(
                "algorithm_type",
                &other.map(str::to_owned),
                DpmAlgorithm::DpmSolverPlusPlus,
                DpmAlgorithm::parse,
            )?,
        };
        let solver_type = match cfg.solver_type.as_deref() {
            Some("logrho" | "bh1" | "bh2") => DpmSolverType::Midpoint,
            other => parse_or(
                "solver_type",
                &other.map(str::to_owned),
                DpmSolverType::Midpoint,
                DpmSolverType::parse,
            )?,
        };
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
    alphas_cumprod: Vec<f32>,
    lambdas: Vec<f32>,
    beta_schedule: BetaSchedule,
    formula: DpmFormula,
    solver_order: usize,
    prediction: PredictionType,
    clamp: SampleClamp,
    lower_order_final: bool,
    euler_at_final: bool,
    karras: bool,
    final_sigmas: FinalSigmasType,
    lambda_min_clipped: f64,
    spacing: TimestepSpacing,
    steps_offset: i64,
    sigmas: Vec<f32>,
    timesteps: Vec<f64>,
    index: StepIndex,
    model_outputs: Vec<Option<Tensor>>,
    lower_order_nums: usize,
    ready: bool,
}

impl DPMSolverMultistepScheduler {
    /// Reads the fields `DPMSolverMultistepScheduler.__init__` takes, with its defaults.
    pub fn from_config(cfg: &SchedulerConfig) -> std::result::Result<Self, ConfigError> {
        for (field, value) in [
            ("use_exponential_sigmas", cfg.use_exponential_sigmas),
            ("use_beta_sigmas", cfg.use_beta_sigmas),
            ("use_lu_lambdas", cfg.use_lu_lambdas),
            ("use_flow_sigmas", cfg.use_flow_sigmas),
            ("use_dynamic_shifting", cfg.use_dynamic_shifting),
        ] {
            reject_flag(field, value)?;
        }
        if let Some(v) = cfg.variance_type.as_deref() {
            return Err(ConfigError::unsupported("variance_type", v));
        }
        let solver_order = cfg.solver_order.unwrap_or(2);
        if !(1..=3).contains(&solver_order) {
            return Err(ConfigError::unsupported("solver_order", solver_order));
        }
        let betas = BetaConfig::read(cfg, &DEFAULT_BETAS)?;
        let mut alphas_cumprod = betas.alphas_cumprod();
        fix_terminal_alpha(&mut alphas_cumprod, betas.rescale_betas_zero_snr);
        let lambdas = alphas_cumprod.iter().map(|&a| lambda(a.sqrt(), (1.0 - a).sqrt())).collect();
        let sigmas = train_sigmas(&alphas_cumprod);
        Ok(Self {
            lambdas,
            beta_schedule: betas.beta_schedule,
            formula: DpmFormula::read(cfg)?,
            solver_order,
            prediction: parse_or(
                "prediction_type",
                &cfg.prediction_type,
                PredictionType::Epsilon,
                PredictionType::parse,
            )?,
            clamp: SampleClamp::read(cfg, None)?,
            lower_order_final: cfg.lower_order_final.unwrap_or(true),
            euler_at_final: cfg.euler_at_final.unwrap_or(false),
            karras: cfg.use_karras_sigmas.unwrap_or(false),
            final_sigmas: parse_or(
                "final_sigmas_type",
                &cfg.final_sigmas_type,
                FinalSigmasType::Zero,
                FinalSigmasType::parse,
            )?,
            lambda_min_clipped: cfg.lambda_min_clipped.unwrap_or(f64::NEG_INFINITY),
            spacing: parse_or(
                "timestep_spacing",
                &cfg.timestep_spacing,
                TimestepSpacing::Linspace,
                TimestepSpacing::parse,
            )?,
            steps_offset: cfg.steps_offset.unwrap_or(0),
            sigmas,
            timesteps: Vec::new(),
            index: StepIndex::default(),
            model_outputs: vec![None; solver_order],
            lower_order_nums: 0,
            ready: false,
            alphas_cumprod,
        })
    }

    fn vp_for(&self, timestep: f64) -> Result<(f32, f32)> {
        let i = self.index.current(timestep, &self.timesteps, Lookup::LastIfMissing)?;
        Ok(vp_alpha_sigma(self.sigmas[i]))
    }
}

/// `torch.searchsorted(torch.flip(lambda_t), value)`: the number of flipped λ below `value`.
pub(crate) fn clipped_index(lambdas: &[f32], value: f64) -> usize {
    lambdas.iter().rev().take_while(|&&l| f64::from(l) < value).count()
}

impl Scheduler for DPMSolverMultistepScheduler {
    fn class_name(&self) -> &'static str {
        "DPMSolverMultistepScheduler"
    }

    fn set_timesteps(&mut self, n: usize) -> Result<()> {
        let num_train = self.alphas_cumprod.len();
        check_steps(n, usize::MAX)?;
        let clipped = clipped_index(&self.lambdas, self.lambda_min_clipped);
        let last_timestep = num_train - clipped;
        let spaced: Vec<f64> =
            solver_timesteps(self.spacing, num_train, last_timestep, n, self.steps_offset)
                .into_iter()
                .map(|t| t as f64)
                .collect();
        let train = train_sigmas(&self.alphas_cumprod);
        let (sigmas, timesteps): (Vec<f64>, Vec<f64>) = if self.karras {
            let log_sigmas = log_f32(&train);
            let sigmas = karras_sigmas(f64::from(train[0]), f64::from(train[num_train - 1]), n);
            let round = self.beta_schedule != BetaSchedule::SquaredCosCapV2;
            let ts = sigmas
                .iter()
                .map(|&s| sigma_to_t(s, &log_sigmas))
                .map(|t| if round { t.round_ties_even() } else { t })
                .collect();
            (sigmas, ts)
        } else {
            (spaced.iter().map(|&t| np_interp(t, &train)).collect(), spaced)
        };
        let last = match self.final_sigmas {
            FinalSigmasType::Zero => 0.0,
            FinalSigmasType::SigmaMin => train[0],
        };
        self.sigmas = sigmas.iter().map(|&s| s as f32).chain([last]).collect();
        // `.to(torch.int64)` truncates.
        self.timesteps = timesteps.iter().map(|&t| t.trunc()).collect();
        self.model_outputs = vec![None; self.solver_order];
        self.lower_order_nums = 0;
        self.index = StepIndex::default();
        self.ready = true;
        Ok(())
    }

    fn timesteps(&self) -> &[f64] {
        &self.timesteps
    }

    fn init_noise_sigma(&self) -> f64 {
        1.0
    }

    fn scale_model_input(&self, sample: &Tensor, _timestep: f64) -> Result<Tensor> {
        Ok(sample.clone())
    }

    fn step(
        &mut self,
        model_output: &Tensor,
        timestep: f64,
        sample: &Tensor,
        noise: &mut dyn NoiseSource,
    ) -> Result<Tensor> {
        if !self.ready {
            return Err(not_ready(self.class_name()));
        }
        let i = self.index.init(timestep, &self.timesteps, Lookup::LastIfMissing)?;
        let len = self.timesteps.len();
        let lower_order_final = i == len - 1
            && (self.euler_at_final
                || (self.lower_order_final && len < 15)
                || self.final_sigmas == FinalSigmasType::Zero);
        let lower_order_second = i + 2 == len && self.lower_order_final && len < 15;

        // 1.
        let x = upcast(sample)?;
        let (alpha, sigma) = vp_alpha_sigma(self.sigmas[i]);
        let x0 = vp_x0(self.prediction, &upcast(model_output)?, &x, alpha, sigma)?;
        let x0 = self.clamp.apply(&x0)?;

        // 2.
        self.model_outputs.rotate_left(1);
        let order = self.solver_order;
        self.model_outputs[order - 1] = Some(x0.clone());
        let z = if self.formula.sde() {
            Some(upcast(&noise.randn(model_output.dims(), DType::F32, model_output.device())?)?)
        } else {
            None
        };

        // 3.
        let (sigma_t, sigma_s0) = (self.sigmas[i + 1], self.sigmas[i]);
        let history = |k: usize| -> Result<&Tensor> {
            self.model_outputs[order - 1 - k]
                .as_ref()
                .ok_or_else(|| ltd_nn::Error::msg("DPMSolverMultistepScheduler: missing history"))
        };
        let prev = if order == 1 || self.lower_order_nums < 1 || lower_order_final {
            self.formula.first_order(sigma_t, sigma_s0, &x, &x0, z.as_ref())?
        } else if order == 2 || self.lower_order_nums < 2 || lower_order_second {
            let (m0, m1) = (history(0)?, history(1)?);
            let (_, _, lambda_t) = vp_lambda(sigma_t);
            let (_, _, lambda_s0) = vp_lambda(sigma_s0);
            let (_, _, lambda_s1) = vp_lambda(self.sigmas[i - 1]);
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
            let (m0, m1, m2) = (history(0)?, history(1)?, history(2)?);
            let (_, _, lambda_t) = vp_lambda(sigma_t);
            let (_, _, lambda_s0) = vp_lambda(sigma_s0);
            let (_, _, lambda_s1) = vp_lambda(self.sigmas[i - 1]);
            let (_, _, lambda_s2) = vp_lambda(self.sigmas[i - 2]);
            let (h, h0, h1) = (lambda_t - lambda_s0, lambda_s0 - lambda_s1, lambda_s1 - lambda_s2);
            let (r0, r1) = (h0 / h, h1 / h);
            let d1_0 = lincomb(&[(1.0 / r0, &(m0 - m1)?)])?;
            let d1_1 = lincomb(&[(1.0 / r1, &(m1 - m2)?)])?;
            let diff = (&d1_0 - &d1_1)?;
            let d1 = (&d1_0 + lincomb(&[(r0 / (r0 + r1), &diff)])?)?;
            let d2 = lincomb(&[(1.0 / (r0 + r1), &diff)])?;
            self.formula.third_order_terms(sigma_t, sigma_s0, h, [&x, m0, &d1, &d2], z.as_ref())?
        };
        if self.lower_order_nums < order {
            self.lower_order_nums += 1;
        }
        self.index.advance();
        Ok(prev.to_dtype(sample.dtype())?)
    }

    fn add_noise(&self, original: &Tensor, noise: &Tensor, timestep: f64) -> Result<Tensor> {
        let i = self.index.for_add_noise(timestep, &self.timesteps, Lookup::LastIfMissing)?;
        let (alpha, sigma) = vp_alpha_sigma(self.sigmas[i]);
        lincomb(&[(alpha, original), (sigma, noise)])
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
        let (alpha, sigma) = self.vp_for(timestep)?;
        vp_x0(self.prediction, out, sample, alpha, sigma)
    }

    fn model_output_from_pred_original(
        &self,
        x0: &Tensor,
        timestep: f64,
        sample: &Tensor,
    ) -> Result<Tensor> {
        let (alpha, sigma) = self.vp_for(timestep)?;
        vp_output_from_x0(self.prediction, x0, sample, alpha, sigma)
    }

    fn supports_thresholding(&self) -> bool {
        true
    }

    fn sigmas(&self) -> Option<&[f32]> {
        Some(&self.sigmas)
    }
}
