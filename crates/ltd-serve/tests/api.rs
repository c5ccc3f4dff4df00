//! The server over HTTP, against a real `ltd-serve` process: the images are `ltd-gen`'s, byte
//! for byte (txt2img, img2img, OpenAI's endpoint); A1111's response shapes and listing
//! endpoints; model switching; bad input is a 4xx with a message naming the field, and the
//! server answers the next request; the API key.

mod support;

use serde_json::{json, Value};
use support::{b64, run_ltd_gen, sd1, to_b64, Server};

fn info(v: &Value) -> Value {
    serde_json::from_str(v["info"].as_str().expect("info is a JSON string")).unwrap()
}

#[test]
fn txt2img_and_img2img_give_ltd_gens_png_bytes() {
    let model = sd1().display().to_string();
    let server = Server::start(&["--model", &model]);
    let dir = tempfile::tempdir().unwrap();

    // txt2img, a batch of two from one seed, an A1111 sampler name with its schedule type.
    let (status, v) = server.post(
        "/sdapi/v1/txt2img",
        &json!({"prompt": "a red circle", "negative_prompt": "blue", "seed": 7, "steps": 3,
                "cfg_scale": 5.5, "batch_size": 2, "sampler_name": "DPM++ 2M",
                "scheduler": "Karras", "restore_faces": true, "unknown_field": 1}),
    );
    assert_eq!(status, 200, "{v}");
    let want = run_ltd_gen(
        dir.path(),
        &[
            "a red circle",
            "-m",
            &model,
            "-n",
            "blue",
            "--seed",
            "7",
            "--steps",
            "3",
            "-g",
            "5.5",
            "--num-images",
            "2",
            "--scheduler",
            "dpm++2m-karras",
        ],
        2,
    );
    let got: Vec<Vec<u8>> =
        v["images"].as_array().unwrap().iter().map(|s| b64(s.as_str().unwrap())).collect();
    assert_eq!(got.len(), 2);
    assert!(got == want, "the server's PNGs differ from ltd-gen's");
    let i = info(&v);
    assert_eq!(i["all_seeds"], json!([7, 7]));
    assert_eq!(i["seed"], json!(7));
    assert_eq!(i["sampler_name"], json!("DPM++ 2M"));
    assert_eq!(i["unsupported"], json!(["restore_faces"]));
    assert!(i["infotexts"][0]
        .as_str()
        .unwrap()
        .starts_with("a red circle\nNegative prompt: blue\nSteps: 3"));
    assert_eq!(v["parameters"]["prompt"], json!("a red circle"));

    // img2img from ltd-gen's first picture, by file and by base64.
    let init = dir.path().join("init.png");
    std::fs::write(&init, &want[0]).unwrap();
    let (status, v) = server.post(
        "/sdapi/v1/img2img",
        &json!({"prompt": "a cat", "seed": 3, "steps": 4, "denoising_strength": 0.5,
                "init_images": [format!("data:image/png;base64,{}", to_b64(&want[0]))]}),
    );
    assert_eq!(status, 200, "{v}");
    let want = run_ltd_gen(
        dir.path(),
        &[
            "a cat",
            "-m",
            &model,
            "--seed",
            "3",
            "--steps",
            "4",
            "--guidance",
            "7",
            "--init-image",
            init.to_str().unwrap(),
            "--strength",
            "0.5",
        ],
        1,
    );
    assert!(b64(v["images"][0].as_str().unwrap()) == want[0], "img2img PNG differs from ltd-gen's");
    assert_eq!(info(&v)["unsupported"], json!([]));

    // Inpainting: A1111's mask fields map to ltd-gen's flags (mask_blur → --mask-blur,
    // "only masked" with its padding → --padding-mask-crop, mask_invert → the inverted mask).
    let mask: Vec<u8> = (0..64 * 64)
        .flat_map(|i| {
            let (x, y) = (i % 64, i / 64);
            let v = if (16..40).contains(&x) && (8..48).contains(&y) { 255 } else { 0 };
            [v, v, v]
        })
        .collect();
    let mask_png = dir.path().join("mask.png");
    let png = |pixels: Vec<u8>| {
        ltd_cli::encode_png(&ltd_pipeline::RgbImage::new(64, 64, pixels).unwrap(), "").unwrap()
    };
    std::fs::write(&mask_png, png(mask.clone())).unwrap();
    let inverted: Vec<u8> = mask.iter().map(|v| 255 - v).collect();
    let inverted_png = dir.path().join("inverted.png");
    std::fs::write(&inverted_png, png(inverted)).unwrap();
    let (status, v) = server.post(
        "/sdapi/v1/img2img",
        &json!({"prompt": "a cat", "seed": 3, "steps": 4, "denoising_strength": 0.9,
                "init_images": [to_b64(&std::fs::read(&init).unwrap())],
                "mask": to_b64(&std::fs::read(&inverted_png).unwrap()),
                "inpainting_mask_invert": 1, "mask_blur": 2,
                "inpaint_full_res_padding": 8}),
    );
    assert_eq!(status, 200, "{v}");
    let inpainted = run_ltd_gen(
        dir.path(),
        &[
            "a cat",
            "-m",
            &model,
            "--seed",
            "3",
            "--steps",
            "4",
            "--guidance",
            "7",
            "--init-image",
            init.to_str().unwrap(),
            "--strength",
            "0.9",
            "--mask",
            mask_png.to_str().unwrap(),
            "--mask-blur",
            "2",
            "--padding-mask-crop",
            "8",
        ],
        1,
    );
    assert!(
        b64(v["images"][0].as_str().unwrap()) == inpainted[0],
        "inpainting PNG differs from ltd-gen's: {}",
        info(&v)["infotexts"][0]
    );

    // OpenAI's endpoint, with ltd-gen's defaults.
    let (status, v) = server.post(
        "/v1/images/generations",
        &json!({"prompt": "a square", "n": 1, "size": "64x64", "seed": 11, "response_format": "b64_json"}),
    );
    assert_eq!(status, 200, "{v}");
    let want = run_ltd_gen(
        dir.path(),
        &["a square", "-m", &model, "--seed", "11", "-W", "64", "-H", "64"],
        1,
    );
    assert!(b64(v["data"][0]["b64_json"].as_str().unwrap()) == want[0], "OpenAI PNG differs");
}

