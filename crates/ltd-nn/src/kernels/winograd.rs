//! Stride-1 3×3 convolution on the CPU by Winograd's minimal filtering (Lavin & Gray 2016),
//! `F(4×4, 3×3)`: each 4×4 block of output pixels comes from a 6×6 block of input through
//! `Y = Aᵀ [ (G g Gᵀ) ⊙ (Bᵀ d B) ] A`, so the channel sums are 36 matrix products with 4×
//! fewer multiplies than the direct kernel's nine per pixel.
//!
//! The output channels are taken in chunks whose transformed weights `U[ξ][co][ci]` (36/9 = 4
//! times the weights) stay within [`U_BYTES`], so that a wide layer's transform is never held
//! whole. Within a chunk, a unit of work is a band of consecutive tiles (across images when the
//! images are small) and a block of output channels, so that everything a unit touches stays in
//! cache: the input transform writes `V[ξ][ci][tile]`, the 36 products
//! `M[ξ] = U[ξ] · V[ξ]` run in the `gemm` crate, and the output transform adds the bias, time
//! embedding and residual while it writes, as the direct kernel of `conv2d.rs` does.
//!
//! Both transforms work on eight tiles at once, one per SIMD lane (`Lanes`), with the
//! transform matrices written out as sums (their entries are small integers: every product is
//! exact, and no fused multiply-add is formed, so the AVX2 and the portable build round alike).
//! A band's tile count is a multiple of eight; lanes past the last tile hold zeros.
//!
//! The transforms round differently from the direct sum; the unit test bounds the difference,
//! and the parity tests pass with it at their tolerances. `conv2d::conv2d` picks this kernel
//! for inference and for training's forward pass and input gradient alike (the weight gradient
//! stays an unfolded product).

use std::ops::{Add, Mul, Sub};

use super::conv2d::{ConvShape, Epilogue, OutPtr};
use super::Mat;

/// Tiles transformed together, one per lane.
const LANES: usize = 8;
/// Entries of a transformed 6×6 tile.
const AA: usize = 36;
/// Bytes of one unit's transformed input and product blocks that a band aims for: one core's
/// L2 on the AMD EPYC (512 KiB). At 4 MiB, measured on one thread at batch 16 against the
/// direct kernel, the 32→32 and 64→64 layers of 32×32 and 16×16 pixels took 1.58× and 1.15×
/// its time; at 512 KiB 0.79× and 0.53× (every other shape of the training VAE and U-Net, 32–256
/// channels of 4×4 to 32×32 pixels, 0.40–0.77×). A band's size does not change any sum as
/// long as it is at most [`MAX_BAND_TILES`].
const BAND_BYTES: usize = 512 << 10;
/// Fewest tiles in a band: narrower products waste the micro-kernel and repack the weights
/// too often.
const MIN_BAND_TILES: usize = 32;
/// Most tiles in a band. `gemm` gives every row the same sums for any row count up to 64, at
/// any position in the product, but above 64 rows with a long inner dimension (from about 640
/// input channels) it blocks the sums differently (measured: 1920 channels, 72 rows against
/// 16). A band's size can depend on the batch's tile count and the thread count, so without
/// this cap SD 1.5's 1920→640 layer gave an image different bits in a batch than alone
/// (last-place differences up to 5e-4 in the layer's output; the test below).
const MAX_BAND_TILES: usize = 64;
/// Smallest block of output channels a unit computes. Small: on the U-Net's 16² and 8² levels
/// all tiles make one band and a chunk of the 1280-channel weights has 43–86 output channels,
/// so the channels are all there is to share between threads (with 64 here a chunk was one
/// unit, and a second thread sat idle through a tenth of a two-thread step).
const MIN_CHANNEL_BLOCK: usize = 16;
/// Most bytes of transformed weights held at once (one chunk of output channels).
const U_BYTES: usize = 16 << 20;
/// Most bytes of a transformed input shared by the chunks.
const V_BYTES: usize = 48 << 20;

