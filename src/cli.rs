//! The command line: parses arguments, loads the configuration and dispatches to the library.
//! This is the top of the program, so errors become `anyhow` here and nowhere below.

use crate::common::redact_url;
use std::io::Write as _;
use std::path::{Path, PathBuf};

use anyhow::Context;
use clap::{Parser, Subcommand, ValueEnum};

use crate::config::Config;

#[derive(Parser, Debug)]
#[command(
    name = "idaics",
    version,
    about = "IDAICS: intervertebral disc anomaly classification, a DICOM agent beside the PACS"
)]
pub struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand, Debug)]
enum Command {
    /// Run the agent: DICOM listener, spool and series tracking, until SIGTERM or SIGINT.
    Serve {
        /// Configuration file (default: /etc/idaics/idaics.toml when this binary is the installed
        /// /usr/bin/idaics, else built-in defaults; IDAICS_* environment variables override either).
        #[arg(long, short)]
        config: Option<PathBuf>,
        /// DICOM port, overriding dicom.port.
        #[arg(long)]
        port: Option<u16>,
        /// Our AE title, overriding dicom.ae_title.
        #[arg(long)]
        ae_title: Option<String>,
        /// State directory (spool, database, outputs), overriding storage.state_dir.
        #[arg(long)]
        state_dir: Option<PathBuf>,
        /// HTTP port (health, metrics, API), overriding http.port.
        #[arg(long)]
        http_port: Option<u16>,
        /// Database URL, overriding database.url.
        #[arg(long)]
        database_url: Option<String>,
        /// Adds a destination: AE@HOST:PORT (DICOM) or a folder. Repeatable.
        #[arg(long = "destination")]
        destinations: Vec<String>,
    },
    /// Zero set-up: a synthetic study with known disc conditions through the whole path (the
    /// real agent on loopback, the embedded database, a folder as the PACS), then its findings
    /// beside the truth.
    Demo {
        /// Folder for the phantom, the agent's state and the delivered objects (replaced at each run).
        #[arg(long, default_value = "idaics-demo")]
        out: PathBuf,
        /// YOLOv8-seg weights (default: the phantom test model, model/phantom-yolov8n-seg.safetensors).
        #[arg(long)]
        weights: Option<PathBuf>,
        /// Disc conditions of the phantom; other levels are normal.
        #[arg(long, default_value = "L5/S1=schmorl,L4/L5=protrusion,L3/L4=bulge")]
        levels: String,
        #[arg(long, default_value_t = 7)]
        seed: u64,
        /// Seconds the analysis and delivery may take.
        #[arg(long, default_value_t = 600)]
        timeout: u64,
    },
    /// Apply the database migrations (the agent also applies them at start).
    Migrate {
        #[command(flatten)]
        database: DatabaseArgs,
    },
    /// Query the finding log; with --history, each level's course across a patient's studies.
    Findings {
        #[command(flatten)]
        database: DatabaseArgs,
        #[arg(long)]
        patient: Option<String>,
        #[arg(long)]
        accession: Option<String>,
        /// Study Instance UID.
        #[arg(long)]
        study: Option<String>,
        /// Disc level, e.g. L4/L5.
        #[arg(long)]
        level: Option<String>,
        /// normal, schmorl, bulge, protrusion or undetermined.
        #[arg(long)]
        class: Option<String>,
        /// Study date from, YYYY-MM-DD.
        #[arg(long)]
        since: Option<String>,
        /// Study date until, YYYY-MM-DD.
        #[arg(long)]
        until: Option<String>,
        #[arg(long)]
        min_confidence: Option<f64>,
        /// Per level, the finding in each of the patient's studies and the change since the prior one.
        #[arg(long, requires = "patient")]
        history: bool,
        /// The readers' reviews instead, and how far the agent agrees with them (Cohen's kappa,
        /// per class).
        #[arg(long, conflicts_with = "history")]
        reviews: bool,
        #[arg(long, value_enum, default_value_t = TableJsonCsv::Table)]
        format: TableJsonCsv,
    },
    /// Record a reader's review of a finding (its id in `idaics findings`): the agent's class
    /// confirmed, or corrected. Reviews are the next training round's labels.
    Review {
        #[command(flatten)]
        database: DatabaseArgs,
        finding_id: i64,
        /// Keep the agent's class.
        #[arg(long, conflicts_with = "class", required_unless_present = "class")]
        confirm: bool,
        /// The class the reader gives: normal, schmorl, bulge or protrusion.
        #[arg(long)]
        class: Option<String>,
        /// Who reviews (default: the user running the command).
        #[arg(long)]
        reviewer: Option<String>,
        #[arg(long)]
        comment: Option<String>,
    },
    /// Validate a configuration file and print the effective settings.
    CheckConfig {
        /// Configuration file (default: /etc/idaics/idaics.toml when this binary is the installed
        /// /usr/bin/idaics, else built-in defaults; IDAICS_* environment variables override either).
        #[arg(long, short)]
        config: Option<PathBuf>,
    },
    /// Run the detector on 2D images (PNG, JPEG, single-frame DICOM) and print the detections.
    Detect {
        /// YOLOv8-seg weights (safetensors with ultralytics tensor names).
        #[arg(long)]
        weights: PathBuf,
        /// Network input size (default: the size stored in the weights).
        #[arg(long)]
        imgsz: Option<usize>,
        /// Minimum class confidence.
        #[arg(long, default_value_t = 0.25)]
        conf: f32,
        /// IoU above which NMS suppresses a box of the same class.
        #[arg(long, default_value_t = 0.7)]
        iou: f32,
        /// auto, cpu or cuda:N.
        #[arg(long, default_value = "auto")]
        device: String,
        #[arg(long, value_enum, default_value_t = DetectFormat::Table)]
        format: DetectFormat,
        #[arg(required = true)]
        images: Vec<PathBuf>,
    },
    /// Write a synthetic lumbar CT series (T12 to the sacrum) with truth.json, for tests and training.
    Phantom {
        #[arg(long)]
        out: PathBuf,
        #[arg(long, default_value_t = 1)]
        seed: u64,
        /// Conditions per level, e.g. "L3/L4=protrusion,L4/L5=schmorl"; others are normal.
        #[arg(long, default_value = "")]
        levels: String,
        #[arg(long, default_value_t = 0.8)]
        pixel_spacing: f64,
        #[arg(long, default_value_t = 1.0)]
        slice_thickness: f64,
        #[arg(long, default_value_t = 512)]
        size: u16,
        /// Write the series as one Enhanced CT multi-frame object instead of one file per slice.
        #[arg(long)]
        enhanced: bool,
        /// Osteoporotic bone (cancellous as dense as the discs, thin cortex) and low-dose noise.
        #[arg(long)]
        osteoporotic: bool,
        /// Gantry tilt, degrees: image planes tilted about the left-right axis while the slice
        /// centres follow the patient axis, as lumbar protocols angled to the discs write them.
        #[arg(long, default_value_t = 0.0, allow_negative_numbers = true)]
        gantry_tilt: f64,
        /// How the patient lay: HFS, FFS, HFP or FFP (head or feet first, supine or prone); it
        /// sets which way the image rows and columns run through the patient.
        #[arg(long, default_value = "HFS")]
        patient_position: String,
    },
    /// Find the disc levels of CT series in files or folders (no network) and, with --weights,
    /// each level's finding; without weights every finding is undetermined.
    Analyze {
        #[arg(required = true)]
        paths: Vec<PathBuf>,
        /// Folder for outputs (created).
        #[arg(long)]
        out: PathBuf,
        #[arg(long, value_enum, default_value_t = DetectFormat::Table)]
        format: DetectFormat,
        /// Also write the slices the network sees as PNG, with the levels marked on the sagittal.
        #[arg(long)]
        png: bool,
        /// YOLOv8-seg weights; without them every level's finding is "undetermined".
        #[arg(long)]
        weights: Option<PathBuf>,
        /// auto, cpu or cuda:N.
        #[arg(long, default_value = "auto")]
        device: String,
    },
    /// Training data for a site's own weights.
    Dataset {
        #[command(subcommand)]
        action: DatasetCommand,
    },
    /// The paper's figures (confusion matrix, accuracy, Cohen's kappa, per-class sensitivity,
    /// specificity, PPV, NPV, Youden) for the findings on labelled CT series. Labels come from
    /// each phantom's truth.json under the paths, or from --labels.
    Evaluate {
        #[arg(required = true)]
        paths: Vec<PathBuf>,
        /// YOLOv8-seg weights to evaluate.
        #[arg(long)]
        weights: PathBuf,
        /// CSV with a header and the columns series_uid,level,finding (level as "L4/L5", finding
        /// normal, schmorl, bulge or protrusion), for series that are not phantoms.
        #[arg(long)]
        labels: Option<PathBuf>,
        /// The paths are 2D images (PNG, JPEG, single-frame DICOM) or folders of them, as in the
        /// paper, labelled in ultralytics' segmentation format: the objects of .../images/NAME.png
        /// are in .../labels/NAME.txt, by the weights' class indices.
        #[arg(long, conflicts_with = "labels")]
        images: bool,
        /// With --images: the cases.csv of a dataset made by model/tools/labelme_to_yolo.py,
        /// whose fold column gives each image's fold: figures per fold beside the pooled ones.
        #[arg(long, requires = "images")]
        folds: Option<PathBuf>,
        /// Write a model card (markdown): the weights, how they were made (from their metadata),
        /// what they were evaluated on and the figures.
        #[arg(long)]
        model_card: Option<PathBuf>,
        /// auto, cpu or cuda:N.
        #[arg(long, default_value = "auto")]
        device: String,
        #[arg(long, value_enum, default_value_t = DetectFormat::Table)]
        format: DetectFormat,
    },
    /// List analysis jobs (state, attempts, which agent, why one failed); --retry queues failed
    /// jobs again once their cause is dealt with.
    Jobs {
        #[command(flatten)]
        database: DatabaseArgs,
        /// Only jobs in this state: queued, running, done or failed.
        #[arg(long, value_parser = crate::store::db::JOB_STATES)]
        state: Option<String>,
        /// Only the jobs of this Series Instance UID.
        #[arg(long)]
        series: Option<String>,
        /// Queue these failed jobs (by id) again with a fresh count of attempts; a running agent
        /// takes them up within seconds.
        #[arg(long, value_name = "ID", num_args = 1.., conflicts_with_all = ["state", "series"])]
        retry: Vec<i64>,
        #[arg(long, value_enum, default_value_t = TableJsonCsv::Table)]
        format: TableJsonCsv,
    },
    /// List the objects sent to destinations (pending, sent, cancelled), with each one's attempts
    /// and last error; --cancel gives up pending objects a destination will never take, --retry
    /// sends pending or cancelled ones now.
    Outbox {
        #[command(flatten)]
        database: DatabaseArgs,
        /// Only objects in this state: pending, sent or cancelled.
        #[arg(long, value_parser = crate::store::db::OUTBOX_STATES)]
        state: Option<String>,
        /// Only the objects reporting on this Series Instance UID.
        #[arg(long)]
        series: Option<String>,
        /// Stop retrying these pending objects (by id).
        #[arg(long, value_name = "ID", num_args = 1.., conflicts_with_all = ["state", "series", "retry"])]
        cancel: Vec<i64>,
        /// Try these pending or cancelled objects (by id) now; a running agent sends them within
        /// seconds.
        #[arg(long, value_name = "ID", num_args = 1.., conflicts_with_all = ["state", "series"])]
        retry: Vec<i64>,
        #[arg(long, value_enum, default_value_t = TableJsonCsv::Table)]
        format: TableJsonCsv,
    },
    /// List the series in the spool with their state (pending, complete, skipped and why, purged).
    Series {
        /// Configuration file (default: /etc/idaics/idaics.toml when this binary is the installed
        /// /usr/bin/idaics, else built-in defaults; IDAICS_* environment variables override either).
        #[arg(long, short)]
        config: Option<PathBuf>,
        #[arg(long)]
        state_dir: Option<PathBuf>,
        #[arg(long, value_enum, default_value_t = Format::Table)]
        format: Format,
    },
}

