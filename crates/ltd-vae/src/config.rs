//! `vae/config.json`: the serde mirror of diffusers' `AutoencoderKL` arguments
//! ([`AutoencoderKLConfig`]) and the validated architecture ([`VaeConfig`]).

use candle_core::{DType, Result, Tensor};
use ltd_nn::layers::Activation;
use ltd_nn::{ConfigError, OneOrMany};
use serde::{Deserialize, Deserializer};

/// A boolean that may be `null` in a config; diffusers treats `None` as false.
fn bool_or_null<'de, D: Deserializer<'de>>(d: D) -> std::result::Result<bool, D::Error> {
    Ok(Option::<bool>::deserialize(d)?.unwrap_or(false))
}

/// The raw `config.json` of an `AutoencoderKL`, field for field in the order of diffusers'
/// `__init__`: a missing field takes its [`Default`] value (diffusers' default), an unknown one
/// is ignored.
#[allow(missing_docs)]
#[derive(Debug, Clone, PartialEq, Deserialize)]
#[serde(default)]
pub struct AutoencoderKLConfig {
    pub in_channels: usize,
    pub out_channels: usize,
    pub down_block_types: Vec<String>,
    pub up_block_types: Vec<String>,
    pub block_out_channels: Vec<usize>,
    pub layers_per_block: usize,
    pub act_fn: String,
    pub latent_channels: usize,
    pub norm_num_groups: usize,
    pub sample_size: OneOrMany<usize>,
    pub scaling_factor: f64,
    pub shift_factor: Option<f64>,
    pub latents_mean: Option<Vec<f64>>,
    pub latents_std: Option<Vec<f64>>,
    #[serde(deserialize_with = "bool_or_null")]
    pub force_upcast: bool,
    #[serde(deserialize_with = "bool_or_null")]
    pub use_quant_conv: bool,
    #[serde(deserialize_with = "bool_or_null")]
    pub use_post_quant_conv: bool,
    #[serde(deserialize_with = "bool_or_null")]
    pub mid_block_add_attention: bool,
}

impl Default for AutoencoderKLConfig {
    /// The defaults of diffusers' `AutoencoderKL.__init__` (0.42), in its order: a one-level
    /// toy VAE, not SD's (real configs name all of these). Every field missing from a
    /// `config.json` takes its value from here.
    fn default() -> Self {
        Self {
            in_channels: 3,
            out_channels: 3,
            down_block_types: vec!["DownEncoderBlock2D".into()],
            up_block_types: vec!["UpDecoderBlock2D".into()],
            block_out_channels: vec![64],
            layers_per_block: 1,
            act_fn: "silu".into(),
            latent_channels: 4,
            norm_num_groups: 32,
            sample_size: OneOrMany::One(32),
            scaling_factor: 0.18215,
            shift_factor: None,
            latents_mean: None,
            latents_std: None,
            force_upcast: true,
            use_quant_conv: true,
            use_post_quant_conv: true,
            mid_block_add_attention: true,
        }
    }
}

/// A validated `AutoencoderKL` architecture and its latent-space constants.
#[derive(Debug, Clone, PartialEq)]
pub struct VaeConfig {
    /// Image channels in.
    pub in_channels: usize,
    /// Image channels out.
    pub out_channels: usize,
    /// Channels per resolution level (one level per down/up block).
    pub block_out_channels: Vec<usize>,
    /// ResNet blocks per encoder block (the decoder has one more).
    pub layers_per_block: usize,
    /// The ResNet activation (`act_fn`); the output activations are SiLU, as in diffusers.
    pub act_fn: Activation,
    /// Channels of the latents.
    pub latent_channels: usize,
    /// Groups of every group norm.
    pub norm_num_groups: usize,
    /// The image size the VAE was trained on (the first value of `sample_size`); the default
    /// tile size for tiled encoding and decoding.
    pub sample_size: usize,
    /// `z_diffusion = (z − shift_factor) · scaling_factor`.
    pub scaling_factor: f64,
    /// See [`VaeConfig::scaling_factor`]; absent (0) for SD 1.x / 2.x / XL.
    pub shift_factor: Option<f64>,
    /// Per-channel latent statistics some models ship (`latents_mean`), for the pipeline.
    pub latents_mean: Option<Vec<f64>>,
    /// Per-channel latent statistics some models ship (`latents_std`), for the pipeline.
    pub latents_std: Option<Vec<f64>>,
    /// The VAE overflows in float16 and must run in float32 (SD XL's VAE).
    pub force_upcast: bool,
    /// `quant_conv` after the encoder.
    pub use_quant_conv: bool,
    /// `post_quant_conv` before the decoder.
    pub use_post_quant_conv: bool,
    /// Self-attention in the encoder's and decoder's mid blocks.
    pub mid_block_add_attention: bool,
}

