//! DPM-Solver++ singlestep (Lu et al. 2022, algorithm 1 for DPM-Solver++(2S)/(3S)), as
//! diffusers' `DPMSolverSinglestepScheduler`.
//!
//! Notation as in [`crate::DPMSolverMultistepScheduler`]. Singlestep solvers group the
//! timesteps by the order list (e.g. `[1, 2, 1, 2, …]` for order 2): the group starts from the
//! sample `x_s` at its first timestep and every step of the group restarts from `x_s`, using
//! the model outputs at the group's intermediate timesteps. One model evaluation per timestep.
//!
//! Step:
//! 1. Convert the model output to x₀ (then threshold); push it into the history.
//! 2. The order is the order list's entry (lowered while the history is short, e.g. when
//!    starting part-way for image-to-image); at order 1 the group's start sample is stored.
//! 3. 1st order: eq. 5 from x_s. 2nd order (2S): from x_s at σₛ₁ with D0 = m1,
//!    D1 = (m0 − m1)/r0, r0 = (λₛ₀ − λₛ₁)/(λₜ − λₛ₁). 3rd order (3S): from x_s at σₛ₂ with the
//!    divided differences of appendix B.
//!
//! `lower_order_final` is forced on (and stays on, as diffusers rewrites its config) when the
//! step count is not a multiple of the order or the final sigma is zero.

use candle_core::Tensor;
use ltd_nn::{ConfigError, Error, NoiseSource, Result};

use crate::config::{
    parse_or, reject_flag, DpmSolverType, FinalSigmasType, PredictionType, SchedulerConfig,
};
use crate::dpm_multistep::{clipped_index, vp_lambda, DpmFormula};
use crate::ops::{div, lincomb, scale, upcast, Lookup, StepIndex};
use crate::prediction::{vp_output_from_x0, vp_x0};
use crate::schedule::{
    karras_sigmas, lambda, log_f32, np_interp, np_linspace, np_round, sigma_to_t, train_sigmas,
    vp_alpha_sigma, BetaConfig, BetaDefaults, DEFAULT_BETAS,
};
use crate::threshold::SampleClamp;
use crate::{check_steps, not_ready, Scheduler};

/// diffusers' `DPMSolverSinglestepScheduler` (algorithms `dpmsolver++` and `sde-dpmsolver++`).
#[derive(Debug, Clone)]
pub struct DPMSolverSinglestepScheduler {
    alphas_cumprod: Vec<f32>,
    lambdas: Vec<f32>,
    formula: DpmFormula,
    solver_order: usize,
    prediction: PredictionType,
    clamp: SampleClamp,
    lower_order_final: bool,
    karras: bool,
    final_sigmas: FinalSigmasType,
    lambda_min_clipped: f64,
    sigmas: Vec<f32>,
    timesteps: Vec<f64>,
    order_list: Vec<usize>,
    index: StepIndex,
    model_outputs: Vec<Option<Tensor>>,
    group_sample: Option<Tensor>,
    ready: bool,
}

