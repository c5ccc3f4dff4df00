//! Stride-1 2-D convolution on the CPU without an unfolded (`im2col`) copy of the input.
//!
//! With the input zero-padded and each channel's rows laid end to end (`W'` = padded width),
//! the input seen from kernel tap `(ky, kx)` is the same buffer shifted by `ky·W' + kx`: a plain
//! strided matrix `[C_in, rows·W']`. The convolution is then a sum of `k²` matrix products,
//! `out += W[:, :, ky, kx] · shift(x)`, accumulated in place by the `gemm` crate (which packs
//! its operands into cache-sized blocks itself), and each output row carries `k − 1` extra
//! columns that are dropped when the bias is added. An unfolded copy would be `k²` times the
//! input, written to and read back from main memory; here everything a product touches is a
//! band of rows that stays in cache.
//!
//! Work is split into units of (image, band of output rows, block of output channels), taken
//! from a shared counter by a few threads, so a thread slowed down by other processes does not
//! hold the others up.

use candle_core::{CpuStorage, CustomOp3, Layout, Result, Shape, Tensor};

use super::{contiguous, im2col, Data, Mat};

/// Bytes of one band's working set (padded input rows and output rows) that a unit aims for:
/// small enough to stay in the L2/L3 caches while its `k²` products run over it.
const BAND_BYTES: usize = 2 << 20;
/// Smallest band width in matrix columns (`rows · W'`): narrower products waste the
/// micro-kernel's tiles and repeat the packing of the weights too often.
const MIN_BAND_COLUMNS: usize = 512;
/// Smallest block of output channels a unit computes.
const MIN_CHANNEL_BLOCK: usize = 64;

/// Shape of a convolution: `x: [batch, cin, h, w]`, `weight: [cout, cin, k, k]`, padding `pad`
/// on all four sides, stride 1.
#[derive(Debug, Clone, Copy)]
pub(crate) struct ConvShape {
    pub batch: usize,
    pub cin: usize,
    pub h: usize,
    pub w: usize,
    pub cout: usize,
    pub k: usize,
    pub pad: usize,
}

impl ConvShape {
    /// Output height and width.
    pub fn out_hw(&self) -> (usize, usize) {
        (self.h + 2 * self.pad + 1 - self.k, self.w + 2 * self.pad + 1 - self.k)
    }

    /// Whether the shape is one this kernel computes (the kernel fits in the padded input).
    pub fn valid(&self) -> bool {
        self.k > 0 && self.h + 2 * self.pad >= self.k && self.w + 2 * self.pad >= self.k
    }
}

/// What is added to the products before they are stored: the bias per output channel, and
/// optionally a per-image, per-channel term (a time embedding) and a residual of the output's
/// shape; the sum is then divided by `scale`.
#[derive(Debug, Clone, Copy)]
pub(crate) struct Epilogue<'a> {
    pub bias: &'a [f32],
    /// `[batch, cout]`.
    pub channel_add: Option<&'a [f32]>,
    /// `[batch, cout, hout, wout]`.
    pub residual: Option<&'a [f32]>,
    pub scale: f32,
}

/// The output pointer shared by the worker threads (here and in `winograd.rs`).
#[derive(Clone, Copy)]
pub(super) struct OutPtr(pub(super) *mut f32);
// SAFETY: every user writes a disjoint set of output elements (here a unit's image, rows and
// channels; see each use) into a buffer that outlives the scoped threads.
unsafe impl Send for OutPtr {}
unsafe impl Sync for OutPtr {}

/// `conv(x, weight) + epilogue` for contiguous f32 `x` and `weight`; returns
/// `[batch, cout, hout, wout]`. Wide 3×3 convolutions run Winograd's kernel
/// ([`use_winograd`]) unless they are wide with few output tiles an image; shapes whose
/// per-image products are too small for this kernel (few pixels or input channels, or those
/// wide 3×3 ones, see `im2col::pays`) are unfolded over the batch instead.
pub(crate) fn conv2d(x: &[f32], weight: &[f32], s: ConvShape, epi: Epilogue<'_>) -> Vec<f32> {
    if use_winograd(s) {
        super::winograd::conv3x3(x, weight, s, epi)
    } else if super::im2col::pays(s, false) {
        super::im2col::conv(x, weight, s, 1, epi)
    } else {
        direct(x, weight, s, epi)
    }
}

/// Whether a convolution of this shape runs Winograd's kernel, unless `LTD_WINOGRAD=off`.
fn use_winograd(s: ConvShape) -> bool {
    // Read once per process, not on every convolution.
    static ON: std::sync::OnceLock<bool> = std::sync::OnceLock::new();
    *ON.get_or_init(|| std::env::var("LTD_WINOGRAD").as_deref() != Ok("off")) && winograd_suits(s)
}

