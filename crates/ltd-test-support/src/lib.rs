//! Helpers shared by the tests of ltd's crates: where the repository's fixtures are, deterministic
//! test tensors, error metrics, copying fixture folders, the full-size state-dict shape lists, and
//! reading PNGs (pixels and the A1111 `parameters` chunk) with their PSNR, and the process's
//! resident-memory counters.
//!
//! A dev-dependency only (like rust-analyzer's `test-utils`): no library lists it under
//! `[dependencies]` (tidy checks this), so it may `unwrap` and panic freely, as tests do. It
//! stands on candle-core and png alone so that any crate, ltd-nn included, can use it in its tests.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

use candle_core::{DType, Device, Shape, Tensor};

// ---------------------------------------------------------------------------------------------
// Paths

/// The repository's root (the workspace folder), as `crates/<this crate>/../..`.
pub fn workspace_root() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../..")
}

/// The repository's `tests/fixtures` (tiny models, goldens and the scripts that made them).
pub fn fixtures() -> PathBuf {
    workspace_root().join("tests/fixtures")
}

// ---------------------------------------------------------------------------------------------
// Deterministic inputs (no RNG crate: the values must never change with a dependency update)

/// `n` values `u · scale + shift`, `u` uniform in [0, 1) from a 64-bit LCG (Knuth's MMIX
/// constants) seeded with `seed`. Every helper below is this with fixed `scale` and `shift`.
pub fn lcg(n: usize, seed: u64, scale: f32, shift: f32) -> Vec<f32> {
    let mut s = seed;
    (0..n)
        .map(|_| {
            s = s.wrapping_mul(6364136223846793005).wrapping_add(1442695040888963407);
            ((s >> 33) as f32 / (1u64 << 31) as f32) * scale + shift
        })
        .collect()
}

/// A CPU f32 tensor of [`lcg`] values.
pub fn lcg_tensor(shape: impl Into<Shape>, seed: u64, scale: f32, shift: f32) -> Tensor {
    let shape = shape.into();
    Tensor::from_vec(lcg(shape.elem_count(), seed, scale, shift), shape, &Device::Cpu).unwrap()
}

/// `n` values uniform in [-0.5, 0.5) (the fused kernels' unit tests in ltd-nn).
pub fn uniform(n: usize, seed: u64) -> Vec<f32> {
    lcg(n, seed, 1.0, -0.5)
}

/// A CPU f32 tensor of [`uniform`] values.
pub fn rand(shape: impl Into<Shape>, seed: u64) -> Tensor {
    lcg_tensor(shape, seed, 1.0, -0.5)
}

/// The model tests' stand-in for `torch.randn`: a CPU f32 tensor uniform in [-1.7, 1.7), about
/// a standard normal's spread. Not normal: the tests need only deterministic O(1) inputs.
pub fn randn(shape: impl Into<Shape>, seed: u64) -> Tensor {
    lcg_tensor(shape, seed, 3.4, -1.7)
}

// ---------------------------------------------------------------------------------------------
// Error metrics

/// max |t|, in float32 (converted first; exact for f16 and bf16 tensors).
pub fn max_abs(t: &Tensor) -> f32 {
    let t = t.to_dtype(DType::F32).unwrap();
    t.abs().unwrap().flatten_all().unwrap().max(0).unwrap().to_scalar::<f32>().unwrap()
}

/// max |t|, in float64 (converted first; exact for every float dtype).
pub fn max_abs_f64(t: &Tensor) -> f64 {
    let t = t.to_dtype(DType::F64).unwrap();
    t.abs().unwrap().flatten_all().unwrap().max(0).unwrap().to_scalar::<f64>().unwrap()
}

/// max |a − b|, both converted to float32 and subtracted there. Panics unless the shapes agree.
pub fn max_abs_diff(a: &Tensor, b: &Tensor) -> f32 {
    assert_eq!(a.dims(), b.dims());
    let d = (a.to_dtype(DType::F32).unwrap() - b.to_dtype(DType::F32).unwrap()).unwrap();
    d.abs().unwrap().flatten_all().unwrap().max(0).unwrap().to_scalar::<f32>().unwrap()
}

