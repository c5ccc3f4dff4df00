//! A linear layer's product `x·Wᵀ + b` on the CPU outside autograd: bands of rows (or of
//! columns, where the rows are fewer) taken from a shared counter by the calling thread and
//! rayon's, each band one `gemm` call on the stored weight (`[out, in]`, read transposed in
//! place) with the bias added while the band is still in cache.
//!
//! Why not candle's `matmul`: it hands the whole product to `gemm`'s own threading, which
//! splits it once, evenly, over the pool while the calling thread waits; in a profile of a
//! two-thread SD 1.5 U-Net step one thread was idle about a tenth of the step inside those
//! products (one half done, the other still running). Here the calling thread works too, and
//! a band at a time evens out threads slowed by anything else. Each element is the same dot
//! product in `gemm`'s micro-kernel order plus the bias, as `matmul` then the bias gives it.

use super::conv2d::OutPtr;
use super::Mat;

/// Fewest rows in a band: the micro-kernel's 16-row tiles, a few times over.
const MIN_BAND_ROWS: usize = 64;
/// Fewest columns in a band of columns.
const MIN_BAND_COLUMNS: usize = 64;
/// Products smaller than this (multiply-adds) run in one call on the calling thread.
const MIN_PARALLEL_WORK: usize = 1 << 22;

/// The operands' lengths against the product's shape (a caller's bug, not bad input: the
/// layers check shapes before calling).
fn check_operands(x: &[f32], w: &[f32], bias: Option<&[f32]>, (rows, k, n): (usize, usize, usize)) {
    assert_eq!(x.len(), rows * k, "linear: input is not [rows, k]");
    assert_eq!(w.len(), n * k, "linear: weight is not [n, k]");
    assert!(bias.is_none_or(|b| b.len() == n), "linear: bias is not [n]");
}

/// `x·Wᵀ (+ b)` for contiguous f32 `x: [rows, k]`, `w: [n, k]`, `b: [n]`; returns `[rows, n]`.
pub(crate) fn rows_times_weight(
    x: &[f32],
    w: &[f32],
    bias: Option<&[f32]>,
    (rows, k, n): (usize, usize, usize),
) -> Vec<f32> {
    check_operands(x, w, bias, (rows, k, n));
    let len = rows * n;
    if len == 0 || k == 0 {
        // An empty sum is zero: only the bias remains.
        let mut out = vec![0f32; len];
        if let Some(b) = bias {
            out.chunks_exact_mut(n.max(1)).for_each(|row| row.copy_from_slice(b));
        }
        return out;
    }
    let threads = super::threads();
    let parallel = threads > 1 && rows * k * n >= MIN_PARALLEL_WORK;
    // Bands of rows (of `x` and the output) or of columns (rows of `w`): each band's `gemm`
    // call reads the whole of the other operand, so the split goes along the larger side.
    // With bands of rows on SD 1.5's 16×16 level (512 rows against a 10240×1280 weight), each
    // thread streamed the whole weight from memory per band and two threads took as long as
    // one.
    let by_columns = rows < n;
    let (side, min_band) = if by_columns { (n, MIN_BAND_COLUMNS) } else { (rows, MIN_BAND_ROWS) };
    let units = bands(side, min_band, parallel, threads);
    let band = side.div_ceil(units);
    let units = side.div_ceil(band);
    let band_product = |unit: usize, out: *mut f32| {
        let first = unit * band;
        let (r0, m, c0, nb) = if by_columns {
            (0, rows, first, band.min(n - first))
        } else {
            (first, band.min(rows - first), 0, n)
        };
        // SAFETY: dst is rows `r0 .. r0 + m`, columns `c0 .. c0 + nb` of the `[rows, n]`
        // output, which only this unit writes (`gemm` with `read_dst` false writes every
        // element without reading it); lhs is the same rows of `x` (`[rows, k]`, rows `k`
        // apart); rhs is columns `c0 .. c0 + nb` of `Wᵀ`, `rhs[kk][j] = w[j·k + kk]`,
        // within `w`'s `n·k`.
        unsafe {
            let dst = out.add(r0 * n + c0);
            super::gemm(
                (m, nb, k),
                Mat { ptr: dst, row: n, col: 1 },
                false,
                Mat { ptr: x.as_ptr().add(r0 * k), row: k, col: 1 },
                Mat { ptr: w.as_ptr().add(c0 * k), row: 1, col: k },
            );
            if let Some(b) = bias {
                for r in 0..m {
                    let row = std::slice::from_raw_parts_mut(dst.add(r * n), nb);
                    super::bias::add_to_row(row, &b[c0..c0 + nb]);
                }
            }
        }
    };
    // SAFETY: every element is written by exactly one band's product.
    unsafe { units_into(len, threads, units, band_product) }
}

/// How many bands a product's `side` (rows or columns) is split into: one unless the product
/// is worth sharing, else four per thread of at least `min_band` each.
fn bands(side: usize, min_band: usize, parallel: bool, threads: usize) -> usize {
    if parallel {
        (4 * threads).min(side.div_ceil(min_band)).max(1)
    } else {
        1
    }
}

