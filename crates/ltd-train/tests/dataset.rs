//! The imagefolder reader: parsing, skipping bad lines and images with counts, clear errors
//! for missing or empty datasets, and the tensors it makes.

mod common;

use std::path::Path;

use candle_core::Device;
use image::{Rgb, RgbImage};
use ltd_train::data::{Augment, ImageFolder};

fn write_png(dir: &Path, name: &str, w: u32, h: u32, f: impl Fn(u32, u32) -> [u8; 3]) {
    RgbImage::from_fn(w, h, |x, y| Rgb(f(x, y))).save(dir.join(name)).unwrap();
}

#[test]
fn reads_good_lines_and_counts_what_it_skips() {
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    write_png(d, "a.png", 8, 8, |_, _| [255, 0, 0]);
    write_png(d, "b.png", 16, 8, |x, _| if x < 8 { [0, 0, 255] } else { [0, 255, 0] });
    std::fs::write(d.join("broken.png"), b"not a png at all").unwrap();
    let meta = [
        r#"{"file_name": "a.png", "text": "red", "extra": [1, 2], "score": 0.5}"#,
        r#"{"file_name": "missing.png", "text": "gone"}"#,
        r#"{"file_name": "broken.png", "text": "corrupt"}"#,
        r#"{"file_name": "a.png"}"#,
        r#"this is not json"#,
        "",
        r#"{"file_name": "b.png", "text": "blue and green"}"#,
    ];
    std::fs::write(d.join("metadata.jsonl"), meta.join("\n")).unwrap();
    let data = ImageFolder::open(d, 4).unwrap();
    let texts: Vec<&str> = data.examples().iter().map(|e| e.text.as_str()).collect();
    assert_eq!(texts, ["red", "blue and green"]);
    // Lines 4 (no text) and 5 (not JSON) are bad lines; missing.png and broken.png bad images.
    let lines: Vec<&str> = data.skipped_lines().iter().map(|s| s.what.as_str()).collect();
    assert_eq!(lines, ["metadata.jsonl:4", "metadata.jsonl:5"]);
    assert_eq!(data.skipped_images().len(), 2);
    assert!(data.skipped_images()[0].what.ends_with("missing.png"));

    // [-1, 1], resized to 4x4; b.png's centre crop straddles the blue/green edge.
    let x = data.batch(&[0, 1], &Device::Cpu).unwrap();
    assert_eq!(x.dims(), [2, 3, 4, 4]);
    let flat = x.flatten_all().unwrap().to_vec1::<f32>().unwrap();
    assert!(flat.iter().all(|v| (-1.0..=1.0).contains(v)));
    // Image 0 is pure red: channel 0 is 1, channels 1 and 2 are -1 (exact: 2·255/255 − 1).
    assert!(flat[..16].iter().all(|&v| v == 1.0) && flat[16..48].iter().all(|&v| v == -1.0));
}

#[test]
fn flips_and_crops_move_the_right_pixels() {
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    // Red column at x = 0, black elsewhere.
    write_png(d, "a.png", 4, 4, |x, y| if x == 0 { [255, 0, 0] } else { [0, 0, y as u8 * 60] });
    std::fs::write(d.join("metadata.jsonl"), r#"{"file_name": "a.png", "text": "t"}"#).unwrap();
    let data = ImageFolder::open(d, 4).unwrap();
    let red = |aug: Augment, size: usize| {
        let x = data.batch_augmented(&[0], &[aug], size, &Device::Cpu).unwrap();
        x.flatten_all().unwrap().to_vec1::<f32>().unwrap()[..size * size].to_vec()
    };
    assert_eq!(red(Augment::default(), 4)[0], 1.0);
    let flipped = red(Augment { flip: true, ..Default::default() }, 4);
    assert_eq!((flipped[0], flipped[3]), (-1.0, 1.0));
    // A 2x2 crop at (1, 2) misses the red column; its blue is row 2's (120 → 2·120/255 − 1).
    let x = data
        .batch_augmented(&[0], &[Augment { flip: false, x0: 1, y0: 2 }], 2, &Device::Cpu)
        .unwrap();
    let v = x.flatten_all().unwrap().to_vec1::<f32>().unwrap();
    assert!(v[..4].iter().all(|&r| r == -1.0));
    assert!((v[8] - (2.0 * 120.0 / 255.0 - 1.0)).abs() < 1e-6);
}

#[test]
fn missing_and_empty_datasets_are_clear_errors() {
    let dir = tempfile::tempdir().unwrap();
    let err = |p: &Path| ImageFolder::open(p, 8).unwrap_err().to_string();
    let missing = dir.path().join("nope");
    assert!(err(&missing).contains("no such folder"), "{}", err(&missing));
    assert!(err(dir.path()).contains("no metadata.jsonl"), "{}", err(dir.path()));
    std::fs::write(dir.path().join("metadata.jsonl"), "").unwrap();
    assert!(err(dir.path()).contains("no usable examples (0 metadata lines and 0 images skipped)"));
    std::fs::write(
        dir.path().join("metadata.jsonl"),
        "{\"file_name\": \"x.png\", \"text\": \"t\"}\n",
    )
    .unwrap();
    let e = err(dir.path());
    assert!(e.starts_with("dataset ") && e.contains("1 images skipped"), "{e}");
}
