//! Reading diffusers/transformers `config.json` files.
//!
//! Config structs mirror the JSON exactly (same field names and defaults, unknown fields
//! ignored) and are turned into validated internal configs with `TryFrom`, whose
//! [`ConfigError`] names the field; [`load_config`] adds the file.

use std::path::Path;

use serde::de::DeserializeOwned;
use serde::{Deserialize, Serialize};

use crate::error::{ConfigError, Error, Result};

/// Reads and deserialises a JSON file; errors name the file and the field path.
pub fn read_json<T: DeserializeOwned>(path: &Path) -> Result<T> {
    let text = std::fs::read_to_string(path).map_err(|e| Error::io(path, e))?;
    parse_json(&text, path)
}

/// Deserialises JSON text that came from `path` (used in messages only).
pub fn parse_json<T: DeserializeOwned>(text: &str, path: &Path) -> Result<T> {
    let de = &mut serde_json::Deserializer::from_str(text);
    serde_path_to_error::deserialize(de).map_err(|e| {
        let field = e.path().to_string();
        let inner = e.into_inner();
        let message = if matches!(field.as_str(), "." | "?" | "") {
            inner.to_string()
        } else {
            format!("field `{field}`: {inner}")
        };
        Error::Json { path: path.to_path_buf(), message }
    })
}

/// Reads a raw config `R` from `path` and validates it into `C`, naming the file on error.
pub fn load_config<R, C>(path: &Path) -> Result<C>
where
    R: DeserializeOwned,
    C: TryFrom<R, Error = ConfigError>,
{
    let raw: R = read_json(path)?;
    C::try_from(raw).map_err(|source| Error::Config { path: path.to_path_buf(), source })
}

/// A config value that diffusers accepts either as one value for every block or as a list
/// with one value per block (`attention_head_dim`, `transformer_layers_per_block`, …).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(untagged)]
pub enum OneOrMany<T> {
    /// One value for every block.
    One(T),
    /// One value per block.
    Many(Vec<T>),
}

impl<T: Clone + std::fmt::Debug> OneOrMany<T> {
    /// The value for each of `n` blocks; a list of the wrong length is an error naming `field`.
    pub fn per_block(&self, n: usize, field: &str) -> std::result::Result<Vec<T>, ConfigError> {
        match self {
            Self::One(v) => Ok(vec![v.clone(); n]),
            Self::Many(vs) if vs.len() == n => Ok(vs.clone()),
            Self::Many(vs) => Err(ConfigError::new(
                field,
                format!("has {} entries ({vs:?}) but the model has {n} blocks", vs.len()),
            )),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[derive(Debug, Deserialize)]
    struct Raw {
        #[allow(dead_code)]
        a: usize,
        #[serde(default)]
        #[allow(dead_code)]
        b: Option<OneOrMany<usize>>,
    }

    #[test]
    fn json_errors_name_file_and_field() {
        let err = parse_json::<Raw>(r#"{"a": "x"}"#, Path::new("unet/config.json")).unwrap_err();
        let msg = err.to_string();
        assert!(msg.starts_with("unet/config.json: field `a`: invalid type"), "{msg}");
        let err = parse_json::<Raw>(r#"{"b": 1}"#, Path::new("c.json")).unwrap_err();
        assert!(err.to_string().contains("missing field `a`"), "{err}");
    }

    #[test]
    fn unknown_fields_are_ignored_and_one_or_many_parses() {
        let raw: Raw =
            parse_json(r#"{"a": 1, "b": [1, 2], "_class_name": "X"}"#, Path::new("c.json"))
                .unwrap();
        assert_eq!(raw.b.unwrap().per_block(2, "b").unwrap(), vec![1, 2]);
        let one = OneOrMany::One(8usize);
        assert_eq!(one.per_block(3, "b").unwrap(), vec![8, 8, 8]);
        let err = OneOrMany::Many(vec![1usize]).per_block(3, "b").unwrap_err();
        assert_eq!(err.field, "b");
    }
}
