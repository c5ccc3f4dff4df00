//! Hires fix is exactly its documented stages: text-to-image at the base size, the upscale
//! (bilinear latents, or decode → Lanczos → encode), then image-to-image at the large size.
//! Each check runs the stages by hand through the library and compares; the latent upscale
//! by hand is an independent nested-loop port of PyTorch's bilinear `F.interpolate`, and the
//! checks are shown to notice a wrong upscale (nearest-neighbour) or a second pass that does
//! not start from the first.

use ltd_test_support::psnr_u8;
use std::path::{Path, PathBuf};

use candle_core::{Device, Tensor};
use ltd_pipeline::hires::lanczos_resize;
use ltd_pipeline::{
    GenerateRequest, HiresFix, HiresUpscaler, InitImage, LoadOptions, Pipeline, SamplerKind,
};

fn fixtures() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../../tests/fixtures")
}

fn sd1() -> Pipeline {
    Pipeline::load_folder(&fixtures().join("pipelines/sd1"), &LoadOptions::default()).unwrap()
}

fn request() -> GenerateRequest {
    GenerateRequest {
        prompts: vec!["a red circle on a blue background".into()],
        steps: 4,
        seed: 5,
        scheduler: Some(SamplerKind::EulerAncestral),
        ..Default::default()
    }
}

/// `[N, C, h, w]` resized ×`k` by `interpolate(mode)`, written out loop by loop: "bilinear"
/// as PyTorch (`align_corners=False`: source `max((o + ½)/k − ½, 0)`, last index clamped),
/// or "nearest".
fn upscale_by_hand(x: &Tensor, k: usize, bilinear: bool) -> Tensor {
    let (n, c, h, w) = x.dims4().unwrap();
    let flat = x.flatten_all().unwrap().to_vec1::<f32>().unwrap();
    let (oh, ow) = (h * k, w * k);
    let mut out = vec![0f32; n * c * oh * ow];
    let src = |o: usize, len: usize| {
        let s = ((o as f32 + 0.5) / k as f32 - 0.5).max(0.0);
        let i0 = s.floor() as usize;
        (i0.min(len - 1), (i0 + 1).min(len - 1), s - i0 as f32)
    };
    for p in 0..n * c {
        let plane = &flat[p * h * w..(p + 1) * h * w];
        for y in 0..oh {
            for xo in 0..ow {
                out[(p * oh + y) * ow + xo] = if bilinear {
                    let (y0, y1, ly) = src(y, h);
                    let (x0, x1, lx) = src(xo, w);
                    let top = (1.0 - lx) * plane[y0 * w + x0] + lx * plane[y0 * w + x1];
                    let bottom = (1.0 - lx) * plane[y1 * w + x0] + lx * plane[y1 * w + x1];
                    (1.0 - ly) * top + ly * bottom
                } else {
                    plane[(y / k) * w + xo / k]
                };
            }
        }
    }
    Tensor::from_vec(out, (n, c, oh, ow), &Device::Cpu).unwrap()
}

