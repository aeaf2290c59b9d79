//! The type of each field in the factorized variant, and the expression that builds it.

use proc_macro2::TokenStream;
use quote::{quote, quote_spanned};
use syn::spanned::Spanned;

use super::carried::Carried;
use super::{params_ident, private};
use crate::internals::ast::{Container, Field, Node, Wrapper, WrapperKind};
use crate::internals::attr::LatentValue;

/// The cost-rule parameters of one field: the struct's, with the field's overrides.
fn field_params(cont: &Container<'_>, field: &Field<'_>) -> TokenStream {
    let base = params_ident(&cont.input.ident);
    let pv = private();
    let mut overrides = Vec::new();
    if let Some(latent) = &field.attrs.latent {
        let t = latent.tokens();
        overrides.push(quote!(latent_features: #t));
        overrides.push(quote!(latent_channels: #t));
    } else {
        // Const-generic ranks on the struct are left out of its params const.
        let struct_level = [
            (&cont.attrs.latent_features, quote!(latent_features)),
            (&cont.attrs.latent_channels, quote!(latent_channels)),
        ];
        for (value, key) in struct_level {
            if let Some(l) = value.as_ref().filter(|l| l.param().is_some()) {
                let t = l.tokens();
                overrides.push(quote!(#key: #t));
            }
        }
    }
    if let Some(v) = field.attrs.min_features {
        overrides.push(quote!(min_features: #v));
    }
    if let Some(v) = field.attrs.min_channels {
        overrides.push(quote!(min_channels: #v));
    }
    if overrides.is_empty() {
        quote!(#base)
    } else {
        quote!(#pv::FactorizeParams { #(#overrides,)* ..#base })
    }
}

/// Ranks that the user fixed instead of the rule choosing them in a type: a rank written as one
/// of the struct's const generics (on the field, or the struct's `latent_features` /
/// `latent_channels`), or a field's integer `latent` when its dims use a const generic. Stable
/// Rust cannot evaluate the rule on generic values in a type, so such a layer is always
/// factorized, and the rule is asserted for each instantiation at build time.
struct ForcedRanks {
    linear: Option<(TokenStream, String)>,
    conv: Option<(TokenStream, String)>,
    count: Option<(TokenStream, String)>,
    /// The field, for messages.
    field: String,
}

fn forced_ranks(cont: &Container<'_>, field: &Field<'_>) -> ForcedRanks {
    let written = |l: &LatentValue, key: &str| {
        let tokens = l.rank_tokens().unwrap_or_else(|| quote!(0usize));
        let text = (field.attrs.origin.clone())
            .unwrap_or_else(|| format!("#[factorize({key} = {})]", l.describe()));
        (tokens, text)
    };
    let param = |struct_level: &Option<LatentValue>, key: &str| match &field.attrs.latent {
        Some(l) if l.param().is_some() => Some(written(l, "latent")),
        Some(_) => None,
        None => struct_level
            .as_ref()
            .filter(|l| l.param().is_some())
            .map(|l| written(l, key)),
    };
    ForcedRanks {
        linear: param(&cont.attrs.latent_features, "latent_features"),
        conv: param(&cont.attrs.latent_channels, "latent_channels"),
        count: field
            .attrs
            .latent
            .as_ref()
            .filter(|l| matches!(l, LatentValue::Count(..)))
            .map(|l| written(l, "latent")),
        field: field.ident.to_string(),
    }
}

impl ForcedRanks {
    /// No rank fixed: the rule chooses every layer in the type.
    fn none() -> Self {
        Self {
            linear: None,
            conv: None,
            count: None,
            field: String::new(),
        }
    }

    /// The fixed rank of a layer (with the attribute as written), or `None` when the rule
    /// chooses in the type.
    fn pick(
        which: &Option<(TokenStream, String)>,
        count: &Option<(TokenStream, String)>,
        generic_dim: bool,
    ) -> Option<(TokenStream, String)> {
        which.clone().or_else(|| {
            generic_dim.then(|| {
                // A generic-dim field without an integer latent is rejected by the checks.
                count
                    .clone()
                    .unwrap_or_else(|| (quote!(0usize), String::new()))
            })
        })
    }

    /// The fixed rank of `layer`, if any.
    fn of(&self, layer: &Layer<'_>) -> Option<(TokenStream, String)> {
        let which = if layer.conv { &self.conv } else { &self.linear };
        Self::pick(which, &self.count, layer.generic_dim)
    }
}

/// How a layer's type in the variant is chosen.
enum Choice {
    /// `#[factorize(skip)]`: the dense type as written.
    Skipped,
    /// A rank fixed by the user (the rank's tokens, the attribute as written): always a pair
    /// of that rank, the rule asserted at build time.
    Fixed(TokenStream, String),
    /// The cost rule, evaluated in the type.
    Rule,
}

/// One field's walk: what every level of its type carries down (the cost-rule parameters,
/// whether the field is skipped, the ranks fixed on it, the carried types), and the two things
/// it generates from each node, the variant's type and the expression that builds it. Both
/// decide a layer the same way, so type and value agree.
pub struct FieldWalk<'a> {
    params: TokenStream,
    skip: bool,
    forced: ForcedRanks,
    carried: &'a Carried,
}

impl<'a> FieldWalk<'a> {
    /// The walk of a struct's field.
    pub fn of(cont: &Container<'_>, field: &Field<'_>, carried: &'a Carried) -> Self {
        Self {
            params: field_params(cont, field),
            skip: field.attrs.skip.is_some(),
            forced: forced_ranks(cont, field),
            carried,
        }
    }

    /// A walk under `params` with nothing skipped and no rank fixed (`sequential!`'s).
    pub fn plain(params: TokenStream, carried: &'a Carried) -> Self {
        Self {
            params,
            skip: false,
            forced: ForcedRanks::none(),
            carried,
        }
    }

    /// A `Linear` or `Conv2D` node and how its type is chosen; `None` for a malformed one
    /// (already reported by the parser).
    fn layer<'n>(&self, node: &'n Node<'_>) -> Option<(Layer<'n>, Choice)> {
        let l = Layer::of(node, &self.params)?;
        let choice = match self.forced.of(&l) {
            _ if self.skip => Choice::Skipped,
            Some((k, written)) => Choice::Fixed(k, written),
            None => Choice::Rule,
        };
        Some((l, choice))
    }

    /// The field's type in the variant.
    pub fn ty(&self, node: &Node<'_>) -> TokenStream {
        let pv = private();
        match node {
            Node::Linear(_) | Node::Conv(_) => {
                let Some((l, choice)) = self.layer(node) else {
                    return TokenStream::new();
                };
                let (dense, decision) = (&l.dense, &l.decision);
                match choice {
                    Choice::Skipped => {
                        let ty = l.written;
                        quote!(#ty)
                    }
                    Choice::Fixed(k, _) => {
                        quote_spanned!(l.span=> <#dense as #pv::DenseLayer>::Pair<#k>)
                    }
                    Choice::Rule => quote_spanned! {l.span=>
                        <#pv::Pick<{ #decision.is_replace() }> as #pv::Choose<{ #decision.latent() }, #dense>>::Out
                    },
                }
            }
            Node::Tuple(items) => {
                let items = items.iter().map(|n| self.ty(n));
                quote!(( #(#items,)* ))
            }
            Node::Wrapper(w) => {
                let name = quote::format_ident!("{}", wrapper_name(w.kind));
                let parts = w.parts.iter().map(|n| self.ty(n));
                let count = w.count.map(|c| quote!(#c));
                quote!(#pv::#name<#(#parts,)* #count>)
            }
            Node::Other(ty) if self.skip => quote!(#ty),
            Node::Other(ty) => {
                let named = self.carried.leaf(ty);
                quote_spanned!(super::at(ty.span())=> <#named as #pv::Factorizable>::Factorized)
            }
        }
    }

    /// The expression building the field of the variant from `access` (a reference to the
    /// original), reporting under `path` (a `&str` expression).
    pub fn value(&self, node: &Node<'_>, access: TokenStream, path: TokenStream) -> TokenStream {
        let pv = private();
        match node {
            Node::Linear(_) | Node::Conv(_) => {
                let Some((l, choice)) = self.layer(node) else {
                    return TokenStream::new();
                };
                let (dense, decision) = (&l.dense, &l.decision);
                match choice {
                    Choice::Skipped => quote!(#pv::skipped(#path, #access, __report)),
                    Choice::Fixed(k, written) => {
                        let check = rule_check(&l, &written, &self.forced.field);
                        quote_spanned! {l.span=>
                            {
                                const { #check };
                                #pv::forced::<#k, #dense>(#path, #access, __cfg, __report)?
                            }
                        }
                    }
                    Choice::Rule => quote_spanned! {l.span=>
                        <#pv::Pick<{ #decision.is_replace() }> as #pv::Choose<{ #decision.latent() }, #dense>>::build(
                            #path,
                            #access,
                            #decision,
                            __cfg,
                            __report,
                        )?
                    },
                }
            }
            Node::Tuple(items) => {
                let items = items.iter().enumerate().map(|(k, n)| {
                    let index = syn::Index::from(k);
                    let name = k.to_string();
                    self.value(
                        n,
                        quote!(&(#access).#index),
                        quote!(&#pv::join(#path, #name)),
                    )
                });
                quote!(( #(#items,)* ))
            }
            Node::Wrapper(w) => self.wrapper_value(w, access, path),
            Node::Other(_) if self.skip => quote!(::core::clone::Clone::clone(#access)),
            Node::Other(ty) => {
                let named = self.carried.leaf(ty);
                quote_spanned! {super::at(ty.span())=>
                    <#named as #pv::Factorizable>::factorize_into(#access, #path, __cfg, __report)?
                }
            }
        }
    }

    /// Builds a wrapper of the variant around its parts' variants, with dfdx's names for the
    /// parts as report paths (`0`, `f`/`r`, the block index), as the runtime's wrapper impls do.
    fn wrapper_value(
        &self,
        w: &Wrapper<'_>,
        access: TokenStream,
        path: TokenStream,
    ) -> TokenStream {
        let pv = private();
        let part = |n: &Node<'_>, field: TokenStream, name: &str| {
            self.value(
                n,
                quote!(&(#access).#field),
                quote!(&#pv::join(#path, #name)),
            )
        };
        match (w.kind, w.parts.as_slice()) {
            (WrapperKind::Newtype(name), [inner]) => {
                let name = quote::format_ident!("{}", name);
                let inner = part(inner, quote!(0), "0");
                quote!(#pv::#name(#inner))
            }
            (WrapperKind::GeneralizedResidual, [f, r]) => {
                let (f, r) = (part(f, quote!(f), "f"), part(r, quote!(r), "r"));
                quote!(#pv::GeneralizedResidual { f: #f, r: #r })
            }
            (WrapperKind::Repeated, [block]) => {
                // A block holding a `Repeated` shadows these names in its own closure; every use
                // of the outer ones is evaluated before that, so nesting needs no fresh names.
                let (index, module, here) = (
                    quote::format_ident!("__index"),
                    quote::format_ident!("__block"),
                    quote::format_ident!("__block_path"),
                );
                let value = self.value(block, quote!(#module), quote!(&#here));
                quote! {
                    #pv::Repeated {
                        modules: (#access)
                            .modules
                            .iter()
                            .enumerate()
                            .map(|(#index, #module)| {
                                let #here = #pv::join(#path, &#index.to_string());
                                ::core::result::Result::Ok::<_, #pv::FactorizeError>(#value)
                            })
                            .collect::<::core::result::Result<::std::vec::Vec<_>, _>>()?,
                    }
                }
            }
            // The parser builds each kind with its number of parts.
            _ => quote!(::core::compile_error!("factorize: malformed wrapper")),
        }
    }
}

/// The dfdx type name of a wrapper (re-exported under `__private`).
pub fn wrapper_name(kind: WrapperKind) -> &'static str {
    match kind {
        WrapperKind::Newtype(name) => name,
        WrapperKind::GeneralizedResidual => "GeneralizedResidual",
        WrapperKind::Repeated => "Repeated",
    }
}

/// A `Linear` or `Conv2D` node as the generated code needs it.
struct Layer<'a> {
    /// The type as written in the field.
    written: &'a syn::Type,
    /// The dense type as the runtime names it (the field may use dfdx's builder form).
    dense: TokenStream,
    /// The cost rule's verdict on it, a const expression.
    decision: TokenStream,
    /// `[in, out, kernel]` as value expressions.
    dims: [TokenStream; 3],
    conv: bool,
    /// Whether its dims use one of the struct's const generics.
    generic_dim: bool,
    span: proc_macro2::Span,
}

impl<'a> Layer<'a> {
    fn of(node: &Node<'a>, params: &TokenStream) -> Option<Self> {
        let pv = private();
        Some(match node {
            Node::Linear(d) => {
                let (i, o, e, dev) = (d.in_dim, d.out_dim, d.dtype, d.device);
                let (vi, vo) = (dim(i), dim(o));
                Layer {
                    written: d.ty,
                    dense: quote!(#pv::Linear<#i, #o, #e, #dev>),
                    decision: quote!(#pv::linear_decision(&#params, #vi, #vo)),
                    dims: [vi, vo, quote!(1usize)],
                    conv: false,
                    generic_dim: d.generic_dim.is_some(),
                    span: super::at(d.ty.span()),
                }
            }
            Node::Conv(d) => {
                let (i, o, k) = (d.in_dim, d.out_dim, d.kernel);
                let (st, pa, di, e, dev) = (d.stride, d.padding, d.dilation, d.dtype, d.device);
                let (vi, vo, vk) = (dim(i), dim(o), dim(k));
                Layer {
                    written: d.ty,
                    dense: quote!(#pv::Conv2D<#i, #o, #k, #st, #pa, #di, #e, #dev>),
                    decision: quote!(#pv::conv_decision(&#params, #vi, #vo, #vk, 1)),
                    dims: [vi, vo, vk],
                    conv: true,
                    generic_dim: d.generic_dim.is_some(),
                    span: super::at(d.ty.span()),
                }
            }
            _ => return None,
        })
    }
}

/// A const-evaluated statement that panics, naming the dims and the break-even, when the
/// cost rule does not replace `layer`, on which a rank was forced.
fn rule_check(layer: &Layer<'_>, written: &str, field: &str) -> TokenStream {
    let pv = private();
    let (kind, min_key, switch) = if layer.conv {
        ("Conv2D", "min_channels", "factorize_convs")
    } else {
        ("Linear", "min_features", "factorize_linears")
    };
    let ([in_dim, out_dim, kernel], decision) = (&layer.dims, &layer.decision);
    quote_spanned! {layer.span=>
        if let ::core::option::Option::Some(message) = &#pv::violation(
            &#pv::Forced {
                written: #written,
                field: #field,
                kind: #kind,
                in_dim: #in_dim,
                out_dim: #out_dim,
                kernel: #kernel,
                min_key: #min_key,
                switch: #switch,
            },
            #decision,
        ) {
            ::core::panic!("{}", message.as_str());
        }
    }
}

/// Module-level checks for integer ranks written on fields whose dims the compiler knows
/// (literals, named consts): the rule must replace each layer such a rank is forced on, or
/// the build fails here, for every struct, whether or not it is ever factorized.
pub fn literal_rank_checks(cont: &Container<'_>) -> TokenStream {
    fn walk(
        node: &Node<'_>,
        params: &TokenStream,
        (written, field, span): (&str, &str, proc_macro2::Span),
        out: &mut Vec<TokenStream>,
    ) {
        match Layer::of(node, params) {
            Some(mut layer) if !layer.generic_dim => {
                layer.span = span;
                let check = rule_check(&layer, written, field);
                out.push(quote_spanned!(span=> const _: () = #check;));
            }
            Some(_) => {}
            None => node
                .children()
                .iter()
                .for_each(|n| walk(n, params, (written, field, span), out)),
        }
    }
    let mut out = Vec::new();
    for f in &cont.fields {
        if let (Some(LatentValue::Count(n, span)), None) = (&f.attrs.latent, f.attrs.skip) {
            let written =
                (f.attrs.origin.clone()).unwrap_or_else(|| format!("#[factorize(latent = {n})]"));
            let params = field_params(cont, f);
            let field = f.ident.to_string();
            walk(&f.node, &params, (&written, &field, *span), &mut out);
        }
    }
    quote!(#(#out)*)
}

/// A dim as a value expression: `{ N * 2 }` as written in a type becomes `(N * 2)`, so the
/// generated call does not trip `unused_braces` in the user's crate.
fn dim(arg: &syn::GenericArgument) -> TokenStream {
    if let syn::GenericArgument::Const(syn::Expr::Block(b)) = arg {
        if let [syn::Stmt::Expr(e, None)] = b.block.stmts.as_slice() {
            return quote!((#e));
        }
    }
    quote!(#arg)
}
