//! diffusers' GEGLU activation (Shazeer 2020) as one fused, vectorised CPU pass: the exact
//! (erf) GELU of the gate, by the same Abramowitz–Stegun formula PyTorch's CPU kernels use,
//! times the value; and its backward pass, for training.

use candle_core::{CpuStorage, CustomOp1, Layout, Result, Shape, Tensor};

use super::{contiguous, for_each_row, Data};

/// `[value, gate]` rows (each `inner` wide) → `value · GELU(gate)`, on contiguous f32 CPU
/// tensors; built only where AVX2 and FMA are available. Backward: `d value = dy · GELU(gate)`,
/// `d gate = dy · value · (Φ(gate) + gate · φ(gate))`, the derivative candle's `gelu_erf`
/// records.
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

    fn bwd(&self, arg: &Tensor, _res: &Tensor, grad: &Tensor) -> Result<Option<Tensor>> {
        let (h, dy) = (arg.contiguous()?, grad.contiguous()?);
        let (hd, dyd) = (Data::new(&h), Data::new(&dy));
        let (hs, dys) = (hd.f32()?, dyd.f32()?);
        let n = self.inner;
        let mut dh = vec![0f32; hs.len()];
        for_each_row(hs, &mut dh, (2 * n, 2 * n), |row, src, dst| {
            let (value, gate) = src.split_at(n);
            let (d_value, d_gate) = dst.split_at_mut(n);
            let dy = &dys[row * n..(row + 1) * n];
            // SAFETY: `geglu` only builds this op when AVX2 and FMA are available.
            #[cfg(target_arch = "x86_64")]
            unsafe {
                geglu_grad_row((value, gate), dy, (d_value, d_gate))
            };
        });
        Ok(Some(Tensor::from_vec(dh, h.shape(), h.device())?))
    }
}

#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2,fma")]
pub(super) unsafe fn geglu_row(value: &[f32], gate: &[f32], out: &mut [f32]) {
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

#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2,fma")]
unsafe fn geglu_grad_row(
    (value, gate): (&[f32], &[f32]),
    dy: &[f32],
    (d_value, d_gate): (&mut [f32], &mut [f32]),
) {
    use std::arch::x86_64::*;
    let n8 = dy.len() / 8 * 8;
    let inv_sqrt_2pi = 1.0 / (2.0 * std::f64::consts::PI).sqrt();
    for i in (0..n8).step_by(8) {
        // SAFETY: i + 8 ≤ n8 ≤ the length of all five slices.
        unsafe {
            let g = _mm256_loadu_ps(gate.as_ptr().add(i));
            let (one_plus_erf, e) = super::simd::gelu_terms256(g);
            let half = _mm256_set1_ps(0.5);
            let cdf = _mm256_mul_ps(half, one_plus_erf);
            let pdf = _mm256_mul_ps(e, _mm256_set1_ps(inv_sqrt_2pi as f32));
            let gelu = _mm256_mul_ps(_mm256_mul_ps(g, half), one_plus_erf);
            let d = _mm256_loadu_ps(dy.as_ptr().add(i));
            let v = _mm256_loadu_ps(value.as_ptr().add(i));
            _mm256_storeu_ps(d_value.as_mut_ptr().add(i), _mm256_mul_ps(d, gelu));
            let slope = _mm256_fmadd_ps(g, pdf, cdf);
            _mm256_storeu_ps(d_gate.as_mut_ptr().add(i), _mm256_mul_ps(_mm256_mul_ps(d, v), slope));
        }
    }
    for i in n8..dy.len() {
        let x = gate[i] as f64;
        let cdf = 0.5 * (1.0 + erf(x / std::f64::consts::SQRT_2));
        let pdf = (-0.5 * x * x).exp() * inv_sqrt_2pi;
        d_value[i] = dy[i] * (x * cdf) as f32;
        d_gate[i] = dy[i] * value[i] * (cdf + x * pdf) as f32;
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
