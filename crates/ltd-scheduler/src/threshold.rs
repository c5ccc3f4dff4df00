//! Bounding the predicted clean sample: `clip_sample` and Imagen dynamic thresholding
//! (Saharia et al. 2022, section 2.3), as diffusers' `_threshold_sample`.
//!
//! Dynamic thresholding, per batch element: s = the `ratio` quantile of |x₀| over all
//! non-batch dimensions (linear interpolation, as `torch.quantile`), clamped to
//! [1, `sample_max_value`]; then x₀ ← clamp(x₀, −s, s) / s.

use candle_core::{DType, Tensor};
use ltd_nn::{ConfigError, Result};

use crate::config::SchedulerConfig;

/// How a sampler bounds its x₀ prediction (diffusers' `thresholding` and `clip_sample`;
/// thresholding wins when both are set, as in diffusers).
#[derive(Debug, Clone, Copy, PartialEq)]
pub enum SampleClamp {
    /// Leave x₀ alone.
    None,
    /// Clip x₀ to ±`range`.
    Clip {
        /// `clip_sample_range`.
        range: f64,
    },
    /// Imagen dynamic thresholding.
    DynamicThreshold {
        /// `dynamic_thresholding_ratio`: the quantile of |x₀|.
        ratio: f64,
        /// `sample_max_value`: the largest threshold.
        max_value: f64,
    },
}

impl SampleClamp {
    /// Reads `thresholding` (+ ratio, max value) and, when the class has it, `clip_sample`
    /// (+ range) with that class's `clip_sample` default.
    pub(crate) fn read(
        cfg: &SchedulerConfig,
        clip_default: Option<bool>,
    ) -> std::result::Result<Self, ConfigError> {
        if cfg.thresholding.unwrap_or(false) {
            let ratio = cfg.dynamic_thresholding_ratio.unwrap_or(0.995);
            if !(0.0..=1.0).contains(&ratio) {
                return Err(ConfigError::new(
                    "dynamic_thresholding_ratio",
                    format!("must be a quantile in [0, 1], got {ratio}"),
                ));
            }
            let max_value = cfg.sample_max_value.unwrap_or(1.0);
            return Ok(Self::DynamicThreshold { ratio, max_value });
        }
        match clip_default {
            Some(default) if cfg.clip_sample.unwrap_or(default) => {
                Ok(Self::Clip { range: cfg.clip_sample_range.unwrap_or(1.0) })
            }
            _ => Ok(Self::None),
        }
    }

    /// Applies the bound to a predicted x₀.
    pub fn apply(&self, x0: &Tensor) -> Result<Tensor> {
        match *self {
            Self::None => Ok(x0.clone()),
            Self::Clip { range } => clip_sample(x0, range),
            Self::DynamicThreshold { ratio, max_value } => dynamic_threshold(x0, ratio, max_value),
        }
    }
}

/// Clips every element to ±`range`.
pub fn clip_sample(x0: &Tensor, range: f64) -> Result<Tensor> {
    Ok(x0.clamp(-range, range)?)
}

/// Imagen dynamic thresholding of `x0` (`[batch, …]`), per batch element; see the module docs.
/// Computes in float32 (diffusers upcasts half precision) and returns `x0`'s dtype.
pub fn dynamic_threshold(x0: &Tensor, ratio: f64, sample_max_value: f64) -> Result<Tensor> {
    let dtype = x0.dtype();
    let dims = x0.dims().to_vec();
    let batch = dims.first().copied().unwrap_or(1);
    let flat = x0.to_dtype(DType::F32)?.reshape((batch, ()))?;
    let rows = flat.abs()?.to_vec2::<f32>()?;
    let thresholds: Vec<f32> = rows
        .into_iter()
        .map(|mut row| {
            quantile_linear(&mut row, ratio as f32).max(1.0).min(sample_max_value as f32)
        })
        .collect();
    let s = Tensor::from_vec(thresholds, (batch, 1), x0.device())?;
    let clamped = flat.broadcast_maximum(&s.neg()?)?.broadcast_minimum(&s)?;
    Ok(clamped.broadcast_div(&s)?.reshape(dims)?.to_dtype(dtype)?)
}

/// `torch.quantile(values, q)` with linear interpolation, in float32 like torch (sorts
/// `values` in place; NaN for an empty slice).
pub fn quantile_linear(values: &mut [f32], q: f32) -> f32 {
    if values.is_empty() {
        return f32::NAN;
    }
    values.sort_by(f32::total_cmp);
    let rank = q * (values.len() - 1) as f32;
    let below = rank.floor();
    let (lo, hi) = (below as usize, rank.ceil() as usize);
    let weight = rank - below;
    let (a, b) = (values[lo], values[hi.min(values.len() - 1)]);
    // torch's lerp, which switches form at weight 0.5 for accuracy.
    if weight.abs() < 0.5 {
        a + weight * (b - a)
    } else {
        b - (b - a) * (1.0 - weight)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use candle_core::Device;

    #[test]
    fn quantile_interpolates_linearly() {
        let mut v = vec![4.0, 1.0, 3.0, 2.0];
        assert_eq!(quantile_linear(&mut v, 0.5), 2.5);
        assert_eq!(quantile_linear(&mut v, 1.0), 4.0);
        assert_eq!(quantile_linear(&mut v, 0.0), 1.0);
    }

    #[test]
    fn dynamic_threshold_is_per_sample() {
        // Sample 0 stays within ±1 (s clamps to 1: plain clipping), sample 1 has s = 2.
        let x = Tensor::new(&[[0.5f32, -0.25, 0.75, -1.0], [2.0, -2.0, 1.0, 4.0]], &Device::Cpu)
            .unwrap();
        let y = dynamic_threshold(&x, 0.5, 3.0).unwrap().to_vec2::<f32>().unwrap();
        assert_eq!(y[0], vec![0.5, -0.25, 0.75, -1.0]);
        assert_eq!(y[1], vec![1.0, -1.0, 0.5, 1.0]);
    }
}
