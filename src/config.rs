//! The agent's configuration: one TOML file, every key optional with a documented default,
//! overridable by `IDAICS_<SECTION>_<KEY>` environment variables and by command-line flags.
//!
//! Validation collects every problem at once, each naming its key and source, because a PACS
//! administrator editing `/etc/idaics/idaics.toml` should not have to fix errors one restart at a time.

use std::net::IpAddr;
use std::path::{Path, PathBuf};
use std::time::Duration;

use serde::{Deserialize, Serialize};

/// Prefix of the environment variables that override configuration keys.
pub const ENV_PREFIX: &str = "IDAICS_";

#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    #[error("cannot read {path}: {source}")]
    Read { path: PathBuf, source: std::io::Error },
    #[error("{path}: {message}")]
    Parse { path: String, message: String },
    #[error("environment variable {var}: {message}")]
    Env { var: String, message: String },
    #[error("{source_name}: {} problem(s):\n{}", problems.len(), problems.iter().map(|p| format!("  - {p}")).collect::<Vec<_>>().join("\n"))]
    Invalid { source_name: String, problems: Vec<String> },
}

/// What to do with storage SOP classes other than CT and Enhanced CT.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum OtherSopClassPolicy {
    /// Not accepted at negotiation: the sender sees the presentation context rejected.
    Refuse,
    /// Accepted, answered with Success, not stored; logged and counted.
    Discard,
}

#[derive(Debug, Clone, Default, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct Config {
    pub dicom: DicomConfig,
    pub limits: LimitsConfig,
    pub series: SeriesConfig,
    pub storage: StorageConfig,
    pub database: DatabaseConfig,
    pub http: HttpConfig,
    pub model: ModelConfig,
    pub outputs: OutputsConfig,
    pub logging: LoggingConfig,
    pub destinations: Vec<Destination>,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct DicomConfig {
    pub ae_title: String,
    pub bind_address: String,
    pub port: u16,
    pub require_called_ae_title: bool,
    pub allowed_calling_ae_titles: Vec<String>,
    pub allowed_peers: Vec<String>,
    /// Accept any peer when both allow-lists are empty. Off by default: until someone lists the
    /// senders (or says that anyone may send), every association is refused.
    pub allow_any_peer: bool,
    pub other_sop_classes: OtherSopClassPolicy,
    /// A second port that serves DICOM over TLS (0: none), beside the plain one.
    pub tls_port: u16,
    /// PEM certificate chain and private key of the TLS port.
    pub tls_certificate: String,
    pub tls_private_key: String,
    /// PEM CA certificates; when set, a TLS peer must present a certificate one of them signed.
    pub tls_client_ca: String,
}

impl DicomConfig {
    /// Why every association is refused, when nobody has said who may send.
    pub fn closed_until_configured(&self) -> Option<&'static str> {
        (self.allowed_peers.is_empty() && self.allowed_calling_ae_titles.is_empty() && !self.allow_any_peer).then_some(
            "no sender is allowed yet: set dicom.allowed_peers or dicom.allowed_calling_ae_titles \
             (or dicom.allow_any_peer = true) and restart; until then every association is refused",
        )
    }
}

#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct LimitsConfig {
    pub max_associations: usize,
    /// Associations one peer address may hold at once, so that one host cannot take every slot.
    pub max_associations_per_peer: usize,
    pub max_pdu_length: u32,
    pub association_timeout_s: u64,
    pub idle_timeout_s: u64,
    /// Seconds a response may wait for the peer to take it before the association is aborted.
    pub write_timeout_s: u64,
    /// Seconds one analysis job may run before the agent counts as hung (the watchdog is then
    /// no longer fed, and systemd restarts it; the job is tried again).
    pub max_job_s: u64,
    pub max_instance_size_mb: u64,
    /// Largest data set of a Deflated Explicit VR Little Endian instance once inflated.
    pub max_inflated_size_mb: u64,
    /// Largest value of any element but the pixel data.
    pub max_value_size_kb: u32,
    pub min_free_disk_mb: u64,
    pub shutdown_grace_s: u64,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct SeriesConfig {
    pub quiet_period_s: u64,
    pub max_wait_s: u64,
    pub complete_on_release: bool,
    pub min_slices: usize,
    pub spacing_tolerance: f64,
    pub max_tilt_degrees: f64,
    /// Largest series loaded for analysis, as 32-bit voxels in MB.
    pub max_volume_mb: u64,
    /// Stack orientations analysed: "axial", "sagittal", "coronal".
    pub orientations: Vec<String>,
    /// When not empty, only series whose SeriesDescription contains one of these are analysed.
    pub include_descriptions: Vec<String>,
    /// Series whose SeriesDescription contains one of these are skipped.
    pub exclude_descriptions: Vec<String>,
}

