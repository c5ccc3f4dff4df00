//! Additive weight patches, applied as tensors load: the low-rank deltas of LoRA files
//! (Hu et al. 2021, "LoRA: Low-Rank Adaptation of Large Language Models"), merged into the
//! weights once so that running the model costs exactly what it did without them.
//!
//! A patch is `W += scale · (up · down)`, `up` `[out, r(, 1, 1)]` and `down` `[r, in(, kh, kw)]`
//! flattened to matrices, the product reshaped to `W`'s shape (a convolution's LoRA, LoCon, is
//! the same product over `in·kh·kw` columns). That is peft's `get_delta_weight` followed by
//! `merge`, as diffusers' `fuse_lora` runs it: the product in float32, times the scale, added
//! to the float32 weight; several patches on one weight add in the order given.
//!
//! Who decides which file tensor a patch belongs to (the LoRA key layouts) is the caller's
//! business; here patches are keyed by the tensor's name in the safetensors files.

use std::collections::HashMap;

use candle_core::{DType, Tensor};

use crate::error::{Error, Result};

/// One low-rank delta `scale · up · down`.
#[derive(Debug, Clone)]
pub struct LowRankDelta {
    up: Tensor,
    down: Tensor,
    scale: f64,
    /// Where it came from, for messages (file and key).
    source: String,
}

impl LowRankDelta {
    /// A delta from its factors; `up` is `[out, r, …1]`, `down` `[r, …]` (any dtype; kept as
    /// float32). The ranks must agree.
    pub fn new(up: &Tensor, down: &Tensor, scale: f64, source: impl Into<String>) -> Result<Self> {
        let source = source.into();
        let (u, d) = (up.dims(), down.dims());
        let bad = |what: String| Error::msg(format!("{source}: {what}"));
        if u.len() < 2 || d.len() < 2 || u[2..].iter().any(|&k| k != 1) {
            return Err(bad(format!(
                "a LoRA pair needs an up matrix [out, rank(, 1, 1)] and a down matrix \
                 [rank, in(, kh, kw)], found up {u:?} and down {d:?}"
            )));
        }
        if u[1] != d[0] {
            return Err(bad(format!(
                "the up matrix has rank {} but the down matrix rank {} (up {u:?}, down {d:?})",
                u[1], d[0]
            )));
        }
        let up = up.to_dtype(DType::F32)?.reshape((u[0], u[1]))?;
        let down = down.to_dtype(DType::F32)?.flatten_from(1)?;
        Ok(Self { up, down, scale, source })
    }

    /// The rank `r`.
    pub fn rank(&self) -> usize {
        self.down.dims()[0]
    }

    /// Where the delta came from.
    pub fn source(&self) -> &str {
        &self.source
    }

    /// Whether the delta fits a weight of `shape`; the message says why not.
    pub fn check(&self, shape: &[usize]) -> std::result::Result<(), String> {
        let out = shape.first().copied().unwrap_or(0);
        let cols: usize = shape.iter().skip(1).product();
        let (up_out, down_cols) = (self.up.dims()[0], self.down.dims()[1]);
        if shape.len() < 2 || up_out != out || down_cols != cols {
            return Err(format!(
                "a rank-{} delta of {up_out}×{down_cols} does not fit the weight {shape:?}",
                self.rank()
            ));
        }
        Ok(())
    }

    /// `scale · up · down` in float32, shaped like `shape`.
    pub fn delta(&self, shape: &[usize]) -> Result<Tensor> {
        self.check(shape).map_err(|m| Error::msg(format!("{}: {m}", self.source)))?;
        let product = self.up.matmul(&self.down)?;
        // peft multiplies the product by its python-float scaling: one f32 multiply.
        Ok(product.affine(self.scale, 0.0)?.reshape(shape)?)
    }
}

/// Deltas to add to named tensors as they load.
#[derive(Debug, Clone, Default)]
pub struct WeightPatches {
    deltas: HashMap<String, Vec<LowRankDelta>>,
}

