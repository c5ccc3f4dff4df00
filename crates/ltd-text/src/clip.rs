//! CLIP's text transformer: transformers' `CLIPTextModel` and `CLIPTextModelWithProjection`
//! (Radford et al. 2021, "Learning Transferable Visual Models From Natural Language
//! Supervision"), the text encoders of SD 1.x (ViT-L/14, `quick_gelu`), SD 2.x (OpenCLIP
//! ViT-H, `gelu`) and SDXL (both, the second with its projection).
//!
//! Module paths are transformers 5.x's state-dict keys: `CLIPTextModel` holds
//! `embeddings.*`, `encoder.layers.{i}.*`, `final_layer_norm.*` at its root (checkpoints
//! written by transformers 4.x prefix them with `text_model.`, which the folder loader
//! handles); `CLIPTextModelWithProjection` holds `text_model.*` and `text_projection.weight`.

use candle_core::{DType, Module, Result, Tensor};
use candle_nn::{Embedding, VarBuilder};
use ltd_nn::attention::{attention, causal_mask, merge_heads, split_heads, AttentionOptions};
use ltd_nn::layers::{LayerNorm, Linear};
use ltd_nn::{ConfigError, OneOrMany, RuntimeOptions};
use serde::Deserialize;

use crate::activation::HiddenAct;

/// A CLIP text encoder's `config.json`, field for field (transformers' `CLIPTextConfig`,
/// with its defaults; unknown fields ignored).
#[derive(Debug, Clone, PartialEq, Deserialize)]
pub struct CLIPTextConfig {
    /// Rows of the token embedding.
    #[serde(default = "defaults::vocab_size")]
    pub vocab_size: usize,
    /// Width of the transformer.
    #[serde(default = "defaults::hidden_size")]
    pub hidden_size: usize,
    /// Width of the MLP.
    #[serde(default = "defaults::intermediate_size")]
    pub intermediate_size: usize,
    /// Output width of `text_projection` (used by `CLIPTextModelWithProjection`).
    #[serde(default = "defaults::projection_dim")]
    pub projection_dim: Option<usize>,
    /// Number of encoder layers.
    #[serde(default = "defaults::num_hidden_layers")]
    pub num_hidden_layers: usize,
    /// Attention heads per layer.
    #[serde(default = "defaults::num_attention_heads")]
    pub num_attention_heads: usize,
    /// Rows of the position embedding: the longest sequence the model takes.
    #[serde(default = "defaults::max_position_embeddings")]
    pub max_position_embeddings: usize,
    /// The MLP activation (`quick_gelu` for OpenAI CLIP, `gelu` for OpenCLIP).
    #[serde(default = "defaults::hidden_act")]
    pub hidden_act: String,
    /// Layer-norm epsilon.
    #[serde(default = "defaults::layer_norm_eps")]
    pub layer_norm_eps: Option<f64>,
    /// The EOS id pooling looks for; the legacy value 2 means "the highest id".
    #[serde(default = "defaults::eos_token_id")]
    pub eos_token_id: Option<OneOrMany<i64>>,
}

mod defaults {
    use ltd_nn::OneOrMany;

    pub fn vocab_size() -> usize {
        49408
    }
    pub fn hidden_size() -> usize {
        512
    }
    pub fn intermediate_size() -> usize {
        2048
    }
    pub fn projection_dim() -> Option<usize> {
        Some(512)
    }
    pub fn num_hidden_layers() -> usize {
        12
    }
    pub fn num_attention_heads() -> usize {
        8
    }
    pub fn max_position_embeddings() -> usize {
        77
    }
    pub fn hidden_act() -> String {
        "quick_gelu".into()
    }
    pub fn layer_norm_eps() -> Option<f64> {
        Some(1e-5)
    }
    pub fn eos_token_id() -> Option<OneOrMany<i64>> {
        Some(OneOrMany::One(49407))
    }
}

/// Where the pooled output is read.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Pooling {
    /// At the highest id of each row (`eos_token_id == 2`, the configs of every SD release:
    /// EOS is the highest id of the CLIP vocabulary).
    HighestId,
    /// At the first position of this id in each row (position 0 if absent).
    FirstId(u32),
}

