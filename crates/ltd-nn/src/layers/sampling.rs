//! diffusers' `Downsample2D` (a stride-2 convolution) and `Upsample2D` (nearest-neighbour
//! ×2, or to an explicit size, then a convolution).

use candle_core::{DType, Module, Result, Tensor};
use candle_nn::VarBuilder;

use super::conv::Conv2d;
use crate::kernels::upsample::NearestUpOp;

/// `Downsample2D(use_conv=True)`: a 3×3 stride-2 convolution named `conv`.
#[derive(Debug, Clone)]
pub struct Downsample2D {
    conv: Conv2d,
    padding: usize,
}

impl Downsample2D {
    /// With `padding == 0` (the VAE encoder's `downsample_padding`), the input is first padded
    /// by one row and column at the bottom and right, as diffusers does.
    pub fn new(
        vb: VarBuilder,
        channels: usize,
        out_channels: usize,
        padding: usize,
    ) -> Result<Self> {
        Ok(Self {
            conv: Conv2d::new(vb.pp("conv"), channels, out_channels, 3, padding, 2)?,
            padding,
        })
    }
}

impl Module for Downsample2D {
    fn forward(&self, x: &Tensor) -> Result<Tensor> {
        if self.padding == 0 {
            let x = x.pad_with_zeros(3, 0, 1)?.pad_with_zeros(2, 0, 1)?;
            self.conv.forward(&x)
        } else {
            self.conv.forward(x)
        }
    }
}

/// `Upsample2D(use_conv=True)`: nearest-neighbour upsampling then a 3×3 convolution `conv`.
#[derive(Debug, Clone)]
pub struct Upsample2D {
    conv: Conv2d,
}

impl Upsample2D {
    /// Fetches `conv`.
    pub fn new(vb: VarBuilder, channels: usize, out_channels: usize) -> Result<Self> {
        Ok(Self { conv: Conv2d::new(vb.pp("conv"), channels, out_channels, 3, 1, 1)? })
    }

    /// Upsamples ×2, or to `size = (h, w)` when given (the U-Net passes the size of the skip
    /// connection when the input was not a multiple of its total downsampling factor).
    pub fn forward(&self, x: &Tensor, size: Option<(usize, usize)>) -> Result<Tensor> {
        let (_, _, h, w) = x.dims4()?;
        let (th, tw) = size.unwrap_or((2 * h, 2 * w));
        self.conv.forward(&upsample_nearest(x, th, tw)?)
    }
}

/// PyTorch's `F.interpolate(mode="nearest")` of `[B, C, H, W]` to `th × tw`: ltd's kernel for
/// f32 CPU tensors and whole factors (what `Upsample2D` asks for; its backward is one pass,
/// where candle's is a grouped convolution), candle's `upsample_nearest2d` otherwise. Both
/// give the same values.
fn upsample_nearest(x: &Tensor, th: usize, tw: usize) -> Result<Tensor> {
    let (_, _, h, w) = x.dims4()?;
    let whole = h > 0 && w > 0 && th.is_multiple_of(h) && tw.is_multiple_of(w);
    if x.device().is_cpu() && x.dtype() == DType::F32 && whole {
        let op = NearestUpOp { sh: th / h, sw: tw / w };
        let x = x.contiguous()?;
        return if x.track_op() { x.apply_op1(op) } else { x.apply_op1_no_bwd(&op) };
    }
    x.upsample_nearest2d(th, tw)
}