/// The names [`SeriesConfig::orientations`] takes.
pub const STACK_ORIENTATIONS: [&str; 3] = ["axial", "sagittal", "coronal"];

#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct StorageConfig {
    pub state_dir: PathBuf,
    pub fsync: bool,
    pub verify_compressed_pixel_data: bool,
    /// This agent's host in the state directory's lock and in job claims; empty: the kernel's.
    pub host_name: String,
    /// Days a decided series' instances and objects stay after its analysis is finished and
    /// delivered; 0 keeps them for ever.
    pub retention_days: f64,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct DatabaseConfig {
    pub url: String,
    /// Seconds a job's claim lasts without renewal before any agent may take the job over.
    pub job_lease_s: u64,
}

impl Default for DatabaseConfig {
    fn default() -> Self {
        DatabaseConfig { url: String::new(), job_lease_s: 300 }
    }
}

/// The storage SOP class of the report. Its content is the same in both: it has no 3D
/// coordinates, which only Comprehensive 3D SR may hold.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub enum SrStorage {
    /// Comprehensive 3D SR, the class IHE AI Results (AIR) uses for AI reports.
    #[serde(rename = "comprehensive-3d")]
    Comprehensive3d,
    /// Comprehensive SR, for PACS that predate Comprehensive 3D SR and refuse it.
    #[serde(rename = "comprehensive")]
    Comprehensive,
}

impl SrStorage {
    pub fn sop_class_uid(self) -> &'static str {
        match self {
            SrStorage::Comprehensive3d => dicom_dictionary_std::uids::COMPREHENSIVE3_DSR_STORAGE,
            SrStorage::Comprehensive => dicom_dictionary_std::uids::COMPREHENSIVE_SR_STORAGE,
        }
    }
}

#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct OutputsConfig {
    pub secondary_capture: bool,
    pub sr_storage: SrStorage,
    /// Longest wait between two delivery attempts of one object, seconds.
    pub max_retry_interval_s: u64,
}

impl Default for OutputsConfig {
    fn default() -> Self {
        OutputsConfig { secondary_capture: true, sr_storage: SrStorage::Comprehensive3d, max_retry_interval_s: 300 }
    }
}

#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct HttpConfig {
    pub enabled: bool,
    pub bind_address: String,
    pub port: u16,
    /// Bearer token the findings API (/api/v1) asks for; required when bound beyond loopback,
    /// where the API would otherwise hand patient data and reviews to anyone on the network.
    pub api_token: String,
    /// Connections served at once; more are closed as they arrive.
    pub max_connections: usize,
    /// Seconds a client has to send a request's headers (a slow sender holds a connection).
    pub header_timeout_s: u64,
    /// Seconds a connection may stay open, its requests, bodies and responses included.
    pub connection_timeout_s: u64,
}

impl Default for HttpConfig {
    fn default() -> Self {
        HttpConfig {
            enabled: true,
            bind_address: "127.0.0.1".into(),
            port: 8104,
            api_token: String::new(),
            max_connections: 64,
            header_timeout_s: 10,
            connection_timeout_s: 300,
        }
    }
}

#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct ModelConfig {
    pub weights: String,
    pub device: String,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct LoggingConfig {
    pub level: String,
    pub format: String,
}

/// A DICOM node (or a folder) that receives the agent's results.
#[derive(Debug, Clone, Default, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct Destination {
    pub name: String,
    pub ae_title: String,
    pub host: String,
    pub port: u16,
    /// A folder instead of a DICOM peer: objects are copied into `<path>/<series UID>/`.
    pub path: String,
    /// DICOM over TLS to this peer: `tls_ca` (PEM) is what its certificate must chain to, and
    /// `tls_certificate` / `tls_private_key` our own, for a peer that asks for one.
    pub tls: bool,
    pub tls_ca: String,
    pub tls_certificate: String,
    pub tls_private_key: String,
}

