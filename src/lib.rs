//! IDAICS agent: receives spine CT series over DICOM, classifies each intervertebral disc with a
//! YOLOv8-seg network and reports the findings back to the PACS.
//!
//! Modules follow the data flow: [`scp`] receives instances into the [`spool`], [`series`]
//! decides when a series is complete; the analysis stages attach to the decisions it emits.

pub mod audit;
pub mod cli;
pub mod config;
pub mod dataset;
pub mod db;
pub mod demo;
pub mod detector;
pub mod evaluation;
pub mod findings;
pub mod geometry;
pub mod http;
pub mod jpeg_extended;
pub mod nifti;
pub mod phantom;
pub mod pipeline;
pub mod pixel_module;
pub mod report;
pub mod scp;
pub mod scu;
pub mod series;
pub mod service;
pub mod slices;
pub mod spine;
pub mod spool;
pub mod synthetic;
pub mod systemd;
pub mod tls;
pub mod volume;
