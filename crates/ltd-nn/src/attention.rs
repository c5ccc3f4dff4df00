//! Scaled dot-product attention, the one implementation every model uses (CLIP, T5, the
//! U-Net's self- and cross-attention, the VAE's mid-block attention).
//!
//! The naive form materialises `B·H·Lq·Lk` scores; at 512×512 in SD 1.5 that is 4096×4096
//! per head, 8 heads, batch 2: 1 GiB in f32 for one layer. Two bounded forms exist:
//!
//! - on x86-64 CPUs with AVX2/FMA, a fused streaming-softmax kernel (FlashAttention's
//!   algorithm, see `kernels/flash_attention.rs`) that never holds more than a few cache-sized
//!   blocks of scores per thread and is also by far the fastest;
//! - on CUDA in f16/bf16 with the `flash-attn` feature, FlashAttention-2 (candle-flash-attn)
//!   for every call it covers (no bias, no autograd, a head dimension it has kernels for);
//! - elsewhere (other CPUs, GPUs without the `flash-attn` feature, autograd), the chunked path
//!   splits the queries so that no more than [`AttentionOptions::max_score_bytes`] of scores
//!   exist at a time. Softmax rows are independent, so chunking changes no result.
//!
//! Which one a call runs is decided by [`choose_kernel`] from the requested [`AttentionImpl`]
//! and the call's [`CallShape`] alone, so the choice is tested on any machine.

use std::fmt;
use std::str::FromStr;

use candle_core::{DType, Device, Result, Tensor};

use crate::kernels::flash_attention::{self, FusedCpuAttention};
use crate::kernels::softmax::SoftmaxOp;

/// How attention is computed. A runtime option, not part of any model config.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum AttentionImpl {
    /// FlashAttention where it applies (CUDA, f16/bf16, the `flash-attn` feature; see
    /// `Flash`), else the fused CPU kernel where it applies (x86-64 with AVX2/FMA, no bias, no
    /// autograd); otherwise chunked when the scores would exceed the budget, naive below it.
    #[default]
    Auto,
    /// Always materialise the full score matrix.
    Naive,
    /// FlashAttention on CUDA (needs the `flash-attn` feature, f16/bf16: see
    /// [`AttentionImpl::check`]) for every call it covers; calls it does not cover (an
    /// attention bias such as CLIP's causal mask, autograd, an unsupported head dimension) run
    /// as `Chunked`.
    Flash,
    /// The query-chunked path (never the fused CPU kernel), chunked when over the budget.
    Chunked,
}

impl FromStr for AttentionImpl {
    type Err = String;

    /// `auto`, `flash`, `chunked` or `naive` (the `--attention` values).
    fn from_str(s: &str) -> std::result::Result<Self, String> {
        Ok(match s.to_ascii_lowercase().as_str() {
            "auto" => Self::Auto,
            "flash" => Self::Flash,
            "chunked" => Self::Chunked,
            "naive" => Self::Naive,
            _ => {
                return Err(format!(
                    "unknown attention implementation `{s}`: expected auto, flash, chunked or naive"
                ))
            }
        })
    }
}

impl fmt::Display for AttentionImpl {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            Self::Auto => "auto",
            Self::Flash => "flash",
            Self::Chunked => "chunked",
            Self::Naive => "naive",
        })
    }
}

/// Whether this build has FlashAttention (the `flash-attn` feature).
pub const FLASH_COMPILED: bool = cfg!(feature = "flash-attn");

impl AttentionImpl {
    /// Checks, before any model loads, that this implementation can run on `device` in
    /// `dtype`: `Flash` needs the `flash-attn` feature, a CUDA device and f16/bf16 (the other
    /// implementations run everywhere). The error says what is missing.
    pub fn check(self, device: &Device, dtype: DType) -> std::result::Result<(), String> {
        if self != Self::Flash {
            return Ok(());
        }
        if !FLASH_COMPILED {
            return Err("FlashAttention needs a build with the `flash-attn` feature \
                        (`cargo xtask build-cuda --flash-attn`)"
                .into());
        }
        if !device.is_cuda() {
            return Err(format!(
                "FlashAttention runs on CUDA only (the device is {:?})",
                device.location()
            ));
        }
        if !matches!(dtype, DType::F16 | DType::BF16) {
            return Err(format!("FlashAttention needs f16 or bf16 (the dtype is {dtype:?})"));
        }
        Ok(())
    }
}

