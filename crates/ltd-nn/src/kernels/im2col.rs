//! Convolution by unfolding (im2col) over the whole batch and one matrix product.
//!
//! The input is unfolded into `col[(ci·k + ky)·k + kx][b·P + oy·W' + ox] = x[b][ci][oy·stride +
//! ky − pad][ox·stride + kx − pad]` (zero outside the input; `P = H'·W'` output pixels per
//! image), and the output, channels first, is `W · col` with the weights `[C_out, C_in·k²]` as
//! they are stored, computed by the `gemm` crate in bands of columns (and blocks of output
//! channels, where the columns are few) that the threads share;
//! the weight gradient is `col · gᵀ` per group of images, accumulated in image order (in a few
//! parts, added in order, where the products have few rows).
//!
//! Where it is used, against the direct kernel of `conv2d.rs` (which multiplies per image and
//! per kernel tap, `C_out × C_in` by a band of pixels):
//! - strided convolutions (the downsamplers), which the direct kernel does not compute.
//!   candle's own strided convolution, which ran before, reorders the whole input to channels
//!   last and regathers the whole weight tensor on the calling thread at every call; a
//!   stride-2 output is a quarter of the input's pixels, so the unfolded matrix is `k²/4`
//!   times the input.
//! - stride-1 convolutions whose per-image, per-tap products are too small for the matrix
//!   kernel: few output pixels per image (the training U-Net's 4×4 and 8×8 levels) or few
//!   input channels (`conv_in`);
//! - the weight gradient in training, unless the output channels are few. See [`pays`] for the
//!   measurements.

use super::conv2d::{store_row, ConvShape, Epilogue, OutPtr};
use super::Mat;

/// Output height and width of `s` at `stride`.
pub(crate) fn out_hw(s: ConvShape, stride: usize) -> (usize, usize) {
    ((s.h + 2 * s.pad - s.k) / stride + 1, (s.w + 2 * s.pad - s.k) / stride + 1)
}

/// Largest unfolded batch the stride-1 forward accepts, in elements (64 MiB of f32): the
/// shapes it is for unfold to a few MiB; a large image with few channels should not.
const MAX_UNFOLDED: usize = 16 << 20;

/// Whether unfolding beats the direct kernel for a stride-1 convolution of shape `s`: its
/// forward (and input gradient, itself a convolution), or with `weight_grad` its weight
/// gradient. Measured on one thread of a 2-core AMD EPYC (AVX2) at batch 16, direct /
/// unfolded, ms:
///
/// | C_in→C_out, H×W | forward     | weight gradient |
/// |-----------------|-------------|-----------------|
/// | 128→128, 4×4    | 2.96 / 1.64 | 2.80 / 1.69     |
/// | 256→128, 4×4    | 6.13 / 3.09 | 7.30 / 3.02     |
/// | 64→128, 4×4     | 1.75 / 0.63 | 1.33 / 0.72     |
/// | 128→128, 8×8    | 8.57 / 5.67 | 6.57 / 6.35     |
/// | 192→64, 8×8     | 5.45 / 4.29 | 6.28 / 4.81     |
/// | 64→64, 8×8      | 1.83 / 1.72 | 1.93 / 1.47     |
/// | 4→64, 8×8       | 0.38 / 0.14 | 0.31 / 0.14     |
/// | 3→16, 32×32     | 1.20 / 0.40 | 0.60 / 0.59     |
/// | 32→32, 16×16    | 2.16 / 2.32 | 2.32 / 1.98     |
/// | 64→64, 16×16    | 6.43 / 7.57 | 7.49 / 6.70     |
/// | 16→16, 32×32    | 2.04 / 4.41 | 2.83 / 2.25     |
/// | 32→16, 32×32    | 4.12 / 10.5 | 5.48 / 4.32     |
/// | 64→4, 8×8       | 0.32 / 0.59 | 0.41 / 0.90     |
/// | 16→3, 32×32     | 0.49 / 1.82 | 0.73 / 1.84     |
///
/// (and level at batch 2 and 1 on 320 and 128 channels of 32² and 64², 74 and 19 ms.) So the
/// weight gradient whenever there are at least 16 output channels (the product's columns); the
/// forward also only at most 8×8 output pixels or at most 4 input channels, and while the
/// unfolded batch stays under [`MAX_UNFOLDED`]. A wide 3×3 convolution with too few output
/// tiles an image for Winograd's kernel (`conv2d::winograd_suits`) is unfolded at any size:
/// the direct kernel is for narrow layers (1280→1280 at 16×16, batch 1: 531 ms direct, 57 ms
/// unfolded on the Xeon).
pub(crate) fn pays(s: ConvShape, weight_grad: bool) -> bool {
    if weight_grad {
        return s.cout >= 16;
    }
    let (hout, wout) = s.out_hw();
    let few_tiles = super::conv2d::wide_3x3(s) && !super::conv2d::winograd_suits(s);
    let small = hout * wout <= 64 || s.cin <= 4 || few_tiles;
    let unfolded = s.cin * s.k * s.k * s.batch * hout * wout;
    small && s.cout >= 16 && unfolded <= MAX_UNFOLDED
}

