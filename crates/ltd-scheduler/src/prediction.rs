//! Conversions between what a model predicts (ε, v or x₀) and the clean-sample estimate x₀,
//! in the two parameterisations the samplers use.
//!
//! | symbol | meaning |
//! |--------|---------|
//! | xₜ     | the noisy sample, VP form: xₜ = α x₀ + σ ε (α² + σ² = 1) |
//! | xₖ     | the noisy sample, k-diffusion form: xₖ = x₀ + s ε, with s = σ/α |
//! | v      | velocity, v = α ε − σ x₀ (Salimans & Ho 2022, §4) |

use candle_core::Tensor;
use ltd_nn::Result;

use crate::config::PredictionType;
use crate::ops::{div, lincomb, scale};

/// x₀ from a model output at VP coefficients (α, σ).
pub(crate) fn vp_x0(
    pred: PredictionType,
    output: &Tensor,
    sample: &Tensor,
    alpha: f32,
    sigma: f32,
) -> Result<Tensor> {
    match pred {
        // x₀ = (xₜ − σ ε) / α
        PredictionType::Epsilon => div(&(sample - scale(output, sigma)?)?, alpha),
        // x₀ = α xₜ − σ v
        PredictionType::VPrediction => lincomb(&[(alpha, sample), (-sigma, output)]),
        PredictionType::Sample => Ok(output.clone()),
    }
}

/// The model output that [`vp_x0`] maps to `x0`.
pub(crate) fn vp_output_from_x0(
    pred: PredictionType,
    x0: &Tensor,
    sample: &Tensor,
    alpha: f32,
    sigma: f32,
) -> Result<Tensor> {
    match pred {
        // ε = (xₜ − α x₀) / σ
        PredictionType::Epsilon => div(&(sample - scale(x0, alpha)?)?, sigma),
        // v = (α xₜ − x₀) / σ
        PredictionType::VPrediction => div(&(scale(sample, alpha)? - x0)?, sigma),
        PredictionType::Sample => Ok(x0.clone()),
    }
}

/// x₀ from a model output for a k-diffusion sample at sigma `s` (Euler, Heun, LMS).
pub(crate) fn k_x0(
    pred: PredictionType,
    output: &Tensor,
    sample: &Tensor,
    s: f32,
) -> Result<Tensor> {
    match pred {
        // x₀ = xₖ − s ε
        PredictionType::Epsilon => Ok((sample - scale(output, s)?)?),
        // x₀ = v · (−s/√(s²+1)) + xₖ/(s²+1)  (c_out, c_skip of Karras et al. 2022, table 1)
        PredictionType::VPrediction => {
            let c_out = -s / (s * s + 1.0).sqrt();
            Ok((scale(output, c_out)? + div(sample, s * s + 1.0)?)?)
        }
        PredictionType::Sample => Ok(output.clone()),
    }
}

/// The model output that [`k_x0`] maps to `x0`.
pub(crate) fn k_output_from_x0(
    pred: PredictionType,
    x0: &Tensor,
    sample: &Tensor,
    s: f32,
) -> Result<Tensor> {
    match pred {
        PredictionType::Epsilon => div(&(sample - x0)?, s),
        PredictionType::VPrediction => {
            let c_out = -s / (s * s + 1.0).sqrt();
            let c_skip = 1.0 / (s * s + 1.0);
            div(&(x0 - scale(sample, c_skip)?)?, c_out)
        }
        PredictionType::Sample => Ok(x0.clone()),
    }
}
