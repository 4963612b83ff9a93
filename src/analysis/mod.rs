//! Analysis of a decided series: its volume, the disc levels, the slices the network sees, the
//! network itself and the fusion of its two views into one finding per level.
//!
//! Reads the spool's files (`ingest`); writes nothing the other stages keep: `pipeline` hands its
//! results to `report` and `store`.

pub mod detector;
pub mod findings;
pub mod nifti;
pub mod slices;
pub mod spine;
pub mod volume;
