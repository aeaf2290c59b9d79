//! `#[factorize(ranks = "file")]`: a struct's ranks read from a file at compile time.
//!
//! The file holds one entry per line, `path = rank` or `path = dense`, with `#` comments: the
//! format `RankPlan::ranks_file` writes from a budget plan. `path` is a layer's report path;
//! with `ranks_prefix = "layers.0"` the struct takes the entries under that prefix. Each
//! entry for a field acts as the attribute it stands for: a rank as `#[factorize(latent = N)]`
//! (forced: a rank that breaks the cost rule fails the build, naming the entry), `dense` as
//! `#[factorize(skip)]`; entries under a nested struct's field are that struct's to read (with
//! its own `ranks_prefix`). The path is relative to the crate's `Cargo.toml`; the generated code
//! includes the file's bytes, so that Cargo rebuilds when it changes.

use std::collections::HashSet;
use std::path::PathBuf;

use proc_macro2::TokenStream;
use quote::quote;

use super::ast::Container;
use super::attr::LatentValue;
use super::ctxt::Ctxt;

/// One line's value.
enum Value {
    Rank(u64),
    Dense,
}

/// Where the file is: beside the crate's manifest.
fn locate(written: &str) -> PathBuf {
    let base = std::env::var_os("CARGO_MANIFEST_DIR")
        .map(PathBuf::from)
        .unwrap_or_default();
    base.join(written)
}

/// Reads the struct's ranks file, if it names one, into its fields' attributes. Every mistake is
/// one error at the `ranks` literal, naming the file and the entry.
pub fn apply(cx: &mut Ctxt, cont: &mut Container<'_>) {
    let Some((written, span)) = cont.attrs.ranks.clone() else {
        if let Some((_, span)) = &cont.attrs.ranks_prefix {
            cx.syn_error(syn::Error::new(
                *span,
                "`ranks_prefix` needs `ranks = \"file\"` beside it",
            ));
        }
        return;
    };
    let text = match std::fs::read_to_string(locate(&written)) {
        Ok(text) => text,
        Err(e) => {
            let error = format!("cannot read ranks file `{written}` (relative to Cargo.toml): {e}");
            return cx.syn_error(syn::Error::new(span, error));
        }
    };
    let prefix = cont
        .attrs
        .ranks_prefix
        .as_ref()
        .map(|(p, _)| format!("{p}."))
        .unwrap_or_default();
    let fail = |cx: &mut Ctxt, message: String| {
        cx.syn_error(syn::Error::new(
            span,
            format!("ranks file `{written}`: {message}"),
        ));
    };
    let mut seen = HashSet::new();
    for (number, line) in text.lines().enumerate() {
        let line_no = number + 1;
        let content = line.split('#').next().unwrap_or("").trim();
        if content.is_empty() {
            continue;
        }
        let Some((path, value)) = content.split_once('=') else {
            fail(
                cx,
                format!(
                    "line {line_no}: expected `path = rank` or `path = dense`, got `{content}`"
                ),
            );
            continue;
        };
        let (path, value) = (path.trim(), value.trim());
        let value = match value {
            "dense" => Value::Dense,
            v => match v.parse::<u64>() {
                Ok(0) | Err(_) => {
                    fail(cx, format!("line {line_no}: `{path}` takes a rank of at least 1 or `dense`, not `{v}`"));
                    continue;
                }
                Ok(n) => Value::Rank(n),
            },
        };
        if !seen.insert(path.to_string()) {
            fail(cx, format!("line {line_no}: `{path}` is given twice"));
            continue;
        }
        let Some(name) = path.strip_prefix(&prefix) else {
            continue;
        };
        let struct_name = cont.input.ident.to_string();
        // An entry under a field's own path belongs to that nested struct (its `ranks_prefix`).
        let nested = name
            .split_once('.')
            .is_some_and(|(head, _)| cont.fields.iter().any(|f| *f.ident == head));
        if nested {
            continue;
        }
        let Some(field) = cont.fields.iter_mut().find(|f| *f.ident == name) else {
            fail(cx, format!(
                "line {line_no}: `{path}` names no field of `{struct_name}`{}; a nested struct reads its own entries with `ranks_prefix`",
                if prefix.is_empty() { String::new() } else { format!(" under `{}`", prefix.trim_end_matches('.')) }
            ));
            continue;
        };
        if !field.node.contains(false) && !field.node.contains(true) {
            fail(cx, format!("line {line_no}: `{path}` is not a `Linear` or `Conv2D` field; a nested struct reads its own entries with `ranks_prefix`"));
            continue;
        }
        if field.attrs.latent.is_some() || field.attrs.skip.is_some() {
            fail(cx, format!("line {line_no}: `{path}` also has a `latent` or `skip` attribute; keep one of the two"));
            continue;
        }
        field.attrs.origin = Some(format!(
            "{written}: {path} = {}",
            match value {
                Value::Rank(n) => n.to_string(),
                Value::Dense => "dense".into(),
            }
        ));
        match value {
            Value::Rank(n) => field.attrs.latent = Some(LatentValue::Count(n, span)),
            Value::Dense => field.attrs.skip = Some(span),
        }
    }
}

/// `const _: &[u8] = include_bytes!(..)` for the ranks file, so that Cargo rebuilds the crate
/// when it changes; nothing without one.
pub fn track(cont: &Container<'_>) -> TokenStream {
    let Some((written, _)) = &cont.attrs.ranks else {
        return TokenStream::new();
    };
    let path = locate(written).to_string_lossy().into_owned();
    quote!(
        const _: &[u8] = ::core::include_bytes!(#path);
    )
}
