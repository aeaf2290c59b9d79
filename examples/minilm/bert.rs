//! all-MiniLM-L6-v2 (a 6-layer BERT sentence encoder) written the dfdx way, as a template for
//! your own model: plain structs of dfdx modules that `#[derive(Factorizable)]`, with their
//! forwards written once and `#[mirror]`ed onto the factorized variants.
//!
//! The latent rank is the structs' const generic `R` (`#[factorize(latent_features = R)]`), so
//! `Bert<64, f32, Cpu>` factorizes into `BertFactorized<64, f32, Cpu>`, whose 36 `Linear`s are
//! `FactorizedLinear`s of rank 64; the cost rule is checked for each `R` at build time. The
//! dense model ignores `R`.
//!
//! Forwards call factorize's CPU kernels for tape-free `Cpu` tensors (same results, faster):
//! the fused blocks [`fast::self_attention`] and [`fast::try_feed_forward`], each on host buffers
//! from its input to its output; where those step aside (a calibration pass records every
//! layer's input), [`FastLinear`]'s fused forwards and [`fast::attention`]; and `try_forward_fast`
//! ([`FastForward`]). Anything else takes dfdx's own ops, so the same model trains and runs on
//! other devices.
//!
//! Shapes: a batch of `b` sentences padded to `s` tokens. Hidden states are kept as `b·s` rows of
//! `HIDDEN` (`Tensor<(usize, Const<384>)>`), so every `Linear` is one matrix product; dfdx's
//! attention route views them as `(b, heads, s, head_dim)`.

use dfdx::nn::modules::{AccurateGeLU, Embedding, LayerNorm1D, Linear, Repeated};
use dfdx::prelude::*;
use factorize_runtime::fast::{self, FastForward, FastLinear};
use factorize_runtime::{mirror, Factorizable};

/// Width of the hidden states.
pub const HIDDEN: usize = 384;
/// Attention heads, each `HEAD_DIM` wide.
pub const HEADS: usize = 12;
/// Width of one attention head.
pub const HEAD_DIM: usize = HIDDEN / HEADS;
/// Width of the feed-forward layer.
pub const FFN: usize = 1536;
/// Encoder layers.
pub const LAYERS: usize = 6;
/// WordPiece vocabulary.
pub const VOCAB: usize = 30522;
/// Position embeddings (the longest input).
pub const MAX_POSITIONS: usize = 512;
/// LayerNorm epsilon of the checkpoint.
pub const LAYER_NORM_EPS: f64 = 1e-12;

/// Hidden states of a batch, one row per token position (`b·s` rows); `T` is the tape, traced
/// when training ([`Bert::try_encode`]).
pub type Hidden<E, D, T = NoneTape> = Tensor<(usize, Const<HIDDEN>), E, D, T>;

/// Sentence embeddings of a batch, one row per sentence (`b` rows).
pub type Pooled<E, D, T = NoneTape> = Tensor<(usize, Const<HIDDEN>), E, D, T>;

/// A batch of tokenized sentences, padded to the longest one.
#[derive(Clone, Debug)]
pub struct Batch<E: Dtype, D: Device<E>> {
    /// Sentences in the batch.
    pub sentences: usize,
    /// Positions per sentence (the longest sentence's token count).
    pub positions: usize,
    /// Real tokens of each sentence.
    pub lengths: Vec<usize>,
    /// Token ids `(b, s)`; padding is `[PAD]` = 0.
    pub ids: Tensor<(usize, usize), usize, D>,
    /// 1 on real tokens, 0 on padding `(b, s)`.
    pub mask: Tensor<(usize, usize), E, D>,
    /// 0 on real tokens, a large negative number on padding, added to attention scores.
    pub attention_bias: Tensor<(usize, usize), E, D>,
}

