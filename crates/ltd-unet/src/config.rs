//! `unet/config.json`: the serde mirror of diffusers' `UNet2DConditionModel` arguments
//! ([`UNet2DConditionModelConfig`], same names and defaults) and the validated architecture it
//! describes ([`UNetConfig`]), with every per-block value resolved.
//!
//! diffusers' historical misnomer is resolved here and only here: in `UNet2DConditionModel`
//! configs `attention_head_dim` is the **number of heads** per block (SD 1.x: 8 heads of 40,
//! 80, 160 channels), unless `num_attention_heads` is given; each head's width is the block's
//! channels divided by its heads. (diffusers 0.42 refuses `num_attention_heads` outright; we
//! read it as what its name says.)
//!
//! DeepFloyd IF's blocks (`ResnetDownsampleBlock2D`, `SimpleCrossAttnDownBlock2D`,
//! `UNetMidBlock2DSimpleCrossAttn`, `SimpleCrossAttnUpBlock2D`, `ResnetUpsampleBlock2D`) read
//! `resnet_skip_time_act`, `resnet_out_scale_factor`, `cross_attention_norm` and
//! `mid_block_only_cross_attention`, and read `attention_head_dim` as the width of a head (as
//! diffusers does for them, and with its up-block quirk: not reversed);
//! `addition_embed_type_num_heads` belongs to `addition_embed_type: "text"`. As in diffusers,
//! these fields have no effect on the other blocks. `dropout` is kept in [`UNetConfig`] but
//! not applied.

use ltd_nn::layers::{Activation, ResnetBlock2DConfig, TimeEmbeddingNorm, UNetMidBlock2DConfig};
use ltd_nn::{ConfigError, OneOrMany};
use serde::{Deserialize, Deserializer};

use crate::embeddings::Timesteps;
use crate::simple_cross_attn::{AddedKVAttentionConfig, Resample, ResnetUpDownConfig};
use crate::transformer_2d::Transformer2DConfig;

/// A boolean that may be `null` in a config; diffusers treats `None` as false.
fn bool_or_null<'de, D: Deserializer<'de>>(d: D) -> Result<bool, D::Error> {
    Ok(Option::<bool>::deserialize(d)?.unwrap_or(false))
}

/// `transformer_layers_per_block`: one depth for every block, one per block, or one per block
/// and ResNet layer (asymmetric U-Nets, with `reverse_transformer_layers_per_block`).
#[derive(Debug, Clone, PartialEq, Deserialize)]
#[serde(untagged)]
pub enum TransformerLayersPerBlock {
    /// The same depth everywhere.
    One(usize),
    /// Per block, each a depth or a list of depths per layer.
    PerBlock(Vec<OneOrMany<usize>>),
}

/// The raw `config.json` of a `UNet2DConditionModel`, field for field in the order of
/// diffusers' `__init__`: a missing field takes its [`Default`] value (diffusers' default), an
/// unknown one is ignored.
#[allow(missing_docs)]
#[derive(Debug, Clone, PartialEq, Deserialize)]
#[serde(default)]
pub struct UNet2DConditionModelConfig {
    pub sample_size: Option<OneOrMany<usize>>,
    pub in_channels: usize,
    pub out_channels: usize,
    #[serde(deserialize_with = "bool_or_null")]
    pub center_input_sample: bool,
    #[serde(deserialize_with = "bool_or_null")]
    pub flip_sin_to_cos: bool,
    pub freq_shift: f64,
    pub down_block_types: Vec<String>,
    pub mid_block_type: Option<String>,
    pub up_block_types: Vec<String>,
    pub only_cross_attention: OneOrMany<bool>,
    pub block_out_channels: Vec<usize>,
    pub layers_per_block: OneOrMany<usize>,
    pub downsample_padding: usize,
    pub mid_block_scale_factor: f64,
    pub dropout: f64,
    pub act_fn: String,
    pub norm_num_groups: Option<usize>,
    pub norm_eps: f64,
    pub cross_attention_dim: OneOrMany<usize>,
    pub transformer_layers_per_block: TransformerLayersPerBlock,
    pub reverse_transformer_layers_per_block: Option<Vec<Vec<usize>>>,
    pub encoder_hid_dim: Option<usize>,
    pub encoder_hid_dim_type: Option<String>,
    pub attention_head_dim: OneOrMany<usize>,
    pub num_attention_heads: Option<OneOrMany<usize>>,
    #[serde(deserialize_with = "bool_or_null")]
    pub dual_cross_attention: bool,
    #[serde(deserialize_with = "bool_or_null")]
    pub use_linear_projection: bool,
    pub class_embed_type: Option<String>,
    pub addition_embed_type: Option<String>,
    pub addition_time_embed_dim: Option<usize>,
    pub num_class_embeds: Option<usize>,
    #[serde(deserialize_with = "bool_or_null")]
    pub upcast_attention: bool,
    pub resnet_time_scale_shift: String,
    #[serde(deserialize_with = "bool_or_null")]
    pub resnet_skip_time_act: bool,
    pub resnet_out_scale_factor: f64,
    pub time_embedding_type: String,
    pub time_embedding_dim: Option<usize>,
    pub time_embedding_act_fn: Option<String>,
    pub timestep_post_act: Option<String>,
    pub time_cond_proj_dim: Option<usize>,
    pub conv_in_kernel: usize,
    pub conv_out_kernel: usize,
    pub projection_class_embeddings_input_dim: Option<usize>,
    pub attention_type: String,
    #[serde(deserialize_with = "bool_or_null")]
    pub class_embeddings_concat: bool,
    pub mid_block_only_cross_attention: Option<bool>,
    pub cross_attention_norm: Option<String>,
    pub addition_embed_type_num_heads: usize,
}

