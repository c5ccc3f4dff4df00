//! Activation functions named as in diffusers' `get_activation` (`act_fn` in configs).

use candle_core::{DType, Result, Tensor};

use crate::error::ConfigError;
use crate::kernels::geglu::GegluOp;
use crate::kernels::simd;

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
/// On x86-64 CPUs with AVX2/FMA this is one fused, vectorised pass (`kernels/geglu.rs`), in
/// f32 also under autograd with its own backward; otherwise tensor ops.
pub fn geglu(h: &Tensor, inner: usize) -> Result<Tensor> {
    let last = h.rank().saturating_sub(1);
    if h.dim(last)? != 2 * inner {
        candle_core::bail!("GEGLU: expected a last dimension of {}, got {:?}", 2 * inner, h.shape())
    }
    if h.device().is_cpu() && simd::available() {
        if !h.track_op() && h.dtype().is_float() {
            let dtype = h.dtype();
            let out = h.to_dtype(DType::F32)?.contiguous()?.apply_op1_no_bwd(&GegluOp { inner })?;
            return out.to_dtype(dtype);
        }
        if h.dtype() == DType::F32 {
            // Under autograd: the same pass, with its own backward (one pass each way instead
            // of the composite's elementwise ops: GELU, the product, and in backward GELU's
            // derivative through erf, exp and several products).
            return h.contiguous()?.apply_op1(GegluOp { inner });
        }
    }
    let (value, gate) = (h.narrow(last, 0, inner)?, h.narrow(last, inner, inner)?);
    value * gate.gelu_erf()?
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

    /// Under autograd the fused pass gives the composite's values and the gradient of the
    /// input: within 5e-6 of the largest, the erf approximations' difference (A&S 7.1.26 against
    /// candle's erf, ≤ 1.5e-7 each, times values and gates up to 4).
    #[test]
    fn fused_geglu_gradient_equals_composite() {
        if !simd::available() {
            return;
        }
        let h: Vec<f32> = (0..52).map(|i| (i as f32 * 0.37).sin() * 4.0).collect();
        let h = candle_core::Var::from_vec(h, (2, 26), &Device::Cpu).unwrap();
        let dy: Vec<f32> = (0..26).map(|i| (i as f32 * 0.91).cos()).collect();
        let dy = Tensor::from_vec(dy, (2, 13), &Device::Cpu).unwrap();
        let fused = geglu(h.as_tensor(), 13).unwrap();
        let composite = (h.as_tensor().narrow(1, 0, 13).unwrap()
            * h.as_tensor().narrow(1, 13, 13).unwrap().gelu_erf().unwrap())
        .unwrap();
        let grad = |y: &Tensor| {
            let loss = (y * &dy).unwrap().sum_all().unwrap();
            loss.backward().unwrap().get(h.as_tensor()).unwrap().clone()
        };
        let max = |t: Tensor| t.abs().unwrap().flatten_all().unwrap().max(0).unwrap();
        let d = max((grad(&fused) - grad(&composite)).unwrap()).to_scalar::<f32>().unwrap();
        assert!(d < 5e-6, "max |d fused − d composite| = {d}");
        let d = max((fused - composite).unwrap()).to_scalar::<f32>().unwrap();
        assert!(d < 5e-6, "values: {d}");
    }
}
