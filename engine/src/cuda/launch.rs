//! Launch configurations for the NVRTC kernels.
