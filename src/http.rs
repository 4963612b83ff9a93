//! The HTTP side: health for the service manager and load balancers, Prometheus metrics, and the
//! findings API. Loopback by default (see `[http]` in the configuration).

use std::fmt::Write as _;
use std::path::PathBuf;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};

use axum::Router;
use axum::extract::{Path, RawQuery, State};
use axum::http::{StatusCode, header};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};

use crate::ingest::scp::ScpStats;
use crate::pipeline::PipelineStats;
use crate::store::db::{Db, FindingFilter, JOB_STATES, Page, SeriesFilter};

/// What the handlers read.
#[derive(Clone)]
pub struct HttpState {
    /// For reviews, the API's one write.
    pub db: Db,
    /// For everything the API reads (see `Db::open_reader`).
    pub reader: Db,
    pub scp: Arc<ScpStats>,
    pub pipeline: Arc<PipelineStats>,
    /// Where the spool writes its temporary files: checked writable by `/readyz`.
    pub spool_tmp: PathBuf,
    /// The weights in use; configured but not loaded makes the agent not ready (no weights
    /// configured: it reports levels only, which is ready).
    pub model: Arc<crate::pipeline::ModelSlot>,
    /// Why the DICOM listener refuses every association, while nobody has said who may send.
    pub closed: Option<&'static str>,
}

/// The routes. With a token, the findings API answers only requests that bear it; health and
/// metrics stay open to the service manager and Prometheus (they hold no patient data).
pub fn router(state: HttpState, api_token: &str) -> Router {
    let mut api = Router::new()
        .route("/api/v1/findings", get(findings))
        .route("/api/v1/findings/{id}/review", post(review))
        .route("/api/v1/history", get(history))
        .route("/api/v1/series", get(series))
        .route("/api/v1/jobs", get(jobs))
        .route("/api/v1/outbox", get(outbox));
    if !api_token.is_empty() {
        let expected: Arc<str> = format!("Bearer {api_token}").into();
        api = api.route_layer(axum::middleware::from_fn(move |request, next| {
            let expected = expected.clone();
            require_token(expected, request, next)
        }));
    }
    Router::new()
        .route("/healthz", get(|| async { "ok\n" }))
        .route("/readyz", get(readyz))
        .route("/metrics", get(metrics))
        .merge(api)
        .with_state(state)
}

async fn require_token(expected: Arc<str>, request: axum::extract::Request, next: axum::middleware::Next) -> Response {
    let presented = request.headers().get(header::AUTHORIZATION).map(|v| v.as_bytes()).unwrap_or_default();
    if same_secret(presented, expected.as_bytes()) {
        return next.run(request).await;
    }
    let mut response = (
        StatusCode::UNAUTHORIZED,
        axum::Json(serde_json::json!({ "error": "a bearer token is required (http.api_token)" })),
    )
        .into_response();
    response.headers_mut().insert(header::WWW_AUTHENTICATE, header::HeaderValue::from_static("Bearer"));
    response
}

/// Compares in time that depends on the length only, so a token cannot be guessed byte by byte
/// from how long refusals take.
fn same_secret(presented: &[u8], expected: &[u8]) -> bool {
    presented.len() == expected.len() && presented.iter().zip(expected).fold(0u8, |acc, (a, b)| acc | (a ^ b)) == 0
}

/// What one HTTP client may hold.
#[derive(Debug, Clone, Copy)]
pub struct HttpLimits {
    pub max_connections: usize,
    pub header_timeout: std::time::Duration,
    pub connection_timeout: std::time::Duration,
}

/// Serves HTTP/1.1 with bounds axum's own loop lacks: connections beyond the cap are closed as
/// they arrive, headers must come within a timeout (a client that sends a byte a minute holds
/// nothing for long), and a connection lives at most its timeout, bodies and responses included.
pub async fn serve(listener: tokio::net::TcpListener, app: Router, limits: HttpLimits) {
    let slots = Arc::new(tokio::sync::Semaphore::new(limits.max_connections));
    loop {
        let (stream, peer) = match listener.accept().await {
            Ok(accepted) => accepted,
            Err(e) => {
                tracing::warn!(error = %e, "HTTP accept failed");
                tokio::time::sleep(std::time::Duration::from_millis(50)).await;
                continue;
            }
        };
        let Ok(slot) = slots.clone().try_acquire_owned() else {
            tracing::debug!(%peer, limit = limits.max_connections, "HTTP connections at their limit; closing");
            continue;
        };
        let service = hyper_util::service::TowerToHyperService::new(app.clone());
        tokio::spawn(async move {
            let connection = hyper::server::conn::http1::Builder::new()
                .timer(hyper_util::rt::TokioTimer::new())
                .header_read_timeout(limits.header_timeout)
                .serve_connection(hyper_util::rt::TokioIo::new(stream), service);
            if tokio::time::timeout(limits.connection_timeout, connection).await.is_err() {
                tracing::debug!(%peer, "HTTP connection open longer than http.connection_timeout_s; closed");
            }
            drop(slot);
        });
    }
}

