//! Runtime choices that are not part of any model's architecture: they change how a model is
//! computed, never what it computes (beyond floating-point rounding).

use crate::attention::AttentionOptions;

/// Options every model constructor takes next to its config: the attention implementation and
/// its memory budget. The dtype and device come from the `VarBuilder`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct RuntimeOptions {
    /// How scaled dot-product attention is computed (see [`crate::attention::attention`]).
    pub attention: AttentionOptions,
}

impl RuntimeOptions {
    /// Options with the given attention settings.
    pub fn with_attention(attention: AttentionOptions) -> Self {
        Self { attention }
    }
}
