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
            let message = "`ranks_prefix` needs `ranks = \"file\"` beside it";
            cx.syn_error(syn::Error::new(*span, message));
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
    let file = File {
        written: &written,
        span,
        prefix: (cont.attrs.ranks_prefix.as_ref())
            .map(|(p, _)| format!("{p}."))
            .unwrap_or_default(),
    };
    let mut seen = HashSet::new();
    for (number, line) in text.lines().enumerate() {
        let content = line.split('#').next().unwrap_or("").trim();
        if content.is_empty() {
            continue;
        }
        let entry = parse_entry(content).and_then(|(path, value)| {
            if !seen.insert(path.to_string()) {
                return Err(format!("`{path}` is given twice"));
            }
            file.assign(cont, path, value)
        });
        if let Err(message) = entry {
            let message = format!("ranks file `{written}`: line {}: {message}", number + 1);
            cx.syn_error(syn::Error::new(span, message));
        }
    }
}

/// The ranks file being read: its name as written, the attribute's span, and the prefix of the
/// entries that are this struct's (`ranks_prefix` and a dot, or nothing).
struct File<'a> {
    written: &'a str,
    span: proc_macro2::Span,
    prefix: String,
}

/// One line's `path = value`, or what is wrong with it.
fn parse_entry(content: &str) -> Result<(&str, Value), String> {
    let Some((path, value)) = content.split_once('=') else {
        return Err(format!(
            "expected `path = rank` or `path = dense`, got `{content}`"
        ));
    };
    let (path, value) = (path.trim(), value.trim());
    match value {
        "dense" => Ok((path, Value::Dense)),
        v => match v.parse::<u64>() {
            Ok(n) if n > 0 => Ok((path, Value::Rank(n))),
            _ => Err(format!(
                "`{path}` takes a rank of at least 1 or `dense`, not `{v}`"
            )),
        },
    }
}

impl File<'_> {
    /// Gives the entry's field the attribute the entry stands for. Entries outside the prefix,
    /// or under a nested struct's field, are left to others.
    fn assign(&self, cont: &mut Container<'_>, path: &str, value: Value) -> Result<(), String> {
        let Some(name) = path.strip_prefix(&self.prefix) else {
            return Ok(());
        };
        // An entry under a field's own path belongs to that nested struct (its `ranks_prefix`).
        let nested = name
            .split_once('.')
            .is_some_and(|(head, _)| cont.fields.iter().any(|f| *f.ident == head));
        if nested {
            return Ok(());
        }
        let nested_hint = "a nested struct reads its own entries with `ranks_prefix`";
        let struct_name = cont.input.ident.to_string();
        let Some(field) = cont.fields.iter_mut().find(|f| *f.ident == name) else {
            let under = match self.prefix.trim_end_matches('.') {
                "" => String::new(),
                prefix => format!(" under `{prefix}`"),
            };
            return Err(format!(
                "`{path}` names no field of `{struct_name}`{under}; {nested_hint}"
            ));
        };
        if !field.node.contains(false) && !field.node.contains(true) {
            return Err(format!(
                "`{path}` is not a `Linear` or `Conv2D` field; {nested_hint}"
            ));
        }
        if field.attrs.latent.is_some() || field.attrs.skip.is_some() {
            return Err(format!(
                "`{path}` also has a `latent` or `skip` attribute; keep one of the two"
            ));
        }
        let written = self.written;
        field.attrs.origin = Some(match value {
            Value::Rank(n) => {
                field.attrs.latent = Some(LatentValue::Count(n, self.span));
                format!("{written}: {path} = {n}")
            }
            Value::Dense => {
                field.attrs.skip = Some(self.span);
                format!("{written}: {path} = dense")
            }
        });
        Ok(())
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
