//! CLIP's byte-level BPE tokenizer, as transformers 5.x's `CLIPTokenizer` builds it.
//!
//! One implementation for both folder layouts: the vocabulary and merges come either from
//! `vocab.json` + `merges.txt` (the official SD 1.5 / 2.1 / XL repos) or from the `model`
//! section of `tokenizer.json`, and the rest of the pipeline is assembled here from the same
//! `tokenizers` components transformers uses (transformers, too, takes only the vocabulary
//! and merges from a `tokenizer.json` and rebuilds the rest): NFC, `\s+` → " ", lower-casing,
//! the CLIP split pattern, byte-level mapping, BPE with `</w>` word ends (and its word cache),
//! and the added tokens `tokenizer_config.json` / `special_tokens_map.json` declare.
//!
//! Added tokens are matched in the text before anything else, so with SD 2.x's pad token `!`
//! every `!` of a prompt becomes id 0, exactly as in transformers.

use std::collections::HashMap;
use std::io::BufRead;
use std::path::Path;

use ltd_nn::{read_json, Error, Result};
use serde_json::Value;
use tokenizers::models::bpe::{Merges, Vocab, BPE};
use tokenizers::normalizers::{Lowercase, Replace, Sequence as NormalizerSequence, NFC};
use tokenizers::pre_tokenizers::byte_level::ByteLevel;
use tokenizers::pre_tokenizers::sequence::Sequence as PreTokenizerSequence;
use tokenizers::pre_tokenizers::split::{Split, SplitPattern};
use tokenizers::{SplitDelimiterBehavior, Tokenizer};

use crate::encoded::{python_strip, Encoded};
use crate::tokenizer_config::TokenizerFolder;

/// CLIP's pre-tokenization pattern (OpenAI's `SimpleTokenizer`, as transformers spells it).
const CLIP_PATTERN: &str =
    r"<\|startoftext\|>|<\|endoftext\|>|'s|'t|'re|'ve|'m|'ll|'d|[\p{L}]+|[\p{N}]|[^\s\p{L}\p{N}]+";
/// The BPE word-end marker.
const END_OF_WORD: &str = "</w>";
/// AUTOMATIC1111's default `comma_padding_backtrack`.
pub const A1111_COMMA_BACKTRACK: usize = 20;

/// What to do with prompts longer than the text encoder's context.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum LongPrompt {
    /// Keep the first `model_max_length − 2` tokens, as diffusers does, and report the rest
    /// in [`Encoded::truncated_text`].
    #[default]
    Truncate,
    /// Encode the prompt in chunks of `model_max_length − 2` tokens, each wrapped in BOS/EOS
    /// and padded, whose embeddings the caller concatenates (AUTOMATIC1111's long prompts;
    /// see [`CLIPTokenizer::encode_chunks`]).
    Chunks {
        /// How far back from a chunk's end a comma may be to end the chunk there
        /// ([`A1111_COMMA_BACKTRACK`] in AUTOMATIC1111; 0 splits every 75 tokens).
        comma_backtrack: usize,
    },
}

/// The CLIP tokenizer of a diffusers `tokenizer/` folder.
#[derive(Debug, Clone)]
pub struct CLIPTokenizer {
    inner: Tokenizer,
    bos_id: u32,
    eos_id: u32,
    pad_id: u32,
    comma_id: Option<u32>,
    model_max_length: usize,
}

impl CLIPTokenizer {
    /// Loads a tokenizer folder: `tokenizer.json` when present, else `vocab.json` +
    /// `merges.txt`; plus `tokenizer_config.json` and `special_tokens_map.json`.
    pub fn from_folder(dir: &Path) -> Result<Self> {
        let json_path = dir.join("tokenizer.json");
        if json_path.is_file() {
            let json: Value = read_json(&json_path)?;
            let (vocab, merges) = vocab_and_merges_from_json(&json, &json_path)?;
            let folder = TokenizerFolder::read(dir, json.get("added_tokens"), CLIP_DEFAULTS)?;
            return Self::build(vocab, merges, folder);
        }
        let vocab_path = dir.join("vocab.json");
        let merges_path = dir.join("merges.txt");
        for path in [&vocab_path, &merges_path] {
            if !path.is_file() {
                return Err(Error::msg(format!(
                    "{}: missing; a CLIP tokenizer folder needs vocab.json and merges.txt, or \
                     tokenizer.json",
                    path.display()
                )));
            }
        }
        let vocab: HashMap<String, u32> = read_json(&vocab_path)?;
        let merges = read_merges(&merges_path)?;
        let folder = TokenizerFolder::read(dir, None, CLIP_DEFAULTS)?;
        Self::build(vocab.into_iter().collect(), merges, folder)
    }

