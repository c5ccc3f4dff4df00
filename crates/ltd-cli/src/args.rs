//! Command-line arguments, and their translation into a checked generation request.
//!
//! Values are parsed here into the request's types (numbers, paths, the sampler by
//! `ltd_pipeline::parse_sampler`) and checked in one place, `GenerateRequest::validate`, whose
//! errors name the flag; so every bad value gets one line.

use std::path::PathBuf;

use anyhow::{anyhow, bail, Context, Result};
use clap::{Parser, ValueEnum};
use ltd_cli::{decode_image, DeviceArgs, ModelArgs};
use ltd_pipeline::{
    extract_lora_tags, outpaint_canvas, parse_sampler, DynamicThreshold, Emphasis, GenerateRequest,
    HiresFix, HiresUpscaler, IfUpscale, InitImage, Inpaint, LongPrompt, LoraSpec, MimicGuidance,
    OutpaintFill, RgbImage, RngKind, SeedMode, Subseed, DEFAULT_NOISE_LEVEL,
};

/// Generate images from text with Stable Diffusion 1.x, 2.x and XL models and DeepFloyd IF in
/// diffusers format.
///
/// Without --model, the small default model built into ltd-gen is used (offline).
/// Examples:
///
///   ltd-gen "a red circle on a blue background"
///
///   ltd-gen "a cat in a hat" --model stable-diffusion-v1-5/stable-diffusion-v1-5 --guidance 7.5
///
///   ltd-gen "a castle at dusk" -m ./sdxl --scheduler dpm++2m-karras --steps 25 --seed 7 -o castle.png
///
///   ltd-gen "a knight" -m ./dreamshaper_8.safetensors --vae ./vae-ft-mse-840000-ema-pruned.safetensors
///
///   ltd-gen "a corgi in a hat" -m DeepFloyd/IF-I-XL-v1.0 --upscale-model DeepFloyd/IF-II-L-v1.0
#[derive(Debug, Parser)]
#[command(name = "ltd-gen", version, verbatim_doc_comment, max_term_width = 100)]
pub struct Args {
    /// The prompt. Several prompts each give --num-images images.
    #[arg(required = true, value_name = "PROMPT")]
    pub prompts: Vec<String>,

    /// `--model`, `--variant` (shared with ltd-serve).
    #[command(flatten)]
    pub model: ModelArgs,

    /// Negative prompt: what the image should not show.
    #[arg(short, long, value_name = "TEXT")]
    pub negative: Option<String>,

    /// Classifier-free guidance scale; ≤ 1 skips the unconditional pass, as diffusers does.
    #[arg(short, long, default_value_t = 7.5, value_name = "SCALE", allow_negative_numbers = true)]
    pub guidance: f64,

    /// Guidance rescale φ in [0, 1] (Lin et al. 2023, §3.4): reduces over-exposure at high
    /// guidance, especially with zero-terminal-SNR models.
    #[arg(long, default_value_t = 0.0, value_name = "PHI", allow_negative_numbers = true)]
    pub guidance_rescale: f64,

    /// Imagen dynamic thresholding of the predicted clean latents: quantile RATIO of |x0| per
    /// image, clamped to [1, MAX]. Without a value: diffusers' defaults 0.995,1.0, which for
    /// SD latents is plain clipping at ±1. Samplers without native support (euler, heun, lms,
    /// pndm…) get it applied to the guided prediction, in x0 space, before their step.
    #[arg(long, value_name = "RATIO[,MAX]", num_args = 0..=1, default_missing_value = "0.995,1.0", allow_negative_numbers = true)]
    pub dynamic_threshold: Option<String>,

    /// Latent-aware guidance limiter for high --guidance: each step's predicted clean latents
    /// are rescaled per channel to the spread they have at guidance MIMIC (percentile
    /// PERCENTILE of |x0 − mean|). Default 7,0.995.
    #[arg(long, value_name = "MIMIC[,PERCENTILE]", num_args = 0..=1, default_missing_value = "7,0.995", allow_negative_numbers = true)]
    pub mimic_guidance: Option<String>,

    /// Use the text encoder's output this many layers before the last (1 = penultimate).
    #[arg(long, value_name = "N")]
    pub clip_skip: Option<usize>,

