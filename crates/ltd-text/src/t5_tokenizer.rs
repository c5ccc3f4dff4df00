//! T5's SentencePiece unigram tokenizer, as transformers 5.x's `T5Tokenizer` (the former
//! `T5TokenizerFast`) builds it from a `tokenizer.json` or, where a folder has none, from the
//! SentencePiece model `spiece.model` (read by [`crate::spiece`]).
//!
//! transformers keeps only the unigram vocabulary and the SentencePiece normalisation table
//! (`Precompiled` charsmap) of the file and assembles the rest itself: whitespace split, `▁`
//! metaspace prepended to every word, `<unk>` at id 2, EOS appended, and the added tokens of
//! the folder. We do the same, so an older `tokenizer.json` gives the ids transformers 5
//! gives, not the ones its own pipeline section would.

use std::path::Path;

use ltd_nn::{read_json, Error, Result};
use serde_json::Value;
use tokenizers::models::unigram::Unigram;
use tokenizers::normalizers::Precompiled;
use tokenizers::pre_tokenizers::metaspace::{Metaspace, PrependScheme};
use tokenizers::pre_tokenizers::sequence::Sequence as PreTokenizerSequence;
use tokenizers::pre_tokenizers::whitespace::WhitespaceSplit;
use tokenizers::{NormalizerWrapper, Tokenizer};

use crate::encoded::Encoded;
use crate::spiece::{self, PieceType, SentencePieceModel};
use crate::tokenizer_config::TokenizerFolder;

/// transformers' `T5Tokenizer` puts `<unk>` at id 2 whatever the file says.
const T5_UNK_ID: usize = 2;
/// `T5Tokenizer.__init__`'s default `extra_ids`.
const DEFAULT_EXTRA_IDS: usize = 100;

/// The T5 tokenizer of a `tokenizer/` folder with a `tokenizer.json` or a `spiece.model`.
#[derive(Debug, Clone)]
pub struct T5Tokenizer {
    inner: Tokenizer,
    eos_id: u32,
    pad_id: u32,
    model_max_length: Option<usize>,
}

impl T5Tokenizer {
    /// Loads `tokenizer.json`, or where there is none `spiece.model` (the layout of
    /// t5-v1_1, DeepFloyd IF and PixArt repos), as transformers does, plus
    /// `tokenizer_config.json` and `special_tokens_map.json`.
    pub fn from_folder(dir: &Path) -> Result<Self> {
        let json_path = dir.join("tokenizer.json");
        let spm_path = dir.join("spiece.model");
        if json_path.is_file() {
            Self::from_tokenizer_json(dir, &json_path)
        } else if spm_path.is_file() {
            Self::from_spiece_model(dir, &spm_path)
        } else {
            Err(Error::msg(format!(
                "{}: no T5 tokenizer: tokenizer.json and spiece.model are both missing (a T5 \
                 tokenizer folder needs one of them)",
                dir.display()
            )))
        }
    }

    fn from_tokenizer_json(dir: &Path, path: &Path) -> Result<Self> {
        let json: Value = read_json(path)?;
        let bad = |message: String| Error::Json { path: path.to_path_buf(), message };
        let model = json.get("model").ok_or_else(|| bad("no `model` section".into()))?;
        match model.get("type").and_then(Value::as_str) {
            Some("Unigram") | None => {}
            Some(other) => {
                return Err(bad(format!(
                    "field `model.type`: a T5 tokenizer is Unigram, not {other}"
                )))
            }
        }
        let vocab: Vec<(String, f64)> =
            serde_json::from_value(model.get("vocab").cloned().unwrap_or(Value::Null))
                .map_err(|e| bad(format!("field `model.vocab`: {e}")))?;
        let normalizer = precompiled_normalizer(json.get("normalizer"), path)?;
        let folder = TokenizerFolder::read(dir, json.get("added_tokens"), T5_DEFAULTS)?;
        Self::assemble(dir, path, vocab, normalizer, folder)
    }

    /// transformers' `_convert_from_sentencepiece` for `T5Tokenizer`: the pieces with their
    /// scores, then the sentinels `<extra_id_{n-1}>` … `<extra_id_0>` (score 0) appended to
    /// the vocabulary (`T5Converter.convert_from_spm`); the precompiled normalisation table;
    /// control and user-defined pieces as added tokens (`SentencePieceExtractor.extract`,
    /// not normalized, special for control pieces).
    fn from_spiece_model(dir: &Path, path: &Path) -> Result<Self> {
        let spm = SentencePieceModel::read(path)?;
        if spm.model_type != spiece::UNIGRAM {
            return Err(Error::msg(format!(
                "{}: trainer_spec.model_type is {} (1 = unigram): a T5 tokenizer is unigram",
                path.display(),
                spm.model_type
            )));
        }
        let added: Vec<Value> = spm
            .pieces
            .iter()
            .enumerate()
            .filter(|(_, p)| matches!(p.kind, PieceType::Control | PieceType::UserDefined))
            .map(|(id, p)| {
                serde_json::json!({
                    "id": id,
                    "content": p.piece,
                    "normalized": false,
                    "special": p.kind == PieceType::Control,
                })
            })
            .collect();
        let folder = TokenizerFolder::read(dir, Some(&Value::Array(added)), T5_DEFAULTS)?;
        let extra_ids = folder.extra_ids.unwrap_or(DEFAULT_EXTRA_IDS);
        let mut vocab: Vec<(String, f64)> =
            spm.pieces.iter().map(|p| (p.piece.clone(), f64::from(p.score))).collect();
        vocab.extend((0..extra_ids).rev().map(|i| (format!("<extra_id_{i}>"), 0.0)));
        let normalizer = match &spm.precompiled_charsmap {
            Some(map) => {
                Some(NormalizerWrapper::Precompiled(Precompiled::from(map).map_err(|e| {
                    Error::msg(format!(
                        "{}: normalizer_spec.precompiled_charsmap: {e}",
                        path.display()
                    ))
                })?))
            }
            None => None,
        };
        Self::assemble(dir, path, vocab, normalizer, folder)
    }