impl Default for DicomConfig {
    fn default() -> Self {
        DicomConfig {
            ae_title: "IDAICS".into(),
            bind_address: "0.0.0.0".into(),
            port: 11112,
            require_called_ae_title: true,
            allowed_calling_ae_titles: Vec::new(),
            allowed_peers: Vec::new(),
            allow_any_peer: false,
            other_sop_classes: OtherSopClassPolicy::Discard,
            tls_port: 0,
            tls_certificate: String::new(),
            tls_private_key: String::new(),
            tls_client_ca: String::new(),
        }
    }
}

impl Default for LimitsConfig {
    fn default() -> Self {
        LimitsConfig {
            max_associations: 16,
            max_associations_per_peer: 8,
            max_pdu_length: 131_072,
            association_timeout_s: 30,
            idle_timeout_s: 120,
            write_timeout_s: 60,
            max_job_s: 1800,
            max_instance_size_mb: 2048,
            max_inflated_size_mb: 256,
            max_value_size_kb: 1024,
            min_free_disk_mb: 2048,
            shutdown_grace_s: 30,
        }
    }
}

impl Default for SeriesConfig {
    fn default() -> Self {
        SeriesConfig {
            quiet_period_s: 10,
            max_wait_s: 900,
            complete_on_release: true,
            min_slices: 2,
            spacing_tolerance: 0.2,
            max_tilt_degrees: 30.0,
            max_volume_mb: 4096,
            orientations: vec!["axial".into()],
            include_descriptions: Vec::new(),
            exclude_descriptions: Vec::new(),
        }
    }
}

impl Default for StorageConfig {
    fn default() -> Self {
        StorageConfig {
            state_dir: PathBuf::from("/var/lib/idaics"),
            fsync: true,
            verify_compressed_pixel_data: true,
            host_name: String::new(),
            retention_days: 7.0,
        }
    }
}

impl Default for ModelConfig {
    fn default() -> Self {
        ModelConfig { weights: String::new(), device: "auto".into() }
    }
}

impl Default for LoggingConfig {
    fn default() -> Self {
        LoggingConfig { level: "info".into(), format: "text".into() }
    }
}

impl LimitsConfig {
    pub fn association_timeout(&self) -> Duration {
        Duration::from_secs(self.association_timeout_s)
    }
    pub fn idle_timeout(&self) -> Duration {
        Duration::from_secs(self.idle_timeout_s)
    }
    pub fn write_timeout(&self) -> Duration {
        Duration::from_secs(self.write_timeout_s)
    }
    pub fn max_instance_bytes(&self) -> u64 {
        self.max_instance_size_mb.saturating_mul(1024 * 1024)
    }
    pub fn max_inflated_bytes(&self) -> u64 {
        self.max_inflated_size_mb.saturating_mul(1024 * 1024)
    }
    pub fn max_value_bytes(&self) -> u32 {
        self.max_value_size_kb.saturating_mul(1024)
    }
    pub fn min_free_disk_bytes(&self) -> u64 {
        self.min_free_disk_mb.saturating_mul(1024 * 1024)
    }
}

impl SeriesConfig {
    pub fn quiet_period(&self) -> Duration {
        Duration::from_secs(self.quiet_period_s)
    }
    pub fn max_wait(&self) -> Duration {
        Duration::from_secs(self.max_wait_s)
    }
}

impl StorageConfig {
    pub fn spool_dir(&self) -> PathBuf {
        self.state_dir.join("spool")
    }
    /// Instances being received, per host: agents on several hosts may share a state directory,
    /// and each removes what its own last run left at start, never another's files in flight.
    pub fn tmp_dir(&self) -> PathBuf {
        let host = self.effective_host_name();
        // A folder name, whatever the kernel says: never the state directory itself.
        let host = if host.is_empty() || host == "." || host == ".." || host.contains('/') { "_".into() } else { host };
        self.state_dir.join("tmp").join(host)
    }

    /// The configured host name, else the kernel's.
    pub fn effective_host_name(&self) -> String {
        if self.host_name.is_empty() { crate::common::hostname() } else { self.host_name.clone() }
    }
}

impl DatabaseConfig {
    /// The configured URL, or the embedded SQLite file in the state directory.
    pub fn effective_url(&self, state_dir: &Path) -> String {
        if self.url.is_empty() {
            format!("sqlite://{}", state_dir.join("idaics.db").display())
        } else {
            self.url.clone()
        }
    }
}

