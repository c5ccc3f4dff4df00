//! Generation, in the phases of diffusers' `StableDiffusionPipeline.__call__`, each a small
//! method of [`Pipeline`] called in turn by [`Pipeline::generate`]:
//!
//! 1. `check_inputs`: the request, then what depends on the model (size, sampler, η);
//! 2. `encode_prompt` and `unet_conditioning`: prompt and negative prompt embeddings, plus
//!    SDXL's pooled embeddings and time ids and LCM's guidance embedding;
//! 3. `prepare_timesteps`: the sampler, its schedule, and its tail for image-to-image;
//! 4. `prepare_latents`: scaled noise, or the encoded init image noised to the first timestep;
//! 5. `denoise`: the loop, with classifier-free guidance and what bounds it (`Plan::guide`);
//! 6. [`Pipeline::decode_latents`];
//! 7. `Plan::params`: each image's parameters in AUTOMATIC1111's infotext vocabulary.
//!
//! Inpainting (`inpaint.rs`) hooks into phases 4 to 6: its own starting latents with the
//! mask and masked-image latents, the 9-channel U-Net input or the 4-channel blend in the loop,
//! and the paste-back after decoding.
//! A run can start from given latents and stop early (`Stage`, used by the SDXL refiner
//! hand-off and hires fix): `Pipeline::run_stage` is the same phases with those inputs.
//!
//! Progress is reported in the user's steps (`--steps`), not in model evaluations: Heun
//! evaluates the model twice per step and PNDM once more at its start, and diffusers' progress
//! bar counts steps all the same (`StepCounter`).

use std::cell::Cell;
use std::time::{Duration, Instant};

use candle_core::{DType, Device, Tensor};
use ltd_nn::NoiseSource;
use ltd_scheduler::{SamplerKind, SamplerOptions, Scheduler, SchedulerConfig};
use ltd_unet::{UNet2DConditionModel, UNetConditioning};
use ltd_vae::TilingOptions;

use crate::error::{PipelineError, Result};
use crate::guidance;
use crate::image::{tensor_to_images, RgbImage};
use crate::lora::extract_lora_tags;
use crate::model_index::PipelineKind;
use crate::params::{fmt_number, GenerationParams};
use crate::pipeline::Pipeline;
use crate::request::{GenerateRequest, RngKind};
use crate::seeds::Seeds;
use crate::text::PromptEmbeds;

pub(crate) mod deepfloyd;
mod inpaint;
use inpaint::InpaintState;

/// Progress after one model evaluation.
#[derive(Debug, Clone, Copy)]
pub struct Progress<'a> {
    /// Steps done, counted as the user asked for them: a step that evaluates the model twice
    /// (Heun) counts once, and so does PNDM's extra warm-up evaluation.
    pub step: usize,
    /// Steps in this run: `--steps`, or for image-to-image the steps it runs
    /// (⌊steps · strength⌋).
    pub total: usize,
    /// Model evaluations done (the callback runs after each one).
    pub evaluation: usize,
    /// Model evaluations in this run.
    pub evaluations: usize,
    /// The timestep just evaluated.
    pub timestep: f64,
    /// The latents after the sampler step (for previews: `Pipeline::preview`).
    pub latents: &'a Tensor,
    /// Set by [`Progress::cancel`]; the loop reads it after the callback returns.
    cancel: &'a Cell<bool>,
}

impl Progress<'_> {
    /// Stops the generation here: [`Pipeline::generate`] returns
    /// [`PipelineError::Cancelled`] instead of running the next step (a server's interrupt,
    /// a client gone).
    pub fn cancel(&self) {
        self.cancel.set(true);
    }
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
    /// Steps run, as [`Progress::total`] counts them.
    pub steps: usize,
    /// Model evaluations run (more than `steps` for Heun and PNDM).
    pub evaluations: usize,
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

/// Where one run of the loop starts and stops beyond what the request says: the stages of the
/// base→refiner hand-off (`crate::refiner`) and of hires fix (`crate::hires`). The default is
/// a plain run.
#[derive(Debug, Clone, Copy, Default)]
pub(crate) struct Stage<'a> {
    /// Latents `[N, C, h, w]` at the diffusion model's scale to start from, instead of noise
    /// or the init image (diffusers' img2img `image` given as 4-channel latents).
    pub latents: Option<&'a Tensor>,
    /// diffusers' `denoising_start`: the given latents are already this far through the
    /// schedule and are not noised again (the refiner's half of the hand-off).
    pub denoising_start: Option<f64>,
    /// diffusers' `denoising_end`: stop this far through the schedule (the base's half).
    pub denoising_end: Option<f64>,
    /// Noise the given latents to the image-to-image start of this strength (hires fix).
    pub strength: Option<f64>,
    /// Return latents only: no VAE decoding.
    pub skip_decode: bool,
    /// DeepFloyd IF stage II: the low-resolution image `[N, 3, h, w]` in [-1, 1] to upscale
    /// (`crate::deepfloyd`), and the noise level its upscaled copy is noised to.
    pub low_res: Option<(&'a Tensor, usize)>,
}

