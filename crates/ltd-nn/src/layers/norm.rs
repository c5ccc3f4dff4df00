//! Group and layer normalisation (`torch.nn.GroupNorm`, `torch.nn.LayerNorm`).
//!
//! On the CPU in inference, each is one fused pass (`kernels/norm.rs`) instead of a dozen
//! tensor ops. Under autograd on the CPU in f32 (training) the same pass runs with a fused
//! backward pass of its own; on other devices the same math runs as ordinary (differentiable)
//! tensor ops in f32.

use candle_core::{DType, Result, Tensor};
use candle_nn::{Init, VarBuilder};

use crate::kernels::norm::{GroupNormOp, LayerNormOp};

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
        if num_groups == 0 || !num_channels.is_multiple_of(num_groups) {
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
        let (groups, eps) = (self.num_groups, self.eps as f32);
        if fused_ok(x, &self.weight, &self.bias) {
            let op = GroupNormOp::new(groups, eps, with_silu);
            return x.contiguous()?.apply_op3_no_bwd(&self.weight, &self.bias, &op);
        }
        if trainable_ok(x, &self.weight, &self.bias) {
            let op = GroupNormOp::trainable(groups, eps, with_silu);
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
