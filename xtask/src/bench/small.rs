//! The `small` bench item: one step of a tiny SD 1.x U-Net (`xtask/bench/small-sd`: block
//! widths 32/64, 8 heads of dimension 4 in the 32-channel transformer, cross-attention width
//! 32) on 32×32 latents, batch 2 as for classifier-free guidance, text states `[2, 77, 32]`;
//! random weights. The SD 1.5 items hide what dominates at this size: attention over 1,024
//! tokens with 4-wide heads (where the work is the softmax's exponentials, not products) and
//! the fixed cost of every small operation.

use std::path::Path;

use anyhow::Result;
use candle_core::{DType, Device, Tensor};
use candle_nn::VarBuilder;
use ltd_nn::RuntimeOptions;
use ltd_unet::{UNet2DConditionModel, UNet2DConditionModelConfig, UNetConditioning, UNetConfig};

use super::measure::{measurement, random_weights, reset_peak, rss_mib, timed};
use super::{Args, Measurement};

/// The U-Net's config, relative to the repository root.
pub const CONFIG: &str = "xtask/bench/small-sd/unet/config.json";
/// Side of the latents (a 64×64 image with a VAE of scale factor 2).
const LATENT: usize = 32;
/// Operations of one step, counted as [`super::UNET_GFLOP`] is (torch's `FlopCounterMode` on
/// diffusers' model with these inputs).
pub const GFLOP: f64 = 3.35;

/// One timed U-Net step per run.
pub fn unet_step(args: &Args, root: &Path) -> Result<Measurement> {
    let cfg: UNetConfig =
        ltd_nn::load_config::<UNet2DConditionModelConfig, UNetConfig>(&root.join(CONFIG))?;
    let opts = RuntimeOptions::default();
    let weights = random_weights(|vb| UNet2DConditionModel::new(vb, &cfg, &opts))?;
    let dev = Device::Cpu;
    let unet = UNet2DConditionModel::new(
        VarBuilder::from_tensors(weights, DType::F32, &dev),
        &cfg,
        &opts,
    )?;
    let x = Tensor::randn(0f32, 1.0, (2, cfg.in_channels, LATENT, LATENT), &dev)?;
    let context = Tensor::randn(0f32, 1.0, (2, 77, cfg.encoder_hidden_dim()), &dev)?;
    let t = Tensor::new(&[981f32], &dev)?;
    let cond = UNetConditioning::default();
    let base = rss_mib("VmRSS:");
    reset_peak();
    let (wall, cpu) =
        timed(args, || unet.forward(&x, &t, &context, &cond).map(drop).map_err(Into::into))?;
    Ok(measurement("small", wall, cpu, base))
}
