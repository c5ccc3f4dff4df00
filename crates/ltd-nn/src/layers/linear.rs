//! `torch.nn.Linear`, initialised for training as PyTorch initialises it (uniform in ±1/√fan_in
//! for weight and bias: `kaiming_uniform_(a=√5)`), and the row-times-weight product it shares
//! with the 1×1 convolution of [`super::conv`].

use candle_core::{DType, Module, Result, Tensor};
use candle_nn::{Init, VarBuilder};

/// Half-precision inputs on the CPU are multiplied in f32 and rounded once, after the bias, as
/// PyTorch's CPU kernels do (candle would round the product, then round again after adding the
/// bias; its CPU convolution has no bf16 kernel at all).
pub(super) fn widen_on_cpu(x: &Tensor) -> bool {
    x.device().is_cpu() && matches!(x.dtype(), DType::F16 | DType::BF16)
}

/// PyTorch's default initialisation of a layer with `fan_in` inputs per output.
pub(super) fn torch_default_init(fan_in: usize) -> Init {
    let bound = 1.0 / (fan_in.max(1) as f64).sqrt();
    Init::Uniform { lo: -bound, up: bound }
}

/// `y = x·Wᵀ + b` over the last dimension of an input of any rank.
#[derive(Debug, Clone)]
pub struct Linear {
    weight: Tensor,
    bias: Option<Tensor>,
}

impl Linear {
    /// Fetches `weight` (`[out, in]`) and, with `bias`, `bias` (`[out]`).
    pub fn new(vb: VarBuilder, in_dim: usize, out_dim: usize, bias: bool) -> Result<Self> {
        let init = torch_default_init(in_dim);
        let weight = vb.get_with_hints((out_dim, in_dim), "weight", init)?;
        let bias = if bias { Some(vb.get_with_hints(out_dim, "bias", init)?) } else { None };
        Ok(Self { weight, bias })
    }

    /// The weight, `[out, in]`.
    pub fn weight(&self) -> &Tensor {
        &self.weight
    }

    /// The output width.
    pub fn out_dim(&self) -> Result<usize> {
        self.weight.dim(0)
    }
}

impl Module for Linear {
    fn forward(&self, x: &Tensor) -> Result<Tensor> {
        rows_times_weight(x, &self.weight, self.bias.as_ref())
    }
}

/// `x·Wᵀ + b` over the last dimension for `W: [out, in]`, as one 2-D product over all leading
/// dimensions (a single large GEMM is faster than a batch of small ones; the transposed weight
/// is read in place).
pub(super) fn rows_times_weight(
    x: &Tensor,
    weight: &Tensor,
    bias: Option<&Tensor>,
) -> Result<Tensor> {
    let dims = x.dims();
    let (out_dim, in_dim) = weight.dims2()?;
    let rows = x.elem_count() / in_dim.max(1);
    let dtype = x.dtype();
    let widen = widen_on_cpu(x);
    let cast = |t: &Tensor| if widen { t.to_dtype(DType::F32) } else { Ok(t.clone()) };
    let y = cast(&x.reshape((rows, in_dim))?)?.matmul(&cast(weight)?.t()?)?;
    let y = match bias {
        Some(b) => y.broadcast_add(&cast(b)?)?,
        None => y,
    };
    let mut out_dims = dims.to_vec();
    if let Some(last) = out_dims.last_mut() {
        *last = out_dim;
    }
    y.reshape(out_dims)?.to_dtype(dtype)
}
