//! AUTOMATIC1111's "hires fix" (`StableDiffusionProcessingTxt2Img.sample_hr_pass` in its
//! `modules/processing.py`): render at the model's native size, where its composition holds,
//! then enlarge and repaint the details with image-to-image at the large size.
//!
//! What [`Pipeline::generate_hires`] does, exactly:
//!
//! 1. The first pass is the request as asked (`--steps`, size, seed, sampler).
//! 2. The target size is `⌊width · scale⌋ × ⌊height · scale⌋`, each rounded down to a multiple
//!    of the VAE's scale factor (A1111 floors the latent size the same way, `target // 8`).
//! 3. The upscale:
//!    - [`HiresUpscaler::Latent`] (A1111's "Latent"): the first pass's final latents are
//!      interpolated to the target's latent size with PyTorch's
//!      `F.interpolate(mode="bilinear", align_corners=False, antialias=False)` (A1111's
//!      `latent_upscale_modes["Latent"]`), no VAE round trip.
//!    - [`HiresUpscaler::Lanczos`] (A1111's "Lanczos"): the first pass is decoded to 8-bit RGB,
//!      resized with a Lanczos-3 filter (PIL's `Image.LANCZOS` algorithm: separable,
//!      horizontal pass first, each pass rounded to 8 bits) and encoded again.
//! 4. The second pass is image-to-image at the target size with `--hires-steps` (default: the
//!    first pass's steps) and `--hires-strength` as its strength, by ltd's (diffusers') rule:
//!    `⌊steps · strength⌋` steps of a `steps`-step schedule. Its noise comes from a fresh
//!    generator of each image's seed, as A1111 makes a new `ImageRNG` from the seeds for the
//!    second pass (where A1111 uses its own img2img step rule, this is diffusers'). Latent: the
//!    upscaled latents are noised directly. Lanczos: each image is its own image-to-image run
//!    (the VAE posterior sample, then the noise, from that image's generator), with the seed
//!    recorded for it.
//!
//! The parameters recorded are the first pass's (its size and steps) with A1111's `Hires
//! upscale`, `Hires steps`, `Hires upscaler` and `Denoising strength`. `--vae-tiling` applies
//! to both passes' VAE work, which bounds the memory of the large decode.

use candle_core::Tensor;

use crate::error::{PipelineError, Result};
use crate::generate::{Generation, Progress, Stage};
use crate::image::RgbImage;
use crate::params::fmt_number;
use crate::pipeline::Pipeline;
use crate::request::{GenerateRequest, InitImage, SeedMode, Subseed};

/// How the first pass is enlarged.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum HiresUpscaler {
    /// Bilinear interpolation of the latents (A1111's "Latent").
    #[default]
    Latent,
    /// Decode, Lanczos-3 resize of the pixels, encode (A1111's "Lanczos").
    Lanczos,
}

impl HiresUpscaler {
    /// A1111's name, as recorded in the infotext.
    pub fn a1111_name(self) -> &'static str {
        match self {
            Self::Latent => "Latent",
            Self::Lanczos => "Lanczos",
        }
    }
}

/// The hires-fix settings.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct HiresFix {
    /// The upscale factor (`--hires-scale`), in [1, 8].
    pub scale: f64,
    /// Steps of the second pass's schedule (`--hires-steps`); `None`: the first pass's.
    pub steps: Option<usize>,
    /// The second pass's image-to-image strength (`--hires-strength`), in (0, 1].
    pub strength: f64,
    /// How the first pass is enlarged.
    pub upscaler: HiresUpscaler,
}

impl Default for HiresFix {
    /// A1111's defaults: ×2, the first pass's steps, denoising strength 0.7, "Latent".
    fn default() -> Self {
        Self { scale: 2.0, steps: None, strength: 0.7, upscaler: HiresUpscaler::Latent }
    }
}

impl HiresFix {
    /// Checks the settings against the request's steps.
    pub fn validate(&self, first_pass_steps: usize) -> Result<()> {
        if !(self.scale >= 1.0 && self.scale <= 8.0) {
            return Err(PipelineError::invalid(
                "hires-scale",
                format!("must be in [1, 8], got {}", self.scale),
            ));
        }
        if !(self.strength > 0.0 && self.strength <= 1.0) {
            return Err(PipelineError::invalid(
                "hires-strength",
                format!("must be in (0, 1], got {}", self.strength),
            ));
        }
        let steps = self.steps.unwrap_or(first_pass_steps);
        if steps == 0 || steps > 10_000 {
            return Err(PipelineError::invalid(
                "hires-steps",
                format!("must be in [1, 10000], got {steps}"),
            ));
        }
        if (steps as f64 * self.strength).floor() < 1.0 {
            return Err(PipelineError::invalid(
                "hires-strength",
                format!(
                    "{} of {steps} steps leaves no denoising step (need steps × strength ≥ 1)",
                    self.strength
                ),
            ));
        }
        Ok(())
    }