#[test]
fn lists_models_samplers_and_switches_models() {
    let model = sd1().display().to_string();
    let server = Server::start(&["--model", &model]);
    let (_, models) = server.get("/sdapi/v1/sd-models");
    let titles: Vec<&str> =
        models.as_array().unwrap().iter().map(|m| m["title"].as_str().unwrap()).collect();
    assert_eq!(titles[0], model);
    assert_eq!(titles.len(), 2, "the embedded default model is offered too: {titles:?}");
    let (_, samplers) = server.get("/sdapi/v1/samplers");
    assert!(samplers
        .as_array()
        .unwrap()
        .iter()
        .any(|s| s["name"] == "Euler a" && s["aliases"][0] == "euler-a"));
    let (_, schedulers) = server.get("/sdapi/v1/schedulers");
    assert_eq!(schedulers[1]["label"], "Karras");
    assert_eq!(server.get("/sdapi/v1/options").1["sd_model_checkpoint"], json!(model));

    let (status, v) = server.post("/sdapi/v1/options", &json!({"sd_model_checkpoint": titles[1]}));
    assert_eq!(status, 200, "{v}");
    assert_eq!(server.get("/sdapi/v1/options").1["sd_model_checkpoint"], json!(titles[1]));
    let (status, v) =
        server.post("/sdapi/v1/txt2img", &json!({"prompt": "x", "steps": 1, "seed": 1}));
    assert_eq!(status, 200, "{v}");
    assert_eq!(info(&v)["sd_model_name"], json!(titles[1]));
    // A per-request override switches back.
    let (status, v) = server.post(
        "/sdapi/v1/txt2img",
        &json!({"prompt": "x", "steps": 1, "override_settings": {"sd_model_checkpoint": model}}),
    );
    assert_eq!(status, 200, "{v}");
    assert_eq!(info(&v)["sd_model_name"], json!(model));
    let (status, v) = server.post("/sdapi/v1/options", &json!({"sd_model_checkpoint": "nope"}));
    assert_eq!(
        (status, v["detail"].as_str().unwrap().starts_with("sd_model_checkpoint: unknown model")),
        (422, true),
        "{v}"
    );

    let (status, page) = server.get_text("/");
    assert_eq!(status, 200);
    assert!(page.contains("/sdapi/v1/txt2img") && page.contains("<title>ltd</title>"));
    let (_, p) = server.get("/sdapi/v1/progress");
    assert_eq!(p["progress"], json!(0.0));
    assert_eq!(p["state"]["job_count"], json!(0));
}

