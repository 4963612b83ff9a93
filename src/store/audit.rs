//! The audit trail, in the spirit of IHE ATNA: security-relevant events as structured journal
//! lines (target `idaics::store::audit`) and as rows of the finding log's `audit_events` table, written
//! through the same writer as everything else (journalled while the database is down). Events:
//! an association accepted or refused (with peer, AE titles, and whether over TLS), a TLS
//! handshake that failed, what an association stored, each object exported to a destination, and
//! each reload of the configuration. Refusals beyond the rate at which they are logged (a flood)
//! are counted in the metrics, not audited one by one.

use std::sync::atomic::{AtomicU64, Ordering};

use tokio::sync::mpsc::UnboundedSender;

use crate::store::db::{AuditRow, Record};

/// Where audit events go; cheap to share.
#[derive(Debug)]
pub struct Audit {
    agent: String,
    records: Option<UnboundedSender<Record>>,
    next: AtomicU64,
}

/// Who an event concerns, on the network.
#[derive(Debug, Default, Clone, Copy)]
pub struct Party<'a> {
    pub peer: Option<&'a str>,
    pub calling_ae: Option<&'a str>,
    pub called_ae: Option<&'a str>,
}

impl Audit {
    /// `agent` names this agent in every row (host, process, start), as association rows do.
    pub fn new(agent: String, records: Option<UnboundedSender<Record>>) -> Audit {
        Audit { agent, records, next: AtomicU64::new(1) }
    }

    /// Logs the event and sends its row to the finding log's writer.
    pub fn record(&self, event: &'static str, party: Party<'_>, detail: &str) {
        let row = self.entry(event, party, detail);
        if let Some(records) = &self.records {
            let _ = records.send(Record::Audit(row));
        }
    }

    /// Logs the event and returns its row, for a caller that writes it itself: one that must not
    /// hold the writer's channel open (the destination senders outlive the writer at shutdown).
    pub fn entry(&self, event: &'static str, party: Party<'_>, detail: &str) -> AuditRow {
        tracing::info!(
            target: "idaics::store::audit",
            event,
            peer = party.peer.unwrap_or(""),
            calling_ae = party.calling_ae.unwrap_or(""),
            called_ae = party.called_ae.unwrap_or(""),
            detail,
            "audit"
        );
        AuditRow {
            event_key: format!("{}/{}", self.agent, self.next.fetch_add(1, Ordering::Relaxed)),
            at: crate::store::db::now(),
            agent: self.agent.clone(),
            event: event.to_string(),
            peer: party.peer.map(str::to_string),
            calling_ae: party.calling_ae.map(str::to_string),
            called_ae: party.called_ae.map(str::to_string),
            detail: (!detail.is_empty()).then(|| detail.to_string()),
        }
    }
}
