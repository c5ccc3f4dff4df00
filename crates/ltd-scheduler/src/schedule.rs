//! Training noise schedules and the numpy/torch numerics diffusers builds them with.
//!
//! diffusers computes betas and ᾱ in float32 torch tensors and the inference timesteps and
//! sigmas in float64 numpy, then stores sigmas as float32. We follow the same precision at
//! every stage (f32 where diffusers holds a float32 tensor, f64 where it holds numpy float64),
//! and reproduce torch's linspace kernel and numpy's arange/linspace/interp/round exactly, so
//! that the tables agree bit for bit and the trajectories only differ by tensor-op rounding.

use ltd_nn::ConfigError;

use crate::config::{BetaSchedule, SchedulerConfig, TimestepSpacing};

/// The beta-related fields of a config, with one class's defaults applied.
#[derive(Debug, Clone, PartialEq)]
pub struct BetaConfig {
    /// T.
    pub num_train_timesteps: usize,
    /// First beta.
    pub beta_start: f64,
    /// Last beta.
    pub beta_end: f64,
    /// Layout of the betas.
    pub beta_schedule: BetaSchedule,
    /// Explicit betas (override `beta_schedule`).
    pub trained_betas: Option<Vec<f64>>,
    /// Rescale to zero terminal SNR (only for classes that read the field).
    pub rescale_betas_zero_snr: bool,
}

/// Class defaults for the beta fields.
pub(crate) struct BetaDefaults {
    pub beta_start: f64,
    pub beta_end: f64,
    pub beta_schedule: BetaSchedule,
    /// Whether the class reads `rescale_betas_zero_snr` at all.
    pub reads_zero_snr: bool,
}

/// diffusers' most common defaults (DDPM, DDIM, PNDM, Euler, LMS, DPM-Solver, UniPC).
pub(crate) const DEFAULT_BETAS: BetaDefaults = BetaDefaults {
    beta_start: 0.0001,
    beta_end: 0.02,
    beta_schedule: BetaSchedule::Linear,
    reads_zero_snr: true,
};

impl BetaConfig {
    /// Reads the beta fields with a class's defaults.
    pub(crate) fn read(
        cfg: &SchedulerConfig,
        d: &BetaDefaults,
    ) -> std::result::Result<Self, ConfigError> {
        let num_train_timesteps = cfg.num_train_timesteps.unwrap_or(1000);
        if num_train_timesteps < 2 {
            return Err(ConfigError::unsupported("num_train_timesteps", num_train_timesteps));
        }
        let beta_schedule = cfg.beta_schedule(d.beta_schedule)?;
        if let Some(b) = &cfg.trained_betas {
            if b.len() != num_train_timesteps {
                return Err(ConfigError::new(
                    "trained_betas",
                    format!(
                        "has {} values but num_train_timesteps is {num_train_timesteps}",
                        b.len()
                    ),
                ));
            }
        }
        Ok(Self {
            num_train_timesteps,
            beta_start: cfg.beta_start.unwrap_or(d.beta_start),
            beta_end: cfg.beta_end.unwrap_or(d.beta_end),
            beta_schedule,
            trained_betas: cfg.trained_betas.clone(),
            rescale_betas_zero_snr: d.reads_zero_snr && cfg.rescale_betas_zero_snr.unwrap_or(false),
        })
    }

    /// The betas as diffusers' `__init__` computes them (float32).
    pub fn betas(&self) -> Vec<f32> {
        let t = self.num_train_timesteps;
        let betas = match &self.trained_betas {
            Some(b) => b.iter().map(|&v| v as f32).collect(),
            None => match self.beta_schedule {
                BetaSchedule::Linear => torch_linspace_f32(self.beta_start, self.beta_end, t),
                BetaSchedule::ScaledLinear => {
                    torch_linspace_f32(self.beta_start.sqrt(), self.beta_end.sqrt(), t)
                        .into_iter()
                        .map(|b| b * b)
                        .collect()
                }
                BetaSchedule::SquaredCosCapV2 => cosine_betas(t),
            },
        };
        if self.rescale_betas_zero_snr {
            rescale_zero_terminal_snr(&betas)
        } else {
            betas
        }
    }

    /// ᾱₜ = ∏ (1 − βₛ), as `torch.cumprod` on float32 (double accumulator on the CPU).
    pub fn alphas_cumprod(&self) -> Vec<f32> {
        alphas_cumprod(&self.betas())
    }
}