/// `G` of `F(4×4, 3×3)` (6 × 3), whose entries are not exact in binary: the weight transform
/// forms each coefficient `G[i][ky]·G[j][kx]` in f64 and rounds it once to f32.
#[rustfmt::skip]
const G: [[f64; 3]; 6] = [
    [1.0 / 4.0, 0.0, 0.0],
    [-1.0 / 6.0, -1.0 / 6.0, -1.0 / 6.0],
    [-1.0 / 6.0, 1.0 / 6.0, -1.0 / 6.0],
    [1.0 / 24.0, 1.0 / 12.0, 1.0 / 6.0],
    [1.0 / 24.0, -1.0 / 12.0, 1.0 / 6.0],
    [0.0, 0.0, 1.0],
];

/// One value for each of eight tiles; the element-wise operations compile to single SIMD
/// instructions.
#[derive(Clone, Copy, Default)]
#[repr(align(32))]
struct Lanes([f32; LANES]);

impl Add for Lanes {
    type Output = Lanes;
    #[inline(always)]
    fn add(self, o: Lanes) -> Lanes {
        let mut r = self;
        for (a, b) in r.0.iter_mut().zip(o.0) {
            *a += b;
        }
        r
    }
}

impl Sub for Lanes {
    type Output = Lanes;
    #[inline(always)]
    fn sub(self, o: Lanes) -> Lanes {
        let mut r = self;
        for (a, b) in r.0.iter_mut().zip(o.0) {
            *a -= b;
        }
        r
    }
}

impl Mul<f32> for Lanes {
    type Output = Lanes;
    #[inline(always)]
    fn mul(self, k: f32) -> Lanes {
        let mut r = self;
        for a in r.0.iter_mut() {
            *a *= k;
        }
        r
    }
}

/// `Bᵀ d` for one column `d` of an input tile:
/// `Bᵀ = [[4,0,−5,0,1,0], [0,−4,−4,1,1,0], [0,4,−4,−1,1,0], [0,−2,−1,2,1,0], [0,2,−1,−2,1,0],
/// [0,4,0,−5,0,1]]`.
#[inline(always)]
fn bt(d: [Lanes; 6]) -> [Lanes; 6] {
    let [d0, d1, d2, d3, d4, d5] = d;
    let (p, q) = (d4 - d2 * 4.0, d3 - d1 * 4.0);
    let (r, t) = (d4 - d2, (d3 - d1) * 2.0);
    [d0 * 4.0 - d2 * 5.0 + d4, p + q, p - q, r + t, r - t, d1 * 4.0 - d3 * 5.0 + d5]
}

/// `Aᵀ m` for one column `m` of a product tile:
/// `Aᵀ = [[1,1,1,1,1,0], [0,1,−1,2,−2,0], [0,1,1,4,4,0], [0,1,−1,8,−8,1]]`.
#[inline(always)]
fn at(m: [Lanes; 6]) -> [Lanes; 4] {
    let [m0, m1, m2, m3, m4, m5] = m;
    let (a, b, c, e) = (m1 + m2, m1 - m2, m3 + m4, m3 - m4);
    [m0 + a + c, b + e * 2.0, a + c * 4.0, b + e * 8.0 + m5]
}

/// Calls a transform with AVX2 code generation where the CPU has it (the arithmetic is the
/// same: the transforms form no fused multiply-adds), else the portable build.
macro_rules! dispatch {
    ($f:ident($($arg:expr),*)) => {{
        #[cfg(target_arch = "x86_64")]
        {
            if super::simd::available() {
                // SAFETY: the CPU has AVX2 and FMA (checked just above). (Nested in the
                // caller's `unsafe` block where the transform itself is unsafe.)
                #[allow(unused_unsafe)]
                unsafe { $f::avx2($($arg),*) }
            } else {
                $f::portable($($arg),*)
            }
        }
        #[cfg(not(target_arch = "x86_64"))]
        {
            $f::portable($($arg),*)
        }
    }};
}

