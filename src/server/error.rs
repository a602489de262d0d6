//! OpenAI-style error responses: `{"error": {"message", "type", "param", "code"}}` with the
//! right status, so clients (the `openai` package maps statuses to exception classes) can tell
//! a bad request from an overloaded or failed server.

use axum::http::StatusCode;
use axum::response::{IntoResponse, Response};
use axum::Json;
use serde_json::json;

use crate::error::Error;

/// An error as the HTTP API reports it.
#[derive(Debug, Clone, PartialEq)]
pub struct ApiError {
    /// The HTTP status.
    pub status: StatusCode,
    /// What went wrong, for a person.
    pub message: String,
    /// OpenAI's error type (`invalid_request_error`, `rate_limit_error`, ...).
    pub kind: &'static str,
    /// The request parameter at fault, when one is.
    pub param: Option<String>,
    /// A machine-readable code (`context_length_exceeded`, `invalid_api_key`, ...).
    pub code: Option<&'static str>,
}

impl ApiError {
    /// A 400 naming the parameter at fault.
    pub fn invalid(param: impl Into<String>, message: impl Into<String>) -> Self {
        ApiError {
            status: StatusCode::BAD_REQUEST,
            message: message.into(),
            kind: "invalid_request_error",
            param: Some(param.into()),
            code: None,
        }
    }

    /// A 400 naming `param` whose message starts with the parameter's name, as vLLM words them.
    pub fn param(param: &str, problem: impl std::fmt::Display) -> Self {
        Self::invalid(param, format!("`{param}` {problem}"))
    }

    /// Sets the machine-readable code.
    pub fn code(mut self, code: &'static str) -> Self {
        self.code = Some(code);
        self
    }

    /// 404 for a `model` the server does not serve.
    pub fn model_not_found(model: &str, served: &str) -> Self {
        ApiError {
            status: StatusCode::NOT_FOUND,
            message: format!("The model `{model}` does not exist; this server serves `{served}`."),
            kind: "invalid_request_error",
            param: Some("model".into()),
            code: Some("model_not_found"),
        }
    }

    /// 401: the only thing an unauthenticated client learns.
    pub fn unauthorized() -> Self {
        ApiError {
            status: StatusCode::UNAUTHORIZED,
            message: "Incorrect or missing API key: send `Authorization: Bearer <key>` or `x-api-key: <key>`.".into(),
            kind: "invalid_request_error",
            param: None,
            code: Some("invalid_api_key"),
        }
    }

    /// 404 for a route the server does not have.
    pub fn not_found(path: &str) -> Self {
        ApiError {
            status: StatusCode::NOT_FOUND,
            message: format!("no route for `{path}`"),
            kind: "invalid_request_error",
            param: None,
            code: Some("not_found"),
        }
    }

    /// 405 for a known route with the wrong method.
    pub fn method_not_allowed(method: &str, path: &str) -> Self {
        ApiError {
            status: StatusCode::METHOD_NOT_ALLOWED,
            message: format!("`{path}` does not accept {method}"),
            kind: "invalid_request_error",
            param: None,
            code: Some("method_not_allowed"),
        }
    }

    /// 413 for a body over the configured limit.
    pub fn too_large(limit: usize) -> Self {
        ApiError {
            status: StatusCode::PAYLOAD_TOO_LARGE,
            message: format!("the request body is larger than the server's limit of {limit} bytes"),
            kind: "invalid_request_error",
            param: Some("body".into()),
            code: Some("request_too_large"),
        }
    }

    /// 429: the waiting queue is full; the client should retry later.
    pub fn busy(message: impl Into<String>) -> Self {
        ApiError {
            status: StatusCode::TOO_MANY_REQUESTS,
            message: message.into(),
            kind: "rate_limit_error",
            param: None,
            code: Some("engine_busy"),
        }
    }

