//! T5's encoder: transformers' `T5EncoderModel` (Raffel et al. 2020, "Exploring the Limits of
//! Transfer Learning with a Unified Text-to-Text Transformer"), the text encoder of
//! Imagen-style models (Saharia et al. 2022).
//!
//! Pre-norm blocks with T5's RMS layer norm (no mean, no bias), unscaled attention whose
//! scores get a learned relative-position bias (bucketed distances; computed by block 0 and
//! shared by all blocks) plus the padding mask, and a `relu` (T5) or gated `gelu_new`
//! (T5 v1.1, `gated-gelu`) feed-forward.
//!
//! Half precision: transformers keeps `wo` in f32 when it loads T5 in f16
//! (`_keep_in_fp32_modules`), which turns the residual stream f32 from the first
//! feed-forward on. We keep `wo` and the whole residual stream in f32 for f16 models (the
//! sublayers compute in f16), which also makes transformers' f16 overflow clamp unnecessary.

use candle_core::{DType, Module, Result, Tensor, D};
use candle_nn::{Embedding, Init, VarBuilder};
use ltd_nn::attention::{attention, merge_heads, split_heads, AttentionOptions};
use ltd_nn::layers::Linear;
use ltd_nn::{ConfigError, RuntimeOptions};
use serde::Deserialize;

use crate::activation::HiddenAct;

/// A T5 `config.json`, field for field (transformers' `T5Config`, with its defaults; unknown
/// fields, decoder ones included, ignored).
#[derive(Debug, Clone, PartialEq, Deserialize)]
pub struct T5Config {
    /// Rows of the shared token embedding.
    #[serde(default = "defaults::vocab_size")]
    pub vocab_size: usize,
    /// Width of the residual stream.
    #[serde(default = "defaults::d_model")]
    pub d_model: usize,
    /// Width of one attention head.
    #[serde(default = "defaults::d_kv")]
    pub d_kv: usize,
    /// Width of the feed-forward.
    #[serde(default = "defaults::d_ff")]
    pub d_ff: usize,
    /// Number of encoder blocks.
    #[serde(default = "defaults::num_layers")]
    pub num_layers: usize,
    /// Attention heads per block.
    #[serde(default = "defaults::num_heads")]
    pub num_heads: usize,
    /// Number of relative-position buckets.
    #[serde(default = "defaults::relative_attention_num_buckets")]
    pub relative_attention_num_buckets: usize,
    /// Distance from which all relative positions share a bucket.
    #[serde(default = "defaults::relative_attention_max_distance")]
    pub relative_attention_max_distance: usize,
    /// RMS-norm epsilon.
    #[serde(default = "defaults::layer_norm_epsilon")]
    pub layer_norm_epsilon: f64,
    /// `"{act}"` or `"gated-{act}"`; `"gated-gelu"` means the tanh GELU (`gelu_new`).
    #[serde(default = "defaults::feed_forward_proj")]
    pub feed_forward_proj: String,
    /// Not a `T5Config` field but an extra attribute a config may carry: diffusers'
    /// `StableDiffusionPipeline` passes the tokenizer's attention mask to the text encoder
    /// only when it is there and true. `null` counts as false.
    #[serde(default, deserialize_with = "bool_or_null")]
    pub use_attention_mask: bool,
}

fn bool_or_null<'de, D: serde::Deserializer<'de>>(d: D) -> std::result::Result<bool, D::Error> {
    Ok(Option::<bool>::deserialize(d)?.unwrap_or(false))
}

mod defaults {
    pub fn vocab_size() -> usize {
        32128
    }
    pub fn d_model() -> usize {
        512
    }
    pub fn d_kv() -> usize {
        64
    }
    pub fn d_ff() -> usize {
        2048
    }
    pub fn num_layers() -> usize {
        6
    }
    pub fn num_heads() -> usize {
        8
    }
    pub fn relative_attention_num_buckets() -> usize {
        32
    }
    pub fn relative_attention_max_distance() -> usize {
        128
    }
    pub fn layer_norm_epsilon() -> f64 {
        1e-6
    }
    pub fn feed_forward_proj() -> String {
        "relu".into()
    }
}

