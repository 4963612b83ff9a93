//! `idaics serve`: wires the stages together and runs them until SIGTERM or SIGINT.

use std::fs::{File, OpenOptions, TryLockError};
use std::io::Write;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use tokio::net::TcpListener;
use tokio::sync::{mpsc, watch};

use crate::config::Config;
use crate::http::HttpState;
use crate::ingest::scp::{self, ScpContext, ScpStats};
use crate::ingest::series::{self, DecidedSeries, SeriesTracker};
use crate::ingest::spool::{Spool, SpoolError, SpoolPolicy};
use crate::pipeline::ModelSlot;
use crate::pipeline::PipelineStats;
use crate::store::db::{Db, Record, SeriesRow, Writer};
use crate::systemd;

#[derive(Debug, thiserror::Error)]
pub enum ServiceError {
    #[error("cannot prepare the state directory {path}: {source}")]
    StateDir { path: String, source: std::io::Error },
    #[error("the state directory {path} is in use by another agent of this host ({holder}); one per host")]
    StateDirInUse { path: String, holder: String },
    #[error(transparent)]
    Spool(#[from] SpoolError),
    #[error("cannot listen on {addr}: {source}")]
    Bind { addr: String, source: std::io::Error },
    #[error(transparent)]
    Tls(#[from] crate::tls::TlsError),
    #[error("cannot install the signal handler: {0}")]
    Signal(std::io::Error),
    #[error(transparent)]
    Database(#[from] crate::store::db::DbError),
}

/// Takes this host's place in the state directory for as long as the returned file is open. Two
/// agents of one host on one state directory would both recover, complete and analyse the same
/// series, and each would take up the other's running jobs as interrupted. Agents of other hosts
/// may share the directory on shared storage: their jobs are claimed under their own host name.
fn lock_state_dir(state_dir: &Path, host: &str) -> Result<File, ServiceError> {
    let host: String =
        host.chars().map(|c| if c.is_ascii_alphanumeric() || c == '-' || c == '.' { c } else { '_' }).collect();
    let path = state_dir.join(format!("agent-{host}.lock"));
    let failed = |source| ServiceError::StateDir { path: path.display().to_string(), source };
    let mut file =
        OpenOptions::new().read(true).write(true).create(true).truncate(false).open(&path).map_err(failed)?;
    match file.try_lock() {
        Ok(()) => {}
        Err(TryLockError::WouldBlock) => {
            let holder = std::fs::read_to_string(&path).unwrap_or_default().trim().to_string();
            return Err(ServiceError::StateDirInUse {
                path: state_dir.display().to_string(),
                holder: if holder.is_empty() { "process unknown".into() } else { holder },
            });
        }
        Err(TryLockError::Error(e)) => return Err(failed(e)),
    }
    file.set_len(0).and_then(|()| write!(file, "process {}", std::process::id())).map_err(failed)?;
    Ok(file)
}

/// This agent's lasting identity in the job table: host and state directory.
fn workplace(state_dir: &Path, host: &str) -> String {
    let dir = state_dir.canonicalize().unwrap_or_else(|_| state_dir.to_path_buf());
    format!("{host}:{}", dir.display())
}

/// Runs the agent until a termination signal, then drains open associations and returns.
/// `config_path` is where the configuration was read from, read again on SIGHUP.
pub async fn run(config: Config, config_path: Option<PathBuf>) -> Result<(), ServiceError> {
    let config = Arc::new(config);
    let state_dir = &config.storage.state_dir;
    std::fs::create_dir_all(state_dir)
        .map_err(|source| ServiceError::StateDir { path: state_dir.display().to_string(), source })?;
    let _state_dir_lock = lock_state_dir(state_dir, &config.storage.effective_host_name())?;
    let spool = Arc::new(Spool::open(
        config.storage.spool_dir(),
        config.storage.tmp_dir(),
        SpoolPolicy {
            fsync: config.storage.fsync,
            max_instance_bytes: config.limits.max_instance_bytes(),
            structure: crate::ingest::spool::StructureLimits::configured(&config.limits),
            verify_compressed_pixel_data: config.storage.verify_compressed_pixel_data,
        },
    )?);
    if !config.storage.fsync {
        tracing::warn!("storage.fsync is off: acknowledged instances may be lost in a power failure");
    }

    // The finding log. A database that is down at start does not stop ingest: the writer keeps
    // records until it answers.
    let db_url = config.database.effective_url(state_dir);
    let db = Db::open(&db_url)?;
    match db.migrate().await {
        Ok(()) => {
            tracing::info!(database = %crate::common::redact_url(&db_url), "database ready");
            match db.outbox_retry_now().await {
                Ok(0) => {}
                Ok(n) => tracing::info!(objects = n, "objects left in the outbox are sent again"),
                Err(e) => tracing::warn!(error = %e, "cannot read the outbox"),
            }
        }
        Err(e) => {
            tracing::error!(error = %e, "database unreachable at start; receiving anyway, records kept until it answers")
        }
    }
    let (records_tx, records_rx) = mpsc::unbounded_channel();
    // Checked before anything listens: a TLS port that cannot serve is a configuration error.
    let tls = crate::tls::server_config(&config.dicom)?;
    // What the watchdog waits to hear from: the accept loops, the tracker and the stage that
    // records decided series wake every few seconds, the writer every 10 s (longer while a
    // database that is down makes it wait), the worker between jobs.
    let mut parts = vec![
        ("receiver", std::time::Duration::from_secs(30)),
        ("tracker", std::time::Duration::from_secs(30)),
        ("pipeline", std::time::Duration::from_secs(60)),
        ("writer", std::time::Duration::from_secs(180)),
        ("worker", std::time::Duration::from_secs(config.limits.max_job_s.saturating_add(10))),
    ];
    if tls.is_some() {
        parts.push(("tls receiver", std::time::Duration::from_secs(30)));
    }
    let liveness = systemd::Liveness::new(&parts);
    // Wakes the job worker when a job is queued or ends, and the senders when objects are due.
    let wake = Arc::new(tokio::sync::Notify::new());
    let writer_task = tokio::spawn(
        Writer::new(db.clone(), state_dir, &config.storage.effective_host_name())
            .with_heartbeat(liveness.heartbeat("writer"))
            .with_jobs_queued(wake.clone())
            .run(records_rx),
    );

    let (decisions_tx, decisions_rx) = mpsc::unbounded_channel();
    // One scan of the spool rebuilds the tracker and tells what the database may have missed.
    let (tracker, scanned) = {
        let (series_config, spool) = (config.series.clone(), spool.clone());
        tokio::task::spawn_blocking(move || -> Result<_, SpoolError> {
            let scanned = spool.scan()?;
            Ok((SeriesTracker::recover(series_config, spool, decisions_tx, &scanned)?, scanned))
        })
        .await
        .expect("recovery task does not panic")?
    };
    // Decisions made before a crash may not have reached the database: record again those it
    // does not hold at their revision (all of them when it cannot be asked; writes are idempotent).
    {
        let recorded = db.series_revisions().await.unwrap_or_default();
        let records = records_tx.clone();
        tokio::task::spawn_blocking(move || {
            for series in scanned {
                if let Some(record) = series.record
                    && recorded.get(&series.series_instance_uid) != Some(&i64::from(record.revision))
                {
                    let _ = records.send(Record::Series(series_row(&series.dir, &record)));
                }
            }
        })
        .await
        .expect("reconciliation does not panic");
    }

    let addr = format!("{}:{}", config.dicom.bind_address, config.dicom.port);
    let listener =
        TcpListener::bind(&addr).await.map_err(|source| ServiceError::Bind { addr: addr.clone(), source })?;
    let local: SocketAddr = listener.local_addr().map_err(|source| ServiceError::Bind { addr, source })?;
    let tls_listener = match &tls {
        Some(_) => {
            let addr = format!("{}:{}", config.dicom.bind_address, config.dicom.tls_port);
            Some(TcpListener::bind(&addr).await.map_err(|source| ServiceError::Bind { addr, source })?)
        }
        None => None,
    };

    let (events_tx, events_rx) = mpsc::unbounded_channel();
    let tracker_task = tokio::spawn(series::run_tracker(tracker, events_rx, liveness.heartbeat("tracker")));
    let pipeline_stats = Arc::new(PipelineStats::default());
    let pipeline_task = tokio::spawn(pipeline(
        decisions_rx,
        records_tx.clone(),
        pipeline_stats.clone(),
        liveness.heartbeat("pipeline"),
    ));

    let (retention_stop_tx, retention_stop_rx) = watch::channel(false);
    let retention_task = (config.storage.retention_days > 0.0).then(|| {
        let period = std::time::Duration::from_secs_f64(config.storage.retention_days * 86_400.0);
        let removal = Removal {
            outputs_dir: state_dir.join("outputs"),
            tracker: events_tx.clone(),
            stats: pipeline_stats.clone(),
        };
        tokio::spawn(retention(db.clone(), period, removal, retention_stop_rx))
    });

    let stats = Arc::new(ScpStats::default());
    let mut ctx = ScpContext::new(config.clone(), spool, events_tx, stats.clone());
    ctx.audit = Arc::new(crate::store::audit::Audit::new(ctx.agent_id.clone(), Some(records_tx.clone())));
    ctx.records = Some(records_tx);
    // Held for reloads; dropped before the writer is waited for, whose channel it feeds.
    let audit = ctx.audit.clone();
    let ctx = Arc::new(ctx);

    // The analysis worker and one sender per destination.
    let model = Arc::new(crate::pipeline::ModelSlot::new(!config.model.weights.is_empty(), None));
    if !config.model.weights.is_empty() {
        match crate::pipeline::Detector::load(std::path::Path::new(&config.model.weights), &config.model.device) {
            Ok(d) => {
                tracing::info!(weights = %config.model.weights, sha256 = %d.sha256, "detector loaded");
                model.replace(true, Some(d));
            }
            Err(e) => {
                tracing::error!(weights = %config.model.weights, error = %e, "cannot load the weights; series are analysed without findings");
            }
        }
    }
    let destinations = config
        .destinations
        .iter()
        .map(|d| -> Result<crate::pipeline::Destination, crate::tls::TlsError> {
            Ok(crate::pipeline::Destination {
                name: if d.name.is_empty() { format!("{}@{}:{}", d.ae_title, d.host, d.port) } else { d.name.clone() },
                target: if d.path.is_empty() {
                    crate::pipeline::Target::Dicom(crate::report::scu::Peer {
                        ae_title: d.ae_title.clone(),
                        host: d.host.clone(),
                        port: d.port,
                        tls: crate::tls::client_config(d)?,
                    })
                } else {
                    crate::pipeline::Target::Folder(d.path.clone().into())
                },
            })
        })
        .collect::<Result<Vec<_>, _>>()?;
    let worker = Arc::new(crate::pipeline::Worker {
        db: db.clone(),
        spool_dir: config.storage.spool_dir(),
        outputs_dir: state_dir.join("outputs"),
        model: model.clone(),
        destinations: destinations.clone(),
        outputs: config.outputs.clone(),
        series_config: config.series.clone(),
        claimant: crate::pipeline::Claimant {
            workplace: workplace(state_dir, &config.storage.effective_host_name()),
            agent_id: ctx.agent_id.clone(),
        },
        job_lease: std::time::Duration::from_secs(config.database.job_lease_s),
        stats: pipeline_stats.clone(),
        wake: wake.clone(),
    });
    let (stop_tx, stop_rx) = watch::channel(false);
    let mut background = vec![tokio::spawn(worker.run(stop_rx.clone(), liveness.heartbeat("worker")))];
    for d in destinations {
        tracing::info!(destination = %d.name, "sending results");
        let sender = crate::pipeline::Sender {
            db: db.clone(),
            audit: crate::store::audit::Audit::new(format!("{}/sender/{}", ctx.agent_id, d.name), None),
            outputs_dir: state_dir.join("outputs"),
            destination: d,
            calling_ae: config.dicom.ae_title.clone(),
            max_retry_interval_s: config.outputs.max_retry_interval_s,
            wake: wake.clone(),
        };
        background.push(tokio::spawn(crate::pipeline::run_sender(sender, stop_rx.clone())));
    }

    let http_task = if config.http.enabled {
        let addr = format!("{}:{}", config.http.bind_address, config.http.port);
        let listener =
            TcpListener::bind(&addr).await.map_err(|source| ServiceError::Bind { addr: addr.clone(), source })?;
        let state = HttpState {
            db: db.clone(),
            reader: Db::open_reader(&db_url)?,
            scp: stats,
            pipeline: pipeline_stats,
            spool_tmp: config.storage.tmp_dir(),
            model: model.clone(),
            closed: config.dicom.closed_until_configured(),
        };
        tracing::info!(address = %addr, "HTTP listening (/healthz, /readyz, /metrics, /api/v1/findings)");
        let limits = crate::http::HttpLimits {
            max_connections: config.http.max_connections,
            header_timeout: std::time::Duration::from_secs(config.http.header_timeout_s),
            connection_timeout: std::time::Duration::from_secs(config.http.connection_timeout_s),
        };
        let app = crate::http::router(state, &config.http.api_token);
        Some(tokio::spawn(crate::http::serve(listener, app, limits)))
    } else {
        None
    };
    let (shutdown_tx, shutdown_rx) = watch::channel(false);
    let tls_task = tls_listener.map(|listener| {
        let receiver = scp::serve(listener, ctx.clone(), shutdown_rx.clone(), liveness.heartbeat("tls receiver"), tls);
        tokio::spawn(receiver)
    });
    let scp_task = tokio::spawn(scp::serve(listener, ctx, shutdown_rx, liveness.heartbeat("receiver"), None));
    // Made once, before the agent says it is up: a SIGHUP from then on reloads rather than
    // terminates, and a signal that arrives while a reload runs is kept for the next wait.
    let mut signals = Signals::new()?;

    tracing::info!(
        ae_title = %config.dicom.ae_title,
        address = %local,
        state_dir = %state_dir.display(),
        version = env!("CARGO_PKG_VERSION"),
        "listening for DICOM associations"
    );
    if config.dicom.tls_port != 0 {
        tracing::info!(
            port = config.dicom.tls_port,
            client_certificates = if config.dicom.tls_client_ca.is_empty() { "not asked" } else { "required" },
            "listening for DICOM associations over TLS"
        );
    }
    if let Some(why) = config.dicom.closed_until_configured() {
        tracing::warn!("{why}");
    }
    let expiry_task = tokio::spawn(warn_of_expiring_certificates(config.clone()));
    systemd::notify_ready();
    let watchdog =
        systemd::watchdog_interval().map(|interval| tokio::spawn(systemd::feed_watchdog(interval, liveness)));

    loop {
        match signals.next().await {
            Signal::Terminate => break,
            Signal::Reload => reload_model(config_path.as_deref(), &config.model, &model, &audit).await,
        }
    }
    tracing::info!("termination requested: finishing in-flight work");
    expiry_task.abort();
    drop(audit);
    systemd::notify_stopping();
    let _ = shutdown_tx.send(true);
    let _ = retention_stop_tx.send(true);
    if let Some(task) = retention_task {
        let _ = task.await;
    }
    let _ = scp_task.await;
    if let Some(task) = tls_task {
        let _ = task.await;
    }
    // The SCP context held the last event sender: the tracker drains its queue and stops.
    let _ = tracker_task.await;
    let _ = pipeline_task.await;
    // The pipeline held the last record sender: the writer writes (or journals) what is left.
    let _ = writer_task.await;
    // A job in progress finishes; objects not yet sent stay in the outbox for the next start.
    let _ = stop_tx.send(true);
    for task in background {
        let _ = task.await;
    }
    if let Some(h) = http_task {
        h.abort();
    }
    if let Some(w) = watchdog {
        w.abort();
    }
    tracing::info!("stopped");
    Ok(())
}

/// Where retention sends its removals, and what it counts.
struct Removal {
    outputs_dir: std::path::PathBuf,
    tracker: mpsc::UnboundedSender<series::TrackerEvent>,
    stats: Arc<PipelineStats>,
}

/// Retention: now and then (a 24th of the period, between a second and an hour) asks the finding
/// log which series are past their period, finished and delivered, has the tracker remove them
/// (it owns the spool's series, and knows which were reopened since), and records it.
async fn retention(db: Db, period: std::time::Duration, removal: Removal, mut stop: watch::Receiver<bool>) {
    let Removal { outputs_dir, tracker, stats } = removal;
    let every = (period / 24).clamp(std::time::Duration::from_secs(1), std::time::Duration::from_secs(3600));
    loop {
        let asked_at = std::time::SystemTime::now();
        let decided_before = crate::common::rfc3339_before(asked_at, period);
        match db.series_past_retention(&decided_before).await {
            Ok(due) => {
                for series in due {
                    let (done, removed) = tokio::sync::oneshot::channel();
                    let purge = series::TrackerEvent::Purge {
                        study_uid: series.study_uid.clone(),
                        series_uid: series.series_uid.clone(),
                        asked_at,
                        outputs: outputs_dir.join(&series.series_uid),
                        done,
                    };
                    if tracker.send(purge).is_err() {
                        return;
                    }
                    if removed.await != Ok(true) {
                        continue;
                    }
                    stats.series_purged.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
                    if let Err(e) = db.mark_series_purged(&series).await {
                        tracing::warn!(series_uid = %series.series_uid, error = %e, "cannot record the removal");
                    }
                }
            }
            Err(e) => tracing::warn!(error = %e, "cannot look for series past their retention period"),
        }
        tokio::select! {
            _ = tokio::time::sleep(every) => {}
            _ = stop.changed() => return,
        }
    }
}

enum Signal {
    Terminate,
    Reload,
}

struct Signals {
    term: tokio::signal::unix::Signal,
    int: tokio::signal::unix::Signal,
    hangup: tokio::signal::unix::Signal,
}

impl Signals {
    fn new() -> Result<Signals, ServiceError> {
        use tokio::signal::unix::{SignalKind, signal};
        Ok(Signals {
            term: signal(SignalKind::terminate()).map_err(ServiceError::Signal)?,
            int: signal(SignalKind::interrupt()).map_err(ServiceError::Signal)?,
            hangup: signal(SignalKind::hangup()).map_err(ServiceError::Signal)?,
        })
    }

    async fn next(&mut self) -> Signal {
        tokio::select! {
            _ = self.term.recv() => Signal::Terminate,
            _ = self.int.recv() => Signal::Terminate,
            _ = self.hangup.recv() => Signal::Reload,
        }
    }
}

/// SIGHUP (`systemctl reload idaics`): the configuration is read again and new weights are put
/// in place between jobs, without dropping an association. The weights are loaded and checked
/// (every tensor the network needs, with its shape) before the old ones go: a file that fails
/// is refused with the reason, and the weights in use stay. Only `[model]` is applied; other
/// changes wait for a restart, and the log says so. `started_with` is the model section the agent
/// started with (command-line overrides included), for comparison.
async fn reload_model(
    config_path: Option<&Path>,
    started_with: &crate::config::ModelConfig,
    model: &ModelSlot,
    audit: &crate::store::audit::Audit,
) {
    let party = crate::store::audit::Party::default();
    match reload_model_from(config_path, started_with, model).await {
        Ok(outcome) => audit.record("reload", party, &outcome),
        Err(reason) => {
            tracing::error!(reason = %reason, "weights refused; the weights in use stay");
            audit.record("reload", party, &format!("weights refused: {reason}"));
        }
    }
}

async fn reload_model_from(
    config_path: Option<&Path>,
    started_with: &crate::config::ModelConfig,
    model: &ModelSlot,
) -> Result<String, String> {
    let config = Config::load(config_path).map_err(|e| format!("cannot read the configuration: {e}"))?;
    config.validate("reload").map_err(|e| format!("configuration not valid: {e}"))?;
    let wanted = config.model;
    let in_use = model.current();
    if wanted.weights.is_empty() {
        model.replace(false, None);
        tracing::warn!("no weights configured any more: series are analysed without findings");
        return Ok("no weights configured".into());
    }
    if wanted.device != started_with.device {
        tracing::warn!(device = %wanted.device, "model.device changes at the next restart");
    }
    let path = std::path::PathBuf::from(&wanted.weights);
    let device = started_with.device.clone();
    let detector = tokio::task::spawn_blocking(move || crate::pipeline::Detector::load(&path, &device))
        .await
        .map_err(|e| format!("loading the weights panicked: {e}"))?
        .map_err(|e| e.to_string())?;
    if in_use.as_ref().is_some_and(|d| d.sha256 == detector.sha256) {
        tracing::info!(weights = %wanted.weights, sha256 = %detector.sha256, "weights unchanged");
        return Ok(format!("weights unchanged: {}", detector.sha256));
    }
    let previous = in_use.map(|d| d.sha256.clone()).unwrap_or_else(|| "none".into());
    tracing::info!(weights = %wanted.weights, sha256 = %detector.sha256, previous = %previous, "weights reloaded: the next job uses them");
    let outcome = format!("weights reloaded: {} (was {previous})", detector.sha256);
    model.replace(true, Some(detector));
    Ok(outcome)
}

/// Receives decided series and logs them in the finding log (a complete one queues its job).
/// The analysis pipeline (volume, spine, detector, report) attaches here; until it exists, a
/// complete series is logged as ready.
async fn pipeline(
    mut decisions: mpsc::UnboundedReceiver<DecidedSeries>,
    records: mpsc::UnboundedSender<Record>,
    stats: Arc<PipelineStats>,
    heartbeat: systemd::Heartbeat,
) {
    use std::sync::atomic::Ordering;
    let mut alive = tokio::time::interval(std::time::Duration::from_secs(5));
    loop {
        heartbeat.beat();
        let series = tokio::select! {
            decided = decisions.recv() => match decided {
                Some(series) => series,
                None => break,
            },
            _ = alive.tick() => continue,
        };
        let counter = if series.is_complete() { &stats.series_completed } else { &stats.series_skipped };
        counter.fetch_add(1, Ordering::Relaxed);
        let (dir, record) = (series.dir.clone(), series.record.clone());
        if let Ok(row) = tokio::task::spawn_blocking(move || series_row(&dir, &record)).await {
            let _ = records.send(Record::Series(row));
        }
        if series.is_complete() {
            tracing::info!(
                series_uid = %series.record.series_instance_uid,
                slices = series.record.slices,
                dir = %series.dir.display(),
                "series queued for analysis"
            );
        }
    }
}

/// The finding log's row for a decided series: the tracker's record plus the identifiers a
/// person searches by, read from one of its instances.
fn series_row(dir: &std::path::Path, record: &crate::ingest::spool::SeriesRecord) -> SeriesRow {
    use dicom_dictionary_std::tags;
    let instance = crate::ingest::spool::instance_files(dir).ok().and_then(|files| files.into_iter().next());
    let object =
        instance.and_then(|p| dicom_object::OpenFileOptions::new().read_until(tags::PIXEL_DATA).open_file(&p).ok());
    let text = |tag| -> Option<String> {
        object
            .as_ref()?
            .element(tag)
            .ok()?
            .to_str()
            .ok()
            .map(|s| s.trim_matches([' ', '\0']).to_string())
            .filter(|s| !s.is_empty())
    };
    SeriesRow {
        series_uid: record.series_instance_uid.clone(),
        study_uid: record.study_instance_uid.clone(),
        patient_id: text(tags::PATIENT_ID),
        accession: text(tags::ACCESSION_NUMBER),
        study_date: text(tags::STUDY_DATE).and_then(|d| crate::store::db::dicom_date(&d)),
        body_part: text(tags::BODY_PART_EXAMINED),
        modality: text(tags::MODALITY),
        instances: record.instances as i64,
        slices: record.slices as i64,
        state: record.state.clone(),
        skip_reason: record.skip_reason.clone(),
        trigger_reason: record.trigger.clone(),
        revision: i64::from(record.revision),
        decided_at: record.decided_at.clone(),
    }
}

/// Names the certificates about to expire at the start and once a day after: an agent runs for
/// months, and its certificates end on dates of their own.
async fn warn_of_expiring_certificates(config: Arc<Config>) {
    let mut daily = tokio::time::interval(std::time::Duration::from_secs(86_400));
    loop {
        daily.tick().await;
        let config = config.clone();
        let notices = tokio::task::spawn_blocking(move || crate::tls::expiring_soon(&config)).await.unwrap_or_default();
        for notice in notices {
            tracing::warn!("{notice}; renew it before then, or associations over TLS will fail");
        }
    }
}
