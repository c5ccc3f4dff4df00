//! AdamW with a state that can be saved and restored, gradient clipping by global norm, the
//! learning-rate schedule and an exponential moving average of the weights.
//!
//! candle-nn's `AdamW` keeps its moments private, so a checkpoint could not hold them and a
//! resumed run would restart the moments from zero. This one does the same arithmetic as
//! `torch.optim.AdamW` (Loshchilov & Hutter, "Decoupled Weight Decay Regularization", 2019):
//!
//! | here | torch / paper |
//! |------|---------------|
//! | `m`, `v` | `exp_avg`, `exp_avg_sq` (first and second moments) |
//! | `t` | `step` (1-based) |
//! | `bc1`, `bc2` | `1 − β₁ᵗ`, `1 − β₂ᵗ` (bias corrections) |
//!
//! 1. `θ ← θ · (1 − lr·λ)` (decoupled weight decay)
//! 2. `m ← β₁·m + (1 − β₁)·g`, `v ← β₂·v + (1 − β₂)·g²`
//! 3. `θ ← θ − (lr / bc1) · m / (√v / √bc2 + ε)`

use std::collections::HashMap;

use candle_core::backprop::GradStore;
use candle_core::{CpuStorage, DType, InplaceOp2, InplaceOp3, Layout, Tensor, Var};
use ltd_nn::{cpu_contiguous, CpuData};
use serde::{Deserialize, Serialize};

use crate::error::{Result, TrainError};

/// AdamW's hyper-parameters (torch's defaults except the weight decay, which follows
/// diffusers' training scripts).
#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
pub struct AdamWConfig {
    /// β₁.
    pub beta1: f64,
    /// β₂.
    pub beta2: f64,
    /// ε.
    pub eps: f64,
    /// λ, the decoupled weight decay.
    pub weight_decay: f64,
}

impl Default for AdamWConfig {
    fn default() -> Self {
        Self { beta1: 0.9, beta2: 0.999, eps: 1e-8, weight_decay: 1e-2 }
    }
}

/// AdamW over named variables.
#[derive(Debug)]
pub struct AdamW {
    names: Vec<String>,
    vars: Vec<Var>,
    m: Vec<Tensor>,
    v: Vec<Tensor>,
    /// Each variable's learning rate as a multiple of the scheduled one (1 unless
    /// [`AdamW::scale_lr`] set it), like torch's per-parameter-group `lr`.
    lr_scale: Vec<f64>,
    t: usize,
    cfg: AdamWConfig,
}

impl AdamW {
    /// An optimiser for `vars` (sorted by name, so the state layout is stable), moments zero.
    pub fn new(mut vars: Vec<(String, Var)>, cfg: AdamWConfig) -> Result<Self> {
        vars.sort_by(|a, b| a.0.cmp(&b.0));
        let (mut m, mut v) = (Vec::with_capacity(vars.len()), Vec::with_capacity(vars.len()));
        // Each moment in storage of its own: the fused CPU step updates them in place.
        for (_, var) in &vars {
            m.push(var.as_tensor().zeros_like()?);
            v.push(var.as_tensor().zeros_like()?);
        }
        let lr_scale = vec![1.0; vars.len()];
        let (names, vars) = vars.into_iter().unzip();
        Ok(Self { names, vars, m, v, lr_scale, t: 0, cfg })
    }

    /// Gives the variables whose names start with `prefix` the learning rate `factor` × the
    /// scheduled one (a torch parameter group with its own `lr` under the same schedule);
    /// returns how many variables it applies to.
    pub fn scale_lr(&mut self, prefix: &str, factor: f64) -> usize {
        let mut n = 0;
        for (name, scale) in self.names.iter().zip(&mut self.lr_scale) {
            if name.starts_with(prefix) {
                *scale = factor;
                n += 1;
            }
        }
        n
    }

    /// The number of steps taken.
    pub fn steps_taken(&self) -> usize {
        self.t
    }

    /// The variables, by name.
    pub fn vars(&self) -> impl Iterator<Item = (&str, &Var)> {
        self.names.iter().map(String::as_str).zip(&self.vars)
    }