/// A validated T5 encoder config.
#[derive(Debug, Clone, PartialEq)]
pub struct T5Params {
    /// Rows of the shared token embedding.
    pub vocab_size: usize,
    /// Width of the residual stream.
    pub d_model: usize,
    /// Width of one attention head.
    pub d_kv: usize,
    /// Width of the feed-forward.
    pub d_ff: usize,
    /// Number of encoder blocks.
    pub num_layers: usize,
    /// Attention heads per block.
    pub num_heads: usize,
    /// Number of relative-position buckets.
    pub num_buckets: usize,
    /// Distance from which all relative positions share a bucket.
    pub max_distance: usize,
    /// RMS-norm epsilon.
    pub layer_norm_epsilon: f64,
    /// The feed-forward activation.
    pub dense_act_fn: HiddenAct,
    /// Gated feed-forward (`wi_0`, `wi_1`) instead of one `wi`.
    pub is_gated_act: bool,
    /// The config's `use_attention_mask` (see [`T5Config::use_attention_mask`]).
    pub use_attention_mask: bool,
}

impl TryFrom<T5Config> for T5Params {
    type Error = ConfigError;

    fn try_from(c: T5Config) -> std::result::Result<Self, ConfigError> {
        for (field, v) in [
            ("vocab_size", c.vocab_size),
            ("d_model", c.d_model),
            ("d_kv", c.d_kv),
            ("d_ff", c.d_ff),
            ("num_heads", c.num_heads),
        ] {
            if v == 0 {
                return Err(ConfigError::new(field, "must be positive"));
            }
        }
        // Bidirectional buckets: half per direction, half of those exact.
        if c.relative_attention_num_buckets < 4 {
            return Err(ConfigError::new(
                "relative_attention_num_buckets",
                format!("{} is too small (at least 4)", c.relative_attention_num_buckets),
            ));
        }
        if c.relative_attention_max_distance <= c.relative_attention_num_buckets / 4 {
            return Err(ConfigError::new(
                "relative_attention_max_distance",
                format!(
                    "{} must exceed the exact range ({})",
                    c.relative_attention_max_distance,
                    c.relative_attention_num_buckets / 4
                ),
            ));
        }
        // transformers' T5Config.__post_init__.
        let parts: Vec<&str> = c.feed_forward_proj.split('-').collect();
        let (is_gated_act, act) = match parts.as_slice() {
            [act] => (false, *act),
            ["gated", act] => (true, *act),
            _ => return Err(ConfigError::unsupported("feed_forward_proj", &c.feed_forward_proj)),
        };
        let act = if c.feed_forward_proj == "gated-gelu" { "gelu_new" } else { act };
        Ok(Self {
            vocab_size: c.vocab_size,
            d_model: c.d_model,
            d_kv: c.d_kv,
            d_ff: c.d_ff,
            num_layers: c.num_layers,
            num_heads: c.num_heads,
            num_buckets: c.relative_attention_num_buckets,
            max_distance: c.relative_attention_max_distance,
            layer_norm_epsilon: c.layer_norm_epsilon,
            dense_act_fn: HiddenAct::parse(act, "feed_forward_proj")?,
            is_gated_act,
            use_attention_mask: c.use_attention_mask,
        })
    }
}

/// T5's layer norm: `w · x / √(mean(x²) + ε)`, statistics in f32, result in the weight's dtype.
#[derive(Debug, Clone)]
struct T5LayerNorm {
    weight: Tensor,
    eps: f64,
}

impl T5LayerNorm {
    fn new(vb: VarBuilder, dim: usize, eps: f64) -> Result<Self> {
        Ok(Self { weight: vb.get_with_hints(dim, "weight", Init::Const(1.0))?, eps })
    }

    fn forward(&self, x: &Tensor) -> Result<Tensor> {
        let x = x.to_dtype(DType::F32)?;
        let var = x.sqr()?.mean_keepdim(D::Minus1)?;
        let x = x.broadcast_div(&(var + self.eps)?.sqrt()?)?;
        x.to_dtype(self.weight.dtype())?.broadcast_mul(&self.weight)
    }
}