    fn build(vocab: Vocab, merges: Merges, folder: TokenizerFolder) -> Result<Self> {
        let config = folder.dir.join("tokenizer_config.json");
        let fail = |what: &str, e: &dyn std::fmt::Display| {
            Error::msg(format!("{}: {what}: {e}", folder.dir.display()))
        };
        let unk = folder.named("unk_token").unwrap_or("<|endoftext|>").to_string();
        let bpe = BPE::builder()
            .vocab_and_merges(vocab, merges)
            .continuing_subword_prefix(String::new())
            .end_of_word_suffix(END_OF_WORD.to_string())
            .fuse_unk(false)
            .unk_token(unk)
            .build()
            .map_err(|e| fail("cannot build the BPE model", &e))?;
        let mut inner = Tokenizer::new(bpe);
        let replace = Replace::new(
            tokenizers::normalizers::replace::ReplacePattern::Regex(r"\s+".into()),
            " ",
        )
        .map_err(|e| fail("normalizer", &e))?;
        inner.with_normalizer(Some(NormalizerSequence::new(vec![
            NFC.into(),
            replace.into(),
            Lowercase.into(),
        ])));
        let split = Split::new(
            SplitPattern::Regex(CLIP_PATTERN.into()),
            SplitDelimiterBehavior::Removed,
            true,
        )
        .map_err(|e| fail("pre-tokenizer", &e))?;
        inner.with_pre_tokenizer(Some(PreTokenizerSequence::new(vec![
            split.into(),
            ByteLevel::new(false, true, true).into(),
        ])));
        inner.with_decoder(Some(ByteLevel::default()));
        inner.add_tokens(&folder.added_tokens());

        let id_of = |key: &str| -> Result<u32> {
            let token = folder
                .named(key)
                .ok_or_else(|| Error::msg(format!("{}: no `{key}` declared", config.display())))?;
            inner.token_to_id(token).ok_or_else(|| {
                Error::msg(format!(
                    "{}: `{key}` {token:?} is not in the vocabulary",
                    folder.dir.display()
                ))
            })
        };
        let (bos_id, eos_id, pad_id) =
            (id_of("bos_token")?, id_of("eos_token")?, id_of("pad_token")?);
        let model_max_length = match folder.model_max_length {
            Some(n) if n >= 2 => n,
            other => {
                return Err(Error::msg(format!(
                    "{}: `model_max_length` must be a length of at least 2 (BOS and EOS), \
                     found {other:?}",
                    config.display()
                )))
            }
        };
        let comma_id = inner.token_to_id(&format!(",{END_OF_WORD}"));
        Ok(Self { inner, bos_id, eos_id, pad_id, comma_id, model_max_length })
    }

    /// The sequence length the text encoder takes (`model_max_length`, 77 for CLIP).
    pub fn model_max_length(&self) -> usize {
        self.model_max_length
    }

    /// The id of `<|startoftext|>`.
    pub fn bos_id(&self) -> u32 {
        self.bos_id
    }

    /// The id of `<|endoftext|>`.
    pub fn eos_id(&self) -> u32 {
        self.eos_id
    }

    /// The id sequences are padded with (the folder's `pad_token`).
    pub fn pad_id(&self) -> u32 {
        self.pad_id
    }

    /// Adds `token` as transformers' `add_tokens` does (a normal added token, matched in the
    /// normalised text before BPE; what diffusers' `load_textual_inversion` adds) and returns
    /// its id, the vocabulary's next one. A token already known is an error.
    pub fn add_token(&mut self, token: &str) -> Result<u32> {
        if self.inner.token_to_id(token).is_some() {
            return Err(Error::msg(format!(
                "token {token:?} is already in the tokenizer's vocabulary"
            )));
        }
        self.inner.add_tokens(&[tokenizers::AddedToken::from(token.to_string(), false)]);
        self.inner
            .token_to_id(token)
            .ok_or_else(|| Error::msg(format!("token {token:?} could not be added")))
    }

