//! Tokenizers and text encoders: prompts to the ids and embeddings the reference gives.
//!
//! - [`CLIPTokenizer`]: CLIP's byte-level BPE from a diffusers `tokenizer/` folder, with
//!   either `vocab.json` + `merges.txt` or `tokenizer.json`; truncation as diffusers does it,
//!   or AUTOMATIC1111-style chunks for long prompts ([`LongPrompt`]).
//! - [`T5Tokenizer`]: T5's SentencePiece unigram from `tokenizer.json` or `spiece.model`.
//! - [`CLIPTextModel`], [`CLIPTextModelWithProjection`]: SD 1.x/2.x/XL text encoders, any
//!   hidden layer on request ([`ClipLayer`]), pooled output and projection.
//! - [`T5EncoderModel`]: the T5 encoder of Imagen-style models.
//!
//! Everything mirrors transformers 5.x: config fields and defaults, checkpoint key names,
//! and the exact math (`quick_gelu`, erf `gelu`, T5's tanh `gelu_new`, EOS pooling). Errors are
//! [`ltd_nn::Error`]s naming the file and field at fault.

pub mod activation;
pub mod clip;
pub mod clip_tokenizer;
pub mod encoded;
pub mod folder;
pub mod prompt_weighting;
pub mod spiece;
pub mod t5;
pub mod t5_tokenizer;
mod tokenizer_config;

pub use activation::HiddenAct;
pub use clip::{
    CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection, ClipLayer, ClipTextOutput,
    ClipTextParams, Pooling,
};
pub use clip_tokenizer::{CLIPTokenizer, LongPrompt, A1111_COMMA_BACKTRACK};
pub use encoded::{attention_mask_tensor, ids_tensor, python_strip, Encoded};
pub use prompt_weighting::{emphasize, is_plain, parse_prompt_attention, WeightedChunk};
pub use t5::{T5Config, T5EncoderModel, T5Params};
pub use t5_tokenizer::T5Tokenizer;