    /// Sampler: ddpm, ddim, pndm, euler, euler-a, heun, lms, dpm++2m, dpm++2m-karras,
    /// dpm++2m-sde, dpm++2s, unipc, lcm. Default: the one the model ships with.
    #[arg(short, long, value_name = "NAME")]
    pub scheduler: Option<String>,

    /// DDIM's η (0 = deterministic, 1 = DDPM-like). Only the ddim sampler uses it; another
    /// value than 0 with any other sampler is an error.
    #[arg(long, default_value_t = 0.0, allow_negative_numbers = true)]
    pub eta: f64,

    /// Denoising steps.
    #[arg(long, default_value_t = 30, value_name = "N")]
    pub steps: usize,

    /// Image width in pixels (a multiple of the VAE's scale factor). Default: the model's.
    #[arg(short = 'W', long, value_name = "PIXELS")]
    pub width: Option<usize>,

    /// Image height in pixels (a multiple of the VAE's scale factor). Default: the model's.
    #[arg(short = 'H', long, value_name = "PIXELS")]
    pub height: Option<usize>,

    /// Images per prompt, generated as one batch (seeds: see --seed-mode).
    #[arg(long, default_value_t = 1, value_name = "N")]
    pub num_images: usize,

    /// Seed of the random generator; random when absent (and always recorded in the PNG).
    #[arg(long, value_name = "N")]
    pub seed: Option<u64>,

    /// Random generator: cpu = PyTorch's CPU generator (diffusers' default, same image on any
    /// device); cuda = AUTOMATIC1111's "NV" source, its NumPy port of PyTorch's CUDA Philox
    /// generator (rng_philox.py, reproduced bit for bit; within ~3e-7 of torch on CUDA).
    #[arg(long, value_enum, default_value_t = RngArg::Cpu)]
    pub rng: RngArg,

    /// One generator per image (a1111: image k of the batch gets seed SEED + k, recreatable
    /// alone) or one generator for the whole batch (diffusers).
    #[arg(long, value_enum, default_value_t = SeedModeArg::Diffusers)]
    pub seed_mode: SeedModeArg,

    /// AUTOMATIC1111's variation seed: the initial noise is slerped towards this seed's noise
    /// by --subseed-strength.
    #[arg(long, value_name = "N")]
    pub subseed: Option<u64>,

