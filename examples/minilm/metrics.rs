//! How close a variant's sentence embeddings are to the dense model's.
//!
//! Embeddings are rows of a row-major `[n, HIDDEN]` matrix, L2-normalised, so the cosine of two
//! is their dot product.

use crate::bert::HIDDEN;

/// Fidelity of `ours` to `reference` (same sentences, same order).
#[derive(Debug, Clone, Copy)]
pub struct Fidelity {
    /// Mean over sentences of cos(ours_i, reference_i).
    pub mean_cosine: f64,
    /// Its minimum.
    pub min_cosine: f64,
    /// Share of sentences whose most similar other sentence is the same under both.
    pub neighbour_agreement: f64,
    /// Spearman correlation of all pairwise similarities (i < j).
    pub spearman: f64,
}

impl Fidelity {
    /// A table cell: mean cosine to `digits` decimals / nearest-neighbour agreement in percent.
    pub fn cell(&self, digits: usize) -> String {
        format!(
            "{:.digits$} / {:.0}%",
            self.mean_cosine,
            100.0 * self.neighbour_agreement
        )
    }
}

fn row(m: &[f32], i: usize) -> &[f32] {
    &m[i * HIDDEN..(i + 1) * HIDDEN]
}

fn dot(a: &[f32], b: &[f32]) -> f64 {
    a.iter().zip(b).map(|(x, y)| *x as f64 * *y as f64).sum()
}

/// The most similar other row of each row.
fn nearest(m: &[f32], n: usize) -> Vec<usize> {
    (0..n)
        .map(|i| {
            (0..n)
                .filter(|&j| j != i)
                .map(|j| (j, dot(row(m, i), row(m, j))))
                .fold(
                    (i, f64::NEG_INFINITY),
                    |best, c| if c.1 > best.1 { c } else { best },
                )
                .0
        })
        .collect()
}

/// Ranks from 1, ties given their mean rank.
fn ranks(values: &[f64]) -> Vec<f64> {
    let mut order: Vec<usize> = (0..values.len()).collect();
    order.sort_by(|&a, &b| values[a].total_cmp(&values[b]));
    let mut r = vec![0.0; values.len()];
    let mut i = 0;
    while i < order.len() {
        let mut j = i;
        while j + 1 < order.len() && values[order[j + 1]] == values[order[i]] {
            j += 1;
        }
        let mean = (i + j) as f64 / 2.0 + 1.0;
        for &k in &order[i..=j] {
            r[k] = mean;
        }
        i = j + 1;
    }
    r
}

fn pearson(a: &[f64], b: &[f64]) -> f64 {
    let n = a.len() as f64;
    let (ma, mb) = (a.iter().sum::<f64>() / n, b.iter().sum::<f64>() / n);
    let cov: f64 = a.iter().zip(b).map(|(x, y)| (x - ma) * (y - mb)).sum();
    let va: f64 = a.iter().map(|x| (x - ma).powi(2)).sum();
    let vb: f64 = b.iter().map(|y| (y - mb).powi(2)).sum();
    cov / (va * vb).sqrt()
}

/// Spearman's rank correlation.
pub fn spearman(a: &[f64], b: &[f64]) -> f64 {
    pearson(&ranks(a), &ranks(b))
}

/// Compares `ours` with `reference`, both `[n, HIDDEN]`.
pub fn fidelity(ours: &[f32], reference: &[f32]) -> Fidelity {
    assert_eq!(
        ours.len(),
        reference.len(),
        "embeddings of different counts"
    );
    let n = ours.len() / HIDDEN;
    let cosines: Vec<f64> = (0..n)
        .map(|i| dot(row(ours, i), row(reference, i)))
        .collect();
    let (a, b) = (nearest(ours, n), nearest(reference, n));
    let agree = a.iter().zip(&b).filter(|(x, y)| x == y).count();
    let pairs = |m: &[f32]| -> Vec<f64> {
        (0..n)
            .flat_map(|i| (i + 1..n).map(move |j| (i, j)))
            .map(|(i, j)| dot(row(m, i), row(m, j)))
            .collect()
    };
    Fidelity {
        mean_cosine: cosines.iter().sum::<f64>() / n as f64,
        min_cosine: cosines.iter().copied().fold(f64::INFINITY, f64::min),
        neighbour_agreement: agree as f64 / n as f64,
        spearman: spearman(&pairs(ours), &pairs(reference)),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn spearman_of_a_monotone_map_is_one_and_ties_share_ranks() {
        let a = [0.1, 0.5, 0.3, 0.9];
        let b = [1.0, 50.0, 3.0, 1000.0];
        assert!((spearman(&a, &b) - 1.0).abs() < 1e-12);
        assert_eq!(ranks(&[2.0, 1.0, 2.0]), vec![2.5, 1.0, 2.5]);
        // Ranks [1, 3, 2, 4] against [4, 2, 3, 1]: Σd² = 20, ρ = 1 − 6·20/(4·15) = −1.
        assert!((spearman(&a, &[4.0, 2.0, 3.0, 1.0]) + 1.0).abs() < 1e-12);
    }
}
