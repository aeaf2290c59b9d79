//! The convolution and its gradients on host slices: each image is unfolded band by band and
//! multiplied by the weight with faer's GEMM, images in parallel.
//!
//! Layouts are PyTorch's, row-major: images `B × C × H × W`, outputs `B × O × OH × OW`, the
//! weight `[O, C·K·K]` (the flattened `[O, C, K, K]`). A `1 × 1` convolution with stride 1 and
//! no padding multiplies the images directly; every other one goes through
//! [`Geometry::unfold`] one band of output rows at a time, so the unfolded band stays in cache
//! instead of materialising the whole `C·K·K × OH·OW` matrix of every image.

use std::ops::{AddAssign, Range};

use faer::linalg::matmul::matmul;
use faer::{Accum, MatMut, MatRef, Par};
use rayon::prelude::*;

use super::unfold::Geometry;
use crate::engine::Real;

/// Size of one unfolded band: large enough for full-speed GEMM panels, small enough to stay in
/// a core's L2 cache between being written and being read.
const BAND_BYTES: usize = 1 << 20;

/// The element types the host convolution computes in (f32 and f64).
pub(crate) trait Element: Real + Default + AddAssign + Send + Sync {}

impl<F: Real + Default + AddAssign + Send + Sync> Element for F {}

/// `into += values`, element by element.
pub(crate) fn add<F: Element>(into: &mut [F], values: &[F]) {
    for (t, &v) in into.iter_mut().zip(values) {
        *t += v;
    }
}

/// One convolution: its geometry for the current image size and its weight.
pub(crate) struct HostConv<'a, F> {
    pub geometry: Geometry,
    /// Output channels.
    pub out: usize,
    /// `[out, C·K·K]`, row-major.
    pub weight: &'a [F],
}

/// Gradients of the weight (`[O, C·K·K]`) and of the bias (`[O]`), summed over the batch.
pub(crate) struct ParameterGradients<F> {
    pub weight: Vec<F>,
    pub bias: Vec<F>,
}

