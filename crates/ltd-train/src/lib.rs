//! ltd-train
