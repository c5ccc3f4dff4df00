//! The U-Net's down, mid and up blocks: diffusers' `CrossAttnDownBlock2D` / `DownBlock2D`,
//! `UNetMidBlock2DCrossAttn` / `UNetMidBlock2D` and `CrossAttnUpBlock2D` / `UpBlock2D`, and
//! DeepFloyd IF's `SimpleCrossAttnDownBlock2D` / `ResnetDownsampleBlock2D`,
//! `UNetMidBlock2DSimpleCrossAttn` and `SimpleCrossAttnUpBlock2D` / `ResnetUpsampleBlock2D`. A
//! block with and without cross-attention differ only in whether each ResNet block is followed
//! by an attention layer, and IF's blocks only in their ResNet (which may skip the time
//! activation), attention and resampling layers, so all down blocks are one type here, and all
//! up blocks another.

use candle_core::{Module, Result, Tensor};
use candle_nn::VarBuilder;
use ltd_nn::attention::AttentionOptions;
use ltd_nn::layers::{Downsample2D, ResnetBlock2D, UNetMidBlock2D, Upsample2D};
use ltd_nn::{Quantization, QuantizeReport};

use crate::config::{DownBlockConfig, MidBlockConfig, SimpleBlockConfig, UpBlockConfig};
use crate::simple_cross_attn::{
    AddedKVAttention, AddedKVAttentionConfig, Resample, ResnetBlock2DUpDown, ResnetUpDownConfig,
};
use crate::transformer_2d::{Transformer2DConfig, Transformer2DModel};

/// A ResNet block: the shared one, or IF's (which may skip the time activation).
#[derive(Debug, Clone)]
pub enum Resnet {
    /// `ltd_nn`'s `ResnetBlock2D`.
    Shared(ResnetBlock2D),
    /// IF's blocks' ResNet.
    Simple(ResnetBlock2DUpDown),
}

impl Resnet {
    fn forward(&self, x: &Tensor, temb: &Tensor) -> Result<Tensor> {
        match self {
            Self::Shared(r) => r.forward(x, Some(temb)),
            Self::Simple(r) => r.forward(x, Some(temb)),
        }
    }
}

/// The layer after a ResNet block: a transformer, or IF's added-key/value attention.
#[derive(Debug, Clone)]
pub enum Attn {
    /// `Transformer2DModel`.
    Transformer(Transformer2DModel),
    /// IF's `Attention(added_kv_proj_dim=…)`.
    AddedKV(AddedKVAttention),
}

impl Attn {
    /// Quantizes a transformer's linear layers (IF's attention stays as it is).
    fn quantize(&mut self, q: Quantization) -> Result<QuantizeReport> {
        match self {
            Self::Transformer(t) => t.quantize(q),
            Self::AddedKV(_) => Ok(QuantizeReport::default()),
        }
    }

    fn forward(&self, x: &Tensor, context: &Tensor) -> Result<Tensor> {
        match self {
            Self::Transformer(t) => t.forward(x, context),
            Self::AddedKV(a) => a.forward(x, context),
        }
    }
}

fn resnets(
    vb: &VarBuilder,
    cfgs: &[ltd_nn::layers::ResnetBlock2DConfig],
    simple: Option<&SimpleBlockConfig>,
) -> Result<Vec<Resnet>> {
    let simple_time_act = simple.map(|s| s.skip_time_act);
    cfgs.iter()
        .enumerate()
        .map(|(j, c)| {
            let vb = vb.pp("resnets").pp(j);
            Ok(match simple_time_act {
                None => Resnet::Shared(ResnetBlock2D::new(vb, c)?),
                Some(skip_time_act) => Resnet::Simple(ResnetBlock2DUpDown::new(
                    vb,
                    &ResnetUpDownConfig { base: *c, skip_time_act, resample: Resample::None },
                )?),
            })
        })
        .collect()
}

fn transformers(
    vb: &VarBuilder,
    cfgs: &[Transformer2DConfig],
    simple: Option<&SimpleBlockConfig>,
    opts: &AttentionOptions,
) -> Result<Vec<Attn>> {
    match simple {
        Some(s) => added_kv(vb, &s.attentions, opts),
        None => cfgs
            .iter()
            .enumerate()
            .map(|(j, c)| {
                Ok(Attn::Transformer(Transformer2DModel::new(vb.pp("attentions").pp(j), c, opts)?))
            })
            .collect(),
    }
}

fn added_kv(
    vb: &VarBuilder,
    cfgs: &[AddedKVAttentionConfig],
    opts: &AttentionOptions,
) -> Result<Vec<Attn>> {
    cfgs.iter()
        .enumerate()
        .map(|(j, c)| Ok(Attn::AddedKV(AddedKVAttention::new(vb.pp("attentions").pp(j), c, opts)?)))
        .collect()
}

/// IF's resampling ResNet block at `{prefix}.0`, if the block has one.
fn resnet_sampler(
    vb: &VarBuilder,
    prefix: &str,
    simple: Option<&SimpleBlockConfig>,
) -> Result<Option<ResnetBlock2DUpDown>> {
    match simple.and_then(|s| s.sampler.as_ref()) {
        Some(c) => Ok(Some(ResnetBlock2DUpDown::new(vb.pp(prefix).pp(0), c)?)),
        None => Ok(None),
    }
}