/// Fewest 4×4 output tiles per image for which Winograd's kernel runs on wide layers (whose
/// transformed weights reach [`WIDE_WEIGHTS`]). Each call transforms the weights afresh (36/9
/// times their size, written and read again: 236 MB for 1280→1280), which only pays over
/// enough tiles; below, the unfolded product (`im2col`) is faster. Measured on one thread of
/// the Intel Xeon (AVX-512), ms, Winograd / unfolded: 1280→1280 at 8×8 (4 tiles an image),
/// batch 1, 70 / 16, batch 2, 53 / 26, batch 4, 61 / 52; 2560→1280 at 8×8, batch 2, 117 / 52;
/// 1280→1280 at 12×12 (9 tiles), batch 2, 65 / 66; at 16×16 (16 tiles), batch 1, 51 / 57,
/// batch 2, 56 / 129. SD 1.5's 8×8 level at 512² is the case that matters. The rule counts
/// tiles per image, not per batch, so that an image comes out the same bits whatever batch it
/// is computed in (A1111's seeds recreate batch images alone); narrower layers (the training
/// recipes', the tiny models') keep Winograd's kernel at every size.
const MIN_WINOGRAD_TILES: usize = 8;
/// Bytes of transformed weights (`36·C_in·C_out` floats) from which [`MIN_WINOGRAD_TILES`]
/// applies: more than one core's L2 and L3 share holds.
const WIDE_WEIGHTS: usize = 32 << 20;

/// The shapes Winograd's kernel is for: 3×3 kernels with enough channels each way for the
/// products to outweigh the transforms, and on wide layers enough output tiles per image
/// ([`MIN_WINOGRAD_TILES`]).
pub(crate) fn winograd_suits(s: ConvShape) -> bool {
    let (hout, wout) = s.out_hw();
    let tiles = hout.div_ceil(4) * wout.div_ceil(4);
    wide_3x3(s) && (tiles >= MIN_WINOGRAD_TILES || 36 * s.cin * s.cout * 4 < WIDE_WEIGHTS)
}

/// A 3×3 kernel with at least 32 channels each way (what Winograd's transforms pay on).
pub(crate) fn wide_3x3(s: ConvShape) -> bool {
    s.k == 3 && s.cin >= 32 && s.cout >= 32
}

