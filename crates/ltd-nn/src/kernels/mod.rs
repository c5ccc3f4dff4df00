//! The CPU kernels: every `CustomOp` of ltd and the loops over raw slices under them. The
//! layers and [`crate::attention`] decide when a kernel applies (CPU tensors, the dtype, with or
//! without autograd) and otherwise run plain candle ops; nothing here is a layer.
//!
//! - `flash_attention.rs`: FlashAttention's streaming softmax on x86-64 (AVX2/FMA);
//! - `softmax.rs`: the row softmax with its own backward pass (training);
//! - `conv2d.rs`: the direct stride-1 convolution, forwards and backwards;
//! - `winograd.rs`: the stride-1 3×3 convolution by Winograd's minimal filtering (inference);
//! - `im2col.rs`: strided convolutions (the downsamplers) by unfolding and `gemm` (inference);
//! - `norm.rs`: the fused group and layer norm passes, forwards and backwards;
//! - `geglu.rs`: the fused GEGLU activation;
//! - `linear.rs`: a linear layer's product and bias in bands of rows (inference);
//! - `bias.rs`: a linear layer's bias added to its product in place;
//! - `upsample.rs`: nearest-neighbour upsampling by whole factors, forwards and backwards;
//! - `simd.rs`: the AVX2/FMA building blocks (`exp`, the erf GELU).
//!
//! This file holds what they share: float element access for f32/f16/bf16, a read view of a
//! tensor's data and a parallel loop over independent rows.

pub(crate) mod bias;
pub(crate) mod conv2d;
pub(crate) mod flash_attention;
pub(crate) mod geglu;
pub(crate) mod im2col;
pub(crate) mod linear;
pub(crate) mod norm;
pub(crate) mod simd;
pub(crate) mod softmax;
pub(crate) mod upsample;
pub(crate) mod winograd;

use candle_core::{
    bail, CpuStorage, DType, Layout, Result, Storage, StorageRef, Tensor, WithDType,
};
use half::{bf16, f16};

/// A float element the fused kernels read and write, computing in f32.
pub(crate) trait Elem: WithDType {
    fn to_f32(self) -> f32;
    fn from_f32(v: f32) -> Self;
}

impl Elem for f32 {
    #[inline(always)]
    fn to_f32(self) -> f32 {
        self
    }
    #[inline(always)]
    fn from_f32(v: f32) -> Self {
        v
    }
}

impl Elem for f16 {
    #[inline(always)]
    fn to_f32(self) -> f32 {
        f16::to_f32(self)
    }
    #[inline(always)]
    fn from_f32(v: f32) -> Self {
        f16::from_f32(v)
    }
}

impl Elem for bf16 {
    #[inline(always)]
    fn to_f32(self) -> f32 {
        bf16::to_f32(self)
    }
    #[inline(always)]
    fn from_f32(v: f32) -> Self {
        bf16::from_f32(v)
    }
}

/// The contiguous data of a tensor argument (a custom op's storage and layout), for the
/// kernels and the trainer's in-place optimiser passes.
pub fn contiguous<'a, T: WithDType>(s: &'a CpuStorage, l: &Layout) -> Result<&'a [T]> {
    match l.contiguous_offsets() {
        Some((a, b)) => Ok(&s.as_slice::<T>()?[a..b]),
        None => bail!("fused kernel: input has to be contiguous"),
    }
}

/// Whether `t` is a contiguous-or-not f32 CPU tensor outside any autograd graph: what the
/// inference kernels that read tensors directly accept.
pub(crate) fn plain_f32(t: &Tensor) -> bool {
    t.device().is_cpu() && t.dtype() == DType::F32 && !t.track_op()
}

/// A read view of a CPU tensor's data (the tensor's storage stays locked for reading while it
/// lives), for code that loops over raw elements: the fused kernels, the trainer's optimiser.
pub struct Data<'a> {
    storage: StorageRef<'a>,
    layout: &'a Layout,
}

impl<'a> Data<'a> {
    /// Views `t`.
    pub fn new(t: &'a Tensor) -> Self {
        let (storage, layout) = t.storage_and_layout();
        Self { storage, layout }
    }

    /// The elements, if the tensor is a contiguous f32 CPU tensor.
    pub fn f32(&self) -> Result<&[f32]> {
        match &*self.storage {
            Storage::Cpu(s) => contiguous::<f32>(s, self.layout),
            _ => bail!("fused kernel: expected a CPU tensor"),
        }
    }
}

