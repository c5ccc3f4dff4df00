//! AVX2/FMA building blocks for the fused CPU kernels, and AVX-512F variants of some (x86-64;
//! other targets use the ordinary tensor-op paths).

#[cfg(target_arch = "x86_64")]
use std::arch::x86_64::*;

/// Whether this CPU has AVX2 and FMA (checked once per call site, cheaply cached by std).
pub(crate) fn available() -> bool {
    #[cfg(target_arch = "x86_64")]
    {
        std::is_x86_feature_detected!("avx2") && std::is_x86_feature_detected!("fma")
    }
    #[cfg(not(target_arch = "x86_64"))]
    {
        false
    }
}

/// Whether this CPU has AVX-512F besides AVX2 and FMA, and `LTD_AVX512` is not `off` (read
/// once per process; `off` is for comparing against the AVX2 kernels). Kernels with a 16-lane
/// variant take it where it computes the same sums in the same order as their 8-lane one, so
/// the choice changes speed, not results.
pub(crate) fn avx512_available() -> bool {
    #[cfg(target_arch = "x86_64")]
    {
        static ON: std::sync::OnceLock<bool> = std::sync::OnceLock::new();
        *ON.get_or_init(|| {
            available()
                && std::is_x86_feature_detected!("avx512f")
                && std::env::var("LTD_AVX512").as_deref() != Ok("off")
        })
    }
    #[cfg(not(target_arch = "x86_64"))]
    {
        false
    }
}

/// `exp(x)` for 8 lanes (Cephes' `expf`: range reduction by ln 2 in two parts, a degree-5
/// polynomial, scaling by 2ⁿ through the exponent bits; within 2 ulp). Inputs below −87.3
/// give ≈1.2·10⁻³⁸ instead of subnormals (which are slow, and negligible next to the row sum's
/// term of 1); `−∞` gives that too.
#[cfg(target_arch = "x86_64")]
#[inline]
#[target_feature(enable = "avx2,fma")]
pub(crate) fn exp256(x: __m256) -> __m256 {
    let x = _mm256_min_ps(_mm256_max_ps(x, _mm256_set1_ps(-87.3)), _mm256_set1_ps(88.3));
    let fx = _mm256_fmadd_ps(x, _mm256_set1_ps(std::f32::consts::LOG2_E), _mm256_set1_ps(0.5));
    let fx = _mm256_floor_ps(fx);
    let x = _mm256_fnmadd_ps(fx, _mm256_set1_ps(0.693_359_4), x);
    let x = _mm256_fnmadd_ps(fx, _mm256_set1_ps(-2.121_944_4e-4), x);
    let mut y = _mm256_set1_ps(1.987_569_1e-4);
    y = _mm256_fmadd_ps(y, x, _mm256_set1_ps(1.398_199_9e-3));
    y = _mm256_fmadd_ps(y, x, _mm256_set1_ps(8.333_452e-3));
    y = _mm256_fmadd_ps(y, x, _mm256_set1_ps(4.166_579_6e-2));
    y = _mm256_fmadd_ps(y, x, _mm256_set1_ps(0.166_666_65));
    y = _mm256_fmadd_ps(y, x, _mm256_set1_ps(0.5));
    let x2 = _mm256_mul_ps(x, x);
    y = _mm256_fmadd_ps(y, x2, _mm256_add_ps(x, _mm256_set1_ps(1.0)));
    let n = _mm256_cvttps_epi32(fx);
    let pow2n =
        _mm256_castsi256_ps(_mm256_slli_epi32(_mm256_add_epi32(n, _mm256_set1_epi32(127)), 23));
    _mm256_mul_ps(y, pow2n)
}