impl WeightPatches {
    /// Adds a delta to the tensor `name` (after any already added to it).
    pub fn add(&mut self, name: impl Into<String>, delta: LowRankDelta) {
        self.deltas.entry(name.into()).or_default().push(delta);
    }

    /// Whether there is nothing to add.
    pub fn is_empty(&self) -> bool {
        self.deltas.is_empty()
    }

    /// How many tensors are patched.
    pub fn len(&self) -> usize {
        self.deltas.len()
    }

    /// The names of the patched tensors, sorted.
    pub fn names(&self) -> Vec<&str> {
        let mut names: Vec<&str> = self.deltas.keys().map(String::as_str).collect();
        names.sort_unstable();
        names
    }

    /// Whether `name` has a patch.
    pub fn contains(&self, name: &str) -> bool {
        self.deltas.contains_key(name)
    }

    /// `weight` with the patches of `name` added (in float32, then back to `weight`'s dtype);
    /// `weight` itself when it has none.
    pub fn apply(&self, name: &str, weight: Tensor) -> Result<Tensor> {
        let Some(deltas) = self.deltas.get(name) else { return Ok(weight) };
        let dtype = weight.dtype();
        let mut w = weight.to_dtype(DType::F32)?;
        for d in deltas {
            let delta = d.delta(w.dims())?.to_device(w.device())?;
            w = (w + delta)?;
        }
        Ok(w.to_dtype(dtype)?)
    }
}

#[cfg(test)]
mod tests {
    use candle_core::Device;

    use super::*;

    fn t(v: &[f32], shape: &[usize]) -> Tensor {
        Tensor::from_slice(v, shape, &Device::Cpu).unwrap()
    }

    #[test]
    fn adds_scaled_low_rank_products_in_order() {
        // up [2, 1], down [1, 3]: the outer product, times 0.5.
        let d = LowRankDelta::new(&t(&[1., 2.], &[2, 1]), &t(&[1., 0., -1.], &[1, 3]), 0.5, "a")
            .unwrap();
        let mut p = WeightPatches::default();
        p.add("w", d.clone());
        p.add("w", d);
        let w = p.apply("w", t(&[0.; 6], &[2, 3])).unwrap();
        assert_eq!(w.to_vec2::<f32>().unwrap(), [[1., 0., -1.], [2., 0., -2.]]);
        let other = p.apply("v", t(&[7.], &[1])).unwrap();
        assert_eq!(other.to_vec1::<f32>().unwrap(), [7.]);
    }

    #[test]
    fn convolutions_take_the_product_over_kernel_columns() {
        // LoCon: up [2, 1, 1, 1], down [1, 1, 1, 2] onto a [2, 1, 1, 2] kernel.
        let d = LowRankDelta::new(
            &t(&[1., -1.], &[2, 1, 1, 1]),
            &t(&[3., 4.], &[1, 1, 1, 2]),
            1.0,
            "c",
        )
        .unwrap();
        let mut p = WeightPatches::default();
        p.add("k", d);
        let w = p.apply("k", t(&[1.; 4], &[2, 1, 1, 2])).unwrap();
        assert_eq!(w.flatten_all().unwrap().to_vec1::<f32>().unwrap(), [4., 5., -2., -3.]);
    }

    #[test]
    fn refuses_factors_that_do_not_fit() {
        let err = LowRankDelta::new(&t(&[1.; 4], &[2, 2]), &t(&[1.; 3], &[1, 3]), 1.0, "f: k")
            .unwrap_err()
            .to_string();
        assert!(err.contains("f: k") && err.contains("rank 2") && err.contains("rank 1"), "{err}");
        let d =
            LowRankDelta::new(&t(&[1.; 2], &[2, 1]), &t(&[1.; 3], &[1, 3]), 1.0, "f: k").unwrap();
        assert!(d.check(&[2, 3]).is_ok());
        let msg = d.check(&[3, 2]).unwrap_err();
        assert!(msg.contains("[3, 2]"), "{msg}");
        let mut p = WeightPatches::default();
        p.add("w", d);
        assert!(p.apply("w", t(&[0.; 6], &[3, 2])).unwrap_err().to_string().contains("f: k"));
    }
}