/// Builds, in a transform's module, `avx2` (x86-64 only) and `portable` entry points around
/// its `#[inline(always)]` `body`.
macro_rules! multiversion {
    (unsafe fn($($arg:ident: $ty:ty),*)) => {
        #[cfg(target_arch = "x86_64")]
        #[target_feature(enable = "avx2,fma")]
        pub(super) unsafe fn avx2($($arg: $ty),*) {
            unsafe { body($($arg),*) }
        }
        pub(super) unsafe fn portable($($arg: $ty),*) {
            unsafe { body($($arg),*) }
        }
    };
    (fn($($arg:ident: $ty:ty),*)) => {
        #[cfg(target_arch = "x86_64")]
        #[target_feature(enable = "avx2,fma")]
        pub(super) unsafe fn avx2($($arg: $ty),*) {
            body($($arg),*)
        }
        pub(super) fn portable($($arg: $ty),*) {
            body($($arg),*)
        }
    };
}

/// Where the tiles of a convolution are: tile `j` (counted over all images) is image
/// `j / per_image`, tile row `(j % per_image) / tiles_x`, tile column `(j % per_image) % tiles_x`.
#[derive(Clone, Copy)]
struct Tiles {
    s: ConvShape,
    hout: usize,
    wout: usize,
    tiles_x: usize,
    per_image: usize,
    total: usize,
}

impl Tiles {
    /// `(image, tile row, tile column)` of tile `j`.
    #[inline(always)]
    fn pos(&self, j: usize) -> (usize, usize, usize) {
        let (image, r) = (j / self.per_image, j % self.per_image);
        (image, r / self.tiles_x, r % self.tiles_x)
    }
}

