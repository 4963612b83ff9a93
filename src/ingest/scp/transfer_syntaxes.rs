//! The transfer syntaxes the SCP accepts: exactly those whose pixel data this build decodes
//! fully, so that nothing is acknowledged that the pipeline cannot read.
//!
//! JPEG Extended (1.2.840.10008.1.2.4.51) in its 12-bit form, the one CT uses, is not decoded by
//! dicom-pixeldata 0.10's JPEG decoder; [`crate::ingest::jpeg_extended`] decodes it (grayscale).

use crate::ingest::scp::STORAGE_SOP_CLASSES;

/// (UID, name) in our order of preference.
pub const ACCEPTED: &[(&str, &str)] = &[
    ("1.2.840.10008.1.2.1", "Explicit VR Little Endian"),
    ("1.2.840.10008.1.2", "Implicit VR Little Endian"),
    ("1.2.840.10008.1.2.2", "Explicit VR Big Endian"),
    ("1.2.840.10008.1.2.1.99", "Deflated Explicit VR Little Endian"),
    ("1.2.840.10008.1.2.4.50", "JPEG Baseline (Process 1)"),
    ("1.2.840.10008.1.2.4.51", "JPEG Extended (Process 2 & 4)"),
    ("1.2.840.10008.1.2.4.57", "JPEG Lossless (Process 14)"),
    ("1.2.840.10008.1.2.4.70", "JPEG Lossless SV1 (Process 14, selection value 1)"),
    ("1.2.840.10008.1.2.4.80", "JPEG-LS Lossless"),
    ("1.2.840.10008.1.2.4.81", "JPEG-LS Near-Lossless"),
    ("1.2.840.10008.1.2.4.90", "JPEG 2000 Lossless Only"),
    ("1.2.840.10008.1.2.4.91", "JPEG 2000"),
    ("1.2.840.10008.1.2.4.201", "HTJ2K Lossless"),
    ("1.2.840.10008.1.2.4.202", "HTJ2K with RPCL Options Lossless"),
    ("1.2.840.10008.1.2.4.203", "HTJ2K"),
    ("1.2.840.10008.1.2.5", "RLE Lossless"),
];

/// Human-readable transfer syntax name for logs.
pub fn name(uid: &str) -> &str {
    let uid = crate::common::trim_uid(uid);
    ACCEPTED.iter().find(|(u, _)| *u == uid).map_or(uid, |(_, n)| n)
}

/// Human-readable SOP class name for logs. Classes this agent never serves (a query, a
/// retrieve) are named from the standard's registry, so a log says what the peer wanted.
pub fn short_sop_name(uid: &str) -> &str {
    use dicom_core::dictionary::UidDictionary;
    let uid = crate::common::trim_uid(uid);
    if uid == dicom_dictionary_std::uids::VERIFICATION {
        return "Verification";
    }
    STORAGE_SOP_CLASSES
        .iter()
        .find(|(u, _)| *u == uid)
        .map(|(_, n)| *n)
        .unwrap_or_else(|| dicom_dictionary_std::StandardSopClassDictionary.by_uid(uid).map_or(uid, |entry| entry.name))
}

#[cfg(test)]
mod tests {
    use super::*;
    use dicom_encoding::TransferSyntaxIndex;
    use dicom_transfer_syntax_registry::TransferSyntaxRegistry;

    #[test]
    fn every_accepted_syntax_is_decodable_by_this_build() {
        for (uid, name) in ACCEPTED {
            let ts = TransferSyntaxRegistry.get(uid).unwrap_or_else(|| panic!("{name} not registered"));
            assert!(ts.can_decode_all(), "{name} ({uid}) cannot be decoded by this build");
        }
    }

    #[test]
    fn ct_classes_are_storage_classes() {
        for uid in crate::ingest::scp::CT_SOP_CLASSES {
            assert!(STORAGE_SOP_CLASSES.iter().any(|(u, _)| u == uid));
        }
        assert_eq!(short_sop_name("1.2.840.10008.5.1.4.1.1.2"), "CT Image Storage");
        assert_eq!(short_sop_name("1.2.840.10008.5.1.4.1.2.2.1"), "Study Root Query/Retrieve Information Model - FIND");
        assert_eq!(short_sop_name("1.2.3.4"), "1.2.3.4");
    }
}
