//! The full-size SD 1.5, SD 2.1 and SDXL U-Nets, built from their official configs without
//! weights, request exactly the tensors (names and shapes) of the reference models' state dicts
//! (`tests/fixtures/fullsize/*/unet.txt`): real checkpoints load, with nothing missing or unused.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

use candle_core::DType;
use ltd_nn::RuntimeOptions;
use ltd_unet::{UNet2DConditionModel, UNet2DConditionModelConfig, UNetConfig};

fn repo() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../..")
}

fn golden(path: &Path) -> BTreeMap<String, Vec<usize>> {
    std::fs::read_to_string(path)
        .unwrap()
        .lines()
        .map(|line| {
            let (name, dims) = line.split_once('\t').unwrap();
            let dims = dims.split(',').filter(|d| !d.is_empty()).map(|d| d.parse().unwrap());
            (name.to_string(), dims.collect())
        })
        .collect()
}

fn check(short: &str, config_dir: &str) {
    let config = repo().join("configs").join(config_dir).join("unet/config.json");
    let cfg: UNetConfig =
        ltd_nn::load_config::<UNet2DConditionModelConfig, UNetConfig>(&config).unwrap();
    let (_, ours) = ltd_nn::record_shapes(DType::F32, |vb| {
        UNet2DConditionModel::new(vb, &cfg, &RuntimeOptions::default())
    })
    .unwrap();
    let expected = golden(&repo().join(format!("tests/fixtures/fullsize/{short}/unet.txt")));
    let missing: Vec<_> = expected.keys().filter(|k| !ours.contains_key(*k)).collect();
    let extra: Vec<_> = ours.keys().filter(|k| !expected.contains_key(*k)).collect();
    let mis_shaped: Vec<_> = expected
        .iter()
        .filter_map(|(k, s)| ours.get(k).filter(|o| *o != s).map(|o| (k, s, o)))
        .collect();
    assert!(
        missing.is_empty() && extra.is_empty() && mis_shaped.is_empty(),
        "{short}: {} missing {missing:?}\n{} extra {extra:?}\nmis-shaped (name, reference, ours) \
         {mis_shaped:?}",
        missing.len(),
        extra.len()
    );
    assert_eq!(ours.len(), expected.len());
}

#[test]
fn sd15_unet_requests_the_reference_tensors() {
    check("sd15", "stable-diffusion-v1-5");
}

#[test]
fn sd21_unet_requests_the_reference_tensors() {
    check("sd21", "stable-diffusion-2-1");
}

#[test]
fn sdxl_unet_requests_the_reference_tensors() {
    check("sdxl", "stable-diffusion-xl-base-1.0");
}
