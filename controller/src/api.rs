//! The session API over HTTP (axum, JSON). Handlers are thin: parse, call the service, map
//! its error to a status and a JSON body in one place ([`ApiError`]). A client's mistake is
//! a 4xx with a reason, never a 500.

use std::sync::Arc;
use std::time::Duration;

use axum::extract::rejection::JsonRejection;
use axum::extract::{Path, Query, State};
use axum::http::{HeaderMap, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use axum::{Json, Router};
use serde::{Deserialize, Serialize};
use vncgate_schema::session::{SessionRecord, SessionState, Transition};

use crate::backend::Backend;
use crate::service::{CreateRequest, Service, ServiceError};

/// An error answer: `{"error": "<name>", "reason": "<what is wrong>"}`.
#[derive(Debug)]
pub struct ApiError {
    status: StatusCode,
    error: &'static str,
    reason: String,
}

impl ApiError {
    fn new(status: StatusCode, error: &'static str, reason: impl Into<String>) -> Self {
        Self {
            status,
            error,
            reason: reason.into(),
        }
    }
}

impl IntoResponse for ApiError {
    fn into_response(self) -> Response {
        (
            self.status,
            Json(serde_json::json!({"error": self.error, "reason": self.reason})),
        )
            .into_response()
    }
}

impl From<ServiceError> for ApiError {
    fn from(e: ServiceError) -> Self {
        match e {
            ServiceError::BadRequest(r) => ApiError::new(StatusCode::BAD_REQUEST, "bad_request", r),
            ServiceError::NotFound => {
                ApiError::new(StatusCode::NOT_FOUND, "not_found", "unknown session")
            }
            ServiceError::Conflict(r) => ApiError::new(StatusCode::CONFLICT, "conflict", r),
            ServiceError::Unavailable(r) => {
                ApiError::new(StatusCode::SERVICE_UNAVAILABLE, "unavailable", r)
            }
        }
    }
}

impl From<JsonRejection> for ApiError {
    fn from(r: JsonRejection) -> Self {
        match r {
            JsonRejection::MissingJsonContentType(_) => ApiError::new(
                StatusCode::UNSUPPORTED_MEDIA_TYPE,
                "unsupported_media_type",
                "the body must be JSON (Content-Type: application/json)",
            ),
            other => ApiError::new(StatusCode::BAD_REQUEST, "bad_request", other.body_text()),
        }
    }
}

/// `POST /api/sessions`.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct CreateBody {
    pub user_id: String,
    pub provider: String,
    pub ttl_secs: Option<u64>,
}

/// `POST /api/sessions/{id}/keepalive` (the body is optional).
#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct KeepaliveBody {
    pub ttl_secs: Option<u64>,
}

/// A session as the API shows it.
#[derive(Debug, Serialize)]
pub struct SessionView {
    pub id: String,
    pub state: SessionState,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub reason: Option<String>,
    pub user_id: String,
    pub provider: String,
    /// Where a browser opens the session on the gateway: `/vnc/<id>`.
    pub ws_path: String,
    /// The viewer token, in the create answer only.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub token: Option<String>,
    /// RFC 3339.
    pub created_at: String,
    pub expires_at: String,
    pub backend: String,
    pub history: Vec<TransitionView>,
    /// The last readiness checks (agent health, VNC port), as the probe reported them.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub probes: Option<serde_json::Value>,
}

#[derive(Debug, Serialize)]
pub struct TransitionView {
    pub at: String,
    pub state: SessionState,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub reason: Option<String>,
}

fn rfc3339(ms: u64) -> String {
    let t = std::time::UNIX_EPOCH + Duration::from_millis(ms);
    humantime::format_rfc3339_millis(t).to_string()
}

impl SessionView {
    pub fn of(r: SessionRecord, token: Option<String>) -> Self {
        Self {
            ws_path: format!("/vnc/{}", r.id),
            id: r.id,
            state: r.state,
            reason: r.reason,
            user_id: r.user_id,
            provider: r.provider,
            token,
            created_at: rfc3339(r.created_at),
            expires_at: rfc3339(r.expires_at),
            backend: r.backend,
            history: r
                .history
                .into_iter()
                .map(|Transition { at, state, reason }| TransitionView {
                    at: rfc3339(at),
                    state,
                    reason,
                })
                .collect(),
            probes: r.probes,
        }
    }
}

fn secs(v: Option<u64>, name: &str) -> Result<Option<Duration>, ApiError> {
    match v {
        Some(0) => Err(ApiError::new(
            StatusCode::BAD_REQUEST,
            "bad_request",
            format!("{name} must be positive"),
        )),
        v => Ok(v.map(Duration::from_secs)),
    }
}

