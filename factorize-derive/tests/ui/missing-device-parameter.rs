use dfdx::prelude::*;
use factorize_runtime::Factorizable;

#[derive(Factorizable)]
pub struct Model<E: Dtype> {
    pub x: core::marker::PhantomData<E>,
}

fn main() {}
