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
///
/// It also sets `CANDLE_BARRIER_POOL_SPIN_LIMIT` to 0 when unset: candle runs its large
/// elementwise operations on a pool of its own (beside rayon's), whose threads spin 25,000
/// times after each operation before they sleep, taking a CPU from the threads that compute
/// next. Measured on a 2-core AMD EPYC with two threads: a `train-unet` step 0.45 → 0.38
/// CPU-s and 0.29 → 0.27 s (`cargo xtask bench`, ltd side only). Waking a sleeping thread
/// costs microseconds; those operations take milliseconds.
pub fn pin_cpu_threads() {
    if std::env::var_os("RAYON_NUM_THREADS").is_none() {
        let n = candle_core::utils::get_num_threads();
        std::env::set_var("RAYON_NUM_THREADS", n.to_string());
    }
    if std::env::var_os("CANDLE_BARRIER_POOL_SPIN_LIMIT").is_none() {
        std::env::set_var("CANDLE_BARRIER_POOL_SPIN_LIMIT", "0");
    }
}

/// The stack of rayon's threads when [`on_cpu_pool`] builds the pool: a process's main thread
/// gets 8 MiB on Linux, which is what the work moved onto the pool ran with before (candle's
/// backward walks the graph recursively); only the pages touched are committed.
const POOL_STACK: usize = 8 << 20;

/// Runs `f` on a thread of rayon's global pool (building the pool first, with as many threads
/// as candle uses and [`POOL_STACK`]) and returns its result; inline when already on a pool
/// thread. Binaries run their work through it.
///
/// Why: every parallel CPU operation (candle's matrix products, ltd's kernels) hands work to
/// this pool. Called from a thread outside it, each operation wakes a pool thread and puts the
/// caller to sleep until the work is done, and with the caller computing too, one thread more
/// than the CPUs competes for them; on a pool thread the caller is one of the pool's threads and
/// the others steal what it spawns. Measured on a 2-core AMD EPYC with two threads: a
/// `train-unet` step 0.39 → 0.29 s, `train-vae` 0.24 → 0.20 s (`cargo xtask bench`, ltd
/// side only). Where the work runs never changes what it computes.
pub fn on_cpu_pool<R: Send>(f: impl FnOnce() -> R + Send) -> R {
    if rayon::current_thread_index().is_some() {
        return f();
    }
    static BUILD: std::sync::Once = std::sync::Once::new();
    BUILD.call_once(|| {
        let built = rayon::ThreadPoolBuilder::new()
            .num_threads(candle_core::utils::get_num_threads().max(1))
            .stack_size(POOL_STACK)
            .build_global();
        if let Err(e) = built {
            // Something used rayon before: its pool (default stacks) runs the work instead.
            tracing::debug!("rayon's global pool was already built: {e}");
        }
    });
    rayon::scope(|_| f())
}

#[cfg(test)]
mod tests {
    /// The work runs on a pool thread, and nested calls run inline there.
    #[test]
    fn on_cpu_pool_runs_on_a_pool_thread() {
        let (outer, inner) = super::on_cpu_pool(|| {
            let outer = rayon::current_thread_index();
            (outer, super::on_cpu_pool(rayon::current_thread_index))
        });
        assert!(outer.is_some());
        assert_eq!(outer, inner);
    }
}
