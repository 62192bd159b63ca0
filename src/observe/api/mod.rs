//! The HTTP API and the web page (`fanjet serve`): detailed status, events,
//! live progress (Server-Sent Events), submission, cancellation, health and
//! metrics. The contract is `docs/openapi.json`, served at
//! `/api/openapi.json`. Errors are JSON: `{"error": {"code", "message"}}`.

use std::convert::Infallible;
use std::net::SocketAddr;
use std::time::Duration;

use axum::extract::{Path, Query, State};
use axum::http::{header, Method, StatusCode};
use axum::response::sse::{Event as SseEvent, KeepAlive, Sse};
use axum::response::{Html, IntoResponse, Response};
use axum::routing::{get, post};
use axum::{Json, Router};
use futures::{Stream, StreamExt};
use serde::Deserialize;
use serde_json::{json, Value};
use thiserror::Error;
use tokio_util::sync::CancellationToken;

use super::{monitor, processes};
use crate::client::{self, ClientError};
use crate::metrics::Metrics;
use crate::nats::index::{self, IndexError};
use crate::nats::{log, store, Nats};
use crate::protocol::{
    detailed, now_ms, validate_token, Job, JobPage, JobState, JobSummary, ListRequest, RejectCode,
    Submission,
};

/// The OpenAPI document of this API.
pub const OPENAPI: &str = include_str!("../../../docs/openapi.json");
const INDEX: &str = include_str!("index.html");

#[derive(Debug, Error)]
pub enum ServeError {
    #[error("cannot listen on {addr}: {source}")]
    Bind {
        addr: SocketAddr,
        source: std::io::Error,
    },
    #[error("a read-only API token needs an admin token beside it (--api-token)")]
    ReadTokenAlone,
    #[error("refusing to serve on {0} without a token: set --api-token (FANJET_API_TOKEN) or listen on loopback behind a proxy")]
    Exposed(SocketAddr),
    #[error("HTTP server: {0}")]
    Serve(std::io::Error),
}

/// An API error: status code, stable code, message.
#[derive(Debug)]
pub struct ApiError {
    status: StatusCode,
    code: std::borrow::Cow<'static, str>,
    message: String,
}

impl ApiError {
    fn new(
        status: StatusCode,
        code: impl Into<std::borrow::Cow<'static, str>>,
        message: impl Into<String>,
    ) -> Self {
        ApiError {
            status,
            code: code.into(),
            message: message.into(),
        }
    }
}

impl IntoResponse for ApiError {
    fn into_response(self) -> Response {
        (
            self.status,
            Json(json!({"error": {"code": self.code, "message": self.message}})),
        )
            .into_response()
    }
}

impl From<ClientError> for ApiError {
    fn from(e: ClientError) -> Self {
        let status = match &e {
            ClientError::NoSuchJob(_) => StatusCode::NOT_FOUND,
            ClientError::Ended { .. }
            | ClientError::NotRedrivable(_)
            | ClientError::Answered { .. } => StatusCode::CONFLICT,
            ClientError::LogExpired { .. } => StatusCode::GONE,
            ClientError::NoManager | ClientError::Timeout(_) => StatusCode::SERVICE_UNAVAILABLE,
            ClientError::Store(_)
            | ClientError::Log(_)
            | ClientError::Nats(_)
            | ClientError::Refused { .. } => StatusCode::BAD_GATEWAY,
        };
        let code = match (&e, e.code()) {
            (_, Some(code)) => code.to_string(),
            (ClientError::NoManager | ClientError::Timeout(_), _) => "no_manager".into(),
            _ => "nats_error".into(),
        };
        ApiError::new(status, code, e.to_string())
    }
}

impl From<store::StoreError> for ApiError {
    fn from(e: store::StoreError) -> Self {
        ApiError::new(StatusCode::BAD_GATEWAY, "nats_error", e.to_string())
    }
}

impl From<log::LogError> for ApiError {
    fn from(e: log::LogError) -> Self {
        ApiError::new(StatusCode::BAD_GATEWAY, "nats_error", e.to_string())
    }
}

type ApiResult<T> = Result<T, ApiError>;

