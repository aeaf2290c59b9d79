//! Parsing of `#[factorize(...)]` on the struct and on its fields.

use proc_macro2::{Ident, Span, TokenStream};
use quote::quote;
use syn::meta::ParseNestedMeta;
use syn::spanned::Spanned;
use syn::{Attribute, Lit};

use super::ctxt::Ctxt;
use super::symbol::*;

/// A latent size as written: an integer rank, a fraction, or one of the struct's const
/// generics (a rank fixed per instantiation: `#[factorize(latent_features = R)]`).
#[derive(Clone)]
pub enum LatentValue {
    Count(u64, Span),
    Fraction(f64, Span),
    Param(Ident),
}

impl LatentValue {
    pub fn span(&self) -> Span {
        match self {
            LatentValue::Count(_, s) | LatentValue::Fraction(_, s) => *s,
            LatentValue::Param(i) => i.span(),
        }
    }

    pub fn tokens(&self) -> TokenStream {
        match self {
            LatentValue::Count(n, _) => {
                let n = *n as usize;
                quote!(::factorize_runtime::__private::Latent::Count(#n))
            }
            LatentValue::Fraction(f, _) => {
                quote!(::factorize_runtime::__private::Latent::Fraction(#f))
            }
            LatentValue::Param(i) => quote!(::factorize_runtime::__private::Latent::Count(#i)),
        }
    }

    /// The rank as a const-generic argument, when it is a rank and not a fraction.
    pub fn rank_tokens(&self) -> Option<TokenStream> {
        match self {
            LatentValue::Count(n, _) => {
                let n = *n as usize;
                Some(quote!(#n))
            }
            LatentValue::Param(i) => Some(quote!(#i)),
            LatentValue::Fraction(..) => None,
        }
    }

    /// The struct's const generic this rank names, if it names one.
    pub fn param(&self) -> Option<&Ident> {
        match self {
            LatentValue::Param(i) => Some(i),
            _ => None,
        }
    }

    /// As written, for messages and docs.
    pub fn describe(&self) -> String {
        match self {
            LatentValue::Count(n, _) => n.to_string(),
            LatentValue::Fraction(f, _) => f.to_string(),
            LatentValue::Param(i) => i.to_string(),
        }
    }

    /// Checks the value for a layer kind whose fractions lie in `[0, limit)`.
    pub fn check(&self, cx: &mut Ctxt, key: &str, limit: f64) {
        match *self {
            LatentValue::Param(_) => {}
            LatentValue::Count(0, span) => cx.syn_error(syn::Error::new(
                span,
                format!(
                    "`{key}` must be at least 1 (an integer rank) or a fraction in [0, {limit})"
                ),
            )),
            LatentValue::Fraction(f, span) if !(0.0..limit).contains(&f) => {
                cx.syn_error(syn::Error::new(
                    span,
                    format!("`{key}` as a fraction must lie in [0, {limit}), got {f}"),
                ))
            }
            _ => {}
        }
    }
}

/// An attribute value with the span of its key, to report duplicates.
struct Slot<T> {
    value: Option<(T, Span)>,
}

impl<T> Default for Slot<T> {
    fn default() -> Self {
        Self { value: None }
    }
}

impl<T> Slot<T> {
    fn set(&mut self, cx: &mut Ctxt, key: &str, span: Span, value: Option<T>) {
        let Some(value) = value else {
            return;
        };
        if self.value.is_some() {
            cx.syn_error(syn::Error::new(
                span,
                format!("duplicate factorize attribute `{key}`"),
            ));
        } else {
            self.value = Some((value, span));
        }
    }

    fn get(self) -> Option<T> {
        self.value.map(|(v, _)| v)
    }
}

/// The six parameters given on the struct; unset ones take Composer's defaults.
#[derive(Default)]
pub struct ContainerAttrs {
    pub factorize_convs: Option<bool>,
    pub factorize_linears: Option<bool>,
    pub min_channels: Option<usize>,
    pub latent_channels: Option<LatentValue>,
    pub min_features: Option<usize>,
    pub latent_features: Option<LatentValue>,
    /// `ranks = "file"`: the path as written and the literal's span.
    pub ranks: Option<(String, Span)>,
    /// `ranks_prefix = "layers.0"`: the path of this struct's fields in the ranks file.
    pub ranks_prefix: Option<(String, Span)>,
}

impl ContainerAttrs {
    pub fn parse(cx: &mut Ctxt, attrs: &[Attribute]) -> Self {
        let mut convs = Slot::default();
        let mut linears = Slot::default();
        let mut min_ch = Slot::default();
        let mut lat_ch = Slot::default();
        let mut min_f = Slot::default();
        let mut lat_f = Slot::default();
        let mut ranks = Slot::default();
        let mut prefix = Slot::default();
        for attr in attrs.iter().filter(|a| a.path().is_ident(FACTORIZE)) {
            let result = attr.parse_nested_meta(|meta| {
                let key = key_of(&meta);
                let span = meta.path.span();
                match key.as_str() {
                    RANKS => {
                        let v = parse_str(cx, &meta, &key)?;
                        ranks.set(cx, RANKS, span, v)
                    }
                    RANKS_PREFIX => {
                        let v = parse_str(cx, &meta, &key)?;
                        prefix.set(cx, RANKS_PREFIX, span, v)
                    }
                    FACTORIZE_CONVS => {
                        let v = parse_bool(cx, &meta, &key)?;
                        convs.set(cx, FACTORIZE_CONVS, span, v)
                    }
                    FACTORIZE_LINEARS => {
                        let v = parse_bool(cx, &meta, &key)?;
                        linears.set(cx, FACTORIZE_LINEARS, span, v)
                    }
                    MIN_CHANNELS => {
                        let v = parse_usize(cx, &meta, &key)?;
                        min_ch.set(cx, MIN_CHANNELS, span, v)
                    }
                    LATENT_CHANNELS => {
                        let v = parse_latent(cx, &meta, &key)?;
                        if let Some(v) = &v {
                            v.check(cx, LATENT_CHANNELS, 1.0);
                        }
                        lat_ch.set(cx, LATENT_CHANNELS, span, v)
                    }
                    MIN_FEATURES => {
                        let v = parse_usize(cx, &meta, &key)?;
                        min_f.set(cx, MIN_FEATURES, span, v)
                    }
                    LATENT_FEATURES => {
                        let v = parse_latent(cx, &meta, &key)?;
                        if let Some(v) = &v {
                            v.check(cx, LATENT_FEATURES, 0.5);
                        }
                        lat_f.set(cx, LATENT_FEATURES, span, v)
                    }
                    SKIP | LATENT => {
                        return Err(
                            meta.error(format!("`{key}` belongs on a field, not on the struct"))
                        )
                    }
                    _ => return Err(unknown(&meta, &key, "struct", CONTAINER_KEYS)),
                }
                Ok(())
            });
            if let Err(e) = result {
                cx.syn_error(e);
            }
        }
        Self {
            factorize_convs: convs.get(),
            factorize_linears: linears.get(),
            min_channels: min_ch.get(),
            latent_channels: lat_ch.get(),
            min_features: min_f.get(),
            latent_features: lat_f.get(),
            ranks: ranks.get(),
            ranks_prefix: prefix.get(),
        }
    }

    /// A `FactorizeParams` expression with these values over the defaults.
    pub fn params_tokens(&self) -> TokenStream {
        let mut fields = Vec::new();
        if let Some(v) = self.factorize_convs {
            fields.push(quote!(factorize_convs: #v));
        }
        if let Some(v) = self.factorize_linears {
            fields.push(quote!(factorize_linears: #v));
        }
        if let Some(v) = self.min_channels {
            fields.push(quote!(min_channels: #v));
        }
        // A const-generic rank cannot enter a free const; fields take it as an override.
        if let Some(v) = self
            .latent_channels
            .as_ref()
            .filter(|v| v.param().is_none())
        {
            let t = v.tokens();
            fields.push(quote!(latent_channels: #t));
        }
        if let Some(v) = self.min_features {
            fields.push(quote!(min_features: #v));
        }
        if let Some(v) = self
            .latent_features
            .as_ref()
            .filter(|v| v.param().is_none())
        {
            let t = v.tokens();
            fields.push(quote!(latent_features: #t));
        }
        quote! {
            ::factorize_runtime::__private::FactorizeParams {
                #(#fields,)*
                ..::factorize_runtime::__private::FactorizeParams::DEFAULT
            }
        }
    }
}

/// `#[factorize(skip)]`, `#[factorize(latent = ..)]` and per-field minimum widths.
#[derive(Default)]
pub struct FieldAttrs {
    pub skip: Option<Span>,
    pub latent: Option<LatentValue>,
    pub min_features: Option<usize>,
    pub min_channels: Option<usize>,
    /// Where `latent` or `skip` came from when a ranks file set it, for messages.
    pub origin: Option<String>,
}

impl FieldAttrs {
    pub fn parse(cx: &mut Ctxt, attrs: &[Attribute]) -> Self {
        let mut skip = Slot::default();
        let mut latent = Slot::default();
        let mut min_f = Slot::default();
        let mut min_ch = Slot::default();
        for attr in attrs.iter().filter(|a| a.path().is_ident(FACTORIZE)) {
            let result = attr.parse_nested_meta(|meta| {
                let key = key_of(&meta);
                let span = meta.path.span();
                match key.as_str() {
                    SKIP => {
                        if meta.input.peek(syn::Token![=]) {
                            return Err(meta.error("`skip` takes no value: write `#[factorize(skip)]`"));
                        }
                        skip.set(cx, SKIP, span, Some(span))
                    }
                    LATENT => {
                        let v = parse_latent(cx, &meta, &key)?;
                        latent.set(cx, LATENT, span, v)
                    }
                    MIN_FEATURES => {
                        let v = parse_usize(cx, &meta, &key)?;
                        min_f.set(cx, MIN_FEATURES, span, v)
                    }
                    MIN_CHANNELS => {
                        let v = parse_usize(cx, &meta, &key)?;
                        min_ch.set(cx, MIN_CHANNELS, span, v)
                    }
                    FACTORIZE_CONVS | FACTORIZE_LINEARS | LATENT_CHANNELS | LATENT_FEATURES => {
                        return Err(meta.error(format!(
                            "`{key}` belongs on the struct; on a field use `latent`, `min_features`, `min_channels` or `skip`"
                        )))
                    }
                    _ => return Err(unknown(&meta, &key, "field", FIELD_KEYS)),
                }
                Ok(())
            });
            if let Err(e) = result {
                cx.syn_error(e);
            }
        }
        let attrs = Self {
            skip: skip.get(),
            latent: latent.get(),
            min_features: min_f.get(),
            min_channels: min_ch.get(),
            origin: None,
        };
        if let (Some(span), true) = (
            attrs.skip,
            attrs.latent.is_some() || attrs.min_features.is_some() || attrs.min_channels.is_some(),
        ) {
            cx.syn_error(syn::Error::new(
                span,
                "a skipped field takes no other factorize attribute",
            ));
        }
        attrs
    }
}

fn key_of(meta: &ParseNestedMeta<'_>) -> String {
    meta.path
        .get_ident()
        .map(|i| i.to_string())
        .unwrap_or_else(|| {
            let path = &meta.path;
            quote!(#path).to_string().replace(' ', "")
        })
}

fn unknown(meta: &ParseNestedMeta<'_>, key: &str, place: &str, expected: &[&str]) -> syn::Error {
    meta.error(format!(
        "unknown factorize {place} attribute `{key}`; expected one of: {}",
        expected.join(", ")
    ))
}

/// The literal value of `key = <lit>`. A missing `=` aborts this attribute (`Err`); a value of the
/// wrong kind is recorded in `cx` and parsing goes on with the next key (`Ok(None)`), so that
/// every bad value is reported at once.
fn value_lit(
    cx: &mut Ctxt,
    meta: &ParseNestedMeta<'_>,
    key: &str,
    expected: &str,
) -> syn::Result<Option<Lit>> {
    let expr = value_expr(meta, key, expected)?;
    lit_of(cx, expr, key, expected)
}

/// The value of `key = <expr>`, out of any invisible group.
fn value_expr(meta: &ParseNestedMeta<'_>, key: &str, expected: &str) -> syn::Result<syn::Expr> {
    if !meta.input.peek(syn::Token![=]) {
        return Err(meta.error(format!("`{key}` needs a value: `{key} = {expected}`")));
    }
    let mut expr: syn::Expr = meta.value()?.parse()?;
    // A literal passed through a `macro_rules!` fragment arrives in an invisible group.
    while let syn::Expr::Group(g) = expr {
        expr = *g.expr;
    }
    Ok(expr)
}

fn lit_of(cx: &mut Ctxt, expr: syn::Expr, key: &str, expected: &str) -> syn::Result<Option<Lit>> {
    match expr {
        syn::Expr::Lit(syn::ExprLit { lit, .. }) => Ok(Some(lit)),
        other => {
            cx.error_spanned_by(
                other,
                format!("`{key}` expects {expected}, written as a literal"),
            );
            Ok(None)
        }
    }
}

fn parse_str(
    cx: &mut Ctxt,
    meta: &ParseNestedMeta<'_>,
    key: &str,
) -> syn::Result<Option<(String, Span)>> {
    Ok(match value_lit(cx, meta, key, "a string")? {
        Some(Lit::Str(s)) => Some((s.value(), s.span())),
        Some(other) => {
            cx.error_spanned_by(
                other,
                format!("`{key}` expects a string, e.g. `{key} = \"ranks/model.ranks\"`"),
            );
            None
        }
        None => None,
    })
}

fn parse_bool(cx: &mut Ctxt, meta: &ParseNestedMeta<'_>, key: &str) -> syn::Result<Option<bool>> {
    Ok(match value_lit(cx, meta, key, "`true` or `false`")? {
        Some(Lit::Bool(b)) => Some(b.value),
        Some(other) => {
            cx.error_spanned_by(other, format!("`{key}` expects `true` or `false`"));
            None
        }
        None => None,
    })
}

fn parse_usize(cx: &mut Ctxt, meta: &ParseNestedMeta<'_>, key: &str) -> syn::Result<Option<usize>> {
    Ok(match value_lit(cx, meta, key, "an integer")? {
        Some(Lit::Int(i)) => match i.base10_parse::<usize>() {
            Ok(v) => Some(v),
            Err(e) => {
                cx.syn_error(e);
                None
            }
        },
        Some(other) => {
            cx.error_spanned_by(other, format!("`{key}` expects an integer"));
            None
        }
        None => None,
    })
}

fn parse_latent(
    cx: &mut Ctxt,
    meta: &ParseNestedMeta<'_>,
    key: &str,
) -> syn::Result<Option<LatentValue>> {
    const EXPECTED: &str = "an integer rank, a fraction or one of the struct's const generics";
    let expr = value_expr(meta, key, EXPECTED)?;
    if let syn::Expr::Path(p) = &expr {
        if let (Some(ident), true) = (p.path.get_ident(), p.qself.is_none()) {
            return Ok(Some(LatentValue::Param(ident.clone())));
        }
    }
    let parsed = match lit_of(cx, expr, key, EXPECTED)? {
        Some(Lit::Int(i)) => i
            .base10_parse::<u64>()
            .map(|v| LatentValue::Count(v, i.span())),
        Some(Lit::Float(f)) => f
            .base10_parse::<f64>()
            .map(|v| LatentValue::Fraction(v, f.span())),
        Some(other) => Err(syn::Error::new_spanned(
            other,
            format!("`{key}` expects an integer rank (e.g. 128), a fraction (e.g. 0.25) or one of the struct's const generics (e.g. R)"),
        )),
        None => return Ok(None),
    };
    Ok(parsed.map_err(|e| cx.syn_error(e)).ok())
}
