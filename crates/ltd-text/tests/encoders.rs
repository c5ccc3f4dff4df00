//! Text-encoder parity with transformers on the tiny fixtures (goldens written by
//! `tests/fixtures/gen/text.py`, computed in float32 from the files on disk).

use std::collections::HashMap;
use std::path::Path;
use std::sync::Arc;

use candle_core::{DType, Device, Tensor};
use ltd_nn::weights::component_weights;
use ltd_nn::{load_checked, load_config, RuntimeOptions, SafetensorsFiles};
use ltd_test_support::{copy_dir, fixtures, max_abs_diff};
use ltd_text::{
    attention_mask_tensor, ids_tensor, CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection,
    CLIPTokenizer, ClipLayer, ClipTextParams, Pooling, T5EncoderModel, T5Tokenizer,
};

/// f32 parity bound for every output (COMMON.md).
const TOL_F32: f32 = 1e-4;
/// Bounds for weights and activations in half precision, against the f32 goldens (values are
/// O(1); f16 keeps ~3 decimal digits, bf16 ~2). Measured maxima are printed by the tests.
const TOL_F16: f32 = 1e-2;
const TOL_BF16: f32 = 8e-2;

fn golden(name: &str) -> HashMap<String, Tensor> {
    candle_core::safetensors::load(fixtures().join("golden/text").join(name), &Device::Cpu).unwrap()
}

/// Compares named outputs with the golden tensors; returns the largest error.
fn compare(what: &str, got: &[(&str, Tensor)], want: &HashMap<String, Tensor>, tol: f32) -> f32 {
    let mut worst = 0f32;
    for (name, t) in got {
        let err = max_abs_diff(t, &want[*name]);
        println!("{what}: {name}: max |Δ| = {err:.3e} (bound {tol:.0e})");
        assert!(err <= tol, "{what}: {name}: max |Δ| = {err} > {tol}");
        worst = worst.max(err);
    }
    worst
}

const RT: RuntimeOptions = RuntimeOptions {
    attention: ltd_nn::attention::AttentionOptions {
        implementation: ltd_nn::attention::AttentionImpl::Auto,
        max_score_bytes: 256 << 20,
    },
};

/// The id of `a</w>` in the CLIP vocabulary.
const A_ID: u32 = 320;

struct ClipCase {
    golden: &'static str,
    folder: &'static str,
    projection: bool,
}

const CLIP_CASES: [ClipCase; 4] = [
    ClipCase {
        golden: "clip_sd1.safetensors",
        folder: "pipelines/sd1/text_encoder",
        projection: false,
    },
    ClipCase {
        golden: "clip_sd2.safetensors",
        folder: "pipelines/sd2/text_encoder",
        projection: false,
    },
    ClipCase {
        golden: "clip_sdxl_te1.safetensors",
        folder: "pipelines/sdxl/text_encoder",
        projection: false,
    },
    ClipCase {
        golden: "clip_sdxl_te2.safetensors",
        folder: "pipelines/sdxl/text_encoder_2",
        projection: true,
    },
];

/// Loads a CLIP folder with the `pooling` rule replaced (to test the other transformers rule).
fn load_clip_with(case: &ClipCase, dtype: DType, pooling: Option<Pooling>) -> CLIPTextModel {
    let dir = fixtures().join(case.folder);
    let mut params: ClipTextParams =
        load_config::<CLIPTextConfig, ClipTextParams>(&dir.join("config.json")).unwrap();
    if let Some(p) = pooling {
        params.pooling = p;
    }
    let files = Arc::new(
        SafetensorsFiles::open(&component_weights(&dir, &["model"], None).unwrap()).unwrap(),
    );
    let prefixed = case.projection;
    load_checked(files, dtype, &Device::Cpu, |vb| {
        if prefixed {
            Ok(CLIPTextModelWithProjection::new(vb, &params, &RT)?.text_model().clone())
        } else {
            CLIPTextModel::new(vb, &params, &RT)
        }
    })
    .unwrap()
}

