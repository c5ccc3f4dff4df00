//! Seeds and generators: diffusers' and AUTOMATIC1111's conventions, and A1111's variation
//! seeds.
//!
//! - `--seed-mode diffusers` (default): one generator seeded `seed` fills the whole batch
//!   (`torch.randn([B, C, h, w], generator=g)`), for the initial noise and every sampler step;
//!   image `i > 0` depends on the batch size and cannot be recreated alone.
//! - `--seed-mode a1111`: image `k` of the batch (prompt-major) gets seed `seed + k` and a
//!   generator of its own ([`ltd_nn::rng::PerImage`], diffusers' list of generators), so
//!   `--num-images 1 --seed <seed + k>` recreates it alone. The `parameters` chunk records each
//!   image's own seed.
//! - `--rng cpu` is PyTorch's CPU generator, `--rng cuda` A1111's "NV" source: its NumPy port of
//!   Philox (`modules/rng_philox.py`, [`ltd_nn::PhiloxRng`]).
//! - `--subseed S --subseed-strength W` (A1111's "variation seed", `modules/rng.py`
//!   `ImageRNG.first`): the initial noise of each image is `slerp(W, noise(seed), noise(S))`, the
//!   subseed's noise drawn from a generator of its own (seeded `S + k` for image `k` in a1111
//!   mode, one generator filling the batch otherwise); later sampler noise comes from the seed's
//!   generator alone. `slerp` is A1111's, quirks included: each image's `[C, H, W]` noise is
//!   normalised over dim 1 (the height), and above a mean cosine of 0.9995 it falls back to
//!   `low·W + high·(1 − W)` (weights swapped against the slerp branch).

use candle_core::{DType, Device, Tensor};
use ltd_nn::rng::PerImage;
use ltd_nn::{NoiseSource, PhiloxRng, TorchRng};

use crate::error::Result;
use crate::request::{GenerateRequest, RngKind, SeedMode};

/// One generator of the kind the request asks for.
fn generator(rng: RngKind, seed: u64) -> Box<dyn NoiseSource> {
    match rng {
        RngKind::Cpu => Box::new(TorchRng::new(seed)),
        RngKind::Cuda => Box::new(PhiloxRng::new(seed)),
    }
}

/// The generators of one run for a batch of `batch` images starting at `seed`.
fn generators(req: &GenerateRequest, seed: u64, batch: usize) -> PerImage<Box<dyn NoiseSource>> {
    match req.seed_mode {
        SeedMode::Diffusers => PerImage::new(vec![generator(req.rng, seed)]),
        SeedMode::A1111 => PerImage::consecutive_seeds(seed, batch, |s| generator(req.rng, s)),
    }
}

/// The seed recorded for image `k` (prompt-major) of a request.
pub(crate) fn image_seed(req: &GenerateRequest, k: usize) -> u64 {
    match req.seed_mode {
        SeedMode::Diffusers => req.seed,
        SeedMode::A1111 => req.seed.wrapping_add(k as u64),
    }
}

/// A1111's infotext entries for the variation seed of image `k`.
pub(crate) fn push_params(req: &GenerateRequest, k: usize, extra: &mut Vec<(String, String)>) {
    if let Some(sub) = &req.subseed {
        let seed = match req.seed_mode {
            SeedMode::Diffusers => sub.seed,
            SeedMode::A1111 => sub.seed.wrapping_add(k as u64),
        };
        extra.push(("Variation seed".into(), seed.to_string()));
        extra.push(("Variation seed strength".into(), crate::params::fmt_number(sub.strength)));
    }
}

/// Every random draw of one run: the seed's generator(s), and the subseed's for the initial
/// noise.
pub(crate) struct Seeds {
    main: PerImage<Box<dyn NoiseSource>>,
    variation: Option<(PerImage<Box<dyn NoiseSource>>, f64)>,
    per_image: bool,
}

impl Seeds {
    /// The generators a request asks for, for a batch of `batch` images.
    pub fn new(req: &GenerateRequest, batch: usize) -> Self {
        let variation = req
            .subseed
            .as_ref()
            .filter(|s| s.strength != 0.0)
            .map(|s| (generators(req, s.seed, batch), s.strength));
        Self {
            main: generators(req, req.seed, batch),
            variation,
            per_image: req.seed_mode == SeedMode::A1111 && batch > 1,
        }
    }

    /// How many copies of an init image to encode: one per generator, so that each draws its
    /// own posterior sample (diffusers' rule for a list of generators).
    pub fn posterior_batch(&self) -> usize {
        if self.per_image {
            self.main.sources().len()
        } else {
            1
        }
    }

