//! The `small` bench item: one step of a tiny SD 1.x U-Net (`xtask/bench/small-sd`: block
//! widths 32/64, 8 heads of dimension 4 in the 32-channel transformer, cross-attention width
//! 32) on 32×32 latents, batch 2 as for classifier-free guidance, text states `[2, 77, 32]`;
//! random weights. The SD 1.5 items hide what dominates at this size: attention over 1,024
//! tokens with 4-wide heads (where the work is the softmax's exponentials, not products) and
//! the fixed cost of every small operation.

use std::path::Path;

use anyhow::Result;
use ltd_unet::{UNet2DConditionModelConfig, UNetConfig};

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
    super::measure::unet_step(args, &cfg, LATENT, "small")
}
