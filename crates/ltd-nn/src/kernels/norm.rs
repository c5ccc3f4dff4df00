//! The fused group and layer norm passes (`torch.nn.GroupNorm`, `torch.nn.LayerNorm`) on the
//! CPU: statistics over two passes, shifted and accumulated in f64 (see `RowStats`),
//! then `(x − mean)·scale + shift` per channel, optionally followed by SiLU, which is how every
//! ResNet block uses its norms. Forwards in f32, f16 and bf16; backwards (training) in f32.

use std::sync::{Mutex, MutexGuard, PoisonError};

use candle_core::{CpuStorage, CustomOp3, DType, Layout, Result, Shape, Tensor};
use half::{bf16, f16};

use super::{contiguous, for_each_row, params_f32, row_stats, simd, Data, Elem, RowStats};

/// `torch.nn.GroupNorm` over `[B, C, …]` with per-channel weight and bias, optionally followed
/// by SiLU.
pub(crate) struct GroupNormOp {
    pub groups: usize,
    pub eps: f32,
    pub silu: bool,
    /// Each group's statistics from the forward pass, kept for the backward pass when the op
    /// is built for training ([`GroupNormOp::trainable`]): the same numbers recomputed there
    /// were two more passes over the input (2.3% of a one-thread `train-vae` step, AMD EPYC).
    saved: Option<Mutex<Vec<RowStats>>>,
}

impl GroupNormOp {
    /// For inference (no statistics kept).
    pub fn new(groups: usize, eps: f32, silu: bool) -> Self {
        Self { groups, eps, silu, saved: None }
    }

    /// For training: the forward pass keeps each group's statistics for the backward pass.
    pub fn trainable(groups: usize, eps: f32, silu: bool) -> Self {
        Self { saved: Some(Mutex::new(Vec::new())), ..Self::new(groups, eps, silu) }
    }

    fn run<T: Elem>(
        &self,
        x: &[T],
        shape: &Shape,
        w: &[f32],
        b: &[f32],
    ) -> Result<(CpuStorage, Shape)> {
        let dims = shape.dims();
        let channels = dims[1];
        let spatial: usize = dims[2..].iter().product();
        let per_group = channels / self.groups;
        let row_len = per_group * spatial;
        let mut out = vec![T::zero(); x.len()];
        if let Some(saved) = &self.saved {
            *lock(saved) = vec![RowStats::default(); x.len().checked_div(row_len).unwrap_or(0)];
        }
        for_each_row(x, &mut out, (row_len, row_len), |row, src, dst| {
            let stats = row_stats(src);
            // Rows run in parallel; each stores its statistics once (a lock per group is
            // nothing next to the group's pass).
            if let Some(saved) = &self.saved {
                lock(saved)[row] = stats;
            }
            let rstd = 1.0 / (stats.var + self.eps).sqrt();
            let first_channel = (row % self.groups) * per_group;
            for k in 0..per_group {
                let c = first_channel + k;
                // Centred first, not x·scale + (b − mean·scale): that cancels catastrophically
                // when |mean| ≫ std.
                let (scale, shift) = (w[c] * rstd, b[c]);
                let range = k * spatial..(k + 1) * spatial;
                // In runs of 64 through an f32 buffer, so that SiLU runs 8 lanes at a time.
                for (s, d) in src[range.clone()].chunks(64).zip(dst[range].chunks_mut(64)) {
                    let mut run = [0f32; 64];
                    let run = &mut run[..s.len()];
                    for (o, v) in run.iter_mut().zip(s) {
                        *o = stats.centred(v.to_f32()) * scale + shift;
                    }
                    if self.silu {
                        simd::silu_in_place(run);
                    }
                    for (o, &v) in d.iter_mut().zip(run.iter()) {
                        *o = T::from_f32(v);
                    }
                }
            }
        });
        Ok((T::to_cpu_storage_owned(out), shape.clone()))
    }
}

