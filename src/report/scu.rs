//! C-STORE to a DICOM destination. Objects go over one association, as a modality sends a
//! series: receivers (this agent among them) may take the release of an association as the end
//! of what it carried. Each object still has an outcome of its own: a file that cannot be read, a
//! SOP class the destination refuses or a status it answers concerns that object only, and the
//! outbox decides what happens next to each.

use std::path::{Path, PathBuf};

use dicom_dictionary_std::{tags, uids};
use dicom_encoding::TransferSyntaxIndex;
use dicom_object::OpenFileOptions;
use dicom_ul::Pdu;
use dicom_ul::association::client::ClientAssociationOptions;
use dicom_ul::pdu::{PDataValueType, PresentationContextResultReason};

use crate::dimse;

#[derive(Debug, Clone, thiserror::Error)]
pub enum ScuError {
    #[error("cannot read {0}")]
    Read(String),
    #[error("association with {destination} failed: {message}")]
    Association { destination: String, message: String },
    /// The SOP class refused.
    #[error("the destination accepted no presentation context for {0}{hint}", hint = no_context_hint(.0))]
    NoContext(String),
    #[error("transfer to {destination} failed: {message}")]
    Transfer { destination: String, message: String },
    /// Not sent: the association broke off on an earlier object. Nothing is known against this
    /// one, so it is not counted as an attempt.
    #[error("not sent to {destination}: the association ended on an earlier object")]
    NotAttempted { destination: String },
}

/// Where to send: AE title, host and port.
#[derive(Debug, Clone)]
pub struct Peer {
    pub ae_title: String,
    pub host: String,
    pub port: u16,
    /// DICOM over TLS to this peer, with the trust (and client certificate) configured for it.
    pub tls: Option<std::sync::Arc<rustls::ClientConfig>>,
}

/// Sends the files in order over one association; every file's DIMSE status, or the first reason
/// one was not stored.
pub fn store_all(
    peer: &Peer,
    calling_ae: &str,
    paths: &[PathBuf],
    timeout: std::time::Duration,
) -> Result<Vec<u16>, ScuError> {
    store_each(peer, calling_ae, paths, timeout).into_iter().collect()
}

/// Sends the files in order over one association and returns each one's outcome, in the same
/// order: its DIMSE status, or why it was not stored.
pub fn store_each(
    peer: &Peer,
    calling_ae: &str,
    paths: &[PathBuf],
    timeout: std::time::Duration,
) -> Vec<Result<u16, ScuError>> {
    let destination = format!("{}@{}:{}", peer.ae_title, peer.host, peer.port);
    let read = |path: &Path, e: String| ScuError::Read(format!("{}: {e}", path.display()));
    // Each file's SOP class, from its meta group only: the data sets are read once, when they
    // are sent. One presentation context per class.
    let classes: Vec<Result<String, ScuError>> = paths
        .iter()
        .map(|path| {
            read_meta(path)
                .map(|meta| meta.media_storage_sop_class_uid().trim_end_matches('\0').to_string())
                .map_err(|e| read(path, e))
        })
        .collect();
    let mut sop_classes: Vec<&str> = Vec::new();
    for class in classes.iter().flatten() {
        if !sop_classes.contains(&class.as_str()) {
            sop_classes.push(class);
        }
    }
    // Until it is sent, a readable file's outcome is that it was not.
    let outcomes: Vec<Result<u16, ScuError>> = classes
        .iter()
        .map(|class| match class {
            Ok(_) => Err(ScuError::NotAttempted { destination: destination.clone() }),
            Err(e) => Err(e.clone()),
        })
        .collect();
    if sop_classes.is_empty() {
        return outcomes;
    }
    let assoc_err = |message: String| ScuError::Association { destination: destination.clone(), message };
    let mut options =
        ClientAssociationOptions::new().calling_ae_title(calling_ae).called_ae_title(peer.ae_title.as_str());
    for class in &sop_classes {
        options = options
            .with_presentation_context(*class, vec![uids::EXPLICIT_VR_LITTLE_ENDIAN, uids::IMPLICIT_VR_LITTLE_ENDIAN]);
    }
    let options = options.connection_timeout(timeout).read_timeout(timeout).write_timeout(timeout);
    let address = format!("{}:{}", peer.host, peer.port);
    let failed = |e: dicom_ul::association::Error, mut outcomes: Vec<Result<u16, ScuError>>| {
        let every_context_refused = matches!(e, dicom_ul::association::Error::NoAcceptedPresentationContexts { .. });
        let message = crate::common::with_causes(&e);
        for (outcome, class) in outcomes.iter_mut().zip(&classes) {
            if let Ok(class) = class {
                // Every proposed context refused: say which class, since that is what a site fixes.
                *outcome = Err(if every_context_refused {
                    ScuError::NoContext(class.clone())
                } else {
                    assoc_err(message.clone())
                });
            }
        }
        outcomes
    };
    let sending = Sending { paths, classes: &classes, sop_classes: &sop_classes, destination: &destination };
    // TCP_NODELAY: the last segment of a C-STORE does not wait for the acknowledgement of the
    // one before, which a receiver may delay by 40 ms (a PACS's own side is its own setting:
    // storescp without TCP_NODELAY=1 took 44 ms per object, measured by bench/series.sh).
    match &peer.tls {
        None => match options.establish(address.as_str()) {
            Ok(mut association) => {
                let _ = association.inner_stream().set_nodelay(true);
                sending.over(association, outcomes)
            }
            Err(e) => failed(e, outcomes),
        },
        Some(tls) => match options.tls_config(tls.clone()).server_name(&peer.host).establish_tls(address.as_str()) {
            Ok(mut association) => {
                let _ = association.inner_stream().sock.set_nodelay(true);
                sending.over(association, outcomes)
            }
            Err(e) => failed(e, outcomes),
        },
    }
}

