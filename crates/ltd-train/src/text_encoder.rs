//! The text encoder a U-Net trains against: a CLIP text model or a T5 encoder, chosen by its
//! transformers `config.json` (`model_type`, else `architectures`), with the tokenizer that
//! feeds it and the way it is written into the pipeline folder.
//!
//! Both are prepared exactly as diffusers' `StableDiffusionPipeline.encode_prompt` prepares
//! them, so that a model is trained on the text states it is later generated with (ltd-gen's
//! `ltd_pipeline::text` does the same):
//!
//! - CLIP: `tokenizer(padding="max_length", max_length=77, truncation=True)` (BOS, EOS, padded
//!   with the pad token) and `last_hidden_state`, no attention mask;
//! - T5: `tokenizer(padding="max_length", max_length=tokenizer.model_max_length,
//!   truncation=True)` (EOS, padded with `<pad>`) and `last_hidden_state`, with the attention
//!   mask only when the encoder's config says `use_attention_mask: true`.

use std::path::Path;

use candle_core::{DType, Device, Tensor};
use candle_nn::VarBuilder;
use ltd_nn::RuntimeOptions;
use ltd_text::{
    attention_mask_tensor, ids_tensor, CLIPTextConfig, CLIPTextModel, CLIPTokenizer,
    ClipTextParams, Encoded, T5Config, T5EncoderModel, T5Params, T5Tokenizer,
};
use serde_json::{json, Value};

use crate::error::{Result, TrainError};
use crate::export::{read_json, write_transformers_model};

/// Which family a text encoder belongs to.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum TextEncoderKind {
    /// transformers' `CLIPTextModel` (`model_type` `clip_text_model`), CLIP's BPE tokenizer.
    Clip,
    /// transformers' `T5EncoderModel` (`model_type` `t5`), T5's unigram tokenizer.
    T5,
}

/// `architectures` entries of each family.
const CLIP_ARCHITECTURES: &[&str] = &["CLIPTextModel", "CLIPTextModelWithProjection", "CLIPModel"];
const T5_ARCHITECTURES: &[&str] = &["T5EncoderModel", "T5ForConditionalGeneration", "T5Model"];

impl TextEncoderKind {
    /// The family of a transformers config: its `model_type` (`clip_text_model` or `clip`;
    /// `t5`), else its `architectures`; a config with neither is a CLIP text config (as
    /// `CLIPTextConfig(**json)` reads it). The error says what the config names instead.
    pub fn of_config(config: &Value) -> std::result::Result<Self, String> {
        if let Some(model_type) = config.get("model_type").and_then(Value::as_str) {
            return match model_type {
                "clip_text_model" | "clip" => Ok(Self::Clip),
                "t5" => Ok(Self::T5),
                other => Err(format!(
                    "model_type `{other}` is neither a CLIP text model (`clip_text_model`) nor a \
                     T5 encoder (`t5`)"
                )),
            };
        }
        let names: Vec<&str> = config
            .get("architectures")
            .and_then(Value::as_array)
            .map(|a| a.iter().filter_map(Value::as_str).collect())
            .unwrap_or_default();
        match names.first() {
            None => Ok(Self::Clip),
            Some(n) if CLIP_ARCHITECTURES.contains(n) => Ok(Self::Clip),
            Some(n) if T5_ARCHITECTURES.contains(n) => Ok(Self::T5),
            Some(n) => Err(format!(
                "architectures `{n}` is neither a CLIP text model ({}) nor a T5 encoder ({}), \
                 and there is no model_type",
                CLIP_ARCHITECTURES.join(", "),
                T5_ARCHITECTURES.join(", ")
            )),
        }
    }

    /// The family of the text encoder folder `dir` (its `config.json`).
    pub fn of_folder(dir: &Path) -> Result<Self> {
        let path = dir.join("config.json");
        Self::of_config(&read_json(&path)?)
            .map_err(|m| TrainError::msg(format!("{}: {m}", path.display())))
    }

