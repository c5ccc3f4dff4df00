//! UniPC (Zhao et al. 2023, "UniPC: A Unified Predictor-Corrector Framework for Fast Sampling
//! of Diffusion Models"), as diffusers' `UniPCMultistepScheduler` (B(h) variants).
//!
//! | code          | paper |
//! |---------------|-------|
//! | `m0`, `mi`    | the converted model outputs (x₀ for UniPC-x, else ε), newest `m0` |
//! | `h`           | λₜ − λₛ₀ |
//! | `rks`         | rₖ = (λₛₖ − λₛ₀)/h, plus r = 1 |
//! | `d1s`         | Dₖ = (mₖ − m0)/rₖ |
//! | `h_phi_1`     | h φ₁(h) = e^{hh} − 1 with hh = −h (x₀) or h (ε) |
//! | `b_h`         | B(h): hh (bh1) or e^{hh} − 1 (bh2) (eq. 11) |
//! | `rhos_p/c`    | a_p of UniP / UniC, solving R a = b (algorithm 1, eq. 8) |
//!
//! Step:
//! 1. Convert the model output (x₀, thresholded if configured; or ε).
//! 2. UniC: unless disabled for the previous step, correct the sample the last predictor made
//!    using this model output (this is what makes UniPC order p+1 for free).
//! 3. Shift the history; order = min(solver_order, steps left if `lower_order_final`,
//!    steps taken + 1).
//! 4. UniP: predict the next sample (order 2 uses ρ = ½, order ≥ 3 solves R ρ = b).
//!
//! With a zero final sigma diffusers' `bh1` and `predict_x0 = false` variants compute
//! `inf · 0` on the last step and return NaN; those combinations are rejected.

use candle_core::Tensor;
use ltd_nn::{ConfigError, Error, Result};

use crate::config::{
    FinalSigmasType, PredictionType, SchedulerConfig, TimestepSpacing, UniPcSolverType,
    Unimplemented,
};
use crate::dpm_multistep::vp_lambda;
use crate::ops::{div, lincomb, scale, History};
use crate::prediction::vp_x0;
use crate::schedule::{
    fix_terminal_alpha, solver_timesteps, vp_alpha_sigma, BetaConfig, DEFAULT_BETAS,
};
use crate::sigma_schedule::SolverSchedule;
use crate::threshold::SampleClamp;
use crate::{check_steps, NoiseLevels, Scheduler, StepInput};

/// diffusers' `UniPCMultistepScheduler`.
#[derive(Debug, Clone)]
pub struct UniPCMultistepScheduler {
    solver_order: usize,
    prediction: PredictionType,
    clamp: SampleClamp,
    predict_x0: bool,
    solver_type: UniPcSolverType,
    lower_order_final: bool,
    disable_corrector: Vec<usize>,
    schedule: SolverSchedule,
    spacing: TimestepSpacing,
    steps_offset: i64,
    model_outputs: History,
    lower_order_nums: usize,
    this_order: usize,
    last_sample: Option<Tensor>,
}

impl UniPCMultistepScheduler {
    /// Reads the fields `UniPCMultistepScheduler.__init__` takes, with its defaults.
    pub fn from_config(cfg: &SchedulerConfig) -> std::result::Result<Self, ConfigError> {
        cfg.reject_unimplemented(Unimplemented::SOLVER)?;
        let solver_order = cfg.solver_order.unwrap_or(2);
        if solver_order == 0 {
            return Err(ConfigError::unsupported("solver_order", solver_order));
        }
        let solver_type = cfg.unipc_solver_type()?;
        let predict_x0 = cfg.predict_x0.unwrap_or(true);
        if cfg.final_sigmas_type()? == FinalSigmasType::Zero {
            if solver_type == UniPcSolverType::Bh1 {
                return Err(ConfigError::new(
                    "solver_type",
                    "unsupported value \"bh1\" with final_sigmas_type \"zero\" (diffusers 0.42.1 \
                     returns NaN on the last step); use final_sigmas_type \"sigma_min\"",
                ));
            }
            if !predict_x0 {
                return Err(ConfigError::new(
                    "predict_x0",
                    "unsupported value false with final_sigmas_type \"zero\" (diffusers 0.42.1 \
                     returns NaN on the last step); use final_sigmas_type \"sigma_min\"",
                ));
            }
        }
        let betas = BetaConfig::read(cfg, &DEFAULT_BETAS)?;
        let mut alphas_cumprod = betas.alphas_cumprod();
        fix_terminal_alpha(&mut alphas_cumprod, betas.rescale_betas_zero_snr);
        Ok(Self {
            solver_order,
            prediction: cfg.prediction_type()?,
            clamp: SampleClamp::read(cfg, None)?,
            predict_x0,
            solver_type,
            lower_order_final: cfg.lower_order_final.unwrap_or(true),
            disable_corrector: cfg.disable_corrector.clone().unwrap_or_default(),
            schedule: SolverSchedule {
                sigma_min: cfg.sigma_min,
                sigma_max: cfg.sigma_max,
                final_from_karras: true,
                ..SolverSchedule::read(cfg, alphas_cumprod)?
            },
            spacing: cfg.timestep_spacing(TimestepSpacing::Linspace)?,
            steps_offset: cfg.steps_offset.unwrap_or(0),
            model_outputs: History::new(solver_order, "UniPCMultistepScheduler"),
            lower_order_nums: 0,
            this_order: 1,
            last_sample: None,
        })
    }