    /// One update with learning rate `lr`; every gradient is first multiplied by `grad_scale`
    /// (the clipping factor). Variables without a gradient are left alone, as in torch.
    pub fn step(&mut self, grads: &GradStore, lr: f64, grad_scale: f64) -> Result<()> {
        self.step_with(grads, lr, grad_scale, true)
    }

    /// [`Self::step`], with the fused CPU loop allowed or not (tests compare the two).
    ///
    /// The variables update in parallel on rayon's pool, each on one thread (each variable's
    /// update is independent of the others', so which thread runs it changes nothing).
    fn step_with(&mut self, grads: &GradStore, lr: f64, grad_scale: f64, fuse: bool) -> Result<()> {
        use rayon::prelude::*;
        self.t += 1;
        let AdamWConfig { beta1, beta2, eps, weight_decay } = self.cfg;
        let bc1 = 1.0 - beta1.powi(self.t as i32);
        let bc2_sqrt = (1.0 - beta2.powi(self.t as i32)).sqrt();
        let base_lr = lr;
        let update = |i: usize| -> Result<Option<(Tensor, Tensor)>> {
            let var = &self.vars[i];
            let Some(g) = grads.get(var.as_tensor()) else { return Ok(None) };
            let lr = base_lr * self.lr_scale[i];
            let k = FusedCoeffs {
                scale: grad_scale as f32,
                decay: (1.0 - lr * weight_decay) as f32,
                beta2: beta2 as f32,
                // 1 − β in f64, as torch's Python does: in f32, 1 − 0.999 is off by 1e-5.
                one_minus_beta1: (1.0 - beta1) as f32,
                one_minus_beta2: (1.0 - beta2) as f32,
                step_size: (lr / bc1) as f32,
                bc2_sqrt: bc2_sqrt as f32,
                eps: eps as f32,
            };
            // Gradients carry the step's graph: detach, or the moments would keep every
            // step's activations alive.
            let g = g.detach();
            // On the CPU three in-place passes replace a dozen tensor operations, each
            // allocating a parameter-sized temporary.
            if fuse && fusable(var.as_tensor(), &g, &self.m[i], &self.v[i]) {
                adamw_cpu(var.as_tensor(), &g, (&self.m[i], &self.v[i]), &k)?;
                return Ok(None);
            }
            let g = if grad_scale == 1.0 { g } else { (g * grad_scale)? };
            let theta = (var.as_tensor() * (1.0 - lr * weight_decay))?;
            let m = ((&self.m[i] * beta1)? + (&g * (1.0 - beta1))?)?;
            let v = ((&self.v[i] * beta2)? + (g.sqr()? * (1.0 - beta2))?)?;
            let denom = ((v.sqrt()? / bc2_sqrt)? + eps)?;
            let theta = (theta - ((&m / &denom)? * (lr / bc1))?)?;
            var.set(&theta.detach())?;
            Ok(Some((m.detach(), v.detach())))
        };
        let updates: Vec<_> = (0..self.vars.len())
            .into_par_iter()
            .with_max_len(1)
            .map(|i| candle_core::utils::on_this_thread(|| update(i)))
            .collect();
        for (i, u) in updates.into_iter().enumerate() {
            if let Some((m, v)) = u? {
                self.m[i] = m;
                self.v[i] = v;
            }
        }
        Ok(())
    }

    /// The moments as named tensors (`exp_avg.NAME`, `exp_avg_sq.NAME`) for a checkpoint.
    pub fn state_tensors(&self) -> Result<HashMap<String, Tensor>> {
        let mut out = HashMap::new();
        for (i, name) in self.names.iter().enumerate() {
            // Copies: the next step updates the moments in place.
            out.insert(format!("exp_avg.{name}"), self.m[i].copy()?);
            out.insert(format!("exp_avg_sq.{name}"), self.v[i].copy()?);
        }
        Ok(out)
    }

