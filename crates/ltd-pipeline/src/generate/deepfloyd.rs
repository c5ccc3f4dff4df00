//! DeepFloyd IF, as diffusers' `IFPipeline` (stage I) and `IFSuperResolutionPipeline`
//! (stage II) run it: the same phases as the latent pipelines, in pixel space.
//!
//! What IF changes, each a seam of `generate.rs` rather than a loop of its own:
//! - No VAE: the samples are the image (`Pipeline::sample_channels`, scale factor 1), and
//!   decoding is diffusers' `output_type="pil"`, `(x / 2 + 0.5).clamp(0, 1)` to bytes.
//! - The U-Net outputs twice the samples' channels, ε then the variance value: guidance mixes
//!   the ε halves, the conditional variance is kept, and `[guided, variance]` goes to a
//!   sampler that reads it (DDPM `learned_range`, the DPM-Solvers); `Plan::split_variance`.
//! - T5 text (`text.rs`): prompts lowercased and stripped, 77 tokens, the attention mask;
//!   the encoder loaded for each encoding and released before the denoising loop.
//! - Stage II ([`Pipeline::upscale`]): the initial noise (`in_channels / 2` channels) is drawn
//!   first; then the low-resolution image (`[-1, 1]`; a PNG as `x / 127.5 − 1`) is resized
//!   to the output size by `F.interpolate(mode="bilinear", align_corners=True)`, noised by
//!   the `image_noising_scheduler` to `noise_level` (default 250) with noise drawn next from
//!   the same generator, and concatenated to the samples' channels every step, with
//!   `noise_level` as the U-Net's class labels (doubled under guidance).
//! - The cascade ([`Pipeline::generate_cascade`]) is the diffusers documentation's recipe:
//!   stage I's prompt embeddings (`encode_prompt`, negative ones included) feed both stages,
//!   stage I's raw output (`output_type="pt"`, unclamped) is stage II's `image`, and one
//!   generator continues across both stages.
//!
//! Not ported: IF's watermark (`IFWatermarker`) and safety checker (ltd applies neither), and
//! `clean_caption` (diffusers falls back to plain lowercasing when bs4/ftfy are missing).
//! Only the samplers diffusers can run on IF are accepted: DDPM and the DPM-Solvers (every
//! other class inherits `variance_type: "learned_range"` and fails on the output's shape).

use candle_core::{DType, Tensor};
use ltd_nn::NoiseSource;
use ltd_scheduler::SchedulerConfig;
use ltd_unet::UNetConfig;

use super::{Carry, Generation, Plan, Progress, Sampling, Stage};
use crate::error::{PipelineError, Result};
use crate::image::RgbImage;
use crate::model_index::{ModelIndex, PipelineKind};
use crate::params::fmt_number;
use crate::pipeline::{LoadOptions, Pipeline};
use crate::request::GenerateRequest;
use crate::text::TextEncoders;

/// `IFSuperResolutionPipeline.__call__`'s `noise_level` default.
pub const DEFAULT_NOISE_LEVEL: usize = 250;

/// How a cascade's stage II runs: the noise level of the upscaled image and, where they differ
/// from stage I's, its steps and guidance.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct IfUpscale {
    /// The `image_noising_scheduler` timestep the upscaled image is noised to.
    pub noise_level: usize,
    /// Stage II's steps (stage I's when `None`).
    pub steps: Option<usize>,
    /// Stage II's guidance (stage I's when `None`).
    pub guidance: Option<f64>,
}

impl Default for IfUpscale {
    fn default() -> Self {
        Self { noise_level: DEFAULT_NOISE_LEVEL, steps: None, guidance: None }
    }
}

/// The channels the loop denoises: stage II's U-Net takes the samples and the upscaled image.
pub(crate) fn sample_channels(kind: PipelineKind, unet: &UNetConfig) -> usize {
    match kind {
        PipelineKind::DeepFloydIfSuperResolution => unet.in_channels / 2,
        _ => unet.in_channels,
    }
}

/// The `image_noising_scheduler` must be one we can build (it is a DDPM in IF's folders).
pub(crate) fn check_noising_scheduler(cfg: &SchedulerConfig, path: &std::path::Path) -> Result<()> {
    ltd_scheduler::build(cfg, None, &Default::default()).map_err(|e| match e {
        ltd_nn::Error::InvalidConfig(source) => {
            ltd_nn::Error::Config { path: path.to_path_buf(), source }
        }
        other => other,
    })?;
    Ok(())
}

