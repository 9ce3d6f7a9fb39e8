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
use crate::service::{CreateRequest, CredentialsError, Service, ServiceError, Stored};

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
#[derive(Debug, Deserialize, utoipa::ToSchema)]
#[serde(deny_unknown_fields)]
pub struct CreateBody {
    pub user_id: String,
    pub provider: String,
    pub ttl_secs: Option<u64>,
}

/// `POST /api/sessions/{id}/keepalive` (the body is optional).
#[derive(Debug, Default, Deserialize, utoipa::ToSchema)]
#[serde(deny_unknown_fields)]
pub struct KeepaliveBody {
    pub ttl_secs: Option<u64>,
}

/// A session as the API shows it.
#[derive(Debug, Serialize, utoipa::ToSchema)]
pub struct SessionView {
    pub id: String,
    /// pending, booting, ready, completed, failed, vm_stopped, expired, deleted.
    #[schema(value_type = String)]
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
    /// The host (`--host-id`) whose controller owns the session's VM, once placed.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub host: Option<String>,
    pub history: Vec<TransitionView>,
    /// The last readiness checks (agent health, VNC port), as the probe reported them.
    #[serde(skip_serializing_if = "Option::is_none")]
    #[schema(value_type = Option<Object>)]
    pub probes: Option<serde_json::Value>,
    /// What the VM's agent did with its per-VM identity (clock, RNG reseed, machine id), as
    /// it reported it: a clone of a snapshot is not ready without it.
    #[serde(skip_serializing_if = "Option::is_none")]
    #[schema(value_type = Option<Object>)]
    pub identity: Option<serde_json::Value>,
    /// A pending session's position in the line for a VM slot (1: next), when this host
    /// is full (`--max-vms`).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub queue_position: Option<usize>,
}

#[derive(Debug, Serialize, utoipa::ToSchema)]
pub struct TransitionView {
    pub at: String,
    #[schema(value_type = String)]
    pub state: SessionState,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub reason: Option<String>,
}

fn rfc3339(ms: u64) -> String {
    let t = std::time::UNIX_EPOCH + Duration::from_millis(ms);
    humantime::format_rfc3339_millis(t).to_string()
}

impl SessionView {
    pub fn of<B: Backend>(svc: &Service<B>, r: SessionRecord, token: Option<String>) -> Self {
        Self {
            queue_position: svc.queue_position(&r.id),
            identity: r
                .probes
                .as_ref()
                .and_then(|p| p.get("agent"))
                .and_then(|a| a.get("identity"))
                .cloned(),
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
            host: r.host,
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

#[utoipa::path(post, path = "/api/sessions", request_body = CreateBody,
    params(("Idempotency-Key" = Option<String>, Header, description = "a retry with the same key returns the same session")),
    responses((status = 201, description = "created; `token` is returned this once", body = SessionView),
        (status = 200, description = "a replay of an Idempotency-Key: the same session, without its token", body = SessionView),
        (status = 400, description = "malformed request", body = ErrorBody), (status = 415, description = "not JSON", body = ErrorBody), (status = 503, description = "store unavailable", body = ErrorBody)))]
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
    Ok((
        status,
        Json(SessionView::of(&svc, created.record, created.token)),
    ))
}

#[utoipa::path(get, path = "/api/sessions/{id}", params(("id" = String, Path, description = "session id")),
    responses((status = 200, description = "the session with its history and last probes", body = SessionView), (status = 404, description = "unknown session", body = ErrorBody)))]
async fn show<B: Backend>(
    State(svc): State<Arc<Service<B>>>,
    Path(id): Path<String>,
) -> Result<Json<SessionView>, ApiError> {
    Ok(Json(SessionView::of(&svc, svc.get(&id).await?, None)))
}

#[derive(Debug, Deserialize, utoipa::IntoParams)]
#[serde(deny_unknown_fields)]
pub struct WaitQuery {
    pub state: Option<String>,
    /// Seconds, at most 300 [default: 30].
    pub timeout: Option<f64>,
}

#[utoipa::path(get, path = "/api/sessions/{id}/wait", params(("id" = String, Path, description = "session id"), WaitQuery),
    responses((status = 200, description = "the session when it reached the state (or a terminal one), or at the timeout", body = SessionView), (status = 400, description = "malformed request", body = ErrorBody), (status = 404, description = "unknown session", body = ErrorBody)))]
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
    Ok(Json(SessionView::of(&svc, rec, None)))
}

