//! `torch.nn.Linear` and `torch.nn.Conv2d`, initialised for training as PyTorch initialises
//! them (uniform in ±1/√fan_in for weight and bias: `kaiming_uniform_(a=√5)`).

use candle_core::{DType, Module, Result, Tensor};
use candle_nn::{Init, VarBuilder};

use super::conv_cpu::{self, ConvShape, Epilogue};
use super::cpu;

/// Half-precision inputs on the CPU are multiplied in f32 and rounded once, after the bias, as
/// PyTorch's CPU kernels do (candle would round the product, then round again after adding the
/// bias; its CPU convolution has no bf16 kernel at all).
fn widen_on_cpu(x: &Tensor) -> bool {
    x.device().is_cpu() && matches!(x.dtype(), DType::F16 | DType::BF16)
}

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
        rows_times_weight(x, &self.weight, self.bias.as_ref())
    }
}

/// `x·Wᵀ + b` over the last dimension for `W: [out, in]`, as one 2-D product over all leading
/// dimensions (a single large GEMM is faster than a batch of small ones; the transposed weight
/// is read in place).
fn rows_times_weight(x: &Tensor, weight: &Tensor, bias: Option<&Tensor>) -> Result<Tensor> {
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
        rows_times_weight(x, &self.weight.reshape((out_c, in_c))?, Some(&self.bias))
    }
}

impl Conv2d {
    /// `(conv(x) + channel_add + residual) / scale`, the way ResNet blocks use their
    /// convolutions: `channel_add: [B, C_out]` (a projected time embedding) is added to every
    /// pixel of its image and channel, `residual` has the output's shape. On the CPU in f32
    /// without autograd the extra terms are added while the output is written, sparing a pass
    /// (and an allocation) over the whole feature map for each.
    pub fn forward_fused(
        &self,
        x: &Tensor,
        channel_add: Option<&Tensor>,
        residual: Option<&Tensor>,
        scale: f64,
    ) -> Result<Tensor> {
        let extras_plain = channel_add.is_none_or(cpu::plain_f32)
            && residual.is_none_or(|r| cpu::plain_f32(r) && r.is_contiguous());
        if x.dtype() == DType::F32 && extras_plain {
            if let Some(y) = self.forward_cpu(x, channel_add, residual, scale)? {
                return Ok(y);
            }
        }
        let mut y = self.forward(x)?;
        if let Some(t) = channel_add {
            y = y.broadcast_add(&t.unsqueeze(2)?.unsqueeze(3)?)?;
        }
        if let Some(r) = residual {
            y = (r + y)?;
        }
        if scale == 1.0 {
            Ok(y)
        } else {
            y / scale
        }
    }

    /// The direct CPU kernel (see `conv_cpu.rs`), when it applies: a stride-1 convolution of
    /// CPU tensors outside any autograd graph. Half-precision inputs are computed in f32 and
    /// rounded once, as PyTorch's CPU kernels do.
    fn forward_cpu(
        &self,
        x: &Tensor,
        channel_add: Option<&Tensor>,
        residual: Option<&Tensor>,
        scale: f64,
    ) -> Result<Option<Tensor>> {
        let tracked = x.track_op() || self.weight.track_op() || self.bias.track_op();
        if !x.device().is_cpu() || self.stride != 1 || tracked || !x.dtype().is_float() {
            return Ok(None);
        }
        let (batch, cin, h, w) = x.dims4()?;
        let (cout, cin_w, k, k2) = self.weight.dims4()?;
        let shape = ConvShape { batch, cin, h, w, cout, k, pad: self.padding };
        if cin_w != cin || k != k2 || !shape.valid() {
            return Ok(None);
        }
        let (hout, wout) = shape.out_hw();
        if let Some(t) = channel_add {
            if t.dims() != [batch, cout] {
                candle_core::bail!("conv: channel term {:?}, expected [{batch}, {cout}]", t.dims())
            }
        }
        if let Some(r) = residual {
            if r.dims() != [batch, cout, hout, wout] {
                candle_core::bail!("conv: residual {:?} does not match the output", r.dims())
            }
        }
        let dtype = x.dtype();
        let f32c = |t: &Tensor| t.to_dtype(DType::F32)?.contiguous();
        let (x32, w32, b32) = (f32c(x)?, f32c(&self.weight)?, f32c(&self.bias)?);
        let (xd, wd, bd) = (cpu::Data::new(&x32), cpu::Data::new(&w32), cpu::Data::new(&b32));
        let (cd, rd) = (channel_add.map(cpu::Data::new), residual.map(cpu::Data::new));
        let epi = Epilogue {
            bias: bd.f32()?,
            channel_add: cd.as_ref().map(|d| d.f32()).transpose()?,
            residual: rd.as_ref().map(|d| d.f32()).transpose()?,
            scale: scale as f32,
        };
        let out = conv_cpu::conv2d(xd.f32()?, wd.f32()?, shape, epi);
        let y = Tensor::from_vec(out, (batch, cout, hout, wout), x.device())?;
        Ok(Some(y.to_dtype(dtype)?))
    }
}

