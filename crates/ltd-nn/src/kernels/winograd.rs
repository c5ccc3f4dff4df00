//! Stride-1 3×3 convolution on the CPU by Winograd's minimal filtering (Lavin & Gray 2016),
//! `F(m×m, 3×3)` with `m` = 4 or 2: each `m×m` block of output pixels comes from an
//! `α×α` (`α = m + 2`) block of input through `Y = Aᵀ [ (G g Gᵀ) ⊙ (Bᵀ d B) ] A`, so the
//! channel sums are `α²` matrix products with `α²/m²` fewer multiplies than the direct
//! kernel's nine (4× fewer for `F(4×4, 3×3)`, 2.25× for `F(2×2, 3×3)`).
//!
//! The three steps run per unit of work, a band of consecutive tiles (across images when the
//! images are small) and a block of output channels, so that everything a unit touches stays
//! in cache: the input transform writes `V[ξ][ci][tile]`, the `α²` products
//! `M[ξ] = U[ξ] · V[ξ]` run in the `gemm` crate, and the output transform adds the bias, time
//! embedding and residual while it writes, as the direct kernel of `conv2d.rs` does. The
//! weights are transformed once per call (one small matrix product per input channel) and are
//! not kept: stored, they would be `α²/9` times the weights.
//!
//! The transforms round differently from the direct sum; the unit tests bound the difference,
//! and the layers use this kernel only for inference (training keeps the direct kernel).

use std::sync::atomic::{AtomicUsize, Ordering};

use super::conv2d::{ConvShape, Epilogue, OutPtr};

/// Bytes of a unit's transformed input and product blocks that a band aims for.
const BAND_BYTES: usize = 4 << 20;
/// Fewest tiles in a band: narrower products waste the micro-kernel and repack the weights
/// too often.
const MIN_BAND_TILES: usize = 32;
/// Smallest block of output channels a unit computes.
const MIN_CHANNEL_BLOCK: usize = 64;

/// The output tile size `m` of `F(m×m, 3×3)`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Tile {
    /// `F(2×2, 3×3)`: 4×4 input tiles, the smallest rounding error.
    F2,
    /// `F(4×4, 3×3)`: 6×6 input tiles, the fewest multiplies.
    F4,
}

/// `Bᵀ`, `G` and `Aᵀ` of one tile size (rows of `α`, `3` and `α` columns, flattened).
struct Transforms {
    m: usize,
    alpha: usize,
    bt: &'static [f32],
    g: &'static [f64],
    at: &'static [f32],
}

#[rustfmt::skip]
const F2: Transforms = Transforms {
    m: 2,
    alpha: 4,
    bt: &[
        1.0, 0.0, -1.0, 0.0,
        0.0, 1.0, 1.0, 0.0,
        0.0, -1.0, 1.0, 0.0,
        0.0, 1.0, 0.0, -1.0,
    ],
    g: &[
        1.0, 0.0, 0.0,
        0.5, 0.5, 0.5,
        0.5, -0.5, 0.5,
        0.0, 0.0, 1.0,
    ],
    at: &[
        1.0, 1.0, 1.0, 0.0,
        0.0, 1.0, -1.0, -1.0,
    ],
};

#[rustfmt::skip]
const F4: Transforms = Transforms {
    m: 4,
    alpha: 6,
    bt: &[
        4.0, 0.0, -5.0, 0.0, 1.0, 0.0,
        0.0, -4.0, -4.0, 1.0, 1.0, 0.0,
        0.0, 4.0, -4.0, -1.0, 1.0, 0.0,
        0.0, -2.0, -1.0, 2.0, 1.0, 0.0,
        0.0, 2.0, -1.0, -2.0, 1.0, 0.0,
        0.0, 4.0, 0.0, -5.0, 0.0, 1.0,
    ],
    g: &[
        1.0 / 4.0, 0.0, 0.0,
        -1.0 / 6.0, -1.0 / 6.0, -1.0 / 6.0,
        -1.0 / 6.0, 1.0 / 6.0, -1.0 / 6.0,
        1.0 / 24.0, 1.0 / 12.0, 1.0 / 6.0,
        1.0 / 24.0, -1.0 / 12.0, 1.0 / 6.0,
        0.0, 0.0, 1.0,
    ],
    at: &[
        1.0, 1.0, 1.0, 1.0, 1.0, 0.0,
        0.0, 1.0, -1.0, 2.0, -2.0, 0.0,
        0.0, 1.0, 1.0, 4.0, 4.0, 0.0,
        0.0, 1.0, -1.0, 8.0, -8.0, 1.0,
    ],
};