/// [`conv2d`] by the direct kernel, whatever the shape.
pub(super) fn direct(x: &[f32], weight: &[f32], s: ConvShape, epi: Epilogue<'_>) -> Vec<f32> {
    let (hout, wout) = s.out_hw();
    let wp = s.w + 2 * s.pad;
    let kk = s.k * s.k;
    debug_assert_eq!(x.len(), s.batch * s.cin * s.h * s.w);
    debug_assert_eq!(weight.len(), s.cout * s.cin * kk);
    let mut out = vec![0f32; s.batch * s.cout * hout * wout];
    if out.is_empty() {
        return out;
    }

    // Band height: the working set of a band is its padded input rows (all input channels)
    // and its output rows (all output channels).
    let row_bytes = (s.cin + s.cout) * wp * 4;
    let rows = (BAND_BYTES / row_bytes.max(1)).max(MIN_BAND_COLUMNS.div_ceil(wp)).clamp(1, hout);
    let bands = hout.div_ceil(rows);
    let threads = super::threads();
    // Split the output channels only when images × bands leave threads idle.
    let per_image = (2 * threads).div_ceil(s.batch * bands);
    let blocks = per_image.min(s.cout / MIN_CHANNEL_BLOCK).max(1);
    let block = s.cout.div_ceil(blocks);
    let blocks = s.cout.div_ceil(block);
    let units = s.batch * bands * blocks;

    // The weights regrouped per tap, `[k², cin, cout]`: each product's operand is then a
    // row-major matrix, which the matrix kernel packs with plain copies instead of gathering
    // every k²-th element.
    let mut taps = vec![0f32; weight.len()];
    for (co, filters) in weight.chunks_exact(s.cin * kk).enumerate() {
        for (ci, filter) in filters.chunks_exact(kk).enumerate() {
            for (tap, &v) in filter.iter().enumerate() {
                taps[(tap * s.cin + ci) * s.cout + co] = v;
            }
        }
    }
    let taps = &taps;

    let out_ptr = OutPtr(out.as_mut_ptr());
    // Padded input rows of one band: `k` extra rows, plus one so that the extra columns of the
    // last row read zeros rather than past the buffer.
    let extra = if s.k > 1 { s.k } else { 0 };
    let plane = (rows + extra) * wp;
    // With the register-blocked kernel, accumulator rows are whole tiles of columns: the
    // extra columns read past a channel's rows (into the next one, or the slack after the
    // last) and are dropped with the others.
    let taps_kernel = s.k > 1 && super::simd::available();
    let ld = if taps_kernel { (rows * wp).next_multiple_of(TILE_COLUMNS) } else { rows * wp };
    let slack = if taps_kernel { TILE_COLUMNS } else { 0 };
    let scratch = || (vec![0f32; s.cin * plane + slack], vec![0f32; block * ld]);
    super::for_each_unit(threads, units, scratch, |(input, acc), unit| {
        // Rebinding takes the whole `Sync` wrapper; without it the closure would capture only
        // its raw-pointer field, which is not `Sync`.
        #[allow(clippy::redundant_locals)]
        let out_ptr = out_ptr;
        let (image, rest) = (unit / (bands * blocks), unit % (bands * blocks));
        let (band, blk) = (rest / blocks, rest % blocks);
        let y0 = band * rows;
        let nrows = rows.min(hout - y0);
        let co0 = blk * block;
        let nco = block.min(s.cout - co0);
        let x_img = &x[image * s.cin * s.h * s.w..(image + 1) * s.cin * s.h * s.w];
        fill_band(input, x_img, s, y0, nrows + extra, plane);
        let n = nrows * wp;
        if taps_kernel {
            let taps = &taps[co0..];
            let n = n.next_multiple_of(TILE_COLUMNS);
            taps_product(Taps { acc, n, input, plane, taps, s, nco });
        } else {
            for tap in 0..kk {
                let (ky, kx) = (tap / s.k, tap % s.k);
                // SAFETY: lhs is `taps[tap][ci][co0 + i]` for i < nco, ci < cin; rhs reads
                // `input[ci·plane + ky·wp + kx + j]` for j < nrows·wp, at most
                // `(cin−1)·plane + (k−1)·wp + k−1 + nrows·wp − 1 < cin·plane` since
                // `plane ≥ (nrows + k)·wp`; dst is `acc[i·n + j]`, within `block·rows·wp`.
                unsafe {
                    super::gemm(
                        (nco, n, s.cin),
                        Mat { ptr: acc.as_mut_ptr(), row: n, col: 1 },
                        tap > 0,
                        Mat {
                            ptr: taps.as_ptr().add(tap * s.cin * s.cout + co0),
                            row: 1,
                            col: s.cout,
                        },
                        Mat { ptr: input.as_ptr().add(ky * wp + kx), row: plane, col: 1 },
                    );
                }
            }
        }
        let n = if taps_kernel { n.next_multiple_of(TILE_COLUMNS) } else { n };
        for i in 0..nco {
            let co = co0 + i;
            let (bias, temb) = (epi.bias[co], epi.channel_add.map(|t| t[image * s.cout + co]));
            let base = ((image * s.cout + co) * hout + y0) * wout;
            for r in 0..nrows {
                let src = &acc[i * n + r * wp..i * n + r * wp + wout];
                let off = base + r * wout;
                // SAFETY: (image, co, y0 + r) is written by this unit only, and
                // `off + wout ≤ out.len()`.
                let dst = unsafe { std::slice::from_raw_parts_mut(out_ptr.0.add(off), wout) };
                let residual = epi.residual.map(|res| &res[off..off + wout]);
                store_row(dst, src, bias, temb, residual, epi.scale);
            }
        }
    });
    out
}

/// Columns of one tile of [`taps_product`]'s register-blocked kernel (two vectors of 8).
const TILE_COLUMNS: usize = 16;
/// Most output channels of one tile: 6 × 2 vectors of sums, 2 of input and a broadcast
/// weight fill 15 of AVX2's 16 registers (a 4 × 3 tile, 16 of them, spilled).
const TILE_CHANNELS: usize = 6;
/// Most output channels of one AVX-512 tile: 12 vectors of sums, one of input and the
/// broadcast weights (folded into the multiply-adds) in 32 registers.
const TILE_CHANNELS_512: usize = 12;

/// `acc[i·n + j] = Σ_tap Σ_ci taps[(tap·cin + ci)·cout + i] · input[ci·plane + shift(tap) + j]`
/// for `i < nco`, `j < n` (a multiple of [`TILE_COLUMNS`]), `shift(ky, kx) = ky·W' + kx`: every
/// output's whole sum in one f32 register, taps outer and input channels inner, each product
/// fused into it (so the sums do not depend on the tiling or the threads). A tile of up to 6
/// channels × 16 columns reads 2 input vectors and up to 6 weights per term. The `gemm` crate,
/// called per tap, read and wrote its outputs once per tap, which for 16–64 input channels
/// cost it a third of its speed (one thread, AMD EPYC: a 16→16 band of 32×32 pixels 51 µs
/// against 76 µs, 64→64 at 8×8 72 against 89).
///
/// `input` must hold `(cin − 1)·plane + (k − 1)·(W' + 1) + n` elements, `taps` (offset to the
/// first channel) `(k²·cin − 1)·cout + nco`, and `acc` `nco·n`. Needs AVX2 and FMA.
fn taps_product(t: Taps<'_>) {
    let Taps { acc, n, input, plane, taps, s, nco } = &t;
    let wp = s.w + 2 * s.pad;
    assert!(n.is_multiple_of(TILE_COLUMNS) && acc.len() >= nco * n);
    assert!(input.len() + plane >= s.cin * plane + (s.k - 1) * (wp + 1) + n);
    assert!(taps.len() + s.cout >= s.k * s.k * s.cin * s.cout + nco);
    assert!(super::simd::available());
    #[cfg(target_arch = "x86_64")]
    // SAFETY: the CPU has AVX2 and FMA (and AVX-512F where chosen), and the bounds are checked
    // just above.
    unsafe {
        if super::simd::avx512_available() {
            taps_product_avx512(t)
        } else {
            taps_product_avx2(t)
        }
    }
}

