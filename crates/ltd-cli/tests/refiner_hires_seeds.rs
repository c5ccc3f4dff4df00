//! The refiner, hires fix and seed options as a user meets them: per-image seeds recorded and
//! each image recreated alone, the hires output size and its parameters, and every bad input
//! (a refiner as a text-to-image model, a switch point outside (0, 1), bad hires and variation
//! settings) answered with one line naming the flag, a non-zero exit and no file.

use std::path::Path;
use std::process::Command;

use ltd_test_support::{fixtures, psnr_u8};

fn model(name: &str) -> String {
    fixtures().join("pipelines").join(name).display().to_string()
}

fn ltd_gen(args: &[&str]) -> std::process::Output {
    Command::new(env!("CARGO_BIN_EXE_ltd-gen")).args(args).env("RUST_LOG", "off").output().unwrap()
}

/// Runs ltd-gen, which must succeed.
fn ok(args: &[&str]) {
    let run = ltd_gen(args);
    assert!(run.status.success(), "{args:?}: {}", String::from_utf8_lossy(&run.stderr));
}

/// Size, pixels and the `parameters` chunk of a PNG.
fn read(path: &Path) -> ((u32, u32), Vec<u8>, String) {
    let png = ltd_test_support::read_png(path);
    assert!(!png.parameters.is_empty(), "{}: no parameters chunk", path.display());
    ((png.width as u32, png.height as u32), png.pixels, png.parameters)
}

/// The value of `key` in an infotext.
fn field<'a>(info: &'a str, key: &str) -> &'a str {
    info.split(&format!("{key}: "))
        .nth(1)
        .unwrap_or_else(|| panic!("{key} in {info}"))
        .split(',')
        .next()
        .unwrap()
}

#[test]
fn a1111_seed_mode_records_each_images_seed_and_recreates_it_alone() {
    let dir = tempfile::tempdir().unwrap();
    let m = model("sd1");
    let out = dir.path().join("b.png");
    let common = ["a cat", "--model", m.as_str(), "--steps", "3", "--scheduler", "euler-a", "-q"];
    let batch =
        [&common[..], &["--seed", "7", "--num-images", "3", "--seed-mode", "a1111"]].concat();
    let variation = ["--subseed", "100", "--subseed-strength", "0.4"];
    for extra in [&[][..], &variation[..]] {
        ok(&[&batch[..], extra, &["--output", out.to_str().unwrap()]].concat());
        for k in 0..3 {
            let (_, pixels, info) = read(&dir.path().join(format!("b-{}.png", k + 1)));
            let seed = field(&info, "Seed");
            assert_eq!(seed, (7 + k).to_string(), "{info}");
            let mut alone = vec!["--seed", seed, "--output"];
            let path = dir.path().join("alone.png");
            alone.push(path.to_str().unwrap());
            let sub;
            if !extra.is_empty() {
                sub = field(&info, "Variation seed").to_string();
                assert_eq!(sub, (100 + k).to_string(), "{info}");
                assert_eq!(field(&info, "Variation seed strength"), "0.4");
                alone.extend(["--subseed", &sub, "--subseed-strength", "0.4"]);
            }
            ok(&[&common[..], &alone].concat());
            let again = read(&path).1;
            // Alone the U-Net runs a batch of one instead of three: equal up to float rounding
            // (measured: identical bytes, or one byte off by one).
            let db = psnr_u8(&again, &pixels);
            assert!(db >= 60.0, "image {k} recreated alone, {extra:?}: {db:.1} dB");
        }
    }
}

#[test]
fn diffusers_seed_mode_fills_the_batch_from_one_generator() {
    let dir = tempfile::tempdir().unwrap();
    let m = model("sd1");
    let out = dir.path().join("b.png");
    let alone = dir.path().join("alone.png");
    let common = ["a cat", "--model", m.as_str(), "--steps", "3", "--seed", "7", "-q"];
    ok(&[&common[..], &["--num-images", "2", "--output", out.to_str().unwrap()]].concat());
    ok(&[&common[..], &["--output", alone.to_str().unwrap()]].concat());
    let (_, first, info) = read(&dir.path().join("b-1.png"));
    let (_, second, info2) = read(&dir.path().join("b-2.png"));
    // Both record the batch's seed (and their position); the first is the seed's image alone.
    assert_eq!((field(&info, "Seed"), field(&info2, "Seed")), ("7", "7"));
    assert_eq!(field(&info2, "Batch pos"), "1");
    assert_eq!(read(&alone).1, first);
    assert_ne!(read(&alone).1, second);
}