/// Bearer tokens of the HTTP API. With neither, the API is open (and
/// served on loopback only).
#[derive(Clone, Default)]
pub struct ApiTokens {
    /// Every route, including those that change something (submit, cancel).
    pub admin: Option<String>,
    /// Reading only: `GET` routes. Needs an admin token beside it.
    pub read: Option<String>,
}

impl std::fmt::Debug for ApiTokens {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ApiTokens")
            .field("admin", &self.admin.as_ref().map(|_| ".."))
            .field("read", &self.read.as_ref().map(|_| ".."))
            .finish()
    }
}

/// The router, with every route of `docs/openapi.json`.
pub fn router(nats: Nats, tokens: ApiTokens) -> Router {
    Router::new()
        .route("/", get(index))
        .route("/api/jobs", get(list_jobs).post(submit))
        .route("/api/jobs/counts", get(job_counts))
        .route("/api/jobs/{id}", get(job))
        .route("/api/jobs/{id}/events", get(events))
        .route("/api/jobs/{id}/stream", get(stream))
        .route("/api/jobs/{id}/cancel", post(cancel))
        .route("/api/jobs/{id}/pause", post(pause))
        .route("/api/jobs/{id}/resume", post(resume))
        .route("/api/jobs/{id}/update", post(update))
        .route("/api/jobs/{id}/redrive", post(redrive))
        .route("/api/jobs/{id}/steps/{step}/results", get(results))
        .route("/api/processes", get(processes))
        .route("/api/customers", get(customers))
        .route("/api/openapi.json", get(openapi))
        .route("/healthz", get(healthz))
        .route("/readyz", get(readyz))
        .route("/metrics", get(metrics))
        .fallback(|| async {
            ApiError::new(
                StatusCode::NOT_FOUND,
                "not_found",
                "no such route; see /api/openapi.json",
            )
        })
        .layer(axum::middleware::from_fn_with_state(
            std::sync::Arc::new(tokens),
            require_token,
        ))
        .with_state(nats)
}

/// With tokens configured, every route but the page shell, `/healthz` and
/// `/readyz` needs `Authorization: Bearer <token>`: the admin token, or for
/// a `GET` the read token too. Only the event stream, which a browser's
/// `EventSource` opens without headers, also takes `?access_token=<token>`:
/// anywhere else a token in the URL would land in proxy logs and browser
/// history.
async fn require_token(
    State(tokens): State<std::sync::Arc<ApiTokens>>,
    req: axum::extract::Request,
    next: axum::middleware::Next,
) -> Response {
    let Some(admin) = tokens.admin.as_deref() else {
        return next.run(req).await;
    };
    let path = req.uri().path().to_string();
    if matches!(path.as_str(), "/" | "/healthz" | "/readyz") {
        return next.run(req).await;
    }
    let reading = matches!(*req.method(), Method::GET | Method::HEAD);
    let stream = reading && path.starts_with("/api/jobs/") && path.ends_with("/stream");
    let bearer = req
        .headers()
        .get(header::AUTHORIZATION)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.strip_prefix("Bearer "))
        .map(str::to_string);
    let in_query = req
        .uri()
        .query()
        .unwrap_or("")
        .split('&')
        .find_map(|kv| kv.strip_prefix("access_token="))
        .map(str::to_string);
    let given = match (bearer, in_query) {
        (Some(b), _) => b,
        (None, Some(q)) if stream => q,
        _ => String::new(),
    };
    let is = |t: &str| constant_time_eq(given.as_bytes(), t.as_bytes());
    if is(admin) || (reading && tokens.read.as_deref().is_some_and(is)) {
        return next.run(req).await;
    }
    if !reading && tokens.read.as_deref().is_some_and(is) {
        return ApiError::new(
            StatusCode::FORBIDDEN,
            "read_only",
            "this token may only read; submitting and cancelling need the admin token",
        )
        .into_response();
    }
    ApiError::new(
        StatusCode::UNAUTHORIZED,
        "unauthorized",
        "a valid bearer token is required (Authorization: Bearer …)",
    )
    .into_response()
}

fn constant_time_eq(a: &[u8], b: &[u8]) -> bool {
    a.len() == b.len() && a.iter().zip(b).fold(0u8, |acc, (x, y)| acc | (x ^ y)) == 0
}

