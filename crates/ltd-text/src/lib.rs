//! ltd-text