/// [`exp256`] for 16 lanes: the same operations lane by lane, so the same results.
#[cfg(target_arch = "x86_64")]
#[inline]
#[target_feature(enable = "avx512f,avx2,fma")]
pub(crate) fn exp512(x: __m512) -> __m512 {
    let x = _mm512_min_ps(_mm512_max_ps(x, _mm512_set1_ps(-87.3)), _mm512_set1_ps(88.3));
    let fx = _mm512_fmadd_ps(x, _mm512_set1_ps(std::f32::consts::LOG2_E), _mm512_set1_ps(0.5));
    let fx = _mm512_roundscale_ps::<{ _MM_FROUND_TO_NEG_INF | _MM_FROUND_NO_EXC }>(fx);
    let x = _mm512_fnmadd_ps(fx, _mm512_set1_ps(0.693_359_4), x);
    let x = _mm512_fnmadd_ps(fx, _mm512_set1_ps(-2.121_944_4e-4), x);
    let mut y = _mm512_set1_ps(1.987_569_1e-4);
    y = _mm512_fmadd_ps(y, x, _mm512_set1_ps(1.398_199_9e-3));
    y = _mm512_fmadd_ps(y, x, _mm512_set1_ps(8.333_452e-3));
    y = _mm512_fmadd_ps(y, x, _mm512_set1_ps(4.166_579_6e-2));
    y = _mm512_fmadd_ps(y, x, _mm512_set1_ps(0.166_666_65));
    y = _mm512_fmadd_ps(y, x, _mm512_set1_ps(0.5));
    let x2 = _mm512_mul_ps(x, x);
    y = _mm512_fmadd_ps(y, x2, _mm512_add_ps(x, _mm512_set1_ps(1.0)));
    let n = _mm512_cvttps_epi32(fx);
    let pow2n =
        _mm512_castsi512_ps(_mm512_slli_epi32::<23>(_mm512_add_epi32(n, _mm512_set1_epi32(127))));
    _mm512_mul_ps(y, pow2n)
}

/// The exact GELU `x·Φ(x) = x/2·(1 + erf(x/√2))` for 8 lanes, with erf from Abramowitz &
/// Stegun 7.1.26 (absolute error ≤ 1.5·10⁻⁷) — the formula PyTorch's vectorised CPU `erf` uses.
#[cfg(target_arch = "x86_64")]
#[inline]
#[target_feature(enable = "avx2,fma")]
pub(crate) fn gelu_erf256(g: __m256) -> __m256 {
    let (one_plus_erf, _) = gelu_terms256(g);
    _mm256_mul_ps(_mm256_mul_ps(g, _mm256_set1_ps(0.5)), one_plus_erf)
}

/// `(1 + erf(x/√2), e^(−x²/2))` for 8 lanes, as [`gelu_erf256`] computes them: `Φ(x)` is half
/// the first, and the normal density `φ(x)` is the second over `√(2π)` (GELU's derivative is
/// `Φ(x) + x·φ(x)`).
#[cfg(target_arch = "x86_64")]
#[inline]
#[target_feature(enable = "avx2,fma")]
pub(crate) fn gelu_terms256(g: __m256) -> (__m256, __m256) {
    let x = _mm256_mul_ps(g, _mm256_set1_ps(std::f32::consts::FRAC_1_SQRT_2));
    let sign = _mm256_and_ps(x, _mm256_set1_ps(-0.0));
    let ax = _mm256_andnot_ps(_mm256_set1_ps(-0.0), x);
    let one = _mm256_set1_ps(1.0);
    let t = _mm256_div_ps(one, _mm256_fmadd_ps(_mm256_set1_ps(0.327_591_1), ax, one));
    let mut r = _mm256_set1_ps(1.061_405_4);
    r = _mm256_fmadd_ps(r, t, _mm256_set1_ps(-1.453_152));
    r = _mm256_fmadd_ps(r, t, _mm256_set1_ps(1.421_413_7));
    r = _mm256_fmadd_ps(r, t, _mm256_set1_ps(-0.284_496_72));
    r = _mm256_fmadd_ps(r, t, _mm256_set1_ps(0.254_829_6));
    r = _mm256_mul_ps(r, t);
    let e = exp256(_mm256_sub_ps(_mm256_setzero_ps(), _mm256_mul_ps(x, x)));
    let erf_abs = _mm256_fnmadd_ps(r, e, one);
    let erf = _mm256_or_ps(erf_abs, sign);
    (_mm256_add_ps(one, erf), e)
}

/// SiLU, `v / (1 + e^(−v))`, of every element in place: 8 lanes at a time with [`exp256`]
/// where AVX2/FMA are present; libm's `exp` elsewhere and for the last `len % 8`.
pub(crate) fn silu_in_place(v: &mut [f32]) {
    map_in_place(v, Map::Silu)
}

/// `e^v` of every element in place, as [`silu_in_place`] computes it.
pub(crate) fn exp_in_place(v: &mut [f32]) {
    map_in_place(v, Map::Exp)
}

/// The element functions of [`map_in_place`].
#[derive(Clone, Copy)]
enum Map {
    Exp,
    Silu,
}

