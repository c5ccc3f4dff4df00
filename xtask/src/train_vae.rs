//! `cargo xtask train-vae`: trains an `AutoencoderKL` from a diffusers config on an imagefolder
//! and writes it in diffusers layout (see `ltd_train::train_vae`).

use std::path::PathBuf;

use anyhow::Result;
use ltd_train::train_vae::{read_vae_config, VaeTrainOptions, VaeTrainer};

use crate::train_args::OptimArgs;
use crate::train_report::drive;

/// Arguments of `cargo xtask train-vae`.
#[derive(Debug, clap::Args)]
pub struct Args {
    /// The imagefolder: images plus metadata.jsonl (`file_name`, `text`).
    #[arg(long)]
    pub data: PathBuf,
    /// A diffusers AutoencoderKL config.json to train from scratch.
    #[arg(long)]
    pub config: PathBuf,
    /// Output folder: the model (config.json, diffusion_pytorch_model.safetensors) and train/.
    #[arg(long)]
    pub out: PathBuf,
    /// Training image side (default: the config's sample_size).
    #[arg(long)]
    pub resolution: Option<usize>,
    /// Train on random square crops of this side (cheaper steps).
    #[arg(long)]
    pub crop: Option<usize>,
    /// Weight of the L1 reconstruction loss.
    #[arg(long, default_value_t = 1.0)]
    pub l1_weight: f64,
    /// Weight of the squared-error reconstruction loss.
    #[arg(long, default_value_t = 0.0)]
    pub mse_weight: f64,
    /// Weight of the KL term (LDM's kl_weight).
    #[arg(long, default_value_t = 1e-6)]
    pub kl_weight: f64,
    /// Weight of object pixels (those unlike the image's border colour) in the reconstruction
    /// loss; above 1 keeps small objects' colours on plain-background data.
    #[arg(long, default_value_t = 1.0)]
    pub object_weight: f64,
    /// Pixels within this many pixels of an object pixel weigh --object-weight too (the
    /// background where a blurred outline spills)
    #[arg(long, default_value_t = 0)]
    pub object_margin: usize,
    /// Mirror training images left-right at random.
    #[arg(long)]
    pub random_flip: bool,
    /// Images held out for the final PSNR.
    #[arg(long, default_value_t = 64)]
    pub eval_images: usize,
    #[command(flatten)]
    pub optim: OptimArgs,
}

/// Runs the task.
pub fn run(args: &Args) -> Result<()> {
    let config = read_vae_config(&args.config)?;
    let options = VaeTrainOptions {
        optim: args.optim.options(VaeTrainOptions::default().optim.learning_rate),
        resolution: args.resolution,
        crop: args.crop,
        l1_weight: args.l1_weight,
        mse_weight: args.mse_weight,
        kl_weight: args.kl_weight,
        object_weight: args.object_weight,
        object_margin: args.object_margin,
        random_flip: args.random_flip,
        eval_images: args.eval_images,
    };
    let trainer = VaeTrainer {
        data: &args.data,
        config: &config,
        out: &args.out,
        options,
        device: args.optim.device.open()?,
    };
    let control = args.optim.control();
    let Some(outcome) = drive("the VAE", &args.out, |sink| trainer.run(&control, sink))? else {
        return Ok(());
    };
    if let Some(p) = outcome.psnr {
        let what = if outcome.psnr_held_out {
            "held-out"
        } else {
            "training (dataset too small to hold any out)"
        };
        println!("reconstruction PSNR on {} {what} images: {p:.2} dB", outcome.psnr_images);
    }
    if let Some(s) = outcome.scaling_factor {
        println!("scaling_factor: {s:.5}");
    }
    println!("wrote {}", args.out.display());
    Ok(())
}