#[derive(Clone, Copy, Debug, ValueEnum)]
enum DetectFormat {
    Table,
    Json,
}

/// Where a database command finds its database: flag, else configuration, else the embedded default.
#[derive(clap::Args, Debug)]
struct DatabaseArgs {
    /// Configuration file (default: /etc/idaics/idaics.toml when this binary is the installed
    /// /usr/bin/idaics, else built-in defaults; IDAICS_* environment variables override either).
    #[arg(long, short)]
    config: Option<PathBuf>,
    #[arg(long)]
    state_dir: Option<PathBuf>,
    #[arg(long)]
    database_url: Option<String>,
}

#[derive(Subcommand, Debug)]
enum DatasetCommand {
    /// The images the network sees (the sagittal and each level's axial, 512x512 PNG), each with
    /// a LabelMe JSON pre-annotation to correct: the disc outline (from the weights' masks, else
    /// from the locator) labelled with the agent's finding or "unlabelled". Files are named by
    /// patient pseudonyms; the mapping to PatientIDs stays in the state directory.
    Export {
        /// DICOM files or folders to analyse.
        paths: Vec<PathBuf>,
        /// Series the agent received, by SeriesInstanceUID, read from its spool. Repeatable.
        #[arg(long = "series")]
        series: Vec<String>,
        /// Folder for the images and their JSON (created).
        #[arg(long)]
        out: PathBuf,
        /// Weights whose masks and classes pre-annotate; without, outlines come from the locator
        /// and every label is "unlabelled".
        #[arg(long)]
        weights: Option<PathBuf>,
        /// auto, cpu or cuda:N.
        #[arg(long, default_value = "auto")]
        device: String,
        /// Exactly the images of reviewed findings (from the spool), labelled with the readers'
        /// classes (each finding's latest review): the next training round.
        #[arg(long, conflicts_with_all = ["paths", "series"])]
        reviewed: bool,
        /// Every series the agent decided complete since this date (YYYY-MM-DD), from the log
        /// and the spool.
        #[arg(long, conflicts_with = "reviewed")]
        since: Option<String>,
        /// Configuration file (its state directory keeps the pseudonym key and mapping), state
        /// directory and database.
        #[command(flatten)]
        database: DatabaseArgs,
    },
}

#[derive(Clone, Copy, Debug, ValueEnum)]
enum TableJsonCsv {
    Table,
    Json,
    Csv,
}

#[derive(Clone, Copy, Debug, ValueEnum)]
enum Format {
    Table,
    Json,
}

/// The binary's entry point. Errors are printed as anyhow prints them (the message, then its
/// causes) but never with a backtrace: an administrator's shell with RUST_BACKTRACE set would
/// otherwise bury a configuration mistake under one.
pub fn run() -> std::process::ExitCode {
    let Err(error) = main() else {
        return std::process::ExitCode::SUCCESS;
    };
    eprintln!("Error: {error}");
    let causes: Vec<String> = error.chain().skip(1).map(ToString::to_string).collect();
    if !causes.is_empty() {
        eprintln!("\nCaused by:");
        for (index, cause) in causes.iter().enumerate() {
            if causes.len() == 1 {
                eprintln!("    {cause}");
            } else {
                eprintln!("    {index}: {cause}");
            }
        }
    }
    std::process::ExitCode::FAILURE
}

