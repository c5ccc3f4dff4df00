//! `cargo xtask train-unet`: trains a text-conditioned U-Net on latents of a frozen VAE, with
//! a frozen or from-scratch CLIP or T5 text encoder (the family its config.json names), and
//! writes a complete `StableDiffusionPipeline` folder (see `ltd_train::train_unet`).

use std::path::{Path, PathBuf};

use anyhow::{bail, Result};
use ltd_train::text_encoder::TextEncoderKind;
use ltd_train::timestep_bias::{BiasStrategy, TimestepBias};
use ltd_train::train_unet::{read_config, TextEncoderSource, UnetTrainOptions, UnetTrainer};

use crate::train_args::OptimArgs;
use crate::train_report::drive;

/// Arguments of `cargo xtask train-unet`.
#[derive(Debug, clap::Args)]
pub struct Args {
    /// The imagefolder: images plus metadata.jsonl (`file_name`, `text`).
    #[arg(long)]
    pub data: PathBuf,
    /// The trained VAE folder (diffusers layout, e.g. the --out of train-vae); kept frozen.
    #[arg(long)]
    pub vae: PathBuf,
    /// A diffusers UNet2DConditionModel config.json to train from scratch.
    #[arg(long)]
    pub config: PathBuf,
    /// Output folder: the pipeline (model_index.json, unet/, vae/, text_encoder/, tokenizer/,
    /// scheduler/) and train/.
    #[arg(long)]
    pub out: PathBuf,
    /// A trained CLIPTextModel or T5EncoderModel folder to use frozen.
    #[arg(long, conflicts_with = "text_encoder_config")]
    pub text_encoder: Option<PathBuf>,
    /// A transformers config.json of a CLIP text model (model_type "clip_text_model", or no
    /// model_type) or of a T5 encoder (model_type "t5"): train a text encoder from scratch.
    #[arg(long)]
    pub text_encoder_config: Option<PathBuf>,
    /// The tokenizer folder of the text encoder's family: CLIP BPE (default: the real CLIP
    /// vocabulary in tests/fixtures/pipelines/sd1/tokenizer) or T5 unigram (tokenizer.json or
    /// spiece.model, with model_max_length in tokenizer_config.json; required for T5).
    #[arg(long)]
    pub tokenizer: Option<PathBuf>,
    /// The scheduler_config.json the pipeline ships (its betas define the noise schedule;
    /// default: Stable Diffusion 1.5's).
    #[arg(long)]
    pub scheduler_config: Option<PathBuf>,
    /// Training image side (default: the VAE's sample_size).
    #[arg(long)]
    pub resolution: Option<usize>,
    /// Probability of an empty caption (for classifier-free guidance).
    #[arg(long, default_value_t = 0.1)]
    pub caption_dropout: f64,
    /// epsilon or v_prediction (default: the scheduler config's).
    #[arg(long)]
    pub prediction_type: Option<String>,
    /// min-SNR-γ loss weighting (e.g. 5).
    #[arg(long)]
    pub snr_gamma: Option<f64>,
    /// Maximum EMA decay of the weights.
    #[arg(long, default_value_t = 0.999)]
    pub ema_decay: f64,
    /// Train without an EMA of the weights.
    #[arg(long)]
    pub no_ema: bool,
    /// Mirror training images left-right at random (not when captions name sides).
    #[arg(long)]
    pub random_flip: bool,
    /// Peak learning rate of a from-scratch text encoder (default: --learning-rate). Lower it
    /// when the U-Net's rate is high: a tiny CLIP trained at 1e-3 collapses and the model
    /// ignores words. 0 keeps it at its seeded random initialisation, which keeps every word
    /// apart (the default model does this; see configs/train/shapes/reproduce.sh).
    #[arg(long = "text-encoder-lr")]
    pub text_encoder_lr: Option<f64>,
    /// Sample training timesteps with a bias (diffusers' --timestep_bias_strategy): none,
    /// earlier, later (the noisiest, where layout is decided) or range.
    #[arg(long, default_value = "none")]
    pub timestep_bias_strategy: BiasStrategy,
    /// Weight of the biased timesteps relative to the others.
    #[arg(long, default_value_t = 1.0)]
    pub timestep_bias_multiplier: f64,
    /// Fraction of the timesteps that `earlier` and `later` bias.
    #[arg(long, default_value_t = 0.25)]
    pub timestep_bias_portion: f64,
    /// First biased timestep of `range`.
    #[arg(long, default_value_t = 0)]
    pub timestep_bias_begin: usize,
    /// One past the last biased timestep of `range`.
    #[arg(long, default_value_t = 1000)]
    pub timestep_bias_end: usize,
    /// Save a from-scratch text encoder in float16.
    #[arg(long)]
    pub text_encoder_fp16: bool,
    /// Save the U-Net in float16.
    #[arg(long)]
    pub unet_fp16: bool,
    /// Denoising steps of the preview images written with each checkpoint (0: none).
    #[arg(long, default_value_t = 20)]
    pub preview_steps: usize,
    #[command(flatten)]
    pub optim: OptimArgs,
}