impl VaeConfig {
    /// Image pixels per latent pixel along each axis: `2^(len(block_out_channels) − 1)`.
    pub fn scale_factor(&self) -> usize {
        1 << (self.block_out_channels.len() - 1)
    }

    /// The dtype to run the VAE in when the pipeline asks for `requested`: float32 instead of
    /// float16 when `force_upcast` is set, as diffusers' pipelines do (bfloat16 has float32's
    /// range and is left alone, as there).
    pub fn compute_dtype(&self, requested: DType) -> DType {
        if self.force_upcast && requested == DType::F16 {
            DType::F32
        } else {
            requested
        }
    }

    /// VAE latents to the diffusion model's scale: `(z − shift_factor) · scaling_factor`.
    pub fn scale_latents(&self, z: &Tensor) -> Result<Tensor> {
        let shift = self.shift_factor.unwrap_or(0.0);
        z.affine(self.scaling_factor, -shift * self.scaling_factor)
    }

    /// The diffusion model's latents back to the VAE's: `z / scaling_factor + shift_factor`.
    pub fn unscale_latents(&self, z: &Tensor) -> Result<Tensor> {
        z.affine(1.0 / self.scaling_factor, self.shift_factor.unwrap_or(0.0))
    }
}

impl TryFrom<AutoencoderKLConfig> for VaeConfig {
    type Error = ConfigError;