    /// Restores the moments saved by [`Self::state_tensors`] and the step count.
    pub fn load_state(
        &mut self,
        tensors: &HashMap<String, Tensor>,
        steps_taken: usize,
    ) -> Result<()> {
        for (i, name) in self.names.iter().enumerate() {
            for (prefix, slot) in [("exp_avg", &mut self.m[i]), ("exp_avg_sq", &mut self.v[i])] {
                let key = format!("{prefix}.{name}");
                let t = tensors
                    .get(&key)
                    .ok_or_else(|| TrainError::msg(format!("optimiser state lacks `{key}`")))?;
                if t.dims() != slot.dims() {
                    return Err(TrainError::msg(format!(
                        "optimiser state `{key}` has shape {:?}, the model {:?}",
                        t.dims(),
                        slot.dims()
                    )));
                }
                // A copy: the steps update the moments in place, and `tensors` is the
                // caller's.
                *slot = t.to_dtype(slot.dtype())?.to_device(slot.device())?.copy()?;
            }
        }
        self.t = steps_taken;
        Ok(())
    }
}

/// The global L2 norm of the gradients of `vars` and the factor torch's
/// `clip_grad_norm_(max_norm)` multiplies them by: `min(1, max_norm / (norm + 1e-6))`.
pub fn clip_factor<'a>(
    grads: &GradStore,
    vars: impl Iterator<Item = &'a Var>,
    max_norm: f64,
) -> Result<(f64, f64)> {
    use rayon::prelude::*;
    // Each variable's sum of squares on one thread of rayon's pool, then added in the
    // variables' order: the same number as one thread adding them in turn.
    let vars: Vec<&Var> = vars.collect();
    let sums: Vec<Result<f64>> = vars
        .par_iter()
        .with_max_len(1)
        .map(|var| {
            let Some(g) = grads.get(var.as_tensor()) else { return Ok(0.0) };
            let view = CpuData::new(g);
            Ok(match view.f32() {
                Ok(g) => sum_of_squares(g),
                Err(_) => candle_core::utils::on_this_thread(|| -> Result<f64> {
                    let sq = g.detach().to_dtype(DType::F32)?.sqr()?.sum_all()?;
                    Ok(sq.to_scalar::<f32>()? as f64)
                })?,
            })
        })
        .collect();
    let mut sum = 0f64;
    for s in sums {
        sum += s?;
    }
    let norm = sum.sqrt();
    let factor = if max_norm > 0.0 { (max_norm / (norm + 1e-6)).min(1.0) } else { 1.0 };
    Ok((norm, factor))
}

/// `Σ x²` in f64, in eight interleaved partial sums (element `i` into sum `i mod 8`) added in
/// order, then the last `len mod 8` elements: one running sum was a chain of dependent
/// additions, 2% of a `train-unet` step. The result depends on the length only.
fn sum_of_squares(g: &[f32]) -> f64 {
    let chunks = g.chunks_exact(8);
    let rest = chunks.remainder();
    let mut acc = [0f64; 8];
    for c in chunks {
        for (a, &x) in acc.iter_mut().zip(c) {
            *a += (x as f64) * (x as f64);
        }
    }
    let mut sum = acc.iter().sum::<f64>();
    for &x in rest {
        sum += (x as f64) * (x as f64);
    }
    sum
}

/// Runs `f` compiled for AVX2 where the CPU has it (the AdamW passes: 8-wide square roots and
/// divisions instead of SSE2's 4; the same IEEE operations, so the same bits, as Rust never
/// fuses a multiply and an add on its own). `f` must be `#[inline(always)]` for the features
/// to reach its body.
fn with_avx2(f: impl FnOnce()) {
    #[cfg(target_arch = "x86_64")]
    if is_x86_feature_detected!("avx2") {
        #[target_feature(enable = "avx2")]
        unsafe fn run(f: impl FnOnce()) {
            f()
        }
        // SAFETY: the CPU has AVX2 (checked above).
        return unsafe { run(f) };
    }
    f()
}

/// AdamW's per-step constants in f32, for [`adamw_cpu`].
struct FusedCoeffs {
    scale: f32,
    decay: f32,
    beta2: f32,
    one_minus_beta1: f32,
    one_minus_beta2: f32,
    step_size: f32,
    bc2_sqrt: f32,
    eps: f32,
}

/// Whether [`adamw_cpu`] applies: the weights, gradient and moments are contiguous f32 CPU
/// tensors of one length.
fn fusable(theta: &Tensor, grad: &Tensor, m: &Tensor, v: &Tensor) -> bool {
    let views = [theta, grad, m, v].map(CpuData::new);
    let lens = views.each_ref().map(|d| d.f32().map(<[f32]>::len).ok());
    matches!(lens, [Some(n), Some(g), Some(a), Some(b)] if [g, a, b] == [n; 3])
}