    /// 503: the server is shutting down or its engine has failed.
    pub fn unavailable(message: impl Into<String>) -> Self {
        ApiError {
            status: StatusCode::SERVICE_UNAVAILABLE,
            message: message.into(),
            kind: "service_unavailable",
            param: None,
            code: Some("service_unavailable"),
        }
    }

    /// 500: a failure that is not the client's doing.
    pub fn internal(message: impl Into<String>) -> Self {
        ApiError {
            status: StatusCode::INTERNAL_SERVER_ERROR,
            message: message.into(),
            kind: "internal_error",
            param: None,
            code: None,
        }
    }

    /// Maps an engine error: request and template errors are the client's (400), `Busy` (a
    /// full queue) is 429 while serving, shutting down and a failed engine are 503, and a
    /// request whose logits were not finite is a 500 of its own (`non_finite_logits`).
    pub fn from_engine(e: Error, shutting_down: bool) -> Self {
        match e {
            Error::Request { param, message } => Self::invalid(param.clone(), format!("`{param}` {message}")),
            Error::ChatTemplate { message } => {
                Self::invalid("messages", format!("the chat template failed: {message}"))
            }
            Error::ShuttingDown { message } => Self::unavailable(message),
            e @ Error::EngineFailed { .. } => Self::unavailable(e.to_string()).code("engine_failed"),
            e @ Error::NonFiniteLogits { .. } => Self::internal(e.to_string()).code("non_finite_logits"),
            Error::Grammar { message } if message.starts_with(crate::grammar::SCHEMA_VIOLATION) => {
                Self::schema_violation(message)
            }
            e @ Error::Grammar { .. } => Self::internal(e.to_string()).code("grammar_dead_end"),
            Error::Busy { message } if shutting_down => Self::unavailable(message),
            Error::Busy { message } => Self::busy(message),
            other => Self::internal(other.to_string()),
        }
    }

    /// A 422 (`schema_violation`): the model's finished structured answer breaks a keyword of
    /// its schema that the grammar could not enforce and the check after generation caught.
    /// Not a 500: nothing failed, and the `openai` client retries 5xx on its own, which with
    /// greedy sampling only repeats the same answer. Not a 400: the request is valid. 422 says
    /// "understood, but this answer could not be produced", and the message names the keyword,
    /// so the client can act: sample again (another seed or temperature) or drop or reword
    /// the keyword.
    pub fn schema_violation(message: String) -> Self {
        ApiError {
            status: StatusCode::UNPROCESSABLE_ENTITY,
            message: format!("structured output: {message}"),
            kind: "invalid_request_error",
            param: None,
            code: Some("schema_violation"),
        }
    }

    /// The JSON body, also sent as an SSE event when a stream fails after its headers.
    pub fn body(&self) -> serde_json::Value {
        json!({
            "error": {
                "message": self.message,
                "type": self.kind,
                "param": self.param,
                "code": self.code,
            }
        })
    }
}

impl IntoResponse for ApiError {
    fn into_response(self) -> Response {
        if self.status.is_server_error() {
            tracing::error!(status = %self.status, message = %self.message, "request failed");
        }
        (self.status, Json(self.body())).into_response()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_schema_violation_is_a_422_and_a_dead_end_a_500() {
        let broken = format!(
            "{} `uniqueItems` (at `/uniqueItems`): ... (after 7 generated tokens)",
            crate::grammar::SCHEMA_VIOLATION
        );
        let e = ApiError::from_engine(Error::Grammar { message: broken }, false);
        assert_eq!((e.status, e.code), (StatusCode::UNPROCESSABLE_ENTITY, Some("schema_violation")));
        assert!(e.message.contains("`uniqueItems`"), "{}", e.message);
        let dead = Error::Grammar { message: "the grammar allows no next token, a dead end".into() };
        let e = ApiError::from_engine(dead, false);
        assert_eq!((e.status, e.code), (StatusCode::INTERNAL_SERVER_ERROR, Some("grammar_dead_end")));
    }
}
