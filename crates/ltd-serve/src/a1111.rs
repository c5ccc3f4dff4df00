//! AUTOMATIC1111's web API (`/sdapi/v1/…`): its request fields turned into ltd-pipeline
//! requests, and its response shapes (`images`, `parameters`, `info` as a JSON string with
//! seeds and infotexts), after `modules/api/models.py` and `modules/processing.py`'s
//! `Processed.js`.
//!
//! Field semantics: `seed` −1 draws a random seed; `batch_size` images come from one seed as
//! one batch (diffusers' rule, as `ltd-gen --num-images`), and `n_iter` batches use seeds
//! `seed`, `seed + 1`, …, so batch k equals `ltd-gen --seed <seed + k>`. `clip_skip` counts as
//! A1111 does (1 = last layer, 2 = penultimate). Absent `width`/`height` use the model's size
//! (A1111 would use 512). Unknown fields are ignored, as A1111 does; A1111 fields we do not
//! implement are listed in `info`'s `unsupported` when they hold anything but their default.

use ltd_cli::{decode_image, random_seed};
use ltd_pipeline::{
    parse_sampler, GenerateRequest, GeneratedImage, InitImage, Inpaint, PipelineError, SamplerKind,
};
use serde::{Deserialize, Serialize};
use serde_json::{json, Map, Value};

use crate::error::ApiError;
use crate::queue::LoadedModel;

/// The fields of A1111's `StableDiffusionProcessingTxt2Img`/`Img2Img` that we read.
#[derive(Debug, Clone, Deserialize, Serialize)]
#[serde(default)]
pub struct A1111Request {
    /// The prompt.
    pub prompt: String,
    /// The negative prompt ("" = none).
    pub negative_prompt: String,
    /// −1 for a random seed.
    pub seed: i64,
    /// Denoising steps.
    pub steps: usize,
    /// Classifier-free guidance scale.
    pub cfg_scale: f64,
    /// Width; absent: the model's.
    pub width: Option<usize>,
    /// Height; absent: the model's.
    pub height: Option<usize>,
    /// The sampler, by A1111's name (`Euler a`, `DPM++ 2M`) or ltd-gen's (`euler-a`).
    pub sampler_name: Option<String>,
    /// The deprecated name of `sampler_name`.
    pub sampler_index: Option<String>,
    /// A1111's schedule type (`Automatic`, `Karras`).
    pub scheduler: Option<String>,
    /// Images per batch, from one seed.
    pub batch_size: usize,
    /// Batches.
    pub n_iter: usize,
    /// Image-to-image strength.
    pub denoising_strength: Option<f64>,
    /// DDIM's η (A1111 sends 1.0 by default; used by the ddim sampler only).
    pub eta: Option<f64>,
    /// Image-to-image input pictures, base64 (a `data:` URL prefix is allowed).
    #[serde(skip_serializing)]
    pub init_images: Option<Vec<String>>,
    /// Inpainting mask, base64 (white repaints), as `ltd-gen --mask`.
    #[serde(skip_serializing)]
    pub mask: Option<String>,
    /// Gaussian blur radius of the mask (A1111's default 4), as `--mask-blur`.
    pub mask_blur: Option<f64>,
    /// A1111's "only masked" (default true): inpaint the mask's bounding box grown by
    /// `inpaint_full_res_padding` pixels at the full size, then paste it back, as
    /// `--padding-mask-crop`.
    pub inpaint_full_res: Option<bool>,
    /// The padding of "only masked" (A1111's default 0).
    pub inpaint_full_res_padding: Option<usize>,
    /// 1 repaints the black part instead of the white.
    pub inpainting_mask_invert: Option<u8>,
    /// 1 = last layer, 2 = penultimate, …
    pub clip_skip: Option<usize>,
    /// `sd_model_checkpoint` (switches model) and `CLIP_stop_at_last_layers` are read.
    pub override_settings: Map<String, Value>,
    /// Everything else: ignored, or reported when it is an A1111 option we lack.
    #[serde(flatten, skip_serializing)]
    pub rest: Map<String, Value>,
}

