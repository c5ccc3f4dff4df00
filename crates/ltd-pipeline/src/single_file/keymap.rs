//! The one key map from the original (LDM / A1111 / ComfyUI) checkpoint layout to our module
//! paths, which are diffusers' and transformers' names. A port of diffusers'
//! `single_file_utils.py`: `convert_ldm_unet_checkpoint`, `convert_ldm_vae_checkpoint`
//! (with `conv_attn_to_linear`), `convert_ldm_clip_checkpoint` and
//! `convert_open_clip_checkpoint`, rule for rule, but producing [`Alias`]es (names, row ranges
//! and reshapes of the mapped tensors) instead of copied tensors.
//!
//! Every function here is pure: it sees names and shapes only, so the same code maps a real
//! file and the full-size key lists of the tests.

use ltd_nn::weights::Alias;
use ltd_unet::UNetConfig;

/// `model.diffusion_model.*`: the U-Net.
pub const UNET_PREFIX: &str = "model.diffusion_model.";
/// diffusers' `LDM_VAE_KEYS`: the VAE inside a checkpoint.
pub const VAE_PREFIXES: &[&str] = &["first_stage_model.", "vae."];
/// SD 1.x's CLIP ViT-L (transformers layout under a prefix).
pub const SD1_CLIP_PREFIX: &str = "cond_stage_model.transformer.";
/// SD 2.x's OpenCLIP ViT-H (open_clip layout).
pub const SD2_OPEN_CLIP_PREFIX: &str = "cond_stage_model.model.";
/// SDXL's first text encoder, CLIP ViT-L.
pub const XL_CLIP_PREFIX: &str = "conditioner.embedders.0.transformer.";
/// SDXL's second text encoder, OpenCLIP ViT-bigG.
pub const XL_OPEN_CLIP_PREFIX: &str = "conditioner.embedders.1.model.";

/// Where the LDM U-Net's numbered blocks fall in diffusers' down and up blocks.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct UnetLayout {
    /// Per down block: ResNets, and whether a downsampler follows (one more `input_blocks`
    /// entry).
    pub down: Vec<(usize, bool)>,
    /// Per up block: ResNets, and whether they have transformers (then the upsampler is the
    /// third module of the block's last `output_blocks` entry, else the second).
    pub up: Vec<(usize, bool)>,
}

impl UnetLayout {
    /// The layout of a U-Net config.
    pub fn from_config(cfg: &UNetConfig) -> Self {
        Self {
            down: cfg
                .down_blocks
                .iter()
                .map(|b| (b.resnets.len(), b.downsample.is_some()))
                .collect(),
            up: cfg.up_blocks.iter().map(|b| (b.resnets.len(), !b.attentions.is_empty())).collect(),
        }
    }

    /// `input_blocks.{i}` (i ≥ 1) as (down block, index in it); the index equals the block's
    /// ResNet count for its downsampler.
    fn input_block(&self, i: usize) -> Option<(usize, usize)> {
        let mut first = 1;
        for (b, &(resnets, down)) in self.down.iter().enumerate() {
            let slots = resnets + usize::from(down);
            if i < first + slots {
                return Some((b, i - first));
            }
            first += slots;
        }
        None
    }

    /// `output_blocks.{i}` as (up block, ResNet index in it).
    fn output_block(&self, i: usize) -> Option<(usize, usize)> {
        let mut first = 0;
        for (b, &(resnets, _)) in self.up.iter().enumerate() {
            if i < first + resnets {
                return Some((b, i - first));
            }
            first += resnets;
        }
        None
    }
}

/// How one component of a checkpoint is laid out.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Spec {
    /// The U-Net under [`UNET_PREFIX`].
    Unet(UnetLayout),
    /// The VAE under `prefix` (`first_stage_model.`, `vae.`, or `""` for a VAE file), with
    /// this many decoder up blocks (LDM numbers them from the bottom, diffusers from the top).
    Vae {
        /// The key prefix.
        prefix: String,
        /// `len(up_block_types)`.
        up_blocks: usize,
    },
    /// A transformers CLIP text model under `prefix`; ours is named without `text_model.`.
    Clip {
        /// The key prefix.
        prefix: String,
    },
    /// An open_clip text tower under `prefix`, as a transformers CLIP text model with `layers`
    /// layers (SD 2.x uses 23 of OpenCLIP's 24); `projection` for
    /// `CLIPTextModelWithProjection`, whose names start with `text_model.` and which takes
    /// `text_projection`.
    OpenClip {
        /// The key prefix.
        prefix: String,
        /// `num_hidden_layers` of the target config.
        layers: usize,
        /// The target has a text projection.
        projection: bool,
    },
}

