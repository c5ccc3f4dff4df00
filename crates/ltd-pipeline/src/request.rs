//! What a user asks for, checked before any model runs.
//!
//! Field names match the CLI's flags, so a [`PipelineError::InvalidRequest`] names the flag.
//! Options are typed (a sampler is a [`SamplerKind`], not a name): a front end parses its
//! strings once, with [`parse_sampler`] and friends, when it builds the request, and
//! [`GenerateRequest::validate`] checks the values.

use ltd_scheduler::{SamplerKind, SchedulerClass};

use crate::error::{PipelineError, Result};
use crate::image::RgbImage;

/// How prompts longer than the tokenizer's window (77 tokens) are handled.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum LongPrompt {
    /// Cut at the window, as diffusers does, with a warning quoting what was dropped.
    #[default]
    Truncate,
    /// Encode 75-token chunks and concatenate their embeddings, as AUTOMATIC1111 does.
    Chunk,
}

/// Whether prompts use AUTOMATIC1111's emphasis syntax (`(word:1.2)`, `[word]`, `BREAK`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum Emphasis {
    /// Parsed as A1111 does, weights applied to the text embeddings with the mean restored.
    /// Prompts without the syntax encode exactly as with [`Emphasis::None`].
    #[default]
    A1111,
    /// Prompts taken literally, as diffusers takes them.
    None,
}

/// Which random generator draws the noise.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum RngKind {
    /// PyTorch's CPU generator (`torch.Generator("cpu")`): same image as diffusers on any
    /// device.
    #[default]
    Cpu,
    /// PyTorch's CUDA generator (Philox), as AUTOMATIC1111's "NV" setting.
    Cuda,
}

/// How the images of a batch get their noise (`crate::seeds`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum SeedMode {
    /// diffusers: one generator seeded `seed` fills the whole batch.
    #[default]
    Diffusers,
    /// AUTOMATIC1111: image `k` gets seed `seed + k` and a generator of its own.
    A1111,
}

/// AUTOMATIC1111's variation seed: the initial noise is slerped towards this seed's noise.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Subseed {
    /// The variation seed (`--subseed`).
    pub seed: u64,
    /// How far towards its noise, in [0, 1] (`--subseed-strength`).
    pub strength: f64,
}

/// Imagen dynamic thresholding of the predicted clean latents.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct DynamicThreshold {
    /// The quantile of |x0| used as the threshold (diffusers' `dynamic_thresholding_ratio`).
    pub ratio: f64,
    /// The largest threshold (diffusers' `sample_max_value`).
    pub max: f64,
}

impl Default for DynamicThreshold {
    /// diffusers' defaults (0.995, 1.0), which for SD latents amount to clipping at ±1.
    fn default() -> Self {
        Self { ratio: 0.995, max: 1.0 }
    }
}

/// The latent-aware guidance limiter ("mimic" guidance): the clean latents predicted at the
/// requested guidance are rescaled, per sample and channel, to the spread they have at a lower
/// `mimic` guidance, which keeps what high guidance adds without over-saturating.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct MimicGuidance {
    /// The guidance whose per-channel spread is the target.
    pub mimic: f64,
    /// The quantile of |x0 − mean| that measures spread.
    pub percentile: f64,
}

impl Default for MimicGuidance {
    fn default() -> Self {
        Self { mimic: 7.0, percentile: 0.995 }
    }
}

/// Image-to-image input.
#[derive(Debug, Clone, PartialEq)]
pub struct InitImage {
    /// The picture to start from.
    pub image: RgbImage,
    /// How much of the schedule to run: 0 keeps the picture, 1 ignores it.
    pub strength: f64,
}

