//! diffusers' GEGLU activation (Shazeer 2020) as one fused, vectorised CPU pass: the exact
//! (erf) GELU of the gate, by the same Abramowitz–Stegun formula PyTorch's CPU kernels use,
//! times the value.

use candle_core::{CpuStorage, CustomOp1, Layout, Result, Shape};

use super::{contiguous, for_each_row};

/// `[value, gate]` rows (each `inner` wide) → `value · GELU(gate)`, on contiguous f32 CPU
/// tensors; built only where AVX2 and FMA are available.
pub(crate) struct GegluOp {
    pub inner: usize,
}

impl CustomOp1 for GegluOp {
    fn name(&self) -> &'static str {
        "ltd-geglu"
    }

    fn cpu_fwd(&self, s: &CpuStorage, l: &Layout) -> Result<(CpuStorage, Shape)> {
        let h = contiguous::<f32>(s, l)?;
        let n = self.inner;
        let mut out = vec![0f32; h.len() / 2];
        for_each_row(h, &mut out, (2 * n, n), |_, src, dst| {
            let (value, gate) = src.split_at(n);
            // SAFETY: `geglu` only builds this op when AVX2 and FMA are available.
            #[cfg(target_arch = "x86_64")]
            unsafe {
                geglu_row(value, gate, dst)
            };
        });
        let mut dims = l.shape().dims().to_vec();
        if let Some(last) = dims.last_mut() {
            *last = n;
        }
        Ok((CpuStorage::F32(out), Shape::from(dims)))
    }
}

#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2,fma")]
unsafe fn geglu_row(value: &[f32], gate: &[f32], out: &mut [f32]) {
    use std::arch::x86_64::*;
    let n8 = out.len() / 8 * 8;
    for i in (0..n8).step_by(8) {
        // SAFETY: i + 8 ≤ n8 ≤ the length of all three slices.
        unsafe {
            let g = super::simd::gelu_erf256(_mm256_loadu_ps(gate.as_ptr().add(i)));
            let v = _mm256_loadu_ps(value.as_ptr().add(i));
            _mm256_storeu_ps(out.as_mut_ptr().add(i), _mm256_mul_ps(v, g));
        }
    }
    for i in n8..out.len() {
        let x = gate[i] as f64;
        let gelu = 0.5 * x * (1.0 + erf(x / std::f64::consts::SQRT_2));
        out[i] = value[i] * gelu as f32;
    }
}

/// erf for the few tail elements (Abramowitz & Stegun 7.1.26, as the vector path).
#[cfg(target_arch = "x86_64")]
fn erf(x: f64) -> f64 {
    let t = 1.0 / (1.0 + 0.327_591_1 * x.abs());
    let poly = t
        * (0.254_829_592
            + t * (-0.284_496_736
                + t * (1.421_413_741 + t * (-1.453_152_027 + t * 1.061_405_429))));
    (1.0 - poly * (-x * x).exp()).copysign(x)
}
