//! NVRTC kernel sources (CUDA C as Rust string constants).
