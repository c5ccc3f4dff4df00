//! The embedded default model: `ltd-gen "a red circle on a blue background"` with no `--model`
//! works offline on a fresh machine and writes a PNG that shows it.

use std::process::Command;

use ltd_train::shape_check::analyze;

#[test]
fn the_default_model_draws_the_prompt_offline() {
    let cache = tempfile::tempdir().unwrap();
    let out = cache.path().join("circle.png");
    let run = |seed: &str| {
        Command::new(env!("CARGO_BIN_EXE_ltd-gen"))
            .args(["a red circle on a blue background", "--seed", seed, "--num-images", "4"])
            .arg("--output")
            .arg(&out)
            .arg("--quiet")
            // Where the embedded model is extracted; the hub must not be needed.
            .env("LTD_CACHE", cache.path())
            .env("HF_HUB_OFFLINE", "1")
            .output()
            .unwrap()
    };
    let first = run("1");
    assert!(first.status.success(), "{}", String::from_utf8_lossy(&first.stderr));
    let mut circles = 0;
    for i in 1..=4 {
        let path = cache.path().join(format!("circle-{i}.png"));
        let img = image::open(&path).unwrap().to_rgb8();
        assert_eq!(img.dimensions(), (32, 32), "the default model's native size");
        // What this small model reliably gets right: the background and the object's colour.
        // Its shapes are right less often (see models/README.md): most, not all, must be circles.
        let d = analyze(&img);
        eprintln!("image {i}: {d:?}");
        assert_eq!(d.background, "blue", "image {i}: {d:?}");
        assert_eq!(d.colour, Some("red"), "image {i}: {d:?}");
        assert!(d.area >= 9, "image {i} has an object: {d:?}");
        circles += usize::from(d.shape == Some(ltd_train::shapes::ShapeKind::Circle));
    }
    assert!(circles >= 3, "{circles} of 4 images show a circle");

    // A second run reuses the extracted copy and gives the same pixels.
    let before = std::fs::read(cache.path().join("circle-1.png")).unwrap();
    let second = run("1");
    assert!(second.status.success(), "{}", String::from_utf8_lossy(&second.stderr));
    assert_eq!(before, std::fs::read(cache.path().join("circle-1.png")).unwrap());
}
