//! On-disk cache of NVRTC-compiled PTX.
