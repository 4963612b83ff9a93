//! The DICOM storage SCP: one tokio task per association on dicom-ul's async API.
//!
//! Verification and CT / Enhanced CT storage; other storage SOP classes are refused at
//! negotiation or accepted and discarded, as configured. Each instance is streamed into the spool
//! fragment by fragment (memory per association is bounded by the PDU size), made durable, checked,
//! and only then answered with Success. Every failure maps to a DIMSE status and a log line.

mod storage_sop_classes;
pub mod transfer_syntaxes;

use crate::common::{trim_uid, with_causes};
use std::collections::HashMap;
use std::net::{IpAddr, SocketAddr};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use dicom_dictionary_std::uids;
use dicom_ul::Pdu;
use dicom_ul::association::server::{AccessControl, ServerAssociationOptions};
use dicom_ul::association::{Association, AsyncServerAssociation};
use dicom_ul::pdu::{
    AssociationRJ, AssociationRJResult, AssociationRJServiceProviderPresentationReason, AssociationRJServiceUserReason,
    AssociationRJSource, PDataValue, PDataValueType, PresentationContextNegotiated, PresentationContextResultReason,
    UserIdentity,
};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::{Semaphore, mpsc, watch};
use tokio::task::JoinSet;
use tracing::{Instrument, field};

use crate::config::{Config, OtherSopClassPolicy, PeerRule};
use crate::dimse::{self, status};
use crate::ingest::series::{AssociationId, TrackerEvent};
use crate::ingest::spool::{self, PartialInstance, Spool, SpoolError, StoreRequest};

pub use storage_sop_classes::STORAGE_SOP_CLASSES;

/// The storage SOP classes this agent analyses. Legacy Converted Enhanced CT is what archives
/// and converters make of a classic single-frame series (PS3.3 A.70): the same functional groups
/// as Enhanced CT, read the same way; under the default discard policy it would otherwise be
/// acknowledged and never analysed.
pub const CT_SOP_CLASSES: &[&str] =
    &[uids::CT_IMAGE_STORAGE, uids::ENHANCED_CT_IMAGE_STORAGE, uids::LEGACY_CONVERTED_ENHANCED_CT_IMAGE_STORAGE];

/// What an association runs over: plain TCP or TLS.
pub trait Transport: tokio::io::AsyncRead + tokio::io::AsyncWrite + Unpin + Send {}
impl<S: tokio::io::AsyncRead + tokio::io::AsyncWrite + Unpin + Send> Transport for S {}

/// Counters for logs now and the metrics endpoint later.
#[derive(Debug, Default)]
pub struct ScpStats {
    pub associations_accepted: AtomicU64,
    pub associations_rejected: AtomicU64,
    /// Rejections neither logged nor recorded, beyond the rate at which they are.
    pub rejections_unreported: AtomicU64,
    pub instances_stored: AtomicU64,
    pub bytes_stored: AtomicU64,
    pub instances_discarded: AtomicU64,
    pub store_failures: AtomicU64,
}

/// What an association task needs, shared by all of them.
pub struct ScpContext {
    pub config: Arc<Config>,
    pub spool: Arc<Spool>,
    pub tracker: mpsc::UnboundedSender<TrackerEvent>,
    pub stats: Arc<ScpStats>,
    /// Where each association's record goes (the finding log's writer), when one is attached.
    pub records: Option<mpsc::UnboundedSender<crate::store::db::Record>>,
    /// Makes association keys unique across agents sharing a database and across restarts.
    pub agent_id: String,
    /// The audit trail: who connected, refused or not, and what they stored.
    pub audit: Arc<crate::store::audit::Audit>,
    peer_rules: Vec<PeerRule>,
    next_association: AtomicU64,
    /// Associations open (or being negotiated) per peer address.
    per_peer: Mutex<HashMap<IpAddr, usize>>,
    rejections: Arc<RejectionReports>,
    /// Associations served at once, over every listener (plain and TLS).
    slots: Arc<Semaphore>,
    /// Connections being turned away (each waits up to seconds for the request it answers): as
    /// many again as there are slots; beyond that a connection is closed at once.
    refusing: Arc<Semaphore>,
}

/// How many rejected connections are logged and recorded in the finding log, per minute. A
/// scanner of the network, or a sender retrying for ever, would otherwise write a WARN line and
/// a database row for each connection; the rest are counted, and the count logged once a minute.
const REJECTIONS_REPORTED_PER_MINUTE: u32 = 30;

/// The budget of rejections reported in the current minute.
#[derive(Debug)]
struct RejectionReports {
    window: Mutex<(std::time::Instant, u32, u64)>,
    stats: Arc<ScpStats>,
}

impl RejectionReports {
    fn new(stats: Arc<ScpStats>) -> RejectionReports {
        RejectionReports { window: Mutex::new((std::time::Instant::now(), 0, 0)), stats }
    }