impl Default for UNet2DConditionModelConfig {
    /// The defaults of diffusers' `UNet2DConditionModel.__init__` (0.42), in its order: the
    /// SD 1.x architecture. Every field missing from a `config.json` takes its value from here.
    fn default() -> Self {
        Self {
            sample_size: None,
            in_channels: 4,
            out_channels: 4,
            center_input_sample: false,
            flip_sin_to_cos: true,
            freq_shift: 0.0,
            down_block_types: names(&[
                "CrossAttnDownBlock2D",
                "CrossAttnDownBlock2D",
                "CrossAttnDownBlock2D",
                "DownBlock2D",
            ]),
            mid_block_type: Some("UNetMidBlock2DCrossAttn".into()),
            up_block_types: names(&[
                "UpBlock2D",
                "CrossAttnUpBlock2D",
                "CrossAttnUpBlock2D",
                "CrossAttnUpBlock2D",
            ]),
            only_cross_attention: OneOrMany::One(false),
            block_out_channels: vec![320, 640, 1280, 1280],
            layers_per_block: OneOrMany::One(2),
            downsample_padding: 1,
            mid_block_scale_factor: 1.0,
            dropout: 0.0,
            act_fn: "silu".into(),
            norm_num_groups: Some(32),
            norm_eps: 1e-5,
            cross_attention_dim: OneOrMany::One(1280),
            transformer_layers_per_block: TransformerLayersPerBlock::One(1),
            reverse_transformer_layers_per_block: None,
            encoder_hid_dim: None,
            encoder_hid_dim_type: None,
            attention_head_dim: OneOrMany::One(8),
            num_attention_heads: None,
            dual_cross_attention: false,
            use_linear_projection: false,
            class_embed_type: None,
            addition_embed_type: None,
            addition_time_embed_dim: None,
            num_class_embeds: None,
            upcast_attention: false,
            resnet_time_scale_shift: "default".into(),
            resnet_skip_time_act: false,
            resnet_out_scale_factor: 1.0,
            time_embedding_type: "positional".into(),
            time_embedding_dim: None,
            time_embedding_act_fn: None,
            timestep_post_act: None,
            time_cond_proj_dim: None,
            conv_in_kernel: 3,
            conv_out_kernel: 3,
            projection_class_embeddings_input_dim: None,
            attention_type: "default".into(),
            class_embeddings_concat: false,
            mid_block_only_cross_attention: None,
            cross_attention_norm: None,
            addition_embed_type_num_heads: 64,
        }
    }
}

/// A tuple of block type names, as diffusers writes them.
fn names(types: &[&str]) -> Vec<String> {
    types.iter().map(|&t| t.to_owned()).collect()
}

/// How class labels are embedded and added to the time embedding (`class_embed_type`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ClassEmbedding {
    /// `class_embedding` is an `nn.Embedding(num_class_embeds, time_embed_dim)` over integer labels
    /// (`class_embed_type: null` with `num_class_embeds`).
    Embedding {
        /// Number of classes.
        num_classes: usize,
    },
    /// Labels are timesteps: sinusoidal projection, then a `TimestepEmbedding` (`"timestep"`).
    Timestep,
    /// Labels are already time-embedding vectors (`"identity"`).
    Identity,
    /// Labels are vectors put through a `TimestepEmbedding` (`"projection"`).
    Projection {
        /// `projection_class_embeddings_input_dim`.
        input_dim: usize,
    },
    /// Labels are vectors put through one linear layer (`"simple_projection"`).
    SimpleProjection {
        /// `projection_class_embeddings_input_dim`.
        input_dim: usize,
    },
}

/// SDXL's added conditioning (`addition_embed_type: "text_time"`): the pooled text embedding
/// concatenated with the sinusoidal embeddings of the six size/crop numbers, through
/// `add_embedding` (a `TimestepEmbedding`), added to the time embedding.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct TextTimeEmbedding {
    /// `add_time_proj`: `addition_time_embed_dim` channels per number.
    pub time_proj: Timesteps,
    /// Input width of `add_embedding` (`projection_class_embeddings_input_dim`).
    pub input_dim: usize,
}

/// `addition_embed_type: "text"` (DeepFloyd IF): the text states, attention-pooled and
/// projected by `add_embedding` (diffusers' `TextTimeEmbedding`), added to the time embedding.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct TextAdditionEmbedding {
    /// Width of the text states it pools (`encoder_hid_dim`, else `cross_attention_dim`): the
    /// states before `encoder_hid_proj`.
    pub encoder_dim: usize,
    /// `addition_embed_type_num_heads`.
    pub num_heads: usize,
}

