//! Group and layer normalisation (`torch.nn.GroupNorm`, `torch.nn.LayerNorm`).
//!
//! On the CPU in inference, each is one fused pass (statistics over two passes, shifted and
//! accumulated in f64, then `(x − mean)·scale + shift` per channel, optionally followed by
//! SiLU, which is how every ResNet block uses its norms) instead of a dozen tensor ops. Under
//! autograd on the CPU in f32 (training) the same pass runs with a fused backward pass of its
//! own; on other devices the same math runs as ordinary (differentiable) tensor ops in f32.

use candle_core::{CpuStorage, CustomOp3, DType, Layout, Result, Shape, Tensor};
use candle_nn::{Init, VarBuilder};
use half::{bf16, f16};

use super::cpu::{contiguous, for_each_row, params_f32, row_stats, Data, Elem};

/// Whether the fused CPU kernel may run: no autograd graph to record and a CPU tensor.
fn fused_ok(x: &Tensor, weight: &Tensor, bias: &Tensor) -> bool {
    x.device().is_cpu()
        && !x.track_op()
        && !weight.track_op()
        && !bias.track_op()
        && matches!(x.dtype(), DType::F32 | DType::F16 | DType::BF16)
}

/// Whether the fused CPU kernel may run under autograd (it has a backward pass for f32).
fn trainable_ok(x: &Tensor, weight: &Tensor, bias: &Tensor) -> bool {
    x.device().is_cpu() && [x, weight, bias].iter().all(|t| t.dtype() == DType::F32)
}

#[inline(always)]
fn silu(v: f32) -> f32 {
    v / (1.0 + (-v).exp())
}

/// `torch.nn.GroupNorm(num_groups, num_channels, eps, affine=True)` over `[B, C, …]`.
#[derive(Debug, Clone)]
pub struct GroupNorm {
    weight: Tensor,
    bias: Tensor,
    num_groups: usize,
    eps: f64,
}

impl GroupNorm {
    /// Fetches `weight` and `bias` (`[num_channels]`).
    pub fn new(vb: VarBuilder, num_groups: usize, num_channels: usize, eps: f64) -> Result<Self> {
        if num_groups == 0 || num_channels % num_groups != 0 {
            candle_core::bail!(
                "{}: GroupNorm needs num_groups ({num_groups}) to divide num_channels \
                 ({num_channels})",
                vb.prefix()
            )
        }
        let weight = vb.get_with_hints(num_channels, "weight", Init::Const(1.0))?;
        let bias = vb.get_with_hints(num_channels, "bias", Init::Const(0.0))?;
        Ok(Self { weight, bias, num_groups, eps })
    }

    /// The normalised input.
    pub fn forward(&self, x: &Tensor) -> Result<Tensor> {
        self.run(x, false)
    }

    /// `silu(norm(x))`, fused on the CPU.
    pub fn forward_silu(&self, x: &Tensor) -> Result<Tensor> {
        self.run(x, true)
    }

    fn run(&self, x: &Tensor, with_silu: bool) -> Result<Tensor> {
        let dims = x.dims();
        if dims.len() < 2 || dims[1] != self.weight.dim(0)? {
            candle_core::bail!(
                "GroupNorm over {} channels got input {:?}",
                self.weight.dim(0)?,
                x.shape()
            )
        }
        let op = GroupNormOp { groups: self.num_groups, eps: self.eps as f32, silu: with_silu };
        if fused_ok(x, &self.weight, &self.bias) {
            return x.contiguous()?.apply_op3_no_bwd(&self.weight, &self.bias, &op);
        }
        if trainable_ok(x, &self.weight, &self.bias) {
            return x.contiguous()?.apply_op3(&self.weight, &self.bias, op);
        }
        let y = self.composite(x)?;
        if with_silu {
            y.silu()
        } else {
            Ok(y)
        }
    }

    fn composite(&self, x: &Tensor) -> Result<Tensor> {
        let dtype = x.dtype();
        let shape = x.shape().clone();
        let (b, c) = (shape.dims()[0], shape.dims()[1]);
        let x = x.to_dtype(DType::F32)?.reshape((b, self.num_groups, ()))?;
        let mean = x.mean_keepdim(2)?;
        let x = x.broadcast_sub(&mean)?;
        let var = x.sqr()?.mean_keepdim(2)?;
        let x = x.broadcast_div(&(var + self.eps)?.sqrt()?)?.reshape(&shape)?;
        let mut param_shape = vec![1; shape.rank()];
        param_shape[1] = c;
        let w = self.weight.to_dtype(DType::F32)?.reshape(param_shape.as_slice())?;
        let bias = self.bias.to_dtype(DType::F32)?.reshape(param_shape.as_slice())?;
        x.broadcast_mul(&w)?.broadcast_add(&bias)?.to_dtype(dtype)
    }
}