/// max |a − b|, both converted to float64 and subtracted there (no rounding of the difference
/// of two f32 values). Panics unless the shapes agree.
pub fn max_abs_diff_f64(a: &Tensor, b: &Tensor) -> f64 {
    assert_eq!(a.dims(), b.dims());
    let d = (a.to_dtype(DType::F64).unwrap() - b.to_dtype(DType::F64).unwrap()).unwrap();
    d.abs().unwrap().flatten_all().unwrap().max(0).unwrap().to_scalar::<f64>().unwrap()
}

// ---------------------------------------------------------------------------------------------
// Files

/// Copies the folder `src` into `dst` (created if missing), recursively.
pub fn copy_dir(src: &Path, dst: &Path) {
    copy_dir_except(src, dst, &[]);
}

/// [`copy_dir`], leaving out the entries of `src` itself (not of its subfolders) named in
/// `skip`: a model folder with one file missing.
pub fn copy_dir_except(src: &Path, dst: &Path, skip: &[&str]) {
    std::fs::create_dir_all(dst).unwrap();
    for entry in std::fs::read_dir(src).unwrap() {
        let entry = entry.unwrap();
        let name = entry.file_name();
        if skip.iter().any(|s| name == *s) {
            continue;
        }
        let to = dst.join(&name);
        if entry.file_type().unwrap().is_dir() {
            copy_dir(&entry.path(), &to);
        } else {
            std::fs::copy(entry.path(), &to).unwrap();
        }
    }
}

// ---------------------------------------------------------------------------------------------
// Full-size state-dict shapes (`tests/fixtures/fullsize/*/*.txt`)

/// A reference model's tensors, from `name<TAB>d0,d1,...` lines (empty dims: a scalar; empty
/// lines are skipped).
pub fn read_shapes(path: &Path) -> BTreeMap<String, Vec<usize>> {
    let text = std::fs::read_to_string(path)
        .unwrap_or_else(|e| panic!("cannot read {}: {e}", path.display()));
    text.lines()
        .filter(|line| !line.is_empty())
        .map(|line| {
            let (name, dims) = line.split_once('\t').unwrap();
            let dims = dims.split(',').filter(|d| !d.is_empty()).map(|d| d.parse().unwrap());
            (name.to_string(), dims.collect())
        })
        .collect()
}

/// Asserts that the tensors a model requested (`ours`, from `ltd_nn::record_shapes`) are
/// exactly the reference's, listing the missing, extra and mis-shaped ones together.
pub fn assert_same_shapes(
    label: &str,
    ours: &BTreeMap<String, Vec<usize>>,
    expected: &BTreeMap<String, Vec<usize>>,
) {
    let missing: Vec<_> = expected.keys().filter(|k| !ours.contains_key(*k)).collect();
    let extra: Vec<_> = ours.keys().filter(|k| !expected.contains_key(*k)).collect();
    let mis_shaped: Vec<_> = expected
        .iter()
        .filter_map(|(k, s)| ours.get(k).filter(|o| *o != s).map(|o| (k, s, o)))
        .collect();
    assert!(
        missing.is_empty() && extra.is_empty() && mis_shaped.is_empty(),
        "{label}: {} missing {missing:?}\n{} extra {extra:?}\nmis-shaped (name, reference, ours) \
         {mis_shaped:?}",
        missing.len(),
        extra.len()
    );
    assert_eq!(ours, expected);
}

// ---------------------------------------------------------------------------------------------
// Images

/// A decoded 8-bit PNG: its pixels as stored (1 grey, 3 RGB or 4 RGBA channels, row-major,
/// interleaved) and its `parameters` text chunk (latin-1 `tEXt` or UTF-8 `iTXt`; "" if none).
pub struct Png {
    pub width: usize,
    pub height: usize,
    pub channels: usize,
    pub pixels: Vec<u8>,
    pub parameters: String,
}

