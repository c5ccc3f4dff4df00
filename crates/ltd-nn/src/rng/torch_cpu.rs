//! [`TorchRng`]: PyTorch's CPU generator (`torch.Generator("cpu")`) and the distributions that
//! `torch.randn`, `torch.rand`, `torch.randint` and `torch.randperm` draw from it.

use candle_core::{DType, Device, Tensor};
use half::{bf16, f16};
use serde::{Deserialize, Serialize};

use super::box_muller::{normal_fill_16, normal_fill_16_f64};
use super::mt19937::{Mt19937, N};
use super::NoiseSource;
use crate::error::{Error, Result};

/// PyTorch's CPU random number generator, reproducing its draws bit for bit.
///
/// `TorchRng::new(seed)` is `torch.Generator("cpu").manual_seed(seed)`; each method names the
/// torch call it reproduces on that generator, and the generator advances exactly as torch's does,
/// so any interleaving of calls gives torch's values. See the [module docs](super) for the
/// algorithms and for which results are bit-exact on which platforms.
#[derive(Debug, Clone, PartialEq)]
pub struct TorchRng {
    engine: Mt19937,
    /// The sine half of the last scalar Box-Muller pair (`next_double_normal_sample_`).
    next_double_normal: Option<f64>,
    /// Kept only to round-trip torch states; no CPU kernel of ours or torch's reads it.
    next_float_normal: Option<f32>,
}

/// A [`TorchRng`]'s complete state, for checkpoints (serde) and inspection.
///
/// The fields are those of torch's `CPUGeneratorImpl`; [`TorchRng::torch_state`] gives the same
/// state in the byte layout of `torch.Generator.get_state()`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct TorchRngState {
    /// The seed given to `manual_seed` (what `initial_seed()` returns).
    pub seed: u64,
    /// Mersenne Twister draws left before the next twist, plus one (1..=624).
    pub left: i32,
    /// Index of the next state word (0..=624).
    pub next: u32,
    /// The 624 Mersenne Twister state words.
    pub mt: Vec<u32>,
    /// The cached second value of the scalar Box-Muller transform, if any.
    pub next_double_normal: Option<f64>,
    /// torch's cached float normal (unused by CPU kernels, kept for round trips).
    pub next_float_normal: Option<f32>,
}

/// Size of `torch.Generator("cpu").get_state()` (`CPUGeneratorImplState` in
/// `aten/src/ATen/CPUGeneratorImpl.cpp`).
pub const TORCH_CPU_STATE_BYTES: usize = 5056;

/// Largest `n` for which `torch.randperm` uses the simple Fisher-Yates shuffle we reproduce.
const RANDPERM_MAX: usize = (u32::MAX / 20) as usize;

impl TorchRng {
    /// `torch.Generator("cpu").manual_seed(seed)`.
    ///
    /// torch accepts Python ints from `-2**63` to `2**64 - 1` and stores negatives modulo 2^64
    /// (`-1` is `u64::MAX`); pass `seed as u64` for those. Only the low 32 bits of the seed enter
    /// the Mersenne Twister, so seeds that differ by a multiple of 2^32 draw the same numbers (as
    /// in torch); [`TorchRng::initial_seed`] still reports the full value.
    pub fn new(seed: u64) -> Self {
        Self { engine: Mt19937::new(seed), next_double_normal: None, next_float_normal: None }
    }

    /// `manual_seed(seed)` on an existing generator: resets it completely.
    pub fn manual_seed(&mut self, seed: u64) {
        *self = Self::new(seed);
    }

    /// `initial_seed()`: the seed this generator was last seeded with.
    pub fn initial_seed(&self) -> u64 {
        self.engine.seed
    }

    /// 32 random bits (`CPUGeneratorImpl::random`).
    pub fn next_u32(&mut self) -> u32 {
        self.engine.next_u32()
    }

    /// 64 random bits from two 32-bit draws, the first in the high half
    /// (`CPUGeneratorImpl::random64`).
    pub fn next_u64(&mut self) -> u64 {
        let hi = self.engine.next_u32();
        let lo = self.engine.next_u32();
        (u64::from(hi) << 32) | u64::from(lo)
    }

    /// One float in `[0, 1)` from 24 random bits (`uniform_real_distribution<float>(0, 1)`):
    /// the value of `torch.rand(1, generator=g)`.
    pub fn uniform_f32(&mut self) -> f32 {
        (self.next_u32() & 0x00ff_ffff) as f32 * (1.0 / (1u32 << 24) as f32)
    }

