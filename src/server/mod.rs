//! `tulu serve`: an OpenAI-compatible HTTP API over an [`Engine`] (axum).
//!
//! Routes: `/v1/completions` and `/v1/chat/completions` (whole or SSE-streamed), `/v1/responses`
//! (OpenAI's Responses API, stateless), `/v1/messages` (Anthropic's Messages API), `/v1/models`,
//! `/tokenize` and `/detokenize` (vLLM's shapes), `/health` (503 once the engine has failed;
//! the server then exits with the failure) and `/metrics` (Prometheus text). Errors are
//! OpenAI-style JSON objects ([`error::ApiError`]), Anthropic-style on `/v1/messages`. With an
//! API key, every route but `/health` answers 401 to a request without `Authorization: Bearer
//! <key>` (or Anthropic's `x-api-key: <key>`), so an unauthenticated client learns nothing, not
//! even which routes exist. On SIGINT/SIGTERM the server stops accepting, lets the engine finish
//! or abort running requests within the shutdown timeout, and returns.

mod answer_stream;
mod completions;
pub mod error;
mod fields;
mod messages;
pub mod messages_request;
mod messages_tools;
pub mod metrics;
pub mod openai;
mod responses;
pub mod responses_request;
mod responses_tools;
mod sse;
pub mod structured;
mod tokenize;
pub mod tool_stream;
pub mod tools;

use std::net::SocketAddr;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::Duration;

use axum::extract::{DefaultBodyLimit, Path, Request, State};
use axum::http::{header, Method, StatusCode, Uri};
use axum::middleware::{self, Next};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use axum::{Json, Router};
use serde_json::json;

use self::error::ApiError;
use crate::engine::Engine;
use crate::error::{Error, Result};

/// How to serve.
#[derive(Debug, Clone)]
pub struct ServerOptions {
    /// Address to bind.
    pub host: String,
    /// Port to bind; 0 picks a free one (the bound address is printed).
    pub port: u16,
    /// The model id clients name and responses carry.
    pub model_name: String,
    /// Required Bearer token; `None`: no authentication.
    pub api_key: Option<String>,
    /// How long running requests may take to finish after SIGINT/SIGTERM before being aborted.
    pub shutdown_timeout: Duration,
    /// Largest request body accepted, in bytes (413 beyond).
    pub body_limit: usize,
}

impl ServerOptions {
    /// Defaults: 127.0.0.1:8000, no API key, 30 s shutdown timeout, 4 MiB bodies.
    pub fn new(model_name: impl Into<String>) -> Self {
        ServerOptions {
            host: "127.0.0.1".into(),
            port: 8000,
            model_name: model_name.into(),
            api_key: None,
            shutdown_timeout: Duration::from_secs(30),
            body_limit: 4 << 20,
        }
    }
}

/// What every handler shares.
pub(crate) struct AppState {
    engine: Arc<Engine>,
    model_name: String,
    api_key: Option<String>,
    body_limit: usize,
    /// Set on SIGINT/SIGTERM: the engine's `Busy` then means 503, not 429.
    shutting_down: AtomicBool,
    /// Unix time the server started (`created` of `/v1/models`).
    started: u64,
}

/// The routes over `engine`, without the listener (tests can drive it in-process).
pub fn router(engine: Arc<Engine>, opts: &ServerOptions) -> Router {
    router_with_state(app_state(engine, opts))
}

fn app_state(engine: Arc<Engine>, opts: &ServerOptions) -> Arc<AppState> {
    Arc::new(AppState {
        engine,
        model_name: opts.model_name.clone(),
        api_key: opts.api_key.clone(),
        body_limit: opts.body_limit,
        shutting_down: AtomicBool::new(false),
        started: std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).map_or(0, |d| d.as_secs()),
    })
}

fn router_with_state(state: Arc<AppState>) -> Router {
    Router::new()
        .route("/v1/completions", post(completions::completions))
        .route("/v1/chat/completions", post(completions::chat_completions))
        .route("/v1/messages", post(messages::messages))
        .route("/v1/responses", post(responses::responses))
        .route("/tokenize", post(tokenize::tokenize))
        .route("/detokenize", post(tokenize::detokenize))
        .route("/v1/models", get(models))
        .route("/v1/models/{id}", get(model))
        .route("/health", get(health))
        .route("/metrics", get(prometheus))
        .fallback(|uri: Uri| async move { ApiError::not_found(uri.path()) })
        .method_not_allowed_fallback(|method: Method, uri: Uri| async move {
            ApiError::method_not_allowed(method.as_str(), uri.path())
        })
        .layer(DefaultBodyLimit::max(state.body_limit))
        // Outermost, so that authentication comes before routing and body limits.
        .layer(middleware::from_fn_with_state(state.clone(), authenticate))
        .with_state(state)
}