/// Inpainting input: which part of the init image to repaint (diffusers'
/// `StableDiffusionInpaintPipeline`; `--init-image` is the picture, its strength
/// `--strength`).
#[derive(Debug, Clone, PartialEq)]
pub struct Inpaint {
    /// White repaints, black keeps (gray: binarized at 50%, as diffusers' mask processor);
    /// any size with the picture's aspect ratio, resized to it with PIL's Lanczos filter.
    pub mask: RgbImage,
    /// Gaussian blur radius applied to the mask first (diffusers' `VaeImageProcessor.blur`
    /// `blur_factor`, PIL's `GaussianBlur`); 0 for none. It softens the paste-back seam.
    pub mask_blur: f32,
    /// diffusers' `padding_mask_crop`: inpaint only the mask's bounding box grown by this many
    /// pixels (and to the output's aspect ratio), at the full generation size, then paste it
    /// back into the picture, which keeps its own size.
    pub padding_mask_crop: Option<usize>,
    /// Paste the original back wherever the mask is black (diffusers' `apply_overlay`), also
    /// without `padding_mask_crop` (outpainting does, so the picture stays byte-exact).
    pub keep_unmasked: bool,
}

/// A generation request.
#[derive(Debug, Clone, PartialEq)]
pub struct GenerateRequest {
    /// One or more prompts; each gives `num_images` images.
    pub prompts: Vec<String>,
    /// The negative prompt, shared by all prompts. `None` and `Some("")` differ for SDXL
    /// models with `force_zeros_for_empty_prompt`, as in diffusers.
    pub negative: Option<String>,
    /// Denoising steps.
    pub steps: usize,
    /// Classifier-free guidance scale; ≤ 1 skips the unconditional pass.
    pub guidance: f64,
    /// Guidance rescale φ (Lin et al. 2023, §3.4), 0 to disable.
    pub guidance_rescale: f64,
    /// Imagen dynamic thresholding.
    pub dynamic_threshold: Option<DynamicThreshold>,
    /// The latent-aware guidance limiter.
    pub mimic_guidance: Option<MimicGuidance>,
    /// The sampler (`--scheduler euler-a`, …); `None` for the one the model ships.
    pub scheduler: Option<SamplerKind>,
    /// DDIM's η. Only DDIM reads it: a non-zero η with any other sampler is rejected rather
    /// than silently ignored (and recorded in the image's parameters as if it had mattered).
    pub eta: f64,
    /// Image width in pixels; `None` for the model's default.
    pub width: Option<usize>,
    /// Image height in pixels; `None` for the model's default.
    pub height: Option<usize>,
    /// Images per prompt.
    pub num_images: usize,
    /// The seed of the one generator that draws all noise.
    pub seed: u64,
    /// The random generator.
    pub rng: RngKind,
    /// One generator for the batch (diffusers) or one per image (AUTOMATIC1111).
    pub seed_mode: SeedMode,
    /// AUTOMATIC1111's variation seed.
    pub subseed: Option<Subseed>,
    /// Skip this many final CLIP layers (1 = penultimate).
    pub clip_skip: Option<usize>,
    /// Long-prompt handling.
    pub long_prompt: LongPrompt,
    /// Prompt emphasis syntax.
    pub emphasis: Emphasis,
    /// Image-to-image input.
    pub init_image: Option<InitImage>,
    /// Decode (and encode) the VAE in tiles, for large images in bounded memory.
    pub vae_tiling: bool,
    /// Inpainting: the mask over `init_image` (which it needs).
    pub inpaint: Option<Inpaint>,
}

impl Default for GenerateRequest {
    fn default() -> Self {
        Self {
            prompts: vec![String::new()],
            negative: None,
            steps: 30,
            guidance: 7.5,
            guidance_rescale: 0.0,
            dynamic_threshold: None,
            mimic_guidance: None,
            scheduler: None,
            eta: 0.0,
            width: None,
            height: None,
            num_images: 1,
            seed: 0,
            rng: RngKind::Cpu,
            seed_mode: SeedMode::Diffusers,
            subseed: None,
            clip_skip: None,
            long_prompt: LongPrompt::Truncate,
            emphasis: Emphasis::A1111,
            init_image: None,
            vae_tiling: false,
            inpaint: None,
        }
    }
}

/// Parses a `--scheduler` name; the error names the flag and lists the known samplers.
pub fn parse_sampler(name: &str) -> Result<SamplerKind> {
    name.parse::<SamplerKind>().map_err(|e| PipelineError::invalid("scheduler", e.to_string()))
}

