//! diffusers' `UNet2DConditionModel`: the noise-prediction network of latent diffusion
//! (Rombach et al. 2022), built from a validated [`UNetConfig`].

use std::path::Path;
use std::sync::Arc;

use candle_core::{DType, Device, Module, Result, Tensor};
use candle_nn::VarBuilder;
use ltd_nn::layers::{Activation, Conv2d, GroupNorm, Linear};
use ltd_nn::{RuntimeOptions, SafetensorsFiles};

use crate::blocks::{DownBlock, MidBlock, UpBlock};
use crate::config::{ClassEmbedding, UNet2DConditionModelConfig, UNetConfig};
use crate::embeddings::{TextTimeEmbedding, TimestepEmbedding};

/// The optional conditioning inputs of [`UNet2DConditionModel::forward`] (diffusers'
/// `added_cond_kwargs`, `timestep_cond`, `class_labels`).
#[derive(Debug, Clone, Default)]
pub struct UNetConditioning {
    /// SDXL: the pooled text embedding `[B, pooled_text_embed_dim]`.
    pub text_embeds: Option<Tensor>,
    /// SDXL: `[B, 6]` original size, crop top-left and target size.
    pub time_ids: Option<Tensor>,
    /// LCM: the guidance-scale embedding `[B, time_cond_proj_dim]`.
    pub timestep_cond: Option<Tensor>,
    /// Class labels, for models with a class embedding: `[B]` (integer classes or timesteps) or
    /// `[B, D]` vectors.
    pub class_labels: Option<Tensor>,
}

#[derive(Debug, Clone)]
enum ClassEmbed {
    Embedding(Tensor),
    Timestep(TimestepEmbedding),
    Identity,
    Projection(TimestepEmbedding),
    SimpleProjection(Linear),
}

/// The conditional U-Net: `forward(x_t, t, text states, conditioning) → ε̂ (or v̂)`.
#[derive(Debug, Clone)]
pub struct UNet2DConditionModel {
    conv_in: Conv2d,
    time_embedding: TimestepEmbedding,
    class_embedding: Option<ClassEmbed>,
    add_embedding: Option<TimestepEmbedding>,
    /// `addition_embed_type: "text"` (IF): also at `add_embedding`.
    text_add_embedding: Option<TextTimeEmbedding>,
    /// `encoder_hid_dim_type: "text_proj"`: text encoder width → `cross_attention_dim`.
    encoder_hid_proj: Option<Linear>,
    down_blocks: Vec<DownBlock>,
    mid_block: Option<MidBlock>,
    up_blocks: Vec<UpBlock>,
    conv_norm_out: GroupNorm,
    conv_out: Conv2d,
    cfg: UNetConfig,
    dtype: DType,
}

