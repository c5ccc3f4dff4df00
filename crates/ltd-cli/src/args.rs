//! Command-line arguments, and their translation into a checked generation request.
//!
//! Values are parsed here into the request's types (numbers, paths, the sampler by
//! `ltd_pipeline::parse_sampler`) and checked in one place, `GenerateRequest::validate`, whose
//! errors name the flag; so every bad value gets one line.

use std::path::PathBuf;

use anyhow::{anyhow, Context, Result};
use clap::{Parser, ValueEnum};
use ltd_pipeline::{
    parse_sampler, DynamicThreshold, GenerateRequest, InitImage, LongPrompt, MimicGuidance,
    RgbImage, RngKind,
};

/// Generate images from text with Stable Diffusion 1.x, 2.x and XL models in diffusers format.
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
#[derive(Debug, Parser)]
#[command(name = "ltd-gen", version, verbatim_doc_comment, max_term_width = 100)]
pub struct Args {
    /// The prompt. Several prompts each give --num-images images.
    #[arg(required = true, value_name = "PROMPT")]
    pub prompts: Vec<String>,

    /// Model: a local diffusers folder, a single-file checkpoint (.safetensors in the original
    /// layout of A1111/ComfyUI/civitai: SD 1.x, 2.x or XL, recognised from its keys), or a
    /// Hugging Face hub repo id (owner/name[@revision]), fetched into the hub cache (honours
    /// HF_HOME, HF_HUB_OFFLINE, HF_TOKEN, HF_ENDPOINT). Default: the embedded default model.
    #[arg(short, long, value_name = "FOLDER|FILE|REPO")]
    pub model: Option<String>,

    /// For a single-file --model: a diffusers folder whose configs and tokenizers to use
    /// (diffusers' from_single_file(config=...)), for fine-tunes of unusual shape. Default: the
    /// official configs of the checkpoint's family.
    #[arg(long, value_name = "FOLDER")]
    pub config: Option<PathBuf>,

    /// Replace the model's VAE: a diffusers vae/ folder, or a single .safetensors VAE (original
    /// or diffusers layout) of the model's VAE architecture.
    #[arg(long, value_name = "FOLDER|FILE")]
    pub vae: Option<PathBuf>,

    /// Override the scheduler's prediction type: epsilon, v_prediction or sample (e.g. for a
    /// 512-pixel SD 2.x epsilon checkpoint, which is indistinguishable from 2.1 768-v by keys).
    #[arg(long, value_name = "TYPE")]
    pub prediction_type: Option<String>,

    /// Weights variant to load, e.g. fp16 (reads *.fp16.safetensors where present).
    #[arg(long, value_name = "NAME")]
    pub variant: Option<String>,

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

    /// Images per prompt, generated as one batch from one seed (diffusers' rule).
    #[arg(long, default_value_t = 1, value_name = "N")]
    pub num_images: usize,

    /// Seed of the random generator; random when absent (and always recorded in the PNG).
    #[arg(long, value_name = "N")]
    pub seed: Option<u64>,

    /// Random generator: cpu = PyTorch's CPU generator (diffusers' default, same image on any
    /// device); cuda = PyTorch's CUDA Philox generator (AUTOMATIC1111's "NV").
    #[arg(long, value_enum, default_value_t = RngArg::Cpu)]
    pub rng: RngArg,

    /// Image-to-image: start from this picture (PNG, JPEG, WebP, BMP; its size is the output
    /// size, a multiple of the VAE's scale factor).
    #[arg(long, value_name = "FILE")]
    pub init_image: Option<PathBuf>,

    /// Image-to-image strength in [0, 1]: how much of the schedule to run.
    #[arg(long, default_value_t = 0.8, requires = "init_image", allow_negative_numbers = true)]
    pub strength: f64,

    /// Prompts over 77 tokens: truncate (diffusers) or chunk (AUTOMATIC1111: 75-token chunks
    /// whose embeddings are concatenated).
    #[arg(long, value_enum, default_value_t = LongPromptArg::Truncate)]
    pub long_prompt: LongPromptArg,

    /// Device: auto, cpu, cuda, cuda:N, metal.
    #[arg(long, default_value = "auto")]
    pub device: String,

    /// Compute dtype: f32, f16, bf16. Default: f16 on a GPU, f32 on the CPU.
    #[arg(long)]
    pub dtype: Option<String>,

    /// Decode the VAE in overlapping tiles (bounded memory for large images).
    #[arg(long)]
    pub vae_tiling: bool,

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
    let img = image::ImageReader::open(path)
        .with_context(|| format!("--init-image {}: cannot open", path.display()))?
        .with_guessed_format()
        .with_context(|| format!("--init-image {}: cannot read", path.display()))?
        .decode()
        .map_err(|e| anyhow!("--init-image {}: not a readable image ({e})", path.display()))?
        .to_rgb8();
    let (w, h) = img.dimensions();
    Ok(RgbImage::new(w as usize, h as usize, img.into_raw())?)
}

impl Args {
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
        let init_image = match &self.init_image {
            Some(path) => {
                Some(InitImage { image: read_init_image(path)?, strength: self.strength })
            }
            None => None,
        };
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
            clip_skip: self.clip_skip,
            long_prompt: match self.long_prompt {
                LongPromptArg::Truncate => LongPrompt::Truncate,
                LongPromptArg::Chunk => LongPrompt::Chunk,
            },
            init_image,
            vae_tiling: self.vae_tiling,
        };
        req.validate()?;
        Ok(req)
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
