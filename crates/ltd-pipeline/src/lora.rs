//! LoRA files (Hu et al. 2021), merged into the weights once at load: generation then costs
//! exactly what it costs without them.
//!
//! Two layouts, as diffusers' `load_lora_weights` reads them:
//! - kohya/A1111 (sd-scripts, civitai): `lora_unet_<module>.lora_down.weight`,
//!   `.lora_up.weight`, `.alpha`, the module path with `_` for `.`; `lora_te_`/`lora_te1_` for
//!   the (first) text encoder, `lora_te2_` for SDXL's second. SD 1.x files use diffusers'
//!   module names; SDXL files from kohya's trainer use the original (sgm/LDM) block names
//!   `input_blocks_4_1_…`, mapped here as diffusers' `_maybe_map_sgm_blocks_to_diffusers` and
//!   `_convert_unet_lora_key` map them. LoCon's convolution LoRAs are the same pairs.
//! - diffusers/PEFT: `unet.<module>.lora_A.weight` / `.lora_B.weight` (also `lora.down` /
//!   `lora.up`), `text_encoder.…`, `text_encoder_2.…`; `lora_alpha` from an `.alpha` tensor or
//!   the `lora_adapter_metadata` header diffusers writes (`unet.lora_alpha`,
//!   `unet.alpha_pattern`), else the rank.
//!
//! Each pair becomes `W += scale · alpha / rank · up · down` on the matching weight (see
//! [`ltd_nn::patch`]); several LoRAs add. Module paths are resolved against the tensor names
//! of the model's own files (`.` and `_` compared alike), so `text_model.` prefixes and
//! transformers' two checkpoint layouts need no special case.
//!
//! A LoRA that does not fit the model is an error naming the first key at fault (a layer the
//! model lacks, a shape that does not fit, an encoder it does not have); keys in neither
//! layout (LoHa, DoRA, …) are an error that lists them all: never applied in part.

use std::collections::{BTreeMap, HashMap};
use std::io::Read;
use std::path::{Path, PathBuf};

use candle_core::{DType, Device};
use ltd_nn::{LowRankDelta, SafetensorsFiles, WeightPatches};
use serde_json::Value;
use sha2::{Digest, Sha256};

use crate::error::{PipelineError, Result};

/// A LoRA to merge at load: the file and its strength.
#[derive(Debug, Clone, PartialEq)]
pub struct LoraSpec {
    /// The `.safetensors` file.
    pub path: PathBuf,
    /// The multiplier (A1111's `<lora:name:SCALE>`, diffusers' `lora_scale`).
    pub scale: f64,
}

impl LoraSpec {
    /// Parses `FILE[:SCALE]` (scale 1 when absent); a `:` followed by no number is part of the
    /// file name.
    pub fn parse(arg: &str) -> Result<Self> {
        if let Some((file, scale)) = arg.rsplit_once(':') {
            if let Ok(scale) = scale.trim().parse::<f64>() {
                if !scale.is_finite() {
                    return Err(PipelineError::invalid("lora", format!("{arg}: scale {scale}")));
                }
                return Ok(Self { path: PathBuf::from(file), scale });
            }
        }
        Ok(Self { path: PathBuf::from(arg), scale: 1.0 })
    }

    /// The name A1111 gives it: the file stem (what `<lora:NAME:…>` refers to).
    pub fn name(&self) -> String {
        self.path.file_stem().map(|s| s.to_string_lossy().into_owned()).unwrap_or_default()
    }
}

/// A merged LoRA, as the images' parameters record it.
#[derive(Debug, Clone, PartialEq)]
pub struct LoadedLora {
    /// The file stem.
    pub name: String,
    /// The multiplier it was merged with.
    pub scale: f64,
    /// A1111's short hash: the first 12 hex digits of the "addnet" SHA-256 (of the file after
    /// its safetensors header, so editing the metadata keeps it), or of the `sshs_model_hash`
    /// the header carries, which A1111 prefers.
    pub hash: String,
}

/// The models a LoRA can patch, by their folder names.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum Component {
    /// `unet/`.
    Unet,
    /// `text_encoder/`.
    TextEncoder,
    /// `text_encoder_2/` (SDXL).
    TextEncoder2,
}

