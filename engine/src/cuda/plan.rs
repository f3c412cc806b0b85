//! Device memory planning for activations.
