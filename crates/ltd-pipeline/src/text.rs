//! Prompt encoding: the text side of the two pipeline kinds.
//!
//! SD 1.x/2.x (diffusers' `StableDiffusionPipeline.encode_prompt`): one CLIP encoder's
//! `last_hidden_state`, or with `clip_skip = k` the final layer norm of
//! `hidden_states[-(k + 1)]`. SDXL (`StableDiffusionXLPipeline.encode_prompt`): both encoders'
//! `hidden_states[-(k + 2)]` concatenated on the feature axis, and the second encoder's
//! projected pooled output; an absent negative prompt gives zeros when the model says
//! `force_zeros_for_empty_prompt`.
//!
//! One deliberate difference from diffusers: `clip_skip` applies to the negative prompt too
//! (as in AUTOMATIC1111). diffusers encodes the negative prompt without it, which makes the
//! two halves of classifier-free guidance come from different layers.
//!
//! Long prompts are truncated with a warning that quotes what was dropped (diffusers), or
//! encoded in 75-token chunks whose embeddings are concatenated (AUTOMATIC1111); a batch is
//! padded to its longest prompt with empty chunks, and SDXL's pooled output comes from the
//! first chunk, as there.
//!
//! T5 (a `StableDiffusionPipeline` whose `text_encoder` is a `T5EncoderModel`, as diffusers
//! runs it): `tokenizer(padding="max_length", max_length=tokenizer.model_max_length,
//! truncation=True)`, the negative prompt padded to the same length, and the encoder's
//! `last_hidden_state`, given the tokenizer's attention mask only when the encoder's config
//! says `use_attention_mask: true` (diffusers' `encode_prompt` checks exactly that). A folder
//! whose tokenizer has no real `model_max_length` (transformers' "unlimited" int(1e30)) cannot
//! be run: transformers overflows padding to it, and we say so.
//!
//! DeepFloyd IF (`IFPipeline.encode_prompt`, `_text_preprocessing` with `clean_caption=False`):
//! each prompt and the negative prompt (`""` when absent) lowercased and stripped
//! (`text.lower().strip()`), tokenized to IF's fixed `max_length=77`, and encoded with the
//! tokenizer's attention mask whatever the encoder's config says. ltd does not port
//! `clean_caption` (it needs bs4 and ftfy, and diffusers falls back to the plain lowercasing
//! without them). The IF text encoder (T5-XXL, 4.8 B parameters) is not kept: it is loaded
//! for each encoding and released before the denoising loop (the U-Net is already loaded
//! then: the encoding-time peak is both).

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use candle_core::{DType, Device, Tensor};
use ltd_nn::{RuntimeOptions, WeightPatches};
use ltd_text::{
    attention_mask_tensor, emphasize, ids_tensor, is_plain, parse_prompt_attention, CLIPTextModel,
    CLIPTextModelWithProjection, CLIPTokenizer, ClipLayer, Encoded, T5Config, T5EncoderModel,
    T5Params, T5Tokenizer,
};

use crate::error::{PipelineError, Result};
use crate::lora::Component;
use crate::model_index::{ModelIndex, PipelineKind, TextEncoderFamily};
use crate::request::{Emphasis, LongPrompt};
use crate::textual_inversion::{tokens, EmbeddingFile};

/// A tokenizer and the text encoder it feeds.
enum Encoder {
    Plain(CLIPTextModel),
    Projection(CLIPTextModelWithProjection),
}

/// The text encoders of a pipeline.
pub(crate) struct TextEncoders {
    kind: PipelineKind,
    parts: Vec<(CLIPTokenizer, Encoder)>,
    /// A T5 text encoder instead of `parts`.
    t5: Option<T5Text>,
    force_zeros_for_empty_prompt: bool,
    /// Multi-vector textual-inversion tokens and what a prompt's token becomes.
    expansions: Vec<(String, String)>,
}

/// A T5 tokenizer, its padded length and the encoder it feeds.
struct T5Text {
    tokenizer: T5Tokenizer,
    max_length: usize,
    model: T5Model,
    /// DeepFloyd IF's rules: prompts lowercased and stripped, the attention mask always given.
    deepfloyd: bool,
}

/// A T5 encoder kept loaded, or one loaded for each encoding and released after it.
enum T5Model {
    Loaded(T5EncoderModel),
    OnDemand {
        dir: PathBuf,
        variant: Option<String>,
        dtype: DType,
        device: Device,
        runtime: RuntimeOptions,
        params: T5Params,
    },
}