/// `conv(x, weight) + epilogue` for a stride-1 3×3 convolution of contiguous f32 `x` and
/// `weight` (any padding); returns `[batch, cout, hout, wout]`, as `conv2d::conv2d` does.
pub(crate) fn conv3x3(x: &[f32], weight: &[f32], s: ConvShape, epi: Epilogue<'_>) -> Vec<f32> {
    debug_assert_eq!(s.k, 3);
    let (hout, wout) = s.out_hw();
    debug_assert_eq!(x.len(), s.batch * s.cin * s.h * s.w);
    debug_assert_eq!(weight.len(), s.cout * s.cin * 9);
    let mut out = vec![0f32; s.batch * s.cout * hout * wout];
    if out.is_empty() {
        return out;
    }
    let threads = super::threads();
    let (tiles_y, tiles_x) = (hout.div_ceil(4), wout.div_ceil(4));
    let per_image = tiles_y * tiles_x;
    let tiles = Tiles { s, hout, wout, tiles_x, per_image, total: s.batch * per_image };
    let total = tiles.total;
    let chunks = (AA * s.cin * s.cout * 4).div_ceil(U_BYTES).clamp(1, s.cout);
    let chunk = s.cout.div_ceil(chunks);
    let out_ptr = OutPtr(out.as_mut_ptr());
    // With several chunks, the transformed input of all tiles is made once and shared by them
    // when it is small enough (it is on the wide layers, whose feature maps are small);
    // otherwise each unit transforms its band for each chunk.
    let total_p = total.next_multiple_of(LANES);
    let shared = chunks > 1 && AA * s.cin * total_p * 4 <= V_BYTES;
    let mut v_all = Vec::new();
    if shared {
        v_all = vec![0f32; AA * s.cin * total_p];
        let per = total_p.div_ceil(threads).next_multiple_of(LANES);
        let v_ptr = OutPtr(v_all.as_mut_ptr());
        let ranges: Vec<usize> = (0..total).step_by(per).collect();
        super::for_each_parallel(ranges, |first| {
            let dst = VDst { ptr: v_ptr, stride: total_p, col0: first };
            // SAFETY: `v_all` holds `AA·cin·total_p`; this range writes its own columns
            // `first .. first + per` (within `total_p`).
            unsafe { dispatch!(transform_input(dst, x, &tiles, first, per.min(total - first))) };
        });
    }
    let v_all = &v_all[..];
    let mut u = Vec::new();
    for c0 in (0..s.cout).step_by(chunk) {
        let nc = chunk.min(s.cout - c0);
        transform_weights(&mut u, weight, s, c0, nc, threads);
        let u = &u[..];

        let tile_bytes = AA * (if shared { 0 } else { s.cin } + nc) * 4;
        let mut band = (BAND_BYTES / tile_bytes).max(MIN_BAND_TILES).min(total);
        // Enough bands to keep every thread busy, while they stay wide enough.
        let want = 2 * threads;
        if total.div_ceil(band) < want {
            band = total.div_ceil(want).max(MIN_BAND_TILES.min(total)).min(band);
        }
        let band = band.min(MAX_BAND_TILES).next_multiple_of(LANES);
        let bands = total.div_ceil(band);
        // Blocks of channels only to share a chunk between threads: on one thread each block
        // packs the band's transformed input again, for nothing.
        let blocks = if threads > 1 { want.div_ceil(bands) } else { 1 };
        let blocks = blocks.min(nc / MIN_CHANNEL_BLOCK).max(1);
        let block = nc.div_ceil(blocks);
        let blocks = nc.div_ceil(block);
        let units = bands * blocks;

        // Not zero-filled (a memset of both per thread and call was 2% of a `train-unet`
        // step): each unit writes the parts it reads first, through raw pointers, `V` by
        // the input transform (all `ntp` columns) and `prod` by `gemm` (`read_dst` false).
        let scratch = || {
            let v_len = if shared { 0 } else { AA * s.cin * band };
            (Vec::<f32>::with_capacity(v_len), Vec::<f32>::with_capacity(AA * block * band))
        };
        super::for_each_unit(threads, units, scratch, |(v, prod), unit| {
            #[allow(clippy::redundant_locals)]
            let out_ptr = out_ptr;
            let (bi, blk) = (unit / blocks, unit % blocks);
            let first = bi * band;
            let nt = band.min(total - first);
            let ntp = nt.next_multiple_of(LANES);
            let co0 = blk * block;
            let nco = block.min(nc - co0);
            // The band's `V[ξ][ci][j]`: columns `first ..` of the shared one (rows
            // `total_p` apart), or made here (rows `ntp` apart).
            let (vp, stride) = if shared {
                (v_all[first..].as_ptr(), total_p)
            } else {
                let dst = VDst { ptr: OutPtr(v.as_mut_ptr()), stride: ntp, col0: 0 };
                // SAFETY: `v` has room for `AA·cin·band ≥ AA·cin·ntp`, written by this unit
                // only.
                unsafe { dispatch!(transform_input(dst, x, &tiles, first, nt)) };
                (v.as_ptr(), ntp)
            };
            for xi in 0..AA {
                // `prod[xi]ᵀ = V[xi]ᵀ · U[xi]ᵀ`: with the tiles as the product's rows,
                // `gemm` reads the transformed weights in place and packs only the band's
                // V block, once for all the block's channels (with the channels as rows it
                // repacked U for every band).
                // SAFETY: lhs is `V[xi][ci][j]` for j < ntp, ci < cin at `vp + (xi·cin +
                // ci)·stride + j`, within the shared `AA·cin·total_p` (first + ntp ≤
                // total_p) or the unit's `AA·cin·ntp`; rhs is `u[xi][co0 + i][ci]` for
                // i < nco (the chunk's `AA·nc·cin`); dst is `prod[xi][i][j]`, within
                // `AA·nco·ntp ≤ AA·block·band`.
                unsafe {
                    super::gemm(
                        (ntp, nco, s.cin),
                        Mat { ptr: prod.as_mut_ptr().add(xi * nco * ntp), row: 1, col: ntp },
                        false,
                        Mat { ptr: vp.add(xi * s.cin * stride), row: 1, col: stride },
                        Mat { ptr: u.as_ptr().add((xi * nc + co0) * s.cin), row: 1, col: s.cin },
                    );
                }
            }
            // SAFETY: the products above wrote all `AA·nco·ntp` (within the capacity).
            let prod = unsafe { std::slice::from_raw_parts(prod.as_ptr(), AA * nco * ntp) };
            let dst = Dst { out: out_ptr, co0: c0 + co0, nco };
            dispatch!(transform_output(prod, dst, &tiles, epi, first, nt));
        });
    }
    out
}

/// Where the input transform writes: `V[ξ][ci][col0 + j]` at `ptr + (ξ·cin + ci)·stride +
/// col0 + j`.
#[derive(Clone, Copy)]
struct VDst {
    ptr: OutPtr,
    stride: usize,
    col0: usize,
}

