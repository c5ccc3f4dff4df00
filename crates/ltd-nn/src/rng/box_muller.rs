//! PyTorch's float32 Box-Muller on blocks of 16 uniforms, replayed in portable scalar code.
//!
//! On x86 CPUs with AVX2 (and those with AVX-512, which PyTorch deliberately sends to the same
//! kernel: `REGISTER_NO_AVX512_DISPATCH(normal_stub)` in `DistributionKernels.cpp`), `torch.randn`
//! of a contiguous float tensor with at least 16 elements runs `NormalFill16<float>`
//! (`aten/src/ATen/native/cpu/DistributionTemplates.h`): `log256_ps` and `sincos256_ps` from
//! `avx_mathfun.h`, the Cephes single-precision polynomials vectorised by Pommier/Garberoglio.
//! GCC contracts many of their multiply-adds into FMA instructions, so the source alone does not
//! fix the rounding. The sequence below is the one in the released binary (`libtorch_cpu.so` of
//! torch 2.15.0, disassembled): every `mul_add` here is a `vfmadd`/`vfnmadd`/`vfmsub` there, every
//! other operation a separately rounded `vmulps`/`vaddps`/`vsubps`. `f32::mul_add` is always
//! fused and Rust never contracts on its own, so this reproduces torch bit for bit on any CPU.

/// `_ps256_cephes_*` and friends, as the float bit patterns in the binary.
mod c {
    pub const SQRTHF: f32 = f32::from_bits(0x3f35_04f3);
    pub const LOG_P: [f32; 9] = [
        f32::from_bits(0x3d90_21bb),
        f32::from_bits(0xbdeb_d1b8),
        f32::from_bits(0x3def_251a),
        f32::from_bits(0xbdfe_5d4f),
        f32::from_bits(0x3e11_e9bf),
        f32::from_bits(0xbe2a_ae50),
        f32::from_bits(0x3e4c_ceac),
        f32::from_bits(0xbe7f_fffc),
        f32::from_bits(0x3eaa_aaaa),
    ];
    pub const LOG_Q1: f32 = f32::from_bits(0xb95e_8083);
    pub const LOG_Q2: f32 = f32::from_bits(0x3f31_8000);
    pub const FOPI: f32 = f32::from_bits(0x3fa2_f983);
    pub const DP1: f32 = f32::from_bits(0xbf49_0000);
    pub const DP2: f32 = f32::from_bits(0xb97d_a000);
    pub const DP3: f32 = f32::from_bits(0xb322_2169);
    pub const COS_P: [f32; 3] =
        [f32::from_bits(0x37cc_f5ce), f32::from_bits(0xbab6_061a), f32::from_bits(0x3d2a_aaa5)];
    pub const SIN_P: [f32; 3] =
        [f32::from_bits(0xb94c_a1f9), f32::from_bits(0x3c08_839e), f32::from_bits(0xbe2a_aaa3)];
    /// `2.0f * c10::pi<double>` rounded to float.
    pub const TWO_PI: f32 = f32::from_bits(0x40c9_0fdb);
}

/// `log256_ps` for one lane.
fn log_cephes(x: f32) -> f32 {
    let invalid = x <= 0.0;
    let x = x.max(f32::MIN_POSITIVE);
    let bits = x.to_bits();
    let mut e = ((bits >> 23) as i32 - 0x7f) as f32 + 1.0;
    // Mantissa in [0.5, 1).
    let m = f32::from_bits((bits & !0x7f80_0000) | 0x3f00_0000);
    let small = m < c::SQRTHF;
    if small {
        e -= 1.0;
    }
    let x = (m - 1.0) + if small { m } else { 0.0 };
    let z = x * x;
    let mut y = c::LOG_P[0];
    for &p in &c::LOG_P[1..] {
        y = y.mul_add(x, p);
    }
    let y = (x * y).mul_add(z, e * c::LOG_Q1);
    let y = (-z).mul_add(0.5, y);
    let r = e.mul_add(c::LOG_Q2, x + y);
    if invalid {
        f32::NAN
    } else {
        r
    }
}