/// The kernel one attention call runs.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Kernel {
    /// FlashAttention-2 on CUDA (candle-flash-attn).
    FlashCuda,
    /// The fused streaming-softmax CPU kernel.
    FusedCpu,
    /// Scores and softmax for a block of queries at a time, within the memory budget.
    Chunked,
    /// The whole score matrix at once.
    Naive,
}

/// What the choice of kernel depends on, read off one call's inputs ([`CallShape::of`]).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct CallShape {
    /// The tensors are on a CUDA device.
    pub cuda: bool,
    /// The tensors are on the CPU.
    pub cpu: bool,
    /// The dtype of the queries.
    pub dtype: DType,
    /// The head dimension of the queries and keys.
    pub head_dim: usize,
    /// The head dimension of the values.
    pub value_dim: usize,
    /// An additive attention bias (mask) is given.
    pub bias: bool,
    /// Any input is part of an autograd graph.
    pub grad: bool,
    /// Bytes of the full score matrix in the compute dtype.
    pub score_bytes: usize,
}

impl CallShape {
    /// The facts of a call to [`attention`] (`compute`: the dtype scores are computed in).
    fn of(q: &Tensor, k: &Tensor, v: &Tensor, bias: bool, compute: DType) -> Result<Self> {
        let (b, h, lq, head_dim) = q.dims4()?;
        Ok(Self {
            cuda: q.device().is_cuda(),
            cpu: q.device().is_cpu(),
            dtype: q.dtype(),
            head_dim,
            value_dim: v.dim(3)?,
            bias,
            grad: q.track_op() || k.track_op() || v.track_op(),
            score_bytes: b * h * lq * k.dim(2)? * compute.size_in_bytes(),
        })
    }

    /// Whether FlashAttention covers this call in a build with FlashAttention compiled in:
    /// CUDA, f16/bf16, no bias (ltd's masks are additive tensors, not FlashAttention's causal
    /// flag), no autograd (it has no backward pass here), equal query and value head
    /// dimensions that are a multiple of 8 and at most 512 (candle-flash-attn's kernels).
    pub fn flash_applies(&self) -> bool {
        self.cuda
            && matches!(self.dtype, DType::F16 | DType::BF16)
            && !self.bias
            && !self.grad
            && self.head_dim == self.value_dim
            && self.head_dim.is_multiple_of(8)
            && self.head_dim <= 512
    }

    /// Whether the fused CPU kernel covers this call (no bias, no autograd, CPU tensors of a
    /// float dtype), given that the CPU supports it (`cpu_kernel`).
    fn fused_cpu_applies(&self, cpu_kernel: bool) -> bool {
        self.cpu && !self.bias && !self.grad && self.dtype.is_float() && cpu_kernel
    }
}

/// The kernel a call runs: `requested` applied to the call's facts, in a build that has
/// FlashAttention compiled in or not (`flash_compiled`) on a CPU with the fused kernel or not
/// (`cpu_kernel`), under a score budget of `max_score_bytes`. Explicit `Flash` outside a
/// FlashAttention build or device is [`Kernel::FlashCuda`] all the same, so that
/// [`attention`] fails with the reason rather than silently running something else.
pub fn choose_kernel(
    requested: AttentionImpl,
    call: &CallShape,
    flash_compiled: bool,
    cpu_kernel: bool,
    max_score_bytes: usize,
) -> Kernel {
    let bounded =
        || if call.score_bytes > max_score_bytes { Kernel::Chunked } else { Kernel::Naive };
    match requested {
        AttentionImpl::Naive => Kernel::Naive,
        AttentionImpl::Chunked => bounded(),
        AttentionImpl::Flash => {
            let flash_runs =
                flash_compiled && call.cuda && matches!(call.dtype, DType::F16 | DType::BF16);
            if !flash_runs || call.flash_applies() {
                Kernel::FlashCuda
            } else {
                bounded()
            }
        }
        AttentionImpl::Auto if flash_compiled && call.flash_applies() => Kernel::FlashCuda,
        AttentionImpl::Auto if call.fused_cpu_applies(cpu_kernel) => Kernel::FusedCpu,
        AttentionImpl::Auto => bounded(),
    }
}

/// Options for [`attention`].
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct AttentionOptions {
    /// Which implementation to use.
    pub implementation: AttentionImpl,
    /// Upper bound on the bytes of attention scores alive at once in the chunked path.
    pub max_score_bytes: usize,
}

impl Default for AttentionOptions {
    fn default() -> Self {
        Self { implementation: AttentionImpl::Auto, max_score_bytes: 256 << 20 }
    }
}

