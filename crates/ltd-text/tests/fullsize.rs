//! The tensors our modules request for the full-size SD 1.5, SD 2.1 and SDXL text-encoder
//! configs (CLIP) and DeepFloyd IF's (T5-XXL, google/t5-v1_1-xxl's encoder) equal, name for name
//! and shape for shape, the state dicts of the reference models
//! (`tests/fixtures/fullsize/*/text_encoder*.txt`): real checkpoints load, without downloading
//! them.

use candle_core::DType;
use ltd_nn::{load_config, record_shapes, RuntimeOptions};
use ltd_test_support::{assert_same_shapes, fixtures, read_shapes, workspace_root};
use ltd_text::{
    CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection, ClipTextParams, T5Config,
    T5EncoderModel, T5Params,
};

/// The class a config's model_index.json entry names.
enum Encoder {
    Clip,
    ClipWithProjection,
    T5,
}

fn check(config: &str, golden_list: &str, encoder: Encoder) {
    let path = workspace_root().join("configs").join(config);
    let rt = RuntimeOptions::default();
    let shapes = match encoder {
        Encoder::Clip | Encoder::ClipWithProjection => {
            let params = load_config::<CLIPTextConfig, ClipTextParams>(&path).unwrap();
            if matches!(encoder, Encoder::ClipWithProjection) {
                record_shapes(DType::F16, |vb| CLIPTextModelWithProjection::new(vb, &params, &rt))
                    .unwrap()
                    .1
            } else {
                record_shapes(DType::F16, |vb| CLIPTextModel::new(vb, &params, &rt)).unwrap().1
            }
        }
        Encoder::T5 => {
            let params = load_config::<T5Config, T5Params>(&path).unwrap();
            record_shapes(DType::F16, |vb| T5EncoderModel::new(vb, &params, &rt)).unwrap().1
        }
    };
    let want = read_shapes(&fixtures().join("fullsize").join(golden_list));
    assert_same_shapes(config, &shapes, &want);
}

#[test]
fn sd15_text_encoder() {
    check("stable-diffusion-v1-5/text_encoder/config.json", "sd15/text_encoder.txt", Encoder::Clip);
}

#[test]
fn sd21_text_encoder() {
    check("stable-diffusion-2-1/text_encoder/config.json", "sd21/text_encoder.txt", Encoder::Clip);
}

#[test]
fn sdxl_text_encoders() {
    check(
        "stable-diffusion-xl-base-1.0/text_encoder/config.json",
        "sdxl/text_encoder.txt",
        Encoder::Clip,
    );
    check(
        "stable-diffusion-xl-base-1.0/text_encoder_2/config.json",
        "sdxl/text_encoder_2.txt",
        Encoder::ClipWithProjection,
    );
}

#[test]
fn if_t5_xxl_text_encoder() {
    check("IF-I-XL-v1.0/text_encoder/config.json", "if-i-xl/text_encoder.txt", Encoder::T5);
}