/// A validated CLIP text config.
#[derive(Debug, Clone, PartialEq)]
pub struct ClipTextParams {
    /// Rows of the token embedding.
    pub vocab_size: usize,
    /// Width of the transformer.
    pub hidden_size: usize,
    /// Width of the MLP.
    pub intermediate_size: usize,
    /// Output width of `text_projection`, when the config has one.
    pub projection_dim: Option<usize>,
    /// Number of encoder layers.
    pub num_hidden_layers: usize,
    /// Attention heads per layer.
    pub num_attention_heads: usize,
    /// Longest sequence the model takes.
    pub max_position_embeddings: usize,
    /// The MLP activation.
    pub hidden_act: HiddenAct,
    /// Layer-norm epsilon.
    pub layer_norm_eps: f64,
    /// Where the pooled output is read.
    pub pooling: Pooling,
}

impl TryFrom<CLIPTextConfig> for ClipTextParams {
    type Error = ConfigError;

    fn try_from(c: CLIPTextConfig) -> std::result::Result<Self, ConfigError> {
        for (field, v) in [
            ("vocab_size", c.vocab_size),
            ("hidden_size", c.hidden_size),
            ("intermediate_size", c.intermediate_size),
            ("num_attention_heads", c.num_attention_heads),
            ("max_position_embeddings", c.max_position_embeddings),
        ] {
            if v == 0 {
                return Err(ConfigError::new(field, "must be positive"));
            }
        }
        if !c.hidden_size.is_multiple_of(c.num_attention_heads) {
            return Err(ConfigError::new(
                "num_attention_heads",
                format!("{} does not divide hidden_size {}", c.num_attention_heads, c.hidden_size),
            ));
        }
        let layer_norm_eps = c
            .layer_norm_eps
            .filter(|e| e.is_finite() && *e >= 0.0)
            .ok_or_else(|| ConfigError::unsupported("layer_norm_eps", c.layer_norm_eps))?;
        let pooling = match c.eos_token_id {
            Some(OneOrMany::One(2)) => Pooling::HighestId,
            Some(OneOrMany::One(id)) => Pooling::FirstId(
                u32::try_from(id).map_err(|_| ConfigError::unsupported("eos_token_id", id))?,
            ),
            other => return Err(ConfigError::unsupported("eos_token_id", other)),
        };
        Ok(Self {
            vocab_size: c.vocab_size,
            hidden_size: c.hidden_size,
            intermediate_size: c.intermediate_size,
            projection_dim: c.projection_dim.filter(|&d| d > 0),
            num_hidden_layers: c.num_hidden_layers,
            num_attention_heads: c.num_attention_heads,
            max_position_embeddings: c.max_position_embeddings,
            hidden_act: HiddenAct::parse(&c.hidden_act, "hidden_act")?,
            layer_norm_eps,
            pooling,
        })
    }
}

/// Which hidden states an encoding returns. Indices are Python's into transformers'
/// `hidden_states` tuple: 0 is the embeddings' output, `i` the output of layer `i`, negative
/// ones count from the end (`-1` is the last layer, before the final layer norm).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ClipLayer {
    /// `last_hidden_state`: the last layer after `final_layer_norm` (SD 1.x/2.x default).
    Last,
    /// `hidden_states[i]` as is (SDXL: `hidden_states[-2]`).
    Hidden(isize),
    /// `final_layer_norm(hidden_states[i])` (SD 1.x/2.x with `clip_skip`).
    HiddenNormed(isize),
}

impl ClipLayer {
    /// What diffusers' `StableDiffusionPipeline.encode_prompt` uses: `last_hidden_state`, or
    /// with `clip_skip = k`, `final_layer_norm(hidden_states[-(k + 1)])`.
    pub fn stable_diffusion(clip_skip: Option<usize>) -> Self {
        match clip_skip {
            None => Self::Last,
            Some(k) => Self::HiddenNormed(-(k as isize) - 1),
        }
    }

    /// What diffusers' `StableDiffusionXLPipeline.encode_prompt` uses for both encoders:
    /// `hidden_states[-(k + 2)]` without the final layer norm (`k = 0`, the penultimate layer,
    /// by default).
    pub fn stable_diffusion_xl(clip_skip: Option<usize>) -> Self {
        Self::Hidden(-(clip_skip.unwrap_or(0) as isize) - 2)
    }

