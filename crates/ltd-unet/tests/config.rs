//! `unet/config.json` validation: diffusers' defaults, the historical meaning of
//! `attention_head_dim`, and errors that name the field and the value.

use ltd_nn::{ConfigError, OneOrMany};
use ltd_unet::{UNet2DConditionModelConfig, UNetConfig};

fn parse(json: &str) -> Result<UNetConfig, ConfigError> {
    let raw: UNet2DConditionModelConfig = serde_json::from_str(json).unwrap();
    UNetConfig::try_from(raw)
}

#[test]
fn defaults_are_sd1_and_heads_come_from_attention_head_dim() {
    let cfg = parse("{}").unwrap();
    assert_eq!(cfg.block_out_channels, [320, 640, 1280, 1280]);
    let t = &cfg.down_blocks[0].attentions[0];
    assert_eq!((t.heads, t.head_dim), (8, 40), "attention_head_dim counts heads");
    let t = &cfg.up_blocks[3].attentions[2];
    assert_eq!((t.in_channels, t.heads, t.head_dim), (320, 8, 40));
    assert_eq!(cfg.up_blocks[3].resnets[0].in_channels, 640 + 320);
    assert_eq!(cfg.up_blocks[3].resnets[2].in_channels, 320 + 320);
    assert_eq!(cfg.time_embed_dim, 1280);
    assert_eq!(cfg.downsampling_factor(), 8);
    let with_heads = parse(r#"{"num_attention_heads": [5, 10, 20, 20]}"#).unwrap();
    let t = &with_heads.up_blocks[1].attentions[0];
    assert_eq!((t.heads, t.head_dim), (20, 64), "up blocks take reversed head counts");
}

#[test]
fn unsupported_values_name_field_and_value() {
    for (json, expected) in [
        (
            r#"{"down_block_types": ["CrossAttnDownBlock2D", "AttnDownBlock2D", "CrossAttnDownBlock2D", "DownBlock2D"]}"#,
            r#"field `down_block_types[1]`: unsupported value "AttnDownBlock2D""#,
        ),
        (
            r#"{"up_block_types": ["UpBlock2D", "AttnUpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D"]}"#,
            r#"field `up_block_types[1]`: unsupported value "AttnUpBlock2D""#,
        ),
        (
            r#"{"mid_block_type": "UNetMidBlock2DSelfAttn"}"#,
            r#"field `mid_block_type`: unsupported value "UNetMidBlock2DSelfAttn""#,
        ),
        (
            r#"{"resnet_time_scale_shift": "spatial"}"#,
            r#"field `resnet_time_scale_shift`: unsupported value "spatial""#,
        ),
        (
            r#"{"addition_embed_type": "image"}"#,
            r#"field `addition_embed_type`: unsupported value "image""#,
        ),
        (
            r#"{"class_embed_type": "learned"}"#,
            r#"field `class_embed_type`: unsupported value "learned""#,
        ),
        (
            r#"{"time_embedding_type": "fourier"}"#,
            r#"field `time_embedding_type`: unsupported value "fourier""#,
        ),
        (r#"{"act_fn": "tanh"}"#, r#"field `act_fn`: unsupported value "tanh""#),
        (
            r#"{"encoder_hid_dim_type": "image_proj", "encoder_hid_dim": 8}"#,
            r#"field `encoder_hid_dim_type`: unsupported value "image_proj""#,
        ),
        (
            r#"{"encoder_hid_dim_type": "text_proj"}"#,
            r#"field `encoder_hid_dim`: is required by encoder_hid_dim_type "text_proj""#,
        ),
        (
            r#"{"encoder_hid_dim": 8, "cross_attention_dim": [8, 8, 8, 8]}"#,
            r#"field `cross_attention_dim`: encoder_hid_dim_type "text_proj" projects to one cross_attention_dim, not a per-block list [8, 8, 8, 8]"#,
        ),
        (
            r#"{"attention_type": "gated"}"#,
            r#"field `attention_type`: unsupported value "gated""#,
        ),
        (
            r#"{"dual_cross_attention": true}"#,
            r#"field `dual_cross_attention`: unsupported value true"#,
        ),
        (
            r#"{"attention_head_dim": [8, 8]}"#,
            r#"field `attention_head_dim`: has 2 entries ([8, 8]) but the model has 4 blocks"#,
        ),
        (
            r#"{"addition_embed_type": "text_time", "addition_time_embed_dim": 256}"#,
            r#"field `projection_class_embeddings_input_dim`: is required by addition_embed_type "text_time""#,
        ),
        (
            r#"{"transformer_layers_per_block": [[1, 1], [1, 1], [1, 1], [1, 1]]}"#,
            "field `transformer_layers_per_block`: per-layer lists need reverse_transformer_layers_per_block (as in diffusers)",
        ),
        (r#"{"conv_in_kernel": 4}"#, "field `conv_in_kernel`: unsupported even kernel size 4"),
    ] {
        assert_eq!(parse(json).unwrap_err().to_string(), expected, "{json}");
    }
}

#[test]
fn null_booleans_are_false_and_block_names_may_carry_unetres() {
    let cfg = parse(
        r#"{"upcast_attention": null, "use_linear_projection": null,
            "down_block_types": ["UNetResCrossAttnDownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "DownBlock2D"]}"#,
    )
    .unwrap();
    assert!(!cfg.down_blocks[0].attentions[0].upcast_attention);
    assert_eq!(cfg.down_blocks[0].kind, "CrossAttnDownBlock2D");
}

#[test]
fn an_empty_config_is_the_default_and_the_default_is_diffusers() {
    let raw: UNet2DConditionModelConfig = serde_json::from_str("{}").unwrap();
    assert_eq!(raw, UNet2DConditionModelConfig::default());
    // diffusers 0.42.1, `UNet2DConditionModel.__init__`.
    assert_eq!(raw.sample_size, None);
    assert_eq!((raw.in_channels, raw.out_channels), (4, 4));
    assert!(raw.flip_sin_to_cos && !raw.center_input_sample);
    assert_eq!(raw.down_block_types[0], "CrossAttnDownBlock2D");
    assert_eq!(raw.mid_block_type.as_deref(), Some("UNetMidBlock2DCrossAttn"));
    assert_eq!(raw.up_block_types[0], "UpBlock2D");
    assert_eq!(raw.block_out_channels, [320, 640, 1280, 1280]);
    assert_eq!(raw.layers_per_block, OneOrMany::One(2));
    assert_eq!((raw.norm_num_groups, raw.norm_eps), (Some(32), 1e-5));
    assert_eq!(raw.cross_attention_dim, OneOrMany::One(1280));
    assert_eq!(raw.attention_head_dim, OneOrMany::One(8));
    assert_eq!(raw.num_attention_heads, None);
    assert_eq!((raw.conv_in_kernel, raw.conv_out_kernel), (3, 3));
    assert_eq!(raw.addition_embed_type_num_heads, 64);

    // Unknown fields are ignored; a field given replaces only its own default, and a null
    // `mid_block_type` means no mid block rather than the default one.
    let raw: UNet2DConditionModelConfig = serde_json::from_str(
        r#"{"_class_name": "UNet2DConditionModel", "_diffusers_version": "0.6.0",
            "sample_size": 64, "mid_block_type": null, "upcast_attention": null}"#,
    )
    .unwrap();
    let expected = UNet2DConditionModelConfig {
        sample_size: Some(OneOrMany::One(64)),
        mid_block_type: None,
        ..UNet2DConditionModelConfig::default()
    };
    assert_eq!(raw, expected);
}

#[test]
fn encoder_hid_dim_alone_means_text_proj_as_in_diffusers() {
    let cfg = parse(r#"{"encoder_hid_dim": 4096, "cross_attention_dim": 768}"#).unwrap();
    assert_eq!(cfg.encoder_hid_dim, Some(4096));
    assert_eq!(cfg.encoder_hidden_dim(), 4096);
    let cfg = parse(
        r#"{"encoder_hid_dim": 48, "encoder_hid_dim_type": "text_proj", "cross_attention_dim": 24}"#,
    )
    .unwrap();
    assert_eq!((cfg.encoder_hid_dim, cfg.cross_attention_dim[0]), (Some(48), 24));
    assert_eq!(parse("{}").unwrap().encoder_hid_dim, None);
}
