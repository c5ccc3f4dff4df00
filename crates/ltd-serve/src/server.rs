//! The HTTP routes: A1111's `/sdapi/v1/…`, OpenAI's `/v1/images/generations` and the page at
//! `/`, with what wraps them all: request ids and logs, the optional API key, and the body
//! size limit.
//!
//! Handlers only translate: bodies into pipeline requests (`a1111`, `openai`), jobs into the
//! queue (`queue`), images into base64 PNGs whose bytes are `ltd-gen`'s.

use std::sync::Arc;
use std::time::Instant;

use axum::body::{Body, Bytes};
use axum::extract::{Query, Request, State};
use axum::http::{header, HeaderMap, StatusCode};
use axum::middleware::{self, Next};
use axum::response::{Html, IntoResponse, Response};
use axum::routing::{get, post};
use axum::{Json, Router};
use base64::Engine as _;
use http_body_util::BodyExt as _;
use serde::de::DeserializeOwned;
use serde::Deserialize;
use serde_json::{json, Value};

use crate::a1111::{self, A1111Request};
use crate::error::ApiError;
use crate::openai;
use crate::queue::{JobError, JobKind, Output, Queue, Refused};

/// What every handler sees.
#[derive(Clone)]
pub struct AppState {
    /// The generation queue.
    pub queue: Arc<Queue>,
    /// `--api-key`.
    pub api_key: Option<String>,
    /// The largest request body, in bytes.
    pub body_limit: usize,
}

/// The request id the logging layer gave this request.
#[derive(Debug, Clone, Copy)]
struct RequestId(u64);

/// The page, embedded in the binary.
const PAGE: &str = include_str!("page.html");

/// All routes.
pub fn router(state: AppState) -> Router {
    Router::new()
        .route("/", get(|| async { Html(PAGE) }))
        .route("/sdapi/v1/txt2img", post(txt2img))
        .route("/sdapi/v1/img2img", post(img2img))
        .route("/sdapi/v1/sd-models", get(sd_models))
        .route("/sdapi/v1/samplers", get(samplers))
        .route("/sdapi/v1/schedulers", get(schedulers))
        .route("/sdapi/v1/options", get(get_options).post(set_options))
        .route("/sdapi/v1/progress", get(progress))
        .route("/sdapi/v1/interrupt", post(interrupt))
        // Clients (webuiapi) ask which scripts exist: none here.
        .route("/sdapi/v1/scripts", get(|| async { Json(json!({"txt2img": [], "img2img": []})) }))
        .route("/v1/images/generations", post(openai_generations))
        .fallback(|| async { ApiError::new(StatusCode::NOT_FOUND, "no such endpoint") })
        .layer(middleware::from_fn(json_only))
        .layer(middleware::from_fn_with_state(state.clone(), auth))
        .layer(middleware::from_fn_with_state(state.clone(), log_requests))
        .with_state(state)
}

/// A span per request with its id, and one log line when it is answered.
async fn log_requests(State(state): State<AppState>, mut req: Request, next: Next) -> Response {
    let id = state.queue.next_id();
    req.extensions_mut().insert(RequestId(id));
    let (method, path) = (req.method().clone(), req.uri().path().to_string());
    let span = tracing::info_span!("request", id, %method, %path);
    let start = Instant::now();
    let res = tracing::Instrument::instrument(next.run(req), span.clone()).await;
    let _e = span.enter();
    tracing::info!(
        status = res.status().as_u16(),
        ms = start.elapsed().as_millis() as u64,
        "answered"
    );
    res
}

/// Compares without an early exit, so the time taken says nothing about the key.
fn same(a: &[u8], b: &[u8]) -> bool {
    a.len() == b.len() && a.iter().zip(b).fold(0u8, |acc, (x, y)| acc | (x ^ y)) == 0
}

/// Whether the headers carry the key: `Authorization: Bearer KEY`, or HTTP basic auth (A1111's
/// `--api-auth`) whose password is KEY, or whose `user:password` is KEY.
fn authorized(headers: &HeaderMap, key: &str) -> bool {
    let Some(value) = headers.get(header::AUTHORIZATION).and_then(|v| v.to_str().ok()) else {
        return false;
    };
    if let Some(token) = value.strip_prefix("Bearer ") {
        return same(token.trim().as_bytes(), key.as_bytes());
    }
    if let Some(b64) = value.strip_prefix("Basic ") {
        let Ok(raw) = base64::engine::general_purpose::STANDARD.decode(b64.trim()) else {
            return false;
        };
        let password = raw.iter().position(|&c| c == b':').map_or(&[][..], |i| &raw[i + 1..]);
        return same(password, key.as_bytes()) | same(&raw, key.as_bytes());
    }
    false
}