impl Component {
    /// The folder name (and diffusers' key prefix).
    pub fn folder(self) -> &'static str {
        match self {
            Self::Unet => "unet",
            Self::TextEncoder => "text_encoder",
            Self::TextEncoder2 => "text_encoder_2",
        }
    }
}

/// The tensor names and shapes of one model, which LoRA keys are resolved against.
pub(crate) struct Target {
    component: Component,
    shapes: BTreeMap<String, Vec<usize>>,
    /// Module path with `.` → `_` (text encoders: without `text_model_`) → weight name.
    modules: HashMap<String, String>,
    /// U-Net: resnets per down block, for the sgm block numbering.
    layers_per_block: usize,
}

impl Target {
    /// A model's tensor names and shapes (from its files' headers, nothing loaded).
    pub fn new(component: Component, shapes: BTreeMap<String, Vec<usize>>) -> Self {
        let mut modules = HashMap::new();
        for name in shapes.keys() {
            if let Some(module) = name.strip_suffix(".weight") {
                modules.insert(normalise(component, module), name.clone());
            }
        }
        let layers_per_block = (0..)
            .take_while(|i| shapes.contains_key(&format!("down_blocks.0.resnets.{i}.conv1.weight")))
            .count();
        Self { component, shapes, modules, layers_per_block }
    }

    /// The tensor names and shapes of the weight files in a component folder.
    pub fn from_folder(
        component: Component,
        dir: &Path,
        stems: &[&str],
        variant: Option<&str>,
    ) -> Result<Self> {
        let files =
            SafetensorsFiles::open(&ltd_nn::weights::component_weights(dir, stems, variant)?)?;
        let shapes = files
            .names()
            .into_iter()
            .filter_map(|n| files.shape(n).map(|s| (n.to_string(), s.to_vec())))
            .collect();
        Ok(Self::new(component, shapes))
    }
}

/// A module path in the form both layouts are compared in: `_` for `.`, and for text encoders
/// without the `text_model` level (present or not depending on the checkpoint's writer).
fn normalise(component: Component, module: &str) -> String {
    let flat = module.replace('.', "_");
    match component {
        Component::Unet => flat,
        _ => flat.strip_prefix("text_model_").map(str::to_string).unwrap_or(flat),
    }
}

/// What a key of a LoRA file is.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Part {
    Down,
    Up,
    Alpha,
}

/// One LoRA pair being assembled: its keys, by part.
#[derive(Debug, Default)]
struct Pair {
    down: Option<String>,
    up: Option<String>,
    alpha: Option<String>,
}

/// Splits a key into (component, module as written, part), or `None` when it is in neither
/// layout.
fn classify(key: &str) -> Option<(Component, String, Part, bool)> {
    const KOHYA: &[(&str, Component)] = &[
        ("lora_unet_", Component::Unet),
        ("lora_te1_", Component::TextEncoder),
        ("lora_te2_", Component::TextEncoder2),
        ("lora_te_", Component::TextEncoder),
    ];
    for (prefix, component) in KOHYA {
        if let Some(rest) = key.strip_prefix(prefix) {
            let (module, tail) = rest.split_once('.')?;
            let part = match tail {
                "lora_down.weight" => Part::Down,
                "lora_up.weight" => Part::Up,
                "alpha" => Part::Alpha,
                _ => return None,
            };
            return Some((*component, module.to_string(), part, true));
        }
    }
    const PEFT: &[(&str, Part)] = &[
        (".lora_A.weight", Part::Down),
        (".lora_B.weight", Part::Up),
        (".lora.down.weight", Part::Down),
        (".lora.up.weight", Part::Up),
        (".lora_down.weight", Part::Down),
        (".lora_up.weight", Part::Up),
        (".alpha", Part::Alpha),
    ];
    let (module, part) =
        PEFT.iter().find_map(|(suffix, part)| key.strip_suffix(suffix).map(|m| (m, *part)))?;
    let (prefix, module) = module.split_once('.')?;
    let component = match prefix {
        "unet" => Component::Unet,
        "text_encoder" => Component::TextEncoder,
        "text_encoder_2" => Component::TextEncoder2,
        _ => return None,
    };
    Some((component, module.to_string(), part, false))
}