/// `torch.cumprod(1 - betas)` for float32 tensors on the CPU.
pub(crate) fn alphas_cumprod(betas: &[f32]) -> Vec<f32> {
    let mut acc = 1f64;
    betas
        .iter()
        .map(|&b| {
            acc *= f64::from(1.0f32 - b);
            acc as f32
        })
        .collect()
}

/// `torch.linspace(start, end, steps, dtype=torch.float32)` as the CPU kernel computes it: the
/// step in float32, the first half counted up from `start`, the second half down from `end`.
pub(crate) fn torch_linspace_f32(start: f64, end: f64, steps: usize) -> Vec<f32> {
    let (s, e) = (start as f32, end as f32);
    if steps <= 1 {
        return vec![s; steps];
    }
    let step = (e - s) / (steps - 1) as f32;
    let half = steps / 2;
    (0..steps)
        .map(|i| {
            if i < half {
                (f64::from(s) + f64::from(step) * i as f64) as f32
            } else {
                (f64::from(e) - f64::from(step) * (steps - 1 - i) as f64) as f32
            }
        })
        .collect()
}

/// `betas_for_alpha_bar(T)` with the cosine ᾱ (Nichol & Dhariwal 2021, eq. 17), capped at 0.999.
fn cosine_betas(t: usize) -> Vec<f32> {
    let alpha_bar = |x: f64| ((x + 0.008) / 1.008 * std::f64::consts::PI / 2.0).cos().powi(2);
    (0..t)
        .map(|i| {
            let t1 = i as f64 / t as f64;
            let t2 = (i + 1) as f64 / t as f64;
            (1.0 - alpha_bar(t2) / alpha_bar(t1)).min(0.999) as f32
        })
        .collect()
}

/// Rescales betas to zero terminal SNR (Lin et al. 2023, algorithm 1), in float32 like diffusers.
pub(crate) fn rescale_zero_terminal_snr(betas: &[f32]) -> Vec<f32> {
    let ac = alphas_cumprod(betas);
    let mut sqrt_ac: Vec<f32> = ac.iter().map(|a| a.sqrt()).collect();
    let first = sqrt_ac[0];
    let last = sqrt_ac[sqrt_ac.len() - 1];
    let scale = first / (first - last);
    for v in &mut sqrt_ac {
        *v -= last;
        *v *= scale;
    }
    let ab: Vec<f32> = sqrt_ac.iter().map(|v| v * v).collect();
    let mut out = Vec::with_capacity(ab.len());
    out.push(1.0 - ab[0]);
    out.extend(ab.windows(2).map(|w| 1.0 - w[1] / w[0]));
    out
}

/// The k-diffusion training sigmas σₜ = √((1 − ᾱₜ)/ᾱₜ), float32, in timestep order.
pub(crate) fn train_sigmas(alphas_cumprod: &[f32]) -> Vec<f32> {
    alphas_cumprod.iter().map(|&a| ((1.0 - a) / a).sqrt()).collect()
}

/// diffusers' zero-SNR fix for sigma schedulers: ᾱ_T = 2⁻²⁴ so σ_T is finite.
pub(crate) fn fix_terminal_alpha(alphas_cumprod: &mut [f32], rescaled: bool) {
    if rescaled {
        if let Some(last) = alphas_cumprod.last_mut() {
            *last = 2f32.powi(-24);
        }
    }
}

/// `np.round`: round half to even.
pub(crate) fn np_round(x: f64) -> f64 {
    x.round_ties_even()
}

/// `np.linspace(start, stop, num)` (endpoint included) in float64.
pub(crate) fn np_linspace(start: f64, stop: f64, num: usize) -> Vec<f64> {
    if num == 1 {
        return vec![start];
    }
    let step = (stop - start) / (num - 1) as f64;
    let mut y: Vec<f64> = (0..num).map(|i| i as f64 * step + start).collect();
    if let Some(last) = y.last_mut() {
        *last = stop;
    }
    y
}

/// `np.linspace(start, stop, num, endpoint=False)` in float64.
pub(crate) fn np_linspace_open(start: f64, stop: f64, num: usize) -> Vec<f64> {
    let step = (stop - start) / num as f64;
    (0..num).map(|i| i as f64 * step + start).collect()
}