    /// Counts a connection closed without an answer (a flood beyond what is answered): neither
    /// logged nor recorded, and not taking the budget from those that are.
    fn count_unanswered(&self) {
        self.stats.associations_rejected.fetch_add(1, Ordering::Relaxed);
        self.stats.rejections_unreported.fetch_add(1, Ordering::Relaxed);
        let mut window = self.window.lock().unwrap_or_else(|poisoned| poisoned.into_inner());
        window.2 += 1;
    }

    /// Counts a rejection; true while this minute's budget lasts (then log and record it).
    fn report(&self) -> bool {
        self.stats.associations_rejected.fetch_add(1, Ordering::Relaxed);
        let mut window = self.window.lock().unwrap_or_else(|poisoned| poisoned.into_inner());
        let (started, _, unreported) = &mut *window;
        if started.elapsed() >= Duration::from_secs(60) {
            if *unreported > 0 {
                tracing::warn!(
                    unreported = *unreported,
                    "rejected connections in the last minute beyond those logged (see idaics_associations_total)"
                );
            }
            *window = (std::time::Instant::now(), 0, 0);
        }
        let (_, reported, unreported) = &mut *window;
        if *reported < REJECTIONS_REPORTED_PER_MINUTE {
            *reported += 1;
            true
        } else {
            *unreported += 1;
            self.stats.rejections_unreported.fetch_add(1, Ordering::Relaxed);
            false
        }
    }
}

/// A peer's claim on one of its associations; given back when dropped.
struct PeerClaim {
    ctx: Arc<ScpContext>,
    peer: IpAddr,
}

impl Drop for PeerClaim {
    fn drop(&mut self) {
        let mut per_peer = self.ctx.per_peer.lock().unwrap_or_else(|poisoned| poisoned.into_inner());
        if let Some(open) = per_peer.get_mut(&self.peer) {
            *open -= 1;
            if *open == 0 {
                per_peer.remove(&self.peer);
            }
        }
    }
}

impl ScpContext {
    pub fn new(
        config: Arc<Config>,
        spool: Arc<Spool>,
        tracker: mpsc::UnboundedSender<TrackerEvent>,
        stats: Arc<ScpStats>,
    ) -> ScpContext {
        ScpContext {
            rejections: Arc::new(RejectionReports::new(stats.clone())),
            slots: Arc::new(Semaphore::new(config.limits.max_associations)),
            refusing: Arc::new(Semaphore::new(config.limits.max_associations)),
            per_peer: Mutex::new(HashMap::new()),
            peer_rules: config.peer_rules(),
            agent_id: agent_id(&config.storage.effective_host_name()),
            audit: Arc::new(crate::store::audit::Audit::new(String::new(), None)),
            config,
            spool,
            tracker,
            stats,
            records: None,
            next_association: AtomicU64::new(1),
        }
    }

    /// Logs an association in the finding log (when attached).
    fn record_association(
        &self,
        opened: &OpenedAssociation,
        who: (&str, &str),
        tally: &Tally,
        outcome: &str,
        detail: Option<String>,
    ) {
        let Some(records) = &self.records else { return };
        let row = crate::store::db::AssociationRow {
            association_key: format!("{}/{}", self.agent_id, opened.id),
            agent: self.agent_id.clone(),
            peer: opened.peer.to_string(),
            calling_ae: who.0.to_string(),
            called_ae: who.1.to_string(),
            started_at: opened.started_at.clone(),
            ended_at: crate::store::db::now(),
            instances: tally.stored as i64,
            bytes: tally.bytes as i64,
            discarded: tally.discarded as i64,
            failed: tally.failed as i64,
            outcome: outcome.to_string(),
            detail,
        };
        let _ = records.send(crate::store::db::Record::Association(row));
    }

    fn peer_is_listed(&self, peer: IpAddr) -> bool {
        self.peer_rules.is_empty() || self.peer_rules.iter().any(|r| r.matches(peer))
    }

    /// One more association for this peer, unless it holds `limits.max_associations_per_peer`.
    fn claim_for_peer(self: &Arc<Self>, peer: IpAddr) -> Option<PeerClaim> {
        let mut per_peer = self.per_peer.lock().unwrap_or_else(|poisoned| poisoned.into_inner());
        let open = per_peer.entry(peer).or_insert(0);
        if *open >= self.config.limits.max_associations_per_peer {
            return None;
        }
        *open += 1;
        Some(PeerClaim { ctx: self.clone(), peer })
    }

    fn disk_is_low(&self) -> Option<u64> {
        let free = spool::free_disk_bytes(self.spool.spool_dir()).ok()?;
        (free < self.config.limits.min_free_disk_bytes()).then_some(free)
    }
}