pub fn main() -> anyhow::Result<()> {
    let cli = Cli::parse();
    match cli.command {
        Command::Serve { config, port, ae_title, state_dir, http_port, database_url, destinations } => {
            let (mut cfg, config_path) = load_config(config)?;
            for text in destinations {
                let parsed = crate::pipeline::parse_destination(&text).map_err(anyhow::Error::msg)?;
                let mut d = crate::config::Destination { name: parsed.name, ..Default::default() };
                match parsed.target {
                    crate::pipeline::Target::Dicom(peer) => {
                        (d.ae_title, d.host, d.port) = (peer.ae_title, peer.host, peer.port);
                    }
                    crate::pipeline::Target::Folder(path) => d.path = path.to_string_lossy().into_owned(),
                }
                cfg.destinations.push(d);
            }
            if let Some(port) = http_port {
                cfg.http.port = port;
            }
            if let Some(url) = database_url {
                cfg.database.url = url;
            }
            if let Some(port) = port {
                cfg.dicom.port = port;
            }
            if let Some(title) = ae_title {
                cfg.dicom.ae_title = title;
            }
            if let Some(dir) = state_dir {
                cfg.storage.state_dir = dir;
            }
            cfg.validate("command line")?;
            init_logging(&cfg);
            let runtime = tokio::runtime::Builder::new_multi_thread()
                .enable_all()
                .thread_name("idaics")
                .build()
                .context("cannot start the async runtime")?;
            runtime.block_on(crate::service::run(cfg, config_path))?;
            Ok(())
        }
        Command::Demo { out, weights, levels, seed, timeout } => crate::demo::run(&crate::demo::DemoOptions {
            out,
            weights,
            levels,
            seed,
            timeout: std::time::Duration::from_secs(timeout),
        }),
        Command::CheckConfig { config } => {
            let (cfg, config) = load_config(config)?;
            // The TLS files are read and checked too: a port that cannot serve is no OK.
            let tls = crate::tls::server_config(&cfg.dicom)?;
            for destination in &cfg.destinations {
                crate::tls::client_config(destination)?;
            }
            let source = config.map_or("built-in defaults".to_string(), |p| p.display().to_string());
            println!("{source}: OK");
            println!("  DICOM: AE {} on {}:{}", cfg.dicom.ae_title, cfg.dicom.bind_address, cfg.dicom.port);
            println!("  state directory: {}", cfg.storage.state_dir.display());
            println!("  database: {}", redact_url(&cfg.database.effective_url(&cfg.storage.state_dir)));
            println!("  destinations: {}", cfg.destinations.len());
            println!("  series analysed: {}", describe_selection(&cfg.series));
            if cfg.model.weights.is_empty() {
                println!("  model: none (series are received and tracked, not analysed)");
            } else {
                println!("  model: {} on {}", cfg.model.weights, cfg.model.device);
            }
            match tls {
                Some(_) => println!(
                    "  DICOM over TLS: port {}, client certificates {}",
                    cfg.dicom.tls_port,
                    if cfg.dicom.tls_client_ca.is_empty() { "not asked" } else { "required" }
                ),
                None => println!("  DICOM over TLS: none (dicom.tls_port = 0)"),
            }
            if let Some(why) = cfg.dicom.closed_until_configured() {
                println!("  warning: {why}");
            }
            for notice in crate::tls::expiring_soon(&cfg) {
                println!("  warning: {notice}");
            }
            Ok(())
        }
        Command::Detect { weights, imgsz, conf, iou, device, format, images } => {
            init_cli_logging();
            detect(&weights, imgsz, conf, iou, &device, format, &images)
        }
        Command::Phantom {
            out,
            seed,
            levels,
            pixel_spacing,
            slice_thickness,
            size,
            enhanced,
            osteoporotic,
            gantry_tilt,
            patient_position,
        } => {
            anyhow::ensure!(pixel_spacing > 0.05 && slice_thickness > 0.05, "spacings must be positive millimetres");
            anyhow::ensure!(size >= 32, "--size must be at least 32");
            anyhow::ensure!(gantry_tilt.abs() <= 30.0, "--gantry-tilt must be between -30 and 30 degrees");
            let spec = crate::phantom::PhantomSpec {
                seed,
                levels: crate::phantom::parse_levels(&levels).map_err(anyhow::Error::msg)?,
                pixel_spacing_mm: pixel_spacing,
                slice_thickness_mm: slice_thickness,
                size,
                osteoporotic,
                gantry_tilt_degrees: gantry_tilt,
                patient_position: patient_position.parse().map_err(anyhow::Error::msg)?,
            };
            let (series, truth) = crate::phantom::write_phantom(&out, &spec)?;
            if enhanced {
                let path = out.join("enhanced_ct.dcm");
                crate::synthetic::write_enhanced_ct(&series.files, &path, seed)?;
                for file in &series.files {
                    std::fs::remove_file(file).with_context(|| format!("cannot remove {}", file.display()))?;
                }
                println!("{} frames in {}, series {}", series.files.len(), path.display(), truth.series_uid);
                return Ok(());
            }
            println!(
                "{} slices, series {}, truth in {}",
                series.files.len(),
                truth.series_uid,
                out.join("truth.json").display()
            );
            Ok(())
        }
        Command::Evaluate { paths, weights, labels, images, folds, model_card, device, format } => {
            init_cli_logging();
            let detector = crate::pipeline::Detector::load(&weights, &device)
                .with_context(|| format!("cannot load {}", weights.display()))?;
            let evaluation = if images {
                evaluate_images(&paths, &detector, folds.as_deref())?
            } else {
                evaluate(&paths, labels.as_deref(), &detector)?
            };
            if let Some(card) = model_card {
                write_model_card(&card, &weights, &detector.sha256, &paths, images, &evaluation)?;
            }
            match format {
                DetectFormat::Json => println!("{}", serde_json::to_string_pretty(&evaluation)?),
                DetectFormat::Table => print!("{}", evaluation.table()),
            }
            Ok(())
        }
        Command::Analyze { paths, out, format, png, weights, device } => {
            init_cli_logging();
            let detector = weights
                .map(|w| {
                    crate::pipeline::Detector::load(&w, &device).with_context(|| format!("cannot load {}", w.display()))
                })
                .transpose()?;
            analyze(&paths, &out, format, png, detector.as_ref())
        }
        Command::Dataset {
            action: DatasetCommand::Export { paths, mut series, out, weights, device, reviewed, since, database },
        } => {
            init_cli_logging();
            let (mut cfg, _) = load_config(database.config.clone())?;
            if let Some(dir) = &database.state_dir {
                cfg.storage.state_dir = dir.clone();
            }
            if let Some(date) = &since {
                anyhow::ensure!(crate::store::db::valid_date(date), "--since {date:?}: not a date (YYYY-MM-DD)");
            }
            // What the log says: the series decided since the date, or the reviews.
            let (decided, reviews) = if since.is_some() || reviewed {
                let url = database_url_of(database)?;
                tokio::runtime::Builder::new_current_thread().enable_all().build()?.block_on(async {
                    let db = crate::store::db::Db::connect(&url).await?;
                    db.migrate().await?;
                    let complete =
                        crate::store::db::SeriesFilter { state: Some("complete".into()), ..Default::default() };
                    let decided = match since {
                        Some(_) => Some(db.series_log(&complete, crate::store::db::Page::ALL).await?),
                        None => None,
                    };
                    let reviews = if reviewed { Some(db.reviews().await?) } else { None };
                    anyhow::Ok((decided, reviews))
                })?
            } else {
                (None, None)
            };
            if let (Some(date), Some(rows)) = (&since, decided) {
                let before = series.len();
                series.extend(
                    rows.into_iter()
                        .filter(|r| {
                            r.purged_at.is_none() && r.series.decided_at.get(..10).is_some_and(|d| d >= date.as_str())
                        })
                        .map(|r| r.series.series_uid),
                );
                series.sort();
                series.dedup();
                anyhow::ensure!(series.len() > before || !paths.is_empty(), "no series decided complete since {date}");
            }
            let reviews = reviews.map(crate::dataset::ReviewedLabels::latest);
            dataset_export(&cfg, &paths, &series, &out, weights.as_deref(), &device, reviews.as_ref())
        }
        Command::Review { database, finding_id, confirm, class, reviewer, comment } => {
            let url = database_url_of(database)?;
            let reviewer = reviewer
                .or_else(|| std::env::var("SUDO_USER").ok())
                .or_else(|| std::env::var("USER").ok())
                .ok_or_else(|| anyhow::anyhow!("who reviews? give --reviewer"))?;
            one_shot(async move {
                let db = crate::store::db::Db::connect(&url).await?;
                db.migrate().await?;
                let row = db
                    .record_review(finding_id, &crate::store::db::NewReview { reviewer, class, confirm, comment })
                    .await?;
                println!(
                    "finding {} ({} {}): {} {} by {} at {}",
                    row.finding_id,
                    row.series_uid,
                    row.level,
                    if row.confirmed { "confirmed" } else { "corrected to" },
                    row.class,
                    row.reviewer,
                    row.reviewed_at
                );
                Ok(())
            })
        }
        Command::Migrate { database } => {
            let url = database_url_of(database)?;
            one_shot(async {
                let db = crate::store::db::Db::connect(&url).await?;
                db.migrate().await?;
                println!("{}: migrations applied", redact_url(&url));
                Ok(())
            })
        }
        Command::Findings {
            database,
            patient,
            accession,
            study,
            level,
            class,
            since,
            until,
            min_confidence,
            history,
            reviews,
            format,
        } => {
            let url = database_url_of(database)?;
            if reviews {
                return one_shot(async move {
                    let db = crate::store::db::Db::connect(&url).await?;
                    db.migrate().await?;
                    print_reviews(&db, format).await
                });
            }
            let filter = crate::store::db::FindingFilter {
                patient,
                accession,
                study,
                level,
                class,
                since,
                until,
                min_confidence,
            };
            one_shot(async move {
                let db = crate::store::db::Db::connect(&url).await?;
                db.migrate().await?;
                let columns: &[&str] = if history {
                    &["level", "study_date", "accession", "study_uid", "class", "confidence", "prior_class", "change"]
                } else {
                    &[
                        "patient_id",
                        "study_date",
                        "accession",
                        "level",
                        "level_certain",
                        "class",
                        "confidence",
                        "views",
                        "mask_area_mm2",
                        "study_uid",
                        "series_uid",
                        "model_version",
                        // Last, so that columns read by position before reviews existed keep their place.
                        "id",
                    ]
                };
                if history {
                    let patient = filter.patient.clone().unwrap_or_default();
                    let mut out = RowPrinter::new(columns, format, "history")?;
                    for entry in db.history(&patient).await? {
                        out.row(&entry)?;
                    }
                    out.finish()
                } else {
                    let mut out = RowPrinter::new(columns, format, "findings")?;
                    db.each_finding(&filter, crate::store::db::Page::ALL, |f| out.row(&f)).await?;
                    out.finish()
                }
            })
        }
        Command::Jobs { database, state, series, retry, format } => {
            let url = database_url_of(database)?;
            one_shot(async move {
                let db = crate::store::db::Db::connect(&url).await?;
                db.migrate().await?;
                if !retry.is_empty() {
                    let mut refused = Vec::new();
                    for id in retry {
                        if db.retry_failed_job(id).await? {
                            println!("job {id} queued again");
                        } else {
                            refused.push(id.to_string());
                        }
                    }
                    anyhow::ensure!(
                        refused.is_empty(),
                        "not failed jobs, left as they are: {} (see `idaics jobs`)",
                        refused.join(", ")
                    );
                    return Ok(());
                }
                let columns =
                    ["id", "state", "attempts", "series_uid", "revision", "finished_at", "claimed_by", "error"];
                let mut out = RowPrinter::new(&columns, format, "jobs")?;
                db.each_job(state.as_deref(), series.as_deref(), crate::store::db::Page::ALL, |j| out.row(&j)).await?;
                out.finish()
            })
        }
        Command::Outbox { database, state, series, cancel, retry, format } => {
            let url = database_url_of(database)?;
            one_shot(async move {
                let db = crate::store::db::Db::connect(&url).await?;
                db.migrate().await?;
                if !cancel.is_empty() || !retry.is_empty() {
                    let mut left = Vec::new();
                    for id in cancel {
                        if db.cancel_outbox(id).await? {
                            println!("object {id} cancelled: no longer sent");
                        } else {
                            left.push(id.to_string());
                        }
                    }
                    for id in retry {
                        if db.retry_outbox(id).await? {
                            println!("object {id} due now");
                        } else {
                            left.push(id.to_string());
                        }
                    }
                    anyhow::ensure!(
                        left.is_empty(),
                        "objects not in a state for that, left as they are: {} (see `idaics outbox`)",
                        left.join(", ")
                    );
                    return Ok(());
                }
                let columns = [
                    "id",
                    "state",
                    "destination",
                    "sop_class_uid",
                    "attempts",
                    "next_attempt_at",
                    "sent_at",
                    "last_status",
                    "last_error",
                ];
                let mut out = RowPrinter::new(&columns, format, "outbox")?;
                db.each_outbox(state.as_deref(), series.as_deref(), crate::store::db::Page::ALL, |o| out.row(&o))
                    .await?;
                out.finish()
            })
        }
        Command::Series { config, state_dir, format } => {
            let (mut cfg, _) = load_config(config)?;
            if let Some(dir) = state_dir {
                cfg.storage.state_dir = dir;
            }
            let series = crate::ingest::spool::scan_spool(&cfg.storage.spool_dir())?;
            let rows: Vec<serde_json::Value> = series
                .iter()
                .map(|s| {
                    serde_json::json!({
                        "study_uid": s.study_instance_uid,
                        "series_uid": s.series_instance_uid,
                        "instances": s.instances,
                        "state": match &s.record {
                            None => "pending",
                            Some(r) if r.purged_at.is_some() && s.instances == 0 => "purged",
                            Some(r) => r.state.as_str(),
                        },
                        "purged_at": s.record.as_ref().and_then(|r| r.purged_at.clone()),
                        "skip_reason": s.record.as_ref().and_then(|r| r.skip_reason.clone()),
                        "trigger": s.record.as_ref().map(|r| r.trigger.clone()),
                        "revision": s.record.as_ref().map_or(0, |r| r.revision),
                        "decided_at": s.record.as_ref().map(|r| r.decided_at.clone()),
                    })
                })
                .collect();
            match format {
                Format::Json => println!("{}", serde_json::to_string_pretty(&rows)?),
                Format::Table => {
                    println!("{:<9} {:>9}  {:<64}  NOTE", "STATE", "INSTANCES", "SERIES UID");
                    for r in &rows {
                        println!(
                            "{:<9} {:>9}  {:<64}  {}",
                            r["state"].as_str().unwrap_or(""),
                            r["instances"].as_u64().unwrap_or(0),
                            r["series_uid"].as_str().unwrap_or(""),
                            r["skip_reason"].as_str().unwrap_or("")
                        );
                    }
                }
            }
            Ok(())
        }
    }
}