impl<E: Dtype, D: Device<E>> Batch<E, D> {
    /// Pads `sentences` (token ids with `[CLS]`/`[SEP]`) into one batch.
    ///
    /// # Panics
    /// If `sentences` is empty or a sentence has no tokens or more than [`MAX_POSITIONS`].
    pub fn new(dev: &D, sentences: &[Vec<u32>]) -> Self {
        assert!(!sentences.is_empty(), "a batch needs at least one sentence");
        let b = sentences.len();
        let s = sentences.iter().map(Vec::len).max().unwrap_or(0);
        assert!(
            (1..=MAX_POSITIONS).contains(&s),
            "sentences must have 1 to {MAX_POSITIONS} tokens, the longest has {s}"
        );
        let mut ids = vec![0usize; b * s];
        let mut mask = vec![E::from_f32(0.0).unwrap(); b * s];
        let mut bias = vec![E::from_f32(-1e30).unwrap(); b * s];
        for (row, sentence) in sentences.iter().enumerate() {
            assert!(!sentence.is_empty(), "sentence {row} has no tokens");
            for (col, &id) in sentence.iter().enumerate() {
                ids[row * s + col] = id as usize;
                mask[row * s + col] = E::from_f32(1.0).unwrap();
                bias[row * s + col] = E::from_f32(0.0).unwrap();
            }
        }
        Self {
            sentences: b,
            positions: s,
            lengths: sentences.iter().map(Vec::len).collect(),
            ids: dev.tensor_from_vec(ids, (b, s)),
            mask: dev.tensor_from_vec(mask, (b, s)),
            attention_bias: dev.tensor_from_vec(bias, (b, s)),
        }
    }

    /// Real (non-padding) tokens in the batch.
    pub fn tokens(&self) -> usize {
        self.mask
            .as_vec()
            .iter()
            .filter(|m| m.to_f32().unwrap_or(0.0) > 0.5)
            .count()
    }
}

/// Word, position and token-type embeddings, summed and normalised.
#[derive(Factorizable, Clone)]
pub struct Embeddings<E: Dtype, D: Device<E>> {
    /// `embeddings.word_embeddings`.
    pub word: Embedding<VOCAB, HIDDEN, E, D>,
    /// `embeddings.position_embeddings`.
    pub position: Embedding<MAX_POSITIONS, HIDDEN, E, D>,
    /// `embeddings.token_type_embeddings` (a single sentence uses type 0 only).
    pub token_type: Embedding<2, HIDDEN, E, D>,
    /// `embeddings.LayerNorm`.
    pub norm: LayerNorm1D<HIDDEN, E, D>,
}

#[mirror]
impl<E: Dtype, D: Device<E>> Embeddings<E, D> {
    /// `LayerNorm(word[id] + position[i] + token_type[0])`, one row per position.
    pub fn try_forward(&self, batch: &Batch<E, D>) -> Result<Hidden<E, D>, D::Err> {
        let (b, s) = (batch.sentences, batch.positions);
        let words = self.word.try_forward(batch.ids.clone())?;
        // Every sentence has the same position and token-type rows: summed once, `s × HIDDEN`,
        // then added to all sentences' words in one op.
        let token_type = self
            .token_type
            .weight
            .clone()
            .try_slice((0..1, ..))?
            .try_reshape_like(&(Const::<HIDDEN>,))?;
        let positions = self
            .position
            .weight
            .clone()
            .try_slice((0..s, ..))?
            .try_add(token_type.try_broadcast_like(&(s, Const::<HIDDEN>))?)?;
        let x = words
            .try_add(positions.try_broadcast_like::<_, Axis<0>>(&(b, s, Const::<HIDDEN>))?)?
            .try_reshape_like(&(b * s, Const::<HIDDEN>))?;
        self.norm.try_forward_fast(x)
    }
}

/// Multi-head self-attention with its output projection, residual and LayerNorm (post-norm).
#[derive(Factorizable)]
#[factorize(latent_features = R)]
pub struct SelfAttention<const R: usize, E: Dtype, D: Device<E>> {
    /// `attention.self.query`.
    pub query: Linear<HIDDEN, HIDDEN, E, D>,
    /// `attention.self.key`.
    pub key: Linear<HIDDEN, HIDDEN, E, D>,
    /// `attention.self.value`.
    pub value: Linear<HIDDEN, HIDDEN, E, D>,
    /// `attention.output.dense`.
    pub output: Linear<HIDDEN, HIDDEN, E, D>,
    /// `attention.output.LayerNorm`.
    pub norm: LayerNorm1D<HIDDEN, E, D>,
}

