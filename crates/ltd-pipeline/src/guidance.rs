//! Classifier-free guidance and what bounds it.
//!
//! | symbol | meaning |
//! |---|---|
//! | e_u, e_c | model outputs for the unconditional (negative) and conditional prompts |
//! | g | guidance scale |
//! | φ | guidance rescale factor |
//! | x₀ | clean latents predicted from a model output by the sampler |
//!
//! 1. Guidance (Ho & Salimans 2022): e = e_u + g·(e_c − e_u).
//! 2. Rescale (Lin et al. 2023, eq. 15–16): e ← φ·e·σ(e_c)/σ(e) + (1 − φ)·e, σ the standard
//!    deviation over all non-batch dimensions (unbiased, as `torch.std`).
//! 3. Imagen dynamic thresholding (Saharia et al. 2022, §2.3) on x₀. Samplers whose diffusers
//!    class supports `thresholding` do it inside their step (diffusers parity); for the others
//!    (Euler, Euler a, Heun, LMS, PNDM, DPM++ 2S…) the pipeline applies the same rule to the
//!    guided prediction: e ← from_x₀(threshold(x₀(e))), which is what those samplers would
//!    compute had diffusers given them the option.
//! 4. The latent-aware limiter ("mimic" guidance, after mcmonkey's sd-dynamic-thresholding):
//!    Imagen's rule clamps values to a pixel-space range, which SD latents (a different scale
//!    per channel) do not have. Instead, per sample and channel, x₀ at guidance g is centred on
//!    its mean and, where its spread (the `percentile` quantile of |x₀ − mean|) exceeds the
//!    spread x₀ has at the lower guidance `mimic`, scaled down to it. The direction high
//!    guidance adds is kept; the over-saturation it brings is not.

use candle_core::{DType, Tensor};
use ltd_scheduler::{dynamic_threshold, quantile_linear, Scheduler};

use crate::error::Result;
use crate::request::{DynamicThreshold, MimicGuidance};

/// e_u + g·(e_c − e_u).
pub fn classifier_free(uncond: &Tensor, cond: &Tensor, scale: f64) -> Result<Tensor> {
    Ok((uncond + ((cond - uncond)? * scale)?)?)
}

/// Unbiased standard deviation over all non-batch dimensions, `[B, 1, …, 1]`, accumulated in
/// f64 as torch's CPU reduction does: in order, on the tensor's device (candle's f64 sums are
/// sequential on the CPU, so these are the values of a host loop, bit for bit), so that a GPU
/// does not copy the prediction to the host every step. Metal has no f64: there the rows are
/// reduced on the host.
fn std_per_sample(x: &Tensor) -> Result<Tensor> {
    let dims = x.dims().to_vec();
    let b = dims[0];
    let mut shape = vec![1usize; dims.len()];
    shape[0] = b;
    let rows = x.to_dtype(DType::F32)?.reshape((b, ()))?;
    let n = rows.dim(1)? as f64;
    if x.device().is_metal() {
        let stds: Vec<f32> = rows
            .to_vec2::<f32>()?
            .iter()
            .map(|r| {
                let mean = r.iter().map(|&v| v as f64).sum::<f64>() / n;
                let ss = r.iter().map(|&v| (v as f64 - mean).powi(2)).sum::<f64>();
                (ss / (n - 1.0).max(1.0)).sqrt() as f32
            })
            .collect();
        return Ok(Tensor::from_vec(stds, shape, x.device())?.to_dtype(x.dtype())?);
    }
    let rows = rows.to_dtype(DType::F64)?;
    // Divisions by a scalar tensor, not `/ n` (a multiplication by 1/n): the host loop divided.
    let scalar = |v: f64| Tensor::new(v, x.device());
    let mean = rows.sum_keepdim(1)?.broadcast_div(&scalar(n)?)?;
    let ss = rows.broadcast_sub(&mean)?.sqr()?.sum_keepdim(1)?;
    let std = ss.broadcast_div(&scalar((n - 1.0).max(1.0))?)?.sqrt()?;
    Ok(std.reshape(shape)?.to_dtype(x.dtype())?)
}

/// diffusers' `rescale_noise_cfg`.
pub fn rescale(guided: &Tensor, cond: &Tensor, phi: f64) -> Result<Tensor> {
    let ratio = (std_per_sample(cond)? / std_per_sample(guided)?)?;
    let rescaled = guided.broadcast_mul(&ratio)?;
    Ok(((rescaled * phi)? + (guided * (1.0 - phi))?)?)
}

/// Applies dynamic thresholding through the sampler's x₀ conversions (step 3 above).
pub fn threshold_via_x0(
    scheduler: &dyn Scheduler,
    guided: &Tensor,
    t: f64,
    sample: &Tensor,
    th: &DynamicThreshold,
) -> Result<Tensor> {
    let x0 = scheduler.pred_original_sample(guided, t, sample)?;
    let x0 = dynamic_threshold(&x0, th.ratio, th.max)?;
    Ok(scheduler.model_output_from_pred_original(&x0, t, sample)?)
}

/// Per (sample, channel): the mean and the `q` quantile of |x − mean| over the spatial dims.
fn centre_and_spread(x: &Tensor, q: f64) -> Result<(Vec<f32>, Vec<f32>)> {
    let (b, c) = (x.dim(0)?, x.dim(1)?);
    let rows = x.to_dtype(DType::F32)?.reshape((b * c, ()))?.to_vec2::<f32>()?;
    let mut means = Vec::with_capacity(rows.len());
    let mut spreads = Vec::with_capacity(rows.len());
    for row in rows {
        let mean = row.iter().map(|&v| v as f64).sum::<f64>() / row.len() as f64;
        let mut dev: Vec<f32> = row.iter().map(|&v| (v as f64 - mean).abs() as f32).collect();
        means.push(mean as f32);
        spreads.push(quantile_linear(&mut dev, q as f32));
    }
    Ok((means, spreads))
}

