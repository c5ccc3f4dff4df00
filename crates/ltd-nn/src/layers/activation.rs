//! Activation functions named as in diffusers' `get_activation` (`act_fn` in configs).

use candle_core::{CpuStorage, CustomOp1, DType, Layout, Result, Shape, Tensor};

use super::cpu::{contiguous, for_each_row};
use crate::error::ConfigError;

/// An activation function of diffusers' `ACT2CLS` table.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Activation {
    /// `x · sigmoid(x)` (`"silu"`, `"swish"`).
    Silu,
    /// `x · tanh(softplus(x))` (`"mish"`).
    Mish,
    /// The exact (erf) GELU, `torch.nn.GELU()` (`"gelu"`).
    Gelu,
    /// `max(x, 0)` (`"relu"`).
    Relu,
}

impl Activation {
    /// Parses a config value (case-insensitive, as diffusers); an unknown name is an error naming
    /// `field`.
    pub fn parse(value: &str, field: &str) -> std::result::Result<Self, ConfigError> {
        Ok(match value.to_ascii_lowercase().as_str() {
            "silu" | "swish" => Self::Silu,
            "mish" => Self::Mish,
            "gelu" => Self::Gelu,
            "relu" => Self::Relu,
            _ => return Err(ConfigError::unsupported(field, value)),
        })
    }

    /// Applies the activation.
    pub fn forward(self, x: &Tensor) -> Result<Tensor> {
        match self {
            Self::Silu => x.silu(),
            Self::Mish => mish(x),
            Self::Gelu => x.gelu_erf(),
            Self::Relu => x.relu(),
        }
    }
}

/// diffusers' GEGLU activation (Shazeer 2020): `h = [value, gate]` along the last dimension
/// (each `inner` wide) becomes `value · GELU(gate)` with the exact (erf) GELU.
///
/// On x86-64 CPUs with AVX2/FMA and without autograd this is one fused, vectorised pass (erf
/// by the same Abramowitz–Stegun formula PyTorch's CPU kernels use); otherwise tensor ops.
pub fn geglu(h: &Tensor, inner: usize) -> Result<Tensor> {
    let last = h.rank().saturating_sub(1);
    if h.dim(last)? != 2 * inner {
        candle_core::bail!("GEGLU: expected a last dimension of {}, got {:?}", 2 * inner, h.shape())
    }
    if h.device().is_cpu() && !h.track_op() && h.dtype().is_float() && crate::simd::available() {
        let dtype = h.dtype();
        let out = h.to_dtype(DType::F32)?.contiguous()?.apply_op1_no_bwd(&GegluOp { inner })?;
        return out.to_dtype(dtype);
    }
    let (value, gate) = (h.narrow(last, 0, inner)?, h.narrow(last, inner, inner)?);
    value * gate.gelu_erf()?
}

struct GegluOp {
    inner: usize,
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
            let g = crate::simd::gelu_erf256(_mm256_loadu_ps(gate.as_ptr().add(i)));
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

/// `x · tanh(softplus(x))`, with softplus written so that it neither overflows for large `x`
/// nor loses precision for very negative `x`: `softplus(x) = max(x, 0) + ln(1 + e^(−|x|))`.
fn mish(x: &Tensor) -> Result<Tensor> {
    let softplus = (x.relu()? + x.abs()?.neg()?.exp()?.affine(1.0, 1.0)?.log()?)?;
    x * softplus.tanh()?
}

#[cfg(test)]
mod tests {
    use super::*;
    use candle_core::Device;

    #[test]
    fn parses_and_computes() {
        assert_eq!(Activation::parse("SiLU", "act_fn").unwrap(), Activation::Silu);
        assert_eq!(Activation::parse("swish", "act_fn").unwrap(), Activation::Silu);
        let err = Activation::parse("tanh", "act_fn").unwrap_err();
        assert_eq!(err.to_string(), r#"field `act_fn`: unsupported value "tanh""#);

        let x = Tensor::new(&[-30f32, -1.0, 0.0, 0.5, 30.0], &Device::Cpu).unwrap();
        let mish = Activation::Mish.forward(&x).unwrap().to_vec1::<f32>().unwrap();
        // torch.nn.functional.mish on the same values.
        let expected = [-2.8073e-12f32, -0.30340144, 0.0, 0.37524524, 30.0];
        for (a, e) in mish.iter().zip(expected) {
            assert!((a - e).abs() <= 1e-6 * (1.0 + e.abs()), "{mish:?}");
        }
        let gelu = Activation::Gelu.forward(&x).unwrap().to_vec1::<f32>().unwrap();
        assert!((gelu[1] - -0.15865526).abs() < 1e-6, "erf GELU, not the tanh approximation");
    }

    #[test]
    fn fused_geglu_equals_composite() {
        // 2 rows of [value (13), gate (13)]: a vector part and a scalar tail.
        let h: Vec<f32> = (0..52).map(|i| (i as f32 * 0.37).sin() * 4.0).collect();
        let h = Tensor::from_vec(h, (2, 26), &Device::Cpu).unwrap();
        let fused = geglu(&h, 13).unwrap();
        let composite = (h.narrow(1, 0, 13).unwrap()
            * h.narrow(1, 13, 13).unwrap().gelu_erf().unwrap())
        .unwrap();
        let d = (fused - composite).unwrap().abs().unwrap().max_keepdim(1).unwrap();
        let d = d.max_keepdim(0).unwrap().flatten_all().unwrap().to_vec1::<f32>().unwrap()[0];
        assert!(d < 5e-6, "max |fused − composite| = {d}");
    }
}