/// `IFPipeline.encode_prompt`'s `max_length`.
const DEEPFLOYD_MAX_LENGTH: usize = 77;

/// Embeddings for a batch of prompts.
pub(crate) struct PromptEmbeds {
    /// `[N, L, D]`.
    pub hidden: Tensor,
    /// SDXL: the projected pooled output `[N, P]`.
    pub pooled: Option<Tensor>,
}

impl TextEncoders {
    /// Loads the tokenizer/encoder pairs the pipeline's `model_index.json` names from `root`,
    /// with the LoRA `patches` of their components merged in.
    pub fn load(
        root: &Path,
        index: &ModelIndex,
        variant: Option<&str>,
        dtype: DType,
        device: &Device,
        runtime: &RuntimeOptions,
        patches: &mut HashMap<Component, WeightPatches>,
    ) -> Result<Self> {
        let (kind, force_zeros_for_empty_prompt) = (index.kind, index.force_zeros_for_empty_prompt);
        if index.text_encoder_family == TextEncoderFamily::T5 {
            // LoRA text-encoder keys are CLIP's (kohya's `lora_te_`, diffusers' `text_encoder.`
            // on CLIP module names): refuse rather than drop them.
            if patches.contains_key(&Component::TextEncoder)
                || patches.contains_key(&Component::TextEncoder2)
            {
                return Err(PipelineError::invalid(
                    "lora",
                    "the LoRA has text-encoder weights, but this model's text encoder is a T5 \
                     (T5EncoderModel); LoRA text-encoder layers are supported for CLIP only",
                ));
            }
            let t5 = if index.no_text_encoder {
                None
            } else if kind.is_deepfloyd() {
                Some(T5Text::on_demand(root, variant, dtype, device, runtime)?)
            } else {
                Some(T5Text::load(root, variant, dtype, device, runtime)?)
            };
            return Ok(Self {
                kind,
                parts: Vec::new(),
                t5,
                force_zeros_for_empty_prompt,
                expansions: Vec::new(),
            });
        }
        let tok = |name: &str| CLIPTokenizer::from_folder(&root.join(name));
        let patch_1 = patches.remove(&Component::TextEncoder).map(Arc::new);
        let patch_2 = patches.remove(&Component::TextEncoder2).map(Arc::new);
        let first = || -> Result<(CLIPTokenizer, Encoder)> {
            let tokenizer = tok("tokenizer")?;
            let dir = root.join("text_encoder");
            let model =
                CLIPTextModel::from_folder_patched(&dir, variant, dtype, device, runtime, patch_1)?;
            Ok((tokenizer, Encoder::Plain(model)))
        };
        let parts = match kind {
            PipelineKind::StableDiffusion => vec![first()?],
            PipelineKind::DeepFloydIf | PipelineKind::DeepFloydIfSuperResolution => {
                return Err(PipelineError::msg("DeepFloyd IF's text encoder is a T5, not a CLIP"))
            }
            PipelineKind::StableDiffusionXl => {
                // Loaded in folder order, so a broken model reports its first bad folder.
                let first = if index.refiner { None } else { Some(first()?) };
                let tokenizer_2 = tok("tokenizer_2")?;
                let dir = root.join("text_encoder_2");
                let model = CLIPTextModelWithProjection::from_folder_patched(
                    &dir, variant, dtype, device, runtime, patch_2,
                )?;
                first.into_iter().chain([(tokenizer_2, Encoder::Projection(model))]).collect()
            }
        };
        Ok(Self { kind, parts, t5: None, force_zeros_for_empty_prompt, expansions: Vec::new() })
    }

    /// A T5's `d_model`, for the load-time check against the U-Net's text width.
    pub fn t5_width(&self) -> Option<usize> {
        self.t5.as_ref().map(|t| t.params().d_model)
    }

    /// Whether there is a text encoder at all (an IF folder saved without its T5 has none).
    pub fn has_encoder(&self) -> bool {
        self.t5.is_some() || !self.parts.is_empty()
    }

    /// Refuses what only CLIP encoders can do, naming the flag.
    pub fn check_options(&self, clip_skip: Option<usize>, mode: LongPrompt) -> Result<()> {
        if self.t5.is_none() {
            return Ok(());
        }
        if clip_skip.is_some() {
            return Err(PipelineError::invalid(
                "clip-skip",
                "this model's text encoder is a T5 (T5EncoderModel); clip skip applies to CLIP \
                 text encoders only",
            ));
        }
        if mode == LongPrompt::Chunk {
            return Err(PipelineError::invalid(
                "long-prompt",
                "chunked long prompts are CLIP's (AUTOMATIC1111); this model's text encoder is a \
                 T5, whose prompts are truncated at the tokenizer's model_max_length",
            ));
        }
        Ok(())
    }