fn map_in_place(v: &mut [f32], f: Map) {
    let mut done = 0;
    #[cfg(target_arch = "x86_64")]
    if avx512_available() {
        // SAFETY: AVX-512F, AVX2 and FMA checked above. The 16-lane pass computes each
        // element as the 8-lane one does (`exp512` is `exp256` lane by lane; the division and
        // addition are IEEE's), and the 8-lane pass still takes what is left in whole 8s, so
        // the elements left to the scalar loop are the same too.
        done = unsafe { map512_in_place(v, f) };
        done += unsafe { map256_in_place(&mut v[done..], f) };
    } else if available() {
        // SAFETY: AVX2/FMA checked above.
        done = unsafe { map256_in_place(v, f) };
    }
    for x in &mut v[done..] {
        *x = match f {
            Map::Exp => x.exp(),
            Map::Silu => *x / (1.0 + (-*x).exp()),
        };
    }
}

/// The 8-lane part of [`map_in_place`]; returns how many elements it did.
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2,fma")]
fn map256_in_place(v: &mut [f32], f: Map) -> usize {
    let done = v.len() / 8 * 8;
    let one = _mm256_set1_ps(1.0);
    for c in v[..done].chunks_exact_mut(8) {
        // SAFETY: `c` is 8 elements.
        unsafe {
            let x = _mm256_loadu_ps(c.as_ptr());
            let y = match f {
                Map::Exp => exp256(x),
                Map::Silu => {
                    let e = exp256(_mm256_sub_ps(_mm256_setzero_ps(), x));
                    _mm256_div_ps(x, _mm256_add_ps(one, e))
                }
            };
            _mm256_storeu_ps(c.as_mut_ptr(), y);
        }
    }
    done
}

/// [`map256_in_place`] 16 lanes at a time: the same operations lane by lane; returns how many
/// elements it did (whole 16s).
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx512f,avx2,fma")]
fn map512_in_place(v: &mut [f32], f: Map) -> usize {
    let done = v.len() / 16 * 16;
    let one = _mm512_set1_ps(1.0);
    for c in v[..done].chunks_exact_mut(16) {
        // SAFETY: `c` is 16 elements.
        unsafe {
            let x = _mm512_loadu_ps(c.as_ptr());
            let y = match f {
                Map::Exp => exp512(x),
                Map::Silu => {
                    let e = exp512(_mm512_sub_ps(_mm512_setzero_ps(), x));
                    _mm512_div_ps(x, _mm512_add_ps(one, e))
                }
            };
            _mm512_storeu_ps(c.as_mut_ptr(), y);
        }
    }
    done
}

/// The sum of 8 lanes (in lane order, pairwise).
#[cfg(target_arch = "x86_64")]
#[inline]
#[target_feature(enable = "avx2,fma")]
pub(crate) fn hsum256(v: __m256) -> f32 {
    let mut lanes = [0f32; 8];
    // SAFETY: `lanes` is 8 elements.
    unsafe { _mm256_storeu_ps(lanes.as_mut_ptr(), v) };
    ((lanes[0] + lanes[1]) + (lanes[2] + lanes[3]))
        + ((lanes[4] + lanes[5]) + (lanes[6] + lanes[7]))
}

#[cfg(all(test, target_arch = "x86_64"))]
mod tests {
    use super::*;

    #[test]
    fn exp256_is_accurate() {
        if !available() {
            return;
        }
        let xs: Vec<f32> = (-8700..=8800).map(|i| i as f32 * 0.01).collect();
        for c in xs.chunks_exact(8) {
            let mut out = [0f32; 8];
            // SAFETY: AVX2/FMA checked above.
            unsafe { _mm256_storeu_ps(out.as_mut_ptr(), exp256(_mm256_loadu_ps(c.as_ptr()))) };
            for (x, y) in c.iter().zip(out) {
                let e = (*x as f64).exp();
                assert!(((y as f64 - e) / e).abs() < 3e-7, "exp({x}) = {y}, expected {e}");
            }
        }
    }

