//! The geometry of a convolution and its unfolding (im2col) and folding (col2im) on host
//! slices.
//!
//! One image is `C × H × W`, row-major. Its unfolded matrix has one row per `(channel, kernel
//! row, kernel column)`, in the order of the flattened weight `[O, C, K, K]`, and one column per
//! output position `(i, j)`, row-major; an entry is the input pixel that kernel offset reads at
//! that position, or zero in the padding. So the convolution of one image is the product
//! `weight[O, C·K·K] × unfolded[C·K·K, OH·OW]`, already in `O × OH × OW` layout.
//!
//! Both directions work on a band of whole output rows, so that callers can keep the unfolded
//! band small enough to stay in cache.

use std::ops::Range;

/// Sizes, stride, padding and dilation of one convolution over one image size.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) struct Geometry {
    pub channels: usize,
    pub height: usize,
    pub width: usize,
    pub kernel: usize,
    pub stride: usize,
    pub padding: usize,
    pub dilation: usize,
    /// Output height (PyTorch's formula; 0 when the dilated kernel does not fit).
    pub out_height: usize,
    /// Output width.
    pub out_width: usize,
}

impl Geometry {
    pub fn new(
        channels: usize,
        (height, width): (usize, usize),
        kernel: usize,
        stride: usize,
        padding: usize,
        dilation: usize,
    ) -> Self {
        Self {
            channels,
            height,
            width,
            kernel,
            stride,
            padding,
            dilation,
            out_height: super::output_size(height, kernel, stride, padding, dilation),
            out_width: super::output_size(width, kernel, stride, padding, dilation),
        }
    }

    /// Rows of the unfolded matrix: `C·K·K`, the fan-in.
    pub fn fan_in(&self) -> usize {
        self.channels * self.kernel * self.kernel
    }

    /// Output positions of one image: `OH·OW`.
    pub fn positions(&self) -> usize {
        self.out_height * self.out_width
    }

    /// Pixels of one input image: `C·H·W`.
    pub fn image_len(&self) -> usize {
        self.channels * self.height * self.width
    }

    /// Whether the unfolded matrix is the image itself (`1 × 1`, stride 1, no padding).
    pub fn is_pointwise(&self) -> bool {
        self.kernel == 1 && self.stride == 1 && self.padding == 0
    }

    /// The output columns `j` at which kernel column `q` reads inside the image, and the input
    /// column it reads at the first of them.
    fn columns(&self, q: usize) -> (Range<usize>, usize) {
        let shift = self.dilation * q;
        // First j with stride·j + shift ≥ padding, last with stride·j + shift < width + padding.
        let first = self.padding.saturating_sub(shift).div_ceil(self.stride);
        let end = (self.width + self.padding)
            .saturating_sub(shift)
            .div_ceil(self.stride);
        let first = first.min(self.out_width);
        let range = first..end.clamp(first, self.out_width);
        let source = (self.stride * range.start + shift).saturating_sub(self.padding);
        (range, source)
    }

    /// The input row that kernel row `a` reads at output row `i`, if inside the image.
    fn row(&self, i: usize, a: usize) -> Option<usize> {
        (self.stride * i + self.dilation * a)
            .checked_sub(self.padding)
            .filter(|&r| r < self.height)
    }

    /// Writes the unfolded columns of output rows `rows` of `image` into `band`
    /// (`C·K·K × rows.len()·OW`, row-major).
    pub fn unfold<F: Copy + Default>(&self, image: &[F], rows: Range<usize>, band: &mut [F]) {
        let n = rows.len() * self.out_width;
        if n == 0 {
            return;
        }
        let (k, plane) = (self.kernel, self.height * self.width);
        for (index, out) in band.chunks_exact_mut(n).take(self.fan_in()).enumerate() {
            let (c, a, q) = (index / (k * k), index / k % k, index % k);
            let image = &image[c * plane..(c + 1) * plane];
            let (valid, source) = self.columns(q);
            for (i, line) in rows.clone().zip(out.chunks_exact_mut(self.out_width)) {
                let Some(r) = self.row(i, a) else {
                    line.fill(F::default());
                    continue;
                };
                let src = &image[r * self.width..(r + 1) * self.width];
                line[..valid.start].fill(F::default());
                line[valid.end..].fill(F::default());
                let line = &mut line[valid.clone()];
                if self.stride == 1 {
                    line.copy_from_slice(&src[source..source + line.len()]);
                } else {
                    for (t, v) in line.iter_mut().enumerate() {
                        *v = src[source + self.stride * t];
                    }
                }
            }
        }
    }

