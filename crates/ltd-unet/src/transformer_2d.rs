//! The spatial transformer of latent diffusion (Rombach et al. 2022, §3.3): diffusers'
//! `Transformer2DModel` (`models/transformers/transformer_2d.py`) over `BasicTransformerBlock`s
//! and their `FeedForward` (`models/attention.py`): self-attention, cross-attention to the
//! text, GEGLU feed-forward (Shazeer 2020), each pre-norm with a residual.

use candle_core::{Module, Result, Tensor};
use candle_nn::VarBuilder;

use ltd_nn::attention::AttentionOptions;
use ltd_nn::layers::{Attention, AttentionConfig, Conv2d, GroupNorm, LayerNorm, Linear};
use ltd_nn::{Quantization, QuantizeReport};

/// diffusers' `FeedForward(dim, activation_fn="geglu")`: `net.0.proj` to twice the inner width
/// (4·dim), the erf GELU of one half gating the other, then `net.2` back to `dim`.
#[derive(Debug, Clone)]
pub struct FeedForward {
    proj: Linear,
    out: Linear,
    inner: usize,
}

impl FeedForward {
    /// Fetches `net.0.proj` and `net.2`.
    pub fn new(vb: VarBuilder, dim: usize) -> Result<Self> {
        let inner = 4 * dim;
        Ok(Self {
            proj: Linear::new(vb.pp("net").pp("0").pp("proj"), dim, 2 * inner, true)?,
            out: Linear::new(vb.pp("net").pp("2"), inner, dim, true)?,
            inner,
        })
    }
}

impl FeedForward {
    /// Quantizes `net.0.proj` and `net.2` where their shapes allow.
    pub fn quantize(&mut self, q: Quantization) -> Result<QuantizeReport> {
        let mut report = self.proj.quantize(q)?;
        report.add(self.out.quantize(q)?);
        Ok(report)
    }
}

impl Module for FeedForward {
    fn forward(&self, x: &Tensor) -> Result<Tensor> {
        self.out.forward(&self.proj.forward_geglu(x, self.inner)?)
    }
}

/// The shape of a [`Transformer2DModel`] and its blocks.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Transformer2DConfig {
    /// Channels of the feature map (in and out).
    pub in_channels: usize,
    /// Attention heads.
    pub heads: usize,
    /// Width of a head; `heads · head_dim` is the transformer's inner width.
    pub head_dim: usize,
    /// Number of `BasicTransformerBlock`s.
    pub depth: usize,
    /// Width of the text states attended to.
    pub cross_attention_dim: usize,
    /// Groups of the input group norm (whose eps is always 1e-6).
    pub norm_num_groups: usize,
    /// `proj_in`/`proj_out` are linear layers (SD 2.x, XL) rather than 1×1 convolutions.
    pub use_linear_projection: bool,
    /// The first attention also attends to the text instead of the image (`only_cross_attention`).
    pub only_cross_attention: bool,
    /// Scores and softmax in f32 (`upcast_attention`).
    pub upcast_attention: bool,
}

/// diffusers' `BasicTransformerBlock` with `norm_type="layer_norm"`: `attn1` (self-attention,
/// or cross-attention with `only_cross_attention`), `attn2` (cross-attention), `ff`, each
/// after a LayerNorm (eps 1e-5) and with a residual.
#[derive(Debug, Clone)]
pub struct BasicTransformerBlock {
    norm1: LayerNorm,
    attn1: Attention,
    norm2: LayerNorm,
    attn2: Attention,
    norm3: LayerNorm,
    ff: FeedForward,
    only_cross_attention: bool,
}

impl BasicTransformerBlock {
    /// Fetches `norm1`, `attn1`, `norm2`, `attn2`, `norm3`, `ff`.
    pub fn new(vb: VarBuilder, cfg: &Transformer2DConfig, opts: &AttentionOptions) -> Result<Self> {
        let dim = cfg.heads * cfg.head_dim;
        let attn = |cross: Option<usize>| AttentionConfig {
            query_dim: dim,
            cross_attention_dim: cross,
            heads: cfg.heads,
            dim_head: cfg.head_dim,
            bias: false,
            upcast: cfg.upcast_attention,
        };
        let attn1_cross = cfg.only_cross_attention.then_some(cfg.cross_attention_dim);
        Ok(Self {
            norm1: LayerNorm::new(vb.pp("norm1"), dim, 1e-5)?,
            attn1: Attention::new(vb.pp("attn1"), &attn(attn1_cross), opts)?,
            norm2: LayerNorm::new(vb.pp("norm2"), dim, 1e-5)?,
            attn2: Attention::new(vb.pp("attn2"), &attn(Some(cfg.cross_attention_dim)), opts)?,
            norm3: LayerNorm::new(vb.pp("norm3"), dim, 1e-5)?,
            ff: FeedForward::new(vb.pp("ff"), dim)?,
            only_cross_attention: cfg.only_cross_attention,
        })
    }