/// DeepFloyd IF's block family (`ResnetDownsampleBlock2D`, `SimpleCrossAttnDownBlock2D` and
/// their up and mid counterparts): ResNet blocks that resample themselves, and added-key/value
/// attention instead of transformers.
#[derive(Debug, Clone, PartialEq)]
pub struct SimpleBlockConfig {
    /// `resnet_skip_time_act`.
    pub skip_time_act: bool,
    /// `attentions.{j}` of the `SimpleCrossAttn…` blocks (empty for the `Resnet…sample…` ones).
    pub attentions: Vec<AddedKVAttentionConfig>,
    /// `downsamplers.0` / `upsamplers.0`: a ResNet block with `down=True` / `up=True`.
    pub sampler: Option<ResnetUpDownConfig>,
}

/// A down block: ResNet blocks, each followed by a transformer in `CrossAttnDownBlock2D`,
/// then an optional stride-2 convolution.
#[derive(Debug, Clone, PartialEq)]
pub struct DownBlockConfig {
    /// The diffusers class name (`CrossAttnDownBlock2D`, `DownBlock2D`,
    /// `SimpleCrossAttnDownBlock2D` or `ResnetDownsampleBlock2D`).
    pub kind: &'static str,
    /// `resnets.{j}`.
    pub resnets: Vec<ResnetBlock2DConfig>,
    /// `attentions.{j}`, one per ResNet block (empty for `DownBlock2D` and IF's blocks).
    pub attentions: Vec<Transformer2DConfig>,
    /// `downsamplers.0`: (channels, padding), absent in the last block and in IF's blocks.
    pub downsample: Option<(usize, usize)>,
    /// IF's blocks: their attention and ResNet downsampler (then `attentions` and
    /// `downsample` are empty).
    pub simple: Option<SimpleBlockConfig>,
}

/// An up block: ResNet blocks over the features concatenated with the skip connections, each
/// followed by a transformer in `CrossAttnUpBlock2D`, then an optional ×2 upsampling.
#[derive(Debug, Clone, PartialEq)]
pub struct UpBlockConfig {
    /// The diffusers class name (`CrossAttnUpBlock2D`, `UpBlock2D`, `SimpleCrossAttnUpBlock2D`
    /// or `ResnetUpsampleBlock2D`).
    pub kind: &'static str,
    /// `resnets.{j}`; each consumes one skip connection.
    pub resnets: Vec<ResnetBlock2DConfig>,
    /// `attentions.{j}`, one per ResNet block (empty for `UpBlock2D` and IF's blocks).
    pub attentions: Vec<Transformer2DConfig>,
    /// `upsamplers.0` over this many channels, absent in the last block (in IF's blocks too;
    /// their upsampler is `simple.sampler`).
    pub upsample: Option<usize>,
    /// IF's blocks: their attention and ResNet upsampler.
    pub simple: Option<SimpleBlockConfig>,
}

/// The middle block.
#[derive(Debug, Clone, PartialEq)]
pub enum MidBlockConfig {
    /// `UNetMidBlock2DCrossAttn`: ResNet, (transformer, ResNet)×1.
    CrossAttn {
        /// `resnets.0`, `resnets.1`.
        resnets: Vec<ResnetBlock2DConfig>,
        /// `attentions.0`.
        attentions: Vec<Transformer2DConfig>,
    },
    /// `UNetMidBlock2D` as the U-Net builds it: a single ResNet block.
    Plain(UNetMidBlock2DConfig),
    /// `UNetMidBlock2DSimpleCrossAttn` (DeepFloyd IF): ResNet, (added-KV attention, ResNet)×1.
    SimpleCrossAttn {
        /// `resnets.0`, `resnets.1`.
        resnets: Vec<ResnetBlock2DConfig>,
        /// `attentions.0`.
        attentions: Vec<AddedKVAttentionConfig>,
        /// `resnet_skip_time_act`.
        skip_time_act: bool,
    },
}

/// A validated `UNet2DConditionModel` architecture, every per-block value resolved.
#[derive(Debug, Clone, PartialEq)]
pub struct UNetConfig {
    /// Default latent size `(height, width)`, from `sample_size`.
    pub sample_size: Option<(usize, usize)>,
    /// Channels of the input latents (4; 9 for inpainting models: latents, mask, masked image).
    pub in_channels: usize,
    /// Channels of the output.
    pub out_channels: usize,
    /// The input is mapped `x ↦ 2x − 1` first.
    pub center_input_sample: bool,
    /// `block_out_channels`.
    pub block_out_channels: Vec<usize>,
    /// Kernel of `conv_in`.
    pub conv_in_kernel: usize,
    /// Kernel of `conv_out`.
    pub conv_out_kernel: usize,
    /// Groups of every group norm.
    pub norm_num_groups: usize,
    /// Epsilon of the ResNet and output norms.
    pub norm_eps: f64,
    /// The ResNet and time-embedding activation (`act_fn`).
    pub act_fn: Activation,
    /// The sinusoidal timestep projection (`time_proj`).
    pub time_proj: Timesteps,
    /// Width of the time embedding (`time_embedding_dim` or 4 × the first block's channels).
    pub time_embed_dim: usize,
    /// LCM's guidance-embedding width (`time_cond_proj_dim`).
    pub time_cond_proj_dim: Option<usize>,
    /// Activation after `time_embedding.linear_2` (`timestep_post_act`).
    pub timestep_post_act: Option<Activation>,
    /// Activation applied once to the summed embeddings (`time_embedding_act_fn`).
    pub time_embedding_act_fn: Option<Activation>,
    /// How class labels are embedded, if at all.
    pub class_embedding: Option<ClassEmbedding>,
    /// Class embeddings are concatenated to (not added to) the time embedding.
    pub class_embeddings_concat: bool,
    /// SDXL's added conditioning.
    pub addition_embedding: Option<TextTimeEmbedding>,
    /// DeepFloyd IF's added conditioning (`addition_embed_type: "text"`).
    pub text_addition_embedding: Option<TextAdditionEmbedding>,
    /// Width of the encoder hidden states each block attends to (`cross_attention_dim`).
    pub cross_attention_dim: Vec<usize>,
    /// `encoder_hid_dim` of `encoder_hid_dim_type: "text_proj"`: the width of the text encoder
    /// states, which `encoder_hid_proj` (a `Linear`) maps to `cross_attention_dim` before the
    /// blocks see them (a T5 wider than the cross-attention).
    pub encoder_hid_dim: Option<usize>,
    /// `down_blocks.{i}`.
    pub down_blocks: Vec<DownBlockConfig>,
    /// `mid_block`, absent with `mid_block_type: null`.
    pub mid_block: Option<MidBlockConfig>,
    /// `up_blocks.{i}`.
    pub up_blocks: Vec<UpBlockConfig>,
    /// `dropout`. Dropout is not applied (inference); kept so training code can see it.
    pub dropout: f64,
}