/// The operands of [`taps_product`].
struct Taps<'a> {
    acc: &'a mut [f32],
    n: usize,
    input: &'a [f32],
    plane: usize,
    taps: &'a [f32],
    s: ConvShape,
    nco: usize,
}

/// [`taps_product`] with AVX-512: one 16-lane vector per row of a tile instead of two 8-lane
/// ones, and up to [`TILE_CHANNELS_512`] rows. Every output is the same fused multiply-adds
/// in the same order (taps, then input channels), so the results are the AVX2 kernel's bit
/// for bit (`avx512_taps_equal_avx2_taps_bit_for_bit`).
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx512f,avx2,fma")]
unsafe fn taps_product_avx512(t: Taps<'_>) {
    // SAFETY: the caller's bounds, and AVX-512F is enabled here.
    unsafe { taps_tiles::<std::arch::x86_64::__m512>(t, TILE_CHANNELS_512) }
}

#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2,fma")]
unsafe fn taps_product_avx2(t: Taps<'_>) {
    // SAFETY: the caller's bounds.
    unsafe { taps_tiles::<[std::arch::x86_64::__m256; 2]>(t, TILE_CHANNELS) }
}

/// The tiles of [`taps_product`], in 16-lane values `V`, at most `most` rows each (call it
/// only where `V`'s instructions are enabled).
#[cfg(target_arch = "x86_64")]
#[inline(always)]
unsafe fn taps_tiles<V: Lanes16>(t: Taps<'_>, most: usize) {
    let Taps { acc, n, input, plane, taps, s, nco } = t;
    let wp = s.w + 2 * s.pad;
    let shifts: Vec<usize> = (0..s.k * s.k).map(|t| (t / s.k) * wp + t % s.k).collect();
    let mut co = 0;
    while co < nco {
        // The remaining channels in tiles as even as they go (16 as 6 + 5 + 5, not 6 + 6 + 4):
        // a tile of 4 or more rows keeps enough sums in flight to hide the FMA's latency.
        let left = nco - co;
        let m = left.div_ceil(left.div_ceil(most));
        let (dst, w) = (acc[co * n..].as_mut_ptr(), taps[co..].as_ptr());
        let args = (dst, n, input.as_ptr(), plane, w, s.cout, s.cin, &shifts[..]);
        // SAFETY: the caller's bounds; each tile reads and writes within them.
        unsafe {
            match m {
                12 => tile::<12, V>(args),
                11 => tile::<11, V>(args),
                10 => tile::<10, V>(args),
                9 => tile::<9, V>(args),
                8 => tile::<8, V>(args),
                7 => tile::<7, V>(args),
                6 => tile::<6, V>(args),
                5 => tile::<5, V>(args),
                4 => tile::<4, V>(args),
                3 => tile::<3, V>(args),
                2 => tile::<2, V>(args),
                _ => tile::<1, V>(args),
            }
        }
        co += m;
    }
}

/// Sixteen f32 lanes of the direct kernel's tiles: two AVX2 vectors, or one AVX-512 vector.
/// Each lane gets the same operations either way (a broadcast weight times the input, fused
/// into the sum), which is why the two widths give the same bits.
#[cfg(target_arch = "x86_64")]
trait Lanes16: Copy {
    /// All zeros.
    unsafe fn zero() -> Self;
    /// Sixteen values from `p`.
    unsafe fn load(p: *const f32) -> Self;
    /// `self + w · a`, fused, lane by lane.
    unsafe fn fma(self, w: f32, a: Self) -> Self;
    /// The sixteen values to `p`.
    unsafe fn store(self, p: *mut f32);
}

