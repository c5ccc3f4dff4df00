//! The VAE's `Encoder` and `Decoder` (diffusers' `models/autoencoders/vae.py`), with their
//! `DownEncoderBlock2D` and `UpDecoderBlock2D` blocks.

use candle_core::{Module, Result, Tensor};
use candle_nn::VarBuilder;
use ltd_nn::attention::AttentionOptions;
use ltd_nn::layers::{
    Conv2d, Downsample2D, GroupNorm, ResnetBlock2D, ResnetBlock2DConfig, TimeEmbeddingNorm,
    UNetMidBlock2D, UNetMidBlock2DConfig, Upsample2D,
};

use crate::config::VaeConfig;

/// Every norm of the VAE uses this epsilon (hard-coded in diffusers).
const EPS: f64 = 1e-6;

fn resnet_cfg(cfg: &VaeConfig, cin: usize, cout: usize) -> ResnetBlock2DConfig {
    ResnetBlock2DConfig {
        in_channels: cin,
        out_channels: cout,
        temb_channels: None,
        groups: cfg.norm_num_groups,
        groups_out: cfg.norm_num_groups,
        eps: EPS,
        act: cfg.act_fn,
        time_embedding_norm: TimeEmbeddingNorm::Default,
        output_scale_factor: 1.0,
    }
}

fn mid_block(vb: VarBuilder, cfg: &VaeConfig, opts: &AttentionOptions) -> Result<UNetMidBlock2D> {
    let c = *cfg.block_out_channels.last().unwrap_or(&0);
    let mid = UNetMidBlock2DConfig {
        resnet: resnet_cfg(cfg, c, c),
        num_layers: 1,
        // One head over all channels (diffusers passes attention_head_dim = channels).
        attention_head_dim: cfg.mid_block_add_attention.then_some(c),
    };
    UNetMidBlock2D::new(vb, &mid, opts)
}

/// `encoder.down_blocks.{i}`: ResNet blocks, then a stride-2 convolution (padded at the bottom
/// and right) except in the last block.
#[derive(Debug, Clone)]
struct DownEncoderBlock2D {
    resnets: Vec<ResnetBlock2D>,
    downsampler: Option<Downsample2D>,
}

/// `decoder.up_blocks.{i}`: ResNet blocks, then ×2 upsampling except in the last block.
#[derive(Debug, Clone)]
struct UpDecoderBlock2D {
    resnets: Vec<ResnetBlock2D>,
    upsampler: Option<Upsample2D>,
}

/// Image `[B, in_channels, H, W]` → moments `[B, 2·latent_channels, H/f, W/f]`.
#[derive(Debug, Clone)]
pub struct Encoder {
    conv_in: Conv2d,
    down_blocks: Vec<DownEncoderBlock2D>,
    mid_block: UNetMidBlock2D,
    conv_norm_out: GroupNorm,
    conv_out: Conv2d,
}

impl Encoder {
    /// Fetches the encoder's tensors under `vb` (`encoder.`).
    pub fn new(vb: VarBuilder, cfg: &VaeConfig, opts: &AttentionOptions) -> Result<Self> {
        let ch = &cfg.block_out_channels;
        let n = ch.len();
        let conv_in = Conv2d::new(vb.pp("conv_in"), cfg.in_channels, ch[0], 3, 1, 1)?;
        let mut down_blocks = Vec::with_capacity(n);
        for i in 0..n {
            let vb = vb.pp("down_blocks").pp(i);
            let (cin, cout) = (if i == 0 { ch[0] } else { ch[i - 1] }, ch[i]);
            let resnets = (0..cfg.layers_per_block)
                .map(|j| {
                    let c = resnet_cfg(cfg, if j == 0 { cin } else { cout }, cout);
                    ResnetBlock2D::new(vb.pp("resnets").pp(j), &c)
                })
                .collect::<Result<Vec<_>>>()?;
            let downsampler = if i + 1 < n {
                Some(Downsample2D::new(vb.pp("downsamplers").pp(0), cout, cout, 0)?)
            } else {
                None
            };
            down_blocks.push(DownEncoderBlock2D { resnets, downsampler });
        }
        let c = ch[n - 1];
        Ok(Self {
            conv_in,
            down_blocks,
            mid_block: mid_block(vb.pp("mid_block"), cfg, opts)?,
            conv_norm_out: GroupNorm::new(vb.pp("conv_norm_out"), cfg.norm_num_groups, c, EPS)?,
            conv_out: Conv2d::new(vb.pp("conv_out"), c, 2 * cfg.latent_channels, 3, 1, 1)?,
        })
    }
}

