//! C-STORE to a DICOM destination. The outbox sends one object per association, so a refusal or a
//! dropped connection affects only that object and the outbox decides what happens next;
//! `idaics demo` sends a whole series over one, as a modality does.

use std::path::{Path, PathBuf};

use dicom_dictionary_std::{tags, uids};
use dicom_encoding::TransferSyntaxIndex;
use dicom_object::OpenFileOptions;
use dicom_ul::Pdu;
use dicom_ul::association::client::ClientAssociationOptions;
use dicom_ul::pdu::{PDataValue, PDataValueType, PresentationContextResultReason};

#[derive(Debug, thiserror::Error)]
pub enum ScuError {
    #[error("cannot read {0}")]
    Read(String),
    #[error("association with {destination} failed: {message}")]
    Association { destination: String, message: String },
    /// The SOP classes refused, comma-separated.
    #[error("the destination accepted no presentation context for {0}{hint}", hint = no_context_hint(.0))]
    NoContext(String),
    #[error("transfer to {destination} failed: {message}")]
    Transfer { destination: String, message: String },
}

/// Where to send: AE title, host and port.
#[derive(Debug, Clone)]
pub struct Peer {
    pub ae_title: String,
    pub host: String,
    pub port: u16,
}

/// Sends the file and returns the DIMSE status of the response (0x0000 success, 0xB... warnings,
/// anything else a refusal).
pub fn store(peer: &Peer, calling_ae: &str, path: &Path, timeout: std::time::Duration) -> Result<u16, ScuError> {
    let statuses = store_all(peer, calling_ae, &[path.to_path_buf()], timeout)?;
    Ok(statuses[0])
}

