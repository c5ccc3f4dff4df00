//! ltd-scheduler
