//! diffusers' `UNetMidBlock2D`: ResNet blocks with optional spatial self-attention between
//! them. The VAE's encoder and decoder use it with attention; a U-Net with
//! `mid_block_type = "UNetMidBlock2D"` uses it with a single ResNet block.

use candle_core::Result;
use candle_core::Tensor;
use candle_nn::VarBuilder;

use super::attention_processor::SpatialSelfAttention;
use super::resnet::{ResnetBlock2D, ResnetBlock2DConfig, TimeEmbeddingNorm};
use crate::attention::AttentionOptions;

/// The shape of a [`UNetMidBlock2D`].
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct UNetMidBlock2DConfig {
    /// The ResNet blocks' shape (in and out channels equal).
    pub resnet: ResnetBlock2DConfig,
    /// Number of (attention, ResNet) pairs after the first ResNet block.
    pub num_layers: usize,
    /// Head width of the attentions, `None` for no attention (`add_attention=False`).
    pub attention_head_dim: Option<usize>,
}

/// `resnets.0`, then `attentions.{i}` and `resnets.{i+1}` alternately.
#[derive(Debug, Clone)]
pub struct UNetMidBlock2D {
    resnets: Vec<ResnetBlock2D>,
    attentions: Vec<SpatialSelfAttention>,
}

impl UNetMidBlock2D {
    /// Fetches `resnets.{i}` and `attentions.{i}`.
    pub fn new(
        vb: VarBuilder,
        cfg: &UNetMidBlock2DConfig,
        opts: &AttentionOptions,
    ) -> Result<Self> {
        let r = &cfg.resnet;
        let resnets = (0..=cfg.num_layers)
            .map(|i| ResnetBlock2D::new(vb.pp("resnets").pp(i), r))
            .collect::<Result<Vec<_>>>()?;
        let mut attentions = Vec::new();
        if let Some(head_dim) = cfg.attention_head_dim {
            if r.time_embedding_norm != TimeEmbeddingNorm::Default {
                // diffusers then builds the attention without a group norm; no SD model does.
                candle_core::bail!("mid-block attention needs resnet_time_scale_shift \"default\"")
            }
            for i in 0..cfg.num_layers {
                let vb = vb.pp("attentions").pp(i);
                let (c, g, eps, s) = (r.in_channels, r.groups, r.eps, r.output_scale_factor);
                attentions.push(SpatialSelfAttention::new(vb, c, head_dim, g, eps, s, opts)?);
            }
        }
        Ok(Self { resnets, attentions })
    }

    /// `x: [B, C, H, W]`, `temb: [B, temb_channels]` when the ResNet blocks take one.
    pub fn forward(&self, x: &Tensor, temb: Option<&Tensor>) -> Result<Tensor> {
        let mut h = self.resnets[0].forward(x, temb)?;
        for (i, resnet) in self.resnets[1..].iter().enumerate() {
            if let Some(attn) = self.attentions.get(i) {
                h = attn.forward(&h)?;
            }
            h = resnet.forward(&h, temb)?;
        }
        Ok(h)
    }
}
