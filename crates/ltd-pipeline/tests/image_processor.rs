//! ltd's port of the PIL operations in diffusers' `VaeImageProcessor` against PIL's own bytes
//! (`tests/fixtures/golden/inpaint/pil/`, made by the fixtures' `inpaint` section): Lanczos
//! resizing (down, up, from a fractional box, from a zero-height box), `GaussianBlur`,
//! `get_crop_region`, the `fill` resize mode and `apply_overlay` with a blurred mask. All exact.

use std::path::Path;

use ltd_pipeline::image_processor::{apply_overlay, get_crop_region, Bitmap};
use ltd_test_support::fixtures;
use serde_json::Value;

fn dir() -> std::path::PathBuf {
    fixtures().join("golden/inpaint")
}

/// A PNG as a bitmap with its own channel count (1 for PIL's "L", 3 for RGB).
fn read_png(path: &Path) -> Bitmap {
    let png = ltd_test_support::read_png(path);
    assert!(png.channels != 4, "{}: RGBA, expected grey or RGB", path.display());
    Bitmap { width: png.width, height: png.height, channels: png.channels, data: png.pixels }
}

fn ops() -> Value {
    serde_json::from_str(&std::fs::read_to_string(dir().join("pil/ops.json")).unwrap()).unwrap()
}

/// Exact equality, or the first differing byte and how many differ.
fn check(name: &str, got: &Bitmap, want: &Bitmap) {
    assert_eq!(
        (got.width, got.height, got.channels),
        (want.width, want.height, want.channels),
        "{name}"
    );
    let diffs: Vec<usize> = (0..got.data.len()).filter(|&i| got.data[i] != want.data[i]).collect();
    if let Some(&i) = diffs.first() {
        panic!(
            "{name}: {} of {} bytes differ; first at {i}: {} vs PIL {}",
            diffs.len(),
            got.data.len(),
            got.data[i],
            want.data[i]
        );
    }
}

#[test]
fn lanczos_resize_matches_pil() {
    let ops = ops();
    let src = read_png(&dir().join(ops["source"].as_str().unwrap()));
    for r in ops["resizes"].as_array().unwrap() {
        let size: Vec<usize> =
            r["size"].as_array().unwrap().iter().map(|v| v.as_u64().unwrap() as usize).collect();
        let bbox = r["box"].as_array().map(|b| {
            let v: Vec<f64> = b.iter().map(|x| x.as_f64().unwrap()).collect();
            [v[0], v[1], v[2], v[3]]
        });
        let file = r["file"].as_str().unwrap();
        check(file, &src.resize(size[0], size[1], bbox), &read_png(&dir().join("pil").join(file)));
    }
}

#[test]
fn gaussian_blur_matches_pil() {
    let ops = ops();
    let mask = read_png(&dir().join("wide-mask.png"));
    for b in ops["blurs"].as_array().unwrap() {
        let file = b["file"].as_str().unwrap();
        let radius = b["radius"].as_f64().unwrap() as f32;
        check(file, &mask.gaussian_blur(radius), &read_png(&dir().join("pil").join(file)));
    }
}

#[test]
fn crop_region_matches_diffusers() {
    for c in ops()["crops"].as_array().unwrap() {
        let mask = read_png(&dir().join(c["mask"].as_str().unwrap()));
        let n = |k: &str| c[k].as_u64().unwrap() as usize;
        let got = get_crop_region(&mask, n("width"), n("height"), n("pad")).unwrap();
        let want: Vec<i64> =
            c["region"].as_array().unwrap().iter().map(|v| v.as_i64().unwrap()).collect();
        assert_eq!([got.0, got.1, got.2, got.3], want[..], "{c}");
    }
    let black = Bitmap::new(8, 8, 1);
    let err = get_crop_region(&black, 8, 8, 2).unwrap_err().to_string();
    assert!(err.contains("--padding-mask-crop: the mask is all black"), "{err}");
}

#[test]
fn fill_resize_and_overlay_match_diffusers() {
    let ops = ops();
    let src = read_png(&dir().join("wide.png"));
    let fill = &ops["fill"];
    let c: Vec<i64> =
        fill["crop"].as_array().unwrap().iter().map(|v| v.as_i64().unwrap()).collect();
    let got = src.crop((c[0], c[1], c[2], c[3])).resize_and_fill(64, 64);
    check("fill", &got, &read_png(&dir().join("pil/fill.png")));

    let o = &ops["overlay"];
    let mask = read_png(&dir().join("wide-mask.png"))
        .gaussian_blur(o["mask_blur"].as_f64().unwrap() as f32);
    let image = read_png(&dir().join(o["image"].as_str().unwrap()));
    let c: Vec<i64> = o["crop"].as_array().unwrap().iter().map(|v| v.as_i64().unwrap()).collect();
    let got = apply_overlay(&mask, &src, &image, Some((c[0], c[1], c[2], c[3]))).unwrap();
    check("overlay", &got, &read_png(&dir().join("pil/overlay.png")));
}