    /// One double in `[0, 1)` from 53 random bits (`uniform_real_distribution<double>(0, 1)`):
    /// the value of `torch.rand(1, generator=g, dtype=torch.float64)`.
    pub fn uniform_f64(&mut self) -> f64 {
        (self.next_u64() & ((1u64 << 53) - 1)) as f64 * (1.0 / (1u64 << 53) as f64)
    }

    /// One standard normal from the scalar Box-Muller transform in double precision, returning
    /// the cosine half and caching the sine half (`at::normal_distribution<double>`).
    fn normal_f64_scalar(&mut self) -> f64 {
        if let Some(v) = self.next_double_normal.take() {
            return v + 0.0;
        }
        let u1 = self.uniform_f64();
        let u2 = self.uniform_f64();
        let r = (-2.0 * (-u2).ln_1p()).sqrt();
        let theta = 2.0 * std::f64::consts::PI * u1;
        self.next_double_normal = Some(r * theta.sin());
        r * theta.cos() + 0.0
    }

    /// `torch.randn(n, generator=g)` (float32), flattened.
    pub fn randn_f32(&mut self, n: usize) -> Vec<f32> {
        if n < 16 {
            return (0..n).map(|_| self.normal_f64_scalar() as f32).collect();
        }
        // All uniforms first, then the transform in place; a partial last block is redrawn
        // from 16 fresh uniforms over the last 16 elements (`normal_fill`).
        let mut data: Vec<f32> = (0..n).map(|_| self.uniform_f32()).collect();
        for block in data.chunks_exact_mut(16) {
            normal_fill_16(block, 0.0, 1.0);
        }
        if !n.is_multiple_of(16) {
            let tail = &mut data[n - 16..];
            for v in tail.iter_mut() {
                *v = self.uniform_f32();
            }
            normal_fill_16(tail, 0.0, 1.0);
        }
        data
    }

    /// `torch.randn(n, generator=g, dtype=torch.float64)`, flattened.
    pub fn randn_f64(&mut self, n: usize) -> Vec<f64> {
        if n < 16 {
            return (0..n).map(|_| self.normal_f64_scalar()).collect();
        }
        let mut data: Vec<f64> = (0..n).map(|_| self.uniform_f64()).collect();
        for block in data.chunks_exact_mut(16) {
            normal_fill_16_f64(block, 0.0, 1.0);
        }
        if !n.is_multiple_of(16) {
            let tail = &mut data[n - 16..];
            for v in tail.iter_mut() {
                *v = self.uniform_f64();
            }
            normal_fill_16_f64(tail, 0.0, 1.0);
        }
        data
    }

    /// The reduced-precision path of `normal_fill`: blocks of 16 uniforms drawn and transformed
    /// one at a time in float, then rounded. Unlike the float32 path, the partial last block
    /// consumes the uniforms right after the last full block, so for sizes not divisible by 16
    /// this is not `randn_f32` rounded.
    fn randn_reduced<T: Copy + Default>(&mut self, n: usize, cast: fn(f32) -> T) -> Vec<T> {
        if n < 16 {
            // `static_cast<Half>(double)` goes through float.
            return (0..n).map(|_| cast(self.normal_f64_scalar() as f32)).collect();
        }
        let mut out = vec![T::default(); n];
        let mut buf = [0f32; 16];
        let mut fill = |rng: &mut Self, dst: &mut [T]| {
            for v in buf.iter_mut() {
                *v = rng.uniform_f32();
            }
            normal_fill_16(&mut buf, 0.0, 1.0);
            for (d, &v) in dst.iter_mut().zip(&buf) {
                *d = cast(v);
            }
        };
        for block in out.chunks_exact_mut(16) {
            fill(self, block);
        }
        if !n.is_multiple_of(16) {
            fill(self, &mut out[n - 16..]);
        }
        out
    }

    /// `torch.randn(n, generator=g, dtype=torch.float16)`, flattened (what diffusers draws for
    /// half-precision pipelines with a CPU generator).
    pub fn randn_f16(&mut self, n: usize) -> Vec<f16> {
        self.randn_reduced(n, f16::from_f32)
    }