    /// The UniPC coefficients for a step from σ index `s0` to `t`, with the newest history
    /// entry taken at `s0` and the `order − 1` older ones at σ indices `s0 − 1`, `s0 − 2`, …
    fn coefficients(&self, t: usize, s0: usize, order: usize) -> Result<Coeffs> {
        let (alpha_t, sigma_t, lambda_t) = vp_lambda(self.schedule.sigmas[t]);
        let (alpha_s0, sigma_s0, lambda_s0) = vp_lambda(self.schedule.sigmas[s0]);
        let h = lambda_t - lambda_s0;
        let m0 = self.model_outputs.get(0)?;
        let mut rks = Vec::with_capacity(order);
        let mut d1s = Vec::with_capacity(order);
        for k in 1..order {
            let (_, _, lambda_sk) = vp_lambda(self.schedule.sigmas[s0 - k]);
            let rk = (lambda_sk - lambda_s0) / h;
            d1s.push(div(&(self.model_outputs.get(k)? - m0)?, rk)?);
            rks.push(rk);
        }
        rks.push(1.0);
        let hh = if self.predict_x0 { -h } else { h };
        let h_phi_1 = hh.exp_m1();
        let b_h = match self.solver_type {
            UniPcSolverType::Bh1 => hh,
            UniPcSolverType::Bh2 => hh.exp_m1(),
        };
        let mut h_phi_k = h_phi_1 / hh - 1.0;
        let mut factorial = 1.0f32;
        let mut b = Vec::with_capacity(order);
        for i in 1..=order {
            b.push(h_phi_k * factorial / b_h);
            factorial *= (i + 1) as f32;
            h_phi_k = h_phi_k / hh - 1.0 / factorial;
        }
        Ok(Coeffs { alpha_t, sigma_t, alpha_s0, sigma_s0, h_phi_1, b_h, rks, b, d1s })
    }

    /// x_t_ = σₜ/σₛ₀ x − αₜ hφ₁ m0 (UniPC-x), or αₜ/αₛ₀ x − σₜ hφ₁ m0 (UniPC-ε); and the factor
    /// multiplying the correction, αₜ B(h) or σₜ B(h).
    fn base(&self, c: &Coeffs, x: &Tensor, m0: &Tensor) -> Result<(Tensor, f32)> {
        if self.predict_x0 {
            let base = lincomb(&[(c.sigma_t / c.sigma_s0, x), (-(c.alpha_t * c.h_phi_1), m0)])?;
            Ok((base, c.alpha_t * c.b_h))
        } else {
            let base = lincomb(&[(c.alpha_t / c.alpha_s0, x), (-(c.sigma_t * c.h_phi_1), m0)])?;
            Ok((base, c.sigma_t * c.b_h))
        }
    }

    /// UniP: the sample at σ index `i + 1` from `x` at `i`.
    fn predictor(&self, i: usize, x: &Tensor, order: usize) -> Result<Tensor> {
        let c = self.coefficients(i + 1, i, order)?;
        let (base, factor) = self.base(&c, x, self.model_outputs.get(0)?)?;
        if c.d1s.is_empty() {
            return Ok(base);
        }
        let rhos: Vec<f32> = if order == 2 {
            vec![0.5]
        } else {
            let k = order - 1;
            let r: Vec<Vec<f64>> = (0..k)
                .map(|row| c.rks[..k].iter().map(|&r| f64::from(r).powi(row as i32)).collect())
                .collect();
            solve(r, c.b[..k].iter().map(|&v| f64::from(v)).collect())?
        };
        let terms: Vec<(f32, &Tensor)> = rhos.iter().copied().zip(c.d1s.iter()).collect();
        let res = lincomb(&terms)?;
        Ok((base - scale(&res, factor)?)?)
    }