fn finite_at_least(field: &'static str, v: f64, min: f64) -> Result<()> {
    if !v.is_finite() {
        return Err(PipelineError::invalid(field, format!("must be a finite number, got {v}")));
    }
    if v < min {
        return Err(PipelineError::invalid(field, format!("must be at least {min}, got {v}")));
    }
    Ok(())
}

impl GenerateRequest {
    /// Checks everything that does not depend on the model.
    pub fn validate(&self) -> Result<()> {
        if self.prompts.is_empty() {
            return Err(PipelineError::invalid("prompt", "give at least one prompt"));
        }
        if self.steps == 0 {
            return Err(PipelineError::invalid("steps", "must be at least 1"));
        }
        if self.steps > 10_000 {
            return Err(PipelineError::invalid(
                "steps",
                format!("{} is too many (at most 10000)", self.steps),
            ));
        }
        finite_at_least("guidance", self.guidance, 0.0)?;
        if !(0.0..=1.0).contains(&self.guidance_rescale) || self.guidance_rescale.is_nan() {
            return Err(PipelineError::invalid(
                "guidance-rescale",
                format!("must be in [0, 1], got {}", self.guidance_rescale),
            ));
        }
        if let Some(t) = &self.dynamic_threshold {
            if !(t.ratio > 0.0 && t.ratio <= 1.0) {
                return Err(PipelineError::invalid(
                    "dynamic-threshold",
                    format!("the ratio must be in (0, 1], got {}", t.ratio),
                ));
            }
            finite_at_least("dynamic-threshold", t.max, 1.0)?;
        }
        if let Some(m) = &self.mimic_guidance {
            finite_at_least("mimic-guidance", m.mimic, 1.0)?;
            if !(m.percentile > 0.0 && m.percentile <= 1.0) {
                return Err(PipelineError::invalid(
                    "mimic-guidance",
                    format!("the percentile must be in (0, 1], got {}", m.percentile),
                ));
            }
        }
        finite_at_least("eta", self.eta, 0.0)?;
        if let Some(kind) = self.scheduler {
            self.check_eta(Some(kind.scheduler_class()), kind.name())?;
        }
        for (field, v) in [("width", self.width), ("height", self.height)] {
            if v == Some(0) {
                return Err(PipelineError::invalid(field, "must be positive"));
            }
        }
        if self.num_images == 0 {
            return Err(PipelineError::invalid("num-images", "must be at least 1"));
        }
        if self.clip_skip == Some(0) {
            return Err(PipelineError::invalid(
                "clip-skip",
                "must be at least 1 (1 = penultimate layer)",
            ));
        }
        if let Some(sub) = &self.subseed {
            if !(0.0..=1.0).contains(&sub.strength) || sub.strength.is_nan() {
                return Err(PipelineError::invalid(
                    "subseed-strength",
                    format!("must be in [0, 1], got {}", sub.strength),
                ));
            }
        }
        if let Some(init) = &self.init_image {
            let s = init.strength;
            if !(0.0..=1.0).contains(&s) || s.is_nan() {
                return Err(PipelineError::invalid(
                    "strength",
                    format!("must be in [0, 1], got {s}"),
                ));
            }
            // diffusers: int(steps * strength) steps are run; none is an error there too.
            if (self.steps as f64 * s).floor() < 1.0 {
                return Err(PipelineError::invalid(
                    "strength",
                    format!(
                        "{s} of {} steps leaves no denoising step (need steps × strength ≥ 1)",
                        self.steps
                    ),
                ));
            }
        }
        if let Some(inpaint) = &self.inpaint {
            inpaint.validate(self.init_image.as_ref())?;
        }
        Ok(())
    }

