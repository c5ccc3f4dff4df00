//! PNDM / PLMS (Liu et al. 2022, "Pseudo Numerical Methods for Diffusion Models on Manifolds"),
//! as diffusers' `PNDMScheduler`.
//!
//! | code               | paper |
//! |--------------------|-------|
//! | `ets`              | the last ε predictions e_t (algorithm 2) |
//! | `get_prev_sample`  | φ(xₜ, εₜ, t, t−δ), the transfer of eq. 9 |
//! | PRK steps          | the pseudo Runge-Kutta warm-up (eq. 13): 4 model calls per step |
//! | PLMS steps         | the pseudo linear multistep update (eq. 12) |
//!
//! Step (diffusers' counter logic, reproduced exactly):
//! 1. With PRK (`skip_prk_steps = false`), the first 12 calls run three Runge-Kutta steps whose
//!    four stages sit at t, t − δ/2, t − δ/2 and t − δ; their weighted ε (1/6, 1/3, 1/3, 1/6)
//!    feeds eq. 9.
//! 2. PLMS: ε is the Adams–Bashforth combination of the last 1–4 predictions (eq. 12); without
//!    PRK the second call re-evaluates the first timestep's step with the average of two ε
//!    (the warm-up of crowsonkb's PLMS), which is why the schedule repeats one timestep.
//! 3. φ: xₜ₋δ = √(ᾱₜ₋δ/ᾱₜ) xₜ − (ᾱₜ₋δ − ᾱₜ) ε / (ᾱₜ √(1−ᾱₜ₋δ) + √(ᾱₜ (1−ᾱₜ) ᾱₜ₋δ)) (eq. 9).

use candle_core::Tensor;
use ltd_nn::{ConfigError, Error, Result};

use crate::config::{PredictionType, SchedulerConfig, TimestepSpacing};
use crate::ops::{div, lincomb, scale};
use crate::schedule::{discrete_timesteps, BetaConfig, BetaDefaults, DEFAULT_BETAS};
use crate::{check_steps, not_ready, NoiseLevels, Scheduler, StepInput};

/// diffusers' `PNDMScheduler`.
#[derive(Debug, Clone)]
pub struct PNDMScheduler {
    alphas_cumprod: Vec<f32>,
    final_alpha_cumprod: f32,
    prediction: PredictionType,
    spacing: TimestepSpacing,
    steps_offset: i64,
    skip_prk_steps: bool,
    num_inference_steps: Option<usize>,
    prk_timesteps: Vec<i64>,
    timesteps: Vec<f64>,
    counter: usize,
    ets: Vec<Tensor>,
    cur_model_output: Option<Tensor>,
    cur_sample: Option<Tensor>,
}

impl PNDMScheduler {
    /// Reads the fields `PNDMScheduler.__init__` takes, with its defaults.
    pub fn from_config(cfg: &SchedulerConfig) -> std::result::Result<Self, ConfigError> {
        let prediction =
            cfg.prediction_type_except_sample("PNDMScheduler takes epsilon or v_prediction")?;
        let alphas_cumprod =
            BetaConfig::read(cfg, &BetaDefaults { reads_zero_snr: false, ..DEFAULT_BETAS })?
                .alphas_cumprod();
        let final_alpha_cumprod =
            if cfg.set_alpha_to_one.unwrap_or(false) { 1.0 } else { alphas_cumprod[0] };
        Ok(Self {
            final_alpha_cumprod,
            prediction,
            spacing: cfg.timestep_spacing(TimestepSpacing::Leading)?,
            steps_offset: cfg.steps_offset.unwrap_or(0),
            skip_prk_steps: cfg.skip_prk_steps.unwrap_or(false),
            num_inference_steps: None,
            prk_timesteps: Vec::new(),
            timesteps: Vec::new(),
            counter: 0,
            ets: Vec::new(),
            cur_model_output: None,
            cur_sample: None,
            alphas_cumprod,
        })
    }

    fn alpha_at(&self, t: i64) -> Result<f32> {
        if t < 0 {
            return Ok(self.final_alpha_cumprod);
        }
        self.alphas_cumprod
            .get(t as usize)
            .copied()
            .ok_or_else(|| Error::msg(format!("PNDMScheduler: timestep {t} is out of range")))
    }

    /// Eq. 9: the sample at `prev_t` from the sample at `t` and the (combined) ε.
    fn get_prev_sample(&self, x: &Tensor, t: i64, prev_t: i64, out: &Tensor) -> Result<Tensor> {
        let alpha_prod_t = self.alpha_at(t)?;
        let alpha_prev = self.alpha_at(prev_t)?;
        let beta_prod_t = 1.0 - alpha_prod_t;
        let beta_prod_prev = 1.0 - alpha_prev;
        let eps = match self.prediction {
            PredictionType::VPrediction => {
                lincomb(&[(alpha_prod_t.sqrt(), out), (beta_prod_t.sqrt(), x)])?
            }
            _ => out.clone(),
        };
        let sample_coeff = (alpha_prev / alpha_prod_t).sqrt();
        let denom =
            alpha_prod_t * beta_prod_prev.sqrt() + (alpha_prod_t * beta_prod_t * alpha_prev).sqrt();
        let update = div(&scale(&eps, alpha_prev - alpha_prod_t)?, denom)?;
        Ok((scale(x, sample_coeff)? - update)?)
    }