/// Sends the files in order over one association and returns each one's DIMSE status. A series
/// goes as one association, as a modality sends it: receivers (this agent among them) may take
/// the release of the association as the end of the series.
pub fn store_all(
    peer: &Peer,
    calling_ae: &str,
    paths: &[PathBuf],
    timeout: std::time::Duration,
) -> Result<Vec<u16>, ScuError> {
    let read = |path: &Path, e: String| ScuError::Read(format!("{}: {e}", path.display()));
    // One presentation context per SOP class, read from the files' meta groups only: the data
    // sets are read once, when they are sent.
    let mut sop_classes: Vec<String> = Vec::new();
    for path in paths {
        let class = read_meta(path)
            .map_err(|e| read(path, e))?
            .media_storage_sop_class_uid()
            .trim_end_matches('\0')
            .to_string();
        if !sop_classes.contains(&class) {
            sop_classes.push(class);
        }
    }
    let destination = format!("{}@{}:{}", peer.ae_title, peer.host, peer.port);
    let assoc_err = |message: String| ScuError::Association { destination: destination.clone(), message };
    let mut options =
        ClientAssociationOptions::new().calling_ae_title(calling_ae).called_ae_title(peer.ae_title.as_str());
    for class in &sop_classes {
        options = options.with_presentation_context(
            class.as_str(),
            vec![uids::EXPLICIT_VR_LITTLE_ENDIAN, uids::IMPLICIT_VR_LITTLE_ENDIAN],
        );
    }
    let mut association = options
        .connection_timeout(timeout)
        .read_timeout(timeout)
        .write_timeout(timeout)
        .establish(format!("{}:{}", peer.host, peer.port).as_str())
        .map_err(|e| match e {
            // Every proposed context refused: say which classes, since that is what a site fixes.
            dicom_ul::association::Error::NoAcceptedPresentationContexts { .. } => {
                ScuError::NoContext(sop_classes.join(", "))
            }
            other => assoc_err(other.to_string()),
        })?;
    // Proposed contexts are numbered 1, 3, 5, ... in the order of `sop_classes`.
    let accepted: Vec<_> = association
        .presentation_contexts()
        .iter()
        .filter(|pc| pc.reason == PresentationContextResultReason::Acceptance)
        .cloned()
        .collect();
    // Fragments that fit the peer's maximum PDU length (less the PDU and PDV headers).
    let chunk = match association.acceptor_max_pdu_length() as usize {
        0 => 1 << 20, // no limit announced
        max => max.saturating_sub(12).max(1024),
    };
    let transfer = |message: String| ScuError::Transfer { destination: destination.clone(), message };
    let mut statuses = Vec::with_capacity(paths.len());
    for (number, path) in paths.iter().enumerate() {
        let object = OpenFileOptions::new().open_file(path).map_err(|e| read(path, e.to_string()))?;
        let sop_class = object.meta().media_storage_sop_class_uid().trim_end_matches('\0').to_string();
        let sop_instance = object.meta().media_storage_sop_instance_uid().trim_end_matches('\0').to_string();
        let index = sop_classes.iter().position(|c| *c == sop_class).expect("proposed above");
        let context_id = (2 * index + 1) as u8;
        let context =
            accepted.iter().find(|pc| pc.id == context_id).ok_or_else(|| ScuError::NoContext(sop_class.clone()))?;
        let ts = dicom_transfer_syntax_registry::TransferSyntaxRegistry
            .get(context.transfer_syntax.trim_end_matches('\0'))
            .ok_or_else(|| assoc_err(format!("unknown transfer syntax {}", context.transfer_syntax)))?;
        let mut dataset = Vec::new();
        object.write_dataset_with_ts(&mut dataset, ts).map_err(|e| read(path, e.to_string()))?;
        let message_id = (number % usize::from(u16::MAX)) as u16 + 1;
        association
            .send(&Pdu::PData {
                data: vec![PDataValue {
                    presentation_context_id: context.id,
                    value_type: PDataValueType::Command,
                    is_last: true,
                    data: store_command_with_id(&sop_class, &sop_instance, message_id),
                }],
            })
            .map_err(|e| transfer(e.to_string()))?;
        let count = dataset.len().div_ceil(chunk).max(1);
        for (n, part) in dataset.chunks(chunk).enumerate() {
            association
                .send(&Pdu::PData {
                    data: vec![PDataValue {
                        presentation_context_id: context.id,
                        value_type: PDataValueType::Data,
                        is_last: n + 1 == count,
                        data: part.to_vec(),
                    }],
                })
                .map_err(|e| transfer(e.to_string()))?;
        }
        statuses.push(match association.receive().map_err(|e| transfer(e.to_string()))? {
            Pdu::PData { data } => {
                let bytes: Vec<u8> = data.into_iter().flat_map(|v| v.data).collect();
                let response = dicom_object::InMemDicomObject::read_dataset_with_ts(
                    &bytes[..],
                    &dicom_transfer_syntax_registry::entries::IMPLICIT_VR_LITTLE_ENDIAN.erased(),
                )
                .map_err(|e| transfer(format!("unreadable response: {e}")))?;
                response
                    .element(tags::STATUS)
                    .ok()
                    .and_then(|e| e.to_int::<u16>().ok())
                    .ok_or_else(|| transfer("response without a status".into()))?
            }
            other => return Err(transfer(format!("unexpected PDU {other:?}"))),
        });
    }
    let _ = association.release();
    Ok(statuses)
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

/// A C-STORE-RQ command set (implicit VR little endian, as DIMSE commands always are).
pub fn store_command(sop_class: &str, sop_instance: &str) -> Vec<u8> {
    store_command_with_id(sop_class, sop_instance, 1)
}

fn store_command_with_id(sop_class: &str, sop_instance: &str, message_id: u16) -> Vec<u8> {
    fn put(out: &mut Vec<u8>, element: u16, value: &[u8]) {
        out.extend_from_slice(&0u16.to_le_bytes());
        out.extend_from_slice(&element.to_le_bytes());
        out.extend_from_slice(&(value.len() as u32).to_le_bytes());
        out.extend_from_slice(value);
    }
    fn uid(s: &str) -> Vec<u8> {
        let mut v = s.as_bytes().to_vec();
        if v.len() % 2 == 1 {
            v.push(0);
        }
        v
    }
    let mut body = Vec::new();
    put(&mut body, 0x0002, &uid(sop_class)); // Affected SOP Class UID
    put(&mut body, 0x0100, &1u16.to_le_bytes()); // C-STORE-RQ
    put(&mut body, 0x0110, &message_id.to_le_bytes()); // Message ID
    put(&mut body, 0x0700, &0u16.to_le_bytes()); // Priority: medium
    put(&mut body, 0x0800, &0u16.to_le_bytes()); // a data set follows
    put(&mut body, 0x1000, &uid(sop_instance)); // Affected SOP Instance UID
    let mut out = Vec::new();
    put(&mut out, 0x0000, &(body.len() as u32).to_le_bytes());
    out.extend_from_slice(&body);
    out
}

/// What a site can do when its PACS refuses the report's storage class.
fn no_context_hint(sop_classes: &str) -> &'static str {
    if sop_classes.split(", ").any(|class| class == uids::COMPREHENSIVE3_DSR_STORAGE) {
        " (Comprehensive 3D SR): if it stores Comprehensive SR, set outputs.sr_storage = \"comprehensive\""
    } else {
        ""
    }
}