impl Default for A1111Request {
    /// A1111's defaults, except the size (the model's).
    fn default() -> Self {
        Self {
            prompt: String::new(),
            negative_prompt: String::new(),
            seed: -1,
            steps: 50,
            cfg_scale: 7.0,
            width: None,
            height: None,
            sampler_name: None,
            sampler_index: None,
            scheduler: None,
            batch_size: 1,
            n_iter: 1,
            denoising_strength: None,
            eta: None,
            init_images: None,
            mask: None,
            mask_blur: None,
            inpaint_full_res: None,
            inpaint_full_res_padding: None,
            inpainting_mask_invert: None,
            clip_skip: None,
            override_settings: Map::new(),
            rest: Map::new(),
        }
    }
}

/// A1111 request fields we do not implement, with the value that means "off".
const UNSUPPORTED: &[(&str, Value)] = &[
    ("enable_hr", Value::Bool(false)),
    ("restore_faces", Value::Bool(false)),
    ("tiling", Value::Bool(false)),
    ("subseed_strength", Value::Null),
    ("seed_resize_from_h", Value::Null),
    ("seed_resize_from_w", Value::Null),
    ("styles", Value::Null),
    ("script_name", Value::Null),
    ("refiner_checkpoint", Value::Null),
    ("s_churn", Value::Null),
    ("s_tmin", Value::Null),
    ("s_noise", Value::Null),
    ("image_cfg_scale", Value::Null),
    ("resize_mode", Value::Null),
];

/// Whether a value is "nothing": null, false, 0, −1, 1 (s_noise), "", [], {}, "None".
fn is_off(v: &Value) -> bool {
    match v {
        Value::Null => true,
        Value::Bool(b) => !b,
        Value::Number(n) => n.as_f64().is_some_and(|x| x == 0.0 || x == -1.0 || x == 1.0),
        Value::String(s) => s.is_empty() || s == "None",
        Value::Array(a) => a.is_empty(),
        Value::Object(o) => o.is_empty(),
    }
}

/// A parsed request: what to run, and what we could not honour.
#[derive(Debug)]
pub struct Parsed {
    /// One request per batch (`n_iter`).
    pub requests: Vec<GenerateRequest>,
    /// `override_settings.sd_model_checkpoint`.
    pub model: Option<String>,
    /// A1111 fields we ignored although they were set.
    pub unsupported: Vec<String>,
    /// The base seed (after drawing −1).
    pub seed: u64,
}

/// Maps an ltd-gen flag in a pipeline error to the A1111 field the client sent.
pub fn field_name(flag: &str) -> &str {
    match flag {
        "guidance" => "cfg_scale",
        "num-images" => "batch_size",
        "strength" => "denoising_strength",
        "init-image" => "init_images",
        "clip-skip" => "clip_skip",
        "scheduler" => "sampler_name",
        "negative" => "negative_prompt",
        "mask-blur" => "mask_blur",
        "padding-mask-crop" => "inpaint_full_res_padding",
        other => other,
    }
}

/// An ltd-pipeline validation error as a 422 naming the A1111 field, with ltd-gen's message.
pub fn invalid(err: PipelineError) -> ApiError {
    match err {
        PipelineError::InvalidRequest { field, message } => {
            ApiError::unprocessable(format!("{}: {message}", field_name(field)))
        }
        other => ApiError::unprocessable(other.to_string()),
    }
}

