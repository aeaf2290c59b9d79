//! The runtime's integration tests, as one binary: one link and one instantiation of dfdx's
//! and the engines' generic code instead of one per file (the suite runs them twice, with and
//! without the `cuda` feature).

mod common;

mod conv;
mod correcting;
mod cuda;
mod engine;
mod linear;
mod real_layers;