    /// The index into `hidden_states` (of `num_layers + 1` entries) this layer reads, or
    /// `None` for [`ClipLayer::Last`].
    fn index(self, num_layers: usize) -> Result<Option<usize>> {
        let i = match self {
            Self::Last => return Ok(None),
            Self::Hidden(i) | Self::HiddenNormed(i) => i,
        };
        let n = num_layers as isize + 1;
        let resolved = if i < 0 { n + i } else { i };
        if !(0..n).contains(&resolved) {
            candle_core::bail!(
                "hidden_states[{i}] does not exist: the model has {num_layers} layers, so \
                 hidden_states has {n} entries"
            )
        }
        Ok(Some(resolved as usize))
    }
}

/// What an encoding returns.
#[derive(Debug, Clone)]
pub struct ClipTextOutput {
    /// The requested layer's states, `[B, L, hidden_size]`.
    pub hidden: Tensor,
    /// `pooler_output`, `[B, hidden_size]`: the last layer after the final layer norm, at each
    /// row's EOS (when requested).
    pub pooled: Option<Tensor>,
    /// `text_embeds = text_projection(pooled)`, `[B, projection_dim]` (projection model only).
    pub text_embeds: Option<Tensor>,
}

#[derive(Debug, Clone)]
struct ClipAttention {
    q_proj: Linear,
    k_proj: Linear,
    v_proj: Linear,
    out_proj: Linear,
    heads: usize,
    scale: f64,
    opts: AttentionOptions,
}

impl ClipAttention {
    fn new(vb: VarBuilder, p: &ClipTextParams, opts: &AttentionOptions) -> Result<Self> {
        let d = p.hidden_size;
        Ok(Self {
            q_proj: Linear::new(vb.pp("q_proj"), d, d, true)?,
            k_proj: Linear::new(vb.pp("k_proj"), d, d, true)?,
            v_proj: Linear::new(vb.pp("v_proj"), d, d, true)?,
            out_proj: Linear::new(vb.pp("out_proj"), d, d, true)?,
            heads: p.num_attention_heads,
            scale: ((d / p.num_attention_heads) as f64).powf(-0.5),
            opts: *opts,
        })
    }

    fn forward(&self, x: &Tensor, mask: &Tensor) -> Result<Tensor> {
        let q = split_heads(&self.q_proj.forward(x)?, self.heads)?;
        let k = split_heads(&self.k_proj.forward(x)?, self.heads)?;
        let v = split_heads(&self.v_proj.forward(x)?, self.heads)?;
        // transformers computes the softmax in f32 whatever the dtype; so do we.
        let out = attention(&q, &k, &v, Some(mask), self.scale, true, &self.opts)?;
        self.out_proj.forward(&merge_heads(&out)?)
    }
}

#[derive(Debug, Clone)]
struct ClipEncoderLayer {
    self_attn: ClipAttention,
    layer_norm1: LayerNorm,
    fc1: Linear,
    fc2: Linear,
    act: HiddenAct,
    layer_norm2: LayerNorm,
}

impl ClipEncoderLayer {
    fn new(vb: VarBuilder, p: &ClipTextParams, opts: &AttentionOptions) -> Result<Self> {
        let (d, eps) = (p.hidden_size, p.layer_norm_eps);
        Ok(Self {
            self_attn: ClipAttention::new(vb.pp("self_attn"), p, opts)?,
            layer_norm1: LayerNorm::new(vb.pp("layer_norm1"), d, eps)?,
            fc1: Linear::new(vb.pp("mlp.fc1"), d, p.intermediate_size, true)?,
            fc2: Linear::new(vb.pp("mlp.fc2"), p.intermediate_size, d, true)?,
            act: p.hidden_act,
            layer_norm2: LayerNorm::new(vb.pp("layer_norm2"), d, eps)?,
        })
    }

    fn forward(&self, x: &Tensor, mask: &Tensor) -> Result<Tensor> {
        let x = (x + self.self_attn.forward(&self.layer_norm1.forward(x)?, mask)?)?;
        let h = self.act.forward(&self.fc1.forward(&self.layer_norm2.forward(&x)?)?)?;
        x + self.fc2.forward(&h)?
    }
}

/// transformers' `CLIPTextModel`: token and position embeddings, causal pre-LN transformer
/// layers, final layer norm, EOS pooling.
#[derive(Debug, Clone)]
pub struct CLIPTextModel {
    token_embedding: Embedding,
    position_embedding: Embedding,
    layers: Vec<ClipEncoderLayer>,
    final_layer_norm: LayerNorm,
    params: ClipTextParams,
}