#[cfg(target_arch = "x86_64")]
impl Lanes16 for [std::arch::x86_64::__m256; 2] {
    #[inline(always)]
    unsafe fn zero() -> Self {
        use std::arch::x86_64::*;
        // SAFETY: AVX is enabled where the tiles run (the callers' target features).
        unsafe { [_mm256_setzero_ps(); 2] }
    }
    #[inline(always)]
    unsafe fn load(p: *const f32) -> Self {
        use std::arch::x86_64::*;
        // SAFETY: the caller's bounds and target features.
        unsafe { [_mm256_loadu_ps(p), _mm256_loadu_ps(p.add(8))] }
    }
    #[inline(always)]
    unsafe fn fma(self, w: f32, a: Self) -> Self {
        use std::arch::x86_64::*;
        // SAFETY: the callers' target features (AVX2 and FMA).
        unsafe {
            let b = _mm256_set1_ps(w);
            [_mm256_fmadd_ps(b, a[0], self[0]), _mm256_fmadd_ps(b, a[1], self[1])]
        }
    }
    #[inline(always)]
    unsafe fn store(self, p: *mut f32) {
        use std::arch::x86_64::*;
        // SAFETY: the caller's bounds and target features.
        unsafe {
            _mm256_storeu_ps(p, self[0]);
            _mm256_storeu_ps(p.add(8), self[1]);
        }
    }
}

#[cfg(target_arch = "x86_64")]
impl Lanes16 for std::arch::x86_64::__m512 {
    #[inline(always)]
    unsafe fn zero() -> Self {
        // SAFETY: AVX-512F is enabled where these tiles run.
        unsafe { std::arch::x86_64::_mm512_setzero_ps() }
    }
    #[inline(always)]
    unsafe fn load(p: *const f32) -> Self {
        // SAFETY: the caller's bounds and target features.
        unsafe { std::arch::x86_64::_mm512_loadu_ps(p) }
    }
    #[inline(always)]
    unsafe fn fma(self, w: f32, a: Self) -> Self {
        use std::arch::x86_64::*;
        // SAFETY: the callers' target features.
        unsafe { _mm512_fmadd_ps(_mm512_set1_ps(w), a, self) }
    }
    #[inline(always)]
    unsafe fn store(self, p: *mut f32) {
        // SAFETY: the caller's bounds and target features.
        unsafe { std::arch::x86_64::_mm512_storeu_ps(p, self) }
    }
}

/// Rows `..M` of [`taps_product`]'s result, all `n` columns, [`TILE_COLUMNS`] at a time, in
/// 16-lane values `V` (one per row of the tile).
#[cfg(target_arch = "x86_64")]
#[inline(always)]
#[allow(clippy::type_complexity)]
unsafe fn tile<const M: usize, V: Lanes16>(
    (dst, n, input, plane, w, cout, cin, shifts): (
        *mut f32,
        usize,
        *const f32,
        usize,
        *const f32,
        usize,
        usize,
        &[usize],
    ),
) {
    for j in (0..n).step_by(TILE_COLUMNS) {
        // SAFETY (this block): the caller's bounds and target features.
        unsafe {
            let mut c = [V::zero(); M];
            for (tap, &shift) in shifts.iter().enumerate() {
                let mut x = input.add(shift + j);
                let mut wt = w.add(tap * cin * cout);
                for _ in 0..cin {
                    let a = V::load(x);
                    for (r, c) in c.iter_mut().enumerate() {
                        *c = c.fma(*wt.add(r), a);
                    }
                    x = x.add(plane);
                    wt = wt.add(cout);
                }
            }
            for (r, c) in c.iter().enumerate() {
                c.store(dst.add(r * n + j));
            }
        }
    }
}

/// Copies the padded input rows `y0 − pad ..` (`count` rows, zeros outside the image) of every
/// channel into `band` (`plane` elements per channel, `W'` per row).
fn fill_band(band: &mut [f32], x: &[f32], s: ConvShape, y0: usize, count: usize, plane: usize) {
    let wp = s.w + 2 * s.pad;
    for ci in 0..s.cin {
        let chan = &x[ci * s.h * s.w..(ci + 1) * s.h * s.w];
        let dst = &mut band[ci * plane..(ci + 1) * plane];
        for r in 0..count {
            let row = &mut dst[r * wp..(r + 1) * wp];
            // Padded row y0 + r is image row y0 + r − pad.
            match (y0 + r).checked_sub(s.pad).filter(|&y| y < s.h) {
                Some(y) => {
                    row[..s.pad].fill(0.0);
                    row[s.pad..s.pad + s.w].copy_from_slice(&chan[y * s.w..(y + 1) * s.w]);
                    row[s.pad + s.w..].fill(0.0);
                }
                None => row.fill(0.0),
            }
        }
        dst[count * wp..].fill(0.0);
    }
}

