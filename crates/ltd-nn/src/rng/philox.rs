//! [`PhiloxRng`]: AUTOMATIC1111's "NV" generator (`--rng cuda`), which imitates
//! `torch.randn(..., device="cuda")` on any device.
//!
//! It is the webui's `modules/rng_philox.py`: call `k` (counting from 0) of `randn` with `n`
//! elements computes, for element `i`, Philox 4x32-10 (Salmon et al., "Parallel random numbers:
//! as easy as 1, 2, 3", SC'11; curand's generator) on counter `(k, 0, i, 0)` with key
//! `(seed_lo, seed_hi)`, and turns the first two outputs `a, b` into one normal by Box-Muller in
//! double precision with float32 constants, as numpy evaluates the webui's code:
//! `u = a·2^-32 + 2^-33`, `v = b·2^-32·2π + 2^-33·2π`, `sqrt(-2 ln u)·sin v`, rounded to float.
//! Every call advances the offset `k` by one, whatever its size.
//!
//! This equals the webui's output bit for bit where libm's f64 `log`/`sin` agree (glibc: tested).
//! It is not bit-exact with CUDA itself: curand's Box-Muller runs in float with the approximate
//! `__logf`/`__sincosf`, and the webui's docstring values (which look like CUDA's) differ from its
//! numpy output by up to 2.6e-7. For batches the webui uses one generator per image seeded
//! `seed + i`: [`PerImage::consecutive_seeds`](super::PerImage::consecutive_seeds) with
//! [`PhiloxRng::new`].

use candle_core::{DType, Device, Tensor};
use serde::{Deserialize, Serialize};

use super::NoiseSource;

const M0: u32 = 0xD251_1F53;
const M1: u32 = 0xCD9E_8D57;
const W0: u32 = 0x9E37_79B9;
const W1: u32 = 0xBB67_AE85;

/// The webui's float32 constants: `2.3283064e-10` and `2.3283064e-10 * 6.2831855`.
const TWO_POW32_INV: f32 = 2.328_306_4e-10;
const TWO_POW32_INV_2PI: f32 = (2.328_306_4e-10_f64 * 6.283_185_5_f64) as f32;

/// Philox 4x32 with 10 rounds.
pub fn philox4x32_10(counter: [u32; 4], key: [u32; 2]) -> [u32; 4] {
    let [mut c0, mut c1, mut c2, mut c3] = counter;
    let [mut k0, mut k1] = key;
    for round in 0..10 {
        let p0 = u64::from(c0) * u64::from(M0);
        let p1 = u64::from(c2) * u64::from(M1);
        (c0, c1, c2, c3) =
            (((p1 >> 32) as u32) ^ c1 ^ k0, p1 as u32, ((p0 >> 32) as u32) ^ c3 ^ k1, p0 as u32);
        if round < 9 {
            k0 = k0.wrapping_add(W0);
            k1 = k1.wrapping_add(W1);
        }
    }
    [c0, c1, c2, c3]
}

/// AUTOMATIC1111's "NV" random generator: torch-CUDA-like normals from a seed, on any device.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct PhiloxRng {
    /// The seed (the Philox key, low word first).
    pub seed: u64,
    /// How many `randn` calls came before (the first counter word).
    pub offset: u64,
}

impl PhiloxRng {
    /// `rng_philox.Generator(seed)`.
    pub fn new(seed: u64) -> Self {
        Self { seed, offset: 0 }
    }

    /// `Generator.randn(shape)` for `n` elements, flattened. Element indices are 32-bit, as in
    /// the webui: draws of more than 2^32 elements repeat.
    pub fn randn_f32(&mut self, n: usize) -> Vec<f32> {
        let key = [self.seed as u32, (self.seed >> 32) as u32];
        // The webui stores the offset in a uint32 counter word.
        let offset = self.offset as u32;
        self.offset += 1;
        let c = f64::from(TWO_POW32_INV);
        let c_half = f64::from(TWO_POW32_INV / 2.0);
        let d = f64::from(TWO_POW32_INV_2PI);
        let d_half = f64::from(TWO_POW32_INV_2PI / 2.0);
        (0..n)
            .map(|i| {
                let [a, b, _, _] = philox4x32_10([offset, 0, i as u32, 0], key);
                let u = f64::from(a) * c + c_half;
                let v = f64::from(b) * d + d_half;
                ((-2.0 * u.ln()).sqrt() * v.sin()) as f32
            })
            .collect()
    }
}

impl NoiseSource for PhiloxRng {
    /// One `Generator.randn(shape)` call in float32, converted to `dtype` on `device` (the
    /// webui draws in float32 and converts).
    fn randn(
        &mut self,
        shape: &[usize],
        dtype: DType,
        device: &Device,
    ) -> candle_core::Result<Tensor> {
        let n = shape.iter().product();
        Tensor::from_vec(self.randn_f32(n), shape, &Device::Cpu)?.to_dtype(dtype)?.to_device(device)
    }
}