/// The unfolded input: `rows` rows of `ld` elements, the first `cols` of each used.
struct Unfolded {
    col: Vec<f32>,
    rows: usize,
    cols: usize,
    ld: usize,
}

/// A row step for `cols` columns: a multiple of 64 bytes, plus 64. With a power-of-two step
/// the matrix kernel's reads down a column fall into a few cache sets (measured: 128×256×1152
/// and 32×4096×288 products at half speed).
fn row_step(cols: usize) -> usize {
    cols.div_ceil(16) * 16 + 16
}

/// Unfolds `x: [batch, cin, h, w]` for `s` at `stride` (see the module's comment); rows are
/// split over the threads.
fn unfold(x: &[f32], s: ConvShape, stride: usize) -> Unfolded {
    let (hout, wout) = out_hw(s, stride);
    let (rows, cols) = (s.cin * s.k * s.k, s.batch * hout * wout);
    let ld = row_step(cols);
    let mut col = vec![0f32; rows * ld];
    let per = rows.div_ceil(super::threads()).max(1);
    super::for_each_parallel(col.chunks_mut(per * ld).enumerate().collect(), |(t, chunk)| {
        let first = t * per;
        let images = 0..s.batch;
        unfold_rows(chunk, ld, x, (s, stride), first..first + chunk.len() / ld, images);
    });
    Unfolded { col, rows, cols, ld }
}

/// Writes rows `rows` of the unfolded matrix, restricted to the columns of `images`, into
/// `dst`: row `rows.start + i` at `i·ld`, image `images.start + j` from column `j·H'·W'`.
/// Every one of those elements is written (zeros outside the input), so `dst` may be reused.
fn unfold_rows(
    dst: &mut [f32],
    ld: usize,
    x: &[f32],
    (s, stride): (ConvShape, usize),
    rows: std::ops::Range<usize>,
    images: std::ops::Range<usize>,
) {
    let (hout, wout) = out_hw(s, stride);
    let (kk, p) = (s.k * s.k, hout * wout);
    for (r, row) in rows.zip(dst.chunks_mut(ld)) {
        let (ci, ky, kx) = (r / kk, (r % kk) / s.k, r % s.k);
        // The output columns whose input column `ox·stride + kx − pad` is in the image.
        let ox0 = s.pad.saturating_sub(kx).div_ceil(stride).min(wout);
        let ox1 = (s.w + s.pad).saturating_sub(kx).div_ceil(stride).clamp(ox0, wout);
        for (j, b) in images.clone().enumerate() {
            let plane = &x[(b * s.cin + ci) * s.h * s.w..][..s.h * s.w];
            if stride == 1 && (hout, wout) == (s.h, s.w) {
                same_size_row(&mut row[j * p..(j + 1) * p], plane, s, (ky, kx), ox0..ox1);
                continue;
            }
            for (oy, out) in row[j * p..(j + 1) * p].chunks_exact_mut(wout).enumerate() {
                let Some(iy) = (oy * stride + ky).checked_sub(s.pad).filter(|&iy| iy < s.h) else {
                    out.fill(0.0);
                    continue;
                };
                let src = &plane[iy * s.w..][..s.w];
                out[..ox0].fill(0.0);
                out[ox1..].fill(0.0);
                let out = &mut out[ox0..ox1];
                if out.is_empty() {
                    continue;
                }
                let first = ox0 * stride + kx - s.pad;
                if stride == 1 {
                    out.copy_from_slice(&src[first..first + out.len()]);
                } else {
                    for (d, &v) in out.iter_mut().zip(src[first..].iter().step_by(stride)) {
                        *d = v;
                    }
                }
            }
        }
    }
}

