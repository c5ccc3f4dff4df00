//! Strided 2-D convolution on the CPU (the downsamplers' stride-2 3×3 convolutions): each
//! image's input unfolded into a `[C_in·k², H'·W']` matrix (im2col) and multiplied by the
//! weights, `[C_out, C_in·k²]` as they are stored, in the `gemm` crate.
//!
//! candle's own strided convolution, which ran before, reorders the whole input to channels
//! last and regathers the whole weight tensor on the calling thread at every call (for SD 1.5's
//! 1280-channel downsampler that is 59 MB of weights, every step); here the unfolding and the
//! products are split over the threads, and the weights are read in place. A stride-2 output
//! is a quarter of the input's pixels, so the unfolded matrix is `k²/4` times the input: small
//! next to the layer's weights and activations.

use super::conv2d::{ConvShape, OutPtr};
use super::Mat;

/// Output height and width of `s` at `stride`.
pub(crate) fn out_hw(s: ConvShape, stride: usize) -> (usize, usize) {
    ((s.h + 2 * s.pad - s.k) / stride + 1, (s.w + 2 * s.pad - s.k) / stride + 1)
}

/// `conv(x, weight) + bias` at `stride` for contiguous f32 `x: [batch, cin, h, w]` and
/// `weight: [cout, cin, k, k]` (`s.valid()`); returns `[batch, cout, hout, wout]`. Each output
/// is its products' sum (in the `gemm` crate's order) plus the bias, as candle's convolution
/// followed by the bias adds it.
pub(crate) fn conv_strided(
    x: &[f32],
    weight: &[f32],
    bias: &[f32],
    s: ConvShape,
    stride: usize,
) -> Vec<f32> {
    let (hout, wout) = out_hw(s, stride);
    let (kk, p) = (s.k * s.k, hout * wout);
    let kdim = s.cin * kk;
    debug_assert_eq!(x.len(), s.batch * s.cin * s.h * s.w);
    debug_assert_eq!(weight.len(), s.cout * kdim);
    debug_assert_eq!(bias.len(), s.cout);
    let mut out = vec![0f32; s.batch * s.cout * p];
    if out.is_empty() || kdim == 0 {
        return out;
    }
    // `col[b][(ci·k + ky)·k + kx][oy·wout + ox] = x[b][ci][oy·stride + ky − pad][ox·stride +
    // kx − pad]`, zero outside the input; the rows are split over the threads.
    let mut col = vec![0f32; s.batch * kdim * p];
    let rows = s.batch * kdim;
    let threads = super::threads();
    let per = rows.div_ceil(threads).max(1);
    super::for_each_parallel(col.chunks_mut(per * p).enumerate().collect(), |(t, chunk)| {
        for (i, dst) in chunk.chunks_exact_mut(p).enumerate() {
            let r = t * per + i;
            let (b, kr) = (r / kdim, r % kdim);
            let (ci, ky, kx) = (kr / kk, (kr % kk) / s.k, kr % s.k);
            let plane = &x[(b * s.cin + ci) * s.h * s.w..][..s.h * s.w];
            for (oy, dst) in dst.chunks_exact_mut(wout).enumerate() {
                let Some(iy) = (oy * stride + ky).checked_sub(s.pad).filter(|&iy| iy < s.h) else {
                    continue;
                };
                let src = &plane[iy * s.w..][..s.w];
                for (ox, d) in dst.iter_mut().enumerate() {
                    if let Some(ix) = (ox * stride + kx).checked_sub(s.pad).filter(|&ix| ix < s.w) {
                        *d = src[ix];
                    }
                }
            }
        }
    });
    // Units: (image, block of output channels); two per thread where the channels allow.
    let blocks = (2 * threads).div_ceil(s.batch).min(s.cout.div_ceil(16)).max(1);
    let block = s.cout.div_ceil(blocks);
    let units: Vec<(usize, usize)> =
        (0..s.batch).flat_map(|b| (0..s.cout).step_by(block).map(move |c0| (b, c0))).collect();
    let per = units.len().div_ceil(threads).max(1);
    let (col, out_ptr) = (&col, OutPtr(out.as_mut_ptr()));
    super::for_each_parallel(units.chunks(per).collect(), |units| {
        #[allow(clippy::redundant_locals)]
        let out_ptr = out_ptr;
        for &(b, c0) in units {
            let n = block.min(s.cout - c0);
            // SAFETY: dst is `out[b][c0 .. c0 + n][..p]` (rows `p` apart), written by this unit
            // only; lhs is `weight[c0 .. c0 + n][..kdim]`; rhs is `col[b]`, `kdim × p`.
            unsafe {
                let dst = out_ptr.0.add((b * s.cout + c0) * p);
                super::gemm(
                    (n, p, kdim),
                    Mat { ptr: dst, row: p, col: 1 },
                    false,
                    Mat { ptr: weight.as_ptr().add(c0 * kdim), row: kdim, col: 1 },
                    Mat { ptr: col.as_ptr().add(b * kdim * p), row: p, col: 1 },
                );
                for (c, &bv) in bias[c0..c0 + n].iter().enumerate() {
                    for v in std::slice::from_raw_parts_mut(dst.add(c * p), p) {
                        *v += bv;
                    }
                }
            }
        }
    });
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The definition, in f64.
    fn reference(x: &[f32], w: &[f32], bias: &[f32], s: ConvShape, stride: usize) -> Vec<f32> {
        let (hout, wout) = out_hw(s, stride);
        let mut out = vec![0f32; s.batch * s.cout * hout * wout];
        for b in 0..s.batch {
            for co in 0..s.cout {
                for oy in 0..hout {
                    for ox in 0..wout {
                        let mut acc = bias[co] as f64;
                        for ci in 0..s.cin {
                            for ky in 0..s.k {
                                for kx in 0..s.k {
                                    let (iy, ix) = (oy * stride + ky, ox * stride + kx);
                                    if iy < s.pad || ix < s.pad {
                                        continue;
                                    }
                                    let (iy, ix) = (iy - s.pad, ix - s.pad);
                                    if iy >= s.h || ix >= s.w {
                                        continue;
                                    }
                                    acc += x[((b * s.cin + ci) * s.h + iy) * s.w + ix] as f64
                                        * w[((co * s.cin + ci) * s.k + ky) * s.k + kx] as f64;
                                }
                            }
                        }
                        out[((b * s.cout + co) * hout + oy) * wout + ox] = acc as f32;
                    }
                }
            }
        }
        out
    }

    /// Stride 2 and 3, padding 0 and 1, odd and even sizes (a last row and column that the
    /// stride does not reach), one output pixel, channel blocks: within 1e-5 of the definition
    /// relative to the largest output (f32 sums of up to 3·3·70 products).
    #[test]
    fn strided_convolution_matches_the_definition() {
        for &(b, cin, cout, h, w, k, pad, stride) in &[
            (2, 3, 5, 8, 8, 3, 1, 2),
            (1, 7, 40, 9, 6, 3, 1, 2),
            (3, 4, 3, 7, 11, 3, 0, 2),
            (1, 70, 33, 5, 5, 3, 1, 3),
            (2, 2, 2, 3, 3, 3, 0, 2),
            (1, 6, 4, 10, 10, 1, 0, 2),
        ] {
            let s = ConvShape { batch: b, cin, h, w, cout, k, pad };
            let u = |n, seed| -> Vec<f32> { ltd_test_support::uniform(n, seed) };
            let (x, wt, bias) = (u(b * cin * h * w, 1), u(cout * cin * k * k, 2), u(cout, 3));
            let ours = conv_strided(&x, &wt, &bias, s, stride);
            let expected = reference(&x, &wt, &bias, s, stride);
            assert_eq!(ours.len(), expected.len());
            let peak = expected.iter().fold(1f32, |a, v| a.max(v.abs()));
            let diff = ours.iter().zip(&expected).fold(0f32, |a, (p, q)| a.max((p - q).abs()));
            assert!(
                diff <= 1e-5 * peak,
                "{:?}: differs by {diff}",
                (b, cin, cout, h, w, k, pad, stride)
            );
        }
    }
}
