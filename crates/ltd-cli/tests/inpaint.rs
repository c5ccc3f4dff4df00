//! Inpainting and outpainting through the binary, against diffusers' inpaint pipelines: every
//! case of `tests/fixtures/golden/inpaint/cases.json` (9-channel SD 1.x and XL with and without
//! `padding_mask_crop`, a blurred mask, a half-size mask, batches, the 4-channel sd1 model
//! blending the known region back, outpainting canvases) becomes an `ltd-gen` command line whose PNG must match diffusers' at
//! ≥ 50 dB PSNR; where diffusers pastes the picture back (`apply_overlay`: with a crop, and for
//! outpainting) the unmasked pixels must be the input's, byte for byte. Then the bad inputs.

use std::path::{Path, PathBuf};
use std::process::Command;

use ltd_test_support::{fixtures, psnr_u8, read_png};
use serde_json::Value;

fn golden() -> PathBuf {
    fixtures().join("golden/inpaint")
}

/// The command line a user would type for a case.
fn command_line(case: &Value, out: &Path) -> Vec<String> {
    let mut args: Vec<String> = vec![case["prompt"].as_str().unwrap().into()];
    let mut push = |flag: &str, v: String| {
        args.push(flag.into());
        args.push(v);
    };
    let model = fixtures().join("pipelines").join(case["pipeline"].as_str().unwrap());
    push("--model", model.display().to_string());
    let flags = [
        ("seed", "--seed"),
        ("steps", "--steps"),
        ("guidance", "--guidance"),
        ("num_images", "--num-images"),
    ];
    for (key, flag) in flags {
        push(flag, case[key].to_string());
    }
    push("--init-image", golden().join(case["init_image"].as_str().unwrap()).display().to_string());
    if let Some(m) = case["mask"].as_str() {
        push("--mask", golden().join(m).display().to_string());
    }
    if let Some(o) = case["outpaint"].as_array() {
        let v: Vec<String> = o.iter().map(Value::to_string).collect();
        push("--outpaint", v.join(","));
    }
    push("--strength", case["strength"].to_string());
    if let Some(b) = case["mask_blur"].as_u64() {
        push("--mask-blur", b.to_string());
    }
    if let Some(p) = case["padding_mask_crop"].as_u64() {
        push("--padding-mask-crop", p.to_string());
        // The crop is generated at this size; without a crop the picture's size is the size.
        push("--width", case["width"].to_string());
        push("--height", case["height"].to_string());
    }
    push("--output", out.display().to_string());
    args.push("--quiet".into());
    args
}

/// The picture and the mask diffusers' `apply_overlay` used, at the output's size: for
/// outpainting the canvas (edge-extended) and its mask, else the inputs.
fn overlay_inputs(case: &Value) -> (Vec<u8>, Vec<u8>) {
    let (w, h, _, img) = read_png_raw(&golden().join(case["init_image"].as_str().unwrap()));
    match case["outpaint"].as_array() {
        Some(o) => {
            let m: Vec<usize> = o.iter().map(|v| v.as_u64().unwrap() as usize).collect();
            let (cw, ch) = (w + m[0] + m[1], h + m[2] + m[3]);
            let mut canvas = vec![0; cw * ch * 3];
            let mut mask = vec![255; cw * ch];
            for y in 0..ch {
                for x in 0..cw {
                    let sx = x.saturating_sub(m[0]).min(w - 1);
                    let sy = y.saturating_sub(m[2]).min(h - 1);
                    let o = (y * cw + x) * 3;
                    canvas[o..o + 3].copy_from_slice(&img[(sy * w + sx) * 3..][..3]);
                    if (m[0]..m[0] + w).contains(&x) && (m[2]..m[2] + h).contains(&y) {
                        mask[y * cw + x] = 0;
                    }
                }
            }
            (canvas, mask)
        }
        None => {
            let (_, _, c, mask) = read_png_raw(&golden().join(case["mask"].as_str().unwrap()));
            assert_eq!(c, 1);
            (img, mask)
        }
    }
}

