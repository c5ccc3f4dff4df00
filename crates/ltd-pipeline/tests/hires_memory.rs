//! Hires fix at 4× the native size with `vae_tiling` keeps the large decode in bounded memory:
//! the peak resident memory of the final VAE decode (measured from the last denoising step's
//! callback, where the kernel's peak counter is reset, to the end) stays a fraction of the
//! untiled decode's, and the tiled run still gives the 4× image.
//!
//! One test in its own target: the peak counter (`VmHWM`, reset through
//! `/proc/self/clear_refs`) is per process, so nothing else may run beside it. Linux only.

use std::path::{Path, PathBuf};

use ltd_pipeline::{GenerateRequest, HiresFix, LoadOptions, Pipeline};
use ltd_test_support::{reset_peak, status_kib};

fn fixtures() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../../tests/fixtures")
}

/// Runs a 4× hires fix; returns the decode's peak above the resident memory at its start (KiB)
/// and the image size.
fn decode_peak(pipe: &Pipeline, tiling: bool) -> (u64, (usize, usize)) {
    let req = GenerateRequest {
        prompts: vec!["a red circle".into()],
        steps: 2,
        vae_tiling: tiling,
        ..Default::default()
    };
    let hires = HiresFix { scale: 4.0, strength: 0.5, ..HiresFix::default() };
    let mut base = 0;
    let out = pipe
        .generate_hires(&req, &hires, &mut |p| {
            // The second pass's last evaluation: only the decode is left.
            if p.evaluation == p.evaluations && p.latents.dim(2).unwrap() > 8 {
                reset_peak();
                base = status_kib("VmRSS:");
            }
        })
        .unwrap();
    let peak = status_kib("VmHWM:");
    let img = &out.images[0].image;
    (peak.saturating_sub(base), (img.width, img.height))
}

#[test]
fn four_times_native_size_with_vae_tiling_decodes_in_bounded_memory() {
    let pipe =
        Pipeline::load_folder(&fixtures().join("pipelines/sd1"), &LoadOptions::default()).unwrap();
    // Tiled first, so that the untiled run cannot reuse pages it freed.
    let (tiled, size) = decode_peak(&pipe, true);
    assert_eq!(size, (256, 256));
    let (untiled, size) = decode_peak(&pipe, false);
    assert_eq!(size, (256, 256));
    eprintln!("decode peak above the start: tiled {tiled} KiB, untiled {untiled} KiB");
    assert!(tiled * 2 < untiled, "tiled {tiled} KiB is not well below untiled {untiled} KiB");
}