/// One image's part of an unfolded row of a stride-1 convolution whose output has its input's
/// size (`k = 2·pad + 1`): `out[oy·w + ox] = plane[(oy + ky − pad)·w + ox + kx − pad]`, zero
/// outside the input. That is the plane shifted by one offset, `(ky − pad)·w + kx − pad`: one
/// copy of the whole plane, zeros where the shift leaves it, and then zeros in the columns
/// `ox ∉ cols` whose input column is outside the image (the copy put the neighbouring row's
/// pixels there). Measured: the row-by-row copies, three calls per output row of 8–32
/// elements, were 12% of a `train-vae` step on one thread (Intel Xeon).
fn same_size_row(
    out: &mut [f32],
    plane: &[f32],
    s: ConvShape,
    (ky, kx): (usize, usize),
    cols: std::ops::Range<usize>,
) {
    let (n, w) = (plane.len(), s.w);
    if w == 0 {
        return;
    }
    let shift = (ky * w + kx) as isize - (s.pad * w + s.pad) as isize;
    // Outputs `q0..q1` read `plane[q + shift]` inside the plane.
    let q0 = (-shift).clamp(0, n as isize) as usize;
    let q1 = (n as isize - shift).clamp(q0 as isize, n as isize) as usize;
    out[..q0].fill(0.0);
    out[q1..].fill(0.0);
    if q1 > q0 {
        let from = (q0 as isize + shift) as usize;
        out[q0..q1].copy_from_slice(&plane[from..from + (q1 - q0)]);
    }
    // Column by column down the rows: a few elements per row, where a `fill` per row called
    // `memset` for each (measured at 2.7% of a `train-vae` step).
    for c in (0..cols.start).chain(cols.end..w) {
        for r in out.chunks_exact_mut(w) {
            r[c] = 0.0;
        }
    }
}

/// Column bands of an `n`-column product for `threads`: one band on one thread (its result
/// does not depend on the split: the `gemm` crate blocks the sums by their length only).
fn bands(n: usize, threads: usize) -> usize {
    if threads > 1 {
        (2 * threads).min(n / MIN_BAND).max(1)
    } else {
        1
    }
}