#[test]
fn ltd_gen_inpaints_like_diffusers() {
    let cases: Vec<Value> =
        serde_json::from_str(&std::fs::read_to_string(golden().join("cases.json")).unwrap())
            .unwrap();
    let dir = tempfile::tempdir().unwrap();
    let mut failures = Vec::new();
    let mut worst = f64::INFINITY;
    for case in &cases {
        let name = case["name"].as_str().unwrap();
        let out = dir.path().join(format!("{name}.png"));
        let args = command_line(case, &out);
        let run = Command::new(env!("CARGO_BIN_EXE_ltd-gen")).args(&args).output().unwrap();
        if !run.status.success() {
            failures.push(format!(
                "{name}: ltd-gen {args:?} failed: {}",
                String::from_utf8_lossy(&run.stderr)
            ));
            continue;
        }
        let images = case["images"].as_array().unwrap();
        let ours: Vec<PathBuf> = if images.len() == 1 {
            vec![out.clone()]
        } else {
            (1..=images.len()).map(|i| dir.path().join(format!("{name}-{i}.png"))).collect()
        };
        for (want, got) in images.iter().zip(&ours) {
            let (w1, h1, _, want) = read_png_raw(&golden().join(want.as_str().unwrap()));
            let (w2, h2, _, got) = read_png_raw(got);
            if (w1, h1) != (w2, h2) {
                failures.push(format!("{name}: size {w2}x{h2}, diffusers {w1}x{h1}"));
                continue;
            }
            let db = psnr_u8(&want, &got);
            worst = worst.min(db);
            eprintln!("{name}: {db:.1} dB");
            if db < 50.0 {
                failures.push(format!("{name}: {db:.1} dB"));
            }
        }
        let (want, got) =
            (read_png_raw(&golden().join(images[0].as_str().unwrap())).3, read_png_raw(&ours[0]).3);
        // Where diffusers keeps the input's pixels (its overlay, black mask, no blur), so must we.
        let pasted = case["padding_mask_crop"].is_u64() || case["outpaint"].is_array();
        if pasted && case["mask_blur"].is_null() {
            let (input, mask) = overlay_inputs(case);
            let kept: Vec<usize> = (0..mask.len()).filter(|&i| mask[i] == 0).collect();
            assert!(kept.len() > mask.len() / 4, "{name}: the mask keeps too little to test");
            for &i in &kept {
                let px = |v: &[u8]| v[i * 3..i * 3 + 3].to_vec();
                assert_eq!(px(&want), px(&input), "{name}: diffusers changed kept pixel {i}");
                if px(&got) != px(&input) {
                    failures.push(format!("{name}: kept pixel {i} changed"));
                    break;
                }
            }
        }
    }
    eprintln!("worst PSNR over {} inpainting cases: {worst:.1} dB", cases.len());
    assert!(failures.is_empty(), "{}", failures.join("\n"));
}

/// Runs ltd-gen writing to a fresh folder; checks the failure contract: exit code, one line
/// naming what is wrong, no panic, no file.
fn fails(args: &[&str], expect: &str, code: i32) {
    ltd_test_support::assert_refused(env!("CARGO_BIN_EXE_ltd-gen"), args, expect, code);
}

#[test]
fn bad_inpainting_inputs_get_one_line_and_no_file() {
    let sd1 = fixtures().join("pipelines/sd1").display().to_string();
    let inpaint = fixtures().join("pipelines/sd1-inpaint").display().to_string();
    let g = |f: &str| golden().join(f).display().to_string();
    let (init, mask, wide_mask) = (g("init.png"), g("mask.png"), g("wide-mask.png"));
    let base = |model: &str| {
        vec!["a cat".to_string(), "--model".into(), model.into(), "--steps".into(), "2".into()]
    };
    let run = |model: &str, extra: &[&str], expect: &str, code: i32| {
        let mut a = base(model);
        a.extend(extra.iter().map(|s| s.to_string()));
        fails(&a.iter().map(String::as_str).collect::<Vec<_>>(), expect, code);
    };
    run(
        &sd1,
        &["--init-image", &init, "--mask", &wide_mask],
        "--mask: the mask is 96x80 but the image is 64x64: a different aspect ratio",
        2,
    );
    run(&sd1, &["--mask", &mask], "--mask: needs --init-image", 2);
    run(
        &sd1,
        &["--init-image", &init, "--mask", "/no/such/mask.png"],
        "--mask /no/such/mask.png: cannot open",
        2,
    );
    let dir = tempfile::tempdir().unwrap();
    let text = dir.path().join("mask.png");
    std::fs::write(&text, "not a picture").unwrap();
    run(
        &sd1,
        &["--init-image", &init, "--mask", text.to_str().unwrap()],
        "mask.png: not a readable image",
        2,
    );
    run(&inpaint, &[], "--mask: this is an inpainting model (its U-Net takes 9 input channels)", 2);
    run(
        &sd1,
        &["--init-image", &init, "--padding-mask-crop", "8"],
        "--padding-mask-crop: needs --mask",
        2,
    );
    run(&sd1, &["--init-image", &init, "--mask-blur", "4"], "--mask-blur: needs --mask", 2);
    run(
        &sd1,
        &["--init-image", &init, "--mask", &mask, "--mask-blur", "-1"],
        "--mask-blur: must be a radius",
        2,
    );
    run(
        &sd1,
        &["--init-image", &init, "--outpaint", "8,8"],
        "--outpaint: expected four pixel counts",
        2,
    );
    run(
        &sd1,
        &["--init-image", &init, "--outpaint", "8,8,0,0", "--mask", &mask],
        "--outpaint: makes its own mask",
        2,
    );
    run(&sd1, &["--outpaint", "8,8,0,0"], "--outpaint: needs --init-image", 2);
}

/// `(width, height, channels, pixels)` of a PNG.
fn read_png_raw(path: &Path) -> (usize, usize, usize, Vec<u8>) {
    let png = read_png(path);
    (png.width, png.height, png.channels, png.pixels)
}