async fn create<B: Backend>(
    State(svc): State<Arc<Service<B>>>,
    headers: HeaderMap,
    body: Result<Json<CreateBody>, JsonRejection>,
) -> Result<(StatusCode, Json<SessionView>), ApiError> {
    let Json(body) = body?;
    let idem = match headers.get("idempotency-key") {
        None => None,
        Some(v) => Some(v.to_str().map_err(|_| {
            ApiError::new(
                StatusCode::BAD_REQUEST,
                "bad_request",
                "Idempotency-Key must be visible ASCII",
            )
        })?),
    };
    let created = svc
        .create(
            CreateRequest {
                user_id: body.user_id,
                provider: body.provider,
                ttl: secs(body.ttl_secs, "ttl_secs")?,
            },
            idem,
        )
        .await?;
    let status = if created.replayed {
        StatusCode::OK
    } else {
        StatusCode::CREATED
    };
    Ok((status, Json(SessionView::of(created.record, created.token))))
}

async fn show<B: Backend>(
    State(svc): State<Arc<Service<B>>>,
    Path(id): Path<String>,
) -> Result<Json<SessionView>, ApiError> {
    Ok(Json(SessionView::of(svc.get(&id).await?, None)))
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct WaitQuery {
    pub state: Option<String>,
    /// Seconds, at most 300 [default: 30].
    pub timeout: Option<f64>,
}

async fn wait<B: Backend>(
    State(svc): State<Arc<Service<B>>>,
    Path(id): Path<String>,
    q: Result<Query<WaitQuery>, axum::extract::rejection::QueryRejection>,
) -> Result<Json<SessionView>, ApiError> {
    let Query(q) =
        q.map_err(|e| ApiError::new(StatusCode::BAD_REQUEST, "bad_request", e.body_text()))?;
    let state = match q.state.as_deref() {
        None => SessionState::Ready,
        Some(s) => s
            .parse()
            .map_err(|e: String| ApiError::new(StatusCode::BAD_REQUEST, "bad_request", e))?,
    };
    let timeout = q.timeout.unwrap_or(30.0);
    if !(0.0..=300.0).contains(&timeout) {
        return Err(ApiError::new(
            StatusCode::BAD_REQUEST,
            "bad_request",
            "timeout must be 0..=300 seconds",
        ));
    }
    let rec = svc
        .wait(&id, state, Duration::from_secs_f64(timeout))
        .await?;
    Ok(Json(SessionView::of(rec, None)))
}

async fn keepalive<B: Backend>(
    State(svc): State<Arc<Service<B>>>,
    Path(id): Path<String>,
    headers: HeaderMap,
    body: axum::body::Bytes,
) -> Result<Json<SessionView>, ApiError> {
    // The body is optional; when there is one, it is JSON.
    let body: KeepaliveBody = if body.is_empty() {
        KeepaliveBody::default()
    } else {
        let json = headers
            .get(axum::http::header::CONTENT_TYPE)
            .and_then(|v| v.to_str().ok())
            .is_some_and(|v| v.starts_with("application/json"));
        if !json {
            return Err(ApiError::new(
                StatusCode::UNSUPPORTED_MEDIA_TYPE,
                "unsupported_media_type",
                "the body must be JSON (Content-Type: application/json)",
            ));
        }
        serde_json::from_slice(&body)
            .map_err(|e| ApiError::new(StatusCode::BAD_REQUEST, "bad_request", e.to_string()))?
    };
    let rec = svc.keepalive(&id, secs(body.ttl_secs, "ttl_secs")?).await?;
    Ok(Json(SessionView::of(rec, None)))
}

async fn delete<B: Backend>(
    State(svc): State<Arc<Service<B>>>,
    Path(id): Path<String>,
) -> Result<(StatusCode, Json<SessionView>), ApiError> {
    let rec = svc.delete(&id).await?;
    Ok((StatusCode::ACCEPTED, Json(SessionView::of(rec, None))))
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ListQuery {
    pub state: Option<String>,
    pub user_id: Option<String>,
}

async fn list<B: Backend>(
    State(svc): State<Arc<Service<B>>>,
    q: Result<Query<ListQuery>, axum::extract::rejection::QueryRejection>,
) -> Result<Json<serde_json::Value>, ApiError> {
    let Query(q) =
        q.map_err(|e| ApiError::new(StatusCode::BAD_REQUEST, "bad_request", e.body_text()))?;
    let state = q
        .state
        .as_deref()
        .map(str::parse::<SessionState>)
        .transpose()
        .map_err(|e| ApiError::new(StatusCode::BAD_REQUEST, "bad_request", e))?;
    let found = svc.list(state, q.user_id.as_deref()).await?;
    let views: Vec<SessionView> = found
        .into_iter()
        .map(|r| SessionView::of(r, None))
        .collect();
    Ok(Json(serde_json::json!({ "sessions": views })))
}

async fn not_found() -> ApiError {
    ApiError::new(StatusCode::NOT_FOUND, "not_found", "no such endpoint")
}

/// The API's routes.
pub fn router<B: Backend>(svc: Arc<Service<B>>) -> Router {
    Router::new()
        .route("/api/sessions", post(create::<B>).get(list::<B>))
        .route("/api/sessions/{id}", get(show::<B>).delete(delete::<B>))
        .route("/api/sessions/{id}/wait", get(wait::<B>))
        .route("/api/sessions/{id}/keepalive", post(keepalive::<B>))
        .route("/healthz", get(|| async { "ok\n" }))
        .fallback(not_found)
        .with_state(svc)
}