impl UNet2DConditionModel {
    /// Builds the model from `vb` (memory-mapped weights or a `VarMap`), fetching every tensor
    /// under diffusers' key names.
    pub fn new(vb: VarBuilder, cfg: &UNetConfig, opts: &RuntimeOptions) -> Result<Self> {
        let c0 = cfg.block_out_channels[0];
        let (k_in, k_out) = (cfg.conv_in_kernel, cfg.conv_out_kernel);
        let conv_in = Conv2d::new(vb.pp("conv_in"), cfg.in_channels, c0, k_in, (k_in - 1) / 2, 1)?;
        let tdim = cfg.time_embed_dim;
        let time_embedding = TimestepEmbedding::new(
            vb.pp("time_embedding"),
            cfg.time_proj.num_channels,
            tdim,
            cfg.act_fn,
            cfg.timestep_post_act,
            cfg.time_cond_proj_dim,
        )?;
        let class_vb = vb.pp("class_embedding");
        let class_embedding = match cfg.class_embedding {
            None => None,
            Some(ClassEmbedding::Embedding { num_classes }) => {
                let init = candle_nn::Init::Randn { mean: 0.0, stdev: 1.0 };
                Some(ClassEmbed::Embedding(class_vb.get_with_hints(
                    (num_classes, tdim),
                    "weight",
                    init,
                )?))
            }
            Some(ClassEmbedding::Timestep) => Some(ClassEmbed::Timestep(TimestepEmbedding::new(
                class_vb,
                cfg.time_proj.num_channels,
                tdim,
                cfg.act_fn,
                None,
                None,
            )?)),
            Some(ClassEmbedding::Identity) => Some(ClassEmbed::Identity),
            // diffusers builds this one with TimestepEmbedding's default activation, SiLU.
            Some(ClassEmbedding::Projection { input_dim }) => Some(ClassEmbed::Projection(
                TimestepEmbedding::new(class_vb, input_dim, tdim, Activation::Silu, None, None)?,
            )),
            Some(ClassEmbedding::SimpleProjection { input_dim }) => {
                Some(ClassEmbed::SimpleProjection(Linear::new(class_vb, input_dim, tdim, true)?))
            }
        };
        let add_embedding = match &cfg.addition_embedding {
            Some(a) => Some(TimestepEmbedding::new(
                vb.pp("add_embedding"),
                a.input_dim,
                tdim,
                Activation::Silu,
                None,
                None,
            )?),
            None => None,
        };
        let text_add_embedding = match &cfg.text_addition_embedding {
            Some(a) => Some(TextTimeEmbedding::new(
                vb.pp("add_embedding"),
                a.encoder_dim,
                tdim,
                a.num_heads,
            )?),
            None => None,
        };
        let encoder_hid_proj = match cfg.encoder_hid_dim {
            Some(d) => {
                Some(Linear::new(vb.pp("encoder_hid_proj"), d, cfg.cross_attention_dim[0], true)?)
            }
            None => None,
        };
        let att = &opts.attention;
        let down_blocks = cfg
            .down_blocks
            .iter()
            .enumerate()
            .map(|(i, b)| DownBlock::new(vb.pp("down_blocks").pp(i), b, att))
            .collect::<Result<Vec<_>>>()?;
        let mid_block = match &cfg.mid_block {
            Some(m) => Some(MidBlock::new(vb.pp("mid_block"), m, att)?),
            None => None,
        };
        let up_blocks = cfg
            .up_blocks
            .iter()
            .enumerate()
            .map(|(i, b)| UpBlock::new(vb.pp("up_blocks").pp(i), b, att))
            .collect::<Result<Vec<_>>>()?;
        let conv_norm_out =
            GroupNorm::new(vb.pp("conv_norm_out"), cfg.norm_num_groups, c0, cfg.norm_eps)?;
        let conv_out =
            Conv2d::new(vb.pp("conv_out"), c0, cfg.out_channels, k_out, (k_out - 1) / 2, 1)?;
        Ok(Self {
            conv_in,
            time_embedding,
            class_embedding,
            add_embedding,
            text_add_embedding,
            encoder_hid_proj,
            down_blocks,
            mid_block,
            up_blocks,
            conv_norm_out,
            conv_out,
            cfg: cfg.clone(),
            dtype: vb.dtype(),
        })
    }

    /// Loads a diffusers `unet/` folder: `config.json` and
    /// `diffusion_pytorch_model[.{variant}].safetensors` (or its shards), checking every tensor.
    pub fn load(
        dir: &Path,
        variant: Option<&str>,
        dtype: DType,
        device: &Device,
        opts: &RuntimeOptions,
    ) -> ltd_nn::Result<Self> {
        Self::load_patched(dir, variant, dtype, device, opts, None)
    }

