//! DIMSE command sets (PS3.7 section 9 and annex E): the few fields the SCP reads from requests
//! and the responses it writes. Command sets are always Implicit VR Little Endian.

use dicom_core::Tag;
use dicom_dictionary_std::tags;
use dicom_object::InMemDicomObject;
use dicom_transfer_syntax_registry::entries::IMPLICIT_VR_LITTLE_ENDIAN;
use dicom_ul::Pdu;
use dicom_ul::pdu::{PDataValue, PDataValueType};

pub const C_STORE_RQ: u16 = 0x0001;
pub const C_ECHO_RQ: u16 = 0x0030;
/// Bit set on the CommandField of every response.
const RESPONSE_BIT: u16 = 0x8000;
/// CommandDataSetType value meaning "no data set follows".
const NO_DATA_SET: u16 = 0x0101;

/// DIMSE status codes used by this SCP (PS3.4 annex B.2.3 and PS3.7 annex C).
pub mod status {
    pub const SUCCESS: u16 = 0x0000;
    pub const SOP_CLASS_NOT_SUPPORTED: u16 = 0x0122;
    pub const UNRECOGNIZED_OPERATION: u16 = 0x0211;
    pub const OUT_OF_RESOURCES: u16 = 0xA700;
    pub const DATA_SET_DOES_NOT_MATCH_SOP_CLASS: u16 = 0xA900;
    pub const CANNOT_UNDERSTAND: u16 = 0xC000;
}

#[derive(Debug, thiserror::Error)]
pub enum CommandError {
    #[error("command set does not parse: {0}")]
    Unparsable(String),
    #[error("command set lacks {0}")]
    Missing(&'static str),
}

/// The fields of a request command set that the SCP acts on.
#[derive(Debug, Clone)]
pub struct Request {
    pub command_field: u16,
    pub message_id: u16,
    pub has_data_set: bool,
    pub affected_sop_class_uid: Option<String>,
    pub affected_sop_instance_uid: Option<String>,
}

impl Request {
    pub fn parse(bytes: &[u8]) -> Result<Request, CommandError> {
        let obj = InMemDicomObject::read_dataset_with_ts(bytes, &IMPLICIT_VR_LITTLE_ENDIAN.erased())
            .map_err(|e| CommandError::Unparsable(e.to_string()))?;
        let uint = |tag: Tag, name: &'static str| -> Result<u16, CommandError> {
            obj.element(tag).ok().and_then(|e| e.to_int::<u16>().ok()).ok_or(CommandError::Missing(name))
        };
        let uid = |tag: Tag| -> Option<String> {
            obj.element(tag).ok().and_then(|e| e.to_str().ok()).map(|s| crate::ingest::spool::trim_uid(&s).to_string())
        };
        Ok(Request {
            command_field: uint(tags::COMMAND_FIELD, "CommandField")?,
            message_id: uint(tags::MESSAGE_ID, "MessageID")?,
            has_data_set: uint(tags::COMMAND_DATA_SET_TYPE, "CommandDataSetType")? != NO_DATA_SET,
            affected_sop_class_uid: uid(tags::AFFECTED_SOP_CLASS_UID),
            affected_sop_instance_uid: uid(tags::AFFECTED_SOP_INSTANCE_UID),
        })
    }
}

/// Encodes the response to `request` with `status` and, for failures, an error comment that
/// tells the sender's operator why (truncated to the 64 characters LO allows).
pub fn response(request: &Request, status: u16, error_comment: Option<&str>) -> Vec<u8> {
    let mut body = Vec::with_capacity(256);
    if let Some(uid) = &request.affected_sop_class_uid {
        put_text(&mut body, tags::AFFECTED_SOP_CLASS_UID, uid, 0);
    }
    put_u16(&mut body, tags::COMMAND_FIELD, request.command_field | RESPONSE_BIT);
    put_u16(&mut body, tags::MESSAGE_ID_BEING_RESPONDED_TO, request.message_id);
    put_u16(&mut body, tags::COMMAND_DATA_SET_TYPE, NO_DATA_SET);
    put_u16(&mut body, tags::STATUS, status);
    if let Some(comment) = error_comment {
        let clean: String = comment
            .chars()
            .map(|c| if c.is_ascii() && !c.is_ascii_control() && c != '\\' { c } else { ' ' })
            .take(64)
            .collect();
        put_text(&mut body, tags::ERROR_COMMENT, &clean, b' ');
    }
    if let Some(uid) = &request.affected_sop_instance_uid {
        put_text(&mut body, tags::AFFECTED_SOP_INSTANCE_UID, uid, 0);
    }
    let mut out = Vec::with_capacity(body.len() + 12);
    put_u32(&mut out, tags::COMMAND_GROUP_LENGTH, body.len() as u32);
    out.extend_from_slice(&body);
    out
}