    /// `map_in_place` with AVX-512 (16 lanes, then 8, then one by one) gives the 8-lane path's
    /// bits for SiLU and exp on every length up to 70 (each split of the tail), including
    /// large, tiny and infinite inputs.
    #[test]
    fn map_in_place_is_the_same_with_16_lanes() {
        if !avx512_available() {
            // No AVX-512F here (or LTD_AVX512=off): nothing to compare.
            return;
        }
        let base: Vec<f32> = (0..70).map(|i| (i as f32 * 0.731).sin() * 12.0).collect();
        for f in [Map::Exp, Map::Silu] {
            for len in 0..=70 {
                let mut v = base[..len].to_vec();
                if len > 3 {
                    v[1] = 100.0;
                    v[2] = -100.0;
                    v[3] = f32::NEG_INFINITY;
                }
                let mut narrow = v.clone();
                // SAFETY: AVX-512F (hence AVX2 and FMA here) checked above.
                let done = unsafe { map256_in_place(&mut narrow, f) };
                for x in &mut narrow[done..] {
                    *x = match f {
                        Map::Exp => x.exp(),
                        Map::Silu => *x / (1.0 + (-*x).exp()),
                    };
                }
                map_in_place(&mut v, f);
                let bits = |v: &[f32]| v.iter().map(|x| x.to_bits()).collect::<Vec<_>>();
                assert_eq!(bits(&v), bits(&narrow), "len {len}");
            }
        }
    }

    #[test]
    fn exp512_equals_exp256_lane_by_lane() {
        if !avx512_available() {
            // No AVX-512F here (or LTD_AVX512=off): nothing to compare.
            return;
        }
        let xs: Vec<f32> = (-9000..9000).map(|i| i as f32 * 0.0101).collect();
        for c in xs.chunks_exact(16) {
            let (mut narrow, mut wide) = ([0f32; 16], [0f32; 16]);
            // SAFETY: AVX-512F, AVX2 and FMA checked above; the arrays hold 16 elements.
            unsafe {
                _mm256_storeu_ps(narrow.as_mut_ptr(), exp256(_mm256_loadu_ps(c.as_ptr())));
                _mm256_storeu_ps(
                    narrow.as_mut_ptr().add(8),
                    exp256(_mm256_loadu_ps(c[8..].as_ptr())),
                );
                _mm512_storeu_ps(wide.as_mut_ptr(), exp512(_mm512_loadu_ps(c.as_ptr())));
            }
            assert_eq!(narrow.map(f32::to_bits), wide.map(f32::to_bits), "{c:?}");
        }
    }

    #[test]
    fn silu_in_place_is_accurate() {
        // 8-lane groups and a tail of 3.
        let xs: Vec<f32> = (-9000..=9002).map(|i| i as f32 * 0.01).collect();
        let mut ys = xs.clone();
        silu_in_place(&mut ys);
        for (x, y) in xs.iter().zip(ys) {
            let e = *x as f64 / (1.0 + (-*x as f64).exp());
            assert!(
                (y as f64 - e).abs() <= 4e-7 * e.abs().max(1e-30),
                "silu({x}) = {y}, expected {e}"
            );
        }
    }

    #[test]
    fn gelu_erf256_matches_libm_erf() {
        if !available() {
            return;
        }
        let xs: Vec<f32> = (-1200..=1200).map(|i| i as f32 * 0.01).collect();
        for c in xs.chunks_exact(8) {
            let mut out = [0f32; 8];
            // SAFETY: AVX2/FMA checked above.
            unsafe { _mm256_storeu_ps(out.as_mut_ptr(), gelu_erf256(_mm256_loadu_ps(c.as_ptr()))) };
            for (x, y) in c.iter().zip(out) {
                let x64 = *x as f64;
                let e = 0.5 * x64 * (1.0 + erf64(x64 / std::f64::consts::SQRT_2));
                assert!(
                    (y as f64 - e).abs() < 2e-6 * (1.0 + x64.abs()),
                    "gelu({x}) = {y}, expected {e}"
                );
            }
        }
    }

    /// erf in double precision (W. J. Cody's rational approximations via the complementary
    /// function would be overkill here: a series/continued fraction suffices for a test).
    fn erf64(x: f64) -> f64 {
        if x.abs() < 3.0 {
            // Maclaurin series, converges quickly for |x| < 3 in double precision.
            let mut sum = x;
            let mut term = x;
            let mut n = 0.0;
            loop {
                n += 1.0;
                term *= -x * x / n;
                let add = term / (2.0 * n + 1.0);
                sum += add;
                if add.abs() < 1e-17 {
                    break;
                }
            }
            sum * 2.0 / std::f64::consts::PI.sqrt()
        } else {
            // erfc by continued fraction (Lentz), accurate for |x| ≥ 3.
            let ax = x.abs();
            let mut f = ax;
            for k in (1..60).rev() {
                f = ax + (k as f64 / 2.0) / f;
            }
            let erfc = (-ax * ax).exp() / (f * std::f64::consts::PI.sqrt());
            (1.0 - erfc).copysign(x)
        }
    }
}
