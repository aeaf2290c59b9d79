//! Data-aware vs weight-space factorization on the real MiniLM layers: output nmse on the
//! calibration rows and on held-out rows, per layer and rank.
//!
//! `cargo run --release -p factorize-tools --bin calibrated_minilm -- ../shared/data/minilm`

use std::time::Instant;

use factorize_runtime::engine::calibrated::{fit_linear, nmse, Calibration};
use factorize_runtime::engine::{low_rank, WeightMatrix};
use factorize_runtime::weights::{read_matrices, read_tensors};
use factorize_runtime::Fit;
use factorize_runtime::Precision;

/// The ridges to compare, from the arguments after the data folder: the default one if none.
fn ridges() -> Vec<f64> {
    let ridges: Vec<f64> = std::env::args()
        .skip(2)
        .map(|a| a.parse().expect("ridge"))
        .collect();
    if ridges.is_empty() {
        vec![Fit::DEFAULT_RIDGE]
    } else {
        ridges
    }
}

fn main() {
    let dir = std::env::args()
        .nth(1)
        .unwrap_or_else(|| "../shared/data/minilm".into());
    let weights = read_matrices(format!("{dir}/weights.safetensors")).expect("weights");
    let biases = read_tensors(format!("{dir}/weights.safetensors"), 1).expect("biases");
    let acts = read_tensors(format!("{dir}/activations.safetensors"), 2).expect("activations");
    let ridges = ridges();
    let find = |name: &str| acts.iter().find(|t| t.name == name).expect(name);
    println!(
        "{:<18} {:>4} {:>10} {:>10} {:>10} {:>10} {:>22}",
        "layer", "rank", "svd held", "als held", "exact cal", "exact held", "ridge: held-out nmse"
    );
    let mut sums = vec![0.0; 2 + ridges.len()];
    let mut cases = 0;
    let mut worst_vs_svd: f64 = 0.0;
    let mut time_exact = 0.0;
    let mut time_als = 0.0;
    for m in &weights {
        let layer = m.name.strip_suffix(".weight").unwrap();
        let bias = &biases
            .iter()
            .find(|b| b.name == format!("{layer}.bias"))
            .unwrap()
            .data;
        let cal = find(&format!("{layer}.input"));
        let held = find(&format!("{layer}.heldout"));
        let w = WeightMatrix::new(layer, &m.data, m.out_dim, m.in_dim).unwrap();
        let xc = Calibration::new(layer, &cal.data, cal.out_dim, cal.in_dim).unwrap();
        let xh = Calibration::new(layer, &held.data, held.out_dim, held.in_dim).unwrap();
        for rank in [32, 64, 128] {
            let svd = low_rank(&w, rank, Precision::F64).unwrap();
            let svd_held = nmse(&w, bias, &svd, bias, &xh).unwrap();
            let t = Instant::now();
            let als = fit_linear(&w, bias, &xc, rank, Fit::als()).unwrap();
            time_als += t.elapsed().as_secs_f64();
            let als_held = nmse(&w, bias, &als.factors, &als.bias, &xh).unwrap();
            let mut line = String::new();
            let mut exact_cal = 0.0;
            let mut exact_held = 0.0;
            for (k, &ridge) in ridges.iter().enumerate() {
                let t = Instant::now();
                let f = fit_linear(&w, bias, &xc, rank, Fit::Exact { ridge }).unwrap();
                time_exact += t.elapsed().as_secs_f64();
                let h = nmse(&w, bias, &f.factors, &f.bias, &xh).unwrap();
                if k == 0 {
                    exact_cal = f.nmse;
                    exact_held = h;
                    worst_vs_svd = worst_vs_svd.max(h / svd_held);
                }
                sums[2 + k] += h;
                line.push_str(&format!(" {ridge:e}:{h:.4}"));
            }
            sums[0] += svd_held;
            sums[1] += als_held;
            cases += 1;
            println!("{layer:<18} {rank:>4} {svd_held:>10.4} {als_held:>10.4} {exact_cal:>10.4} {exact_held:>10.4} {line}");
        }
    }
    let n = cases as f64;
    println!(
        "mean held-out nmse: svd {:.4}, als {:.4}, exact {:?}",
        sums[0] / n,
        sums[1] / n,
        sums[2..].iter().map(|s| s / n).collect::<Vec<_>>()
    );
    println!("worst exact/svd held-out ratio (first ridge): {worst_vs_svd:.3}");
    println!(
        "time: exact {:.1} ms per fit, als {:.1} ms per fit",
        time_exact * 1e3 / (n * ridges.len() as f64),
        time_als * 1e3 / n
    );
}
