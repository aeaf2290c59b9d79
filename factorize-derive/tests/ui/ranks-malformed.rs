use dfdx::nn::modules::{Linear, ReLU};
use dfdx::prelude::*;
use factorize_runtime::Factorizable;

// Paths are relative to the crate's Cargo.toml; trybuild builds from target/tests/trybuild/.
// Every line of the file is one mistake, and each is its own error at the literal.
#[derive(Factorizable)]
#[factorize(ranks = "../../../../factorize-derive/tests/ui/ranks/malformed.ranks")]
pub struct Model<E: Dtype, D: Device<E>> {
    pub fc: Linear<1024, 1024, E, D>,
    pub act: ReLU,
    #[factorize(latent = 32)]
    pub proj: Linear<1024, 1024, E, D>,
}

#[derive(Factorizable)]
#[factorize(
    ranks = "../../../../factorize-derive/tests/ui/ranks/prefixed.ranks",
    ranks_prefix = "head"
)]
pub struct Head<E: Dtype, D: Device<E>> {
    pub out: Linear<1024, 1024, E, D>,
}

#[derive(Factorizable)]
#[factorize(ranks_prefix = "head")]
pub struct NoFile<E: Dtype, D: Device<E>> {
    pub out: Linear<1024, 1024, E, D>,
}

fn main() {}