/// An allow-list entry for peer addresses: one address or a CIDR block.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct PeerRule {
    network: IpAddr,
    prefix_len: u8,
}

impl PeerRule {
    pub fn parse(text: &str) -> Result<PeerRule, String> {
        let (addr, prefix) = match text.split_once('/') {
            Some((a, p)) => (a, Some(p)),
            None => (text, None),
        };
        let network: IpAddr =
            addr.trim().parse().map_err(|_| format!("{text:?} is not an IP address or CIDR block"))?;
        let max = if network.is_ipv4() { 32 } else { 128 };
        let prefix_len = match prefix {
            None => max,
            Some(p) => p
                .trim()
                .parse::<u8>()
                .ok()
                .filter(|p| *p <= max)
                .ok_or_else(|| format!("{text:?}: prefix length must be 0 to {max}"))?,
        };
        Ok(PeerRule { network, prefix_len })
    }

    pub fn matches(&self, peer: IpAddr) -> bool {
        let peer = match (self.network, peer) {
            (IpAddr::V4(_), IpAddr::V6(v6)) => match v6.to_ipv4_mapped() {
                Some(v4) => IpAddr::V4(v4),
                None => return false,
            },
            _ => peer,
        };
        match (self.network, peer) {
            (IpAddr::V4(net), IpAddr::V4(p)) => {
                let mask = u32::MAX.checked_shl(32 - u32::from(self.prefix_len)).unwrap_or(0);
                u32::from(net) & mask == u32::from(p) & mask
            }
            (IpAddr::V6(net), IpAddr::V6(p)) => {
                let mask = u128::MAX.checked_shl(128 - u32::from(self.prefix_len)).unwrap_or(0);
                u128::from(net) & mask == u128::from(p) & mask
            }
            _ => false,
        }
    }
}

/// An AE title is 1 to 16 characters of the DICOM default repertoire, without backslash or
/// control characters, and not only spaces (PS3.5 table 6.2-1, VR AE).
pub fn check_ae_title(title: &str) -> Result<(), String> {
    if title.trim().is_empty() {
        return Err("must not be empty".into());
    }
    if title.len() > 16 {
        return Err(format!("{title:?} is {} characters long; at most 16", title.len()));
    }
    if let Some(c) = title.chars().find(|c| !c.is_ascii() || c.is_ascii_control() || *c == '\\') {
        return Err(format!("{title:?} contains {c:?}, not allowed in an AE title"));
    }
    Ok(())
}

/// Where an installed binary finds its configuration when none is named: the package puts the
/// binary in /usr/bin and the configuration in /etc/idaics, so that `idaics findings` on the
/// server reads the database the service writes to, not an empty default of its own. Under
/// another prefix (/usr/local/bin, /opt/idaics/bin) it is <prefix>/etc/idaics/idaics.toml. A
/// binary in a build tree (cargo, the tests) has none.
pub fn installed_config_path(exe: &Path) -> Option<PathBuf> {
    let bin = exe.parent()?;
    if bin.file_name()? != "bin" {
        return None;
    }
    let prefix = bin.parent()?;
    let etc = if prefix == Path::new("/usr") { PathBuf::from("/etc") } else { prefix.join("etc") };
    Some(etc.join("idaics").join("idaics.toml"))
}

impl Config {
    /// Reads a file, applies the process environment's overrides and validates.
    pub fn load(path: Option<&Path>) -> Result<Config, ConfigError> {
        let env: Vec<(String, String)> = std::env::vars().collect();
        Self::load_with_env(path, &env)
    }

    pub fn load_with_env(path: Option<&Path>, env: &[(String, String)]) -> Result<Config, ConfigError> {
        let (mut config, source_name) = match path {
            Some(path) => {
                let text = std::fs::read_to_string(path)
                    .map_err(|source| ConfigError::Read { path: path.to_path_buf(), source })?;
                (Self::parse(&text, &path.display().to_string())?, path.display().to_string())
            }
            None => (Config::default(), "built-in defaults".to_string()),
        };
        config.apply_env(env)?;
        config.validate(&source_name)?;
        Ok(config)
    }

    /// Parses TOML text; errors carry the line and column of the offending key.
    pub fn parse(text: &str, source_name: &str) -> Result<Config, ConfigError> {
        toml::from_str(text)
            .map_err(|e| ConfigError::Parse { path: source_name.to_string(), message: describe_toml_error(text, &e) })
    }