    /// The id of `,</w>` (where long prompts prefer to be cut).
    pub(crate) fn comma_id(&self) -> Option<u32> {
        self.comma_id
    }

    /// The id of a token of the vocabulary or an added token.
    pub fn token_to_id(&self, token: &str) -> Option<u32> {
        self.inner.token_to_id(token)
    }

    /// The ids of `text` without BOS/EOS, untruncated.
    pub fn tokenize(&self, text: &str) -> Result<Vec<u32>> {
        let encoding = self
            .inner
            .encode(text, false)
            .map_err(|e| Error::msg(format!("cannot tokenize {text:?}: {e}")))?;
        Ok(encoding.get_ids().to_vec())
    }

    /// `text` as diffusers encodes a prompt: `[BOS] + ids + [EOS]`, truncated to and padded up
    /// to `model_max_length`; what was cut off is kept, and decoded as diffusers quotes it.
    pub fn encode(&self, text: &str) -> Result<Encoded> {
        let mut content = self.tokenize(text)?;
        let room = self.model_max_length - 2;
        let truncated = if content.len() > room { content.split_off(room) } else { Vec::new() };
        let truncated_text =
            if truncated.is_empty() { None } else { Some(self.decode(&truncated)?) };
        Ok(Encoded { truncated, truncated_text, ..self.wrap(&content) })
    }

    /// `[BOS] + content + [EOS]` padded to `model_max_length`; `content` must fit.
    pub(crate) fn wrap(&self, content: &[u32]) -> Encoded {
        let mut ids = Vec::with_capacity(self.model_max_length);
        ids.push(self.bos_id);
        ids.extend_from_slice(content);
        ids.push(self.eos_id);
        let len = ids.len();
        ids.resize(self.model_max_length, self.pad_id);
        Encoded { ids, len, truncated: Vec::new(), truncated_text: None }
    }

    /// The chunk an empty prompt gives: what AUTOMATIC1111 appends to the prompts of a batch
    /// that have fewer chunks than the longest one.
    pub fn empty_chunk(&self) -> Encoded {
        self.wrap(&[])
    }

    /// AUTOMATIC1111's long-prompt chunks (`modules/sd_hijack_clip.py`, `tokenize_line`, with
    /// emphasis parsing off and no textual-inversion embeddings).
    ///
    /// The ids of `text` (no special tokens) are cut into chunks of `n = model_max_length − 2`
    /// tokens. When a chunk is full and the next token is not a comma (`,</w>`), and the
    /// chunk's last comma is at most `comma_backtrack` tokens from its end, the tokens after
    /// that comma move to the next chunk (0 disables this). Each chunk becomes
    /// `[BOS] + tokens + [EOS]` padded to `model_max_length` with the pad id; the empty prompt
    /// gives one chunk, a prompt of exactly `k·n` tokens `k` chunks. The caller encodes each
    /// chunk and concatenates the embeddings along the sequence axis.
    ///
    /// Differences from AUTOMATIC1111: it pads by filling with EOS and then overwriting
    /// everything after the *first* EOS with the pad id, so a literal `<|endoftext|>` in a
    /// prompt also blanks the rest of its chunk there; we pad after the chunk's own EOS. And
    /// its SD 2.x path uses open_clip's tokenizer, where we use the folder's.
    pub fn encode_chunks(&self, text: &str, comma_backtrack: usize) -> Result<Vec<Encoded>> {
        let n = self.model_max_length - 2;
        let mut chunks = Vec::new();
        let mut chunk: Vec<u32> = Vec::with_capacity(n);
        let mut last_comma: Option<usize> = None;
        for token in self.tokenize(text)? {
            if Some(token) == self.comma_id {
                last_comma = Some(chunk.len());
            } else if let Some(comma) = last_comma {
                if comma_backtrack != 0
                    && chunk.len() == n
                    && chunk.len() - comma <= comma_backtrack
                {
                    let moved = chunk.split_off(comma + 1);
                    chunks.push(self.wrap(&chunk));
                    chunk = moved;
                    last_comma = None;
                }
            }
            if chunk.len() == n {
                chunks.push(self.wrap(&chunk));
                chunk.clear();
                last_comma = None;
            }
            chunk.push(token);
        }
        if !chunk.is_empty() || chunks.is_empty() {
            chunks.push(self.wrap(&chunk));
        }
        Ok(chunks)
    }