struct GroupNormOp {
    groups: usize,
    eps: f32,
    silu: bool,
}

impl GroupNormOp {
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
        for_each_row(x, &mut out, (row_len, row_len), |row, src, dst| {
            let stats = row_stats(src);
            let rstd = 1.0 / (stats.var + self.eps).sqrt();
            let first_channel = (row % self.groups) * per_group;
            for k in 0..per_group {
                let c = first_channel + k;
                // Centred first, not x·scale + (b − mean·scale): that cancels catastrophically
                // when |mean| ≫ std.
                let (scale, shift) = (w[c] * rstd, b[c]);
                let range = k * spatial..(k + 1) * spatial;
                let (s, d) = (&src[range.clone()], &mut dst[range]);
                if self.silu {
                    for (o, v) in d.iter_mut().zip(s) {
                        *o = T::from_f32(silu(stats.centred(v.to_f32()) * scale + shift));
                    }
                } else {
                    for (o, v) in d.iter_mut().zip(s) {
                        *o = T::from_f32(stats.centred(v.to_f32()) * scale + shift);
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
        // Each row: the group's `dx`, then its channels' dγ and dβ.
        let out_len = row_len + 2 * per_group;
        let rows = xs.len() / row_len.max(1);
        let mut out = vec![0f32; rows * out_len];
        for_each_row(xs, &mut out, (row_len, out_len), |row, src, dst| {
            let g = &gs[row * row_len..(row + 1) * row_len];
            let stats = row_stats(src);
            let rstd = 1.0 / (stats.var + self.eps).sqrt();
            let first_channel = (row % self.groups) * per_group;
            let (dx, dparams) = dst.split_at_mut(row_len);
            let (mut sum_dxh, mut sum_dxh_xh) = (0f64, 0f64);
            for k in 0..per_group {
                let c = first_channel + k;
                let range = k * spatial..(k + 1) * spatial;
                let (mut dgamma, mut dbeta) = (0f64, 0f64);
                for ((o, &v), &gv) in
                    dx[range.clone()].iter_mut().zip(&src[range.clone()]).zip(&g[range])
                {
                    let xh = stats.centred(v) * rstd;
                    let dy = if self.silu {
                        let y = xh * w[c] + b[c];
                        let sig = 1.0 / (1.0 + (-y).exp());
                        gv * sig * (1.0 + y * (1.0 - sig))
                    } else {
                        gv
                    };
                    dbeta += dy as f64;
                    dgamma += (dy * xh) as f64;
                    let dxh = dy * w[c];
                    sum_dxh += dxh as f64;
                    sum_dxh_xh += (dxh * xh) as f64;
                    *o = dxh;
                }
                dparams[k] = dgamma as f32;
                dparams[per_group + k] = dbeta as f32;
            }
            let n = row_len.max(1) as f64;
            let (m1, m2) = ((sum_dxh / n) as f32, (sum_dxh_xh / n) as f32);
            for (o, &v) in dx.iter_mut().zip(src) {
                let xh = stats.centred(v) * rstd;
                *o = rstd * (*o - m1 - xh * m2);
            }
        });
        let mut dx = Vec::with_capacity(xs.len());
        let (mut dgamma, mut dbeta) = (vec![0f64; channels], vec![0f64; channels]);
        for (row, chunk) in out.chunks_exact(out_len).enumerate() {
            dx.extend_from_slice(&chunk[..row_len]);
            let first_channel = (row % self.groups) * per_group;
            for k in 0..per_group {
                dgamma[first_channel + k] += chunk[row_len + k] as f64;
                dbeta[first_channel + k] += chunk[row_len + per_group + k] as f64;
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

/// `torch.nn.LayerNorm(dim, eps, elementwise_affine=True)` over the last dimension.
#[derive(Debug, Clone)]
pub struct LayerNorm {
    weight: Tensor,
    bias: Tensor,
    eps: f64,
}

impl LayerNorm {
    /// Fetches `weight` and `bias` (`[dim]`).
    pub fn new(vb: VarBuilder, dim: usize, eps: f64) -> Result<Self> {
        let weight = vb.get_with_hints(dim, "weight", Init::Const(1.0))?;
        let bias = vb.get_with_hints(dim, "bias", Init::Const(0.0))?;
        Ok(Self { weight, bias, eps })
    }

    /// The normalised input.
    pub fn forward(&self, x: &Tensor) -> Result<Tensor> {
        let op = LayerNormOp { eps: self.eps as f32 };
        if fused_ok(x, &self.weight, &self.bias) {
            return x.contiguous()?.apply_op3_no_bwd(&self.weight, &self.bias, &op);
        }
        if trainable_ok(x, &self.weight, &self.bias) {
            return x.contiguous()?.apply_op3(&self.weight, &self.bias, op);
        }
        self.composite(x)
    }

    fn composite(&self, x: &Tensor) -> Result<Tensor> {
        let dtype = x.dtype();
        let x = x.to_dtype(DType::F32)?;
        let mean = x.mean_keepdim(candle_core::D::Minus1)?;
        let x = x.broadcast_sub(&mean)?;
        let var = x.sqr()?.mean_keepdim(candle_core::D::Minus1)?;
        let x = x.broadcast_div(&(var + self.eps)?.sqrt()?)?;
        x.broadcast_mul(&self.weight.to_dtype(DType::F32)?)?
            .broadcast_add(&self.bias.to_dtype(DType::F32)?)?
            .to_dtype(dtype)
    }
}

struct LayerNormOp {
    eps: f32,
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

    fn rand(shape: &[usize], seed: u64, offset: f32) -> Tensor {
        let n: usize = shape.iter().product();
        let data = ltd_test_support::uniform(n, seed).into_iter().map(|u| u * 4.0 + offset);
        Tensor::from_vec(data.collect::<Vec<_>>(), shape, &Device::Cpu).unwrap()
    }

    fn max_diff(a: &Tensor, b: &Tensor) -> f64 {
        let d = (a.to_dtype(DType::F64).unwrap() - b.to_dtype(DType::F64).unwrap()).unwrap();
        d.abs().unwrap().flatten_all().unwrap().max(0).unwrap().to_scalar::<f64>().unwrap()
    }

    fn group_norm(groups: usize, c: usize) -> GroupNorm {
        // A Var makes the composite (autograd) path run; the plain tensor the fused one.
        GroupNorm {
            weight: rand(&[c], 7, 1.0),
            bias: rand(&[c], 8, 0.0),
            num_groups: groups,
            eps: 1e-6,
        }
    }

    /// Group norm computed in f64 from the definition.
    fn reference(gn: &GroupNorm, x: &Tensor, silu: bool) -> Tensor {
        let (b, c, h, w) = x.dims4().unwrap();
        let g = gn.num_groups;
        let x = x.to_dtype(DType::F64).unwrap().reshape((b, g, c / g * h * w)).unwrap();
        let mean = x.mean_keepdim(2).unwrap();
        let xc = x.broadcast_sub(&mean).unwrap();
        let var = xc.sqr().unwrap().mean_keepdim(2).unwrap();
        let y = xc.broadcast_div(&(var + gn.eps).unwrap().sqrt().unwrap()).unwrap();
        let y = y.reshape((b, c, h, w)).unwrap();
        let wt = gn.weight.to_dtype(DType::F64).unwrap().reshape((1, c, 1, 1)).unwrap();
        let bs = gn.bias.to_dtype(DType::F64).unwrap().reshape((1, c, 1, 1)).unwrap();
        let y = y.broadcast_mul(&wt).unwrap().broadcast_add(&bs).unwrap();
        if silu {
            y.silu().unwrap()
        } else {
            y
        }
    }

    #[test]
    fn fused_and_composite_group_norm_match_the_definition() {
        // A large mean relative to the spread, where E[x²]−E[x]² would lose digits.
        let x = rand(&[2, 6, 5, 7], 1, 100.0);
        let gn = group_norm(3, 6);
        let tracked = GroupNorm {
            weight: Var::from_tensor(&gn.weight).unwrap().as_tensor().clone(),
            ..gn.clone()
        };
        for silu in [false, true] {
            let expected = reference(&gn, &x, silu);
            // The input itself is only known to f32's 7.6e-6 at 100, i.e. 7e-6 after scaling.
            let fused = max_diff(&gn.run(&x, silu).unwrap(), &expected);
            assert!(fused < 2e-5, "fused, silu {silu}: {fused}");
            // Under autograd on the CPU the fused kernel runs too.
            let trained = max_diff(&tracked.run(&x, silu).unwrap(), &expected);
            assert!(trained < 2e-5, "fused under autograd, silu {silu}: {trained}");
            // candle's mean sums sequentially in f32: a little less precise.
            let y = gn.composite(&x).unwrap();
            let y = if silu { y.silu().unwrap() } else { y };
            let composite = max_diff(&y, &expected);
            assert!(composite < 2e-4, "composite, silu {silu}: {composite}");
        }
        let x = rand(&[2, 6, 5, 7], 5, 0.0);
        for dtype in [DType::F16, DType::BF16] {
            let half = gn.forward(&x.to_dtype(dtype).unwrap()).unwrap();
            assert_eq!(half.dtype(), dtype);
            // Outputs up to ~8 in magnitude; bf16 keeps 8 significant bits.
            let d = max_diff(&half, &reference(&gn, &x, false));
            assert!(d < 0.05, "{dtype:?}: {d}");
        }
    }

    /// The fused kernel's backward equals autograd through the composite ops, with and without
    /// SiLU, for the input and both parameters.
    #[test]
    fn fused_group_norm_gradients_equal_the_composites() {
        for (silu, offset) in [(false, 0.0), (true, 0.0), (true, 3.0)] {
            let x = Var::from_tensor(&rand(&[2, 6, 5, 7], 11, offset)).unwrap();
            let base = group_norm(3, 6);
            let gn = GroupNorm {
                weight: Var::from_tensor(&base.weight).unwrap().as_tensor().clone(),
                bias: Var::from_tensor(&base.bias).unwrap().as_tensor().clone(),
                ..base
            };
            let target = rand(&[2, 6, 5, 7], 12, 0.0);
            let loss = |y: Tensor| (y - &target).unwrap().sqr().unwrap().sum_all().unwrap();
            let fused = loss(gn.run(x.as_tensor(), silu).unwrap()).backward().unwrap();
            let y = gn.composite(x.as_tensor()).unwrap();
            let composite = loss(if silu { y.silu().unwrap() } else { y }).backward().unwrap();
            for (name, v) in [("input", x.as_tensor()), ("weight", &gn.weight), ("bias", &gn.bias)]
            {
                let (a, e) = (fused.get(v).unwrap(), composite.get(v).unwrap());
                let scale = e.abs().unwrap().flatten_all().unwrap().max(0).unwrap();
                let tol =
                    1e-4 * (1.0 + scale.to_dtype(DType::F64).unwrap().to_scalar::<f64>().unwrap());
                let d = max_diff(a, e);
                assert!(d < tol, "{name}, silu {silu}, offset {offset}: {d} (tolerance {tol})");
            }
        }
    }

    #[test]
    fn fused_layer_norm_equals_composite() {
        let x = rand(&[3, 4, 10], 2, 50.0);
        let ln = LayerNorm { weight: rand(&[10], 3, 1.0), bias: rand(&[10], 4, 0.0), eps: 1e-5 };
        let tracked = LayerNorm {
            weight: Var::from_tensor(&ln.weight).unwrap().as_tensor().clone(),
            ..ln.clone()
        };
        let a = ln.forward(&x).unwrap();
        let b = tracked.forward(&x).unwrap();
        assert!(max_diff(&a, &b) < 1e-5);
        assert!(max_diff(&a, &ln.composite(&x).unwrap()) < 1e-5);

        // The backward pass under autograd equals autograd through the composite ops.
        let x = Var::from_tensor(&rand(&[3, 4, 10], 9, 2.0)).unwrap();
        let vars = LayerNorm {
            weight: Var::from_tensor(&ln.weight).unwrap().as_tensor().clone(),
            bias: Var::from_tensor(&ln.bias).unwrap().as_tensor().clone(),
            eps: 1e-5,
        };
        let target = rand(&[3, 4, 10], 10, 0.0);
        let loss = |y: Tensor| (y - &target).unwrap().sqr().unwrap().sum_all().unwrap();
        let fused = loss(vars.forward(x.as_tensor()).unwrap()).backward().unwrap();
        let composite = loss(vars.composite(x.as_tensor()).unwrap()).backward().unwrap();
        for (name, v) in [("input", x.as_tensor()), ("weight", &vars.weight), ("bias", &vars.bias)]
        {
            let (a, e) = (fused.get(v).unwrap(), composite.get(v).unwrap());
            let scale = e.abs().unwrap().flatten_all().unwrap().max(0).unwrap();
            let tol =
                1e-4 * (1.0 + scale.to_dtype(DType::F64).unwrap().to_scalar::<f64>().unwrap());
            let d = max_diff(a, e);
            assert!(d < tol, "{name}: {d} (tolerance {tol})");
        }
        // Rows are normalised: mean ≈ bias·…, checked through weight 1, bias 0.
        let plain = LayerNorm {
            weight: Tensor::ones(10, DType::F32, &Device::Cpu).unwrap(),
            bias: Tensor::zeros(10, DType::F32, &Device::Cpu).unwrap(),
            eps: 0.0,
        };
        let y = plain.forward(&x).unwrap();
        let mean = y.mean_keepdim(2).unwrap().abs().unwrap().max_keepdim(0).unwrap();
        assert!(mean.flatten_all().unwrap().max(0).unwrap().to_scalar::<f32>().unwrap() < 1e-5);
    }
}