fn detect(
    weights: &std::path::Path,
    imgsz: Option<usize>,
    conf: f32,
    iou: f32,
    device: &str,
    format: DetectFormat,
    images: &[PathBuf],
) -> anyhow::Result<()> {
    use crate::analysis::detector::{self, predict};
    anyhow::ensure!((0.0..=1.0).contains(&conf), "--conf must be between 0 and 1");
    anyhow::ensure!((0.0..=1.0).contains(&iou), "--iou must be between 0 and 1");
    let device = detector::select_device(device)?;
    let (network, info) = detector::load_network(weights, &device)?;
    let imgsz = imgsz.unwrap_or(info.input_size);
    anyhow::ensure!(imgsz >= 32 && imgsz.is_multiple_of(32), "--imgsz must be a multiple of 32");
    let options = predict::PredictOptions { imgsz, conf, iou, ..Default::default() };
    let mut report = Vec::with_capacity(images.len());
    for path in images {
        let image = detector::read_image(path)?;
        let detections = predict::predict(&network, &image, &options, &device)?;
        let items: Vec<serde_json::Value> = detections
            .iter()
            .map(|d| {
                serde_json::json!({
                    "class_id": d.class_id,
                    "class_name": info.class_names[d.class_id],
                    "confidence": d.confidence,
                    "box": d.bbox,
                    "mask_area": d.mask.area(),
                    "polygon": predict::outline(&d.mask),
                })
            })
            .collect();
        report.push(serde_json::json!({
            "image": path.display().to_string(),
            "width": image.width,
            "height": image.height,
            "detections": items,
        }));
    }
    match format {
        DetectFormat::Json => println!("{}", serde_json::to_string_pretty(&report)?),
        DetectFormat::Table => {
            for r in &report {
                println!("{} ({}x{})", r["image"].as_str().unwrap_or(""), r["width"], r["height"]);
                for d in r["detections"].as_array().into_iter().flatten() {
                    let b: Vec<f64> = d["box"].as_array().into_iter().flatten().filter_map(|v| v.as_f64()).collect();
                    println!(
                        "  {:<12} {:.3}  box [{:.1}, {:.1}, {:.1}, {:.1}]  mask {} px",
                        d["class_name"].as_str().unwrap_or(""),
                        d["confidence"].as_f64().unwrap_or(0.0),
                        b[0],
                        b[1],
                        b[2],
                        b[3],
                        d["mask_area"]
                    );
                }
            }
        }
    }
    Ok(())
}

fn analyze(
    paths: &[PathBuf],
    out: &std::path::Path,
    format: DetectFormat,
    png: bool,
    detector: Option<&crate::pipeline::Detector>,
) -> anyhow::Result<()> {
    std::fs::create_dir_all(out).with_context(|| format!("cannot create {}", out.display()))?;
    let mut report = Vec::new();
    for source in volumes_under(paths)? {
        let series_uid = source.name();
        let mut notes = Vec::new();
        let result = source.load().and_then(|(blocks, loading_notes)| {
            let analysis = crate::pipeline::analyze(&blocks, detector).map_err(|e| e.to_string())?;
            if png {
                write_pngs(&blocks, &analysis.levels, &out.join(&series_uid))
                    .map_err(|e| format!("writing PNGs: {e}"))?;
            }
            notes = loading_notes;
            notes.extend(analysis.notes);
            Ok(analysis.findings)
        });
        let (levels, skipped) = match result {
            Ok(findings) => (
                findings
                    .iter()
                    .map(|f| {
                        let l = &f.level;
                        serde_json::json!({
                            "name": l.name, "name_certain": l.name_certain,
                            "center_lps_mm": l.center_lps_mm, "normal": l.normal, "finding": f.json(),
                        })
                    })
                    .collect::<Vec<_>>(),
                None,
            ),
            Err(reason) => (Vec::new(), Some(reason)),
        };
        report
            .push(serde_json::json!({"series_uid": series_uid, "levels": levels, "skipped": skipped, "notes": notes}));
    }
    let document = serde_json::json!({ "series": report });
    std::fs::write(out.join("analysis.json"), serde_json::to_vec_pretty(&document)?)?;
    match format {
        DetectFormat::Json => println!("{}", serde_json::to_string_pretty(&document)?),
        DetectFormat::Table => {
            for s in document["series"].as_array().into_iter().flatten() {
                println!("series {}", s["series_uid"].as_str().unwrap_or(""));
                if let Some(reason) = s["skipped"].as_str() {
                    println!("  skipped: {reason}");
                }
                for note in s["notes"].as_array().into_iter().flatten() {
                    println!("  note: {}", note.as_str().unwrap_or(""));
                }
                for l in s["levels"].as_array().into_iter().flatten() {
                    let c: Vec<f64> =
                        l["center_lps_mm"].as_array().into_iter().flatten().filter_map(|v| v.as_f64()).collect();
                    println!(
                        "  {:<8}{} at ({:.1}, {:.1}, {:.1}) mm  {} {:.2}",
                        l["name"].as_str().unwrap_or(""),
                        if l["name_certain"].as_bool() == Some(true) { " " } else { "?" },
                        c[0],
                        c[1],
                        c[2],
                        l["finding"]["class"].as_str().unwrap_or(""),
                        l["finding"]["confidence"].as_f64().unwrap_or(0.0)
                    );
                }
            }
        }
    }
    Ok(())
}

/// The reviews, then the agent's agreement with its readers.
async fn print_reviews(db: &crate::store::db::Db, format: TableJsonCsv) -> anyhow::Result<()> {
    let reviews = db.reviews().await?;
    let agreement = db.review_agreement().await?;
    let per_class: Vec<serde_json::Value> = agreement
        .categories
        .iter()
        .map(|c| {
            let m = agreement.class_metrics(c).expect("a category of the matrix");
            serde_json::json!({"class": c, "reviewed": m.labelled, "agent": m.predicted, "sensitivity": m.sensitivity, "ppv": m.ppv})
        })
        .collect();
    if let TableJsonCsv::Json = format {
        let document = serde_json::json!({
            "reviews": reviews,
            "agreement": {"findings": agreement.total(), "agreed": agreement.correct(), "kappa": agreement.kappa(), "per_class": per_class},
        });
        println!("{}", serde_json::to_string_pretty(&document)?);
        return Ok(());
    }
    let columns: &[&str] = &[
        "id",
        "finding_id",
        "series_uid",
        "level",
        "agent_class",
        "class",
        "confirmed",
        "reviewer",
        "reviewed_at",
        "comment",
    ];
    let mut out = RowPrinter::new(columns, format, "reviews")?;
    for review in &reviews {
        out.row(review)?;
    }
    out.finish()?;
    if let TableJsonCsv::Table = format {
        let kappa = agreement.kappa().map_or("-".to_string(), |k| format!("{k:.3}"));
        println!(
            "agreement: {} of {} reviewed findings kept (latest review of each; undetermined ones not counted), kappa {kappa}",
            agreement.correct(),
            agreement.total()
        );
        for c in &per_class {
            let f = |v: &serde_json::Value| v.as_f64().map_or("-".to_string(), |x| format!("{x:.3}"));
            println!(
                "  {:<11} readers {:>4}  agent {:>4}  sensitivity {}  ppv {}",
                c["class"].as_str().unwrap_or(""),
                c["reviewed"],
                c["agent"],
                f(&c["sensitivity"]),
                f(&c["ppv"])
            );
        }
    }
    Ok(())
}

fn dataset_export(
    cfg: &Config,
    paths: &[PathBuf],
    series: &[String],
    out: &std::path::Path,
    weights: Option<&std::path::Path>,
    device: &str,
    reviewed: Option<&crate::dataset::ReviewedLabels>,
) -> anyhow::Result<()> {
    let reviewed_series: Vec<String> = reviewed.map(|r| r.series()).unwrap_or_default();
    let series = if reviewed.is_some() { &reviewed_series[..] } else { series };
    if reviewed.is_some() && series.is_empty() {
        anyhow::bail!("no reviewed finding in the log");
    }
    if paths.is_empty() && series.is_empty() {
        anyhow::bail!("nothing to export: give DICOM paths, --series UID or --reviewed");
    }
    let detector = weights
        .map(|w| crate::pipeline::Detector::load(w, device).with_context(|| format!("cannot load {}", w.display())))
        .transpose()?;
    let pseudonyms = crate::dataset::Pseudonyms::open(&cfg.storage.state_dir)?;
    let mut sources: Vec<(String, Vec<PathBuf>)> = Vec::new();
    if !paths.is_empty() {
        for source in volumes_under(paths)? {
            match source {
                VolumeSource::Series { uid, files } => sources.push((uid, files)),
                VolumeSource::Nifti { path } => {
                    eprintln!("{}: left out (a NIfTI file has no patient or series to name it by)", path.display())
                }
            }
        }
    }
    let spool = cfg.storage.spool_dir();
    for uid in series {
        // The spool keeps each series under its study: spool/STUDY/SERIES.
        let dir = std::fs::read_dir(&spool)
            .with_context(|| format!("cannot read the spool {}", spool.display()))?
            .flatten()
            .map(|study| study.path().join(uid))
            .find(|dir| dir.is_dir())
            .ok_or_else(|| anyhow::anyhow!("series {uid} is not in the spool {}", spool.display()))?;
        sources.push((uid.clone(), crate::ingest::spool::instance_files(&dir)?));
    }
    let (mut images, mut failed) = (0, 0);
    for (done, (uid, files)) in sources.iter().enumerate() {
        let labels = reviewed.map(|r| r.of_series(uid));
        match crate::dataset::export_series(files, &cfg.series, detector.as_ref(), &pseudonyms, labels.as_ref(), out) {
            Ok(exported) => images += exported.len(),
            Err(e) => {
                failed += 1;
                eprintln!("series {uid}: not exported: {e}");
            }
        }
        crate::dataset::progress(done + 1, sources.len(), "series");
    }
    println!(
        "{images} images with their LabelMe JSON in {} from {} series ({failed} not exported); pseudonym mapping: {}",
        out.display(),
        sources.len() - failed,
        cfg.storage.state_dir.join("dataset/mapping.csv").display()
    );
    if failed > 0 && failed == sources.len() {
        anyhow::bail!("no series exported");
    }
    Ok(())
}