    /// Applies `IDAICS_<SECTION>_<KEY>=value` overrides. Values are read as TOML when they parse
    /// as a TOML value (numbers, booleans, arrays), else as a plain string; a comma-separated
    /// value sets a list.
    pub fn apply_env(&mut self, env: &[(String, String)]) -> Result<(), ConfigError> {
        let mut tree = toml::Value::try_from(&*self)
            .map_err(|e| ConfigError::Env { var: String::new(), message: e.to_string() })?;
        let mut changed = false;
        for (var, raw) in env {
            let Some(rest) = var.strip_prefix(ENV_PREFIX) else { continue };
            let rest = rest.to_ascii_lowercase();
            let table = tree.as_table_mut().expect("a config serialises to a table");
            let Some((section, key)) = table.iter().filter(|(_, v)| v.is_table()).find_map(|(section, _)| {
                rest.strip_prefix(&format!("{section}_")).map(|k| (section.clone(), k.to_string()))
            }) else {
                continue;
            };
            let section_table = table[&section].as_table_mut().expect("checked above");
            let Some(current) = section_table.get(&key) else {
                return Err(ConfigError::Env {
                    var: var.clone(),
                    message: format!("no key {key:?} in section [{section}]"),
                });
            };
            let value = env_value(raw, current);
            section_table.insert(key, value);
            changed = true;
        }
        if changed {
            *self = tree.try_into().map_err(|e: toml::de::Error| ConfigError::Env {
                var: "IDAICS_*".into(),
                message: e.message().to_string(),
            })?;
        }
        Ok(())
    }

