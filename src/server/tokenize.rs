//! `POST /tokenize` and `POST /detokenize`, in vLLM's shapes: a prompt or a chat in, its token
//! ids out (`count`, `max_model_len`, `tokens`, optionally `token_strs`); token ids in, their
//! text out (`prompt`). Unknown fields are ignored, as vLLM does.

use std::sync::Arc;

use axum::body::Bytes;
use axum::extract::rejection::BytesRejection;
use axum::extract::State;
use axum::http::StatusCode;
use axum::response::{IntoResponse, Response};
use axum::Json;
use serde_json::{json, Map, Value};

use super::error::ApiError;
use super::fields::{kind, Fields};
use super::openai;
use super::AppState;

/// `POST /tokenize`: `{"prompt": "..."}` (with `add_special_tokens`, default true) or
/// `{"messages": [...]}` (with `add_generation_prompt`, default true).
pub async fn tokenize(State(state): State<Arc<AppState>>, body: Result<Bytes, BytesRejection>) -> Response {
    let run = async move {
        let body = read(&state, body)?;
        // Tokenizing (and rendering the chat template) is CPU work: keep it off the async threads.
        tokio::task::spawn_blocking(move || encode(&state, &body))
            .await
            .map_err(|e| ApiError::internal(format!("tokenizer task failed: {e}")))?
    };
    run.await.unwrap_or_else(IntoResponse::into_response)
}

/// `POST /detokenize`: `{"tokens": [ids]}` → `{"prompt": "text"}` (special tokens kept).
pub async fn detokenize(State(state): State<Arc<AppState>>, body: Result<Bytes, BytesRejection>) -> Response {
    let run = || -> Result<Response, ApiError> {
        let body = read(&state, body)?;
        let f = Fields(&body);
        let Value::Array(items) = f.require("tokens")? else {
            return Err(ApiError::param("tokens", "must be a list of token ids"));
        };
        let vocab = state.engine.tokenizer().vocab_size();
        let ids = items
            .iter()
            .enumerate()
            .map(|(i, t)| match t.as_u64().and_then(|t| u32::try_from(t).ok()) {
                Some(id) if (id as usize) < vocab => Ok(id),
                _ => Err(ApiError::invalid(
                    "tokens",
                    format!("`tokens[{i}]` must be a token id in [0, {vocab}), got {t}"),
                )),
            })
            .collect::<Result<Vec<u32>, _>>()?;
        let text = state
            .engine
            .tokenizer()
            .decode(&ids, false)
            .map_err(|e| ApiError::invalid("tokens", format!("`tokens` cannot be decoded: {e}")))?;
        Ok(Json(json!({"prompt": text})).into_response())
    };
    run().unwrap_or_else(IntoResponse::into_response)
}

/// The body as a JSON object, its `model` (if any) checked against the served one.
fn read(state: &AppState, body: Result<Bytes, BytesRejection>) -> Result<Map<String, Value>, ApiError> {
    let body = body.map_err(|r| match r.status() {
        StatusCode::PAYLOAD_TOO_LARGE => ApiError::too_large(state.body_limit),
        _ => ApiError::invalid("body", format!("cannot read the request body: {}", r.body_text())),
    })?;
    let value: Value = serde_json::from_slice(&body)
        .map_err(|e| ApiError::invalid("body", format!("the request body is not valid JSON: {e}")))?;
    let Value::Object(obj) = value else {
        return Err(ApiError::invalid("body", format!("the request body must be a JSON object, got {}", kind(&value))));
    };
    if let Some(model) = Fields(&obj).string("model")? {
        if model != state.model_name {
            return Err(ApiError::model_not_found(model, &state.model_name));
        }
    }
    Ok(obj)
}

fn encode(state: &AppState, body: &Map<String, Value>) -> Result<Response, ApiError> {
    let f = Fields(body);
    let tokenizer = state.engine.tokenizer();
    let ids = match (f.get("prompt"), f.get("messages")) {
        (Some(_), Some(_)) => return Err(ApiError::param("messages", "cannot be given with `prompt`")),
        (Some(Value::String(text)), None) => if f.bool("add_special_tokens")?.unwrap_or(true) {
            tokenizer.encode_prompt(text)
        } else {
            tokenizer.encode_raw(text)
        }
        .map_err(|e| ApiError::invalid("prompt", format!("`prompt` cannot be tokenized: {e}")))?,
        (Some(v), None) => return Err(ApiError::param("prompt", format!("must be a string, got {}", kind(v)))),
        (None, Some(m)) => {
            let messages = openai::messages(m)?;
            let add_generation_prompt = f.bool("add_generation_prompt")?.unwrap_or(true);
            tokenizer.encode_chat(&messages, add_generation_prompt).map_err(|e| ApiError::from_engine(e, false))?
        }
        (None, None) => return Err(ApiError::param("prompt", "or `messages` is required")),
    };
    let mut answer = json!({
        "count": ids.len(),
        "max_model_len": state.engine.context_len(),
        "tokens": ids,
        "token_strs": null,
    });
    if f.bool("return_token_strs")?.unwrap_or(false) {
        let inner = tokenizer.inner();
        answer["token_strs"] = ids.iter().map(|&id| inner.id_to_token(id)).collect();
    }
    Ok(Json(answer).into_response())
}
