//! IDAICS agent: receives spine CT series over DICOM, classifies each intervertebral disc with a
//! YOLOv8-seg network and reports the findings back to the PACS.
//!
//! Modules follow the data flow, and imports point one way, down this list:
//! - [`common`], [`agreement`], [`geometry`], [`dimse`], [`systemd`], [`config`], [`tls`]: what every
//!   stage may use;
//! - [`store`]: the finding log every stage records into;
//! - [`ingest`]: the SCP, the spool and the series decisions;
//! - [`analysis`]: volume, disc levels, slices, the network, findings;
//! - [`report`]: the DICOM objects written and delivered to the PACS;
//! - [`pipeline`]: the job worker that takes a decided series through analysis and report;
//! - [`http`], [`service`], [`cli`] and the tools ([`demo`], [`dataset`], [`evaluation`],
//!   [`phantom`], [`synthetic`]) on top.
//!
//! `tests/module_graph.rs` checks that no import runs back up.

pub mod agreement;
pub mod analysis;
pub mod cli;
pub mod common;
pub mod config;
pub mod dataset;
pub mod demo;
pub mod dimse;
pub mod evaluation;
pub mod geometry;
pub mod http;
pub mod ingest;
pub mod phantom;
pub mod pipeline;
pub mod report;
pub mod service;
pub mod store;
pub mod synthetic;
pub mod systemd;
pub mod tls;
