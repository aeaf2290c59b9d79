use dfdx::prelude::*;
use factorize_runtime::sequential;

sequential! {
    pub type Mlp = (dfdx::nn::modules::Linear<1024, 4096, f32, Cpu>, ReLU, Linear<4096, 1024>);
}

fn main() {
    // The alias is still declared: no second error here.
    let _ = std::mem::size_of::<Mlp>();
}