/// `conv(x, weight) + epilogue` at `stride` for contiguous f32 `x: [batch, cin, h, w]` and
/// `weight: [cout, cin, k, k]` (`s.valid()`); returns `[batch, cout, hout, wout]`. Each output
/// is its products' sum (in the `gemm` crate's order) with the epilogue's terms added as the
/// direct kernel adds them.
pub(crate) fn conv(
    x: &[f32],
    weight: &[f32],
    s: ConvShape,
    stride: usize,
    epi: Epilogue<'_>,
) -> Vec<f32> {
    let (hout, wout) = out_hw(s, stride);
    let p = hout * wout;
    debug_assert_eq!(x.len(), s.batch * s.cin * s.h * s.w);
    debug_assert_eq!(weight.len(), s.cout * s.cin * s.k * s.k);
    let mut out = vec![0f32; s.batch * s.cout * p];
    if out.is_empty() || s.cin == 0 {
        return out;
    }
    let u = unfold(x, s, stride);
    let mut prod = vec![0f32; s.cout * u.ld];
    let threads = super::threads();
    let nbands = bands(u.cols, threads);
    let width = u.cols.div_ceil(nbands);
    let nbands = u.cols.div_ceil(width);
    // Too few columns for a band per thread (SD 1.5's 8×8 level: 128): the output channels
    // are split too, so that the threads share the product. Neither split changes a sum.
    let blocks =
        if threads > 1 { (2 * threads).div_ceil(nbands).min(s.cout / MIN_BLOCK).max(1) } else { 1 };
    let block = s.cout.div_ceil(blocks);
    let blocks = s.cout.div_ceil(block);
    let prod_ptr = OutPtr(prod.as_mut_ptr());
    super::for_each_unit(
        threads,
        nbands * blocks,
        || (),
        |_, unit| {
            #[allow(clippy::redundant_locals)]
            let prod_ptr = prod_ptr;
            let (j0, co0) = ((unit / blocks) * width, (unit % blocks) * block);
            // SAFETY: dst is `prod[co0 .. co0 + m][j0 .. j0 + n]` (rows `ld` apart), this
            // unit's only; lhs is rows `co0 .. co0 + m` of `weight`, `cout × rows`; rhs is
            // `col[..rows][j0 .. j0 + n]`.
            unsafe {
                super::gemm(
                    (block.min(s.cout - co0), width.min(u.cols - j0), u.rows),
                    Mat { ptr: prod_ptr.0.add(co0 * u.ld + j0), row: u.ld, col: 1 },
                    false,
                    Mat { ptr: weight.as_ptr().add(co0 * u.rows), row: u.rows, col: 1 },
                    Mat { ptr: u.col.as_ptr().add(j0), row: u.ld, col: 1 },
                );
            }
        },
    );
    let prod = &prod;
    super::for_each_row_mut(&mut out, s.cout * p, |b, image| {
        for (co, dst) in image.chunks_exact_mut(p).enumerate() {
            let plane = b * s.cout + co;
            let temb = epi.channel_add.map(|t| t[plane]);
            let residual = epi.residual.map(|r| &r[plane * p..(plane + 1) * p]);
            let acc = &prod[co * u.ld + b * p..][..p];
            store_row(dst, acc, epi.bias[co], temb, residual, epi.scale);
        }
    });
    out
}