/// The latent-aware limiter on x₀ (step 4 above): returns the limited x₀ at guidance `g`.
pub fn mimic_limit(x0_high: &Tensor, x0_mimic: &Tensor, percentile: f64) -> Result<Tensor> {
    let dims = x0_high.dims().to_vec();
    let (b, c) = (dims[0], dims[1]);
    let (means, spread_high) = centre_and_spread(x0_high, percentile)?;
    let (_, spread_mimic) = centre_and_spread(x0_mimic, percentile)?;
    let scales: Vec<f32> = spread_high
        .iter()
        .zip(&spread_mimic)
        .map(|(&h, &m)| if h > m && h > 0.0 { m / h } else { 1.0 })
        .collect();
    let mut shape = vec![1usize; dims.len()];
    shape[0] = b;
    shape[1] = c;
    let dev = x0_high.device();
    let means = Tensor::from_vec(means, shape.clone(), dev)?.to_dtype(x0_high.dtype())?;
    let scales = Tensor::from_vec(scales, shape, dev)?.to_dtype(x0_high.dtype())?;
    Ok(x0_high.broadcast_sub(&means)?.broadcast_mul(&scales)?.broadcast_add(&means)?)
}

/// Guides with the latent-aware limiter through the sampler's x₀ conversions.
pub fn mimic_via_x0(
    scheduler: &dyn Scheduler,
    uncond: &Tensor,
    cond: &Tensor,
    guided: &Tensor,
    t: f64,
    sample: &Tensor,
    m: &MimicGuidance,
) -> Result<Tensor> {
    let low = classifier_free(uncond, cond, m.mimic)?;
    let x0_high = scheduler.pred_original_sample(guided, t, sample)?;
    let x0_low = scheduler.pred_original_sample(&low, t, sample)?;
    let x0 = mimic_limit(&x0_high, &x0_low, m.percentile)?;
    Ok(scheduler.model_output_from_pred_original(&x0, t, sample)?)
}

#[cfg(test)]
mod tests {
    use super::*;
    use candle_core::Device;

    fn t(v: &[f32], shape: &[usize]) -> Tensor {
        Tensor::from_vec(v.to_vec(), shape, &Device::Cpu).unwrap()
    }

    #[test]
    fn guidance_and_rescale_follow_diffusers() {
        let u = t(&[0.0, 1.0, 2.0, 3.0], &[1, 4]);
        let c = t(&[1.0, 1.0, 4.0, 3.0], &[1, 4]);
        let g = classifier_free(&u, &c, 3.0).unwrap();
        assert_eq!(g.to_vec2::<f32>().unwrap(), [[3.0, 1.0, 8.0, 3.0]]);
        // φ = 1: the guided output takes the conditional output's (unbiased) std.
        let r = rescale(&g, &c, 1.0).unwrap();
        let std = |x: &Tensor| {
            std_per_sample(x).unwrap().flatten_all().unwrap().to_vec1::<f32>().unwrap()[0]
        };
        assert!((std(&r) - std(&c)).abs() < 1e-6);
        assert!((std(&c) - 1.5).abs() < 1e-6, "unbiased: sqrt(6.75 / 3)");
        // φ = 0 changes nothing.
        assert_eq!(
            rescale(&g, &c, 0.0).unwrap().to_vec2::<f32>().unwrap(),
            g.to_vec2::<f32>().unwrap()
        );
    }

    /// The tensor form gives the host loop's standard deviations bit for bit.
    #[test]
    fn std_per_sample_equals_the_host_loop() {
        let x = ltd_test_support::randn(&[3, 4, 5, 7], 11);
        let host: Vec<f32> = x
            .to_dtype(DType::F64)
            .unwrap()
            .reshape((3, ()))
            .unwrap()
            .to_vec2::<f64>()
            .unwrap()
            .iter()
            .map(|r| {
                let n = r.len() as f64;
                let mean = r.iter().sum::<f64>() / n;
                (r.iter().map(|v| (v - mean).powi(2)).sum::<f64>() / (n - 1.0)).sqrt() as f32
            })
            .collect();
        let got = std_per_sample(&x).unwrap();
        assert_eq!(got.dims(), [3, 1, 1, 1]);
        assert_eq!(got.flatten_all().unwrap().to_vec1::<f32>().unwrap(), host);
    }

    #[test]
    fn mimic_limit_shrinks_only_wider_channels() {
        // Channel 0: spread 4 at high guidance vs 1 at mimic → scaled by 1/4 around its mean.
        // Channel 1: narrower than the mimic → untouched.
        let high = t(&[6.0, -2.0, 2.0, 2.0, 0.1, -0.1, 0.0, 0.0], &[1, 2, 2, 2]);
        let low = t(&[2.0, 0.0, 1.0, 1.0, 1.0, -1.0, 0.0, 0.0], &[1, 2, 2, 2]);
        let out =
            mimic_limit(&high, &low, 1.0).unwrap().flatten_all().unwrap().to_vec1::<f32>().unwrap();
        assert_eq!(out[..4], [3.0, 1.0, 2.0, 2.0]);
        assert_eq!(out[4..], [0.1, -0.1, 0.0, 0.0]);
    }
}