    /// `torch.randn(n, generator=g, dtype=torch.bfloat16)`, flattened.
    pub fn randn_bf16(&mut self, n: usize) -> Vec<bf16> {
        self.randn_reduced(n, bf16::from_f32)
    }

    /// `torch.rand(n, generator=g)` (float32): uniform in `[0, 1)`, 24 random bits each.
    pub fn rand_f32(&mut self, n: usize) -> Vec<f32> {
        (0..n).map(|_| self.uniform_f32()).collect()
    }

    /// `torch.rand(n, generator=g, dtype=torch.float64)`: uniform in `[0, 1)`, 53 bits each.
    pub fn rand_f64(&mut self, n: usize) -> Vec<f64> {
        (0..n).map(|_| self.uniform_f64()).collect()
    }

    /// `torch.rand(n, generator=g, dtype=torch.float16)`: a float draw rounded to half, where a
    /// value that rounds up to 1 becomes 0 (torch's clamp).
    pub fn rand_f16(&mut self, n: usize) -> Vec<f16> {
        (0..n)
            .map(|_| match f16::from_f32(self.uniform_f32()) {
                v if v == f16::ONE => f16::ZERO,
                v => v,
            })
            .collect()
    }

    /// `torch.rand(n, generator=g, dtype=torch.bfloat16)`, with the same clamp as
    /// [`TorchRng::rand_f16`].
    pub fn rand_bf16(&mut self, n: usize) -> Vec<bf16> {
        (0..n)
            .map(|_| match bf16::from_f32(self.uniform_f32()) {
                v if v == bf16::ONE => bf16::ZERO,
                v => v,
            })
            .collect()
    }

    /// `torch.randint(low, high, (n,), generator=g)` (int64): `random() % range + low`, with
    /// 64 random bits when the range is at least 2^28 (torch's rule; the slight modulo bias is
    /// torch's too). Fails unless `low < high`.
    pub fn randint(&mut self, low: i64, high: i64, n: usize) -> Result<Vec<i64>> {
        if low >= high {
            return Err(Error::msg(format!(
                "randint: low ({low}) must be less than high ({high})"
            )));
        }
        let range = high.wrapping_sub(low) as u64;
        let wide = range >= 1 << 28;
        Ok((0..n)
            .map(|_| {
                let v = if wide { self.next_u64() } else { u64::from(self.next_u32()) };
                ((v % range) as i64).wrapping_add(low)
            })
            .collect())
    }

    /// `torch.randperm(n, generator=g)`: a random permutation of `0..n` (forward Fisher-Yates
    /// with `random() % (n - i)`), as `torch.utils.data.RandomSampler` shuffles a dataset.
    /// Fails for `n` of 2^32 / 20 or more, where torch switches to another algorithm.
    pub fn randperm(&mut self, n: usize) -> Result<Vec<i64>> {
        if n >= RANDPERM_MAX {
            return Err(Error::msg(format!(
                "randperm: n = {n} is too large (at most {} is supported)",
                RANDPERM_MAX - 1
            )));
        }
        let mut perm: Vec<i64> = (0..n as i64).collect();
        for i in 0..n.saturating_sub(1) {
            let z = self.next_u32() as usize % (n - i);
            perm.swap(i, i + z);
        }
        Ok(perm)
    }

    /// The complete state, to store in a checkpoint.
    pub fn state(&self) -> TorchRngState {
        TorchRngState {
            seed: self.engine.seed,
            left: self.engine.left,
            next: self.engine.next,
            mt: self.engine.state.to_vec(),
            next_double_normal: self.next_double_normal,
            next_float_normal: self.next_float_normal,
        }
    }

    /// A generator continuing exactly from `state`. Fails on a state torch would reject.
    pub fn from_state(state: &TorchRngState) -> Result<Self> {
        let words: [u32; N] = state.mt.as_slice().try_into().map_err(|_| {
            Error::msg(format!(
                "invalid TorchRng state: {} Mersenne Twister words, expected {N}",
                state.mt.len()
            ))
        })?;
        let engine = Mt19937 { seed: state.seed, left: state.left, next: state.next, state: words };
        if !engine.is_valid() {
            return Err(Error::msg(format!(
                "invalid TorchRng state: left = {}, next = {} (expected 1..={N} and 0..={N})",
                state.left, state.next
            )));
        }
        Ok(Self {
            engine,
            next_double_normal: state.next_double_normal,
            next_float_normal: state.next_float_normal,
        })
    }

