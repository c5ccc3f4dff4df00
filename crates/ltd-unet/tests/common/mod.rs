//! Shared by the big memory tests (`big_memory`, `big_memory_if`): full-size models with
//! resident random weights (the memory counters are `ltd_test_support`'s).

use candle_core::{DType, Device, Shape, Tensor};
use candle_nn::var_builder::SimpleBackend;
use candle_nn::VarBuilder;

/// A `VarBuilder` that makes every tensor the model asks for on request, in the dtype it asks
/// for, as plain resident tensors (not a `VarMap`, not zero-stride): the inference kernels run
/// as they do on loaded weights, and memory holds what a load would, no more — the real loader
/// also copies each tensor out of the file in the requested dtype and keeps nothing else.
/// 1-D tensors (norm scales, biases) are ones, the rest uniform in ±1/√fan-in.
pub fn random_weights(dtype: DType) -> VarBuilder<'static> {
    VarBuilder::from_backend(Box::new(RandomWeights), dtype, Device::Cpu)
}

struct RandomWeights;

impl SimpleBackend for RandomWeights {
    fn get(
        &self,
        shape: Shape,
        _name: &str,
        _init: candle_nn::Init,
        dtype: DType,
        dev: &Device,
    ) -> candle_core::Result<Tensor> {
        let dims = shape.dims();
        if dims.len() == 1 {
            return Tensor::ones(shape, dtype, dev);
        }
        let bound = 1.0 / (dims[1..].iter().product::<usize>().max(1) as f64).sqrt();
        // `zeros` only reserves (untouched pages); `rand_like` writes a new tensor in `dtype`.
        Tensor::zeros(shape, dtype, dev)?.rand_like(-bound, bound)
    }

    fn get_unchecked(&self, name: &str, _: DType, _: &Device) -> candle_core::Result<Tensor> {
        candle_core::bail!("random weights need a shape (`{name}` was requested without one)")
    }

    fn contains_tensor(&self, _name: &str) -> bool {
        false
    }
}
