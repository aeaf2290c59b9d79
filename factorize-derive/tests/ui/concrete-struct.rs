use dfdx::nn::modules::Linear;
use dfdx::prelude::*;
use factorize_runtime::Factorizable;

#[derive(Factorizable)]
pub struct Model {
    pub fc: Linear<1024, 1024, f32, Cpu>,
}

fn main() {}
