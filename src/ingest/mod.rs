//! Receiving: the DICOM SCP, the durable spool it writes every acknowledged instance to, and the
//! tracker that decides when a series is complete. Also the pixel-data checks and decoders the
//! SCP runs before it answers (and the analysis reuses to load a volume).
//!
//! Uses the finding log (`store`) to record associations; knows nothing of the stages after it.

pub mod jpeg_extended;
pub mod pixel_module;
pub mod scp;
pub mod series;
pub mod spool;