    /// [`UNet2DConditionModel::load`] with `patches` (LoRA deltas, keyed by checkpoint key)
    /// added to the weights as they load.
    pub fn load_patched(
        dir: &Path,
        variant: Option<&str>,
        dtype: DType,
        device: &Device,
        opts: &RuntimeOptions,
        patches: Option<Arc<ltd_nn::WeightPatches>>,
    ) -> ltd_nn::Result<Self> {
        let cfg: UNetConfig = ltd_nn::load_config::<UNet2DConditionModelConfig, UNetConfig>(
            &dir.join("config.json"),
        )?;
        let files = ltd_nn::weights::component_weights(dir, &["diffusion_pytorch_model"], variant)?;
        let mut files = SafetensorsFiles::open(&files)?;
        if let Some(patches) = patches {
            files = files.with_patches(patches);
        }
        ltd_nn::load_checked(Arc::new(files), dtype, device, |vb| Self::new(vb, &cfg, opts))
    }

    /// Quantizes the linear layers of every transformer block (attention projections,
    /// feed-forward, linear `proj_in`/`proj_out`) whose rows split into whole blocks, releasing
    /// their f32 weights; convolutions, norms and the time and text embeddings stay as they
    /// are (see [`crate::gguf::is_quantized`]).
    pub fn quantize(&mut self, q: ltd_nn::Quantization) -> Result<ltd_nn::QuantizeReport> {
        let mut report = ltd_nn::QuantizeReport::default();
        for b in &mut self.down_blocks {
            report.add(b.quantize(q)?);
        }
        if let Some(m) = &mut self.mid_block {
            report.add(m.quantize(q)?);
        }
        for b in &mut self.up_blocks {
            report.add(b.quantize(q)?);
        }
        Ok(report)
    }

    /// The validated architecture.
    pub fn config(&self) -> &UNetConfig {
        &self.cfg
    }

    /// The dtype of the weights; inputs are converted to it.
    pub fn dtype(&self) -> DType {
        self.dtype
    }

    /// Predicts the model output for `sample: [B, in_channels, H, W]` at `timesteps` (`[B]`, or
    /// one value for the whole batch; fractional values allowed), attending to
    /// `encoder_hidden_states: [B, L, D]` (`D` = [`UNetConfig::encoder_hidden_dim`]: the
    /// `cross_attention_dim`, or `encoder_hid_dim` when `encoder_hid_proj` maps it). Inputs are
    /// converted to the model's dtype; the output has it.
    pub fn forward(
        &self,
        sample: &Tensor,
        timesteps: &Tensor,
        encoder_hidden_states: &Tensor,
        cond: &UNetConditioning,
    ) -> Result<Tensor> {
        let (batch, _, h, w) = sample.dims4()?;
        let dt = self.dtype;
        let mut sample = sample.to_dtype(dt)?;
        let mut context = encoder_hidden_states.to_dtype(dt)?;
        if self.cfg.center_input_sample {
            sample = sample.affine(2.0, -1.0)?;
        }

        // IF's pooled text embedding sees the states before `encoder_hid_proj`.
        let emb = self.time_embedding(timesteps, batch, cond, &context)?;

        // diffusers' `process_encoder_hidden_states` for "text_proj".
        if let Some(proj) = &self.encoder_hid_proj {
            context = proj.forward(&context)?;
        }

        let upsamplers = self
            .cfg
            .up_blocks
            .iter()
            .filter(|b| {
                b.upsample.is_some() || b.simple.as_ref().is_some_and(|s| s.sampler.is_some())
            })
            .count();
        let factor = 1usize << upsamplers;
        let forward_upsample_size = h % factor != 0 || w % factor != 0;

        let mut x = self.conv_in.forward(&sample)?;
        let mut skips = vec![x.clone()];
        for block in &self.down_blocks {
            x = block.forward(&x, &emb, &context, &mut skips)?;
        }
        if let Some(mid) = &self.mid_block {
            x = mid.forward(&x, &emb, &context)?;
        }
        let last = self.up_blocks.len().saturating_sub(1);
        for (i, block) in self.up_blocks.iter().enumerate() {
            let remaining = skips.len().saturating_sub(block.num_skips());
            // The size the next block's skip connections have, when ×2 would not reproduce it.
            let size = match (i < last && forward_upsample_size, remaining.checked_sub(1)) {
                (true, Some(k)) => {
                    let d = skips[k].dims();
                    Some((d[2], d[3]))
                }
                _ => None,
            };
            x = block.forward(&x, &mut skips, &emb, &context, size)?;
        }
        let x = match self.cfg.act_fn {
            Activation::Silu => self.conv_norm_out.forward_silu(&x)?,
            act => act.forward(&self.conv_norm_out.forward(&x)?)?,
        };
        self.conv_out.forward(&x)
    }

