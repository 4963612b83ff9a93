//! From a completed series to delivered objects: volume, disc levels and slices, the detector,
//! one finding per level, the key slices and the SR, the finding log, and the outbox that sends
//! them to every destination until each accepts.

use std::fmt::Write as _;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use candle_core::Device;
use tracing::Instrument;

use crate::analysis::detector::predict::{Detection, PredictOptions, RgbImage};
use crate::analysis::detector::yolov8_seg::YoloV8Seg;
use crate::analysis::detector::{WeightsInfo, load_network, select_device};
use crate::analysis::findings::LevelFinding;
use crate::analysis::slices::SliceImage;
use crate::analysis::spine::DiscLevel;
use crate::analysis::volume::Volume;
use crate::report::{Algorithm, Source, WrittenObject};
use crate::store::db::{Db, JobOutcome, OutboxEntry};

/// Side of the images the network sees (the paper's 512 x 512 slices).
pub const SLICE_SIZE: usize = 512;
/// Detections kept per view, below ultralytics' 0.25 default: the fusion of the two views
/// (`findings::fuse`) needs a view's weaker votes too, for the classes it cannot tell apart.
pub const DETECTION_CONFIDENCE: f32 = 0.1;

#[derive(Debug, thiserror::Error)]
pub enum PipelineError {
    #[error(transparent)]
    Volume(#[from] crate::analysis::volume::VolumeError),
    #[error(transparent)]
    Spine(#[from] crate::analysis::spine::SpineError),
    #[error(transparent)]
    Detector(#[from] crate::analysis::detector::DetectorError),
    #[error(transparent)]
    Report(#[from] crate::report::ReportError),
    #[error("cannot read the weights: {0}")]
    Weights(std::io::Error),
}

/// The network, loaded once.
pub struct Detector {
    network: YoloV8Seg,
    info: WeightsInfo,
    device: Device,
    pub sha256: String,
}

impl Detector {
    pub fn load(weights: &Path, device: &str) -> Result<Detector, PipelineError> {
        let device = select_device(device)?;
        let (network, info) = load_network(weights, &device)?;
        let sha256 = crate::report::sha256_file(weights).map_err(PipelineError::Weights)?;
        Ok(Detector { network, info, device, sha256 })
    }

    /// The network on the views of one series, as one batch.
    fn detect_all(&self, slices: &[&SliceImage]) -> Result<Vec<Vec<Detection>>, PipelineError> {
        let images: Vec<RgbImage> = slices
            .iter()
            .map(|slice| RgbImage {
                width: slice.size,
                height: slice.size,
                data: slice.pixels.iter().flat_map(|&v| [v, v, v]).collect(),
            })
            .collect();
        let options = PredictOptions { imgsz: self.info.input_size, conf: DETECTION_CONFIDENCE, ..Default::default() };
        Ok(crate::analysis::detector::predict::predict_batch(&self.network, &images, &options, &self.device)?)
    }

    /// The network on one image, at the confidence the analysis uses.
    pub fn detect_image(&self, image: &RgbImage) -> Result<Vec<Detection>, PipelineError> {
        let options = PredictOptions { imgsz: self.info.input_size, conf: DETECTION_CONFIDENCE, ..Default::default() };
        Ok(crate::analysis::detector::predict::predict(&self.network, image, &options, &self.device)?)
    }

    /// The weights' class names, by class index.
    pub fn class_names(&self) -> &[String] {
        &self.info.class_names
    }
}

/// The weights in use, swapped whole by a reload (SIGHUP). A job takes the detector once, when it
/// starts, and keeps it to its end: a reload takes effect between jobs, and every finding and
/// SR names the weights that made it.
pub struct ModelSlot {
    /// Whether the configuration names weights at all (without, levels only: not an outage).
    configured: std::sync::atomic::AtomicBool,
    current: std::sync::RwLock<Option<Arc<Detector>>>,
}

impl ModelSlot {
    pub fn new(configured: bool, detector: Option<Detector>) -> ModelSlot {
        ModelSlot {
            configured: std::sync::atomic::AtomicBool::new(configured),
            current: std::sync::RwLock::new(detector.map(Arc::new)),
        }
    }

    /// The detector a job starts with.
    pub fn current(&self) -> Option<Arc<Detector>> {
        self.current.read().unwrap_or_else(|e| e.into_inner()).clone()
    }

    /// Puts new weights in place (or none, when the configuration no longer names any).
    pub fn replace(&self, configured: bool, detector: Option<Detector>) {
        self.configured.store(configured, std::sync::atomic::Ordering::Relaxed);
        *self.current.write().unwrap_or_else(|e| e.into_inner()) = detector.map(Arc::new);
    }

    /// `None`: no weights configured; `Some(loaded)` otherwise.
    pub fn loaded(&self) -> Option<bool> {
        self.configured.load(std::sync::atomic::Ordering::Relaxed).then(|| self.current().is_some())
    }
}

/// The stages of a job, as its log line and `idaics_stage_seconds` name them.
pub const STAGES: [&str; 5] = ["load", "levels", "slices", "inference", "objects"];

/// Everything the analysis of one volume found.
pub struct Analysis {
    pub levels: Vec<DiscLevel>,
    pub sagittal: Option<SliceImage>,
    /// One per level, in the order of `levels`.
    pub axials: Vec<SliceImage>,
    pub findings: Vec<LevelFinding>,
    /// What a reader must know about how the series was read, for the report: blocks split at
    /// gaps in the archive, images set aside, names counted across a gap.
    pub notes: Vec<String>,
    /// Seconds per stage (names from [`STAGES`]) of what produced it.
    pub stage_seconds: Vec<(&'static str, f64)>,
}

/// [`analyze`] on the files of one series as the archive holds them: split into its contiguous
/// blocks, with what was split or set aside kept among the notes for the report.
pub fn analyze_files(
    files: &[PathBuf],
    config: &crate::config::SeriesConfig,
    detector: Option<&Detector>,
) -> Result<Analysis, PipelineError> {
    let started = std::time::Instant::now();
    let (blocks, loading_notes) = crate::analysis::volume::load_blocks(files, config)?;
    let loaded = started.elapsed().as_secs_f64();
    let mut analysis = analyze(&blocks, detector)?;
    analysis.notes.splice(0..0, loading_notes);
    analysis.stage_seconds.insert(0, ("load", loaded));
    Ok(analysis)
}

/// Levels, slices and findings of a series, given as the contiguous blocks it holds
/// ([`crate::analysis::volume::load_blocks`]); without a detector every finding is undetermined. Each
/// block is located and named on its own: a name is anchored only by landmarks in its block.
/// The sagittal image is cut through the block with the most levels.
pub fn analyze(blocks: &[Volume], detector: Option<&Detector>) -> Result<Analysis, PipelineError> {
    let mut notes = Vec::new();
    let mut clock = std::time::Instant::now();
    let mut stage_seconds = Vec::new();
    let mut lap = |stage: &'static str| {
        stage_seconds.push((stage, clock.elapsed().as_secs_f64()));
        clock = std::time::Instant::now();
    };
    let mut located: Vec<(usize, DiscLevel)> = Vec::new();
    let mut first_error = None;
    for (index, block) in blocks.iter().enumerate() {
        match crate::analysis::spine::locate_discs(block) {
            Ok(levels) => located.extend(levels.into_iter().map(|l| (index, l))),
            Err(e) if blocks.len() > 1 => {
                tracing::warn!(block = index + 1, blocks = blocks.len(), error = %e, "no disc level in this block of the series");
                first_error.get_or_insert(e);
            }
            Err(e) => return Err(e.into()),
        }
    }
    if located.is_empty() {
        return Err(first_error
            .unwrap_or_else(|| {
                crate::analysis::spine::SpineError::NotFound("the series holds no block of slices".into())
            })
            .into());
    }
    // A block that no landmark anchors takes its names from one that is, across the gap.
    let anchored_blocks: Vec<usize> =
        (0..blocks.len()).filter(|&b| located.iter().any(|(i, l)| *i == b && l.name_certain)).collect();
    if let Some(&anchored) = anchored_blocks.first() {
        let anchored_levels: Vec<DiscLevel> =
            located.iter().filter(|(i, _)| *i == anchored).map(|(_, l)| l.clone()).collect();
        let axis = crate::geometry::normalize(blocks[anchored].axes[2]);
        let axis = if axis[2] < 0.0 { axis.map(|v| -v) } else { axis };
        let mut renamed: Vec<(usize, DiscLevel)> = Vec::new();
        for b in 0..blocks.len() {
            let levels: Vec<DiscLevel> = located.iter().filter(|(i, _)| *i == b).map(|(_, l)| l.clone()).collect();
            if anchored_blocks.contains(&b) {
                renamed.extend(levels.into_iter().map(|l| (b, l)));
            } else {
                let named = crate::analysis::spine::name_across_gap(&anchored_levels, &levels, axis);
                if !named.is_empty() {
                    let names: Vec<&str> = named.iter().map(|l| l.name.as_str()).collect();
                    notes.push(format!(
                        "{} named by counting across a gap in the series from block {}: level uncertain",
                        names.join(", "),
                        anchored + 1
                    ));
                }
                if named.len() < levels.len() {
                    tracing::info!(
                        block = b + 1,
                        dropped = levels.len() - named.len(),
                        "levels counted across a gap beyond L5/S1 or T11/T12 are not reported"
                    );
                }
                renamed.extend(named.into_iter().map(|l| (b, l)));
            }
        }
        located = renamed;
    }
    let main_block = (0..blocks.len()).max_by_key(|&b| located.iter().filter(|(i, _)| *i == b).count()).unwrap_or(0);
    let main_levels: Vec<DiscLevel> =
        located.iter().filter(|(i, _)| *i == main_block).map(|(_, l)| l.clone()).collect();
    lap("levels");
    let sagittal = crate::analysis::slices::sagittal(&blocks[main_block], &main_levels, SLICE_SIZE);
    let axials: Vec<SliceImage> =
        located.iter().map(|(block, l)| crate::analysis::slices::axial(&blocks[*block], l, SLICE_SIZE)).collect();
    lap("slices");
    let levels: Vec<DiscLevel> = located.into_iter().map(|(_, l)| l).collect();
    let findings = match detector {
        None => crate::analysis::findings::undetermined(&levels),
        Some(d) => {
            let views: Vec<&SliceImage> = sagittal.iter().chain(axials.iter()).collect();
            let mut detections = d.detect_all(&views)?.into_iter();
            let sagittal_detections = if sagittal.is_some() { detections.next() } else { None };
            let axial_detections: Vec<Vec<Detection>> = detections.collect();
            let axial_pairs: Vec<(&SliceImage, &[Detection])> =
                axials.iter().zip(&axial_detections).map(|(a, d)| (a, d.as_slice())).collect();
            crate::analysis::findings::fuse(
                &levels,
                sagittal.as_ref().zip(sagittal_detections.as_deref()),
                &axial_pairs,
                &d.info.class_names,
            )
        }
    };
    lap("inference");
    Ok(Analysis { levels, sagittal, axials, findings, notes, stage_seconds })
}

/// Writes the key slices, the SEG (when there are masks), the Secondary Captures (when asked) and
/// the SR of an analysis into `dir`; returns them, the SR last.
pub fn write_objects(
    source: &Source,
    analysis: &Analysis,
    algorithm: &Algorithm,
    outputs: &crate::config::OutputsConfig,
    dir: &Path,
) -> Result<Vec<WrittenObject>, PipelineError> {
    let mut key_slices: Vec<(Option<String>, WrittenObject)> = Vec::new();
    let mut number = 1;
    if let Some(s) = &analysis.sagittal {
        key_slices.push((None, crate::report::key_slices::write(source, algorithm, s, number, dir)?));
        number += 1;
    }
    for (level, axial) in analysis.levels.iter().zip(&analysis.axials) {
        key_slices
            .push((Some(level.name.clone()), crate::report::key_slices::write(source, algorithm, axial, number, dir)?));
        number += 1;
    }
    let images: Vec<&SliceImage> = analysis.sagittal.iter().chain(analysis.axials.iter()).collect();
    let pairs: Vec<(&SliceImage, &WrittenObject)> = images.into_iter().zip(key_slices.iter().map(|(_, o)| o)).collect();
    // No SEG without masks (no weights, or nothing detected): it would have no segments.
    let seg = crate::report::seg::write(source, algorithm, &analysis.findings, &pairs, dir)?;
    let sr = crate::report::sr::write(
        source,
        algorithm,
        &analysis.findings,
        crate::report::sr::Evidence { key_slices: &key_slices, seg: seg.as_ref() },
        &analysis.notes,
        outputs.sr_storage,
        dir,
    )?;
    let mut objects: Vec<WrittenObject> = key_slices.into_iter().map(|(_, o)| o).collect();
    objects.extend(seg.map(|s| s.object));
    if outputs.secondary_capture {
        for (n, (finding, axial)) in analysis.findings.iter().zip(&analysis.axials).enumerate() {
            // The image that shows the finding best: the view of its strongest detection (a
            // Schmorl's node is seen on the sagittal image), else the level's axial image.
            let image = match (finding.evidence.first(), &analysis.sagittal) {
                (Some(best), Some(sagittal)) if best.view == crate::analysis::slices::View::SAGITTAL => sagittal,
                _ => axial,
            };
            objects.push(crate::report::secondary_capture::write(source, algorithm, finding, image, n + 1, dir)?);
        }
    }
    objects.push(sr);
    Ok(objects)
}

/// Where objects go.
#[derive(Debug, Clone)]
pub enum Target {
    Dicom(crate::report::scu::Peer),
    Folder(PathBuf),
}

#[derive(Debug, Clone)]
pub struct Destination {
    pub name: String,
    pub target: Target,
}

/// Parses `AE@HOST:PORT` or a folder path (the `--destination` flag). A folder is taken relative
/// to where the command was typed and made absolute, so that the log says where results go.
pub fn parse_destination(text: &str) -> Result<Destination, String> {
    if let Some((ae, address)) = text.split_once('@')
        && let Some((host, port)) = address.rsplit_once(':')
    {
        let port: u16 = port.parse().map_err(|_| format!("{text}: bad port"))?;
        if ae.is_empty() || ae.len() > 16 || host.is_empty() {
            return Err(format!("{text}: expected AE@HOST:PORT"));
        }
        return Ok(Destination {
            name: text.to_string(),
            target: Target::Dicom(crate::report::scu::Peer {
                ae_title: ae.to_string(),
                host: host.to_string(),
                port,
                tls: None,
            }),
        });
    }
    let folder = std::path::absolute(text).map_err(|e| format!("{text}: not a usable path: {e}"))?;
    Ok(Destination { name: format!("folder:{}", folder.display()), target: Target::Folder(folder) })
}

/// What the job worker needs.
pub struct Worker {
    pub db: Db,
    pub spool_dir: PathBuf,
    pub outputs_dir: PathBuf,
    pub model: Arc<ModelSlot>,
    pub destinations: Vec<Destination>,
    /// Which objects to write: Secondary Captures or not, the SR's storage class.
    pub outputs: crate::config::OutputsConfig,
    /// The series tracker's rules, which the volume must load by.
    pub series_config: crate::config::SeriesConfig,
    /// Names this worker in `jobs.claimed_by`: its workplace, `|`, then this run's agent id.
    pub claimant: Claimant,
    /// How long a claim lasts unrenewed (`database.job_lease_s`). The worker renews its claim
    /// four times per lease while a job runs, and takes over other agents' lapsed claims.
    pub job_lease: Duration,
    pub stats: Arc<PipelineStats>,
    /// Woken when a job is queued or an object enters the outbox.
    pub wake: Arc<tokio::sync::Notify>,
}

/// Who claims a job. The workplace (host and state directory) outlives a run of the agent, and
/// only one agent of a host at a time holds a state directory, so jobs still marked running under
/// this workplace when a worker starts were interrupted, and are this worker's to take up again.
#[derive(Debug, Clone)]
pub struct Claimant {
    pub workplace: String,
    pub agent_id: String,
}

impl Claimant {
    fn prefix(&self) -> String {
        format!("{}|", self.workplace)
    }

    fn name(&self) -> String {
        format!("{}{}", self.prefix(), self.agent_id)
    }
}

/// Attempts at one job: a job interrupted on its last attempt (still running under this
/// workplace at the next start, or its claim lapsed) is marked failed instead of queued again.
pub const MAX_JOB_ATTEMPTS: i64 = 3;

impl Worker {
    /// Takes up interrupted jobs, then claims and runs jobs until `shutdown` turns true.
    /// Claims and runs jobs until shutdown. It reports to the watchdog between jobs and while
    /// idle; a job that runs longer than the worker's allowance (`limits.max_job_s`) counts as
    /// hung (a decoder in a loop, a read that never returns).
    pub async fn run(
        self: Arc<Self>,
        mut shutdown: tokio::sync::watch::Receiver<bool>,
        heartbeat: crate::systemd::Heartbeat,
    ) {
        let mut recovered = false;
        let mut next_stale_scan = std::time::Instant::now();
        loop {
            heartbeat.beat();
            if *shutdown.borrow() {
                return;
            }
            if std::time::Instant::now() >= next_stale_scan {
                self.take_over_stale_jobs().await;
                next_stale_scan = std::time::Instant::now() + self.renew_every();
            }
            if !recovered {
                match self.db.recover_interrupted_jobs(&self.claimant.prefix(), MAX_JOB_ATTEMPTS).await {
                    Ok((queued, failed)) => {
                        if queued > 0 {
                            tracing::info!(jobs = queued, "jobs interrupted when the agent stopped are queued again");
                        }
                        if failed > 0 {
                            tracing::error!(
                                jobs = failed,
                                attempts = MAX_JOB_ATTEMPTS,
                                "jobs the agent stopped during on every attempt are marked failed"
                            );
                        }
                        recovered = true;
                    }
                    Err(e) => {
                        tracing::warn!(error = %e, "cannot look for interrupted jobs; retrying");
                        tokio::select! {
                            _ = tokio::time::sleep(Duration::from_secs(5)) => {}
                            _ = shutdown.changed() => {}
                        }
                        continue;
                    }
                }
            }
            // Listening before looking: a job queued while the claim runs wakes the wait below
            // instead of passing unheard (`notify_waiters` keeps nothing for later listeners).
            let woken = self.wake.notified();
            tokio::pin!(woken);
            woken.as_mut().enable();
            match self.db.claim_job(&self.claimant.name()).await {
                Ok(Some(job)) => {
                    // The span goes with the future (`instrument`), not with the thread: a guard
                    // from `enter` held across the awaits below leaves the span on whichever
                    // thread resumes, and tracing's registry then panics on a span already closed.
                    let span = tracing::info_span!("job", id = job.id, series_uid = %job.series_uid);
                    async {
                        tracing::info!(attempt = job.attempts, "job started");
                        let started = std::time::Instant::now();
                        let renewal = tokio::spawn(self.clone().keep_claim(job.id).in_current_span());
                        // The weights of the whole job, whatever a reload puts in place meanwhile.
                        let detector = self.model.current();
                        let outcome = self.clone().run_job(job.series_uid.clone(), job.id, detector.clone()).await;
                        renewal.abort();
                        let weights = detector.as_ref().map(|d| d.sha256.clone());
                        let ending = match &outcome {
                            Ok(results) => JobOutcome::Done {
                                weights_sha256: weights.as_deref(),
                                findings: &results.findings,
                                outbox: &results.outbox,
                            },
                            Err(e) => JobOutcome::Failed(e.as_str()),
                        };
                        match self.db.finish_job(job.id, &self.claimant.name(), ending).await {
                            Ok(true) => {
                                use std::sync::atomic::Ordering;
                                match &outcome {
                                    Ok(results) => {
                                        self.stats.jobs_done.fetch_add(1, Ordering::Relaxed);
                                        self.stats.observe_inference(started.elapsed().as_secs_f64());
                                        for (stage, seconds) in &results.stage_seconds {
                                            self.stats.observe_stage(stage, *seconds);
                                        }
                                        let stages: Vec<String> =
                                            results.stage_seconds.iter().map(|(s, t)| format!("{s} {t:.3}")).collect();
                                        let (levels, seconds) = (results.findings.len(), started.elapsed().as_secs_f64());
                                        tracing::info!(levels, seconds, stages = %stages.join(", "), "job done");
                                    }
                                    Err(e) => {
                                        self.stats.jobs_failed.fetch_add(1, Ordering::Relaxed);
                                        tracing::error!(error = %e, "job failed");
                                    }
                                }
                            }
                            Ok(false) => tracing::warn!(
                                lease_s = self.job_lease.as_secs(),
                                "another agent took this job over after its claim lapsed; its results are theirs to record"
                            ),
                            // The claim lapses and the job is taken up again, by this agent or another.
                            Err(e) => tracing::error!(error = %e, "cannot record the job's end"),
                        }
                        self.wake.notify_waiters();

                    }
                    .instrument(span)
                    .await;
                }
                Ok(None) => {
                    tokio::select! {
                        _ = woken => {}
                        _ = tokio::time::sleep(Duration::from_secs(2)) => {}
                        _ = shutdown.changed() => {}
                    }
                }
                Err(e) => {
                    tracing::warn!(error = %e, "cannot claim jobs; retrying");
                    tokio::time::sleep(Duration::from_secs(5)).await;
                }
            }
        }
    }

    /// One job: analysis and objects (blocking work off the async threads), then the findings and
    /// the objects to queue, which `finish_job` records together.
    async fn run_job(
        self: Arc<Self>,
        series_uid: String,
        job_id: i64,
        detector: Option<Arc<Detector>>,
    ) -> Result<JobResults, String> {
        let series =
            self.db.series_identity(&series_uid).await.map_err(|e| e.to_string())?.ok_or("series not in the log")?;
        // UIDs read back from the database become paths: checked again, since a database shared
        // with other agents (or edited by hand) is not the SCP that checked them at ingest.
        for uid in [&series.study_uid, &series_uid] {
            crate::ingest::spool::check_uid(uid)
                .map_err(|e| format!("the log's UID {uid:?} cannot name a folder: {e}"))?;
        }
        let dir = self.spool_dir.join(&series.study_uid).join(&series_uid);
        let out = self.outputs_dir.join(&series_uid);
        let worker = self.clone();
        let job_detector = detector.clone();
        let (analysis_findings, objects, source, stage_seconds) =
            tokio::task::spawn_blocking(move || -> Result<_, String> {
                let detector = job_detector;
                let files = crate::ingest::spool::instance_files(&dir).map_err(|e| e.to_string())?;
                // The tracker's tolerances, so a series it called complete loads here too.
                let analysis =
                    analyze_files(&files, &worker.series_config, detector.as_deref()).map_err(|e| e.to_string())?;
                let writing = std::time::Instant::now();
                let source = Source::read(&files).map_err(|e| e.to_string())?;
                let algorithm = Algorithm::new(detector.as_ref().map(|d| d.sha256.clone()));
                let objects =
                    write_objects(&source, &analysis, &algorithm, &worker.outputs, &out).map_err(|e| e.to_string())?;
                // Each object is synced as it is written; their names, and the series folder's
                // own name in the outputs folder, are made durable before the outbox rows that
                // point at them commit.
                for dir in [out.as_path(), worker.outputs_dir.as_path()] {
                    crate::ingest::spool::sync_dir(dir).map_err(|e| e.to_string())?;
                }
                let mut stage_seconds = analysis.stage_seconds;
                stage_seconds.push(("objects", writing.elapsed().as_secs_f64()));
                Ok((analysis.findings, objects, source, stage_seconds))
            })
            .await
            .map_err(|e| format!("analysis panicked: {e}"))??;
        let model_version = match &detector {
            Some(d) => format!("{} weights {}", env!("CARGO_PKG_VERSION"), &d.sha256[..12]),
            None => format!("{} (no weights)", env!("CARGO_PKG_VERSION")),
        };
        let rows: Vec<crate::store::db::FindingRow> = analysis_findings
            .iter()
            .map(|f| crate::store::db::FindingRow {
                id: None,
                job_id,
                series_uid: series_uid.clone(),
                study_uid: source.study_uid.clone(),
                patient_id: series.patient_id.clone(),
                accession: series.accession.clone(),
                study_date: series.study_date.clone(),
                level: f.level.name.clone(),
                level_certain: Some(f.level.name_certain),
                class: f.class.to_string(),
                confidence: f.confidence,
                views: f.views.iter().map(|v| v.to_string()).collect(),
                r#box: f.evidence.first().map(|e| e.bbox.map(f64::from)),
                mask_area_mm2: f.evidence.first().map(|e| e.mask_area_mm2),
                model_version: model_version.clone(),
                created_at: crate::store::db::now(),
            })
            .collect();
        let outbox = self
            .destinations
            .iter()
            .flat_map(|destination| {
                objects.iter().map(|o| OutboxEntry {
                    destination: destination.name.clone(),
                    object_path: o.path.to_string_lossy().into_owned(),
                    sop_class_uid: o.sop_class_uid.clone(),
                    sop_instance_uid: o.sop_instance_uid.clone(),
                })
            })
            .collect();
        Ok(JobResults { findings: rows, outbox, stage_seconds })
    }

    fn renew_every(&self) -> Duration {
        (self.job_lease / 4).max(Duration::from_secs(1))
    }

    /// Renews the claim on a running job until aborted.
    async fn keep_claim(self: Arc<Self>, job_id: i64) {
        let mut ticks = tokio::time::interval(self.renew_every());
        ticks.tick().await; // the claim itself was the first
        loop {
            ticks.tick().await;
            match self.db.renew_job(job_id, &self.claimant.name()).await {
                Ok(true) => {}
                Ok(false) => {
                    tracing::warn!("the claim on this job lapsed and another agent took it over");
                    return;
                }
                Err(e) => tracing::warn!(error = %e, "cannot renew the claim on this job; retrying"),
            }
        }
    }

    /// Queues again the jobs of agents that stopped renewing their claims.
    async fn take_over_stale_jobs(&self) {
        let stale_before = crate::common::rfc3339_before(std::time::SystemTime::now(), self.job_lease);
        match self.db.take_over_stale_jobs(&stale_before, MAX_JOB_ATTEMPTS).await {
            Ok((queued, failed)) => {
                if queued > 0 {
                    self.stats.jobs_taken_over.fetch_add(queued, std::sync::atomic::Ordering::Relaxed);
                    tracing::warn!(
                        jobs = queued,
                        lease_s = self.job_lease.as_secs(),
                        "jobs whose agent stopped renewing its claim are queued again"
                    );
                    self.wake.notify_waiters();
                }
                if failed > 0 {
                    tracing::error!(
                        jobs = failed,
                        attempts = MAX_JOB_ATTEMPTS,
                        "jobs whose agent stopped on every attempt are marked failed"
                    );
                }
            }
            Err(e) => tracing::warn!(error = %e, "cannot look for lapsed job claims"),
        }
    }
}

/// What a job found and what it queues, recorded together when it ends.
struct JobResults {
    findings: Vec<crate::store::db::FindingRow>,
    outbox: Vec<OutboxEntry>,
    /// Seconds per stage, by [`STAGES`].
    stage_seconds: Vec<(&'static str, f64)>,
}

/// What one destination's sender works with.
pub struct Sender {
    pub db: Db,
    /// Where each export is recorded (its rows written directly: see `Audit::entry`).
    pub audit: crate::store::audit::Audit,
    /// Only objects under it are sent (see `check_object_path`).
    pub outputs_dir: PathBuf,
    pub destination: Destination,
    pub calling_ae: String,
    pub max_retry_interval_s: u64,
    /// Notified when a job has queued objects.
    pub wake: Arc<tokio::sync::Notify>,
}

/// Sends a destination's due objects, with capped exponential back-off per object, until
/// `shutdown`. Objects survive restarts: they are rows in the outbox and files in the outputs.
/// A job's objects that are due together go to a DICOM destination over one association.
pub async fn run_sender(sender: Sender, mut shutdown: tokio::sync::watch::Receiver<bool>) {
    let Sender { db, audit, outputs_dir, destination, calling_ae, max_retry_interval_s, wake } = sender;
    loop {
        if *shutdown.borrow() {
            return;
        }
        // Listening before looking, as the worker does: a job that ends while the outbox is read
        // is heard.
        let woken = wake.notified();
        tokio::pin!(woken);
        woken.as_mut().enable();
        let due = match db.due_outbox(&destination.name, 100).await {
            Ok(due) => due,
            Err(e) => {
                tracing::warn!(destination = %destination.name, error = %e, "cannot read the outbox");
                Vec::new()
            }
        };
        for job_objects in due.chunk_by(|a, b| a.job_id == b.job_id) {
            let outcomes = send_objects(&outputs_dir, &destination, &calling_ae, job_objects).await;
            for (item, outcome) in job_objects.iter().zip(outcomes) {
                if let Delivery::Stored(status) = &outcome {
                    let party = crate::store::audit::Party { called_ae: Some(&destination.name), ..Default::default() };
                    let detail =
                        format!("object {} of job {} ({status})", item.sop_instance_uid, item.job_id.unwrap_or(0));
                    if let Err(e) = db.record_audit(&audit.entry("export", party, &detail)).await {
                        tracing::warn!(error = %e, "cannot record the export in the audit trail");
                    }
                }
                if let Err(e) = record_delivery(&db, &destination.name, item, outcome, max_retry_interval_s).await {
                    tracing::warn!(error = %e, "cannot record a delivery attempt");
                }
            }
        }
        if due.is_empty() {
            tokio::select! {
                _ = woken => {}
                _ = tokio::time::sleep(Duration::from_secs(1)) => {}
                _ = shutdown.changed() => {}
            }
        }
    }
}

/// Logs and records what became of one object: sent, or kept for a retry after its back-off.
async fn record_delivery(
    db: &Db,
    destination: &str,
    item: &crate::store::db::OutboxItem,
    outcome: Delivery,
    max_retry_interval_s: u64,
) -> Result<(), crate::store::db::DbError> {
    match outcome {
        Delivery::Stored(status) => {
            tracing::info!(destination = %destination, sop_instance_uid = %item.sop_instance_uid, status = %status, "object delivered");
            db.outbox_sent(item.id, &status).await
        }
        Delivery::Failed { status, error } => {
            // 5 s, 10 s, 20 s ... capped (5 minutes by default).
            let delay = (5u64 << item.attempts.clamp(0, 16) as u32).min(max_retry_interval_s.max(1));
            let secs =
                std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).map(|d| d.as_secs()).unwrap_or(0);
            let next = crate::common::rfc3339_at(secs + delay);
            tracing::warn!(destination = %destination, sop_instance_uid = %item.sop_instance_uid,
                status = status.as_deref().unwrap_or("none"), error = %error, retry_in_s = delay, "delivery failed; kept for a retry");
            db.outbox_failed(item.id, &next, status.as_deref(), &error).await
        }
        // Still due: the next round sends it, without the object that broke the association
        // (that one waits out its back-off).
        Delivery::NotAttempted => Ok(()),
    }
}

/// What became of one object.
enum Delivery {
    /// Stored: the status text ("0x0000", a warning, "copied").
    Stored(String),
    /// Refused or failed: the DIMSE status when there was one, and why.
    Failed { status: Option<String>, error: String },
    /// Not tried: the association ended on an earlier object.
    NotAttempted,
}

/// Where an outbox row's object may be: `<outputs>/<series UID>/<name>.dcm`, a plain file. The
/// path comes from the database, which other agents share; a row naming any other file (another
/// patient's, a key, a symbolic link to one) must never be sent to a PACS.
fn check_object_path(outputs_dir: &Path, path: &Path) -> Result<(), String> {
    let refused = |why: &str| Err(format!("outbox object {} refused: {why}", path.display()));
    let (Some(series_dir), Some(name)) = (path.parent(), path.file_name().and_then(|n| n.to_str())) else {
        return refused("no file name");
    };
    if series_dir.parent() != Some(outputs_dir) {
        return refused(&format!("not in a series folder of {}", outputs_dir.display()));
    }
    let series = series_dir.file_name().and_then(|n| n.to_str()).unwrap_or_default();
    if crate::ingest::spool::check_uid(series).is_err() {
        return refused("its folder is not a series UID");
    }
    let stem = name.strip_suffix(".dcm").unwrap_or_default();
    if stem.is_empty() || !stem.bytes().all(|b| b.is_ascii_alphanumeric() || b == b'-' || b == b'_' || b == b'.') {
        return refused("not an object name of this agent");
    }
    match std::fs::symlink_metadata(path) {
        Ok(meta) if meta.file_type().is_file() => Ok(()),
        Ok(_) => refused("not a plain file"),
        Err(e) => refused(&e.to_string()),
    }
}

/// Delivers one job's due objects, in order; one outcome per object.
async fn send_objects(
    outputs_dir: &Path,
    destination: &Destination,
    calling_ae: &str,
    items: &[crate::store::db::OutboxItem],
) -> Vec<Delivery> {
    let paths: Vec<PathBuf> = items.iter().map(|item| PathBuf::from(&item.object_path)).collect();
    if let Some(error) = paths.iter().find_map(|p| check_object_path(outputs_dir, p).err()) {
        tracing::error!(%error, "a job's outbox names a file outside this agent's outputs; none of its objects is sent");
        return paths.iter().map(|_| Delivery::Failed { status: None, error: error.clone() }).collect();
    }
    match &destination.target {
        Target::Folder(dir) => {
            let mut outcomes = Vec::with_capacity(paths.len());
            for path in paths {
                outcomes.push(match copy_to_folder(dir, path).await {
                    Ok(()) => Delivery::Stored("copied".into()),
                    Err(error) => Delivery::Failed { status: None, error },
                });
            }
            outcomes
        }
        Target::Dicom(peer) => {
            let (peer, calling) = (peer.clone(), calling_ae.to_string());
            let count = paths.len();
            let sent = tokio::task::spawn_blocking(move || {
                crate::report::scu::store_each(&peer, &calling, &paths, Duration::from_secs(30))
            })
            .await;
            let outcomes = match sent {
                Ok(outcomes) => outcomes,
                Err(e) => return (0..count).map(|_| Delivery::Failed { status: None, error: e.to_string() }).collect(),
            };
            outcomes
                .into_iter()
                .map(|outcome| match outcome {
                    // Success and warnings (0xB000, 0xB007, 0xB006) mean the object was stored.
                    Ok(status) if status == 0 || status & 0xF000 == 0xB000 => {
                        Delivery::Stored(format!("0x{status:04X}"))
                    }
                    Ok(status) => {
                        let text = format!("0x{status:04X}");
                        Delivery::Failed { error: format!("refused with status {text}"), status: Some(text) }
                    }
                    Err(crate::report::scu::ScuError::NotAttempted { .. }) => Delivery::NotAttempted,
                    Err(e) => Delivery::Failed { status: None, error: e.to_string() },
                })
                .collect()
        }
    }
}

/// Copies a file into `dir/<its series folder>/`, synced, under its own name only once complete.
/// The temporary file is created new (never opened through a link someone left in its place)
/// under a name of its own, and the series folder must be a folder, not a link to elsewhere.
async fn copy_to_folder(dir: &Path, path: PathBuf) -> Result<(), String> {
    static COPIES: std::sync::atomic::AtomicU64 = std::sync::atomic::AtomicU64::new(0);
    let name = path.file_name().map(|n| n.to_os_string()).unwrap_or_default();
    let series = path.parent().and_then(|p| p.file_name()).map(|n| n.to_os_string()).unwrap_or_default();
    let to_dir = dir.join(series);
    // The outbox records the object as sent once this returns: the copy, and its name in the
    // folder, must survive a power cut as an instance in the spool does.
    tokio::task::spawn_blocking(move || -> Result<(), String> {
        use std::os::unix::fs::OpenOptionsExt;
        fn io(what: &Path) -> impl FnOnce(std::io::Error) -> String + '_ {
            move |e| format!("{}: {e}", what.display())
        }
        crate::ingest::spool::create_dirs_durably(&to_dir, true).map_err(|e| e.to_string())?;
        if !std::fs::symlink_metadata(&to_dir).map_err(io(&to_dir))?.file_type().is_dir() {
            return Err(format!("{} is not a folder (a symbolic link?); nothing copied", to_dir.display()));
        }
        let unique = format!("{}-{}", std::process::id(), COPIES.fetch_add(1, std::sync::atomic::Ordering::Relaxed));
        let tmp = to_dir.join(format!(".{}.{unique}.tmp", name.to_string_lossy()));
        let copied = (|| -> Result<(), String> {
            let mut from = std::fs::File::open(&path).map_err(io(&path))?;
            let mut to = std::fs::OpenOptions::new()
                .write(true)
                .create_new(true)
                .custom_flags(libc::O_NOFOLLOW)
                .mode(0o640)
                .open(&tmp)
                .map_err(io(&tmp))?;
            std::io::copy(&mut from, &mut to).map_err(io(&tmp))?;
            to.sync_all().map_err(io(&tmp))?;
            std::fs::rename(&tmp, to_dir.join(&name)).map_err(io(&to_dir))
        })();
        if copied.is_err() {
            let _ = std::fs::remove_file(&tmp);
        }
        copied?;
        crate::ingest::spool::sync_dir(&to_dir).map_err(|e| e.to_string())
    })
    .await
    .map_err(|e| e.to_string())?
}

/// Upper bounds (seconds) of the inference latency histogram's buckets.
pub const INFERENCE_BUCKETS: [f64; 10] = [0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0];

/// Counters of the stages after the SCP, which `/metrics` shows.
#[derive(Debug, Default)]
pub struct PipelineStats {
    pub series_completed: AtomicU64,
    pub series_skipped: AtomicU64,
    pub jobs_done: AtomicU64,
    pub jobs_failed: AtomicU64,
    /// Jobs queued again because their agent stopped renewing its claim.
    pub jobs_taken_over: AtomicU64,
    /// Series whose instances and objects retention removed.
    pub series_purged: AtomicU64,
    /// Whole jobs.
    pub(crate) inference: Histogram,
    /// Each stage of a job, by [`STAGES`].
    pub(crate) stages: [Histogram; STAGES.len()],
}

/// A Prometheus histogram over [`INFERENCE_BUCKETS`].
#[derive(Debug, Default)]
pub(crate) struct Histogram {
    /// Per bucket (not cumulative), then the overflow bucket.
    buckets: [AtomicU64; INFERENCE_BUCKETS.len() + 1],
    micros_sum: AtomicU64,
}

impl Histogram {
    fn observe(&self, seconds: f64) {
        let bucket = INFERENCE_BUCKETS.iter().position(|b| seconds <= *b).unwrap_or(INFERENCE_BUCKETS.len());
        self.buckets[bucket].fetch_add(1, Ordering::Relaxed);
        self.micros_sum.fetch_add((seconds * 1e6) as u64, Ordering::Relaxed);
    }

    /// The series of `name` with `labels` (`stage="load",` or empty) before `le`.
    pub(crate) fn write(&self, out: &mut String, name: &str, labels: &str) {
        let load = |c: &AtomicU64| c.load(Ordering::Relaxed);
        let braces = labels.trim_end_matches(',');
        let braces = if braces.is_empty() { String::new() } else { format!("{{{braces}}}") };
        let mut cumulative = 0;
        for (bound, count) in INFERENCE_BUCKETS.iter().zip(&self.buckets) {
            cumulative += load(count);
            let _ = writeln!(out, "{name}_bucket{{{labels}le=\"{bound}\"}} {cumulative}");
        }
        cumulative += load(&self.buckets[INFERENCE_BUCKETS.len()]);
        let _ = writeln!(out, "{name}_bucket{{{labels}le=\"+Inf\"}} {cumulative}");
        let _ = writeln!(out, "{name}_sum{braces} {}", load(&self.micros_sum) as f64 / 1e6);
        let _ = writeln!(out, "{name}_count{braces} {cumulative}");
    }
}

impl PipelineStats {
    pub fn observe_inference(&self, seconds: f64) {
        self.inference.observe(seconds);
    }

    /// One stage of a job, named as in [`STAGES`].
    pub fn observe_stage(&self, stage: &str, seconds: f64) {
        if let Some(index) = STAGES.iter().position(|s| *s == stage) {
            self.stages[index].observe(seconds);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_destination_folder_is_made_absolute_and_named_by_it() {
        let cwd = std::env::current_dir().unwrap();
        let relative = parse_destination("outbox/results").unwrap();
        let expected = cwd.join("outbox/results");
        assert_eq!(relative.name, format!("folder:{}", expected.display()));
        assert!(matches!(&relative.target, Target::Folder(path) if *path == expected));
        let absolute = parse_destination("/srv/results").unwrap();
        assert_eq!(absolute.name, "folder:/srv/results");
        let peer = parse_destination("PACS@10.0.0.5:104").unwrap();
        assert_eq!(peer.name, "PACS@10.0.0.5:104");
        assert!(matches!(peer.target, Target::Dicom(p) if p.ae_title == "PACS" && p.port == 104));
        assert!(parse_destination("PACS@host:x").is_err());
    }

    #[test]
    fn only_this_agents_objects_leave_it() {
        let tmp = tempfile::tempdir().unwrap();
        let outputs = tmp.path().join("outputs");
        let series = outputs.join("1.2.3.4");
        std::fs::create_dir_all(&series).unwrap();
        std::fs::write(series.join("sr.dcm"), b"x").unwrap();
        std::fs::write(tmp.path().join("secret.dcm"), b"x").unwrap();
        std::os::unix::fs::symlink(tmp.path().join("secret.dcm"), series.join("link.dcm")).unwrap();
        assert_eq!(check_object_path(&outputs, &series.join("sr.dcm")), Ok(()));
        for (path, why) in [
            (tmp.path().join("secret.dcm"), "not in a series folder"),
            (outputs.join("1.2.3.4/../../secret.dcm"), "not in a series folder"),
            (series.join("link.dcm"), "not a plain file"),
            (series.join("missing.dcm"), "No such file"),
            (series.join("sr.txt"), "not an object name"),
        ] {
            let error = check_object_path(&outputs, &path).unwrap_err();
            assert!(error.contains(why), "{}: {error}", path.display());
        }
        std::fs::create_dir_all(outputs.join("not-a-uid")).unwrap();
        std::fs::write(outputs.join("not-a-uid/sr.dcm"), b"x").unwrap();
        assert!(check_object_path(&outputs, &outputs.join("not-a-uid/sr.dcm")).unwrap_err().contains("series UID"));
    }

    #[tokio::test]
    async fn a_folder_copy_follows_no_link_left_in_its_way() {
        let tmp = tempfile::tempdir().unwrap();
        let object = tmp.path().join("outputs/1.2.3/sr.dcm");
        std::fs::create_dir_all(object.parent().unwrap()).unwrap();
        std::fs::write(&object, b"the report").unwrap();
        let folder = tmp.path().join("pacs");
        std::fs::create_dir_all(&folder).unwrap();
        // Someone made the series folder a link to a place of theirs.
        let elsewhere = tmp.path().join("elsewhere");
        std::fs::create_dir_all(&elsewhere).unwrap();
        std::os::unix::fs::symlink(&elsewhere, folder.join("1.2.3")).unwrap();
        let error = copy_to_folder(&folder, object.clone()).await.unwrap_err();
        assert!(error.contains("not a folder"), "{error}");
        assert_eq!(std::fs::read_dir(&elsewhere).unwrap().count(), 0);
        // With a real folder it is copied, and no temporary file stays.
        std::fs::remove_file(folder.join("1.2.3")).unwrap();
        copy_to_folder(&folder, object).await.unwrap();
        assert_eq!(std::fs::read(folder.join("1.2.3/sr.dcm")).unwrap(), b"the report");
        assert_eq!(std::fs::read_dir(folder.join("1.2.3")).unwrap().count(), 1);
    }
}
