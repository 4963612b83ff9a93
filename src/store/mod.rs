//! The finding log (PostgreSQL or SQLite) and the audit trail written through it. Every stage
//! records into it; it depends on no stage.

pub mod audit;
pub mod db;
