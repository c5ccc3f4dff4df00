//! [`StepInput`]: what one step works on. diffusers' samplers upcast the model output and the
//! sample to float32, step, and cast the result back to the sample's dtype;
//! [`Scheduler::step`](crate::Scheduler::step) does that once for every sampler, which
//! implements only [`Scheduler::step_f32`](crate::Scheduler::step_f32).

use candle_core::{DType, Tensor};
use ltd_nn::{NoiseSource, Result};

use crate::ops::upcast;

/// The float32 inputs of one step, and the caller's noise.
pub struct StepInput<'a> {
    /// The model output, in float32.
    pub model_output: Tensor,
    /// The timestep the model output is for.
    pub timestep: f64,
    /// The sample the model saw (before `scale_model_input`), in float32.
    pub sample: Tensor,
    /// Where the stochastic samplers draw their noise.
    pub noise: StepNoise<'a>,
}

/// The caller's [`NoiseSource`], drawing as diffusers' `randn_tensor` calls do.
pub struct StepNoise<'a> {
    source: &'a mut dyn NoiseSource,
    /// The model output as the caller gave it: draws take its shape, device and (mostly) dtype.
    like: &'a Tensor,
}

impl<'a> StepInput<'a> {
    /// Upcasts the step's tensors.
    pub(crate) fn new(
        model_output: &'a Tensor,
        timestep: f64,
        sample: &Tensor,
        noise: &'a mut dyn NoiseSource,
    ) -> Result<Self> {
        Ok(Self {
            model_output: upcast(model_output)?,
            timestep,
            sample: upcast(sample)?,
            noise: StepNoise { source: noise, like: model_output },
        })
    }
}

impl StepNoise<'_> {
    /// `randn_tensor(model_output.shape, dtype=model_output.dtype)`, upcast to float32.
    pub fn like_model_output(&mut self) -> Result<Tensor> {
        let like = self.like;
        upcast(&self.source.randn(like.dims(), like.dtype(), like.device())?)
    }

    /// A float32 draw of the model output's shape (DPM-Solver multistep's SDE noise, which
    /// diffusers draws with `dtype=torch.float32`).
    pub fn float32(&mut self) -> Result<Tensor> {
        let like = self.like;
        upcast(&self.source.randn(like.dims(), DType::F32, like.device())?)
    }

    /// `randn_tensor(shape, dtype=model_output.dtype)` for a `shape` other than the model
    /// output's: a model that also predicts its variance (DeepFloyd IF) outputs twice the
    /// sample's channels, and diffusers draws in the shape of the part it keeps.
    pub fn like_model_output_shaped(&mut self, shape: &[usize]) -> Result<Tensor> {
        let like = self.like;
        upcast(&self.source.randn(shape, like.dtype(), like.device())?)
    }

    /// A float32 draw of `shape` (DPM-Solver multistep's SDE noise, in the shape of the
    /// converted model output).
    pub fn float32_shaped(&mut self, shape: &[usize]) -> Result<Tensor> {
        upcast(&self.source.randn(shape, DType::F32, self.like.device())?)
    }
}
