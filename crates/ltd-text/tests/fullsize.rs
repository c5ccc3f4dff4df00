//! The tensors our modules request for the full-size SD 1.5, SD 2.1 and SDXL text-encoder
//! configs equal, name for name and shape for shape, the state dicts of the reference models
//! (`tests/fixtures/fullsize/*/text_encoder*.txt`): real checkpoints load, without downloading
//! them.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

use candle_core::DType;
use ltd_nn::{load_config, record_shapes, RuntimeOptions};
use ltd_text::{CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection, ClipTextParams};

fn root() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../..")
}

/// `name<TAB>d0,d1,...` lines.
fn golden(rel: &str) -> BTreeMap<String, Vec<usize>> {
    let text = std::fs::read_to_string(root().join("tests/fixtures/fullsize").join(rel)).unwrap();
    text.lines()
        .filter(|l| !l.is_empty())
        .map(|l| {
            let (name, dims) = l.split_once('\t').unwrap();
            (name.to_string(), dims.split(',').map(|d| d.parse().unwrap()).collect())
        })
        .collect()
}

fn check(config: &str, golden_list: &str, projection: bool) {
    let params: ClipTextParams =
        load_config::<CLIPTextConfig, ClipTextParams>(&root().join("configs").join(config))
            .unwrap();
    let rt = RuntimeOptions::default();
    let shapes = if projection {
        record_shapes(DType::F16, |vb| CLIPTextModelWithProjection::new(vb, &params, &rt))
            .unwrap()
            .1
    } else {
        record_shapes(DType::F16, |vb| CLIPTextModel::new(vb, &params, &rt)).unwrap().1
    };
    let want = golden(golden_list);
    let missing: Vec<_> = want.keys().filter(|k| !shapes.contains_key(*k)).collect();
    let extra: Vec<_> = shapes.keys().filter(|k| !want.contains_key(*k)).collect();
    let mis_shaped: Vec<_> =
        want.iter().filter(|(k, v)| shapes.get(*k).is_some_and(|s| s != *v)).collect();
    assert!(
        missing.is_empty() && extra.is_empty() && mis_shaped.is_empty(),
        "{config}: missing {missing:?}, extra {extra:?}, mis-shaped {mis_shaped:?}"
    );
    assert_eq!(shapes, want);
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
