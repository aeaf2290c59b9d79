//! The main job: factorize a model's big linear layers and report what it cost and saved.
//!
//! ```text
//! cargo run --release --example quickstart                      # built-in trained-like layers
//! cargo run --release --example quickstart -- WEIGHTS [ACTS]    # [out, in] weights of a checkpoint
//! ```
//!
//! With no argument it builds a transformer FFN block (1024 → 4096 → 1024) and an attention
//! projection whose weights have power-law singular values, as trained layers do, factorizes
//! them with the ranks the cost rule picks at compile time, and prints the report, the output
//! error on a batch and the forward time before and after.
//!
//! Given a safetensors file, it factorizes every rank-2 tensor as the weight of a Linear by the
//! same rule (other tensors are listed as skipped, with the reason); given also a file of
//! recorded inputs (`<layer>.heldout` / `<layer>.input`, rows × in), it reports each layer's
//! output error on those rows in the report's `nmse` column. For example, with the real
//! all-MiniLM-L6-v2 data: `-- ../shared/data/minilm/weights.safetensors
//! ../shared/data/minilm/activations.safetensors`.

use std::time::{Duration, Instant};

use dfdx::nn::modules::{AccurateGeLU, LayerNorm1D, Linear, ReLU};
use dfdx::prelude::*;
use factorize_runtime::conv::Conv2D;
use factorize_runtime::synthetic::{matrix_with_spectrum, power_law};
use factorize_runtime::weights::{factorize_matrix, read_file, NamedMatrix};
use factorize_runtime::{
    mirror, Factorizable, FactorizeConfig, FactorizeError, FactorizeParams, FactorizeReport,
};

const D_MODEL: usize = 1024;
const D_FF: usize = 4 * D_MODEL;
const BATCH: usize = 256;

type Dev = Cpu;

/// A transformer block's linear part: an attention output projection and the FFN.
/// The derive picks, at compile time, which `Linear`s become `FactorizedLinear`s.
#[derive(Factorizable)]
pub struct Block<E: Dtype, D: Device<E>> {
    pub attn_out: Linear<D_MODEL, D_MODEL, E, D>,
    pub norm: LayerNorm1D<D_MODEL, E, D>,
    pub ffn: (
        Linear<D_MODEL, D_FF, E, D>,
        AccurateGeLU,
        Linear<D_FF, D_MODEL, E, D>,
    ),
}

/// Written once; `#[mirror]` gives `BlockFactorized` the same forward.
#[mirror]
impl<E: Dtype, D: Device<E>, B: Dim> Module<Tensor<(B, Const<D_MODEL>), E, D>> for Block<E, D>
where
    LayerNorm1D<D_MODEL, E, D>: Module<
        Tensor<(B, Const<D_MODEL>), E, D>,
        Output = Tensor<(B, Const<D_MODEL>), E, D>,
        Error = D::Err,
    >,
{
    type Output = Tensor<(B, Const<D_MODEL>), E, D>;
    type Error = D::Err;
    fn try_forward(&self, x: Tensor<(B, Const<D_MODEL>), E, D>) -> Result<Self::Output, D::Err> {
        let h = self
            .norm
            .try_forward(x.clone().try_add(self.attn_out.try_forward(x)?)?)?;
        h.clone().try_add(self.ffn.try_forward(h)?)
    }
}

/// A convolutional block: a 3×3 conv and a 1×1 projection, 256 channels.
#[derive(Factorizable)]
pub struct ConvBlock<E: Dtype, D: Device<E>> {
    pub body: Conv2D<256, 256, 3, 1, 1, 1, E, D>,
    pub act: ReLU,
    pub proj: Conv2D<256, 256, 1, 1, 0, 1, E, D>,
}

#[mirror]
impl<E: Dtype, D: Device<E>, B: Dim, H: Dim, W: Dim> Module<Tensor<(B, Const<256>, H, W), E, D>>
    for ConvBlock<E, D>
{
    type Output = Tensor<(B, Const<256>, usize, usize), E, D>;
    type Error = D::Err;
    fn try_forward(&self, x: Tensor<(B, Const<256>, H, W), E, D>) -> Result<Self::Output, D::Err> {
        self.proj
            .try_forward(self.act.try_forward(self.body.try_forward(x)?)?)
    }
}