/// A kohya U-Net module name (after `lora_unet_`) in diffusers' names: the sgm/LDM blocks of
/// kohya's SDXL files renumbered (`_maybe_map_sgm_blocks_to_diffusers`) and the LDM layer
/// names renamed (`_convert_unet_lora_key`).
fn sgm_to_diffusers(name: &str, layers_per_block: usize) -> String {
    let per = layers_per_block + 1;
    let parts: Vec<&str> = name.split('_').collect();
    let num = |i: usize| parts.get(i).and_then(|p| p.parse::<usize>().ok());
    let rest = |from: usize| parts.get(from..).map(|p| p.join("_")).unwrap_or_default();
    let inner = |j: usize, rest: &str| match j {
        0 => "resnets",
        1 if rest == "conv" => "upsamplers",
        1 => "attentions",
        _ => "upsamplers",
    };
    let mapped = match (parts.first(), parts.get(1)) {
        (Some(&"input"), Some(&"blocks")) => match (num(2), num(3)) {
            (Some(0), Some(0)) => "conv_in".to_string(),
            (Some(i), Some(j)) if i >= 1 => {
                let (block, layer) = ((i - 1) / per, (i - 1) % per);
                let r = rest(4);
                if r == "op" {
                    format!("down_blocks_{block}_downsamplers_0_conv")
                } else {
                    format!("down_blocks_{block}_{}_{layer}_{r}", inner(j, &r))
                }
            }
            _ => name.to_string(),
        },
        (Some(&"middle"), Some(&"block")) => match num(2) {
            Some(0) => format!("mid_block_resnets_0_{}", rest(3)),
            Some(1) => format!("mid_block_attentions_0_{}", rest(3)),
            Some(2) => format!("mid_block_resnets_1_{}", rest(3)),
            _ => name.to_string(),
        },
        (Some(&"output"), Some(&"blocks")) => match (num(2), num(3)) {
            (Some(i), Some(j)) => {
                let (block, layer) = (i / per, i % per);
                let r = rest(4);
                let kind = inner(j, &r);
                let layer = if kind == "upsamplers" { 0 } else { layer };
                format!("up_blocks_{block}_{kind}_{layer}_{r}")
            }
            _ => name.to_string(),
        },
        _ => name.to_string(),
    };
    let mapped = mapped.trim_end_matches('_').to_string();
    const WHOLE: &[(&str, &str)] = &[
        ("time_embed_0", "time_embedding_linear_1"),
        ("time_embed_2", "time_embedding_linear_2"),
        ("label_emb_0_0", "add_embedding_linear_1"),
        ("label_emb_0_2", "add_embedding_linear_2"),
        ("out_2", "conv_out"),
    ];
    if let Some((_, to)) = WHOLE.iter().find(|(from, _)| *from == mapped) {
        return to.to_string();
    }
    const TAILS: &[(&str, &str)] = &[
        ("_in_layers_2", "_conv1"),
        ("_out_layers_3", "_conv2"),
        ("_emb_layers_1", "_time_emb_proj"),
        ("_skip_connection", "_conv_shortcut"),
    ];
    for (from, to) in TAILS {
        if let Some(head) = mapped.strip_suffix(from) {
            return format!("{head}{to}");
        }
    }
    mapped
}

/// A string of a safetensors file's `__metadata__` header, if any.
fn header_metadata(path: &Path, key: &str) -> Result<Option<String>> {
    let io = |e: std::io::Error| PipelineError::from(ltd_nn::Error::io(path, e));
    let mut file = std::fs::File::open(path).map_err(io)?;
    let mut len = [0u8; 8];
    file.read_exact(&mut len).map_err(io)?;
    let len = u64::from_le_bytes(len) as usize;
    let mut header = vec![0u8; len];
    file.read_exact(&mut header).map_err(io)?;
    let header: Value = serde_json::from_slice(&header)
        .map_err(|e| PipelineError::msg(format!("{}: bad header: {e}", path.display())))?;
    let raw = header.get("__metadata__").and_then(|m| m.get(key));
    Ok(raw.and_then(Value::as_str).map(str::to_string))
}