/// `sincos256_ps` for one lane: `(sin x, cos x)`.
fn sincos_cephes(x: f32) -> (f32, f32) {
    let sign_sin = x.to_bits() & 0x8000_0000;
    let ax = x.abs();
    // j = (int(|x| * 4/pi) + 1) & ~1; the truncating conversion is `vcvttps2dq`.
    let j = (((ax * c::FOPI) as i32).wrapping_add(1)) & !1;
    let jf = j as f32;
    let swap_sin = ((j & 4) as u32) << 29;
    let poly_sin = j & 2 == 0;
    let sign_cos = ((!(j.wrapping_sub(2)) & 4) as u32) << 29;
    // Extended-precision range reduction, each step one FMA.
    let x = jf.mul_add(c::DP1, ax);
    let x = c::DP2.mul_add(jf, x);
    let x = jf.mul_add(c::DP3, x);
    let z = x * x;
    let half_z = z * 0.5;
    let yc = c::COS_P[0].mul_add(z, c::COS_P[1]).mul_add(z, c::COS_P[2]);
    let yc = z.mul_add(z * yc, -half_z) + 1.0;
    let ys = c::SIN_P[0].mul_add(z, c::SIN_P[1]).mul_add(z, c::SIN_P[2]);
    let ys = x.mul_add(z * ys, x);
    // The vector code selects with masks and recombines with adds of +0.0, which we keep
    // so that zero signs come out the same.
    let (sin_part, cos_part) = if poly_sin { (ys + 0.0, 0.0 + yc) } else { (0.0 + yc, ys + 0.0) };
    let sin = f32::from_bits(sin_part.to_bits() ^ (sign_sin ^ swap_sin));
    let cos = f32::from_bits(cos_part.to_bits() ^ sign_cos);
    (sin, cos)
}

/// `NormalFill16<float>::operator()` (AVX2): turns 16 uniforms in `[0, 1)` into 16 normals,
/// `data[j]` from the pair `(data[j], data[j + 8])` by cosine and `data[j + 8]` by sine.
pub(crate) fn normal_fill_16(data: &mut [f32], mean: f32, std: f32) {
    debug_assert_eq!(data.len(), 16);
    for j in 0..8 {
        let u1 = 1.0 - data[j];
        let radius = (log_cephes(u1) * -2.0).sqrt();
        let theta = c::TWO_PI * data[j + 8];
        let (sin, cos) = sincos_cephes(theta);
        data[j] = (radius * cos).mul_add(std, mean);
        data[j + 8] = (radius * sin).mul_add(std, mean);
    }
}

/// `NormalFill16<double>` (scalar on every CPU): the float64 path of `torch.randn`.
pub(crate) fn normal_fill_16_f64(data: &mut [f64], mean: f64, std: f64) {
    debug_assert_eq!(data.len(), 16);
    for j in 0..8 {
        let u1 = 1.0 - data[j];
        let u2 = data[j + 8];
        let radius = (-2.0 * u1.ln()).sqrt();
        // `2.0f * c10::pi<double> * u2`: float 2 times double pi is double 2*pi.
        let theta = 2.0 * std::f64::consts::PI * u2;
        let (sin, cos) = theta.sin_cos();
        data[j] = (radius * cos).mul_add(std, mean);
        data[j + 8] = (radius * sin).mul_add(std, mean);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn cephes_approximations_are_close_to_libm() {
        // Sanity bound only (the exact bits are checked against torch in tests/rng.rs).
        for i in 1..1000 {
            let x = i as f32 / 1000.0;
            assert!((log_cephes(x) - x.ln()).abs() <= 2e-7 * x.ln().abs().max(1.0), "log {x}");
            let t = x * c::TWO_PI;
            let (s, co) = sincos_cephes(t);
            assert!((s - t.sin()).abs() < 1e-6 && (co - t.cos()).abs() < 1e-6, "sincos {t}");
        }
    }
}