/// A fresh vector of `len` f32 written by `f(unit, out)` for every unit in `0..units` on up to
/// `threads` threads ([`super::for_each_unit`]), `out` pointing at its first element. Not
/// zero-filled first: the pages are touched for the first time by the thread that computes
/// them.
///
/// # Safety
/// The units together write every element, no two the same one, and none outside `len`.
unsafe fn units_into(
    len: usize,
    threads: usize,
    units: usize,
    f: impl Fn(usize, *mut f32) + Sync,
) -> Vec<f32> {
    let mut out = Vec::<f32>::with_capacity(len);
    let out_ptr = OutPtr(out.as_mut_ptr());
    super::for_each_unit(
        threads,
        units,
        || (),
        |(), unit| {
            // Rebinding takes the whole `Sync` wrapper, not its raw-pointer field.
            #[allow(clippy::redundant_locals)]
            let out_ptr = out_ptr;
            f(unit, out_ptr.0)
        },
    );
    // SAFETY: the capacity is `len` and the units wrote all of it (the caller's contract).
    unsafe { out.set_len(len) };
    out
}

/// Most elements of a band's `[value, gate]` product in [`rows_times_weight_geglu`] (rounded
/// up to whole [`MIN_BAND_ROWS`]): 1 MiB, so that the band is still in the core's cache when
/// GEGLU reads it back.
const GEGLU_BAND_ELEMENTS: usize = 1 << 18;

/// Whether [`rows_times_weight_geglu`] takes a product of `rows × n` over `k`: one that
/// [`rows_times_weight`] splits into bands of rows (at least as many rows as columns; with
/// fewer it splits the columns, so that each thread reads part of the weight) and wide enough
/// (more than 64 columns) for the bits to stay the same (see there).
pub(crate) fn geglu_fuses(rows: usize, k: usize, n: usize) -> bool {
    n > 64 && n.is_multiple_of(2) && rows >= n && k > 0
}

