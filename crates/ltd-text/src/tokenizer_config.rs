//! `tokenizer_config.json`, `special_tokens_map.json` and the added (special) tokens a
//! transformers tokenizer ends up with.
//!
//! transformers 5.x decides the added tokens in `PreTrainedTokenizerBase.from_pretrained` and
//! `TokenizersBackend.__init__`; [`TokenizerFolder::added_tokens`] replays those rules, because
//! they decide real ids: with SD 2.x's pad token `!` given as a plain string, `!` becomes a
//! special token matched in the raw text (id 0), and SD 1.x's plain-string pad
//! `<|endoftext|>` turns that token's `normalized` flag off, so `<|ENDOFTEXT|>` is not matched.

use std::collections::{BTreeMap, HashSet};
use std::path::{Path, PathBuf};

use ltd_nn::{read_json, Error, Result};
use serde::Deserialize;
use serde_json::Value;
use tokenizers::AddedToken;

/// Named special tokens in the order transformers walks them (`SPECIAL_TOKENS_ATTRIBUTES`).
const NAMED: [&str; 7] =
    ["bos_token", "eos_token", "unk_token", "sep_token", "pad_token", "cls_token", "mask_token"];

/// A token as transformers serialises it: a plain string or an `AddedToken` object.
#[derive(Debug, Clone, PartialEq, Eq, Deserialize)]
#[serde(untagged)]
pub(crate) enum RawToken {
    /// `"<|endoftext|>"`
    Plain(String),
    /// `{"content": "<|endoftext|>", "normalized": true, …}`
    Object(RawAddedToken),
}

/// The fields of a serialised `AddedToken` (unknown ones such as `__type` and `id` ignored).
#[derive(Debug, Clone, PartialEq, Eq, Deserialize)]
pub(crate) struct RawAddedToken {
    content: String,
    #[serde(default)]
    single_word: bool,
    #[serde(default)]
    lstrip: bool,
    #[serde(default)]
    rstrip: bool,
    #[serde(default)]
    normalized: Option<bool>,
    #[serde(default)]
    special: Option<bool>,
}

/// A token on its way into the tokenizer: transformers compares these with `==` (a string
/// never equals an `AddedToken`; two `AddedToken`s are equal when every field is).
#[derive(Debug, Clone, PartialEq, Eq)]
enum Pending {
    Plain(String),
    Added(AddedToken),
}

impl Pending {
    fn content(&self) -> &str {
        match self {
            Self::Plain(s) => s,
            Self::Added(t) => &t.content,
        }
    }
}

impl RawToken {
    fn content(&self) -> &str {
        match self {
            Self::Plain(s) => s,
            Self::Object(o) => &o.content,
        }
    }

    /// As Python's `AddedToken(**fields, special=…)` builds it: `normalized` defaults to
    /// `not special`.
    fn to_pending(&self, force_special: bool) -> Pending {
        match self {
            Self::Plain(s) => Pending::Plain(s.clone()),
            Self::Object(o) => Pending::Added(o.to_added(force_special)),
        }
    }
}

impl RawAddedToken {
    fn to_added(&self, force_special: bool) -> AddedToken {
        let special = force_special || self.special.unwrap_or(false);
        AddedToken {
            content: self.content.clone(),
            single_word: self.single_word,
            lstrip: self.lstrip,
            rstrip: self.rstrip,
            normalized: self.normalized.unwrap_or(!special),
            special,
        }
    }
}

/// The tokenizer-level settings of a transformers tokenizer folder.
#[derive(Debug, Clone)]
pub(crate) struct TokenizerFolder {
    /// The folder.
    pub dir: PathBuf,
    /// `model_max_length`; `None` when absent or transformers' "very large" sentinel.
    pub model_max_length: Option<usize>,
    /// `extra_ids` (T5's sentinel count), when given.
    pub extra_ids: Option<usize>,
    /// Named special tokens after `special_tokens_map.json` and `added_tokens_decoder`.
    named: BTreeMap<&'static str, RawToken>,
    /// `extra_special_tokens` / `additional_special_tokens`.
    extra: Vec<RawToken>,
    /// `added_tokens_decoder` (or, in the legacy layout, `tokenizer.json`'s `added_tokens`),
    /// sorted by id.
    decoder: Vec<Pending>,
}

/// Reads an optional JSON object file; a missing file is `None`.
fn read_optional(path: &Path) -> Result<Option<serde_json::Map<String, Value>>> {
    if !path.is_file() {
        return Ok(None);
    }
    read_json(path).map(Some)
}

fn field<T: serde::de::DeserializeOwned>(path: &Path, key: &str, value: &Value) -> Result<T> {
    serde_json::from_value(value.clone()).map_err(|e| Error::Json {
        path: path.to_path_buf(),
        message: format!("field `{key}`: {e}"),
    })
}

