//! The embedded default model: `ltd-gen "a red circle on a blue background"` with no `--model`
//! works offline on a fresh machine and writes a PNG that shows it (a red circle on blue); a
//! position in the prompt moves the object there.

use std::process::Command;

use ltd_train::shape_check::analyze;
use ltd_train::shapes::{Position, ShapeKind};

#[test]
fn the_default_model_draws_the_prompt_offline() {
    let cache = tempfile::tempdir().unwrap();
    let out = cache.path().join("circle.png");
    let run_prompt = |prompt: &str, seed: &str, out: &std::path::Path| {
        Command::new(env!("CARGO_BIN_EXE_ltd-gen"))
            .args([prompt, "--seed", seed, "--num-images", "4"])
            .arg("--output")
            .arg(out)
            .arg("--quiet")
            // Where the embedded model is extracted; the hub must not be needed.
            .env("LTD_CACHE", cache.path())
            .env("HF_HUB_OFFLINE", "1")
            .output()
            .unwrap()
    };
    let run = |seed: &str| run_prompt("a red circle on a blue background", seed, &out);
    let first = run("1");
    assert!(first.status.success(), "{}", String::from_utf8_lossy(&first.stderr));
    for i in 1..=4 {
        let path = cache.path().join(format!("circle-{i}.png"));
        let img = image::open(&path).unwrap().to_rgb8();
        assert_eq!(img.dimensions(), (32, 32), "the default model's native size");
        // Background and colour must be right in every image; shapes, the attribute the
        // model gets right least often (held out: 68–75%, chance 33%; see the README's "The
        // default model"), are counted over more seeds below.
        let d = analyze(&img);
        eprintln!("image {i}: {d:?}");
        assert_eq!(d.background, "blue", "image {i}: {d:?}");
        assert_eq!(d.colour, Some("red"), "image {i}: {d:?}");
        assert!(d.area >= 9, "image {i} has an object: {d:?}");
    }

    // Circles: at least 14 of 16 images (seeds 0–3; the shipped model draws 16, its
    // predecessor 10, chance is a third).
    let mut circles = 0;
    for seed in ["0", "1", "2", "3"] {
        let out = cache.path().join(format!("shape-{seed}.png"));
        let done = run_prompt("a red circle on a blue background", seed, &out);
        assert!(done.status.success(), "{}", String::from_utf8_lossy(&done.stderr));
        for i in 1..=4 {
            let path = cache.path().join(format!("shape-{seed}-{i}.png"));
            let d = analyze(&image::open(&path).unwrap().to_rgb8());
            circles += usize::from(d.shape == Some(ShapeKind::Circle) && d.colour == Some("red"));
        }
    }
    assert!(circles >= 14, "{circles} of 16 images are red circles");

    // A second run reuses the extracted copy and gives the same pixels.
    let before = std::fs::read(cache.path().join("circle-1.png")).unwrap();
    let second = run("1");
    assert!(second.status.success(), "{}", String::from_utf8_lossy(&second.stderr));
    assert_eq!(before, std::fs::read(cache.path().join("circle-1.png")).unwrap());

    // Position words: all four objects land in the named cell of the 3×3 grid.
    for (words, want) in
        [("top left", Position { col: 0, row: 0 }), ("bottom right", Position { col: 2, row: 2 })]
    {
        let stem = words.replace(' ', "-");
        let out = cache.path().join(format!("{stem}.png"));
        let prompt = format!("a red circle in the {words} on a blue background");
        let done = run_prompt(&prompt, "1", &out);
        assert!(done.status.success(), "{}", String::from_utf8_lossy(&done.stderr));
        for i in 1..=4 {
            let path = cache.path().join(format!("{stem}-{i}.png"));
            let d = analyze(&image::open(&path).unwrap().to_rgb8());
            eprintln!("{words} {i}: {d:?}");
            assert_eq!(d.position, Some(want), "{words}, image {i}: {d:?}");
            assert_eq!(
                (d.background, d.colour),
                ("blue", Some("red")),
                "{words}, image {i}: {d:?}"
            );
        }
    }
}