#[test]
fn latent_hires_fix_is_txt2img_bilinear_upscale_img2img() {
    let pipe = sd1();
    let req = request();
    let hires =
        HiresFix { scale: 2.0, steps: Some(5), strength: 0.6, upscaler: HiresUpscaler::Latent };
    let out = pipe.generate_hires(&req, &hires, &mut |_| {}).unwrap();
    let img = &out.images[0];
    assert_eq!((img.image.width, img.image.height), (128, 128));
    // The recorded parameters are the first pass's, with A1111's hires entries.
    let info = img.params.to_infotext();
    for want in [
        "Steps: 4,",
        "Size: 64x64",
        "Denoising strength: 0.6",
        "Hires upscale: 2",
        "Hires steps: 5",
        "Hires upscaler: Latent",
    ] {
        assert!(info.contains(want), "{want:?} not in {info}");
    }

    // By hand: the first pass, the upscale, the second pass from those latents.
    let first = pipe.generate(&req, &mut |_| {}).unwrap();
    let second_req = GenerateRequest { steps: 5, ..req.clone() };
    let by_hand = |latents: &Tensor| {
        let g = pipe.generate_from_latents(&second_req, latents, 0.6, &mut |_| {}).unwrap();
        g.images[0].image.pixels.clone()
    };
    let bilinear = by_hand(&upscale_by_hand(&first.latents, 2, true));
    let db = psnr_u8(&img.image.pixels, &bilinear);
    assert!(db >= 60.0, "hires fix vs the stages by hand: {db:.1} dB");
    let diff = (out.latents.clone()
        - pipe
            .generate_from_latents(
                &second_req,
                &upscale_by_hand(&first.latents, 2, true),
                0.6,
                &mut |_| {},
            )
            .unwrap()
            .latents)
        .unwrap()
        .abs()
        .unwrap()
        .max_all()
        .unwrap()
        .to_scalar::<f32>()
        .unwrap();
    assert!(diff < 1e-3, "final latents differ by {diff}");

    // The comparison notices a wrong upscale, and a second pass not started from the first.
    let nearest = by_hand(&upscale_by_hand(&first.latents, 2, false));
    let other_first = pipe
        .generate(
            &GenerateRequest { prompts: vec!["a green square".into()], ..req.clone() },
            &mut |_| {},
        )
        .unwrap();
    let unrelated = by_hand(&upscale_by_hand(&other_first.latents, 2, true));
    for (what, pixels) in [("nearest upscale", nearest), ("another first pass", unrelated)] {
        let db = psnr_u8(&img.image.pixels, &pixels);
        assert!(db < 40.0, "{what} would pass unnoticed: {db:.1} dB");
    }
}

#[test]
fn lanczos_hires_fix_is_decode_resize_img2img() {
    let pipe = sd1();
    let req = GenerateRequest { num_images: 2, ..request() };
    let hires =
        HiresFix { scale: 1.5, steps: None, strength: 0.5, upscaler: HiresUpscaler::Lanczos };
    let out = pipe.generate_hires(&req, &hires, &mut |_| {}).unwrap();
    assert_eq!(out.images.len(), 2);
    let first = pipe.generate(&req, &mut |_| {}).unwrap();
    for (k, img) in out.images.iter().enumerate() {
        assert_eq!((img.image.width, img.image.height), (96, 96));
        assert!(img.params.to_infotext().contains("Hires upscaler: Lanczos"));
        // By hand: this image's first pass, resized, through ordinary image-to-image with its
        // recorded seed.
        let resized = lanczos_resize(&first.images[k].image, 96, 96).unwrap();
        let alone = GenerateRequest {
            num_images: 1,
            seed: img.params.seed,
            init_image: Some(InitImage { image: resized, strength: 0.5 }),
            ..request()
        };
        let by_hand = pipe.generate(&alone, &mut |_| {}).unwrap();
        assert_eq!(img.image.pixels, by_hand.images[0].image.pixels, "image {k}");
    }
}

fn read_rgb(path: &Path) -> ltd_pipeline::RgbImage {
    let (w, h, pixels, _) = ltd_test_support::read_png_rgb(path);
    ltd_pipeline::RgbImage::new(w, h, pixels).unwrap()
}

#[test]
fn upscalers_match_pil_lanczos_and_torch_bilinear() {
    let golden = fixtures().join("golden/hires");
    let src = read_rgb(&fixtures().join("golden/e2e/init.png"));
    for (w, h) in [(128, 128), (96, 96), (112, 80), (40, 48)] {
        let want = read_rgb(&golden.join(format!("lanczos-{w}x{h}.png")));
        let got = lanczos_resize(&src, w, h).unwrap();
        // PIL computes in 22-bit fixed point, we in f64: a rounding step apart at most.
        let worst = got.pixels.iter().zip(&want.pixels).map(|(a, b)| a.abs_diff(*b)).max();
        assert!(worst <= Some(1), "{w}x{h}: PIL differs by {worst:?}");
    }
    let t =
        candle_core::safetensors::load(golden.join("bilinear.safetensors"), &Device::Cpu).unwrap();
    for (h, w) in [(16, 16), (12, 12), (20, 13), (32, 32)] {
        let got = ltd_pipeline::hires::upscale_latents(&t["input"], h, w).unwrap();
        let diff = (got - &t[&format!("out_{h}x{w}")])
            .unwrap()
            .abs()
            .unwrap()
            .max_all()
            .unwrap()
            .to_scalar::<f32>()
            .unwrap();
        assert!(diff < 1e-5, "{h}x{w}: torch differs by {diff}");
    }
}