/// Writes one output row: `(residual + ((acc + bias) + temb)) / scale`, in diffusers' order of
/// operations, with the terms that are absent left out.
#[inline]
pub(super) fn store_row(
    dst: &mut [f32],
    acc: &[f32],
    bias: f32,
    temb: Option<f32>,
    residual: Option<&[f32]>,
    scale: f32,
) {
    match temb {
        Some(t) => dst.iter_mut().zip(acc).for_each(|(o, &a)| *o = (a + bias) + t),
        None => dst.iter_mut().zip(acc).for_each(|(o, &a)| *o = a + bias),
    }
    if let Some(res) = residual {
        dst.iter_mut().zip(res).for_each(|(o, &r)| *o += r);
    }
    if scale != 1.0 {
        dst.iter_mut().for_each(|o| *o /= scale);
    }
}

/// The input gradient of a stride-1 convolution, `[batch, cin, h, w]`, from the output gradient
/// `g: [batch, cout, hout, wout]`: the convolution of `g`, padded by `k − 1 − pad`, with the
/// weights flipped in space and their channel axes swapped. Needs `pad < k`.
pub(crate) fn conv2d_input_grad(g: &[f32], weight: &[f32], s: ConvShape) -> Vec<f32> {
    let (hout, wout) = s.out_hw();
    let kk = s.k * s.k;
    let mut flipped = vec![0f32; weight.len()];
    for co in 0..s.cout {
        for ci in 0..s.cin {
            let src = &weight[(co * s.cin + ci) * kk..(co * s.cin + ci + 1) * kk];
            let dst = &mut flipped[(ci * s.cout + co) * kk..(ci * s.cout + co + 1) * kk];
            for (tap, &v) in src.iter().enumerate() {
                dst[kk - 1 - tap] = v;
            }
        }
    }
    let t = ConvShape {
        batch: s.batch,
        cin: s.cout,
        h: hout,
        w: wout,
        cout: s.cin,
        k: s.k,
        pad: s.k - 1 - s.pad,
    };
    let zeros = vec![0f32; s.cin];
    let epi = Epilogue { bias: &zeros, channel_add: None, residual: None, scale: 1.0 };
    conv2d(g, &flipped, t, epi)
}

/// The weight gradient of a stride-1 convolution, `[cout, cin, k, k]`, from its input `x` and
/// output gradient `g` (by unfolding, `im2col::weight_grad`, unless the output channels are
/// few: see `im2col::pays`).
///
/// With the input padded and laid out as in [`conv2d`] (rows of `W'`, one extra zero row) and
/// `g`'s rows widened to `W'` with zeros, tap `(ky, kx)` is one matrix product per image,
/// `dW[:, :, ky, kx] += g · shift(x)ᵀ`, with no unfolded copy. Taps are split over threads;
/// each sums its images in order, so the result does not depend on the thread count.
pub(crate) fn conv2d_weight_grad(x: &[f32], g: &[f32], s: ConvShape) -> Vec<f32> {
    if super::im2col::pays(s, true) {
        return super::im2col::weight_grad(x, g, s, 1);
    }
    let (hout, wout) = s.out_hw();
    let wp = s.w + 2 * s.pad;
    let kk = s.k * s.k;
    let plane = (s.h + 2 * s.pad + 1) * wp;
    let n = hout * wp;
    let mut xp = vec![0f32; s.batch * s.cin * plane];
    for (b, img) in x.chunks_exact(s.cin * s.h * s.w).enumerate() {
        let band = &mut xp[b * s.cin * plane..(b + 1) * s.cin * plane];
        fill_band(band, img, s, 0, s.h + 2 * s.pad, plane);
    }
    let mut gp = vec![0f32; s.batch * s.cout * n];
    for (row, src) in g.chunks_exact(wout).enumerate() {
        gp[row * wp..row * wp + wout].copy_from_slice(src);
    }
    let mut taps = vec![0f32; kk * s.cout * s.cin];
    let per_tap = s.cout * s.cin;
    let threads = super::threads().min(kk).max(1);
    let taps_per_thread = kk.div_ceil(threads);
    let (xp, gp) = (&xp, &gp);
    let work = |first: usize, out: &mut [f32]| {
        for (i, dst) in out.chunks_exact_mut(per_tap).enumerate() {
            let tap = first + i;
            let shift = (tap / s.k) * wp + tap % s.k;
            for b in 0..s.batch {
                // SAFETY: lhs is `gp[b][co][j]` for co < cout, j < n; rhs reads
                // `xp[b][ci·plane + shift + j]`, at most `(cin−1)·plane + (k−1)·wp + k − 1 +
                // hout·wp − 1 < cin·plane` (the extra zero row); dst is `cout × cin`.
                unsafe {
                    super::gemm(
                        (s.cout, s.cin, n),
                        Mat { ptr: dst.as_mut_ptr(), row: s.cin, col: 1 },
                        b > 0,
                        Mat { ptr: gp.as_ptr().add(b * s.cout * n), row: n, col: 1 },
                        Mat { ptr: xp.as_ptr().add(b * s.cin * plane + shift), row: 1, col: plane },
                    );
                }
            }
        }
    };
    let chunks = taps.chunks_mut((taps_per_thread * per_tap).max(1)).enumerate().collect();
    super::for_each_parallel(chunks, |(t, chunk)| work(t * taps_per_thread, chunk));
    let mut out = vec![0f32; taps.len()];
    for tap in 0..kk {
        for co in 0..s.cout {
            for ci in 0..s.cin {
                out[(co * s.cin + ci) * kk + tap] = taps[(tap * s.cout + co) * s.cin + ci];
            }
        }
    }
    out
}