impl UNetConfig {
    /// Width of the text encoder states the model takes: `encoder_hid_dim` with a
    /// `text_proj`, else the first block's `cross_attention_dim`.
    pub fn encoder_hidden_dim(&self) -> usize {
        self.encoder_hid_dim.unwrap_or(self.cross_attention_dim[0])
    }

    /// SDXL's `addition_time_embed_dim`, when the model has added conditioning.
    pub fn addition_time_embed_dim(&self) -> Option<usize> {
        self.addition_embedding.map(|a| a.time_proj.num_channels)
    }

    /// Width of the pooled text embedding SDXL's added conditioning expects
    /// (`projection_class_embeddings_input_dim − 6·addition_time_embed_dim`).
    pub fn pooled_text_embed_dim(&self) -> Option<usize> {
        self.addition_embedding.map(|a| a.input_dim.saturating_sub(6 * a.time_proj.num_channels))
    }

    /// Total downsampling factor of the down blocks (`2^(number of downsamplers)`).
    pub fn downsampling_factor(&self) -> usize {
        let has = |b: &DownBlockConfig| {
            b.downsample.is_some() || b.simple.as_ref().is_some_and(|s| s.sampler.is_some())
        };
        1 << self.down_blocks.iter().filter(|b| has(b)).count()
    }
}

/// A list value checked to have one entry per block.
fn per_block<T: Clone + std::fmt::Debug>(
    v: &OneOrMany<T>,
    n: usize,
    field: &str,
) -> Result<Vec<T>, ConfigError> {
    v.per_block(n, field)
}

fn activation(v: &Option<String>, field: &str) -> Result<Option<Activation>, ConfigError> {
    v.as_deref().map(|s| Activation::parse(s, field)).transpose()
}

/// diffusers strips a leading `UNetRes` from block type names.
fn block_type(name: &str) -> &str {
    name.strip_prefix("UNetRes").unwrap_or(name)
}

impl TryFrom<UNet2DConditionModelConfig> for UNetConfig {
    type Error = ConfigError;