    fn try_from(raw: AutoencoderKLConfig) -> std::result::Result<Self, ConfigError> {
        let n = raw.block_out_channels.len();
        if n == 0 {
            return Err(ConfigError::new("block_out_channels", "is empty"));
        }
        for (field, types, expected) in [
            ("down_block_types", &raw.down_block_types, "DownEncoderBlock2D"),
            ("up_block_types", &raw.up_block_types, "UpDecoderBlock2D"),
        ] {
            if types.len() != n {
                return Err(ConfigError::new(
                    field,
                    format!("has {} entries but block_out_channels has {n}", types.len()),
                ));
            }
            if let Some((i, t)) = types.iter().enumerate().find(|(_, t)| *t != expected) {
                return Err(ConfigError::unsupported(format!("{field}[{i}]"), t));
            }
        }
        if let Some((i, c)) =
            raw.block_out_channels.iter().enumerate().find(|(_, c)| **c % raw.norm_num_groups != 0)
        {
            return Err(ConfigError::new(
                format!("block_out_channels[{i}]"),
                format!("{c} is not a multiple of norm_num_groups {}", raw.norm_num_groups),
            ));
        }
        if raw.scaling_factor == 0.0 {
            return Err(ConfigError::unsupported("scaling_factor", 0.0));
        }
        let sample_size = match &raw.sample_size {
            OneOrMany::One(s) => *s,
            OneOrMany::Many(v) => {
                *v.first().ok_or_else(|| ConfigError::new("sample_size", "is an empty list"))?
            }
        };
        Ok(Self {
            in_channels: raw.in_channels,
            out_channels: raw.out_channels,
            block_out_channels: raw.block_out_channels,
            layers_per_block: raw.layers_per_block,
            act_fn: Activation::parse(&raw.act_fn, "act_fn")?,
            latent_channels: raw.latent_channels,
            norm_num_groups: raw.norm_num_groups,
            sample_size,
            scaling_factor: raw.scaling_factor,
            shift_factor: raw.shift_factor,
            latents_mean: raw.latents_mean,
            latents_std: raw.latents_std,
            force_upcast: raw.force_upcast,
            use_quant_conv: raw.use_quant_conv,
            use_post_quant_conv: raw.use_post_quant_conv,
            mid_block_add_attention: raw.mid_block_add_attention,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn parse(json: &str) -> std::result::Result<VaeConfig, ConfigError> {
        VaeConfig::try_from(serde_json::from_str::<AutoencoderKLConfig>(json).unwrap())
    }

    #[test]
    fn an_empty_config_is_the_default_and_the_default_is_diffusers() {
        let raw: AutoencoderKLConfig = serde_json::from_str("{}").unwrap();
        assert_eq!(raw, AutoencoderKLConfig::default());
        // diffusers 0.42.1, `AutoencoderKL.__init__`.
        assert_eq!((raw.in_channels, raw.out_channels, raw.latent_channels), (3, 3, 4));
        assert_eq!(raw.block_out_channels, [64]);
        assert_eq!(raw.down_block_types, ["DownEncoderBlock2D"]);
        assert_eq!(raw.up_block_types, ["UpDecoderBlock2D"]);
        assert_eq!((raw.layers_per_block, raw.norm_num_groups), (1, 32));
        assert_eq!(raw.sample_size, OneOrMany::One(32));
        assert_eq!(raw.scaling_factor, 0.18215);
        assert_eq!((raw.shift_factor, &raw.latents_mean, &raw.latents_std), (None, &None, &None));
        assert!(raw.force_upcast && raw.use_quant_conv && raw.use_post_quant_conv);
        assert!(raw.mid_block_add_attention);

        // Unknown fields are ignored; a field given replaces only its own default.
        let raw: AutoencoderKLConfig = serde_json::from_str(
            r#"{"_class_name": "AutoencoderKL", "_diffusers_version": "0.6.0",
                "scaling_factor": 0.13025, "force_upcast": null}"#,
        )
        .unwrap();
        let expected = AutoencoderKLConfig {
            scaling_factor: 0.13025,
            force_upcast: false,
            ..AutoencoderKLConfig::default()
        };
        assert_eq!(raw, expected);
    }

    #[test]
    fn constants_come_from_the_config() {
        let cfg = parse(
            r#"{"block_out_channels": [128, 256, 512, 512], "sample_size": 1024,
                "down_block_types": ["DownEncoderBlock2D", "DownEncoderBlock2D", "DownEncoderBlock2D", "DownEncoderBlock2D"],
                "up_block_types": ["UpDecoderBlock2D", "UpDecoderBlock2D", "UpDecoderBlock2D", "UpDecoderBlock2D"],
                "scaling_factor": 0.13025, "force_upcast": true}"#,
        )
        .unwrap();
        assert_eq!(cfg.scale_factor(), 8);
        assert_eq!(cfg.sample_size, 1024);
        assert_eq!(cfg.compute_dtype(DType::F16), DType::F32);
        assert_eq!(cfg.compute_dtype(DType::BF16), DType::BF16);
        assert!(cfg.use_quant_conv && cfg.mid_block_add_attention);
    }

    #[test]
    fn unsupported_values_name_field_and_value() {
        for (json, expected) in [
            (
                r#"{"down_block_types": ["AttnDownEncoderBlock2D"]}"#,
                r#"field `down_block_types[0]`: unsupported value "AttnDownEncoderBlock2D""#,
            ),
            (
                r#"{"block_out_channels": [64, 96], "down_block_types": ["DownEncoderBlock2D", "DownEncoderBlock2D"]}"#,
                "field `up_block_types`: has 1 entries but block_out_channels has 2",
            ),
            (r#"{"act_fn": "tanh"}"#, r#"field `act_fn`: unsupported value "tanh""#),
            (
                r#"{"block_out_channels": [48], "norm_num_groups": 32}"#,
                "field `block_out_channels[0]`: 48 is not a multiple of norm_num_groups 32",
            ),
        ] {
            assert_eq!(parse(json).unwrap_err().to_string(), expected, "{json}");
        }
    }
}
