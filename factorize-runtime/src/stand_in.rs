//! Stand-ins: while a [`Standing`] is active on a thread, each factorized layer it names
//! computes with a dense layer of its kind instead of its own factors.
//!
//! This runs the factorized variant as another model of the same architecture without building
//! one: as the dense model itself (the reference inputs of [`crate::Fit::Correcting`]), or with
//! one layer truncated to some rank (sensitivity, [`crate::sensitivity`]). Like recordings,
//! stand-ins live on the calling thread: the forward must run there.

use std::any::Any;
use std::cell::RefCell;
use std::collections::HashMap;
use std::rc::Rc;

/// A dense layer standing in for a factorized one (built by [`crate::calibrate::Refit::stand_in`]).
#[derive(Clone)]
pub struct StandIn(Rc<dyn Any>);

impl std::fmt::Debug for StandIn {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("StandIn")
    }
}

impl StandIn {
    pub(crate) fn new<M: 'static>(layer: M) -> Self {
        Self(Rc::new(layer))
    }
}

/// The forward of a pair's dense stand-in `M` on the pair's input `T`, giving the pair's output.
///
/// Stated as a bound on the pair's *latent* type (implemented for every type) rather than as
/// `M: Module<T>` on the pair's `Module` impl: a bound on the latent is not reported when the
/// input already fails the pair's first map, so a wrong input is one compile error, not two.
pub trait DenseRoute<M, T, Out, Err> {
    /// `dense.try_forward(x)`.
    fn dense_forward(dense: &M, x: T) -> Result<Out, Err>;
}

impl<U, M: dfdx::nn::Module<T, Output = Out, Error = Err>, T, Out, Err> DenseRoute<M, T, Out, Err>
    for U
{
    fn dense_forward(dense: &M, x: T) -> Result<Out, Err> {
        dense.try_forward(x)
    }
}

/// Stand-ins by layer address.
pub(crate) type StandIns = HashMap<usize, StandIn>;

thread_local! {
    static ACTIVE: RefCell<StandIns> = RefCell::new(HashMap::new());
}

/// Makes `layers` stand in on this thread until dropped.
pub(crate) struct Standing;

impl Standing {
    pub(crate) fn start(layers: &StandIns) -> Self {
        ACTIVE.with(|a| *a.borrow_mut() = layers.clone());
        Standing
    }
}

impl Drop for Standing {
    fn drop(&mut self) {
        ACTIVE.with(|a| a.borrow_mut().clear());
    }
}

/// The dense layer standing in for the layer at `address`, if any (a cheap clone: dfdx tensors
/// share their buffers).
pub(crate) fn stand_in<M: Clone + 'static>(address: usize) -> Option<M> {
    ACTIVE.with(|a| {
        let active = a.borrow();
        if active.is_empty() {
            return None;
        }
        active.get(&address)?.0.downcast_ref::<M>().cloned()
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn stand_ins_live_until_dropped_and_only_by_type_and_address() {
        let layers: StandIns = [(7, StandIn::new(3.5f64))].into_iter().collect();
        assert_eq!(stand_in::<f64>(7), None);
        {
            let _standing = Standing::start(&layers);
            assert_eq!(stand_in::<f64>(7), Some(3.5));
            assert_eq!(stand_in::<f32>(7), None);
            assert_eq!(stand_in::<f64>(8), None);
        }
        assert_eq!(stand_in::<f64>(7), None);
    }
}