impl TokenizerFolder {
    /// Reads `tokenizer_config.json` and `special_tokens_map.json` (both optional) from `dir`;
    /// `tokenizer_json_added` are the `added_tokens` of a `tokenizer.json`, if the folder has
    /// one. `defaults` are the tokenizer class's default named tokens.
    pub fn read(
        dir: &Path,
        tokenizer_json_added: Option<&Value>,
        defaults: &[(&'static str, &str)],
    ) -> Result<Self> {
        let config_path = dir.join("tokenizer_config.json");
        let config = read_optional(&config_path)?.unwrap_or_default();
        let map_path = dir.join("special_tokens_map.json");

        let mut named: BTreeMap<&'static str, RawToken> =
            defaults.iter().map(|(k, v)| (*k, RawToken::Plain((*v).to_string()))).collect();
        for key in NAMED {
            match config.get(key) {
                None => {}
                Some(Value::Null) => {
                    named.remove(key);
                }
                Some(v) => {
                    named.insert(key, field(&config_path, key, v)?);
                }
            }
        }
        let mut extra = Vec::new();
        for key in ["extra_special_tokens", "additional_special_tokens"] {
            match config.get(key) {
                Some(Value::Array(items)) => {
                    for (i, item) in items.iter().enumerate() {
                        extra.push(field(&config_path, &format!("{key}[{i}]"), item)?);
                    }
                }
                // Model-specific named tokens, `{"image_token": "<image>"}`.
                Some(Value::Object(map)) => {
                    for (k, item) in map {
                        extra.push(field(&config_path, &format!("{key}.{k}"), item)?);
                    }
                }
                _ => {}
            }
        }

        let mut decoder: BTreeMap<u64, Pending> = BTreeMap::new();
        if let Some(entries) = config.get("added_tokens_decoder") {
            let entries: BTreeMap<String, RawAddedToken> =
                field(&config_path, "added_tokens_decoder", entries)?;
            for (id, token) in entries {
                let id: u64 = id.parse().map_err(|_| Error::Json {
                    path: config_path.clone(),
                    message: format!("field `added_tokens_decoder`: key {id:?} is not an id"),
                })?;
                decoder.insert(id, Pending::Added(token.to_added(false)));
            }
        } else {
            // Legacy layout: special_tokens_map.json wins over tokenizer_config.json, and the
            // added tokens come from tokenizer.json.
            if let Some(map) = read_optional(&map_path)? {
                for key in NAMED {
                    if let Some(v) = map.get(key) {
                        let token: RawToken = field(&map_path, key, v)?;
                        named.insert(key, force_special(token));
                    }
                }
                for key in ["extra_special_tokens", "additional_special_tokens"] {
                    if let Some(Value::Array(items)) = map.get(key) {
                        for (i, item) in items.iter().enumerate() {
                            let token: RawToken = field(&map_path, &format!("{key}[{i}]"), item)?;
                            let token = force_special(token);
                            if !extra.contains(&token) {
                                extra.push(token);
                            }
                        }
                    }
                }
            }
            if let Some(added) = tokenizer_json_added {
                let json_path = dir.join("tokenizer.json");
                let entries: Vec<Value> = field(&json_path, "added_tokens", added)?;
                for (i, entry) in entries.iter().enumerate() {
                    let key = format!("added_tokens[{i}]");
                    let id: u64 = field(&json_path, &format!("{key}.id"), &entry["id"])?;
                    let token: RawAddedToken = field(&json_path, &key, entry)?;
                    decoder.insert(id, Pending::Added(token.to_added(false)));
                }
            }
        }
        // Named tokens whose content is an added token take that token's flags.
        for token in named.values_mut() {
            if let Some(Pending::Added(t)) =
                decoder.values().find(|p| p.content() == token.content())
            {
                *token = RawToken::Object(RawAddedToken {
                    content: t.content.clone(),
                    single_word: t.single_word,
                    lstrip: t.lstrip,
                    rstrip: t.rstrip,
                    normalized: Some(t.normalized),
                    special: Some(t.special),
                });
            }
        }

        let model_max_length = match config.get("model_max_length") {
            None | Some(Value::Null) => None,
            Some(Value::Number(n)) => match n.as_u64() {
                // transformers writes `int(1e30)` for "no limit".
                Some(v) if v < (1u64 << 53) => Some(v as usize),
                Some(_) => None,
                None if n.as_f64().is_some_and(|f| f >= 1e18) => None,
                None => {
                    return Err(Error::Json {
                        path: config_path,
                        message: format!("field `model_max_length`: {n} is not a length"),
                    })
                }
            },
            Some(v) => {
                return Err(Error::Json {
                    path: config_path,
                    message: format!("field `model_max_length`: {v} is not a number"),
                })
            }
        };
        let extra_ids = match config.get("extra_ids") {
            None | Some(Value::Null) => None,
            Some(v) => Some(field(&config_path, "extra_ids", v)?),
        };
        Ok(Self {
            dir: dir.to_path_buf(),
            model_max_length,
            extra_ids,
            named,
            extra,
            decoder: decoder.into_values().collect(),
        })
    }

    /// The content of a named special token (`"pad_token"`, …).
    pub fn named(&self, key: &str) -> Option<&str> {
        self.named.get(key).map(RawToken::content)
    }

    /// Adds tokens to the extra special tokens unless already there (T5's sentinels).
    pub fn add_extra(&mut self, tokens: impl IntoIterator<Item = String>) {
        for t in tokens {
            let t = RawToken::Plain(t);
            if !self.extra.iter().any(|e| e.content() == t.content()) {
                self.extra.push(t);
            }
        }
    }

    /// The added tokens, in the order transformers adds them, each content once with the
    /// flags of its last addition (tokenizers ≥ 0.23 keeps the last flags of a re-added
    /// token; adding each content once gives the same result with any version).
    pub fn added_tokens(&self) -> Vec<AddedToken> {
        let known: HashSet<&str> = self.decoder.iter().map(Pending::content).collect();
        let mut pending: Vec<Pending> = self.decoder.clone();
        let named = NAMED.iter().filter_map(|k| self.named.get(k)).map(|t| t.to_pending(false));
        let extra = self.extra.iter().map(|t| t.to_pending(false));
        for token in named.chain(extra) {
            if !known.contains(token.content()) && !pending.contains(&token) {
                pending.push(token);
            }
        }
        let named_contents: HashSet<&str> = self.named.values().map(RawToken::content).collect();
        let mut out: Vec<AddedToken> = Vec::new();
        for token in pending {
            let token = match token {
                Pending::Plain(s) => AddedToken::from(s, true),
                Pending::Added(mut t) => {
                    t.special |= named_contents.contains(t.content.as_str());
                    t
                }
            };
            match out.iter_mut().find(|t| t.content == token.content) {
                Some(prev) => *prev = token,
                None => out.push(token),
            }
        }
        out
    }
}

/// `special_tokens_map.json` entries are read as `AddedToken(**value, special=True)`.
fn force_special(token: RawToken) -> RawToken {
    match token {
        RawToken::Object(mut o) => {
            o.normalized = Some(o.normalized.unwrap_or(false));
            o.special = Some(true);
            RawToken::Object(o)
        }
        plain => plain,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn folder(config: &str, map: Option<&str>) -> (tempfile::TempDir, TokenizerFolder) {
        let dir = tempfile::tempdir().unwrap();
        std::fs::write(dir.path().join("tokenizer_config.json"), config).unwrap();
        if let Some(map) = map {
            std::fs::write(dir.path().join("special_tokens_map.json"), map).unwrap();
        }
        let f = TokenizerFolder::read(dir.path(), None, &[("eos_token", "<e>")]).unwrap();
        (dir, f)
    }

    fn flags(tokens: &[AddedToken]) -> Vec<(String, bool, bool)> {
        tokens.iter().map(|t| (t.content.clone(), t.normalized, t.special)).collect()
    }

    #[test]
    fn plain_pad_string_turns_normalized_off_as_transformers_does() {
        let eos = r#"{"__type": "AddedToken", "content": "<e>", "normalized": true}"#;
        let config = format!(r#"{{"eos_token": {eos}, "bos_token": "<b>", "pad_token": "<e>"}}"#);
        let (_d, f) = folder(&config, None);
        assert_eq!(
            flags(&f.added_tokens()),
            [("<b>".to_string(), false, true), ("<e>".to_string(), false, true)]
        );
    }

    #[test]
    fn special_tokens_map_overrides_and_very_large_max_length_is_none() {
        let config = r#"{"pad_token": "<p>", "model_max_length": 1000000000000000019884624838656}"#;
        let (_d, f) = folder(config, Some(r#"{"pad_token": {"content": "<q>"}}"#));
        assert_eq!(f.named("pad_token"), Some("<q>"));
        assert_eq!(f.model_max_length, None);
        assert_eq!(
            flags(&f.added_tokens()),
            [("<e>".to_string(), false, true), ("<q>".to_string(), false, true)]
        );
    }

    #[test]
    fn malformed_fields_name_file_and_field() {
        let dir = tempfile::tempdir().unwrap();
        std::fs::write(dir.path().join("tokenizer_config.json"), r#"{"model_max_length": "77"}"#)
            .unwrap();
        let err = TokenizerFolder::read(dir.path(), None, &[]).unwrap_err().to_string();
        assert!(err.contains("tokenizer_config.json") && err.contains("model_max_length"), "{err}");
        std::fs::write(dir.path().join("tokenizer_config.json"), r#"{"pad_token": 3}"#).unwrap();
        let err = TokenizerFolder::read(dir.path(), None, &[]).unwrap_err().to_string();
        assert!(err.contains("tokenizer_config.json") && err.contains("pad_token"), "{err}");
    }
}