/// The weight gradient of a convolution at `stride`, `[cout, cin, k, k]`, from its input `x` and
/// output gradient `g: [batch, cout, hout, wout]`: per group of images (enough for sums of
/// at least [`MIN_TERMS`] terms), their unfolded input times `g`'s transpose, accumulated in
/// image order (in up to [`MAX_PARTS`] parts, added in order, for few rows). Rows of the
/// unfolded matrix are split over the threads, each unfolding its own into a buffer it reuses,
/// so the result does not depend on the thread count.
pub(crate) fn weight_grad(x: &[f32], g: &[f32], s: ConvShape, stride: usize) -> Vec<f32> {
    let (hout, wout) = out_hw(s, stride);
    let p = hout * wout;
    let rows = s.cin * s.k * s.k;
    if rows == 0 || s.cout == 0 || p == 0 || s.batch == 0 {
        return vec![0f32; s.cout * rows];
    }
    let per = MIN_TERMS.div_ceil(p).clamp(1, s.batch);
    let ld = row_step(per * p);
    // `g` regrouped per group of images: `[group][cout][image in group · p + pixel]`.
    let groups = s.batch.div_ceil(per);
    let gt = images_side_by_side(g, s.cout, p, per, ld);
    // `dWᵀ`, `[cin·k²][cout]`: the product with the unfolded rows as its rows runs at about
    // 80 GFLOP/s where `dW` itself ran at 30–60 (one thread, AVX2).
    // Too few rows for bands on two threads: the groups are also split into up to
    // `MAX_PARTS` consecutive parts, each summed on its own and the parts added in order (a
    // split by the shape alone, so the sums do not depend on the thread count either).
    let per_part = if rows < 2 * MIN_BAND { groups.div_ceil(MAX_PARTS) } else { groups };
    let parts = groups.div_ceil(per_part);
    // Not zero-filled: each part's first group writes its rows (`read_dst` false).
    let mut dwt = Vec::<f32>::with_capacity(parts * rows * s.cout);
    let threads = super::threads();
    let width = rows.div_ceil(bands(rows, threads));
    let nbands = rows.div_ceil(width);
    let dwt_ptr = OutPtr(dwt.as_mut_ptr());
    let gt = &gt;
    super::for_each_unit(
        threads,
        parts * nbands,
        || (),
        |(), unit| {
            #[allow(clippy::redundant_locals)]
            let dwt_ptr = dwt_ptr;
            let (part, band) = (unit / nbands, unit % nbands);
            let r0 = band * width;
            let nr = width.min(rows - r0);
            let first = part * per_part;
            // `unfold_rows` writes every element `gemm` reads, so a reused buffer will do.
            super::with_scratch(nr * ld, |buf| {
                for group in first..(first + per_part).min(groups) {
                    let images = group * per..((group + 1) * per).min(s.batch);
                    let terms = images.len() * p;
                    unfold_rows(&mut buf[..nr * ld], ld, x, (s, stride), r0..r0 + nr, images);
                    // SAFETY: dst is part `part`'s `dwt[r0 .. r0 + nr][..cout]`, this unit's only;
                    // lhs is the `nr × terms` unfolded rows (`ld` apart); rhs is the transpose of
                    // the group's `cout × terms` gradients (`ld` apart).
                    unsafe {
                        super::gemm(
                            (nr, s.cout, terms),
                            Mat {
                                ptr: dwt_ptr.0.add((part * rows + r0) * s.cout),
                                row: s.cout,
                                col: 1,
                            },
                            group > first,
                            Mat { ptr: buf.as_ptr(), row: ld, col: 1 },
                            Mat { ptr: gt.as_ptr().add(group * s.cout * ld), row: 1, col: ld },
                        );
                    }
                }
            });
        },
    );
    // SAFETY: every unit (part, band of rows) wrote its `nr × cout` block of the capacity, and
    // the units cover all parts and rows.
    unsafe { dwt.set_len(parts * rows * s.cout) };
    let (dwt, later) = dwt.split_at_mut(rows * s.cout);
    for part in later.chunks_exact(rows * s.cout) {
        dwt.iter_mut().zip(part).for_each(|(d, &v)| *d += v);
    }
    let mut dw = vec![0f32; s.cout * rows];
    for (r, src) in dwt.chunks_exact(s.cout).enumerate() {
        for (co, &v) in src.iter().enumerate() {
            dw[co * rows + r] = v;
        }
    }
    dw
}

/// `g: [batch, cout, p]` regrouped per group of `per` images, `[group][cout][ld]`, the group's
/// images side by side in each row (zeros after them).
fn images_side_by_side(g: &[f32], cout: usize, p: usize, per: usize, ld: usize) -> Vec<f32> {
    let groups = (g.len() / (cout * p).max(1)).div_ceil(per.max(1));
    let mut out = vec![0f32; groups * cout * ld];
    // One row of `out` per (group, channel): its images' planes side by side.
    super::for_each_row_mut(&mut out, ld, |row, dst| {
        let (group, co) = (row / cout, row % cout);
        for (j, b) in (group * per..(group + 1) * per).enumerate() {
            if let Some(src) = g.get((b * cout + co) * p..(b * cout + co + 1) * p) {
                dst[j * p..][..p].copy_from_slice(src);
            }
        }
    });
    out
}