    fn try_from(raw: UNet2DConditionModelConfig) -> Result<Self, ConfigError> {
        let n = raw.down_block_types.len();
        if n == 0 {
            return Err(ConfigError::new("down_block_types", "is empty"));
        }
        if raw.up_block_types.len() != n {
            return Err(ConfigError::new(
                "up_block_types",
                format!(
                    "has {} entries but down_block_types has {n}: {:?}",
                    raw.up_block_types.len(),
                    raw.up_block_types
                ),
            ));
        }
        if raw.block_out_channels.len() != n {
            return Err(ConfigError::new(
                "block_out_channels",
                format!(
                    "has {} entries ({:?}) but down_block_types has {n}",
                    raw.block_out_channels.len(),
                    raw.block_out_channels
                ),
            ));
        }
        if let Some(&c) = raw.block_out_channels.iter().find(|&&c| c == 0) {
            return Err(ConfigError::unsupported("block_out_channels", c));
        }
        unsupported_features(&raw)?;
        for (field, k) in
            [("conv_in_kernel", raw.conv_in_kernel), ("conv_out_kernel", raw.conv_out_kernel)]
        {
            if k % 2 == 0 {
                return Err(ConfigError::new(field, format!("unsupported even kernel size {k}")));
            }
        }

        let groups = raw.norm_num_groups.ok_or_else(|| {
            ConfigError::new("norm_num_groups", "null (no output norm) is not supported")
        })?;
        let act_fn = Activation::parse(&raw.act_fn, "act_fn")?;
        let time_norm =
            TimeEmbeddingNorm::parse(&raw.resnet_time_scale_shift, "resnet_time_scale_shift")?;
        let channels = &raw.block_out_channels;

        // Time embedding.
        let time_embed_dim = raw.time_embedding_dim.unwrap_or(4 * channels[0]);
        let time_proj = Timesteps {
            num_channels: channels[0],
            flip_sin_to_cos: raw.flip_sin_to_cos,
            freq_shift: raw.freq_shift,
        };
        let class_embedding = class_embedding(&raw)?;
        let blocks_temb =
            if raw.class_embeddings_concat { 2 * time_embed_dim } else { time_embed_dim };
        let addition_embedding = addition_embedding(&raw)?;
        let text_addition_embedding = text_addition_embedding(&raw)?;

        // Per-block values. The historical misnomer: `attention_head_dim` counts heads.
        let heads = match &raw.num_attention_heads {
            Some(h) => per_block(h, n, "num_attention_heads")?,
            None => per_block(&raw.attention_head_dim, n, "attention_head_dim")?,
        };
        let heads_field = if raw.num_attention_heads.is_some() {
            "num_attention_heads"
        } else {
            "attention_head_dim"
        };
        let cross = per_block(&raw.cross_attention_dim, n, "cross_attention_dim")?;
        let encoder_hid_dim = encoder_hid_proj(&raw)?;
        let layers = per_block(&raw.layers_per_block, n, "layers_per_block")?;
        let only_cross = per_block(&raw.only_cross_attention, n, "only_cross_attention")?;
        let (down_depths, up_depths, mid_depth) = transformer_depths(&raw, &layers)?;
        // IF's blocks read `attention_head_dim` as the width of a head.
        let head_dims = per_block(&raw.attention_head_dim, n, "attention_head_dim")?;
        let cross_norm = || match raw.cross_attention_norm.as_deref() {
            None => Ok(false),
            Some("group_norm") => Ok(true),
            Some(other) => Err(ConfigError::unsupported("cross_attention_norm", other)),
        };
        let added_kv = |i: usize, channels: usize, head_dim: usize, kv: usize, oca: bool| {
            if head_dim == 0 || channels / head_dim == 0 {
                return Err(ConfigError::new(
                    format!("attention_head_dim[{i}]"),
                    format!("heads of {head_dim} channels do not fit {channels} channels"),
                ));
            }
            Ok(AddedKVAttentionConfig {
                channels,
                heads: channels / head_dim,
                dim_head: head_dim,
                added_kv_proj_dim: kv,
                norm_num_groups: groups,
                only_cross_attention: oca,
                cross_attention_norm: cross_norm()?,
            })
        };
        let simple_resnet = |cin: usize, cout: usize| ResnetBlock2DConfig {
            in_channels: cin,
            out_channels: cout,
            temb_channels: Some(blocks_temb),
            groups,
            groups_out: groups,
            eps: raw.norm_eps,
            act: act_fn,
            time_embedding_norm: time_norm,
            output_scale_factor: raw.resnet_out_scale_factor,
        };
        let sampler = |c: usize, resample| ResnetUpDownConfig {
            base: simple_resnet(c, c),
            skip_time_act: raw.resnet_skip_time_act,
            resample,
        };

        let resnet = |cin: usize, cout: usize| ResnetBlock2DConfig {
            in_channels: cin,
            out_channels: cout,
            temb_channels: Some(blocks_temb),
            groups,
            groups_out: groups,
            eps: raw.norm_eps,
            act: act_fn,
            time_embedding_norm: time_norm,
            output_scale_factor: 1.0,
        };
        let transformer =
            |i: usize, cout: usize, h: usize, depth: usize, cross_dim: usize, oca: bool| {
                if h == 0 || cout / h == 0 {
                    return Err(ConfigError::new(
                        format!("{heads_field}[{i}]"),
                        format!("{h} heads do not fit {cout} channels"),
                    ));
                }
                Ok(Transformer2DConfig {
                    in_channels: cout,
                    heads: h,
                    head_dim: cout / h,
                    depth,
                    cross_attention_dim: cross_dim,
                    norm_num_groups: groups,
                    use_linear_projection: raw.use_linear_projection,
                    only_cross_attention: oca,
                    upcast_attention: raw.upcast_attention,
                })
            };

        let mut down_blocks = Vec::with_capacity(n);
        for (i, ty) in raw.down_block_types.iter().enumerate() {
            let field = format!("down_block_types[{i}]");
            let (kind, cross_attn) = match block_type(ty) {
                "CrossAttnDownBlock2D" => ("CrossAttnDownBlock2D", true),
                "DownBlock2D" => ("DownBlock2D", false),
                "SimpleCrossAttnDownBlock2D" | "ResnetDownsampleBlock2D" => {
                    let cin = if i == 0 { channels[0] } else { channels[i - 1] };
                    let cout = channels[i];
                    let attentions = if block_type(ty).starts_with("SimpleCrossAttn") {
                        (0..layers[i])
                            .map(|_| added_kv(i, cout, head_dims[i], cross[i], only_cross[i]))
                            .collect::<Result<Vec<_>, _>>()?
                    } else {
                        Vec::new()
                    };
                    down_blocks.push(DownBlockConfig {
                        kind: if attentions.is_empty() {
                            "ResnetDownsampleBlock2D"
                        } else {
                            "SimpleCrossAttnDownBlock2D"
                        },
                        resnets: (0..layers[i])
                            .map(|j| simple_resnet(if j == 0 { cin } else { cout }, cout))
                            .collect(),
                        attentions: Vec::new(),
                        downsample: None,
                        simple: Some(SimpleBlockConfig {
                            skip_time_act: raw.resnet_skip_time_act,
                            attentions,
                            sampler: (i + 1 < n).then(|| sampler(cout, Resample::Down)),
                        }),
                    });
                    continue;
                }
                _ => return Err(ConfigError::unsupported(field, ty)),
            };
            let cin = if i == 0 { channels[0] } else { channels[i - 1] };
            let cout = channels[i];
            let resnets: Vec<_> =
                (0..layers[i]).map(|j| resnet(if j == 0 { cin } else { cout }, cout)).collect();
            let attentions = if cross_attn {
                (0..layers[i])
                    .map(|j| {
                        transformer(i, cout, heads[i], down_depths[i][j], cross[i], only_cross[i])
                    })
                    .collect::<Result<Vec<_>, _>>()?
            } else {
                Vec::new()
            };
            let downsample = (i + 1 < n).then_some((cout, raw.downsample_padding));
            down_blocks.push(DownBlockConfig {
                kind,
                resnets,
                attentions,
                downsample,
                simple: None,
            });
        }

        let last = channels[n - 1];
        let mid_resnet = ResnetBlock2DConfig {
            output_scale_factor: raw.mid_block_scale_factor,
            ..resnet(last, last)
        };
        let mid_block = match raw.mid_block_type.as_deref() {
            None => None,
            Some("UNetMidBlock2DCrossAttn") => Some(MidBlockConfig::CrossAttn {
                resnets: vec![mid_resnet; 2],
                // diffusers does not pass `only_cross_attention` to this block.
                attentions: vec![transformer(
                    n - 1,
                    last,
                    heads[n - 1],
                    mid_depth,
                    cross[n - 1],
                    false,
                )?],
            }),
            Some("UNetMidBlock2D") => Some(MidBlockConfig::Plain(UNetMidBlock2DConfig {
                resnet: mid_resnet,
                num_layers: 0,
                attention_head_dim: None,
            })),
            Some("UNetMidBlock2DSimpleCrossAttn") => {
                let oca =
                    raw.mid_block_only_cross_attention.unwrap_or(match raw.only_cross_attention {
                        OneOrMany::One(b) => b,
                        OneOrMany::Many(_) => false,
                    });
                Some(MidBlockConfig::SimpleCrossAttn {
                    resnets: vec![
                        ResnetBlock2DConfig {
                            output_scale_factor: raw.mid_block_scale_factor,
                            ..simple_resnet(last, last)
                        };
                        2
                    ],
                    attentions: vec![added_kv(n - 1, last, head_dims[n - 1], cross[n - 1], oca)?],
                    skip_time_act: raw.resnet_skip_time_act,
                })
            }
            Some(other) => return Err(ConfigError::unsupported("mid_block_type", other)),
        };

        let rev = |v: &[usize]| v.iter().rev().copied().collect::<Vec<_>>();
        let (rev_channels, rev_heads, rev_layers, rev_cross) =
            (rev(channels), rev(&heads), rev(&layers), rev(&cross));
        let rev_only_cross: Vec<bool> = only_cross.iter().rev().copied().collect();
        let mut up_blocks = Vec::with_capacity(n);
        let mut prev_out = rev_channels[0];
        for (i, ty) in raw.up_block_types.iter().enumerate() {
            let field = format!("up_block_types[{i}]");
            let (kind, cross_attn) = match block_type(ty) {
                "CrossAttnUpBlock2D" => ("CrossAttnUpBlock2D", true),
                "UpBlock2D" => ("UpBlock2D", false),
                "SimpleCrossAttnUpBlock2D" | "ResnetUpsampleBlock2D" => ("", false),
                _ => return Err(ConfigError::unsupported(field, ty)),
            };
            let cout = rev_channels[i];
            let cin = rev_channels[(i + 1).min(n - 1)];
            let num_layers = rev_layers[i] + 1;
            if kind.is_empty() {
                let attentions = if block_type(ty).starts_with("SimpleCrossAttn") {
                    // diffusers passes `attention_head_dim[i]` here, not reversed.
                    (0..num_layers)
                        .map(|_| added_kv(i, cout, head_dims[i], rev_cross[i], rev_only_cross[i]))
                        .collect::<Result<Vec<_>, _>>()?
                } else {
                    Vec::new()
                };
                up_blocks.push(UpBlockConfig {
                    kind: if attentions.is_empty() {
                        "ResnetUpsampleBlock2D"
                    } else {
                        "SimpleCrossAttnUpBlock2D"
                    },
                    resnets: (0..num_layers)
                        .map(|j| {
                            let skip = if j == num_layers - 1 { cin } else { cout };
                            let res_in = if j == 0 { prev_out } else { cout };
                            simple_resnet(res_in + skip, cout)
                        })
                        .collect(),
                    attentions: Vec::new(),
                    upsample: None,
                    simple: Some(SimpleBlockConfig {
                        skip_time_act: raw.resnet_skip_time_act,
                        attentions,
                        sampler: (i + 1 < n).then(|| sampler(cout, Resample::Up)),
                    }),
                });
                prev_out = cout;
                continue;
            }
            let resnets: Vec<_> = (0..num_layers)
                .map(|j| {
                    let skip = if j == num_layers - 1 { cin } else { cout };
                    let res_in = if j == 0 { prev_out } else { cout };
                    resnet(res_in + skip, cout)
                })
                .collect();
            let attentions = if cross_attn {
                (0..num_layers)
                    .map(|j| {
                        let depth = up_depths[i].get(j).copied().ok_or_else(|| {
                            ConfigError::new(
                                format!("reverse_transformer_layers_per_block[{i}]"),
                                format!(
                                    "has {} entries but the block has {num_layers} layers",
                                    up_depths[i].len()
                                ),
                            )
                        })?;
                        // diffusers indexes heads reversed here; `rev_heads[i]` is that value.
                        transformer(
                            n - 1 - i,
                            cout,
                            rev_heads[i],
                            depth,
                            rev_cross[i],
                            rev_only_cross[i],
                        )
                    })
                    .collect::<Result<Vec<_>, _>>()?
            } else {
                Vec::new()
            };
            let upsample = (i + 1 < n).then_some(cout);
            up_blocks.push(UpBlockConfig { kind, resnets, attentions, upsample, simple: None });
            prev_out = cout;
        }

        let sample_size = match &raw.sample_size {
            None => None,
            Some(OneOrMany::One(s)) => Some((*s, *s)),
            Some(OneOrMany::Many(v)) if v.len() == 2 => Some((v[0], v[1])),
            Some(OneOrMany::Many(v)) => {
                return Err(ConfigError::new(
                    "sample_size",
                    format!("expected 1 or 2 values, got {v:?}"),
                ))
            }
        };

        Ok(Self {
            sample_size,
            in_channels: raw.in_channels,
            out_channels: raw.out_channels,
            center_input_sample: raw.center_input_sample,
            block_out_channels: channels.clone(),
            conv_in_kernel: raw.conv_in_kernel,
            conv_out_kernel: raw.conv_out_kernel,
            norm_num_groups: groups,
            norm_eps: raw.norm_eps,
            act_fn,
            time_proj,
            time_embed_dim,
            time_cond_proj_dim: raw.time_cond_proj_dim,
            timestep_post_act: activation(&raw.timestep_post_act, "timestep_post_act")?,
            time_embedding_act_fn: activation(&raw.time_embedding_act_fn, "time_embedding_act_fn")?,
            class_embedding,
            class_embeddings_concat: raw.class_embeddings_concat,
            addition_embedding,
            text_addition_embedding,
            cross_attention_dim: cross,
            encoder_hid_dim,
            down_blocks,
            mid_block,
            up_blocks,
            dropout: raw.dropout,
        })
    }
}

