//! The activations transformers names in `hidden_act` / `feed_forward_proj` (`ACT2FN`).

use candle_core::{Result, Tensor};
use ltd_nn::ConfigError;

/// An activation function, by its transformers name (`ACT2FN`; diffusers' table is
/// `ltd_nn::layers::Activation`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum HiddenAct {
    /// `gelu`: the exact, erf-based GELU.
    Gelu,
    /// `gelu_new` / `gelu_pytorch_tanh`: the tanh approximation (T5 v1.1's `gated-gelu`).
    GeluTanh,
    /// `quick_gelu`: `x · σ(1.702 x)` (OpenAI CLIP, SD 1.x).
    QuickGelu,
    /// `relu` (original T5).
    Relu,
    /// `silu` / `swish`.
    Silu,
}

impl HiddenAct {
    /// Parses a transformers activation name; `field` names the config field in errors.
    pub fn parse(name: &str, field: &str) -> std::result::Result<Self, ConfigError> {
        Ok(match name {
            "gelu" => Self::Gelu,
            "gelu_new" | "gelu_pytorch_tanh" => Self::GeluTanh,
            "quick_gelu" => Self::QuickGelu,
            "relu" => Self::Relu,
            "silu" | "swish" => Self::Silu,
            other => return Err(ConfigError::unsupported(field, other)),
        })
    }

    /// Applies the activation.
    pub fn forward(self, x: &Tensor) -> Result<Tensor> {
        match self {
            Self::Gelu => x.gelu_erf(),
            // candle's `gelu` is the tanh approximation, transformers' `NewGELUActivation`.
            Self::GeluTanh => x.gelu(),
            Self::QuickGelu => x * candle_nn::ops::sigmoid(&(x * 1.702)?)?,
            Self::Relu => x.relu(),
            Self::Silu => x.silu(),
        }
    }
}