#[utoipa::path(post, path = "/api/sessions/{id}/keepalive", params(("id" = String, Path, description = "session id")), request_body(content = Option<KeepaliveBody>, description = "optional"),
    responses((status = 200, description = "expires_at moved (and the route's expiry)", body = SessionView), (status = 400, description = "malformed request", body = ErrorBody), (status = 404, description = "unknown session", body = ErrorBody), (status = 409, description = "a finished session", body = ErrorBody), (status = 415, description = "a body that is not JSON", body = ErrorBody)))]
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
        if !is_json(&headers) {
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
    Ok(Json(SessionView::of(&svc, rec, None)))
}

#[utoipa::path(delete, path = "/api/sessions/{id}", params(("id" = String, Path, description = "session id")),
    responses((status = 202, description = "deleted: route withdrawn (viewers get 4006), VM stopping", body = SessionView), (status = 404, description = "unknown session", body = ErrorBody)))]
async fn delete<B: Backend>(
    State(svc): State<Arc<Service<B>>>,
    Path(id): Path<String>,
) -> Result<(StatusCode, Json<SessionView>), ApiError> {
    let rec = svc.delete(&id).await?;
    Ok((StatusCode::ACCEPTED, Json(SessionView::of(&svc, rec, None))))
}

#[derive(Debug, Deserialize, utoipa::IntoParams)]
#[serde(deny_unknown_fields)]
pub struct ListQuery {
    pub state: Option<String>,
    pub user_id: Option<String>,
}

#[utoipa::path(get, path = "/api/sessions", params(ListQuery),
    responses((status = 200, description = "`{\"sessions\": [...]}`, oldest first"), (status = 400, description = "malformed request", body = ErrorBody)))]
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
        .map(|r| SessionView::of(&svc, r, None))
        .collect();
    Ok(Json(serde_json::json!({ "sessions": views })))
}

impl From<CredentialsError> for ApiError {
    fn from(e: CredentialsError) -> Self {
        let (status, error, reason) = match e {
            CredentialsError::BadRequest(r) => (StatusCode::BAD_REQUEST, "bad_request", r),
            CredentialsError::Unauthorized(r) => (StatusCode::UNAUTHORIZED, "unauthorized", r),
            CredentialsError::Forbidden(r) => (StatusCode::FORBIDDEN, "forbidden", r),
            CredentialsError::NotFound(r) => (StatusCode::NOT_FOUND, "not_found", r),
            CredentialsError::Conflict(r) => (StatusCode::CONFLICT, "conflict", r),
            CredentialsError::Unavailable(r) => (StatusCode::SERVICE_UNAVAILABLE, "unavailable", r),
        };
        ApiError::new(status, error, reason)
    }
}

/// Whether the request says its body is JSON.
fn is_json(headers: &HeaderMap) -> bool {
    headers
        .get(axum::http::header::CONTENT_TYPE)
        .and_then(|v| v.to_str().ok())
        .is_some_and(|v| v.starts_with("application/json"))
}

/// The token of `Authorization: Bearer <token>`.
fn bearer(headers: &HeaderMap) -> Option<&str> {
    let v = headers
        .get(axum::http::header::AUTHORIZATION)?
        .to_str()
        .ok()?;
    let (scheme, token) = v.split_once(' ')?;
    scheme
        .eq_ignore_ascii_case("bearer")
        .then(|| token.trim())
        .filter(|t| !t.is_empty())
}

/// The seed's body: `{"sessionId", "provider", "credentials": {...}}`.
#[derive(Debug, Deserialize, utoipa::ToSchema)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct StoreBody {
    pub session_id: String,
    pub provider: String,
    #[schema(value_type = Object)]
    pub credentials: serde_json::Map<String, serde_json::Value>,
}

/// Counts every outcome of a credentials post (`stored`, `repeated`, or the status).
#[utoipa::path(post, path = "/api/auth/credentials/store", request_body = StoreBody,
    security(("agent_token" = [])),
    responses((status = 201, description = "sealed and stored; the session is completed"), (status = 200, description = "the same credentials again"),
        (status = 400, description = "malformed request", body = ErrorBody), (status = 401, description = "no or unknown agent token", body = ErrorBody), (status = 403, description = "another session's token", body = ErrorBody),
        (status = 404, description = "unknown session", body = ErrorBody), (status = 409, description = "the session takes no credentials, or others are stored", body = ErrorBody),
        (status = 413, description = "over --max-credentials-bytes", body = ErrorBody), (status = 415, description = "not JSON", body = ErrorBody)))]
