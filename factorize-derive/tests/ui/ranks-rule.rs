use dfdx::nn::modules::Linear;
use dfdx::prelude::*;
use factorize_runtime::Factorizable;

// Paths are relative to the crate's Cargo.toml; trybuild builds from target/tests/trybuild/.
#[derive(Factorizable)]
#[factorize(ranks = "../../../../factorize-derive/tests/ui/ranks/bad.ranks")]
pub struct Model<E: Dtype, D: Device<E>> {
    pub fc: Linear<1024, 1024, E, D>,
}

fn main() {}
