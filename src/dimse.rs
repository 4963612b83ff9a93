//! DIMSE messages (PS3.7 section 9 and annex E), shared by the SCP that receives series and the
//! SCU that delivers reports: the command sets each side writes, the fields the SCP reads from
//! requests, and the P-DATA-TF PDUs that carry them. Command sets are always Implicit VR Little
//! Endian; dicom-object builds them, with their group length, so no byte is laid out by hand.

use dicom_core::{DataElement, PrimitiveValue, Tag, VR};
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
/// CommandDataSetType value of a request whose data set follows (any value but 0x0101 says so).
const DATA_SET_FOLLOWS: u16 = 0x0000;
const PRIORITY_MEDIUM: u16 = 0x0000;

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
    #[error("command set cannot be encoded: {0}")]
    Unencodable(String),
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
            obj.element(tag).ok().and_then(|e| e.to_str().ok()).map(|s| crate::common::trim_uid(&s).to_string())
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
pub fn response(request: &Request, status: u16, error_comment: Option<&str>) -> Result<Vec<u8>, CommandError> {
    let mut elements = vec![
        DataElement::new(tags::COMMAND_FIELD, VR::US, PrimitiveValue::from(request.command_field | RESPONSE_BIT)),
        DataElement::new(tags::MESSAGE_ID_BEING_RESPONDED_TO, VR::US, PrimitiveValue::from(request.message_id)),
        DataElement::new(tags::COMMAND_DATA_SET_TYPE, VR::US, PrimitiveValue::from(NO_DATA_SET)),
        DataElement::new(tags::STATUS, VR::US, PrimitiveValue::from(status)),
    ];
    if let Some(uid) = &request.affected_sop_class_uid {
        elements.push(DataElement::new(tags::AFFECTED_SOP_CLASS_UID, VR::UI, PrimitiveValue::from(uid.as_str())));
    }
    if let Some(uid) = &request.affected_sop_instance_uid {
        elements.push(DataElement::new(tags::AFFECTED_SOP_INSTANCE_UID, VR::UI, PrimitiveValue::from(uid.as_str())));
    }
    if let Some(comment) = error_comment {
        let clean: String = comment
            .chars()
            .map(|c| if c.is_ascii() && !c.is_ascii_control() && c != '\\' { c } else { ' ' })
            .take(64)
            .collect();
        elements.push(DataElement::new(tags::ERROR_COMMENT, VR::LO, PrimitiveValue::from(clean)));
    }
    encode(elements)
}

/// A C-STORE-RQ command set for one instance, priority medium, a data set following.
pub fn store_request(sop_class: &str, sop_instance: &str, message_id: u16) -> Result<Vec<u8>, CommandError> {
    encode([
        DataElement::new(tags::AFFECTED_SOP_CLASS_UID, VR::UI, PrimitiveValue::from(sop_class)),
        DataElement::new(tags::COMMAND_FIELD, VR::US, PrimitiveValue::from(C_STORE_RQ)),
        DataElement::new(tags::MESSAGE_ID, VR::US, PrimitiveValue::from(message_id)),
        DataElement::new(tags::PRIORITY, VR::US, PrimitiveValue::from(PRIORITY_MEDIUM)),
        DataElement::new(tags::COMMAND_DATA_SET_TYPE, VR::US, PrimitiveValue::from(DATA_SET_FOLLOWS)),
        DataElement::new(tags::AFFECTED_SOP_INSTANCE_UID, VR::UI, PrimitiveValue::from(sop_instance)),
    ])
}

/// The command set of `elements` (group 0000 only) with the Command Group Length dicom-object
/// computes, in ascending tag order as PS3.5 7.1 requires.
fn encode(elements: impl IntoIterator<Item = DataElement<InMemDicomObject>>) -> Result<Vec<u8>, CommandError> {
    let command = InMemDicomObject::command_from_element_iter(elements);
    let mut bytes = Vec::with_capacity(256);
    command
        .write_dataset_with_ts(&mut bytes, &IMPLICIT_VR_LITTLE_ENDIAN.erased())
        .map_err(|e| CommandError::Unencodable(e.to_string()))?;
    Ok(bytes)
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
        let bytes = response(&request, status::OUT_OF_RESOURCES, Some("disk full")).unwrap();
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
        let bytes = store_request("1.2.840.10008.5.1.4.1.1.2", "1.2.345", 3).unwrap();
        assert_ascending_tags(&bytes);
        let parsed = Request::parse(&bytes).unwrap();
        assert_eq!(parsed.command_field, C_STORE_RQ);
        assert_eq!(parsed.message_id, 3);
        assert!(parsed.has_data_set);
        assert_eq!(parsed.affected_sop_instance_uid.as_deref(), Some("1.2.345"));
        assert_eq!(parsed.affected_sop_class_uid.as_deref(), Some("1.2.840.10008.5.1.4.1.1.2"));
    }

    /// The bytes PS3.7 annex E and PS3.5 section 7 give for a C-STORE-RQ, laid out by hand here
    /// once: tag, 4-byte length, value; UIDs padded with NUL to even length; group length first.
    #[test]
    fn store_request_bytes_are_those_of_the_standard() {
        // Group length: six 8-byte headers and 26 + 2 + 2 + 2 + 2 + 8 bytes of values.
        let mut expected: Vec<u8> = vec![0, 0, 0, 0, 4, 0, 0, 0, 90, 0, 0, 0];
        let mut element = |element: u16, value: &[u8]| {
            expected.extend_from_slice(&[0, 0]);
            expected.extend_from_slice(&element.to_le_bytes());
            expected.extend_from_slice(&(value.len() as u32).to_le_bytes());
            expected.extend_from_slice(value);
        };
        element(0x0002, b"1.2.840.10008.5.1.4.1.1.2\0");
        element(0x0100, &[0x01, 0x00]);
        element(0x0110, &[0x07, 0x01]);
        element(0x0700, &[0, 0]);
        element(0x0800, &[0, 0]);
        element(0x1000, b"1.2.345\0");
        assert_eq!(store_request("1.2.840.10008.5.1.4.1.1.2", "1.2.345", 0x0107).unwrap(), expected);
    }

    #[test]
    fn an_error_comment_is_cleaned_padded_and_cut_to_64_characters() {
        let request = Request {
            command_field: C_ECHO_RQ,
            message_id: 1,
            has_data_set: false,
            affected_sop_class_uid: None,
            affected_sop_instance_uid: None,
        };
        let bytes = response(&request, status::CANNOT_UNDERSTAND, Some("a\\b\n\u{e9}")).unwrap();
        assert!(
            bytes.ends_with(&[0x00, 0x00, 0x02, 0x09, 6, 0, 0, 0, b'a', b' ', b'b', b' ', b' ', b' ']),
            "{bytes:?}"
        );
        let long = "x".repeat(100);
        let bytes = response(&request, status::CANNOT_UNDERSTAND, Some(&long)).unwrap();
        let obj = InMemDicomObject::read_dataset_with_ts(&bytes[..], &IMPLICIT_VR_LITTLE_ENDIAN.erased()).unwrap();
        assert_eq!(obj.element(tags::ERROR_COMMENT).unwrap().to_str().unwrap().len(), 64);
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