/// Load options that have no meaning for a pixel-space model.
pub(crate) fn check_load_options(root: &std::path::Path, options: &LoadOptions) -> Result<()> {
    if options.vae.is_some() {
        return Err(PipelineError::msg(format!(
            "--vae: {} is a DeepFloyd IF model, which works in pixels and has no VAE",
            root.display()
        )));
    }
    // q8_0 quantizes the linear layers of the U-Net's transformer blocks; IF's U-Nets have
    // none (their attention is added-key/value), so it would change nothing.
    for (flag, given) in [
        ("--quantize", options.quantize.is_some()),
        ("--quantized-unet", options.quantized_unet.is_some()),
    ] {
        if given {
            return Err(PipelineError::msg(format!(
                "{flag}: {} is a DeepFloyd IF model, whose U-Net has no layers that q8_0 \
                 quantizes (its attention is added-key/value, not transformer blocks)",
                root.display()
            )));
        }
    }
    Ok(())
}

/// What IF's pipelines need of the U-Net: RGB samples (stage II: twice as many input
/// channels, the upscaled image being the other half), an output of the samples' channels or
/// twice them (with the variance), and text states as wide as the T5.
pub(crate) fn check_compatible(
    root: &std::path::Path,
    index: &ModelIndex,
    text: &TextEncoders,
    u: &UNetConfig,
) -> Result<()> {
    let config = root.join("unet/config.json");
    let stage_two = index.kind == PipelineKind::DeepFloydIfSuperResolution;
    let channels = sample_channels(index.kind, u);
    let wanted_in = if stage_two { 6 } else { 3 };
    if u.in_channels != wanted_in {
        return Err(PipelineError::msg(format!(
            "{}: in_channels is {} but {} takes {wanted_in} (RGB{})",
            config.display(),
            u.in_channels,
            index.class_name,
            if stage_two { " samples and the RGB upscaled image" } else { " samples" }
        )));
    }
    if u.out_channels != channels && u.out_channels != 2 * channels {
        return Err(PipelineError::msg(format!(
            "{}: out_channels is {}; an IF U-Net outputs {channels} (the prediction) or {} \
             (with the variance)",
            config.display(),
            u.out_channels,
            2 * channels
        )));
    }
    if let Some(width) = text.t5_width() {
        if u.encoder_hidden_dim() != width {
            return Err(PipelineError::msg(format!(
                "{}: the U-Net takes text states {} wide (encoder_hid_dim, else \
                 cross_attention_dim) but the T5 text encoder's d_model is {width}",
                config.display(),
                u.encoder_hidden_dim()
            )));
        }
    }
    Ok(())
}

/// diffusers' `preprocess_image` of a PIL image: `np.array(i).astype(np.float32) / 127.5 −
/// 1.0`, `[1, 3, h, w]`.
fn pil_to_tensor(image: &RgbImage, device: &candle_core::Device) -> Result<Tensor> {
    let (w, h) = (image.width, image.height);
    let mut planar = vec![0f32; 3 * w * h];
    for (i, px) in image.pixels.chunks_exact(3).enumerate() {
        for c in 0..3 {
            planar[c * w * h + i] = px[c] as f32 / 127.5 - 1.0;
        }
    }
    Ok(Tensor::from_vec(planar, (1, 3, h, w), device)?)
}

/// One axis of PyTorch's bilinear interpolation with `align_corners=True`, as an
/// `[n_out, n_in]` matrix: output `o` samples the input at `o·(n_in − 1)/(n_out − 1)` (0 for a
/// single output) between its two neighbours.
fn align_corners_weights(n_in: usize, n_out: usize) -> Vec<f32> {
    let scale = if n_out > 1 { (n_in as f32 - 1.0) / (n_out as f32 - 1.0) } else { 0.0 };
    let mut m = vec![0f32; n_out * n_in];
    for o in 0..n_out {
        let src = scale * o as f32;
        let i0 = (src.floor() as usize).min(n_in - 1);
        let i1 = (i0 + 1).min(n_in - 1);
        let l1 = src - i0 as f32;
        m[o * n_in + i0] += 1.0 - l1;
        m[o * n_in + i1] += l1;
    }
    m
}