/// The `lora_adapter_metadata` JSON of a diffusers LoRA file's header, if any.
fn adapter_metadata(path: &Path) -> Result<Option<Value>> {
    Ok(header_metadata(path, "lora_adapter_metadata")?.and_then(|s| serde_json::from_str(&s).ok()))
}

/// The short hash A1111 records for a LoRA: the `sshs_model_hash` kohya's trainer writes in
/// the header when there is one (A1111 prefers it), else [`addnet_short_hash`].
fn lora_short_hash(path: &Path) -> Result<String> {
    match header_metadata(path, "sshs_model_hash")? {
        Some(h) if !h.is_empty() => Ok(h.chars().take(12).collect()),
        _ => addnet_short_hash(path),
    }
}

/// A1111's short "addnet" hash of a safetensors file: SHA-256 of everything after the header.
pub fn addnet_short_hash(path: &Path) -> Result<String> {
    let bytes = std::fs::read(path).map_err(|e| ltd_nn::Error::io(path, e))?;
    let len = bytes.get(..8).map_or(0, |b| u64::from_le_bytes(b.try_into().unwrap_or_default()));
    let start = (8 + len as usize).min(bytes.len());
    Ok(short_hex(&Sha256::digest(&bytes[start..])))
}

/// The first 12 hex digits of a digest (A1111's `shorthash`).
pub(crate) fn short_hex(digest: &[u8]) -> String {
    digest.iter().take(6).map(|b| format!("{b:02x}")).collect()
}

/// A scalar tensor (an `.alpha`) as a number, whatever its dtype.
fn scalar(files: &SafetensorsFiles, key: &str) -> Result<f64> {
    let dtype = files.dtype(key).unwrap_or(DType::F32);
    let t = files.load(key, dtype, &Device::Cpu)?.to_dtype(DType::F64)?.flatten_all()?;
    let v = t.to_vec1::<f64>()?;
    match v.as_slice() {
        [x] => Ok(*x),
        _ => Err(PipelineError::msg(format!(
            "{}: `{key}` should hold one number, found {} values",
            files.describe(),
            v.len()
        ))),
    }
}

/// PEFT's alpha for a module from diffusers' adapter metadata: `alpha_pattern` (keys match a
/// module path's tail), else `lora_alpha`.
fn metadata_alpha(meta: Option<&Value>, component: Component, module: &str) -> Option<f64> {
    let meta = meta?;
    let prefix = component.folder();
    if let Some(Value::Object(patterns)) = meta.get(format!("{prefix}.alpha_pattern")) {
        for (pattern, alpha) in patterns {
            if module == pattern || module.ends_with(&format!(".{pattern}")) {
                return alpha.as_f64();
            }
        }
    }
    meta.get(format!("{prefix}.lora_alpha")).and_then(Value::as_f64)
}

/// The patches of every LoRA, per model, and what the images' parameters record of them.
pub(crate) fn build_patches(
    loras: &[LoraSpec],
    targets: &[Target],
    model: &str,
) -> Result<(HashMap<Component, WeightPatches>, Vec<LoadedLora>)> {
    let mut patches: HashMap<Component, WeightPatches> = HashMap::new();
    let mut loaded = Vec::with_capacity(loras.len());
    for spec in loras {
        for (component, name, delta) in read_lora(spec, targets, model)? {
            patches.entry(component).or_default().add(name, delta);
        }
        loaded.push(LoadedLora {
            name: spec.name(),
            scale: spec.scale,
            hash: lora_short_hash(&spec.path)?,
        });
    }
    Ok((patches, loaded))
}