async fn store_credentials<B: Backend>(
    svc: State<Arc<Service<B>>>,
    headers: HeaderMap,
    body: Result<axum::body::Bytes, axum::extract::rejection::BytesRejection>,
) -> Result<(StatusCode, Json<serde_json::Value>), ApiError> {
    let r = store_credentials_inner(svc, headers, body).await;
    let outcome = match &r {
        Ok((StatusCode::CREATED, _)) => "stored".to_owned(),
        Ok(_) => "repeated".to_owned(),
        Err(e) => e.status.as_u16().to_string(),
    };
    metrics::counter!(crate::metrics::CREDENTIALS, "outcome" => outcome).increment(1);
    r
}

async fn store_credentials_inner<B: Backend>(
    State(svc): State<Arc<Service<B>>>,
    headers: HeaderMap,
    body: Result<axum::body::Bytes, axum::extract::rejection::BytesRejection>,
) -> Result<(StatusCode, Json<serde_json::Value>), ApiError> {
    let body = body.map_err(|e| {
        if e.status() == StatusCode::PAYLOAD_TOO_LARGE {
            ApiError::new(
                StatusCode::PAYLOAD_TOO_LARGE,
                "payload_too_large",
                "the body is over --max-credentials-bytes",
            )
        } else {
            ApiError::new(StatusCode::BAD_REQUEST, "bad_request", e.body_text())
        }
    })?;
    // The token first: nobody learns what a body should look like without one.
    let token = bearer(&headers);
    if token.is_none() {
        return Err(CredentialsError::Unauthorized(
            "agent token required (Authorization: Bearer)".into(),
        )
        .into());
    }
    if !is_json(&headers) {
        return Err(ApiError::new(
            StatusCode::UNSUPPORTED_MEDIA_TYPE,
            "unsupported_media_type",
            "the body must be JSON (Content-Type: application/json)",
        ));
    }
    let b: StoreBody = serde_json::from_slice(&body)
        .map_err(|e| ApiError::new(StatusCode::BAD_REQUEST, "bad_request", safe_json_error(&e)))?;
    let stored = svc
        .store_credentials(
            token,
            &b.session_id,
            &b.provider,
            &serde_json::Value::Object(b.credentials),
        )
        .await
        .map_err(ApiError::from)?;
    let (status, again) = match stored {
        Stored::New => (StatusCode::CREATED, false),
        Stored::Again => (StatusCode::OK, true),
    };
    Ok((
        status,
        Json(serde_json::json!({"session_id": b.session_id, "stored": true, "repeated": again})),
    ))
}

/// What is wrong with a credentials body, without echoing any of its values (serde's
/// "invalid type: string \"...\"" would quote a password back).
fn safe_json_error(e: &serde_json::Error) -> String {
    let msg = e.to_string();
    let want = "expected {\"sessionId\", \"provider\", \"credentials\": {...}}";
    let at = format!("line {} column {}", e.line(), e.column());
    if msg.starts_with("missing field") || msg.starts_with("unknown field") {
        let field = msg.split(" at line").next().unwrap_or(&msg);
        format!("{want}: {field}")
    } else if e.is_data() {
        format!("{want}: a field has the wrong type at {at}")
    } else {
        format!("{want}: malformed JSON at {at}")
    }
}

#[derive(Debug, Deserialize, utoipa::IntoParams)]
#[serde(deny_unknown_fields)]
pub struct ReadQuery {
    #[serde(default)]
    pub delete: bool,
}

#[utoipa::path(get, path = "/api/sessions/{id}/credentials", params(("id" = String, Path, description = "session id"), ReadQuery),
    security(("admin_token" = [])),
    responses((status = 200, description = "the credentials, opened"), (status = 401, description = "no or wrong admin token, or reading is off", body = ErrorBody), (status = 404, description = "unknown session, or none stored", body = ErrorBody)))]
async fn read_credentials<B: Backend>(
    State(svc): State<Arc<Service<B>>>,
    Path(id): Path<String>,
    headers: HeaderMap,
    q: Result<Query<ReadQuery>, axum::extract::rejection::QueryRejection>,
) -> Result<Json<serde_json::Value>, ApiError> {
    let Query(q) =
        q.map_err(|e| ApiError::new(StatusCode::BAD_REQUEST, "bad_request", e.body_text()))?;
    let o = svc
        .read_credentials(bearer(&headers), &id, q.delete)
        .await?;
    Ok(Json(serde_json::json!({
        "session_id": o.session_id,
        "provider": o.provider,
        "credentials": o.credentials,
        "stored_at": rfc3339(o.stored_at),
        "key_id": o.kid,
        "deleted": q.delete,
    })))
}