/// `F.interpolate(x, (out_h, out_w), mode="bilinear", align_corners=True)` as `W_h · x · W_wᵀ`.
pub fn interpolate_align_corners(x: &Tensor, out_h: usize, out_w: usize) -> Result<Tensor> {
    let (_, _, h, w) = x.dims4()?;
    let (dtype, dev) = (x.dtype(), x.device());
    let wh = Tensor::from_vec(align_corners_weights(h, out_h), (out_h, h), dev)?.to_dtype(dtype)?;
    let ww = Tensor::from_vec(align_corners_weights(w, out_w), (out_w, w), dev)?.to_dtype(dtype)?;
    let rows = x.broadcast_matmul(&ww.t()?)?;
    Ok(wh.broadcast_matmul(&rows)?.contiguous()?)
}

impl Pipeline {
    /// An image side IF's U-Net can take: IF's up blocks (`ResnetUpsampleBlock2D`,
    /// `SimpleCrossAttnUpBlock2D`) upsample in a ResNet block that exactly doubles the size
    /// (diffusers passes them no `upsample_size`), so a side not divisible by 2 at each of the
    /// U-Net's downsamplers (one per down block but the last) fails in diffusers at the first
    /// skip connection. Refused here, naming the flag or the config it came from, before any
    /// stage runs.
    pub(super) fn check_pixel_size(
        &self,
        req: &GenerateRequest,
        size: (usize, usize),
    ) -> Result<()> {
        let factor = 1usize << self.unet.config().down_blocks.len().saturating_sub(1);
        for (field, given, v) in
            [("width", req.width.is_some(), size.0), ("height", req.height.is_some(), size.1)]
        {
            if v % factor == 0 {
                continue;
            }
            let why = format!(
                "{v} is not a multiple of {factor}: the U-Net of {} halves the image at each of \
                 its {} downsamplers",
                self.name,
                factor.trailing_zeros()
            );
            return Err(if given {
                PipelineError::invalid(field, why)
            } else {
                PipelineError::msg(format!(
                    "{}: sample_size {why}",
                    self.root.join("unet/config.json").display()
                ))
            });
        }
        Ok(())
    }

    /// Phase 1 for IF: what each stage can and cannot do (no image-to-image or inpainting on
    /// stage I, stage II needs its low-resolution image, a folder without T5 needs given
    /// embeddings, only the samplers that take IF's variance).
    pub(super) fn check_deepfloyd(
        &self,
        req: &GenerateRequest,
        stage: &Stage<'_>,
        given_embeds: bool,
    ) -> Result<()> {
        let kind = self.index.kind;
        if !kind.is_deepfloyd() {
            if stage.low_res.is_some() {
                return Err(PipelineError::msg(format!(
                    "{} is not a DeepFloyd IF stage II model: it cannot upscale an image",
                    self.name
                )));
            }
            return Ok(());
        }
        if req.init_image.is_some() || req.inpaint.is_some() {
            return Err(PipelineError::invalid(
                "init-image",
                format!(
                    "{} is DeepFloyd IF {}: image-to-image and inpainting (IFImg2ImgPipeline, \
                     IFInpaintingPipeline) are not supported",
                    self.name,
                    if kind == PipelineKind::DeepFloydIf { "stage I" } else { "stage II" }
                ),
            ));
        }
        if stage.latents.is_some() {
            return Err(PipelineError::invalid(
                "hires-scale",
                "hires fix and the SDXL refiner work on latents; DeepFloyd IF upscales with its \
                 stage II (--upscale-model)",
            ));
        }
        match (kind, stage.low_res) {
            (PipelineKind::DeepFloydIfSuperResolution, None) => {
                return Err(PipelineError::invalid(
                    "init-image",
                    format!(
                        "{} is a DeepFloyd IF stage II (IFSuperResolutionPipeline): it upscales \
                         an image; give --init-image, or use it as --upscale-model after an IF \
                         stage I model",
                        self.name
                    ),
                ));
            }
            (PipelineKind::DeepFloydIf, Some(_)) => {
                return Err(PipelineError::msg(format!(
                    "{} is a DeepFloyd IF stage I model: it cannot upscale an image",
                    self.name
                )));
            }
            _ => {}
        }
        if !self.text.has_encoder() && !given_embeds {
            return Err(PipelineError::msg(format!(
                "{} has no text encoder (text_encoder is null in model_index.json): use it as \
                 --upscale-model after an IF stage I model, which encodes the prompt",
                self.name
            )));
        }
        let sched = self.scheduler_for(req)?;
        let out = self.unet.config().out_channels;
        if out == 2 * self.sample_channels() && !sched.takes_learned_variance() {
            return Err(PipelineError::invalid(
                "scheduler",
                format!(
                    "{} predicts a learned variance, which only ddpm and the DPM-Solvers \
                     (dpm++2m, dpm++2m-karras, dpm++2m-sde, dpm++2s) take, as in diffusers; \
                     {} does not",
                    self.name,
                    sched.class_name()
                ),
            ));
        }
        if let Some((_, level)) = stage.low_res {
            self.check_noise_level(level)?;
        }
        Ok(())
    }