    /// UniC: the corrected sample at σ index `i`, recomputed from `last_sample` (at `i − 1`, the
    /// predictor's input) with the model output `model_t` at the predicted sample.
    fn corrector(
        &self,
        i: usize,
        model_t: &Tensor,
        last_sample: &Tensor,
        order: usize,
    ) -> Result<Tensor> {
        let c = self.coefficients(i, i - 1, order)?;
        let m0 = self.model_outputs.get(0)?;
        let (base, factor) = self.base(&c, last_sample, m0)?;
        let rhos: Vec<f32> = if order == 1 {
            vec![0.5]
        } else {
            let r: Vec<Vec<f64>> = (0..order)
                .map(|row| c.rks.iter().map(|&r| f64::from(r).powi(row as i32)).collect())
                .collect();
            solve(r, c.b.iter().map(|&v| f64::from(v)).collect())?
        };
        let d1_t = (model_t - m0)?;
        let last = rhos[rhos.len() - 1];
        let correction = if c.d1s.is_empty() {
            scale(&d1_t, last)?
        } else {
            let terms: Vec<(f32, &Tensor)> =
                rhos[..rhos.len() - 1].iter().copied().zip(c.d1s.iter()).collect();
            (lincomb(&terms)? + scale(&d1_t, last)?)?
        };
        Ok((base - scale(&correction, factor)?)?)
    }
}

/// The scalar pieces of one UniP/UniC update.
struct Coeffs {
    alpha_t: f32,
    sigma_t: f32,
    alpha_s0: f32,
    sigma_s0: f32,
    h_phi_1: f32,
    b_h: f32,
    rks: Vec<f32>,
    b: Vec<f32>,
    d1s: Vec<Tensor>,
}

/// Solves the small dense system `a x = b` (Gaussian elimination, partial pivoting).
fn solve(mut a: Vec<Vec<f64>>, mut b: Vec<f64>) -> Result<Vec<f32>> {
    let n = b.len();
    for col in 0..n {
        let pivot =
            (col..n).max_by(|&i, &j| a[i][col].abs().total_cmp(&a[j][col].abs())).unwrap_or(col);
        if a[pivot][col] == 0.0 {
            return Err(Error::msg("UniPCMultistepScheduler: singular coefficient system"));
        }
        a.swap(col, pivot);
        b.swap(col, pivot);
        let (upper, lower) = a.split_at_mut(col + 1);
        let pivot_row = &upper[col];
        for (offset, row) in lower.iter_mut().enumerate() {
            let f = row[col] / pivot_row[col];
            for (v, p) in row.iter_mut().zip(pivot_row).skip(col) {
                *v -= f * p;
            }
            b[col + 1 + offset] -= f * b[col];
        }
    }
    let mut x = vec![0f64; n];
    for row in (0..n).rev() {
        let s: f64 = (row + 1..n).map(|k| a[row][k] * x[k]).sum();
        x[row] = (b[row] - s) / a[row][row];
    }
    Ok(x.into_iter().map(|v| v as f32).collect())
}

impl Scheduler for UniPCMultistepScheduler {
    fn class_name(&self) -> &'static str {
        "UniPCMultistepScheduler"
    }

    fn set_timesteps(&mut self, n: usize) -> Result<()> {
        let num_train = self.schedule.alphas_cumprod.len();
        check_steps(n, usize::MAX)?;
        let spaced = solver_timesteps(self.spacing, num_train, num_train, n, self.steps_offset);
        self.schedule.set_timesteps(spaced, n);
        self.model_outputs.clear();
        self.lower_order_nums = 0;
        self.last_sample = None;
        Ok(())
    }

    fn step_f32(&mut self, input: StepInput<'_>) -> Result<Tensor> {
        let StepInput { model_output: out, timestep, sample: mut x, .. } = input;
        let i = self.schedule.begin_step(self.class_name(), timestep)?;
        // 1.
        let (alpha, sigma) = vp_alpha_sigma(self.schedule.sigmas[i]);
        let converted = if self.predict_x0 {
            self.clamp.apply(&vp_x0(self.prediction, &out, &x, alpha, sigma)?)?
        } else {
            match self.prediction {
                PredictionType::Epsilon => out,
                PredictionType::Sample => div(&(&x - scale(&out, alpha)?)?, sigma)?,
                PredictionType::VPrediction => lincomb(&[(alpha, &out), (sigma, &x)])?,
            }
        };
        // 2.
        let use_corrector = i > 0 && !self.disable_corrector.contains(&(i - 1));
        if let (true, Some(last)) = (use_corrector, self.last_sample.as_ref()) {
            x = self.corrector(i, &converted, last, self.this_order)?;
        }
        // 3.
        self.model_outputs.push(converted);
        let order = self.solver_order;
        let this_order = if self.lower_order_final {
            order.min(self.schedule.timesteps.len() - i)
        } else {
            order
        };
        self.this_order = this_order.min(self.lower_order_nums + 1);
        self.last_sample = Some(x.clone());
        // 4.
        let prev = self.predictor(i, &x, self.this_order)?;
        self.lower_order_nums = (self.lower_order_nums + 1).min(order);
        self.schedule.index.advance();
        Ok(prev)
    }

    fn noise_levels(&self) -> NoiseLevels<'_> {
        self.schedule.noise_levels(self.prediction)
    }
}