/// The output elements one unit writes: channels `co0 .. co0 + nco` of its tiles.
#[derive(Clone, Copy)]
struct Dst {
    out: OutPtr,
    co0: usize,
    nco: usize,
}

mod transform_input {
    use super::*;

    multiversion!(unsafe fn(v: VDst, x: &[f32], t: &Tiles, first: usize, nt: usize));

    /// `V[ξ][ci][j] = (Bᵀ d B)[ξ]` for the input block `d` of tile `first + j` (zeros outside
    /// the image; lanes `nt ..` of the last group are zeros), `j < nt` rounded up to a multiple
    /// of [`LANES`].
    ///
    /// # Safety
    /// `v` must be valid for writes of those elements, and no other thread may access them.
    #[inline(always)]
    pub(super) unsafe fn body(v: VDst, x: &[f32], t: &Tiles, first: usize, nt: usize) {
        let s = t.s;
        let hw = s.h * s.w;
        let ntp = nt.next_multiple_of(LANES);
        for g in (0..ntp).step_by(LANES) {
            // Per lane: the image's offset, and the block's top-left corner in image
            // coordinates (negative in the padding); `None` past the last tile.
            let mut lane = [None; LANES];
            for (l, slot) in lane.iter_mut().enumerate() {
                if g + l < nt {
                    let (image, ty, tx) = t.pos(first + g + l);
                    let y0 = (ty * 4) as isize - s.pad as isize;
                    let x0 = (tx * 4) as isize - s.pad as isize;
                    let inside =
                        y0 >= 0 && x0 >= 0 && y0 as usize + 6 <= s.h && x0 as usize + 6 <= s.w;
                    *slot = Some((image * s.cin * hw, y0, x0, inside));
                }
            }
            for ci in 0..s.cin {
                let mut d = [Lanes::default(); AA];
                for (l, slot) in lane.iter().enumerate() {
                    let Some((base, y0, x0, inside)) = *slot else { continue };
                    let chan = &x[base + ci * hw..base + (ci + 1) * hw];
                    if inside {
                        let off = y0 as usize * s.w + x0 as usize;
                        for r in 0..6 {
                            let row = &chan[off + r * s.w..off + r * s.w + 6];
                            for c in 0..6 {
                                d[r * 6 + c].0[l] = row[c];
                            }
                        }
                    } else {
                        for r in 0..6 {
                            let yy = y0 + r as isize;
                            if yy < 0 || yy as usize >= s.h {
                                continue;
                            }
                            for c in 0..6 {
                                let xx = x0 + c as isize;
                                if xx >= 0 && (xx as usize) < s.w {
                                    d[r * 6 + c].0[l] = chan[yy as usize * s.w + xx as usize];
                                }
                            }
                        }
                    }
                }
                // Bᵀ d: the columns; then (Bᵀ d) B: the rows of that.
                let mut cols = [Lanes::default(); AA];
                for c in 0..6 {
                    let col = bt([d[c], d[6 + c], d[12 + c], d[18 + c], d[24 + c], d[30 + c]]);
                    for (k, e) in col.into_iter().enumerate() {
                        cols[k * 6 + c] = e;
                    }
                }
                for k in 0..6 {
                    let row: [Lanes; 6] = cols[k * 6..k * 6 + 6].try_into().unwrap();
                    for (c, e) in bt(row).into_iter().enumerate() {
                        let off = ((k * 6 + c) * s.cin + ci) * v.stride + v.col0 + g;
                        // SAFETY: the caller's contract.
                        unsafe {
                            std::ptr::copy_nonoverlapping(e.0.as_ptr(), v.ptr.0.add(off), LANES)
                        };
                    }
                }
            }
        }
    }
}

mod transform_output {
    use super::*;

