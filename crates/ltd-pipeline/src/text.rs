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

use std::path::Path;

use candle_core::{DType, Device, Tensor};
use ltd_nn::RuntimeOptions;
use ltd_text::{
    ids_tensor, CLIPTextModel, CLIPTextModelWithProjection, CLIPTokenizer, ClipLayer, Encoded,
};

use crate::error::{PipelineError, Result};
use crate::model_index::PipelineKind;
use crate::request::LongPrompt;

/// A tokenizer and the text encoder it feeds.
enum Encoder {
    Plain(CLIPTextModel),
    Projection(CLIPTextModelWithProjection),
}

/// The text encoders of a pipeline.
pub(crate) struct TextEncoders {
    kind: PipelineKind,
    parts: Vec<(CLIPTokenizer, Encoder)>,
    force_zeros_for_empty_prompt: bool,
}

/// Embeddings for a batch of prompts.
pub(crate) struct PromptEmbeds {
    /// `[N, L, D]`.
    pub hidden: Tensor,
    /// SDXL: the projected pooled output `[N, P]`.
    pub pooled: Option<Tensor>,
}

impl TextEncoders {
    /// Loads the tokenizer/encoder pairs the pipeline kind needs from `root`.
    pub fn load(
        root: &Path,
        kind: PipelineKind,
        force_zeros_for_empty_prompt: bool,
        variant: Option<&str>,
        dtype: DType,
        device: &Device,
        runtime: &RuntimeOptions,
    ) -> Result<Self> {
        let tok = |name: &str| CLIPTokenizer::from_folder(&root.join(name));
        let first = || -> Result<(CLIPTokenizer, Encoder)> {
            let tokenizer = tok("tokenizer")?;
            let dir = root.join("text_encoder");
            let model = CLIPTextModel::from_folder(&dir, variant, dtype, device, runtime)?;
            Ok((tokenizer, Encoder::Plain(model)))
        };
        let parts = match kind {
            PipelineKind::StableDiffusion => vec![first()?],
            PipelineKind::StableDiffusionXl => {
                // Loaded in folder order, so a broken model reports its first bad folder.
                let first = first()?;
                let tokenizer_2 = tok("tokenizer_2")?;
                let dir = root.join("text_encoder_2");
                let model = CLIPTextModelWithProjection::from_folder(
                    &dir, variant, dtype, device, runtime,
                )?;
                vec![first, (tokenizer_2, Encoder::Projection(model))]
            }
        };
        Ok(Self { kind, parts, force_zeros_for_empty_prompt })
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
        Self { kind, parts, force_zeros_for_empty_prompt }
    }

    /// The projection size of SDXL's pooled text embeddings (`text_encoder_2.projection_dim`).
    pub fn pooled_dim(&self) -> Option<usize> {
        self.parts.iter().find_map(|(_, e)| match e {
            Encoder::Projection(m) => m.text_model().params().projection_dim,
            Encoder::Plain(_) => None,
        })
    }

    /// Whether an absent negative prompt means zero embeddings.
    pub fn zeros_for_absent_negative(&self) -> bool {
        self.kind == PipelineKind::StableDiffusionXl && self.force_zeros_for_empty_prompt
    }

    fn layer(&self, clip_skip: Option<usize>) -> ClipLayer {
        match self.kind {
            PipelineKind::StableDiffusion => ClipLayer::stable_diffusion(clip_skip),
            PipelineKind::StableDiffusionXl => ClipLayer::stable_diffusion_xl(clip_skip),
        }
    }

    /// Encodes `texts` (one row each), every row padded to the same number of chunks.
    pub fn encode(
        &self,
        texts: &[&str],
        clip_skip: Option<usize>,
        mode: LongPrompt,
        device: &Device,
    ) -> Result<PromptEmbeds> {
        let layer = self.layer(clip_skip);
        let mut hidden_parts = Vec::with_capacity(self.parts.len());
        let mut pooled = None;
        for (tokenizer, encoder) in &self.parts {
            let mut rows: Vec<Vec<Encoded>> = Vec::with_capacity(texts.len());
            for text in texts {
                let chunks = match mode {
                    LongPrompt::Truncate => {
                        let e = tokenizer.encode(text)?;
                        if let Some(dropped) = &e.truncated_text {
                            tracing::warn!(
                                "The following part of your input was truncated because CLIP can \
                                 only handle sequences up to {} tokens: {dropped}",
                                tokenizer.model_max_length()
                            );
                        }
                        vec![e]
                    }
                    LongPrompt::Chunk => {
                        tokenizer.encode_chunks(text, ltd_text::A1111_COMMA_BACKTRACK)?
                    }
                };
                rows.push(chunks);
            }
            let chunks = rows.iter().map(Vec::len).max().unwrap_or(1);
            for row in &mut rows {
                row.resize(chunks, tokenizer.empty_chunk());
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
                per_chunk.push(out.hidden);
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
