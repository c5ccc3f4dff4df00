//! diffusers' `ResnetBlock2D` (He et al. 2016, in the pre-norm form of the DDPM U-Net), the
//! building block of every U-Net and VAE block.

use candle_core::{Module, Result, Tensor};
use candle_nn::VarBuilder;

use super::activation::Activation;
use super::conv::Conv2d;
use super::linear::Linear;
use super::norm::GroupNorm;
use crate::error::ConfigError;

/// How the time embedding enters a ResNet block (`resnet_time_scale_shift`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum TimeEmbeddingNorm {
    /// `"default"`: added to the features before the second norm.
    #[default]
    Default,
    /// `"scale_shift"`: `norm2(h)·(1 + scale) + shift` (Dhariwal & Nichol 2021's AdaGN).
    ScaleShift,
}

impl TimeEmbeddingNorm {
    /// Parses `resnet_time_scale_shift`; `"spatial"` and `"ada_group"` (other block classes in
    /// diffusers) are unsupported.
    pub fn parse(value: &str, field: &str) -> std::result::Result<Self, ConfigError> {
        match value {
            "default" => Ok(Self::Default),
            "scale_shift" => Ok(Self::ScaleShift),
            _ => Err(ConfigError::unsupported(field, value)),
        }
    }
}

/// The shape of one ResNet block.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct ResnetBlock2DConfig {
    /// Input channels.
    pub in_channels: usize,
    /// Output channels (a 1×1 `conv_shortcut` appears when they differ from the input's).
    pub out_channels: usize,
    /// Width of the time embedding, `None` for blocks without one (the VAE's).
    pub temb_channels: Option<usize>,
    /// Groups of `norm1`.
    pub groups: usize,
    /// Groups of `norm2` (diffusers' `groups_out`, by default `groups`).
    pub groups_out: usize,
    /// Epsilon of both norms.
    pub eps: f64,
    /// The non-linearity (`act_fn`).
    pub act: Activation,
    /// How the time embedding is applied.
    pub time_embedding_norm: TimeEmbeddingNorm,
    /// The output is divided by this (`output_scale_factor`).
    pub output_scale_factor: f64,
}

/// `ResnetBlock2D`: `(shortcut(x) + conv2(act(norm2(conv1(act(norm1(x))) ⊕ temb)))) / s`.
#[derive(Debug, Clone)]
pub struct ResnetBlock2D {
    norm1: GroupNorm,
    conv1: Conv2d,
    time_emb_proj: Option<Linear>,
    norm2: GroupNorm,
    conv2: Conv2d,
    conv_shortcut: Option<Conv2d>,
    cfg: ResnetBlock2DConfig,
}

impl ResnetBlock2D {
    /// Fetches `norm1`, `conv1`, `time_emb_proj`, `norm2`, `conv2` and `conv_shortcut`.
    pub fn new(vb: VarBuilder, cfg: &ResnetBlock2DConfig) -> Result<Self> {
        let (cin, cout) = (cfg.in_channels, cfg.out_channels);
        let norm1 = GroupNorm::new(vb.pp("norm1"), cfg.groups, cin, cfg.eps)?;
        let conv1 = Conv2d::new(vb.pp("conv1"), cin, cout, 3, 1, 1)?;
        let time_emb_proj = match cfg.temb_channels {
            Some(t) => {
                let width = match cfg.time_embedding_norm {
                    TimeEmbeddingNorm::Default => cout,
                    TimeEmbeddingNorm::ScaleShift => 2 * cout,
                };
                Some(Linear::new(vb.pp("time_emb_proj"), t, width, true)?)
            }
            None => None,
        };
        let norm2 = GroupNorm::new(vb.pp("norm2"), cfg.groups_out, cout, cfg.eps)?;
        let conv2 = Conv2d::new(vb.pp("conv2"), cout, cout, 3, 1, 1)?;
        let conv_shortcut = if cin != cout {
            Some(Conv2d::new(vb.pp("conv_shortcut"), cin, cout, 1, 0, 1)?)
        } else {
            None
        };
        Ok(Self { norm1, conv1, time_emb_proj, norm2, conv2, conv_shortcut, cfg: *cfg })
    }

    fn norm_act(&self, norm: &GroupNorm, x: &Tensor) -> Result<Tensor> {
        match self.cfg.act {
            Activation::Silu => norm.forward_silu(x),
            act => act.forward(&norm.forward(x)?),
        }
    }

    /// `x: [B, C_in, H, W]`, `temb: [B, temb_channels]` (ignored by blocks without a time
    /// projection).
    pub fn forward(&self, x: &Tensor, temb: Option<&Tensor>) -> Result<Tensor> {
        let h = self.norm_act(&self.norm1, x)?;
        let t = match (&self.time_emb_proj, temb) {
            (Some(proj), Some(temb)) => Some(proj.forward(&self.cfg.act.forward(temb)?)?),
            _ => None,
        };
        let h = match (self.cfg.time_embedding_norm, t) {
            // The time embedding rides along with conv1's bias.
            (TimeEmbeddingNorm::Default, t) => {
                let h = self.conv1.forward_fused(&h, t.as_ref(), None, 1.0)?;
                self.norm_act(&self.norm2, &h)?
            }
            (TimeEmbeddingNorm::ScaleShift, Some(t)) => {
                let c = self.cfg.out_channels;
                let t = t.unsqueeze(2)?.unsqueeze(3)?;
                let (scale, shift) = (t.narrow(1, 0, c)?, t.narrow(1, c, c)?);
                let h = self.norm2.forward(&self.conv1.forward(&h)?)?;
                let h = h.broadcast_mul(&(scale + 1.0)?)?.broadcast_add(&shift)?;
                self.cfg.act.forward(&h)?
            }
            (TimeEmbeddingNorm::ScaleShift, None) => {
                candle_core::bail!("a scale_shift ResNet block needs a time embedding")
            }
        };
        let shortcut = match &self.conv_shortcut {
            Some(conv) => conv.forward(x)?,
            None => x.clone(),
        };
        // `(shortcut + conv2(h)) / output_scale_factor`, added while conv2 writes its output.
        self.conv2.forward_fused(&h, None, Some(&shortcut), self.cfg.output_scale_factor)
    }
}