/// What a component takes from a checkpoint.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct ComponentMap {
    /// Our tensor names and where each comes from.
    pub aliases: Vec<(String, Alias)>,
    /// Keys of the component that diffusers deliberately drops (buffers such as
    /// `position_ids`, OpenCLIP's `logit_scale`, SD 2.x's unused last layer).
    pub ignored: Vec<String>,
    /// Keys under the component's prefix that no rule maps.
    pub unknown: Vec<String>,
}

enum Mapped {
    To(Vec<(String, Alias)>),
    Ignored,
    Unknown,
}

fn plain(name: String, source: &str, shape: &[usize]) -> Mapped {
    Mapped::To(vec![(
        name,
        Alias { source: source.to_string(), rows: None, shape: shape.to_vec(), transpose: false },
    )])
}

impl Spec {
    /// The key prefix of the component.
    pub fn prefix(&self) -> &str {
        match self {
            Self::Unet(_) => UNET_PREFIX,
            Self::Vae { prefix, .. } | Self::Clip { prefix } | Self::OpenClip { prefix, .. } => {
                prefix
            }
        }
    }

    /// Maps every key under the component's prefix.
    pub fn map<'a>(&self, keys: impl IntoIterator<Item = (&'a str, &'a [usize])>) -> ComponentMap {
        let prefix = self.prefix();
        let mut out = ComponentMap::default();
        for (key, shape) in keys {
            let Some(rest) = key.strip_prefix(prefix) else { continue };
            let mapped = match self {
                Self::Unet(layout) => unet_key(rest, key, shape, layout),
                Self::Vae { up_blocks, .. } => vae_key(rest, key, shape, *up_blocks),
                Self::Clip { .. } => clip_key(rest, key, shape),
                Self::OpenClip { layers, projection, .. } => {
                    open_clip_key(rest, key, shape, *layers, *projection)
                }
            };
            match mapped {
                Mapped::To(list) => out.aliases.extend(list),
                Mapped::Ignored => out.ignored.push(key.to_string()),
                Mapped::Unknown => out.unknown.push(key.to_string()),
            }
        }
        out
    }
}

/// Splits `"{n}.{rest}"` into its leading number and the rest.
fn number(s: &str) -> Option<(usize, &str)> {
    let (n, rest) = s.split_once('.')?;
    Some((n.parse().ok()?, rest))
}

/// diffusers' `update_unet_resnet_ldm_to_diffusers`.
fn unet_resnet(rest: &str) -> String {
    rest.replace("in_layers.0", "norm1")
        .replace("in_layers.2", "conv1")
        .replace("out_layers.0", "norm2")
        .replace("out_layers.3", "conv2")
        .replace("emb_layers.1", "time_emb_proj")
        .replace("skip_connection", "conv_shortcut")
}