    /// The first noise of a run (the initial latents, or the image-to-image noise), with the
    /// variation seed mixed in.
    pub fn initial_noise(
        &mut self,
        shape: &[usize],
        dtype: DType,
        device: &Device,
    ) -> Result<Tensor> {
        let Some((sub, strength)) = &mut self.variation else {
            return Ok(self.main.randn(shape, dtype, device)?);
        };
        let noise = self.main.randn(shape, DType::F32, device)?;
        let high = sub.randn(shape, DType::F32, device)?;
        let n = shape.first().copied().unwrap_or(1);
        let mut rows = Vec::with_capacity(n);
        for i in 0..n {
            let (a, b) = (noise.get(i)?, high.get(i)?);
            let (c, h, w) = a.dims3()?;
            let mixed = slerp(*strength as f32, &a.to_vec3()?, &b.to_vec3()?);
            rows.push(Tensor::from_vec(mixed, (c, h, w), device)?);
        }
        Ok(Tensor::stack(&rows, 0)?.to_dtype(dtype)?)
    }
}

impl NoiseSource for Seeds {
    fn randn(
        &mut self,
        shape: &[usize],
        dtype: DType,
        device: &Device,
    ) -> candle_core::Result<Tensor> {
        self.main.randn(shape, dtype, device)
    }
}

/// A1111's `slerp(val, low, high)` on one image's `[C, H, W]` noise, in f32 as torch computes
/// it there: `low/‖low‖` and `high/‖high‖` with norms over dim 1, their dot product over dim 1
/// (`[C, W]`), then either the linear fallback or the spherical weights per `(c, w)` column.
pub fn slerp(val: f32, low: &[Vec<Vec<f32>>], high: &[Vec<Vec<f32>>]) -> Vec<f32> {
    let (c, h) = (low.len(), low.first().map_or(0, Vec::len));
    let w = low.first().and_then(|p| p.first()).map_or(0, Vec::len);
    let norm = |x: &[Vec<Vec<f32>>], ci: usize, wi: usize| -> f32 {
        (0..h).map(|hi| x[ci][hi][wi] * x[ci][hi][wi]).sum::<f32>().sqrt()
    };
    // dot[c][w] = Σ_h (low/‖low‖)(high/‖high‖)
    let mut dot = vec![vec![0f32; w]; c];
    for ci in 0..c {
        for wi in 0..w {
            let (nl, nh) = (norm(low, ci, wi), norm(high, ci, wi));
            dot[ci][wi] = (0..h).map(|hi| (low[ci][hi][wi] / nl) * (high[ci][hi][wi] / nh)).sum();
        }
    }
    let mean = dot.iter().flatten().sum::<f32>() / (c * w).max(1) as f32;
    let mut out = Vec::with_capacity(c * h * w);
    for ci in 0..c {
        for hi in 0..h {
            for wi in 0..w {
                let (l, r) = (low[ci][hi][wi], high[ci][hi][wi]);
                out.push(if mean > 0.9995 {
                    l * val + r * (1.0 - val)
                } else {
                    let omega = dot[ci][wi].acos();
                    let so = omega.sin();
                    ((1.0 - val) * omega).sin() / so * l + (val * omega).sin() / so * r
                });
            }
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    fn col(v: &[f32]) -> Vec<Vec<Vec<f32>>> {
        // One channel, one column: [1, H, 1].
        vec![v.iter().map(|&x| vec![x]).collect()]
    }

    #[test]
    fn slerp_keeps_the_ends_and_the_norm_of_orthogonal_noise() {
        let (a, b) = (col(&[3.0, 0.0]), col(&[0.0, 2.0]));
        assert_eq!(slerp(0.0, &a, &b), [3.0, 0.0]);
        let end = slerp(1.0, &a, &b);
        assert!((end[0]).abs() < 1e-6 && (end[1] - 2.0).abs() < 1e-6, "{end:?}");
        // Halfway between orthogonal unit directions: both weights sin(π/4)/sin(π/2).
        let mid = slerp(0.5, &a, &b);
        let k = std::f32::consts::FRAC_1_SQRT_2;
        assert!((mid[0] - 3.0 * k).abs() < 1e-6 && (mid[1] - 2.0 * k).abs() < 1e-6, "{mid:?}");
    }

    #[test]
    fn slerp_falls_back_to_a1111s_swapped_linear_mix_for_parallel_noise() {
        // A1111 returns low·val + high·(1 − val) when the directions agree.
        let (a, b) = (col(&[1.0, 1.0]), col(&[2.0, 2.0]));
        assert_eq!(slerp(0.25, &a, &b), [0.25 + 1.5, 0.25 + 1.5]);
    }
}
