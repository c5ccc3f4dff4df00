//! [`PerImage`]: one generator per image of a batch, as diffusers does with a list of generators.

use candle_core::{DType, Device, Tensor};

use super::NoiseSource;

/// A list of generators, one per batch element: diffusers' `generator=[g0, g1, ...]`.
///
/// `randn([B, ...])` draws `[1, ...]` from generator `i` for image `i` and concatenates along the
/// batch (`randn_tensor` in `diffusers/utils/torch_utils.py`), so image `i` depends only on its own
/// seed. As in diffusers, a list of one generator is used like a single generator (it fills the
/// whole batch); a longer list must match the batch size.
#[derive(Debug, Clone, PartialEq)]
pub struct PerImage<R> {
    sources: Vec<R>,
}

impl<R> PerImage<R> {
    /// The given generators, image 0 first.
    pub fn new(sources: Vec<R>) -> Self {
        Self { sources }
    }

    /// `n` generators seeded `seed, seed + 1, ...` (wrapping), the usual way to give each image
    /// of a batch its own reproducible seed (AUTOMATIC1111's rule for batches).
    pub fn consecutive_seeds(seed: u64, n: usize, make: impl Fn(u64) -> R) -> Self {
        Self { sources: (0..n as u64).map(|i| make(seed.wrapping_add(i))).collect() }
    }

    /// The generators, image 0 first.
    pub fn sources(&self) -> &[R] {
        &self.sources
    }

    /// The generators, mutably (to save or restore their states).
    pub fn sources_mut(&mut self) -> &mut [R] {
        &mut self.sources
    }
}

impl<R: NoiseSource> NoiseSource for PerImage<R> {
    fn randn(
        &mut self,
        shape: &[usize],
        dtype: DType,
        device: &Device,
    ) -> candle_core::Result<Tensor> {
        match self.sources.as_mut_slice() {
            [] => candle_core::bail!("randn: PerImage has no generators"),
            [one] => one.randn(shape, dtype, device),
            many => {
                let batch = shape.first().copied().unwrap_or(0);
                if batch != many.len() {
                    candle_core::bail!(
                        "randn: {} generators for a batch of {batch} (shape {shape:?}); diffusers \
                         requires one generator per image",
                        many.len()
                    );
                }
                let mut one_shape = shape.to_vec();
                one_shape[0] = 1;
                let parts = many
                    .iter_mut()
                    .map(|g| g.randn(&one_shape, dtype, device))
                    .collect::<candle_core::Result<Vec<_>>>()?;
                Tensor::cat(&parts, 0)
            }
        }
    }
}