/// The files of one `store_each`, sent over the association once it is established.
struct Sending<'a> {
    paths: &'a [PathBuf],
    classes: &'a [Result<String, ScuError>],
    sop_classes: &'a [&'a str],
    destination: &'a str,
}

impl Sending<'_> {
    fn over<S>(
        &self,
        mut association: dicom_ul::association::ClientAssociation<S>,
        mut outcomes: Vec<Result<u16, ScuError>>,
    ) -> Vec<Result<u16, ScuError>>
    where
        S: dicom_ul::association::CloseSocket + std::io::Read + std::io::Write,
    {
        let (paths, classes, destination) = (self.paths, self.classes, self.destination);
        let assoc_err = |message: String| ScuError::Association { destination: destination.to_string(), message };
        // Proposed contexts are numbered 1, 3, 5, ... in the order of `sop_classes`.
        let accepted: Vec<_> = association
            .presentation_contexts()
            .iter()
            .filter(|pc| pc.reason == PresentationContextResultReason::Acceptance)
            .cloned()
            .collect();
        let peer_max = association.acceptor_max_pdu_length();
        let Some(chunk) = dimse::fragment_length(peer_max) else {
            let message = format!("its maximum PDU length of {peer_max} bytes leaves no room for data");
            for (outcome, class) in outcomes.iter_mut().zip(classes) {
                if class.is_ok() {
                    *outcome = Err(assoc_err(message.clone()));
                }
            }
            let _ = association.abort();
            return outcomes;
        };
        let negotiated = Negotiated { proposed: self.sop_classes, accepted: &accepted, chunk, destination };
        let mut message_id: u16 = 0;
        let mut broken = false;
        for ((path, class), outcome) in paths.iter().zip(classes).zip(outcomes.iter_mut()) {
            if class.is_err() || broken {
                continue;
            }
            message_id = message_id.checked_add(1).unwrap_or(1);
            *outcome = store_one(&mut association, &negotiated, path, message_id);
            broken = matches!(outcome, Err(ScuError::Transfer { .. }));
        }
        if !broken {
            let _ = association.release();
        }
        outcomes
    }
}

/// What the association's negotiation settled, for each C-STORE on it.
struct Negotiated<'a> {
    /// The SOP classes in the order proposed: class `n` has context id `2n + 1`.
    proposed: &'a [&'a str],
    accepted: &'a [dicom_ul::pdu::PresentationContextNegotiated],
    /// Fragment size that fits the peer's maximum PDU length.
    chunk: usize,
    destination: &'a str,
}