impl CustomOp3 for GroupNormOp {
    fn name(&self) -> &'static str {
        "ltd-group-norm"
    }

    fn cpu_fwd(
        &self,
        s1: &CpuStorage,
        l1: &Layout,
        s2: &CpuStorage,
        l2: &Layout,
        s3: &CpuStorage,
        l3: &Layout,
    ) -> Result<(CpuStorage, Shape)> {
        let (w, b) = (params_f32(s2, l2)?, params_f32(s3, l3)?);
        let shape = l1.shape();
        match s1 {
            CpuStorage::F32(_) => self.run(contiguous::<f32>(s1, l1)?, shape, &w, &b),
            CpuStorage::F16(_) => self.run(contiguous::<f16>(s1, l1)?, shape, &w, &b),
            CpuStorage::BF16(_) => self.run(contiguous::<bf16>(s1, l1)?, shape, &w, &b),
            _ => candle_core::bail!("group norm: unsupported dtype"),
        }
    }

    /// Per group of `N` values with `x̂ = (x − μ)·rstd`, `y = γ·x̂ + β` (then SiLU): `dβ = Σ dy`,
    /// `dγ = Σ dy·x̂`, and `dx = rstd·(dx̂ − mean(dx̂) − x̂·mean(dx̂·x̂))` with `dx̂ = γ·dy`; sums in
    /// f64, the per-image parameter sums added in image order (deterministic).
    fn bwd(
        &self,
        x: &Tensor,
        weight: &Tensor,
        bias: &Tensor,
        _res: &Tensor,
        grad: &Tensor,
    ) -> Result<(Option<Tensor>, Option<Tensor>, Option<Tensor>)> {
        let (x, grad) = (x.contiguous()?, grad.contiguous()?);
        let (xd, gd) = (Data::new(&x), Data::new(&grad));
        let (xs, gs) = (xd.f32()?, gd.f32()?);
        let w = weight.to_dtype(DType::F32)?.to_vec1::<f32>()?;
        let b = bias.to_dtype(DType::F32)?.to_vec1::<f32>()?;
        let dims = x.dims();
        let channels = dims[1];
        let spatial: usize = dims[2..].iter().product();
        let per_group = channels / self.groups;
        let row_len = per_group * spatial;
        let rows = xs.len() / row_len.max(1);
        // The forward pass's statistics of this input (taken: a second backward through the
        // same op recomputes them, as does an op built without them); the same numbers.
        let saved = self.saved.as_ref().map(|m| std::mem::take(&mut *lock(m)));
        let saved = saved.filter(|s| s.len() == rows);
        // Each row's channels' dγ, then dβ, stored once per row under the lock; `dx` goes
        // straight to its own buffer (a buffer of both, copied apart, was one more pass).
        let dparams = Mutex::new(vec![0f32; rows * 2 * per_group]);
        let mut dx = vec![0f32; xs.len()];
        for_each_row(xs, &mut dx, (row_len, row_len), |row, src, dx| {
            let g = &gs[row * row_len..(row + 1) * row_len];
            let stats = saved.as_ref().map_or_else(|| row_stats(src), |s| s[row]);
            let rstd = 1.0 / (stats.var + self.eps).sqrt();
            let first_channel = (row % self.groups) * per_group;
            let mut params = vec![0f32; 2 * per_group];
            // `dx̂ = γ·dy` is constant in γ per channel, so its sums are γ times dy's.
            let (mut sum_dxh, mut sum_dxh_xh) = (0f64, 0f64);
            for k in 0..per_group {
                let c = first_channel + k;
                let range = k * spatial..(k + 1) * spatial;
                let (dbeta, dgamma) = channel_grads(
                    (&src[range.clone()], &g[range.clone()], &mut dx[range]),
                    (stats, rstd),
                    (w[c], b[c]),
                    self.silu,
                );
                params[k] = dgamma as f32;
                params[per_group + k] = dbeta as f32;
                sum_dxh += w[c] as f64 * dbeta;
                sum_dxh_xh += w[c] as f64 * dgamma;
            }
            let n = row_len.max(1) as f64;
            let (m1, m2) = ((sum_dxh / n) as f32, (sum_dxh_xh / n) as f32);
            for (o, &v) in dx.iter_mut().zip(src) {
                let xh = stats.centred(v) * rstd;
                *o = rstd * (*o - m1 - xh * m2);
            }
            let mut all = lock(&dparams);
            all[row * 2 * per_group..(row + 1) * 2 * per_group].copy_from_slice(&params);
        });
        let dparams = dparams.into_inner().unwrap_or_else(PoisonError::into_inner);
        let (mut dgamma, mut dbeta) = (vec![0f64; channels], vec![0f64; channels]);
        for (row, chunk) in dparams.chunks_exact(2 * per_group).enumerate() {
            let first_channel = (row % self.groups) * per_group;
            for k in 0..per_group {
                dgamma[first_channel + k] += chunk[k] as f64;
                dbeta[first_channel + k] += chunk[per_group + k] as f64;
            }
        }
        let dev = x.device();
        let params = |v: Vec<f64>| {
            Tensor::from_vec(v.into_iter().map(|v| v as f32).collect::<Vec<_>>(), channels, dev)
        };
        Ok((
            Some(Tensor::from_vec(dx, x.shape(), dev)?),
            Some(params(dgamma)?),
            Some(params(dbeta)?),
        ))
    }
}