/// Serves until `cancel`. Refuses a non-loopback address without an
/// admin token, and a read token without an admin token.
pub async fn serve(
    nats: Nats,
    addr: SocketAddr,
    tokens: ApiTokens,
    cancel: CancellationToken,
) -> Result<(), ServeError> {
    if !addr.ip().is_loopback() && tokens.admin.is_none() {
        return Err(ServeError::Exposed(addr));
    }
    if tokens.read.is_some() && tokens.admin.is_none() {
        return Err(ServeError::ReadTokenAlone);
    }
    let listener = tokio::net::TcpListener::bind(addr)
        .await
        .map_err(|source| ServeError::Bind { addr, source })?;
    tracing::info!(%addr, auth = tokens.admin.is_some(), read_token = tokens.read.is_some(), "HTTP API and web page listening");
    axum::serve(listener, router(nats, tokens))
        .with_graceful_shutdown(async move { cancel.cancelled().await })
        .await
        .map_err(ServeError::Serve)
}

/// Serves only `/metrics` and `/healthz` (for `fanjet manager --metrics`,
/// `fanjet worker --metrics`, or a metrics port apart from the API).
pub async fn serve_metrics(addr: SocketAddr, cancel: CancellationToken) -> Result<(), ServeError> {
    let listener = tokio::net::TcpListener::bind(addr)
        .await
        .map_err(|source| ServeError::Bind { addr, source })?;
    tracing::info!(%addr, "metrics listening");
    let app = Router::new()
        .route("/metrics", get(metrics))
        .route("/healthz", get(healthz));
    axum::serve(listener, app)
        .with_graceful_shutdown(async move { cancel.cancelled().await })
        .await
        .map_err(ServeError::Serve)
}

async fn index() -> Html<&'static str> {
    Html(INDEX)
}

async fn openapi() -> Response {
    ([(header::CONTENT_TYPE, "application/json")], OPENAPI).into_response()
}

async fn healthz() -> Json<Value> {
    Json(json!({"status": "ok"}))
}

async fn readyz(State(nats): State<Nats>) -> Response {
    let connected = nats.client.connection_state() == async_nats::connection::State::Connected;
    let infos = nats.events.iter().map(|log| async move {
        let mut log = log.clone();
        log.info().await.is_ok()
    });
    let streams = futures::future::join_all(infos)
        .await
        .into_iter()
        .all(|ok| ok);
    let body = json!({"nats_connected": connected, "streams": streams});
    let status = if connected && streams {
        StatusCode::OK
    } else {
        StatusCode::SERVICE_UNAVAILABLE
    };
    (status, Json(body)).into_response()
}

/// Live managers with their partitions, and workers with their slots.
async fn processes(State(nats): State<Nats>) -> Json<processes::Processes> {
    Json(processes::processes(&nats, monitor::live()).await)
}

async fn customers(
    State(nats): State<Nats>,
) -> ApiResult<Json<Vec<crate::protocol::CustomerUsage>>> {
    crate::nats::tenants::usage(&nats.js)
        .await
        .map(Json)
        .map_err(|e| ApiError::new(StatusCode::BAD_GATEWAY, "nats_error", e.to_string()))
}

async fn metrics() -> Response {
    (
        [(header::CONTENT_TYPE, "text/plain; version=0.0.4")],
        Metrics::get().render(),
    )
        .into_response()
}

#[derive(Debug, Deserialize)]
struct ListQuery {
    workflow: Option<String>,
    customer: Option<String>,
    state: Option<String>,
    since: Option<u64>,
    until: Option<u64>,
    prefix: Option<String>,
    cursor: Option<String>,
    limit: Option<usize>,
    #[serde(default)]
    counts: bool,
}

impl ListQuery {
    /// The listing it asks for (an empty parameter is no parameter), and
    /// of which customer's jobs.
    fn request(&self) -> ApiResult<(ListRequest, Option<String>)> {
        let given = |v: &Option<String>| v.clone().filter(|v| !v.is_empty());
        let state = match given(&self.state) {
            None => None,
            Some(name) => Some(JobState::parse(&name).ok_or_else(|| {
                ApiError::new(
                    StatusCode::BAD_REQUEST,
                    "bad_request",
                    format!("unknown state {name:?}"),
                )
            })?),
        };
        let req = ListRequest {
            workflow: given(&self.workflow),
            state,
            since: self.since,
            until: self.until,
            prefix: given(&self.prefix),
            cursor: given(&self.cursor),
            limit: self.limit,
            counts: self.counts,
        };
        Ok((req, given(&self.customer)))
    }
}