    /// The encoders of a single-file checkpoint, already loaded.
    pub fn from_models(
        kind: PipelineKind,
        force_zeros_for_empty_prompt: bool,
        first: (CLIPTokenizer, CLIPTextModel),
        second: Option<(CLIPTokenizer, CLIPTextModelWithProjection)>,
    ) -> Self {
        let mut parts = vec![(first.0, Encoder::Plain(first.1))];
        parts.extend(second.map(|(t, m)| (t, Encoder::Projection(m))));
        Self { kind, parts, t5: None, force_zeros_for_empty_prompt, expansions: Vec::new() }
    }

    /// The projection size of SDXL's pooled text embeddings (`text_encoder_2.projection_dim`).
    pub fn pooled_dim(&self) -> Option<usize> {
        self.parts.iter().find_map(|(_, e)| match e {
            Encoder::Projection(m) => m.text_model().params().projection_dim,
            Encoder::Plain(_) => None,
        })
    }

    /// Adds a textual-inversion embedding (one `[n, D]` tensor per text encoder) as diffusers'
    /// `load_textual_inversion` does.
    pub fn add_embedding(&mut self, file: &EmbeddingFile, path: &Path) -> Result<()> {
        if self.t5.is_some() {
            return Err(PipelineError::msg(format!(
                "--embedding {}: textual inversion adds tokens to CLIP text encoders; this \
                 model's text encoder is a T5 (T5EncoderModel)",
                path.display()
            )));
        }
        let names = tokens(&file.token, file.loaded.vectors);
        for ((tokenizer, encoder), vectors) in self.parts.iter_mut().zip(&file.vectors) {
            let model = match encoder {
                Encoder::Plain(m) => m,
                Encoder::Projection(m) => m.text_model_mut(),
            };
            let width = model.params().hidden_size;
            if vectors.dim(1)? != width {
                return Err(PipelineError::msg(format!(
                    "--embedding {}: vectors of width {}, but this model's text encoder takes \
                     {width} (an embedding for another model?)",
                    path.display(),
                    vectors.dim(1)?
                )));
            }
            let mut first = None;
            for name in &names {
                let id = tokenizer.add_token(name).map_err(|e| {
                    PipelineError::msg(format!("--embedding {}: {e}", path.display()))
                })?;
                first.get_or_insert(id);
            }
            model.add_token_embeddings(first.unwrap_or_default() as usize, vectors)?;
        }
        if names.len() > 1 {
            self.expansions.push((file.token.clone(), names.join(" ")));
        }
        Ok(())
    }

    /// diffusers' `maybe_convert_prompt`: each multi-vector token spelled out.
    fn expand(&self, text: &str) -> String {
        let mut out = text.to_string();
        for (token, expanded) in &self.expansions {
            out = out.replace(token.as_str(), expanded);
        }
        out
    }

    /// Whether an absent negative prompt means zero embeddings.
    pub fn zeros_for_absent_negative(&self) -> bool {
        self.kind == PipelineKind::StableDiffusionXl && self.force_zeros_for_empty_prompt
    }

    fn layer(&self, clip_skip: Option<usize>) -> ClipLayer {
        match self.kind {
            PipelineKind::StableDiffusionXl => ClipLayer::stable_diffusion_xl(clip_skip),
            _ => ClipLayer::stable_diffusion(clip_skip),
        }
    }