/// `out = L · D · Lᵀ` for the `rows × alpha` matrix `L` and the `alpha × alpha` block `D`
/// (row-major; `out` is `rows × rows`): Winograd's input (`L = Bᵀ`) and output (`L = Aᵀ`)
/// transforms. `tmp` holds `L · D`.
#[inline(always)]
fn sandwich(l: &[f32], rows: usize, alpha: usize, d: &[f32], tmp: &mut [f32], out: &mut [f32]) {
    for r in 0..rows {
        for c in 0..alpha {
            let mut acc = 0.0;
            for k in 0..alpha {
                acc += l[r * alpha + k] * d[k * alpha + c];
            }
            tmp[r * alpha + c] = acc;
        }
    }
    for r in 0..rows {
        for c in 0..rows {
            let mut acc = 0.0;
            for k in 0..alpha {
                acc += tmp[r * alpha + k] * l[c * alpha + k];
            }
            out[r * rows + c] = acc;
        }
    }
}

/// `conv(x, weight) + epilogue` for a stride-1 3×3 convolution of contiguous f32 `x` and
/// `weight` (any padding); returns `[batch, cout, hout, wout]`, as `conv2d::conv2d` does.
pub(crate) fn conv3x3(
    x: &[f32],
    weight: &[f32],
    s: ConvShape,
    epi: Epilogue<'_>,
    tile: Tile,
) -> Vec<f32> {
    debug_assert_eq!(s.k, 3);
    let t = match tile {
        Tile::F2 => &F2,
        Tile::F4 => &F4,
    };
    let (m, alpha) = (t.m, t.alpha);
    let aa = alpha * alpha;
    let (hout, wout) = s.out_hw();
    debug_assert_eq!(x.len(), s.batch * s.cin * s.h * s.w);
    debug_assert_eq!(weight.len(), s.cout * s.cin * 9);
    let mut out = vec![0f32; s.batch * s.cout * hout * wout];
    if out.is_empty() {
        return out;
    }
    let threads = super::threads();
    let u = transform_weights(weight, s, t, threads);
    let u = &u;

    let (tiles_y, tiles_x) = (hout.div_ceil(m), wout.div_ceil(m));
    let per_image = tiles_y * tiles_x;
    let total = s.batch * per_image;
    let tile_bytes = aa * (s.cin + s.cout) * 4;
    let mut band = (BAND_BYTES / tile_bytes).max(MIN_BAND_TILES).min(total);
    // Enough bands to keep every thread busy, while they stay wide enough.
    let want = 2 * threads;
    if total.div_ceil(band) < want {
        band = total.div_ceil(want).max(MIN_BAND_TILES.min(total)).min(band);
    }
    let bands = total.div_ceil(band);
    let blocks = want.div_ceil(bands).min(s.cout / MIN_CHANNEL_BLOCK).max(1);
    let block = s.cout.div_ceil(blocks);
    let blocks = s.cout.div_ceil(block);
    let units = bands * blocks;

    let next = AtomicUsize::new(0);
    let out_ptr = OutPtr(out.as_mut_ptr());
    let work = || {
        #[allow(clippy::redundant_locals)]
        let out_ptr = out_ptr;
        let mut v = vec![0f32; aa * s.cin * band];
        let mut prod = vec![0f32; aa * block * band];
        loop {
            let unit = next.fetch_add(1, Ordering::Relaxed);
            if unit >= units {
                break;
            }
            let (bi, blk) = (unit / blocks, unit % blocks);
            let first = bi * band;
            let nt = band.min(total - first);
            let co0 = blk * block;
            let nco = block.min(s.cout - co0);
            let tile_pos = |i: usize| {
                let g = first + i;
                let (image, r) = (g / per_image, g % per_image);
                (image, r / tiles_x, r % tiles_x)
            };
            transform_input(&mut v[..aa * s.cin * nt], x, s, t, nt, &tile_pos);
            for xi in 0..aa {
                // SAFETY: lhs is `u[xi][ci][co0 + i]` for i < nco, ci < cin; rhs is
                // `v[xi][ci][j]` for j < nt; dst is `prod[xi][i][j]`: all within their buffers
                // (`v` holds `aa·cin·nt`, `prod` `aa·nco·nt` ≤ `aa·block·band`).
                unsafe {
                    gemm::gemm(
                        nco,
                        nt,
                        s.cin,
                        prod.as_mut_ptr().add(xi * nco * nt),
                        1,
                        nt as isize,
                        false,
                        u.as_ptr().add(xi * s.cin * s.cout + co0),
                        s.cout as isize,
                        1,
                        v.as_ptr().add(xi * s.cin * nt),
                        1,
                        nt as isize,
                        1.0,
                        1.0,
                        false,
                        false,
                        false,
                        gemm::Parallelism::None,
                    );
                }
            }
            let prod = &prod[..aa * nco * nt];
            let mut mm = [0f32; 36];
            let mut tmp = [0f32; 24];
            let mut y = [0f32; 16];
            for i in 0..nco {
                let co = co0 + i;
                for j in 0..nt {
                    let (image, ty, tx) = tile_pos(j);
                    for (xi, e) in mm[..aa].iter_mut().enumerate() {
                        *e = prod[(xi * nco + i) * nt + j];
                    }
                    // y = Aᵀ M A.
                    sandwich(t.at, m, alpha, &mm, &mut tmp, &mut y);
                    let bias = epi.bias[co];
                    let temb = epi.channel_add.map(|t| t[image * s.cout + co]);
                    let plane = (image * s.cout + co) * hout * wout;
                    for r in 0..m.min(hout - ty * m) {
                        let row = plane + (ty * m + r) * wout + tx * m;
                        for c in 0..m.min(wout - tx * m) {
                            // Diffusers' order: `(residual + ((acc + bias) + temb)) / scale`.
                            let mut o = y[r * m + c] + bias;
                            if let Some(t) = temb {
                                o += t;
                            }
                            if let Some(res) = epi.residual {
                                o += res[row + c];
                            }
                            if epi.scale != 1.0 {
                                o /= epi.scale;
                            }
                            // SAFETY: (image, co, tile) is written by this unit only, and the
                            // index is inside the output.
                            unsafe { *out_ptr.0.add(row + c) = o };
                        }
                    }
                }
            }
        }
    };
    super::run_threads(threads.min(units), work);
    out
}

