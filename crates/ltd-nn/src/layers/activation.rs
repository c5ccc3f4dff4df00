//! Activation functions named as in diffusers' `get_activation` (`act_fn` in configs).

use candle_core::{Result, Tensor};

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
}
