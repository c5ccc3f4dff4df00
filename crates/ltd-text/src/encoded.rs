//! Token ids ready for a text encoder, and their tensors.

use candle_core::{Device, Tensor};

/// One prompt (or one chunk of a long prompt) as a text encoder takes it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Encoded {
    /// The ids, special tokens included, padded to the tokenizer's length with its pad id.
    pub ids: Vec<u32>,
    /// How many leading ids are not padding (the ones of transformers' `attention_mask`).
    pub len: usize,
    /// The ids that did not fit and were cut off (empty when nothing was cut).
    pub truncated: Vec<u32>,
    /// The cut-off ids decoded as diffusers quotes them in its truncation warning.
    pub truncated_text: Option<String>,
}

impl Encoded {
    /// transformers' `attention_mask`: 1 for the first [`Encoded::len`] positions, 0 after.
    pub fn attention_mask(&self) -> Vec<u32> {
        (0..self.ids.len()).map(|i| u32::from(i < self.len)).collect()
    }
}

fn rows(batch: &[Encoded], what: &str) -> candle_core::Result<usize> {
    let len = batch.first().map_or(0, |e| e.ids.len());
    if let Some(bad) = batch.iter().find(|e| e.ids.len() != len) {
        return Err(candle_core::Error::Msg(format!(
            "{what}: sequences of different lengths ({len} and {}) cannot be batched",
            bad.ids.len()
        )));
    }
    Ok(len)
}

/// The ids of a batch as a `[B, L]` u32 tensor.
pub fn ids_tensor(batch: &[Encoded], device: &Device) -> candle_core::Result<Tensor> {
    let len = rows(batch, "ids_tensor")?;
    let data: Vec<u32> = batch.iter().flat_map(|e| e.ids.iter().copied()).collect();
    Tensor::from_vec(data, (batch.len(), len), device)
}

/// The attention masks of a batch as a `[B, L]` u32 tensor (1 = token, 0 = padding).
pub fn attention_mask_tensor(batch: &[Encoded], device: &Device) -> candle_core::Result<Tensor> {
    let len = rows(batch, "attention_mask_tensor")?;
    let data: Vec<u32> = batch.iter().flat_map(Encoded::attention_mask).collect();
    Tensor::from_vec(data, (batch.len(), len), device)
}

/// Python's `str.strip()`: `char::is_whitespace` plus U+001C..U+001F, which Python also
/// counts as whitespace.
pub fn python_strip(s: &str) -> &str {
    s.trim_matches(|c: char| c.is_whitespace() || ('\u{1c}'..='\u{1f}').contains(&c))
}