/// Runs the task.
pub fn run(args: &Args, root: &Path) -> Result<()> {
    let unet_config = read_config(&args.config)?;
    let text_encoder = match (&args.text_encoder, &args.text_encoder_config) {
        (Some(dir), None) => TextEncoderSource::Frozen(dir.clone()),
        (None, Some(cfg)) => {
            let config = read_config(cfg)?;
            if let Err(m) = TextEncoderKind::of_config(&config) {
                bail!("--text-encoder-config {}: {m}", cfg.display());
            }
            TextEncoderSource::Scratch(config)
        }
        _ => bail!("pass --text-encoder DIR (frozen) or --text-encoder-config FILE (from scratch)"),
    };
    let tokenizer = match (&args.tokenizer, text_encoder.kind()?) {
        (Some(dir), _) => dir.clone(),
        (None, TextEncoderKind::Clip) => root.join("tests/fixtures/pipelines/sd1/tokenizer"),
        (None, TextEncoderKind::T5) => {
            bail!("--tokenizer: a T5 text encoder needs its T5 tokenizer folder (no default)")
        }
    };
    let scheduler_path = args.scheduler_config.clone().unwrap_or_else(|| {
        root.join("configs/stable-diffusion-v1-5/scheduler/scheduler_config.json")
    });
    let scheduler_config = read_config(&scheduler_path)?;
    let options = UnetTrainOptions {
        optim: args.optim.options(UnetTrainOptions::default().optim.learning_rate),
        resolution: args.resolution,
        caption_dropout: args.caption_dropout,
        prediction_type: args.prediction_type.clone(),
        snr_gamma: args.snr_gamma,
        ema_decay: (!args.no_ema).then_some(args.ema_decay),
        random_flip: args.random_flip,
        text_encoder_learning_rate: args.text_encoder_lr,
        timestep_bias: TimestepBias {
            strategy: args.timestep_bias_strategy,
            multiplier: args.timestep_bias_multiplier,
            portion: args.timestep_bias_portion,
            begin: args.timestep_bias_begin,
            end: args.timestep_bias_end,
        },
        text_encoder_fp16: args.text_encoder_fp16,
        unet_fp16: args.unet_fp16,
        preview_steps: args.preview_steps,
    };
    let trainer = UnetTrainer {
        data: &args.data,
        vae: &args.vae,
        unet_config: &unet_config,
        text_encoder,
        tokenizer: &tokenizer,
        scheduler_config: &scheduler_config,
        out: &args.out,
        options,
        device: args.optim.device.open()?,
    };
    let control = args.optim.control();
    if drive("the U-Net", &args.out, |sink| trainer.run(&control, sink))?.is_some() {
        println!("wrote the pipeline to {}", args.out.display());
    }
    Ok(())
}
