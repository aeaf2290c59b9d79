use dfdx::nn::modules::Linear;
use dfdx::prelude::*;
use factorize_runtime::Factorizable;

#[derive(Factorizable)]
pub struct Model<E: Dtype, D: Device<E>> {
    #[factorize(latent = 600)]
    pub fc: Linear<1024, 1024, E, D>,
}

fn main() {}