/// Reads a PNG (see [`Png`]); any failure panics naming the file.
pub fn read_png(path: &Path) -> Png {
    let file = std::fs::File::open(path).unwrap_or_else(|e| panic!("{}: {e}", path.display()));
    let mut reader = png::Decoder::new(std::io::BufReader::new(file))
        .read_info()
        .unwrap_or_else(|e| panic!("{}: {e}", path.display()));
    let info = reader.info();
    let latin1 = info.uncompressed_latin1_text.iter().find(|t| t.keyword == "parameters");
    let utf8 = info.utf8_text.iter().find(|t| t.keyword == "parameters");
    let parameters = match (utf8, latin1) {
        (Some(t), _) => t.get_text().unwrap_or_default(),
        (None, Some(t)) => t.text.clone(),
        (None, None) => String::new(),
    };
    let mut buf = vec![0; reader.output_buffer_size().unwrap()];
    let frame = reader.next_frame(&mut buf).unwrap();
    let channels = match frame.color_type {
        png::ColorType::Grayscale => 1,
        png::ColorType::Rgb => 3,
        png::ColorType::Rgba => 4,
        other => panic!("{}: unexpected colour type {other:?}", path.display()),
    };
    let (width, height) = (frame.width as usize, frame.height as usize);
    buf.truncate(width * height * channels);
    Png { width, height, channels, pixels: buf, parameters }
}

/// [`read_png`] as `(width, height, RGB bytes, parameters)`: an alpha channel is dropped.
pub fn read_png_rgb(path: &Path) -> (usize, usize, Vec<u8>, String) {
    let png = read_png(path);
    let rgb = match png.channels {
        3 => png.pixels,
        4 => png.pixels.chunks(4).flat_map(|p| [p[0], p[1], p[2]]).collect(),
        c => panic!("{}: {c} channels, expected RGB or RGBA", path.display()),
    };
    (png.width, png.height, rgb, png.parameters)
}

/// The PSNR in dB of two 8-bit images of the same layout (∞ when they are equal).
pub fn psnr_u8(a: &[u8], b: &[u8]) -> f64 {
    assert_eq!(a.len(), b.len(), "PSNR of images of different sizes");
    let mse =
        a.iter().zip(b).map(|(&x, &y)| (x as f64 - y as f64).powi(2)).sum::<f64>() / a.len() as f64;
    if mse == 0.0 {
        f64::INFINITY
    } else {
        10.0 * (255.0f64.powi(2) / mse).log10()
    }
}

/// Runs a command-line binary (`env!("CARGO_BIN_EXE_…")`) that must refuse `args`, writing to
/// `--output` in a fresh folder, and checks the failure contract every binary keeps: a non-zero
/// exit, exactly one `error: ` line on stderr, no panic, no file left. Returns the exit code and
/// that line, for the caller's checks of what it says.
pub fn refusal(bin: &str, args: &[&str]) -> (Option<i32>, String) {
    let out_dir = tempfile::tempdir().unwrap();
    let out = out_dir.path().join("out.png");
    let run = std::process::Command::new(bin)
        .args(args)
        .args(["--output", out.to_str().unwrap(), "--quiet"])
        .env("RUST_LOG", "off")
        .output()
        .unwrap();
    let stderr = String::from_utf8_lossy(&run.stderr);
    assert!(!run.status.success(), "{args:?} succeeded");
    let lines: Vec<&str> = stderr.lines().collect();
    assert_eq!(lines.len(), 1, "{args:?}: expected one line, got: {stderr}");
    assert!(lines[0].starts_with("error: "), "{args:?}: {stderr}");
    assert!(!stderr.contains("panicked"), "{stderr}");
    let left: Vec<_> = std::fs::read_dir(out_dir.path()).unwrap().collect();
    assert!(left.is_empty(), "{args:?}: files were written: {left:?}");
    (run.status.code(), lines[0].to_string())
}

/// [`refusal`] with exit `code` and `expect` in the error line.
pub fn assert_refused(bin: &str, args: &[&str], expect: &str, code: i32) {
    let (got, line) = refusal(bin, args);
    assert_eq!(got, Some(code), "{args:?}: exit {got:?}: {line}");
    assert!(line.contains(expect), "{args:?}: expected {expect:?} in: {line}");
}