/// One AdamW update of a variable in place, in three passes (`m`, then `v`, then the weights:
/// no temporaries, where a step of the tensor path allocates a dozen); for [`fusable`]
/// tensors. Each element's arithmetic, and so its rounding, is that of torch's CPU kernels
/// (lerp_, mul_ + addcmul_, addcdiv_).
fn adamw_cpu(
    theta: &Tensor,
    grad: &Tensor,
    (m, v): (&Tensor, &Tensor),
    k: &FusedCoeffs,
) -> Result<()> {
    m.inplace_op2(grad, &MomentOp { k, second: false })?;
    v.inplace_op2(grad, &MomentOp { k, second: true })?;
    theta.inplace_op3(m, v, &WeightOp { k })?;
    Ok(())
}

/// The destination of an in-place pass as a slice (contiguous f32, checked by [`fusable`]);
/// its sources are read with `ltd_nn::cpu_contiguous`.
fn f32_mut<'a>(s: &'a mut CpuStorage, l: &Layout) -> candle_core::Result<&'a mut [f32]> {
    match (s, l.contiguous_offsets()) {
        (CpuStorage::F32(v), Some((a, b))) => Ok(&mut v[a..b]),
        _ => candle_core::bail!("AdamW: expected a contiguous f32 CPU tensor"),
    }
}

/// `m ← m + (1 − β₁)·(g·s − m)` (torch's `lerp_`), or with `second`
/// `v ← v·β₂ + (1 − β₂)·(g·s)²` (`mul_` + `addcmul_`), `s` the clipping factor.
struct MomentOp<'a> {
    k: &'a FusedCoeffs,
    second: bool,
}

impl InplaceOp2 for MomentOp<'_> {
    fn name(&self) -> &'static str {
        "ltd-adamw-moment"
    }

    fn cpu_fwd(
        &self,
        dst: &mut CpuStorage,
        dst_l: &Layout,
        g: &CpuStorage,
        gl: &Layout,
    ) -> candle_core::Result<()> {
        let (dst, g) = (f32_mut(dst, dst_l)?, cpu_contiguous::<f32>(g, gl)?);
        let n = dst.len().min(g.len());
        let (dst, g, k) = (&mut dst[..n], &g[..n], self.k);
        // Indexed loops over slices of one length let the compiler vectorise them; each
        // element's arithmetic is the same either way (Rust does not fuse multiply-adds).
        let second = self.second;
        with_avx2(
            #[inline(always)]
            || {
                if second {
                    for i in 0..n {
                        let g = g[i] * k.scale;
                        dst[i] = dst[i] * k.beta2 + k.one_minus_beta2 * g * g;
                    }
                } else {
                    for i in 0..n {
                        let g = g[i] * k.scale;
                        dst[i] += k.one_minus_beta1 * (g - dst[i]);
                    }
                }
            },
        );
        Ok(())
    }
}

/// `θ ← θ·(1 − lr·λ) − (lr / bc1)·m / (√v / √bc2 + ε)` on the updated moments (torch's
/// `mul_` then `addcdiv_`; it divides by the scalar `√bc2` as a multiplication by its f32
/// reciprocal).
struct WeightOp<'a> {
    k: &'a FusedCoeffs,
}

impl InplaceOp3 for WeightOp<'_> {
    fn name(&self) -> &'static str {
        "ltd-adamw-weights"
    }

    fn cpu_fwd(
        &self,
        dst: &mut CpuStorage,
        dst_l: &Layout,
        m: &CpuStorage,
        ml: &Layout,
        v: &CpuStorage,
        vl: &Layout,
    ) -> candle_core::Result<()> {
        let (theta, m, v) =
            (f32_mut(dst, dst_l)?, cpu_contiguous::<f32>(m, ml)?, cpu_contiguous::<f32>(v, vl)?);
        let n = theta.len().min(m.len()).min(v.len());
        let (theta, m, v, k) = (&mut theta[..n], &m[..n], &v[..n], self.k);
        let inv_bc2_sqrt = 1.0 / k.bc2_sqrt;
        with_avx2(
            #[inline(always)]
            || {
                for i in 0..n {
                    theta[i] = theta[i] * k.decay
                        + (-k.step_size * m[i]) / (v[i].sqrt() * inv_bc2_sqrt + k.eps);
                }
            },
        );
        Ok(())
    }
}