    /// The time embedding with class and added conditioning: diffusers' `get_time_embed`,
    /// `time_embedding`, `get_class_embed`, `get_aug_embed` and `time_embed_act`.
    fn time_embedding(
        &self,
        timesteps: &Tensor,
        batch: usize,
        cond: &UNetConditioning,
        encoder_hidden_states: &Tensor,
    ) -> Result<Tensor> {
        let dt = self.dtype;
        let t = batch_values(timesteps, batch, "timesteps")?;
        let t_emb = self.cfg.time_proj.forward(&t)?.to_dtype(dt)?;
        let mut emb = self.time_embedding.forward(&t_emb, cond.timestep_cond.as_ref())?;

        if let Some(class) = &self.class_embedding {
            let labels = cond.class_labels.as_ref().ok_or_else(|| {
                candle_core::Error::Msg(
                    "this U-Net has a class embedding: class_labels are required".into(),
                )
            })?;
            let class_emb = match class {
                ClassEmbed::Embedding(table) => {
                    let ids = labels.flatten_all()?.to_dtype(DType::U32)?;
                    table.index_select(&ids, 0)?
                }
                ClassEmbed::Timestep(e) => {
                    let t = batch_values(labels, batch, "class_labels")?;
                    e.forward(&self.cfg.time_proj.forward(&t)?.to_dtype(dt)?, None)?
                }
                ClassEmbed::Identity => labels.to_dtype(dt)?,
                ClassEmbed::Projection(e) => e.forward(&labels.to_dtype(dt)?, None)?,
                ClassEmbed::SimpleProjection(l) => l.forward(&labels.to_dtype(dt)?)?,
            }
            .to_dtype(dt)?;
            emb = if self.cfg.class_embeddings_concat {
                Tensor::cat(&[&emb, &class_emb], 1)?
            } else {
                (emb + class_emb)?
            };
        }

        if let (Some(add), Some(a)) = (&self.add_embedding, &self.cfg.addition_embedding) {
            let missing = |what: &str| {
                candle_core::Error::Msg(format!(
                    "this U-Net has added conditioning (addition_embed_type \"text_time\"): {what} \
                     is required"
                ))
            };
            let text_embeds = cond.text_embeds.as_ref().ok_or_else(|| missing("text_embeds"))?;
            let time_ids = cond.time_ids.as_ref().ok_or_else(|| missing("time_ids"))?;
            let b = text_embeds.dim(0)?;
            let time_embeds = a.time_proj.forward(&time_ids.flatten_all()?)?.reshape((b, ()))?;
            let add_embeds = Tensor::cat(&[&text_embeds.to_dtype(DType::F32)?, &time_embeds], 1)?;
            emb = (emb + add.forward(&add_embeds.to_dtype(dt)?, None)?)?;
        }

        if let Some(add) = &self.text_add_embedding {
            emb = (emb + add.forward(encoder_hidden_states)?)?;
        }

        match self.cfg.time_embedding_act_fn {
            Some(act) => act.forward(&emb),
            None => Ok(emb),
        }
    }
}

/// `[B]` values from a scalar, a one-element tensor (broadcast) or `[B]`.
fn batch_values(t: &Tensor, batch: usize, what: &str) -> Result<Tensor> {
    let t = t.flatten_all()?;
    match t.dim(0)? {
        n if n == batch => Ok(t),
        1 => t.broadcast_as(batch)?.contiguous(),
        n => candle_core::bail!("{what}: expected 1 or {batch} values (the batch size), got {n}"),
    }
}