/// The input gradient of a convolution at `stride`, `[batch, cin, h, w]`, from its output
/// gradient `g: [batch, cout, hout, wout]`: the unfolded gradient `Wᵀ · g` (`[cin·k², B·P]`),
/// folded back, each input element summing its taps in order. Folding runs per input channel
/// (their elements are disjoint), so the result does not depend on the thread count.
pub(crate) fn input_grad(g: &[f32], weight: &[f32], s: ConvShape, stride: usize) -> Vec<f32> {
    let (hout, wout) = out_hw(s, stride);
    let (kk, p) = (s.k * s.k, hout * wout);
    let (rows, cols) = (s.cin * kk, s.batch * p);
    let mut dx = vec![0f32; s.batch * s.cin * s.h * s.w];
    if dx.is_empty() || rows == 0 || p == 0 || s.cout == 0 {
        return dx;
    }
    let ld = row_step(cols);
    let gt = images_side_by_side(g, s.cout, p, s.batch, ld);
    let mut dcol = vec![0f32; rows * ld];
    let threads = super::threads();
    let width = cols.div_ceil(bands(cols, threads));
    let dcol_ptr = OutPtr(dcol.as_mut_ptr());
    super::for_each_unit(
        threads,
        cols.div_ceil(width),
        || (),
        |_, band| {
            #[allow(clippy::redundant_locals)]
            let dcol_ptr = dcol_ptr;
            let j0 = band * width;
            // SAFETY: dst is `dcol[..rows][j0 .. j0 + n]` (rows `ld` apart), this band's only; lhs
            // is the transpose of `weight` (`cout × rows`); rhs is `gt[..cout][j0 .. j0 + n]`.
            unsafe {
                super::gemm(
                    (rows, width.min(cols - j0), s.cout),
                    Mat { ptr: dcol_ptr.0.add(j0), row: ld, col: 1 },
                    false,
                    Mat { ptr: weight.as_ptr(), row: 1, col: rows },
                    Mat { ptr: gt.as_ptr().add(j0), row: ld, col: 1 },
                );
            }
        },
    );
    let plane = s.h * s.w;
    let units = s.batch * s.cin;
    let dx_ptr = OutPtr(dx.as_mut_ptr());
    let dcol = &dcol;
    super::for_each_unit(
        threads,
        units,
        || (),
        |_, unit| {
            #[allow(clippy::redundant_locals)]
            let dx_ptr = dx_ptr;
            let (b, ci) = (unit / s.cin, unit % s.cin);
            // SAFETY: image `b`'s channel `ci` is this unit's only.
            let dst = unsafe { std::slice::from_raw_parts_mut(dx_ptr.0.add(unit * plane), plane) };
            for tap in 0..kk {
                let (ky, kx) = (tap / s.k, tap % s.k);
                let src = &dcol[(ci * kk + tap) * ld + b * p..][..p];
                for (oy, src) in src.chunks_exact(wout).enumerate() {
                    let Some(iy) = (oy * stride + ky).checked_sub(s.pad).filter(|&iy| iy < s.h)
                    else {
                        continue;
                    };
                    for (ox, &v) in src.iter().enumerate() {
                        let ix = ox * stride + kx;
                        if ix >= s.pad && ix - s.pad < s.w {
                            dst[iy * s.w + ix - s.pad] += v;
                        }
                    }
                }
            }
        },
    );
    dx
}

/// Fewest terms per product of [`weight_grad`]: groups of images at least this many pixels.
const MIN_TERMS: usize = 1024;

/// Fewest columns (rows of `weight_grad`'s product) per band of [`bands`].
const MIN_BAND: usize = 128;
/// Fewest output channels per block where [`conv`] splits them between threads.
const MIN_BLOCK: usize = 64;

/// Most parts `weight_grad` splits its groups of images into when its rows are too few for
/// two bands.
const MAX_PARTS: usize = 4;

#[cfg(test)]
mod tests {
    use super::*;
    use ltd_test_support::uniform;

    /// Every product of a convolution of shape `s` at `stride`, as the indices of its input,
    /// weight and output elements (`x[b][ci][iy][ix]`, `w[co][ci][ky][kx]`, `out[b][co][oy][ox]`):
    /// the definition the forward and both gradients are checked against.
    fn for_each_product(s: ConvShape, stride: usize, mut f: impl FnMut(usize, usize, usize)) {
        let (hout, wout) = out_hw(s, stride);
        for b in 0..s.batch {
            for co in 0..s.cout {
                for ci in 0..s.cin {
                    for (ky, kx) in (0..s.k).flat_map(|ky| (0..s.k).map(move |kx| (ky, kx))) {
                        let wi = ((co * s.cin + ci) * s.k + ky) * s.k + kx;
                        for (oy, ox) in (0..hout).flat_map(|oy| (0..wout).map(move |ox| (oy, ox))) {
                            let (iy, ix) = (oy * stride + ky, ox * stride + kx);
                            if iy < s.pad || ix < s.pad || iy - s.pad >= s.h || ix - s.pad >= s.w {
                                continue;
                            }
                            let xi = ((b * s.cin + ci) * s.h + iy - s.pad) * s.w + ix - s.pad;
                            f(xi, wi, ((b * s.cout + co) * hout + oy) * wout + ox);
                        }
                    }
                }
            }
        }
    }