async fn readyz(State(state): State<HttpState>) -> Response {
    let database = state.db.ping().await;
    let probe = state.spool_tmp.join(".readyz");
    let spool = std::fs::write(&probe, b"ok").and_then(|()| std::fs::remove_file(&probe)).is_ok();
    let loaded = state.model.loaded();
    let model = loaded != Some(false);
    let body = serde_json::json!({
        "database": database, "spool_writable": spool,
        "model": match loaded { None => "not configured", Some(true) => "loaded", Some(false) => "not loaded" },
        "weights_sha256": state.model.current().map(|d| d.sha256.clone()),
        "accepting_associations": state.closed.is_none(),
        "not_accepting_because": state.closed,
    });
    let status = if database && spool && model && state.closed.is_none() {
        StatusCode::OK
    } else {
        StatusCode::SERVICE_UNAVAILABLE
    };
    (status, axum::Json(body)).into_response()
}

async fn metrics(State(state): State<HttpState>) -> Response {
    let mut out = String::new();
    let load = |c: &AtomicU64| c.load(Ordering::Relaxed);
    let mut family = |name: &str, kind: &str, help: &str, samples: &[(&str, u64)]| {
        let _ = writeln!(out, "# HELP {name} {help}\n# TYPE {name} {kind}");
        for (labels, value) in samples {
            let _ = writeln!(out, "{name}{labels} {value}");
        }
    };
    let scp = &state.scp;
    family(
        "idaics_associations_total",
        "counter",
        "DICOM associations, by outcome.",
        &[
            ("{outcome=\"accepted\"}", load(&scp.associations_accepted)),
            ("{outcome=\"rejected\"}", load(&scp.associations_rejected)),
        ],
    );
    family(
        "idaics_rejections_unlogged_total",
        "counter",
        "Rejected connections beyond the rate at which they are logged and recorded (30 a minute).",
        &[("", load(&scp.rejections_unreported))],
    );
    family(
        "idaics_instances_received_total",
        "counter",
        "Instances stored in the spool.",
        &[("", load(&scp.instances_stored))],
    );
    family(
        "idaics_bytes_received_total",
        "counter",
        "Bytes of instances stored in the spool.",
        &[("", load(&scp.bytes_stored))],
    );
    family(
        "idaics_instances_discarded_total",
        "counter",
        "Instances of other SOP classes accepted and discarded.",
        &[("", load(&scp.instances_discarded))],
    );
    family(
        "idaics_store_failures_total",
        "counter",
        "C-STORE requests answered with a failure.",
        &[("", load(&scp.store_failures))],
    );
    let p = &state.pipeline;
    family(
        "idaics_series_total",
        "counter",
        "Series decided by the tracker, by state.",
        &[("{state=\"complete\"}", load(&p.series_completed)), ("{state=\"skipped\"}", load(&p.series_skipped))],
    );
    family(
        "idaics_jobs_total",
        "counter",
        "Analysis jobs finished, by outcome.",
        &[("{outcome=\"done\"}", load(&p.jobs_done)), ("{outcome=\"failed\"}", load(&p.jobs_failed))],
    );
    family(
        "idaics_jobs_taken_over_total",
        "counter",
        "Jobs queued again because their agent stopped renewing its claim.",
        &[("", load(&p.jobs_taken_over))],
    );
    family(
        "idaics_series_purged_total",
        "counter",
        "Series whose instances and objects retention removed from the state directory.",
        &[("", load(&p.series_purged))],
    );
    let _ = writeln!(
        out,
        "# HELP idaics_inference_seconds Detector time per job.\n# TYPE idaics_inference_seconds histogram"
    );
    p.inference.write(&mut out, "idaics_inference_seconds", "");
    let _ = writeln!(
        out,
        "# HELP idaics_stage_seconds Time of each stage of a job: load (decode the volume), levels \
         (locate and name the discs), slices, inference, objects (write the report objects).\n\
         # TYPE idaics_stage_seconds histogram"
    );
    for (stage, histogram) in crate::pipeline::STAGES.iter().zip(&p.stages) {
        histogram.write(&mut out, "idaics_stage_seconds", &format!("stage=\"{stage}\","));
    }
    // The agent against its readers (each reviewed finding's latest review); left out with no
    // review or without the database.
    if let Ok(agreement) = state.reader.review_agreement().await
        && agreement.total() > 0
    {
        let _ = writeln!(
            out,
            "# HELP idaics_reviewed_findings Reviewed findings the agent gave a class, by whether the reader kept it.\n\
             # TYPE idaics_reviewed_findings gauge\n\
             idaics_reviewed_findings{{agreed=\"true\"}} {}\nidaics_reviewed_findings{{agreed=\"false\"}} {}",
            agreement.correct(),
            agreement.total() - agreement.correct()
        );
        if let Some(kappa) = agreement.kappa() {
            let _ = writeln!(
                out,
                "# HELP idaics_review_agreement_kappa Cohen's kappa between the agent's classes and its readers'.\n\
                 # TYPE idaics_review_agreement_kappa gauge\nidaics_review_agreement_kappa {kappa:.4}"
            );
        }
    }
    // The outbox lives in the database; without it the gauge is left out rather than made up.
    if let Ok(depth) = state.reader.outbox_depth().await {
        let _ = writeln!(
            out,
            "# HELP idaics_outbox_depth Objects waiting to be sent.\n# TYPE idaics_outbox_depth gauge\nidaics_outbox_depth {depth}"
        );
    }
    ([(header::CONTENT_TYPE, "text/plain; version=0.0.4; charset=utf-8")], out).into_response()
}

