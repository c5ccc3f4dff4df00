//! Generation, in diffusers' phases: check inputs → encode prompts → timesteps → prepare
//! latents → denoise → decode.

use std::time::{Duration, Instant};

use candle_core::{DType, Device, Tensor};
use ltd_nn::{NoiseSource, PhiloxRng, TorchRng};
use ltd_scheduler::{SamplerKind, SamplerOptions, Scheduler, SchedulerConfig};
use ltd_unet::UNetConditioning;
use ltd_vae::TilingOptions;

use crate::error::{PipelineError, Result};
use crate::guidance;
use crate::image::{tensor_to_images, RgbImage};
use crate::model_index::PipelineKind;
use crate::params::{fmt_number, sampler_display, GenerationParams};
use crate::pipeline::Pipeline;
use crate::request::{GenerateRequest, RngKind};
use crate::text::PromptEmbeds;

/// Progress after one model evaluation.
#[derive(Debug, Clone, Copy)]
pub struct Progress<'a> {
    /// Model evaluations done.
    pub step: usize,
    /// Model evaluations in this run.
    pub total: usize,
    /// The timestep just evaluated.
    pub timestep: f64,
    /// The latents after the sampler step (for previews: `Pipeline::decode_latents`).
    pub latents: &'a Tensor,
}

/// One image of a generation.
#[derive(Debug, Clone)]
pub struct GeneratedImage {
    /// The pixels.
    pub image: RgbImage,
    /// Everything needed to recreate it, in AUTOMATIC1111's vocabulary.
    pub params: GenerationParams,
    /// Which prompt of the request it belongs to.
    pub prompt_index: usize,
    /// Its position in the batch drawn from the one seed.
    pub batch_index: usize,
}

/// Time spent in each phase.
#[derive(Debug, Clone, Copy, Default)]
pub struct Timings {
    /// Prompt encoding.
    pub encode: Duration,
    /// The denoising loop (and image-to-image encoding).
    pub denoise: Duration,
    /// VAE decoding and conversion to bytes.
    pub decode: Duration,
}

/// The result of [`Pipeline::generate`].
#[derive(Debug, Clone)]
pub struct Generation {
    /// The images, prompt-major (prompt 0's images first).
    pub images: Vec<GeneratedImage>,
    /// The final latents `[N, C, h, w]` (before VAE decoding).
    pub latents: Tensor,
    /// Phase timings.
    pub timings: Timings,
    /// Model evaluations run.
    pub steps: usize,
    /// The sampler used (CLI name, or the diffusers class for one we have no name for).
    pub scheduler: String,
}

/// diffusers' `get_guidance_scale_embedding` (LCM's `timestep_cond`), `[N, dim]` in f32.
fn guidance_scale_embedding(w: f64, n: usize, dim: usize, device: &Device) -> Result<Tensor> {
    let half = dim / 2;
    let w = (w * 1000.0) as f32;
    let base = (10000f32).ln() / (half as f32 - 1.0);
    let mut row: Vec<f32> = Vec::with_capacity(dim);
    let freqs: Vec<f32> = (0..half).map(|i| (i as f32 * -base).exp() * w).collect();
    row.extend(freqs.iter().map(|f| f.sin()));
    row.extend(freqs.iter().map(|f| f.cos()));
    row.resize(dim, 0.0);
    Ok(Tensor::from_vec(row, (1, dim), device)?.repeat((n, 1))?)
}

/// The random generator a request asks for.
fn noise_source(req: &GenerateRequest) -> Box<dyn NoiseSource> {
    match req.rng {
        RngKind::Cpu => Box::new(TorchRng::new(req.seed)),
        RngKind::Cuda => Box::new(PhiloxRng::new(req.seed)),
    }
}

impl Pipeline {
    /// The sampler for a request: the one asked for (built from the model's scheduler config,
    /// as diffusers' `from_config`) or the one the model ships; with dynamic thresholding
    /// switched on in its config when the sampler supports it natively.
    fn scheduler_for(&self, req: &GenerateRequest) -> Result<(Box<dyn Scheduler>, String)> {
        let kind = match &req.scheduler {
            Some(name) => Some(
                name.parse::<SamplerKind>()
                    .map_err(|e| PipelineError::invalid("scheduler", e.to_string()))?,
            ),
            None => None,
        };
        let options = SamplerOptions { eta: req.eta };
        let mut sched = ltd_scheduler::build(&self.scheduler_config, kind, &options)?;
        if let Some(th) = &req.dynamic_threshold {
            if sched.supports_thresholding() {
                let cfg = SchedulerConfig {
                    thresholding: Some(true),
                    dynamic_thresholding_ratio: Some(th.ratio),
                    sample_max_value: Some(th.max),
                    ..self.scheduler_config.clone()
                };
                sched = ltd_scheduler::build(&cfg, kind, &options)?;
            }
        }
        let name = kind
            .or(self.default_sampler)
            .map(|k| k.name().to_string())
            .unwrap_or_else(|| sched.class_name().to_string());
        Ok((sched, name))
    }