fn check_clip(case: &ClipCase, dtype: DType, tol: f32) -> f32 {
    let want = golden(case.golden);
    let ids = &want["input_ids"];
    let dir = fixtures().join(case.folder);
    let what = format!("{} {dtype:?}", case.golden);
    let (model, text_embeds) = if case.projection {
        let m =
            CLIPTextModelWithProjection::from_folder(&dir, None, dtype, &Device::Cpu, &RT).unwrap();
        let out = m.encode(ids, ClipLayer::Last).unwrap();
        (m.text_model().clone(), out.text_embeds)
    } else {
        (CLIPTextModel::from_folder(&dir, None, dtype, &Device::Cpu, &RT).unwrap(), None)
    };
    assert_eq!(model.dtype(), dtype);
    let last = model.encode(ids, ClipLayer::Last, true).unwrap();
    let hidden = |layer| model.encode(ids, layer, false).unwrap().hidden;
    let mut got = vec![
        ("last_hidden_state", last.hidden.clone()),
        ("pooled", last.pooled.clone().unwrap()),
        ("hidden_states_1", hidden(ClipLayer::Hidden(1))),
        ("hidden_states_penultimate", hidden(ClipLayer::stable_diffusion_xl(None))),
        ("clip_skip_2", hidden(ClipLayer::stable_diffusion(Some(2)))),
    ];
    if let Some(t) = text_embeds {
        got.push(("text_embeds", t));
    }
    // The golden pools at the first `a</w>` (id 320) under the `eos_token_id != 2` rule.
    let first = load_clip_with(case, dtype, Some(Pooling::FirstId(A_ID)));
    got.push((
        "pooled_eos_first",
        first.encode(ids, ClipLayer::Last, true).unwrap().pooled.unwrap(),
    ));
    assert!(
        max_abs_diff(&want["pooled"], &want["pooled_eos_first"]) > 1e-2,
        "the batch must tell the two pooling rules apart"
    );
    compare(&what, &got, &want, tol)
}

#[test]
fn clip_text_encoders_match_transformers_f32() {
    for case in &CLIP_CASES {
        check_clip(case, DType::F32, TOL_F32);
    }
}

#[test]
fn clip_text_encoders_match_transformers_f16_bf16() {
    for case in &CLIP_CASES {
        check_clip(case, DType::F16, TOL_F16);
        check_clip(case, DType::BF16, TOL_BF16);
    }
}

#[test]
fn clip_layers_are_consistent() {
    let case = &CLIP_CASES[0];
    let want = golden(case.golden);
    let ids = &want["input_ids"];
    let model = CLIPTextModel::from_folder(
        &fixtures().join(case.folder),
        None,
        DType::F32,
        &Device::Cpu,
        &RT,
    )
    .unwrap();
    let n = model.params().num_hidden_layers;
    let all = model.hidden_states(ids, n).unwrap();
    assert_eq!(all.len(), n + 1);
    // Stopping early gives the same states; the last entry before the final LN is -1.
    let shallow = model.encode(ids, ClipLayer::Hidden(2), false).unwrap();
    assert_eq!(max_abs_diff(&shallow.hidden, &all[2]), 0.0);
    assert!(shallow.pooled.is_none());
    let minus1 = model.encode(ids, ClipLayer::Hidden(-1), false).unwrap().hidden;
    assert_eq!(max_abs_diff(&minus1, &all[n]), 0.0);
    // clip_skip = 0 in SD is the last hidden state.
    let skip0 = model.encode(ids, ClipLayer::stable_diffusion(Some(0)), false).unwrap().hidden;
    assert!(max_abs_diff(&skip0, &want["last_hidden_state"]) <= TOL_F32);
    for bad in [ClipLayer::Hidden(n as isize + 1), ClipLayer::HiddenNormed(-(n as isize) - 2)] {
        let err = model.encode(ids, bad, false).unwrap_err().to_string();
        assert!(err.contains("does not exist"), "{err}");
    }
    let tok = CLIPTokenizer::from_folder(&fixtures().join("pipelines/sd1/tokenizer")).unwrap();
    assert_eq!(tok.token_to_id("a</w>"), Some(A_ID));
    let too_long = Tensor::zeros((1, 78), DType::U32, &Device::Cpu).unwrap();
    let err = model.forward(&too_long).unwrap_err().to_string();
    assert!(err.contains("max_position_embeddings"), "{err}");
}