/// Finds the sampler an A1111 client names: A1111's sampler name (with its schedule type, or
/// the old `… Karras` suffix) or ltd-gen's.
pub fn sampler(name: &str, schedule: Option<&str>) -> Result<Option<SamplerKind>, ApiError> {
    let name = name.trim();
    if name.is_empty() || name.eq_ignore_ascii_case("automatic") {
        return Ok(None);
    }
    let (base, karras_suffix) = match name.strip_suffix(" Karras") {
        Some(b) => (b, true),
        None => (name, false),
    };
    let schedule = schedule
        .map(str::trim)
        .filter(|s| !s.is_empty() && !s.eq_ignore_ascii_case("automatic"))
        .map(str::to_ascii_lowercase);
    let karras = karras_suffix || schedule.as_deref() == Some("karras");
    if let Some(other) = schedule.as_deref().filter(|s| *s != "karras") {
        return Err(ApiError::unprocessable(format!(
            "scheduler: schedule type {other:?} is not supported (Automatic, or Karras with DPM++ 2M)"
        )));
    }
    let found = SamplerKind::ALL.iter().copied().find(|k| {
        k.a1111_name().eq_ignore_ascii_case(base)
            && (k.a1111_schedule_type() == Some("Karras")) == karras
    });
    match found {
        Some(k) => Ok(Some(k)),
        None if !karras => parse_sampler(name).map(Some).map_err(|_| {
            ApiError::unprocessable(format!(
                "sampler_name: unknown sampler {name:?} (GET /sdapi/v1/samplers lists them)"
            ))
        }),
        None => Err(ApiError::unprocessable(format!(
            "sampler_name: {base:?} has no Karras schedule here (only DPM++ 2M)"
        ))),
    }
}

/// Decodes a base64 picture (optionally a `data:` URL).
pub fn decode_b64_image(s: &str, what: &str) -> Result<ltd_pipeline::RgbImage, ApiError> {
    use base64::Engine as _;
    let data = match s.split_once(";base64,") {
        Some((prefix, rest)) if prefix.starts_with("data:") => rest,
        _ => s,
    };
    let bytes = base64::engine::general_purpose::STANDARD
        .decode(data.trim())
        .map_err(|e| ApiError::unprocessable(format!("{what}: not base64 ({e})")))?;
    decode_image(&bytes, what).map_err(|e| ApiError::unprocessable(format!("{e:#}")))
}

