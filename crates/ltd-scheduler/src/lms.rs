//! Linear multistep (k-diffusion's `sample_lms`, Karras et al. 2022 §3), as diffusers'
//! `LMSDiscreteScheduler` with its default order 4.
//!
//! | code          | meaning |
//! |---------------|---------|
//! | `derivatives` | dⱼ = (xⱼ − x₀ⱼ)/σⱼ for the last `order` steps, newest last |
//! | `coeff(k)`    | ∫_{σᵢ}^{σᵢ₊₁} ∏_{m≠k} (τ − σᵢ₋ₘ)/(σᵢ₋ₖ − σᵢ₋ₘ) dτ, the Adams–Bashforth weight of dᵢ₋ₖ |
//!
//! Step:
//! 1. x₀ from the model output; dᵢ = (xᵢ − x₀)/σᵢ; keep the last 4 derivatives.
//! 2. order = min(i + 1, 4); weights by integrating the Lagrange basis polynomials.
//! 3. xᵢ₊₁ = xᵢ + Σₖ coeff(k) dᵢ₋ₖ.
//!
//! diffusers integrates with `scipy.integrate.quad` (epsrel 1e-4) over a float32 integrand;
//! the integrands are polynomials of degree ≤ 3, on which quad stops after its first
//! 21-point Gauss–Kronrod estimate, which we reproduce node for node.

use std::collections::VecDeque;

use candle_core::Tensor;
use ltd_nn::{ConfigError, Result};

use crate::config::{PredictionType, SchedulerConfig, Unimplemented};
use crate::ops::{div, lincomb};
use crate::prediction::k_x0;
use crate::schedule::{BetaConfig, BetaDefaults, DEFAULT_BETAS};
use crate::sigma_schedule::KSchedule;
use crate::{check_steps, NoiseLevels, Scheduler, StepInput};

/// diffusers' default LMS order.
const ORDER: usize = 4;

/// diffusers' `LMSDiscreteScheduler`.
#[derive(Debug, Clone)]
pub struct LMSDiscreteScheduler {
    prediction: PredictionType,
    schedule: KSchedule,
    derivatives: VecDeque<Tensor>,
}

impl LMSDiscreteScheduler {
    /// Reads the fields `LMSDiscreteScheduler.__init__` takes, with its defaults.
    pub fn from_config(cfg: &SchedulerConfig) -> std::result::Result<Self, ConfigError> {
        cfg.reject_unimplemented(Unimplemented::K_SIGMAS)?;
        let defaults = BetaDefaults { reads_zero_snr: false, ..DEFAULT_BETAS };
        let alphas_cumprod = BetaConfig::read(cfg, &defaults)?.alphas_cumprod();
        let num_train = alphas_cumprod.len();
        let prediction = cfg.prediction_type()?;
        let karras = cfg.use_karras_sigmas.unwrap_or(false);
        let mut schedule = KSchedule { karras, ..KSchedule::read(cfg, alphas_cumprod)? };
        // diffusers' __init__ runs set_timesteps(num_train_timesteps).
        schedule.set_timesteps(num_train);
        Ok(Self { prediction, schedule, derivatives: VecDeque::new() })
    }

    /// The weight of the derivative `current` steps back, for a method of `order` at step `i`.
    ///
    /// diffusers evaluates the Lagrange basis with float32 torch scalars (τ rounded to float32,
    /// every factor in float32) and integrates it with `scipy.integrate.quad`, which for these
    /// smooth integrands returns its first 21-point Gauss–Kronrod estimate. We do the same, as
    /// the float32 integrand is noisy near the interval ends at the 1e-6 level.
    fn lms_coefficient(&self, order: usize, i: usize, current: usize) -> f64 {
        let sigmas = &self.schedule.sigmas;
        let s = |k: usize| sigmas[i - k];
        let basis = |tau: f64| {
            let tau = tau as f32;
            let mut prod = 1.0f32;
            for k in (0..order).filter(|&k| k != current) {
                prod *= (tau - s(k)) / (s(current) - s(k));
            }
            f64::from(prod)
        };
        gauss_kronrod_21(basis, f64::from(sigmas[i]), f64::from(sigmas[i + 1]))
    }
}