/// Accepts associations until `shutdown` turns true, then gives open associations the configured
/// grace period to finish before aborting them.
/// With `tls`, every connection is DICOM over TLS (the TLS port); without, plain DICOM.
pub async fn serve(
    listener: TcpListener,
    ctx: Arc<ScpContext>,
    mut shutdown: watch::Receiver<bool>,
    heartbeat: crate::systemd::Heartbeat,
    tls: Option<Arc<rustls::ServerConfig>>,
) {
    let (slots, refusing) = (ctx.slots.clone(), ctx.refusing.clone());
    let mut associations = JoinSet::new();
    // The accept loop reports to the watchdog between connections, and every few seconds when
    // none come.
    let mut alive = tokio::time::interval(Duration::from_secs(5));
    loop {
        heartbeat.beat();
        tokio::select! {
            _ = shutdown.changed() => break,
            _ = alive.tick() => {}
            Some(_) = associations.join_next(), if !associations.is_empty() => {}
            accepted = listener.accept() => {
                let (socket, peer) = match accepted {
                    Ok(pair) => pair,
                    Err(e) => {
                        tracing::warn!(error = %e, "accept failed");
                        tokio::time::sleep(Duration::from_millis(50)).await;
                        continue;
                    }
                };
                let _ = socket.set_nodelay(true);
                let id = ctx.next_association.fetch_add(1, Ordering::Relaxed);
                let span = tracing::info_span!("association", id, peer = %peer, calling_ae = field::Empty, called_ae = field::Empty);
                let ctx = ctx.clone();
                // Who may connect is decided before a slot is taken, and a peer may hold only
                // its share of them: neither an unlisted host nor one listed host can keep the
                // others out.
                let admitted = if ctx.config.dicom.closed_until_configured().is_some() {
                    Err(Refusal::NobodyAllowedYet)
                } else if !ctx.peer_is_listed(peer.ip()) {
                    Err(Refusal::UnlistedPeer)
                } else {
                    match ctx.claim_for_peer(peer.ip()) {
                        None => Err(Refusal::PeerAtItsLimit),
                        Some(claim) => {
                            slots.clone().try_acquire_owned().map(|permit| (permit, claim)).map_err(|_| Refusal::AllSlotsTaken)
                        }
                    }
                };
                let refusal = match admitted {
                    Ok(held) => {
                        let tls = tls.clone();
                        associations.spawn(async move {
                            handle_connection(socket, peer, id, ctx, tls).await;
                            drop(held);
                        }.instrument(span));
                        continue;
                    }
                    Err(refusal) => refusal,
                };
                match refusing.clone().try_acquire_owned() {
                    Ok(permit) => {
                        associations.spawn(async move {
                            refuse(socket, peer, id, &ctx, refusal).await;
                            drop(permit);
                        }.instrument(span));
                    }
                    Err(_) => {
                        // Closed without an answer: only a flood gets here.
                        ctx.rejections.count_unanswered();
                        drop(socket);
                    }
                }
            }
        }
    }
    drop(listener);
    let open = associations.len();
    if open > 0 {
        let grace = Duration::from_secs(ctx.config.limits.shutdown_grace_s);
        tracing::info!(open, grace_s = grace.as_secs(), "shutting down: waiting for open associations");
        let drained = tokio::time::timeout(grace, async { while associations.join_next().await.is_some() {} }).await;
        if drained.is_err() {
            tracing::warn!(open = associations.len(), "grace period over: aborting open associations");
            associations.abort_all();
            while associations.join_next().await.is_some() {}
        }
    }
}

/// Why a connection is turned away before it takes a slot.
#[derive(Debug, Clone, Copy)]
enum Refusal {
    NobodyAllowedYet,
    UnlistedPeer,
    PeerAtItsLimit,
    AllSlotsTaken,
}

/// Turns a connection away with an A-ASSOCIATE-RJ, logged and recorded within the rate
/// [`REJECTIONS_REPORTED_PER_MINUTE`] allows.
async fn refuse(socket: TcpStream, peer: SocketAddr, id: AssociationId, ctx: &ScpContext, refusal: Refusal) {
    let limits = &ctx.config.limits;
    let (detail, result, source) = match refusal {
        Refusal::NobodyAllowedYet => (
            "no sender is allowed yet (dicom.allowed_peers, dicom.allowed_calling_ae_titles)".to_string(),
            AssociationRJResult::Permanent,
            AssociationRJSource::ServiceUser(AssociationRJServiceUserReason::NoReasonGiven),
        ),
        Refusal::UnlistedPeer => (
            "peer address not in the allow-list".to_string(),
            AssociationRJResult::Permanent,
            AssociationRJSource::ServiceUser(AssociationRJServiceUserReason::NoReasonGiven),
        ),
        Refusal::PeerAtItsLimit => (
            format!("this peer already holds limits.max_associations_per_peer ({})", limits.max_associations_per_peer),
            AssociationRJResult::Transient,
            AssociationRJSource::ServiceProviderPresentation(
                AssociationRJServiceProviderPresentationReason::LocalLimitExceeded,
            ),
        ),
        Refusal::AllSlotsTaken => (
            format!("limits.max_associations ({}) are open", limits.max_associations),
            AssociationRJResult::Transient,
            AssociationRJSource::ServiceProviderPresentation(
                AssociationRJServiceProviderPresentationReason::LocalLimitExceeded,
            ),
        ),
    };
    if ctx.rejections.report() {
        match refusal {
            Refusal::NobodyAllowedYet => tracing::warn!(
                "no sender is allowed yet: set dicom.allowed_peers or dicom.allowed_calling_ae_titles \
                 (or dicom.allow_any_peer = true); rejecting"
            ),
            Refusal::UnlistedPeer => tracing::warn!("peer address not in the allow-list; rejecting"),
            Refusal::PeerAtItsLimit => tracing::warn!(
                limit = limits.max_associations_per_peer,
                "too many associations from this peer; rejecting (transient)"
            ),
            Refusal::AllSlotsTaken => {
                tracing::warn!(limit = limits.max_associations, "too many associations; rejecting (transient)")
            }
        }
        let peer_text = peer.to_string();
        let party = crate::store::audit::Party { peer: Some(&peer_text), ..Default::default() };
        ctx.audit.record("association-refused", party, &detail);
        let opened = OpenedAssociation { id, peer, started_at: crate::store::db::now() };
        ctx.record_association(&opened, ("", ""), &Tally::default(), "rejected", Some(detail));
    }
    reject(socket, result, source).await;
}

