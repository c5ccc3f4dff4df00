//! Fused attention for x86-64 CPUs with AVX2 and FMA: FlashAttention's streaming softmax
//! (Dao et al. 2022, Algorithm 1; Milakov & Gimelshein 2018's online softmax) on the CPU.
//!
//! For each head and block of [`BLOCK_Q`] queries, keys are visited in blocks of [`BLOCK_K`]:
//! the block's scores are computed into a small buffer that stays in L1/L2 cache, exponentiated
//! against the running row maximum, and accumulated into the output with the running sums
//! rescaled. The `Lq × Lk` score matrix never exists: memory is `O(threads · BLOCK_Q · BLOCK_K)`
//! beyond inputs and output, and nothing round-trips through main memory, which is what makes
//! the unfused form slow at 4096 tokens.
//!
//! Everything is computed in f32 (callers convert half-precision inputs). Where the CPU has
//! AVX-512F the tiles are 16 lanes wide, with every sum formed in the same order as by the
//! 8-lane tiles, so both give the same bits: for heads at least 8 wide with the queries in the
//! lanes (`block_lanes`: scores, softmax and P·V run down the lanes, no lane idle on a head of
//! 40), for narrower ones with the keys in the lanes as the 8-lane tiles do (`block_avx512`).

#[cfg(target_arch = "x86_64")]
use std::arch::x86_64::*;

use candle_core::{CpuStorage, CustomOp3, Layout, Result, Shape};

use super::conv2d::OutPtr;
pub(crate) use super::simd::available;
#[cfg(target_arch = "x86_64")]
use super::simd::{exp256, exp512};

/// Queries per block (a multiple of the 6-row register tile).
const BLOCK_Q: usize = 48;
/// Keys per block (a multiple of the 16-column register tile).
const BLOCK_K: usize = 256;

/// Shapes of one call: `b·h` independent heads of `q: [lq, d]`, `k: [lk, d]`, `v: [lk, dv]`.
#[derive(Debug, Clone, Copy)]
pub(crate) struct Dims {
    pub b: usize,
    pub h: usize,
    pub lq: usize,
    pub lk: usize,
    pub d: usize,
    pub dv: usize,
}

/// Where an operand's rows lie in its slice: the row `j` of head `(bi, hi)` starts at
/// `bi·batch + hi·head + j·row`, its elements one apart. Heads split from `[B, L, H·D]` (a
/// transposed view) are read in place this way; copying them into `[B, H, L, D]` first was a
/// one-thread pass over every input of every attention layer.
#[derive(Debug, Clone, Copy)]
pub(crate) struct Rows {
    pub batch: usize,
    pub head: usize,
    pub row: usize,
}

impl Rows {
    /// The rows of a contiguous `[B, H, L, D]`.
    #[cfg(test)]
    fn packed(h: usize, l: usize, d: usize) -> Self {
        Self { batch: h * l * d, head: l * d, row: d }
    }

    /// Where head `i` (counted over `B·H`, `h` heads per batch) starts.
    #[inline]
    fn start(&self, i: usize, h: usize) -> usize {
        (i / h) * self.batch + (i % h) * self.head
    }

    /// One past the last element read for `dims` with rows `width` long (0 when empty).
    fn extent(&self, b: usize, h: usize, l: usize, width: usize) -> usize {
        if b == 0 || h == 0 || l == 0 || width == 0 {
            return 0;
        }
        (b - 1) * self.batch + (h - 1) * self.head + (l - 1) * self.row + width
    }
}

/// `softmax(q·kᵀ·scale)·v` for f32 `q`, `k`, `v` laid out as `rows` say (`[B, H, L, D]` with
/// any batch, head and row strides), returning `[B, Lq, H, Dv]` contiguous: the heads already
/// merged, as the output projection reads them. `None` when the CPU lacks AVX2/FMA.
///
/// # Panics
/// If a slice is shorter than its rows reach.
pub(crate) fn attention(
    (q, k, v): (&[f32], &[f32], &[f32]),
    rows: [Rows; 3],
    dims: Dims,
    scale: f32,
) -> Option<Vec<f32>> {
    attention_on((q, k, v), rows, dims, scale, super::simd::avx512_available())
}