    /// The second pass's size for a first pass of `width × height` (see the module docs).
    pub fn target_size(&self, width: usize, height: usize, scale_factor: usize) -> (usize, usize) {
        let up = |v: usize| {
            let t = (v as f64 * self.scale).floor() as usize;
            (t / scale_factor * scale_factor).max(scale_factor)
        };
        (up(width), up(height))
    }
}

impl Pipeline {
    /// Image-to-image from latents `[N, C, h, w]` at the diffusion model's scale instead of a
    /// picture: they are noised to the start of `strength` (with the request's generator) and
    /// denoised at their own size (`req.width`/`height` are taken from them). Hires fix's
    /// second pass with the "Latent" upscaler is exactly this.
    pub fn generate_from_latents(
        &self,
        req: &GenerateRequest,
        latents: &Tensor,
        strength: f64,
        on_step: &mut dyn FnMut(Progress<'_>),
    ) -> Result<Generation> {
        if !(strength > 0.0 && strength <= 1.0) {
            return Err(PipelineError::invalid(
                "strength",
                format!("must be in (0, 1], got {strength}"),
            ));
        }
        if (req.steps as f64 * strength).floor() < 1.0 {
            return Err(PipelineError::invalid("strength", "leaves no denoising step"));
        }
        let f = self.vae_scale_factor();
        let (_, _, h, w) = latents.dims4()?;
        let req = GenerateRequest {
            width: Some(w * f),
            height: Some(h * f),
            init_image: None,
            ..req.clone()
        };
        let stage = Stage { latents: Some(latents), strength: Some(strength), ..Stage::default() };
        self.run_stage(&req, stage, on_step)?.into_generation(req.num_images)
    }

    /// Text-to-image with A1111's hires fix (see the module docs).
    pub fn generate_hires(
        &self,
        req: &GenerateRequest,
        hires: &HiresFix,
        on_step: &mut dyn FnMut(Progress<'_>),
    ) -> Result<Generation> {
        hires.validate(req.steps)?;
        if self.index.kind.is_deepfloyd() {
            return Err(PipelineError::invalid(
                "hires-scale",
                "hires fix works on latents; DeepFloyd IF upscales with its stage II \
                 (--upscale-model)",
            ));
        }
        if req.init_image.is_some() {
            return Err(PipelineError::invalid(
                "hires-scale",
                "hires fix enlarges a text-to-image result; drop --init-image",
            ));
        }
        let f = self.vae_scale_factor();
        let steps = hires.steps.unwrap_or(req.steps);
        let lanczos = hires.upscaler == HiresUpscaler::Lanczos;
        let first =
            self.run_stage(req, Stage { skip_decode: !lanczos, ..Stage::default() }, on_step)?;
        let (_, _, h, w) = first.latents.dims4()?;
        let (tw, th) = hires.target_size(w * f, h * f, f);
        let mut out = if lanczos {
            let mut images = Vec::with_capacity(first.images.len());
            let mut latents = Vec::with_capacity(first.images.len());
            let mut last = None;
            for (k, image) in first.images.iter().enumerate() {
                let image_req = GenerateRequest {
                    prompts: vec![req.prompts[k / req.num_images].clone()],
                    num_images: 1,
                    seed: first.params[k].seed,
                    seed_mode: SeedMode::Diffusers,
                    subseed: req.subseed.map(|s| Subseed {
                        seed: match req.seed_mode {
                            SeedMode::Diffusers => s.seed,
                            SeedMode::A1111 => s.seed.wrapping_add(k as u64),
                        },
                        ..s
                    }),
                    steps,
                    width: None,
                    height: None,
                    init_image: Some(InitImage {
                        image: lanczos_resize(image, tw, th)?,
                        strength: hires.strength,
                    }),
                    ..req.clone()
                };
                let mut one = self.run_stage(&image_req, Stage::default(), on_step)?;
                images.append(&mut one.images);
                latents.push(one.latents.clone());
                last = Some(one);
            }
            let mut out = last.ok_or_else(|| PipelineError::msg("hires fix: no image"))?;
            out.images = images;
            out.latents = Tensor::cat(&latents, 0)?;
            out
        } else {
            let up = upscale_latents(&first.latents, th / f, tw / f)?;
            let big = GenerateRequest { width: Some(tw), height: Some(th), steps, ..req.clone() };
            let stage =
                Stage { latents: Some(&up), strength: Some(hires.strength), ..Stage::default() };
            self.run_stage(&big, stage, on_step)?
        };
        out.params = first.params;
        for p in &mut out.params {
            p.extra.push(("Denoising strength".into(), fmt_number(hires.strength)));
            p.extra.push(("Hires upscale".into(), fmt_number(hires.scale)));
            if let Some(s) = hires.steps {
                p.extra.push(("Hires steps".into(), s.to_string()));
            }
            p.extra.push(("Hires upscaler".into(), hires.upscaler.a1111_name().into()));
        }
        out.timings.encode += first.timings.encode;
        out.timings.denoise += first.timings.denoise;
        out.timings.decode += first.timings.decode;
        out.evaluations += first.evaluations;
        out.steps += first.steps;
        out.into_generation(req.num_images)
    }
}

/// One axis of PyTorch's bilinear interpolation (`align_corners=False`, no antialias) from
/// `n_in` to `n_out` samples, as an `[n_out, n_in]` matrix: output `o` samples the input at
/// `max((o + ½)·n_in/n_out − ½, 0)` between its two neighbours (the last one clamped).
fn bilinear_weights(n_in: usize, n_out: usize) -> Vec<f32> {
    let scale = n_in as f32 / n_out as f32;
    let mut m = vec![0f32; n_out * n_in];
    for o in 0..n_out {
        let src = ((o as f32 + 0.5) * scale - 0.5).max(0.0);
        let i0 = (src.floor() as usize).min(n_in - 1);
        let i1 = (i0 + 1).min(n_in - 1);
        let l1 = src - i0 as f32;
        m[o * n_in + i0] += 1.0 - l1;
        m[o * n_in + i1] += l1;
    }
    m
}

/// Latents `[N, C, h, w]` resized to `[N, C, out_h, out_w]` by PyTorch's
/// `F.interpolate(x, size=(out_h, out_w), mode="bilinear", align_corners=False,
/// antialias=False)`: A1111's "Latent" upscaler. Computed as `W_h · x · W_wᵀ` with the
/// two-tap weight matrices, so it runs on any device.
pub fn upscale_latents(x: &Tensor, out_h: usize, out_w: usize) -> Result<Tensor> {
    let (_, _, h, w) = x.dims4()?;
    let dtype = x.dtype();
    let dev = x.device();
    let wh = Tensor::from_vec(bilinear_weights(h, out_h), (out_h, h), dev)?.to_dtype(dtype)?;
    let ww = Tensor::from_vec(bilinear_weights(w, out_w), (out_w, w), dev)?.to_dtype(dtype)?;
    let rows = x.broadcast_matmul(&ww.t()?)?;
    Ok(wh.broadcast_matmul(&rows)?.contiguous()?)
}

/// The Lanczos window, `sinc(x)·sinc(x/3)` on `|x| < 3`.
fn lanczos3(x: f64) -> f64 {
    let sinc = |v: f64| {
        if v == 0.0 {
            1.0
        } else {
            let p = std::f64::consts::PI * v;
            p.sin() / p
        }
    };
    if x.abs() < 3.0 {
        sinc(x) * sinc(x / 3.0)
    } else {
        0.0
    }
}

/// PIL's resampling coefficients for one axis (`precompute_coeffs` in `Resample.c`): the
/// filter's support widens by the scale when shrinking; each output's weights are normalised.
fn lanczos_coeffs(n_in: usize, n_out: usize) -> Vec<(usize, Vec<f64>)> {
    let scale = n_in as f64 / n_out as f64;
    let filterscale = scale.max(1.0);
    let support = 3.0 * filterscale;
    (0..n_out)
        .map(|o| {
            let center = (o as f64 + 0.5) * scale;
            let lo = ((center - support + 0.5).floor().max(0.0)) as usize;
            let hi = ((center + support + 0.5).floor() as usize).min(n_in);
            let mut k: Vec<f64> =
                (lo..hi).map(|i| lanczos3((i as f64 - center + 0.5) / filterscale)).collect();
            let sum: f64 = k.iter().sum();
            if sum != 0.0 {
                k.iter_mut().for_each(|v| *v /= sum);
            }
            (lo, k)
        })
        .collect()
}

/// An RGB image resized to `width × height` with a Lanczos-3 filter, as PIL's
/// `Image.resize(size, Image.LANCZOS)` computes it: horizontal pass, then vertical, each
/// rounded and clamped to 8 bits.
pub fn lanczos_resize(img: &RgbImage, width: usize, height: usize) -> Result<RgbImage> {
    if width == 0 || height == 0 || img.width == 0 || img.height == 0 {
        return Err(PipelineError::msg("cannot resize to or from an empty image"));
    }
    let to_u8 = |v: f64| v.round().clamp(0.0, 255.0) as u8;
    let (w0, h0) = (img.width, img.height);
    // Horizontal: [h0, width].
    let cx = lanczos_coeffs(w0, width);
    let mut mid = vec![0u8; h0 * width * 3];
    for y in 0..h0 {
        for (x, (lo, k)) in cx.iter().enumerate() {
            for c in 0..3 {
                let v: f64 = k
                    .iter()
                    .enumerate()
                    .map(|(j, &wt)| wt * img.pixels[(y * w0 + lo + j) * 3 + c] as f64)
                    .sum();
                mid[(y * width + x) * 3 + c] = to_u8(v);
            }
        }
    }
    // Vertical: [height, width].
    let cy = lanczos_coeffs(h0, height);
    let mut out = vec![0u8; height * width * 3];
    for (y, (lo, k)) in cy.iter().enumerate() {
        for x in 0..width {
            for c in 0..3 {
                let v: f64 = k
                    .iter()
                    .enumerate()
                    .map(|(j, &wt)| wt * mid[((lo + j) * width + x) * 3 + c] as f64)
                    .sum();
                out[(y * width + x) * 3 + c] = to_u8(v);
            }
        }
    }
    RgbImage::new(width, height, out)
}

#[cfg(test)]
mod tests {
    use candle_core::Device;

    use super::*;

    #[test]
    fn bilinear_matches_torch_interpolate() {
        // torch.nn.functional.interpolate(torch.tensor([[[[1., 2.], [3., 4.]]]]), size=(4, 4),
        //   mode="bilinear", align_corners=False)
        let x = Tensor::new(&[[[[1f32, 2.], [3., 4.]]]], &Device::Cpu).unwrap();
        let y = upscale_latents(&x, 4, 4).unwrap();
        let want = [
            [1.0, 1.25, 1.75, 2.0],
            [1.5, 1.75, 2.25, 2.5],
            [2.5, 2.75, 3.25, 3.5],
            [3.0, 3.25, 3.75, 4.0],
        ];
        let got = y.squeeze(0).unwrap().squeeze(0).unwrap().to_vec2::<f32>().unwrap();
        for (g, w) in got.iter().zip(want) {
            for (a, b) in g.iter().zip(w) {
                assert!((a - b).abs() < 1e-6, "{got:?}");
            }
        }
        // A non-integer factor, 3 → 5, as torch computes it.
        let x = Tensor::new(&[[[[1f32, 1.5, 2.5]]]], &Device::Cpu).unwrap();
        let got =
            upscale_latents(&x, 1, 5).unwrap().flatten_all().unwrap().to_vec1::<f32>().unwrap();
        for (a, b) in got.iter().zip([1.0, 1.2, 1.5, 2.1, 2.5]) {
            assert!((a - b).abs() < 1e-6, "{got:?}");
        }
    }

    #[test]
    fn lanczos_keeps_flat_images_and_sizes() {
        let img = RgbImage::new(4, 2, vec![77; 4 * 2 * 3]).unwrap();
        let up = lanczos_resize(&img, 8, 4).unwrap();
        assert_eq!((up.width, up.height), (8, 4));
        assert!(up.pixels.iter().all(|&p| p == 77));
    }

    #[test]
    fn target_sizes_round_down_to_the_scale_factor() {
        let h = HiresFix { scale: 1.5, ..HiresFix::default() };
        assert_eq!(h.target_size(64, 48, 8), (96, 72));
        let h = HiresFix { scale: 1.3, ..HiresFix::default() };
        assert_eq!(h.target_size(64, 64, 8), (80, 80)); // 83.2 → 80
        assert!(HiresFix { scale: 0.5, ..h }.validate(10).is_err());
        let e = HiresFix { strength: 0.05, ..h }.validate(10).unwrap_err().to_string();
        assert!(e.starts_with("--hires-strength"), "{e}");
    }
}
