//! The layers of DeepFloyd IF's U-Net blocks (`ResnetDownsampleBlock2D`,
//! `ResnetUpsampleBlock2D`, `SimpleCrossAttnDownBlock2D`, `SimpleCrossAttnUpBlock2D`,
//! `UNetMidBlock2DSimpleCrossAttn`), which come from the improved-DDPM / ADM U-Net (Nichol &
//! Dhariwal 2021) rather than from latent diffusion's transformers:
//!
//! - [`ResnetBlock2DUpDown`]: diffusers' `ResnetBlock2D` with `up=True` / `down=True` (the
//!   resampling happens inside the ResNet block, after the first norm) and `skip_time_act`;
//! - [`AddedKVAttention`]: diffusers' `Attention(added_kv_proj_dim=…)` run by
//!   `AttnAddedKVProcessor`: spatial self-attention whose keys and values are prefixed with
//!   projections of the (optionally group-normed) text states, with a residual.
//!
//! Only the U-Net uses them, so they live here and not in `ltd_nn::layers` (whose `Attention`
//! is the transformer blocks' token attention without norm, residual or added projections).

use candle_core::{Module, Result, Tensor};
use candle_nn::VarBuilder;
use ltd_nn::attention::{attention, merge_heads, split_heads, AttentionOptions};
use ltd_nn::layers::{Conv2d, GroupNorm, Linear, ResnetBlock2DConfig, TimeEmbeddingNorm};

/// Resampling inside a [`ResnetBlock2DUpDown`].
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum Resample {
    /// None: a plain ResNet block.
    #[default]
    None,
    /// `up=True`: nearest-neighbour ×2 (`F.interpolate(scale_factor=2.0, mode="nearest")`).
    Up,
    /// `down=True`: 2×2 average pooling with stride 2 (`F.avg_pool2d`).
    Down,
}

/// The shape of a [`ResnetBlock2DUpDown`].
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct ResnetUpDownConfig {
    /// Channels, norms, activation, time-embedding mode and output scale.
    pub base: ResnetBlock2DConfig,
    /// `skip_time_act`: the time embedding goes into `time_emb_proj` without the activation.
    pub skip_time_act: bool,
    /// Up-, down- or no resampling.
    pub resample: Resample,
}

/// diffusers' `ResnetBlock2D` with resampling and `skip_time_act`:
/// `(shortcut(r(x)) + conv2(act(norm2(conv1(r(act(norm1(x))))) ⊕ temb))) / s`, `r` the resampling.
#[derive(Debug, Clone)]
pub struct ResnetBlock2DUpDown {
    norm1: GroupNorm,
    conv1: Conv2d,
    time_emb_proj: Option<Linear>,
    norm2: GroupNorm,
    conv2: Conv2d,
    conv_shortcut: Option<Conv2d>,
    cfg: ResnetUpDownConfig,
}

impl ResnetBlock2DUpDown {
    /// Fetches `norm1`, `conv1`, `time_emb_proj`, `norm2`, `conv2` and `conv_shortcut`.
    pub fn new(vb: VarBuilder, cfg: &ResnetUpDownConfig) -> Result<Self> {
        let b = &cfg.base;
        let (cin, cout) = (b.in_channels, b.out_channels);
        let time_emb_proj = match b.temb_channels {
            Some(t) => {
                let width = match b.time_embedding_norm {
                    TimeEmbeddingNorm::Default => cout,
                    TimeEmbeddingNorm::ScaleShift => 2 * cout,
                };
                Some(Linear::new(vb.pp("time_emb_proj"), t, width, true)?)
            }
            None => None,
        };
        Ok(Self {
            norm1: GroupNorm::new(vb.pp("norm1"), b.groups, cin, b.eps)?,
            conv1: Conv2d::new(vb.pp("conv1"), cin, cout, 3, 1, 1)?,
            time_emb_proj,
            norm2: GroupNorm::new(vb.pp("norm2"), b.groups_out, cout, b.eps)?,
            conv2: Conv2d::new(vb.pp("conv2"), cout, cout, 3, 1, 1)?,
            conv_shortcut: if cin != cout {
                Some(Conv2d::new(vb.pp("conv_shortcut"), cin, cout, 1, 0, 1)?)
            } else {
                None
            },
            cfg: *cfg,
        })
    }

    fn resample(&self, x: &Tensor) -> Result<Tensor> {
        match self.cfg.resample {
            Resample::None => Ok(x.clone()),
            Resample::Up => {
                let (_, _, h, w) = x.dims4()?;
                x.upsample_nearest2d(2 * h, 2 * w)
            }
            Resample::Down => x.avg_pool2d(2),
        }
    }

    /// `x: [B, C_in, H, W]`, `temb: [B, temb_channels]`.
    pub fn forward(&self, x: &Tensor, temb: Option<&Tensor>) -> Result<Tensor> {
        let b = &self.cfg.base;
        let h = b.act.forward(&self.norm1.forward(x)?)?;
        let (x, h) = (self.resample(x)?, self.resample(&h)?);
        let h = self.conv1.forward(&h)?;
        let t = match (&self.time_emb_proj, temb) {
            (Some(proj), Some(temb)) => {
                let temb =
                    if self.cfg.skip_time_act { temb.clone() } else { b.act.forward(temb)? };
                Some(proj.forward(&temb)?.unsqueeze(2)?.unsqueeze(3)?)
            }
            _ => None,
        };
        let h = match (b.time_embedding_norm, t) {
            (TimeEmbeddingNorm::Default, Some(t)) => self.norm2.forward(&h.broadcast_add(&t)?)?,
            (TimeEmbeddingNorm::Default, None) => self.norm2.forward(&h)?,
            (TimeEmbeddingNorm::ScaleShift, Some(t)) => {
                let c = b.out_channels;
                let (scale, shift) = (t.narrow(1, 0, c)?, t.narrow(1, c, c)?);
                self.norm2.forward(&h)?.broadcast_mul(&(scale + 1.0)?)?.broadcast_add(&shift)?
            }
            (TimeEmbeddingNorm::ScaleShift, None) => {
                candle_core::bail!("a scale_shift ResNet block needs a time embedding")
            }
        };
        let h = self.conv2.forward(&b.act.forward(&h)?)?;
        let shortcut = match &self.conv_shortcut {
            Some(conv) => conv.forward(&x)?,
            None => x,
        };
        let out = (shortcut + h)?;
        if b.output_scale_factor == 1.0 {
            Ok(out)
        } else {
            out / b.output_scale_factor
        }
    }
}