/// `GEGLU(x·Wᵀ + b)` for contiguous f32 `x: [rows, k]`, `w: [2·inner, k]` (the value's rows,
/// then the gate's), `b: [2·inner]`: `[rows, inner]`, `value · GELU(gate)`, the same bits as
/// [`rows_times_weight`] followed by the GEGLU kernel, for the shapes [`geglu_fuses`] takes.
///
/// Why: diffusers' feed-forward writes the whole `[value, gate]` product before GEGLU halves
/// it: `[8192, 2560]`, 84 MB, on SD 1.5's 64×64 level at batch 2, in freshly mapped pages the
/// kernel zeroes on first touch (4% of a one-thread U-Net step on an AVX-512 Xeon) and reads
/// back from memory. Here each band of rows is multiplied into a buffer its thread keeps
/// ([`super::with_scratch`]) and halved while it is in cache.
///
/// The same bits: each band is one `gemm` call over the whole width. Which sums `gemm` forms
/// depends on the call's shape (`gemm-common`'s `gemm_basic_generic`): products of at most
/// 256 elements take dot-product kernels, those of at most 64 × 64 block `k` by 512, larger
/// ones by a length from `k` and the cache sizes alone. With `n > 64` and bands of at least 32
/// rows, a band and the unsplit product are both of the last kind, so each element is the
/// same sum, plus the bias.
///
/// # Safety
/// The CPU has AVX2 and FMA (`simd::available`), which the GEGLU rows use.
#[cfg(target_arch = "x86_64")]
pub(crate) unsafe fn rows_times_weight_geglu(
    x: &[f32],
    w: &[f32],
    bias: Option<&[f32]>,
    (rows, k, n): (usize, usize, usize),
) -> Vec<f32> {
    check_operands(x, w, bias, (rows, k, n));
    assert!(geglu_fuses(rows, k, n), "GEGLU: a product of {rows} × {n} is not fused");
    let inner = n / 2;
    let threads = super::threads();
    let parallel = threads > 1 && rows * k * n >= MIN_PARALLEL_WORK;
    // As many bands as `rows_times_weight` makes, or more where its bands would not fit
    // `GEGLU_BAND_ELEMENTS`; of nearly equal size, so none is below half of `MIN_BAND_ROWS`.
    let cap = (GEGLU_BAND_ELEMENTS / n).max(1).next_multiple_of(MIN_BAND_ROWS);
    let units = bands(rows, MIN_BAND_ROWS, parallel, threads).max(rows.div_ceil(cap));
    let band = rows.div_ceil(units);
    let units = rows.div_ceil(band);
    let band_geglu = |unit: usize, out: *mut f32| {
        let r0 = unit * band;
        let m = band.min(rows - r0);
        super::with_scratch(m * n, |h| {
            // SAFETY: dst is the `m × n` buffer (rows `n` apart); lhs is rows `r0 .. r0 +
            // m` of `x` (`[rows, k]`); rhs is `Wᵀ`, `rhs[kk][j] = w[j·k + kk]`.
            unsafe {
                super::gemm(
                    (m, n, k),
                    Mat { ptr: h.as_mut_ptr(), row: n, col: 1 },
                    false,
                    Mat { ptr: x.as_ptr().add(r0 * k), row: k, col: 1 },
                    Mat { ptr: w.as_ptr(), row: 1, col: k },
                );
            }
            for (r, row) in h.chunks_exact_mut(n).enumerate() {
                if let Some(b) = bias {
                    super::bias::add_to_row(row, b);
                }
                let (value, gate) = row.split_at(inner);
                // SAFETY: row `r0 + r` of the `[rows, inner]` output, which only this unit
                // writes; AVX2 and FMA per the caller.
                unsafe {
                    let dst = std::slice::from_raw_parts_mut(out.add((r0 + r) * inner), inner);
                    super::geglu::geglu_row(value, gate, dst);
                }
            }
        });
    };
    // SAFETY: each unit writes rows `r0 .. r0 + m` of the `[rows, inner]` output in full, and
    // the units' rows tile `0 .. rows`.
    unsafe { units_into(rows * inner, threads, units, band_geglu) }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The fused GEGLU gives the bits of the product followed by the GEGLU kernel, on one
    /// thread and shared, with one band or several per call, sums over `k` up to 600 (`gemm`
    /// blocks those above 512), widths not multiples of 8 (whose last elements take GEGLU's
    /// scalar tail); and declines the shapes it leaves to the two steps.
    #[cfg(target_arch = "x86_64")]
    #[test]
    fn geglu_fused_matches_product_then_geglu() {
        use candle_core::{Device, Tensor};
        if !crate::kernels::simd::available() {
            return;
        }
        // (rows, k, inner, fused): fused where the rows are at least the product's width and
        // that width is above 64; several bands per call from 2·inner = 66 up (at most 2^18
        // elements a band), bands of columns never.
        for &(rows, k, inner, fused) in &[
            (1, 1, 1, false),
            (17, 33, 12, false),
            (66, 5, 33, true),
            (300, 40, 100, true),
            (1100, 16, 260, true),
            (4100, 3, 40, true),
            (2000, 600, 700, true),
            (70, 300, 1003, false),
            (5, 0, 4, false),
        ] {
            let n = 2 * inner;
            let x = ltd_test_support::uniform(rows * k, 1);
            let w = ltd_test_support::uniform(n * k, 2);
            let b = ltd_test_support::uniform(n, 3);
            for bias in [None, Some(&b[..])] {
                let h = rows_times_weight(&x, &w, bias, (rows, k, n));
                let h = Tensor::from_vec(h, (rows, n), &Device::Cpu).unwrap();
                let want = crate::layers::geglu(&h, inner).unwrap();
                let want = want.flatten_all().unwrap().to_vec1::<f32>().unwrap();
                let case = (rows, k, inner);
                assert_eq!(geglu_fuses(rows, k, n), fused, "{case:?}");
                if !fused {
                    continue;
                }
                // SAFETY: AVX2 and FMA checked above.
                let shared = unsafe { rows_times_weight_geglu(&x, &w, bias, (rows, k, n)) };
                let alone = candle_core::utils::on_this_thread(|| unsafe {
                    rows_times_weight_geglu(&x, &w, bias, (rows, k, n))
                });
                assert_eq!(shared, want, "{case:?}");
                assert_eq!(alone, want, "{case:?} on one thread");
            }
        }
    }

    /// Against the definition in f64, on sizes around the band and tile edges, one thread's
    /// worth and several bands' worth, with and without a bias, and empty inner dimensions:
    /// within 1e-5 relative to the largest output (f32 sums of up to 700 terms below 0.25).
    #[test]
    fn matches_the_definition() {
        for &(rows, k, n) in &[
            (1, 1, 1),
            (3, 5, 7),
            (17, 33, 6),
            (300, 100, 250),
            (1000, 64, 130),
            // Bands of columns: fewer rows than columns, enough work for several threads.
            (70, 300, 1000),
            (5, 0, 4),
            (0, 3, 2),
        ] {
            let x = ltd_test_support::uniform(rows * k, 1);
            let w = ltd_test_support::uniform(n * k, 2);
            let b = ltd_test_support::uniform(n, 3);
            for bias in [None, Some(&b[..])] {
                let ours = rows_times_weight(&x, &w, bias, (rows, k, n));
                assert_eq!(ours.len(), rows * n);
                // Bands of rows or columns shared by the threads give the one-thread product
                // bit for bit (`gemm` blocks each sum by its length only).
                let alone = candle_core::utils::on_this_thread(|| {
                    rows_times_weight(&x, &w, bias, (rows, k, n))
                });
                assert_eq!(ours, alone, "{:?}", (rows, k, n));
                for r in 0..rows {
                    for j in 0..n {
                        let dot: f64 =
                            (0..k).map(|i| x[r * k + i] as f64 * w[j * k + i] as f64).sum();
                        let want = dot + bias.map_or(0.0, |b| b[j] as f64);
                        let got = ours[r * n + j] as f64;
                        assert!(
                            (got - want).abs() < 1e-5 * (1.0 + want.abs()),
                            "{:?}",
                            (rows, k, n, r, j)
                        );
                    }
                }
            }
        }
    }
}