impl From<IndexError> for ApiError {
    fn from(e: IndexError) -> Self {
        match e {
            IndexError::BadRequest(m) => ApiError::new(StatusCode::BAD_REQUEST, "bad_request", m),
            e => ApiError::new(StatusCode::BAD_GATEWAY, "nats_error", e.to_string()),
        }
    }
}

/// One line of the jobs list: the index's summary and, for a job that has
/// not ended, its current step from its record.
fn summary(s: &JobSummary, record: Option<&Job>) -> Value {
    let mut line = serde_json::to_value(s).unwrap_or(Value::Null);
    if let (Some(job), Some(obj)) = (record, line.as_object_mut()) {
        let step = job.steps.get(job.current);
        obj.insert("state".into(), json!(job.state));
        obj.insert("step".into(), json!(step.map(|s| s.name.clone())));
        obj.insert("step_index".into(), json!(job.current));
        obj.insert("steps".into(), json!(job.steps.len()));
        obj.insert("done".into(), json!(step.map(|s| s.completed + s.failed)));
        obj.insert("total".into(), json!(step.map(|s| s.total)));
        obj.insert("paused_at".into(), json!(job.paused_at));
    }
    line
}

/// A page of the index with the running jobs' progress read from their
/// records (at most a page of reads, at once).
pub(crate) async fn page_with_progress(nats: &Nats, page: &JobPage) -> Vec<Value> {
    let lines: Vec<_> = page.jobs.iter().map(|s| line(nats, s)).collect();
    futures::stream::iter(lines).buffered(64).collect().await
}

async fn line(nats: &Nats, s: &JobSummary) -> Value {
    let record = match s.state.is_terminal() {
        true => None,
        false => store::status(nats, &s.job_id).await.ok().flatten(),
    };
    summary(s, record.as_ref())
}

async fn list_jobs(State(nats): State<Nats>, Query(q): Query<ListQuery>) -> ApiResult<Json<Value>> {
    let (req, customer) = q.request()?;
    let filter = req.filter(customer);
    let page = index::list(&nats, &filter, &req).await?;
    let mut body = json!({
        "jobs": page_with_progress(&nats, &page).await,
        "next_cursor": page.next_cursor,
    });
    if req.counts {
        body["counts"] = json!(index::counts(&nats, &filter).await?);
    }
    Ok(Json(body))
}

async fn job_counts(
    State(nats): State<Nats>,
    Query(q): Query<ListQuery>,
) -> ApiResult<Json<Value>> {
    let (req, customer) = q.request()?;
    Ok(Json(json!(
        index::counts(&nats, &req.filter(customer)).await?
    )))
}

async fn job(State(nats): State<Nats>, Path(id): Path<String>) -> ApiResult<Json<Value>> {
    let job = store::status(&nats, &id)
        .await?
        .ok_or_else(|| ApiError::from(ClientError::NoSuchJob(id.clone())))?;
    let st = store::stats(&nats, &id).await.ok().flatten();
    Ok(Json(detailed(&job, st.as_ref(), now_ms())))
}

#[derive(Debug, Deserialize)]
struct EventsQuery {
    #[serde(default)]
    from_seq: u64,
    #[serde(default = "default_event_limit")]
    limit: usize,
}

fn default_event_limit() -> usize {
    1000
}

async fn events(
    State(nats): State<Nats>,
    Path(id): Path<String>,
    Query(q): Query<EventsQuery>,
) -> ApiResult<Json<Value>> {
    if store::status(&nats, &id).await?.is_none() {
        return Err(ClientError::NoSuchJob(id).into());
    }
    let list = log::history(&nats, &id, q.from_seq, q.limit.clamp(1, 10_000)).await?;
    Ok(Json(json!({"job_id": id, "events": list})))
}