#[mirror]
impl<const R: usize, E: Dtype, D: Device<E>> SelfAttention<R, E, D> {
    /// `LayerNorm(x + Wo·softmax(Q·Kᵀ/√d + mask)·V)`, heads side by side.
    pub fn try_forward<T: Tape<E, D> + 'static>(
        &self,
        x: Hidden<E, D, T>,
        batch: &Batch<E, D>,
    ) -> Result<Hidden<E, D, T>, D::Err> {
        let projections = (&self.query, &self.key, &self.value, &self.output);
        attention_block(projections, &self.norm, x, batch)
    }
}

/// `LayerNorm(x + Wo·softmax(Q·Kᵀ/√d + mask)·V)` from the block's four projections (query, key,
/// value, output): one forward for every attention struct, dense or factorized, uniform or
/// planned ranks, traced or not.
///
/// Tape-free `Cpu` rows take [`fast::self_attention`]. Otherwise each projection runs on its
/// own; under a tape, the tape is passed from branch to branch (`split_tape`/`put_tape`): each
/// product records its backward on it, and gradients meet at the tensors' ids.
pub fn attention_block<E: Dtype, D: Device<E>, T: Tape<E, D> + 'static>(
    (query, key, value, output): (
        &impl FastLinear<HIDDEN, HIDDEN, E, D, T>,
        &impl FastLinear<HIDDEN, HIDDEN, E, D, T>,
        &impl FastLinear<HIDDEN, HIDDEN, E, D, T>,
        &impl FastLinear<HIDDEN, HIDDEN, E, D, T>,
    ),
    norm: &LayerNorm1D<HIDDEN, E, D>,
    x: Hidden<E, D, T>,
    batch: &Batch<E, D>,
) -> Result<Hidden<E, D, T>, D::Err> {
    let projections = (query, key, value, output);
    let (lengths, positions) = (&batch.lengths, batch.positions);
    if let Some(y) = fast::self_attention::<HEADS, HEAD_DIM, HIDDEN, E, D, T>(
        projections,
        norm,
        &x,
        lengths,
        positions,
    ) {
        return Ok(y);
    }
    let (x, tape) = x.split_tape();
    let (q, tape) = query
        .try_forward_fast(x.clone().put_tape(tape))?
        .split_tape();
    let (k, tape) = key.try_forward_fast(x.clone().put_tape(tape))?.split_tape();
    let (v, tape) = value
        .try_forward_fast(x.clone().put_tape(tape))?
        .split_tape();
    let fast = if std::any::TypeId::of::<T>() == std::any::TypeId::of::<NoneTape>() {
        fast::attention::<HEADS, HEAD_DIM, HIDDEN, E, D>(&q, &k, &v, lengths, positions)
    } else {
        None
    };
    let context = match fast {
        Some(context) => context.put_tape(tape),
        None => composed_attention(q.put_tape(tape), k, v, batch)?,
    };
    output.try_forward_fast_add_norm(context, x, norm)
}

/// `LayerNorm(x + W2·gelu(W1·x))`: one forward for every feed-forward struct, traced or not.
pub fn feed_forward_block<E: Dtype, D: Device<E>, T: Tape<E, D> + 'static>(
    up: &impl FastLinear<HIDDEN, FFN, E, D, T>,
    down: &impl FastLinear<FFN, HIDDEN, E, D, T>,
    norm: &LayerNorm1D<HIDDEN, E, D>,
    x: Hidden<E, D, T>,
) -> Result<Hidden<E, D, T>, D::Err> {
    fast::try_feed_forward(up, down, norm, x)
}

/// Attention composed of dfdx's ops, for any device and dtype and under a training tape (the
/// fast route of [`fast::attention`] covers tape-free `Cpu` tensors only). `q` carries the
/// tape; the gradients of `k` and `v` are recorded on it by id.
fn composed_attention<E: Dtype, D: Device<E>, T: Tape<E, D>>(
    q: Hidden<E, D, T>,
    k: Hidden<E, D>,
    v: Hidden<E, D>,
    batch: &Batch<E, D>,
) -> Result<Hidden<E, D, T>, D::Err> {
    let (b, s) = (batch.sentences, batch.positions);
    let heads = (b, s, Const::<HEADS>, Const::<HEAD_DIM>);
    let q = q
        .try_reshape_like(&heads)?
        .try_permute::<_, Axes4<0, 2, 1, 3>>()?;
    let k = k
        .try_reshape_like(&heads)?
        .try_permute::<_, Axes4<0, 2, 3, 1>>()?;
    let v = v
        .try_reshape_like(&heads)?
        .try_permute::<_, Axes4<0, 2, 1, 3>>()?;
    let scale = E::from_f64(1.0 / (HEAD_DIM as f64).sqrt()).unwrap();
    let scores = q.try_matmul(k)?.try_mul(scale)?;
    let bias = batch
        .attention_bias
        .clone()
        .try_broadcast_like::<_, Axes2<1, 2>>(&(b, Const::<HEADS>, s, s))?;
    let probs = scores.try_add(bias)?.try_softmax::<Axis<3>>()?;
    probs
        .try_matmul(v)?
        .try_permute::<_, Axes4<0, 2, 1, 3>>()?
        .try_reshape_like(&(b * s, Const::<HIDDEN>))
}