impl A1111Request {
    /// The pipeline requests (checked against the loaded model) and the notes for `info`.
    pub fn parse(&self, img2img: bool, model: &LoadedModel) -> Result<Parsed, ApiError> {
        let mut unsupported: Vec<String> = Vec::new();
        for (field, off) in UNSUPPORTED {
            if let Some(v) = self.rest.get(*field) {
                if v != off && !is_off(v) {
                    unsupported.push((*field).to_string());
                }
            }
        }
        if self.seed < -1 {
            return Err(ApiError::unprocessable(format!(
                "seed: must be -1 (random) or at least 0, got {}",
                self.seed
            )));
        }
        let seed = if self.seed == -1 { random_seed() } else { self.seed as u64 };
        let name = self.sampler_name.as_deref().or(self.sampler_index.as_deref()).unwrap_or("");
        let scheduler = sampler(name, self.scheduler.as_deref())?;
        let sampler_used = scheduler.or(model.default_sampler);
        let eta = match self.eta {
            Some(e) if sampler_used == Some(SamplerKind::Ddim) => e,
            Some(e) => {
                if e != 0.0 {
                    unsupported.push("eta".into());
                }
                0.0
            }
            None => 0.0,
        };
        let mut clip_skip = self.clip_skip;
        if let Some(v) = self.override_settings.get("CLIP_stop_at_last_layers") {
            clip_skip = v.as_u64().map(|n| n as usize).or(clip_skip);
        }
        let model_override = match self.override_settings.get("sd_model_checkpoint") {
            Some(Value::String(s)) if !s.is_empty() => Some(s.clone()),
            _ => None,
        };
        for key in self.override_settings.keys() {
            if key != "sd_model_checkpoint" && key != "CLIP_stop_at_last_layers" {
                unsupported.push(format!("override_settings.{key}"));
            }
        }
        let init_image = if img2img {
            let images = self.init_images.as_deref().unwrap_or_default();
            let first = images.first().ok_or_else(|| {
                ApiError::unprocessable("init_images: img2img needs one base64 picture")
            })?;
            if images.len() > 1 {
                unsupported.push("init_images[1..]".into());
            }
            let strength = self.denoising_strength.unwrap_or(0.75);
            Some(InitImage { image: decode_b64_image(first, "init_images[0]")?, strength })
        } else {
            None
        };
        let inpaint = match self.mask.as_deref().filter(|m| img2img && !m.is_empty()) {
            Some(m) => {
                let mut mask = decode_b64_image(m, "mask")?;
                if self.inpainting_mask_invert.unwrap_or(0) != 0 {
                    mask = ltd_pipeline::RgbImage::new(
                        mask.width,
                        mask.height,
                        mask.pixels.iter().map(|v| 255 - v).collect(),
                    )
                    .map_err(invalid)?;
                }
                // A1111's fill modes other than "original" (1) start the masked area from
                // something else; ltd starts it from the noised picture, as diffusers does.
                if self.rest.get("inpainting_fill").is_some_and(|v| v.as_i64() != Some(1)) {
                    unsupported.push("inpainting_fill".into());
                }
                let mask_blur = self.mask_blur.unwrap_or(4.0);
                if !(0.0..=1000.0).contains(&mask_blur) {
                    return Err(ApiError::unprocessable(format!(
                        "mask_blur: must be between 0 and 1000, got {mask_blur}"
                    )));
                }
                Some(Inpaint {
                    mask,
                    mask_blur: mask_blur as f32,
                    padding_mask_crop: self
                        .inpaint_full_res
                        .unwrap_or(true)
                        .then(|| self.inpaint_full_res_padding.unwrap_or(0)),
                    keep_unmasked: false,
                })
            }
            None => None,
        };
        if self.n_iter == 0 {
            return Err(ApiError::unprocessable("n_iter: must be at least 1"));
        }
        if self.n_iter > 100 {
            return Err(ApiError::unprocessable("n_iter: at most 100 batches"));
        }
        let base = GenerateRequest {
            prompts: vec![self.prompt.clone()],
            negative: Some(self.negative_prompt.clone()).filter(|n| !n.is_empty()),
            steps: self.steps,
            guidance: self.cfg_scale,
            scheduler,
            eta,
            width: self.width,
            height: self.height,
            num_images: self.batch_size,
            seed,
            // A1111 counts the last layer as 1; ltd-gen's --clip-skip 1 is the penultimate.
            clip_skip: clip_skip.and_then(|k| k.checked_sub(1)).filter(|&k| k > 0),
            init_image,
            inpaint,
            ..GenerateRequest::default()
        };
        base.validate().map_err(invalid)?;
        base.size(model.default_size, model.scale_factor).map_err(invalid)?;
        let requests = (0..self.n_iter as u64)
            .map(|k| GenerateRequest { seed: seed.wrapping_add(k), ..base.clone() })
            .collect();
        Ok(Parsed { requests, model: model_override, unsupported, seed })
    }
}