    /// Checks every value that the types alone cannot, reporting all problems at once.
    pub fn validate(&self, source_name: &str) -> Result<(), ConfigError> {
        let mut problems = Vec::new();
        let mut check = |key: &str, result: Result<(), String>| {
            if let Err(message) = result {
                problems.push(format!("{key}: {message}"));
            }
        };
        check("dicom.ae_title", check_ae_title(&self.dicom.ae_title));
        if self.dicom.tls_port != 0 {
            check(
                "dicom.tls_port",
                if self.dicom.tls_port == self.dicom.port { Err("the same as dicom.port".into()) } else { Ok(()) },
            );
            for (key, value) in [
                ("dicom.tls_certificate", &self.dicom.tls_certificate),
                ("dicom.tls_private_key", &self.dicom.tls_private_key),
            ] {
                check(key, if value.is_empty() { Err("required with dicom.tls_port".into()) } else { Ok(()) });
            }
        }
        check(
            "http.bind_address",
            self.http.bind_address.parse::<std::net::IpAddr>().map(|_| ()).map_err(|_| "not an IP address".into()),
        );
        let beyond_loopback = self.http.bind_address.parse::<std::net::IpAddr>().is_ok_and(|a| !a.is_loopback());
        check(
            "http.api_token",
            if self.http.enabled && beyond_loopback && self.http.api_token.is_empty() {
                Err(format!(
                    "required when http.bind_address ({}) is not a loopback address: the findings API \
                     would be open to the network",
                    self.http.bind_address
                ))
            } else if !self.http.api_token.is_empty() && self.http.api_token.len() < 16 {
                Err("shorter than 16 characters".into())
            } else {
                Ok(())
            },
        );
        check(
            "dicom.bind_address",
            self.dicom
                .bind_address
                .parse::<IpAddr>()
                .map(|_| ())
                .map_err(|_| format!("{:?} is not an IP address", self.dicom.bind_address)),
        );
        for (i, title) in self.dicom.allowed_calling_ae_titles.iter().enumerate() {
            check(&format!("dicom.allowed_calling_ae_titles[{i}]"), check_ae_title(title));
        }
        for (i, peer) in self.dicom.allowed_peers.iter().enumerate() {
            check(&format!("dicom.allowed_peers[{i}]"), PeerRule::parse(peer).map(|_| ()));
        }
        let positive = |v: u64| if v == 0 { Err("must be greater than 0".to_string()) } else { Ok(()) };
        check("outputs.max_retry_interval_s", positive(self.outputs.max_retry_interval_s));
        check("http.max_connections", positive(self.http.max_connections as u64));
        check("http.header_timeout_s", positive(self.http.header_timeout_s));
        check("http.connection_timeout_s", positive(self.http.connection_timeout_s));
        let host_name = &self.storage.host_name;
        check(
            "storage.host_name",
            if host_name.len() <= 64
                && host_name.chars().all(|c| c.is_ascii_alphanumeric() || matches!(c, '-' | '.' | '_'))
                && !matches!(host_name.as_str(), "." | "..")
            {
                Ok(())
            } else {
                Err(format!("{host_name:?}: at most 64 letters, digits, '-', '.' or '_'"))
            },
        );
        check(
            "storage.retention_days",
            if self.storage.retention_days.is_finite() && self.storage.retention_days >= 0.0 {
                Ok(())
            } else {
                Err(format!("{} is not a number of days (0 keeps everything)", self.storage.retention_days))
            },
        );
        check(
            "database.job_lease_s",
            if self.database.job_lease_s >= 10 {
                Ok(())
            } else {
                Err(format!("{} s is too short to renew a claim in time; at least 10", self.database.job_lease_s))
            },
        );
        check("limits.max_associations", positive(self.limits.max_associations as u64));
        check(
            "limits.max_pdu_length",
            if (4096..=131_072).contains(&self.limits.max_pdu_length) {
                Ok(())
            } else {
                Err(format!("{} is outside 4096 to 131072 bytes", self.limits.max_pdu_length))
            },
        );
        check("limits.association_timeout_s", positive(self.limits.association_timeout_s));
        check("limits.idle_timeout_s", positive(self.limits.idle_timeout_s));
        check("limits.write_timeout_s", positive(self.limits.write_timeout_s));
        check("limits.max_job_s", positive(self.limits.max_job_s));
        check("limits.max_instance_size_mb", positive(self.limits.max_instance_size_mb));
        check("limits.max_inflated_size_mb", positive(self.limits.max_inflated_size_mb));
        check(
            "limits.max_value_size_kb",
            if (1..=1024 * 1024).contains(&self.limits.max_value_size_kb) {
                Ok(())
            } else {
                Err(format!("{} is outside 1 to 1048576 KiB", self.limits.max_value_size_kb))
            },
        );
        // Above limits.max_associations it changes nothing: one peer may then take every slot.
        check("limits.max_associations_per_peer", positive(self.limits.max_associations_per_peer as u64));
        check("series.quiet_period_s", positive(self.series.quiet_period_s));
        check(
            "series.max_wait_s",
            if self.series.max_wait_s < self.series.quiet_period_s {
                Err(format!(
                    "{} s is shorter than series.quiet_period_s ({} s)",
                    self.series.max_wait_s, self.series.quiet_period_s
                ))
            } else {
                Ok(())
            },
        );
        check("series.min_slices", positive(self.series.min_slices as u64));
        check(
            "series.spacing_tolerance",
            if self.series.spacing_tolerance > 0.0 && self.series.spacing_tolerance < 1.0 {
                Ok(())
            } else {
                Err("must be between 0 and 1 (a fraction of the slice spacing)".into())
            },
        );
        check(
            "series.max_tilt_degrees",
            if (0.0..45.0).contains(&self.series.max_tilt_degrees) {
                Ok(())
            } else {
                Err("must be between 0 and 45".into())
            },
        );
        check("series.max_volume_mb", positive(self.series.max_volume_mb));
        check(
            "series.orientations",
            if self.series.orientations.is_empty() {
                Err(format!("must name at least one of {}", STACK_ORIENTATIONS.join(", ")))
            } else {
                match self.series.orientations.iter().find(|o| !STACK_ORIENTATIONS.contains(&o.as_str())) {
                    Some(o) => Err(format!("{o:?}: expected {}", STACK_ORIENTATIONS.join(", "))),
                    None => Ok(()),
                }
            },
        );
        for key in ["include_descriptions", "exclude_descriptions"] {
            let patterns = if key == "include_descriptions" {
                &self.series.include_descriptions
            } else {
                &self.series.exclude_descriptions
            };
            for (i, pattern) in patterns.iter().enumerate() {
                check(
                    &format!("series.{key}[{i}]"),
                    if pattern.trim().is_empty() {
                        Err("must not be empty (it would match every series)".into())
                    } else {
                        Ok(())
                    },
                );
            }
        }
        check(
            "storage.state_dir",
            if self.storage.state_dir.as_os_str().is_empty() { Err("must not be empty".into()) } else { Ok(()) },
        );
        check(
            "database.url",
            if self.database.url.is_empty()
                || ["sqlite:", "postgres:", "postgresql:"].iter().any(|s| self.database.url.starts_with(s))
            {
                Ok(())
            } else {
                Err("must start with sqlite:, postgres: or postgresql: (or be empty for the embedded database)".into())
            },
        );
        check(
            "model.device",
            match self.model.device.as_str() {
                "auto" | "cpu" => Ok(()),
                d if d.strip_prefix("cuda:").is_some_and(|n| n.parse::<u32>().is_ok()) => Ok(()),
                d => Err(format!("{d:?}: expected auto, cpu or cuda:N")),
            },
        );
        check(
            "logging.format",
            match self.logging.format.as_str() {
                "text" | "json" => Ok(()),
                f => Err(format!("{f:?}: expected text or json")),
            },
        );
        check(
            "logging.level",
            tracing_subscriber::EnvFilter::try_new(&self.logging.level)
                .map(|_| ())
                .map_err(|e| format!("{:?}: {e}", self.logging.level)),
        );
        for (i, d) in self.destinations.iter().enumerate() {
            if !d.path.is_empty() {
                // A relative folder would be taken from the service's working directory (/ under
                // systemd), wherever the administrator meant it.
                check(
                    &format!("destinations[{i}].path"),
                    if Path::new(&d.path).is_absolute() {
                        Ok(())
                    } else {
                        Err(format!("{:?} is relative: give an absolute path", d.path))
                    },
                );
                continue;
            }
            check(&format!("destinations[{i}].ae_title"), check_ae_title(&d.ae_title));
            check(
                &format!("destinations[{i}].host"),
                if d.host.trim().is_empty() { Err("must not be empty".into()) } else { Ok(()) },
            );
            check(&format!("destinations[{i}].port"), positive(u64::from(d.port)));
            if d.tls {
                check(
                    &format!("destinations[{i}].tls_ca"),
                    if d.tls_ca.is_empty() { Err("required with tls = true".into()) } else { Ok(()) },
                );
                check(
                    &format!("destinations[{i}].tls_private_key"),
                    if d.tls_certificate.is_empty() != d.tls_private_key.is_empty() {
                        Err("tls_certificate and tls_private_key go together".into())
                    } else {
                        Ok(())
                    },
                );
            }
        }
        if problems.is_empty() {
            Ok(())
        } else {
            Err(ConfigError::Invalid { source_name: source_name.to_string(), problems })
        }
    }