/// `down_blocks.{i}`.
#[derive(Debug, Clone)]
pub struct DownBlock {
    resnets: Vec<Resnet>,
    attentions: Vec<Attn>,
    downsampler: Option<Downsample2D>,
    resnet_downsampler: Option<ResnetBlock2DUpDown>,
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
        let simple = cfg.simple.as_ref();
        Ok(Self {
            resnets: resnets(&vb, &cfg.resnets, simple)?,
            attentions: transformers(&vb, &cfg.attentions, simple, opts)?,
            downsampler,
            resnet_downsampler: resnet_sampler(&vb, "downsamplers", simple)?,
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
            h = resnet.forward(&h, temb)?;
            if let Some(attn) = self.attentions.get(j) {
                h = attn.forward(&h, context)?;
            }
            skips.push(h.clone());
        }
        if let Some(down) = &self.downsampler {
            h = down.forward(&h)?;
            skips.push(h.clone());
        }
        if let Some(down) = &self.resnet_downsampler {
            h = down.forward(&h, Some(temb))?;
            skips.push(h.clone());
        }
        Ok(h)
    }
}

/// `mid_block`.
#[derive(Debug, Clone)]
pub enum MidBlock {
    /// `UNetMidBlock2DCrossAttn` and IF's `UNetMidBlock2DSimpleCrossAttn`.
    CrossAttn {
        /// `resnets.0`, `resnets.1`.
        resnets: Vec<Resnet>,
        /// `attentions.0`.
        attentions: Vec<Attn>,
    },
    /// `UNetMidBlock2D`.
    Plain(UNetMidBlock2D),
}

impl MidBlock {
    /// Fetches the block's ResNet and attention layers.
    pub fn new(vb: VarBuilder, cfg: &MidBlockConfig, opts: &AttentionOptions) -> Result<Self> {
        Ok(match cfg {
            MidBlockConfig::CrossAttn { resnets: r, attentions: a } => Self::CrossAttn {
                resnets: resnets(&vb, r, None)?,
                attentions: transformers(&vb, a, None, opts)?,
            },
            MidBlockConfig::SimpleCrossAttn { resnets: r, attentions: a, skip_time_act } => {
                let simple = SimpleBlockConfig {
                    skip_time_act: *skip_time_act,
                    attentions: a.clone(),
                    sampler: None,
                };
                Self::CrossAttn {
                    resnets: resnets(&vb, r, Some(&simple))?,
                    attentions: added_kv(&vb, a, opts)?,
                }
            }
            MidBlockConfig::Plain(c) => Self::Plain(UNetMidBlock2D::new(vb, c, opts)?),
        })
    }

    /// `x: [B, C, H, W]`.
    pub fn forward(&self, x: &Tensor, temb: &Tensor, context: &Tensor) -> Result<Tensor> {
        match self {
            Self::CrossAttn { resnets, attentions } => {
                let mut h = resnets[0].forward(x, temb)?;
                for (attn, resnet) in attentions.iter().zip(&resnets[1..]) {
                    h = attn.forward(&h, context)?;
                    h = resnet.forward(&h, temb)?;
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
    resnets: Vec<Resnet>,
    attentions: Vec<Attn>,
    upsampler: Option<Upsample2D>,
    resnet_upsampler: Option<ResnetBlock2DUpDown>,
}

impl UpBlock {
    /// Fetches `resnets.{j}`, `attentions.{j}` and `upsamplers.0`.
    pub fn new(vb: VarBuilder, cfg: &UpBlockConfig, opts: &AttentionOptions) -> Result<Self> {
        let upsampler = match cfg.upsample {
            Some(c) => Some(Upsample2D::new(vb.pp("upsamplers").pp(0), c, c)?),
            None => None,
        };
        let simple = cfg.simple.as_ref();
        Ok(Self {
            resnets: resnets(&vb, &cfg.resnets, simple)?,
            attentions: transformers(&vb, &cfg.attentions, simple, opts)?,
            upsampler,
            resnet_upsampler: resnet_sampler(&vb, "upsamplers", simple)?,
        })
    }

    /// How many skip connections the block consumes.
    pub fn num_skips(&self) -> usize {
        self.resnets.len()
    }

    /// Consumes skip connections from the end of `skips`; upsamples to `upsample_size` when
    /// given, else ×2 (IF's ResNet upsampler always ×2, as in diffusers).
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
            h = resnet.forward(&Tensor::cat(&[&h, &skip], 1)?, temb)?;
            if let Some(attn) = self.attentions.get(j) {
                h = attn.forward(&h, context)?;
            }
        }
        match (&self.upsampler, &self.resnet_upsampler) {
            (Some(up), _) => up.forward(&h, upsample_size),
            (None, Some(up)) => up.forward(&h, Some(temb)),
            (None, None) => Ok(h),
        }
    }
}

/// Quantizes the transformers of a block's attention layers.
pub(crate) fn quantize_attentions(attns: &mut [Attn], q: Quantization) -> Result<QuantizeReport> {
    let mut report = QuantizeReport::default();
    for a in attns {
        report.add(a.quantize(q)?);
    }
    Ok(report)
}

impl DownBlock {
    /// Quantizes the transformers' linear layers.
    pub fn quantize(&mut self, q: Quantization) -> Result<QuantizeReport> {
        quantize_attentions(&mut self.attentions, q)
    }
}

impl UpBlock {
    /// Quantizes the transformers' linear layers.
    pub fn quantize(&mut self, q: Quantization) -> Result<QuantizeReport> {
        quantize_attentions(&mut self.attentions, q)
    }
}

impl MidBlock {
    /// Quantizes the transformers' linear layers.
    pub fn quantize(&mut self, q: Quantization) -> Result<QuantizeReport> {
        match self {
            Self::CrossAttn { attentions, .. } => quantize_attentions(attentions, q),
            Self::Plain(_) => Ok(QuantizeReport::default()),
        }
    }
}