/// The feed-forward block: `LayerNorm(x + W2·gelu(W1·x))`.
#[derive(Factorizable)]
#[factorize(latent_features = R)]
pub struct FeedForward<const R: usize, E: Dtype, D: Device<E>> {
    /// `intermediate.dense`.
    pub up: Linear<HIDDEN, FFN, E, D>,
    /// GELU in its exact erf form.
    pub act: AccurateGeLU,
    /// `output.dense`.
    pub down: Linear<FFN, HIDDEN, E, D>,
    /// `output.LayerNorm`.
    pub norm: LayerNorm1D<HIDDEN, E, D>,
}

#[mirror]
impl<const R: usize, E: Dtype, D: Device<E>> FeedForward<R, E, D> {
    /// `LayerNorm(x + W2·gelu(W1·x))`.
    pub fn try_forward<T: Tape<E, D> + 'static>(
        &self,
        x: Hidden<E, D, T>,
    ) -> Result<Hidden<E, D, T>, D::Err> {
        feed_forward_block(&self.up, &self.down, &self.norm, x)
    }
}

/// One encoder layer: attention, then the feed-forward block.
#[derive(Factorizable)]
pub struct EncoderLayer<const R: usize, E: Dtype, D: Device<E>> {
    /// `encoder.layer.N.attention`.
    pub attention: SelfAttention<R, E, D>,
    /// `encoder.layer.N.intermediate` and `encoder.layer.N.output`.
    pub ffn: FeedForward<R, E, D>,
}

#[mirror]
impl<const R: usize, E: Dtype, D: Device<E>> EncoderLayer<R, E, D> {
    /// Attention, then the feed-forward block.
    pub fn try_forward<T: Tape<E, D> + 'static>(
        &self,
        x: Hidden<E, D, T>,
        batch: &Batch<E, D>,
    ) -> Result<Hidden<E, D, T>, D::Err> {
        self.ffn.try_forward(self.attention.try_forward(x, batch)?)
    }
}

/// The sentence encoder: embeddings, [`LAYERS`] encoder layers, mean pooling over the real
/// tokens, L2 normalisation.
#[derive(Factorizable)]
pub struct Bert<const R: usize, E: Dtype, D: Device<E>> {
    /// `embeddings.*`.
    pub embeddings: Embeddings<E, D>,
    /// `encoder.layer.0` … `encoder.layer.5`.
    pub layers: Repeated<EncoderLayer<R, E, D>, LAYERS>,
}

#[mirror]
impl<const R: usize, E: Dtype, D: Device<E>> Bert<R, E, D> {
    /// The last hidden states, one row per position (`b·s` rows, padding rows included).
    pub fn try_hidden_states(&self, batch: &Batch<E, D>) -> Result<Hidden<E, D>, D::Err> {
        self.try_encode(self.embeddings.try_forward(batch)?, batch)
    }