/// The files `ltd-gen --output out` writes for a batch of `n`: `out` itself for one image,
/// `<stem>-1.png` … `<stem>-n.png` beside it for more.
pub fn batch_outputs(out: &Path, n: usize) -> Vec<PathBuf> {
    if n == 1 {
        return vec![out.to_path_buf()];
    }
    let stem = out.file_stem().unwrap().to_string_lossy();
    (1..=n).map(|i| out.with_file_name(format!("{stem}-{i}.png"))).collect()
}

/// Compares our PNG `got` with the reference's `want` (RGB): the PSNR in dB, or why they do
/// not match (another size, or below `min_db`).
pub fn png_parity(want: &Path, got: &Path, min_db: f64) -> Result<f64, String> {
    let (w1, h1, a, _) = read_png_rgb(want);
    let (w2, h2, b, _) = read_png_rgb(got);
    if (w1, h1) != (w2, h2) {
        return Err(format!("size {w2}x{h2}, reference {w1}x{h1}"));
    }
    let db = psnr_u8(&a, &b);
    if db < min_db {
        return Err(format!("{} at {db:.1} dB (< {min_db} dB)", got.display()));
    }
    Ok(db)
}

// ---------------------------------------------------------------------------------------------
// Resident memory (Linux: the memory tests run one test per target, as the counters are the
// process's)

/// A `/proc/self/status` field in KiB (`VmRSS:` resident now, `VmHWM:` the peak).
pub fn status_kib(field: &str) -> u64 {
    let status = std::fs::read_to_string("/proc/self/status").unwrap();
    let line = status.lines().find(|l| l.starts_with(field)).unwrap();
    line.split_whitespace().nth(1).unwrap().parse().unwrap()
}

/// Resets the peak (`VmHWM`) to the current resident size.
pub fn reset_peak() {
    std::fs::write("/proc/self/clear_refs", "5").unwrap();
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The LCG as the tests held it before it moved here, `u · a − b` spelled out: the shared
    /// `u · scale + shift` must give the same bits, or every test using it would see new data.
    fn old(n: usize, seed: u64, a: f32, b: f32) -> Vec<u32> {
        let mut s = seed;
        (0..n)
            .map(|_| {
                s = s.wrapping_mul(6364136223846793005).wrapping_add(1442695040888963407);
                (((s >> 33) as f32 / (1u64 << 31) as f32) * a - b).to_bits()
            })
            .collect()
    }

    fn bits(v: &[f32]) -> Vec<u32> {
        v.iter().map(|x| x.to_bits()).collect()
    }

    #[test]
    fn lcg_helpers_keep_the_old_bits() {
        for seed in [0, 1, 2, 3, 4, 11, 12, 13, 14, 42, 1234] {
            let n = 4096;
            assert_eq!(bits(&uniform(n, seed)), old(n, seed, 1.0, 0.5));
            let t = randn(&[n], seed).to_vec1::<f32>().unwrap();
            assert_eq!(bits(&t), old(n, seed, 3.4, 1.7));
            let t = lcg_tensor(&[n], seed, 2.0, -1.0).to_vec1::<f32>().unwrap();
            assert_eq!(bits(&t), old(n, seed, 2.0, 1.0));
        }
        assert_eq!(randn((1, 2, 3, 4), 5).dims(), [1, 2, 3, 4]);
    }

    #[test]
    fn metrics() {
        let a = Tensor::new(&[1f32, -3.0, 2.0], &Device::Cpu).unwrap();
        let b = Tensor::new(&[1f32, 0.5, 2.0], &Device::Cpu).unwrap();
        assert_eq!(max_abs(&a), 3.0);
        assert_eq!(max_abs_f64(&a), 3.0);
        assert_eq!(max_abs_diff(&a, &b), 3.5);
        assert_eq!(max_abs_diff_f64(&a, &b), 3.5);
    }
}