/// A volume under the paths, not loaded yet: a DICOM series (named by its UID) or a NIfTI file
/// (named by the file). Loading one at a time keeps a folder of many series to one in memory.
enum VolumeSource {
    Series { uid: String, files: Vec<PathBuf> },
    Nifti { path: PathBuf },
}

impl VolumeSource {
    fn name(&self) -> String {
        match self {
            VolumeSource::Series { uid, .. } => uid.clone(),
            VolumeSource::Nifti { path } => {
                path.file_name().map(|n| n.to_string_lossy().into_owned()).unwrap_or_default()
            }
        }
    }

    /// The contiguous blocks of slices the source holds (a NIfTI file is one), with what was
    /// split or set aside.
    fn load(&self) -> Result<(Vec<crate::analysis::volume::Volume>, Vec<String>), String> {
        match self {
            VolumeSource::Series { files, .. } => {
                crate::analysis::volume::load_blocks(files, &crate::config::SeriesConfig::default())
                    .map_err(|e| e.to_string())
            }
            VolumeSource::Nifti { path } => {
                crate::analysis::nifti::read(path).map(|v| (vec![v], Vec::new())).map_err(|e| e.to_string())
            }
        }
    }
}

/// The volumes under `paths`: DICOM files grouped by series, then NIfTI files.
fn volumes_under(paths: &[PathBuf]) -> anyhow::Result<Vec<VolumeSource>> {
    use std::collections::BTreeMap;
    let mut files = Vec::new();
    for path in paths {
        collect_files(path, &mut files).with_context(|| format!("cannot read {}", path.display()))?;
    }
    let mut by_series: BTreeMap<String, Vec<PathBuf>> = BTreeMap::new();
    let mut nifti_files = Vec::new();
    for file in files {
        let name = file.file_name().map(|n| n.to_string_lossy().to_lowercase()).unwrap_or_default();
        if name.ends_with(".nii") || name.ends_with(".nii.gz") {
            nifti_files.push(file);
            continue;
        }
        // Parsed only once its headers are known to be sane (see `spool::check_structure`).
        let header = crate::ingest::spool::check_structure(&file, crate::ingest::spool::StructureLimits::LOCAL_FILES)
            .and_then(|_| crate::ingest::spool::InstanceHeader::read(&file));
        match header {
            Ok(h) => by_series.entry(h.series_instance_uid).or_default().push(file),
            Err(e) => tracing::warn!(path = %file.display(), error = %e, "not a usable DICOM file; left out"),
        }
    }
    Ok(by_series
        .into_iter()
        .map(|(uid, files)| VolumeSource::Series { uid, files })
        .chain(nifti_files.into_iter().map(|path| VolumeSource::Nifti { path }))
        .collect())
}

/// Labels by series UID: every truth.json under the paths, then the CSV's rows.
fn read_labels(
    paths: &[PathBuf],
    csv: Option<&std::path::Path>,
) -> anyhow::Result<std::collections::BTreeMap<String, Vec<crate::evaluation::Label>>> {
    use crate::evaluation::Label;
    let mut labels: std::collections::BTreeMap<String, Vec<Label>> = Default::default();
    let mut found = Vec::new();
    for path in paths {
        files_under(path, &|file| file.file_name().is_some_and(|n| n == "truth.json"), &mut found)
            .with_context(|| format!("cannot read {}", path.display()))?;
    }
    for path in found {
        let truth: crate::phantom::Truth = serde_json::from_slice(&std::fs::read(&path)?)
            .with_context(|| format!("{}: not a phantom's truth.json", path.display()))?;
        labels.entry(truth.series_uid).or_default().extend(truth.levels.into_iter().map(|disc| Label {
            level: disc.name,
            center_lps_mm: Some(disc.center_lps_mm),
            class: disc.condition.class(),
        }));
    }
    if let Some(csv) = csv {
        let text = std::fs::read_to_string(csv).with_context(|| format!("cannot read {}", csv.display()))?;
        let mut reader = csv::ReaderBuilder::new().trim(csv::Trim::All).flexible(true).from_reader(text.as_bytes());
        let header: Vec<String> = reader.headers()?.iter().map(str::to_lowercase).collect();
        if header != ["series_uid", "level", "finding"] {
            anyhow::bail!("{}: the first line must be the header series_uid,level,finding", csv.display());
        }
        for record in reader.records() {
            let record = record.with_context(|| format!("{}: not CSV", csv.display()))?;
            let number = record.position().map_or(0, |p| p.line() as usize - 1);
            let fields: Vec<&str> = record.iter().collect();
            let [series, level, finding] = fields[..] else {
                anyhow::bail!("{} line {}: expected 3 columns, found {}", csv.display(), number + 1, fields.len());
            };
            let class = crate::analysis::findings::canonical_class(finding).with_context(|| {
                format!(
                    "{} line {}: {finding:?} is not normal, schmorl, bulge or protrusion",
                    csv.display(),
                    number + 1
                )
            })?;
            labels.entry(series.to_string()).or_default().push(Label {
                level: level.to_string(),
                center_lps_mm: None,
                class,
            });
        }
    }
    Ok(labels)
}

/// Runs the analysis on every labelled series under the paths and scores its findings. A
/// labelled disc is matched to a found one by position when its label has one (phantoms), by
/// level name otherwise; a series the analysis skipped counts every labelled disc as not found.
fn evaluate(
    paths: &[PathBuf],
    labels_csv: Option<&std::path::Path>,
    detector: &crate::pipeline::Detector,
) -> anyhow::Result<crate::evaluation::Evaluation> {
    use crate::evaluation::{Evaluation, score_series};
    let mut labels = read_labels(paths, labels_csv)?;
    if labels.is_empty() {
        anyhow::bail!("no labels: no truth.json under the paths and no --labels file");
    }
    let mut outcomes = Vec::new();
    let mut left_out = std::collections::BTreeMap::new();
    for source in volumes_under(paths)? {
        let series_uid = source.name();
        let Some(series_labels) = labels.remove(&series_uid) else {
            left_out.insert(series_uid, "no labels".to_string());
            continue;
        };
        let findings = match source
            .load()
            .and_then(|(blocks, _)| crate::pipeline::analyze(&blocks, Some(detector)).map_err(|e| e.to_string()))
        {
            Ok(analysis) => analysis.findings,
            Err(reason) => {
                tracing::warn!(series = %series_uid, %reason, "not analysed; its labelled discs count as not found");
                Vec::new()
            }
        };
        outcomes.extend(score_series(&series_uid, series_labels, &findings));
    }
    for series_uid in labels.into_keys() {
        left_out.insert(series_uid, "labelled, but not among the inputs".to_string());
    }
    Ok(Evaluation::from_outcomes(outcomes, left_out)?)
}

/// Where ultralytics looks for an image's labels: the last `images` folder of its path becomes
/// `labels`, and the extension `.txt`.
fn yolo_label_path(image: &std::path::Path) -> Option<PathBuf> {
    let text = image.to_str()?;
    let (before, after) = text.rsplit_once("/images/")?;
    let stem = after.rsplit_once('.').map_or(after, |(stem, _)| stem);
    Some(PathBuf::from(format!("{before}/labels/{stem}.txt")))
}