    /// How far towards --subseed's noise, in [0, 1].
    #[arg(
        long,
        default_value_t = 0.0,
        value_name = "W",
        requires = "subseed",
        allow_negative_numbers = true
    )]
    pub subseed_strength: f64,

    /// SDXL: finish with this refiner (a folder or hub id): the model runs the first
    /// --refiner-switch of the schedule, the refiner the rest from its latents.
    #[arg(long, value_name = "FOLDER|REPO")]
    pub refiner: Option<String>,

    /// Where the refiner takes over, as a fraction of the schedule in (0, 1)
    /// (diffusers' denoising_end / denoising_start).
    #[arg(
        long,
        default_value_t = 0.8,
        value_name = "FRACTION",
        requires = "refiner",
        allow_negative_numbers = true
    )]
    pub refiner_switch: f64,

    /// DeepFloyd IF: upscale the --model's (IF stage I's) output with this IF stage II model
    /// (a folder or hub id), as diffusers' cascade does: the same prompt embeddings, one
    /// generator for both stages.
    #[arg(long, value_name = "FOLDER|REPO")]
    pub upscale_model: Option<String>,

    /// DeepFloyd IF stage II: how much noise the upscaled low-resolution image gets (the
    /// image_noising_scheduler's timestep, 0 to 999; diffusers' default 250). With
    /// --upscale-model, or with an IF stage II as --model and --init-image.
    #[arg(long, value_name = "N")]
    pub noise_level: Option<usize>,

    /// DeepFloyd IF cascade: stage II's steps. Default: --steps.
    #[arg(long, value_name = "N", requires = "upscale_model")]
    pub upscale_steps: Option<usize>,

    /// DeepFloyd IF cascade: stage II's guidance scale. Default: --guidance.
    #[arg(long, value_name = "SCALE", requires = "upscale_model", allow_negative_numbers = true)]
    pub upscale_guidance: Option<f64>,

    /// Hires fix (AUTOMATIC1111's): render at the model's size, upscale by this factor, then
    /// image-to-image at the large size.
    #[arg(long, value_name = "FACTOR", allow_negative_numbers = true)]
    pub hires_scale: Option<f64>,

    /// Hires fix: steps of the second pass's schedule. Default: --steps.
    #[arg(long, value_name = "N", requires = "hires_scale")]
    pub hires_steps: Option<usize>,

    /// Hires fix: the second pass's image-to-image strength in (0, 1].
    #[arg(
        long,
        default_value_t = 0.7,
        value_name = "S",
        requires = "hires_scale",
        allow_negative_numbers = true
    )]
    pub hires_strength: f64,

    /// Hires fix upscaler: latent (bilinear on the latents) or lanczos (decode, Lanczos resize,
    /// encode).
    #[arg(long, value_enum, default_value_t = HiresUpscalerArg::Latent, requires = "hires_scale")]
    pub hires_upscaler: HiresUpscalerArg,

    /// Image-to-image: start from this picture (PNG, JPEG, WebP, BMP; its size is the output
    /// size, a multiple of the VAE's scale factor).
    #[arg(long, value_name = "FILE")]
    pub init_image: Option<PathBuf>,

    /// Image-to-image strength in [0, 1]: how much of the schedule to run. Default: 0.8; 1 when
    /// inpainting or outpainting (diffusers' default: the masked part starts from pure noise).
    #[arg(long, requires = "init_image", allow_negative_numbers = true)]
    pub strength: Option<f64>,

    /// Inpainting: repaint the white part of --init-image (black is kept; gray is binarized at
    /// 50%). Any size with the image's aspect ratio. Inpainting models (9-channel U-Nets) and
    /// regular ones (the known part is put back after every step) both work.
    #[arg(long, value_name = "FILE")]
    pub mask: Option<PathBuf>,

    /// Gaussian blur radius for the mask, in pixels (diffusers' `blur_factor`): a softer seam
    /// where the picture is pasted back (with --padding-mask-crop or --outpaint).
    #[arg(long, default_value_t = 0.0, value_name = "RADIUS", allow_negative_numbers = true)]
    pub mask_blur: f32,

    /// Inpaint only the masked region ("only masked"): the mask's bounding box grown by this
    /// many pixels and to the output's aspect ratio is cut out, generated at --width x
    /// --height (default: the model's size) and pasted back into the image, which keeps its size.
    #[arg(long, value_name = "PIXELS")]
    pub padding_mask_crop: Option<usize>,

    /// Outpainting: extend --init-image by LEFT,RIGHT,TOP,BOTTOM pixels, fill the new area by
    /// repeating the edge pixels, and repaint only it (the mask is made for you); the result
    /// keeps the original pixels exactly and has the new size (a multiple of the VAE's scale
    /// factor, 8).
    #[arg(long, value_name = "LEFT,RIGHT,TOP,BOTTOM")]
    pub outpaint: Option<String>,

    /// Prompts over 77 tokens: truncate (diffusers) or chunk (AUTOMATIC1111: 75-token chunks
    /// whose embeddings are concatenated).
    #[arg(long, value_enum, default_value_t = LongPromptArg::Truncate)]
    pub long_prompt: LongPromptArg,

    /// Prompt emphasis: a1111 parses AUTOMATIC1111's syntax — (word) ×1.1, ((word)) ×1.21,
    /// [word] ÷1.1, (word:1.3), \( for a literal parenthesis, BREAK for a new 75-token chunk;
    /// none takes prompts literally (diffusers). Prompts without the syntax encode the same
    /// either way.
    #[arg(long, value_enum, default_value_t = EmphasisArg::A1111)]
    pub emphasis: EmphasisArg,

    /// Textual-inversion embedding (.safetensors: AUTOMATIC1111's emb_params, diffusers' one
    /// tensor named by its token, or SDXL's clip_l + clip_g). Its token is the file stem (the
    /// tensor's name for diffusers files); use it in the prompt. Repeatable.
    #[arg(long, value_name = "FILE")]
    pub embedding: Vec<PathBuf>,

    /// LoRA to merge into the model at load: a kohya/A1111 or diffusers/PEFT .safetensors file,
    /// with an optional strength (default 1). Repeatable; several LoRAs add.
    #[arg(long, value_name = "FILE[:SCALE]")]
    pub lora: Vec<String>,

    /// Folder in which A1111 prompt tags <lora:NAME:SCALE> find NAME.safetensors (the tag is
    /// removed from the prompt before encoding, as A1111 does).
    #[arg(long, value_name = "DIR")]
    pub lora_dir: Option<PathBuf>,

    /// `--device`, `--dtype` (shared with ltd-serve).
    #[command(flatten)]
    pub device: DeviceArgs,

    /// Decode the VAE in overlapping tiles (bounded memory for large images).
    #[arg(long)]
    pub vae_tiling: bool,

    /// Also write the model's U-Net, quantized as --quantize says, to this GGUF file (load it
    /// back with --quantized-unet). Needs a diffusers model folder.
    #[arg(long, value_name = "FILE")]
    pub save_quantized_unet: Option<PathBuf>,

    /// Output PNG; with several images, numbered: out-1.png, out-2.png, …
    #[arg(short, long, default_value = "ltd.png", value_name = "FILE")]
    pub output: PathBuf,

    /// No progress bar or timings.
    #[arg(short, long)]
    pub quiet: bool,

    /// Print a JSON summary (files, seeds, timings) on stdout.
    #[arg(long)]
    pub json: bool,
}