    /// Encodes prompts and the negative prompt: `(uncond, cond)`, each `[N, L, D]` with `N =
    /// prompts × num_images`; `uncond` is `None` without classifier-free guidance.
    fn encode_prompts(
        &self,
        req: &GenerateRequest,
        cfg: bool,
    ) -> Result<(Option<PromptEmbeds>, PromptEmbeds)> {
        let prompts: Vec<&str> = req.prompts.iter().map(String::as_str).collect();
        let n = req.num_images;
        if !cfg {
            let cond = self.text.encode(&prompts, req.clip_skip, req.long_prompt, &self.device)?;
            return Ok((None, cond.repeat_rows(n)?));
        }
        if req.negative.is_none() && self.text.zeros_for_absent_negative() {
            let cond = self.text.encode(&prompts, req.clip_skip, req.long_prompt, &self.device)?;
            let uncond = cond.zeros_like()?;
            return Ok((Some(uncond.repeat_rows(n)?), cond.repeat_rows(n)?));
        }
        // Negative and positive prompts in one encoder batch, so long-prompt chunks line up.
        let negative = req.negative.as_deref().unwrap_or("");
        let mut texts = vec![negative; prompts.len()];
        texts.extend(&prompts);
        let both = self.text.encode(&texts, req.clip_skip, req.long_prompt, &self.device)?;
        let p = prompts.len();
        let split = |t: &Tensor, start: usize| -> Result<Tensor> { Ok(t.narrow(0, start, p)?) };
        let uncond = PromptEmbeds {
            hidden: split(&both.hidden, 0)?,
            pooled: both.pooled.as_ref().map(|t| split(t, 0)).transpose()?,
        };
        let cond = PromptEmbeds {
            hidden: split(&both.hidden, p)?,
            pooled: both.pooled.as_ref().map(|t| split(t, p)).transpose()?,
        };
        Ok((Some(uncond.repeat_rows(n)?), cond.repeat_rows(n)?))
    }

    /// VAE latents of an image scaled for the diffusion model (SDXL's `latents_mean/std` when
    /// the config has them, else `scaling_factor`), drawing the posterior sample from `rng`.
    fn encode_image(
        &self,
        image: &RgbImage,
        rng: &mut dyn NoiseSource,
        tiling: bool,
    ) -> Result<Tensor> {
        let x = image.to_tensor(&self.device)?.to_dtype(self.vae.dtype())?;
        let cfg = self.vae.config();
        let tiles = tiling.then(|| TilingOptions::for_config(cfg));
        let z = self.vae.encode_with_tiling(&x, tiles.as_ref())?.sample(rng)?;
        let z = match (&cfg.latents_mean, &cfg.latents_std) {
            (Some(mean), Some(std)) if self.index.kind == PipelineKind::StableDiffusionXl => {
                let (m, s) = (self.channel_vector(mean)?, self.channel_vector(std)?);
                (z.broadcast_sub(&m)? * cfg.scaling_factor)?.broadcast_div(&s)?
            }
            _ => cfg.scale_latents(&z)?,
        };
        Ok(z)
    }

    fn channel_vector(&self, v: &[f64]) -> Result<Tensor> {
        let data: Vec<f32> = v.iter().map(|&x| x as f32).collect();
        Ok(Tensor::from_vec(data, (1, v.len(), 1, 1), &self.device)?.to_dtype(self.vae.dtype())?)
    }