impl CLIPTextModel {
    /// Fetches `embeddings.*`, `encoder.layers.{i}.*` and `final_layer_norm.*` from `vb`.
    pub fn new(vb: VarBuilder, params: &ClipTextParams, runtime: &RuntimeOptions) -> Result<Self> {
        let d = params.hidden_size;
        let emb = vb.pp("embeddings");
        let token_embedding =
            candle_nn::embedding(params.vocab_size, d, emb.pp("token_embedding"))?;
        let position_embedding =
            candle_nn::embedding(params.max_position_embeddings, d, emb.pp("position_embedding"))?;
        let layers = (0..params.num_hidden_layers)
            .map(|i| {
                ClipEncoderLayer::new(
                    vb.pp(format!("encoder.layers.{i}")),
                    params,
                    &runtime.attention,
                )
            })
            .collect::<Result<Vec<_>>>()?;
        let final_layer_norm = LayerNorm::new(vb.pp("final_layer_norm"), d, params.layer_norm_eps)?;
        Ok(Self {
            token_embedding,
            position_embedding,
            layers,
            final_layer_norm,
            params: params.clone(),
        })
    }

    /// The validated config.
    pub fn params(&self) -> &ClipTextParams {
        &self.params
    }

    /// Textual inversion: `rows` `[n, hidden_size]` become the embeddings of ids
    /// `first_id..first_id + n`, the table cut or grown (with zeros) to `first_id` rows first,
    /// as diffusers' `load_textual_inversion` resizes it to the tokenizer's length.
    pub fn add_token_embeddings(&mut self, first_id: usize, rows: &Tensor) -> Result<()> {
        let d = self.params.hidden_size;
        let (_, width) = rows.dims2()?;
        if width != d {
            candle_core::bail!("embedding vectors of width {width}, the text encoder takes {d}")
        }
        let table = self.token_embedding.embeddings();
        let have = table.dim(0)?;
        let head = if have >= first_id {
            table.narrow(0, 0, first_id)?
        } else {
            let pad = Tensor::zeros((first_id - have, d), table.dtype(), table.device())?;
            Tensor::cat(&[table, &pad], 0)?
        };
        let rows = rows.to_dtype(table.dtype())?.to_device(table.device())?;
        let table = Tensor::cat(&[&head, &rows], 0)?;
        self.token_embedding = Embedding::new(table, d);
        Ok(())
    }

    /// The dtype of the weights.
    pub fn dtype(&self) -> DType {
        self.token_embedding.embeddings().dtype()
    }

    /// `last_hidden_state` for `input_ids` `[B, L]` (u32 or i64): `[B, L, hidden_size]`.
    pub fn forward(&self, input_ids: &Tensor) -> Result<Tensor> {
        Ok(self.encode(input_ids, ClipLayer::Last, false)?.hidden)
    }

    /// `hidden_states[0..=depth]` (0 = embeddings output, `i` = output of layer `i`).
    pub fn hidden_states(&self, input_ids: &Tensor, depth: usize) -> Result<Vec<Tensor>> {
        let mut out = Vec::with_capacity(depth + 1);
        self.run(input_ids, depth, |_, h| out.push(h.clone()))?;
        Ok(out)
    }

    /// The `layer` states of `input_ids`, and with `pooled` the pooled output. Layers past the
    /// requested one run only when the pooled output needs them.
    pub fn encode(
        &self,
        input_ids: &Tensor,
        layer: ClipLayer,
        pooled: bool,
    ) -> Result<ClipTextOutput> {
        let n = self.layers.len();
        let index = layer.index(n)?;
        let depth = if pooled { n } else { index.unwrap_or(n) };
        let mut picked = None;
        let last = self.run(input_ids, depth, |i, h| {
            if Some(i) == index {
                picked = Some(h.clone());
            }
        })?;
        let hidden = match (layer, picked) {
            (ClipLayer::Last, _) => self.final_layer_norm.forward(&last)?,
            (ClipLayer::HiddenNormed(_), Some(h)) => self.final_layer_norm.forward(&h)?,
            (_, Some(h)) => h,
            (_, None) => candle_core::bail!("internal: hidden state {layer:?} was not computed"),
        };
        let pooled = if pooled {
            let normed = match layer {
                ClipLayer::Last => hidden.clone(),
                _ => self.final_layer_norm.forward(&last)?,
            };
            Some(self.pool(input_ids, &normed)?)
        } else {
            None
        };
        Ok(ClipTextOutput { hidden, pooled, text_embeds: None })
    }