    /// Rejects a non-zero η for a sampler that does not read it. `sampler` is the sampler the
    /// run uses (`None`: a shipped class with no CLI name, which is never DDIM), `name` what
    /// to call it in the message.
    pub(crate) fn check_eta(&self, class: Option<SchedulerClass>, name: &str) -> Result<()> {
        if self.eta == 0.0 || class.is_some_and(SchedulerClass::uses_eta) {
            return Ok(());
        }
        Err(PipelineError::invalid(
            "eta",
            format!(
                "only the ddim sampler uses η; the {name} sampler would ignore {} (drop --eta, \
                 or pick --scheduler ddim)",
                self.eta
            ),
        ))
    }

    /// The image size, from the request or the model's default, checked against the VAE's
    /// scale factor.
    pub fn size(&self, default: (usize, usize), scale_factor: usize) -> Result<(usize, usize)> {
        if self.inpaint.as_ref().is_some_and(|i| i.padding_mask_crop.is_some()) {
            // The crop is rendered at the generation size and pasted back into the picture at
            // its own size, so the two are independent (diffusers' default: the model's size).
            let (w, h) = (self.width.unwrap_or(default.0), self.height.unwrap_or(default.1));
            for (field, v) in [("width", w), ("height", h)] {
                if v % scale_factor != 0 {
                    return Err(PipelineError::invalid(
                        field,
                        format!(
                            "{v} is not a multiple of the model's VAE scale factor {scale_factor}"
                        ),
                    ));
                }
            }
            return Ok((w, h));
        }
        let (dw, dh) = match &self.init_image {
            Some(init) => (init.image.width, init.image.height),
            None => default,
        };
        let (w, h) = (self.width.unwrap_or(dw), self.height.unwrap_or(dh));
        for (field, v) in [("width", w), ("height", h)] {
            if v % scale_factor != 0 {
                return Err(PipelineError::invalid(
                    field,
                    format!("{v} is not a multiple of the model's VAE scale factor {scale_factor}"),
                ));
            }
        }
        if let Some(init) = &self.init_image {
            if (init.image.width, init.image.height) != (w, h) {
                return Err(PipelineError::invalid(
                    "init-image",
                    format!(
                        "the image is {}x{} but the requested size is {w}x{h}; resize it or drop \
                         --width/--height",
                        init.image.width, init.image.height
                    ),
                ));
            }
        }
        Ok((w, h))
    }
}