impl Module for Conv2d {
    fn forward(&self, x: &Tensor) -> Result<Tensor> {
        if let Some(y) = self.forward_cpu(x, None, None, 1.0)? {
            return Ok(y);
        }
        let c = self.bias.dim(0)?;
        let dtype = x.dtype();
        let cpu = x.device().is_cpu();
        let (x, w, b) = if widen_on_cpu(x) {
            let f = |t: &Tensor| t.to_dtype(DType::F32);
            (f(x)?, f(&self.weight)?, f(&self.bias)?)
        } else {
            (x.clone(), self.weight.clone(), self.bias.clone())
        };
        let y = if cpu && self.stride == 1 {
            conv_stride1_cpu(&x, &w, self.padding)?
        } else {
            x.conv2d(&w, self.padding, self.stride, 1, 1)?
        };
        y.broadcast_add(&b.reshape((1, c, 1, 1))?)?.to_dtype(dtype)
    }
}

/// Bytes of unfolded input (`im2col`) a stride-1 CPU convolution holds at once: bands of output
/// rows small enough to stay cache-friendly and below the allocator's mmap threshold (so the
/// buffers are reused instead of page-faulted in anew), large enough for efficient products.
const MAX_UNFOLD_BYTES: usize = 16 << 20;

/// A stride-1 convolution on the CPU as one matrix product per image and band of rows.
///
/// With the input zero-padded and each channel's rows laid end to end, shifting by
/// `ky·W' + kx` (W' the padded width) is a contiguous slice, so the unfolded input is `k²`
/// memcpy-like slices per channel (`[Cin·k², rows·W']`, rows in the weight's own
/// `(ci, ky, kx)` order) and the product with the weight viewed as `[Cout, Cin·k²]` gives the
/// output with `k − 1` extra columns per row, which are cropped. candle's CPU convolution
/// gathers its unfolded tiles element by element, which costs as much as the product itself
/// at SD sizes. Built from ordinary tensor ops, so it is differentiable.
fn conv_stride1_cpu(x: &Tensor, w: &Tensor, pad: usize) -> Result<Tensor> {
    let (b, cin, h, width) = x.dims4()?;
    let (cout, cin_w, k, k2) = w.dims4()?;
    if cin_w != cin || k != k2 || h + 2 * pad < k || width + 2 * pad < k {
        // Let candle report the mismatch.
        return x.conv2d(w, pad, 1, 1, 1);
    }
    if k == 1 && pad == 0 {
        let y = w.reshape((cout, cin))?.broadcast_left(b)?.matmul(&x.reshape((
            b,
            cin,
            h * width,
        ))?)?;
        return y.reshape((b, cout, h, width));
    }
    let wp = width + 2 * pad;
    let (hout, wout) = (h + 2 * pad + 1 - k, wp + 1 - k);
    // One extra zero row at the bottom keeps the last shifted slice in bounds.
    let xp = x.pad_with_zeros(3, pad, pad)?.pad_with_zeros(2, pad, pad + 1)?;
    let flat = xp.reshape((b, cin, (h + 2 * pad + 1) * wp))?;
    let weight = w.reshape((cout, cin * k * k))?;
    let row_bytes = cin * k * k * wp * x.dtype().size_in_bytes();
    let band = (MAX_UNFOLD_BYTES / row_bytes.max(1)).clamp(1, hout);
    let mut images = Vec::with_capacity(b);
    for i in 0..b {
        let image = flat.get(i)?;
        let mut bands = Vec::with_capacity(hout.div_ceil(band));
        let mut y0 = 0;
        while y0 < hout {
            let rows = band.min(hout - y0);
            let shifts = (0..k * k)
                .map(|s| image.narrow(1, (y0 + s / k) * wp + s % k, rows * wp))
                .collect::<Result<Vec<_>>>()?;
            let cols = Tensor::stack(&shifts, 1)?.reshape((cin * k * k, rows * wp))?;
            bands.push(weight.matmul(&cols)?.reshape((cout, rows, wp))?.narrow(2, 0, wout)?);
            y0 += rows;
        }
        images.push(Tensor::cat(&bands, 1)?);
    }
    Tensor::stack(&images, 0)
}

