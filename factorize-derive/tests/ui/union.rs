use factorize_runtime::Factorizable;

#[derive(Factorizable)]
pub union Model {
    a: u32,
}

fn main() {}
