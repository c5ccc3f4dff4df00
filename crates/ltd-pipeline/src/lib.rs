//! ltd-pipeline