/// What a connection is when its first bytes show it is not what this port serves: on the plain
/// port, a browser, a probe, or a peer configured for DICOM over TLS; on the TLS port, a peer
/// speaking plain DICOM (or anything else). dicom-ul would report these as a PDU of absurd length
/// or a failed handshake.
fn not_what_this_port_serves(first_bytes: &[u8], tls_port: bool) -> Option<String> {
    let &first = first_bytes.first()?;
    let text = String::from_utf8_lossy(first_bytes);
    let http = ["GET ", "POST", "HEAD", "PUT ", "OPTI"].iter().any(|verb| text.starts_with(verb));
    if tls_port {
        return match first {
            // A TLS handshake record.
            0x16 => None,
            0x01..=0x07 => Some("a plain DICOM association request on the TLS port (dicom.tls_port)".to_string()),
            _ if http => Some("an HTTP request".to_string()),
            _ => Some(format!("a connection that opens with byte 0x{first:02X}, which is no TLS handshake")),
        };
    }
    if (0x01..=0x07).contains(&first) {
        // A PDU type: an association request, or a protocol error dicom-ul answers with an abort.
        return None;
    }
    Some(if http {
        "an HTTP request".to_string()
    } else if first == 0x16 {
        "a TLS handshake on the plain DICOM port (DICOM over TLS is served on dicom.tls_port, when set)".to_string()
    } else {
        format!("a connection that opens with byte 0x{first:02X}, which is no PDU type")
    })
}

/// Reads the association request (so the peer is waiting for an answer) and rejects it.
async fn reject(mut socket: TcpStream, result: AssociationRJResult, source: AssociationRJSource) {
    let mut header = [0u8; 6];
    let read = async {
        socket.read_exact(&mut header).await?;
        let len = u32::from_be_bytes([header[2], header[3], header[4], header[5]]).min(1 << 20);
        let mut body = vec![0u8; len as usize];
        socket.read_exact(&mut body).await
    };
    if tokio::time::timeout(Duration::from_secs(10), read).await.is_err() {
        return;
    }
    let mut out = Vec::new();
    if dicom_ul::write_pdu(&mut out, &Pdu::AssociationRJ(AssociationRJ { result, source })).is_ok() {
        let _ = socket.write_all(&out).await;
        let _ = socket.shutdown().await;
    }
}

/// Called/calling AE title policy, applied by dicom-ul during negotiation.
#[derive(Clone)]
struct AeTitlePolicy {
    require_called_ae_title: bool,
    allowed_calling: Vec<String>,
}

impl AccessControl for AeTitlePolicy {
    fn check_access(
        &self,
        this_ae_title: &str,
        calling_ae_title: &str,
        called_ae_title: &str,
        user_identity: Option<&UserIdentity>,
    ) -> Result<(), AssociationRJServiceUserReason> {
        // dicom-ul returns no user identity response, which PS3.7 D.3.3.7 allows an acceptor
        // that does not authenticate users. A sender that insists on a positive response then
        // closes the association itself; without this line the agent's log would show only a
        // peer that hung up.
        if let Some(identity) = user_identity.filter(|identity| identity.positive_response_requested()) {
            tracing::warn!(
                identity_type = ?identity.identity_type(),
                "the peer asks for a positive user identity response; IDAICS does not authenticate users \
                 (access is by AE title and peer address) and sends none, so the peer may close the association"
            );
        }
        if self.require_called_ae_title && called_ae_title.trim() != this_ae_title.trim() {
            tracing::warn!(called_ae = called_ae_title.trim(), "called AE title does not match ours; rejecting");
            return Err(AssociationRJServiceUserReason::CalledAETitleNotRecognized);
        }
        // An AE title is printable text (PS3.5 6.2, VR AE: no control characters). One with a NUL
        // or an escape in it names no node anybody configured, and would go on into the log,
        // the finding log and every record of what it sent.
        if calling_ae_title.chars().any(char::is_control) {
            return Err(AssociationRJServiceUserReason::CallingAETitleNotRecognized);
        }
        if !self.allowed_calling.is_empty() && !self.allowed_calling.iter().any(|a| a == calling_ae_title.trim()) {
            tracing::debug!(calling_ae = calling_ae_title.trim(), "calling AE title not in the allow-list; rejecting");
            return Err(AssociationRJServiceUserReason::CallingAETitleNotRecognized);
        }
        Ok(())
    }
}