#[derive(Debug, Clone)]
struct T5Attention {
    q: Linear,
    k: Linear,
    v: Linear,
    o: Linear,
    relative_attention_bias: Option<Embedding>,
    heads: usize,
    opts: AttentionOptions,
}

impl T5Attention {
    fn new(vb: VarBuilder, p: &T5Params, has_bias: bool, opts: &AttentionOptions) -> Result<Self> {
        let inner = p.num_heads * p.d_kv;
        let relative_attention_bias = if has_bias {
            Some(candle_nn::embedding(
                p.num_buckets,
                p.num_heads,
                vb.pp("relative_attention_bias"),
            )?)
        } else {
            None
        };
        Ok(Self {
            q: Linear::new(vb.pp("q"), p.d_model, inner, false)?,
            k: Linear::new(vb.pp("k"), p.d_model, inner, false)?,
            v: Linear::new(vb.pp("v"), p.d_model, inner, false)?,
            o: Linear::new(vb.pp("o"), inner, p.d_model, false)?,
            relative_attention_bias,
            heads: p.num_heads,
            opts: *opts,
        })
    }

    fn forward(&self, x: &Tensor, bias: &Tensor) -> Result<Tensor> {
        let q = split_heads(&self.q.forward(x)?, self.heads)?;
        let k = split_heads(&self.k.forward(x)?, self.heads)?;
        let v = split_heads(&self.v.forward(x)?, self.heads)?;
        // T5 folds the scale into its initialisation: no 1/√d.
        let out = attention(&q, &k, &v, Some(bias), 1.0, true, &self.opts)?;
        self.o.forward(&merge_heads(&out)?)
    }
}

#[derive(Debug, Clone)]
struct T5FeedForward {
    wi: Vec<Linear>,
    wo: Linear,
    act: HiddenAct,
}

impl T5FeedForward {
    fn new(vb: VarBuilder, p: &T5Params, wo_dtype: DType) -> Result<Self> {
        let wi = if p.is_gated_act {
            vec![
                Linear::new(vb.pp("wi_0"), p.d_model, p.d_ff, false)?,
                Linear::new(vb.pp("wi_1"), p.d_model, p.d_ff, false)?,
            ]
        } else {
            vec![Linear::new(vb.pp("wi"), p.d_model, p.d_ff, false)?]
        };
        let wo = Linear::new(vb.pp("wo").to_dtype(wo_dtype), p.d_ff, p.d_model, false)?;
        Ok(Self { wi, wo, act: p.dense_act_fn })
    }

    fn forward(&self, x: &Tensor) -> Result<Tensor> {
        let mut h = self.act.forward(&self.wi[0].forward(x)?)?;
        if let Some(linear) = self.wi.get(1) {
            h = (h * linear.forward(x)?)?;
        }
        self.wo.forward(&h.to_dtype(self.wo.weight().dtype())?)
    }
}

#[derive(Debug, Clone)]
struct T5Block {
    attn_norm: T5LayerNorm,
    attn: T5Attention,
    ff_norm: T5LayerNorm,
    ff: T5FeedForward,
}

/// transformers' `T5EncoderModel`: `shared` token embedding and the `encoder` stack.
#[derive(Debug, Clone)]
pub struct T5EncoderModel {
    shared: Embedding,
    blocks: Vec<T5Block>,
    final_layer_norm: T5LayerNorm,
    params: T5Params,
    dtype: DType,
}

