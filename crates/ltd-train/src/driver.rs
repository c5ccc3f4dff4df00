//! The one training driver both trainers run under.
//!
//! A trainer says what it trains through [`Task`]: the loss of a batch, the preview of a
//! checkpoint, the export at the end, and which of its variables get a learning rate or an
//! EMA. The [`Driver`] owns everything else, in this order:
//!
//! 1. [`Driver::options`]: the run's options, the newest checkpoint's when resuming;
//! 2. [`Driver::start`]: the checkpoint to resume from, checked against the dataset (or a
//!    check that a fresh run will not mix with an old one), before any costly preparation;
//! 3. [`Driver::train`]: seeded initialisation of the variables, AdamW (with its parameter
//!    groups) and the EMA, each restored from the checkpoint when resuming; the generator
//!    and the loss history (a group at learning rate 0 is frozen: it is initialised,
//!    checkpointed and exported, but gets no optimiser state, no EMA and no share of the
//!    clipping norm); then per step the batch (a pure function of seed and step) made ready
//!    by the task (its random draws), the task's loss and backward shard by shard, one shard
//!    per thread ([`crate::shards`]), clipping, the AdamW step and the EMA update; a checkpoint (model,
//!    optimiser moments, EMA weights, `state.json`), the loss curve and a preview every
//!    `checkpoint_every` steps and at the last; the stop asked for by
//!    [`RunControl::stop_after`]; and at the end the task's export of the trained weights (the
//!    EMA's when there is one).
//!
//! Random draws happen only at fixed places (initialisation from its own seed, then the
//! task's batch preparation from the run's generator, whose state every checkpoint saves),
//! which is what makes a resumed run bit-identical to an uninterrupted one (at the same thread
//! count: the shards' gradient sums round by the number of shards).

use std::collections::HashMap;
use std::path::Path;

use candle_core::{Device, Tensor, Var};
use candle_nn::VarMap;
use ltd_nn::rng::{TorchRng, TorchRngState};
use serde::de::DeserializeOwned;
use serde::Serialize;

use crate::checkpoint::Loaded;
use crate::common::{batch_indices, OptimOptions, RunDir, SavedState};
use crate::error::{Result, TrainError};
use crate::history::{History, Record};
use crate::init::{init_varmap, load_vars, named_vars, var_tensors};
use crate::optim::{clip_factor, AdamW, Ema};
use crate::progress::{Event, Sink};
use crate::rng::derive_seed;
use crate::shards::{loss_and_grads, Shard, Stepped};
use crate::RunControl;

/// Steps the smoothed loss of the progress events and the final loss average over.
const RECENT_STEPS: usize = 50;

/// The loss of one batch.
pub struct Loss {
    /// The scalar the optimiser minimises.
    pub total: Tensor,
    /// Named values logged with it (its terms, the batch's mean timestep).
    pub terms: Vec<(String, f32)>,
}

/// Variables with a peak learning rate of their own (under the run's warm-up and schedule).
#[derive(Debug, Clone, Copy)]
pub struct ParamGroup {
    /// The prefix of their names (`text_encoder.`).
    pub prefix: &'static str,
    /// Their peak learning rate; 0 freezes them (see the module documentation), and the task
    /// should then keep them out of the loss's graph, so that backward does not reach them.
    pub learning_rate: f64,
    /// The option that set it, named when no variable has the prefix.
    pub option: &'static str,
}

/// What a trainer supplies to the [`Driver`].
pub trait Task: Sync {
    /// What [`Task::export`] returns.
    type Exported;

    /// A batch made ready for [`Task::loss`]: its examples and random draws.
    type Batch: Sync;

    /// The optimisation options.
    fn optim(&self) -> &OptimOptions;

    /// The maximum decay of an EMA of the trained weights; `None`: no EMA.
    fn ema_decay(&self) -> Option<f64> {
        None
    }

    /// Variables trained at a learning rate of their own.
    fn param_groups(&self) -> Vec<ParamGroup> {
        Vec::new()
    }

    /// The examples batches are drawn from.
    fn train_indices(&self) -> &[usize];

    /// Makes the examples `batch` ready for [`Task::loss`]. Every random draw comes from
    /// `rng`, here and in an order fixed for the task, so that a resumed run draws the same
    /// (and the draws do not depend on how the batch is split).
    fn prepare(&mut self, batch: &[usize], rng: &mut TorchRng) -> Result<Self::Batch>;