    fn step_prk(&mut self, out: Tensor, timestep: i64, x: Tensor, n: usize) -> Result<Tensor> {
        let num_train = self.alphas_cumprod.len();
        let diff_to_prev = if self.counter % 2 == 1 { 0 } else { (num_train / n / 2) as i64 };
        let prev_t = timestep - diff_to_prev;
        let t = self.prk_timesteps[self.counter / 4 * 4];
        let eps = match self.counter % 4 {
            0 => {
                self.accumulate(&out, 1.0 / 6.0)?;
                self.ets.push(out.clone());
                self.cur_sample = Some(x.clone());
                out
            }
            1 | 2 => {
                self.accumulate(&out, 1.0 / 3.0)?;
                out
            }
            _ => {
                let acc = self.cur_model_output.take();
                let last = scale(&out, 1.0 / 6.0)?;
                match acc {
                    Some(acc) => (acc + last)?,
                    None => last,
                }
            }
        };
        let cur = self.cur_sample.clone().unwrap_or(x);
        let prev = self.get_prev_sample(&cur, t, prev_t, &eps)?;
        self.counter += 1;
        Ok(prev)
    }

    fn accumulate(&mut self, out: &Tensor, weight: f32) -> Result<()> {
        let term = scale(out, weight)?;
        self.cur_model_output = Some(match self.cur_model_output.take() {
            Some(acc) => (acc + term)?,
            None => term,
        });
        Ok(())
    }

    fn step_plms(&mut self, out: Tensor, timestep: i64, x: Tensor, n: usize) -> Result<Tensor> {
        if !self.skip_prk_steps && self.ets.len() < 3 {
            return Err(Error::msg("PNDMScheduler: PLMS steps need the 12 PRK steps first"));
        }
        let ratio = (self.alphas_cumprod.len() / n) as i64;
        let (mut t, mut prev_t) = (timestep, timestep - ratio);
        if self.counter != 1 {
            let keep = self.ets.len().saturating_sub(3);
            self.ets.drain(..keep);
            self.ets.push(out.clone());
        } else {
            prev_t = timestep;
            t = timestep + ratio;
        }
        let e = &self.ets;
        let k = e.len();
        let mut sample = x;
        let eps = if k == 1 && self.counter == 0 {
            self.cur_sample = Some(sample.clone());
            out
        } else if k == 1 && self.counter == 1 {
            sample = self
                .cur_sample
                .take()
                .ok_or_else(|| Error::msg("PNDMScheduler: missing warm-up sample"))?;
            scale(&(out + &e[0])?, 0.5)?
        } else if k == 2 {
            scale(&lincomb(&[(3.0, &e[1]), (-1.0, &e[0])])?, 0.5)?
        } else if k == 3 {
            div(&lincomb(&[(23.0, &e[2]), (-16.0, &e[1]), (5.0, &e[0])])?, 12.0)?
        } else {
            let sum = lincomb(&[(55.0, &e[3]), (-59.0, &e[2]), (37.0, &e[1]), (-9.0, &e[0])])?;
            scale(&sum, 1.0 / 24.0)?
        };
        let prev = self.get_prev_sample(&sample, t, prev_t, &eps)?;
        self.counter += 1;
        Ok(prev)
    }
}

impl Scheduler for PNDMScheduler {
    fn class_name(&self) -> &'static str {
        "PNDMScheduler"
    }

    fn set_timesteps(&mut self, n: usize) -> Result<()> {
        let num_train = self.alphas_cumprod.len();
        check_steps(n, num_train)?;
        // diffusers' `_timesteps`, ascending.
        let mut base: Vec<i64> = discrete_timesteps(self.spacing, num_train, n, self.steps_offset)
            .into_iter()
            .map(|t| t as i64)
            .collect();
        base.reverse();
        let (prk, plms): (Vec<i64>, Vec<i64>) = if self.skip_prk_steps {
            let mut plms = base[..n - 1].to_vec();
            if n >= 2 {
                plms.push(base[n - 2]);
            }
            plms.push(base[n - 1]);
            plms.reverse();
            (Vec::new(), plms)
        } else {
            if n < 4 {
                return Err(Error::msg(format!(
                    "PNDMScheduler with PRK steps (skip_prk_steps = false) needs at least 4 \
                     inference steps, got {n}"
                )));
            }
            let half = (num_train / n / 2) as i64;
            let stages: Vec<i64> = base[n - 4..].iter().flat_map(|&t| [t, t + half]).collect();
            // prk[:-1].repeat(2)[1:-1][::-1]
            let repeated: Vec<i64> =
                stages[..stages.len() - 1].iter().flat_map(|&t| [t, t]).collect();
            let mut prk = repeated[1..repeated.len() - 1].to_vec();
            prk.reverse();
            let mut plms = base[..n - 3].to_vec();
            plms.reverse();
            (prk, plms)
        };
        self.timesteps = prk.iter().chain(&plms).map(|&t| t as f64).collect();
        self.prk_timesteps = prk;
        self.num_inference_steps = Some(n);
        self.ets.clear();
        self.counter = 0;
        self.cur_model_output = None;
        self.cur_sample = None;
        Ok(())
    }

    fn step_f32(&mut self, input: StepInput<'_>) -> Result<Tensor> {
        let StepInput { model_output: out, timestep, sample: x, .. } = input;
        let n = self.num_inference_steps.ok_or_else(|| not_ready(self.class_name()))?;
        if timestep.fract() != 0.0 {
            return Err(Error::msg(format!(
                "PNDMScheduler: timestep {timestep} is not an integer"
            )));
        }
        let t = timestep as i64;
        let prev = if self.counter < self.prk_timesteps.len() && !self.skip_prk_steps {
            self.step_prk(out, t, x, n)?
        } else {
            self.step_plms(out, t, x, n)?
        };
        Ok(prev)
    }

    fn supports_thresholding(&self) -> bool {
        false
    }

    fn noise_levels(&self) -> NoiseLevels<'_> {
        NoiseLevels::alphas_cumprod(self.prediction, &self.alphas_cumprod, &self.timesteps)
    }
}