/// `softmax(q·kᵀ·scale + bias)·v` for `q: [B, H, Lq, D]`, `k: [B, H, Lk, D]`,
/// `v: [B, H, Lk, Dv]`, `bias` broadcastable to `[B, H, Lq, Lk]`.
///
/// With `upcast`, scores and softmax are computed in f32 whatever the input dtype (diffusers'
/// `upcast_attention` / `upcast_softmax`); the fused CPU kernel always does. The result has the
/// dtype of `v`.
pub fn attention(
    q: &Tensor,
    k: &Tensor,
    v: &Tensor,
    bias: Option<&Tensor>,
    scale: f64,
    upcast: bool,
    opts: &AttentionOptions,
) -> Result<Tensor> {
    let (b, h, lq, _) = q.dims4()?;
    let lk = k.dim(2)?;
    let compute = if upcast { DType::F32 } else { q.dtype() };
    let call = CallShape::of(q, k, v, bias.is_some(), compute)?;
    let kernel = choose_kernel(
        opts.implementation,
        &call,
        FLASH_COMPILED,
        flash_attention::available(),
        opts.max_score_bytes,
    );
    match kernel {
        Kernel::FlashCuda => return flash_cuda(q, k, v, bias, scale),
        Kernel::FusedCpu => return fused_cpu(q, k, v, scale),
        Kernel::Chunked | Kernel::Naive => {}
    }
    let chunked = kernel == Kernel::Chunked;
    // Matrix products need each operand's batch dimensions laid out regularly; heads split
    // from `[B, L, H·D]` are not, so copy them once here rather than per chunk.
    let (k, v) = (k.contiguous()?, v.contiguous()?);
    if !chunked {
        return attention_scores_then_values(q, &k.t()?, &v, bias, scale, compute);
    }
    let rows_per_chunk = (opts.max_score_bytes / (b * h * lk * compute.size_in_bytes())).max(1);
    let k_t = k.t()?.contiguous()?;
    let mut outs = Vec::with_capacity(lq.div_ceil(rows_per_chunk));
    let mut start = 0;
    while start < lq {
        let len = rows_per_chunk.min(lq - start);
        let q_chunk = q.narrow(2, start, len)?;
        // The query axis of the bias is its second-to-last; size 1 there broadcasts.
        let bias_chunk = match bias {
            Some(bias) if bias.rank() >= 2 && bias.dim(bias.rank() - 2)? == lq => {
                Some(bias.narrow(bias.rank() - 2, start, len)?)
            }
            other => other.cloned(),
        };
        outs.push(attention_scores_then_values(
            &q_chunk,
            &k_t,
            &v,
            bias_chunk.as_ref(),
            scale,
            compute,
        )?);
        start += len;
    }
    Tensor::cat(&outs, 2)
}

/// The fused streaming kernel; computes in f32 whatever the input dtype (so always "upcast").
///
/// It reads heads split from `[B, L, H·D]` in place and writes `[B, Lq, H, Dv]`, returned as
/// its `[B, H, Lq, Dv]` view, so that [`merge_heads`] is free: no copy of the inputs or the
/// output on the calling thread alone (those copies were a tenth of the one-thread time left
/// in a two-thread U-Net step).
fn fused_cpu(q: &Tensor, k: &Tensor, v: &Tensor, scale: f64) -> Result<Tensor> {
    let out_dtype = v.dtype();
    let rows = |t: &Tensor| {
        let t = t.to_dtype(DType::F32)?;
        if t.stride()[3] == 1 {
            Ok(t)
        } else {
            t.contiguous()
        }
    };
    let out = rows(q)?.apply_op3_no_bwd(&rows(k)?, &rows(v)?, &FusedCpuAttention { scale })?;
    out.transpose(1, 2)?.to_dtype(out_dtype)
}

/// FlashAttention-2 on CUDA through candle-flash-attn (f16/bf16, no bias).
#[cfg(feature = "flash-attn")]
fn flash_cuda(
    q: &Tensor,
    k: &Tensor,
    v: &Tensor,
    bias: Option<&Tensor>,
    scale: f64,
) -> Result<Tensor> {
    if bias.is_some() || !q.device().is_cuda() || !matches!(q.dtype(), DType::F16 | DType::BF16) {
        candle_core::bail!(
            "AttentionImpl::Flash needs CUDA tensors in f16 or bf16 and no attention bias \
             (got {:?} {:?}, bias: {})",
            q.device().location(),
            q.dtype(),
            bias.is_some()
        )
    }
    // candle-flash-attn takes [B, L, H, D].
    let t = |x: &Tensor| x.transpose(1, 2)?.contiguous();
    candle_flash_attn::flash_attn(&t(q)?, &t(k)?, &t(v)?, scale as f32, false)?.transpose(1, 2)
}