    /// The loss of the examples `shard` of a prepared batch, and its logged terms, each
    /// weighted by the shard's share of the batch ([`Shard::weighted`]), so that the shards'
    /// losses add up to the batch's (see [`crate::shards`]). Called for several shards at
    /// once, on different threads.
    fn loss(&self, batch: &Self::Batch, shard: &Shard) -> Result<Loss>;

    /// Whether checkpoints come with a preview image.
    fn previews(&self) -> bool {
        true
    }

    /// Writes the preview image of a checkpoint to `path`; the variables hold the weights the
    /// export will have.
    fn preview(&self, path: &Path) -> Result<()>;

    /// Writes the trained model: `weights` are the EMA's when there is one, else the
    /// variables'.
    fn export(&self, weights: HashMap<String, Tensor>, sink: Sink) -> Result<Self::Exported>;
}

/// How a run under the driver ended.
#[derive(Debug, Clone, PartialEq)]
pub struct Trained<E> {
    /// Steps done in total.
    pub steps_done: usize,
    /// Mean loss of the last steps.
    pub final_loss: Option<f32>,
    /// What the export returned; `None` when the run stopped before its last step because it
    /// was asked to (nothing was exported then).
    pub exported: Option<E>,
}

/// A training run in its output folder, whose checkpoints record the trainer's own options
/// `S` (configs included) besides the common state.
pub struct Driver<S> {
    dir: RunDir,
    kind: &'static str,
    control: RunControl,
    device: Device,
    resume: Option<Loaded<SavedState<S>>>,
    examples: usize,
}

impl<S: Clone + Serialize + DeserializeOwned> Driver<S> {
    /// A run of `kind` (`vae`, `unet`: checkpoints of one kind never resume the other) into
    /// the output folder `out`, its run files in `out/train/`.
    pub fn new(out: &Path, kind: &'static str, control: RunControl, device: &Device) -> Self {
        let (dir, device) = (RunDir::new(out), device.clone());
        Self { dir, kind, control, device, resume: None, examples: 0 }
    }

    /// The options of the run: the newest checkpoint's when resuming from one, else
    /// `fresh()`.
    pub fn options(&self, fresh: impl FnOnce() -> S) -> Result<S> {
        let latest = self.dir.checkpoints.latest::<SavedState<S>>()?;
        Ok(match (latest, self.control.resume) {
            (Some(ck), true) => ck.state.options,
            _ => fresh(),
        })
    }

    /// Finds the checkpoint to resume from and checks it against a dataset of `examples`, or
    /// checks that a fresh run will not mix with an old one.
    pub fn start(&mut self, examples: usize, sink: Sink) -> Result<()> {
        self.resume = self.dir.start(self.kind, &self.control, examples, sink)?;
        self.examples = examples;
        Ok(())
    }