fn unet_key(rest: &str, key: &str, shape: &[usize], layout: &UnetLayout) -> Mapped {
    const FIXED: &[(&str, &str)] = &[
        ("time_embed.0.", "time_embedding.linear_1."),
        ("time_embed.2.", "time_embedding.linear_2."),
        ("label_emb.0.0.", "add_embedding.linear_1."),
        ("label_emb.0.2.", "add_embedding.linear_2."),
        ("input_blocks.0.0.", "conv_in."),
        ("out.0.", "conv_norm_out."),
        ("out.2.", "conv_out."),
    ];
    for (ldm, ours) in FIXED {
        if let Some(param) = rest.strip_prefix(ldm) {
            return plain(format!("{ours}{param}"), key, shape);
        }
    }
    if let Some((i, tail)) = rest.strip_prefix("input_blocks.").and_then(number) {
        let Some((b, j)) = layout.input_block(i) else { return Mapped::Unknown };
        let name = if let Some(param) = tail.strip_prefix("0.op.") {
            format!("down_blocks.{b}.downsamplers.0.conv.{param}")
        } else if let Some(r) = tail.strip_prefix("0.") {
            format!("down_blocks.{b}.resnets.{j}.{}", unet_resnet(r))
        } else if let Some(r) = tail.strip_prefix("1.") {
            format!("down_blocks.{b}.attentions.{j}.{r}")
        } else {
            return Mapped::Unknown;
        };
        return plain(name, key, shape);
    }
    if let Some((k, r)) = rest.strip_prefix("middle_block.").and_then(number) {
        let name = match k {
            0 | 2 => format!("mid_block.resnets.{}.{}", k / 2, unet_resnet(r)),
            1 => format!("mid_block.attentions.0.{r}"),
            _ => return Mapped::Unknown,
        };
        return plain(name, key, shape);
    }
    if let Some((i, tail)) = rest.strip_prefix("output_blocks.").and_then(number) {
        let Some((b, j)) = layout.output_block(i) else { return Mapped::Unknown };
        let has_attention = layout.up[b].1;
        let upsampler = if has_attention { "2.conv." } else { "1.conv." };
        let name = if let Some(param) = tail.strip_prefix(upsampler) {
            format!("up_blocks.{b}.upsamplers.0.conv.{param}")
        } else if let Some(r) = tail.strip_prefix("0.") {
            format!("up_blocks.{b}.resnets.{j}.{}", unet_resnet(r))
        } else if let Some(r) = tail.strip_prefix("1.").filter(|_| has_attention) {
            format!("up_blocks.{b}.attentions.{j}.{r}")
        } else {
            return Mapped::Unknown;
        };
        return plain(name, key, shape);
    }
    Mapped::Unknown
}

/// A VAE ResNet's parameter (`nin_shortcut` is diffusers' `conv_shortcut`).
fn vae_resnet(r: &str) -> String {
    r.replace("nin_shortcut", "conv_shortcut")
}

fn vae_key(rest: &str, key: &str, shape: &[usize], up_blocks: usize) -> Mapped {
    let Some((side, tail)) = rest.split_once('.') else { return Mapped::Unknown };
    let name = match (side, tail) {
        ("quant_conv" | "post_quant_conv", _) => rest.to_string(),
        ("encoder" | "decoder", _) => {
            if let Some(p) = tail.strip_prefix("norm_out.") {
                format!("{side}.conv_norm_out.{p}")
            } else if tail.starts_with("conv_in.") || tail.starts_with("conv_out.") {
                rest.to_string()
            } else if let Some(r) = tail.strip_prefix("mid.block_1.") {
                format!("{side}.mid_block.resnets.0.{}", vae_resnet(r))
            } else if let Some(r) = tail.strip_prefix("mid.block_2.") {
                format!("{side}.mid_block.resnets.1.{}", vae_resnet(r))
            } else if let Some(r) = tail.strip_prefix("mid.attn_1.") {
                let Some((layer, param)) = r.split_once('.') else { return Mapped::Unknown };
                let ours = match layer {
                    "norm" => "group_norm",
                    "q" => "to_q",
                    "k" => "to_k",
                    "v" => "to_v",
                    "proj_out" => "to_out.0",
                    _ => return Mapped::Unknown,
                };
                // `conv_attn_to_linear`: LDM's 1×1 convolutions are diffusers' linear layers.
                let squeezed: Vec<usize> =
                    if shape.len() > 2 { shape[..2].to_vec() } else { shape.to_vec() };
                return plain(
                    format!("{side}.mid_block.attentions.0.{ours}.{param}"),
                    key,
                    &squeezed,
                );
            } else if let (Some((i, r)), "encoder") =
                (tail.strip_prefix("down.").and_then(number), side)
            {
                if let Some((j, p)) = r.strip_prefix("block.").and_then(number) {
                    format!("encoder.down_blocks.{i}.resnets.{j}.{}", vae_resnet(p))
                } else if let Some(p) = r.strip_prefix("downsample.conv.") {
                    format!("encoder.down_blocks.{i}.downsamplers.0.conv.{p}")
                } else {
                    return Mapped::Unknown;
                }
            } else if let (Some((i, r)), "decoder") =
                (tail.strip_prefix("up.").and_then(number), side)
            {
                if i >= up_blocks {
                    return Mapped::Unknown;
                }
                let b = up_blocks - 1 - i;
                if let Some((j, p)) = r.strip_prefix("block.").and_then(number) {
                    format!("decoder.up_blocks.{b}.resnets.{j}.{}", vae_resnet(p))
                } else if let Some(p) = r.strip_prefix("upsample.conv.") {
                    format!("decoder.up_blocks.{b}.upsamplers.0.conv.{p}")
                } else {
                    return Mapped::Unknown;
                }
            } else {
                return Mapped::Unknown;
            }
        }
        _ => return Mapped::Unknown,
    };
    plain(name, key, shape)
}

