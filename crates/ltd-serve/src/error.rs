//! Errors as HTTP answers: a status and one message phrased for the user (ltd-gen's message,
//! naming the field), in A1111's shape (`{"error": …, "detail": …}`) or OpenAI's
//! (`{"error": {"message": …, "type": …}}`). Bad input is a 4xx, never a 500.

use axum::http::{header, HeaderValue, StatusCode};
use axum::response::{IntoResponse, Response};
use serde_json::json;

/// An HTTP error answer.
#[derive(Debug)]
pub struct ApiError {
    /// The status.
    pub status: StatusCode,
    /// The message.
    pub message: String,
    /// Seconds for `Retry-After` (503 when the queue is full).
    pub retry_after: Option<u64>,
    /// Answer in OpenAI's error shape.
    pub openai: bool,
}

impl ApiError {
    /// An error with this status.
    pub fn new(status: StatusCode, message: impl Into<String>) -> Self {
        Self { status, message: message.into(), retry_after: None, openai: false }
    }

    /// 400: the body is not JSON.
    pub fn bad_request(message: impl Into<String>) -> Self {
        Self::new(StatusCode::BAD_REQUEST, message)
    }

    /// 422: a field has a wrong type or value.
    pub fn unprocessable(message: impl Into<String>) -> Self {
        Self::new(StatusCode::UNPROCESSABLE_ENTITY, message)
    }

    /// The same error in OpenAI's shape.
    pub fn openai(mut self) -> Self {
        self.openai = true;
        self
    }
}

impl IntoResponse for ApiError {
    fn into_response(self) -> Response {
        let body = if self.openai {
            let kind = if self.status.is_client_error() {
                "invalid_request_error"
            } else {
                "server_error"
            };
            json!({"error": {"message": self.message, "type": kind, "param": null, "code": null}})
        } else {
            let name = self.status.canonical_reason().unwrap_or("Error");
            json!({"error": name, "detail": self.message})
        };
        let mut res = (self.status, axum::Json(body)).into_response();
        if let Some(secs) = self.retry_after {
            res.headers_mut().insert(header::RETRY_AFTER, HeaderValue::from(secs));
        }
        res
    }
}