    multiversion!(
        fn(prod: &[f32], dst: Dst, t: &Tiles, epi: Epilogue<'_>, first: usize, nt: usize)
    );

    /// `Y = Aᵀ M A` for the product block `prod[ξ][i][j]` of output channel `dst.co0 + i` and
    /// tile `first + j`, with the epilogue, stored (the part inside the output).
    #[inline(always)]
    pub(super) fn body(
        prod: &[f32],
        dst: Dst,
        t: &Tiles,
        epi: Epilogue<'_>,
        first: usize,
        nt: usize,
    ) {
        let s = t.s;
        let (hout, wout) = (t.hout, t.wout);
        let ntp = nt.next_multiple_of(LANES);
        for g in (0..ntp).step_by(LANES) {
            let lanes = LANES.min(nt - g);
            let pos: [(usize, usize, usize); LANES] =
                std::array::from_fn(|l| if l < lanes { t.pos(first + g + l) } else { (0, 0, 0) });
            for i in 0..dst.nco {
                let co = dst.co0 + i;
                let m: [Lanes; AA] = std::array::from_fn(|xi| {
                    let off = (xi * dst.nco + i) * ntp + g;
                    Lanes(prod[off..off + LANES].try_into().unwrap())
                });
                let mut cols = [Lanes::default(); 24];
                for c in 0..6 {
                    let col = at([m[c], m[6 + c], m[12 + c], m[18 + c], m[24 + c], m[30 + c]]);
                    for (k, e) in col.into_iter().enumerate() {
                        cols[k * 6 + c] = e;
                    }
                }
                let mut y = [Lanes::default(); 16];
                for k in 0..4 {
                    let row: [Lanes; 6] = cols[k * 6..k * 6 + 6].try_into().unwrap();
                    y[k * 4..k * 4 + 4].copy_from_slice(&at(row));
                }
                let bias = epi.bias[co];
                for (l, &(image, ty, tx)) in pos[..lanes].iter().enumerate() {
                    let temb = epi.channel_add.map(|t| t[image * s.cout + co]);
                    let plane = (image * s.cout + co) * hout * wout;
                    for r in 0..4.min(hout - ty * 4) {
                        let row = plane + (ty * 4 + r) * wout + tx * 4;
                        for c in 0..4.min(wout - tx * 4) {
                            // Diffusers' order: `(residual + ((acc + bias) + temb)) / scale`.
                            let mut o = y[r * 4 + c].0[l] + bias;
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
                            unsafe { *dst.out.0.add(row + c) = o };
                        }
                    }
                }
            }
        }
    }
}

/// `U[ξ][c][ci] = (G g Gᵀ)[ξ]` for the filters `g = weight[c0 + c][ci]`, `c < nc`: for each
/// output channel one product of the 36 × 9 matrix of the coefficients `G[i][ky]·G[j][kx]`
/// (computed in f64, rounded once) with its `9 × cin` filters (read in place), split over
/// threads by output channel.
fn transform_weights(
    u: &mut Vec<f32>,
    weight: &[f32],
    s: ConvShape,
    c0: usize,
    nc: usize,
    threads: usize,
) {
    let mut coef = [0f32; AA * 9];
    for (xi, row) in coef.chunks_exact_mut(9).enumerate() {
        let (i, j) = (xi / 6, xi % 6);
        for (tap, c) in row.iter_mut().enumerate() {
            *c = (G[i][tap / 3] * G[j][tap % 3]) as f32;
        }
    }
    // Not zero-filled first: the products below write every element (`u[xi][c][ci]` for all
    // xi, c < nc, ci < cin), and a fill of up to 16 MiB per chunk on the calling thread was
    // the largest one-thread part of a two-thread U-Net step.
    let len = AA * s.cin * nc;
    u.clear();
    u.reserve(len);
    let u_ptr = OutPtr(u.as_mut_ptr());
    let coef = &coef;
    super::for_each_unit(
        threads,
        nc,
        || (),
        |(), c| {
            #[allow(clippy::redundant_locals)]
            let u_ptr = u_ptr;
            // SAFETY: lhs is the `36 × 9` coefficients; rhs reads `weight[c0 + c][ci][tap]` at
            // `(c0 + c)·cin·9 + ci·9 + tap` for ci < cin; dst writes `u[xi][c][ci]`, which only
            // this `c`'s product writes.
            unsafe {
                super::gemm(
                    (AA, s.cin, 9),
                    Mat { ptr: u_ptr.0.add(c * s.cin), row: nc * s.cin, col: 1 },
                    false,
                    Mat { ptr: coef.as_ptr(), row: 9, col: 1 },
                    Mat { ptr: weight.as_ptr().add((c0 + c) * s.cin * 9), row: 1, col: 9 },
                );
            }
        },
    );
    // SAFETY: the capacity is `len` (reserved above) and the products wrote all of it.
    unsafe { u.set_len(len) };
}

#[cfg(test)]
mod tests {
    use super::super::conv2d::direct;
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