async fn auth(State(state): State<AppState>, req: Request, next: Next) -> Response {
    match &state.api_key {
        Some(key) if !authorized(req.headers(), key) => {
            let mut res =
                ApiError::new(StatusCode::UNAUTHORIZED, "missing or wrong API key").into_response();
            // Lets a browser ask for it (user name: anything, password: the key).
            res.headers_mut().insert(
                header::WWW_AUTHENTICATE,
                header::HeaderValue::from_static("Basic realm=\"ltd-serve\""),
            );
            res
        }
        _ => next.run(req).await,
    }
}

/// Refuses a POST body that is not declared JSON (415). Browsers send other pages' form and
/// `text/plain` posts without asking first, but a JSON one only after a CORS preflight, which
/// this server never grants: so no web page can make a visitor's browser drive a local
/// server. Bodiless POSTs (`/interrupt`, as clients send it) pass.
async fn json_only(req: Request, next: Next) -> Response {
    let headers = req.headers();
    let has_body = headers.contains_key(header::CONTENT_TYPE)
        || headers
            .get(header::CONTENT_LENGTH)
            .and_then(|v| v.to_str().ok())
            .is_some_and(|v| v.trim() != "0")
        || headers.contains_key(header::TRANSFER_ENCODING);
    let json = headers
        .get(header::CONTENT_TYPE)
        .and_then(|v| v.to_str().ok())
        .is_some_and(|v| v.trim_start().to_ascii_lowercase().starts_with("application/json"));
    if req.method() == axum::http::Method::POST && has_body && !json {
        let e = ApiError::new(
            StatusCode::UNSUPPORTED_MEDIA_TYPE,
            "send the body as JSON, with Content-Type: application/json",
        );
        return if req.uri().path().starts_with("/v1/") { e.openai() } else { e }.into_response();
    }
    next.run(req).await
}

/// Reads the body, refusing one over the limit with 413. An oversized body is still read (and
/// dropped) to its end, up to 256 MiB past the limit, so that a client that sends it whole
/// before reading the answer gets the message rather than a reset connection.
async fn read_body(body: Body, limit: usize) -> Result<Bytes, ApiError> {
    let mut body = body;
    let mut buf = Vec::new();
    let mut total = 0usize;
    while let Some(frame) = body.frame().await {
        let frame = frame.map_err(|e| ApiError::bad_request(format!("request body: {e}")))?;
        let Ok(data) = frame.into_data() else { continue };
        total += data.len();
        if total > limit {
            if total - limit > DRAIN_MAX {
                break;
            }
            continue;
        }
        buf.extend_from_slice(&data);
    }
    if total > limit {
        return Err(ApiError::new(
            StatusCode::PAYLOAD_TOO_LARGE,
            format!("request body: over the limit of {limit} bytes (the server's --max-body-mib)"),
        ));
    }
    Ok(Bytes::from(buf))
}

/// How much of an oversized body is read and dropped before the connection is given up.
const DRAIN_MAX: usize = 256 << 20;

/// Parses a JSON object: a syntax error is a 400, a wrong type a 422 naming the field. JSON
/// nulls count as absent, as A1111's optional fields do.
fn parse_json<T: DeserializeOwned>(bytes: &[u8]) -> Result<T, ApiError> {
    let value: Value = serde_json::from_slice(bytes)
        .map_err(|e| ApiError::bad_request(format!("request body is not valid JSON: {e}")))?;
    let Value::Object(mut map) = value else {
        return Err(ApiError::unprocessable("request body: expected a JSON object"));
    };
    map.retain(|_, v| !v.is_null());
    serde_path_to_error::deserialize(Value::Object(map)).map_err(|e| {
        let path = e.path().to_string();
        ApiError::unprocessable(format!("{path}: {}", e.into_inner()))
    })
}

/// Leaves the queue if the request is dropped (its client gone) before the job answered.
struct Abandon<'a> {
    queue: &'a Queue,
    job: Option<Arc<crate::queue::Job>>,
}

impl Drop for Abandon<'_> {
    fn drop(&mut self) {
        if let Some(job) = self.job.take() {
            tracing::info!("client gone; job dropped");
            self.queue.abandon(&job);
        }
    }
}

/// Queues a job and waits for it.
async fn run_job(state: &AppState, id: u64, kind: JobKind) -> Result<Output, JobError> {
    let (job, rx) = match state.queue.submit(id, kind) {
        Ok(x) => x,
        Err(Refused::Full) => return Err(JobError::Failed(QUEUE_FULL.into())),
        Err(Refused::ShuttingDown) => return Err(JobError::ShuttingDown),
    };
    let mut guard = Abandon { queue: &state.queue, job: Some(job) };
    let result = rx.await.unwrap_or(Err(JobError::ShuttingDown));
    guard.job = None;
    result
}

const QUEUE_FULL: &str = "the queue is full; retry later";