/// `np.arange(start, stop, step)` for floats: length ⌈(stop − start)/step⌉ and values
/// `start + i·δ` with δ = (start + step) − start, as numpy's fill does.
pub(crate) fn np_arange(start: f64, stop: f64, step: f64) -> Vec<f64> {
    let len = ((stop - start) / step).ceil();
    if len.is_nan() || len <= 0.0 {
        return Vec::new();
    }
    let second = start + step;
    let delta = second - start;
    (0..len as usize)
        .map(|i| match i {
            0 => start,
            1 => second,
            _ => start + i as f64 * delta,
        })
        .collect()
}

/// `np.interp(x, arange(len(fp)), fp)` for a table on the integer grid.
pub(crate) fn np_interp(x: f64, fp: &[f32]) -> f64 {
    let n = fp.len();
    let last = (n - 1) as f64;
    if x.is_nan() {
        return x;
    }
    if x <= 0.0 {
        return f64::from(fp[0]);
    }
    if x >= last {
        return f64::from(fp[n - 1]);
    }
    let j = x.floor() as usize;
    if x == j as f64 {
        return f64::from(fp[j]);
    }
    let (y0, y1) = (f64::from(fp[j]), f64::from(fp[j + 1]));
    let slope = (y1 - y0) / 1.0;
    slope * (x - j as f64) + y0
}

/// `_sigma_to_t`: the fractional training timestep whose log-sigma interpolates `sigma`.
pub(crate) fn sigma_to_t(sigma: f64, log_sigmas: &[f32]) -> f64 {
    let log_sigma = sigma.max(1e-10).ln();
    // argmax of the cumulative count of `log_sigma >= log_sigmas[i]`: the last index reached.
    let mut count = 0usize;
    let mut best = 0usize;
    let mut best_idx = 0usize;
    for (i, &ls) in log_sigmas.iter().enumerate() {
        if log_sigma - f64::from(ls) >= 0.0 {
            count += 1;
        }
        if count > best {
            best = count;
            best_idx = i;
        }
    }
    let low_idx = best_idx.min(log_sigmas.len() - 2);
    let high_idx = low_idx + 1;
    let low = f64::from(log_sigmas[low_idx]);
    let high = f64::from(log_sigmas[high_idx]);
    let w = ((low - log_sigma) / (low - high)).clamp(0.0, 1.0);
    (1.0 - w) * low_idx as f64 + w * high_idx as f64
}

/// Karras et al. (2022) eq. 5 with ρ = 7: `n` sigmas from `sigma_max` down to `sigma_min`.
pub(crate) fn karras_sigmas(sigma_min: f64, sigma_max: f64, n: usize) -> Vec<f64> {
    let rho = 7.0f64;
    let min_inv_rho = sigma_min.powf(1.0 / rho);
    let max_inv_rho = sigma_max.powf(1.0 / rho);
    np_linspace(0.0, 1.0, n)
        .into_iter()
        .map(|r| (max_inv_rho + r * (min_inv_rho - max_inv_rho)).powf(rho))
        .collect()
}

/// ln of each float32 value, in float32 (`np.log` on a float32 array).
pub(crate) fn log_f32(values: &[f32]) -> Vec<f32> {
    values.iter().map(|v| v.ln()).collect()
}

/// The VP coefficients of a k-diffusion sigma: αₜ = 1/√(σ²+1), σₜ = σ·αₜ (float32, as torch).
pub(crate) fn vp_alpha_sigma(sigma: f32) -> (f32, f32) {
    let alpha = 1.0 / (sigma * sigma + 1.0).sqrt();
    (alpha, sigma * alpha)
}

/// λ = ln αₜ − ln σₜ, the half log-SNR (float32, as torch).
pub(crate) fn lambda(alpha: f32, sigma: f32) -> f32 {
    alpha.ln() - sigma.ln()
}

/// DDPM/DDIM/PNDM timesteps: integer values, descending (`set_timesteps` of those classes).
pub(crate) fn discrete_timesteps(
    spacing: TimestepSpacing,
    num_train: usize,
    n: usize,
    steps_offset: i64,
) -> Vec<f64> {
    let timesteps: Vec<i64> = match spacing {
        TimestepSpacing::Linspace => np_linspace(0.0, (num_train - 1) as f64, n)
            .into_iter()
            .rev()
            .map(|t| np_round(t) as i64)
            .collect(),
        TimestepSpacing::Leading => {
            let ratio = (num_train / n) as i64;
            (0..n as i64).rev().map(|i| i * ratio + steps_offset).collect()
        }
        TimestepSpacing::Trailing => {
            np_arange(num_train as f64, 0.0, -(num_train as f64 / n as f64))
                .into_iter()
                .map(|t| np_round(t) as i64 - 1)
                .collect()
        }
    };
    timesteps.into_iter().map(|t| t as f64).collect()
}