/// One channel of the group norm's backward: from its inputs `x`, the output gradient `g` and
/// the group's statistics, stores `dx̂ = γ·dy` (with `dy` the gradient before the fused SiLU)
/// and returns `(Σ dy, Σ dy·x̂)`, summed in f32 over runs of 64 (8 lanes where AVX2/FMA are
/// present) and in f64 across runs.
fn channel_grads(
    (x, g, dxh): (&[f32], &[f32], &mut [f32]),
    (stats, rstd): (RowStats, f32),
    (gamma, beta): (f32, f32),
    silu: bool,
) -> (f64, f64) {
    let (mut dbeta, mut dgamma) = (0f64, 0f64);
    for ((x, g), dxh) in x.chunks(64).zip(g.chunks(64)).zip(dxh.chunks_mut(64)) {
        let mut done = 0;
        let (mut run_beta, mut run_gamma) = (0f32, 0f32);
        #[cfg(target_arch = "x86_64")]
        if simd::available() {
            // SAFETY: AVX2/FMA checked above.
            (done, run_beta, run_gamma) =
                unsafe { run_grads_avx2((x, g, dxh), (stats, rstd), (gamma, beta), silu) };
        }
        for ((o, &v), &gv) in dxh[done..].iter_mut().zip(&x[done..]).zip(&g[done..]) {
            let xh = stats.centred(v) * rstd;
            let dy = if silu {
                let y = xh * gamma + beta;
                let sig = 1.0 / (1.0 + (-y).exp());
                gv * sig * (1.0 + y * (1.0 - sig))
            } else {
                gv
            };
            run_beta += dy;
            run_gamma += dy * xh;
            *o = dy * gamma;
        }
        dbeta += run_beta as f64;
        dgamma += run_gamma as f64;
    }
    (dbeta, dgamma)
}

/// `m`'s lock; a panic elsewhere while it was held leaves only whole values behind, so a
/// poisoned lock is taken as it is.
fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    m.lock().unwrap_or_else(PoisonError::into_inner)
}

