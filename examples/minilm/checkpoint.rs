//! Loading [`Bert`] from a Hugging Face `model.safetensors`, by the checkpoint's own names.
//!
//! Every parameter is looked up by name, its dtype and shape checked, and copied into a tensor
//! of the model's dtype; `embeddings.position_ids` (an int64 buffer, not a parameter) is
//! ignored. A missing, mis-typed or mis-shaped tensor is an error naming it.

use std::fmt;
use std::path::Path;

use ::safetensors::{Dtype as StDtype, SafeTensors};
use dfdx::nn::modules::{Embedding, LayerNorm1D, Linear, Repeated};
use dfdx::prelude::*;

use crate::bert::{
    Bert, Embeddings, EncoderLayer, FeedForward, SelfAttention, FFN, HIDDEN, LAYERS,
    LAYER_NORM_EPS, MAX_POSITIONS, VOCAB,
};

/// Why a checkpoint could not be loaded.
#[derive(Debug)]
pub enum CheckpointError {
    /// The file could not be read.
    Io(String, std::io::Error),
    /// The file is not a safetensors file.
    Format(String, String),
    /// A parameter the model needs is not in the file.
    Missing(String),
    /// A parameter has another shape than the model's.
    Shape {
        /// The tensor's name in the checkpoint.
        tensor: String,
        /// The model's shape.
        expected: Vec<usize>,
        /// The file's shape.
        found: Vec<usize>,
    },
    /// A parameter is not float32.
    Dtype(String, String),
}

impl fmt::Display for CheckpointError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Self::Io(path, e) => write!(f, "cannot read {path}: {e}"),
            Self::Format(path, e) => write!(f, "{path} is not a safetensors file: {e}"),
            Self::Missing(name) => write!(f, "tensor `{name}` is missing from the checkpoint"),
            Self::Shape {
                tensor,
                expected,
                found,
            } => write!(
                f,
                "tensor `{tensor}` has shape {found:?}, the model needs {expected:?}"
            ),
            Self::Dtype(name, dtype) => {
                write!(f, "tensor `{name}` is {dtype}, expected float32")
            }
        }
    }
}

impl std::error::Error for CheckpointError {}

/// Reads tensors out of one checkpoint into one device's tensors.
struct Reader<'a, D> {
    file: SafeTensors<'a>,
    dev: &'a D,
}

impl<'a, D> Reader<'a, D> {
    fn tensor<S: Shape, E: Dtype>(
        &self,
        name: &str,
        shape: S,
    ) -> Result<Tensor<S, E, D>, CheckpointError>
    where
        D: Device<E>,
    {
        let view = self
            .file
            .tensor(name)
            .map_err(|_| CheckpointError::Missing(name.to_string()))?;
        if view.dtype() != StDtype::F32 {
            return Err(CheckpointError::Dtype(
                name.to_string(),
                format!("{:?}", view.dtype()),
            ));
        }
        let expected: Vec<usize> = shape.concrete().into_iter().collect();
        if view.shape() != expected.as_slice() {
            return Err(CheckpointError::Shape {
                tensor: name.to_string(),
                expected,
                found: view.shape().to_vec(),
            });
        }
        let values: Vec<E> = view
            .data()
            .chunks_exact(4)
            .map(|b| E::from_f32(f32::from_le_bytes([b[0], b[1], b[2], b[3]])).unwrap())
            .collect();
        Ok(self.dev.tensor_from_vec(values, shape))
    }

    fn linear<const I: usize, const O: usize, E: Dtype>(
        &self,
        prefix: &str,
    ) -> Result<Linear<I, O, E, D>, CheckpointError>
    where
        D: Device<E>,
    {
        Ok(Linear {
            weight: self.tensor(&format!("{prefix}.weight"), (Const::<O>, Const::<I>))?,
            bias: self.tensor(&format!("{prefix}.bias"), (Const::<O>,))?,
        })
    }

    fn layer_norm<E: Dtype>(
        &self,
        prefix: &str,
    ) -> Result<LayerNorm1D<HIDDEN, E, D>, CheckpointError>
    where
        D: Device<E>,
    {
        Ok(LayerNorm1D {
            gamma: self.tensor(&format!("{prefix}.weight"), (Const::<HIDDEN>,))?,
            beta: self.tensor(&format!("{prefix}.bias"), (Const::<HIDDEN>,))?,
            epsilon: LAYER_NORM_EPS,
        })
    }

    fn embedding<const V: usize, E: Dtype>(
        &self,
        name: &str,
    ) -> Result<Embedding<V, HIDDEN, E, D>, CheckpointError>
    where
        D: Device<E>,
    {
        Ok(Embedding {
            weight: self.tensor(name, (Const::<V>, Const::<HIDDEN>))?,
        })
    }
}

impl<const R: usize, E: Dtype, D: Device<E>> Bert<R, E, D> {
    /// Loads the model from a `model.safetensors` with Hugging Face BERT names
    /// (`embeddings.word_embeddings.weight`, `encoder.layer.N.attention.self.query.weight`, …).
    pub fn load(path: impl AsRef<Path>, dev: &D) -> Result<Self, CheckpointError> {
        let path = path.as_ref();
        let shown = path.display().to_string();
        let bytes = std::fs::read(path).map_err(|e| CheckpointError::Io(shown.clone(), e))?;
        let file = SafeTensors::deserialize(&bytes)
            .map_err(|e| CheckpointError::Format(shown.clone(), format!("{e:?}")))?;
        let r = Reader { file, dev };
        let embeddings = Embeddings {
            word: r.embedding::<VOCAB, E>("embeddings.word_embeddings.weight")?,
            position: r.embedding::<MAX_POSITIONS, E>("embeddings.position_embeddings.weight")?,
            token_type: r.embedding::<2, E>("embeddings.token_type_embeddings.weight")?,
            norm: r.layer_norm("embeddings.LayerNorm")?,
        };
        let modules = (0..LAYERS)
            .map(|n| {
                let p = format!("encoder.layer.{n}");
                Ok(EncoderLayer {
                    attention: SelfAttention {
                        query: r
                            .linear::<HIDDEN, HIDDEN, E>(&format!("{p}.attention.self.query"))?,
                        key: r.linear::<HIDDEN, HIDDEN, E>(&format!("{p}.attention.self.key"))?,
                        value: r
                            .linear::<HIDDEN, HIDDEN, E>(&format!("{p}.attention.self.value"))?,
                        output: r
                            .linear::<HIDDEN, HIDDEN, E>(&format!("{p}.attention.output.dense"))?,
                        norm: r.layer_norm(&format!("{p}.attention.output.LayerNorm"))?,
                    },
                    ffn: FeedForward {
                        up: r.linear::<HIDDEN, FFN, E>(&format!("{p}.intermediate.dense"))?,
                        act: Default::default(),
                        down: r.linear::<FFN, HIDDEN, E>(&format!("{p}.output.dense"))?,
                        norm: r.layer_norm(&format!("{p}.output.LayerNorm"))?,
                    },
                })
            })
            .collect::<Result<Vec<_>, CheckpointError>>()?;
        Ok(Bert {
            embeddings,
            layers: Repeated { modules },
        })
    }
}