/// `--rng`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
pub enum RngArg {
    /// PyTorch's CPU generator.
    Cpu,
    /// PyTorch's CUDA generator.
    Cuda,
}

/// `--seed-mode`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
pub enum SeedModeArg {
    /// One generator fills the batch.
    Diffusers,
    /// Image k gets seed + k and its own generator.
    A1111,
}

/// `--hires-upscaler`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
pub enum HiresUpscalerArg {
    /// Bilinear interpolation of the latents.
    Latent,
    /// Decode, Lanczos-3 resize, encode.
    Lanczos,
}

/// `--emphasis`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
pub enum EmphasisArg {
    /// AUTOMATIC1111's emphasis syntax.
    A1111,
    /// Literal prompts.
    None,
}

/// `--long-prompt`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
pub enum LongPromptArg {
    /// Cut at 77 tokens.
    Truncate,
    /// 75-token chunks.
    Chunk,
}

/// Parses `A[,B]` into two numbers with defaults.
fn pair(flag: &str, s: &str, default_b: f64) -> Result<(f64, f64)> {
    let bad =
        || anyhow!("--{flag}: expected a number or two numbers separated by a comma, got {s:?}");
    let mut parts = s.split(',').map(str::trim);
    let a = parts
        .next()
        .filter(|p| !p.is_empty())
        .ok_or_else(bad)?
        .parse::<f64>()
        .map_err(|_| bad())?;
    let b = match parts.next() {
        Some(p) => p.parse::<f64>().map_err(|_| bad())?,
        None => default_b,
    };
    if parts.next().is_some() {
        return Err(bad());
    }
    Ok((a, b))
}

/// Reads an init image into RGB bytes; any failure names the file.
pub fn read_init_image(path: &std::path::Path) -> Result<RgbImage> {
    read_image("init-image", path)
}

/// Reads the image a flag names into RGB bytes; any failure names the flag and the file.
fn read_image(flag: &str, path: &std::path::Path) -> Result<RgbImage> {
    let bytes =
        std::fs::read(path).with_context(|| format!("--{flag} {}: cannot open", path.display()))?;
    decode_image(&bytes, &format!("--{flag} {}", path.display()))
}

impl Args {
    /// The LoRAs to merge: every `--lora`, then each `<lora:NAME:SCALE>` tag of the prompts
    /// whose name no `--lora` file has, found as `--lora-dir/NAME.safetensors`.
    pub fn loras(&self) -> Result<Vec<LoraSpec>> {
        let mut specs = Vec::new();
        for arg in &self.lora {
            let spec = LoraSpec::parse(arg)?;
            if !spec.path.is_file() {
                return Err(anyhow!("--lora {}: no such file", spec.path.display()));
            }
            specs.push(spec);
        }
        for text in self.prompts.iter().chain(&self.negative) {
            for (name, scale) in extract_lora_tags(text)?.1 {
                if specs.iter().any(|s| s.name() == name) {
                    continue;
                }
                let Some(dir) = &self.lora_dir else {
                    return Err(anyhow!(
                        "--lora-dir: the prompt's <lora:{name}> tag needs a folder to find \
                         {name}.safetensors in"
                    ));
                };
                let path = dir.join(format!("{name}.safetensors"));
                if !path.is_file() {
                    return Err(anyhow!(
                        "--lora-dir {}: no {name}.safetensors for the prompt's <lora:{name}> tag",
                        dir.display()
                    ));
                }
                specs.push(LoraSpec { path, scale });
            }
        }
        Ok(specs)
    }

