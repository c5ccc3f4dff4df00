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

/// `x·Wᵀ (+ b)` for contiguous f32 `x: [rows, k]`, `w: [n, k]`, `b: [n]`; returns `[rows, n]`.
pub(crate) fn rows_times_weight(
    x: &[f32],
    w: &[f32],
    bias: Option<&[f32]>,
    (rows, k, n): (usize, usize, usize),
) -> Vec<f32> {
    assert_eq!(x.len(), rows * k, "linear: input is not [rows, k]");
    assert_eq!(w.len(), n * k, "linear: weight is not [n, k]");
    assert!(bias.is_none_or(|b| b.len() == n), "linear: bias is not [n]");
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
    let units = if parallel { (4 * threads).min(side.div_ceil(min_band)).max(1) } else { 1 };
    let band = side.div_ceil(units);
    let units = side.div_ceil(band);
    // Not zero-filled: every element is written by exactly one band's product below (the
    // pages are then touched for the first time by the thread that computes them).
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
                let dst = out_ptr.0.add(r0 * n + c0);
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
                        for (y, &bv) in row.iter_mut().zip(&b[c0..c0 + nb]) {
                            *y += bv;
                        }
                    }
                }
            }
        },
    );
    // SAFETY: the capacity is `len` and the bands above wrote all of it.
    unsafe { out.set_len(len) };
    out
}

#[cfg(test)]
mod tests {
    use super::*;

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
