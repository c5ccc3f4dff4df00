//! `torch.nn.Conv2d` with a square kernel and bias, initialised for training as PyTorch
//! initialises it. On the CPU, stride-1 convolutions run `kernels/conv2d.rs` (with the ResNet
//! block's time embedding and residual added as the output is written), under autograd too;
//! otherwise candle's convolution. 3×3 convolutions with at least 32 channels each way run
//! Winograd's `F(4×4, 3×3)` (`kernels/winograd.rs`, 4× fewer multiplies), in training (forward
//! and input gradient) as in inference: measured on the 2-core AMD EPYC (AVX2) it takes
//! 0.4–0.6× the direct kernel's time on every SD 1.5 U-Net and VAE shape and 0.4–0.8× on the
//! training recipes' 32–256 channels, and every parity test of the workspace passes with it at
//! its unchanged tolerance. Below 32 channels the two are level (the tiny models), and the
//! direct kernel's rounding is the closer one. `LTD_WINOGRAD=off` selects the direct kernel for
//! every convolution (to compare).

use candle_core::{DType, Module, Result, Tensor};
use candle_nn::VarBuilder;

use super::linear::{rows_times_weight, torch_default_init, widen_on_cpu};
use crate::kernels::conv2d::{self, Conv2dTrainOp, ConvShape, Epilogue};
use crate::kernels::im2col;
use crate::kernels::Data;

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
        let extras_plain = channel_add.is_none_or(crate::kernels::plain_f32)
            && residual.is_none_or(|r| crate::kernels::plain_f32(r) && r.is_contiguous());
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

    /// ltd's CPU kernels, when they apply: a convolution of CPU tensors outside any autograd
    /// graph, stride 1 (`kernels/conv2d.rs`, which unfolds small shapes by `kernels/im2col.rs`,
    /// or Winograd's) or strided without extra terms (`kernels/im2col.rs`). Half-precision inputs are computed in f32
    /// and rounded once, as PyTorch's CPU kernels do.
    fn forward_cpu(
        &self,
        x: &Tensor,
        channel_add: Option<&Tensor>,
        residual: Option<&Tensor>,
        scale: f64,
    ) -> Result<Option<Tensor>> {
        let tracked = x.track_op() || self.weight.track_op() || self.bias.track_op();
        if !x.device().is_cpu() || self.stride == 0 || tracked || !x.dtype().is_float() {
            return Ok(None);
        }
        let (batch, cin, h, w) = x.dims4()?;
        let (cout, cin_w, k, k2) = self.weight.dims4()?;
        let shape = ConvShape { batch, cin, h, w, cout, k, pad: self.padding };
        if cin_w != cin || k != k2 || !shape.valid() {
            return Ok(None);
        }
        if self.stride != 1 {
            if channel_add.is_some() || residual.is_some() || scale != 1.0 {
                return Ok(None);
            }
            let (hout, wout) = im2col::out_hw(shape, self.stride);
            let f32c = |t: &Tensor| t.to_dtype(DType::F32)?.contiguous();
            let (x32, w32, b32) = (f32c(x)?, f32c(&self.weight)?, f32c(&self.bias)?);
            let (xd, wd, bd) = (Data::new(&x32), Data::new(&w32), Data::new(&b32));
            let epi = Epilogue { bias: bd.f32()?, channel_add: None, residual: None, scale: 1.0 };
            let out = im2col::conv(xd.f32()?, wd.f32()?, shape, self.stride, epi);
            let y = Tensor::from_vec(out, (batch, cout, hout, wout), x.device())?;
            return Ok(Some(y.to_dtype(x.dtype())?));
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
        let (xd, wd, bd) = (Data::new(&x32), Data::new(&w32), Data::new(&b32));
        let (cd, rd) = (channel_add.map(Data::new), residual.map(Data::new));
        let epi = Epilogue {
            bias: bd.f32()?,
            channel_add: cd.as_ref().map(|d| d.f32()).transpose()?,
            residual: rd.as_ref().map(|d| d.f32()).transpose()?,
            scale: scale as f32,
        };
        let out = conv2d::conv2d(xd.f32()?, wd.f32()?, shape, epi);
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
        if cpu && x.dtype() == DType::F32 && w.dtype() == DType::F32 {
            if let Some(op) = Conv2dTrainOp::new(&x, &w, self.padding, self.stride)? {
                let b = b.to_dtype(DType::F32)?;
                return x.contiguous()?.apply_op3(&w.contiguous()?, &b, op)?.to_dtype(dtype);
            }
        }
        let y = x.conv2d(&w, self.padding, self.stride, 1, 1)?;
        y.broadcast_add(&b.reshape((1, c, 1, 1))?)?.to_dtype(dtype)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use candle_core::Var;

    use ltd_test_support::rand;

    fn max_diff(a: &Tensor, b: &Tensor) -> f32 {
        let d = (a - b).unwrap().abs().unwrap();
        d.flatten_all().unwrap().max(0).unwrap().to_scalar::<f32>().unwrap()
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
            // The register-blocked 3×3 kernel: a long sum over 40 input channels, and 13 and 7
            // output channels split into uneven tiles (5 + 4 + 4, 4 + 3).
            (2, 40, 13, 11, 17, 3, 1),
            (1, 24, 7, 9, 23, 3, 1),
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

    /// Strided convolutions (the downsamplers) run the im2col kernel outside autograd and give
    /// candle's convolution plus the bias, also in f16 (computed in f32, rounded once); with
    /// extra terms they take the composed path, which adds them the same way.
    #[test]
    fn strided_convolution_equals_candles() {
        for &(b, cin, cout, h, w, k, pad, stride) in
            &[(2, 3, 5, 8, 8, 3, 1, 2), (1, 32, 64, 9, 7, 3, 0, 2), (2, 4, 4, 6, 6, 3, 1, 3)]
        {
            let case = (b, cin, cout, h, w, k, pad, stride);
            let x = rand(&[b, cin, h, w], 1);
            let conv = Conv2d {
                weight: rand(&[cout, cin, k, k], 2),
                bias: rand(&[cout], 3),
                padding: pad,
                stride,
            };
            let plain = x.conv2d(&conv.weight, pad, stride, 1, 1).unwrap();
            let plain = plain.broadcast_add(&conv.bias.reshape((1, cout, 1, 1)).unwrap()).unwrap();
            let ours = conv.forward(&x).unwrap();
            assert_eq!(ours.dims(), plain.dims(), "{case:?}");
            assert!(max_diff(&ours, &plain) < 1e-5, "{case:?}");
            // f16: the f32 result of the f16 inputs, rounded once to f16 (half an ulp of
            // outputs below 16 is under 4e-3).
            let f16 = |t: &Tensor| t.to_dtype(DType::F16).unwrap();
            let f32 = |t: &Tensor| t.to_dtype(DType::F32).unwrap();
            let half = Conv2d { weight: f16(&conv.weight), bias: f16(&conv.bias), ..conv.clone() };
            let ours = half.forward(&f16(&x)).unwrap();
            assert_eq!(ours.dtype(), DType::F16);
            let wide = f32(&f16(&x)).conv2d(&f32(&half.weight), pad, stride, 1, 1).unwrap();
            let wide = wide.broadcast_add(&f32(&half.bias).reshape((1, cout, 1, 1)).unwrap());
            assert!(max_diff(&f32(&ours), &wide.unwrap()) < 4e-3, "f16 {case:?}");

            let temb = rand(&[b, cout], 4);
            let expected =
                plain.broadcast_add(&temb.unsqueeze(2).unwrap().unsqueeze(3).unwrap()).unwrap();
            let ours = conv.forward_fused(&x, Some(&temb), None, 1.0).unwrap();
            assert!(max_diff(&ours, &expected) < 1e-5, "fused {case:?}");
        }
    }

    /// Under autograd the convolution runs ltd's kernels forwards and its own backward: values
    /// and the gradients of input, weight and bias equal candle's convolution's.
    #[test]
    fn training_convolution_and_its_gradients_equal_candles() {
        // Batches, 1×1 / 3×3 / 5×5 kernels, no padding and more, several bands of rows and
        // split output channels (the 300-row and 130-channel cases), unfolded shapes, and
        // strided ones (the downsamplers).
        for &(b, cin, cout, h, w, k, pad, stride) in &[
            (2, 3, 5, 7, 6, 3, 1, 1),
            (1, 4, 130, 5, 9, 1, 0, 1),
            (2, 2, 3, 6, 4, 3, 0, 1),
            (1, 3, 4, 4, 5, 5, 2, 1),
            (3, 2, 3, 5, 5, 3, 2, 1),
            (1, 8, 16, 300, 12, 3, 1, 1),
            // Unfolded over the batch (`im2col::pays`): 4×4 pixels forwards and for the weight
            // gradient, an input gradient of 4×4 pixels, and 3 input channels.
            (3, 5, 16, 4, 4, 3, 1, 1),
            (2, 24, 16, 3, 5, 3, 1, 1),
            (2, 3, 20, 9, 7, 3, 1, 1),
            // Winograd's kernel forwards and for the input gradient (32 and 40 channels).
            (2, 32, 40, 8, 7, 3, 1, 1),
            // Stride 2 with padding 1 and 0, odd sizes, stride 3, and a 1×1 kernel. (candle's
            // own backward fails where the stride does not reach the last row or column, so
            // those shapes are checked against the definition in `kernels/im2col.rs`.)
            (2, 5, 16, 8, 8, 3, 1, 2),
            (3, 4, 6, 9, 7, 3, 0, 2),
            (1, 3, 5, 10, 13, 3, 1, 3),
            (2, 6, 4, 7, 5, 1, 0, 2),
        ] {
            let case = (b, cin, cout, h, w, k, pad, stride);
            let x = Var::from_tensor(&rand(&[b, cin, h, w], 1)).unwrap();
            let conv = Conv2d {
                weight: Var::from_tensor(&rand(&[cout, cin, k, k], 2)).unwrap().as_tensor().clone(),
                bias: Var::from_tensor(&rand(&[cout], 3)).unwrap().as_tensor().clone(),
                padding: pad,
                stride,
            };
            let ours = conv.forward(x.as_tensor()).unwrap();
            let theirs = x
                .as_tensor()
                .conv2d(&conv.weight, pad, stride, 1, 1)
                .unwrap()
                .broadcast_add(&conv.bias.reshape((1, cout, 1, 1)).unwrap())
                .unwrap();
            assert_eq!(ours.dims(), theirs.dims(), "{case:?}");
            // Winograd's transforms round differently from a direct sum: 1e-4 relative to the
            // largest value, as `kernels/winograd.rs` bounds it; elsewhere 1e-5 (absolute for
            // the values, as before Winograd ran here; relative for the gradients).
            let shape = ConvShape { batch: b, cin, h, w, cout, k, pad };
            let winograd = stride == 1 && conv2d::winograd_suits(shape);
            let rel = if winograd { 1e-4 } else { 1e-5 };
            let peak = |t: &Tensor| {
                let m = t.abs().unwrap().flatten_all().unwrap().max(0).unwrap();
                m.to_scalar::<f32>().unwrap()
            };
            let d = max_diff(&ours, &theirs);
            let tol = if winograd { rel * (1.0 + peak(&theirs)) } else { 1e-5 };
            assert!(d < tol, "values differ by {d} {case:?}");
            // A loss whose gradient differs per element.
            let target = rand(ours.dims(), 7);
            let loss = |y: &Tensor| (y - &target).unwrap().sqr().unwrap().sum_all().unwrap();
            let (g1, g2) = (loss(&ours).backward().unwrap(), loss(&theirs).backward().unwrap());
            for (name, v) in
                [("input", x.as_tensor()), ("weight", &conv.weight), ("bias", &conv.bias)]
            {
                let (a, e) = (g1.get(v).unwrap(), g2.get(v).unwrap());
                let tol = rel * (1.0 + peak(e));
                let d = max_diff(a, e);
                assert!(d < tol, "{name} gradient differs by {d} (tolerance {tol}) {case:?}");
            }
        }
    }
}
