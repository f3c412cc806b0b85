//! The InferencePipeline API types and the operator's reconcile core.
//!
//! Pure layers (`crd`, `validate`, `build`, `status`) are free of I/O; `controller`, `leader`
//! and `metrics` are the edges that talk to the API server and the network.

pub mod applied;
pub mod autoscale;
pub mod build;
pub mod cache;
pub mod client;
pub mod control_auth;
pub mod controller;
pub mod crd;
pub mod events;
pub mod leader;
pub mod metrics;
pub mod ownership;
pub mod quantity;
pub mod reference;
pub mod rollout;
pub mod router;
pub mod routing;
pub mod skew;
pub mod status;
pub mod summary;
pub mod validate;
pub mod workqueue;

#[cfg(test)]
mod test_fixtures;
