//! The tensors our modules request for the full-size SD 1.5, SD 2.1 and SDXL text-encoder
//! configs equal, name for name and shape for shape, the state dicts of the reference models
//! (`tests/fixtures/fullsize/*/text_encoder*.txt`): real checkpoints load, without downloading
//! them.

use candle_core::DType;
use ltd_nn::{load_config, record_shapes, RuntimeOptions};
use ltd_test_support::{assert_same_shapes, fixtures, read_shapes, workspace_root};
use ltd_text::{CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection, ClipTextParams};

fn check(config: &str, golden_list: &str, projection: bool) {
    let params: ClipTextParams = load_config::<CLIPTextConfig, ClipTextParams>(
        &workspace_root().join("configs").join(config),
    )
    .unwrap();
    let rt = RuntimeOptions::default();
    let shapes = if projection {
        record_shapes(DType::F16, |vb| CLIPTextModelWithProjection::new(vb, &params, &rt))
            .unwrap()
            .1
    } else {
        record_shapes(DType::F16, |vb| CLIPTextModel::new(vb, &params, &rt)).unwrap().1
    };
    let want = read_shapes(&fixtures().join("fullsize").join(golden_list));
    assert_same_shapes(config, &shapes, &want);
}

#[test]
fn sd15_text_encoder() {
    check("stable-diffusion-v1-5/text_encoder/config.json", "sd15/text_encoder.txt", false);
}

#[test]
fn sd21_text_encoder() {
    check("stable-diffusion-2-1/text_encoder/config.json", "sd21/text_encoder.txt", false);
}

#[test]
fn sdxl_text_encoders() {
    check("stable-diffusion-xl-base-1.0/text_encoder/config.json", "sdxl/text_encoder.txt", false);
    check(
        "stable-diffusion-xl-base-1.0/text_encoder_2/config.json",
        "sdxl/text_encoder_2.txt",
        true,
    );
}