    /// Trains `task`, whose variables are those of `varmap`, under the options `saved` (from
    /// [`Self::options`]); call [`Self::start`] first.
    pub fn train<T: Task>(
        self,
        saved: &S,
        varmap: &VarMap,
        task: &mut T,
        sink: Sink,
    ) -> Result<Trained<T::Exported>> {
        let o = task.optim().clone();
        let dev = &self.device;
        init_varmap(varmap, derive_seed(o.seed, 2))?;
        // Every variable is initialised, checkpointed and exported; those of a group at
        // learning rate 0 are frozen: no optimiser step, no EMA, and their gradients (which
        // the task should not compute at all) stay out of the clipping norm.
        let all_vars = named_vars(varmap)?;
        let groups = task.param_groups();
        let frozen = |name: &str| {
            groups.iter().any(|g| g.learning_rate == 0.0 && name.starts_with(g.prefix))
        };
        let (frozen_vars, vars): (Vec<_>, Vec<_>) =
            all_vars.iter().cloned().partition(|(n, _)| frozen(n));
        let mut opt = AdamW::new(vars.clone(), o.adam)?;
        for g in &groups {
            let applies = if g.learning_rate == 0.0 {
                frozen_vars.iter().filter(|(n, _)| n.starts_with(g.prefix)).count()
            } else {
                opt.scale_lr(g.prefix, g.learning_rate / o.learning_rate)
            };
            if applies == 0 {
                return Err(TrainError::option(
                    g.option,
                    format!("the model has no variables under `{}`", g.prefix),
                ));
            }
        }
        let mut ema = match task.ema_decay() {
            Some(d) => Some(Ema::new(vars.iter().map(|(n, v)| (n.as_str(), v)), d)?),
            None => None,
        };
        let (mut start, mut saved_rng) = (0, None);
        if let Some(ck) = &self.resume {
            load_vars(&all_vars, &ck.tensors("model", dev)?)?;
            opt.load_state(&ck.tensors("optimizer", dev)?, ck.state.step)?;
            if let Some(e) = &mut ema {
                e.load(&ck.tensors("ema", dev)?, ck.state.ema_updates)?;
            }
            start = ck.state.step;
            saved_rng = Some(ck.state.rng.clone());
        }
        let mut rng = generator(o.seed, saved_rng.as_ref())?;
        let mut history = self.dir.history(self.resume.as_ref().map(|c| c.state.step))?;
        let total = o.steps;
        sink(Event::Started { total, done: start });

        for step in start..total {
            let batch = batch_indices(task.train_indices(), o.batch_size, step, o.seed);
            let prepared = task.prepare(&batch, &mut rng)?;
            let task = &*task;
            let trained = opt.vars().map(|(_, v)| v);
            let stepped = loss_and_grads(batch.len(), trained, |s| task.loss(&prepared, s))?;
            optimize(stepped, &mut opt, &o, step, &mut history, sink)?;
            if let Some(e) = &mut ema {
                e.update(vars.iter().map(|(_, v)| v))?;
            }
            let done = step + 1;
            if done % o.checkpoint_every == 0 || done == total {
                let state = SavedState {
                    kind: self.kind.into(),
                    step: done,
                    options: saved.clone(),
                    rng: rng.state(),
                    examples: self.examples,
                    ema_updates: ema.as_ref().map_or(0, Ema::updates),
                };
                let model = var_tensors(&all_vars)?;
                let ema_tensors = ema.as_ref().map(Ema::tensors);
                let opt_state = opt.state_tensors()?;
                let mut files = vec![("model", &model), ("optimizer", &opt_state)];
                if let Some(t) = &ema_tensors {
                    files.push(("ema", t));
                }
                let path = self.dir.checkpoints.save(done, &files, &state, o.keep_checkpoints)?;
                history.plot(&self.dir.plot_path())?;
                if task.previews() {
                    // Previews with the weights the export will have (the EMA's), then back.
                    if let Some(t) = &ema_tensors {
                        load_vars(&vars, t)?;
                    }
                    task.preview(&self.dir.sample_path(done))?;
                    if ema_tensors.is_some() {
                        load_vars(&vars, &model)?;
                    }
                }
                sink(Event::Checkpoint { step: done, path });
            }
            if self.control.stop_after == Some(done) && done < total {
                sink(Event::Stopped { step: done });
                let final_loss = history.recent_mean(RECENT_STEPS);
                return Ok(Trained { steps_done: done, final_loss, exported: None });
            }
        }

        let weights = match &ema {
            Some(e) => {
                let mut w = e.tensors();
                w.extend(var_tensors(&frozen_vars)?);
                w
            }
            None => var_tensors(&all_vars)?,
        };
        let exported = task.export(weights, sink)?;
        let final_loss = history.recent_mean(RECENT_STEPS);
        Ok(Trained { steps_done: total, final_loss, exported: Some(exported) })
    }
}

/// Clips the gradients of a batch's loss and takes one AdamW step at 0-based `step`; records
/// the step in `history` and reports it.
fn optimize(
    stepped: Stepped,
    opt: &mut AdamW,
    o: &OptimOptions,
    step: usize,
    history: &mut History,
    sink: Sink,
) -> Result<()> {
    let Stepped { value, terms, grads } = stepped;
    if !value.is_finite() {
        return Err(TrainError::Diverged { step: step + 1, loss: value });
    }
    let vars: Vec<&Var> = opt.vars().map(|(_, v)| v).collect();
    let (grad_norm, factor) = clip_factor(&grads, vars.into_iter(), o.max_grad_norm)?;
    let lr = o.lr_at(step);
    opt.step(&grads, lr, factor)?;
    history.push(Record { step: step + 1, loss: value, lr, grad_norm, terms })?;
    let smoothed = history.recent_mean(RECENT_STEPS).unwrap_or(value);
    sink(Event::Step { step: step + 1, loss: value, smoothed, lr });
    Ok(())
}

/// The generator of a fresh run or the one saved in a checkpoint.
fn generator(seed: u64, saved: Option<&TorchRngState>) -> Result<TorchRng> {
    match saved {
        Some(s) => Ok(TorchRng::from_state(s)?),
        None => Ok(TorchRng::new(derive_seed(seed, 3))),
    }
}