impl DPMSolverSinglestepScheduler {
    /// Reads the fields `DPMSolverSinglestepScheduler.__init__` takes, with its defaults.
    pub fn from_config(cfg: &SchedulerConfig) -> std::result::Result<Self, ConfigError> {
        for (field, value) in [
            ("use_exponential_sigmas", cfg.use_exponential_sigmas),
            ("use_beta_sigmas", cfg.use_beta_sigmas),
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
        let defaults = BetaDefaults { reads_zero_snr: false, ..DEFAULT_BETAS };
        let alphas_cumprod = BetaConfig::read(cfg, &defaults)?.alphas_cumprod();
        let lambdas = alphas_cumprod.iter().map(|&a| lambda(a.sqrt(), (1.0 - a).sqrt())).collect();
        Ok(Self {
            lambdas,
            formula: DpmFormula::read(cfg)?,
            solver_order,
            prediction: parse_or(
                "prediction_type",
                &cfg.prediction_type,
                PredictionType::Epsilon,
                PredictionType::parse,
            )?,
            clamp: SampleClamp::read(cfg, None)?,
            lower_order_final: cfg.lower_order_final.unwrap_or(false),
            karras: cfg.use_karras_sigmas.unwrap_or(false),
            final_sigmas: parse_or(
                "final_sigmas_type",
                &cfg.final_sigmas_type,
                FinalSigmasType::Zero,
                FinalSigmasType::parse,
            )?,
            lambda_min_clipped: cfg.lambda_min_clipped.unwrap_or(f64::NEG_INFINITY),
            sigmas: train_sigmas(&alphas_cumprod),
            timesteps: Vec::new(),
            order_list: Vec::new(),
            index: StepIndex::default(),
            model_outputs: vec![None; solver_order],
            group_sample: None,
            ready: false,
            alphas_cumprod,
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
                    if steps % 2 == 0 {
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
        if self.final_sigmas == FinalSigmasType::Zero {
            if let Some(last) = orders.last_mut() {
                *last = 1;
            }
        }
        orders
    }

    fn vp_for(&self, timestep: f64) -> Result<(f32, f32)> {
        let i = self.index.current(timestep, &self.timesteps, Lookup::LastIfMissing)?;
        Ok(vp_alpha_sigma(self.sigmas[i]))
    }

    fn history(&self, back: usize) -> Result<&Tensor> {
        self.model_outputs[self.solver_order - 1 - back]
            .as_ref()
            .ok_or_else(|| Error::msg("DPMSolverSinglestepScheduler: missing history"))
    }

    fn update(&self, order: usize, i: usize, x: &Tensor, z: Option<&Tensor>) -> Result<Tensor> {
        let f = self.formula;
        let sigma_t = self.sigmas[i + 1];
        let lam = |k: usize| vp_lambda(self.sigmas[k]).2;
        match order {
            1 => f.first_order(sigma_t, self.sigmas[i], x, self.history(0)?, z),
            2 => {
                let (m0, m1) = (self.history(0)?, self.history(1)?);
                let (lambda_t, lambda_s0, lambda_s1) = (lam(i + 1), lam(i), lam(i - 1));
                let (h, h0) = (lambda_t - lambda_s1, lambda_s0 - lambda_s1);
                let d1 = scale(&(m0 - m1)?, 1.0 / (h0 / h))?;
                f.second_order_terms(f.solver_type, sigma_t, self.sigmas[i - 1], h, x, m1, &d1, z)
            }
            _ => {
                let (m0, m1, m2) = (self.history(0)?, self.history(1)?, self.history(2)?);
                let (lambda_t, lambda_s0, lambda_s1, lambda_s2) =
                    (lam(i + 1), lam(i), lam(i - 1), lam(i - 2));
                let h = lambda_t - lambda_s2;
                let (r0, r1) = ((lambda_s0 - lambda_s2) / h, (lambda_s1 - lambda_s2) / h);
                let d1_0 = scale(&(m1 - m2)?, 1.0 / r1)?;
                let d1_1 = scale(&(m0 - m2)?, 1.0 / r0)?;
                let sigma_s2 = self.sigmas[i - 2];
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

    fn set_timesteps(&mut self, n: usize) -> Result<()> {
        let num_train = self.alphas_cumprod.len();
        check_steps(n, usize::MAX)?;
        let clipped = clipped_index(&self.lambdas, self.lambda_min_clipped);
        let spaced: Vec<f64> = np_linspace(0.0, (num_train - 1 - clipped) as f64, n + 1)
            .into_iter()
            .rev()
            .take(n)
            .map(np_round)
            .collect();
        let train = train_sigmas(&self.alphas_cumprod);
        let (sigmas, timesteps): (Vec<f64>, Vec<f64>) = if self.karras {
            let log_sigmas = log_f32(&train);
            let sigmas = karras_sigmas(f64::from(train[0]), f64::from(train[num_train - 1]), n);
            let ts = sigmas.iter().map(|&s| np_round(sigma_to_t(s, &log_sigmas))).collect();
            (sigmas, ts)
        } else {
            (spaced.iter().map(|&t| np_interp(t, &train)).collect(), spaced)
        };
        let last = match self.final_sigmas {
            FinalSigmasType::Zero => 0.0,
            FinalSigmasType::SigmaMin => train[0],
        };
        self.sigmas = sigmas.iter().map(|&s| s as f32).chain([last]).collect();
        self.timesteps = timesteps.iter().map(|&t| t.trunc()).collect();
        self.model_outputs = vec![None; self.solver_order];
        self.group_sample = None;
        if !self.lower_order_final
            && (n % self.solver_order != 0 || self.final_sigmas == FinalSigmasType::Zero)
        {
            tracing::debug!("DPMSolverSinglestepScheduler: turning lower_order_final on");
            self.lower_order_final = true;
        }
        self.order_list = self.order_list(n);
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
        // 1.
        let x = upcast(sample)?;
        let (alpha, sigma) = vp_alpha_sigma(self.sigmas[i]);
        let x0 = vp_x0(self.prediction, &upcast(model_output)?, &x, alpha, sigma)?;
        let x0 = self.clamp.apply(&x0)?;
        self.model_outputs.rotate_left(1);
        let last = self.solver_order - 1;
        self.model_outputs[last] = Some(x0);
        let z = if self.formula.sde() {
            let z =
                noise.randn(model_output.dims(), model_output.dtype(), model_output.device())?;
            Some(upcast(&z)?)
        } else {
            None
        };
        // 2.
        let mut order = self.order_list.get(i).copied().unwrap_or(1);
        while order > 1 && self.model_outputs[self.solver_order - order].is_none() {
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