fn main() {
    let args: Vec<String> = std::env::args().skip(1).collect();
    let result = match args.as_slice() {
        [] => built_in(),
        [weights] => from_file(weights, None),
        [weights, acts] => from_file(weights, Some(acts)),
        _ => {
            eprintln!("usage: quickstart [WEIGHTS.safetensors [ACTIVATIONS.safetensors]]");
            std::process::exit(2);
        }
    };
    if let Err(e) = result {
        eprintln!("error: {e}");
        std::process::exit(1);
    }
}

/// Power-law singular values (σ_i ∝ i^-0.6), as trained layers have.
fn trained_like<const I: usize, const O: usize>(layer: &mut Linear<I, O, f32, Dev>, seed: u64) {
    let sigma = power_law(I.min(O), 0.6);
    let w: Vec<f32> = matrix_with_spectrum(O, I, &sigma, seed)
        .into_iter()
        .map(|x| x as f32)
        .collect();
    layer.weight.copy_from(&w);
}

fn time<T>(f: impl Fn() -> T) -> Duration {
    f(); // warm-up
    let runs = 5;
    let start = Instant::now();
    for _ in 0..runs {
        std::hint::black_box(f());
    }
    start.elapsed() / runs
}

fn relative(a: &[f32], b: &[f32]) -> f64 {
    let num: f64 = a
        .iter()
        .zip(b)
        .map(|(x, y)| (*x as f64 - *y as f64).powi(2))
        .sum();
    let den: f64 = a.iter().map(|x| (*x as f64).powi(2)).sum();
    (num / den).sqrt()
}

fn built_in() -> Result<(), FactorizeError> {
    let dev = Dev::seed_from_u64(0);
    println!("A transformer block ({D_MODEL} → {D_FF} → {D_MODEL} FFN, {D_MODEL} → {D_MODEL} projection) with trained-like spectra.\n");
    let mut block = Block::<f32, Dev> {
        attn_out: BuildModule::build(&dev),
        norm: BuildModule::build(&dev),
        ffn: BuildModule::build(&dev),
    };
    trained_like(&mut block.attn_out, 1);
    trained_like(&mut block.ffn.0, 2);
    trained_like(&mut block.ffn.2, 3);

    let (small, report) = block.factorize_with_report(&FactorizeConfig::default())?;
    println!("{report}");

    let x: Tensor<Rank2<BATCH, D_MODEL>, f32, Dev> = dev.sample_normal();
    let y0 = block.forward(x.clone()).as_vec();
    let y1 = small.forward(x.clone()).as_vec();
    println!(
        "output relative error on a batch of {BATCH} Gaussian rows: {:.4} (below the layers' \
         rel err: the residual connections carry the input past them)",
        relative(&y0, &y1)
    );
    let t0 = time(|| block.forward(x.clone()));
    let t1 = time(|| small.forward(x.clone()));
    println!(
        "forward, batch {BATCH}: dense {:.2} ms, factorized {:.2} ms ({:.2}x faster)",
        t0.as_secs_f64() * 1e3,
        t1.as_secs_f64() * 1e3,
        t0.as_secs_f64() / t1.as_secs_f64()
    );

    println!("\nA convolutional block (3×3 then 1×1, 256 channels) with trained-like kernels.\n");
    let mut convs = ConvBlock::<f32, Dev> {
        body: BuildModule::build(&dev),
        act: ReLU,
        proj: BuildModule::build(&dev),
    };
    // The kernels unfolded to [O, I·K·K] get power-law spectra.
    let unfolded = |o: usize, fan_in: usize, seed| -> Vec<f32> {
        matrix_with_spectrum(o, fan_in, &power_law(o.min(fan_in), 0.6), seed)
            .into_iter()
            .map(|x| x as f32)
            .collect()
    };
    convs.body.weight.copy_from(&unfolded(256, 256 * 9, 4));
    convs.proj.weight.copy_from(&unfolded(256, 256, 5));
    let (small_convs, report) = convs.factorize_with_report(&FactorizeConfig::default())?;
    println!("{report}");
    let images: Tensor<Rank4<4, 256, 28, 28>, f32, Dev> = dev.sample_normal();
    let y0 = convs.forward(images.clone()).as_vec();
    let y1 = small_convs.forward(images.clone()).as_vec();
    println!(
        "output relative error on 4 Gaussian 28×28 images: {:.4}",
        relative(&y0, &y1)
    );
    let t0 = time(|| convs.forward(images.clone()));
    let t1 = time(|| small_convs.forward(images.clone()));
    println!(
        "forward, batch 4: dense {:.1} ms, factorized {:.1} ms ({:.2}x faster)",
        t0.as_secs_f64() * 1e3,
        t1.as_secs_f64() * 1e3,
        t0.as_secs_f64() / t1.as_secs_f64()
    );
    Ok(())
}