#[cfg(not(feature = "flash-attn"))]
fn flash_cuda(_: &Tensor, _: &Tensor, _: &Tensor, _: Option<&Tensor>, _: f64) -> Result<Tensor> {
    candle_core::bail!(
        "AttentionImpl::Flash needs a build with the `flash-attn` feature (CUDA FlashAttention)"
    )
}

fn attention_scores_then_values(
    q: &Tensor,
    k_t: &Tensor,
    v: &Tensor,
    bias: Option<&Tensor>,
    scale: f64,
    compute: DType,
) -> Result<Tensor> {
    let out_dtype = v.dtype();
    // Scaling the queries costs Lq·D multiplications instead of Lq·Lk for the scores.
    let q = (q.to_dtype(compute)? * scale)?.contiguous()?;
    let k_t = k_t.to_dtype(compute)?;
    let mut scores = q.matmul(&k_t)?;
    if let Some(bias) = bias {
        scores = scores.broadcast_add(&bias.to_dtype(compute)?)?;
    }
    let probs = softmax_last_dim(&scores)?;
    probs.to_dtype(out_dtype)?.matmul(v)
}

/// An additive causal mask `[Lq, Lk]`: 0 on and below the diagonal, −∞ above it.
pub fn causal_mask(len: usize, dtype: DType, device: &candle_core::Device) -> Result<Tensor> {
    let mask: Vec<f32> = (0..len)
        .flat_map(|i| (0..len).map(move |j| if j > i { f32::NEG_INFINITY } else { 0.0 }))
        .collect();
    Tensor::from_vec(mask, (len, len), device)?.to_dtype(dtype)
}

/// Splits `[B, L, H·D]` into heads `[B, H, L, D]`.
pub fn split_heads(x: &Tensor, heads: usize) -> Result<Tensor> {
    let (b, l, c) = x.dims3()?;
    x.reshape((b, l, heads, c / heads))?.transpose(1, 2)
}

/// Merges heads `[B, H, L, D]` back into `[B, L, H·D]`.
pub fn merge_heads(x: &Tensor) -> Result<Tensor> {
    let (b, h, l, d) = x.dims4()?;
    x.transpose(1, 2)?.reshape((b, l, h * d))
}