    /// The encoder layers on embedded inputs `x`: traced (`x.traced(grads)`) to train them.
    pub fn try_encode<T: Tape<E, D> + 'static>(
        &self,
        mut x: Hidden<E, D, T>,
        batch: &Batch<E, D>,
    ) -> Result<Hidden<E, D, T>, D::Err> {
        for layer in &self.layers.modules {
            x = layer.try_forward(x, batch)?;
        }
        Ok(x)
    }

    /// Every encoder layer's hidden states on embedded inputs `x`, stacked ([`Stack`]): what
    /// distillation towards every layer compares. Traced or not.
    pub fn try_encode_layers<T: Tape<E, D> + 'static>(
        &self,
        mut x: Hidden<E, D, T>,
        batch: &Batch<E, D>,
    ) -> Result<Hidden<E, D, T>, D::Err> {
        let mut stack = Stack::default();
        for layer in &self.layers.modules {
            x = stack.push(layer.try_forward(x, batch)?);
        }
        stack.try_finish(x)
    }

    /// Normalised sentence embeddings `(b, HIDDEN)`: the mean of the last hidden states over
    /// each sentence's real tokens, divided by its L2 norm.
    pub fn try_embed(
        &self,
        batch: &Batch<E, D>,
    ) -> Result<Tensor<(usize, Const<HIDDEN>), E, D>, D::Err> {
        pool(self.try_hidden_states(batch)?, batch)
    }
}

/// Normalised sentence embeddings `(b, HIDDEN)` from the last hidden states: the mean over each
/// sentence's real tokens, divided by its L2 norm. Traced or not.
pub fn pool<E: Dtype, D: Device<E>, T: Tape<E, D>>(
    hidden: Hidden<E, D, T>,
    batch: &Batch<E, D>,
) -> Result<Pooled<E, D, T>, D::Err> {
    let (b, s) = (batch.sentences, batch.positions);
    let hidden = hidden.try_reshape_like(&(b, s, Const::<HIDDEN>))?;
    let mask = batch.mask.clone();
    let counts = mask.clone().try_sum::<(usize,), Axis<1>>()?;
    let summed = hidden
        .try_mul(mask.try_broadcast_like::<_, Axis<2>>(&(b, s, Const::<HIDDEN>))?)?
        .try_sum::<(usize, Const<HIDDEN>), Axis<1>>()?;
    let mean = summed.try_div(counts.try_broadcast_like(&(b, Const::<HIDDEN>))?)?;
    // As torch's F.normalize: divide by max(‖x‖, 1e-12). The tape goes through the norm; the
    // numerator's gradient meets it at `mean`'s id.
    let (mean, tape) = mean.split_tape();
    let norms = mean
        .clone()
        .put_tape(tape)
        .try_square()?
        .try_sum::<(usize,), Axis<1>>()?
        .try_sqrt()?
        .try_clamp(1e-12, f64::INFINITY)?;
    let (norms, tape) = norms
        .try_broadcast_like(&(b, Const::<HIDDEN>))?
        .split_tape();
    mean.put_tape(tape).try_div(norms)
}

/// Hidden states of successive layers stacked into one tensor (layer 1's `b·s` rows, then
/// layer 2's, …), so that one loss compares them all. Under a tape, the stack carries the
/// layers' backward: each layer's rows get the gradient of their place in the stack and of the
/// layers after them.
pub struct Stack<E: Dtype, D: Device<E>>(Vec<Hidden<E, D>>);

impl<E: Dtype, D: Device<E>> Default for Stack<E, D> {
    fn default() -> Self {
        Self(Vec::new())
    }
}

impl<E: Dtype, D: Device<E>> Stack<E, D> {
    /// Keeps `x`'s rows for the stack and gives `x` back to go on with.
    pub fn push<T: Tape<E, D>>(&mut self, x: Hidden<E, D, T>) -> Hidden<E, D, T> {
        // A clone shares `x`'s id, so the gradient the stack gives it joins the one the later
        // layers give `x`.
        let (x, tape) = x.split_tape();
        self.0.push(x.clone());
        x.put_tape(tape)
    }

    /// The rows pushed, stacked in one copy, with the tape of `last`, the last tensor pushed
    /// (`last` itself when nothing was). The stack's backward is recorded after every layer's,
    /// so it runs first and each layer's rows have their whole gradient before its own backward.
    pub fn try_finish<T: Tape<E, D>>(
        self,
        last: Hidden<E, D, T>,
    ) -> Result<Hidden<E, D, T>, D::Err> {
        let (rows, layers) = (last.shape().0, self.0.len());
        if layers == 0 {
            return Ok(last);
        }
        let mut tape = Some(last.split_tape().1);
        let pushed: Vec<Hidden<E, D, T>> = (self.0.into_iter())
            .map(|x| x.put_tape(tape.take().unwrap_or_default()))
            .collect();
        pushed
            .try_stack()?
            .try_reshape_like(&(layers * rows, Const::<HIDDEN>))
    }
}
