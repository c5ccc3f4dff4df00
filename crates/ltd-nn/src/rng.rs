//! Randomness. Every random draw in ltd (initial latents, sampler noise, training noise,
//! shuffling) goes through a [`NoiseSource`], so that a seed means the same thing everywhere and
//! tests can replay recorded noise.
//!
//! # Generators
//! - [`TorchRng`]: PyTorch's CPU generator, `torch.Generator("cpu").manual_seed(seed)`, with
//!   `torch.randn`, `torch.rand`, `torch.randint` and `torch.randperm` on it. With it a seed gives
//!   the same latents (hence the same image) as diffusers with a CPU generator, on any device.
//! - [`PhiloxRng`]: AUTOMATIC1111's "NV" generator, imitating `torch.randn` on CUDA (bit-exact
//!   against the webui's numpy code, close to but not bit-exact with CUDA itself).
//! - [`PerImage`]: one generator per image of a batch (diffusers' list of generators).
//!
//! Batches: diffusers with one generator draws the whole batch in one call,
//! `torch.randn([B, C, H, W], generator=g)` — that is `TorchRng::new(seed)` used directly, and
//! image `i` is a slice of that draw (so it depends on the batch size). With a list of generators
//! it draws `[1, C, H, W]` from each and concatenates: `PerImage::consecutive_seeds(seed, B,
//! TorchRng::new)` gives image `i` the noise of seed `seed + i` alone, the rule AUTOMATIC1111
//! uses and the one to use when each image must be reproducible from its own seed.
//!
//! # What torch computes, and how exactly we match it
//! `manual_seed(s)` seeds MT19937 (`at::mt19937`) from the low 32 bits of `s` (seeds are
//! `u64`; Python accepts `-2**63..=2**64-1` and maps negatives to `s mod 2^64`). A float is
//! `(next_u32 & 0xffffff) * 2^-24`, a double `(next_u64 & (2^53 - 1)) * 2^-53`, where `next_u64`
//! is two draws, the first in the high half.
//!
//! `torch.randn` (CPU, `normal_kernel` in `aten/src/ATen/native/cpu/DistributionTemplates.h`):
//! - **16 or more elements** (`normal_fill`): float32 draws all `n` uniforms, then transforms each
//!   block of 16 (uniforms `j` and `j + 8` give normals `j` by cosine and `j + 8` by sine); if `n`
//!   is not a multiple of 16 the last 16 elements are redrawn from 16 fresh uniforms and
//!   transformed again. Float16/bfloat16 draw and transform block by block in float and round,
//!   so their partial last block uses different uniforms. On x86 the float transform is the AVX2
//!   kernel (`log256_ps`/`sincos256_ps`, Cephes polynomials, with the FMAs GCC put in torch's
//!   binary); CPUs with AVX-512 run that same AVX2 kernel, because torch registers no AVX-512
//!   `normal_stub`. We replay it in scalar code with explicit FMAs: **bit-exact** for float32,
//!   float16 and bfloat16 on every CPU and OS. Float64 uses libm `log`/`sin`/`cos`: bit-exact
//!   against torch on Linux/glibc, elsewhere equal to the platform libm's accuracy (~1 ulp).
//! - **Fewer than 16 elements**: one double-precision Box-Muller per pair
//!   (`at::normal_distribution<double>`: `sqrt(-2 log1p(-u2))`, `cos`/`sin` of `2 pi u1`), the
//!   sine half cached in the generator for the next scalar draw (the 16+ path leaves the cache
//!   alone), rounded to the dtype. It uses libm in f64: bit-exact on Linux/glibc (torch's own
//!   libm); elsewhere a libm that differs by 1 ulp of f64 changes the float result only if it
//!   straddles a float rounding boundary (fewer than one value in 10^8).
//!
//! torch itself is not the same everywhere: where torch runs its scalar DEFAULT kernel
//! (non-x86 CPUs such as Apple silicon, x86 without AVX2, or `ATEN_CPU_CAPABILITY=default`),
//! `torch.randn` of 16+ float elements uses libm `logf`/`sinf`/`cosf` and differs from the AVX2
//! result in the last bits (measured on torch 2.15: 38% of values, at most 2.3e-6 absolute).
//! We reproduce the x86 (AVX2/AVX-512) result, the one diffusers users on PCs and CI get.

mod box_muller;
mod mt19937;
mod per_image;
mod philox;
mod torch_cpu;

pub use per_image::PerImage;
pub use philox::{philox4x32_10, PhiloxRng};
pub use torch_cpu::{TorchRng, TorchRngState, TORCH_CPU_STATE_BYTES};

use candle_core::{DType, Device, Result, Tensor};

/// A source of standard-normal noise tensors.
pub trait NoiseSource {
    /// Noise of `shape`, drawn in the same order and with the same values as
    /// `torch.randn(shape, generator=g)` would draw them from this source's state.
    fn randn(&mut self, shape: &[usize], dtype: DType, device: &Device) -> Result<Tensor>;
}

impl<R: NoiseSource + ?Sized> NoiseSource for &mut R {
    fn randn(&mut self, shape: &[usize], dtype: DType, device: &Device) -> Result<Tensor> {
        (**self).randn(shape, dtype, device)
    }
}

impl<R: NoiseSource + ?Sized> NoiseSource for Box<R> {
    fn randn(&mut self, shape: &[usize], dtype: DType, device: &Device) -> Result<Tensor> {
        (**self).randn(shape, dtype, device)
    }
}
