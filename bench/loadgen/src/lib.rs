//! Pieces of the serving-layer benchmark's load generator that need no
//! network: the open-loop arrival schedule, latency summaries, and the OIP v2
//! request bodies (gRPC message and REST binary-extension body).

pub mod request;
pub mod schedule;
pub mod summary;
