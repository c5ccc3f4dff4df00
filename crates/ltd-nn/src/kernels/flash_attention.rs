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
//! Everything is computed in f32 (callers convert half-precision inputs).

#[cfg(target_arch = "x86_64")]
use std::arch::x86_64::*;

use candle_core::{CpuStorage, CustomOp3, Layout, Result, Shape};

pub(crate) use super::simd::available;
#[cfg(target_arch = "x86_64")]
use super::simd::exp256;

/// Queries per block (a multiple of the 6-row register tile).
const BLOCK_Q: usize = 48;
/// Keys per block (a multiple of the 16-column register tile).
const BLOCK_K: usize = 256;

/// Shapes of one call: `bh` independent heads of `q: [lq, d]`, `k: [lk, d]`, `v: [lk, dv]`.
#[derive(Debug, Clone, Copy)]
pub(crate) struct Dims {
    pub bh: usize,
    pub lq: usize,
    pub lk: usize,
    pub d: usize,
    pub dv: usize,
}

/// `softmax(q·kᵀ·scale)·v` for contiguous f32 `q: [bh, lq, d]`, `k: [bh, lk, d]`,
/// `v: [bh, lk, dv]`, returning `[bh, lq, dv]`; `None` when the CPU lacks AVX2/FMA.
pub(crate) fn attention(
    q: &[f32],
    k: &[f32],
    v: &[f32],
    dims: Dims,
    scale: f32,
) -> Option<Vec<f32>> {
    if !available() {
        return None;
    }
    let Dims { bh, lq, lk, d, dv } = dims;
    debug_assert_eq!(q.len(), bh * lq * d);
    debug_assert_eq!(k.len(), bh * lk * d);
    debug_assert_eq!(v.len(), bh * lk * dv);
    let mut out = vec![0f32; bh * lq * dv];
    if lq == 0 || dv == 0 {
        return Some(out);
    }
    if lk == 0 {
        // torch returns NaN rows (0/0) for an empty softmax; so do we.
        out.fill(f32::NAN);
        return Some(out);
    }
    // Keys transposed per head into panels of 16 keys, `[bh, lk/16, d, 16]` (zero-padded):
    // a score tile then reads one contiguous 64-byte row per step instead of striding across
    // pages of a plain transpose.
    let panels = lk.div_ceil(16);
    let head_len = panels * d * 16;
    let mut kt = vec![0f32; bh * head_len];
    for h in 0..bh {
        let (src, dst) =
            (&k[h * lk * d..(h + 1) * lk * d], &mut kt[h * head_len..(h + 1) * head_len]);
        for (j, row) in src.chunks_exact(d).enumerate() {
            let panel = &mut dst[(j / 16) * d * 16..(j / 16 + 1) * d * 16];
            for (dd, &x) in row.iter().enumerate() {
                panel[dd * 16 + j % 16] = x;
            }
        }
    }

    // Heads narrower than a register (SD's 8 heads of 4 on 32 channels): V transposed per
    // head, `[bh, dv, panels·16]` (zero-padded), so that P·V multiplies eight keys at a time
    // (`pv_dot`) rather than one. Wider heads read V as it is.
    let vt_stride = panels * 16;
    let mut vt = Vec::new();
    if dv < 8 {
        vt = vec![0f32; bh * dv * vt_stride];
        for h in 0..bh {
            let src = &v[h * lk * dv..(h + 1) * lk * dv];
            let dst = &mut vt[h * dv * vt_stride..(h + 1) * dv * vt_stride];
            for (j, row) in src.chunks_exact(dv).enumerate() {
                for (c, &x) in row.iter().enumerate() {
                    dst[c * vt_stride + j] = x;
                }
            }
        }
    }

    // Work units: (head, query block), each writing its own rows of the output.
    let mut units: Vec<(usize, usize, &mut [f32])> = Vec::with_capacity(bh * lq.div_ceil(BLOCK_Q));
    for (h, head_out) in out.chunks_mut(lq * dv).enumerate() {
        for (b, block_out) in head_out.chunks_mut(BLOCK_Q * dv).enumerate() {
            units.push((h, b * BLOCK_Q, block_out));
        }
    }
    let threads = super::threads().min(units.len());
    let per_thread = units.len().div_ceil(threads.max(1)).max(1);
    let (kt, vt) = (&kt, &vt);
    let run = |units: &mut [(usize, usize, &mut [f32])]| {
        let mut scratch = Scratch::new(d, dv);
        for (h, q0, o) in units.iter_mut() {
            let rows = o.len() / dv;
            let q = &q[(*h * lq + *q0) * d..(*h * lq + *q0 + rows) * d];
            let kt = &kt[*h * head_len..(*h + 1) * head_len];
            let v = &v[*h * lk * dv..(*h + 1) * lk * dv];
            let vt = if vt.is_empty() {
                &vt[..]
            } else {
                &vt[*h * dv * vt_stride..(*h + 1) * dv * vt_stride]
            };
            // SAFETY: `available()` checked AVX2 and FMA above; slices match `dims`.
            #[cfg(target_arch = "x86_64")]
            unsafe {
                block(q, kt, v, vt, o, rows, dims, scale, &mut scratch)
            };
        }
    };
    super::for_each_parallel(units.chunks_mut(per_thread).collect(), run);
    Some(out)
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

/// One block of `rows ≤ BLOCK_Q` queries of one head against all its keys (`vt`: V
/// transposed when `dv < 8`, else empty).
#[cfg(target_arch = "x86_64")]
#[allow(clippy::too_many_arguments)]
#[target_feature(enable = "avx2,fma")]
unsafe fn block(
    q: &[f32],
    kt: &[f32],
    v: &[f32],
    vt: &[f32],
    out: &mut [f32],
    rows: usize,
    dims: Dims,
    scale: f32,
    sc: &mut Scratch,
) {
    unsafe {
        let Dims { lk, d, dv, .. } = dims;
        for (dst, &x) in sc.q.iter_mut().zip(q) {
            *dst = x * scale;
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
                let sum = exp_sub_in_place(row, m_new);
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
            let vb = v.as_ptr().add(k0 * dv);
            let mut r = 0;
            while r < rows {
                let tile_rows = (rows - r).min(6);
                let pp = sc.s.as_ptr().add(r * BLOCK_K);
                let op = sc.o.as_mut_ptr().add(r * dv);
                match tile_rows {
                    6 => pv_rows::<6>(pp, width, vb, dv, op),
                    5 => pv_rows::<5>(pp, width, vb, dv, op),
                    4 => pv_rows::<4>(pp, width, vb, dv, op),
                    3 => pv_rows::<3>(pp, width, vb, dv, op),
                    2 => pv_rows::<2>(pp, width, vb, dv, op),
                    _ => pv_rows::<1>(pp, width, vb, dv, op),
                }
                r += tile_rows;
            }
            k0 += width;
        }
        for r in 0..rows {
            let inv = 1.0 / sc.l[r];
            for (o, &x) in out[r * dv..(r + 1) * dv].iter_mut().zip(&sc.o[r * dv..(r + 1) * dv]) {
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

/// `o[r][..] += Σ_j p[r][j] · v[j][..]` for `R` rows over `width` keys, all `dv` columns.
#[cfg(target_arch = "x86_64")]
#[inline]
#[target_feature(enable = "avx2,fma")]
unsafe fn pv_rows<const R: usize>(
    p: *const f32,
    width: usize,
    v: *const f32,
    dv: usize,
    o: *mut f32,
) {
    unsafe {
        let mut c = 0;
        while c + 16 <= dv {
            let mut acc = [[_mm256_setzero_ps(); 2]; R];
            for j in 0..width {
                let v0 = _mm256_loadu_ps(v.add(j * dv + c));
                let v1 = _mm256_loadu_ps(v.add(j * dv + c + 8));
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
                let v0 = _mm256_loadu_ps(v.add(j * dv + c));
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
                let v0 = _mm_loadu_ps(v.add(j * dv + c));
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
                    acc += *p.add(r * BLOCK_K + j) * *v.add(j * dv + cc);
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
    unsafe {
        let mv = _mm256_set1_ps(m);
        let mut sum = _mm256_setzero_ps();
        let mut chunks = row.chunks_exact_mut(8);
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

/// [`attention`] as a candle op on contiguous f32 `q: [B, H, Lq, D]`, `k: [B, H, Lk, D]`,
/// `v: [B, H, Lk, Dv]` (no backward pass: callers use it outside autograd only).
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
        fn data<'a>(s: &'a CpuStorage, l: &Layout) -> Result<&'a [f32]> {
            match (s, l.contiguous_offsets()) {
                (CpuStorage::F32(v), Some((a, b))) => Ok(&v[a..b]),
                _ => candle_core::bail!("fused attention: expected contiguous f32 inputs"),
            }
        }
        let (b, h, n_q, d) = lq.shape().dims4()?;
        let (n_k, dv) = (lk.shape().dims4()?.2, lv.shape().dims4()?.3);
        let dims = Dims { bh: b * h, lq: n_q, lk: n_k, d, dv };
        let out = attention(data(sq, lq)?, data(sk, lk)?, data(sv, lv)?, dims, self.scale as f32)
            .ok_or_else(|| {
            candle_core::Error::Msg("fused attention: CPU lacks AVX2/FMA".into())
        })?;
        Ok((CpuStorage::F32(out), Shape::from((b, h, n_q, dv))))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn lcg(n: usize, seed: u64, amp: f32) -> Vec<f32> {
        ltd_test_support::uniform(n, seed).into_iter().map(|u| u * 2.0 * amp).collect()
    }

    /// Softmax attention in f64 from the definition.
    fn reference(q: &[f32], k: &[f32], v: &[f32], dims: Dims, scale: f32) -> Vec<f32> {
        let Dims { bh, lq, lk, d, dv } = dims;
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
            let dims = Dims { bh, lq, lk, d, dv };
            let (q, k, v) =
                (lcg(bh * lq * d, 1, amp), lcg(bh * lk * d, 2, amp), lcg(bh * lk * dv, 3, 1.0));
            let scale = 1.0 / (d as f32).sqrt();
            let ours = attention(&q, &k, &v, dims, scale).unwrap();
            let expected = reference(&q, &k, &v, dims, scale);
            let err = ours.iter().zip(&expected).map(|(a, b)| (a - b).abs()).fold(0f32, f32::max);
            assert!(err < 2e-6, "{dims:?}: max abs error {err}");
        }
    }
}
