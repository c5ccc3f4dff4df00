//! The row softmax over the last dimension with a backward pass of its own, for attention under
//! autograd on the CPU in f32 (training): candle's fused softmax records no backward pass.

use candle_core::{CpuStorage, CustomOp1, Layout, Result, Shape, Tensor};

/// Row softmax of contiguous f32 rows, `exp(x − max) / Σ`, differentiable: with `y` the result,
/// `dx = y ⊙ (dy − Σ dy ⊙ y)` per row. The exponentials 8 lanes at a time, sums as
/// `RowStats`' are taken (f32 lanes over runs of 64, f64 across runs).
pub(crate) struct SoftmaxOp;

impl CustomOp1 for SoftmaxOp {
    fn name(&self) -> &'static str {
        "ltd-softmax"
    }

    fn cpu_fwd(&self, s: &CpuStorage, l: &Layout) -> Result<(CpuStorage, Shape)> {
        let x = super::contiguous::<f32>(s, l)?;
        let dim = l.dims().last().copied().unwrap_or(1).max(1);
        let mut out = vec![0f32; x.len()];
        super::for_each_row(x, &mut out, (dim, dim), |_, src, dst| {
            let max = src.iter().copied().fold(f32::NEG_INFINITY, f32::max);
            for (o, &v) in dst.iter_mut().zip(src) {
                *o = v - max;
            }
            super::simd::exp_in_place(dst);
            let inv = (1.0 / super::run_sums(dst, |v| v)) as f32;
            dst.iter_mut().for_each(|o| *o *= inv);
        });
        Ok((CpuStorage::F32(out), l.shape().clone()))
    }

    fn bwd(&self, _x: &Tensor, res: &Tensor, grad: &Tensor) -> Result<Option<Tensor>> {
        let (y, g) = (res.contiguous()?, grad.contiguous()?);
        let (yd, gd) = (super::Data::new(&y), super::Data::new(&g));
        let (ys, gs) = (yd.f32()?, gd.f32()?);
        let dim = y.dims().last().copied().unwrap_or(1).max(1);
        let mut dx = vec![0f32; ys.len()];
        super::for_each_row(ys, &mut dx, (dim, dim), |row, yr, dst| {
            let gr = &gs[row * dim..(row + 1) * dim];
            let dot = super::dot(yr, gr);
            for ((o, &yv), &gv) in dst.iter_mut().zip(yr).zip(gr) {
                *o = yv * (gv - dot);
            }
        });
        Ok(Some(Tensor::from_vec(dx, y.shape(), y.device())?))
    }
}