async fn not_found() -> ApiError {
    ApiError::new(StatusCode::NOT_FOUND, "not_found", "no such endpoint")
}

/// Every error: what went wrong by name, and why.
#[derive(Debug, Serialize, utoipa::ToSchema)]
pub struct ErrorBody {
    pub error: String,
    pub reason: String,
}

#[utoipa::path(get, path = "/api/openapi.json", responses((status = 200, description = "this document")))]
async fn openapi() -> Json<utoipa::openapi::OpenApi> {
    Json(<ApiDoc as utoipa::OpenApi>::openapi())
}

#[utoipa::path(get, path = "/healthz", responses((status = 200, description = "the API serves")))]
async fn healthz() -> &'static str {
    "ok\n"
}

struct Security;

impl utoipa::Modify for Security {
    fn modify(&self, doc: &mut utoipa::openapi::OpenApi) {
        use utoipa::openapi::security::{HttpAuthScheme, HttpBuilder, SecurityScheme};
        let c = doc.components.get_or_insert_with(Default::default);
        for name in ["agent_token", "admin_token"] {
            c.add_security_scheme(
                name,
                SecurityScheme::Http(HttpBuilder::new().scheme(HttpAuthScheme::Bearer).build()),
            );
        }
    }
}

/// The OpenAPI 3 document of the whole API, from the handlers' own annotations; served at
/// `/api/openapi.json`, committed as `controller/openapi.json`.
#[derive(utoipa::OpenApi)]
#[openapi(
    info(title = "vncgate-controller", description = "Browser-VM sessions whose ready means a desktop, and the credentials store."),
    paths(create, list, show, delete, wait, keepalive, store_credentials, read_credentials, openapi, healthz),
    components(schemas(CreateBody, KeepaliveBody, SessionView, TransitionView, StoreBody, ErrorBody)),
    modifiers(&Security)
)]
pub struct ApiDoc;

/// The document as committed (`controller/openapi.json`): pretty JSON.
pub fn openapi_json() -> String {
    <ApiDoc as utoipa::OpenApi>::openapi()
        .to_pretty_json()
        .expect("the OpenAPI document serializes")
}

/// Adds a route, refusing (at startup, so every test catches it) one that the OpenAPI
/// document does not describe with these methods: the document and the router cannot drift.
fn documented<S: Clone + Send + Sync + 'static>(
    r: Router<S>,
    doc: &utoipa::openapi::OpenApi,
    path: &str,
    methods: &[&str],
    mr: axum::routing::MethodRouter<S>,
) -> Router<S> {
    let item = doc
        .paths
        .paths
        .get(path)
        .unwrap_or_else(|| panic!("{path} is served but not in the OpenAPI document"));
    for m in methods {
        let op = match *m {
            "get" => &item.get,
            "post" => &item.post,
            "delete" => &item.delete,
            other => panic!("method {other} of {path} is not handled here"),
        };
        assert!(
            op.is_some(),
            "{m} {path} is served but not in the OpenAPI document"
        );
    }
    r.route(path, mr)
}

/// The API's routes; credentials bodies are limited to `max_credentials_bytes`.
pub fn router<B: Backend>(svc: Arc<Service<B>>, max_credentials_bytes: usize) -> Router {
    let doc = <ApiDoc as utoipa::OpenApi>::openapi();
    let r = Router::new();
    let r = documented(
        r,
        &doc,
        "/api/auth/credentials/store",
        &["post"],
        post(store_credentials::<B>)
            .layer(axum::extract::DefaultBodyLimit::max(max_credentials_bytes)),
    );
    let r = documented(
        r,
        &doc,
        "/api/sessions/{id}/credentials",
        &["get"],
        get(read_credentials::<B>),
    );
    let r = documented(
        r,
        &doc,
        "/api/sessions",
        &["post", "get"],
        post(create::<B>).get(list::<B>),
    );
    let r = documented(
        r,
        &doc,
        "/api/sessions/{id}",
        &["get", "delete"],
        get(show::<B>).delete(delete::<B>),
    );
    let r = documented(r, &doc, "/api/sessions/{id}/wait", &["get"], get(wait::<B>));
    let r = documented(
        r,
        &doc,
        "/api/sessions/{id}/keepalive",
        &["post"],
        post(keepalive::<B>),
    );
    let r = documented(r, &doc, "/api/openapi.json", &["get"], get(openapi));
    let r = documented(r, &doc, "/healthz", &["get"], get(healthz));
    r.fallback(not_found).with_state(svc)
}