/// The 8-lane part of one run of [`channel_grads`]: returns how many elements it did and
/// their two sums.
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2,fma")]
fn run_grads_avx2(
    (x, g, dxh): (&[f32], &[f32], &mut [f32]),
    (stats, rstd): (RowStats, f32),
    (gamma, beta): (f32, f32),
    silu: bool,
) -> (usize, f32, f32) {
    use std::arch::x86_64::*;
    let n = x.len() / 8 * 8;
    let (pivot, delta) = (_mm256_set1_ps(stats.pivot), _mm256_set1_ps(stats.delta));
    let (rstd, gamma, beta) = (_mm256_set1_ps(rstd), _mm256_set1_ps(gamma), _mm256_set1_ps(beta));
    let one = _mm256_set1_ps(1.0);
    let (mut sum_beta, mut sum_gamma) = (_mm256_setzero_ps(), _mm256_setzero_ps());
    for i in (0..n).step_by(8) {
        // SAFETY: `i + 8 ≤ n ≤` the length of `x`, `g` and `dxh` (the same).
        unsafe {
            let v = _mm256_loadu_ps(x.as_ptr().add(i));
            let xh = _mm256_mul_ps(_mm256_sub_ps(_mm256_sub_ps(v, pivot), delta), rstd);
            let mut dy = _mm256_loadu_ps(g.as_ptr().add(i));
            if silu {
                let y = _mm256_fmadd_ps(xh, gamma, beta);
                let e = simd::exp256(_mm256_sub_ps(_mm256_setzero_ps(), y));
                let sig = _mm256_div_ps(one, _mm256_add_ps(one, e));
                let d = _mm256_fmadd_ps(y, _mm256_sub_ps(one, sig), one);
                dy = _mm256_mul_ps(_mm256_mul_ps(dy, sig), d);
            }
            sum_beta = _mm256_add_ps(sum_beta, dy);
            sum_gamma = _mm256_fmadd_ps(dy, xh, sum_gamma);
            _mm256_storeu_ps(dxh.as_mut_ptr().add(i), _mm256_mul_ps(dy, gamma));
        }
    }
    (n, simd::hsum256(sum_beta), simd::hsum256(sum_gamma))
}

/// `torch.nn.LayerNorm` over the last dimension with weight and bias.
pub(crate) struct LayerNormOp {
    pub eps: f32,
}

impl LayerNormOp {
    fn run<T: Elem>(
        &self,
        x: &[T],
        shape: &Shape,
        w: &[f32],
        b: &[f32],
    ) -> Result<(CpuStorage, Shape)> {
        let dim = w.len();
        if shape.dims().last() != Some(&dim) {
            candle_core::bail!("layer norm over {dim} features got input {shape:?}")
        }
        let mut out = vec![T::zero(); x.len()];
        for_each_row(x, &mut out, (dim, dim), |_, src, dst| {
            let stats = row_stats(src);
            let rstd = 1.0 / (stats.var + self.eps).sqrt();
            for ((o, v), (w, b)) in dst.iter_mut().zip(src).zip(w.iter().zip(b)) {
                *o = T::from_f32(stats.centred(v.to_f32()) * rstd * w + b);
            }
        });
        Ok((T::to_cpu_storage_owned(out), shape.clone()))
    }
}