impl Inpaint {
    /// What needs no model: an init image to repaint, a mask of its aspect ratio, a blur.
    fn validate(&self, init: Option<&InitImage>) -> Result<()> {
        let Some(init) = init else {
            return Err(PipelineError::invalid(
                "mask",
                "needs --init-image, the picture whose white-masked part is repainted",
            ));
        };
        let (iw, ih) = (init.image.width, init.image.height);
        let (mw, mh) = (self.mask.width, self.mask.height);
        // Equal ratios up to the rounding of a mask made at another scale (one mask pixel).
        let off = (mw as f64 * ih as f64 / iw as f64 - mh as f64).abs();
        if mw == 0 || mh == 0 || off > 1.0 {
            return Err(PipelineError::invalid(
                "mask",
                format!(
                    "the mask is {mw}x{mh} but the image is {iw}x{ih}: a different aspect ratio \
                     (make the mask the image's size)"
                ),
            ));
        }
        if !self.mask_blur.is_finite() || self.mask_blur < 0.0 {
            return Err(PipelineError::invalid(
                "mask-blur",
                format!("must be a radius ≥ 0, got {}", self.mask_blur),
            ));
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn check(req: GenerateRequest, expect: &str) {
        let got = req.validate().err().map(|e| e.to_string()).unwrap_or_default();
        assert!(got.contains(expect), "expected {expect:?}, got {got:?}");
    }

    #[test]
    fn rejects_bad_parameters_naming_the_flag() {
        let ok = GenerateRequest::default();
        ok.validate().unwrap();
        check(GenerateRequest { steps: 0, ..ok.clone() }, "--steps: must be at least 1");
        check(
            GenerateRequest { guidance: f64::NAN, ..ok.clone() },
            "--guidance: must be a finite number",
        );
        check(GenerateRequest { guidance: -1.0, ..ok.clone() }, "--guidance: must be at least 0");
        check(GenerateRequest { guidance_rescale: 1.5, ..ok.clone() }, "--guidance-rescale");
        check(GenerateRequest { num_images: 0, ..ok.clone() }, "--num-images");
        check(GenerateRequest { clip_skip: Some(0), ..ok.clone() }, "--clip-skip");
        check(
            GenerateRequest {
                eta: 0.5,
                scheduler: Some(SamplerKind::EulerAncestral),
                ..ok.clone()
            },
            "--eta: only the ddim sampler uses η; the euler-a sampler would ignore 0.5",
        );
        GenerateRequest { eta: 0.5, scheduler: Some(SamplerKind::Ddim), ..ok.clone() }
            .validate()
            .unwrap();
        // The model's own sampler is only known with the model: `Pipeline::generate` checks.
        GenerateRequest { eta: 0.5, ..ok.clone() }.validate().unwrap();
        let img = RgbImage::new(8, 8, vec![0; 192]).unwrap();
        let init = |strength| Some(InitImage { image: img.clone(), strength });
        check(
            GenerateRequest { init_image: init(1.5), ..ok.clone() },
            "--strength: must be in [0, 1]",
        );
        check(GenerateRequest { init_image: init(-0.1), ..ok.clone() }, "--strength");
        check(GenerateRequest { init_image: init(0.01), ..ok.clone() }, "leaves no denoising step");
        check(
            GenerateRequest {
                dynamic_threshold: Some(DynamicThreshold { ratio: 0.9, max: 0.5 }),
                ..ok
            },
            "--dynamic-threshold",
        );
    }

    #[test]
    fn inpainting_needs_a_picture_and_a_mask_of_its_shape() {
        let img = |w: usize, h: usize| RgbImage::new(w, h, vec![0; w * h * 3]).unwrap();
        let inpaint = |w, h| {
            Some(Inpaint {
                mask: img(w, h),
                mask_blur: 0.0,
                padding_mask_crop: None,
                keep_unmasked: false,
            })
        };
        let init = Some(InitImage { image: img(64, 48), strength: 1.0 });
        let ok =
            GenerateRequest { init_image: init, inpaint: inpaint(128, 96), ..Default::default() };
        ok.validate().unwrap();
        check(GenerateRequest { init_image: None, ..ok.clone() }, "--mask: needs --init-image");
        check(
            GenerateRequest { inpaint: inpaint(64, 64), ..ok.clone() },
            "--mask: the mask is 64x64 but the image is 64x48: a different aspect ratio",
        );
        let mut blur = ok.clone();
        blur.inpaint.as_mut().unwrap().mask_blur = -1.0;
        check(blur, "--mask-blur");
    }

    #[test]
    fn parses_sampler_names_once_naming_the_flag() {
        assert_eq!(parse_sampler("dpm++2m-karras").unwrap(), SamplerKind::DpmPp2mKarras);
        let e = parse_sampler("euler-b").unwrap_err().to_string();
        assert!(
            e.starts_with("--scheduler: unknown sampler \"euler-b\" (known samplers: ddpm"),
            "{e}"
        );
    }

    #[test]
    fn sizes_default_from_the_model_and_respect_the_scale_factor() {
        let req = GenerateRequest::default();
        assert_eq!(req.size((512, 512), 8).unwrap(), (512, 512));
        let req = GenerateRequest { width: Some(500), ..Default::default() };
        assert!(req
            .size((512, 512), 8)
            .unwrap_err()
            .to_string()
            .contains("--width: 500 is not a multiple"));
        let img = RgbImage::new(16, 8, vec![0; 16 * 8 * 3]).unwrap();
        let req = GenerateRequest {
            init_image: Some(InitImage { image: img, strength: 0.5 }),
            ..Default::default()
        };
        assert_eq!(req.size((64, 64), 8).unwrap(), (16, 8));
        let req = GenerateRequest { height: Some(16), ..req };
        assert!(req
            .size((64, 64), 8)
            .unwrap_err()
            .to_string()
            .contains("--init-image: the image is 16x8"));
    }
}
