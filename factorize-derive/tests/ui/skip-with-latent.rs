use dfdx::nn::modules::Linear;
use dfdx::prelude::*;
use factorize_runtime::Factorizable;

#[derive(Factorizable)]
pub struct Model<E: Dtype, D: Device<E>> {
    #[factorize(skip, latent = 64)]
    pub fc: Linear<512, 512, E, D>,
}

fn main() {}