/// Softmax over the last dimension: candle's fused kernel outside autograd; under autograd on
/// the CPU in f32 a fused kernel with its own backward pass (candle's records none), elsewhere
/// ordinary differentiable tensor ops.
pub fn softmax_last_dim(x: &Tensor) -> Result<Tensor> {
    if !x.track_op() {
        candle_nn::ops::softmax_last_dim(x)
    } else if x.device().is_cpu() && x.dtype() == DType::F32 {
        x.contiguous()?.apply_op1(SoftmaxOp)
    } else {
        candle_nn::ops::softmax(x, candle_core::D::Minus1)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use candle_core::Device;

    use ltd_test_support::rand;

    /// Under autograd the fused softmax gives candle's values and the gradient of its
    /// composed softmax, also with masked (−∞) entries.
    #[test]
    fn trainable_softmax_equals_the_composite() {
        let x = candle_core::Var::from_tensor(&(rand(&[3, 4, 9], 1) * 5.0).unwrap()).unwrap();
        let mask = causal_mask(9, DType::F32, &Device::Cpu).unwrap().narrow(0, 0, 4).unwrap();
        let input = x.as_tensor().broadcast_add(&mask).unwrap();
        let ours = softmax_last_dim(&input).unwrap();
        let theirs = candle_nn::ops::softmax(&input, candle_core::D::Minus1).unwrap();
        let diff = |a: &Tensor, b: &Tensor| {
            let d = (a - b).unwrap().abs().unwrap().flatten_all().unwrap();
            d.max(0).unwrap().to_scalar::<f32>().unwrap()
        };
        assert!(diff(&ours, &theirs) < 1e-6);
        let w = rand(&[3, 4, 9], 2);
        let loss = |y: &Tensor| (y * &w).unwrap().sqr().unwrap().sum_all().unwrap();
        let (g1, g2) = (loss(&ours).backward().unwrap(), loss(&theirs).backward().unwrap());
        let d = diff(g1.get(x.as_tensor()).unwrap(), g2.get(x.as_tensor()).unwrap());
        assert!(d < 1e-5, "gradient differs by {d}");
    }

    #[test]
    fn chunked_equals_naive() {
        let (q, k, v) = (rand(&[2, 3, 37, 8], 1), rand(&[2, 3, 29, 8], 2), rand(&[2, 3, 29, 5], 3));
        let bias = rand(&[37, 29], 4);
        let naive = AttentionOptions { implementation: AttentionImpl::Naive, ..Default::default() };
        // A budget of a few rows forces many chunks, including a ragged last one.
        let chunked = AttentionOptions {
            implementation: AttentionImpl::Auto,
            max_score_bytes: 2 * 3 * 29 * 4 * 5,
        };
        let a = attention(&q, &k, &v, Some(&bias), 0.3, false, &naive).unwrap();
        let b = attention(&q, &k, &v, Some(&bias), 0.3, false, &chunked).unwrap();
        assert_eq!(a.dims(), [2, 3, 37, 5]);
        let diff = (a - b).unwrap().abs().unwrap().max_all().unwrap().to_scalar::<f32>().unwrap();
        assert!(diff < 1e-6, "max |naive − chunked| = {diff}");
    }

    #[test]
    fn fused_equals_naive_for_split_heads_and_half_precision() {
        // Heads split from [B, L, H·D] (non-contiguous), as the models pass them.
        let x = rand(&[2, 300, 3 * 16], 7);
        let c = rand(&[2, 11, 3 * 16], 8);
        let (q, k) = (split_heads(&x, 3).unwrap(), split_heads(&c, 3).unwrap());
        let v = split_heads(&rand(&[2, 11, 3 * 16], 9), 3).unwrap();
        let naive = AttentionOptions { implementation: AttentionImpl::Naive, ..Default::default() };
        let auto = AttentionOptions::default();
        for (q, k, v) in [(&q, &q, &q), (&q, &k, &v)] {
            let a = attention(q, k, v, None, 0.25, false, &naive).unwrap();
            let b = attention(q, k, v, None, 0.25, false, &auto).unwrap();
            let diff = (a - b).unwrap().abs().unwrap().max_all().unwrap().to_scalar::<f32>();
            assert!(diff.unwrap() < 1e-6);
        }
        let half = |t: &Tensor| t.to_dtype(DType::F16).unwrap();
        let a = attention(&q, &k, &v, None, 0.25, true, &naive).unwrap();
        let b = attention(&half(&q), &half(&k), &half(&v), None, 0.25, false, &auto).unwrap();
        assert_eq!(b.dtype(), DType::F16);
        let diff = (a - b.to_dtype(DType::F32).unwrap()).unwrap().abs().unwrap();
        // f16 inputs and output (|values| < 0.5): a few ulp of f16.
        assert!(diff.max_all().unwrap().to_scalar::<f32>().unwrap() < 2e-3);
    }

    /// SD 1.5's U-Net self-attention at 512² in f16 on CUDA: 4096 tokens, heads of 40.
    fn cuda_call() -> CallShape {
        CallShape {
            cuda: true,
            cpu: false,
            dtype: DType::F16,
            head_dim: 40,
            value_dim: 40,
            bias: false,
            grad: false,
            score_bytes: 2 * 8 * 4096 * 4096 * 2,
        }
    }

    /// One case of the kernel choice: the request, the call, whether FlashAttention is
    /// compiled in and whether the CPU has the fused kernel, and the kernel expected (budget:
    /// the default 256 MiB).
    fn check(req: &str, call: CallShape, flash: bool, cpu_kernel: bool, want: Kernel) {
        let requested: AttentionImpl = req.parse().unwrap();
        let got = choose_kernel(requested, &call, flash, cpu_kernel, 256 << 20);
        assert_eq!(got, want, "{req} {call:?} flash compiled: {flash}, cpu kernel: {cpu_kernel}");
    }

    #[test]
    fn auto_picks_flash_on_cuda_in_half_precision_and_falls_back_elsewhere() {
        use Kernel::*;
        let cuda = cuda_call();
        let cpu = CallShape { cuda: false, cpu: true, dtype: DType::F32, ..cuda };
        let small = CallShape { score_bytes: 1 << 20, ..cuda };
        check("auto", cuda, true, false, FlashCuda);
        check("auto", CallShape { dtype: DType::BF16, ..cuda }, true, false, FlashCuda);
        // The VAE's single head of 512 channels is covered, CLIP's causal mask is not.
        check("auto", CallShape { head_dim: 512, value_dim: 512, ..cuda }, true, false, FlashCuda);
        // Not compiled in, f32, a bias, autograd, an unsupported head dimension (the tiny
        // fixtures' heads of 4, or over 512), unequal value width: the budgeted path.
        check("auto", cuda, false, false, Chunked);
        check("auto", small, false, false, Naive);
        for other in [
            CallShape { dtype: DType::F32, ..cuda },
            CallShape { bias: true, ..cuda },
            CallShape { grad: true, ..cuda },
            CallShape { head_dim: 4, value_dim: 4, ..cuda },
            CallShape { head_dim: 640, value_dim: 640, ..cuda },
            CallShape { value_dim: 32, ..cuda },
        ] {
            check("auto", other, true, false, Chunked);
        }
        // The CPU choice is unchanged by a FlashAttention build.
        for flash in [false, true] {
            check("auto", cpu, flash, true, FusedCpu);
            check("auto", CallShape { dtype: DType::F16, ..cpu }, flash, true, FusedCpu);
            check("auto", CallShape { bias: true, ..cpu }, flash, true, Chunked);
            check("auto", cpu, flash, false, Chunked);
            check("auto", CallShape { score_bytes: 1 << 20, ..cpu }, flash, false, Naive);
        }
    }

    #[test]
    fn explicit_choices_are_obeyed() {
        use Kernel::*;
        let cuda = cuda_call();
        let cpu = CallShape { cuda: false, cpu: true, dtype: DType::F32, ..cuda };
        check("naive", cuda, true, true, Naive);
        check("chunked", cuda, true, true, Chunked);
        check("chunked", CallShape { score_bytes: 1 << 20, ..cpu }, false, true, Naive);
        check("flash", cuda, true, false, FlashCuda);
        // Calls FlashAttention does not cover run chunked under an explicit `flash` too …
        check("flash", CallShape { bias: true, ..cuda }, true, false, Chunked);
        check("flash", CallShape { head_dim: 4, value_dim: 4, ..cuda }, true, false, Chunked);
        // … but without FlashAttention at all it is chosen, so that the call fails and says why.
        check("flash", cuda, false, false, FlashCuda);
        check("flash", cpu, true, true, FlashCuda);
    }

    #[test]
    fn flash_is_checked_before_loading() {
        for ok in ["auto", "chunked", "naive"] {
            let imp: AttentionImpl = ok.parse().unwrap();
            assert_eq!(imp.to_string(), ok);
            assert!(imp.check(&Device::Cpu, DType::F32).is_ok());
        }
        let err = AttentionImpl::Flash.check(&Device::Cpu, DType::F16).unwrap_err();
        let want = if FLASH_COMPILED { "runs on CUDA only" } else { "`flash-attn` feature" };
        assert!(err.contains(want), "{err}");
        let err = "fast".parse::<AttentionImpl>().unwrap_err();
        assert!(err.contains("auto, flash, chunked or naive"), "{err}");
        // Without the feature, a forced Flash call is an error, not a silent fallback.
        if !FLASH_COMPILED {
            let q = rand(&[1, 1, 4, 8], 1);
            let flash =
                AttentionOptions { implementation: AttentionImpl::Flash, ..Default::default() };
            let err = attention(&q, &q, &q, None, 1.0, false, &flash).unwrap_err().to_string();
            assert!(err.contains("flash-attn"), "{err}");
        }
    }

    #[test]
    fn causal_mask_blocks_the_future() {
        let (q, k) = (rand(&[1, 1, 4, 4], 5), rand(&[1, 1, 4, 4], 6));
        let v = Tensor::eye(4, DType::F32, &Device::Cpu).unwrap().reshape((1, 1, 4, 4)).unwrap();
        let mask = causal_mask(4, DType::F32, &Device::Cpu).unwrap();
        let p = attention(&q, &k, &v, Some(&mask), 1.0, false, &AttentionOptions::default())
            .unwrap()
            .squeeze(0)
            .unwrap()
            .squeeze(0)
            .unwrap()
            .to_vec2::<f32>()
            .unwrap();
        for (i, row) in p.iter().enumerate() {
            assert!(row[i + 1..].iter().all(|&x| x == 0.0), "row {i}: {row:?}");
            assert!((row.iter().sum::<f32>() - 1.0).abs() < 1e-6);
        }
    }
}