/// The learning-rate schedule after warm-up.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, Default)]
#[serde(rename_all = "lowercase")]
pub enum LrSchedule {
    /// Constant after warm-up.
    #[default]
    Constant,
    /// Half a cosine from the peak to zero at the last step (diffusers' `cosine`).
    Cosine,
}

impl std::str::FromStr for LrSchedule {
    type Err = TrainError;

    fn from_str(s: &str) -> Result<Self> {
        match s {
            "constant" => Ok(Self::Constant),
            "cosine" => Ok(Self::Cosine),
            _ => Err(TrainError::option(
                "lr-schedule",
                format!("`{s}`: expected constant or cosine"),
            )),
        }
    }
}

/// The learning rate of 0-based step `step` of `total`: linear warm-up over `warmup` steps
/// (reaching `peak` at step `warmup − 1`, so that no step is wasted at zero), then `schedule`.
pub fn learning_rate(
    peak: f64,
    step: usize,
    warmup: usize,
    total: usize,
    schedule: LrSchedule,
) -> f64 {
    if step < warmup {
        return peak * (step + 1) as f64 / warmup as f64;
    }
    match schedule {
        LrSchedule::Constant => peak,
        LrSchedule::Cosine => {
            let span = total.saturating_sub(warmup).max(1) as f64;
            let progress = ((step - warmup) as f64 / span).min(1.0);
            peak * 0.5 * (1.0 + (std::f64::consts::PI * progress).cos())
        }
    }
}

/// An exponential moving average of weights, with diffusers' `EMAModel` decay warm-up:
/// after `k` updates the decay is `min(max_decay, (1 + k) / (10 + k))`.
#[derive(Debug)]
pub struct Ema {
    names: Vec<String>,
    shadow: Vec<Tensor>,
    max_decay: f64,
    updates: usize,
}

