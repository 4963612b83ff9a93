//! Small helpers every stage may use, so that no stage imports another for them: UTC time stamps,
//! the agent's DICOM identity, the host name, redaction and error chains.

/// UTC time as RFC 3339 with seconds, as the finding log's tables hold it.
pub fn now_rfc3339() -> String {
    rfc3339_before(std::time::SystemTime::now(), std::time::Duration::ZERO)
}

/// ISO 8601 UTC of `age` before `time`: the cut-offs of leases and retention.
pub fn rfc3339_before(time: std::time::SystemTime, age: std::time::Duration) -> String {
    let then = time.checked_sub(age).unwrap_or(std::time::UNIX_EPOCH);
    rfc3339_at(then.duration_since(std::time::UNIX_EPOCH).map(|d| d.as_secs()).unwrap_or(0))
}

/// ISO 8601 UTC of a Unix time in seconds (`YYYY-MM-DDTHH:MM:SSZ`).
pub fn rfc3339_at(secs: u64) -> String {
    let time = chrono::DateTime::from_timestamp(i64::try_from(secs).unwrap_or(i64::MAX), 0).unwrap_or_default();
    time.to_rfc3339_opts(chrono::SecondsFormat::Secs, true)
}

/// This machine's host name; empty when the kernel does not say.
pub fn hostname() -> String {
    std::fs::read_to_string("/proc/sys/kernel/hostname").map(|h| h.trim().to_string()).unwrap_or_default()
}

/// An error with the chain of its causes: dicom-ul's top-level errors ("failed to receive pdu")
/// leave out what an administrator needs (that the peer spoke HTTP, or sent an invalid PDU type).
pub fn with_causes(error: &dyn std::error::Error) -> String {
    let mut text = error.to_string();
    let mut cause = error.source();
    while let Some(inner) = cause {
        text.push_str(": ");
        text.push_str(&inner.to_string());
        cause = inner.source();
    }
    text
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

/// Strips the padding DICOM allows at the end of UI values (NUL, and the space some peers use).
pub fn trim_uid(uid: &str) -> &str {
    uid.trim_end_matches(['\0', ' '])
}

/// Manufacturer (0008,0070) of every object the agent makes. The tracker knows its own objects by
/// it when a PACS routes them back (see `ingest::series::assess`).
pub const MANUFACTURER: &str = "IDAICS";

/// Implementation Class UID written in the file meta of spooled files (a 2.25 UUID-derived root).
pub const IMPLEMENTATION_CLASS_UID: &str = "2.25.190116135946232479478412063364591935811";
pub const IMPLEMENTATION_VERSION_NAME: &str = concat!("IDAICS_", env!("CARGO_PKG_VERSION"));

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn rfc3339_looks_right() {
        let t = now_rfc3339();
        assert_eq!(t.len(), 20);
        assert!(t.starts_with("20") && t.ends_with('Z'));
        // Known instants, a leap day and the turn of a century among them, and back again.
        for (secs, text) in [
            (0, "1970-01-01T00:00:00Z"),
            (951_782_400, "2000-02-29T00:00:00Z"),
            (1_709_251_199, "2024-02-29T23:59:59Z"),
            (4_102_444_800, "2100-01-01T00:00:00Z"),
        ] {
            assert_eq!(rfc3339_at(secs), text);
            let parsed = chrono::DateTime::parse_from_rfc3339(text).unwrap();
            assert_eq!(parsed.timestamp(), secs as i64);
        }
        let hour_ago = rfc3339_before(
            std::time::UNIX_EPOCH + std::time::Duration::from_secs(7200),
            std::time::Duration::from_secs(3600),
        );
        assert_eq!(hour_ago, "1970-01-01T01:00:00Z");
    }

    #[test]
    fn passwords_are_redacted() {
        assert_eq!(redact_url("postgres://idaics:s3cret@db:5432/idaics"), "postgres://idaics:***@db:5432/idaics");
        assert_eq!(redact_url("sqlite:///var/lib/idaics/idaics.db"), "sqlite:///var/lib/idaics/idaics.db");
    }
}
