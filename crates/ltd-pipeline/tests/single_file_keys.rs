//! The key map against full-size checkpoints: the original-layout key and shape lists of SD 1.5,
//! 2.1 and XL (`golden/single_file/fullsize/`, converted by generate.py from the diffusers
//! name lists of `fullsize/`, with the buffers real checkpoints carry) map completely onto the
//! tensors our models ask for: no key unused, none missing, every shape right.

use std::collections::{BTreeMap, BTreeSet};
use std::path::Path;

use ltd_pipeline::single_file::{component_specs, infer_family, Family};
use ltd_pipeline::{ModelIndex, PipelineKind};
use ltd_test_support::{assert_same_shapes, fixtures, read_shapes, workspace_root};

/// What diffusers drops on purpose from a full-size checkpoint of each model.
fn expected_ignored(model: &str, keys: &BTreeMap<String, Vec<usize>>) -> BTreeSet<String> {
    match model {
        "sd15" => {
            ["cond_stage_model.transformer.text_model.embeddings.position_ids".to_string()].into()
        }
        // SD 2.x: OpenCLIP's 24th layer (diffusers' config has 23), its text projection and
        // logit scale: diffusers' SD_2_TEXT_ENCODER_KEYS_TO_IGNORE.
        "sd21" => keys
            .keys()
            .filter(|k| {
                k.starts_with("cond_stage_model.model.transformer.resblocks.23.")
                    || k.ends_with("text_projection")
                    || k.ends_with("logit_scale")
            })
            .cloned()
            .collect(),
        _ => BTreeSet::new(),
    }
}

fn check(model: &str, repo: &str, kind: PipelineKind) {
    let keys = read_shapes(&fixtures().join(format!("golden/single_file/fullsize/{model}.txt")));
    let config = workspace_root().join("configs").join(repo);
    let index = ModelIndex::read(&config.join("model_index.json")).unwrap();
    assert_eq!(index.kind, kind);
    let names: Vec<&str> = keys.keys().map(String::as_str).collect();
    let specs = component_specs(&config, kind, &names, Path::new(model)).unwrap();
    let mut claimed = BTreeSet::new();
    let mut ignored = BTreeSet::new();
    for (component, spec) in &specs {
        let map = spec.map(keys.iter().map(|(k, v)| (k.as_str(), v.as_slice())));
        assert!(map.unknown.is_empty(), "{model}/{component}: unmapped keys {:?}", map.unknown);
        let mut ours: BTreeMap<String, Vec<usize>> = BTreeMap::new();
        for (name, alias) in &map.aliases {
            assert!(ours.insert(name.clone(), alias.shape.clone()).is_none(), "{name} twice");
            let source = &keys[&alias.source];
            let elements: usize = source.iter().product();
            let rows = alias.rows.map_or(1.0, |(a, b)| (b - a) as f64 / source[0] as f64);
            let wanted: usize = alias.shape.iter().product();
            assert_eq!(wanted as f64, elements as f64 * rows, "{name} from {}", alias.source);
            claimed.insert(alias.source.clone());
        }
        ignored.extend(map.ignored);
        let expected = read_shapes(&fixtures().join(format!("fullsize/{model}/{component}.txt")));
        assert_same_shapes(&format!("{model}/{component}"), &ours, &expected);
    }
    let unused: Vec<&String> =
        keys.keys().filter(|k| !claimed.contains(*k) && !ignored.contains(*k)).collect();
    assert!(unused.is_empty(), "{model}: keys no component takes: {unused:?}");
    assert_eq!(ignored, expected_ignored(model, &keys), "{model}: ignored keys");
}

#[test]
fn sd15_checkpoint_keys_map_completely() {
    check("sd15", "stable-diffusion-v1-5", PipelineKind::StableDiffusion);
}

#[test]
fn sd21_checkpoint_keys_map_completely() {
    check("sd21", "stable-diffusion-2-1", PipelineKind::StableDiffusion);
}

#[test]
fn sdxl_checkpoint_keys_map_completely() {
    check("sdxl", "stable-diffusion-xl-base-1.0", PipelineKind::StableDiffusionXl);
}

/// The family is read from the keys as diffusers' `infer_diffusers_model_type` reads it: a
/// zero-filled file of each full-size key list (shapes only matter) is recognised.
#[test]
fn infers_the_family_of_full_size_checkpoints() {
    let dir = tempfile::tempdir().unwrap();
    for (model, family) in [("sd15", Family::Sd1), ("sd21", Family::Sd2), ("sdxl", Family::Xl)] {
        let keys =
            read_shapes(&fixtures().join(format!("golden/single_file/fullsize/{model}.txt")));
        // Only the keys the rules look at, as 1-element-per-dim-product placeholders would
        // be gigabytes: the rules read names and the shapes of two keys.
        let path = dir.path().join(format!("{model}.safetensors"));
        let mut header = serde_json::Map::new();
        let mut offset = 0usize;
        for (name, shape) in &keys {
            let interesting = name.contains("input_blocks.2.1.transformer_blocks.0.attn2.to_k")
                || name.contains("input_blocks.0.0.weight")
                || name.contains("resblocks.9.mlp.c_proj.bias")
                || name.starts_with("model.diffusion_model.time_embed.0.bias");
            if !interesting {
                continue;
            }
            let bytes = shape.iter().product::<usize>() * 2;
            header.insert(
                name.clone(),
                serde_json::json!({"dtype": "F16", "shape": shape, "data_offsets": [offset, offset + bytes]}),
            );
            offset += bytes;
        }
        let head = serde_json::to_string(&header).unwrap();
        let mut file = (head.len() as u64).to_le_bytes().to_vec();
        file.extend_from_slice(head.as_bytes());
        file.resize(file.len() + offset, 0);
        std::fs::write(&path, file).unwrap();
        let files = ltd_nn::SafetensorsFiles::open(&[&path]).unwrap();
        assert_eq!(infer_family(&files).unwrap(), family, "{model}");
    }
}
