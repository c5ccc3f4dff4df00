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

/// Pins candle's CPU thread count for this process: when `RAYON_NUM_THREADS` is unset, sets
/// it to the count candle would choose (its physical-core count). Binaries call it first thing
/// in `main`, before any thread starts.
///
/// candle asks for its thread count on every matrix product and convolution, and without the
/// variable it counts physical cores by reading `/proc/cpuinfo` each time: measured at 20% of
/// a small model's training step on a 2-core machine.
pub fn pin_cpu_threads() {
    if std::env::var_os("RAYON_NUM_THREADS").is_none() {
        let n = candle_core::utils::get_num_threads();
        std::env::set_var("RAYON_NUM_THREADS", n.to_string());
    }
}