/// A per-channel parameter (`[C]`, any float dtype) as f32.
pub(crate) fn params_f32(s: &CpuStorage, l: &Layout) -> Result<Vec<f32>> {
    Ok(match s {
        CpuStorage::F32(_) => contiguous::<f32>(s, l)?.to_vec(),
        CpuStorage::F16(_) => contiguous::<f16>(s, l)?.iter().map(|v| v.to_f32()).collect(),
        CpuStorage::BF16(_) => contiguous::<bf16>(s, l)?.iter().map(|v| v.to_f32()).collect(),
        _ => bail!("fused kernel: parameters must be f32, f16 or bf16"),
    })
}

/// The CPU threads the fused kernels use: candle's own count (its physical-core count, or
/// `RAYON_NUM_THREADS`), so that one setting governs every kernel; one inside candle's
/// `on_this_thread` (a caller that runs several computations at once, one per thread).
/// Asked once per process: without the variable candle counts cores by reading
/// `/proc/cpuinfo`, far too slow to repeat for every kernel call.
pub(crate) fn threads() -> usize {
    static THREADS: std::sync::OnceLock<usize> = std::sync::OnceLock::new();
    if candle_core::utils::is_on_this_thread() {
        return 1;
    }
    *THREADS.get_or_init(|| candle_core::utils::get_num_threads().max(1))
}

/// Threads worth using for `work` element operations (small jobs stay on one thread: spawning
/// costs more than it saves).
fn threads_for(work: usize) -> usize {
    const MIN_WORK_PER_THREAD: usize = 1 << 16;
    threads().min(work / MIN_WORK_PER_THREAD).max(1)
}

/// Runs `f(row_index, row)` for every `len`-element row of `dst`, in parallel (a memory pass:
/// split only where each thread gets [`threads_for`]'s share).
pub(crate) fn for_each_row_mut<D: Send>(
    dst: &mut [D],
    len: usize,
    f: impl Fn(usize, &mut [D]) + Sync,
) {
    let rows = dst.len().checked_div(len).unwrap_or(0);
    let threads = threads_for(dst.len()).min(rows.max(1));
    let per_thread = rows.div_ceil(threads).max(1);
    let chunks = dst.chunks_mut(per_thread * len.max(1)).enumerate().collect();
    for_each_parallel(chunks, |(t, d): (usize, &mut [D])| {
        for (i, d) in d.chunks_mut(len.max(1)).enumerate() {
            f(t * per_thread + i, d);
        }
    });
}

/// Runs `f(row_index, src_row, dst_row)` for every row (`src_len` elements in, `dst_len` out),
/// in parallel.
pub(crate) fn for_each_row<S: Sync, D: Send>(
    src: &[S],
    dst: &mut [D],
    (src_len, dst_len): (usize, usize),
    f: impl Fn(usize, &[S], &mut [D]) + Sync,
) {
    let rows = src.len().checked_div(src_len).unwrap_or(0);
    let threads = threads_for(src.len()).min(rows.max(1));
    if threads <= 1 || dst_len == 0 {
        for (i, (s, d)) in
            src.chunks(src_len.max(1)).zip(dst.chunks_mut(dst_len.max(1))).enumerate()
        {
            f(i, s, d);
        }
        return;
    }
    let per_thread = rows.div_ceil(threads);
    let chunks = src.chunks(per_thread * src_len).zip(dst.chunks_mut(per_thread * dst_len));
    for_each_parallel(chunks.enumerate().collect(), |(t, (s, d))| {
        for (i, (s, d)) in s.chunks(src_len).zip(d.chunks_mut(dst_len)).enumerate() {
            f(t * per_thread + i, s, d);
        }
    });
}

/// A vector of `rows · dst_len` f32 filled as [`for_each_row`] fills a destination, without
/// zero-filling it first (a `memset` of each output that the kernel then overwrites was 1.5%
/// of a one-thread `train-unet` step in the softmax alone).
///
/// # Safety
/// `f` writes every element of the row it is given (e.g. through [`write_row`]).
pub(crate) unsafe fn rows_into<S: Sync>(
    src: &[S],
    (src_len, dst_len): (usize, usize),
    f: impl Fn(usize, &[S], &mut [std::mem::MaybeUninit<f32>]) + Sync,
) -> Vec<f32> {
    let rows = src.len().checked_div(src_len).unwrap_or(0);
    let len = rows * dst_len;
    let mut out = Vec::<f32>::with_capacity(len);
    for_each_row(src, &mut out.spare_capacity_mut()[..len], (src_len, dst_len), f);
    // SAFETY: the capacity is `len`, `for_each_row` gives `f` every row, and `f` writes every
    // element of its row (the caller's contract).
    unsafe { out.set_len(len) };
    out
}