#[cfg(test)]
mod tests {
    use super::*;
    use candle_core::Var;

    use crate::test_util::rand;

    fn max_diff(a: &Tensor, b: &Tensor) -> f32 {
        let d = (a - b).unwrap().abs().unwrap();
        d.flatten_all().unwrap().max(0).unwrap().to_scalar::<f32>().unwrap()
    }

    #[test]
    fn unfolded_convolution_equals_candles() {
        for &(b, cin, cout, h, w, k, pad) in &[
            (2, 3, 5, 7, 6, 3, 1),
            (1, 4, 2, 5, 9, 1, 0),
            (2, 2, 3, 6, 4, 3, 0),
            (1, 3, 4, 4, 5, 5, 2),
        ] {
            let x = rand(&[b, cin, h, w], 1);
            let wt = rand(&[cout, cin, k, k], 2);
            let expected = x.conv2d(&wt, pad, 1, 1, 1).unwrap();
            let ours = conv_stride1_cpu(&x, &wt, pad).unwrap();
            assert_eq!(ours.dims(), expected.dims());
            assert!(max_diff(&ours, &expected) < 1e-5, "{:?}", (b, cin, cout, h, w, k, pad));
        }
    }

    #[test]
    fn direct_kernel_with_epilogue_equals_candles() {
        // Shapes that exercise several bands of rows, split output channels, 1×1 and 5×5
        // kernels, no padding, and a batch.
        for &(b, cin, cout, h, w, k, pad) in &[
            (2, 3, 5, 7, 6, 3, 1),
            (1, 4, 130, 5, 9, 1, 0),
            (2, 2, 3, 6, 4, 3, 0),
            (1, 3, 4, 4, 5, 5, 2),
            (1, 8, 160, 300, 40, 3, 1),
        ] {
            let x = rand(&[b, cin, h, w], 1);
            let conv = Conv2d {
                weight: rand(&[cout, cin, k, k], 2),
                bias: rand(&[cout], 3),
                padding: pad,
                stride: 1,
            };
            let plain = x.conv2d(&conv.weight, pad, 1, 1, 1).unwrap();
            let plain = plain.broadcast_add(&conv.bias.reshape((1, cout, 1, 1)).unwrap()).unwrap();
            let ours = conv.forward(&x).unwrap();
            assert!(max_diff(&ours, &plain) < 1e-5, "{:?}", (b, cin, cout, h, w, k, pad));

            let temb = rand(&[b, cout], 4);
            let residual = rand(plain.dims(), 5);
            let expected =
                plain.broadcast_add(&temb.unsqueeze(2).unwrap().unsqueeze(3).unwrap()).unwrap();
            let expected = ((expected + &residual).unwrap() / 2.0).unwrap();
            let ours = conv.forward_fused(&x, Some(&temb), Some(&residual), 2.0).unwrap();
            assert!(max_diff(&ours, &expected) < 1e-5, "fused {:?}", (b, cin, cout, h, w, k));
        }
    }

    #[test]
    fn bands_and_gradients() {
        // Tall enough input to be split into several bands of rows.
        let rows = MAX_UNFOLD_BYTES / (2 * 9 * 18 * 4) * 2 + 37;
        let x = rand(&[1, 2, rows, 16], 3);
        let wt = rand(&[3, 2, 3, 3], 4);
        let ours = conv_stride1_cpu(&x, &wt, 1).unwrap();
        assert!(max_diff(&ours, &x.conv2d(&wt, 1, 1, 1, 1).unwrap()) < 1e-5);

        let x = Var::from_tensor(&rand(&[1, 2, 5, 4], 5)).unwrap();
        let wt = Var::from_tensor(&rand(&[3, 2, 3, 3], 6)).unwrap();
        let target = rand(&[1, 3, 5, 4], 7);
        let loss = |y: Tensor| (y - &target).unwrap().sqr().unwrap().sum_all().unwrap();
        let ours = loss(conv_stride1_cpu(x.as_tensor(), wt.as_tensor(), 1).unwrap());
        let theirs = loss(x.as_tensor().conv2d(wt.as_tensor(), 1, 1, 1, 1).unwrap());
        let (g1, g2) = (ours.backward().unwrap(), theirs.backward().unwrap());
        for v in [&x, &wt] {
            let d = max_diff(g1.get(v.as_tensor()).unwrap(), g2.get(v.as_tensor()).unwrap());
            assert!(d < 1e-4, "gradient differs by {d}");
        }
    }
}
