//! Deterministic test inputs shared by the unit tests of the fused kernels (no RNG crate).

use candle_core::{Device, Tensor};

/// `n` values uniform in [-0.5, 0.5) from a 64-bit LCG seeded with `seed`.
pub(crate) fn uniform(n: usize, seed: u64) -> Vec<f32> {
    let mut s = seed;
    (0..n)
        .map(|_| {
            s = s.wrapping_mul(6364136223846793005).wrapping_add(1442695040888963407);
            ((s >> 33) as f32 / (1u64 << 31) as f32) - 0.5
        })
        .collect()
}

/// A CPU f32 tensor of [`uniform`] values.
pub(crate) fn rand(shape: &[usize], seed: u64) -> Tensor {
    let n: usize = shape.iter().product();
    Tensor::from_vec(uniform(n, seed), shape, &Device::Cpu).unwrap()
}