/// Rejects the fields whose non-default values select architectures we do not implement.
fn unsupported_features(raw: &UNet2DConditionModelConfig) -> Result<(), ConfigError> {
    if raw.time_embedding_type != "positional" {
        return Err(ConfigError::unsupported("time_embedding_type", &raw.time_embedding_type));
    }
    if raw.attention_type != "default" {
        return Err(ConfigError::unsupported("attention_type", &raw.attention_type));
    }
    if raw.dual_cross_attention {
        return Err(ConfigError::unsupported("dual_cross_attention", true));
    }
    Ok(())
}

/// diffusers' `_set_encoder_hid_proj`: `encoder_hid_dim` alone means `"text_proj"`; a type
/// needs the dimension; `text_proj` is `nn.Linear(encoder_hid_dim, cross_attention_dim)`, which
/// takes one `cross_attention_dim` (a per-block list fails there). The image projections
/// (`text_image_proj`, `image_proj`) belong to IP-Adapter / Kandinsky models we do not run.
fn encoder_hid_proj(raw: &UNet2DConditionModelConfig) -> Result<Option<usize>, ConfigError> {
    let kind = match (raw.encoder_hid_dim_type.as_deref(), raw.encoder_hid_dim) {
        (None, None) => return Ok(None),
        (None, Some(_)) => "text_proj",
        (Some(t), None) => {
            return Err(ConfigError::new(
                "encoder_hid_dim",
                format!("is required by encoder_hid_dim_type {t:?}"),
            ))
        }
        (Some(t), Some(_)) => t,
    };
    if kind != "text_proj" {
        return Err(ConfigError::unsupported("encoder_hid_dim_type", kind));
    }
    if let OneOrMany::Many(v) = &raw.cross_attention_dim {
        return Err(ConfigError::new(
            "cross_attention_dim",
            format!(
                "encoder_hid_dim_type \"text_proj\" projects to one cross_attention_dim, not a \
                 per-block list {v:?}"
            ),
        ));
    }
    match raw.encoder_hid_dim {
        Some(0) => Err(ConfigError::unsupported("encoder_hid_dim", 0)),
        d => Ok(d),
    }
}