/// One C-STORE on an established association: the file's DIMSE status, or why it was not stored.
/// A `Transfer` error leaves the association unusable.
fn store_one(
    association: &mut dicom_ul::association::ClientAssociation<
        impl dicom_ul::association::CloseSocket + std::io::Read + std::io::Write,
    >,
    negotiated: &Negotiated,
    path: &Path,
    message_id: u16,
) -> Result<u16, ScuError> {
    let read = |e: String| ScuError::Read(format!("{}: {e}", path.display()));
    let transfer = |message: String| ScuError::Transfer { destination: negotiated.destination.to_string(), message };
    let object = OpenFileOptions::new().open_file(path).map_err(|e| read(e.to_string()))?;
    let sop_class = object.meta().media_storage_sop_class_uid().trim_end_matches('\0').to_string();
    let sop_instance = object.meta().media_storage_sop_instance_uid().trim_end_matches('\0').to_string();
    let index =
        negotiated.proposed.iter().position(|c| *c == sop_class).ok_or_else(|| {
            read(format!("its SOP class {sop_class} differs from the one its meta group gave before"))
        })?;
    let context_id = (2 * index + 1) as u8;
    let context = negotiated
        .accepted
        .iter()
        .find(|pc| pc.id == context_id)
        .ok_or_else(|| ScuError::NoContext(sop_class.clone()))?;
    let ts = dicom_transfer_syntax_registry::TransferSyntaxRegistry
        .get(context.transfer_syntax.trim_end_matches('\0'))
        .ok_or_else(|| ScuError::Association {
            destination: negotiated.destination.to_string(),
            message: format!("unknown transfer syntax {}", context.transfer_syntax),
        })?;
    let mut dataset = Vec::new();
    object.write_dataset_with_ts(&mut dataset, ts).map_err(|e| read(e.to_string()))?;
    let command = dimse::store_request(&sop_class, &sop_instance, message_id).map_err(|e| transfer(e.to_string()))?;
    let command_pdus = dimse::pdata_pdus(context.id, PDataValueType::Command, &command, negotiated.chunk);
    for pdu in command_pdus.chain(dimse::pdata_pdus(context.id, PDataValueType::Data, &dataset, negotiated.chunk)) {
        association.send(&pdu).map_err(|e| transfer(e.to_string()))?;
    }
    // The response may come in fragments too, when the destination sends small PDUs.
    let mut response = Vec::new();
    loop {
        match association.receive().map_err(|e| transfer(e.to_string()))? {
            Pdu::PData { data } => {
                let mut complete = false;
                for value in data {
                    if value.value_type != PDataValueType::Command || value.presentation_context_id != context.id {
                        return Err(transfer("a response carrying something other than its command".into()));
                    }
                    response.extend_from_slice(&value.data);
                    complete |= value.is_last;
                }
                if complete {
                    break;
                }
                if response.len() > 1 << 20 {
                    return Err(transfer("a response command set larger than 1 MiB".into()));
                }
            }
            other => return Err(transfer(format!("unexpected PDU {other:?}"))),
        }
    }
    let response = dicom_object::InMemDicomObject::read_dataset_with_ts(
        &response[..],
        &dicom_transfer_syntax_registry::entries::IMPLICIT_VR_LITTLE_ENDIAN.erased(),
    )
    .map_err(|e| transfer(format!("unreadable response: {e}")))?;
    response
        .element(tags::STATUS)
        .ok()
        .and_then(|e| e.to_int::<u16>().ok())
        .ok_or_else(|| transfer("response without a status".into()))
}

/// The file meta group of a DICOM file, with or without the 128-byte preamble.
fn read_meta(path: &Path) -> Result<dicom_object::meta::FileMetaTable, String> {
    use std::io::{Read, Seek, SeekFrom};
    let mut file = std::fs::File::open(path).map_err(|e| e.to_string())?;
    let mut head = Vec::with_capacity(132);
    (&mut file).take(132).read_to_end(&mut head).map_err(|e| e.to_string())?;
    let start = if head.get(128..132) == Some(b"DICM".as_slice()) { 128 } else { 0 };
    file.seek(SeekFrom::Start(start)).map_err(|e| e.to_string())?;
    dicom_object::meta::FileMetaTable::from_reader(std::io::BufReader::new(file)).map_err(|e| e.to_string())
}

/// What a site can do when its PACS refuses the report's storage class.
fn no_context_hint(sop_class: &str) -> &'static str {
    if sop_class == uids::COMPREHENSIVE3_DSR_STORAGE {
        " (Comprehensive 3D SR): if it stores Comprehensive SR, set outputs.sr_storage = \"comprehensive\""
    } else {
        ""
    }
}
