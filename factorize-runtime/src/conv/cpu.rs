//! The convolution as one autograd op on dfdx's `Cpu` device in f32 or f64: the tensors' buffers
//! go through the host kernel ([`super::host`]) and one backward op is put on the tape.
//!
//! The public `Module` impls stay generic over `D: Device<E>` like dfdx's own layers, and stable
//! Rust has no specialisation, so the route is chosen by type at run time: the tensors are looked
//! at as `Tensor<_, f32 | f64, Cpu>` through [`Any`]. That costs a type-id comparison; other
//! devices and dtypes get `None` and take the composed ops of [`super::gather`].

use std::any::Any;

use dfdx::prelude::*;

use super::host::{add, Element, HostConv};
use super::unfold::Geometry;

/// A backward op as the tape takes it.
type BackwardOp<E, D> = Box<dyn FnOnce(&mut Gradients<E, D>) -> Result<(), <D as HasErr>::Err>>;

/// The output of a convolution and, when a tape records, its backward op.
pub(super) struct Routed<E: Dtype, D: Storage<E>, B: Dim, const O: usize> {
    pub output: Tensor<(B, Const<O>, usize, usize), E, D>,
    pub backward: Option<BackwardOp<E, D>>,
}

/// The convolution on the host kernel in `F`, or `None` when the tensors are not `Cpu` ones
/// of element type `F`.
///
/// The tensors must be contiguous (the caller makes them so): their buffers are read as they
/// are, and gradients are written in that same layout.
#[allow(clippy::type_complexity)]
pub(super) fn on_cpu<
    F: Element + Dtype,
    const I: usize,
    const O: usize,
    const K: usize,
    const S: usize,
    const P: usize,
    const DIL: usize,
    B: Dim,
    H: Dim,
    W: Dim,
    E: Dtype,
    D: Device<E>,
>(
    x: &Tensor<(B, Const<I>, H, W), E, D>,
    weight: &Tensor<Rank4<O, I, K, K>, E, D>,
    bias: Option<&Tensor<Rank1<O>, E, D>>,
    record: bool,
) -> Option<Result<Routed<E, D, B, O>, D::Err>> {
    let x = (x as &dyn Any).downcast_ref::<Tensor<(B, Const<I>, H, W), F, Cpu>>()?;
    let weight = (weight as &dyn Any).downcast_ref::<Tensor<Rank4<O, I, K, K>, F, Cpu>>()?;
    let bias = match bias {
        Some(b) => Some((b as &dyn Any).downcast_ref::<Tensor<Rank1<O>, F, Cpu>>()?),
        None => None,
    };
    let done = run::<F, I, O, K, S, P, DIL, B, H, W>(x, weight, bias, record);
    // `E = F` and `D = Cpu` here, so this is the identity.
    let done: Box<dyn Any> = Box::new(done);
    done.downcast::<Result<Routed<E, D, B, O>, D::Err>>()
        .ok()
        .map(|done| *done)
}

/// The contiguous buffer of `t`.
fn host<S: Shape, F: Element + Dtype>(t: &Tensor<S, F, Cpu>) -> Vec<F> {
    let mut v = vec![F::default(); t.shape().num_elements()];
    t.copy_into(&mut v);
    v
}

#[allow(clippy::type_complexity)]
fn run<
    F: Element + Dtype,
    const I: usize,
    const O: usize,
    const K: usize,
    const S: usize,
    const P: usize,
    const DIL: usize,
    B: Dim,
    H: Dim,
    W: Dim,
>(
    x: &Tensor<(B, Const<I>, H, W), F, Cpu>,
    weight: &Tensor<Rank4<O, I, K, K>, F, Cpu>,
    bias: Option<&Tensor<Rank1<O>, F, Cpu>>,
    record: bool,
) -> Result<Routed<F, Cpu, B, O>, CpuError> {
    let (batch, _, h, w) = *x.shape();
    let geometry = Geometry::new(I, (h.size(), w.size()), K, S, P, DIL);
    let (xs, ws) = (host(x), host(weight));
    let conv = HostConv {
        geometry,
        out: O,
        weight: &ws,
    };
    let y = conv.forward(batch.size(), &xs, bias.map(host).as_deref());
    let shape = (batch, Const::<O>, geometry.out_height, geometry.out_width);
    let output = x.device().try_tensor_from_vec(y, shape)?;
    if !record {
        return Ok(Routed {
            output,
            backward: None,
        });
    }
    let (xg, wg, bg, yg) = (
        x.ghost(),
        weight.ghost(),
        bias.map(|b| b.ghost()),
        output.ghost(),
    );
    let backward: BackwardOp<F, Cpu> = Box::new(move |grads: &mut Gradients<F, Cpu>| {
        // Borrowed out of the gradient map while the others are written, then put back.
        let dy: Vec<F> = std::mem::take(&mut **grads.get_or_alloc_mut(&yg)?);
        let conv = HostConv {
            geometry,
            out: O,
            weight: &ws,
        };
        let params = conv.backward(batch.size(), &xs, &dy, grads.get_or_alloc_mut(&xg)?);
        add(grads.get_or_alloc_mut(&wg)?, &params.weight);
        if let Some(bg) = bg {
            add(grads.get_or_alloc_mut(&bg)?, &params.bias);
        }
        **grads.get_or_alloc_mut(&yg)? = dy;
        Ok(())
    });
    Ok(Routed {
        output,
        backward: Some(backward),
    })
}