fn association_options(
    config: &Config,
) -> ServerAssociationOptions<'static, AeTitlePolicy, dicom_ul::association::server::DefaultNegotiation> {
    let mut options = ServerAssociationOptions::new()
        .ae_access_control(AeTitlePolicy {
            require_called_ae_title: config.dicom.require_called_ae_title,
            allowed_calling: config.dicom.allowed_calling_ae_titles.clone(),
        })
        .ae_title(config.dicom.ae_title.clone())
        .max_pdu_length(config.limits.max_pdu_length)
        .read_timeout(config.limits.idle_timeout())
        .write_timeout(config.limits.write_timeout())
        .with_abstract_syntax(uids::VERIFICATION);
    options = match config.dicom.other_sop_classes {
        OtherSopClassPolicy::Refuse => CT_SOP_CLASSES.iter().fold(options, |o, uid| o.with_abstract_syntax(*uid)),
        OtherSopClassPolicy::Discard => {
            STORAGE_SOP_CLASSES.iter().fold(options, |o, (uid, _)| o.with_abstract_syntax(*uid))
        }
    };
    transfer_syntaxes::ACCEPTED.iter().fold(options, |o, (uid, _)| o.with_transfer_syntax(*uid))
}

/// Where the data set of the current C-STORE goes.
enum Sink {
    Spool(PartialInstance),
    Discard,
    /// Already failed: remaining fragments are read and dropped, then this status is sent.
    Fail {
        status: u16,
        reason: String,
    },
}

/// Tallies for the end-of-association log line.
#[derive(Default)]
struct Tally {
    stored: u64,
    bytes: u64,
    discarded: u64,
    failed: u64,
}

struct Session<'a> {
    ctx: &'a ScpContext,
    id: AssociationId,
    calling_ae: String,
    contexts: Vec<PresentationContextNegotiated>,
    command_bytes: Vec<u8>,
    current: Option<(dimse::Request, u8, Sink)>,
    tally: Tally,
}

/// This agent's identity in the finding log: host, process and start time.
fn agent_id(host: &str) -> String {
    let started =
        std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).map(|d| d.as_millis()).unwrap_or(0);
    format!("{host}:{}:{started}", std::process::id())
}

/// What the finding log needs to know of a connection from its first moment.
struct OpenedAssociation {
    id: AssociationId,
    peer: SocketAddr,
    started_at: String,
}

async fn handle_connection(
    socket: TcpStream,
    peer: SocketAddr,
    id: AssociationId,
    ctx: Arc<ScpContext>,
    tls: Option<Arc<rustls::ServerConfig>>,
) {
    let opened = OpenedAssociation { id, peer, started_at: crate::store::db::now() };
    // Counted always; logged (by the caller, when this says so) and recorded at a bounded rate.
    let peer_text = peer.to_string();
    let rejected = |event: &'static str, detail: &str| {
        let report = ctx.rejections.report();
        if report {
            ctx.audit.record(
                event,
                crate::store::audit::Party { peer: Some(&peer_text), ..Default::default() },
                detail,
            );
            ctx.record_association(&opened, ("", ""), &Tally::default(), "rejected", Some(detail.into()));
        }
        report
    };
    if let Some(free) = ctx.disk_is_low() {
        if rejected("association-refused", "free disk below the minimum") {
            tracing::error!(
                free_mb = free / (1024 * 1024),
                min_mb = ctx.config.limits.min_free_disk_mb,
                "free disk below the minimum; rejecting association (transient)"
            );
        }
        reject(
            socket,
            AssociationRJResult::Transient,
            AssociationRJSource::ServiceProviderPresentation(
                AssociationRJServiceProviderPresentationReason::LocalLimitExceeded,
            ),
        )
        .await;
        return;
    }
    let started = tokio::time::Instant::now();
    let mut first_bytes = [0u8; 4];
    if let Ok(Ok(seen)) =
        tokio::time::timeout(ctx.config.limits.association_timeout(), socket.peek(&mut first_bytes)).await
        && let Some(what) = not_what_this_port_serves(&first_bytes[..seen], tls.is_some())
    {
        if rejected("association-refused", &format!("not a DICOM association request: {what}")) {
            tracing::warn!(what, "not a DICOM association request; closing the connection");
        }
        return;
    }
    let options = association_options(&ctx.config);
    let remaining = ctx.config.limits.association_timeout().saturating_sub(started.elapsed());
    match tls {
        None => {
            let established = tokio::time::timeout(remaining, options.establish_async(socket)).await;
            if let Some(association) = established_or_rejected(established, rejected) {
                serve_association(association, &ctx, &opened, false).await;
            }
        }
        Some(tls) => {
            // The handshake counts against the association timeout too.
            let options = options.tls_config(tls);
            let established = tokio::time::timeout(remaining, options.establish_tls_async(socket)).await;
            if let Some(association) = established_or_rejected(established, rejected) {
                serve_association(association, &ctx, &opened, true).await;
            }
        }
    }
}