async fn stream(
    State(nats): State<Nats>,
    Path(id): Path<String>,
) -> ApiResult<Sse<impl Stream<Item = Result<SseEvent, Infallible>>>> {
    if store::status(&nats, &id).await?.is_none() {
        return Err(ClientError::NoSuchJob(id).into());
    }
    let watch = nats
        .records(&id)
        .watch(&id)
        .await
        .map_err(|e| ApiError::new(StatusCode::BAD_GATEWAY, "nats_error", e.to_string()))?;
    let nats2 = nats.clone();
    // One `status` event per change of the record; the stream ends after
    // the job ends.
    let updates = watch
        .filter_map(|entry| async move {
            entry
                .ok()
                .and_then(|e| serde_json::from_slice::<Job>(&e.value).ok())
        })
        .scan(false, |ended, job| {
            let out = if *ended { None } else { Some(job.clone()) };
            *ended = job.state.is_terminal();
            futures::future::ready(out)
        })
        .then(move |job| {
            let nats = nats2.clone();
            async move {
                let st = store::stats(&nats, &job.job_id).await.ok().flatten();
                let data = detailed(&job, st.as_ref(), now_ms());
                let kind = if job.state.is_terminal() {
                    "end"
                } else {
                    "status"
                };
                Ok(SseEvent::default().event(kind).data(data.to_string()))
            }
        });
    Ok(Sse::new(updates).keep_alive(KeepAlive::new().interval(Duration::from_secs(15))))
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct SubmitBody {
    workflow: String,
    job_id: Option<String>,
    customer: Option<String>,
    #[serde(default)]
    input: Value,
    #[serde(default)]
    priority: Option<u8>,
}

async fn submit(
    State(nats): State<Nats>,
    body: Result<Json<SubmitBody>, axum::extract::rejection::JsonRejection>,
) -> ApiResult<Response> {
    let Json(body) = body
        .map_err(|e| ApiError::new(StatusCode::BAD_REQUEST, "malformed_payload", e.body_text()))?;
    validate_token("workflow name", &body.workflow).map_err(|e| {
        ApiError::new(
            StatusCode::BAD_REQUEST,
            "invalid_workflow_name",
            e.to_string(),
        )
    })?;
    let sub = Submission {
        job_id: body.job_id,
        customer: body.customer,
        input: body.input,
        priority: body.priority,
    };
    let reply = client::submit(&nats.client, &body.workflow, &sub).await?;
    if let Some(err) = &reply.error {
        let status = match err.code {
            RejectCode::UnknownWorkflow => StatusCode::NOT_FOUND,
            RejectCode::PayloadTooLarge => StatusCode::PAYLOAD_TOO_LARGE,
            RejectCode::InvalidDefinition => StatusCode::UNPROCESSABLE_ENTITY,
            RejectCode::Unavailable => StatusCode::SERVICE_UNAVAILABLE,
            RejectCode::RateLimited => StatusCode::TOO_MANY_REQUESTS,
            RejectCode::Internal => StatusCode::BAD_GATEWAY,
            _ => StatusCode::BAD_REQUEST,
        };
        return Ok((status, Json(json!({"error": {"code": err.code, "message": err.message}, "job_id": reply.job_id}))).into_response());
    }
    let status = if reply.duplicate {
        StatusCode::OK
    } else {
        StatusCode::ACCEPTED
    };
    Ok((
        status,
        Json(json!({"job_id": reply.job_id, "duplicate": reply.duplicate})),
    )
        .into_response())
}

#[derive(Debug, Default, Deserialize)]
struct CancelBody {
    reason: Option<String>,
}

async fn cancel(
    State(nats): State<Nats>,
    Path(id): Path<String>,
    body: Option<Json<CancelBody>>,
) -> ApiResult<Response> {
    let reason = body.and_then(|Json(b)| b.reason);
    client::cancel(&nats, &id, reason).await?;
    Ok((
        StatusCode::ACCEPTED,
        Json(json!({"job_id": id, "cancel": "requested"})),
    )
        .into_response())
}

async fn change(nats: &Nats, id: &str, change: client::Change, what: &str) -> ApiResult<Response> {
    client::update(nats, id, change).await?;
    Ok((
        StatusCode::ACCEPTED,
        Json(json!({"job_id": id, what: "requested"})),
    )
        .into_response())
}

async fn pause(
    State(nats): State<Nats>,
    Path(id): Path<String>,
    body: Option<Json<CancelBody>>,
) -> ApiResult<Response> {
    let reason = body.and_then(|Json(b)| b.reason);
    let c = client::Change {
        paused: Some(true),
        reason,
        ..Default::default()
    };
    change(&nats, &id, c, "pause").await
}

async fn resume(State(nats): State<Nats>, Path(id): Path<String>) -> ApiResult<Response> {
    let c = client::Change {
        paused: Some(false),
        ..Default::default()
    };
    change(&nats, &id, c, "resume").await
}

async fn update(
    State(nats): State<Nats>,
    Path(id): Path<String>,
    body: Result<Json<crate::protocol::ChangeRequest>, axum::extract::rejection::JsonRejection>,
) -> ApiResult<Response> {
    let Json(b) = body
        .map_err(|e| ApiError::new(StatusCode::BAD_REQUEST, "malformed_payload", e.body_text()))?;
    let bad = |m: String| ApiError::new(StatusCode::BAD_REQUEST, "invalid_change", m);
    if b.paused.is_some() {
        return Err(bad(
            "pause and resume have their own routes: POST …/pause, …/resume".into(),
        ));
    }
    let u = b.into_update(id.clone(), now_ms()).map_err(bad)?;
    let c = client::Change {
        max_in_flight: u.max_in_flight,
        tolerate: u.tolerate,
        reason: u.reason,
        ..Default::default()
    };
    change(&nats, &id, c, "update").await
}

/// Runs a failed job (or one that completed with failed subjobs) again
/// from a step: `{"step"?, "reason"?}`. 202 once the manager has started
/// the run (its number and how many subjobs run again), 409 with a code
/// when the job cannot be redriven, 410 when its input left the log.
async fn redrive(
    State(nats): State<Nats>,
    Path(id): Path<String>,
    body: Option<Json<crate::protocol::RedriveRequest>>,
) -> ApiResult<Response> {
    let b = body.map(|Json(b)| b).unwrap_or_default();
    let run = client::redrive(&nats, &id, b.step, b.reason).await?;
    let job = client::wait_for_run(&nats, &id, run, std::time::Duration::from_secs(10)).await?;
    let started = job.redrives.last();
    Ok((
        StatusCode::ACCEPTED,
        Json(json!({
            "job_id": id,
            "run": run,
            "step": started.and_then(|r| job.steps.get(r.step_index)).map(|s| s.name.clone()),
            "subjobs": started.map(|r| r.subjobs),
        })),
    )
        .into_response())
}

#[derive(Debug, Deserialize)]
struct ResultsQuery {
    #[serde(default)]
    failed: bool,
}

/// A step's results as JSON lines, streamed page by page from the log (a
/// million results in bounded memory); outcomes are checked against their
/// tasks' tokens with the key `fanjet serve` holds.
async fn results(
    State(nats): State<Nats>,
    Path((id, step)): Path<(String, usize)>,
    Query(q): Query<ResultsQuery>,
) -> ApiResult<Response> {
    let job = store::status(&nats, &id)
        .await?
        .ok_or_else(|| ApiError::from(ClientError::NoSuchJob(id.clone())))?;
    if step >= job.steps.len() {
        let m = format!("job {id} has {} steps (from 0)", job.steps.len());
        return Err(ApiError::new(StatusCode::NOT_FOUND, "no_such_step", m));
    }
    let reader = log::ResultsReader::new(&nats, &job, step, nats.task_key.clone());
    let lines = futures::stream::unfold(Some(reader), move |reader| async move {
        let mut reader = reader?;
        match reader.next_page().await {
            Ok(Some(page)) => {
                let mut text = String::new();
                for c in page.iter().filter(|c| !q.failed || c.is_failed()) {
                    text.push_str(&c.to_json().to_string());
                    text.push('\n');
                }
                Some((Ok::<_, Infallible>(text), Some(reader)))
            }
            Ok(None) => None,
            // The body has begun: the error is its last line.
            Err(e) => Some((Ok(format!("{}\n", json!({"error": e.to_string()}))), None)),
        }
    });
    Ok((
        [(header::CONTENT_TYPE, "application/x-ndjson")],
        axum::body::Body::from_stream(lines),
    )
        .into_response())
}