/// The bias gradient, `[cout]`: `g: [batch, cout, …]` summed over images and pixels (each
/// plane as `run_sums` sums it, the planes in f64).
pub(crate) fn conv2d_bias_grad(g: &[f32], cout: usize, batch: usize) -> Vec<f32> {
    let mut sums = vec![0f64; cout];
    let plane = (g.len() / (batch * cout).max(1)).max(1);
    // Each plane summed as `run_sums` sums (in parallel), the planes in order.
    let mut planes = vec![0f64; g.len() / plane];
    super::for_each_row(g, &mut planes, (plane, 1), |_, src, dst| {
        dst[0] = super::run_sums(src, |v| v)
    });
    for (i, v) in planes.into_iter().enumerate() {
        sums[i % cout] += v;
    }
    sums.into_iter().map(|v| v as f32).collect()
}

/// A convolution with bias under autograd, on f32 CPU tensors. At stride 1 the direct kernel
/// of `conv2d` forwards, and its backward is one convolution (input gradient) and the weight
/// gradient's products over the whole batch; strided (the downsamplers), `im2col`'s unfolded
/// product forwards, and backwards its input gradient (`Wᵀ · g` folded back) and weight
/// gradient. Composed from candle's ops, the same convolution spent most of a small training
/// step on copying shifted views and their gradients, and candle's strided convolution and its
/// backward ran on one thread with a dot product per output.
pub(crate) struct Conv2dTrainOp {
    shape: ConvShape,
    stride: usize,
}

impl Conv2dTrainOp {
    /// The op for `x` and `weight` at `stride`, if the kernels compute it (at stride 1,
    /// `pad < k`, so that the input gradient is itself a padded convolution).
    pub(crate) fn new(
        x: &Tensor,
        weight: &Tensor,
        padding: usize,
        stride: usize,
    ) -> Result<Option<Self>> {
        let (batch, cin, h, w) = x.dims4()?;
        let (cout, cin_w, k, k2) = weight.dims4()?;
        let shape = ConvShape { batch, cin, h, w, cout, k, pad: padding };
        let fits = stride > 1 || padding < k;
        let ok = cin_w == cin && k == k2 && stride > 0 && fits && shape.valid();
        Ok(ok.then_some(Self { shape, stride }))
    }
}