    /// Encodes `texts` (one row each), every row padded to the same number of chunks; with
    /// [`Emphasis::A1111`], prompts using the emphasis syntax get their tokens' weights applied
    /// to each chunk's embeddings (mean restored per prompt and chunk: A1111 restores it over
    /// its whole batch, the same for one prompt). A `BREAK` makes its prompt chunked whatever
    /// `mode` says.
    pub fn encode(
        &self,
        texts: &[&str],
        clip_skip: Option<usize>,
        mode: LongPrompt,
        emphasis: Emphasis,
        device: &Device,
    ) -> Result<PromptEmbeds> {
        if let Some(t5) = &self.t5 {
            return Ok(PromptEmbeds { hidden: t5.encode(texts, device)?, pooled: None });
        }
        if self.parts.is_empty() {
            return Err(PipelineError::msg(
                "this model has no text encoder (text_encoder is null in model_index.json)",
            ));
        }
        let layer = self.layer(clip_skip);
        let mut hidden_parts = Vec::with_capacity(self.parts.len());
        let mut pooled = None;
        let long = match mode {
            LongPrompt::Truncate => ltd_text::LongPrompt::Truncate,
            LongPrompt::Chunk => {
                ltd_text::LongPrompt::Chunks { comma_backtrack: ltd_text::A1111_COMMA_BACKTRACK }
            }
        };
        for (tokenizer, encoder) in &self.parts {
            let mut rows: Vec<Vec<Encoded>> = Vec::with_capacity(texts.len());
            // Per row and chunk, the tokens' weights (None: all 1).
            let mut weights: Vec<Vec<Option<Vec<f64>>>> = Vec::with_capacity(texts.len());
            for text in texts {
                let expanded = self.expand(text);
                let text = &expanded.as_str();
                let parsed = match emphasis {
                    Emphasis::A1111 => Some(parse_prompt_attention(text)),
                    Emphasis::None => None,
                };
                if let Some(parsed) = parsed.filter(|p| !is_plain(p, text)) {
                    let chunks = tokenizer.encode_weighted(&parsed, long)?;
                    if let Some(dropped) = chunks[0].encoded.truncated_text.as_ref() {
                        warn_truncated(tokenizer, dropped);
                    }
                    weights.push(chunks.iter().map(|c| Some(c.multipliers.clone())).collect());
                    rows.push(chunks.into_iter().map(|c| c.encoded).collect());
                    continue;
                }
                let chunks = match mode {
                    LongPrompt::Truncate => {
                        let e = tokenizer.encode(text)?;
                        if let Some(dropped) = &e.truncated_text {
                            warn_truncated(tokenizer, dropped);
                        }
                        vec![e]
                    }
                    LongPrompt::Chunk => {
                        tokenizer.encode_chunks(text, ltd_text::A1111_COMMA_BACKTRACK)?
                    }
                };
                weights.push(vec![None; chunks.len()]);
                rows.push(chunks);
            }
            let chunks = rows.iter().map(Vec::len).max().unwrap_or(1);
            for (row, w) in rows.iter_mut().zip(&mut weights) {
                row.resize(chunks, tokenizer.empty_chunk());
                w.resize(chunks, None);
            }
            // Chunk c of every row forms one encoder batch; concatenate along the sequence.
            let mut per_chunk = Vec::with_capacity(chunks);
            for c in 0..chunks {
                let batch: Vec<Encoded> = rows.iter().map(|r| r[c].clone()).collect();
                let ids = ids_tensor(&batch, device)?;
                let out = match encoder {
                    Encoder::Plain(m) => m.encode(&ids, layer, false)?,
                    Encoder::Projection(m) => m.encode(&ids, layer)?,
                };
                if c == 0 && out.text_embeds.is_some() {
                    pooled = out.text_embeds.clone();
                }
                let hidden = if weights.iter().any(|w| w[c].is_some()) {
                    let rows = weights
                        .iter()
                        .enumerate()
                        .map(|(r, w)| {
                            let z = out.hidden.get(r)?;
                            Ok(match &w[c] {
                                Some(m) => emphasize(&z, m)?,
                                None => z,
                            })
                        })
                        .collect::<Result<Vec<_>>>()?;
                    Tensor::stack(&rows, 0)?
                } else {
                    out.hidden
                };
                per_chunk.push(hidden);
            }
            hidden_parts.push(Tensor::cat(&per_chunk, 1)?);
        }
        let hidden = Tensor::cat(&hidden_parts, 2)?;
        if self.kind == PipelineKind::StableDiffusionXl && pooled.is_none() {
            return Err(PipelineError::msg("SDXL needs a text encoder with projection"));
        }
        Ok(PromptEmbeds { hidden, pooled })
    }
}

impl T5Text {
    fn load(
        root: &Path,
        variant: Option<&str>,
        dtype: DType,
        device: &Device,
        runtime: &RuntimeOptions,
    ) -> Result<Self> {
        let dir = root.join("tokenizer");
        let tokenizer = T5Tokenizer::from_folder(&dir)?;
        let max_length = tokenizer.model_max_length().ok_or_else(|| {
            PipelineError::msg(format!(
                "{}: tokenizer_config.json sets no model_max_length (or transformers' \
                 \"unlimited\" 1e30), and StableDiffusionPipeline pads T5 prompts to it; set it \
                 to the length the model was trained with",
                dir.display()
            ))
        })?;
        let model = T5EncoderModel::from_folder(
            &root.join("text_encoder"),
            variant,
            dtype,
            device,
            runtime,
        )?;
        Ok(Self { tokenizer, max_length, model: T5Model::Loaded(model), deepfloyd: false })
    }