impl Ema {
    /// An average starting at the current values of `vars`.
    pub fn new<'a>(vars: impl Iterator<Item = (&'a str, &'a Var)>, max_decay: f64) -> Result<Self> {
        let mut names = Vec::new();
        let mut shadow = Vec::new();
        for (name, var) in vars {
            names.push(name.to_string());
            shadow.push(var.as_tensor().copy()?);
        }
        Ok(Self { names, shadow, max_decay, updates: 0 })
    }

    /// The decay the next update will use.
    fn decay(&self) -> f64 {
        // diffusers: step = optimization_step - 1 (update_after_step 0); decay 0 at step 0.
        let k = self.updates as f64;
        if self.updates == 0 {
            0.0
        } else {
            ((1.0 + k) / (10.0 + k)).min(self.max_decay)
        }
    }

    /// Moves the average towards `vars` (in the order given at construction).
    pub fn update<'a>(&mut self, vars: impl Iterator<Item = &'a Var>) -> Result<()> {
        let one_minus = 1.0 - self.decay();
        for (s, var) in self.shadow.iter_mut().zip(vars) {
            // s ← s − (1 − decay)·(s − θ), as diffusers' EMAModel.step.
            let (sv, pv) = (CpuData::new(s), CpuData::new(var.as_tensor()));
            let fused = match (sv.f32(), pv.f32()) {
                (Ok(sv), Ok(theta)) => {
                    let k = one_minus as f32;
                    let new = sv.iter().zip(theta).map(|(&a, &p)| a - k * (a - p));
                    Some(new.collect::<Vec<f32>>())
                }
                _ => None,
            };
            drop((sv, pv));
            *s = match fused {
                Some(new) => Tensor::from_vec(new, s.dims(), s.device())?,
                None => (&*s - ((&*s - var.as_tensor())? * one_minus)?)?.detach(),
            };
        }
        self.updates += 1;
        Ok(())
    }

    /// Number of updates so far.
    pub fn updates(&self) -> usize {
        self.updates
    }

    /// The averaged weights by name.
    pub fn tensors(&self) -> HashMap<String, Tensor> {
        self.names.iter().cloned().zip(self.shadow.iter().cloned()).collect()
    }

    /// Restores averaged weights saved by [`Self::tensors`].
    pub fn load(&mut self, tensors: &HashMap<String, Tensor>, updates: usize) -> Result<()> {
        for (name, s) in self.names.iter().zip(self.shadow.iter_mut()) {
            let t = tensors
                .get(name)
                .ok_or_else(|| TrainError::msg(format!("EMA state lacks `{name}`")))?;
            *s = t.to_dtype(s.dtype())?.to_device(s.device())?;
        }
        self.updates = updates;
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The in-place passes (AVX2 where the CPU has it) give the weights and both moments the
    /// element formula's bits exactly, computed here one element at a time in the same order;
    /// 1003 elements, so the vector loops' tails run too.
    #[test]
    fn in_place_passes_give_the_formula_bit_for_bit() {
        let dev = candle_core::Device::Cpu;
        let n = 1003;
        let series = |a: usize, b: usize, scale: f32| -> Vec<f32> {
            (0..n).map(|i| (((i * a + b) % 97) as f32 - 48.0) * scale).collect()
        };
        let (theta0, g, m0) = (series(13, 5, 0.03), series(7, 11, 0.01), series(3, 1, 0.002));
        let v0: Vec<f32> = series(5, 2, 0.001).iter().map(|x| x * x).collect();
        let k = FusedCoeffs {
            scale: 0.7,
            decay: 0.9999,
            beta2: 0.999,
            one_minus_beta1: 0.1,
            one_minus_beta2: 0.001,
            step_size: 3e-3,
            bc2_sqrt: 0.3,
            eps: 1e-8,
        };
        let t = |v: &[f32]| Tensor::from_vec(v.to_vec(), n, &dev).unwrap();
        let (theta, grad, m, v) = (t(&theta0), t(&g), t(&m0), t(&v0));
        assert!(fusable(&theta, &grad, &m, &v));
        adamw_cpu(&theta, &grad, (&m, &v), &k).unwrap();
        let inv_bc2_sqrt = 1.0 / k.bc2_sqrt;
        let (mut want_t, mut want_m, mut want_v) = (vec![0f32; n], vec![0f32; n], vec![0f32; n]);
        for i in 0..n {
            let gs = g[i] * k.scale;
            want_m[i] = m0[i] + k.one_minus_beta1 * (gs - m0[i]);
            want_v[i] = v0[i] * k.beta2 + k.one_minus_beta2 * gs * gs;
            want_t[i] = theta0[i] * k.decay
                + (-k.step_size * want_m[i]) / (want_v[i].sqrt() * inv_bc2_sqrt + k.eps);
        }
        let bits = |x: &Tensor| -> Vec<u32> {
            x.to_vec1::<f32>().unwrap().iter().map(|v| v.to_bits()).collect()
        };
        let want_bits = |x: &[f32]| x.iter().map(|v| v.to_bits()).collect::<Vec<u32>>();
        assert_eq!(bits(&m), want_bits(&want_m), "m");
        assert_eq!(bits(&v), want_bits(&want_v), "v");
        assert_eq!(bits(&theta), want_bits(&want_t), "weights");
    }

    #[test]
    fn schedule_warms_up_then_decays() {
        let lr = |s| learning_rate(1.0, s, 4, 12, LrSchedule::Cosine);
        assert_eq!([lr(0), lr(1), lr(3)], [0.25, 0.5, 1.0]);
        assert!((lr(8) - 0.5).abs() < 1e-12);
        assert!(lr(12).abs() < 1e-12);
        assert_eq!(learning_rate(2.0, 100, 0, 10, LrSchedule::Constant), 2.0);
    }

    /// AdamW's first step from zero moments, without weight decay, moves every weight by the
    /// learning rate (to 1e-6); a scaled variable moves by the scaled one.
    #[test]
    fn scale_lr_gives_a_group_its_own_learning_rate() {
        let dev = candle_core::Device::Cpu;
        let var = |v: f32| Var::from_vec(vec![v; 4], (4,), &dev).unwrap();
        let (unet, text) = (var(1.0), var(1.0));
        let cfg = AdamWConfig { weight_decay: 0.0, ..AdamWConfig::default() };
        let mut opt = AdamW::new(
            vec![("text_encoder.w".into(), text.clone()), ("unet.w".into(), unet.clone())],
            cfg,
        )
        .unwrap();
        assert_eq!(opt.scale_lr("text_encoder.", 0.1), 1);
        assert_eq!(opt.scale_lr("vae.", 0.5), 0);
        let loss =
            (unet.as_tensor().sum_all().unwrap() + text.as_tensor().sum_all().unwrap()).unwrap();
        opt.step(&loss.backward().unwrap(), 1e-2, 1.0).unwrap();
        for (v, want) in [(&unet, 1.0 - 1e-2), (&text, 1.0 - 1e-3)] {
            for x in v.as_tensor().to_vec1::<f32>().unwrap() {
                assert!((x - want).abs() < 1e-6, "{x} vs {want}");
            }
        }
    }

    /// The fused CPU update and the tensor-operation update (the GPU path) agree over several
    /// steps with clipping and weight decay, to f32 rounding: 1e-6 absolute on values ~1 (the
    /// two evaluate AdamW's formula in a different order, and each step's difference feeds back
    /// through the next gradient).
    #[test]
    fn fused_cpu_update_matches_tensor_ops() {
        let dev = candle_core::Device::Cpu;
        let init: Vec<f32> = (0..257).map(|i| ((i * 37 % 101) as f32 / 50.0) - 1.0).collect();
        let make = || {
            let var = Var::from_vec(init.clone(), (257,), &dev).unwrap();
            let opt = AdamW::new(vec![("w".into(), var.clone())], AdamWConfig::default()).unwrap();
            (var, opt)
        };
        let ((a, mut fused), (b, mut plain)) = (make(), make());
        // The fused path really runs here (a silent fallback would compare the tensor path
        // with itself).
        let t = a.as_tensor();
        assert!(fusable(t, t, &fused.m[0], &fused.v[0]));
        // The moments are updated in place, so they must not share storage (they did: `v`
        // was made as a clone of `m`).
        let (m, v) = (CpuData::new(&fused.m[0]), CpuData::new(&fused.v[0]));
        assert_ne!(m.f32().unwrap().as_ptr(), v.f32().unwrap().as_ptr());
        drop((m, v));
        for step in 0..5 {
            let target = Tensor::from_vec(
                (0..257).map(|i| ((i * 13 + step * 7) % 29) as f32 / 10.0).collect::<Vec<_>>(),
                (257,),
                &dev,
            )
            .unwrap();
            let lr = 1e-2 * (step + 1) as f64;
            for (var, opt, fuse) in [(&a, &mut fused, true), (&b, &mut plain, false)] {
                let loss = (var.as_tensor() - &target).unwrap().sqr().unwrap().sum_all().unwrap();
                opt.step_with(&loss.backward().unwrap(), lr, 0.7, fuse).unwrap();
            }
        }
        let (x, y) =
            (a.as_tensor().to_vec1::<f32>().unwrap(), b.as_tensor().to_vec1::<f32>().unwrap());
        assert!(x != init, "the weights moved");
        for (p, q) in x.iter().zip(&y) {
            assert!((p - q).abs() <= 1e-6, "{p} vs {q}");
        }
        let saved = fused.state_tensors().unwrap();
        for key in ["exp_avg.w", "exp_avg_sq.w"] {
            let (p, q) = (&saved[key], &plain.state_tensors().unwrap()[key]);
            let diff =
                (p - q).unwrap().abs().unwrap().max_all().unwrap().to_scalar::<f32>().unwrap();
            assert!(diff <= 1e-6, "{key}: {diff}");
        }
        // A saved state is a copy: the next (in-place) step leaves it as it was.
        let before = saved["exp_avg.w"].to_vec1::<f32>().unwrap();
        let loss = a.as_tensor().sqr().unwrap().sum_all().unwrap();
        fused.step(&loss.backward().unwrap(), 1e-2, 1.0).unwrap();
        assert_eq!(saved["exp_avg.w"].to_vec1::<f32>().unwrap(), before);
        assert_ne!(fused.state_tensors().unwrap()["exp_avg.w"].to_vec1::<f32>().unwrap(), before);
    }
}