/// Writes `f(v)` for each `v` of `src` into the row `dst` (the same length) and returns it as
/// `f32`s, for passes that go on in place.
pub(crate) fn write_row<'a>(
    dst: &'a mut [std::mem::MaybeUninit<f32>],
    src: &[f32],
    f: impl Fn(f32) -> f32,
) -> &'a mut [f32] {
    assert_eq!(dst.len(), src.len(), "write_row: lengths differ");
    for (d, &v) in dst.iter_mut().zip(src) {
        d.write(f(v));
    }
    // SAFETY: every element was written just above; `MaybeUninit<f32>` has `f32`'s layout.
    unsafe { &mut *(dst as *mut [std::mem::MaybeUninit<f32>] as *mut [f32]) }
}

/// Largest buffer [`with_scratch`] keeps for the next call on its thread: the training
/// kernels' per-call buffers are far smaller; larger ones are freed as before.
const MAX_KEPT_SCRATCH: usize = 4 << 20;

thread_local! {
    static SCRATCH: std::cell::Cell<Vec<f32>> = const { std::cell::Cell::new(Vec::new()) };
}

/// Runs `f` on a buffer of `len` elements that this thread keeps between calls (up to
/// [`MAX_KEPT_SCRATCH`] elements), so that a kernel called hundreds of times a training step
/// neither allocates nor zero-fills a buffer each time (a `memset` of each call's fresh buffer
/// was 1.7% of a `train-unet` step). The contents are whatever the last user left: `f` must
/// write every element it reads. A nested call gets a buffer of its own.
pub(crate) fn with_scratch<R>(len: usize, f: impl FnOnce(&mut [f32]) -> R) -> R {
    let mut buf = SCRATCH.with(std::cell::Cell::take);
    if buf.len() < len {
        buf.resize(len, 0.0);
    }
    let out = f(&mut buf[..len]);
    if buf.len() <= MAX_KEPT_SCRATCH {
        SCRATCH.with(|cell| {
            // Keep the larger of this buffer and one a nested call may have put back.
            let other = cell.take();
            cell.set(if other.len() > buf.len() { other } else { buf });
        });
    }
    out
}

/// Runs `f(&mut state, unit)` for every unit in `0..units` on up to `threads` threads of the
/// pool at once (the calling thread among them; inline for one): each thread takes the next
/// unit from a shared counter, with its own `state` from `init` (its scratch buffers), so a
/// thread slowed by other work takes fewer units. Which thread runs a unit changes nothing it
/// computes.
pub(crate) fn for_each_unit<S>(
    threads: usize,
    units: usize,
    init: impl Fn() -> S + Sync,
    f: impl Fn(&mut S, usize) + Sync,
) {
    let next = std::sync::atomic::AtomicUsize::new(0);
    for_each_parallel((0..threads.min(units).max(1)).collect(), |_| {
        let mut state = init();
        loop {
            let unit = next.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
            if unit >= units {
                break;
            }
            f(&mut state, unit);
        }
    });
}

/// Runs `f(item)` for every item in parallel: the first on the calling thread, the others on
/// rayon's current pool (the global one, or candle's inside `Device::with_context`).
///
/// Why not a thread per item (what the kernels did before): a U-Net step calls the kernels
/// hundreds of times, and spawning an OS thread (its stack mapped and faulted in) cost more
/// than small calls compute; a training step of the shapes U-Net got slower with a second
/// thread. The pool's threads stay alive between calls. Which thread runs an item never changes
/// what it computes: the work is split before this is called.
pub(crate) fn for_each_parallel<T: Send>(items: Vec<T>, f: impl Fn(T) + Sync) {
    let mut items = items.into_iter();
    let Some(first) = items.next() else { return };
    let f = &f;
    rayon::in_place_scope(|scope| {
        for item in items {
            scope.spawn(move |_| f(item));
        }
        f(first);
    });
}

/// A matrix operand of [`gemm`]: its first element and the steps (in elements) from one row
/// and from one column to the next.
#[derive(Clone, Copy)]
pub(crate) struct Mat<P> {
    pub ptr: P,
    pub row: usize,
    pub col: usize,
}

/// `dst = lhs · rhs` (`m × k` times `k × n`), or `dst += lhs · rhs` with `accumulate`, in f32 on
/// the calling thread by the `gemm` crate: the one call every kernel's matrix products go
/// through (the kernels split the work over threads themselves).
///
/// # Safety
/// Each operand's `ptr`, `row` and `col` address valid elements for its whole shape, and no
/// other thread touches `dst`'s elements during the call.
pub(crate) unsafe fn gemm(
    (m, n, k): (usize, usize, usize),
    dst: Mat<*mut f32>,
    accumulate: bool,
    lhs: Mat<*const f32>,
    rhs: Mat<*const f32>,
) {
    let alpha = if accumulate { 1.0 } else { 0.0 };
    // SAFETY: the caller's contract; gemm takes (column, row) strides in that order.
    unsafe {
        gemm::gemm(
            m,
            n,
            k,
            dst.ptr,
            dst.col as isize,
            dst.row as isize,
            accumulate,
            lhs.ptr,
            lhs.col as isize,
            lhs.row as isize,
            rhs.ptr,
            rhs.col as isize,
            rhs.row as isize,
            alpha,
            1.0,
            false,
            false,
            false,
            gemm::Parallelism::None,
        )
    }
}

