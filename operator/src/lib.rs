//! The InferencePipeline API types and the operator's reconcile core.
