//! The command line: parses arguments, loads the configuration and dispatches to the library.
//! This is the top of the program, so errors become `anyhow` here and nowhere below.

use std::path::PathBuf;

use anyhow::Context;
use clap::{Parser, Subcommand, ValueEnum};

use crate::config::Config;

#[derive(Parser, Debug)]
#[command(name = "idaics", version, about = "IDAICS: intervertebral disc anomaly classification, a DICOM agent beside the PACS")]
pub struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand, Debug)]
enum Command {
    /// Run the agent: DICOM listener, spool and series tracking, until SIGTERM or SIGINT.
    Serve {
        /// Configuration file (default: built-in defaults and IDAICS_* environment variables).
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
    },
    /// Validate a configuration file and print the effective settings.
    CheckConfig {
        #[arg(long, short)]
        config: Option<PathBuf>,
    },
    /// List the series in the spool with their state (pending, complete, skipped and why).
    Series {
        #[arg(long, short)]
        config: Option<PathBuf>,
        #[arg(long)]
        state_dir: Option<PathBuf>,
        #[arg(long, value_enum, default_value_t = Format::Table)]
        format: Format,
    },
}

#[derive(Clone, Copy, Debug, ValueEnum)]
enum Format {
    Table,
    Json,
}

pub fn main() -> anyhow::Result<()> {
    let cli = Cli::parse();
    match cli.command {
        Command::Serve { config, port, ae_title, state_dir } => {
            let mut cfg = Config::load(config.as_deref())?;
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
            runtime.block_on(crate::service::run(cfg))?;
            Ok(())
        }
        Command::CheckConfig { config } => {
            let cfg = Config::load(config.as_deref())?;
            let source = config.map_or("built-in defaults".to_string(), |p| p.display().to_string());
            println!("{source}: OK");
            println!("  DICOM: AE {} on {}:{}", cfg.dicom.ae_title, cfg.dicom.bind_address, cfg.dicom.port);
            println!("  state directory: {}", cfg.storage.state_dir.display());
            println!("  database: {}", redact_url(&cfg.database.effective_url(&cfg.storage.state_dir)));
            println!("  destinations: {}", cfg.destinations.len());
            Ok(())
        }
        Command::Series { config, state_dir, format } => {
            let mut cfg = Config::load(config.as_deref())?;
            if let Some(dir) = state_dir {
                cfg.storage.state_dir = dir;
            }
            let series = crate::spool::scan_spool(&cfg.storage.spool_dir())?;
            let rows: Vec<serde_json::Value> = series
                .iter()
                .map(|s| {
                    serde_json::json!({
                        "study_uid": s.study_instance_uid,
                        "series_uid": s.series_instance_uid,
                        "instances": s.instance_files.len(),
                        "state": s.record.as_ref().map_or("pending", |r| r.state.as_str()),
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
                    println!("{:<9} {:>9}  {:<64}  {}", "STATE", "INSTANCES", "SERIES UID", "NOTE");
                    for r in &rows {
                        println!(
                            "{:<9} {:>9}  {:<64}  {}",
                            r["state"].as_str().unwrap_or(""),
                            r["instances"],
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

/// Hides the password of a database URL for printing and logging.
pub fn redact_url(url: &str) -> String {
    match (url.find("://"), url.rfind('@')) {
        (Some(scheme_end), Some(at)) if at > scheme_end => {
            let credentials = &url[scheme_end + 3..at];
            match credentials.split_once(':') {
                Some((user, _)) => format!("{}{user}:***{}", &url[..scheme_end + 3], &url[at..]),
                None => url.to_string(),
            }
        }
        _ => url.to_string(),
    }
}

fn init_logging(cfg: &Config) {
    use tracing_subscriber::EnvFilter;
    let filter = EnvFilter::try_from_default_env().unwrap_or_else(|_| EnvFilter::new(&cfg.logging.level));
    let builder = tracing_subscriber::fmt().with_env_filter(filter).with_writer(std::io::stderr);
    if cfg.logging.format == "json" {
        builder.json().with_current_span(true).with_span_list(false).init();
    } else {
        builder.init();
    }
}

#[cfg(test)]
mod tests {
    #[test]
    fn passwords_are_redacted() {
        assert_eq!(super::redact_url("postgres://idaics:s3cret@db:5432/idaics"), "postgres://idaics:***@db:5432/idaics");
        assert_eq!(super::redact_url("sqlite:///var/lib/idaics/idaics.db"), "sqlite:///var/lib/idaics/idaics.db");
    }
}