    /// The class `model_index.json` names for the text encoder.
    pub fn model_class(self) -> &'static str {
        match self {
            Self::Clip => "CLIPTextModel",
            Self::T5 => "T5EncoderModel",
        }
    }

    /// The class `model_index.json` names for the tokenizer.
    pub fn tokenizer_class(self) -> &'static str {
        match self {
            Self::Clip => "CLIPTokenizer",
            Self::T5 => "T5Tokenizer",
        }
    }

    /// `model_type` of the exported config.
    fn model_type(self) -> &'static str {
        match self {
            Self::Clip => "clip_text_model",
            Self::T5 => "t5",
        }
    }
}

/// The tokenizer of a text encoder, padding as diffusers' `StableDiffusionPipeline` pads.
#[derive(Debug, Clone)]
pub enum TextTokenizer {
    /// CLIP's BPE, to 77 tokens (the tokenizer's `model_max_length`).
    Clip(CLIPTokenizer),
    /// T5's unigram, to the tokenizer's `model_max_length`.
    T5 {
        /// The tokenizer.
        tokenizer: T5Tokenizer,
        /// `model_max_length` of its `tokenizer_config.json`.
        max_length: usize,
    },
}

impl TextTokenizer {
    /// Loads the tokenizer folder `dir` of a `kind` text encoder.
    pub fn load(kind: TextEncoderKind, dir: &Path) -> Result<Self> {
        Ok(match kind {
            TextEncoderKind::Clip => Self::Clip(CLIPTokenizer::from_folder(dir)?),
            TextEncoderKind::T5 => {
                let tokenizer = T5Tokenizer::from_folder(dir)?;
                // The pipeline refuses such a folder (transformers overflows padding to
                // "unlimited"), so the trainer must not write one.
                let max_length = tokenizer.model_max_length().ok_or_else(|| {
                    TrainError::msg(format!(
                        "{}: tokenizer_config.json sets no model_max_length; \
                         StableDiffusionPipeline pads T5 prompts to it, so set it to the \
                         length to train with",
                        dir.display()
                    ))
                })?;
                Self::T5 { tokenizer, max_length }
            }
        })
    }

    /// `text` tokenized and padded as the pipeline does it.
    pub fn encode(&self, text: &str) -> Result<Encoded> {
        Ok(match self {
            Self::Clip(t) => t.encode(text)?,
            Self::T5 { tokenizer, max_length } => tokenizer.encode(text, Some(*max_length))?,
        })
    }
}

/// A CLIP or T5 text encoder, built from a folder or from a config.
#[derive(Debug, Clone)]
pub enum TextEncoder {
    /// transformers' `CLIPTextModel`.
    Clip(CLIPTextModel),
    /// transformers' `T5EncoderModel`.
    T5(T5EncoderModel),
}

impl TextEncoder {
    /// Loads a trained text encoder folder in f32.
    pub fn load(
        kind: TextEncoderKind,
        dir: &Path,
        dev: &Device,
        rt: &RuntimeOptions,
    ) -> Result<Self> {
        Ok(match kind {
            TextEncoderKind::Clip => {
                Self::Clip(CLIPTextModel::from_folder(dir, None, DType::F32, dev, rt)?)
            }
            TextEncoderKind::T5 => {
                Self::T5(T5EncoderModel::from_folder(dir, None, DType::F32, dev, rt)?)
            }
        })
    }