/// Binds `opts.host:opts.port`, prints the address, serves until SIGINT/SIGTERM, then shuts
/// the engine down within `opts.shutdown_timeout`. If the engine fails (engine-fatal) it stops
/// serving the same way and returns the failure, so that `tulu serve` exits non-zero and a
/// supervisor restarts it; until then `/health` answers 503.
pub async fn serve(engine: Arc<Engine>, opts: ServerOptions) -> Result<()> {
    let listener = tokio::net::TcpListener::bind((opts.host.as_str(), opts.port))
        .await
        .map_err(|e| Error::io(format!("{}:{}", opts.host, opts.port), e))?;
    let addr: SocketAddr = listener.local_addr().map_err(|e| Error::io("<listener>", e))?;
    let state = app_state(engine.clone(), &opts);
    let app = router_with_state(state.clone());
    tracing::info!("listening on http://{addr}");
    let stop = Arc::new(tokio::sync::Notify::new());
    let graceful = {
        let stop = stop.clone();
        async move { stop.notified().await }
    };
    let mut server =
        tokio::spawn(std::future::IntoFuture::into_future(axum::serve(listener, app).with_graceful_shutdown(graceful)));
    let failure = tokio::select! {
        _ = shutdown_signal() => None,
        why = engine.failed() => Some(why),
        done = &mut server => {
            return match done {
                Ok(r) => r.map_err(|e| Error::io(addr.to_string(), e)),
                Err(e) => Err(Error::Backend(format!("the server task failed: {e}"))),
            };
        }
    };
    state.shutting_down.store(true, Ordering::SeqCst);
    stop.notify_one();
    match &failure {
        Some(why) => tracing::error!("the engine failed ({why}): shutting down"),
        None => tracing::info!("shutting down: finishing running requests for up to {:?}", opts.shutdown_timeout),
    }
    // Engine::shutdown blocks (it joins the step loop); in-flight responses end as it finishes
    // or aborts their requests, after which axum's graceful shutdown completes.
    let stopping = engine.clone();
    let _ = tokio::task::spawn_blocking(move || stopping.shutdown(opts.shutdown_timeout)).await;
    // A client that stops reading could hold its connection open forever: bound the drain.
    let drained = match tokio::time::timeout(Duration::from_secs(5), server).await {
        Ok(Ok(Err(e))) => Err(Error::io(addr.to_string(), e)),
        Ok(Err(e)) => Err(Error::Backend(format!("the server task failed: {e}"))),
        Ok(Ok(Ok(()))) | Err(_) => Ok(()),
    };
    match failure {
        Some(message) => Err(Error::EngineFailed { message }),
        None => drained.inspect(|()| tracing::info!("stopped")),
    }
}

/// Resolves on SIGINT or SIGTERM.
async fn shutdown_signal() {
    let ctrl_c = async {
        if tokio::signal::ctrl_c().await.is_err() {
            std::future::pending::<()>().await;
        }
    };
    #[cfg(unix)]
    let term = async {
        match tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()) {
            Ok(mut s) => {
                s.recv().await;
            }
            Err(_) => std::future::pending::<()>().await,
        }
    };
    #[cfg(not(unix))]
    let term = std::future::pending::<()>();
    tokio::select! {
        _ = ctrl_c => {}
        _ = term => {}
    }
}

/// With an API key, every route but `/health` requires `Authorization: Bearer <key>` or
/// `x-api-key: <key>`.
async fn authenticate(State(state): State<Arc<AppState>>, request: Request, next: Next) -> Response {
    let Some(key) = &state.api_key else { return next.run(request).await };
    if request.uri().path() == "/health" {
        return next.run(request).await;
    }
    let headers = request.headers();
    let bearer = headers.get(header::AUTHORIZATION).and_then(|v| v.to_str().ok()).unwrap_or("");
    let bearer = bearer.strip_prefix("Bearer ").unwrap_or("");
    // Anthropic's clients send the key as `x-api-key`.
    let x_api_key = headers.get("x-api-key").and_then(|v| v.to_str().ok()).unwrap_or("");
    if constant_time_eq(bearer.as_bytes(), key.as_bytes()) || constant_time_eq(x_api_key.as_bytes(), key.as_bytes()) {
        next.run(request).await
    } else if request.uri().path() == "/v1/messages" {
        messages::anthropic_error(&ApiError::unauthorized()).into_response()
    } else {
        ApiError::unauthorized().into_response()
    }
}

/// Compares without stopping at the first difference, so timing does not reveal the key.
fn constant_time_eq(a: &[u8], b: &[u8]) -> bool {
    a.len() == b.len() && a.iter().zip(b).fold(0u8, |acc, (x, y)| acc | (x ^ y)) == 0
}

fn model_card(state: &AppState) -> serde_json::Value {
    json!({
        "id": state.model_name,
        "object": "model",
        "created": state.started,
        "owned_by": "tulu",
        "root": state.engine.model_dir().display().to_string(),
        "max_model_len": state.engine.context_len(),
    })
}

/// `GET /v1/models`.
async fn models(State(state): State<Arc<AppState>>) -> Json<serde_json::Value> {
    Json(json!({"object": "list", "data": [model_card(&state)]}))
}

/// `GET /v1/models/{id}`.
async fn model(State(state): State<Arc<AppState>>, Path(id): Path<String>) -> Response {
    if id == state.model_name {
        Json(model_card(&state)).into_response()
    } else {
        ApiError {
            status: StatusCode::NOT_FOUND,
            message: format!("The model `{id}` does not exist."),
            kind: "invalid_request_error",
            param: Some("model".into()),
            code: Some("model_not_found"),
        }
        .into_response()
    }
}

/// `GET /health`: 200 while the engine works, 503 once it has failed or is shutting down.
async fn health(State(state): State<Arc<AppState>>) -> Response {
    if let Some(why) = state.engine.failure() {
        return ApiError::unavailable(format!("the engine has failed: {why}")).into_response();
    }
    if state.shutting_down.load(Ordering::SeqCst) {
        return ApiError::unavailable("the server is shutting down").into_response();
    }
    Json(json!({"status": "ok"})).into_response()
}

/// `GET /metrics`.
async fn prometheus(State(state): State<Arc<AppState>>) -> Response {
    let text = metrics::render(&state.engine.metrics(), &state.model_name);
    ([(header::CONTENT_TYPE, "text/plain; version=0.0.4; charset=utf-8")], text).into_response()
}
