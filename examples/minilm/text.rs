//! Text in: the checkpoint's own tokenizer (`tokenizer.json`, Hugging Face's `tokenizers`), and
//! the data set of `../shared/data/minilm-model` (sentences and reference outputs).

use std::borrow::Cow;
use std::ffi::OsString;
use std::path::{Path, PathBuf};

/// Sentences are cut at this many tokens, as sentence-transformers does for this model.
pub const MAX_TOKENS: usize = 256;

/// The WordPiece tokenizer of the checkpoint.
pub struct Tokenizer(tokenizers::Tokenizer);

impl Tokenizer {
    /// Reads `tokenizer.json`.
    pub fn from_file(path: impl AsRef<Path>) -> Result<Self, String> {
        let path = path.as_ref();
        let mut inner = tokenizers::Tokenizer::from_file(path)
            .map_err(|e| format!("cannot read tokenizer {}: {e}", path.display()))?;
        let truncation = tokenizers::TruncationParams {
            max_length: MAX_TOKENS,
            ..Default::default()
        };
        inner
            .with_truncation(Some(truncation))
            .map_err(|e| format!("tokenizer {}: {e}", path.display()))?;
        inner.with_padding(None);
        Ok(Self(inner))
    }

    /// Token ids of one sentence, with `[CLS]` and `[SEP]`.
    pub fn encode(&self, sentence: &str) -> Result<Vec<u32>, String> {
        let encoding = self
            .0
            .encode(sentence, true)
            .map_err(|e| format!("cannot tokenize {sentence:?}: {e}"))?;
        Ok(encoding.get_ids().to_vec())
    }
}

/// Real text that distillation may see beside the calibration sentences: 4,727 usage examples
/// from WordNet 3.0, one per line (`corpus/README.md`: provenance, licence, selection). None
/// shares a run of four words with a held-out sentence (`tests/minilm_model.rs` checks).
pub const CORPUS: &str = include_str!("corpus/wordnet-examples.txt");

/// How many lines [`CORPUS`] has (`tests/minilm_model.rs` checks).
pub const CORPUS_LINES: usize = 4727;

/// Names a text file (one sentence per line) that `--corpus` and `--fit-corpus` take their
/// lines from in place of [`CORPUS`]: your own text, or more of WordNet's (`corpus/extract.py
/// --every 1`). Keep the held-out sentences out of it when comparing on them.
pub const CORPUS_VAR: &str = "FACTORIZE_MINILM_CORPUS";

/// The text that `--corpus` and `--fit-corpus` draw on: the file `$FACTORIZE_MINILM_CORPUS`
/// names, else [`CORPUS`].
pub fn corpus() -> Result<Cow<'static, str>, String> {
    corpus_from(std::env::var_os(CORPUS_VAR))
}

/// The file at `path`, else [`CORPUS`] ([`corpus`] without the environment).
pub fn corpus_from(path: Option<OsString>) -> Result<Cow<'static, str>, String> {
    let Some(path) = path else {
        return Ok(Cow::Borrowed(CORPUS));
    };
    let path = PathBuf::from(path);
    std::fs::read_to_string(&path)
        .map(Cow::Owned)
        .map_err(|e| format!("cannot read {} (${CORPUS_VAR}): {e}", path.display()))
}

/// The first `n` non-blank lines of [`corpus`], tokenized by `tokenizer`; an error naming the
/// file when it has fewer.
pub fn corpus_ids(tokenizer: &Tokenizer, n: usize) -> Result<Vec<Vec<u32>>, String> {
    lines_ids(&corpus_for(n)?, tokenizer, n).map_err(name_corpus)
}

/// Whether [`corpus`] has `n` non-blank lines: [`corpus_ids`]'s error, without tokenizing, for
/// the command line to check before it fits and trains.
pub fn check_corpus(n: usize) -> Result<(), String> {
    first_lines(&corpus_for(n)?, n)
        .map(drop)
        .map_err(name_corpus)
}

/// [`corpus`] when lines are asked for; no file is read for none (a stale
/// `$FACTORIZE_MINILM_CORPUS` does not stop a run that uses no text).
fn corpus_for(n: usize) -> Result<Cow<'static, str>, String> {
    match n {
        0 => Ok(Cow::Borrowed("")),
        _ => corpus(),
    }
}

/// `e`, prefixed with the corpus file it is about.
fn name_corpus(e: String) -> String {
    match std::env::var_os(CORPUS_VAR) {
        Some(path) => format!("{} (${CORPUS_VAR}): {e}", Path::new(&path).display()),
        None => format!("the shipped corpus/wordnet-examples.txt: {e}"),
    }
}

/// The first `n` non-blank lines of `text`, tokenized by `tokenizer`; an error when it has
/// fewer.
pub fn lines_ids(text: &str, tokenizer: &Tokenizer, n: usize) -> Result<Vec<Vec<u32>>, String> {
    (first_lines(text, n)?.into_iter())
        .map(|s| tokenizer.encode(s))
        .collect()
}

/// The first `n` non-blank lines of `text`; an error when it has fewer.
fn first_lines(text: &str, n: usize) -> Result<Vec<&str>, String> {
    let lines: Vec<&str> = (text.lines())
        .filter(|line| !line.trim().is_empty())
        .take(n)
        .collect();
    match lines.len() {
        found if found < n => Err(format!("{n} lines asked for, it has {found}")),
        _ => Ok(lines),
    }
}

/// The files of `../shared/data/minilm-model`.
pub struct ModelDir(pub PathBuf);

impl ModelDir {
    /// `$FACTORIZE_MINILM_MODEL_DIR`, else `../shared/data/minilm-model` beside the repository.
    pub fn locate() -> Self {
        Self(
            std::env::var_os("FACTORIZE_MINILM_MODEL_DIR")
                .map(PathBuf::from)
                .unwrap_or_else(|| {
                    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../shared/data/minilm-model")
                }),
        )
    }

    /// Whether the checkpoint is there.
    pub fn exists(&self) -> bool {
        self.checkpoint().is_file()
    }

    pub fn checkpoint(&self) -> PathBuf {
        self.0.join("model.safetensors")
    }

    pub fn tokenizer(&self) -> Result<Tokenizer, String> {
        Tokenizer::from_file(self.0.join("tokenizer.json"))
    }

    /// `sentences.json`: the 160 sentences and their reference token ids.
    pub fn sentences(&self) -> Result<(Vec<String>, Vec<Vec<u32>>), String> {
        let path = self.0.join("sentences.json");
        let text = std::fs::read_to_string(&path)
            .map_err(|e| format!("cannot read {}: {e}", path.display()))?;
        #[derive(serde::Deserialize)]
        struct File {
            sentences: Vec<String>,
            input_ids: Vec<Vec<u32>>,
        }
        let f: File = serde_json::from_str(&text)
            .map_err(|e| format!("{} is not the expected JSON: {e}", path.display()))?;
        Ok((f.sentences, f.input_ids))
    }
}