    /// The request these arguments describe (not yet checked against a model).
    pub fn request(&self, seed: u64) -> Result<GenerateRequest> {
        let dynamic_threshold = self
            .dynamic_threshold
            .as_deref()
            .map(|s| {
                pair("dynamic-threshold", s, 1.0)
                    .map(|(ratio, max)| DynamicThreshold { ratio, max })
            })
            .transpose()?;
        let mimic_guidance = self
            .mimic_guidance
            .as_deref()
            .map(|s| {
                pair("mimic-guidance", s, 0.995)
                    .map(|(mimic, percentile)| MimicGuidance { mimic, percentile })
            })
            .transpose()?;
        let (init_image, inpaint) = self.init_and_mask()?;
        let req = GenerateRequest {
            prompts: self.prompts.clone(),
            negative: self.negative.clone(),
            steps: self.steps,
            guidance: self.guidance,
            guidance_rescale: self.guidance_rescale,
            dynamic_threshold,
            mimic_guidance,
            scheduler: self.scheduler.as_deref().map(parse_sampler).transpose()?,
            eta: self.eta,
            width: self.width,
            height: self.height,
            num_images: self.num_images,
            seed,
            rng: match self.rng {
                RngArg::Cpu => RngKind::Cpu,
                RngArg::Cuda => RngKind::Cuda,
            },
            seed_mode: match self.seed_mode {
                SeedModeArg::Diffusers => SeedMode::Diffusers,
                SeedModeArg::A1111 => SeedMode::A1111,
            },
            subseed: self.subseed.map(|seed| Subseed { seed, strength: self.subseed_strength }),
            clip_skip: self.clip_skip,
            long_prompt: match self.long_prompt {
                LongPromptArg::Truncate => LongPrompt::Truncate,
                LongPromptArg::Chunk => LongPrompt::Chunk,
            },
            emphasis: match self.emphasis {
                EmphasisArg::A1111 => Emphasis::A1111,
                EmphasisArg::None => Emphasis::None,
            },
            init_image,
            vae_tiling: self.vae_tiling,
            inpaint,
        };
        req.validate()?;
        if self.refiner.is_some() {
            ltd_pipeline::refiner::check_switch(self.refiner_switch)?;
            if self.hires_scale.is_some() {
                return Err(anyhow!("--hires-scale: hires fix and --refiner cannot be combined"));
            }
        }
        if let Some(h) = self.hires() {
            h.validate(req.steps)?;
        }
        if self.upscale_model.is_some() {
            if self.refiner.is_some() || self.hires_scale.is_some() {
                return Err(anyhow!(
                    "--upscale-model: DeepFloyd IF's cascade cannot be combined with --refiner or \
                     --hires-scale"
                ));
            }
            GenerateRequest { steps: self.upscale_steps.unwrap_or(req.steps), ..req.clone() }
                .validate()?;
        }
        Ok(req)
    }

    /// DeepFloyd IF stage II's settings for the cascade (`--upscale-model`).
    pub fn if_upscale(&self) -> IfUpscale {
        IfUpscale {
            noise_level: self.noise_level.unwrap_or(DEFAULT_NOISE_LEVEL),
            steps: self.upscale_steps,
            guidance: self.upscale_guidance,
        }
    }

    /// The hires-fix settings, when `--hires-scale` asks for it.
    pub fn hires(&self) -> Option<HiresFix> {
        self.hires_scale.map(|scale| HiresFix {
            scale,
            steps: self.hires_steps,
            strength: self.hires_strength,
            upscaler: match self.hires_upscaler {
                HiresUpscalerArg::Latent => HiresUpscaler::Latent,
                HiresUpscalerArg::Lanczos => HiresUpscaler::Lanczos,
            },
        })
    }
}

