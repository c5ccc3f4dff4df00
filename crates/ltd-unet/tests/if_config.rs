//! DeepFloyd IF's U-Net configs: the IF block family resolves as diffusers builds it (head
//! widths from `attention_head_dim`, unreversed in the up blocks), and bad values of its
//! fields are errors that name the field.

use ltd_nn::ConfigError;
use ltd_unet::{UNet2DConditionModelConfig, UNetConfig};

fn parse(json: &str) -> Result<UNetConfig, ConfigError> {
    let raw: UNet2DConditionModelConfig = serde_json::from_str(json).unwrap();
    UNetConfig::try_from(raw)
}

const IF: &str = r#""block_out_channels": [32, 64], "layers_per_block": 1,
    "down_block_types": ["ResnetDownsampleBlock2D", "SimpleCrossAttnDownBlock2D"],
    "mid_block_type": "UNetMidBlock2DSimpleCrossAttn",
    "up_block_types": ["SimpleCrossAttnUpBlock2D", "ResnetUpsampleBlock2D"],
    "cross_attention_dim": 32, "encoder_hid_dim": 48, "addition_embed_type": "text",
    "addition_embed_type_num_heads": 2, "resnet_time_scale_shift": "scale_shift""#;

fn with(extra: &str) -> String {
    format!("{{{IF}{extra}}}")
}

#[test]
fn if_blocks_resolve_as_in_diffusers() {
    let cfg =
        parse(&with(r#", "attention_head_dim": [8, 16], "cross_attention_norm": "group_norm""#))
            .unwrap();
    assert_eq!(cfg.down_blocks[0].kind, "ResnetDownsampleBlock2D");
    assert_eq!(cfg.down_blocks[1].kind, "SimpleCrossAttnDownBlock2D");
    let down = cfg.down_blocks[1].simple.as_ref().unwrap();
    assert_eq!((down.attentions[0].heads, down.attentions[0].dim_head), (4, 16));
    assert!(down.attentions[0].cross_attention_norm);
    // diffusers gives up block i `attention_head_dim[i]`, not the reversed list.
    let up = cfg.up_blocks[0].simple.as_ref().unwrap();
    assert_eq!((up.attentions[0].heads, up.attentions[0].dim_head), (8, 8));
    assert!(cfg.up_blocks[1].simple.as_ref().unwrap().sampler.is_none());
    assert!(cfg.down_blocks[0].simple.as_ref().unwrap().sampler.is_some());
    let text = cfg.text_addition_embedding.unwrap();
    assert_eq!((text.encoder_dim, text.num_heads), (48, 2));
    assert_eq!(cfg.downsampling_factor(), 2);
}

#[test]
fn bad_if_values_name_the_field() {
    for (extra, expected) in [
        (
            r#", "cross_attention_norm": "layer_norm""#,
            r#"field `cross_attention_norm`: unsupported value "layer_norm""#,
        ),
        (
            r#", "encoder_hid_dim_type": "text_proj", "encoder_hid_dim": 49"#,
            "field `addition_embed_type_num_heads`: 2 heads do not divide the text width 49",
        ),
        (
            r#", "attention_head_dim": [8, 128]"#,
            "field `attention_head_dim[1]`: heads of 128 channels do not fit 64 channels",
        ),
    ] {
        // A later duplicate would be a JSON error: drop the base's value of a field redefined.
        let base = if extra.contains("encoder_hid_dim\"") {
            IF.replace(r#""encoder_hid_dim": 48, "#, "")
        } else {
            IF.to_string()
        };
        let json = format!("{{{base}{extra}}}");
        assert_eq!(parse(&json).unwrap_err().to_string(), expected, "{json}");
    }
}