    /// Asserts `ours` is within `1e-5` of `expected` (f64 sums) relative to its largest value.
    fn assert_close(ours: &[f32], expected: &[f64], case: impl std::fmt::Debug) {
        assert_eq!(ours.len(), expected.len(), "{case:?}");
        let peak = expected.iter().fold(1f64, |a, v| a.max(v.abs()));
        let diff = ours.iter().zip(expected).fold(0f64, |a, (p, q)| a.max((*p as f64 - q).abs()));
        assert!(diff <= 1e-5 * peak, "{case:?}: differs by {diff}");
    }

    /// Unfolded convolutions, strided and not, within 1e-5 of the definition relative to the
    /// largest output (f32 sums of up to 3·3·70 products).
    #[test]
    fn unfolded_convolution_matches_the_definition() {
        for &(b, cin, cout, h, w, k, pad, stride) in &[
            // Stride 2 and 3, padding 0 and 1, odd and even sizes (a last row and column that
            // the stride does not reach), one output pixel.
            (2, 3, 5, 8, 8, 3, 1, 2),
            (1, 7, 40, 9, 6, 3, 1, 2),
            (3, 4, 3, 7, 11, 3, 0, 2),
            (1, 70, 33, 5, 5, 3, 1, 3),
            (2, 2, 2, 3, 3, 3, 0, 2),
            (1, 6, 4, 10, 10, 1, 0, 2),
            // Stride 1, as the direct kernel's small shapes use it: 1×1 and 5×5 kernels too.
            (3, 5, 16, 4, 4, 3, 1, 1),
            (2, 3, 20, 9, 7, 3, 1, 1),
            (2, 9, 17, 3, 5, 1, 0, 1),
            (1, 4, 16, 6, 5, 5, 2, 1),
            // One column, one row (every tap but the centre one partly outside the image).
            (1, 2, 16, 5, 1, 3, 1, 1),
            (2, 3, 16, 1, 6, 3, 1, 1),
        ] {
            let s = ConvShape { batch: b, cin, h, w, cout, k, pad };
            let (hout, wout) = out_hw(s, stride);
            let (x, wt) = (uniform(b * cin * h * w, 1), uniform(cout * cin * k * k, 2));
            let bias = uniform(cout, 3);
            let epi = Epilogue { bias: &bias, channel_add: None, residual: None, scale: 1.0 };
            let ours = conv(&x, &wt, s, stride, epi);
            let mut expected: Vec<f64> = (0..b * cout * hout * wout)
                .map(|i| bias[(i / (hout * wout)) % cout] as f64)
                .collect();
            for_each_product(s, stride, |xi, wi, oi| expected[oi] += x[xi] as f64 * wt[wi] as f64);
            assert_close(&ours, &expected, (b, cin, cout, h, w, k, pad, stride));
        }
    }

    /// The epilogue's terms are added as the direct kernel adds them: both kernels give the
    /// same outputs within 1e-5 of the largest (their sums run in different orders).
    #[test]
    fn unfolded_epilogue_equals_the_direct_kernel() {
        let s = ConvShape { batch: 3, cin: 6, h: 4, w: 5, cout: 18, k: 3, pad: 1 };
        let (x, wt, bias) = (uniform(3 * 6 * 20, 1), uniform(18 * 6 * 9, 2), uniform(18, 3));
        let (temb, residual) = (uniform(3 * 18, 4), uniform(3 * 18 * 20, 5));
        let epi = Epilogue {
            bias: &bias,
            channel_add: Some(&temb),
            residual: Some(&residual),
            scale: 2.0,
        };
        let ours = conv(&x, &wt, s, 1, epi);
        let direct = super::super::conv2d::direct(&x, &wt, s, epi);
        let direct: Vec<f64> = direct.iter().map(|&v| v as f64).collect();
        assert_close(&ours, &direct, s);
    }