/// SDXL's `encode_prompt` end to end: both tokenizers, both encoders, penultimate layers
/// concatenated, pooled = the second encoder's `text_embeds`.
#[test]
fn sdxl_encode_prompt_matches_diffusers() {
    let want = golden("sdxl_encode_prompt.safetensors");
    let prompt =
        "an astronaut riding a horse, <|endoftext|> and some words after the literal end token";
    let root = fixtures().join("pipelines/sdxl");
    let dev = Device::Cpu;
    let ids = |folder: &str| {
        let tok = CLIPTokenizer::from_folder(&root.join(folder)).unwrap();
        ids_tensor(&[tok.encode(prompt).unwrap()], &dev).unwrap()
    };
    let te1 = CLIPTextModel::from_folder(&root.join("text_encoder"), None, DType::F32, &dev, &RT)
        .unwrap();
    let te2 = CLIPTextModelWithProjection::from_folder(
        &root.join("text_encoder_2"),
        None,
        DType::F32,
        &dev,
        &RT,
    )
    .unwrap();
    let (ids1, ids2) = (ids("tokenizer"), ids("tokenizer_2"));
    let mut got = Vec::new();
    for (tag, skip) in [("default", None), ("clip_skip_1", Some(1))] {
        let layer = ClipLayer::stable_diffusion_xl(skip);
        let a = te1.encode(&ids1, layer, false).unwrap().hidden;
        let b = te2.encode(&ids2, layer).unwrap();
        let embeds = Tensor::cat(&[a, b.hidden], 2).unwrap();
        got.push((format!("prompt_embeds_{tag}"), embeds));
        got.push((format!("pooled_prompt_embeds_{tag}"), b.text_embeds.unwrap()));
    }
    let got: Vec<(&str, Tensor)> = got.iter().map(|(k, v)| (k.as_str(), v.clone())).collect();
    compare("sdxl encode_prompt", &got, &want, TOL_F32);
}

fn check_t5(name: &str, dtype: DType, tol: f32) {
    let want = golden(&format!("t5_{name}.safetensors"));
    let dev = Device::Cpu;
    // Our tokenizer gives the golden ids and mask.
    let tok = T5Tokenizer::from_folder(&fixtures().join("t5/tokenizer")).unwrap();
    let prompts = [
        "an astronaut riding a horse, <|endoftext|> and some words after the literal end token",
        "",
        "a red circle on a blue background!",
    ];
    let enc: Vec<_> = prompts.iter().map(|p| tok.encode(p, None).unwrap()).collect();
    let ids = ids_tensor(&enc, &dev).unwrap();
    let mask = attention_mask_tensor(&enc, &dev).unwrap();
    assert_eq!(max_abs_diff(&ids, &want["input_ids"]), 0.0);
    assert_eq!(max_abs_diff(&mask, &want["attention_mask"]), 0.0);

    let model =
        T5EncoderModel::from_folder(&fixtures().join("t5").join(name), None, dtype, &dev, &RT)
            .unwrap();
    let got = [
        ("last_hidden_state_masked", model.forward(&ids, Some(&mask)).unwrap()),
        ("last_hidden_state_unmasked", model.forward(&ids, None).unwrap()),
        ("long_last_hidden_state", model.forward(&want["long_input_ids"], None).unwrap()),
    ];
    for (_, t) in &got {
        assert_eq!(t.dtype(), dtype);
    }
    compare(&format!("t5 {name} {dtype:?}"), &got, &want, tol);
}

#[test]
fn t5_encoders_match_transformers_f32() {
    check_t5("text_encoder", DType::F32, TOL_F32);
    check_t5("text_encoder_relu", DType::F32, TOL_F32);
}

#[test]
fn t5_encoders_match_transformers_f16_bf16() {
    for name in ["text_encoder", "text_encoder_relu"] {
        check_t5(name, DType::F16, TOL_F16);
        check_t5(name, DType::BF16, TOL_BF16);
    }
}