fn from_file(weights: &str, acts: Option<&String>) -> Result<(), FactorizeError> {
    let file = read_file(weights, 2)?;
    for s in &file.skipped {
        println!("skipped {}: {}", s.name, s.reason);
    }
    if file.tensors.is_empty() {
        return Err(FactorizeError::Load {
            path: weights.to_string(),
            reason:
                "no floating-point matrix to factorize (every tensor is listed above as skipped)"
                    .into(),
        });
    }
    let inputs = match acts {
        Some(path) => read_file(path, 2)?.tensors,
        None => Vec::new(),
    };
    let params = FactorizeParams::DEFAULT;
    println!(
        "{} matrices in {weights}\ncost rule: {params}\n",
        file.tensors.len()
    );
    let cfg = FactorizeConfig::default();
    let mut report = FactorizeReport::default();
    for m in &file.tensors {
        // Rows are named after the layer: `layer0.ffn_up.weight` → `layer0.ffn_up`.
        let layer = m.name.strip_suffix(".weight").unwrap_or(&m.name);
        let m = &NamedMatrix {
            name: layer.to_string(),
            ..m.clone()
        };
        let (mut row, factors) = factorize_matrix(m, &params, &cfg)?;
        // Recorded inputs were not used by the SVD: their error is a held-out one.
        let recorded = ["heldout", "input"]
            .iter()
            .find_map(|split| inputs.iter().find(|t| t.name == format!("{layer}.{split}")));
        if let (Some(f), Some(x)) = (&factors, recorded) {
            if x.in_dim != m.in_dim {
                return Err(FactorizeError::Calibration {
                    layer: layer.to_string(),
                    reason: format!(
                        "recorded inputs `{}` have {} columns; the layer takes {}",
                        x.name, x.in_dim, m.in_dim
                    ),
                });
            }
            row.nmse_heldout = Some(output_nmse(m, f, x));
        }
        report.push(row);
    }
    println!("{report}");
    Ok(())
}

/// `mean((XWᵀ − X(BA)ᵀ)²) / var(XWᵀ)` over all output elements (the bias cancels).
fn output_nmse(w: &NamedMatrix, f: &factorize_runtime::engine::LowRank, x: &NamedMatrix) -> f64 {
    let (n, i, o, r) = (x.out_dim, w.in_dim, w.out_dim, f.rank);
    let xm = faer::MatRef::from_row_major_slice(&x.data, n, i);
    let wm = faer::MatRef::from_row_major_slice(&w.data, o, i);
    let a = faer::MatRef::from_row_major_slice(&f.first, r, i);
    let b = faer::MatRef::from_row_major_slice(&f.second, o, r);
    let y = xm * wm.transpose();
    let approx = (xm * a.transpose()) * b.transpose();
    let err = (&y - &approx).norm_l2().powi(2) / (n * o) as f64;
    let mean = y.sum() / (n * o) as f64;
    let var = y
        .col_iter()
        .flat_map(|c| c.iter().map(|v| (v - mean).powi(2)).collect::<Vec<_>>())
        .sum::<f64>()
        / (n * o) as f64;
    err / var
}
