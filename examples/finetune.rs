//! Factorize, then fine-tune: the training story.
//!
//! ```text
//! cargo run --release --example finetune
//! ```
//!
//! Composer's `Factorize` is a training method: a model is factorized, then trained on. This
//! example trains a small residual MLP on a regression task, factorizes it (truncated SVD, the
//! ranks chosen by the compiler), fine-tunes the factorized variant with Adam, saves it, and
//! loads it back into a freshly built variant, printing the loss at each stage.
//!
//! What a user needs for that, all shown here:
//! - `#[derive(TensorCollection)]` beside `#[derive(Factorizable)]`, so the dense model can be
//!   built, saved, loaded and trained (the variant always gets one);
//! - a `Module` impl generic over the tape `T`, so the forward also takes traced tensors;
//!   `#[mirror]` copies it, tape and all;
//! - `split_tape` / `put_tape` for a residual: the tape follows one branch, the other is added
//!   untraced.

// dfdx's prelude exports the *builder* `Linear<I, O>`; model structs name the module.
use dfdx::nn::modules::{Linear, ReLU};
use dfdx::optim::{Adam, AdamConfig};
use dfdx::prelude::*;
use factorize_runtime::{mirror, Factorizable, FactorizeConfig, TensorCollection};

/// Width of the model.
pub const WIDTH: usize = 256;
/// Width of the hidden layer.
pub const HIDDEN: usize = 1024;

/// A residual MLP block: `x + fc2(relu(fc1(x)))`, then a small head.
#[derive(Factorizable, TensorCollection)]
#[factorize(latent_features = 48)]
pub struct Mlp<E: Dtype, D: Device<E>> {
    pub fc1: Linear<WIDTH, HIDDEN, E, D>, // → FactorizedLinear<256, 48, 1024>
    pub act: ReLU,
    pub fc2: Linear<HIDDEN, WIDTH, E, D>, // → FactorizedLinear<1024, 48, 256>
    pub head: Linear<WIDTH, 16, E, D>,    // kept: narrower than min_features
}

/// Generic over the tape `T`: untraced tensors for inference, traced ones for training.
#[mirror]
impl<E: Dtype, D: Device<E>, B: Dim, T: Tape<E, D>> Module<Tensor<(B, Const<WIDTH>), E, D, T>>
    for Mlp<E, D>
{
    type Output = Tensor<(B, Const<16>), E, D, T>;
    type Error = D::Err;
    fn try_forward(&self, x: Tensor<(B, Const<WIDTH>), E, D, T>) -> Result<Self::Output, D::Err> {
        // The tape goes through the branch; the skip connection is added without one.
        let (skip, tape) = x.split_tape();
        let h = self.fc1.try_forward(skip.clone().put_tape(tape))?;
        let h = self.fc2.try_forward(self.act.try_forward(h)?)?;
        self.head.try_forward(h.try_add(skip)?)
    }
}

/// How much stronger the teacher's hidden branch is than a freshly built one.
pub const TEACHER_GAIN: f32 = 8.0;

/// Batch size of every step.
pub const BATCH: usize = 64;

/// One batch of the regression task: inputs and the targets `teacher` gives them.
pub fn batch<M>(dev: &Cpu, teacher: &M) -> (Tensor<Rank2<BATCH, WIDTH>, f32, Cpu>, M::Output)
where
    M: Module<Tensor<Rank2<BATCH, WIDTH>, f32, Cpu>>,
{
    let x: Tensor<Rank2<BATCH, WIDTH>, f32, Cpu> = dev.sample_normal();
    let y = teacher.forward(x.clone());
    (x, y)
}