/// The paper's protocol: the network on labelled 2D images, each labelled disc scored by the
/// detection whose mask overlaps it most.
fn evaluate_images(
    paths: &[PathBuf],
    detector: &crate::pipeline::Detector,
    folds: Option<&std::path::Path>,
) -> anyhow::Result<crate::evaluation::Evaluation> {
    // image name (without extension) -> fold
    let fold_of: std::collections::BTreeMap<String, String> = match folds {
        None => Default::default(),
        Some(path) => {
            let text = std::fs::read_to_string(path).with_context(|| format!("cannot read {}", path.display()))?;
            let mut reader = csv::ReaderBuilder::new().flexible(true).from_reader(text.as_bytes());
            let header = reader.headers()?.clone();
            let column = |name: &str| header.iter().position(|h| h == name);
            let (Some(image), Some(fold)) = (column("image"), column("fold")) else {
                anyhow::bail!(
                    "{}: expected the columns image and fold (labelme_to_yolo.py's cases.csv)",
                    path.display()
                );
            };
            let mut folds = std::collections::BTreeMap::new();
            for record in reader.records() {
                let record = record.with_context(|| format!("{}: not CSV", path.display()))?;
                let (Some(name), Some(of)) = (record.get(image), record.get(fold)) else {
                    anyhow::bail!("{}: a row lacks its image or fold", path.display());
                };
                folds.insert(name.to_string(), of.to_string());
            }
            folds
        }
    };
    let mut records = Vec::new();
    let mut labelled_counts: std::collections::BTreeMap<&'static str, u64> = Default::default();
    use crate::analysis::findings::canonical_class;
    use crate::evaluation::{Evaluation, parse_yolo_labels, rasterize, score_image};
    let mut files = Vec::new();
    for path in paths {
        let image = |file: &std::path::Path| {
            file.extension()
                .is_some_and(|e| ["png", "jpg", "jpeg", "dcm"].contains(&e.to_string_lossy().to_lowercase().as_str()))
        };
        files_under(path, &image, &mut files).with_context(|| format!("cannot read {}", path.display()))?;
    }
    let class_of = |id: usize| detector.class_names().get(id).and_then(|name| canonical_class(name));
    let (mut outcomes, mut unlabelled_detections) = (Vec::new(), 0u64);
    let mut left_out = std::collections::BTreeMap::new();
    for file in files {
        let name = file.display().to_string();
        // YOLO-seg labels (../labels/NAME.txt), or a LabelMe file beside the image (NAME.json).
        let labelme_path = file.with_extension("json");
        let yolo_path = yolo_label_path(&file).filter(|p| p.is_file());
        if yolo_path.is_none() && !labelme_path.is_file() {
            left_out.insert(
                name,
                "no label file (expected: ../labels/NAME.txt, YOLO-seg, or NAME.json, LabelMe)".to_string(),
            );
            continue;
        }
        let image = crate::analysis::detector::read_image(&file)?;
        let labelled = match yolo_path {
            Some(label_path) => {
                let text = std::fs::read_to_string(&label_path)
                    .with_context(|| format!("cannot read {}", label_path.display()))?;
                let objects = parse_yolo_labels(&text).with_context(|| label_path.display().to_string())?;
                objects
                    .iter()
                    .map(|object| {
                        let class = class_of(object.class_id).with_context(|| {
                            format!(
                                "{}: class {} is not a disc class of these weights ({})",
                                label_path.display(),
                                object.class_id,
                                detector.class_names().join(", ")
                            )
                        })?;
                        Ok((class, rasterize(&object.polygon, image.width, image.height)))
                    })
                    .collect::<anyhow::Result<Vec<_>>>()?
            }
            None => {
                let text = std::fs::read_to_string(&labelme_path)
                    .with_context(|| format!("cannot read {}", labelme_path.display()))?;
                crate::evaluation::parse_labelme(&text, image.width, image.height)
                    .with_context(|| labelme_path.display().to_string())?
            }
        };
        let detected: Vec<_> = detector
            .detect_image(&image)?
            .into_iter()
            .filter_map(|d| Some((class_of(d.class_id)?, f64::from(d.confidence), d.mask)))
            .collect();
        let (image_records, counts) = crate::evaluation::precision_records(&labelled, &detected);
        records.extend(image_records);
        for (class, n) in counts {
            *labelled_counts.entry(class).or_insert(0) += n;
        }
        let (scored, unmatched) = score_image(&name, &labelled, &detected);
        outcomes.extend(scored);
        unlabelled_detections += unmatched as u64;
    }
    anyhow::ensure!(!outcomes.is_empty() || !left_out.is_empty(), "no images under the paths");
    let stem = |series: &str| {
        std::path::Path::new(series).file_stem().map(|s| s.to_string_lossy().into_owned()).unwrap_or_default()
    };
    let mut per_fold: std::collections::BTreeMap<String, Vec<crate::evaluation::LevelOutcome>> = Default::default();
    if folds.is_some() {
        for outcome in &outcomes {
            let fold = fold_of.get(&stem(&outcome.series)).cloned().unwrap_or_else(|| "none".into());
            per_fold.entry(fold).or_default().push(outcome.clone());
        }
    }
    let mut evaluation = Evaluation::from_outcomes(outcomes, left_out)?;
    evaluation.unlabelled_detections = Some(unlabelled_detections);
    evaluation.ap50 = crate::evaluation::average_precision(&records, &labelled_counts);
    let aps: Vec<f64> = evaluation.ap50.iter().filter_map(|(_, ap)| *ap).collect();
    evaluation.map50 = (!aps.is_empty()).then(|| aps.iter().sum::<f64>() / aps.len() as f64);
    for (fold, outcomes) in per_fold {
        let e = Evaluation::from_outcomes(outcomes, Default::default())?;
        evaluation.folds.push(crate::evaluation::FoldFigures {
            fold,
            total: e.total,
            correct: e.correct,
            accuracy: e.accuracy,
            kappa: e.kappa,
            mean_dice: e.mean_dice,
        });
    }
    Ok(evaluation)
}

/// A model card in markdown: what the weights are, how they were made (the metadata that
/// model/tools/train.py writes), what they were evaluated on here, and the figures.
fn write_model_card(
    card: &std::path::Path,
    weights: &std::path::Path,
    sha256: &str,
    paths: &[PathBuf],
    images: bool,
    evaluation: &crate::evaluation::Evaluation,
) -> anyhow::Result<()> {
    use std::fmt::Write as _;
    let metadata = crate::analysis::detector::weights_metadata(weights)?;
    let field = |key: &str| metadata.get(key).cloned().unwrap_or_else(|| "not recorded".into());
    let mut out = String::new();
    let name = weights.file_name().map(|n| n.to_string_lossy().into_owned()).unwrap_or_default();
    let _ = writeln!(out, "# Model card: {name}\n");
    let _ = writeln!(out, "- **Weights**: `{}`, SHA-256 `{sha256}`", weights.display());
    let _ = writeln!(out, "- **Classes**: {}; input {} px", field("names"), field("imgsz"));
    let _ = writeln!(out, "- **Recipe**: `{}`", field("recipe"));
    let _ =
        writeln!(out, "- **Training data**: {} images, SHA-256 `{}`", field("dataset_images"), field("dataset_sha256"));
    let _ = writeln!(
        out,
        "- **Folds (ultralytics' validation per fold)**: `{}`; exported: fold {}",
        field("fold_metrics"),
        field("chosen_fold")
    );
    let _ = writeln!(
        out,
        "- **Evaluated on**: {} ({}), {} labelled discs, by idaics {} on {}",
        paths.iter().map(|p| format!("`{}`", p.display())).collect::<Vec<_>>().join(", "),
        if images { "2D images, the paper's protocol" } else { "CT series, the agent's whole path" },
        evaluation.total,
        env!("CARGO_PKG_VERSION"),
        crate::store::db::now()
    );
    let _ = writeln!(
        out,
        "- **Intended use**: decision support beside the PACS, every finding reviewed by a radiologist; \
         not validated for clinical use until a site has evaluated it on its own patients.\n"
    );
    let _ = writeln!(out, "## Figures\n\n```\n{}```", evaluation.table());
    std::fs::write(card, out).with_context(|| format!("cannot write {}", card.display()))?;
    Ok(())
}

/// What a radiologist checks in two seconds: per block of the series a mid-sagittal and a coronal
/// view through the column with each located disc marked and named (green when the name is
/// certain, orange with "?" when not), and each level's axial image.
fn write_pngs(
    blocks: &[crate::analysis::volume::Volume],
    levels: &[crate::analysis::spine::DiscLevel],
    dir: &std::path::Path,
) -> anyhow::Result<()> {
    use crate::analysis::slices;
    use crate::report::secondary_capture::draw_text;
    std::fs::create_dir_all(dir)?;
    let save_gray = |image: &slices::SliceImage, name: &str| -> anyhow::Result<()> {
        let img = image::GrayImage::from_raw(image.size as u32, image.size as u32, image.pixels.clone())
            .ok_or_else(|| anyhow::anyhow!("image buffer size"))?;
        img.save(dir.join(name))?;
        Ok(())
    };
    for (number, block) in blocks.iter().enumerate() {
        let inside = |l: &&crate::analysis::spine::DiscLevel| {
            let k = block.lps_to_voxel(l.center_lps_mm)[2];
            (-0.5..=block.dims[2] as f64 - 0.5).contains(&k)
        };
        let own: Vec<&crate::analysis::spine::DiscLevel> = levels.iter().filter(inside).collect();
        // Through the levels' mean centre, or the block's middle when it has none.
        let middle = block.voxel_to_lps(block.dims.map(|n| (n as f64 - 1.0) / 2.0));
        let centre: [f64; 3] = if own.is_empty() {
            middle
        } else {
            let mean = |d: usize| own.iter().map(|l| l.center_lps_mm[d]).sum::<f64>() / own.len() as f64;
            [mean(0), mean(1), middle[2]]
        };
        let extent = block.dims[2] as f64 * block.spacing[2];
        let fov = (extent + 40.0).max(slices::SAGITTAL_FOV_MM);
        let views = [
            ("sagittal", [0.0, 1.0, 0.0]), // anterior on the left, head at the top
            ("coronal", [1.0, 0.0, 0.0]),  // patient right on the left
        ];
        for (view, row_direction) in views {
            let image =
                slices::resample(block, slices::View::Sagittal, centre, row_direction, [0.0, 0.0, -1.0], 512, fov);
            let size = image.size;
            let mut rgb: Vec<u8> = image.pixels.iter().flat_map(|&v| [v, v, v]).collect();
            for level in &own {
                let (c, r) = image.lps_to_pixel(level.center_lps_mm);
                let colour = if level.name_certain { [60, 230, 90] } else { [255, 150, 0] };
                let (c, r) = (c.round() as i64, r.round() as i64);
                for x in c - 14..=c + 14 {
                    for y in [r, r + 1] {
                        if x >= 0 && y >= 0 && (x as usize) < size && (y as usize) < size {
                            rgb[(y as usize * size + x as usize) * 3..][..3].copy_from_slice(&colour);
                        }
                    }
                }
                let label = if level.name_certain { level.name.clone() } else { format!("{}?", level.name) };
                if r >= 7 && (r as usize) < size {
                    draw_text(&mut rgb, size, (c + 18).max(0) as usize, r as usize - 7, 2, &label, colour);
                }
            }
            let name = if blocks.len() > 1 { format!("{view}_block{}.png", number + 1) } else { format!("{view}.png") };
            image::RgbImage::from_raw(size as u32, size as u32, rgb)
                .ok_or_else(|| anyhow::anyhow!("image buffer size"))?
                .save(dir.join(name))?;
        }
        for level in own {
            save_gray(&slices::axial(block, level, 512), &format!("axial_{}.png", level.name.replace('/', "-")))?;
        }
    }
    Ok(())
}