/// Bytes a P-DATA-TF PDU holding one value adds around that value's data: the PDU header (type,
/// reserved, length) and the value's item header (length, context, control). dicom-ul measures
/// the whole encoded PDU against the peer's maximum, so both count.
const PDATA_OVERHEAD: u32 = 12;

/// No PDU carries more than this, even to a peer that announces no limit: each PDU is one buffer.
const LARGEST_FRAGMENT: usize = 1 << 20;

/// How many bytes of a command or data set fit in one PDU to a peer that receives PDUs of at
/// most `peer_max_pdu_length` bytes (0: no limit); `None` when not even one byte fits. The
/// standard sets no lower bound on what a peer may announce, so a message is cut to fit it
/// rather than sent whole.
pub fn fragment_length(peer_max_pdu_length: u32) -> Option<usize> {
    match peer_max_pdu_length {
        0 => Some(LARGEST_FRAGMENT),
        max if max > PDATA_OVERHEAD => Some(((max - PDATA_OVERHEAD) as usize).min(LARGEST_FRAGMENT)),
        _ => None,
    }
}

/// A command or data set as the P-DATA-TF PDUs that carry it, each with `fragment` bytes at most
/// (see [`fragment_length`]); the last one is marked as such. An empty message is one empty PDU.
pub fn pdata_pdus(
    presentation_context_id: u8,
    value_type: PDataValueType,
    message: &[u8],
    fragment: usize,
) -> impl Iterator<Item = Pdu> + '_ {
    let count = message.len().div_ceil(fragment).max(1);
    let mut parts = message.chunks(fragment);
    (0..count).map(move |n| Pdu::PData {
        data: vec![PDataValue {
            presentation_context_id,
            value_type: value_type.clone(),
            is_last: n + 1 == count,
            data: parts.next().unwrap_or_default().to_vec(),
        }],
    })
}

fn put_header(out: &mut Vec<u8>, tag: Tag, len: u32) {
    out.extend_from_slice(&tag.group().to_le_bytes());
    out.extend_from_slice(&tag.element().to_le_bytes());
    out.extend_from_slice(&len.to_le_bytes());
}

fn put_u16(out: &mut Vec<u8>, tag: Tag, value: u16) {
    put_header(out, tag, 2);
    out.extend_from_slice(&value.to_le_bytes());
}

fn put_u32(out: &mut Vec<u8>, tag: Tag, value: u32) {
    put_header(out, tag, 4);
    out.extend_from_slice(&value.to_le_bytes());
}