    /// Peer allow-list as parsed rules; valid once [`Config::validate`] passed.
    pub fn peer_rules(&self) -> Vec<PeerRule> {
        self.dicom.allowed_peers.iter().filter_map(|p| PeerRule::parse(p).ok()).collect()
    }
}

fn env_value(raw: &str, current: &toml::Value) -> toml::Value {
    match current {
        toml::Value::String(_) => toml::Value::String(raw.to_string()),
        toml::Value::Array(_) => toml::Value::Array(
            raw.split(',')
                .map(str::trim)
                .filter(|s| !s.is_empty())
                .map(|s| toml::Value::String(s.to_string()))
                .collect(),
        ),
        _ => format!("v = {raw}")
            .parse::<toml::Table>()
            .ok()
            .and_then(|mut t| t.remove("v"))
            .unwrap_or_else(|| toml::Value::String(raw.to_string())),
    }
}

fn describe_toml_error(text: &str, error: &toml::de::Error) -> String {
    match error.span() {
        Some(span) => {
            let line = text[..span.start.min(text.len())].matches('\n').count() + 1;
            format!("line {line}: {}", error.message())
        }
        None => error.message().to_string(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_api_beyond_loopback_needs_a_token() {
        let mut config = Config::default();
        config.http.bind_address = "0.0.0.0".into();
        let error = config.validate("test").unwrap_err().to_string();
        assert!(error.contains("http.api_token: required when http.bind_address (0.0.0.0)"), "{error}");
        config.http.api_token = "short".into();
        assert!(config.validate("test").unwrap_err().to_string().contains("shorter than 16"));
        config.http.api_token = "0123456789abcdef0123".into();
        config.validate("test").unwrap();
        config.http.bind_address = "::1".into();
        config.http.api_token.clear();
        config.validate("test").unwrap();
    }

    #[test]
    fn an_installed_binary_reads_the_configuration_beside_its_prefix() {
        let path = |exe: &str| installed_config_path(Path::new(exe));
        assert_eq!(path("/usr/bin/idaics"), Some(PathBuf::from("/etc/idaics/idaics.toml")));
        assert_eq!(path("/usr/local/bin/idaics"), Some(PathBuf::from("/usr/local/etc/idaics/idaics.toml")));
        assert_eq!(path("/opt/idaics/bin/idaics"), Some(PathBuf::from("/opt/idaics/etc/idaics/idaics.toml")));
        assert_eq!(path("/work/main/target/debug/idaics"), None);
        assert_eq!(path("/work/main/target/debug/deps/idaics-0123"), None);
    }

    #[test]
    fn shipped_config_is_valid_and_documents_every_key() {
        let text = include_str!("../conf/idaics.toml");
        let config = Config::parse(text, "conf/idaics.toml").unwrap();
        config.validate("conf/idaics.toml").unwrap();
        // Every key of the defaults appears in the shipped file (commented out or set).
        let defaults = toml::Value::try_from(Config::default()).unwrap();
        for (section, value) in defaults.as_table().unwrap() {
            if let Some(table) = value.as_table() {
                for key in table.keys() {
                    assert!(
                        text.contains(&format!("\n{key} =")) || text.contains(&format!("\n# {key} =")),
                        "conf/idaics.toml does not document {section}.{key}"
                    );
                }
            }
        }
    }

    #[test]
    fn unknown_key_is_reported_with_its_line() {
        let err = Config::parse("[dicom]\nport = 104\nae_tittle = \"X\"\n", "f.toml").unwrap_err();
        let msg = err.to_string();
        assert!(msg.contains("line 3") && msg.contains("ae_tittle"), "{msg}");
    }

    #[test]
    fn all_problems_are_reported_together() {
        let mut c = Config::default();
        c.dicom.ae_title = "A_TITLE_THAT_IS_TOO_LONG".into();
        c.limits.max_associations = 0;
        c.dicom.allowed_peers = vec!["10.0.0.0/40".into()];
        let msg = c.validate("x").unwrap_err().to_string();
        assert!(msg.contains("dicom.ae_title"), "{msg}");
        assert!(msg.contains("limits.max_associations"), "{msg}");
        assert!(msg.contains("dicom.allowed_peers[0]"), "{msg}");
    }

    #[test]
    fn environment_overrides_keys() {
        let mut c = Config::default();
        let env = vec![
            ("IDAICS_DICOM_PORT".to_string(), "4242".to_string()),
            ("IDAICS_DICOM_AE_TITLE".to_string(), "SPINE".to_string()),
            ("IDAICS_DICOM_ALLOWED_CALLING_AE_TITLES".to_string(), "PACS, CT1".to_string()),
            ("IDAICS_STORAGE_FSYNC".to_string(), "false".to_string()),
            ("UNRELATED".to_string(), "1".to_string()),
        ];
        c.apply_env(&env).unwrap();
        assert_eq!(c.dicom.port, 4242);
        assert_eq!(c.dicom.ae_title, "SPINE");
        assert_eq!(c.dicom.allowed_calling_ae_titles, vec!["PACS", "CT1"]);
        assert!(!c.storage.fsync);
        let bad = vec![("IDAICS_DICOM_PROT".to_string(), "1".to_string())];
        assert!(c.apply_env(&bad).unwrap_err().to_string().contains("IDAICS_DICOM_PROT"));
        let bad_value = vec![("IDAICS_DICOM_PORT".to_string(), "many".to_string())];
        assert!(c.apply_env(&bad_value).is_err());
    }

    #[test]
    fn peer_rules_match_addresses_and_blocks() {
        let r = PeerRule::parse("10.1.0.0/16").unwrap();
        assert!(r.matches("10.1.200.3".parse().unwrap()));
        assert!(!r.matches("10.2.0.1".parse().unwrap()));
        assert!(r.matches("::ffff:10.1.0.9".parse().unwrap()));
        let one = PeerRule::parse("127.0.0.1").unwrap();
        assert!(one.matches("127.0.0.1".parse().unwrap()));
        assert!(!one.matches("127.0.0.2".parse().unwrap()));
        assert!(PeerRule::parse("0.0.0.0/0").unwrap().matches("8.8.8.8".parse().unwrap()));
        assert!(PeerRule::parse("nonsense").is_err());
    }
}