impl CustomOp3 for Conv2dTrainOp {
    fn name(&self) -> &'static str {
        "ltd-conv2d"
    }

    fn cpu_fwd(
        &self,
        s1: &CpuStorage,
        l1: &Layout,
        s2: &CpuStorage,
        l2: &Layout,
        s3: &CpuStorage,
        l3: &Layout,
    ) -> Result<(CpuStorage, Shape)> {
        let (x, w, b) =
            (contiguous::<f32>(s1, l1)?, contiguous::<f32>(s2, l2)?, contiguous(s3, l3)?);
        let s = self.shape;
        let epi = Epilogue { bias: b, channel_add: None, residual: None, scale: 1.0 };
        let (hout, wout) = im2col::out_hw(s, self.stride);
        let out = match self.stride {
            1 => conv2d(x, w, s, epi),
            stride => im2col::conv(x, w, s, stride, epi),
        };
        Ok((CpuStorage::F32(out), Shape::from((s.batch, s.cout, hout, wout))))
    }

    fn bwd(
        &self,
        x: &Tensor,
        weight: &Tensor,
        _bias: &Tensor,
        _res: &Tensor,
        grad: &Tensor,
    ) -> Result<(Option<Tensor>, Option<Tensor>, Option<Tensor>)> {
        let s = self.shape;
        let (x, weight, grad) = (x.contiguous()?, weight.contiguous()?, grad.contiguous()?);
        let (xd, wd, gd) = (Data::new(&x), Data::new(&weight), Data::new(&grad));
        let (xs, ws, gs) = (xd.f32()?, wd.f32()?, gd.f32()?);
        let dev = x.device();
        let (dx, dw) = match self.stride {
            1 => (conv2d_input_grad(gs, ws, s), conv2d_weight_grad(xs, gs, s)),
            stride => {
                (im2col::input_grad(gs, ws, s, stride), im2col::weight_grad(xs, gs, s, stride))
            }
        };
        let db = conv2d_bias_grad(gs, s.cout, s.batch);
        Ok((
            Some(Tensor::from_vec(dx, (s.batch, s.cin, s.h, s.w), dev)?),
            Some(Tensor::from_vec(dw, (s.cout, s.cin, s.k, s.k), dev)?),
            Some(Tensor::from_vec(db, s.cout, dev)?),
        ))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn winograd_takes_the_wide_3x3_convolutions() {
        let shape = |cin, cout, k| ConvShape { batch: 2, cin, h: 16, w: 16, cout, k, pad: k / 2 };
        // SD 1.5's U-Net and VAE, and the tiny models' 32/64 channels.
        for (cin, cout) in [(320, 320), (2560, 1280), (128, 128), (512, 512), (32, 64)] {
            assert!(winograd_suits(shape(cin, cout, 3)), "{cin}→{cout}");
        }
        // conv_in (4 latent channels), conv_out, narrow layers and other kernel sizes.
        for (cin, cout, k) in [(4, 320, 3), (320, 4, 3), (16, 16, 3), (320, 320, 1), (64, 64, 5)] {
            assert!(!winograd_suits(shape(cin, cout, k)), "{cin}→{cout}, {k}×{k}");
        }
        // Too few tiles an image on a wide layer: SD 1.5's 8×8 level at any batch, and a
        // 12×9 image (9 tiles) on the edge; 16×16 has 16 tiles; narrow layers run it anyway.
        let at = |batch, cin, h, w| ConvShape { batch, cin, h, w, cout: 1280, k: 3, pad: 1 };
        for (batch, cin, h, w) in [(2, 1280, 8, 8), (1, 2560, 8, 8), (16, 1280, 4, 4)] {
            assert!(!winograd_suits(at(batch, cin, h, w)), "{batch}×{cin}×{h}×{w}");
            assert!(super::super::im2col::pays(at(batch, cin, h, w), false));
        }
        for (batch, cin, h, w) in [(1, 1280, 16, 16), (2, 1280, 12, 9), (1, 64, 4, 4)] {
            assert!(winograd_suits(at(batch, cin, h, w)), "{batch}×{cin}×{h}×{w}");
        }
        let narrow = ConvShape { batch: 16, cin: 128, h: 4, w: 4, cout: 128, k: 3, pad: 1 };
        assert!(winograd_suits(narrow));
    }

    /// The AVX-512 register tiles give the AVX2 tiles' bits (the same multiply-adds in the same
    /// order), for AVX-512 tiles of every height from 1 to 12 rows (13 output channels run as
    /// 7 + 6, 30 as 10 + 10 + 10, 23 as 12 + 11) and a 5×5 kernel.
    #[cfg(target_arch = "x86_64")]
    #[test]
    fn avx512_taps_equal_avx2_taps_bit_for_bit() {
        if !super::super::simd::avx512_available() {
            return;
        }
        for &(cin, cout, h, w, k) in &[
            (40, 13, 5, 11, 3),
            (7, 1, 4, 6, 3),
            (16, 12, 3, 16, 3),
            (24, 30, 4, 9, 3),
            (5, 23, 6, 7, 5),
            (3, 2, 2, 3, 3),
            (6, 3, 3, 5, 3),
            (6, 4, 3, 5, 3),
            (6, 5, 3, 5, 3),
            (6, 8, 3, 5, 3),
            (6, 9, 3, 5, 3),
        ] {
            let s = ConvShape { batch: 1, cin, h, w, cout, k, pad: k / 2 };
            let wp = w + 2 * s.pad;
            let plane = (h + 2 * s.pad + 1) * wp;
            let n = (h * wp).next_multiple_of(TILE_COLUMNS);
            let input = ltd_test_support::uniform(cin * plane + TILE_COLUMNS + k * wp, 1);
            let taps = ltd_test_support::uniform(k * k * cin * cout, 2);
            let (mut narrow, mut wide) = (vec![0f32; cout * n], vec![0f32; cout * n]);
            // SAFETY: AVX-512F (and so AVX2 and FMA here) is present; the buffers are sized as
            // `taps_product` requires.
            unsafe {
                let (input, taps, nco) = (&input[..], &taps[..], cout);
                taps_product_avx2(Taps { acc: &mut narrow, n, input, plane, taps, s, nco });
                taps_product_avx512(Taps { acc: &mut wide, n, input, plane, taps, s, nco });
            }
            let bits = |x: &[f32]| x.iter().map(|x| x.to_bits()).collect::<Vec<_>>();
            assert_eq!(bits(&narrow), bits(&wide), "{:?}", (cin, cout, h, w, k));
        }
    }
}