/// Every file under `path` (itself when it is a file) that `keep` accepts, in name order.
fn files_under(
    path: &std::path::Path,
    keep: &dyn Fn(&std::path::Path) -> bool,
    out: &mut Vec<PathBuf>,
) -> std::io::Result<()> {
    if path.is_dir() {
        let mut entries: Vec<PathBuf> = std::fs::read_dir(path)?.flatten().map(|e| e.path()).collect();
        entries.sort();
        for entry in entries {
            files_under(&entry, keep, out)?;
        }
    } else if keep(path) {
        out.push(path.to_path_buf());
    }
    Ok(())
}

/// DICOM files (often without an extension) and NIfTI volumes; NIfTI masks ("_msk", "_seg") are
/// not images.
fn collect_files(path: &std::path::Path, out: &mut Vec<PathBuf>) -> std::io::Result<()> {
    files_under(
        path,
        &|file| {
            let name = file.file_name().map(|n| n.to_string_lossy().to_lowercase()).unwrap_or_default();
            let extension = file.extension().map(|e| e.to_string_lossy().to_lowercase());
            let nifti = name.ends_with(".nii") || name.ends_with(".nii.gz");
            let mask = nifti && (name.contains("_msk") || name.contains("_seg"));
            (extension.is_none_or(|e| e == "dcm") || nifti) && !mask
        },
        out,
    )
}

/// The named configuration file, else the installed one where this binary is installed and the
/// file exists (`config::installed_config_path`), else none: built-in defaults.
fn config_path(named: Option<PathBuf>) -> Option<PathBuf> {
    named.or_else(|| {
        let exe = std::env::current_exe().ok()?;
        crate::config::installed_config_path(&exe).filter(|path| path.is_file())
    })
}

/// Root must not open the SQLite database of an agent that runs as its own user: a file root
/// creates there (the database, its write-ahead log) is one the agent can no longer write, and it
/// stops recording. Asks for the command to be run as the directory's owner instead.
fn refuse_root_in_an_agents_sqlite(url: &str) -> anyhow::Result<()> {
    use std::os::unix::fs::MetadataExt;
    let Some(rest) = url.strip_prefix("sqlite:") else { return Ok(()) };
    if unsafe { libc::geteuid() } != 0 {
        return Ok(());
    }
    let file = Path::new(rest.trim_start_matches("//").split('?').next().unwrap_or_default());
    let dir = file.parent().filter(|d| !d.as_os_str().is_empty()).unwrap_or(Path::new("."));
    let owner = match std::fs::metadata(dir) {
        Ok(meta) if meta.uid() != 0 => meta.uid(),
        _ => return Ok(()),
    };
    let user = user_name(owner);
    let command: Vec<String> = std::env::args().collect();
    anyhow::bail!(
        "{} belongs to the user {user}, who runs the agent; as root this command could leave files there \
         the agent cannot write. Run it as that user: sudo -u {user} {}",
        dir.display(),
        command.join(" ")
    )
}

/// The name of a user or group id, for messages, as the system's name services know it (NSS:
/// /etc/passwd and /etc/group, or a directory such as LDAP); `#id` when it has none. `lookup`
/// runs the reentrant libc call with the buffer it may use and returns the name it found in it,
/// or null.
fn looked_up_name(id: u32, lookup: impl FnOnce(&mut [libc::c_char]) -> *const libc::c_char) -> String {
    let mut buffer = vec![0 as libc::c_char; 16 * 1024];
    let name = lookup(&mut buffer);
    if name.is_null() {
        return format!("#{id}");
    }
    // SAFETY: a NUL-terminated name that the call wrote into `buffer`, still alive here.
    unsafe { std::ffi::CStr::from_ptr(name) }.to_string_lossy().into_owned()
}

fn user_name(uid: u32) -> String {
    looked_up_name(uid, |buffer| {
        // SAFETY: a zeroed passwd is a valid out-parameter; getpwuid_r writes only into it and
        // into `buffer`, whose length it is told.
        let mut entry: libc::passwd = unsafe { std::mem::zeroed() };
        let mut found: *mut libc::passwd = std::ptr::null_mut();
        let rc = unsafe { libc::getpwuid_r(uid, &mut entry, buffer.as_mut_ptr(), buffer.len(), &mut found) };
        if rc == 0 && !found.is_null() { entry.pw_name } else { std::ptr::null() }
    })
}

fn group_name(gid: u32) -> String {
    looked_up_name(gid, |buffer| {
        // SAFETY: as in `user_name`, with getgrgid_r.
        let mut entry: libc::group = unsafe { std::mem::zeroed() };
        let mut found: *mut libc::group = std::ptr::null_mut();
        let rc = unsafe { libc::getgrgid_r(gid, &mut entry, buffer.as_mut_ptr(), buffer.len(), &mut found) };
        if rc == 0 && !found.is_null() { entry.gr_name } else { std::ptr::null() }
    })
}

/// Loads the named configuration, else the installed one (`config_path`), else the defaults; with
/// the path it came from. An administrator who may not read the installed file (it may hold the
/// database password) is told whose it is and how to run the command instead.
fn load_config(named: Option<PathBuf>) -> anyhow::Result<(Config, Option<PathBuf>)> {
    use std::os::unix::fs::MetadataExt;
    let path = config_path(named);
    match Config::load(path.as_deref()) {
        Ok(config) => Ok((config, path)),
        Err(crate::config::ConfigError::Read { path, source })
            if source.kind() == std::io::ErrorKind::PermissionDenied =>
        {
            let owner = std::fs::metadata(&path)
                .map(|m| {
                    format!(
                        "it belongs to {}:{} with mode {:o}",
                        user_name(m.uid()),
                        group_name(m.gid()),
                        m.mode() & 0o777
                    )
                })
                .unwrap_or_default();
            let command: Vec<String> = std::env::args().collect();
            anyhow::bail!(
                "cannot read {}: permission denied; {owner}. Run the command as a user who may read it \
                 (where the package is installed: sudo -u idaics {})",
                path.display(),
                command.join(" ")
            )
        }
        Err(e) => Err(e.into()),
    }
}

/// The database URL a one-shot command uses.
fn database_url_of(args: DatabaseArgs) -> anyhow::Result<String> {
    let (mut cfg, _) = load_config(args.config)?;
    if let Some(dir) = args.state_dir {
        cfg.storage.state_dir = dir;
    }
    if let Some(url) = args.database_url {
        cfg.database.url = url;
    }
    let url = cfg.database.effective_url(&cfg.storage.state_dir);
    refuse_root_in_an_agents_sqlite(&url)?;
    if cfg.database.url.is_empty() {
        std::fs::create_dir_all(&cfg.storage.state_dir)
            .with_context(|| format!("cannot create {}", cfg.storage.state_dir.display()))?;
    }
    Ok(url)
}

/// Runs a database command on a small runtime.
fn one_shot<F: std::future::Future<Output = anyhow::Result<()>>>(work: F) -> anyhow::Result<()> {
    init_database_cli_logging();
    tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .context("cannot start the async runtime")?
        .block_on(work)
}

/// Prints a listing as an aligned table, a JSON document `{key: [...]}`, or CSV with a header
/// line, from rows handed over as the database sends them: CSV and JSON are written row by row,
/// so that an export of any length costs a row's memory; the table once every row is in, its
/// columns as wide as their widest cell. A reader that stops early (`| head`) ends the listing
/// quietly: what follows is read and dropped.
/// One CSV record and its line end, quoted where RFC 4180 asks (commas, quotes, CR, LF).
fn csv_line<T: AsRef<[u8]>>(fields: &[T]) -> anyhow::Result<String> {
    let mut writer = csv::WriterBuilder::new().terminator(csv::Terminator::Any(b'\n')).from_writer(Vec::new());
    writer.write_record(fields)?;
    Ok(String::from_utf8(writer.into_inner().map_err(|e| anyhow::anyhow!("{e}"))?)?)
}

struct RowPrinter<'a> {
    columns: &'a [&'a str],
    format: TableJsonCsv,
    key: &'a str,
    out: std::io::BufWriter<std::io::StdoutLock<'static>>,
    rows: usize,
    /// The table's cells, held until [`RowPrinter::finish`].
    table: Vec<Vec<String>>,
    /// Stdout was closed: the rest is dropped.
    closed: bool,
}