/// ∫ₐᵇ f by QUADPACK's 21-point Gauss–Kronrod rule (`dqk21`, same evaluation order), exact
/// for polynomials of degree ≤ 31.
// QUADPACK's constants verbatim, so they can be checked against dqk21.f.
#[allow(clippy::excessive_precision)]
fn gauss_kronrod_21(f: impl Fn(f64) -> f64, a: f64, b: f64) -> f64 {
    const XGK: [f64; 11] = [
        0.995_657_163_025_808_080_735_527_280_689_003,
        0.973_906_528_517_171_720_077_964_012_084_452,
        0.930_157_491_355_708_226_001_207_180_059_508,
        0.865_063_366_688_984_510_732_096_688_423_493,
        0.780_817_726_586_416_897_063_717_578_345_042,
        0.679_409_568_299_024_406_234_327_365_114_874,
        0.562_757_134_668_604_683_339_000_099_272_694,
        0.433_395_394_129_247_190_799_265_943_165_784,
        0.294_392_862_701_460_198_131_126_603_103_866,
        0.148_874_338_981_631_210_884_826_001_129_720,
        0.0,
    ];
    const WGK: [f64; 11] = [
        0.011_694_638_867_371_874_278_064_396_062_192,
        0.032_558_162_307_964_727_478_818_972_459_390,
        0.054_755_896_574_351_996_031_381_300_244_580,
        0.075_039_674_810_919_952_767_043_140_916_190,
        0.093_125_454_583_697_605_535_065_465_083_366,
        0.109_387_158_802_297_641_899_210_590_325_805,
        0.123_491_976_262_065_851_077_958_109_831_074,
        0.134_709_217_311_473_325_928_054_001_771_707,
        0.142_775_938_577_060_080_797_094_273_138_717,
        0.147_739_104_901_338_491_374_841_515_972_068,
        0.149_445_554_002_916_905_664_936_468_389_821,
    ];
    let centr = 0.5 * (a + b);
    let hlgth = 0.5 * (b - a);
    let mut resk = WGK[10] * f(centr);
    // dqk21 adds the Gauss nodes (even Fortran indices) first, then the Kronrod-only ones.
    for j in (1..10).step_by(2).chain((0..10).step_by(2)) {
        let absc = hlgth * XGK[j];
        resk += WGK[j] * (f(centr - absc) + f(centr + absc));
    }
    resk * hlgth
}

impl Scheduler for LMSDiscreteScheduler {
    fn class_name(&self) -> &'static str {
        "LMSDiscreteScheduler"
    }

    fn set_timesteps(&mut self, n: usize) -> Result<()> {
        check_steps(n, usize::MAX)?;
        self.schedule.set_timesteps(n);
        self.derivatives.clear();
        Ok(())
    }

    fn step_f32(&mut self, input: StepInput<'_>) -> Result<Tensor> {
        let StepInput { model_output: out, timestep, sample: x, .. } = input;
        let (i, sigma) = self.schedule.begin_step(timestep)?;
        // 1.
        let x0 = k_x0(self.prediction, &out, &x, sigma)?;
        self.derivatives.push_back(div(&(&x - x0)?, sigma)?);
        if self.derivatives.len() > ORDER {
            self.derivatives.pop_front();
        }
        // 2.
        let order = (i + 1).min(ORDER);
        let coeffs: Vec<f32> =
            (0..order).map(|k| self.lms_coefficient(order, i, k) as f32).collect();
        // 3.
        let terms: Vec<(f32, &Tensor)> =
            coeffs.iter().copied().zip(self.derivatives.iter().rev()).collect();
        let prev = (x + lincomb(&terms)?)?;
        self.schedule.index.advance();
        Ok(prev)
    }

    fn noise_levels(&self) -> NoiseLevels<'_> {
        self.schedule.noise_levels(self.prediction)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn gauss_kronrod_is_exact_for_cubics() {
        let f = |x: f64| 2.0 * x * x * x - x * x + 3.0;
        // ∫₀² = [x⁴/2 − x³/3 + 3x]₀² = 8 − 8/3 + 6
        let exact = 8.0 - 8.0 / 3.0 + 6.0;
        assert!((gauss_kronrod_21(f, 0.0, 2.0) - exact).abs() < 1e-12);
        assert!((gauss_kronrod_21(f, 2.0, 0.0) + exact).abs() < 1e-12);
    }
}
