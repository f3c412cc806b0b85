//! The CUDA engine (cudarc 0.19, libraries loaded at run time).
