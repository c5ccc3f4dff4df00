//! `torch.nn.Linear` and `torch.nn.Conv2d`, initialised for training as PyTorch initialises
//! them (uniform in ±1/√fan_in for weight and bias: `kaiming_uniform_(a=√5)`).

use candle_core::{DType, Module, Result, Tensor};
use candle_nn::{Init, VarBuilder};

fn torch_default_init(fan_in: usize) -> Init {
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
        // One 2-D product over all leading dimensions: a single large GEMM is faster than a
        // batch of small ones, and the transposed weight is read in place.
        let dims = x.dims();
        let in_dim = dims.last().copied().unwrap_or(0);
        let rows = x.elem_count() / in_dim.max(1);
        let y = x.reshape((rows, in_dim))?.matmul(&self.weight.t()?)?;
        let y = match &self.bias {
            Some(b) => y.broadcast_add(b)?,
            None => y,
        };
        let mut out_dims = dims.to_vec();
        if let Some(last) = out_dims.last_mut() {
            *last = self.weight.dim(0)?;
        }
        y.reshape(out_dims)
    }
}

/// A square-kernel 2-D convolution with bias, `[B, C_in, H, W] → [B, C_out, H', W']`.
#[derive(Debug, Clone)]
pub struct Conv2d {
    weight: Tensor,
    bias: Tensor,
    padding: usize,
    stride: usize,
}

impl Conv2d {
    /// Fetches `weight` (`[out, in, k, k]`) and `bias` (`[out]`).
    pub fn new(
        vb: VarBuilder,
        in_channels: usize,
        out_channels: usize,
        kernel: usize,
        padding: usize,
        stride: usize,
    ) -> Result<Self> {
        let init = torch_default_init(in_channels * kernel * kernel);
        let weight =
            vb.get_with_hints((out_channels, in_channels, kernel, kernel), "weight", init)?;
        let bias = vb.get_with_hints(out_channels, "bias", init)?;
        Ok(Self { weight, bias, padding, stride })
    }

    /// A 1×1 convolution applied to channels-last rows `[…, C_in] → […, C_out]`: the same
    /// weights used as a linear layer, which spares the transposes around it.
    pub fn forward_channels_last(&self, x: &Tensor) -> Result<Tensor> {
        let (out_c, in_c) = (self.weight.dim(0)?, self.weight.dim(1)?);
        let dims = x.dims();
        let rows = x.elem_count() / in_c.max(1);
        let w = self.weight.reshape((out_c, in_c))?;
        let y = x.reshape((rows, in_c))?.matmul(&w.t()?)?.broadcast_add(&self.bias)?;
        let mut out_dims = dims.to_vec();
        if let Some(last) = out_dims.last_mut() {
            *last = out_c;
        }
        y.reshape(out_dims)
    }
}

impl Module for Conv2d {
    fn forward(&self, x: &Tensor) -> Result<Tensor> {
        let y = if x.dtype() == DType::BF16 && x.device().is_cpu() {
            // candle's CPU convolution has no bf16 kernel: widen, convolve, narrow.
            let w = self.weight.to_dtype(DType::F32)?;
            let y = x.to_dtype(DType::F32)?.conv2d(&w, self.padding, self.stride, 1, 1)?;
            y.to_dtype(DType::BF16)?
        } else {
            x.conv2d(&self.weight, self.padding, self.stride, 1, 1)?
        };
        let c = self.bias.dim(0)?;
        y.broadcast_add(&self.bias.reshape((1, c, 1, 1))?)
    }
}