/// Rows in a page of a listing when the request names no `limit`.
const DEFAULT_PAGE_ROWS: u64 = 1000;
/// The most rows one request may ask for: a response is built whole in memory, next to the SCP.
const MAX_PAGE_ROWS: u64 = 10_000;

/// A listing's query: its filter, and its page (`limit`, `offset`), which is taken out first so
/// that the filter still refuses any name it does not know (a mistyped filter is an error, not
/// every row).
fn paged_query<T: serde::de::DeserializeOwned>(raw: Option<&str>) -> Result<(T, Page), String> {
    let pairs: Vec<(String, String)> = parse_query(raw.unwrap_or(""))?;
    let mut page = Page { limit: Some(DEFAULT_PAGE_ROWS), offset: 0 };
    let mut filter_pairs = Vec::with_capacity(pairs.len());
    for (name, value) in pairs {
        match name.as_str() {
            "limit" => match value.parse::<u64>() {
                Ok(n) if (1..=MAX_PAGE_ROWS).contains(&n) => page.limit = Some(n),
                _ => return Err(format!("limit {value:?} is not a number of rows from 1 to {MAX_PAGE_ROWS}")),
            },
            "offset" => {
                page.offset = value.parse().map_err(|_| format!("offset {value:?} is not a number of rows to skip"))?;
            }
            _ => filter_pairs.push((name, value)),
        }
    }
    let rest = serde_urlencoded::to_string(&filter_pairs).map_err(|e| format!("query string: {e}"))?;
    Ok((parse_query(&rest)?, page))
}

/// A query string as `T`, or what is wrong with it, for a JSON 400 like every other refusal
/// here (axum's own extractor answers in plain text).
fn parse_query<T: serde::de::DeserializeOwned>(query: &str) -> Result<T, String> {
    serde_urlencoded::from_str(query).map_err(|e| format!("query string: {e}"))
}

async fn findings(State(state): State<HttpState>, RawQuery(raw): RawQuery) -> Response {
    match paged_query::<FindingFilter>(raw.as_deref()) {
        Ok((filter, page)) => listing("findings", page, state.reader.findings(&filter, one_more(page)).await),
        Err(message) => bad_request(message),
    }
}

/// Decided series with their latest job: why a study has no results (a skipped series and its
/// reason, a failed job and its error), across every agent that shares the database.
async fn series(State(state): State<HttpState>, RawQuery(raw): RawQuery) -> Response {
    match paged_query::<SeriesFilter>(raw.as_deref()) {
        Ok((filter, page)) => listing("series", page, state.reader.series_log(&filter, one_more(page)).await),
        Err(message) => bad_request(message),
    }
}

#[derive(serde::Deserialize)]
#[serde(deny_unknown_fields)]
struct HistoryQuery {
    patient: String,
}

async fn history(State(state): State<HttpState>, RawQuery(raw): RawQuery) -> Response {
    let q: HistoryQuery = match parse_query(raw.as_deref().unwrap_or("")) {
        Ok(q) => q,
        Err(message) => return bad_request(message),
    };
    match state.reader.history(&q.patient).await {
        Ok(entries) => axum::Json(serde_json::json!({ "patient": q.patient, "history": entries })).into_response(),
        Err(e) => unavailable(e),
    }
}