fn class_embedding(
    raw: &UNet2DConditionModelConfig,
) -> Result<Option<ClassEmbedding>, ConfigError> {
    let input_dim = || {
        raw.projection_class_embeddings_input_dim.ok_or_else(|| {
            ConfigError::new(
                "projection_class_embeddings_input_dim",
                format!(
                    "is required by class_embed_type {:?}",
                    raw.class_embed_type.as_deref().unwrap_or_default()
                ),
            )
        })
    };
    Ok(match (raw.class_embed_type.as_deref(), raw.num_class_embeds) {
        (None, None) => None,
        (None, Some(num_classes)) => Some(ClassEmbedding::Embedding { num_classes }),
        (Some("timestep"), _) => Some(ClassEmbedding::Timestep),
        (Some("identity"), _) => Some(ClassEmbedding::Identity),
        (Some("projection"), _) => Some(ClassEmbedding::Projection { input_dim: input_dim()? }),
        (Some("simple_projection"), _) => {
            Some(ClassEmbedding::SimpleProjection { input_dim: input_dim()? })
        }
        (Some(other), _) => return Err(ConfigError::unsupported("class_embed_type", other)),
    })
}

fn addition_embedding(
    raw: &UNet2DConditionModelConfig,
) -> Result<Option<TextTimeEmbedding>, ConfigError> {
    match raw.addition_embed_type.as_deref() {
        None => Ok(None),
        Some("text_time") => {
            let need = |field: &str, v: Option<usize>| {
                v.ok_or_else(|| {
                    ConfigError::new(field, "is required by addition_embed_type \"text_time\"")
                })
            };
            let dim = need("addition_time_embed_dim", raw.addition_time_embed_dim)?;
            let input_dim = need(
                "projection_class_embeddings_input_dim",
                raw.projection_class_embeddings_input_dim,
            )?;
            Ok(Some(TextTimeEmbedding {
                time_proj: Timesteps {
                    num_channels: dim,
                    flip_sin_to_cos: raw.flip_sin_to_cos,
                    freq_shift: raw.freq_shift,
                },
                input_dim,
            }))
        }
        // IF's pooled text: `text_addition_embedding`.
        Some("text") => Ok(None),
        Some(other) => Err(ConfigError::unsupported("addition_embed_type", other)),
    }
}