#[test]
fn encoder_errors_name_file_and_field() {
    let src = fixtures().join("pipelines/sd1/text_encoder");
    let dev = Device::Cpu;
    let load = |dir: &Path| {
        CLIPTextModel::from_folder(dir, None, DType::F32, &dev, &RT).unwrap_err().to_string()
    };
    let tmp = tempfile::tempdir().unwrap();
    copy_dir(&src, tmp.path());
    let config = std::fs::read_to_string(src.join("config.json")).unwrap();

    let edit = |from: &str, to: &str| {
        assert!(config.contains(from));
        std::fs::write(tmp.path().join("config.json"), config.replace(from, to)).unwrap();
    };
    edit(r#""hidden_act": "quick_gelu""#, r#""hidden_act": "gelu_fast""#);
    let err = load(tmp.path());
    assert!(
        err.contains("config.json") && err.contains("hidden_act") && err.contains("gelu_fast"),
        "{err}"
    );

    edit(r#""hidden_size": 32"#, r#""hidden_size": "32""#);
    let err = load(tmp.path());
    assert!(err.contains("config.json") && err.contains("hidden_size"), "{err}");

    edit(r#""num_attention_heads": 4"#, r#""num_attention_heads": 5"#);
    let err = load(tmp.path());
    assert!(err.contains("config.json") && err.contains("num_attention_heads"), "{err}");

    // One layer more than the checkpoint holds: its tensors are reported missing, with the file.
    edit(r#""num_hidden_layers": 5"#, r#""num_hidden_layers": 6"#);
    let err = load(tmp.path());
    assert!(
        err.contains("model.safetensors")
            && err.contains("missing")
            && err.contains("16 missing tensor(s): encoder.layers.5.self_attn.q_proj.weight"),
        "{err}"
    );

    std::fs::remove_file(tmp.path().join("model.safetensors")).unwrap();
    let err = load(tmp.path());
    assert!(err.contains("no weights found") && err.contains("model.safetensors"), "{err}");

    let t5 = tempfile::tempdir().unwrap();
    copy_dir(&fixtures().join("t5/text_encoder"), t5.path());
    let config = std::fs::read_to_string(t5.path().join("config.json")).unwrap();
    std::fs::write(
        t5.path().join("config.json"),
        config.replace(r#""gated-gelu""#, r#""gated-gelu-x""#),
    )
    .unwrap();
    let err = T5EncoderModel::from_folder(t5.path(), None, DType::F32, &dev, &RT)
        .unwrap_err()
        .to_string();
    assert!(err.contains("config.json") && err.contains("feed_forward_proj"), "{err}");
}

/// Checkpoints written by transformers 4.x (every official SD repo) prefix CLIPTextModel keys
/// with `text_model.`; T5 checkpoints may hold the embedding only as
/// `encoder.embed_tokens.weight`. Both load.
#[test]
fn legacy_key_layouts_load() {
    let dev = Device::Cpu;
    let tmp = tempfile::tempdir().unwrap();
    let src = fixtures().join("pipelines/sd1/text_encoder");
    std::fs::copy(src.join("config.json"), tmp.path().join("config.json")).unwrap();
    let tensors = candle_core::safetensors::load(src.join("model.safetensors"), &dev).unwrap();
    let renamed: HashMap<String, Tensor> =
        tensors.into_iter().map(|(k, v)| (format!("text_model.{k}"), v)).collect();
    candle_core::safetensors::save(&renamed, tmp.path().join("model.safetensors")).unwrap();
    let want = golden("clip_sd1.safetensors");
    let model = CLIPTextModel::from_folder(tmp.path(), None, DType::F32, &dev, &RT).unwrap();
    let got = [("last_hidden_state", model.forward(&want["input_ids"]).unwrap())];
    compare("sd1 with text_model. prefix", &got, &want, TOL_F32);

    let tmp = tempfile::tempdir().unwrap();
    let src = fixtures().join("t5/text_encoder");
    std::fs::copy(src.join("config.json"), tmp.path().join("config.json")).unwrap();
    let mut tensors = candle_core::safetensors::load(src.join("model.safetensors"), &dev).unwrap();
    let shared = tensors.remove("shared.weight").unwrap();
    tensors.insert("encoder.embed_tokens.weight".into(), shared);
    candle_core::safetensors::save(&tensors, tmp.path().join("model.safetensors")).unwrap();
    let want = golden("t5_text_encoder.safetensors");
    let model = T5EncoderModel::from_folder(tmp.path(), None, DType::F32, &dev, &RT).unwrap();
    let got = [("long_last_hidden_state", model.forward(&want["long_input_ids"], None).unwrap())];
    compare("t5 with encoder.embed_tokens", &got, &want, TOL_F32);
}