/// The shape of an [`AddedKVAttention`].
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct AddedKVAttentionConfig {
    /// Channels of the feature map (`query_dim`, and the output width).
    pub channels: usize,
    /// Heads: `channels / attention_head_dim`.
    pub heads: usize,
    /// Width of each head (`attention_head_dim`, which these blocks read as what it says).
    pub dim_head: usize,
    /// Width of the text states (`added_kv_proj_dim`: the block's `cross_attention_dim`).
    pub added_kv_proj_dim: usize,
    /// Groups of `group_norm` over the feature map (`resnet_groups`).
    pub norm_num_groups: usize,
    /// `only_cross_attention`: no `to_k` / `to_v`; the pixels attend to the text only.
    pub only_cross_attention: bool,
    /// `cross_attention_norm: "group_norm"`: `norm_cross` (32 groups) over the text states.
    pub cross_attention_norm: bool,
}

/// diffusers' `Attention` with `added_kv_proj_dim` under `AttnAddedKVProcessor`.
#[derive(Debug, Clone)]
pub struct AddedKVAttention {
    group_norm: GroupNorm,
    norm_cross: Option<GroupNorm>,
    to_q: Linear,
    to_kv: Option<(Linear, Linear)>,
    add_k_proj: Linear,
    add_v_proj: Linear,
    to_out: Linear,
    heads: usize,
    scale: f64,
    opts: AttentionOptions,
}

/// `cross_attention_norm_num_groups`, which no U-Net block passes on: diffusers' default.
const NORM_CROSS_GROUPS: usize = 32;

impl AddedKVAttention {
    /// Fetches `group_norm`, `norm_cross`, `to_q`, `to_k`, `to_v`, `add_k_proj`, `add_v_proj`
    /// and `to_out.0`, all with biases.
    pub fn new(
        vb: VarBuilder,
        cfg: &AddedKVAttentionConfig,
        opts: &AttentionOptions,
    ) -> Result<Self> {
        let (c, inner, kv) = (cfg.channels, cfg.heads * cfg.dim_head, cfg.added_kv_proj_dim);
        let norm_cross = match cfg.cross_attention_norm {
            true => Some(GroupNorm::new(vb.pp("norm_cross"), NORM_CROSS_GROUPS, kv, 1e-5)?),
            false => None,
        };
        let to_kv = match cfg.only_cross_attention {
            true => None,
            false => Some((
                Linear::new(vb.pp("to_k"), c, inner, true)?,
                Linear::new(vb.pp("to_v"), c, inner, true)?,
            )),
        };
        Ok(Self {
            group_norm: GroupNorm::new(vb.pp("group_norm"), cfg.norm_num_groups, c, 1e-5)?,
            norm_cross,
            to_q: Linear::new(vb.pp("to_q"), c, inner, true)?,
            to_kv,
            add_k_proj: Linear::new(vb.pp("add_k_proj"), kv, inner, true)?,
            add_v_proj: Linear::new(vb.pp("add_v_proj"), kv, inner, true)?,
            to_out: Linear::new(vb.pp("to_out").pp("0"), inner, c, true)?,
            heads: cfg.heads,
            scale: 1.0 / (cfg.dim_head as f64).sqrt(),
            opts: *opts,
        })
    }

    /// `x: [B, C, H, W]`, `context: [B, L, added_kv_proj_dim]` → `[B, C, H, W]`.
    pub fn forward(&self, x: &Tensor, context: &Tensor) -> Result<Tensor> {
        let (b, c, h, w) = x.dims4()?;
        let context = match &self.norm_cross {
            // Group norm over the text channels: [B, L, D] → [B, D, L] and back.
            Some(norm) => norm.forward(&context.transpose(1, 2)?.contiguous()?)?.transpose(1, 2)?,
            None => context.clone(),
        };
        let tokens =
            self.group_norm.forward(x)?.reshape((b, c, h * w))?.transpose(1, 2)?.contiguous()?;
        let q = split_heads(&self.to_q.forward(&tokens)?, self.heads)?;
        let ek = split_heads(&self.add_k_proj.forward(&context)?, self.heads)?;
        let ev = split_heads(&self.add_v_proj.forward(&context)?, self.heads)?;
        // The text's keys and values come first, then the pixels' own (unless only_cross).
        let (k, v) = match &self.to_kv {
            Some((to_k, to_v)) => (
                Tensor::cat(&[&ek, &split_heads(&to_k.forward(&tokens)?, self.heads)?], 2)?,
                Tensor::cat(&[&ev, &split_heads(&to_v.forward(&tokens)?, self.heads)?], 2)?,
            ),
            None => (ek, ev),
        };
        // `upcast_softmax=True`.
        let out = attention(&q.contiguous()?, &k, &v, None, self.scale, true, &self.opts)?;
        let out = self.to_out.forward(&merge_heads(&out)?)?;
        out.transpose(1, 2)?.reshape((b, c, h, w))? + x
    }
}