#[test]
fn hires_fix_writes_the_large_image_with_a1111_parameters() {
    let dir = tempfile::tempdir().unwrap();
    let m = model("sd1");
    for (upscaler, scale, size) in [("latent", "2", 128), ("lanczos", "1.5", 96)] {
        let out = dir.path().join(format!("{upscaler}.png"));
        ok(&[
            "a cat",
            "--model",
            &m,
            "--steps",
            "3",
            "--seed",
            "1",
            "--hires-scale",
            scale,
            "--hires-steps",
            "4",
            "--hires-strength",
            "0.5",
            "--hires-upscaler",
            upscaler,
            "--output",
            out.to_str().unwrap(),
            "-q",
        ]);
        let ((w, h), _, info) = read(&out);
        assert_eq!((w, h), (size, size), "{upscaler}");
        assert!(info.contains("Size: 64x64"), "{info}");
        assert!(info.contains(&format!("Hires upscale: {scale}, Hires steps: 4")), "{info}");
    }
}

#[test]
fn refiner_alone_refines_an_image() {
    let dir = tempfile::tempdir().unwrap();
    let out = dir.path().join("r.png");
    let init = fixtures().join("golden/refiner/init.png");
    ok(&[
        "a cat",
        "--model",
        &model("sdxl-refiner"),
        "--init-image",
        init.to_str().unwrap(),
        "--strength",
        "0.5",
        "--steps",
        "4",
        "--output",
        out.to_str().unwrap(),
        "-q",
    ]);
    assert_eq!(read(&out).0, (64, 64));
}

/// Runs ltd-gen writing to a fresh folder; checks the failure contract.
fn fails(args: &[&str], expect: &str, code: i32) {
    ltd_test_support::assert_refused(env!("CARGO_BIN_EXE_ltd-gen"), args, expect, code);
}

#[test]
fn bad_refiner_hires_and_seed_inputs_get_one_line_naming_the_flag() {
    let (xl, refiner, sd1) = (model("sdxl"), model("sdxl-refiner"), model("sd1"));
    let init = fixtures().join("golden/refiner/init.png").display().to_string();
    // A refiner folder as the text-to-image model.
    fails(&["a cat", "--model", &refiner, "--steps", "2"], "--init-image: ", 2);
    fails(&["a cat", "--model", &refiner, "--steps", "2"], "is an SDXL refiner", 2);
    // Switch points outside (0, 1).
    for bad in ["0", "1", "1.5", "-0.2", "NaN"] {
        fails(
            &["a cat", "--model", &xl, "--refiner", &refiner, "--refiner-switch", bad],
            "--refiner-switch: must be in (0, 1)",
            2,
        );
    }
    fails(
        &["a cat", "--model", &sd1, "--refiner", &refiner, "--steps", "2"],
        "--refiner: the base model",
        2,
    );
    fails(
        &["a cat", "--model", &xl, "--refiner", &refiner, "--init-image", &init],
        "--init-image",
        2,
    );
    // Hires fix.
    fails(
        &["a cat", "--model", &sd1, "--hires-scale", "0.5"],
        "--hires-scale: must be in [1, 8]",
        2,
    );
    fails(
        &["a cat", "--model", &sd1, "--hires-scale", "2", "--hires-strength", "0"],
        "--hires-strength: must be in (0, 1]",
        2,
    );
    fails(
        &["a cat", "--model", &sd1, "--hires-scale", "2", "--hires-steps", "0"],
        "--hires-steps: must be in [1, 10000]",
        2,
    );
    fails(
        &["a cat", "--model", &xl, "--refiner", &refiner, "--hires-scale", "2"],
        "--hires-scale: hires fix and --refiner cannot be combined",
        2,
    );
    fails(
        &["a cat", "--model", &sd1, "--hires-scale", "2", "--init-image", &init],
        "--init-image",
        2,
    );
    // Variation seeds.
    fails(
        &["a cat", "--model", &sd1, "--subseed", "3", "--subseed-strength", "1.5"],
        "--subseed-strength: must be in [0, 1], got 1.5",
        2,
    );
}
