//! Model loading, inference engines and the dynamic batcher core. Knows
//! nothing about gRPC or Kubernetes.