/// What one stage hands the next in a cascade (DeepFloyd IF's stage I → stage II): the
/// generator, continued rather than seeded again, and the prompt embeddings, which the second
/// stage takes instead of encoding (diffusers' `prompt_embeds=` / `negative_prompt_embeds=`).
#[derive(Default)]
pub(crate) struct Carry {
    /// The generator after the previous stage's last draw.
    pub seeds: Option<Seeds>,
    /// `(uncond, cond)`, each already `[N, L, D]` for the batch.
    pub embeds: Option<(Option<PromptEmbeds>, PromptEmbeds)>,
}

/// What one stage produced: [`Generation`] before the images are paired with their
/// parameters.
pub(crate) struct StageOutput {
    /// Decoded images, unless the stage skipped decoding.
    pub images: Vec<RgbImage>,
    /// Each image's parameters (also when not decoded).
    pub params: Vec<GenerationParams>,
    /// The final latents, in the model's dtype.
    pub latents: Tensor,
    /// As [`Generation::timings`].
    pub timings: Timings,
    /// As [`Generation::steps`].
    pub steps: usize,
    /// As [`Generation::evaluations`].
    pub evaluations: usize,
    /// As [`Generation::scheduler`].
    pub scheduler: String,
}

impl StageOutput {
    /// The public result, images paired with their parameters (prompt-major).
    pub(crate) fn into_generation(self, num_images: usize) -> Result<Generation> {
        let images = self
            .images
            .into_iter()
            .zip(self.params)
            .enumerate()
            .map(|(k, (image, params))| GeneratedImage {
                image,
                params,
                prompt_index: k / num_images,
                batch_index: k % num_images,
            })
            .collect();
        Ok(Generation {
            images,
            latents: self.latents.to_dtype(DType::F32)?,
            timings: self.timings,
            steps: self.steps,
            evaluations: self.evaluations,
            scheduler: self.scheduler,
        })
    }
}

/// What `check_inputs` settles before any model runs.
struct Plan<'r> {
    req: &'r GenerateRequest,
    /// Where this run starts and stops.
    stage: Stage<'r>,
    /// Image width and height in pixels.
    width: usize,
    height: usize,
    /// The sampler the run uses: the one asked for or the model's; `None` for a shipped
    /// diffusers class that has no CLI name.
    sampler: Option<SamplerKind>,
    /// diffusers' `do_classifier_free_guidance`: the unconditional pass runs.
    do_cfg: bool,
    /// Images in the batch: prompts × images per prompt.
    batch: usize,
}

/// The conditioning every denoising step gives the U-Net.
struct Conditioning {
    /// `[rows, L, D]`, the unconditional rows first under guidance.
    context: Tensor,
    /// SDXL's pooled text embeddings and time ids; LCM's guidance embedding; IF stage II's
    /// noise level as class labels.
    added: UNetConditioning,
    /// IF stage II: the noised upscaled image `[rows, 3, H, W]`, concatenated to the samples'
    /// channels before `scale_model_input` (diffusers' `cat([intermediate_images, upscaled])`).
    low_res: Option<Tensor>,
}

/// The sampler of one run, its schedule and the generator that draws all noise.
struct Sampling {
    scheduler: Box<dyn Scheduler>,
    /// One entry per model evaluation: the whole schedule, or its tail for image-to-image.
    timesteps: Vec<f64>,
    /// The user's steps these timesteps make.
    steps: usize,
    /// The sampler's name (CLI name, or the diffusers class).
    name: String,
    /// diffusers' `generator` (or list of generators, `--seed-mode a1111`).
    generator: Seeds,
}

/// Counts the user's steps from model evaluations, by the rule diffusers' pipelines update
/// their progress bar with: evaluation `i` (0-based) of `n` ends a step when it is the last,
/// or when it is past the warm-up (`n − steps · order` evaluations: PNDM's extra first PLMS
/// evaluation) and `i + 1` is a multiple of the sampler's order (Heun's pairs).
#[derive(Debug, Clone, Copy)]
struct StepCounter {
    evaluations: usize,
    warmup: usize,
    order: usize,
}

impl StepCounter {
    fn new(evaluations: usize, steps: usize, order: usize) -> Self {
        let order = order.max(1);
        Self { evaluations, warmup: evaluations.saturating_sub(steps * order), order }
    }

    /// Whether evaluation `i` (0-based) ends a step.
    fn ends_step(&self, i: usize) -> bool {
        i + 1 == self.evaluations || (i + 1 > self.warmup && (i + 1).is_multiple_of(self.order))
    }
}

