//! Data-parallel training steps on the CPU: a batch split into shards, one per thread, each
//! shard's forward and backward pass run on its thread alone, and the shards' gradients added.
//!
//! Why: at the trainers' sizes (a 4 M-parameter U-Net on 8×8 latents, a VAE on 32×32 images)
//! a step is thousands of small operations, and splitting each of them across threads costs
//! more in hand-offs than it saves: measured on a 2-core Intel Xeon (AVX-512), a `train-unet`
//! step took 0.19 s on one thread and 0.18–0.19 s on two. Split by examples instead, each thread
//! runs half the batch without waiting for the other: 0.12 s on two threads (`cargo xtask
//! bench --only train-unet`, ltd's side). PyTorch gets its two-thread speed-up from its
//! per-operation threads, which are cheaper than rayon's hand-offs.
//!
//! What it changes: the loss is a sum of per-shard means weighted by each shard's share of the
//! batch, and a weight's gradient the sum of the shards' gradients, added in shard order, so
//! a run's numbers differ from an unsplit batch's by float rounding, and depend on the thread
//! count (`RAYON_NUM_THREADS`), not on timing: the same thread count repeats a run bit for bit
//! (a resumed run included). One thread, or a batch of one, is one shard: the unsplit step.

use std::ops::Range;

use candle_core::backprop::GradStore;
use candle_core::{Tensor, Var};

use crate::driver::Loss;
use crate::error::{Result, TrainError};

/// One shard of a batch: the examples `range` of a batch of `batch`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Shard {
    /// The shard's examples, as indices into the batch.
    pub range: Range<usize>,
    /// The batch's size.
    pub batch: usize,
}

impl Shard {
    /// The whole batch as one shard.
    pub fn whole(batch: usize) -> Self {
        Self { range: 0..batch, batch }
    }

    /// Whether the shard is the whole batch.
    pub fn is_whole(&self) -> bool {
        self.range == (0..self.batch)
    }

    /// The shard's share of the batch, the factor its mean loss (and every logged term) is
    /// weighted with, so that the shards' weighted means add up to the batch's mean.
    pub fn weight(&self) -> f64 {
        self.range.len() as f64 / self.batch.max(1) as f64
    }

    /// The shard's rows of `t`, a tensor whose first dimension is the batch.
    pub fn rows(&self, t: &Tensor) -> Result<Tensor> {
        if self.is_whole() {
            return Ok(t.clone());
        }
        Ok(t.narrow(0, self.range.start, self.range.len())?)
    }

    /// The shard's elements of a per-example list.
    pub fn of<'a, T>(&self, v: &'a [T]) -> &'a [T] {
        &v[self.range.clone()]
    }

    /// `mean` (the shard's mean of a loss term) weighted by the shard's share; the mean itself
    /// for the whole batch (no operation added, the unsplit step's numbers).
    pub fn weighted(&self, mean: Tensor) -> Result<Tensor> {
        if self.is_whole() {
            return Ok(mean);
        }
        Ok(mean.affine(self.weight(), 0.0)?)
    }
}

/// The shards of a batch of `batch`: as many as candle's CPU threads (at most one per example),
/// of sizes differing by at most one, the larger first.
pub fn split(batch: usize) -> Vec<Shard> {
    let n = candle_core::utils::get_num_threads().clamp(1, batch.max(1));
    let (per, extra) = (batch / n, batch % n);
    let mut start = 0;
    (0..n)
        .map(|k| {
            let len = per + usize::from(k < extra);
            let shard = Shard { range: start..start + len, batch };
            start += len;
            shard
        })
        .collect()
}

/// A batch's loss and gradients, shard by shard.
pub struct Stepped {
    /// The batch's loss (the sum of the shards' weighted losses).
    pub value: f32,
    /// The logged terms, summed over the shards in order (each shard weights its own).
    pub terms: Vec<(String, f32)>,
    /// The gradients: those of `vars` summed over the shards; the first shard's store.
    pub grads: GradStore,
}

/// Runs `loss` on every shard of a batch of `batch` ([`split`]), one shard per thread of
/// rayon's pool with its operations on that thread alone, runs backward on each, and adds the
/// shards' gradients of `vars` in shard order. A single shard runs on the calling thread with
/// its operations threaded as usual.
///
/// `loss` must weight the shard's loss and terms by [`Shard::weight`] ([`Shard::weighted`]).
pub fn loss_and_grads<'a>(
    batch: usize,
    vars: impl Iterator<Item = &'a Var>,
    loss: impl Fn(&Shard) -> Result<Loss> + Sync,
) -> Result<Stepped> {
    loss_and_grads_over(&split(batch), vars, loss)
}