fn clip_key(rest: &str, key: &str, shape: &[usize]) -> Mapped {
    // transformers 4.x checkpoints (every SD one) prefix `text_model.`; our CLIPTextModel, as
    // transformers 5.x, does not.
    let name = rest.strip_prefix("text_model.").unwrap_or(rest);
    if name.ends_with("position_ids") {
        return Mapped::Ignored;
    }
    plain(name.to_string(), key, shape)
}

fn open_clip_key(
    rest: &str,
    key: &str,
    shape: &[usize],
    layers: usize,
    projection: bool,
) -> Mapped {
    let p = if projection { "text_model." } else { "" };
    let name = match rest {
        "positional_embedding" => format!("{p}embeddings.position_embedding.weight"),
        "token_embedding.weight" => format!("{p}embeddings.token_embedding.weight"),
        "ln_final.weight" => format!("{p}final_layer_norm.weight"),
        "ln_final.bias" => format!("{p}final_layer_norm.bias"),
        "text_projection" if projection => {
            if shape.len() != 2 {
                return Mapped::Unknown;
            }
            return Mapped::To(vec![(
                "text_projection.weight".into(),
                Alias {
                    source: key.to_string(),
                    rows: None,
                    shape: vec![shape[1], shape[0]],
                    transpose: true,
                },
            )]);
        }
        "text_projection" | "logit_scale" => return Mapped::Ignored,
        _ => {
            let Some((i, r)) = rest.strip_prefix("transformer.resblocks.").and_then(number) else {
                return Mapped::Unknown;
            };
            if i >= layers {
                // SD 2.x runs OpenCLIP's penultimate layer: diffusers' config has 23 of 24.
                return Mapped::Ignored;
            }
            let layer = format!("{p}encoder.layers.{i}");
            if let Some(kind) = r.strip_prefix("attn.in_proj_") {
                // The fused q/k/v projection: three row ranges of one mapped tensor.
                let rows = shape.first().copied().unwrap_or(0);
                if rows % 3 != 0 || !matches!(kind, "weight" | "bias") {
                    return Mapped::Unknown;
                }
                let d = rows / 3;
                let mut part_shape = shape.to_vec();
                part_shape[0] = d;
                return Mapped::To(
                    ["q", "k", "v"]
                        .iter()
                        .enumerate()
                        .map(|(n, q)| {
                            (
                                format!("{layer}.self_attn.{q}_proj.{kind}"),
                                Alias {
                                    source: key.to_string(),
                                    rows: Some((n * d, (n + 1) * d)),
                                    shape: part_shape.clone(),
                                    transpose: false,
                                },
                            )
                        })
                        .collect(),
                );
            }
            const LAYER: &[(&str, &str)] = &[
                ("attn.out_proj.", "self_attn.out_proj."),
                ("ln_1.", "layer_norm1."),
                ("ln_2.", "layer_norm2."),
                ("mlp.c_fc.", "mlp.fc1."),
                ("mlp.c_proj.", "mlp.fc2."),
            ];
            let Some((ours, param)) =
                LAYER.iter().find_map(|(ldm, ours)| r.strip_prefix(ldm).map(|p| (ours, p)))
            else {
                return Mapped::Unknown;
            };
            format!("{layer}.{ours}{param}")
        }
    };
    plain(name, key, shape)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn layout() -> UnetLayout {
        // SD 1.5: four down blocks of two ResNets (three downsamplers), up blocks of three.
        UnetLayout {
            down: vec![(2, true), (2, true), (2, true), (2, false)],
            up: vec![(3, false), (3, true), (3, true), (3, true)],
        }
    }

    fn one(spec: &Spec, key: &str, shape: &[usize]) -> Vec<(String, Alias)> {
        let m = spec.map([(key, shape)]);
        assert!(m.unknown.is_empty() && m.ignored.is_empty(), "{key}: {m:?}");
        m.aliases
    }

    #[test]
    fn maps_unet_blocks_as_diffusers_does() {
        let spec = Spec::Unet(layout());
        let cases = [
            ("input_blocks.3.0.op.weight", "down_blocks.0.downsamplers.0.conv.weight"),
            ("input_blocks.4.0.in_layers.2.weight", "down_blocks.1.resnets.0.conv1.weight"),
            ("input_blocks.5.1.proj_in.weight", "down_blocks.1.attentions.1.proj_in.weight"),
            (
                "input_blocks.11.0.skip_connection.bias",
                "down_blocks.3.resnets.1.conv_shortcut.bias",
            ),
            ("middle_block.2.emb_layers.1.weight", "mid_block.resnets.1.time_emb_proj.weight"),
            ("middle_block.1.norm.weight", "mid_block.attentions.0.norm.weight"),
            ("output_blocks.2.1.conv.weight", "up_blocks.0.upsamplers.0.conv.weight"),
            ("output_blocks.5.2.conv.bias", "up_blocks.1.upsamplers.0.conv.bias"),
            ("output_blocks.5.1.norm.bias", "up_blocks.1.attentions.2.norm.bias"),
            ("output_blocks.11.0.out_layers.3.weight", "up_blocks.3.resnets.2.conv2.weight"),
            ("time_embed.2.bias", "time_embedding.linear_2.bias"),
            ("out.2.weight", "conv_out.weight"),
        ];
        for (ldm, ours) in cases {
            let got = one(&spec, &format!("{UNET_PREFIX}{ldm}"), &[1]);
            assert_eq!(got[0].0, ours, "{ldm}");
        }
    }

    #[test]
    fn maps_the_vae_and_squeezes_attention_convolutions() {
        let spec = Spec::Vae { prefix: "first_stage_model.".into(), up_blocks: 4 };
        let got = one(&spec, "first_stage_model.decoder.up.3.block.0.nin_shortcut.weight", &[1]);
        assert_eq!(got[0].0, "decoder.up_blocks.0.resnets.0.conv_shortcut.weight");
        let got = one(&spec, "first_stage_model.encoder.mid.attn_1.q.weight", &[512, 512, 1, 1]);
        assert_eq!(got[0].0, "encoder.mid_block.attentions.0.to_q.weight");
        assert_eq!(got[0].1.shape, [512, 512]);
    }

    #[test]
    fn splits_open_clip_qkv_into_row_ranges() {
        let spec =
            Spec::OpenClip { prefix: XL_OPEN_CLIP_PREFIX.into(), layers: 32, projection: true };
        let key = format!("{XL_OPEN_CLIP_PREFIX}transformer.resblocks.3.attn.in_proj_weight");
        let got = one(&spec, &key, &[3840, 1280]);
        let names: Vec<&str> = got.iter().map(|(n, _)| n.as_str()).collect();
        assert_eq!(
            names,
            [
                "text_model.encoder.layers.3.self_attn.q_proj.weight",
                "text_model.encoder.layers.3.self_attn.k_proj.weight",
                "text_model.encoder.layers.3.self_attn.v_proj.weight"
            ]
        );
        assert_eq!(got[2].1.rows, Some((2560, 3840)));
        let got = one(&spec, &format!("{XL_OPEN_CLIP_PREFIX}text_projection"), &[1280, 1280]);
        assert!(got[0].1.transpose);
        let sd2 =
            Spec::OpenClip { prefix: SD2_OPEN_CLIP_PREFIX.into(), layers: 23, projection: false };
        let m = sd2.map([(
            "cond_stage_model.model.transformer.resblocks.23.ln_1.bias",
            [1024usize].as_slice(),
        )]);
        assert_eq!(m.ignored.len(), 1);
    }
}
