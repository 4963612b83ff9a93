//! `idaics serve`: wires the stages together and runs them until SIGTERM or SIGINT.

use std::net::SocketAddr;
use std::sync::Arc;

use tokio::net::TcpListener;
use tokio::sync::{mpsc, watch};

use crate::config::Config;
use crate::scp::{self, ScpContext, ScpStats};
use crate::series::{self, DecidedSeries, SeriesTracker};
use crate::spool::{Spool, SpoolError, SpoolPolicy};
use crate::systemd;

#[derive(Debug, thiserror::Error)]
pub enum ServiceError {
    #[error("cannot prepare the state directory {path}: {source}")]
    StateDir { path: String, source: std::io::Error },
    #[error(transparent)]
    Spool(#[from] SpoolError),
    #[error("cannot listen on {addr}: {source}")]
    Bind { addr: String, source: std::io::Error },
    #[error("cannot install the signal handler: {0}")]
    Signal(std::io::Error),
}

/// Runs the agent until a termination signal, then drains open associations and returns.
pub async fn run(config: Config) -> Result<(), ServiceError> {
    let config = Arc::new(config);
    let state_dir = &config.storage.state_dir;
    std::fs::create_dir_all(state_dir)
        .map_err(|source| ServiceError::StateDir { path: state_dir.display().to_string(), source })?;
    let spool = Arc::new(Spool::open(
        config.storage.spool_dir(),
        config.storage.tmp_dir(),
        SpoolPolicy {
            fsync: config.storage.fsync,
            max_instance_bytes: config.limits.max_instance_bytes(),
            verify_compressed_pixel_data: config.storage.verify_compressed_pixel_data,
        },
    )?);
    if !config.storage.fsync {
        tracing::warn!("storage.fsync is off: acknowledged instances may be lost in a power failure");
    }

    let (decisions_tx, decisions_rx) = mpsc::unbounded_channel();
    let tracker = {
        let (series_config, spool) = (config.series.clone(), spool.clone());
        tokio::task::spawn_blocking(move || SeriesTracker::recover(series_config, spool, decisions_tx))
            .await
            .expect("recovery task does not panic")?
    };

    let addr = format!("{}:{}", config.dicom.bind_address, config.dicom.port);
    let listener =
        TcpListener::bind(&addr).await.map_err(|source| ServiceError::Bind { addr: addr.clone(), source })?;
    let local: SocketAddr = listener.local_addr().map_err(|source| ServiceError::Bind { addr, source })?;

    let (events_tx, events_rx) = mpsc::unbounded_channel();
    let tracker_task = tokio::spawn(series::run_tracker(tracker, events_rx));
    let pipeline_task = tokio::spawn(pipeline(decisions_rx));

    let stats = Arc::new(ScpStats::default());
    let ctx = Arc::new(ScpContext::new(config.clone(), spool, events_tx, stats));
    let (shutdown_tx, shutdown_rx) = watch::channel(false);
    let scp_task = tokio::spawn(scp::serve(listener, ctx, shutdown_rx));

    tracing::info!(
        ae_title = %config.dicom.ae_title,
        address = %local,
        state_dir = %state_dir.display(),
        version = env!("CARGO_PKG_VERSION"),
        "listening for DICOM associations"
    );
    systemd::notify_ready();
    let watchdog = systemd::watchdog_interval().map(|interval| {
        tokio::spawn(async move {
            let mut tick = tokio::time::interval(interval);
            loop {
                tick.tick().await;
                systemd::notify_watchdog();
            }
        })
    });

    wait_for_signal().await?;
    tracing::info!("termination requested: finishing in-flight work");
    systemd::notify_stopping();
    let _ = shutdown_tx.send(true);
    let _ = scp_task.await;
    // The SCP context held the last event sender: the tracker drains its queue and stops.
    let _ = tracker_task.await;
    let _ = pipeline_task.await;
    if let Some(w) = watchdog {
        w.abort();
    }
    tracing::info!("stopped");
    Ok(())
}

async fn wait_for_signal() -> Result<(), ServiceError> {
    use tokio::signal::unix::{SignalKind, signal};
    let mut term = signal(SignalKind::terminate()).map_err(ServiceError::Signal)?;
    let mut int = signal(SignalKind::interrupt()).map_err(ServiceError::Signal)?;
    tokio::select! {
        _ = term.recv() => {}
        _ = int.recv() => {}
    }
    Ok(())
}

/// Receives decided series. The analysis pipeline (volume, spine, detector, report) attaches
/// here; until it exists, a complete series is logged as ready.
async fn pipeline(mut decisions: mpsc::UnboundedReceiver<DecidedSeries>) {
    while let Some(series) = decisions.recv().await {
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