    /// A new text encoder of the transformers `config` on `vb` (transformers' key names under
    /// it), of the family `config` names.
    pub fn new(vb: VarBuilder, config: &Value, rt: &RuntimeOptions) -> Result<Self> {
        let kind = TextEncoderKind::of_config(config)
            .map_err(|m| TrainError::option("text-encoder-config", m))?;
        let bad = |e: serde_json::Error| TrainError::option("text-encoder-config", e.to_string());
        Ok(match kind {
            TextEncoderKind::Clip => {
                let c: CLIPTextConfig = serde_json::from_value(config.clone()).map_err(bad)?;
                let params =
                    ClipTextParams::try_from(c).map_err(|e| TrainError::Model(e.into()))?;
                Self::Clip(CLIPTextModel::new(vb, &params, rt)?)
            }
            TextEncoderKind::T5 => {
                let c: T5Config = serde_json::from_value(config.clone()).map_err(bad)?;
                let params = T5Params::try_from(c).map_err(|e| TrainError::Model(e.into()))?;
                Self::T5(T5EncoderModel::new(vb, &params, rt)?)
            }
        })
    }

    /// The family.
    pub fn kind(&self) -> TextEncoderKind {
        match self {
            Self::Clip(_) => TextEncoderKind::Clip,
            Self::T5(_) => TextEncoderKind::T5,
        }
    }

    /// Width of the states it gives (`hidden_size`, `d_model`).
    pub fn width(&self) -> usize {
        match self {
            Self::Clip(m) => m.params().hidden_size,
            Self::T5(m) => m.params().d_model,
        }
    }

    /// `last_hidden_state` `[B, L, width]` of a batch of tokenized prompts, with T5's
    /// attention mask when its config asks for it (see the module docs).
    pub fn forward(&self, batch: &[Encoded], dev: &Device) -> Result<Tensor> {
        let ids = ids_tensor(batch, dev)?;
        Ok(match self {
            Self::Clip(m) => m.forward(&ids)?,
            Self::T5(m) => {
                let mask = match m.params().use_attention_mask {
                    true => Some(attention_mask_tensor(batch, dev)?),
                    false => None,
                };
                m.forward(&ids, mask.as_ref())?
            }
        })
    }
}

/// Writes a trained text encoder of the transformers `config` as a transformers folder:
/// `config.json` (with the family's `architectures` and `model_type`) and `model.safetensors`
/// with the weights stored as `dtype`.
pub fn write_text_encoder(
    dir: &Path,
    config: &Value,
    tensors: &std::collections::HashMap<String, Tensor>,
    dtype: DType,
) -> Result<TextEncoderKind> {
    let kind = TextEncoderKind::of_config(config)
        .map_err(|m| TrainError::option("text-encoder-config", m))?;
    let mut cfg = match config {
        Value::Object(m) => m.clone(),
        _ => serde_json::Map::new(),
    };
    cfg.insert("architectures".into(), json!([kind.model_class()]));
    cfg.insert("model_type".into(), json!(kind.model_type()));
    write_transformers_model(dir, &Value::Object(cfg), tensors, dtype)?;
    Ok(kind)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_kind_follows_model_type_then_architectures() {
        let check = |config: Value, expected: std::result::Result<TextEncoderKind, &str>| {
            let got = TextEncoderKind::of_config(&config);
            match expected {
                Ok(kind) => assert_eq!(got, Ok(kind), "{config}"),
                Err(part) => {
                    let err = got.unwrap_err();
                    assert!(err.contains(part), "{config}: {err}");
                }
            }
        };
        check(json!({"model_type": "clip_text_model"}), Ok(TextEncoderKind::Clip));
        check(json!({"model_type": "clip"}), Ok(TextEncoderKind::Clip));
        check(json!({"model_type": "t5"}), Ok(TextEncoderKind::T5));
        check(json!({"architectures": ["T5EncoderModel"]}), Ok(TextEncoderKind::T5));
        check(json!({"architectures": ["CLIPTextModel"]}), Ok(TextEncoderKind::Clip));
        // model_type decides over architectures.
        check(
            json!({"model_type": "t5", "architectures": ["CLIPTextModel"]}),
            Ok(TextEncoderKind::T5),
        );
        check(json!({"hidden_size": 16}), Ok(TextEncoderKind::Clip));
        check(json!({"model_type": "bert"}), Err("model_type `bert` is neither"));
        check(json!({"architectures": ["BertModel"]}), Err("architectures `BertModel`"));
    }
}