impl Plan<'_> {
    /// A U-Net that predicts its variance too (DeepFloyd IF: twice the samples' `channels`)
    /// gives `(prediction, variance)`: the prediction of every row for guidance, and the
    /// variance of the conditional rows (diffusers' IF loop keeps `predicted_variance` from
    /// the text half). Any other output is the prediction alone.
    fn split_variance(&self, out: Tensor, channels: usize) -> Result<(Tensor, Option<Tensor>)> {
        if out.dim(1)? != 2 * channels {
            return Ok((out, None));
        }
        let variance = out.narrow(1, channels, channels)?;
        let variance =
            if self.do_cfg { variance.narrow(0, self.batch, self.batch)? } else { variance };
        Ok((out.narrow(1, 0, channels)?, Some(variance)))
    }

    /// The guided model output of one step (unconditional rows first in `out` under
    /// guidance): classifier-free guidance with its rescale and limiter, then dynamic
    /// thresholding where the sampler does not do it in its own step.
    fn guide(
        &self,
        sched: &dyn Scheduler,
        out: Tensor,
        t: f64,
        latents: &Tensor,
    ) -> Result<Tensor> {
        let req = self.req;
        let guided = if self.do_cfg {
            let n = self.batch;
            let (e_u, e_c) = (out.narrow(0, 0, n)?, out.narrow(0, n, n)?);
            let mut e = guidance::classifier_free(&e_u, &e_c, req.guidance)?;
            if req.guidance_rescale > 0.0 {
                e = guidance::rescale(&e, &e_c, req.guidance_rescale)?;
            }
            if let Some(m) = &req.mimic_guidance {
                if req.guidance > m.mimic {
                    e = guidance::mimic_via_x0(sched, &e_u, &e_c, &e, t, latents, m)?;
                }
            }
            e
        } else {
            out
        };
        match &req.dynamic_threshold {
            Some(th) if !sched.supports_thresholding() => {
                guidance::threshold_via_x0(sched, &guided, t, latents, th)
            }
            _ => Ok(guided),
        }
    }

    /// One image's parameters, as AUTOMATIC1111 records them.
    fn params(
        &self,
        model: &str,
        sampler_name: &str,
        prompt_index: usize,
        batch_index: usize,
        networks: &[(String, String)],
    ) -> GenerationParams {
        let req = self.req;
        let (sampler, schedule_type) = match self.sampler {
            Some(kind) => (kind.a1111_name(), kind.a1111_schedule_type()),
            None => (sampler_name, None),
        };
        let mut extra: Vec<(String, String)> = Vec::new();
        if req.num_images > 1 {
            extra.push(("Batch size".into(), req.num_images.to_string()));
            extra.push(("Batch pos".into(), batch_index.to_string()));
        }
        if let Some(init) = &req.init_image {
            extra.push(("Denoising strength".into(), fmt_number(init.strength)));
        }
        if let Some(inpaint) = &req.inpaint {
            if inpaint.mask_blur > 0.0 {
                extra.push(("Mask blur".into(), fmt_number(inpaint.mask_blur as f64)));
            }
            if let Some(pad) = inpaint.padding_mask_crop {
                extra.push(("Inpaint area".into(), "Only masked".into()));
                extra.push(("Masked area padding".into(), pad.to_string()));
            }
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
        // `check_inputs` refused a non-zero η for samplers that ignore it, so it mattered.
        if req.eta > 0.0 {
            extra.push(("Eta".into(), fmt_number(req.eta)));
        }
        crate::seeds::push_params(req, prompt_index * req.num_images + batch_index, &mut extra);
        extra.extend(networks.iter().cloned());
        extra.push(("RNG".into(), if req.rng == RngKind::Cpu { "CPU" } else { "NV" }.into()));
        extra.push(("Version".into(), format!("ltd {}", env!("CARGO_PKG_VERSION"))));
        GenerationParams {
            prompt: req.prompts[prompt_index].clone(),
            negative: req.negative.clone(),
            steps: req.steps,
            sampler: sampler.to_string(),
            schedule_type: schedule_type.map(str::to_string),
            cfg_scale: req.guidance,
            seed: crate::seeds::image_seed(req, prompt_index * req.num_images + batch_index),
            width: self.width,
            height: self.height,
            model: model.to_string(),
            model_hash: None,
            extra,
        }
    }
}