fn put_text(out: &mut Vec<u8>, tag: Tag, value: &str, pad: u8) {
    let padded_len = value.len() + value.len() % 2;
    put_header(out, tag, padded_len as u32);
    out.extend_from_slice(value.as_bytes());
    if value.len() % 2 == 1 {
        out.push(pad);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn response_round_trips_through_the_parser() {
        let request = Request {
            command_field: C_STORE_RQ,
            message_id: 7,
            has_data_set: true,
            affected_sop_class_uid: Some("1.2.840.10008.5.1.4.1.1.2".into()),
            affected_sop_instance_uid: Some("1.2.3".into()),
        };
        let bytes = response(&request, status::OUT_OF_RESOURCES, Some("disk full"));
        assert_ascending_tags(&bytes);
        let obj = InMemDicomObject::read_dataset_with_ts(&bytes[..], &IMPLICIT_VR_LITTLE_ENDIAN.erased()).unwrap();
        assert_eq!(obj.element(tags::COMMAND_FIELD).unwrap().to_int::<u16>().unwrap(), 0x8001);
        assert_eq!(obj.element(tags::STATUS).unwrap().to_int::<u16>().unwrap(), 0xA700);
        assert_eq!(obj.element(tags::MESSAGE_ID_BEING_RESPONDED_TO).unwrap().to_int::<u16>().unwrap(), 7);
        assert_eq!(obj.element(tags::ERROR_COMMENT).unwrap().to_str().unwrap().trim(), "disk full");
        let group_length = obj.element(tags::COMMAND_GROUP_LENGTH).unwrap().to_int::<u32>().unwrap();
        assert_eq!(group_length as usize, bytes.len() - 12);
    }

    #[test]
    fn store_request_is_parsed() {
        let mut bytes = Vec::new();
        put_text(&mut bytes, tags::AFFECTED_SOP_CLASS_UID, "1.2.840.10008.5.1.4.1.1.2", 0);
        put_u16(&mut bytes, tags::COMMAND_FIELD, C_STORE_RQ);
        put_u16(&mut bytes, tags::MESSAGE_ID, 3);
        put_u16(&mut bytes, tags::PRIORITY, 0);
        put_u16(&mut bytes, tags::COMMAND_DATA_SET_TYPE, 0x0000);
        put_text(&mut bytes, tags::AFFECTED_SOP_INSTANCE_UID, "1.2.345", 0);
        let parsed = Request::parse(&bytes).unwrap();
        assert_eq!(parsed.command_field, C_STORE_RQ);
        assert_eq!(parsed.message_id, 3);
        assert!(parsed.has_data_set);
        assert_eq!(parsed.affected_sop_instance_uid.as_deref(), Some("1.2.345"));
        assert_eq!(parsed.affected_sop_class_uid.as_deref(), Some("1.2.840.10008.5.1.4.1.1.2"));
    }

    /// Elements must be in ascending tag order (PS3.5 7.1), or peers warn or reject the response.
    fn assert_ascending_tags(bytes: &[u8]) {
        let mut offset = 0;
        let mut previous = 0u32;
        while offset < bytes.len() {
            let group = u16::from_le_bytes([bytes[offset], bytes[offset + 1]]);
            let element = u16::from_le_bytes([bytes[offset + 2], bytes[offset + 3]]);
            let len = u32::from_le_bytes(bytes[offset + 4..offset + 8].try_into().unwrap()) as usize;
            let tag = (u32::from(group) << 16) | u32::from(element);
            assert!(offset == 0 || tag > previous, "({group:04X},{element:04X}) out of order");
            previous = tag;
            offset += 8 + len;
        }
    }

    #[test]
    fn messages_are_cut_to_the_peers_maximum_pdu_length() {
        let message: Vec<u8> = (0..=255).collect();
        for max in [13, 50, 90, 256 + 12, 4096] {
            let fragment = fragment_length(max).unwrap();
            let pdus: Vec<Pdu> = pdata_pdus(3, PDataValueType::Command, &message, fragment).collect();
            let mut joined = Vec::new();
            for (n, pdu) in pdus.iter().enumerate() {
                let mut encoded = Vec::new();
                dicom_ul::pdu::write_pdu(&mut encoded, pdu).unwrap();
                assert!(encoded.len() <= max as usize, "max {max}: a PDU of {} bytes", encoded.len());
                let Pdu::PData { data } = pdu else { panic!("{pdu:?}") };
                assert_eq!((data.len(), data[0].presentation_context_id), (1, 3));
                assert_eq!(data[0].is_last, n + 1 == pdus.len(), "max {max}, PDU {n}");
                joined.extend_from_slice(&data[0].data);
            }
            assert_eq!(joined, message, "max {max}");
        }
        assert_eq!(fragment_length(12), None);
        assert_eq!(fragment_length(0), Some(LARGEST_FRAGMENT));
        let empty: Vec<Pdu> = pdata_pdus(1, PDataValueType::Data, &[], 100).collect();
        assert!(matches!(&empty[..], [Pdu::PData { data }] if data[0].is_last && data[0].data.is_empty()));
    }

    #[test]
    fn garbage_is_an_error_not_a_panic() {
        assert!(Request::parse(&[1, 2, 3]).is_err());
        assert!(Request::parse(&[]).is_err());
    }
}