/// `steps` Adam steps of mean squared error against `teacher`; returns the mean loss of the
/// first and of the last ten steps.
pub fn train<M, Tm>(
    dev: &Cpu,
    model: &mut M,
    teacher: &Tm,
    steps: usize,
    lr: f64,
) -> Result<(f32, f32), Box<dyn std::error::Error>>
where
    M: TensorCollection<f32, Cpu>
        + Module<
            Tensor<Rank2<BATCH, WIDTH>, f32, Cpu, OwnedTape<f32, Cpu>>,
            Output = Tensor<Rank2<BATCH, 16>, f32, Cpu, OwnedTape<f32, Cpu>>,
            Error = <Cpu as HasErr>::Err,
        >,
    Tm: Module<Tensor<Rank2<BATCH, WIDTH>, f32, Cpu>, Output = Tensor<Rank2<BATCH, 16>, f32, Cpu>>,
{
    let mut grads = model.alloc_grads();
    let mut opt = Adam::new(
        model,
        AdamConfig {
            lr,
            ..Default::default()
        },
    );
    let mut losses = Vec::with_capacity(steps);
    for _ in 0..steps {
        let (x, y) = batch(dev, teacher);
        let prediction = model.try_forward(x.traced(grads))?;
        let loss = mse_loss(prediction, y);
        losses.push(loss.array());
        grads = loss.backward();
        opt.update(model, &grads)
            .map_err(|e| format!("optimizer: {e:?}"))?;
        model.zero_grads(&mut grads);
    }
    let mean = |s: &[f32]| s.iter().sum::<f32>() / s.len() as f32;
    let window = steps.min(10);
    Ok((mean(&losses[..window]), mean(&losses[steps - window..])))
}

/// Mean squared error of `model` against `teacher` on `batches` fresh batches.
pub fn evaluate<M, Tm>(dev: &Cpu, model: &M, teacher: &Tm, batches: usize) -> f32
where
    M: Module<Tensor<Rank2<BATCH, WIDTH>, f32, Cpu>, Output = Tensor<Rank2<BATCH, 16>, f32, Cpu>>,
    Tm: Module<Tensor<Rank2<BATCH, WIDTH>, f32, Cpu>, Output = Tensor<Rank2<BATCH, 16>, f32, Cpu>>,
{
    let total: f32 = (0..batches)
        .map(|_| {
            let (x, y) = batch(dev, teacher);
            mse_loss(model.forward(x), y).array()
        })
        .sum();
    total / batches as f32
}

fn main() -> Result<(), Box<dyn std::error::Error>> {
    let dev = Cpu::seed_from_u64(0);
    // The task: imitate a fixed random network of the same shape whose hidden branch is
    // strong, so that the student has to learn its big layers.
    let mut teacher = Mlp::<f32, Cpu>::build(&dev);
    teacher.fc2.weight = teacher.fc2.weight.clone() * TEACHER_GAIN;
    let mut model = Mlp::<f32, Cpu>::build(&dev);

    let (first, last) = train(&dev, &mut model, &teacher, 300, 1e-3)?;
    println!("dense, 300 Adam steps:       loss {first:.4} → {last:.4}");
    let dense_loss = evaluate(&dev, &model, &teacher, 8);

    let (mut small, report) = model.factorize_with_report(&FactorizeConfig::default())?;
    println!("{report}");
    let factorized_loss = evaluate(&dev, &small, &teacher, 8);
    println!("held-out loss: dense {dense_loss:.4}, factorized {factorized_loss:.4}");

    let (first, last) = train(&dev, &mut small, &teacher, 150, 3e-4)?;
    println!("factorized, 150 Adam steps:  loss {first:.4} → {last:.4}");
    let tuned_loss = evaluate(&dev, &small, &teacher, 8);
    println!("held-out loss after fine-tuning: {tuned_loss:.4}");

    // Save the fine-tuned variant and load it where it is deployed.
    let path = std::env::temp_dir().join("factorize-finetune-example.safetensors");
    small
        .save_safetensors(&path)
        .map_err(|e| format!("saving {}: {e}", path.display()))?;
    let mut deployed = MlpFactorized::<f32, Cpu>::build(&dev);
    deployed
        .load_safetensors(&path)
        .map_err(|e| format!("loading {}: {e:?}", path.display()))?;
    let x: Tensor<Rank2<BATCH, WIDTH>, f32, Cpu> = dev.sample_normal();
    let same = small.forward(x.clone()).array() == deployed.forward(x).array();
    println!(
        "saved to {} and loaded back: outputs {}",
        path.display(),
        if same { "identical" } else { "DIFFER" }
    );
    Ok(())
}