/// One LoRA file's deltas: (model, weight name, delta).
fn read_lora(
    spec: &LoraSpec,
    targets: &[Target],
    model: &str,
) -> Result<Vec<(Component, String, LowRankDelta)>> {
    let path = &spec.path;
    let files = SafetensorsFiles::open(&[path]).map_err(|e| match e {
        ltd_nn::Error::Io { source, .. } => {
            PipelineError::msg(format!("--lora {}: {source}", path.display()))
        }
        other => PipelineError::msg(format!("--lora {other}")),
    })?;
    let file = path.display();
    let meta = adapter_metadata(path)?;
    let mut pairs: BTreeMap<(Component, String, bool), Pair> = BTreeMap::new();
    let mut unknown = Vec::new();
    for key in files.names() {
        match classify(key) {
            Some((component, module, part, kohya)) => {
                let pair = pairs.entry((component, module, kohya)).or_default();
                let slot = match part {
                    Part::Down => &mut pair.down,
                    Part::Up => &mut pair.up,
                    Part::Alpha => &mut pair.alpha,
                };
                *slot = Some(key.to_string());
            }
            None => unknown.push(key.to_string()),
        }
    }
    if !unknown.is_empty() {
        let shown: Vec<&str> = unknown.iter().take(8).map(String::as_str).collect();
        let more = if unknown.len() > 8 {
            format!(" and {} more", unknown.len() - 8)
        } else {
            String::new()
        };
        return Err(PipelineError::msg(format!(
            "--lora {file}: {} key(s) in neither the kohya (lora_unet_…/lora_te…_) nor the \
             diffusers/PEFT (unet.…lora_A/lora_B) LoRA layout (LoHa, LoKr and DoRA files are \
             not supported): {}{more}",
            unknown.len(),
            shown.join(", ")
        )));
    }
    if pairs.is_empty() {
        return Err(PipelineError::msg(format!("--lora {file}: no LoRA weights in the file")));
    }
    let mut out = Vec::with_capacity(pairs.len());
    for ((component, module, kohya), pair) in &pairs {
        let first = pair.down.as_ref().or(pair.up.as_ref()).or(pair.alpha.as_ref());
        let key = first.map(String::as_str).unwrap_or_default();
        let bad = |what: String| PipelineError::msg(format!("--lora {file}: key `{key}`: {what}"));
        let (Some(down), Some(up)) = (&pair.down, &pair.up) else {
            return Err(bad("has no matching up/down (lora_B/lora_A) partner".into()));
        };
        let Some(target) = targets.iter().find(|t| t.component == *component) else {
            return Err(bad(format!(
                "targets {}, which {model} does not have (a LoRA for SDXL on an SD 1.x/2.x model?)",
                component.folder()
            )));
        };
        let wanted = if *kohya && *component == Component::Unet {
            sgm_to_diffusers(module, target.layers_per_block)
        } else {
            normalise(*component, module)
        };
        let Some(weight) = target.modules.get(&wanted) else {
            return Err(bad(format!(
                "{model}'s {} has no layer `{module}` (a LoRA for another architecture?)",
                component.folder()
            )));
        };
        let up_t = files.load(up, DType::F32, &Device::Cpu)?;
        let down_t = files.load(down, DType::F32, &Device::Cpu)?;
        let source = format!("--lora {file}: key `{key}`");
        let rank = down_t.dims().first().copied().unwrap_or(0);
        let alpha = match &pair.alpha {
            Some(a) => scalar(&files, a)?,
            None if !kohya => {
                metadata_alpha(meta.as_ref(), *component, module).unwrap_or(rank as f64)
            }
            None => rank as f64,
        };
        if rank == 0 {
            return Err(bad("rank 0".into()));
        }
        let delta = LowRankDelta::new(&up_t, &down_t, alpha / rank as f64 * spec.scale, &source)?;
        let shape = &target.shapes[weight];
        delta.check(shape).map_err(|m| {
            bad(format!(
                "{m} of {}'s `{weight}` (a LoRA for another architecture?)",
                component.folder()
            ))
        })?;
        out.push((*component, weight.clone(), delta));
    }
    Ok(out)
}

