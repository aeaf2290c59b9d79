use dfdx::nn::modules::Linear;
use dfdx::prelude::*;
use factorize_runtime::Factorizable;

#[derive(Factorizable)]
pub struct Model<const N: usize, E: Dtype, D: Device<E>> {
    pub fc: Linear<N, N, E, D>,
}

fn main() {}