impl<'a> RowPrinter<'a> {
    fn new(columns: &'a [&'a str], format: TableJsonCsv, key: &'a str) -> anyhow::Result<Self> {
        let out = std::io::BufWriter::new(std::io::stdout().lock());
        let mut printer = RowPrinter { columns, format, key, out, rows: 0, table: Vec::new(), closed: false };
        if let TableJsonCsv::Csv = format {
            let header = csv_line(columns)?;
            printer.write(|out| out.write_all(header.as_bytes()))?;
        }
        Ok(printer)
    }

    fn row(&mut self, row: &impl serde::Serialize) -> anyhow::Result<()> {
        if self.closed {
            return Ok(());
        }
        let row = serde_json::to_value(row)?;
        let first = self.rows == 0;
        self.rows += 1;
        match self.format {
            TableJsonCsv::Json => {
                // serde_json's pretty form of `{key: [rows]}`, one row at a time.
                let pretty = serde_json::to_string_pretty(&row)?;
                let key = self.key;
                self.write(|out| {
                    if first {
                        write!(out, "{{\n  {}: [\n", serde_json::Value::from(key))?;
                    } else {
                        writeln!(out, ",")?;
                    }
                    for (i, line) in pretty.lines().enumerate() {
                        if i > 0 {
                            writeln!(out)?;
                        }
                        write!(out, "    {line}")?;
                    }
                    Ok(())
                })
            }
            TableJsonCsv::Csv => {
                let fields: Vec<String> = self.columns.iter().map(|c| cell(&row, c)).collect();
                let line = csv_line(&fields)?;
                self.write(|out| out.write_all(line.as_bytes()))
            }
            TableJsonCsv::Table => {
                self.table.push(self.columns.iter().map(|c| cell(&row, c)).collect());
                Ok(())
            }
        }
    }

    fn finish(mut self) -> anyhow::Result<()> {
        let (columns, key, rows) = (self.columns, self.key, self.rows);
        match self.format {
            TableJsonCsv::Json if rows == 0 => {
                self.write(|out| writeln!(out, "{{\n  {}: []\n}}", serde_json::Value::from(key)))?
            }
            TableJsonCsv::Json => self.write(|out| writeln!(out, "\n  ]\n}}"))?,
            TableJsonCsv::Csv => {}
            TableJsonCsv::Table => {
                let cells = std::mem::take(&mut self.table);
                let widths: Vec<usize> = columns
                    .iter()
                    .enumerate()
                    .map(|(i, c)| cells.iter().map(|r| r[i].chars().count()).chain([c.len()]).max().unwrap_or(0))
                    .collect();
                let line = |values: Vec<&str>| {
                    values
                        .iter()
                        .zip(&widths)
                        .map(|(v, w)| format!("{v:<w$}"))
                        .collect::<Vec<_>>()
                        .join("  ")
                        .trim_end()
                        .to_string()
                };
                self.write(|out| {
                    writeln!(out, "{}", line(columns.to_vec()))?;
                    for r in &cells {
                        writeln!(out, "{}", line(r.iter().map(String::as_str).collect()))?;
                    }
                    if rows == 0 {
                        writeln!(out, "(no {key})")?;
                    }
                    Ok(())
                })?;
            }
        }
        self.write(|out| out.flush())
    }

    /// Writes unless stdout has been closed; a closed stdout is remembered, any other failure
    /// returned.
    fn write(
        &mut self,
        what: impl FnOnce(&mut std::io::BufWriter<std::io::StdoutLock<'static>>) -> std::io::Result<()>,
    ) -> anyhow::Result<()> {
        if self.closed {
            return Ok(());
        }
        match what(&mut self.out) {
            Err(e) if e.kind() == std::io::ErrorKind::BrokenPipe => {
                self.closed = true;
                Ok(())
            }
            other => Ok(other?),
        }
    }
}

/// A value as a listing prints it.
fn cell(row: &serde_json::Value, column: &str) -> String {
    match &row[column] {
        serde_json::Value::Null => String::new(),
        serde_json::Value::String(s) => s.clone(),
        serde_json::Value::Array(items) => {
            items.iter().map(|v| v.as_str().map_or_else(|| v.to_string(), str::to_string)).collect::<Vec<_>>().join("+")
        }
        serde_json::Value::Number(n) if column == "confidence" => format!("{:.3}", n.as_f64().unwrap_or(0.0)),
        // Areas come from pixel counts times an f32 pixel area: a tenth of a square millimetre is
        // all they can mean, and twelve digits hide the column's scale from whoever reads it.
        serde_json::Value::Number(n) if column.ends_with("_mm2") => format!("{:.1}", n.as_f64().unwrap_or(0.0)),
        other => other.to_string(),
    }
}

/// Logging for one-shot commands: warnings and errors to stderr.
fn init_cli_logging() {
    let filter = log_filter(&cli_log_spec());
    tracing_subscriber::fmt().with_env_filter(filter).with_writer(std::io::stderr).without_time().init();
}

/// Logging for the database commands (`findings`, `jobs`, `outbox`, `migrate`).
fn init_database_cli_logging() {
    let filter = database_cli_log_filter(&cli_log_spec());
    tracing_subscriber::fmt().with_env_filter(filter).with_writer(std::io::stderr).without_time().init();
}

/// `RUST_LOG`, or warnings and errors.
fn cli_log_spec() -> String {
    std::env::var(tracing_subscriber::EnvFilter::DEFAULT_ENV)
        .ok()
        .filter(|s| !s.trim().is_empty())
        .unwrap_or_else(|| "warn".into())
}

/// [`log_filter`], with sqlx's warning about statements slower than a second held back unless
/// `spec` names sqlx: a listing is one statement that runs as long as the export, and the
/// warning, with the whole SQL, was all an administrator saw on stderr after a year's findings.
/// The service keeps the warning, where a slow statement is news.
fn database_cli_log_filter(spec: &str) -> tracing_subscriber::EnvFilter {
    held_back_unless_named(log_filter(spec), spec, "sqlx", "sqlx::query=error")
}

/// The series selection rules in a sentence, for an administrator checking what a change does.
fn describe_selection(series: &crate::config::SeriesConfig) -> String {
    let quoted = |patterns: &[String]| patterns.iter().map(|p| format!("{p:?}")).collect::<Vec<_>>().join(", ");
    let mut sentence = format!("{} stacks", series.orientations.join(", "));
    if !series.include_descriptions.is_empty() {
        sentence += &format!(" whose SeriesDescription contains one of {}", quoted(&series.include_descriptions));
    }
    if !series.exclude_descriptions.is_empty() {
        let joint = if series.include_descriptions.is_empty() { " whose SeriesDescription" } else { " and" };
        sentence += &format!("{joint} contains none of {}", quoted(&series.exclude_descriptions));
    }
    sentence
}

/// The filter `spec` asks for, quieting dicom-rs' parser unless `spec` names it.
///
/// Japanese and Korean sites write Specific Character Set as `\ISO 2022 IR 87`: an empty first
/// value (the default repertoire) and code extensions. dicom-rs decodes such text as ISO 8859-1,
/// which keeps every byte, and copies it back out unchanged, but it warns that the empty value is
/// unsupported each time it reads or writes an object: over a thousand lines for one study,
/// burying the warnings an administrator must see. `dicom_parser=warn` in the filter shows them
/// again.
fn log_filter(spec: &str) -> tracing_subscriber::EnvFilter {
    held_back_unless_named(
        tracing_subscriber::EnvFilter::new(spec),
        spec,
        "dicom_parser",
        "dicom_parser::stateful=error",
    )
}

/// `filter` with `directive` added, unless `spec` names `target`: an administrator who asks for
/// a target's messages gets them.
fn held_back_unless_named(
    filter: tracing_subscriber::EnvFilter,
    spec: &str,
    target: &str,
    directive: &str,
) -> tracing_subscriber::EnvFilter {
    if spec.contains(target) { filter } else { filter.add_directive(directive.parse().expect("a valid directive")) }
}

fn init_logging(cfg: &Config) {
    use tracing_subscriber::EnvFilter;
    let spec = std::env::var(EnvFilter::DEFAULT_ENV)
        .ok()
        .filter(|s| !s.trim().is_empty())
        .unwrap_or_else(|| cfg.logging.level.clone());
    let builder = tracing_subscriber::fmt().with_env_filter(log_filter(&spec)).with_writer(std::io::stderr);
    if cfg.logging.format == "json" {
        builder.json().with_current_span(true).with_span_list(false).init();
    } else {
        builder.init();
    }
}

#[cfg(test)]
mod tests {
    /// CSV fields with commas, quotes, line feeds and carriage returns come back as they were.
    #[test]
    fn csv_lines_quote_what_rfc_4180_asks() {
        let fields = ["plain", "a,b", "say \"hi\"", "two\nlines", "cr\rhere", ""];
        let line = super::csv_line(&fields).unwrap();
        assert!(line.ends_with('\n') && line.starts_with("plain,\"a,b\",\"say \"\"hi\"\"\""), "{line}");
        let mut reader = csv::ReaderBuilder::new().has_headers(false).from_reader(line.as_bytes());
        let record = reader.records().next().unwrap().unwrap();
        assert_eq!(record.iter().collect::<Vec<_>>(), fields);
    }

    /// A labels CSV with quoted fields (as a spreadsheet saves it) is read field by field.
    #[test]
    fn labels_csv_with_quoted_fields_is_read() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("labels.csv");
        std::fs::write(
            &path,
            "series_uid,level,finding\r\n\"1.2.3\",\"L4/L5\",\"Protrusion\"\r\n1.2.3, L5/S1 ,normal\r\n\r\n",
        )
        .unwrap();
        let labels = super::read_labels(&[], Some(&path)).unwrap();
        let read: Vec<(&str, &str)> = labels["1.2.3"].iter().map(|l| (l.level.as_str(), l.class)).collect();
        assert_eq!(read, [("L4/L5", "protrusion"), ("L5/S1", "normal")]);
        std::fs::write(&path, "series_uid,level,finding\n1.2.3,L4/L5\n").unwrap();
        let err = super::read_labels(&[], Some(&path)).unwrap_err().to_string();
        assert!(err.contains("line 2: expected 3 columns, found 2"), "{err}");
    }

    /// Names come from the system's name services (getpwuid_r, getgrgid_r); an id without a name
    /// is shown as a number.
    #[test]
    fn user_and_group_names_come_from_the_system() {
        assert_eq!(super::user_name(0), "root");
        assert_eq!(super::group_name(0), "root");
        assert_eq!(super::user_name(3_999_999_999), "#3999999999");
        assert_eq!(super::group_name(3_999_999_999), "#3999999999");
    }

    #[test]
    fn database_commands_hold_back_slow_statement_warnings_unless_asked() {
        let quiet = super::database_cli_log_filter("warn").to_string();
        assert!(quiet.contains("sqlx::query=error") && quiet.contains("dicom_parser::stateful=error"), "{quiet}");
        let asked = super::database_cli_log_filter("warn,sqlx=info").to_string();
        assert!(!asked.contains("sqlx::query=error"), "{asked}");
        assert!(!super::log_filter("warn").to_string().contains("sqlx"));
    }
}