/// Euler/Heun/LMS timesteps: float32 values (not rounded for `linspace`), descending.
pub(crate) fn k_timesteps(
    spacing: TimestepSpacing,
    num_train: usize,
    n: usize,
    steps_offset: i64,
) -> Vec<f32> {
    match spacing {
        TimestepSpacing::Linspace => np_linspace(0.0, (num_train - 1) as f64, n)
            .into_iter()
            .rev()
            .map(|t| t as f32)
            .collect(),
        TimestepSpacing::Leading => {
            let ratio = num_train / n;
            (0..n).rev().map(|i| (i * ratio) as f32 + steps_offset as f32).collect()
        }
        TimestepSpacing::Trailing => {
            np_arange(num_train as f64, 0.0, -(num_train as f64 / n as f64))
                .into_iter()
                .map(|t| np_round(t) as f32 - 1.0)
                .collect()
        }
    }
}

/// DPM-Solver/UniPC timesteps: `n` of `n + 1` evenly spread points below `last_timestep`,
/// integer values, descending.
pub(crate) fn solver_timesteps(
    spacing: TimestepSpacing,
    num_train: usize,
    last_timestep: usize,
    n: usize,
    steps_offset: i64,
) -> Vec<f64> {
    let timesteps: Vec<i64> = match spacing {
        TimestepSpacing::Linspace => np_linspace(0.0, last_timestep as f64 - 1.0, n + 1)
            .into_iter()
            .rev()
            .take(n)
            .map(|t| np_round(t) as i64)
            .collect(),
        TimestepSpacing::Leading => {
            let ratio = (last_timestep / (n + 1)) as i64;
            (1..=n as i64).rev().map(|i| i * ratio + steps_offset).collect()
        }
        TimestepSpacing::Trailing => {
            np_arange(last_timestep as f64, 0.0, -(num_train as f64 / n as f64))
                .into_iter()
                .map(|t| np_round(t) as i64 - 1)
                .collect()
        }
    };
    timesteps.into_iter().map(|t| t as f64).collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn np_helpers_match_numpy_on_known_values() {
        // np.arange(1000, 0, -1000/7).round() - 1 == [999, 856, 713, 570, 428, 285, 142]
        let ts: Vec<f64> =
            np_arange(1000.0, 0.0, -1000.0 / 7.0).into_iter().map(|v| np_round(v) - 1.0).collect();
        assert_eq!(ts, vec![999.0, 856.0, 713.0, 570.0, 428.0, 285.0, 142.0]);
        assert_eq!(np_round(2.5), 2.0);
        assert_eq!(np_round(3.5), 4.0);
        assert_eq!(np_linspace(0.0, 999.0, 1), vec![0.0]);
        assert_eq!(np_linspace(0.0, 1.0, 3), vec![0.0, 0.5, 1.0]);
        assert_eq!(np_linspace_open(0.0, 50.0, 4), vec![0.0, 12.5, 25.0, 37.5]);
        assert_eq!(np_interp(1.5, &[0.0, 1.0, 3.0]), 2.0);
        assert_eq!(np_interp(5.0, &[0.0, 1.0, 3.0]), 3.0);
    }

    #[test]
    fn torch_linspace_endpoints_are_exact() {
        let v = torch_linspace_f32(0.0001, 0.02, 1000);
        assert_eq!(v[0], 0.0001f32);
        assert_eq!(v[999], 0.02f32);
        assert_eq!(torch_linspace_f32(3.0, 5.0, 1), vec![3.0]);
    }

    #[test]
    fn zero_snr_rescale_ends_at_zero_alpha_bar() {
        let cfg = BetaConfig {
            num_train_timesteps: 1000,
            beta_start: 0.00085,
            beta_end: 0.012,
            beta_schedule: BetaSchedule::ScaledLinear,
            trained_betas: None,
            rescale_betas_zero_snr: true,
        };
        let ac = cfg.alphas_cumprod();
        assert_eq!(ac[999], 0.0);
        assert!(ac.windows(2).all(|w| w[1] <= w[0]));
    }
}