/// The statistics of a row for normalising it: a centred value is `(x − pivot) − delta`.
///
/// Sums run over `x − pivot` (the row's first element), which is exact for nearby values and
/// small, so short f32 runs (vectorisable) lose nothing even when |mean| ≫ std; the runs are
/// accumulated in f64.
#[derive(Debug, Clone, Copy, Default)]
pub(crate) struct RowStats {
    pub pivot: f32,
    pub delta: f32,
    /// Biased variance, as torch's norms use.
    pub var: f32,
}

impl RowStats {
    #[inline(always)]
    pub fn centred(&self, v: f32) -> f32 {
        (v - self.pivot) - self.delta
    }
}

/// [`RowStats`] of a row, over two passes.
#[inline]
pub(crate) fn row_stats<T: Elem>(row: &[T]) -> RowStats {
    let n = row.len().max(1) as f64;
    let pivot = row.first().map_or(0.0, |v| v.to_f32());
    let sum = run_sums(row, |v| v - pivot);
    let delta = (sum / n) as f32;
    let sq = run_sums(row, |v| {
        let d = (v - pivot) - delta;
        d * d
    });
    RowStats { pivot, delta, var: (sq / n) as f32 }
}

/// `Σ a·b` over two rows, summed as [`run_sums`] sums.
pub(crate) fn dot(a: &[f32], b: &[f32]) -> f32 {
    let mut total = 0f64;
    for (a, b) in a.chunks(64).zip(b.chunks(64)) {
        let mut lanes = [0f32; 8];
        let (mut ga, mut gb) = (a.chunks_exact(8), b.chunks_exact(8));
        for (x, y) in (&mut ga).zip(&mut gb) {
            for ((lane, x), y) in lanes.iter_mut().zip(x).zip(y) {
                *lane += x * y;
            }
        }
        let mut sum = ((lanes[0] + lanes[1]) + (lanes[2] + lanes[3]))
            + ((lanes[4] + lanes[5]) + (lanes[6] + lanes[7]));
        for (x, y) in ga.remainder().iter().zip(gb.remainder()) {
            sum += x * y;
        }
        total += sum as f64;
    }
    total as f32
}

/// `Σ f(v)` over `row`: in f32 over runs of 64, each in 8 interleaved partial sums (which the
/// compiler keeps in vector lanes; one running sum would add one element per add's latency),
/// and in f64 across runs.
#[inline(always)]
pub(crate) fn run_sums<T: Elem>(row: &[T], f: impl Fn(f32) -> f32) -> f64 {
    let mut total = 0f64;
    for run in row.chunks(64) {
        let mut lanes = [0f32; 8];
        let mut groups = run.chunks_exact(8);
        for group in &mut groups {
            for (lane, v) in lanes.iter_mut().zip(group) {
                *lane += f(v.to_f32());
            }
        }
        let mut sum = ((lanes[0] + lanes[1]) + (lanes[2] + lanes[3]))
            + ((lanes[4] + lanes[5]) + (lanes[6] + lanes[7]));
        for v in groups.remainder() {
            sum += f(v.to_f32());
        }
        total += sum as f64;
    }
    total
}

#[cfg(test)]
mod tests {
    /// Inside candle's `on_this_thread` the kernels and candle's products use one thread, and
    /// the count is back when it returns (also after a nested call).
    #[test]
    fn on_this_thread_means_one_thread_until_it_returns() {
        use candle_core::utils::{get_num_threads, on_this_thread};
        let outside = super::threads();
        on_this_thread(|| {
            assert_eq!((super::threads(), get_num_threads()), (1, 1));
            on_this_thread(|| assert_eq!(super::threads(), 1));
            assert_eq!(super::threads(), 1);
        });
        assert_eq!(super::threads(), outside);
        assert_eq!(get_num_threads().max(1), outside);
    }

    /// Every row is visited once, with its own index, also when the rows are split over
    /// threads (enough elements for two).
    #[test]
    fn for_each_row_mut_visits_every_row_with_its_index() {
        for (rows, len) in [(0, 4), (3, 5), (9, 1 << 15), (1, 1 << 18)] {
            let mut dst = vec![0u32; rows * len];
            super::for_each_row_mut(&mut dst, len, |i, row| {
                row.iter_mut().enumerate().for_each(|(j, v)| *v += (i * len + j) as u32 + 1)
            });
            assert!(dst.iter().enumerate().all(|(k, &v)| v == k as u32 + 1), "{rows}×{len}");
        }
    }
}
