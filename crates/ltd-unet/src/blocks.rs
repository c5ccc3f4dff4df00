//! The U-Net's down, mid and up blocks: diffusers' `CrossAttnDownBlock2D` / `DownBlock2D`,
//! `UNetMidBlock2DCrossAttn` / `UNetMidBlock2D` and `CrossAttnUpBlock2D` / `UpBlock2D`. A block
//! with and without cross-attention differ only in whether each ResNet block is followed by a
//! transformer, so each pair is one type here.

use candle_core::{Module, Result, Tensor};
use candle_nn::VarBuilder;
use ltd_nn::attention::AttentionOptions;
use ltd_nn::layers::{Downsample2D, ResnetBlock2D, UNetMidBlock2D, Upsample2D};

use crate::config::{DownBlockConfig, MidBlockConfig, UpBlockConfig};
use crate::transformer_2d::{Transformer2DConfig, Transformer2DModel};

fn resnets(
    vb: &VarBuilder,
    cfgs: &[ltd_nn::layers::ResnetBlock2DConfig],
) -> Result<Vec<ResnetBlock2D>> {
    cfgs.iter().enumerate().map(|(j, c)| ResnetBlock2D::new(vb.pp("resnets").pp(j), c)).collect()
}

fn transformers(
    vb: &VarBuilder,
    cfgs: &[Transformer2DConfig],
    opts: &AttentionOptions,
) -> Result<Vec<Transformer2DModel>> {
    cfgs.iter()
        .enumerate()
        .map(|(j, c)| Transformer2DModel::new(vb.pp("attentions").pp(j), c, opts))
        .collect()
}

/// `down_blocks.{i}`.
#[derive(Debug, Clone)]
pub struct DownBlock {
    resnets: Vec<ResnetBlock2D>,
    attentions: Vec<Transformer2DModel>,
    downsampler: Option<Downsample2D>,
}

impl DownBlock {
    /// Fetches `resnets.{j}`, `attentions.{j}` and `downsamplers.0`.
    pub fn new(vb: VarBuilder, cfg: &DownBlockConfig, opts: &AttentionOptions) -> Result<Self> {
        let downsampler = match cfg.downsample {
            Some((c, padding)) => {
                Some(Downsample2D::new(vb.pp("downsamplers").pp(0), c, c, padding)?)
            }
            None => None,
        };
        Ok(Self {
            resnets: resnets(&vb, &cfg.resnets)?,
            attentions: transformers(&vb, &cfg.attentions, opts)?,
            downsampler,
        })
    }

    /// Returns the output and the skip connections it leaves for the up blocks (one per
    /// ResNet block, plus the downsampled output).
    pub fn forward(
        &self,
        x: &Tensor,
        temb: &Tensor,
        context: &Tensor,
        skips: &mut Vec<Tensor>,
    ) -> Result<Tensor> {
        let mut h = x.clone();
        for (j, resnet) in self.resnets.iter().enumerate() {
            h = resnet.forward(&h, Some(temb))?;
            if let Some(attn) = self.attentions.get(j) {
                h = attn.forward(&h, context)?;
            }
            skips.push(h.clone());
        }
        if let Some(down) = &self.downsampler {
            h = down.forward(&h)?;
            skips.push(h.clone());
        }
        Ok(h)
    }
}

/// `mid_block`.
#[derive(Debug, Clone)]
pub enum MidBlock {
    /// `UNetMidBlock2DCrossAttn`.
    CrossAttn {
        /// `resnets.0`, `resnets.1`.
        resnets: Vec<ResnetBlock2D>,
        /// `attentions.0`.
        attentions: Vec<Transformer2DModel>,
    },
    /// `UNetMidBlock2D`.
    Plain(UNetMidBlock2D),
}

impl MidBlock {
    /// Fetches the block's ResNet and attention layers.
    pub fn new(vb: VarBuilder, cfg: &MidBlockConfig, opts: &AttentionOptions) -> Result<Self> {
        Ok(match cfg {
            MidBlockConfig::CrossAttn { resnets: r, attentions: a } => Self::CrossAttn {
                resnets: resnets(&vb, r)?,
                attentions: transformers(&vb, a, opts)?,
            },
            MidBlockConfig::Plain(c) => Self::Plain(UNetMidBlock2D::new(vb, c, opts)?),
        })
    }

    /// `x: [B, C, H, W]`.
    pub fn forward(&self, x: &Tensor, temb: &Tensor, context: &Tensor) -> Result<Tensor> {
        match self {
            Self::CrossAttn { resnets, attentions } => {
                let mut h = resnets[0].forward(x, Some(temb))?;
                for (attn, resnet) in attentions.iter().zip(&resnets[1..]) {
                    h = attn.forward(&h, context)?;
                    h = resnet.forward(&h, Some(temb))?;
                }
                Ok(h)
            }
            Self::Plain(block) => block.forward(x, Some(temb)),
        }
    }
}

/// `up_blocks.{i}`.
#[derive(Debug, Clone)]
pub struct UpBlock {
    resnets: Vec<ResnetBlock2D>,
    attentions: Vec<Transformer2DModel>,
    upsampler: Option<Upsample2D>,
}

impl UpBlock {
    /// Fetches `resnets.{j}`, `attentions.{j}` and `upsamplers.0`.
    pub fn new(vb: VarBuilder, cfg: &UpBlockConfig, opts: &AttentionOptions) -> Result<Self> {
        let upsampler = match cfg.upsample {
            Some(c) => Some(Upsample2D::new(vb.pp("upsamplers").pp(0), c, c)?),
            None => None,
        };
        Ok(Self {
            resnets: resnets(&vb, &cfg.resnets)?,
            attentions: transformers(&vb, &cfg.attentions, opts)?,
            upsampler,
        })
    }

    /// How many skip connections the block consumes.
    pub fn num_skips(&self) -> usize {
        self.resnets.len()
    }

    /// Consumes skip connections from the end of `skips`; upsamples to `upsample_size` when
    /// given, else ×2.
    pub fn forward(
        &self,
        x: &Tensor,
        skips: &mut Vec<Tensor>,
        temb: &Tensor,
        context: &Tensor,
        upsample_size: Option<(usize, usize)>,
    ) -> Result<Tensor> {
        let mut h = x.clone();
        for (j, resnet) in self.resnets.iter().enumerate() {
            let skip = skips.pop().ok_or_else(|| {
                candle_core::Error::Msg("U-Net up block ran out of skip connections".into())
            })?;
            h = resnet.forward(&Tensor::cat(&[&h, &skip], 1)?, Some(temb))?;
            if let Some(attn) = self.attentions.get(j) {
                h = attn.forward(&h, context)?;
            }
        }
        match &self.upsampler {
            Some(up) => up.forward(&h, upsample_size),
            None => Ok(h),
        }
    }
}