    /// An image's output is the same bits whatever batch it is in and however many threads
    /// run: SD 1.5's widest layer (1920 → 640 channels, whose transformed weights come in 11
    /// chunks, the last of 50 channels, so its bands would hold 72 tiles), on 16×16 images
    /// (16 tiles each) in batches of 1, 5 and 12 (the last beyond the shared transformed
    /// input's size), on one and two threads. Without [`MAX_BAND_TILES`] the batch of 5 gave
    /// image 0 different bits.
    #[test]
    fn an_image_has_the_same_bits_in_any_batch() {
        let (cin, cout, hw) = (1920, 640, 16);
        let plane = cin * hw * hw;
        let x = noise(12 * plane, 1);
        let weight = noise(cout * cin * 9, 2);
        let bias = noise(cout, 3);
        let epi = Epilogue { bias: &bias, channel_add: None, residual: None, scale: 1.0 };
        let run = |batch: usize, image: usize| {
            let s = ConvShape { batch, cin, h: hw, w: hw, cout, k: 3, pad: 1 };
            let out = conv3x3(&x[..batch * plane], &weight, s, epi);
            out[image * cout * hw * hw..(image + 1) * cout * hw * hw].to_vec()
        };
        let alone = candle_core::utils::on_this_thread(|| run(1, 0));
        let alone_4 = candle_core::utils::on_this_thread(|| {
            let s = ConvShape { batch: 1, cin, h: hw, w: hw, cout, k: 3, pad: 1 };
            conv3x3(&x[4 * plane..5 * plane], &weight, s, epi)
        });
        for batch in [1, 5, 12] {
            for one_thread in [true, false] {
                let go = || (run(batch, 0), (batch > 4).then(|| run(batch, 4)));
                let (first, fifth) =
                    if one_thread { candle_core::utils::on_this_thread(go) } else { go() };
                assert!(first == alone, "image 0 in a batch of {batch} (one thread: {one_thread})");
                if let Some(fifth) = fifth {
                    assert!(fifth == alone_4, "image 4 in a batch of {batch} ({one_thread})");
                }
            }
        }
    }

    /// `F(4×4, 3×3)` against the direct kernel, on shapes whose outputs are not a multiple of
    /// the tile (partial tiles at the right and bottom edges), padding 0, 1 and 2, bands that
    /// cross images, one pixel, split output channels and chunks of transformed weights, and
    /// every epilogue term. The tolerance is 1e-4 relative to the largest output: the
    /// transforms multiply by up to 8 and divide by 24 (with 64 input channels of uniform
    /// noise the observed errors are about a third of that).
    #[test]
    fn winograd_equals_the_direct_kernel() {
        for &(b, cin, cout, h, w, pad) in &[
            (1, 1, 1, 1, 1, 1),
            (2, 3, 5, 7, 6, 1),
            (1, 5, 3, 9, 11, 0),
            (3, 4, 7, 5, 5, 2),
            (2, 64, 130, 13, 17, 1),
            (1, 16, 8, 70, 9, 1),
            (1, 400, 300, 6, 5, 1),
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
                // The direct kernel itself, whatever `conv2d` would dispatch these shapes to.
                let expected = direct(&x, &weight, s, epi);
                let peak = expected.iter().fold(0f32, |a, v| a.max(v.abs()));
                let ours = conv3x3(&x, &weight, s, epi);
                assert_eq!(ours.len(), expected.len());
                let diff = ours.iter().zip(&expected).fold(0f32, |a, (p, q)| a.max((p - q).abs()));
                assert!(
                    diff <= 1e-4 * peak.max(1.0),
                    "{:?}: differs by {diff} (largest output {peak})",
                    (b, cin, cout, h, w, pad)
                );
            }
        }
    }
}
