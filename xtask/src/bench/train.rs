//! The `train-unet` and `train-vae` bench items: one training step of the shipped shapes
//! recipes (`configs/train/shapes/`), ltd against PyTorch (`xtask/bench/reference.py`
//! builds the same model from the same config with diffusers' classes).
//!
//! A step is what the trainers do per batch, minus the data pipeline: forward, the loss and
//! backward (the batch split into one shard per thread, as the trainers' driver splits it),
//! clipping by the global gradient norm (1.0) and an AdamW step (lr 1e-3, weight decay 1e-2),
//! on random data of the recipe's shapes:
//!
//! - `train-unet`: the 4.2 M-parameter U-Net, batch 16, 8×8 latents with 4 channels, the
//!   text states given (`[16, 77, 64]`: the recipe's text encoder is frozen, so its states
//!   are cached), ε-prediction MSE;
//! - `train-vae`: the VAE, batch 16, 32×32 images, encode, sample, decode, L1 + MSE with
//!   the recipe's 8× object weight (the centre quarter of each image) + 1e-6 · KL.
//!
//! Not measured on either side: the EMA of the weights and the data pipeline.

use std::path::Path;

use anyhow::Result;
use candle_core::{DType, Device, Tensor};
use candle_nn::{VarBuilder, VarMap};
use ltd_nn::RuntimeOptions;
use ltd_train::driver::Loss;
use ltd_train::init::{init_varmap, named_vars};
use ltd_train::optim::{clip_factor, AdamW, AdamWConfig};
use ltd_train::shards::{loss_and_grads, Shard};
use ltd_unet::{UNet2DConditionModel, UNet2DConditionModelConfig, UNetConditioning, UNetConfig};
use ltd_vae::{AutoencoderKL, AutoencoderKLConfig, VaeConfig};

use super::measure::{measurement, reset_peak, rss_mib, timed};
use super::{Args, Measurement};

/// The U-Net config of the shapes recipe, relative to the repository root.
pub const UNET_CONFIG: &str = "configs/train/shapes/unet.json";
/// The VAE config of the shapes recipe.
pub const VAE_CONFIG: &str = "configs/train/shapes/vae.json";
/// The recipes' batch size.
const BATCH: usize = 16;
/// Side of the recipe's latents (32×32 images, VAE scale factor 4).
const LATENT: usize = 8;
/// Side of the recipe's images.
const IMAGE: usize = 32;
/// Tokens of a caption (CLIP's `max_position_embeddings`).
const TOKENS: usize = 77;
/// The recipes' peak learning rate.
const LR: f64 = 1e-3;
/// The default `--max-grad-norm`.
const MAX_GRAD_NORM: f64 = 1.0;

fn read_json(root: &Path, rel: &str) -> Result<serde_json::Value> {
    let path = root.join(rel);
    let text = std::fs::read_to_string(&path)?;
    Ok(serde_json::from_str(&text)?)
}

/// The loss and backward of a batch of [`BATCH`], shard by shard as the trainers' driver
/// runs them (one shard per thread, `ltd_train::shards`), then clipping and the AdamW step.
fn step(opt: &mut AdamW, loss: impl Fn(&Shard) -> Result<Tensor> + Sync) -> Result<()> {
    let vars = opt.vars().map(|(_, v)| v);
    let stepped = loss_and_grads(BATCH, vars, |s| {
        let total = loss(s).map_err(|e| ltd_train::TrainError::msg(format!("{e:#}")))?;
        Ok(Loss { total, terms: Vec::new() })
    })?;
    let (_, factor) = clip_factor(&stepped.grads, opt.vars().map(|(_, v)| v), MAX_GRAD_NORM)?;
    opt.step(&stepped.grads, LR, factor)?;
    Ok(())
}