impl Module for Encoder {
    fn forward(&self, x: &Tensor) -> Result<Tensor> {
        let mut h = self.conv_in.forward(x)?;
        for block in &self.down_blocks {
            for resnet in &block.resnets {
                h = resnet.forward(&h, None)?;
            }
            if let Some(down) = &block.downsampler {
                h = down.forward(&h)?;
            }
        }
        let h = self.mid_block.forward(&h, None)?;
        self.conv_out.forward(&self.conv_norm_out.forward_silu(&h)?)
    }
}

/// Latents `[B, latent_channels, h, w]` → image `[B, out_channels, h·f, w·f]`.
#[derive(Debug, Clone)]
pub struct Decoder {
    conv_in: Conv2d,
    mid_block: UNetMidBlock2D,
    up_blocks: Vec<UpDecoderBlock2D>,
    conv_norm_out: GroupNorm,
    conv_out: Conv2d,
}

impl Decoder {
    /// Fetches the decoder's tensors under `vb` (`decoder.`).
    pub fn new(vb: VarBuilder, cfg: &VaeConfig, opts: &AttentionOptions) -> Result<Self> {
        let ch: Vec<usize> = cfg.block_out_channels.iter().rev().copied().collect();
        let n = ch.len();
        let conv_in = Conv2d::new(vb.pp("conv_in"), cfg.latent_channels, ch[0], 3, 1, 1)?;
        let mid_block = mid_block(vb.pp("mid_block"), cfg, opts)?;
        let mut up_blocks = Vec::with_capacity(n);
        let mut prev = ch[0];
        for (i, &cout) in ch.iter().enumerate() {
            let vb = vb.pp("up_blocks").pp(i);
            let resnets = (0..=cfg.layers_per_block)
                .map(|j| {
                    let c = resnet_cfg(cfg, if j == 0 { prev } else { cout }, cout);
                    ResnetBlock2D::new(vb.pp("resnets").pp(j), &c)
                })
                .collect::<Result<Vec<_>>>()?;
            let upsampler = if i + 1 < n {
                Some(Upsample2D::new(vb.pp("upsamplers").pp(0), cout, cout)?)
            } else {
                None
            };
            up_blocks.push(UpDecoderBlock2D { resnets, upsampler });
            prev = cout;
        }
        let c = ch[n - 1];
        Ok(Self {
            conv_in,
            mid_block,
            up_blocks,
            conv_norm_out: GroupNorm::new(vb.pp("conv_norm_out"), cfg.norm_num_groups, c, EPS)?,
            conv_out: Conv2d::new(vb.pp("conv_out"), c, cfg.out_channels, 3, 1, 1)?,
        })
    }
}

impl Module for Decoder {
    fn forward(&self, z: &Tensor) -> Result<Tensor> {
        let h = self.conv_in.forward(z)?;
        let mut h = self.mid_block.forward(&h, None)?;
        for block in &self.up_blocks {
            for resnet in &block.resnets {
                h = resnet.forward(&h, None)?;
            }
            if let Some(up) = &block.upsampler {
                h = up.forward(&h, None)?;
            }
        }
        self.conv_out.forward(&self.conv_norm_out.forward_silu(&h)?)
    }
}