/// Parses `--outpaint LEFT,RIGHT,TOP,BOTTOM`.
fn outpaint_margins(s: &str) -> Result<[usize; 4]> {
    let bad = || {
        anyhow!("--outpaint: expected four pixel counts LEFT,RIGHT,TOP,BOTTOM (e.g. 64,64,0,0), got {s:?}")
    };
    let v: Vec<usize> = s
        .split(',')
        .map(|p| p.trim().parse::<usize>())
        .collect::<Result<_, _>>()
        .map_err(|_| bad())?;
    let m: [usize; 4] = v.try_into().map_err(|_| bad())?;
    if m.iter().all(|&p| p == 0) {
        return Err(anyhow!("--outpaint: all four margins are 0: nothing to extend"));
    }
    Ok(m)
}

impl Args {
    /// The init image and the inpainting mask: read from files, or for --outpaint the
    /// extended canvas and its mask.
    fn init_and_mask(&self) -> Result<(Option<InitImage>, Option<Inpaint>)> {
        let painting = self.mask.is_some() || self.outpaint.is_some();
        let strength = self.strength.unwrap_or(if painting { 1.0 } else { 0.8 });
        if self.outpaint.is_some() && self.mask.is_some() {
            bail!("--outpaint: makes its own mask; drop --mask");
        }
        if !painting {
            if self.padding_mask_crop.is_some() {
                bail!("--padding-mask-crop: needs --mask (or --outpaint)");
            }
            if self.mask_blur != 0.0 {
                bail!("--mask-blur: needs --mask (or --outpaint)");
            }
        }
        if let (Some(_), None) = (&self.outpaint, &self.init_image) {
            bail!("--outpaint: needs --init-image, the picture to extend");
        }
        let Some(path) = &self.init_image else {
            // The request's check names --mask: it needs an init image.
            let inpaint = match &self.mask {
                Some(m) => Some(self.inpaint(read_image("mask", m)?, false)),
                None => None,
            };
            return Ok((None, inpaint));
        };
        let image = read_init_image(path)?;
        let (image, inpaint) = match (&self.outpaint, &self.mask) {
            (Some(margins), _) => {
                let (canvas, mask) =
                    outpaint_canvas(&image, outpaint_margins(margins)?, OutpaintFill::Edge);
                (canvas, Some(self.inpaint(mask, true)))
            }
            (None, Some(m)) => (image, Some(self.inpaint(read_image("mask", m)?, false))),
            (None, None) => (image, None),
        };
        Ok((Some(InitImage { image, strength }), inpaint))
    }

    fn inpaint(&self, mask: RgbImage, keep_unmasked: bool) -> Inpaint {
        Inpaint {
            mask,
            mask_blur: self.mask_blur,
            padding_mask_crop: self.padding_mask_crop,
            keep_unmasked,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_pairs() {
        assert_eq!(pair("x", "0.9", 1.0).unwrap(), (0.9, 1.0));
        assert_eq!(pair("x", "0.9, 2.5", 1.0).unwrap(), (0.9, 2.5));
        for bad in ["", "a", "1,b", "1,2,3"] {
            assert!(
                pair("x", bad, 1.0).unwrap_err().to_string().starts_with("--x: expected"),
                "{bad}"
            );
        }
    }

    #[test]
    fn parses_outpaint_margins() {
        assert_eq!(outpaint_margins("64, 0,8,16").unwrap(), [64, 0, 8, 16]);
        for bad in ["", "1,2,3", "1,2,3,4,5", "a,1,1,1", "-8,0,0,0", "0,0,0,0"] {
            let e = outpaint_margins(bad).unwrap_err().to_string();
            assert!(e.starts_with("--outpaint: "), "{bad}: {e}");
        }
    }

    #[test]
    fn help_is_well_formed_and_documents_every_flag() {
        use clap::CommandFactory;
        let cmd = Args::command();
        cmd.clone().debug_assert();
        for arg in cmd.get_arguments() {
            let help = arg.get_help().map(|h| h.to_string()).unwrap_or_default();
            assert!(help.len() > 10, "--{} has no real help text", arg.get_id());
        }
    }
}