    /// What transformers' `T5Tokenizer.__init__` builds around a vocabulary: `<unk>` at id 2,
    /// whitespace split and `▁` metaspace, the added tokens of the folder.
    fn assemble(
        dir: &Path,
        path: &Path,
        vocab: Vec<(String, f64)>,
        normalizer: Option<NormalizerWrapper>,
        mut folder: TokenizerFolder,
    ) -> Result<Self> {
        let unigram = Unigram::from(vocab, Some(T5_UNK_ID), false).map_err(|e| Error::Json {
            path: path.to_path_buf(),
            message: format!("the vocabulary: {e}"),
        })?;
        let mut inner = Tokenizer::new(unigram);
        if let Some(normalizer) = normalizer {
            inner.with_normalizer(Some(normalizer));
        }
        let metaspace = Metaspace::new('▁', PrependScheme::Always, true);
        inner.with_pre_tokenizer(Some(PreTokenizerSequence::new(vec![
            WhitespaceSplit.into(),
            metaspace.clone().into(),
        ])));
        inner.with_decoder(Some(metaspace));

        let extra_ids = folder.extra_ids.unwrap_or(DEFAULT_EXTRA_IDS);
        folder.add_extra((0..extra_ids).map(|i| format!("<extra_id_{i}>")));
        inner.add_tokens(&folder.added_tokens());
        let id_of = |key: &str| -> Result<u32> {
            let token = folder
                .named(key)
                .ok_or_else(|| Error::msg(format!("{}: no `{key}` declared", dir.display())))?;
            inner.token_to_id(token).ok_or_else(|| {
                Error::msg(format!("{}: `{key}` {token:?} is not in the vocabulary", dir.display()))
            })
        };
        let (eos_id, pad_id) = (id_of("eos_token")?, id_of("pad_token")?);
        Ok(Self { inner, eos_id, pad_id, model_max_length: folder.model_max_length })
    }

    /// `model_max_length` from `tokenizer_config.json`, if it sets a real limit.
    pub fn model_max_length(&self) -> Option<usize> {
        self.model_max_length
    }

    /// The id of `</s>`.
    pub fn eos_id(&self) -> u32 {
        self.eos_id
    }

    /// The id of `<pad>`.
    pub fn pad_id(&self) -> u32 {
        self.pad_id
    }

    /// The ids of `text` without EOS, untruncated.
    pub fn tokenize(&self, text: &str) -> Result<Vec<u32>> {
        let encoding = self
            .inner
            .encode(text, false)
            .map_err(|e| Error::msg(format!("cannot tokenize {text:?}: {e}")))?;
        Ok(encoding.get_ids().to_vec())
    }

    /// `text` as `tokenizer(text, padding="max_length", max_length=…, truncation=True)`
    /// gives it: ids + EOS, truncated to and padded up to `max_length` (the folder's
    /// `model_max_length` when `None`).
    pub fn encode(&self, text: &str, max_length: Option<usize>) -> Result<Encoded> {
        let max_length = match max_length.or(self.model_max_length) {
            Some(n) if n >= 1 => n,
            Some(_) => return Err(Error::msg("T5 tokenizer: max_length must be at least 1 (EOS)")),
            None => {
                return Err(Error::msg(
                    "T5 tokenizer: no max_length given and tokenizer_config.json sets no \
                     model_max_length",
                ))
            }
        };
        let mut ids = self.tokenize(text)?;
        let truncated =
            if ids.len() > max_length - 1 { ids.split_off(max_length - 1) } else { Vec::new() };
        let truncated_text = if truncated.is_empty() {
            None
        } else {
            Some(
                self.inner
                    .decode(&truncated, false)
                    .map_err(|e| Error::msg(format!("cannot decode {truncated:?}: {e}")))?,
            )
        };
        ids.push(self.eos_id);
        let len = ids.len();
        ids.resize(max_length, self.pad_id);
        Ok(Encoded { ids, len, truncated, truncated_text })
    }
}

/// `T5Tokenizer.__init__`'s defaults for tokens a folder does not declare.
const T5_DEFAULTS: &[(&str, &str)] =
    [("eos_token", "</s>"), ("unk_token", "<unk>"), ("pad_token", "<pad>")].as_slice();

/// The `Precompiled` SentencePiece normaliser of a `tokenizer.json` normalizer section (alone or
/// inside a `Sequence`); transformers keeps it and drops the rest.
fn precompiled_normalizer(
    section: Option<&Value>,
    path: &Path,
) -> Result<Option<NormalizerWrapper>> {
    let entries: Vec<&Value> = match section {
        None | Some(Value::Null) => Vec::new(),
        Some(v) if v.get("type").and_then(Value::as_str) == Some("Sequence") => v
            .get("normalizers")
            .and_then(Value::as_array)
            .map(|a| a.iter().collect())
            .unwrap_or_default(),
        Some(v) => vec![v],
    };
    let Some(entry) =
        entries.into_iter().find(|e| e.get("type").and_then(Value::as_str) == Some("Precompiled"))
    else {
        return Ok(None);
    };
    serde_json::from_value(entry.clone()).map(Some).map_err(|e| Error::Json {
        path: path.to_path_buf(),
        message: format!("field `normalizer` (Precompiled): {e}"),
    })
}
