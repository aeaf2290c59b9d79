//! Tensors to and from the host: every engine works on row-major `f64` slices, whatever the
//! model's dtype and device.

use dfdx::prelude::*;
use rayon::prelude::*;

use crate::error::FactorizeError;

/// Reads a tensor (with or without a tape) to `f64` on the host, in logical row-major order;
/// NaN where a value has no `f64` form, so that the finiteness checks catch it.
pub(crate) fn host_f64<S: Shape, E: Dtype, D: Device<E>, T>(t: &Tensor<S, E, D, T>) -> Vec<f64> {
    // dfdx's `as_vec` panics on a tensor without elements (a calibration batch of 0 rows).
    if t.shape().num_elements() == 0 {
        return Vec::new();
    }
    // `as_vec` walks the tensor element by element; a contiguous tensor (a no-op to get for
    // stored weights) is one bulk copy, converted on all cores.
    let values = match t.retaped::<NoneTape>().try_contiguous() {
        Ok(c) => {
            let mut values = touched(c.shape().num_elements());
            c.copy_into(&mut values);
            values
        }
        Err(_) => t.as_vec(),
    };
    values
        .into_par_iter()
        .map(|x| x.to_f64().unwrap_or(f64::NAN))
        .collect()
}

/// `n` default values in fresh memory touched on all cores. A large block comes from the OS
/// untouched, and each page then faults in at its first write, one by one in the thread that
/// writes it; touched on all cores, the faults are shared out.
fn touched<T: Copy + Default + Send + Sync>(n: usize) -> Vec<T> {
    let mut out = vec![T::default(); n];
    out.par_chunks_mut(1 << 16)
        .for_each(|chunk| chunk.fill(T::default()));
    out
}

/// Writes `f64` host values into a new tensor of `shape` on `dev`; a failed allocation is an
/// error naming `layer`.
pub(crate) fn to_device<S: Shape, E: Dtype, D: Device<E>>(
    dev: &D,
    values: &[f64],
    shape: S,
    layer: &str,
) -> Result<Tensor<S, E, D>, FactorizeError> {
    let data: Vec<E> = values
        .par_iter()
        .map(|&x| E::from_f64(x).unwrap_or_default())
        .collect();
    dev.try_tensor_from_vec(data, shape)
        .map_err(|e| FactorizeError::Device {
            layer: layer.to_string(),
            reason: format!("{e:?}"),
        })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn host_values_are_in_logical_order() {
        let dev: Cpu = Default::default();
        let t: Tensor<Rank2<2, 3>, f32, Cpu> = dev.tensor([[1.0, 2.0, 3.0], [4.0, 5.0, 6.0]]);
        assert_eq!(host_f64(&t), [1.0, 2.0, 3.0, 4.0, 5.0, 6.0]);
        // A permuted view shares the buffer with other strides: read as the logical 3×2.
        let p: Tensor<Rank2<3, 2>, f32, Cpu> = t.clone().permute();
        assert_eq!(host_f64(&p), [1.0, 4.0, 2.0, 5.0, 3.0, 6.0]);
        let traced: Tensor<Rank2<2, 3>, f32, Cpu, OwnedTape<f32, Cpu>> = t.leaky_trace();
        assert_eq!(host_f64(&traced), [1.0, 2.0, 3.0, 4.0, 5.0, 6.0]);
        let empty: Tensor<(usize, Const<3>), f64, Cpu> = dev.zeros_like(&(0, Const));
        assert!(host_f64(&empty).is_empty());
    }

    #[test]
    fn values_round_trip_through_a_device() {
        let dev: Cpu = Default::default();
        let t: Tensor<Rank1<3>, f32, Cpu> =
            to_device(&dev, &[0.5, -1.0, 3.0], (Const::<3>,), "fc").unwrap();
        assert_eq!(host_f64(&t), [0.5, -1.0, 3.0]);
    }
}