impl Pipeline {
    /// Generates the images a request asks for, calling `on_step` after every model
    /// evaluation.
    pub fn generate(
        &self,
        req: &GenerateRequest,
        on_step: &mut dyn FnMut(Progress<'_>),
    ) -> Result<Generation> {
        // IF stage II: the init image is the low-resolution image to upscale.
        if let (PipelineKind::DeepFloydIfSuperResolution, Some(init)) =
            (self.index.kind, &req.init_image)
        {
            return self.upscale(req, &init.image, deepfloyd::DEFAULT_NOISE_LEVEL, on_step);
        }
        self.run_stage(req, Stage::default(), on_step)?.into_generation(req.num_images)
    }

    /// One run of diffusers' phases, starting and stopping where `stage` says.
    pub(crate) fn run_stage(
        &self,
        req: &GenerateRequest,
        stage: Stage<'_>,
        on_step: &mut dyn FnMut(Progress<'_>),
    ) -> Result<StageOutput> {
        Ok(self.run_stage_with(req, stage, Carry::default(), on_step)?.0)
    }

    /// [`Self::run_stage`] continuing a cascade: the generator and prompt embeddings of
    /// `carry` when given, and those of this stage handed back for the next.
    pub(crate) fn run_stage_with(
        &self,
        req: &GenerateRequest,
        stage: Stage<'_>,
        carry: Carry,
        on_step: &mut dyn FnMut(Progress<'_>),
    ) -> Result<(StageOutput, Carry)> {
        let plan = self.check_inputs(req, stage, carry.embeds.is_some())?;

        let t_encode = Instant::now();
        let (uncond, cond) = match carry.embeds {
            Some(embeds) => embeds,
            None => self.encode_prompt(req, plan.do_cfg)?,
        };
        if plan.do_cfg && uncond.is_none() {
            return Err(PipelineError::msg("guidance needs the negative prompt's embeddings"));
        }
        let uncond_used = if plan.do_cfg { uncond.as_ref() } else { None };
        let mut conditioning = self.unet_conditioning(&plan, uncond_used, &cond)?;
        let encode = t_encode.elapsed();

        // Loaded here, after the prompt is encoded, where the pipeline does not keep it (IF).
        let unet = self.unet.acquire()?;
        let t_denoise = Instant::now();
        let mut sampling = self.prepare_timesteps(&plan, carry.seeds)?;
        let (latents, inpaint) = match &req.inpaint {
            Some(_) => {
                let (latents, state) = self.prepare_inpaint(&plan, &mut sampling)?;
                (latents, Some(state))
            }
            None => (self.prepare_latents(&plan, &mut sampling)?, None),
        };
        // IF stage II: the upscaled image's noise is drawn after the initial noise.
        conditioning.low_res = self.prepare_low_res(&plan, &mut sampling)?;
        let latents = self.denoise(
            &unet,
            &plan,
            &conditioning,
            &mut sampling,
            latents,
            inpaint.as_ref(),
            on_step,
        )?;
        drop(unet);
        // A GPU runs the loop's kernels asynchronously; waiting for them once here (never
        // inside the loop) makes the denoise timing the loop's and not the decode's.
        self.device.synchronize()?;
        let denoise = t_denoise.elapsed();

        let t_decode = Instant::now();
        let mut images = if stage.skip_decode {
            Vec::new()
        } else {
            self.decode_latents(&latents, req.vae_tiling)?
        };
        if let Some(state) = &inpaint {
            images = state.paste_back(images)?;
        }
        let decode = t_decode.elapsed();

        let networks = self.network_params(req);
        let params = (0..plan.batch)
            .map(|k| {
                let (prompt_index, batch_index) = (k / req.num_images, k % req.num_images);
                let mut params = GenerationParams {
                    model_hash: self.model_hash.clone(),
                    ..plan.params(&self.name, &sampling.name, prompt_index, batch_index, &networks)
                };
                params.prompt = self.with_lora_tags(&params.prompt);
                params
            })
            .collect();
        let output = StageOutput {
            images,
            params,
            latents,
            timings: Timings { encode, denoise, decode },
            steps: sampling.steps,
            evaluations: sampling.timesteps.len(),
            scheduler: sampling.name,
        };
        Ok((output, Carry { seeds: Some(sampling.generator), embeds: Some((uncond, cond)) }))
    }

    /// What the images' parameters record of the embeddings and LoRAs: A1111's
    /// `TI hashes: "token: hash, …"` (embeddings the prompts use) and
    /// `Lora hashes: "name: hash, …"` (names without `:` and `,`, as A1111 writes them).
    fn network_params(&self, req: &GenerateRequest) -> Vec<(String, String)> {
        let mut out = Vec::new();
        // A1111 lists the embeddings the prompts use: `TI hashes: "token: hash, …"`.
        let used: Vec<String> = self
            .embeddings
            .iter()
            .filter(|e| req.prompts.iter().chain(&req.negative).any(|p| p.contains(&e.token)))
            .map(|e| format!("{}: {}", e.token.replace([':', ','], ""), e.hash))
            .collect();
        if !used.is_empty() {
            out.push(("TI hashes".to_string(), used.join(", ")));
        }
        if !self.loras.is_empty() {
            let hashes: Vec<String> = self
                .loras
                .iter()
                .map(|l| format!("{}: {}", l.name.replace([':', ','], ""), l.hash))
                .collect();
            out.push(("Lora hashes".to_string(), hashes.join(", ")));
        }
        out
    }

    /// The prompt as A1111 would need it to recreate the image: with a `<lora:NAME:SCALE>` tag
    /// appended for each merged LoRA the prompt does not already name.
    fn with_lora_tags(&self, prompt: &str) -> String {
        let tagged = extract_lora_tags(prompt).map(|(_, t)| t).unwrap_or_default();
        let mut out = prompt.to_string();
        for l in &self.loras {
            if !tagged.iter().any(|(name, _)| *name == l.name) {
                out.push_str(&format!(" <lora:{}:{}>", l.name, fmt_number(l.scale)));
            }
        }
        out
    }

    /// Phase 1: the request's own checks, then those that need the model: the image size
    /// against the VAE's scale factor, and η against the sampler the run will use.
    fn check_inputs<'r>(
        &self,
        req: &'r GenerateRequest,
        stage: Stage<'r>,
        given_embeds: bool,
    ) -> Result<Plan<'r>> {
        req.validate()?;
        self.text.check_options(req.clip_skip, req.long_prompt)?;
        self.check_deepfloyd(req, &stage, given_embeds)?;
        let (width, height) = req.size(self.default_size(), self.vae_scale_factor())?;
        if self.vae.is_none() {
            self.check_pixel_size(req, (width, height))?;
        }
        crate::refiner::check_stage(self, req, &stage, (width, height))?;
        let sampler = req.scheduler.or(self.default_sampler);
        // η is a property of the class that will run: the model's own scheduler may be one no
        // sampler name stands for (a DPM-Solver variant), so ask its config, not the name.
        let class = req
            .scheduler
            .map(SamplerKind::scheduler_class)
            .or_else(|| self.scheduler_config.scheduler_class().ok());
        req.check_eta(class, sampler.map_or("model's", SamplerKind::name))?;
        // diffusers: guidance needs g > 1, and guidance-distilled (LCM) U-Nets take it as input.
        let do_cfg = req.guidance > 1.0 && self.unet.config().time_cond_proj_dim.is_none();
        let batch = req.prompts.len() * req.num_images;
        self.check_inpaint(req)?;
        self.check_lora_tags(req)?;
        Ok(Plan { req, stage, width, height, sampler, do_cfg, batch })
    }

    /// Every `<lora:NAME>` tag of the prompts must name a LoRA merged at load (LoRAs are merged
    /// into the weights once, so a request cannot bring new ones).
    fn check_lora_tags(&self, req: &GenerateRequest) -> Result<()> {
        for text in req.prompts.iter().chain(&req.negative) {
            for (name, _) in extract_lora_tags(text)?.1 {
                if !self.loras.iter().any(|l| l.name == name) {
                    let loaded: Vec<&str> = self.loras.iter().map(|l| l.name.as_str()).collect();
                    return Err(PipelineError::invalid(
                        "prompt",
                        format!(
                            "<lora:{name}> names no LoRA merged into this pipeline (merged: {}); \
                             LoRAs load with the model (ltd-gen: --lora or --lora-dir)",
                            if loaded.is_empty() { "none".into() } else { loaded.join(", ") }
                        ),
                    ));
                }
            }
        }
        Ok(())
    }

    /// Phase 2: encodes the prompts and the negative prompt: `(uncond, cond)`, each
    /// `[N, L, D]` with `N` the batch; `uncond` is `None` without classifier-free guidance
    /// (`do_cfg`).
    pub(crate) fn encode_prompt(
        &self,
        req: &GenerateRequest,
        do_cfg: bool,
    ) -> Result<(Option<PromptEmbeds>, PromptEmbeds)> {
        // A1111's `<lora:…>` tags were applied at load; they are removed before encoding.
        let stripped: Vec<String> =
            req.prompts.iter().map(|p| Ok(extract_lora_tags(p)?.0)).collect::<Result<_>>()?;
        let prompts: Vec<&str> = stripped.iter().map(String::as_str).collect();
        let n = req.num_images;
        if !do_cfg {
            let cond = self.text.encode(
                &prompts,
                req.clip_skip,
                req.long_prompt,
                req.emphasis,
                &self.device,
            )?;
            return Ok((None, cond.repeat_rows(n)?));
        }
        if req.negative.is_none() && self.text.zeros_for_absent_negative() {
            let cond = self.text.encode(
                &prompts,
                req.clip_skip,
                req.long_prompt,
                req.emphasis,
                &self.device,
            )?;
            let uncond = cond.zeros_like()?;
            return Ok((Some(uncond.repeat_rows(n)?), cond.repeat_rows(n)?));
        }
        // Negative and positive prompts in one encoder batch, so long-prompt chunks line up.
        let negative = extract_lora_tags(req.negative.as_deref().unwrap_or(""))?.0;
        let negative = negative.as_str();
        let mut texts = vec![negative; prompts.len()];
        texts.extend(&prompts);
        let both =
            self.text.encode(&texts, req.clip_skip, req.long_prompt, req.emphasis, &self.device)?;
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

    /// Phase 2, continued: the U-Net's conditioning from the embeddings (unconditional rows
    /// first), with SDXL's added text embeddings and time ids (diffusers'
    /// `_get_add_time_ids`) and LCM's guidance embedding.
    fn unet_conditioning(
        &self,
        plan: &Plan<'_>,
        uncond: Option<&PromptEmbeds>,
        cond: &PromptEmbeds,
    ) -> Result<Conditioning> {
        let context = match uncond {
            Some(u) => Tensor::cat(&[&u.hidden, &cond.hidden], 0)?,
            None => cond.hidden.clone(),
        };
        let rows = context.dim(0)?;
        let mut added = UNetConditioning::default();
        if self.index.kind == PipelineKind::StableDiffusionXl {
            let pooled = |e: &PromptEmbeds| {
                e.pooled
                    .clone()
                    .ok_or_else(|| PipelineError::msg("SDXL needs pooled text embeddings"))
            };
            added.text_embeds = Some(match uncond {
                Some(u) => Tensor::cat(&[&pooled(u)?, &pooled(cond)?], 0)?,
                None => pooled(cond)?,
            });
            let n = plan.batch;
            let (neg, pos) = crate::refiner::time_ids(&self.index, plan.width, plan.height);
            let ids = match uncond {
                Some(_) => Tensor::cat(
                    &[
                        Tensor::new(neg.as_slice(), &self.device)?.unsqueeze(0)?.repeat((n, 1))?,
                        Tensor::new(pos.as_slice(), &self.device)?.unsqueeze(0)?.repeat((n, 1))?,
                    ],
                    0,
                )?,
                None => {
                    Tensor::new(pos.as_slice(), &self.device)?.unsqueeze(0)?.repeat((rows, 1))?
                }
            };
            added.time_ids = Some(ids.to_dtype(self.dtype)?);
        }
        if let Some(dim) = self.unet.config().time_cond_proj_dim {
            added.timestep_cond = Some(
                guidance_scale_embedding(plan.req.guidance - 1.0, rows, dim, &self.device)?
                    .to_dtype(self.dtype)?,
            );
        }
        if let Some((_, noise_level)) = plan.stage.low_res {
            // diffusers' `class_labels=noise_level`, one per row (doubled under guidance).
            added.class_labels =
                Some(Tensor::full(noise_level as f32, rows, &self.device)?.to_dtype(self.dtype)?);
        }
        Ok(Conditioning { context, added, low_res: None })
    }

    /// The sampler for a request: the one asked for (built from the model's scheduler config,
    /// as diffusers' `from_config`) or the one the model ships; with dynamic thresholding
    /// switched on in its config when the sampler supports it natively.
    fn scheduler_for(&self, req: &GenerateRequest) -> Result<Box<dyn Scheduler>> {
        let kind = req.scheduler;
        let options = SamplerOptions { eta: req.eta };
        let sched = ltd_scheduler::build(&self.scheduler_config, kind, &options)?;
        match &req.dynamic_threshold {
            Some(th) if sched.supports_thresholding() => {
                let cfg = SchedulerConfig {
                    thresholding: Some(true),
                    dynamic_thresholding_ratio: Some(th.ratio),
                    sample_max_value: Some(th.max),
                    ..self.scheduler_config.clone()
                };
                Ok(ltd_scheduler::build(&cfg, kind, &options)?)
            }
            _ => Ok(sched),
        }
    }

    /// Phase 3: the sampler and its timesteps. Image-to-image runs diffusers' `get_timesteps`
    /// tail: ⌊steps · strength⌋ steps, from index (steps − that) · order.
    fn prepare_timesteps(&self, plan: &Plan<'_>, seeds: Option<Seeds>) -> Result<Sampling> {
        let req = plan.req;
        let mut scheduler = self.scheduler_for(req)?;
        // The step count is the user's: a count the schedule cannot take is bad input.
        scheduler
            .set_timesteps(req.steps)
            .map_err(|e| PipelineError::invalid("steps", e.to_string()))?;
        let mut timesteps = scheduler.timesteps().to_vec();
        let mut steps = req.steps;
        let strength = plan.stage.strength.or(req.init_image.as_ref().map(|i| i.strength));
        let train_steps = self.scheduler_config.num_train_timesteps.unwrap_or(1000);
        if let Some(start) = plan.stage.denoising_start {
            let (begin, n) =
                crate::refiner::start_index(&timesteps, start, train_steps, scheduler.order());
            timesteps = timesteps[begin..].to_vec();
            scheduler.set_begin_index(begin);
            steps = n.div_ceil(scheduler.order());
        } else if let Some(strength) = strength {
            steps = ((req.steps as f64 * strength) as usize).min(req.steps);
            let begin = (req.steps - steps) * scheduler.order();
            timesteps = timesteps[begin.min(timesteps.len())..].to_vec();
            scheduler.set_begin_index(begin);
        }
        if let Some(end) = plan.stage.denoising_end {
            let kept = crate::refiner::end_count(&timesteps, end, train_steps);
            timesteps.truncate(kept);
            steps = kept.div_ceil(scheduler.order());
        }
        let name = plan
            .sampler
            .map(|k| k.name().to_string())
            .unwrap_or_else(|| scheduler.class_name().to_string());
        let generator = seeds.unwrap_or_else(|| Seeds::new(req, plan.batch));
        Ok(Sampling { scheduler, timesteps, steps, name, generator })
    }

    /// Phase 4: the starting latents: noise scaled by the sampler's `init_noise_sigma`, or for
    /// image-to-image the encoded picture noised to the first timestep (the VAE's posterior
    /// sample drawn first, then the noise, from the one generator).
    fn prepare_latents(&self, plan: &Plan<'_>, sampling: &mut Sampling) -> Result<Tensor> {
        let req = plan.req;
        let Sampling { scheduler, timesteps, generator, .. } = sampling;
        if let Some(given) = plan.stage.latents {
            let z = given.to_dtype(self.dtype)?;
            let z = if z.dim(0)? < plan.batch { z.repeat((plan.batch, 1, 1, 1))? } else { z };
            if plan.stage.denoising_start.is_some() {
                return Ok(z);
            }
            let noise = generator.initial_noise(z.dims(), self.dtype, &self.device)?;
            let first = *timesteps
                .first()
                .ok_or_else(|| PipelineError::invalid("strength", "leaves no denoising step"))?;
            return Ok(scheduler.add_noise(&z, &noise, first)?);
        }
        match &req.init_image {
            None => {
                let scale = self.vae_scale_factor();
                let shape =
                    [plan.batch, self.sample_channels(), plan.height / scale, plan.width / scale];
                let noise = generator.initial_noise(&shape, self.dtype, &self.device)?;
                Ok((noise * scheduler.init_noise_sigma())?)
            }
            Some(init) => {
                // One generator per image (`--seed-mode a1111`) encodes each image with its own,
                // as diffusers does with a list of generators.
                let copies = generator.posterior_batch();
                let z = self.encode_image(&init.image, copies, generator, req.vae_tiling)?;
                let z = z.to_dtype(self.dtype)?;
                let z = if z.dim(0)? < plan.batch { z.repeat((plan.batch, 1, 1, 1))? } else { z };
                let noise = generator.initial_noise(z.dims(), self.dtype, &self.device)?;
                let first = *timesteps.first().ok_or_else(|| {
                    PipelineError::invalid("strength", "leaves no denoising step")
                })?;
                Ok(scheduler.add_noise(&z, &noise, first)?)
            }
        }
    }

    /// Phase 5: the denoising loop, one U-Net call per timestep (both guidance halves in one
    /// batch), reporting progress in the user's steps after every evaluation.
    #[allow(clippy::too_many_arguments)]
    fn denoise(
        &self,
        unet: &UNet2DConditionModel,
        plan: &Plan<'_>,
        conditioning: &Conditioning,
        sampling: &mut Sampling,
        mut latents: Tensor,
        inpaint: Option<&InpaintState>,
        on_step: &mut dyn FnMut(Progress<'_>),
    ) -> Result<Tensor> {
        let Sampling { scheduler, timesteps, steps, generator, .. } = sampling;
        let evaluations = timesteps.len();
        let counter = StepCounter::new(evaluations, *steps, scheduler.order());
        let rows = conditioning.context.dim(0)?;
        let mut step = 0;
        let cancel = Cell::new(false);
        for (i, &t) in timesteps.iter().enumerate() {
            let _span = tracing::debug_span!("step", i, t).entered();
            let x_in =
                if plan.do_cfg { Tensor::cat(&[&latents, &latents], 0)? } else { latents.clone() };
            let x_in = match &conditioning.low_res {
                Some(low_res) => Tensor::cat(&[&x_in, low_res], 1)?,
                None => x_in,
            };
            let mut x_in = scheduler.scale_model_input(&x_in, t)?;
            if let Some(state) = inpaint {
                x_in = state.unet_input(&x_in)?;
            }
            let t_in = Tensor::full(t as f32, rows, &self.device)?;
            let out = unet.forward(&x_in, &t_in, &conditioning.context, &conditioning.added)?;
            let (out, variance) = plan.split_variance(out, latents.dim(1)?)?;
            let guided = plan.guide(scheduler.as_ref(), out, t, &latents)?;
            // A sampler that reads the variance gets `[guided, variance]` (diffusers' IF loop).
            let guided = match variance {
                Some(v) if scheduler.takes_learned_variance() => Tensor::cat(&[&guided, &v], 1)?,
                _ => guided,
            };
            latents = scheduler.step(&guided, t, &latents, generator)?;
            if let Some(state) = inpaint {
                latents =
                    state.blend(scheduler.as_ref(), &latents, timesteps.get(i + 1).copied())?;
            }
            if counter.ends_step(i) {
                step = (step + 1).min(*steps);
            }
            on_step(Progress {
                step,
                total: *steps,
                evaluation: i + 1,
                evaluations,
                timestep: t,
                latents: &latents,
                cancel: &cancel,
            });
            if cancel.get() {
                return Err(PipelineError::Cancelled { step, total: *steps });
            }
        }
        Ok(latents)
    }

    /// VAE latents of an image scaled for the diffusion model (SDXL's `latents_mean/std` when
    /// the config has them, else `scaling_factor`), drawing the posterior sample from `rng`.
    pub(crate) fn encode_image(
        &self,
        image: &RgbImage,
        copies: usize,
        rng: &mut dyn NoiseSource,
        tiling: bool,
    ) -> Result<Tensor> {
        let x = image.to_tensor(&self.device)?;
        let x = if copies > 1 { x.repeat((copies, 1, 1, 1))? } else { x };
        self.encode_pixels(&x, rng, tiling)
    }

    /// [`Self::encode_image`] on pixels already in `[-1, 1]`, `[N, 3, H, W]`. An SDXL VAE with
    /// `latents_mean`/`latents_std` is normalized with them, as `decode_latents` undoes it
    /// (diffusers' XL inpaint pipeline ignores them both ways; ltd stays consistent with its
    /// own decoding).
    pub(crate) fn encode_pixels(
        &self,
        x: &Tensor,
        rng: &mut dyn NoiseSource,
        tiling: bool,
    ) -> Result<Tensor> {
        let vae = self.vae()?;
        let x = x.to_dtype(vae.dtype())?;
        let cfg = vae.config();
        let tiles = tiling.then(|| TilingOptions::for_config(cfg));
        let z = vae.encode_with_tiling(&x, tiles.as_ref())?.sample(rng)?;
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
        Ok(Tensor::from_vec(data, (1, v.len(), 1, 1), &self.device)?
            .to_dtype(self.vae()?.dtype())?)
    }

    /// Phase 6: decodes latents `[N, C, h, w]` (the diffusion model's scale) to images. A
    /// pixel-space model's samples are the images already (DeepFloyd IF's `output_type="pil"`:
    /// `(x / 2 + 0.5).clamp(0, 1)`, rounded to bytes).
    pub fn decode_latents(&self, latents: &Tensor, tiling: bool) -> Result<Vec<RgbImage>> {
        let Some(vae) = &self.vae else {
            return tensor_to_images(latents);
        };
        let cfg = vae.config();
        let z = latents.to_dtype(vae.dtype())?;
        let z = match (&cfg.latents_mean, &cfg.latents_std) {
            (Some(mean), Some(std)) if self.index.kind == PipelineKind::StableDiffusionXl => {
                let (m, s) = (self.channel_vector(mean)?, self.channel_vector(std)?);
                (z.broadcast_mul(&s)? / cfg.scaling_factor)?.broadcast_add(&m)?
            }
            _ => cfg.unscale_latents(&z)?,
        };
        let tiles = tiling.then(|| TilingOptions::for_config(cfg));
        let images = vae.decode_with_tiling(&z, tiles.as_ref())?;
        tensor_to_images(&images)
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

    /// The user's steps done after each evaluation.
    fn steps_after_each(evaluations: usize, steps: usize, order: usize) -> Vec<usize> {
        let c = StepCounter::new(evaluations, steps, order);
        (0..evaluations)
            .scan(0, |done, i| {
                *done += usize::from(c.ends_step(i));
                Some(*done)
            })
            .collect()
    }

    #[test]
    fn counts_the_users_steps_not_model_evaluations() {
        // One evaluation per step.
        assert_eq!(steps_after_each(4, 4, 1), [1, 2, 3, 4]);
        // Heun, 4 steps: 2·4 − 1 evaluations in pairs, the last step a single Euler one.
        assert_eq!(steps_after_each(7, 4, 2), [0, 1, 1, 2, 2, 3, 4]);
        // Heun image-to-image, the last 2 of 4 steps: 3 evaluations.
        assert_eq!(steps_after_each(3, 2, 2), [0, 1, 2]);
        // PNDM (PLMS), 4 steps: one warm-up evaluation more.
        assert_eq!(steps_after_each(5, 4, 1), [0, 1, 2, 3, 4]);
        // PNDM with Runge-Kutta warm-up, 4 steps: 12 PRK evaluations and 1 PLMS one.
        assert_eq!(*steps_after_each(13, 4, 1).last().unwrap(), 4);
    }
}