    /// Runs the embeddings and the first `depth` layers, calling `visit(i, hidden_states[i])`
    /// for each; returns `hidden_states[depth]`.
    fn run(
        &self,
        input_ids: &Tensor,
        depth: usize,
        mut visit: impl FnMut(usize, &Tensor),
    ) -> Result<Tensor> {
        let (_, len) = input_ids.dims2()?;
        if len > self.params.max_position_embeddings {
            candle_core::bail!(
                "sequence length {len} exceeds max_position_embeddings {}",
                self.params.max_position_embeddings
            )
        }
        let device = input_ids.device();
        let positions = Tensor::arange(0u32, len as u32, device)?;
        let mut h = self
            .token_embedding
            .forward(input_ids)?
            .broadcast_add(&self.position_embedding.forward(&positions)?)?;
        visit(0, &h);
        let mask = causal_mask(len, h.dtype(), device)?;
        for (i, layer) in self.layers.iter().take(depth).enumerate() {
            h = layer.forward(&h, &mask)?;
            visit(i + 1, &h);
        }
        Ok(h)
    }

    /// `pooler_output`: the rows of `last_hidden_state` at each sequence's EOS, as
    /// transformers picks it (highest id for the legacy `eos_token_id == 2`, else the first
    /// position of `eos_token_id`).
    pub fn pool(&self, input_ids: &Tensor, last_hidden_state: &Tensor) -> Result<Tensor> {
        let (b, l, d) = last_hidden_state.dims3()?;
        let rows = input_ids.to_dtype(DType::U32)?.to_vec2::<u32>()?;
        let picks: Vec<u32> = rows
            .iter()
            .enumerate()
            .map(|(r, ids)| {
                let pos = match self.params.pooling {
                    // torch.argmax returns the first of equal maxima.
                    Pooling::HighestId => {
                        let mut best = 0;
                        for (i, &v) in ids.iter().enumerate() {
                            if v > ids[best] {
                                best = i;
                            }
                        }
                        best
                    }
                    Pooling::FirstId(eos) => ids.iter().position(|&v| v == eos).unwrap_or(0),
                };
                (r * l + pos) as u32
            })
            .collect();
        let picks = Tensor::from_vec(picks, b, last_hidden_state.device())?;
        last_hidden_state.reshape((b * l, d))?.index_select(&picks, 0)
    }
}

/// transformers' `CLIPTextModelWithProjection` (SDXL's second text encoder): the text model
/// under `text_model.`, and `text_projection` (no bias) of the pooled output.
#[derive(Debug, Clone)]
pub struct CLIPTextModelWithProjection {
    text_model: CLIPTextModel,
    text_projection: Linear,
}

impl CLIPTextModelWithProjection {
    /// Fetches `text_model.*` and `text_projection.weight` from `vb`.
    pub fn new(vb: VarBuilder, params: &ClipTextParams, runtime: &RuntimeOptions) -> Result<Self> {
        let Some(projection_dim) = params.projection_dim else {
            candle_core::bail!("CLIPTextModelWithProjection needs a positive `projection_dim`")
        };
        let text_model = CLIPTextModel::new(vb.pp("text_model"), params, runtime)?;
        let text_projection =
            Linear::new(vb.pp("text_projection"), params.hidden_size, projection_dim, false)?;
        Ok(Self { text_model, text_projection })
    }

    /// The text model underneath.
    pub fn text_model(&self) -> &CLIPTextModel {
        &self.text_model
    }

    /// The text model underneath, to add textual-inversion embeddings to.
    pub fn text_model_mut(&mut self) -> &mut CLIPTextModel {
        &mut self.text_model
    }

    /// The `layer` states, the pooled output and `text_embeds` (always: they need the whole
    /// model, and SDXL uses them).
    pub fn encode(&self, input_ids: &Tensor, layer: ClipLayer) -> Result<ClipTextOutput> {
        let mut out = self.text_model.encode(input_ids, layer, true)?;
        if let Some(pooled) = &out.pooled {
            out.text_embeds = Some(self.text_projection.forward(pooled)?);
        }
        Ok(out)
    }
}
