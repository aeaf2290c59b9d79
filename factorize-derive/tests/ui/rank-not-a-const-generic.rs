use dfdx::nn::modules::Linear;
use dfdx::prelude::*;
use factorize_runtime::Factorizable;

#[derive(Factorizable)]
#[factorize(latent_features = RANK)]
pub struct Model<E: Dtype, D: Device<E>> {
    pub fc: Linear<512, 512, E, D>,
}

fn main() {}