/// A1111's `info`: `Processed.js()` for the images made.
pub fn info(
    req: &A1111Request,
    parsed: &Parsed,
    images: &[GeneratedImage],
    model: &str,
    job_timestamp: &str,
) -> Value {
    let first = images.first().map(|i| &i.params);
    let infotexts: Vec<String> = images.iter().map(|i| i.params.to_infotext()).collect();
    let seeds: Vec<u64> = images.iter().map(|i| i.params.seed).collect();
    let prompts: Vec<&str> = images.iter().map(|i| i.params.prompt.as_str()).collect();
    let negatives: Vec<&str> = images.iter().map(|_| req.negative_prompt.as_str()).collect();
    json!({
        "prompt": req.prompt,
        "all_prompts": prompts,
        "negative_prompt": req.negative_prompt,
        "all_negative_prompts": negatives,
        "seed": parsed.seed,
        "all_seeds": seeds,
        "subseed": -1,
        "all_subseeds": images.iter().map(|_| -1).collect::<Vec<_>>(),
        "subseed_strength": 0,
        "width": first.map(|p| p.width),
        "height": first.map(|p| p.height),
        "sampler_name": first.map(|p| p.sampler.as_str()),
        "scheduler": first.and_then(|p| p.schedule_type.as_deref()).unwrap_or("Automatic"),
        "cfg_scale": req.cfg_scale,
        "steps": req.steps,
        "batch_size": req.batch_size,
        "n_iter": req.n_iter,
        "restore_faces": false,
        "face_restoration_model": null,
        "sd_model_name": model,
        "sd_model_hash": null,
        "sd_vae_name": null,
        "sd_vae_hash": null,
        "seed_resize_from_w": -1,
        "seed_resize_from_h": -1,
        "denoising_strength": parsed.requests.first().and_then(|r| r.init_image.as_ref()).map(|i| i.strength),
        "extra_generation_params": {},
        "index_of_first_image": 0,
        "infotexts": infotexts,
        "styles": [],
        "job_timestamp": job_timestamp,
        "clip_skip": req.clip_skip.unwrap_or(1),
        "is_using_inpainting_conditioning": false,
        "version": format!("ltd {}", env!("CARGO_PKG_VERSION")),
        "unsupported": parsed.unsupported,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn finds_samplers_by_a1111_and_ltd_names() {
        let s = |n: &str, sch: Option<&str>| sampler(n, sch).map_err(|e| e.message);
        assert_eq!(s("Euler a", Some("automatic")).unwrap(), Some(SamplerKind::EulerAncestral));
        assert_eq!(s("DPM++ 2M", Some("Karras")).unwrap(), Some(SamplerKind::DpmPp2mKarras));
        assert_eq!(s("DPM++ 2M Karras", None).unwrap(), Some(SamplerKind::DpmPp2mKarras));
        assert_eq!(s("DPM++ 2M", None).unwrap(), Some(SamplerKind::DpmPp2m));
        assert_eq!(s("euler-a", None).unwrap(), Some(SamplerKind::EulerAncestral));
        assert_eq!(s("", None).unwrap(), None);
        assert!(s("Euler", Some("Exponential")).unwrap_err().starts_with("scheduler:"));
        assert!(s("Euler b", None).unwrap_err().starts_with("sampler_name: unknown sampler"));
        assert!(s("Euler", Some("Karras")).unwrap_err().contains("no Karras schedule"));
    }

    #[test]
    fn reports_set_options_we_lack() {
        let model = LoadedModel {
            title: "m".into(),
            default_size: (64, 64),
            scale_factor: 8,
            default_sampler: None,
        };
        let req: A1111Request = serde_json::from_value(json!({
            "prompt": "a", "steps": 2, "restore_faces": true, "tiling": false, "eta": 1.0,
            "subseed_strength": 0.0, "styles": [], "whatever": 3,
            "override_settings": {"sd_vae": "x"}
        }))
        .unwrap();
        let p = req.parse(false, &model).unwrap();
        assert_eq!(p.unsupported, ["restore_faces", "eta", "override_settings.sd_vae"]);
        let bad: A1111Request = serde_json::from_value(json!({"width": 60, "steps": 2})).unwrap();
        let e = bad.parse(false, &model).unwrap_err().message;
        assert_eq!(e, "width: 60 is not a multiple of the model's VAE scale factor 8");
        let clip: A1111Request = serde_json::from_value(json!({"clip_skip": 2})).unwrap();
        assert_eq!(clip.parse(false, &model).unwrap().requests[0].clip_skip, Some(1));
    }
}