/// [`attention`] with the AVX-512 tiles (`wide`, which the CPU must have) or the AVX2 ones:
/// the same sums in the same order, so the same bits.
fn attention_on(
    (q, k, v): (&[f32], &[f32], &[f32]),
    rows: [Rows; 3],
    dims: Dims,
    scale: f32,
    wide: bool,
) -> Option<Vec<f32>> {
    if !available() {
        return None;
    }
    assert!(!wide || super::simd::avx512_available(), "fused attention: no AVX-512F");
    let Dims { b, h, lq, lk, d, dv } = dims;
    let [qr, kr, vr] = rows;
    assert!(q.len() >= qr.extent(b, h, lq, d), "fused attention: q is too short");
    assert!(k.len() >= kr.extent(b, h, lk, d), "fused attention: k is too short");
    assert!(v.len() >= vr.extent(b, h, lk, dv), "fused attention: v is too short");
    let bh = b * h;
    let mut out = vec![0f32; bh * lq * dv];
    if lq == 0 || dv == 0 {
        return Some(out);
    }
    if lk == 0 {
        // torch returns NaN rows (0/0) for an empty softmax; so do we.
        out.fill(f32::NAN);
        return Some(out);
    }
    let threads = super::threads();
    // With AVX-512 and heads at least 8 wide, the queries go in the lanes (`block_lanes`).
    // (Narrower heads keep `block`'s tiles: their P·V sums eight keys per lane, `pv_dot`, in
    // an order the lanes tiles would have to copy for the same bits.)
    let lanes = wide && dv >= 8;
    // Keys transposed per head into panels of `kp` keys, `[bh, lk/kp, d, kp]` (zero-padded):
    // a score tile then reads one contiguous row of a panel per step instead of striding
    // across pages of a plain transpose. 16 keys for `block`'s tiles (keys in the lanes), 8
    // for `block_lanes`' (eight keys broadcast per step).
    let kp = if lanes { 8 } else { 16 };
    let head_len = lk.div_ceil(kp) * d * kp;
    let kt = per_head(bh, head_len, threads, |i, dst| {
        let start = kr.start(i, h);
        for j in 0..lk {
            let panel = &mut dst[(j / kp) * d * kp..][..d * kp];
            for (dd, &x) in k[start + j * kr.row..][..d].iter().enumerate() {
                panel[dd * kp + j % kp] = x;
            }
        }
    });
    // With the queries in the lanes, V in panels of 8 columns, `[bh, dv/8, lk, 8]`
    // (zero-padded): a P·V tile reads its columns of consecutive keys as one stream.
    let vp_len = if lanes { dv.div_ceil(8) * lk * 8 } else { 0 };
    let vp = per_head(bh, vp_len, threads, |i, dst| {
        let start = vr.start(i, h);
        for j in 0..lk {
            for (c, &x) in v[start + j * vr.row..][..dv].iter().enumerate() {
                dst[(c / 8) * lk * 8 + j * 8 + c % 8] = x;
            }
        }
    });
    // Heads narrower than a register (SD's 8 heads of 4 on 32 channels): V transposed per
    // head, `[bh, dv, lk/16·16]` (zero-padded), so that P·V multiplies eight keys at a time
    // (`pv_dot`) rather than one. Wider heads read V as it is, or in panels.
    let vt_stride = lk.div_ceil(16) * 16;
    let vt_len = if dv < 8 { dv * vt_stride } else { 0 };
    let vt = per_head(bh, vt_len, threads, |i, dst| {
        let start = vr.start(i, h);
        for j in 0..lk {
            for (c, &x) in v[start + j * vr.row..][..dv].iter().enumerate() {
                dst[c * vt_stride + j] = x;
            }
        }
    });

    // Work units: (head, first query of a block); each writes its own rows of the output.
    let units: Vec<(usize, usize)> =
        (0..bh).flat_map(|i| (0..lq).step_by(BLOCK_Q).map(move |q0| (i, q0))).collect();
    let per_thread = units.len().div_ceil(threads.min(units.len()).max(1)).max(1);
    let (kt, vt, vp) = (&kt, &vt, &vp);
    let out_ptr = OutPtr(out.as_mut_ptr());
    let run = |units: &[(usize, usize)]| {
        #[allow(clippy::redundant_locals)]
        let out_ptr = out_ptr;
        let mut scratch = Scratch::new(d, dv);
        for &(i, q0) in units {
            let n = BLOCK_Q.min(lq - q0);
            let (bi, hi) = (i / h, i % h);
            let q = &q[qr.start(i, h) + q0 * qr.row..];
            let kt = &kt[i * head_len..(i + 1) * head_len];
            let v = &v[vr.start(i, h)..];
            let vt =
                if vt.is_empty() { &vt[..] } else { &vt[i * dv * vt_stride..][..dv * vt_stride] };
            // `out[bi][q0 + r][hi][..]`: rows `h·dv` apart.
            let o = Out { ptr: out_ptr, start: ((bi * lq + q0) * h + hi) * dv, row: h * dv };
            if lanes {
                let vp = &vp[i * vp_len..][..vp_len];
                let args = ((q, qr.row), kt, vp, o, n, dims, scale, &mut scratch);
                // SAFETY: as below; `lanes` implies `wide`, so the CPU has AVX-512F.
                #[cfg(target_arch = "x86_64")]
                unsafe {
                    block_lanes(args)
                };
                continue;
            }
            let args = ((q, qr.row), kt, (v, vr.row), vt, o, n, dims, scale, &mut scratch);
            // SAFETY: `available()` checked AVX2 and FMA above (and AVX-512F where `wide`); the
            // asserts above bound every row read; this unit alone writes its `n` rows of `dv`
            // elements of head `i`.
            #[cfg(target_arch = "x86_64")]
            unsafe {
                if wide {
                    block_avx512(args)
                } else {
                    block_avx2(args)
                }
            };
        }
    };
    super::for_each_parallel(units.chunks(per_thread).collect(), run);
    Some(out)
}

/// `bh` buffers of `len` elements, zeroed, then each filled by `fill(head, buffer)`; heads in
/// parallel. Empty when `len` is 0.
fn per_head(
    bh: usize,
    len: usize,
    threads: usize,
    fill: impl Fn(usize, &mut [f32]) + Sync,
) -> Vec<f32> {
    let mut all = vec![0f32; bh * len];
    if len > 0 {
        let per = bh.div_ceil(threads).max(1);
        super::for_each_parallel(all.chunks_mut(per * len).enumerate().collect(), |(t, dst)| {
            for (i, dst) in dst.chunks_mut(len).enumerate() {
                fill(t * per + i, dst);
            }
        });
    }
    all
}

/// Where a unit writes its rows: row `r` at `ptr + start + r·row`.
#[derive(Clone, Copy)]
struct Out {
    ptr: OutPtr,
    start: usize,
    row: usize,
}

/// Per-thread buffers.
struct Scratch {
    q: Vec<f32>,
    s: Vec<f32>,
    o: Vec<f32>,
    m: Vec<f32>,
    l: Vec<f32>,
}

impl Scratch {
    fn new(d: usize, dv: usize) -> Self {
        Self {
            q: vec![0.0; BLOCK_Q * d],
            s: vec![0.0; BLOCK_Q * BLOCK_K],
            o: vec![0.0; BLOCK_Q * dv],
            m: vec![0.0; BLOCK_Q],
            l: vec![0.0; BLOCK_Q],
        }
    }
}