/// `V[ξ][ci][j] = (Bᵀ d B)[ξ]` for the input block `d` of tile `j` of the band (zeros outside
/// the image).
fn transform_input(
    v: &mut [f32],
    x: &[f32],
    s: ConvShape,
    t: &Transforms,
    nt: usize,
    tile_pos: &impl Fn(usize) -> (usize, usize, usize),
) {
    let (m, alpha) = (t.m, t.alpha);
    let hw = s.h * s.w;
    let mut d = [0f32; 36];
    let mut tmp = [0f32; 36];
    let mut vd = [0f32; 36];
    for j in 0..nt {
        let (image, ty, tx) = tile_pos(j);
        // Top-left corner of the block in image coordinates (may be negative: padding).
        let (y0, x0) = ((ty * m) as isize - s.pad as isize, (tx * m) as isize - s.pad as isize);
        let inside = y0 >= 0 && x0 >= 0 && y0 as usize + alpha <= s.h && x0 as usize + alpha <= s.w;
        for ci in 0..s.cin {
            let chan = &x[(image * s.cin + ci) * hw..(image * s.cin + ci + 1) * hw];
            if inside {
                let (y0, x0) = (y0 as usize, x0 as usize);
                for r in 0..alpha {
                    let src = &chan[(y0 + r) * s.w + x0..(y0 + r) * s.w + x0 + alpha];
                    d[r * alpha..(r + 1) * alpha].copy_from_slice(src);
                }
            } else {
                for r in 0..alpha {
                    let yy = y0 + r as isize;
                    for c in 0..alpha {
                        let xx = x0 + c as isize;
                        let ok = yy >= 0 && xx >= 0 && (yy as usize) < s.h && (xx as usize) < s.w;
                        d[r * alpha + c] =
                            if ok { chan[yy as usize * s.w + xx as usize] } else { 0.0 };
                    }
                }
            }
            // Bᵀ d B, scattered to V's `[ξ][ci][j]` layout.
            sandwich(t.bt, alpha, alpha, &d, &mut tmp, &mut vd);
            for (xi, &e) in vd[..alpha * alpha].iter().enumerate() {
                v[(xi * s.cin + ci) * nt + j] = e;
            }
        }
    }
}

