//! diffusers' `Attention` module (`models/attention_processor.py`) in the two forms latent
//! diffusion uses: multi-head (cross-)attention over token sequences inside the U-Net's
//! transformer blocks, and the spatial self-attention with group norm and residual of
//! `UNetMidBlock2D` (the VAE's mid block). Both compute through [`crate::attention`].

use candle_core::{Module, Result, Tensor};
use candle_nn::VarBuilder;

use super::linear::Linear;
use super::norm::GroupNorm;
use crate::attention::{attention, merge_heads, split_heads, AttentionOptions};
use crate::quantize::{Quantization, QuantizeReport};

/// The shape of an [`Attention`] layer.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct AttentionConfig {
    /// Width of the queries' input (and of the output).
    pub query_dim: usize,
    /// Width of the context for cross-attention; `None` for self-attention.
    pub cross_attention_dim: Option<usize>,
    /// Number of heads.
    pub heads: usize,
    /// Width of each head.
    pub dim_head: usize,
    /// Whether `to_q`, `to_k`, `to_v` have biases (`attention_bias`).
    pub bias: bool,
    /// Scores and softmax in f32 whatever the dtype (`upcast_attention`).
    pub upcast: bool,
}

/// `to_out.0(attention(to_q(x), to_k(c), to_v(c)))` with `c` the context or `x` itself.
#[derive(Debug, Clone)]
pub struct Attention {
    to_q: Linear,
    to_k: Linear,
    to_v: Linear,
    to_out: Linear,
    heads: usize,
    scale: f64,
    upcast: bool,
    opts: AttentionOptions,
}

impl Attention {
    /// Fetches `to_q`, `to_k`, `to_v` and `to_out.0` (the output projection always has a bias).
    pub fn new(vb: VarBuilder, cfg: &AttentionConfig, opts: &AttentionOptions) -> Result<Self> {
        let inner = cfg.heads * cfg.dim_head;
        let kv_dim = cfg.cross_attention_dim.unwrap_or(cfg.query_dim);
        Ok(Self {
            to_q: Linear::new(vb.pp("to_q"), cfg.query_dim, inner, cfg.bias)?,
            to_k: Linear::new(vb.pp("to_k"), kv_dim, inner, cfg.bias)?,
            to_v: Linear::new(vb.pp("to_v"), kv_dim, inner, cfg.bias)?,
            to_out: Linear::new(vb.pp("to_out").pp("0"), inner, cfg.query_dim, true)?,
            heads: cfg.heads,
            scale: 1.0 / (cfg.dim_head as f64).sqrt(),
            upcast: cfg.upcast,
            opts: *opts,
        })
    }

    /// Quantizes `to_q`, `to_k`, `to_v`, `to_out.0` where their shapes allow.
    pub fn quantize(&mut self, q: Quantization) -> Result<QuantizeReport> {
        let mut report = QuantizeReport::default();
        for l in [&mut self.to_q, &mut self.to_k, &mut self.to_v, &mut self.to_out] {
            report.add(l.quantize(q)?);
        }
        Ok(report)
    }

    /// `x: [B, Lq, query_dim]`, `context: [B, Lk, cross_attention_dim]` (`None`: self-attention).
    pub fn forward(&self, x: &Tensor, context: Option<&Tensor>) -> Result<Tensor> {
        let context = context.unwrap_or(x);
        let q = split_heads(&self.to_q.forward(x)?, self.heads)?;
        let k = split_heads(&self.to_k.forward(context)?, self.heads)?;
        let v = split_heads(&self.to_v.forward(context)?, self.heads)?;
        let out = attention(&q, &k, &v, None, self.scale, self.upcast, &self.opts)?;
        self.to_out.forward(&merge_heads(&out)?)
    }
}

/// The VAE mid block's attention (diffusers' `Attention(..., residual_connection=True,
/// norm_num_groups=…, bias=True, upcast_softmax=True)`): group norm, single- or multi-head
/// self-attention over all pixels, output projection, residual, then division by
/// `rescale_output_factor`.
#[derive(Debug, Clone)]
pub struct SpatialSelfAttention {
    group_norm: GroupNorm,
    to_q: Linear,
    to_k: Linear,
    to_v: Linear,
    to_out: Linear,
    heads: usize,
    scale: f64,
    rescale_output_factor: f64,
    opts: AttentionOptions,
}

impl SpatialSelfAttention {
    /// `channels` split into `channels / head_dim` heads. Checkpoints converted before diffusers
    /// 0.14 name the projections `query`, `key`, `value` and `proj_attn`; both layouts load.
    pub fn new(
        vb: VarBuilder,
        channels: usize,
        head_dim: usize,
        groups: usize,
        eps: f64,
        rescale_output_factor: f64,
        opts: &AttentionOptions,
    ) -> Result<Self> {
        let legacy = vb.contains_tensor("query.weight");
        let name = |new: &'static str, old: &'static str| if legacy { old } else { new };
        let heads = (channels / head_dim.max(1)).max(1);
        let dim_head = channels / heads;
        let linear = |n: &str| Linear::new(vb.pp(n), channels, channels, true);
        Ok(Self {
            group_norm: GroupNorm::new(vb.pp("group_norm"), groups, channels, eps)?,
            to_q: linear(name("to_q", "query"))?,
            to_k: linear(name("to_k", "key"))?,
            to_v: linear(name("to_v", "value"))?,
            to_out: if legacy { linear("proj_attn")? } else { linear("to_out.0")? },
            heads,
            scale: 1.0 / (dim_head as f64).sqrt(),
            rescale_output_factor,
            opts: *opts,
        })
    }

    /// `x: [B, C, H, W] → [B, C, H, W]`.
    pub fn forward(&self, x: &Tensor) -> Result<Tensor> {
        let (b, c, h, w) = x.dims4()?;
        let tokens = self.group_norm.forward(x)?.reshape((b, c, h * w))?.transpose(1, 2)?;
        let q = split_heads(&self.to_q.forward(&tokens)?, self.heads)?;
        let k = split_heads(&self.to_k.forward(&tokens)?, self.heads)?;
        let v = split_heads(&self.to_v.forward(&tokens)?, self.heads)?;
        // diffusers' `upcast_softmax=True` only matters for its classic processor; with SDPA it
        // is not applied. We upcast: in f16 the VAE's 4096-wide rows otherwise lose digits.
        let out = attention(&q, &k, &v, None, self.scale, true, &self.opts)?;
        let out = self.to_out.forward(&merge_heads(&out)?)?;
        let out = (out.transpose(1, 2)?.reshape((b, c, h, w))? + x)?;
        if self.rescale_output_factor == 1.0 {
            Ok(out)
        } else {
            out / self.rescale_output_factor
        }
    }
}