    /// diffusers' `check_inputs`: `0 ≤ noise_level < image_noising_scheduler`'s training steps.
    fn check_noise_level(&self, level: usize) -> Result<()> {
        let train = self.image_noising.as_ref().and_then(|c| c.num_train_timesteps).unwrap_or(1000);
        if level >= train {
            return Err(PipelineError::invalid(
                "noise-level",
                format!(
                    "must be below the image_noising_scheduler's num_train_timesteps ({train}), \
                     got {level}"
                ),
            ));
        }
        Ok(())
    }

    /// Phase 4, continued, for stage II: the low-resolution image upscaled to the output size
    /// and noised to its noise level (noise drawn after the initial noise), doubled under
    /// guidance; `None` for every other run.
    pub(super) fn prepare_low_res(
        &self,
        plan: &Plan<'_>,
        sampling: &mut Sampling,
    ) -> Result<Option<Tensor>> {
        let Some((image, noise_level)) = plan.stage.low_res else {
            return Ok(None);
        };
        let image = image.to_device(&self.device)?.to_dtype(self.dtype)?;
        let rows = image.dim(0)?;
        let image = if rows == plan.batch {
            image
        } else if rows == 1 {
            image.repeat((plan.batch, 1, 1, 1))?
        } else {
            return Err(PipelineError::msg(format!(
                "{rows} low-resolution images for a batch of {}",
                plan.batch
            )));
        };
        let upscaled = interpolate_align_corners(&image, plan.height, plan.width)?;
        let noise = sampling.generator.randn(upscaled.dims(), self.dtype, &self.device)?;
        let cfg = self
            .image_noising
            .as_ref()
            .ok_or_else(|| PipelineError::msg("no image_noising_scheduler"))?;
        let noising = ltd_scheduler::build(cfg, None, &Default::default())?;
        let upscaled = noising.add_noise(&upscaled, &noise, noise_level as f64)?;
        Ok(Some(if plan.do_cfg { Tensor::cat(&[&upscaled, &upscaled], 0)? } else { upscaled }))
    }