    /// Decodes latents `[N, C, h, w]` (the diffusion model's scale) to images.
    pub fn decode_latents(&self, latents: &Tensor, tiling: bool) -> Result<Vec<RgbImage>> {
        let cfg = self.vae.config();
        let z = latents.to_dtype(self.vae.dtype())?;
        let z = match (&cfg.latents_mean, &cfg.latents_std) {
            (Some(mean), Some(std)) if self.index.kind == PipelineKind::StableDiffusionXl => {
                let (m, s) = (self.channel_vector(mean)?, self.channel_vector(std)?);
                (z.broadcast_mul(&s)? / cfg.scaling_factor)?.broadcast_add(&m)?
            }
            _ => cfg.unscale_latents(&z)?,
        };
        let tiles = tiling.then(|| TilingOptions::for_config(cfg));
        let images = self.vae.decode_with_tiling(&z, tiles.as_ref())?;
        tensor_to_images(&images)
    }

    /// Generates the images a request asks for, calling `on_step` after every model
    /// evaluation.
    pub fn generate(
        &self,
        req: &GenerateRequest,
        on_step: &mut dyn FnMut(Progress<'_>),
    ) -> Result<Generation> {
        // 1. Check inputs.
        req.validate()?;
        let scale = self.vae_scale_factor();
        let (width, height) = req.size(self.default_size(), scale)?;
        let (mut sched, sampler_name) = self.scheduler_for(req)?;
        let unet_cfg = self.unet.config();
        // diffusers: guidance needs g > 1, and guidance-distilled (LCM) U-Nets take it as input.
        let cfg = req.guidance > 1.0 && unet_cfg.time_cond_proj_dim.is_none();
        let n = req.prompts.len() * req.num_images;

        // 2. Encode the prompts.
        let t_encode = Instant::now();
        let (uncond, cond) = self.encode_prompts(req, cfg)?;
        let context = match &uncond {
            Some(u) => Tensor::cat(&[&u.hidden, &cond.hidden], 0)?,
            None => cond.hidden.clone(),
        };
        let rows = context.dim(0)?;
        let mut conditioning = UNetConditioning::default();
        if self.index.kind == PipelineKind::StableDiffusionXl {
            let pooled = |e: &PromptEmbeds| {
                e.pooled
                    .clone()
                    .ok_or_else(|| PipelineError::msg("SDXL needs pooled text embeddings"))
            };
            conditioning.text_embeds = Some(match &uncond {
                Some(u) => Tensor::cat(&[&pooled(u)?, &pooled(&cond)?], 0)?,
                None => pooled(&cond)?,
            });
            // original size, crop top-left, target size, as (height, width) pairs.
            let (h, w) = (height as f32, width as f32);
            let ids = Tensor::new(&[[h, w, 0.0, 0.0, h, w]], &self.device)?;
            conditioning.time_ids = Some(ids.repeat((rows, 1))?.to_dtype(self.dtype)?);
        }
        if let Some(dim) = unet_cfg.time_cond_proj_dim {
            conditioning.timestep_cond = Some(
                guidance_scale_embedding(req.guidance - 1.0, rows, dim, &self.device)?
                    .to_dtype(self.dtype)?,
            );
        }
        let encode_time = t_encode.elapsed();

        // 3. Timesteps.
        let t_denoise = Instant::now();
        sched.set_timesteps(req.steps)?;
        let mut timesteps = sched.timesteps().to_vec();
        let mut rng = noise_source(req);
        let latent_shape = [n, self.vae.config().latent_channels, height / scale, width / scale];

        // 4. Prepare latents.
        let mut latents = match &req.init_image {
            None => {
                let noise = rng.randn(&latent_shape, self.dtype, &self.device)?;
                (noise * sched.init_noise_sigma())?
            }
            Some(init) => {
                // diffusers' img2img: int(steps·strength) steps from index (steps − that)·order.
                let run = ((req.steps as f64 * init.strength) as usize).min(req.steps);
                let t_start = req.steps - run;
                let begin = t_start * sched.order();
                timesteps = timesteps[begin.min(timesteps.len())..].to_vec();
                sched.set_begin_index(begin);
                let first = *timesteps.first().ok_or_else(|| {
                    PipelineError::invalid("strength", "leaves no denoising step")
                })?;
                let z = self.encode_image(&init.image, rng.as_mut(), req.vae_tiling)?;
                let z = z.to_dtype(self.dtype)?.repeat((n, 1, 1, 1))?;
                let noise = rng.randn(z.dims(), self.dtype, &self.device)?;
                sched.add_noise(&z, &noise, first)?
            }
        };

        // 5. Denoise.
        let total = timesteps.len();
        for (i, &t) in timesteps.iter().enumerate() {
            let _span = tracing::debug_span!("step", i, t).entered();
            let x_in = if cfg { Tensor::cat(&[&latents, &latents], 0)? } else { latents.clone() };
            let x_in = sched.scale_model_input(&x_in, t)?;
            let t_in = Tensor::full(t as f32, rows, &self.device)?;
            let out = self.unet.forward(&x_in, &t_in, &context, &conditioning)?;
            let guided = if cfg {
                let (e_u, e_c) = (out.narrow(0, 0, n)?, out.narrow(0, n, n)?);
                let mut e = guidance::classifier_free(&e_u, &e_c, req.guidance)?;
                if req.guidance_rescale > 0.0 {
                    e = guidance::rescale(&e, &e_c, req.guidance_rescale)?;
                }
                if let Some(m) = &req.mimic_guidance {
                    if req.guidance > m.mimic {
                        e = guidance::mimic_via_x0(sched.as_ref(), &e_u, &e_c, &e, t, &latents, m)?;
                    }
                }
                e
            } else {
                out
            };
            let guided = match &req.dynamic_threshold {
                Some(th) if !sched.supports_thresholding() => {
                    guidance::threshold_via_x0(sched.as_ref(), &guided, t, &latents, th)?
                }
                _ => guided,
            };
            latents = sched.step(&guided, t, &latents, rng.as_mut())?;
            on_step(Progress { step: i + 1, total, timestep: t, latents: &latents });
        }
        let denoise_time = t_denoise.elapsed();

        // 6. Decode.
        let t_decode = Instant::now();
        let images = self.decode_latents(&latents, req.vae_tiling)?;
        let decode_time = t_decode.elapsed();

        let params = |prompt_index: usize, batch_index: usize| {
            let (sampler, schedule_type) = sampler_display(&sampler_name);
            let mut extra: Vec<(String, String)> = Vec::new();
            if req.num_images > 1 {
                extra.push(("Batch size".into(), req.num_images.to_string()));
                extra.push(("Batch pos".into(), batch_index.to_string()));
            }
            if let Some(init) = &req.init_image {
                extra.push(("Denoising strength".into(), fmt_number(init.strength)));
            }
            if let Some(k) = req.clip_skip {
                extra.push(("Clip skip".into(), (k + 1).to_string()));
            }
            if req.guidance_rescale > 0.0 {
                extra.push(("Guidance rescale".into(), fmt_number(req.guidance_rescale)));
            }
            if let Some(th) = &req.dynamic_threshold {
                extra.push((
                    "Dynamic threshold".into(),
                    format!("{},{}", fmt_number(th.ratio), fmt_number(th.max)),
                ));
            }
            if let Some(m) = &req.mimic_guidance {
                extra.push((
                    "Mimic guidance".into(),
                    format!("{},{}", fmt_number(m.mimic), fmt_number(m.percentile)),
                ));
            }
            if req.eta > 0.0 {
                extra.push(("Eta".into(), fmt_number(req.eta)));
            }
            extra.push(("RNG".into(), if req.rng == RngKind::Cpu { "CPU" } else { "NV" }.into()));
            extra.push(("Version".into(), format!("ltd {}", env!("CARGO_PKG_VERSION"))));
            GenerationParams {
                prompt: req.prompts[prompt_index].clone(),
                negative: req.negative.clone(),
                steps: req.steps,
                sampler,
                schedule_type,
                cfg_scale: req.guidance,
                seed: req.seed,
                width,
                height,
                model: self.name.clone(),
                extra,
            }
        };
        let images = images
            .into_iter()
            .enumerate()
            .map(|(k, image)| {
                let (prompt_index, batch_index) = (k / req.num_images, k % req.num_images);
                GeneratedImage {
                    image,
                    params: params(prompt_index, batch_index),
                    prompt_index,
                    batch_index,
                }
            })
            .collect();
        Ok(Generation {
            images,
            latents: latents.to_dtype(DType::F32)?,
            timings: Timings { encode: encode_time, denoise: denoise_time, decode: decode_time },
            steps: total,
            scheduler: sampler_name,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn guidance_embedding_matches_diffusers_layout() {
        // w = 0 gives sin(0) = 0 and cos(0) = 1 halves; an odd width is zero-padded.
        let e = guidance_scale_embedding(0.0, 2, 5, &Device::Cpu).unwrap();
        assert_eq!(e.to_vec2::<f32>().unwrap(), [[0.0, 0.0, 1.0, 1.0, 0.0]; 2]);
    }
}
