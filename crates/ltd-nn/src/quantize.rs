//! Quantized weights, as stable-diffusion.cpp offers them (`--type q8_0`): a linear layer's
//! `[out, in]` weight stored as ggml's Q8_0 blocks (32 weights sharing one f16 scale, 8.5 bits
//! a weight) and multiplied by candle's quantized matrix product (`QMatMul`), which on the CPU
//! also rounds the activations to Q8_0 blocks, as ggml does.
//!
//! Which layers a model quantizes is the model's choice (the U-Net: the linear layers of its
//! transformer blocks, see `ltd_unet`); this module holds the format and the rule that a weight
//! can be quantized only when its rows split into whole blocks.

use std::fmt;
use std::str::FromStr;

use candle_core::quantized::{GgmlDType, QMatMul, QTensor};
use candle_core::{DType, Result, Tensor};

/// A weight quantization format.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Quantization {
    /// ggml's Q8_0: blocks of 32 signed bytes with one f16 scale (`max |w| / 127`).
    Q8_0,
}

impl Quantization {
    /// Every format, for messages.
    pub const ALL: [Quantization; 1] = [Quantization::Q8_0];

    /// ggml's name of the format (`q8_0`), as stable-diffusion.cpp's `--type` takes it.
    pub fn name(self) -> &'static str {
        match self {
            Quantization::Q8_0 => "q8_0",
        }
    }

    /// candle's block type.
    pub fn ggml_dtype(self) -> GgmlDType {
        match self {
            Quantization::Q8_0 => GgmlDType::Q8_0,
        }
    }

    /// Whether a `[out, in]` weight of this shape can be stored in this format: its rows must
    /// split into whole blocks.
    pub fn fits(self, dims: &[usize]) -> bool {
        let block = self.ggml_dtype().block_size();
        matches!(dims, [_, cols] if cols % block == 0)
    }

    /// The weight `w: [out, in]` quantized for [`QMatMul`], or `None` where it does not
    /// [`fit`](Self::fits).
    pub fn quantize(self, w: &Tensor) -> Result<Option<QMatMul>> {
        if !self.fits(w.dims()) {
            return Ok(None);
        }
        let q = QTensor::quantize(&w.to_dtype(DType::F32)?, self.ggml_dtype())?;
        Ok(Some(QMatMul::from_qtensor(q)?))
    }
}

impl fmt::Display for Quantization {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.name())
    }
}

/// An unknown format name.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("unknown quantization `{0}` (supported: q8_0)")]
pub struct UnknownQuantization(pub String);

impl FromStr for Quantization {
    type Err = UnknownQuantization;

    fn from_str(s: &str) -> std::result::Result<Self, Self::Err> {
        Quantization::ALL
            .into_iter()
            .find(|q| q.name().eq_ignore_ascii_case(s))
            .ok_or_else(|| UnknownQuantization(s.to_string()))
    }
}

/// What quantizing a model changed: how many weights, and their bytes before and after.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct QuantizeReport {
    /// Weights now quantized.
    pub tensors: usize,
    /// Their bytes in the model's dtype before.
    pub bytes_before: usize,
    /// Their bytes quantized.
    pub bytes_after: usize,
}

impl QuantizeReport {
    /// Adds another report's counts.
    pub fn add(&mut self, other: QuantizeReport) {
        self.tensors += other.tensors;
        self.bytes_before += other.bytes_before;
        self.bytes_after += other.bytes_after;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names_parse_and_bad_ones_are_named() {
        assert_eq!("q8_0".parse::<Quantization>().unwrap(), Quantization::Q8_0);
        assert_eq!("Q8_0".parse::<Quantization>().unwrap(), Quantization::Q8_0);
        let e = "q4_k".parse::<Quantization>().unwrap_err();
        assert_eq!(e.to_string(), "unknown quantization `q4_k` (supported: q8_0)");
    }

    #[test]
    fn only_whole_blocks_fit() {
        assert!(Quantization::Q8_0.fits(&[7, 64]));
        assert!(!Quantization::Q8_0.fits(&[64, 16]));
        assert!(!Quantization::Q8_0.fits(&[64]));
    }
}