impl CustomOp3 for LayerNormOp {
    fn name(&self) -> &'static str {
        "ltd-layer-norm"
    }

    fn cpu_fwd(
        &self,
        s1: &CpuStorage,
        l1: &Layout,
        s2: &CpuStorage,
        l2: &Layout,
        s3: &CpuStorage,
        l3: &Layout,
    ) -> Result<(CpuStorage, Shape)> {
        let (w, b) = (params_f32(s2, l2)?, params_f32(s3, l3)?);
        let shape = l1.shape();
        match s1 {
            CpuStorage::F32(_) => self.run(contiguous::<f32>(s1, l1)?, shape, &w, &b),
            CpuStorage::F16(_) => self.run(contiguous::<f16>(s1, l1)?, shape, &w, &b),
            CpuStorage::BF16(_) => self.run(contiguous::<bf16>(s1, l1)?, shape, &w, &b),
            _ => candle_core::bail!("layer norm: unsupported dtype"),
        }
    }

    /// Per row with `x̂ = (x − μ)·rstd`: `dx = rstd·(dx̂ − mean(dx̂) − x̂·mean(dx̂·x̂))`,
    /// `dx̂ = γ·dy`; `dγ = Σ dy·x̂` and `dβ = Σ dy` over rows, summed in row order in f64.
    fn bwd(
        &self,
        x: &Tensor,
        weight: &Tensor,
        _bias: &Tensor,
        _res: &Tensor,
        grad: &Tensor,
    ) -> Result<(Option<Tensor>, Option<Tensor>, Option<Tensor>)> {
        let (x, grad) = (x.contiguous()?, grad.contiguous()?);
        let (xd, gd) = (Data::new(&x), Data::new(&grad));
        let (xs, gs) = (xd.f32()?, gd.f32()?);
        let w = weight.to_dtype(DType::F32)?.to_vec1::<f32>()?;
        let dim = w.len().max(1);
        let rstd_of = |row: &[f32]| {
            let stats = row_stats(row);
            (stats, 1.0 / (stats.var + self.eps).sqrt())
        };
        let mut dx = vec![0f32; xs.len()];
        for_each_row(xs, &mut dx, (dim, dim), |row, src, dst| {
            let g = &gs[row * dim..(row + 1) * dim];
            let (stats, rstd) = rstd_of(src);
            let (mut m1, mut m2) = (0f64, 0f64);
            for (((o, &v), &gv), &wv) in dst.iter_mut().zip(src).zip(g).zip(&w) {
                let xh = stats.centred(v) * rstd;
                *o = gv * wv;
                m1 += *o as f64;
                m2 += (*o * xh) as f64;
            }
            let (m1, m2) = ((m1 / dim as f64) as f32, (m2 / dim as f64) as f32);
            for (o, &v) in dst.iter_mut().zip(src) {
                let xh = stats.centred(v) * rstd;
                *o = rstd * (*o - m1 - xh * m2);
            }
        });
        let (mut dgamma, mut dbeta) = (vec![0f64; dim], vec![0f64; dim]);
        for (src, g) in xs.chunks_exact(dim).zip(gs.chunks_exact(dim)) {
            let (stats, rstd) = rstd_of(src);
            for (j, (&v, &gv)) in src.iter().zip(g).enumerate() {
                dgamma[j] += (gv * stats.centred(v) * rstd) as f64;
                dbeta[j] += gv as f64;
            }
        }
        let dev = x.device();
        let params = |v: Vec<f64>| {
            Tensor::from_vec(v.into_iter().map(|v| v as f32).collect::<Vec<_>>(), dim, dev)
        };
        Ok((
            Some(Tensor::from_vec(dx, x.shape(), dev)?),
            Some(params(dgamma)?),
            Some(params(dbeta)?),
        ))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use candle_core::{Device, Var};

    /// The backward pass from the forward pass's saved statistics gives the bits of the one
    /// that recomputes them, for every gradient: groups of different means and spreads (each
    /// row's own statistics matter), with and without the fused SiLU, on the default threads
    /// (rows in parallel store their statistics) and a wrong saved row would change them.
    #[test]
    fn saved_statistics_give_the_recomputed_gradients() {
        let dev = Device::Cpu;
        let (b, c, h, w, groups) = (3, 8, 5, 7, 4);
        let n = b * c * h * w;
        let xv: Vec<f32> = ltd_test_support::uniform(n, 1)
            .iter()
            .enumerate()
            .map(|(i, v)| v * (1.0 + (i / (h * w * 2)) as f32) + (i / (h * w * 2)) as f32)
            .collect();
        let x = Var::from_vec(xv, (b, c, h, w), &dev).unwrap();
        let weight = Var::from_vec(ltd_test_support::uniform(c, 2), c, &dev).unwrap();
        let bias = Var::from_vec(ltd_test_support::uniform(c, 3), c, &dev).unwrap();
        let g = Tensor::from_vec(ltd_test_support::uniform(n, 4), (b, c, h, w), &dev).unwrap();
        for silu in [false, true] {
            let grads = |op: GroupNormOp| {
                let y = x.as_tensor().apply_op3(weight.as_tensor(), bias.as_tensor(), op).unwrap();
                let grads = (y * &g).unwrap().sum_all().unwrap().backward().unwrap();
                [x.as_tensor(), weight.as_tensor(), bias.as_tensor()]
                    .map(|t| grads.get(t).unwrap().flatten_all().unwrap().to_vec1::<f32>().unwrap())
            };
            let saved = grads(GroupNormOp::trainable(groups, 1e-5, silu));
            let recomputed = grads(GroupNormOp::new(groups, 1e-5, silu));
            assert_eq!(saved, recomputed, "silu {silu}");
        }
    }
}