/// [`loss_and_grads`] over the given shards of one batch (in order, covering it).
fn loss_and_grads_over<'a>(
    shards: &[Shard],
    vars: impl Iterator<Item = &'a Var>,
    loss: impl Fn(&Shard) -> Result<Loss> + Sync,
) -> Result<Stepped> {
    let run = |shard: &Shard| -> Result<Stepped> {
        let l = loss(shard)?;
        let value = l.total.to_scalar::<f32>()?;
        let grads = l.total.backward()?;
        Ok(Stepped { value, terms: l.terms, grads })
    };
    if shards.len() == 1 {
        return run(&shards[0]);
    }
    let results: Vec<Result<Stepped>> = {
        use rayon::prelude::*;
        shards
            .par_iter()
            .with_max_len(1)
            .map(|s| candle_core::utils::on_this_thread(|| run(s)))
            .collect()
    };
    let mut results = results.into_iter().collect::<Result<Vec<_>>>()?.into_iter();
    let Some(mut first) = results.next() else {
        return Err(TrainError::msg("a training batch split into no shards"));
    };
    let rest: Vec<Stepped> = results.collect();
    // Each variable's sum on one thread of the pool (in shard order: which thread adds
    // changes nothing).
    let vars: Vec<&Var> = vars.collect();
    let sums: Vec<Result<Option<Tensor>>> = {
        use rayon::prelude::*;
        let first = &first.grads;
        vars.par_iter()
            .with_max_len(1)
            .map(|var| {
                candle_core::utils::on_this_thread(|| {
                    let t = var.as_tensor();
                    let mut sum = first.get(t).cloned();
                    for r in &rest {
                        sum = match (sum, r.grads.get(t)) {
                            (Some(a), Some(b)) => Some((a + b)?),
                            (a, b) => a.or_else(|| b.cloned()),
                        };
                    }
                    Ok(sum)
                })
            })
            .collect()
    };
    for (var, sum) in vars.iter().zip(sums) {
        if let Some(s) = sum? {
            first.grads.insert(var.as_tensor(), s);
        }
    }
    for r in &rest {
        first.value += r.value;
        for ((_, acc), (_, x)) in first.terms.iter_mut().zip(&r.terms) {
            *acc += x;
        }
    }
    Ok(first)
}

#[cfg(test)]
mod tests {
    use super::*;
    use candle_core::{DType, Device};

    /// A batch's loss and gradients in three shards (sizes 3, 2, 2) are those of the whole
    /// batch, within float rounding (relative 1e-5: the shards' sums add in another order),
    /// and so are the logged terms; a loss that forgets the shard's weight fails this.
    #[test]
    fn shards_add_up_to_the_whole_batch() {
        let dev = Device::Cpu;
        let (batch, n_in, n_out) = (7, 5, 3);
        let x = Tensor::randn(0f32, 1.0, (batch, n_in), &dev).unwrap();
        let y = Tensor::randn(0f32, 1.0, (batch, n_out), &dev).unwrap();
        let w = Var::from_tensor(&Tensor::randn(0f32, 1.0, (n_in, n_out), &dev).unwrap()).unwrap();
        let b = Var::zeros(n_out, DType::F32, &dev).unwrap();
        let loss = |s: &Shard| -> Result<Loss> {
            let pred = s.rows(&x)?.matmul(w.as_tensor())?.broadcast_add(b.as_tensor())?;
            let mse = s.weighted((pred - s.rows(&y)?)?.sqr()?.mean_all()?)?;
            let first = s.of(&[1f32, 2., 3., 4., 5., 6., 7.]).iter().sum::<f32>() / s.batch as f32;
            Ok(Loss {
                total: mse.clone(),
                terms: vec![("mse".into(), mse.to_scalar()?), ("x".into(), first)],
            })
        };
        let whole =
            loss_and_grads_over(&[Shard::whole(batch)], [&w, &b].into_iter(), loss).unwrap();
        let shards: Vec<Shard> =
            [0..3, 3..5, 5..7].into_iter().map(|range| Shard { range, batch }).collect();
        let split = loss_and_grads_over(&shards, [&w, &b].into_iter(), loss).unwrap();
        let close = |a: f32, b: f32| (a - b).abs() <= 1e-5 * (1.0 + a.abs());
        assert!(close(whole.value, split.value), "{} vs {}", whole.value, split.value);
        for ((n, a), (_, b)) in whole.terms.iter().zip(&split.terms) {
            assert!(close(*a, *b), "{n}: {a} vs {b}");
        }
        for v in [&w, &b] {
            let g = |s: &Stepped| -> Vec<f32> {
                s.grads.get(v.as_tensor()).unwrap().flatten_all().unwrap().to_vec1().unwrap()
            };
            for (a, b) in g(&whole).iter().zip(g(&split)) {
                assert!(close(*a, b), "{a} vs {b}");
            }
        }
    }

    #[test]
    fn shards_cover_the_batch_in_order() {
        for batch in [1, 2, 5, 16] {
            let shards = split(batch);
            assert!(!shards.is_empty());
            let mut next = 0;
            for s in &shards {
                assert_eq!((s.range.start, s.batch), (next, batch));
                assert!(!s.range.is_empty());
                next = s.range.end;
            }
            assert_eq!(next, batch);
            let total: f64 = shards.iter().map(Shard::weight).sum();
            assert!((total - 1.0).abs() < 1e-12);
        }
    }
}