    /// The state in the byte layout of `torch.Generator("cpu").get_state()` (a uint8 tensor of
    /// [`TORCH_CPU_STATE_BYTES`] bytes; little-endian, as on every platform torch runs on).
    pub fn torch_state(&self) -> Vec<u8> {
        let mut b = Vec::with_capacity(TORCH_CPU_STATE_BYTES);
        b.extend_from_slice(&self.engine.seed.to_le_bytes());
        b.extend_from_slice(&self.engine.left.to_le_bytes());
        b.extend_from_slice(&1i32.to_le_bytes()); // seeded
        b.extend_from_slice(&u64::from(self.engine.next).to_le_bytes());
        for w in &self.engine.state {
            b.extend_from_slice(&u64::from(*w).to_le_bytes());
        }
        b.extend_from_slice(&0f64.to_le_bytes()); // normal_x, unused
        b.extend_from_slice(&self.next_double_normal.unwrap_or(0.0).to_le_bytes());
        b.extend_from_slice(&0f64.to_le_bytes()); // normal_rho, unused
        b.extend_from_slice(&i32::from(self.next_double_normal.is_some()).to_le_bytes());
        b.extend_from_slice(&[0; 4]); // padding
        b.extend_from_slice(&self.next_float_normal.unwrap_or(0.0).to_le_bytes());
        b.push(u8::from(self.next_float_normal.is_some()));
        b.extend_from_slice(&[0; 3]); // padding
        debug_assert_eq!(b.len(), TORCH_CPU_STATE_BYTES);
        b
    }

    /// A generator from the bytes of `torch.Generator("cpu").get_state()`
    /// (`set_state`), e.g. from a PyTorch training checkpoint.
    pub fn from_torch_state(bytes: &[u8]) -> Result<Self> {
        if bytes.len() != TORCH_CPU_STATE_BYTES {
            return Err(Error::msg(format!(
                "invalid torch CPU generator state: {} bytes, expected {TORCH_CPU_STATE_BYTES}",
                bytes.len()
            )));
        }
        let u64_at = |o: usize| u64::from_le_bytes(bytes[o..o + 8].try_into().unwrap_or_default());
        let i32_at = |o: usize| i32::from_le_bytes(bytes[o..o + 4].try_into().unwrap_or_default());
        if i32_at(12) == 0 {
            return Err(Error::msg("invalid torch CPU generator state: not seeded"));
        }
        let mut mt = Vec::with_capacity(N);
        for i in 0..N {
            // torch copies the legacy 64-bit words into 32-bit ones, truncating.
            mt.push(u64_at(24 + 8 * i) as u32);
        }
        let f32_at = |o: usize| f32::from_le_bytes(bytes[o..o + 4].try_into().unwrap_or_default());
        Self::from_state(&TorchRngState {
            seed: u64_at(0),
            left: i32_at(8),
            next: u64_at(16) as u32,
            mt,
            next_double_normal: (i32_at(5040) != 0).then(|| f64::from_bits(u64_at(5024))),
            next_float_normal: (bytes[5052] != 0).then(|| f32_at(5048)),
        })
    }
}

fn cpu_tensor<T: candle_core::WithDType>(
    data: Vec<T>,
    shape: &[usize],
) -> candle_core::Result<Tensor> {
    Tensor::from_vec(data, shape, &Device::Cpu)
}

impl NoiseSource for TorchRng {
    /// `torch.randn(shape, generator=g, dtype=dtype)` on the CPU, then moved to `device`:
    /// float32 and float64 draw at that precision; float16 and bfloat16 draw as torch does for
    /// those dtypes (see [`TorchRng::randn_f16`]), which is what diffusers' `randn_tensor` does.
    fn randn(
        &mut self,
        shape: &[usize],
        dtype: DType,
        device: &Device,
    ) -> candle_core::Result<Tensor> {
        let n = shape.iter().product();
        let t = match dtype {
            DType::F32 => cpu_tensor(self.randn_f32(n), shape)?,
            DType::F64 => cpu_tensor(self.randn_f64(n), shape)?,
            DType::F16 => cpu_tensor(self.randn_f16(n), shape)?,
            DType::BF16 => cpu_tensor(self.randn_bf16(n), shape)?,
            other => return Err(candle_core::Error::UnsupportedDTypeForOp(other, "randn")),
        };
        t.to_device(device)
    }
}
