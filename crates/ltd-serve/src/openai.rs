//! OpenAI's images API (`POST /v1/images/generations`): `prompt`, `n`, `size`,
//! `response_format` (`b64_json` only: this server keeps no files to link to) and `model`
//! (used when it names a model of `/sdapi/v1/sd-models`, else ignored, as OpenAI model names
//! mean nothing here). Everything else uses ltd-gen's defaults; a `seed` field, which OpenAI
//! lacks, is honoured for reproducibility.

use ltd_cli::random_seed;
use ltd_pipeline::GenerateRequest;
use serde::Deserialize;
use serde_json::{json, Value};

use crate::a1111::invalid;
use crate::error::ApiError;
use crate::queue::LoadedModel;

/// The request body.
#[derive(Debug, Clone, Deserialize)]
pub struct ImagesRequest {
    /// The prompt (required).
    pub prompt: String,
    /// Images to make, 1 to 10.
    #[serde(default = "one")]
    pub n: usize,
    /// `WIDTHxHEIGHT`, or `auto` for the model's size.
    pub size: Option<String>,
    /// `b64_json` (the default here).
    pub response_format: Option<String>,
    /// A model title of this server, or anything (ignored).
    pub model: Option<String>,
    /// Not OpenAI's: a seed, for reproducible images.
    pub seed: Option<u64>,
}

fn one() -> usize {
    1
}

/// ltd-gen's flag names as this API's fields.
pub fn field_name(flag: &str) -> &str {
    match flag {
        "num-images" => "n",
        "width" | "height" => "size",
        other => other,
    }
}

impl ImagesRequest {
    /// The pipeline request, checked against the loaded model.
    pub fn parse(&self, model: &LoadedModel) -> Result<GenerateRequest, ApiError> {
        if let Some(f) = self.response_format.as_deref().filter(|f| *f != "b64_json") {
            return Err(ApiError::bad_request(format!(
                "response_format: only b64_json is supported, not {f:?}"
            )));
        }
        if !(1..=10).contains(&self.n) {
            return Err(ApiError::bad_request(format!("n: must be 1 to 10, got {}", self.n)));
        }
        let (width, height) = match self.size.as_deref().filter(|s| *s != "auto") {
            None => (None, None),
            Some(s) => {
                let bad = || {
                    ApiError::bad_request(format!("size: expected WIDTHxHEIGHT or auto, got {s:?}"))
                };
                let (w, h) = s.split_once('x').ok_or_else(bad)?;
                (Some(w.parse().map_err(|_| bad())?), Some(h.parse().map_err(|_| bad())?))
            }
        };
        let req = GenerateRequest {
            prompts: vec![self.prompt.clone()],
            num_images: self.n,
            width,
            height,
            seed: self.seed.unwrap_or_else(random_seed),
            ..GenerateRequest::default()
        };
        let to_openai = |e| {
            let mut e = invalid(e);
            e.status = axum::http::StatusCode::BAD_REQUEST;
            e.message = e.message.replacen("width:", "size:", 1).replacen("height:", "size:", 1);
            e
        };
        req.validate().map_err(to_openai)?;
        req.size(model.default_size, model.scale_factor).map_err(to_openai)?;
        Ok(req)
    }
}

/// The response body: `{created, data: [{b64_json, revised_prompt}]}`.
pub fn response(req: &ImagesRequest, images: Vec<String>) -> Value {
    let created = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_secs())
        .unwrap_or(0);
    let data: Vec<Value> =
        images.into_iter().map(|b| json!({"b64_json": b, "revised_prompt": req.prompt})).collect();
    json!({"created": created, "data": data})
}