    /// DeepFloyd IF's T5: the tokenizer and the encoder's config now (so that a broken folder
    /// fails at load, naming it), the weights at each encoding.
    fn on_demand(
        root: &Path,
        variant: Option<&str>,
        dtype: DType,
        device: &Device,
        runtime: &RuntimeOptions,
    ) -> Result<Self> {
        let tokenizer = T5Tokenizer::from_folder(&root.join("tokenizer"))?;
        let dir = root.join("text_encoder");
        let params = ltd_nn::load_config::<T5Config, T5Params>(&dir.join("config.json"))?;
        // The weights must be there too; they are mapped at each encoding.
        ltd_nn::weights::component_weights(&dir, &["model"], variant)?;
        let model = T5Model::OnDemand {
            dir,
            variant: variant.map(str::to_string),
            dtype,
            device: device.clone(),
            runtime: *runtime,
            params,
        };
        Ok(Self { tokenizer, max_length: DEEPFLOYD_MAX_LENGTH, model, deepfloyd: true })
    }

    fn params(&self) -> &T5Params {
        match &self.model {
            T5Model::Loaded(m) => m.params(),
            T5Model::OnDemand { params, .. } => params,
        }
    }

    /// `[N, model_max_length, d_model]` for `texts`, as diffusers' `encode_prompt` computes it.
    fn encode(&self, texts: &[&str], device: &Device) -> Result<Tensor> {
        let mut batch = Vec::with_capacity(texts.len());
        for text in texts {
            let lowered;
            let text = if self.deepfloyd {
                lowered = ltd_text::python_strip(&text.to_lowercase()).to_string();
                lowered.as_str()
            } else {
                text
            };
            let e = self.tokenizer.encode(text, Some(self.max_length))?;
            if let Some(dropped) = &e.truncated_text {
                // diffusers' own words, which name CLIP whatever the encoder.
                tracing::warn!(
                    "The following part of your input was truncated because CLIP can only \
                     handle sequences up to {} tokens: {dropped}",
                    self.max_length
                );
            }
            batch.push(e);
        }
        let ids = ids_tensor(&batch, device)?;
        let mask = if self.deepfloyd || self.params().use_attention_mask {
            Some(attention_mask_tensor(&batch, device)?)
        } else {
            None
        };
        match &self.model {
            T5Model::Loaded(model) => Ok(model.forward(&ids, mask.as_ref())?),
            T5Model::OnDemand { dir, variant, dtype, device, runtime, .. } => {
                let _span = tracing::info_span!("load", model = %dir.display()).entered();
                let model =
                    T5EncoderModel::from_folder(dir, variant.as_deref(), *dtype, device, runtime)?;
                let hidden = model.forward(&ids, mask.as_ref())?;
                // Released here, before the denoising loop: not resident while the U-Net runs.
                drop(model);
                Ok(hidden)
            }
        }
    }
}

/// diffusers' truncation warning.
fn warn_truncated(tokenizer: &CLIPTokenizer, dropped: &str) {
    tracing::warn!(
        "The following part of your input was truncated because CLIP can only handle sequences \
         up to {} tokens: {dropped}",
        tokenizer.model_max_length()
    );
}

impl PromptEmbeds {
    /// Each row repeated `n` times in place (row 0 ×n, then row 1 ×n…), as diffusers'
    /// `num_images_per_prompt`.
    pub fn repeat_rows(&self, n: usize) -> Result<Self> {
        let rep = |t: &Tensor| -> Result<Tensor> {
            if n == 1 {
                return Ok(t.clone());
            }
            let rows = t.dim(0)?;
            let idx: Vec<u32> = (0..rows as u32).flat_map(|r| std::iter::repeat_n(r, n)).collect();
            let idx = Tensor::from_vec(idx, rows * n, t.device())?;
            Ok(t.index_select(&idx, 0)?)
        };
        Ok(Self { hidden: rep(&self.hidden)?, pooled: self.pooled.as_ref().map(rep).transpose()? })
    }

    /// Zeros of the same shapes (SDXL's absent negative prompt).
    pub fn zeros_like(&self) -> Result<Self> {
        Ok(Self {
            hidden: self.hidden.zeros_like()?,
            pooled: self.pooled.as_ref().map(Tensor::zeros_like).transpose()?,
        })
    }
}