    /// IF stage II alone: upscales `image` (any size; resized to the output size) guided by
    /// the request's prompts. `req.init_image` is ignored (it is how [`Pipeline::generate`]
    /// passes the image).
    pub fn upscale(
        &self,
        req: &GenerateRequest,
        image: &RgbImage,
        noise_level: usize,
        on_step: &mut dyn FnMut(Progress<'_>),
    ) -> Result<Generation> {
        let low = pil_to_tensor(image, &self.device)?;
        let req = GenerateRequest { init_image: None, ..req.clone() };
        let stage = Stage { low_res: Some((&low, noise_level)), ..Stage::default() };
        let mut out = self.run_stage(&req, stage, on_step)?;
        for p in &mut out.params {
            p.extra.push(("Noise level".into(), noise_level.to_string()));
        }
        out.into_generation(req.num_images)
    }

    /// DeepFloyd IF's cascade: this stage I model, then `stage_two` on its output (see the
    /// module docs). The images' parameters are stage I's, at stage II's size, with stage II's
    /// model, noise level, and steps and guidance where they differ.
    pub fn generate_cascade(
        &self,
        stage_two: &Pipeline,
        req: &GenerateRequest,
        upscale: &IfUpscale,
        on_step: &mut dyn FnMut(Progress<'_>),
    ) -> Result<Generation> {
        if self.index.kind != PipelineKind::DeepFloydIf {
            return Err(PipelineError::invalid(
                "upscale-model",
                format!(
                    "needs a DeepFloyd IF stage I model (IFPipeline) as --model, not {}",
                    self.index.class_name
                ),
            ));
        }
        if stage_two.index.kind != PipelineKind::DeepFloydIfSuperResolution {
            return Err(PipelineError::invalid(
                "upscale-model",
                format!(
                    "{} is a {}, not a DeepFloyd IF stage II (IFSuperResolutionPipeline)",
                    stage_two.name, stage_two.index.class_name
                ),
            ));
        }
        stage_two.check_noise_level(upscale.noise_level)?;
        // Stage II's size, checked before stage I runs.
        stage_two.check_pixel_size(&GenerateRequest::default(), stage_two.default_size())?;
        let second = GenerateRequest {
            steps: upscale.steps.unwrap_or(req.steps),
            guidance: upscale.guidance.unwrap_or(req.guidance),
            width: None,
            height: None,
            ..req.clone()
        };
        second.validate()?;
        // Both stages' guidance from one encoding, the negative prompt's included when either
        // stage guides (diffusers' `stage_1.encode_prompt(prompt)`).
        let t_encode = std::time::Instant::now();
        let embeds = self.encode_prompt(req, req.guidance > 1.0 || second.guidance > 1.0)?;
        let encode = t_encode.elapsed();
        let carry = Carry { seeds: None, embeds: Some(embeds) };
        let stage = Stage { skip_decode: true, ..Stage::default() };
        let (first, carry) = self.run_stage_with(req, stage, carry, on_step)?;
        let low = first.latents.to_dtype(DType::F32)?;
        let stage = Stage { low_res: Some((&low, upscale.noise_level)), ..Stage::default() };
        let (mut out, _) = stage_two.run_stage_with(&second, stage, carry, on_step)?;
        let sizes: Vec<_> = out.params.iter().map(|p| (p.width, p.height)).collect();
        out.params = first.params;
        for (p, (width, height)) in out.params.iter_mut().zip(sizes) {
            p.width = width;
            p.height = height;
            p.extra.push(("Upscale model".into(), stage_two.name.clone()));
            p.extra.push(("Noise level".into(), upscale.noise_level.to_string()));
            if second.steps != req.steps {
                p.extra.push(("Upscale steps".into(), second.steps.to_string()));
            }
            if second.guidance != req.guidance {
                p.extra.push(("Upscale CFG scale".into(), fmt_number(second.guidance)));
            }
        }
        out.timings.encode += encode + first.timings.encode;
        out.timings.denoise += first.timings.denoise;
        out.evaluations += first.evaluations;
        out.steps += first.steps;
        out.into_generation(req.num_images)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use candle_core::Device;

    #[test]
    fn align_corners_keeps_the_corners_and_interpolates_between() {
        // torch: F.interpolate(torch.tensor([[[[0., 3.]]]]), (1, 4), mode="bilinear",
        //   align_corners=True) = [0, 1, 2, 3].
        let x = Tensor::new(&[[[[0f32, 3.0]]]], &Device::Cpu).unwrap();
        let y = interpolate_align_corners(&x, 1, 4).unwrap();
        let v = y.flatten_all().unwrap().to_vec1::<f32>().unwrap();
        assert_eq!(v, [0.0, 1.0, 2.0, 3.0]);
        // A single output row samples the first input row.
        assert_eq!(align_corners_weights(3, 1), [1.0, 0.0, 0.0]);
    }

    #[test]
    fn pil_pixels_map_as_numpy_does() {
        let img = RgbImage { width: 1, height: 1, pixels: vec![0, 255, 128] };
        let t = pil_to_tensor(&img, &Device::Cpu).unwrap();
        let v = t.flatten_all().unwrap().to_vec1::<f32>().unwrap();
        assert_eq!(v, [-1.0, 1.0, 128f32 / 127.5 - 1.0]);
    }
}
