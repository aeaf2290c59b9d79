use dfdx::nn::modules::Linear;
use dfdx::prelude::*;
use factorize_runtime::Factorizable;

#[derive(Factorizable)]
pub enum Model<E: Dtype, D: Device<E>> {
    A(Linear<512, 512, E, D>),
}

fn main() {}