/// `U[ξ][ci][co] = (G g Gᵀ)[ξ]` for every filter `g = weight[co][ci]`: for each input channel
/// one product of the `α² × 9` matrix of the coefficients `G[i][ky]·G[j][kx]` (computed in f64,
/// rounded once) with the `9 × cout` filters, split over threads by input channel.
fn transform_weights(weight: &[f32], s: ConvShape, t: &Transforms, threads: usize) -> Vec<f32> {
    let alpha = t.alpha;
    let aa = alpha * alpha;
    let mut coef = vec![0f32; aa * 9];
    for (xi, row) in coef.chunks_exact_mut(9).enumerate() {
        let (i, j) = (xi / alpha, xi % alpha);
        for (tap, c) in row.iter_mut().enumerate() {
            *c = (t.g[i * 3 + tap / 3] * t.g[j * 3 + tap % 3]) as f32;
        }
    }
    let mut u = vec![0f32; aa * s.cin * s.cout];
    let next = AtomicUsize::new(0);
    let u_ptr = OutPtr(u.as_mut_ptr());
    let coef = &coef;
    let work = || {
        #[allow(clippy::redundant_locals)]
        let u_ptr = u_ptr;
        loop {
            let ci = next.fetch_add(1, Ordering::Relaxed);
            if ci >= s.cin {
                break;
            }
            // SAFETY: lhs is the `aa × 9` coefficients; rhs reads `weight[co][ci][tap]` at
            // `co·cin·9 + ci·9 + tap`; dst writes `u[xi][ci][co]`, which only this `ci`'s
            // product writes.
            unsafe {
                gemm::gemm(
                    aa,
                    s.cout,
                    9,
                    u_ptr.0.add(ci * s.cout),
                    1,
                    (s.cin * s.cout) as isize,
                    false,
                    coef.as_ptr(),
                    1,
                    9,
                    weight.as_ptr().add(ci * 9),
                    (s.cin * 9) as isize,
                    1,
                    1.0,
                    1.0,
                    false,
                    false,
                    false,
                    gemm::Parallelism::None,
                );
            }
        }
    };
    super::run_threads(threads.min(s.cin), work);
    u
}

#[cfg(test)]
mod tests {
    use super::super::conv2d::conv2d;
    use super::*;

    /// A deterministic pseudo-random vector in [−1, 1).
    fn noise(len: usize, seed: u64) -> Vec<f32> {
        let mut state = seed.wrapping_mul(0x9E37_79B9_7F4A_7C15) | 1;
        (0..len)
            .map(|_| {
                state ^= state << 13;
                state ^= state >> 7;
                state ^= state << 17;
                (state >> 40) as f32 / (1u64 << 23) as f32 - 1.0
            })
            .collect()
    }

    /// Both tile sizes against the direct kernel, on shapes whose outputs are not a multiple of
    /// the tile (partial tiles at the right and bottom edges), padding 0, 1 and 2, bands that
    /// cross images, one pixel, split output channels, and every epilogue term. The tolerance
    /// is relative to the largest output: 1e-5 for F(2×2, 3×3) and 1e-4 for F(4×4, 3×3),
    /// whose transforms multiply by up to 8 and divide by 24 (with 64 input channels of
    /// uniform noise the observed errors are about a third of that).
    #[test]
    fn winograd_equals_the_direct_kernel() {
        for &(b, cin, cout, h, w, pad) in &[
            (1, 1, 1, 1, 1, 1),
            (2, 3, 5, 7, 6, 1),
            (1, 5, 3, 9, 11, 0),
            (3, 4, 7, 5, 5, 2),
            (2, 64, 130, 13, 17, 1),
            (1, 16, 8, 70, 9, 1),
        ] {
            let s = ConvShape { batch: b, cin, h, w, cout, k: 3, pad };
            let (hout, wout) = s.out_hw();
            let x = noise(b * cin * h * w, 1);
            let weight = noise(cout * cin * 9, 2);
            let bias = noise(cout, 3);
            let temb = noise(b * cout, 4);
            let residual = noise(b * cout * hout * wout, 5);
            for epi in [
                Epilogue { bias: &bias, channel_add: None, residual: None, scale: 1.0 },
                Epilogue {
                    bias: &bias,
                    channel_add: Some(&temb),
                    residual: Some(&residual),
                    scale: 1.5,
                },
            ] {
                let direct = conv2d(&x, &weight, s, epi);
                let peak = direct.iter().fold(0f32, |a, v| a.max(v.abs()));
                for (tile, tol) in [(Tile::F2, 1e-5), (Tile::F4, 1e-4)] {
                    let ours = conv3x3(&x, &weight, s, epi, tile);
                    assert_eq!(ours.len(), direct.len());
                    let diff =
                        ours.iter().zip(&direct).fold(0f32, |a, (p, q)| a.max((p - q).abs()));
                    assert!(
                        diff <= tol * peak.max(1.0),
                        "{tile:?} {:?}: differs by {diff} (largest output {peak})",
                        (b, cin, cout, h, w, pad)
                    );
                }
            }
        }
    }
}