/// A job's failure as an HTTP error (`field` maps ltd-gen's flag names to the API's).
fn job_error(e: JobError, field: fn(&str) -> &str) -> ApiError {
    match e {
        JobError::Invalid { field: f, message } => {
            ApiError::unprocessable(format!("{}: {message}", field(f)))
        }
        JobError::UnknownModel(m) => ApiError::unprocessable(format!(
            "sd_model_checkpoint: unknown model {m:?} (GET /sdapi/v1/sd-models lists them)"
        )),
        JobError::Interrupted { step, total } => {
            ApiError::new(StatusCode::CONFLICT, format!("interrupted after step {step} of {total}"))
        }
        JobError::ShuttingDown => {
            let mut e =
                ApiError::new(StatusCode::SERVICE_UNAVAILABLE, "the server is shutting down");
            e.retry_after = Some(5);
            e
        }
        JobError::Failed(m) if m == QUEUE_FULL => {
            let mut e = ApiError::new(StatusCode::SERVICE_UNAVAILABLE, m);
            e.retry_after = Some(2);
            e
        }
        JobError::Failed(m) => ApiError::new(StatusCode::INTERNAL_SERVER_ERROR, m),
    }
}

/// The images as base64 PNGs, with their `parameters` chunk: `ltd-gen`'s bytes.
fn encode_images(out: &Output) -> Result<Vec<String>, ApiError> {
    out.images
        .iter()
        .map(|img| {
            ltd_cli::encode_png(&img.image, &img.params.to_infotext())
                .map(|png| base64::engine::general_purpose::STANDARD.encode(png))
                .map_err(|e| ApiError::new(StatusCode::INTERNAL_SERVER_ERROR, format!("{e:#}")))
        })
        .collect()
}

async fn txt2img(
    State(state): State<AppState>,
    axum::Extension(RequestId(id)): axum::Extension<RequestId>,
    body: Body,
) -> Result<Json<Value>, ApiError> {
    a1111_generate(state, id, body, false).await
}

async fn img2img(
    State(state): State<AppState>,
    axum::Extension(RequestId(id)): axum::Extension<RequestId>,
    body: Body,
) -> Result<Json<Value>, ApiError> {
    a1111_generate(state, id, body, true).await
}

async fn a1111_generate(
    state: AppState,
    id: u64,
    body: Body,
    img2img: bool,
) -> Result<Json<Value>, ApiError> {
    let bytes = read_body(body, state.body_limit).await?;
    let req: A1111Request = parse_json(&bytes)?;
    let parsed = req.parse(img2img, &state.queue.loaded())?;
    tracing::info!(
        prompt_chars = req.prompt.chars().count(),
        seed = parsed.seed,
        batches = parsed.requests.len(),
        unsupported = ?parsed.unsupported,
        "queued"
    );
    let kind = JobKind::Generate { model: parsed.model.clone(), requests: parsed.requests.clone() };
    let job_timestamp = crate::queue::timestamp();
    let (out, interrupted) = match run_job(&state, id, kind).await {
        Ok(out) => (out, None),
        // A1111 answers an interrupted job normally, with what it has (here: nothing).
        Err(JobError::Interrupted { step, total }) => {
            let out =
                Output { images: Vec::new(), model: state.queue.loaded().title, seconds: 0.0 };
            (out, Some(format!("interrupted after step {step} of {total}")))
        }
        Err(e) => return Err(job_error(e, a1111::field_name)),
    };
    tracing::info!(images = out.images.len(), generate_s = out.seconds, "done");
    let images = encode_images(&out)?;
    let mut info = a1111::info(&req, &parsed, &out.images, &out.model, &job_timestamp);
    if let Some(msg) = interrupted {
        info["interrupted"] = json!(true);
        info["detail"] = json!(msg);
    }
    let mut parameters = serde_json::to_value(&req).unwrap_or(Value::Null);
    parameters["seed"] = json!(parsed.seed);
    Ok(Json(json!({
        "images": images,
        "parameters": parameters,
        "info": info.to_string(),
    })))
}

async fn sd_models(State(state): State<AppState>) -> Json<Value> {
    let list: Vec<Value> = state
        .queue
        .models
        .iter()
        .map(|m| {
            let filename = m.args.model.clone().unwrap_or_else(|| m.title.clone());
            json!({"title": m.title, "model_name": m.title, "hash": null, "sha256": null,
                   "filename": filename, "config": null})
        })
        .collect();
    Json(Value::Array(list))
}

async fn samplers() -> Json<Value> {
    let mut list: Vec<Value> = Vec::new();
    for kind in ltd_pipeline::SamplerKind::ALL {
        let name = kind.a1111_name();
        match list.iter_mut().find(|v| v["name"] == name) {
            Some(v) => {
                v["aliases"].as_array_mut().into_iter().for_each(|a| a.push(json!(kind.name())))
            }
            None => list.push(json!({"name": name, "aliases": [kind.name()], "options": {}})),
        }
    }
    Json(Value::Array(list))
}