/// One `train-unet` step, median over the timed ones.
pub fn unet(args: &Args, root: &Path) -> Result<Measurement> {
    let raw: UNet2DConditionModelConfig = serde_json::from_value(read_json(root, UNET_CONFIG)?)?;
    let cfg = UNetConfig::try_from(raw)?;
    let dev = Device::Cpu;
    let varmap = VarMap::new();
    let vb = VarBuilder::from_varmap(&varmap, DType::F32, &dev);
    let unet = UNet2DConditionModel::new(vb.pp("unet"), &cfg, &RuntimeOptions::default())?;
    init_varmap(&varmap, 0)?;
    let mut opt = AdamW::new(named_vars(&varmap)?, AdamWConfig::default())?;
    let c = cfg.in_channels;
    let noisy = Tensor::randn(0f32, 1.0, (BATCH, c, LATENT, LATENT), &dev)?;
    let target = Tensor::randn(0f32, 1.0, (BATCH, c, LATENT, LATENT), &dev)?;
    let context = Tensor::randn(0f32, 1.0, (BATCH, TOKENS, cfg.encoder_hidden_dim()), &dev)?;
    let t = Tensor::from_vec((0..BATCH).map(|i| (i * 61 % 1000) as f32).collect(), BATCH, &dev)?;
    let cond = UNetConditioning::default();
    let base = rss_mib("VmRSS:");
    reset_peak();
    let (wall, cpu) = timed(args, || {
        step(&mut opt, |s| {
            let (noisy, t, context) = (s.rows(&noisy)?, s.rows(&t)?, s.rows(&context)?);
            let pred = unet.forward(&noisy, &t, &context, &cond)?;
            Ok(s.weighted((pred - s.rows(&target)?)?.sqr()?.mean((1, 2, 3))?.mean_all()?)?)
        })
    })?;
    Ok(measurement("train-unet", wall, cpu, base))
}

/// One `train-vae` step, median over the timed ones.
pub fn vae(args: &Args, root: &Path) -> Result<Measurement> {
    let raw: AutoencoderKLConfig = serde_json::from_value(read_json(root, VAE_CONFIG)?)?;
    let cfg = VaeConfig::try_from(raw)?;
    let dev = Device::Cpu;
    let varmap = VarMap::new();
    let vb = VarBuilder::from_varmap(&varmap, DType::F32, &dev);
    let vae = AutoencoderKL::new(vb, &cfg, &RuntimeOptions::default())?;
    init_varmap(&varmap, 0)?;
    let mut opt = AdamW::new(named_vars(&varmap)?, AdamWConfig::default())?;
    let x = Tensor::rand(-1f32, 1.0, (BATCH, 3, IMAGE, IMAGE), &dev)?;
    let weights = object_mask(&dev)?;
    let (ch, side) = (cfg.latent_channels, IMAGE / cfg.scale_factor());
    let noise = Tensor::randn(0f32, 1.0, (BATCH, ch, side, side), &dev)?;
    let elems = (3 * IMAGE * IMAGE) as f64;
    let base = rss_mib("VmRSS:");
    reset_peak();
    let (wall, cpu) = timed(args, || {
        step(&mut opt, |s| {
            let (x, weights) = (s.rows(&x)?, s.rows(&weights)?);
            let post = vae.encode(&x)?;
            let z = post.sample_with(&s.rows(&noise)?)?;
            let diff = (vae.decode(&z)? - &x)?;
            let l1 = s.weighted(diff.abs()?.broadcast_mul(&weights)?.mean_all()?)?;
            let mse = s.weighted(diff.sqr()?.broadcast_mul(&weights)?.mean_all()?)?;
            let kl = s.weighted(post.kl()?.mean_all()?)?;
            Ok(((l1 + mse)? + kl.affine(1e-6 / elems, 0.0)?)?)
        })
    })?;
    Ok(measurement("train-vae", wall, cpu, base))
}

/// `[B, 1, H, W]` loss weights: 8 in the centre quarter of each image, 1 elsewhere.
fn object_mask(dev: &Device) -> Result<Tensor> {
    let (lo, hi) = (IMAGE / 4, 3 * IMAGE / 4);
    let one: Vec<f32> = (0..IMAGE * IMAGE)
        .map(|i| {
            let (y, x) = (i / IMAGE, i % IMAGE);
            if (lo..hi).contains(&y) && (lo..hi).contains(&x) {
                8.0
            } else {
                1.0
            }
        })
        .collect();
    let all: Vec<f32> = (0..BATCH).flat_map(|_| one.iter().copied()).collect();
    Ok(Tensor::from_vec(all, (BATCH, 1, IMAGE, IMAGE), dev)?)
}
