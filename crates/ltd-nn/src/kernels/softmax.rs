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
        // SAFETY: `write_row` writes the whole row.
        let out = unsafe {
            super::rows_into(x, (dim, dim), |_, src, dst| {
                let max = row_max(src);
                let dst = super::write_row(dst, src, |v| v - max);
                super::simd::exp_in_place(dst);
                let inv = (1.0 / super::run_sums(dst, |v| v)) as f32;
                dst.iter_mut().for_each(|o| *o *= inv);
            })
        };
        Ok((CpuStorage::F32(out), l.shape().clone()))
    }

    fn bwd(&self, _x: &Tensor, res: &Tensor, grad: &Tensor) -> Result<Option<Tensor>> {
        let (y, g) = (res.contiguous()?, grad.contiguous()?);
        let (yd, gd) = (super::Data::new(&y), super::Data::new(&g));
        let (ys, gs) = (yd.f32()?, gd.f32()?);
        let dim = y.dims().last().copied().unwrap_or(1).max(1);
        // SAFETY: the rows of `y`, `g` and `dx` have the same length, so the zip writes all of
        // `dst`.
        let dx = unsafe {
            super::rows_into(ys, (dim, dim), |row, yr, dst| {
                let gr = &gs[row * dim..(row + 1) * dim];
                let dot = super::dot(yr, gr);
                for ((o, &yv), &gv) in dst.iter_mut().zip(yr).zip(gr) {
                    o.write(yv * (gv - dot));
                }
            })
        };
        Ok(Some(Tensor::from_vec(dx, y.shape(), y.device())?))
    }
}

/// The largest element of `v`, NaNs skipped, as `fold(−∞, f32::max)` gives it (the maximum of
/// a set does not depend on the order it is taken in; of the two zeros either may come back,
/// and `e^(v − max)` is the same for both): eight lanes at a time where AVX2 is present. The
/// fold's chain of dependent `max`es was most of the forward pass's own time.
fn row_max(v: &[f32]) -> f32 {
    #[cfg(target_arch = "x86_64")]
    if super::simd::available() {
        // SAFETY: AVX2 checked above.
        return unsafe { row_max256(v) };
    }
    v.iter().copied().fold(f32::NEG_INFINITY, f32::max)
}

#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2,fma")]
fn row_max256(v: &[f32]) -> f32 {
    use std::arch::x86_64::*;
    // Attention rows are short (16 to 77 keys in training): one accumulator, reduced in
    // registers, then the last `len % 8` one by one.
    let mut acc = _mm256_set1_ps(f32::NEG_INFINITY);
    let chunks = v.chunks_exact(8);
    let tail = chunks.remainder();
    for c in chunks {
        // SAFETY: `c` is 8 elements. `max_ps(x, acc)` returns `acc` where `x` is NaN, so
        // `acc` holds no NaN.
        acc = _mm256_max_ps(unsafe { _mm256_loadu_ps(c.as_ptr()) }, acc);
    }
    let m = _mm_max_ps(_mm256_castps256_ps128(acc), _mm256_extractf128_ps(acc, 1));
    let m = _mm_max_ps(m, _mm_movehl_ps(m, m));
    let m = _mm_max_ss(m, _mm_shuffle_ps(m, m, 1));
    tail.iter().copied().fold(_mm_cvtss_f32(m), f32::max)
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The vector maximum against the fold on rows of every length up to 100 (the tails),
    /// with NaNs, infinities and both zeros.
    #[test]
    fn row_max_matches_the_fold() {
        let base = ltd_test_support::uniform(100, 7);
        for len in 0..=100 {
            for special in [None, Some(f32::NAN), Some(f32::INFINITY), Some(-0.0), Some(1e30)] {
                let mut v = base[..len].to_vec();
                if let (Some(x), true) = (special, len > 0) {
                    v[len * 3 / 5] = x;
                }
                let want = v.iter().copied().fold(f32::NEG_INFINITY, f32::max);
                let got = row_max(&v);
                assert!(got == want || (got.is_nan() && want.is_nan()), "{len} {special:?}");
            }
        }
    }

    /// Forward and backward against the definition in f64, rows of 1 to 77 (on two threads'
    /// worth of rows), within 1e-6 (f32 exponentials and sums of at most 77 terms).
    #[test]
    fn matches_the_definition() {
        use candle_core::{Device, Var};
        for dim in [1, 7, 16, 77] {
            let rows = 3000 / dim + 1;
            let x = ltd_test_support::uniform(rows * dim, 11);
            let g = ltd_test_support::uniform(rows * dim, 12);
            let xv = Var::from_vec(x.clone(), (rows, dim), &Device::Cpu).unwrap();
            let y = xv.as_tensor().apply_op1(SoftmaxOp).unwrap();
            let gt = Tensor::from_vec(g.clone(), (rows, dim), &Device::Cpu).unwrap();
            let grads = (&y * &gt).unwrap().sum_all().unwrap().backward().unwrap();
            let ys = y.flatten_all().unwrap().to_vec1::<f32>().unwrap();
            let dx = grads.get(&xv).unwrap().flatten_all().unwrap().to_vec1::<f32>().unwrap();
            for r in 0..rows {
                let row = &x[r * dim..(r + 1) * dim];
                let m = row.iter().fold(f64::NEG_INFINITY, |a, &b| a.max(b as f64));
                let e: Vec<f64> = row.iter().map(|&v| (v as f64 - m).exp()).collect();
                let s: f64 = e.iter().sum();
                let p: Vec<f64> = e.iter().map(|v| v / s).collect();
                let gr = &g[r * dim..(r + 1) * dim];
                let dot: f64 = p.iter().zip(gr).map(|(p, &g)| p * g as f64).sum();
                for j in 0..dim {
                    let i = r * dim + j;
                    assert!((ys[i] as f64 - p[j]).abs() < 1e-6, "y {dim} {r} {j}");
                    let want = p[j] * (gr[j] as f64 - dot);
                    assert!((dx[i] as f64 - want).abs() < 1e-6, "dx {dim} {r} {j}");
                }
            }
        }
    }
}