impl T5EncoderModel {
    /// Fetches `shared.weight` and `encoder.block.{i}.layer.{0,1}.*`,
    /// `encoder.final_layer_norm.weight` from `vb`.
    pub fn new(vb: VarBuilder, params: &T5Params, runtime: &RuntimeOptions) -> Result<Self> {
        let p = params;
        let dtype = vb.dtype();
        let wo_dtype = if dtype == DType::F16 { DType::F32 } else { dtype };
        let shared = candle_nn::embedding(p.vocab_size, p.d_model, vb.pp("shared"))?;
        let enc = vb.pp("encoder");
        let blocks = (0..p.num_layers)
            .map(|i| {
                let b = enc.pp(format!("block.{i}.layer"));
                let eps = p.layer_norm_epsilon;
                Ok(T5Block {
                    attn_norm: T5LayerNorm::new(b.pp("0.layer_norm"), p.d_model, eps)?,
                    attn: T5Attention::new(b.pp("0.SelfAttention"), p, i == 0, &runtime.attention)?,
                    ff_norm: T5LayerNorm::new(b.pp("1.layer_norm"), p.d_model, eps)?,
                    ff: T5FeedForward::new(b.pp("1.DenseReluDense"), p, wo_dtype)?,
                })
            })
            .collect::<Result<Vec<_>>>()?;
        let final_layer_norm =
            T5LayerNorm::new(enc.pp("final_layer_norm"), p.d_model, p.layer_norm_epsilon)?;
        Ok(Self { shared, blocks, final_layer_norm, params: p.clone(), dtype })
    }

    /// The validated config.
    pub fn params(&self) -> &T5Params {
        &self.params
    }

    /// `last_hidden_state` `[B, L, d_model]` for `input_ids` `[B, L]` and an optional
    /// `attention_mask` `[B, L]` (1 = token, 0 = padding), as transformers computes it.
    pub fn forward(&self, input_ids: &Tensor, attention_mask: Option<&Tensor>) -> Result<Tensor> {
        let (b, len) = input_ids.dims2()?;
        let device = input_ids.device();
        // The residual stream is f32 for f16 models (see the module docs).
        let stream = if self.dtype == DType::F16 { DType::F32 } else { self.dtype };
        let mut h = self.shared.forward(input_ids)?.to_dtype(stream)?;

        let Some(table) = self.blocks.first().and_then(|b| b.attn.relative_attention_bias.as_ref())
        else {
            candle_core::bail!("a T5 encoder needs at least one block")
        };
        let buckets: Vec<u32> = (0..len)
            .flat_map(|q| (0..len).map(move |k| k as i64 - q as i64))
            .map(|rel| self.bucket(rel))
            .collect();
        let buckets = Tensor::from_vec(buckets, len * len, device)?;
        // [L·L, H] → [1, H, L, L], in f32 like the scores.
        let mut bias = table
            .forward(&buckets)?
            .to_dtype(DType::F32)?
            .reshape((len, len, self.params.num_heads))?
            .permute((2, 0, 1))?
            .unsqueeze(0)?;
        if let Some(mask) = attention_mask {
            // transformers adds the dtype's lowest value at padded keys.
            let mask = mask.to_dtype(DType::F32)?.reshape((b, 1, 1, len))?;
            let additive = ((mask - 1.0)? * -(f32::MIN as f64))?;
            bias = bias.broadcast_add(&additive)?;
        }
        let bias = bias.contiguous()?;

        for block in &self.blocks {
            let x = block.attn_norm.forward(&h)?.to_dtype(self.dtype)?;
            h = (h + block.attn.forward(&x, &bias)?.to_dtype(stream)?)?;
            let x = block.ff_norm.forward(&h)?.to_dtype(self.dtype)?;
            h = (h + block.ff.forward(&x)?.to_dtype(stream)?)?;
        }
        self.final_layer_norm.forward(&h)?.to_dtype(self.dtype)
    }

    /// The bucket of a relative position `key − query` (bidirectional, as in the encoder):
    /// half the buckets per direction, exact below `n/4`, logarithmic up to `max_distance`.
    fn bucket(&self, rel: i64) -> u32 {
        let half = self.params.num_buckets / 2;
        let offset = if rel > 0 { half } else { 0 };
        let n = rel.unsigned_abs() as usize;
        let max_exact = half / 2;
        let b = if n < max_exact {
            n
        } else {
            // f64 lands on the exact integers (n = 16 with max_exact 8, max_distance 32 → 4)
            // where torch's f32 does too.
            let scaled = (n as f64 / max_exact as f64).ln()
                / (self.params.max_distance as f64 / max_exact as f64).ln()
                * (half - max_exact) as f64;
            (max_exact + scaled as usize).min(half - 1)
        };
        (offset + b) as u32
    }
}