/// A1111's `<lora:NAME:MULTIPLIER>` tags (multiplier 1 when absent; a second number, the
/// U-Net multiplier of newer A1111 versions, is not supported): the prompt with every tag
/// removed, as A1111 removes them before encoding, and the (name, multiplier) pairs.
pub fn extract_lora_tags(prompt: &str) -> Result<(String, Vec<(String, f64)>)> {
    let mut text = String::with_capacity(prompt.len());
    let mut tags = Vec::new();
    let mut rest = prompt;
    while let Some(start) = rest.find("<lora:") {
        let Some(len) = rest[start..].find('>') else { break };
        let body = &rest[start + "<lora:".len()..start + len];
        let mut fields = body.split(':');
        let name = fields.next().unwrap_or_default().trim().to_string();
        let scale = match fields.next() {
            None => 1.0,
            Some(s) => s.trim().parse::<f64>().map_err(|_| {
                PipelineError::invalid("prompt", format!("<lora:{body}>: {s:?} is not a number"))
            })?,
        };
        if name.is_empty() || fields.next().is_some() {
            return Err(PipelineError::invalid(
                "prompt",
                format!("<lora:{body}>: expected <lora:NAME> or <lora:NAME:MULTIPLIER>"),
            ));
        }
        tags.push((name, scale));
        text.push_str(&rest[..start]);
        rest = &rest[start + len + 1..];
    }
    text.push_str(rest);
    Ok((text, tags))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_file_and_scale() {
        let p = LoraSpec::parse("styles/ink.safetensors:0.6").unwrap();
        assert_eq!(
            (p.path.to_str().unwrap(), p.scale, p.name().as_str()),
            ("styles/ink.safetensors", 0.6, "ink")
        );
        let p = LoraSpec::parse("C:\\loras\\ink.safetensors").unwrap();
        assert_eq!((p.path.to_str().unwrap(), p.scale), ("C:\\loras\\ink.safetensors", 1.0));
        assert!(LoraSpec::parse("a.safetensors:inf").is_err());
    }

    #[test]
    fn removes_lora_tags_as_a1111() {
        let (text, tags) = extract_lora_tags("a cat <lora:ink:0.8>, <lora:b> hat").unwrap();
        assert_eq!(text, "a cat ,  hat");
        assert_eq!(tags, [("ink".to_string(), 0.8), ("b".to_string(), 1.0)]);
        assert_eq!(extract_lora_tags("no tags (x:1.2)").unwrap().0, "no tags (x:1.2)");
        for bad in ["<lora:x:y>", "<lora::1>", "<lora:x:1:2:3>"] {
            let err = extract_lora_tags(bad).unwrap_err().to_string();
            assert!(err.starts_with("--prompt: <lora:"), "{err}");
        }
    }

    #[test]
    fn maps_sgm_block_names() {
        let check = |sgm: &str, want: &str| assert_eq!(sgm_to_diffusers(sgm, 2), want, "{sgm}");
        check(
            "input_blocks_4_1_transformer_blocks_0_attn1_to_q",
            "down_blocks_1_attentions_0_transformer_blocks_0_attn1_to_q",
        );
        check("input_blocks_5_0_in_layers_2", "down_blocks_1_resnets_1_conv1");
        check("input_blocks_3_0_op", "down_blocks_0_downsamplers_0_conv");
        check("input_blocks_0_0", "conv_in");
        check("middle_block_1_proj_in", "mid_block_attentions_0_proj_in");
        check("middle_block_2_out_layers_3", "mid_block_resnets_1_conv2");
        check("output_blocks_2_1_conv", "up_blocks_0_upsamplers_0_conv");
        check("output_blocks_5_2_conv", "up_blocks_1_upsamplers_0_conv");
        check("output_blocks_4_1_proj_out", "up_blocks_1_attentions_1_proj_out");
        check("output_blocks_3_0_skip_connection", "up_blocks_1_resnets_0_conv_shortcut");
        check("time_embed_0", "time_embedding_linear_1");
        check("out_2", "conv_out");
        check("down_blocks_0_attentions_0_proj_in", "down_blocks_0_attentions_0_proj_in");
    }

    #[test]
    fn classifies_both_layouts() {
        let c = classify;
        assert_eq!(
            c("lora_te2_text_model_encoder_layers_0_mlp_fc1.alpha"),
            Some((
                Component::TextEncoder2,
                "text_model_encoder_layers_0_mlp_fc1".into(),
                Part::Alpha,
                true
            ))
        );
        assert_eq!(
            c("unet.down_blocks.0.attentions.0.proj_in.lora_B.weight"),
            Some((Component::Unet, "down_blocks.0.attentions.0.proj_in".into(), Part::Up, false))
        );
        assert_eq!(c("lora_unet_x.hada_w1_a"), None);
        assert_eq!(c("vae.decoder.lora_A.weight"), None);
    }

    /// Module names of real kohya files (sd-scripts' SDXL trainer writes sgm block names; its
    /// SD 1.x trainer diffusers' names) resolve against the full-size models' tensor names.
    #[test]
    fn resolves_real_kohya_names_on_full_size_models() {
        let fullsize = ltd_test_support::fixtures().join("fullsize");
        let target = |c: Component, file: &str| {
            Target::new(c, ltd_test_support::read_shapes(&fullsize.join(file)))
        };
        let resolve = |t: &Target, kohya_module: &str| {
            let wanted = match t.component {
                Component::Unet => sgm_to_diffusers(kohya_module, t.layers_per_block),
                c => normalise(c, kohya_module),
            };
            t.modules.get(&wanted).cloned().unwrap_or_else(|| panic!("{kohya_module} → {wanted}"))
        };
        let xl = target(Component::Unet, "sdxl/unet.txt");
        assert_eq!(xl.layers_per_block, 2);
        for (module, weight) in [
            ("input_blocks_0_0", "conv_in.weight"),
            ("input_blocks_1_0_in_layers_2", "down_blocks.0.resnets.0.conv1.weight"),
            ("input_blocks_3_0_op", "down_blocks.0.downsamplers.0.conv.weight"),
            ("input_blocks_4_0_emb_layers_1", "down_blocks.1.resnets.0.time_emb_proj.weight"),
            ("input_blocks_4_0_skip_connection", "down_blocks.1.resnets.0.conv_shortcut.weight"),
            ("input_blocks_4_1_proj_in", "down_blocks.1.attentions.0.proj_in.weight"),
            (
                "input_blocks_8_1_transformer_blocks_9_ff_net_2",
                "down_blocks.2.attentions.1.transformer_blocks.9.ff.net.2.weight",
            ),
            (
                "middle_block_1_transformer_blocks_9_attn2_to_out_0",
                "mid_block.attentions.0.transformer_blocks.9.attn2.to_out.0.weight",
            ),
            ("middle_block_2_out_layers_3", "mid_block.resnets.1.conv2.weight"),
            (
                "output_blocks_0_1_transformer_blocks_0_attn1_to_q",
                "up_blocks.0.attentions.0.transformer_blocks.0.attn1.to_q.weight",
            ),
            ("output_blocks_2_2_conv", "up_blocks.0.upsamplers.0.conv.weight"),
            ("output_blocks_5_2_conv", "up_blocks.1.upsamplers.0.conv.weight"),
            ("output_blocks_8_0_skip_connection", "up_blocks.2.resnets.2.conv_shortcut.weight"),
            ("time_embed_0", "time_embedding.linear_1.weight"),
            ("label_emb_0_2", "add_embedding.linear_2.weight"),
            ("out_2", "conv_out.weight"),
        ] {
            assert_eq!(resolve(&xl, module), weight, "{module}");
        }
        let sd15 = target(Component::Unet, "sd15/unet.txt");
        for module in [
            "down_blocks_0_attentions_0_transformer_blocks_0_attn1_to_q",
            "up_blocks_3_attentions_2_proj_out",
            "mid_block_resnets_1_conv2",
        ] {
            resolve(&sd15, module);
        }
        let te = target(Component::TextEncoder, "sd15/text_encoder.txt");
        resolve(&te, "text_model_encoder_layers_11_mlp_fc2");
        let te2 = target(Component::TextEncoder2, "sdxl/text_encoder_2.txt");
        resolve(&te2, "text_model_encoder_layers_31_self_attn_out_proj");
        resolve(&te2, "text_projection");
    }
}