    /// Quantizes the linear layers of `attn1`, `attn2` and `ff` where their shapes allow.
    pub fn quantize(&mut self, q: Quantization) -> Result<QuantizeReport> {
        let mut report = self.attn1.quantize(q)?;
        report.add(self.attn2.quantize(q)?);
        report.add(self.ff.quantize(q)?);
        Ok(report)
    }

    /// `x: [B, L, dim]`, `context: [B, Lk, cross_attention_dim]`.
    pub fn forward(&self, x: &Tensor, context: &Tensor) -> Result<Tensor> {
        let attn1_context = self.only_cross_attention.then_some(context);
        let x = (self.attn1.forward(&self.norm1.forward(x)?, attn1_context)? + x)?;
        let x = (self.attn2.forward(&self.norm2.forward(&x)?, Some(context))? + &x)?;
        self.ff.forward(&self.norm3.forward(&x)?)? + &x
    }
}

/// The input/output projection of a [`Transformer2DModel`].
#[derive(Debug, Clone)]
enum Projection {
    Linear(Linear),
    Conv(Conv2d),
}

impl Projection {
    fn new(vb: VarBuilder, linear: bool, cin: usize, cout: usize) -> Result<Self> {
        Ok(if linear {
            Self::Linear(Linear::new(vb, cin, cout, true)?)
        } else {
            Self::Conv(Conv2d::new(vb, cin, cout, 1, 0, 1)?)
        })
    }

    /// Quantizes a linear projection (a 1×1 convolution stays as it is).
    fn quantize(&mut self, q: Quantization) -> Result<QuantizeReport> {
        match self {
            Self::Linear(l) => l.quantize(q),
            Self::Conv(_) => Ok(QuantizeReport::default()),
        }
    }

    /// Applies to channels-last tokens `[B, L, C]`: a 1×1 convolution is the same map.
    fn forward(&self, x: &Tensor) -> Result<Tensor> {
        match self {
            Self::Linear(l) => l.forward(x),
            Self::Conv(c) => c.forward_channels_last(x),
        }
    }
}

/// diffusers' `Transformer2DModel` on continuous inputs: group norm (eps 1e-6), `proj_in`,
/// the blocks over the `H·W` tokens, `proj_out`, residual.
#[derive(Debug, Clone)]
pub struct Transformer2DModel {
    norm: GroupNorm,
    proj_in: Projection,
    transformer_blocks: Vec<BasicTransformerBlock>,
    proj_out: Projection,
}

impl Transformer2DModel {
    /// Fetches `norm`, `proj_in`, `transformer_blocks.{i}`, `proj_out`.
    pub fn new(vb: VarBuilder, cfg: &Transformer2DConfig, opts: &AttentionOptions) -> Result<Self> {
        let inner = cfg.heads * cfg.head_dim;
        let linear = cfg.use_linear_projection;
        let blocks = (0..cfg.depth)
            .map(|i| BasicTransformerBlock::new(vb.pp("transformer_blocks").pp(i), cfg, opts))
            .collect::<Result<Vec<_>>>()?;
        Ok(Self {
            norm: GroupNorm::new(vb.pp("norm"), cfg.norm_num_groups, cfg.in_channels, 1e-6)?,
            proj_in: Projection::new(vb.pp("proj_in"), linear, cfg.in_channels, inner)?,
            transformer_blocks: blocks,
            proj_out: Projection::new(vb.pp("proj_out"), linear, inner, cfg.in_channels)?,
        })
    }

    /// Quantizes every linear layer (the blocks' and linear `proj_in`/`proj_out`) whose rows
    /// split into whole blocks; norms stay as they are.
    pub fn quantize(&mut self, q: Quantization) -> Result<QuantizeReport> {
        let mut report = self.proj_in.quantize(q)?;
        report.add(self.proj_out.quantize(q)?);
        for block in &mut self.transformer_blocks {
            report.add(block.quantize(q)?);
        }
        Ok(report)
    }

    /// `x: [B, C, H, W]`, `context: [B, Lk, cross_attention_dim]` → `[B, C, H, W]`.
    pub fn forward(&self, x: &Tensor, context: &Tensor) -> Result<Tensor> {
        let (b, c, h, w) = x.dims4()?;
        let tokens = self.norm.forward(x)?.permute((0, 2, 3, 1))?.reshape((b, h * w, c))?;
        let mut hs = self.proj_in.forward(&tokens)?;
        for block in &self.transformer_blocks {
            hs = block.forward(&hs, context)?;
        }
        let hs = self.proj_out.forward(&hs)?;
        let hs = hs.reshape((b, h, w, c))?.permute((0, 3, 1, 2))?;
        hs + x
    }
}