/// The arguments of [`block`].
#[cfg(target_arch = "x86_64")]
type BlockArgs<'a> = (
    (&'a [f32], usize),
    &'a [f32],
    (&'a [f32], usize),
    &'a [f32],
    Out,
    usize,
    Dims,
    f32,
    &'a mut Scratch,
);

/// [`block`] with AVX2's 8-lane tiles.
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2,fma")]
unsafe fn block_avx2(args: BlockArgs<'_>) {
    unsafe { block::<false>(args) }
}

/// [`block`] with AVX-512's 16-lane tiles, for heads narrower than 8 (wider ones run
/// [`block_lanes`]): score tiles of 6 rows × 32 keys, exponentials 16 at a time (the same sums
/// in the same order as [`block_avx2`]).
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx512f,avx2,fma")]
unsafe fn block_avx512(args: BlockArgs<'_>) {
    unsafe { block::<true>(args) }
}

/// One block of `rows ≤ BLOCK_Q` queries of one head against all its keys (`vt`: V
/// transposed when `dv < 8`, else empty); `WIDE`: AVX-512's tiles, which the CPU must have.
#[cfg(target_arch = "x86_64")]
#[inline(always)]
unsafe fn block<const WIDE: bool>(
    ((q, q_row), kt, (v, v_row), vt, out, rows, dims, scale, sc): BlockArgs<'_>,
) {
    unsafe {
        let Dims { lk, d, dv, .. } = dims;
        for (r, dst) in sc.q.chunks_exact_mut(d).take(rows).enumerate() {
            for (dst, &x) in dst.iter_mut().zip(&q[r * q_row..][..d]) {
                *dst = x * scale;
            }
        }
        sc.m[..rows].fill(f32::NEG_INFINITY);
        sc.l[..rows].fill(0.0);
        sc.o[..rows * dv].fill(0.0);
        let mut k0 = 0;
        while k0 < lk {
            let width = BLOCK_K.min(lk - k0);
            let padded = width.next_multiple_of(16);
            // Scores S = (scale·Q)·Kᵀ for this key block, in tiles of up to 6 rows × 16 keys.
            let mut r = 0;
            while r < rows {
                // Six rows × 16 keys: twelve accumulators, enough independent multiply-adds to
                // hide their latency (four rows left the FMA units waiting).
                let tile_rows = (rows - r).min(6);
                let mut c = 0;
                if WIDE {
                    qk_tiles_avx512(
                        tile_rows,
                        (sc.q.as_ptr().add(r * d), d),
                        kt,
                        k0,
                        padded,
                        sc.s.as_mut_ptr().add(r * BLOCK_K),
                    );
                    c = padded;
                }
                while c < padded {
                    let qp = sc.q.as_ptr().add(r * d);
                    let kp = kt.as_ptr().add((k0 + c) * d);
                    let sp = sc.s.as_mut_ptr().add(r * BLOCK_K + c);
                    match tile_rows {
                        6 => qk_tile::<6>(qp, d, kp, sp),
                        5 => qk_tile::<5>(qp, d, kp, sp),
                        4 => qk_tile::<4>(qp, d, kp, sp),
                        3 => qk_tile::<3>(qp, d, kp, sp),
                        2 => qk_tile::<2>(qp, d, kp, sp),
                        _ => qk_tile::<1>(qp, d, kp, sp),
                    }
                    c += 16;
                }
                r += tile_rows;
            }
            // Online softmax: rescale what was accumulated to the new row maxima.
            for r in 0..rows {
                let row = &mut sc.s[r * BLOCK_K..r * BLOCK_K + width];
                let m_new = sc.m[r].max(row_max(row));
                let alpha = (sc.m[r] - m_new).exp();
                let sum = if WIDE {
                    exp_sub_in_place_avx512(row, m_new)
                } else {
                    exp_sub_in_place(row, m_new)
                };
                sc.l[r] = sc.l[r] * alpha + sum;
                sc.m[r] = m_new;
                if alpha != 1.0 {
                    for x in &mut sc.o[r * dv..(r + 1) * dv] {
                        *x *= alpha;
                    }
                }
            }
            // O += P·V for this key block.
            if !vt.is_empty() {
                // Scores past `width` up to `padded` are of zero-padded keys, and V's
                // padding is zero too: they add nothing.
                let (vtb, stride) = (vt.as_ptr().add(k0), vt.len() / dv);
                let mut r = 0;
                while r < rows {
                    let tile_rows = (rows - r).min(2);
                    let pp = sc.s.as_ptr().add(r * BLOCK_K);
                    let op = sc.o.as_mut_ptr().add(r * dv);
                    pv_dot_dispatch(tile_rows, pp, padded, vtb, stride, dv, op);
                    r += tile_rows;
                }
                k0 += width;
                continue;
            }
            let vb = v[k0 * v_row..].as_ptr();
            let mut r = 0;
            while r < rows {
                let tile_rows = (rows - r).min(6);
                let pp = sc.s.as_ptr().add(r * BLOCK_K);
                let op = sc.o.as_mut_ptr().add(r * dv);
                // AVX2's tiles only: with AVX-512, heads this wide run `block_lanes`.
                match tile_rows {
                    6 => pv_rows::<6>(pp, width, vb, v_row, (0, dv), op),
                    5 => pv_rows::<5>(pp, width, vb, v_row, (0, dv), op),
                    4 => pv_rows::<4>(pp, width, vb, v_row, (0, dv), op),
                    3 => pv_rows::<3>(pp, width, vb, v_row, (0, dv), op),
                    2 => pv_rows::<2>(pp, width, vb, v_row, (0, dv), op),
                    _ => pv_rows::<1>(pp, width, vb, v_row, (0, dv), op),
                }
                r += tile_rows;
            }
            k0 += width;
        }
        for r in 0..rows {
            let inv = 1.0 / sc.l[r];
            let dst = std::slice::from_raw_parts_mut(out.ptr.0.add(out.start + r * out.row), dv);
            for (o, &x) in dst.iter_mut().zip(&sc.o[r * dv..(r + 1) * dv]) {
                *o = x * inv;
            }
        }
    }
}

/// `s[r][0..16] = Σ_d q[r][d] · panel[d][0..16]` for `R` rows (`s` rows `BLOCK_K` apart).
#[cfg(target_arch = "x86_64")]
#[inline]
#[target_feature(enable = "avx2,fma")]
unsafe fn qk_tile<const R: usize>(q: *const f32, d: usize, panel: *const f32, s: *mut f32) {
    unsafe {
        let mut acc = [[_mm256_setzero_ps(); 2]; R];
        for dd in 0..d {
            let k0 = _mm256_loadu_ps(panel.add(dd * 16));
            let k1 = _mm256_loadu_ps(panel.add(dd * 16 + 8));
            for (r, a) in acc.iter_mut().enumerate() {
                let qv = _mm256_broadcast_ss(&*q.add(r * d + dd));
                a[0] = _mm256_fmadd_ps(qv, k0, a[0]);
                a[1] = _mm256_fmadd_ps(qv, k1, a[1]);
            }
        }
        for (r, a) in acc.iter().enumerate() {
            _mm256_storeu_ps(s.add(r * BLOCK_K), a[0]);
            _mm256_storeu_ps(s.add(r * BLOCK_K + 8), a[1]);
        }
    }
}

/// `o[r][..] += Σ_j p[r][j] · v[j][..]` for `R` rows over `width` keys (V's rows `vs`
/// apart), columns `c0..dv`.
#[cfg(target_arch = "x86_64")]
#[inline]
#[target_feature(enable = "avx2,fma")]
unsafe fn pv_rows<const R: usize>(
    p: *const f32,
    width: usize,
    v: *const f32,
    vs: usize,
    (c0, dv): (usize, usize),
    o: *mut f32,
) {
    unsafe {
        let mut c = c0;
        while c + 16 <= dv {
            let mut acc = [[_mm256_setzero_ps(); 2]; R];
            for j in 0..width {
                let v0 = _mm256_loadu_ps(v.add(j * vs + c));
                let v1 = _mm256_loadu_ps(v.add(j * vs + c + 8));
                for (r, a) in acc.iter_mut().enumerate() {
                    let pr = _mm256_broadcast_ss(&*p.add(r * BLOCK_K + j));
                    a[0] = _mm256_fmadd_ps(pr, v0, a[0]);
                    a[1] = _mm256_fmadd_ps(pr, v1, a[1]);
                }
            }
            for (r, a) in acc.iter().enumerate() {
                let dst = o.add(r * dv + c);
                _mm256_storeu_ps(dst, _mm256_add_ps(_mm256_loadu_ps(dst), a[0]));
                _mm256_storeu_ps(dst.add(8), _mm256_add_ps(_mm256_loadu_ps(dst.add(8)), a[1]));
            }
            c += 16;
        }
        if c + 8 <= dv {
            let mut acc = [_mm256_setzero_ps(); R];
            for j in 0..width {
                let v0 = _mm256_loadu_ps(v.add(j * vs + c));
                for (r, a) in acc.iter_mut().enumerate() {
                    let pr = _mm256_broadcast_ss(&*p.add(r * BLOCK_K + j));
                    *a = _mm256_fmadd_ps(pr, v0, *a);
                }
            }
            for (r, a) in acc.iter().enumerate() {
                let dst = o.add(r * dv + c);
                _mm256_storeu_ps(dst, _mm256_add_ps(_mm256_loadu_ps(dst), *a));
            }
            c += 8;
        }
        // Heads of 4 (or a 4-wide tail): half-width registers, one key at a time. Small heads
        // make this loop as long as the score tile's, so it must not fall to the scalar tail.
        if c + 4 <= dv {
            let mut acc = [_mm_setzero_ps(); R];
            for j in 0..width {
                let v0 = _mm_loadu_ps(v.add(j * vs + c));
                for (r, a) in acc.iter_mut().enumerate() {
                    let pr = _mm_broadcast_ss(&*p.add(r * BLOCK_K + j));
                    *a = _mm_fmadd_ps(pr, v0, *a);
                }
            }
            for (r, a) in acc.iter().enumerate() {
                let dst = o.add(r * dv + c);
                _mm_storeu_ps(dst, _mm_add_ps(_mm_loadu_ps(dst), *a));
            }
            c += 4;
        }
        for cc in c..dv {
            for r in 0..R {
                let mut acc = 0f32;
                for j in 0..width {
                    acc += *p.add(r * BLOCK_K + j) * *v.add(j * vs + cc);
                }
                *o.add(r * dv + cc) += acc;
            }
        }
    }
}

/// [`pv_dot`] for 1 or 2 rows and a head width below 8.
#[cfg(target_arch = "x86_64")]
#[inline]
#[target_feature(enable = "avx2,fma")]
unsafe fn pv_dot_dispatch(
    rows: usize,
    p: *const f32,
    padded: usize,
    vt: *const f32,
    stride: usize,
    dv: usize,
    o: *mut f32,
) {
    unsafe {
        macro_rules! go {
            ($($dv:literal),*) => {
                match (rows, dv) {
                    $((2, $dv) => pv_dot::<2, $dv>(p, padded, vt, stride, o),
                      (_, $dv) => pv_dot::<1, $dv>(p, padded, vt, stride, o),)*
                    _ => unreachable!("pv_dot takes heads narrower than 8"),
                }
            };
        }
        go!(1, 2, 3, 4, 5, 6, 7)
    }
}

/// `o[r][c] += Σ_j p[r][j] · vt[c][j]` for `R` rows over `padded` keys (a multiple of 8),
/// `DV < 8` columns, V transposed (`vt` rows `stride` apart): eight keys per multiply-add,
/// summed across lanes once per key block.
#[cfg(target_arch = "x86_64")]
#[inline]
#[target_feature(enable = "avx2,fma")]
// Indices, not iterators, over the accumulator grid: each V row is loaded once for all rows.
#[allow(clippy::needless_range_loop)]
unsafe fn pv_dot<const R: usize, const DV: usize>(
    p: *const f32,
    padded: usize,
    vt: *const f32,
    stride: usize,
    o: *mut f32,
) {
    unsafe {
        let mut acc = [[_mm256_setzero_ps(); DV]; R];
        let mut j = 0;
        while j < padded {
            let mut pr = [_mm256_setzero_ps(); R];
            for (r, x) in pr.iter_mut().enumerate() {
                *x = _mm256_loadu_ps(p.add(r * BLOCK_K + j));
            }
            for c in 0..DV {
                let vv = _mm256_loadu_ps(vt.add(c * stride + j));
                for r in 0..R {
                    acc[r][c] = _mm256_fmadd_ps(pr[r], vv, acc[r][c]);
                }
            }
            j += 8;
        }
        for (r, row) in acc.iter().enumerate() {
            for (c, a) in row.iter().enumerate() {
                let half = _mm_add_ps(_mm256_castps256_ps128(*a), _mm256_extractf128_ps(*a, 1));
                let pair = _mm_add_ps(half, _mm_movehl_ps(half, half));
                let sum = _mm_cvtss_f32(_mm_add_ss(pair, _mm_shuffle_ps(pair, pair, 1)));
                *o.add(r * DV + c) += sum;
            }
        }
    }
}

/// The arguments of [`block_lanes`]: the queries with their row step, the head's key panels of
/// 8 keys and value panels of 8 columns, where to write, how many queries, the shapes, the
/// scale.
#[cfg(target_arch = "x86_64")]
type LanesArgs<'a> =
    ((&'a [f32], usize), &'a [f32], &'a [f32], Out, usize, Dims, f32, &'a mut Scratch);

/// Lanes of a query block in the transposed buffers: scores `[key][QL]`, scaled queries
/// `[d][QL]` and outputs `[dv][QL]`.
const QL: usize = BLOCK_Q;

/// [`block`]'s results for heads at least 8 wide with AVX-512, bit for bit, with the queries in
/// the lanes instead of the keys: up to 48 queries (three registers) against 8 keys per score
/// tile and 8 value columns per P·V tile. The score and P·V tiles then have no lanes to waste
/// on a head of 40 (SD 1.5's 64² level: 2.5 registers of 16 as rows, where [`block`] ran its
/// last 8 columns in half-empty 8-lane tiles), every key and value element is a broadcast
/// read once per block of queries (not once per six), and the softmax's maxima, exponentials
/// and sums run down the lanes instead of along rows. Every number is the same sum in the same
/// order as [`block`]'s: scores as multiply-adds over the head in order, exponentials by the
/// same routine (`exp512` where [`block`] takes 8 or 16 at a time, `f32::exp` for a key
/// block's last `width % 8` keys and the rescaling factors), the row sums in [`block`]'s
/// eight interleaved partial sums, P·V as multiply-adds over the keys in order (plain
/// multiply, then add, in the last `dv % 4` columns, as [`pv_rows`]' scalar tail).
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx512f,avx2,fma")]
unsafe fn block_lanes(((q, q_row), kt, vp, out, rows, dims, scale, sc): LanesArgs<'_>) {
    unsafe {
        let d = dims.d;
        let qt = &mut sc.q[..d * QL];
        qt.fill(0.0);
        for r in 0..rows {
            for (dd, &x) in q[r * q_row..][..d].iter().enumerate() {
                qt[dd * QL + r] = x * scale;
            }
        }
        match rows.div_ceil(16) {
            1 => lanes_run::<1>(kt, vp, out, rows, dims, sc),
            2 => lanes_run::<2>(kt, vp, out, rows, dims, sc),
            _ => lanes_run::<3>(kt, vp, out, rows, dims, sc),
        }
    }
}

/// [`block_lanes`] for `NV` registers of queries (`rows ≤ 16·NV`), queries already in `sc.q`.
#[cfg(target_arch = "x86_64")]
#[inline]
#[target_feature(enable = "avx512f,avx2,fma")]
unsafe fn lanes_run<const NV: usize>(
    kt: &[f32],
    vp: &[f32],
    out: Out,
    rows: usize,
    dims: Dims,
    sc: &mut Scratch,
) {
    unsafe {
        let Dims { lk, d, dv, .. } = dims;
        sc.o[..dv * QL].fill(0.0);
        let (qt, st, ot) = (sc.q.as_ptr(), sc.s.as_mut_ptr(), sc.o.as_mut_ptr());
        let mut m = [_mm512_set1_ps(f32::NEG_INFINITY); NV];
        let mut l = [_mm512_setzero_ps(); NV];
        let mut k0 = 0;
        while k0 < lk {
            let width = BLOCK_K.min(lk - k0);
            // Scores `st[j][r]` for keys `k0 + j`, a panel of 8 at a time (`k0` is a multiple
            // of 8; rows past `width` are of zero-padded keys, and unused).
            for j in (0..width).step_by(8) {
                lane_scores::<NV>(qt, d, kt.as_ptr().add((k0 + j) * d), st.add(j * QL));
            }
            // Online softmax, 16 queries at a time, as [`block`] does it per row.
            let wide = width / 8 * 8;
            for i in 0..NV {
                let col = |j: usize| st.add(j * QL + 16 * i);
                // Eight running maxima (one would wait on each max's latency); a maximum is
                // the same whatever the order.
                let mut mx = [_mm512_set1_ps(f32::NEG_INFINITY); 8];
                for j0 in (0..wide).step_by(8) {
                    for (t, mx) in mx.iter_mut().enumerate() {
                        *mx = _mm512_max_ps(*mx, _mm512_loadu_ps(col(j0 + t)));
                    }
                }
                for j in wide..width {
                    mx[0] = _mm512_max_ps(mx[0], _mm512_loadu_ps(col(j)));
                }
                let mx = mx.iter().fold(mx[0], |a, &b| _mm512_max_ps(a, b));
                let m_new = _mm512_max_ps(m[i], mx);
                let (old, new) = (lanes16(m[i]), lanes16(m_new));
                let alpha = _mm512_loadu_ps(
                    std::array::from_fn::<f32, 16, _>(|t| (old[t] - new[t]).exp()).as_ptr(),
                );
                // The eight interleaved partial sums of `exp_sub_in_place`, then its total.
                let mut part = [_mm512_setzero_ps(); 8];
                for j0 in (0..wide).step_by(8) {
                    for (t, part) in part.iter_mut().enumerate() {
                        let e = exp512(_mm512_sub_ps(_mm512_loadu_ps(col(j0 + t)), m_new));
                        _mm512_storeu_ps(col(j0 + t), e);
                        *part = _mm512_add_ps(*part, e);
                    }
                }
                let mut sum = part[0];
                for p in &part[1..] {
                    sum = _mm512_add_ps(sum, *p);
                }
                for j in wide..width {
                    let x = lanes16(_mm512_loadu_ps(col(j)));
                    let e = std::array::from_fn::<f32, 16, _>(|t| (x[t] - new[t]).exp());
                    let e = _mm512_loadu_ps(e.as_ptr());
                    _mm512_storeu_ps(col(j), e);
                    sum = _mm512_add_ps(sum, e);
                }
                l[i] = _mm512_add_ps(_mm512_mul_ps(l[i], alpha), sum);
                m[i] = m_new;
                for c in 0..dv {
                    let o = ot.add(c * QL + 16 * i);
                    _mm512_storeu_ps(o, _mm512_mul_ps(_mm512_loadu_ps(o), alpha));
                }
            }
            // O += P·V, 8 columns at a time; the last `dv % 4` as plain products and sums.
            let fused = dv / 4 * 4;
            let mut c = 0;
            while c < dv {
                let n = if c < fused { (fused - c).min(8) } else { dv - c };
                // Columns `c .. c + n` lie in one panel (8-column tiles start at multiples of
                // 8, and so does a 4-column one; a tail of 1-3 at a multiple of 4).
                let vp = vp.as_ptr().add((c / 8) * lk * 8 + k0 * 8 + c % 8);
                let op = ot.add(c * QL);
                match (n, c < fused) {
                    (8, true) => lane_pv::<NV, 8, true>(st, width, vp, op),
                    (4, true) => lane_pv::<NV, 4, true>(st, width, vp, op),
                    (3, false) => lane_pv::<NV, 3, false>(st, width, vp, op),
                    (2, false) => lane_pv::<NV, 2, false>(st, width, vp, op),
                    (1, false) => lane_pv::<NV, 1, false>(st, width, vp, op),
                    _ => unreachable!("P·V tiles are 8 or 4 fused columns or a 1-3 column tail"),
                }
                c += n;
            }
            k0 += width;
        }
        for (i, l) in l.iter().enumerate() {
            let inv = lanes16(_mm512_div_ps(_mm512_set1_ps(1.0), *l));
            for (t, &inv) in inv.iter().enumerate().take(rows.saturating_sub(16 * i)) {
                let r = 16 * i + t;
                let dst =
                    std::slice::from_raw_parts_mut(out.ptr.0.add(out.start + r * out.row), dv);
                for (c, o) in dst.iter_mut().enumerate() {
                    *o = *ot.add(c * QL + r) * inv;
                }
            }
        }
    }
}

/// The 16 lanes of a register.
#[cfg(target_arch = "x86_64")]
#[inline]
#[target_feature(enable = "avx512f")]
fn lanes16(x: __m512) -> [f32; 16] {
    let mut a = [0f32; 16];
    // SAFETY: `a` holds 16 floats.
    unsafe { _mm512_storeu_ps(a.as_mut_ptr(), x) };
    a
}

/// Scores `st[kk][r] = Σ_d panel[d][kk] · qt[d][r]` for a panel of 8 keys and `16·NV` queries
/// (`qt` and `st` rows [`QL`] apart): the keys broadcast against the query lanes.
#[cfg(target_arch = "x86_64")]
#[inline]
#[target_feature(enable = "avx512f,avx2,fma")]
unsafe fn lane_scores<const NV: usize>(qt: *const f32, d: usize, panel: *const f32, st: *mut f32) {
    unsafe { outer_tile::<8, NV>(d, (panel, 1, 8), (qt, 16, QL), (st, QL)) }
}

/// The score tile of both AVX-512 layouts: `out[r][16p .. 16p + 16] = Σ_t a[r·ar + t·at] ·
/// b[p·bp + t·bt ..][..16]` for `R` broadcast elements against `P` registers, one multiply-add
/// per `t < n` in order from zero (rows of `out` `or` apart). [`block_avx512`] broadcasts
/// queries against key panels of 16, [`block_lanes`] keys against query lanes.
#[cfg(target_arch = "x86_64")]
#[inline]
#[target_feature(enable = "avx512f,avx2,fma")]
unsafe fn outer_tile<const R: usize, const P: usize>(
    n: usize,
    (a, ar, at): (*const f32, usize, usize),
    (b, bp, bt): (*const f32, usize, usize),
    (out, or): (*mut f32, usize),
) {
    unsafe {
        let mut acc = [[_mm512_setzero_ps(); P]; R];
        for t in 0..n {
            let bv: [__m512; P] = std::array::from_fn(|p| _mm512_loadu_ps(b.add(p * bp + t * bt)));
            for (r, acc) in acc.iter_mut().enumerate() {
                let av = _mm512_set1_ps(*a.add(r * ar + t * at));
                for (acc, bv) in acc.iter_mut().zip(bv) {
                    *acc = _mm512_fmadd_ps(av, bv, *acc);
                }
            }
        }
        for (r, acc) in acc.iter().enumerate() {
            for (p, acc) in acc.iter().enumerate() {
                _mm512_storeu_ps(out.add(r * or + 16 * p), *acc);
            }
        }
    }
}

/// `ot[cc][r] += Σ_j st[j][r] · v[j][cc]` over `width` keys for `CT` columns (`v` rows 8
/// apart: a value panel) and `16·NV` queries: multiply-adds where `FUSED`, else a product then
/// a sum.
#[cfg(target_arch = "x86_64")]
#[inline]
#[target_feature(enable = "avx512f,avx2,fma")]
unsafe fn lane_pv<const NV: usize, const CT: usize, const FUSED: bool>(
    st: *const f32,
    width: usize,
    v: *const f32,
    ot: *mut f32,
) {
    unsafe {
        let mut acc = [[_mm512_setzero_ps(); NV]; CT];
        for j in 0..width {
            let p: [__m512; NV] = std::array::from_fn(|i| _mm512_loadu_ps(st.add(j * QL + 16 * i)));
            for (cc, a) in acc.iter_mut().enumerate() {
                let vb = _mm512_set1_ps(*v.add(j * 8 + cc));
                for (a, p) in a.iter_mut().zip(p) {
                    *a = if FUSED {
                        _mm512_fmadd_ps(p, vb, *a)
                    } else {
                        _mm512_add_ps(*a, _mm512_mul_ps(p, vb))
                    };
                }
            }
        }
        for (cc, a) in acc.iter().enumerate() {
            for (i, a) in a.iter().enumerate() {
                let o = ot.add(cc * QL + 16 * i);
                _mm512_storeu_ps(o, _mm512_add_ps(_mm512_loadu_ps(o), *a));
            }
        }
    }
}

/// Score tiles of `rows ≤ 6` queries (`q`, rows `d` apart, scaled) against keys
/// `k0..k0 + padded` (`padded` a multiple of 16) of a head's key panels `kt`: 32 keys at a time
/// (two panels), then 16. Each score is the same sum in the same order as [`qk_tile`]'s.
#[cfg(target_arch = "x86_64")]
#[inline]
#[target_feature(enable = "avx512f,avx2,fma")]
unsafe fn qk_tiles_avx512(
    rows: usize,
    (q, d): (*const f32, usize),
    kt: &[f32],
    k0: usize,
    padded: usize,
    s: *mut f32,
) {
    unsafe {
        macro_rules! go {
            ($p:literal, $kp:expr, $sp:expr) => {
                match rows {
                    6 => outer_tile::<6, $p>(d, (q, d, 1), ($kp, 16 * d, 16), ($sp, BLOCK_K)),
                    5 => outer_tile::<5, $p>(d, (q, d, 1), ($kp, 16 * d, 16), ($sp, BLOCK_K)),
                    4 => outer_tile::<4, $p>(d, (q, d, 1), ($kp, 16 * d, 16), ($sp, BLOCK_K)),
                    3 => outer_tile::<3, $p>(d, (q, d, 1), ($kp, 16 * d, 16), ($sp, BLOCK_K)),
                    2 => outer_tile::<2, $p>(d, (q, d, 1), ($kp, 16 * d, 16), ($sp, BLOCK_K)),
                    _ => outer_tile::<1, $p>(d, (q, d, 1), ($kp, 16 * d, 16), ($sp, BLOCK_K)),
                }
            };
        }
        let mut c = 0;
        while c < padded {
            // Panel `(k0 + c)/16` starts at `(k0 + c)·d`; the next one `16·d` after it.
            let (kp, sp) = (kt.as_ptr().add((k0 + c) * d), s.add(c));
            if c + 32 <= padded {
                go!(2, kp, sp);
                c += 32;
            } else {
                go!(1, kp, sp);
                c += 16;
            }
        }
    }
}

/// [`exp_sub_in_place`] 16 lanes at a time: the same exponentials, and the same sum (each
/// register's halves added to the 8 running sums in order, as the 8-lane loop adds them).
#[cfg(target_arch = "x86_64")]
#[inline]
#[target_feature(enable = "avx512f,avx2,fma")]
unsafe fn exp_sub_in_place_avx512(row: &mut [f32], m: f32) -> f32 {
    unsafe {
        let mv = _mm512_set1_ps(m);
        let mut sum = _mm256_setzero_ps();
        let wide = row.len() / 16 * 16;
        for c in row[..wide].chunks_exact_mut(16) {
            let e = exp512(_mm512_sub_ps(_mm512_loadu_ps(c.as_ptr()), mv));
            _mm512_storeu_ps(c.as_mut_ptr(), e);
            sum = _mm256_add_ps(sum, _mm512_castps512_ps256(e));
            sum = _mm256_add_ps(
                sum,
                _mm256_castpd_ps(_mm512_extractf64x4_pd::<1>(_mm512_castps_pd(e))),
            );
        }
        exp_sub_from(row, m, wide, sum)
    }
}

/// The maximum of a row.
#[cfg(target_arch = "x86_64")]
#[inline]
#[target_feature(enable = "avx2,fma")]
unsafe fn row_max(row: &[f32]) -> f32 {
    unsafe {
        let mut m = _mm256_set1_ps(f32::NEG_INFINITY);
        let chunks = row.chunks_exact(8);
        let tail = chunks.remainder();
        for c in chunks {
            m = _mm256_max_ps(m, _mm256_loadu_ps(c.as_ptr()));
        }
        let mut lanes = [0f32; 8];
        _mm256_storeu_ps(lanes.as_mut_ptr(), m);
        lanes.iter().chain(tail).fold(f32::NEG_INFINITY, |a, &b| a.max(b))
    }
}

/// `row[j] = exp(row[j] − m)` in place; returns the sum.
#[cfg(target_arch = "x86_64")]
#[inline]
#[target_feature(enable = "avx2,fma")]
unsafe fn exp_sub_in_place(row: &mut [f32], m: f32) -> f32 {
    unsafe { exp_sub_from(row, m, 0, _mm256_setzero_ps()) }
}

/// [`exp_sub_in_place`] from element `start` on, the 8 running sums starting at `sum`; returns
/// the row's total.
#[cfg(target_arch = "x86_64")]
#[inline]
#[target_feature(enable = "avx2,fma")]
unsafe fn exp_sub_from(row: &mut [f32], m: f32, start: usize, mut sum: __m256) -> f32 {
    unsafe {
        let mv = _mm256_set1_ps(m);
        let mut chunks = row[start..].chunks_exact_mut(8);
        for c in &mut chunks {
            let e = exp256(_mm256_sub_ps(_mm256_loadu_ps(c.as_ptr()), mv));
            _mm256_storeu_ps(c.as_mut_ptr(), e);
            sum = _mm256_add_ps(sum, e);
        }
        let mut lanes = [0f32; 8];
        _mm256_storeu_ps(lanes.as_mut_ptr(), sum);
        let mut total: f32 = lanes.iter().sum();
        for x in chunks.into_remainder() {
            *x = (*x - m).exp();
            total += *x;
        }
        total
    }
}

/// [`attention`] as a candle op on f32 `q: [B, H, Lq, D]`, `k: [B, H, Lk, D]`,
/// `v: [B, H, Lk, Dv]` whose last dimension is contiguous (any other strides, such as heads
/// split from `[B, L, H·D]`), returning `[B, Lq, H, Dv]` (no backward pass: callers use it
/// outside autograd only).
pub(crate) struct FusedCpuAttention {
    pub scale: f64,
}

impl CustomOp3 for FusedCpuAttention {
    fn name(&self) -> &'static str {
        "ltd-fused-attention"
    }

    fn cpu_fwd(
        &self,
        sq: &CpuStorage,
        lq: &Layout,
        sk: &CpuStorage,
        lk: &Layout,
        sv: &CpuStorage,
        lv: &Layout,
    ) -> Result<(CpuStorage, Shape)> {
        /// The operand's data from its first element, and where its rows are.
        fn data<'a>(s: &'a CpuStorage, l: &Layout) -> Result<(&'a [f32], Rows)> {
            let (CpuStorage::F32(v), [sb, sh, sr, 1]) = (s, l.stride()) else {
                candle_core::bail!("fused attention: expected f32 inputs with contiguous rows")
            };
            Ok((&v[l.start_offset()..], Rows { batch: *sb, head: *sh, row: *sr }))
        }
        let (b, h, n_q, d) = lq.shape().dims4()?;
        let (n_k, dv) = (lk.shape().dims4()?.2, lv.shape().dims4()?.3);
        let dims = Dims { b, h, lq: n_q, lk: n_k, d, dv };
        let ((q, rq), (k, rk), (v, rv)) = (data(sq, lq)?, data(sk, lk)?, data(sv, lv)?);
        let out = attention((q, k, v), [rq, rk, rv], dims, self.scale as f32)
            .ok_or_else(|| candle_core::Error::Msg("fused attention: CPU lacks AVX2/FMA".into()))?;
        Ok((CpuStorage::F32(out), Shape::from((b, n_q, h, dv))))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn lcg(n: usize, seed: u64, amp: f32) -> Vec<f32> {
        ltd_test_support::uniform(n, seed).into_iter().map(|u| u * 2.0 * amp).collect()
    }

    /// Softmax attention in f64 from the definition.
    /// Contiguous `[bh, l, d]` operands, `[bh, lq, dv]` out.
    fn reference(q: &[f32], k: &[f32], v: &[f32], dims: Dims, scale: f32) -> Vec<f32> {
        let Dims { b, h, lq, lk, d, dv } = dims;
        let bh = b * h;
        let mut out = vec![0f32; bh * lq * dv];
        for h in 0..bh {
            for i in 0..lq {
                let qi = &q[(h * lq + i) * d..(h * lq + i + 1) * d];
                let s: Vec<f64> = (0..lk)
                    .map(|j| {
                        let kj = &k[(h * lk + j) * d..(h * lk + j + 1) * d];
                        qi.iter().zip(kj).map(|(a, b)| *a as f64 * *b as f64).sum::<f64>()
                            * scale as f64
                    })
                    .collect();
                let m = s.iter().cloned().fold(f64::NEG_INFINITY, f64::max);
                let e: Vec<f64> = s.iter().map(|x| (x - m).exp()).collect();
                let z: f64 = e.iter().sum();
                for c in 0..dv {
                    let acc: f64 =
                        (0..lk).map(|j| e[j] * v[(h * lk + j) * dv + c] as f64).sum::<f64>();
                    out[(h * lq + i) * dv + c] = (acc / z) as f32;
                }
            }
        }
        out
    }

    #[test]
    fn matches_the_definition_on_ragged_shapes() {
        if !available() {
            return;
        }
        // Row and column tails everywhere: 70 queries (2 blocks + 6), 300 keys (a full block
        // and 44), head widths that are not multiples of 8 or 16, large logits.
        for &(bh, lq, lk, d, dv, amp) in &[
            (3, 70, 300, 40, 40, 1.0),
            (2, 5, 77, 13, 21, 3.0),
            (1, 33, 600, 64, 72, 2.0),
            // Small heads (4-wide, and 4-wide tails after 8 and 16 columns).
            (4, 100, 290, 4, 4, 2.0),
            (2, 37, 77, 12, 12, 1.0),
            (1, 9, 40, 20, 20, 1.0),
        ] {
            let dims = Dims { b: bh, h: 1, lq, lk, d, dv };
            let (q, k, v) =
                (lcg(bh * lq * d, 1, amp), lcg(bh * lk * d, 2, amp), lcg(bh * lk * dv, 3, 1.0));
            let scale = 1.0 / (d as f32).sqrt();
            let rows = [Rows::packed(1, lq, d), Rows::packed(1, lk, d), Rows::packed(1, lk, dv)];
            let ours = attention((&q, &k, &v), rows, dims, scale).unwrap();
            let expected = reference(&q, &k, &v, dims, scale);
            let err = ours.iter().zip(&expected).map(|(a, b)| (a - b).abs()).fold(0f32, f32::max);
            assert!(err < 2e-6, "{dims:?}: max abs error {err}");
        }
    }

    /// The AVX-512 tiles give the AVX2 tiles' bits (the same sums in the same order), on the
    /// ragged shapes above and on SD's head widths (40, 80, 160; 77 text tokens).
    #[test]
    fn avx512_tiles_equal_avx2_tiles_bit_for_bit() {
        if !crate::kernels::simd::avx512_available() {
            eprintln!("skipped: this CPU has no AVX-512F (or LTD_AVX512=off)");
            return;
        }
        for &(bh, lq, lk, d, dv) in &[
            (3, 70, 300, 40, 40),
            (2, 5, 77, 13, 21),
            (1, 33, 600, 64, 72),
            (4, 100, 290, 4, 4),
            (2, 37, 77, 12, 12),
            (2, 60, 77, 80, 80),
            (1, 50, 520, 160, 160),
            (1, 7, 48, 16, 48),
            // The queries-in-lanes tiles' edges: 1, 2 and 3 plain-product columns after 8 and 4
            // fused ones, fewer keys than a score tile, 16 and 32 queries exactly.
            (2, 19, 13, 9, 11),
            (1, 32, 5, 8, 14),
            (3, 16, 263, 24, 9),
        ] {
            let dims = Dims { b: bh, h: 1, lq, lk, d, dv };
            let (q, k, v) =
                (lcg(bh * lq * d, 4, 2.0), lcg(bh * lk * d, 5, 2.0), lcg(bh * lk * dv, 6, 1.0));
            let rows = [Rows::packed(1, lq, d), Rows::packed(1, lk, d), Rows::packed(1, lk, dv)];
            let scale = 1.0 / (d as f32).sqrt();
            let narrow = attention_on((&q, &k, &v), rows, dims, scale, false).unwrap();
            let wide = attention_on((&q, &k, &v), rows, dims, scale, true).unwrap();
            let bits = |x: &[f32]| x.iter().map(|x| x.to_bits()).collect::<Vec<_>>();
            assert_eq!(bits(&narrow), bits(&wide), "{dims:?}");
        }
    }

    /// Heads read in place from `[B, L, H·D]` (the split-heads view, rows `H·D` apart, and a
    /// slice that starts mid-storage) and written merged, `[B, Lq, H, Dv]`: the same numbers as
    /// packed heads, bit for bit (the same sums in the same order), and the definition's.
    #[test]
    fn reads_split_heads_in_place_and_writes_them_merged() {
        if !available() {
            return;
        }
        for &(b, h, lq, lk, d, dv) in
            &[(2, 3, 70, 77, 8, 8), (1, 5, 20, 300, 4, 4), (2, 2, 9, 9, 40, 24)]
        {
            let lead = 3;
            // `[B, L, H·D]` storages after `lead` unrelated elements.
            let (q, k, v) = (
                lcg(lead + b * lq * h * d, 1, 1.0),
                lcg(lead + b * lk * h * d, 2, 1.0),
                lcg(lead + b * lk * h * dv, 3, 1.0),
            );
            let split = |l: usize, w: usize| Rows { batch: l * h * w, head: w, row: h * w };
            let dims = Dims { b, h, lq, lk, d, dv };
            let scale = 0.3;
            let rows = [split(lq, d), split(lk, d), split(lk, dv)];
            let ours = attention((&q[lead..], &k[lead..], &v[lead..]), rows, dims, scale).unwrap();
            // The same heads packed: `[B, H, L, W]`.
            let pack = |x: &[f32], l: usize, w: usize| -> Vec<f32> {
                let mut out = Vec::with_capacity(b * h * l * w);
                for (bi, hi, j) in (0..b)
                    .flat_map(|bi| (0..h).flat_map(move |hi| (0..l).map(move |j| (bi, hi, j))))
                {
                    out.extend_from_slice(&x[lead + (bi * l + j) * h * w + hi * w..][..w]);
                }
                out
            };
            let (pq, pk, pv) = (pack(&q, lq, d), pack(&k, lk, d), pack(&v, lk, dv));
            let packed = [Rows::packed(h, lq, d), Rows::packed(h, lk, d), Rows::packed(h, lk, dv)];
            let theirs = attention((&pq, &pk, &pv), packed, dims, scale).unwrap();
            assert_eq!(ours, theirs, "{dims:?}");
            // Merged `[B, Lq, H, Dv]` against the definition's `[B·H, Lq, Dv]`.
            let expected = reference(&pq, &pk, &pv, dims, scale);
            for (bi, hi, i) in
                (0..b).flat_map(|bi| (0..h).flat_map(move |hi| (0..lq).map(move |i| (bi, hi, i))))
            {
                let got = &ours[((bi * lq + i) * h + hi) * dv..][..dv];
                let want = &expected[((bi * h + hi) * lq + i) * dv..][..dv];
                for (g, w) in got.iter().zip(want) {
                    assert!((g - w).abs() < 2e-6, "{dims:?}: {g} vs {w}");
                }
            }
        }
    }
}
