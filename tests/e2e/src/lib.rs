//! Helpers shared by the end-to-end tests: reaching the local cluster.