/// diffusers' `_set_add_embedding` for `"text"`: a `TextTimeEmbedding` over the text states as
/// the U-Net receives them (before `encoder_hid_proj`).
fn text_addition_embedding(
    raw: &UNet2DConditionModelConfig,
) -> Result<Option<TextAdditionEmbedding>, ConfigError> {
    if raw.addition_embed_type.as_deref() != Some("text") {
        return Ok(None);
    }
    let encoder_dim = match (raw.encoder_hid_dim, &raw.cross_attention_dim) {
        (Some(d), _) => d,
        (None, OneOrMany::One(d)) => *d,
        (None, OneOrMany::Many(v)) => {
            return Err(ConfigError::new(
                "cross_attention_dim",
                format!(
                    "addition_embed_type \"text\" pools states of one width, not a per-block \
                     list {v:?}"
                ),
            ))
        }
    };
    let num_heads = raw.addition_embed_type_num_heads;
    if num_heads == 0 || encoder_dim % num_heads != 0 {
        return Err(ConfigError::new(
            "addition_embed_type_num_heads",
            format!("{num_heads} heads do not divide the text width {encoder_dim}"),
        ));
    }
    Ok(Some(TextAdditionEmbedding { encoder_dim, num_heads }))
}

/// Transformer depths: per down block and layer, per up block and layer, and of the mid block.
type Depths = (Vec<Vec<usize>>, Vec<Vec<usize>>, usize);

fn transformer_depths(
    raw: &UNet2DConditionModelConfig,
    layers: &[usize],
) -> Result<Depths, ConfigError> {
    let n = layers.len();
    let field = "transformer_layers_per_block";
    let per_block: Vec<OneOrMany<usize>> = match &raw.transformer_layers_per_block {
        TransformerLayersPerBlock::One(d) => vec![OneOrMany::One(*d); n],
        TransformerLayersPerBlock::PerBlock(v) if v.len() == n => v.clone(),
        TransformerLayersPerBlock::PerBlock(v) => {
            return Err(ConfigError::new(
                field,
                format!("has {} entries but the model has {n} blocks", v.len()),
            ))
        }
    };
    let nested = per_block.iter().any(|d| matches!(d, OneOrMany::Many(_)));
    let down = per_block
        .iter()
        .zip(layers)
        .enumerate()
        .map(|(i, (d, &l))| d.per_block(l, &format!("{field}[{i}]")))
        .collect::<Result<Vec<_>, _>>()?;
    let mid = match &per_block[n - 1] {
        OneOrMany::One(d) => *d,
        OneOrMany::Many(v) => v.first().copied().unwrap_or(1),
    };
    let up = match &raw.reverse_transformer_layers_per_block {
        Some(rev) if rev.len() == n => rev.clone(),
        Some(rev) => {
            return Err(ConfigError::new(
                "reverse_transformer_layers_per_block",
                format!("has {} entries but the model has {n} blocks", rev.len()),
            ))
        }
        None if nested => {
            return Err(ConfigError::new(
                field,
                "per-layer lists need reverse_transformer_layers_per_block (as in diffusers)",
            ))
        }
        None => per_block
            .iter()
            .rev()
            .zip(layers.iter().rev())
            .map(|(d, &l)| match d {
                OneOrMany::One(d) => vec![*d; l + 1],
                OneOrMany::Many(v) => v.clone(),
            })
            .collect(),
    };
    Ok((down, up, mid))
}