/// `?state=&series=` of the jobs and outbox listings.
#[derive(serde::Deserialize)]
#[serde(deny_unknown_fields)]
struct StateAndSeriesQuery {
    state: Option<String>,
    series: Option<String>,
}

/// The query and its page, or what is wrong with them.
fn listing_query(raw: Option<&str>, states: &[&str]) -> Result<(StateAndSeriesQuery, Page), String> {
    let (q, page): (StateAndSeriesQuery, Page) = paged_query(raw)?;
    if let Some(wanted) = &q.state
        && !states.contains(&wanted.as_str())
    {
        return Err(format!("state must be one of {}", states.join(", ")));
    }
    Ok((q, page))
}

/// A reader's review of a finding: `{"reviewer": "...", "confirm": true}` or
/// `{"reviewer": "...", "class": "bulge", "comment": "..."}`. 201 with the review; 404 for a
/// finding not in the log; 400 for a review the log refuses, with the reason.
async fn review(
    State(state): State<HttpState>,
    Path(id): Path<i64>,
    body: Result<axum::Json<crate::store::db::NewReview>, axum::extract::rejection::JsonRejection>,
) -> Response {
    let axum::Json(review) = match body {
        Ok(body) => body,
        Err(e) => return bad_request(e.body_text()),
    };
    match state.db.record_review(id, &review).await {
        Ok(row) => {
            tracing::info!(finding = id, reviewer = %row.reviewer, class = %row.class, confirmed = row.confirmed, "review recorded");
            (StatusCode::CREATED, axum::Json(row)).into_response()
        }
        Err(e @ crate::store::db::DbError::NoSuchFinding(_)) => {
            (StatusCode::NOT_FOUND, axum::Json(serde_json::json!({ "error": e.to_string() }))).into_response()
        }
        Err(e @ crate::store::db::DbError::Review(_)) => bad_request(e.to_string()),
        Err(e) => {
            (StatusCode::SERVICE_UNAVAILABLE, axum::Json(serde_json::json!({ "error": e.to_string() }))).into_response()
        }
    }
}

fn bad_request(message: String) -> Response {
    (StatusCode::BAD_REQUEST, axum::Json(serde_json::json!({ "error": message }))).into_response()
}

/// The database did not answer: the agent itself is up, so 503 rather than 500.
fn unavailable(error: crate::store::db::DbError) -> Response {
    (StatusCode::SERVICE_UNAVAILABLE, axum::Json(serde_json::json!({ "error": error.to_string() }))).into_response()
}

/// The page asked for and one row more, which tells whether another page follows.
fn one_more(page: Page) -> Page {
    Page { limit: page.limit.map(|n| n + 1), ..page }
}

/// `{key: rows, "next_offset": N}` from the rows fetched for [`one_more`]`(page)`, where
/// `next_offset` is the `offset` of the next page, or null on the last one; a 400 for a filter
/// the query cannot take, or a 503 when the database does not answer.
fn listing<T: serde::Serialize>(key: &str, page: Page, rows: Result<Vec<T>, crate::store::db::DbError>) -> Response {
    match rows {
        Ok(mut rows) => {
            let limit = page.limit.map_or(usize::MAX, |n| usize::try_from(n).unwrap_or(usize::MAX));
            let next_offset = (rows.len() > limit).then(|| page.offset.saturating_add(limit as u64));
            rows.truncate(limit);
            axum::Json(serde_json::json!({ key: rows, "next_offset": next_offset })).into_response()
        }
        Err(crate::store::db::DbError::Filter(message)) => bad_request(message),
        Err(e) => unavailable(e),
    }
}

/// Analysis jobs, newest first: what `idaics jobs` lists, for monitoring.
async fn jobs(State(state): State<HttpState>, RawQuery(raw): RawQuery) -> Response {
    match listing_query(raw.as_deref(), &JOB_STATES) {
        Ok((q, page)) => {
            listing("jobs", page, state.reader.jobs(q.state.as_deref(), q.series.as_deref(), one_more(page)).await)
        }
        Err(message) => bad_request(message),
    }
}

/// Deliveries, newest first: what `idaics outbox` lists, for monitoring a destination.
async fn outbox(State(state): State<HttpState>, RawQuery(raw): RawQuery) -> Response {
    match listing_query(raw.as_deref(), &crate::store::db::OUTBOX_STATES) {
        Ok((q, page)) => {
            listing("outbox", page, state.reader.outbox(q.state.as_deref(), q.series.as_deref(), one_more(page)).await)
        }
        Err(message) => bad_request(message),
    }
}
