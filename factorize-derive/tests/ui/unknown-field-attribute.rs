use dfdx::nn::modules::Linear;
use dfdx::prelude::*;
use factorize_runtime::Factorizable;

#[derive(Factorizable)]
pub struct Model<E: Dtype, D: Device<E>> {
    #[factorize(rank = 64)]
    pub fc: Linear<512, 512, E, D>,
}

fn main() {}
