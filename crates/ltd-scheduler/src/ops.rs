//! Small tensor helpers shared by the samplers: float32 working precision, scalar-times-tensor
//! sums evaluated left to right (the order of the torch expressions they mirror), and the
//! step-index bookkeeping diffusers' sigma schedulers share.

use std::cell::Cell;

use candle_core::{DType, Tensor};
use ltd_nn::{Error, Result};

/// The working copy of a tensor: samplers compute in float32 (diffusers' upcast), whatever the
/// caller's dtype, and hand results back in the caller's dtype.
pub(crate) fn upcast(t: &Tensor) -> Result<Tensor> {
    Ok(t.to_dtype(DType::F32)?)
}

/// `c * t` with a float32 scalar.
pub(crate) fn scale(t: &Tensor, c: f32) -> Result<Tensor> {
    Ok(t.affine(f64::from(c), 0.0)?)
}

/// `t / c` with a float32 scalar, as a true division (torch divides; multiplying by the
/// reciprocal differs in the last bit, which matters where diffusers' own arithmetic cancels,
/// e.g. at σ ≈ 4096 under zero-terminal-SNR).
pub(crate) fn div(t: &Tensor, c: f32) -> Result<Tensor> {
    let c = Tensor::new(c, t.device())?.to_dtype(t.dtype())?;
    Ok(t.broadcast_div(&c)?)
}

/// `Σ cᵢ·tᵢ`, accumulated left to right as the torch expression `c0*t0 + c1*t1 + …` is.
pub(crate) fn lincomb(terms: &[(f32, &Tensor)]) -> Result<Tensor> {
    let mut iter = terms.iter();
    let Some(&(c0, t0)) = iter.next() else {
        return Err(Error::msg("lincomb of no terms"));
    };
    let mut acc = scale(t0, c0)?;
    for &(c, t) in iter {
        acc = (acc + scale(t, c)?)?;
    }
    Ok(acc)
}

/// A training-grid timestep given as f64: must be an integer in `0..num_train_timesteps`.
pub(crate) fn train_index(timestep: f64, num_train_timesteps: usize) -> Result<usize> {
    if timestep.fract() != 0.0 || timestep < 0.0 || timestep >= num_train_timesteps as f64 {
        return Err(Error::msg(format!(
            "timestep {timestep} is not an integer training timestep in 0..{num_train_timesteps}"
        )));
    }
    Ok(timestep as usize)
}

/// What to do when `step` is given a timestep that is not in the schedule.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Lookup {
    /// An error (Euler, Heun, LMS, LCM: diffusers raises `IndexError`).
    Strict,
    /// Use the last step (DPM-Solver, UniPC).
    LastIfMissing,
}

/// diffusers' `index_for_timestep`: the position of `timestep` in `timesteps`, taking the second
/// match when there are several so that a schedule started part-way skips no sigma.
pub(crate) fn index_for_timestep(
    timestep: f64,
    timesteps: &[f64],
    lookup: Lookup,
) -> Result<usize> {
    let mut found = timesteps.iter().enumerate().filter(|(_, &t)| t == timestep).map(|(i, _)| i);
    let first = found.next();
    match (first, found.next()) {
        (Some(_), Some(second)) => Ok(second),
        (Some(first), None) => Ok(first),
        (None, _) if lookup == Lookup::LastIfMissing && !timesteps.is_empty() => {
            Ok(timesteps.len() - 1)
        }
        (None, _) => Err(Error::msg(format!(
            "timestep {timestep} is not one of this scheduler's timesteps (call set_timesteps and \
             pass its timesteps)"
        ))),
    }
}

/// diffusers' `_step_index` / `_begin_index`.
#[derive(Debug, Clone, Default)]
pub(crate) struct StepIndex {
    /// The next step's index, once the first `step` has run.
    pub step: Option<usize>,
    /// Where the denoising starts (image-to-image), set by `set_begin_index`. A `Cell` so that
    /// [`Scheduler::set_begin_index`](crate::Scheduler::set_begin_index)'s default can set it
    /// through the read-only [`NoiseLevels`](crate::NoiseLevels) view every sampler gives; it
    /// is only ever set from `&mut self`.
    begin: Cell<Option<usize>>,
}

impl StepIndex {
    /// The index `step` would use for `timestep` now (`_init_step_index` without committing).
    pub fn current(&self, timestep: f64, timesteps: &[f64], lookup: Lookup) -> Result<usize> {
        match (self.step, self.begin.get()) {
            (Some(i), _) | (None, Some(i)) => Ok(i),
            (None, None) => index_for_timestep(timestep, timesteps, lookup),
        }
    }

    /// Commits the index on the first step and returns it.
    pub fn init(&mut self, timestep: f64, timesteps: &[f64], lookup: Lookup) -> Result<usize> {
        let i = self.current(timestep, timesteps, lookup)?;
        self.step = Some(i);
        Ok(i)
    }

    /// The index `add_noise` uses: by timestep for training, else the current or begin index.
    pub fn for_add_noise(&self, timestep: f64, timesteps: &[f64], lookup: Lookup) -> Result<usize> {
        match (self.begin.get(), self.step) {
            (None, _) => index_for_timestep(timestep, timesteps, lookup),
            (Some(_), Some(step)) => Ok(step),
            (Some(begin), None) => Ok(begin),
        }
    }

    /// diffusers' `set_begin_index`.
    pub fn set_begin(&self, begin_index: usize) {
        self.begin.set(Some(begin_index));
    }

    /// After a step.
    pub fn advance(&mut self) {
        self.step = self.step.map(|i| i + 1);
    }
}

/// diffusers' `model_outputs` of the multistep solvers (DPM-Solver, UniPC): the converted model
/// outputs of the last `solver_order` steps, newest last, empty slots before the first steps.
#[derive(Debug, Clone)]
pub(crate) struct History {
    outputs: Vec<Option<Tensor>>,
    /// The owning class, for the error when a solver reads a slot it has not filled.
    class: &'static str,
}

impl History {
    pub fn new(solver_order: usize, class: &'static str) -> Self {
        Self { outputs: vec![None; solver_order], class }
    }

    /// Empties every slot (`set_timesteps`).
    pub fn clear(&mut self) {
        self.outputs.iter_mut().for_each(|slot| *slot = None);
    }

    /// Shifts the history and stores the newest output.
    pub fn push(&mut self, output: Tensor) {
        self.outputs.rotate_left(1);
        if let Some(newest) = self.outputs.last_mut() {
            *newest = Some(output);
        }
    }

    /// Whether the output `back` steps before the newest is there.
    pub fn has(&self, back: usize) -> bool {
        self.slot(back).is_some()
    }

    /// The output `back` steps before the newest.
    pub fn get(&self, back: usize) -> Result<&Tensor> {
        self.slot(back).ok_or_else(|| Error::msg(format!("{}: missing history", self.class)))
    }

    fn slot(&self, back: usize) -> Option<&Tensor> {
        let i = self.outputs.len().checked_sub(back + 1)?;
        self.outputs[i].as_ref()
    }
}

impl StepIndex {
    /// [`StepIndex::init`] for the samplers whose schedule is empty until `set_timesteps`
    /// (DPM-Solver, UniPC): before that, the error `step` gives.
    pub fn init_scheduled(
        &mut self,
        class: &str,
        timestep: f64,
        timesteps: &[f64],
        lookup: Lookup,
    ) -> Result<usize> {
        if timesteps.is_empty() {
            return Err(crate::not_ready(class));
        }
        self.init(timestep, timesteps, lookup)
    }
}