async fn schedulers() -> Json<Value> {
    Json(json!([
        {"name": "automatic", "label": "Automatic", "aliases": null, "default_rho": -1, "need_inner_model": false},
        {"name": "karras", "label": "Karras", "aliases": null, "default_rho": 7.0, "need_inner_model": false},
    ]))
}

async fn get_options(State(state): State<AppState>) -> Json<Value> {
    Json(json!({
        "sd_model_checkpoint": state.queue.loaded().title,
        "CLIP_stop_at_last_layers": 1,
        "samples_format": "png",
    }))
}

async fn set_options(
    State(state): State<AppState>,
    axum::Extension(RequestId(id)): axum::Extension<RequestId>,
    body: Body,
) -> Result<Json<Value>, ApiError> {
    let bytes = read_body(body, state.body_limit).await?;
    let options: serde_json::Map<String, Value> = parse_json(&bytes)?;
    for key in options.keys().filter(|k| *k != "sd_model_checkpoint") {
        tracing::info!(option = %key, "option not supported; ignored");
    }
    if let Some(v) = options.get("sd_model_checkpoint") {
        let Some(title) = v.as_str() else {
            return Err(ApiError::unprocessable("sd_model_checkpoint: expected a string"));
        };
        run_job(&state, id, JobKind::SwitchModel(title.to_string()))
            .await
            .map_err(|e| job_error(e, a1111::field_name))?;
    }
    Ok(Json(Value::Null))
}

#[derive(Deserialize)]
struct ProgressQuery {
    #[serde(default)]
    skip_current_image: bool,
}

async fn progress(State(state): State<AppState>, Query(q): Query<ProgressQuery>) -> Json<Value> {
    let s = state.queue.status(!q.skip_current_image);
    let fraction = if s.steps == 0 || s.batches == 0 {
        0.0
    } else {
        (s.batch as f64 + s.step as f64 / s.steps as f64) / s.batches as f64
    };
    let elapsed = s.started.map_or(0.0, |t| t.elapsed().as_secs_f64());
    let eta = if fraction > 0.0 { elapsed / fraction - elapsed } else { 0.0 };
    Json(json!({
        "progress": fraction,
        "eta_relative": eta,
        "state": {
            "skipped": false,
            "interrupted": s.interrupted,
            "stopping_generation": false,
            "job": s.job.map(|j| format!("task({j})")).unwrap_or_default(),
            "job_count": s.job_count,
            "job_timestamp": s.job_timestamp,
            "job_no": s.batch,
            "sampling_step": s.step,
            "sampling_steps": s.steps,
        },
        "current_image": if q.skip_current_image { None } else { s.current_image },
        "textinfo": null,
    }))
}

async fn interrupt(State(state): State<AppState>) -> Json<Value> {
    state.queue.interrupt();
    Json(json!({}))
}

async fn openai_generations(
    State(state): State<AppState>,
    axum::Extension(RequestId(id)): axum::Extension<RequestId>,
    body: Body,
) -> Result<Json<Value>, ApiError> {
    let result = async {
        let bytes = read_body(body, state.body_limit).await?;
        let req: openai::ImagesRequest = parse_json(&bytes)?;
        let loaded = state.queue.loaded();
        let gen = req.parse(&loaded)?;
        tracing::info!(prompt_chars = req.prompt.chars().count(), seed = gen.seed, "queued");
        let model = req.model.clone().filter(|m| state.queue.models.iter().any(|e| &e.title == m));
        let kind = JobKind::Generate { model, requests: vec![gen] };
        let out = run_job(&state, id, kind).await.map_err(|e| job_error(e, openai::field_name))?;
        let images = encode_images(&out)?;
        Ok(openai::response(&req, images))
    }
    .await;
    result.map(Json).map_err(ApiError::openai)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn accepts_the_key_as_bearer_or_basic_auth() {
        let with = |v: &str| {
            let mut h = HeaderMap::new();
            h.insert(header::AUTHORIZATION, v.parse().unwrap());
            h
        };
        let b64 = |s: &str| base64::engine::general_purpose::STANDARD.encode(s);
        assert!(authorized(&with("Bearer k3y"), "k3y"));
        assert!(!authorized(&with("Bearer k3"), "k3y"));
        assert!(authorized(&with(&format!("Basic {}", b64("me:k3y"))), "k3y"));
        assert!(authorized(&with(&format!("Basic {}", b64("me:pw"))), "me:pw"));
        assert!(!authorized(&with(&format!("Basic {}", b64("me:nope"))), "k3y"));
        assert!(!authorized(&HeaderMap::new(), "k3y"));
    }
}