    /// Adds the unfolded columns `band` of output rows `rows` back onto `image`: the transpose
    /// of [`Geometry::unfold`], so padding entries are dropped and overlapping patches add up.
    pub fn fold<F: Copy + std::ops::AddAssign>(
        &self,
        band: &[F],
        rows: Range<usize>,
        image: &mut [F],
    ) {
        let n = rows.len() * self.out_width;
        if n == 0 {
            return;
        }
        let (k, plane) = (self.kernel, self.height * self.width);
        for (index, src) in band.chunks_exact(n).take(self.fan_in()).enumerate() {
            let (c, a, q) = (index / (k * k), index / k % k, index % k);
            let image = &mut image[c * plane..(c + 1) * plane];
            let (valid, target) = self.columns(q);
            for (i, line) in rows.clone().zip(src.chunks_exact(self.out_width)) {
                let Some(r) = self.row(i, a) else { continue };
                let dst = &mut image[r * self.width..(r + 1) * self.width];
                for (t, &v) in line[valid.clone()].iter().enumerate() {
                    dst[target + self.stride * t] += v;
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The unfolded matrix by its definition.
    fn by_definition(g: &Geometry, image: &[f64]) -> Vec<f64> {
        let (k, n) = (g.kernel, g.positions());
        let mut out = vec![0.0; g.fan_in() * n];
        for c in 0..g.channels {
            for a in 0..k {
                for q in 0..k {
                    for i in 0..g.out_height {
                        for j in 0..g.out_width {
                            let r = (g.stride * i + g.dilation * a) as isize - g.padding as isize;
                            let s = (g.stride * j + g.dilation * q) as isize - g.padding as isize;
                            if r >= 0 && s >= 0 && (r as usize) < g.height && (s as usize) < g.width
                            {
                                out[((c * k + a) * k + q) * n + i * g.out_width + j] =
                                    image[(c * g.height + r as usize) * g.width + s as usize];
                            }
                        }
                    }
                }
            }
        }
        out
    }

    fn geometries() -> Vec<Geometry> {
        let mut all = Vec::new();
        for (h, w) in [(7, 9), (1, 1), (2, 5), (8, 8)] {
            for k in [1, 2, 3, 5] {
                for s in [1, 2, 3] {
                    for p in [0, 1, 3] {
                        for d in [1, 2] {
                            all.push(Geometry::new(2, (h, w), k, s, p, d));
                        }
                    }
                }
            }
        }
        all
    }

    #[test]
    fn unfolding_by_bands_matches_the_definition() {
        for g in geometries() {
            let image: Vec<f64> = (0..g.image_len()).map(|v| v as f64 + 1.0).collect();
            let want = by_definition(&g, &image);
            // Bands of two output rows, reassembled.
            let mut got = vec![f64::NAN; want.len()];
            let mut start = 0;
            while start < g.out_height {
                let rows = start..(start + 2).min(g.out_height);
                let mut band = vec![f64::NAN; g.fan_in() * rows.len() * g.out_width];
                g.unfold(&image, rows.clone(), &mut band);
                let n = rows.len() * g.out_width;
                for (row, chunk) in band.chunks_exact(n).enumerate() {
                    let at = row * g.positions() + start * g.out_width;
                    got[at..at + n].copy_from_slice(chunk);
                }
                start = rows.end;
            }
            assert_eq!(got, want, "{g:?}");
        }
    }

    #[test]
    fn folding_is_the_transpose_of_unfolding() {
        // ⟨unfold(x), u⟩ = ⟨x, fold(u)⟩ for all x, u, checked on basis-like integer data.
        for g in geometries() {
            let rows = 0..g.out_height;
            let image: Vec<f64> = (0..g.image_len()).map(|v| (v % 7) as f64 - 3.0).collect();
            let band: Vec<f64> = (0..g.fan_in() * g.positions())
                .map(|v| (v % 5) as f64 - 2.0)
                .collect();
            let mut unfolded = vec![0.0; band.len()];
            g.unfold(&image, rows.clone(), &mut unfolded);
            let mut folded = vec![0.0; image.len()];
            g.fold(&band, rows, &mut folded);
            let left: f64 = unfolded.iter().zip(&band).map(|(a, b)| a * b).sum();
            let right: f64 = image.iter().zip(&folded).map(|(a, b)| a * b).sum();
            assert_eq!(left, right, "{g:?}");
        }
    }
}