#[test]
fn bad_input_is_a_4xx_naming_the_field_and_the_server_goes_on() {
    // The SD 1.x fixture, whose VAE scale factor is 8.
    let model = sd1().display().to_string();
    let server = Server::start(&["--model", &model, "--max-body-mib", "8"]);
    let check = |path: &str, body: Vec<u8>, status: u16, detail: &str| {
        let (got, v) = server.send_raw(path, "application/json", body, None);
        let msg =
            v["detail"].as_str().or(v["error"]["message"].as_str()).unwrap_or_default().to_string();
        assert_eq!(got, status, "{path}: {v}");
        assert!(msg.contains(detail), "{path}: expected {detail:?} in {msg:?}");
    };
    let t2i = "/sdapi/v1/txt2img";
    check(t2i, b"{\"prompt\": ".to_vec(), 400, "request body is not valid JSON");
    check(t2i, b"[1, 2]".to_vec(), 422, "expected a JSON object");
    check(t2i, br#"{"steps": "many"}"#.to_vec(), 422, "steps: invalid type: string \"many\"");
    check(
        t2i,
        br#"{"width": 60}"#.to_vec(),
        422,
        "width: 60 is not a multiple of the model's VAE scale factor 8",
    );
    check(t2i, br#"{"steps": 0}"#.to_vec(), 422, "steps: must be at least 1");
    check(
        t2i,
        br#"{"steps": 5000}"#.to_vec(),
        422,
        "steps: num_inference_steps 5000 is more than this scheduler can take (1000)",
    );
    check(t2i, br#"{"cfg_scale": -1}"#.to_vec(), 422, "cfg_scale: must be at least 0");
    check(t2i, br#"{"sampler_name": "Euler b"}"#.to_vec(), 422, "sampler_name: unknown sampler");
    check(t2i, br#"{"seed": -5}"#.to_vec(), 422, "seed: must be -1");
    check("/sdapi/v1/img2img", br#"{"steps": 2}"#.to_vec(), 422, "init_images: img2img needs");
    check(
        "/sdapi/v1/img2img",
        br#"{"init_images": ["aGVsbG8="]}"#.to_vec(),
        422,
        "init_images[0]: not a readable image",
    );
    check(
        "/v1/images/generations",
        br#"{"prompt": "a", "size": "60x64"}"#.to_vec(),
        400,
        "size: 60 is not a multiple",
    );
    check(
        "/v1/images/generations",
        br#"{"prompt": "a", "response_format": "url"}"#.to_vec(),
        400,
        "only b64_json",
    );
    check("/v1/images/generations", br#"{"n": 1}"#.to_vec(), 422, "missing field `prompt`");
    // 50 MB: refused with a message, not a reset connection.
    let mut big = b"{\"prompt\": \"".to_vec();
    big.resize(50 << 20, b'a');
    big.extend_from_slice(b"\"}");
    check(t2i, big, 413, "over the limit");
    check("/sdapi/v1/nothing", b"{}".to_vec(), 404, "no such endpoint");
    // A form or text post (which any web page can make a browser send) is refused.
    let (status, v) = server.send_raw(t2i, "text/plain", br#"{"prompt": "x"}"#.to_vec(), None);
    assert_eq!(status, 415, "{v}");
    assert!(v["detail"].as_str().unwrap().contains("Content-Type: application/json"));
    // And the server still works.
    let (status, v) = server.post(t2i, &json!({"prompt": "still here", "steps": 1}));
    assert_eq!(status, 200, "{v}");
    assert_eq!(v["images"].as_array().unwrap().len(), 1);
}

#[test]
fn the_api_key_is_required_when_set() {
    let server = Server::start(&["--api-key", "s3cret"]);
    let body = br#"{"prompt": "x", "steps": 1}"#.to_vec();
    let t2i = "/sdapi/v1/txt2img";
    assert_eq!(server.send_raw(t2i, "application/json", body.clone(), None).0, 401);
    assert_eq!(server.send_raw(t2i, "application/json", body.clone(), Some("Bearer nope")).0, 401);
    assert_eq!(
        server.send_raw(t2i, "application/json", body.clone(), Some("Bearer s3cret")).0,
        200
    );
    let basic = format!("Basic {}", to_b64(b"anyone:s3cret"));
    assert_eq!(server.send_raw(t2i, "application/json", body, Some(&basic)).0, 200);
    assert_eq!(server.get("/sdapi/v1/options").0, 401);
}