    /// [`CLIPTokenizer::encode`] or [`CLIPTokenizer::encode_chunks`], as `mode` says.
    pub fn encode_long(&self, text: &str, mode: LongPrompt) -> Result<Vec<Encoded>> {
        match mode {
            LongPrompt::Truncate => Ok(vec![self.encode(text)?]),
            LongPrompt::Chunks { comma_backtrack } => self.encode_chunks(text, comma_backtrack),
        }
    }

    /// transformers' `decode(ids)` (special tokens kept): byte-level decoding, `</w>` → " ",
    /// stripped.
    pub fn decode(&self, ids: &[u32]) -> Result<String> {
        let text = self
            .inner
            .decode(ids, false)
            .map_err(|e| Error::msg(format!("cannot decode {ids:?}: {e}")))?;
        Ok(python_strip(&text.replace(END_OF_WORD, " ")).to_string())
    }
}

/// `CLIPTokenizer.__init__`'s defaults for tokens a folder does not declare.
const CLIP_DEFAULTS: &[(&str, &str)] = &[
    ("unk_token", "<|endoftext|>"),
    ("bos_token", "<|startoftext|>"),
    ("eos_token", "<|endoftext|>"),
    ("pad_token", "<|endoftext|>"),
];

/// Reads `merges.txt` as `tokenizers` does: `#version` lines skipped, one `a b` pair a line.
fn read_merges(path: &Path) -> Result<Merges> {
    let file = std::fs::File::open(path).map_err(|e| Error::io(path, e))?;
    let mut merges = Vec::new();
    for (i, line) in std::io::BufReader::new(file).lines().enumerate() {
        let line = line.map_err(|e| Error::io(path, e))?;
        if line.starts_with("#version") {
            continue;
        }
        match line.split(' ').collect::<Vec<_>>().as_slice() {
            [a, b] => merges.push((a.to_string(), b.to_string())),
            _ => {
                return Err(Error::msg(format!(
                    "{}: line {}: expected two tokens separated by one space, found {line:?}",
                    path.display(),
                    i + 1
                )))
            }
        }
    }
    Ok(merges)
}

/// The BPE vocabulary and merges of a `tokenizer.json` (merges as `"a b"` or `["a", "b"]`).
fn vocab_and_merges_from_json(json: &Value, path: &Path) -> Result<(Vocab, Merges)> {
    let bad = |message: String| Error::Json { path: path.to_path_buf(), message };
    let model = json.get("model").ok_or_else(|| bad("no `model` section".into()))?;
    match model.get("type").and_then(Value::as_str) {
        Some("BPE") | None => {}
        Some(other) => {
            return Err(bad(format!("field `model.type`: a CLIP tokenizer is BPE, not {other}")))
        }
    }
    let vocab: HashMap<String, u32> =
        serde_json::from_value(model.get("vocab").cloned().unwrap_or(Value::Null))
            .map_err(|e| bad(format!("field `model.vocab`: {e}")))?;
    let raw: Vec<Value> =
        serde_json::from_value(model.get("merges").cloned().unwrap_or(Value::Null))
            .map_err(|e| bad(format!("field `model.merges`: {e}")))?;
    let mut merges = Vec::with_capacity(raw.len());
    for (i, m) in raw.iter().enumerate() {
        let pair = match m {
            Value::String(s) => match s.split(' ').collect::<Vec<_>>().as_slice() {
                [a, b] => Some((a.to_string(), b.to_string())),
                _ => None,
            },
            Value::Array(parts) => match parts.as_slice() {
                [Value::String(a), Value::String(b)] => Some((a.clone(), b.clone())),
                _ => None,
            },
            _ => None,
        };
        merges.push(
            pair.ok_or_else(|| bad(format!("field `model.merges[{i}]`: {m} is not a pair")))?,
        );
    }
    Ok((vocab.into_iter().collect(), merges))
}