/// The association, or the reason it is not there, logged (within the rate) and recorded.
fn established_or_rejected<S>(
    established: Result<Result<AsyncServerAssociation<S>, dicom_ul::association::Error>, tokio::time::error::Elapsed>,
    rejected: impl Fn(&'static str, &str) -> bool,
) -> Option<AsyncServerAssociation<S>> {
    match established {
        Ok(Ok(association)) => Some(association),
        Ok(Err(e)) => {
            let error = with_causes(&e);
            // A handshake that failed is an event of its own in the audit trail: a missing or
            // untrusted certificate, a protocol too old.
            let event = match e {
                dicom_ul::association::Error::TlsHandshake { .. } => "tls-failure",
                _ => "association-refused",
            };
            if rejected(event, &format!("not established: {error}")) {
                tracing::warn!(%error, "association not established");
            }
            None
        }
        Err(_) => {
            if rejected("association-refused", "no association request within the timeout") {
                tracing::warn!("no association request within the timeout; closing");
            }
            None
        }
    }
}

/// An established association, served until it ends, over plain TCP or TLS.
async fn serve_association<S: Transport>(
    mut association: AsyncServerAssociation<S>,
    ctx: &Arc<ScpContext>,
    opened: &OpenedAssociation,
    tls: bool,
) {
    let id = opened.id;
    ctx.stats.associations_accepted.fetch_add(1, Ordering::Relaxed);
    let span = tracing::Span::current();
    span.record("calling_ae", association.peer_ae_title().trim());
    span.record("called_ae", association.called_ae_title().trim());
    let accepted: Vec<String> = association
        .presentation_contexts()
        .iter()
        .filter(|pc| pc.reason == PresentationContextResultReason::Acceptance)
        .map(|pc| {
            format!(
                "{}:{}",
                transfer_syntaxes::short_sop_name(&pc.abstract_syntax),
                transfer_syntaxes::name(&pc.transfer_syntax)
            )
        })
        .collect();
    tracing::info!(accepted_contexts = accepted.len(), "association accepted");
    let peer_text = opened.peer.to_string();
    let party = crate::store::audit::Party {
        peer: Some(&peer_text),
        calling_ae: Some(association.peer_ae_title().trim()),
        called_ae: Some(association.called_ae_title().trim()),
    };
    ctx.audit.record("association-accepted", party, if tls { "over TLS" } else { "plain TCP" });
    tracing::debug!(contexts = ?accepted, "accepted presentation contexts");
    if accepted.is_empty() {
        let mut proposed: Vec<&str> = association
            .presentation_contexts()
            .iter()
            .map(|pc| transfer_syntaxes::short_sop_name(&pc.abstract_syntax))
            .collect();
        proposed.dedup();
        tracing::warn!(
            ?proposed,
            "no proposed presentation context is acceptable: IDAICS offers verification and storage only \
             (see other_sop_classes and the accepted transfer syntaxes)"
        );
    }

    let mut session = Session {
        ctx,
        id,
        calling_ae: association.peer_ae_title().trim().to_string(),
        contexts: association.presentation_contexts().to_vec(),
        command_bytes: Vec::new(),
        current: None,
        tally: Tally::default(),
    };
    let released = session.run(&mut association).await;
    let _ = ctx.tracker.send(TrackerEvent::AssociationEnded { association: id, released });
    let t = &session.tally;
    let called = association.called_ae_title().trim().to_string();
    ctx.record_association(
        opened,
        (&session.calling_ae, &called),
        t,
        if released { "released" } else { "aborted" },
        None,
    );
    if t.stored > 0 || t.failed > 0 {
        let party = crate::store::audit::Party {
            peer: Some(&peer_text),
            calling_ae: Some(&session.calling_ae),
            called_ae: Some(&called),
        };
        let detail = format!("{} instance(s) stored, {} bytes, {} failed", t.stored, t.bytes, t.failed);
        ctx.audit.record("instances-stored", party, &detail);
    }
    tracing::info!(
        released,
        stored = t.stored,
        bytes = t.bytes,
        discarded = t.discarded,
        failed = t.failed,
        "association ended"
    );
}

impl Session<'_> {
    /// Serves DIMSE requests until release (true) or abort/error (false).
    async fn run<S: Transport>(&mut self, association: &mut AsyncServerAssociation<S>) -> bool {
        loop {
            let pdu = match association.receive().await {
                Ok(pdu) => pdu,
                Err(e) => {
                    match e {
                        dicom_ul::association::Error::ConnectionClosed { .. } => {
                            tracing::warn!("the peer closed the connection without releasing the association")
                        }
                        dicom_ul::association::Error::Timeout { .. } => tracing::warn!(
                            idle_timeout_s = self.ctx.config.limits.idle_timeout().as_secs(),
                            "nothing received within the idle timeout; aborting the association"
                        ),
                        e => tracing::warn!(error = %with_causes(&e), "association broken; aborting it"),
                    }
                    abort(association).await;
                    return false;
                }
            };
            match pdu {
                Pdu::PData { data } => {
                    for value in data {
                        match self.on_pdv(association, value).await {
                            Ok(()) => {}
                            Err(reason) => {
                                tracing::warn!(%reason, "protocol error; aborting association");
                                abort(association).await;
                                return false;
                            }
                        }
                    }
                }
                Pdu::ReleaseRQ => {
                    if self.current.is_some() {
                        tracing::warn!("release requested in the middle of an instance; it was not acknowledged");
                    }
                    let _ = association.send(&Pdu::ReleaseRP).await;
                    return true;
                }
                Pdu::AbortRQ { source } => {
                    tracing::warn!(?source, "association aborted by the peer");
                    return false;
                }
                other => {
                    tracing::warn!(pdu = ?std::mem::discriminant(&other), "unexpected PDU; aborting association");
                    abort(association).await;
                    return false;
                }
            }
        }
    }

    async fn on_pdv(
        &mut self,
        association: &mut AsyncServerAssociation<impl Transport>,
        value: PDataValue,
    ) -> Result<(), String> {
        match value.value_type {
            PDataValueType::Command => {
                if self.current.is_some() {
                    return Err("a command arrived before the previous data set was complete".into());
                }
                if self.command_bytes.len() + value.data.len() > 1 << 20 {
                    return Err("command set larger than 1 MiB".into());
                }
                self.command_bytes.extend_from_slice(&value.data);
                if value.is_last {
                    let bytes = std::mem::take(&mut self.command_bytes);
                    let request = dimse::Request::parse(&bytes).map_err(|e| e.to_string())?;
                    self.on_command(association, request, value.presentation_context_id).await?;
                }
                Ok(())
            }
            PDataValueType::Data => {
                let Some((_, pc_id, sink)) = self.current.as_mut() else {
                    return Err("a data set fragment arrived without a command".into());
                };
                if *pc_id != value.presentation_context_id {
                    return Err("data set fragment on a different presentation context than its command".into());
                }
                if let Sink::Spool(partial) = sink
                    && let Err(e) = partial.write_fragment(&value.data)
                {
                    *sink = Sink::Fail { status: status::OUT_OF_RESOURCES, reason: e.to_string() };
                }
                if value.is_last {
                    let (request, pc_id, sink) = self.current.take().expect("checked above");
                    let (code, reason) = self.finish_store(sink).await;
                    self.respond(association, &request, pc_id, code, reason.as_deref()).await?;
                }
                Ok(())
            }
        }
    }

    async fn on_command(
        &mut self,
        association: &mut AsyncServerAssociation<impl Transport>,
        request: dimse::Request,
        pc_id: u8,
    ) -> Result<(), String> {
        let Some(pc) = self
            .contexts
            .iter()
            .find(|pc| pc.id == pc_id && pc.reason == PresentationContextResultReason::Acceptance)
            .cloned()
        else {
            return Err(format!("request on presentation context {pc_id}, which was not accepted"));
        };
        match request.command_field {
            dimse::C_ECHO_RQ => {
                tracing::debug!("C-ECHO");
                self.respond(association, &request, pc_id, status::SUCCESS, None).await
            }
            dimse::C_STORE_RQ if request.has_data_set => {
                let sink = self.open_sink(&request, &pc);
                self.current = Some((request, pc_id, sink));
                Ok(())
            }
            dimse::C_STORE_RQ => {
                self.respond(
                    association,
                    &request,
                    pc_id,
                    status::CANNOT_UNDERSTAND,
                    Some("C-STORE without a data set"),
                )
                .await
            }
            other => {
                tracing::warn!(command = format!("{other:#06x}"), "unsupported DIMSE operation");
                if request.has_data_set {
                    let sink =
                        Sink::Fail { status: status::UNRECOGNIZED_OPERATION, reason: "operation not supported".into() };
                    self.current = Some((request, pc_id, sink));
                    Ok(())
                } else {
                    self.respond(
                        association,
                        &request,
                        pc_id,
                        status::UNRECOGNIZED_OPERATION,
                        Some("operation not supported"),
                    )
                    .await
                }
            }
        }
    }

    /// Decides where a C-STORE's data set goes before its first byte arrives.
    fn open_sink(&self, request: &dimse::Request, pc: &PresentationContextNegotiated) -> Sink {
        let sop_class =
            request.affected_sop_class_uid.clone().unwrap_or_else(|| trim_uid(&pc.abstract_syntax).to_string());
        if sop_class != trim_uid(&pc.abstract_syntax) {
            return Sink::Fail {
                status: status::SOP_CLASS_NOT_SUPPORTED,
                reason: format!("SOP class {sop_class} sent on a context negotiated for {}", pc.abstract_syntax),
            };
        }
        if !CT_SOP_CLASSES.contains(&sop_class.as_str()) {
            return match self.ctx.config.dicom.other_sop_classes {
                OtherSopClassPolicy::Discard => Sink::Discard,
                OtherSopClassPolicy::Refuse => Sink::Fail {
                    status: status::SOP_CLASS_NOT_SUPPORTED,
                    reason: format!("SOP class {sop_class} is not accepted"),
                },
            };
        }
        let sop_instance = request.affected_sop_instance_uid.clone().unwrap_or_default();
        if let Err(e) = spool::check_uid(&sop_instance) {
            return Sink::Fail {
                status: status::CANNOT_UNDERSTAND,
                reason: format!("invalid AffectedSOPInstanceUID: {e}"),
            };
        }
        if let Some(free) = self.ctx.disk_is_low() {
            return Sink::Fail {
                status: status::OUT_OF_RESOURCES,
                reason: format!(
                    "free disk {} MiB below the minimum of {} MiB",
                    free >> 20,
                    self.ctx.config.limits.min_free_disk_mb
                ),
            };
        }
        let store = StoreRequest {
            sop_class_uid: sop_class,
            sop_instance_uid: sop_instance,
            transfer_syntax_uid: trim_uid(&pc.transfer_syntax).to_string(),
            calling_ae_title: self.calling_ae.clone(),
        };
        match self.ctx.spool.begin(store) {
            Ok(partial) => Sink::Spool(partial),
            Err(e) => Sink::Fail { status: status::OUT_OF_RESOURCES, reason: e.to_string() },
        }
    }

    /// Commits or discards a fully received data set; returns the status to send.
    async fn finish_store(&mut self, sink: Sink) -> (u16, Option<String>) {
        let stats = &self.ctx.stats;
        match sink {
            Sink::Discard => {
                self.tally.discarded += 1;
                stats.instances_discarded.fetch_add(1, Ordering::Relaxed);
                tracing::info!("instance of a non-CT SOP class accepted and discarded");
                (status::SUCCESS, None)
            }
            Sink::Fail { status, reason } => self.failure(status, reason, None),
            Sink::Spool(partial) => {
                let sop_uid = partial.request().sop_instance_uid.clone();
                let spool = self.ctx.spool.clone();
                let committed = tokio::task::spawn_blocking(move || spool.commit(partial)).await;
                match committed {
                    Ok(Ok(stored)) => {
                        self.tally.stored += 1;
                        self.tally.bytes += stored.bytes;
                        stats.instances_stored.fetch_add(1, Ordering::Relaxed);
                        stats.bytes_stored.fetch_add(stored.bytes, Ordering::Relaxed);
                        tracing::debug!(sop_uid = %sop_uid, path = %stored.path.display(), "instance stored");
                        let _ = self
                            .ctx
                            .tracker
                            .send(TrackerEvent::Stored { association: self.id, header: Box::new(stored.header) });
                        (status::SUCCESS, None)
                    }
                    Ok(Err(e)) => {
                        let code = match &e {
                            e if e.is_local_resource_problem() => status::OUT_OF_RESOURCES,
                            SpoolError::Mismatch { attribute: "SOPClassUID", .. } => {
                                status::DATA_SET_DOES_NOT_MATCH_SOP_CLASS
                            }
                            _ => status::CANNOT_UNDERSTAND,
                        };
                        self.failure(code, e.to_string(), Some(&sop_uid))
                    }
                    Err(join) => {
                        self.failure(status::OUT_OF_RESOURCES, format!("storage task failed: {join}"), Some(&sop_uid))
                    }
                }
            }
        }
    }

    fn failure(&mut self, code: u16, reason: String, sop_uid: Option<&str>) -> (u16, Option<String>) {
        self.tally.failed += 1;
        self.ctx.stats.store_failures.fetch_add(1, Ordering::Relaxed);
        tracing::warn!(status = format!("{code:#06X}"), sop_uid = sop_uid.unwrap_or(""), %reason, "store failed");
        (code, Some(reason))
    }

    async fn respond(
        &mut self,
        association: &mut AsyncServerAssociation<impl Transport>,
        request: &dimse::Request,
        pc_id: u8,
        code: u16,
        reason: Option<&str>,
    ) -> Result<(), String> {
        let data = dimse::response(request, code, reason).map_err(|e| e.to_string())?;
        let peer_max = association.requestor_max_pdu_length();
        let fragment = dimse::fragment_length(peer_max).ok_or_else(|| {
            format!("the peer's maximum PDU length of {peer_max} bytes leaves no room for a response")
        })?;
        for pdu in dimse::pdata_pdus(pc_id, PDataValueType::Command, &data, fragment) {
            association.send(&pdu).await.map_err(|e| format!("cannot send response: {e}"))?;
        }
        Ok(())
    }
}

/// Sends an A-ABORT, waiting at most a moment: it often follows a peer that stopped reading,
/// whose socket would hold the abort for another whole write timeout.
async fn abort(association: &mut AsyncServerAssociation<impl Transport>) {
    use dicom_ul::pdu::{AbortRQServiceProviderReason, AbortRQSource};
    let abort_rq =
        Pdu::AbortRQ { source: AbortRQSource::ServiceProvider(AbortRQServiceProviderReason::ReasonNotSpecified) };
    let _ = tokio::time::timeout(Duration::from_secs(2), association.send(&abort_rq)).await;
}