impl<F: Element> HostConv<'_, F> {
    /// Output rows per band.
    fn band_rows(&self) -> usize {
        let g = &self.geometry;
        let per_row = g.fan_in() * g.out_width * std::mem::size_of::<F>();
        (BAND_BYTES / per_row.max(1)).clamp(1, g.out_height.max(1))
    }

    fn bands(&self) -> impl Iterator<Item = Range<usize>> {
        let (step, end) = (self.band_rows(), self.geometry.out_height);
        (0..end)
            .step_by(step)
            .map(move |start| start..(start + step).min(end))
    }

    fn weight(&self) -> MatRef<'_, F> {
        MatRef::from_row_major_slice(self.weight, self.out, self.geometry.fan_in())
    }

    /// The outputs of `batch` images `x` (`B × C × H × W`), with `bias` (`[O]`) if given.
    pub fn forward(&self, batch: usize, x: &[F], bias: Option<&[F]>) -> Vec<F> {
        let g = &self.geometry;
        let item = self.out * g.positions();
        let mut y = vec![F::default(); batch * item];
        if y.is_empty() {
            return y;
        }
        if let Some(bias) = bias {
            for image in y.chunks_exact_mut(item) {
                for (plane, &b) in image.chunks_exact_mut(g.positions()).zip(bias) {
                    plane.fill(b);
                }
            }
        }
        if g.image_len() == 0 {
            // An empty image (zero height or width) under padding: every tap reads padding.
            return y;
        }
        let images = x.chunks_exact(g.image_len());
        if batch >= rayon::current_num_threads() {
            y.par_chunks_exact_mut(item)
                .zip(x.par_chunks_exact(g.image_len()))
                .for_each_init(Vec::new, |band, (y, x)| {
                    self.forward_image(x, y, band, Par::Seq)
                });
        } else {
            let mut band = Vec::new();
            crate::pool::run(|| {
                for (y, x) in y.chunks_exact_mut(item).zip(images) {
                    self.forward_image(x, y, &mut band, Par::rayon(0));
                }
            });
        }
        y
    }

    /// Adds the convolution of one image to `y` (`O × OH·OW`).
    fn forward_image(&self, x: &[F], y: &mut [F], band: &mut Vec<F>, par: Par) {
        let g = &self.geometry;
        let (one, width) = (F::of(1.0), g.out_width);
        let mut y = MatMut::from_row_major_slice_mut(y, self.out, g.positions());
        if g.is_pointwise() {
            let x = MatRef::from_row_major_slice(x, g.channels, g.positions());
            matmul(y, Accum::Add, self.weight(), x, one, par);
            return;
        }
        for rows in self.bands() {
            let n = rows.len() * width;
            band.resize(g.fan_in() * n, F::default());
            g.unfold(x, rows.clone(), band);
            let unfolded = MatRef::from_row_major_slice(band, g.fan_in(), n);
            let y = y.as_mut().subcols_mut(rows.start * width, n);
            matmul(y, Accum::Add, self.weight(), unfolded, one, par);
        }
    }

    /// Backpropagates the output gradient `dy` (`B × O × OH × OW`) of the images `x`: adds the
    /// input gradient to `dx` and returns the parameter gradients.
    ///
    /// Images are split into one contiguous group per thread; the groups' parameter gradients
    /// are summed in group order, so the result does not depend on scheduling.
    pub fn backward(&self, batch: usize, x: &[F], dy: &[F], dx: &mut [F]) -> ParameterGradients<F> {
        let g = &self.geometry;
        let (item, fan_in) = (self.out * g.positions(), g.fan_in());
        let mut total = ParameterGradients {
            weight: vec![F::default(); self.out * fan_in],
            bias: vec![F::default(); self.out],
        };
        if batch == 0 || item == 0 {
            return total;
        }
        if g.image_len() == 0 {
            // Only the bias reached the outputs.
            // Planes come image by image, output channel by output channel.
            for (k, plane) in dy.chunks_exact(g.positions()).enumerate() {
                for &v in plane {
                    total.bias[k % self.out] += v;
                }
            }
            return total;
        }
        let groups = rayon::current_num_threads().clamp(1, batch);
        let per_group = batch.div_ceil(groups);
        let par = if groups > 1 { Par::Seq } else { Par::rayon(0) };
        // In the faer pool: a single group multiplies with `Par::rayon` (see `crate::pool`).
        let partial: Vec<ParameterGradients<F>> = crate::pool::run(|| {
            dx.par_chunks_mut(per_group * g.image_len())
                .zip(x.par_chunks(per_group * g.image_len()))
                .zip(dy.par_chunks(per_group * item))
                .map(|((dx, x), dy)| {
                    let mut sums = ParameterGradients {
                        weight: vec![F::default(); self.out * fan_in],
                        bias: vec![F::default(); self.out],
                    };
                    let mut band = Vec::new();
                    let images = dx
                        .chunks_exact_mut(g.image_len())
                        .zip(x.chunks_exact(g.image_len()))
                        .zip(dy.chunks_exact(item));
                    for ((dx, x), dy) in images {
                        self.backward_image(x, dy, dx, &mut sums, &mut band, par);
                    }
                    sums
                })
                .collect()
        });
        for part in partial {
            add(&mut total.weight, &part.weight);
            add(&mut total.bias, &part.bias);
        }
        total
    }

    /// One image's share of [`HostConv::backward`].
    fn backward_image(
        &self,
        x: &[F],
        dy: &[F],
        dx: &mut [F],
        sums: &mut ParameterGradients<F>,
        band: &mut Vec<F>,
        par: Par,
    ) {
        let g = &self.geometry;
        let (one, width, fan_in) = (F::of(1.0), g.out_width, g.fan_in());
        for (b, plane) in sums.bias.iter_mut().zip(dy.chunks_exact(g.positions())) {
            for &v in plane {
                *b += v;
            }
        }
        let dy = MatRef::from_row_major_slice(dy, self.out, g.positions());
        let mut dw = MatMut::from_row_major_slice_mut(&mut sums.weight, self.out, fan_in);
        let w = self.weight();
        if g.is_pointwise() {
            let x = MatRef::from_row_major_slice(x, g.channels, g.positions());
            matmul(dw, Accum::Add, dy, x.transpose(), one, par);
            let dx = MatMut::from_row_major_slice_mut(dx, g.channels, g.positions());
            matmul(dx, Accum::Add, w.transpose(), dy, one, par);
            return;
        }
        for rows in self.bands() {
            let n = rows.len() * width;
            band.resize(fan_in * n, F::default());
            g.unfold(x, rows.clone(), band);
            let dy = dy.subcols(rows.start * width, n);
            let unfolded = MatRef::from_row_major_slice(band, fan_in, n);
            matmul(dw.as_mut(), Accum::Add, dy, unfolded.transpose(), one, par);
            // The band is free again: it takes the gradient of the unfolded matrix.
            let dband = MatMut::from_row_major_slice_mut(band, fan_in, n);
            matmul(dband, Accum::Replace, w.transpose(), dy, one, par);
            g.fold(band, rows, dx);
        }
    }
}