    /// Split between threads by output channels (SD 1.5's 8×8 level has too few columns for
    /// bands of them), the product is the one-thread product bit for bit, and the definition's.
    #[test]
    fn unfolded_channel_blocks_equal_one_thread() {
        let s = ConvShape { batch: 2, cin: 40, h: 8, w: 8, cout: 200, k: 3, pad: 1 };
        let (x, wt, bias) = (uniform(2 * 40 * 64, 1), uniform(200 * 40 * 9, 2), uniform(200, 3));
        let epi = Epilogue { bias: &bias, channel_add: None, residual: None, scale: 1.0 };
        let shared = conv(&x, &wt, s, 1, epi);
        let alone = candle_core::utils::on_this_thread(|| conv(&x, &wt, s, 1, epi));
        assert_eq!(shared, alone);
        let direct = super::super::conv2d::direct(&x, &wt, s, epi);
        assert_close(&shared, &direct.iter().map(|&v| v as f64).collect::<Vec<_>>(), s);
    }

    /// The weight gradient `Σ_b,y,x g[b][co][y][x] · x[b][ci][y + ky − pad][x + kx − pad]`,
    /// against the definition in f64 within 1e-5 relative to the largest (sums of up to
    /// 3·1056 products).
    #[test]
    fn unfolded_weight_gradient_matches_the_definition() {
        for &(b, cin, cout, h, w, k, pad, stride) in &[
            (3, 5, 16, 4, 4, 3, 1, 1),
            (2, 3, 20, 6, 5, 3, 1, 1),
            (1, 4, 16, 5, 3, 1, 0, 1),
            (2, 2, 16, 4, 4, 5, 2, 1),
            // Groups of images: three of one image each, and 4 + 2 images (each group its
            // own part), and nine of one image in three parts of three.
            (3, 2, 16, 33, 32, 3, 1, 1),
            (6, 2, 17, 16, 16, 3, 1, 1),
            (9, 1, 16, 32, 32, 3, 1, 1),
            // Strided, with a last row and column the stride does not reach.
            (2, 5, 16, 9, 8, 3, 1, 2),
            (1, 3, 16, 10, 11, 3, 1, 3),
        ] {
            let s = ConvShape { batch: b, cin, h, w, cout, k, pad };
            let (hout, wout) = out_hw(s, stride);
            let (x, g) = (uniform(b * cin * h * w, 1), uniform(b * cout * hout * wout, 2));
            let ours = weight_grad(&x, &g, s, stride);
            let mut expected = vec![0f64; cout * cin * k * k];
            for_each_product(s, stride, |xi, wi, oi| expected[wi] += x[xi] as f64 * g[oi] as f64);
            assert_close(&ours, &expected, (b, cin, cout, h, w, k, pad, stride));
        }
    }

    /// The input gradient `dx[b][ci][y][x] = Σ g[b][co][oy][ox] · w[co][ci][ky][kx]` over the
    /// outputs that read `(y, x)`, strided and not, including a last row and column the stride
    /// does not reach: within 1e-5 of the definition (f64) relative to the largest.
    #[test]
    fn unfolded_input_gradient_matches_the_definition() {
        for &(b, cin, cout, h, w, k, pad, stride) in &[
            (2, 5, 16, 8, 8, 3, 1, 2),
            (1, 3, 5, 10, 11, 3, 1, 3),
            (3, 4, 6, 9, 8, 3, 0, 2),
            (2, 6, 4, 7, 6, 1, 0, 2),
            (2, 3, 7, 5, 6, 3, 1, 1),
        ] {
            let s = ConvShape { batch: b, cin, h, w, cout, k, pad };
            let (hout, wout) = out_hw(s, stride);
            let (g, wt) = (uniform(b * cout * hout * wout, 1), uniform(cout * cin * k * k, 2));
            let ours = input_grad(&g, &wt, s, stride);
            let mut expected = vec![0f64; b * cin * h * w];
            for_each_product(s, stride, |xi, wi, oi| expected[xi] += g[oi] as f64 * wt[wi] as f64);
            assert_close(&ours, &expected, (b, cin, cout, h, w, k, pad, stride));
        }
    }
}
