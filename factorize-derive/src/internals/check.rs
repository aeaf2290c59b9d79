//! Rules that span several attributes or need a field's classification.

use super::ast::{Container, Node};
use super::attr::LatentValue;
use super::ctxt::Ctxt;

pub fn check(cx: &mut Ctxt, cont: &Container<'_>) {
    check_rank_params(cx, cont);
    check_builders(cx, cont);
    for field in &cont.fields {
        if field.attrs.skip.is_some() {
            continue;
        }
        let (has_linear, has_conv) = (field.node.contains(false), field.node.contains(true));
        if !has_linear && !has_conv {
            if let Some(latent) = &field.attrs.latent {
                cx.syn_error(syn::Error::new(
                    latent.span(),
                    format!(
                        "`latent` applies to a `Linear<..>` or `Conv2D<..>` field, or a tuple with such layers written out; `{}` is neither (put it on the nested struct's fields)",
                        field.ident
                    ),
                ));
            }
            continue;
        }
        if let Some(latent) = &field.attrs.latent {
            // Fractions: [0, 0.5) for linears, [0, 1) for convolutions.
            latent.check(cx, "latent", if has_linear { 0.5 } else { 1.0 });
        }
        check_generic_dims(cx, field.ident, &field.node, field.attrs.latent.as_ref());
    }
}

/// A rank written as a name must be one of the struct's const generics: anything else would
/// reach the compiler as an unknown name far from the attribute.
fn check_rank_params(cx: &mut Ctxt, cont: &Container<'_>) {
    let consts: Vec<&syn::Ident> = cont
        .input
        .generics
        .const_params()
        .map(|c| &c.ident)
        .collect();
    let written = [&cont.attrs.latent_features, &cont.attrs.latent_channels]
        .into_iter()
        .chain(cont.fields.iter().map(|f| &f.attrs.latent))
        .filter_map(|l| l.as_ref().and_then(LatentValue::param));
    for ident in written {
        if !consts.contains(&ident) {
            cx.error_spanned_by(
                ident,
                format!(
                    "`{ident}` is not a const generic of `{}`: a rank is an integer (e.g. 64), a fraction (e.g. 0.25), or one of the struct's const generics (`struct {0}<const {ident}: usize, ..>`)",
                    cont.input.ident
                ),
            );
        }
    }
}

fn check_generic_dims(
    cx: &mut Ctxt,
    field: &syn::Ident,
    node: &Node<'_>,
    latent: Option<&LatentValue>,
) {
    let (ty, generic_dim) = match node {
        Node::Linear(dims) => (dims.ty, &dims.generic_dim),
        Node::Conv(dims) => (dims.ty, &dims.generic_dim),
        Node::Tuple(_) | Node::Wrapper(_) => {
            for item in node.children() {
                check_generic_dims(cx, field, item, latent);
            }
            return;
        }
        Node::Other(_) => return,
    };
    let Some(param) = generic_dim else {
        return;
    };
    match latent {
        Some(LatentValue::Count(..) | LatentValue::Param(_)) => {}
        Some(LatentValue::Fraction(_, span)) => cx.syn_error(syn::Error::new(
            *span,
            format!(
                "field `{field}` has dims that use the struct's const generic `{param}`: a fractional latent cannot be turned into a rank in a type on stable Rust; give an integer rank, e.g. `#[factorize(latent = 64)]`"
            ),
        )),
        None => cx.error_spanned_by(
            ty,
            format!(
                "field `{field}`: the cost rule cannot read the const generic `{param}` in a type on stable Rust; add `#[factorize(latent = <rank>)]` (checked per instantiation) or `#[factorize(skip)]`"
            ),
        ),
    }
}

/// dfdx's builders that share their module's name, with the builder's number of generic
/// arguments; the module adds the dtype and device.
const BUILDERS: &[(&str, usize)] = &[
    ("Linear", 2),
    ("UnbiasedLinear", 2),
    ("Embedding", 2),
    ("LayerNorm1D", 1),
    ("BatchNorm1D", 1),
    ("BatchNorm2D", 1),
    ("Bias2D", 1),
];

/// A builder (`Linear<128, 256>`, what `dev.build_module` takes) written where the struct
/// holds a module: one error at it, with the module's form, instead of an error about traits.
fn check_builders(cx: &mut Ctxt, cont: &Container<'_>) {
    fn walk(cx: &mut Ctxt, ty: &syn::Type, (e, d): (&syn::Ident, &syn::Ident)) {
        match ty {
            syn::Type::Paren(p) => walk(cx, &p.elem, (e, d)),
            syn::Type::Group(g) => walk(cx, &g.elem, (e, d)),
            syn::Type::Tuple(t) => t.elems.iter().for_each(|t| walk(cx, t, (e, d))),
            syn::Type::Path(p) if p.qself.is_none() => {
                let Some(last) = p.path.segments.last() else {
                    return;
                };
                let args: Vec<&syn::GenericArgument> = match &last.arguments {
                    syn::PathArguments::AngleBracketed(a) => a.args.iter().collect(),
                    _ => Vec::new(),
                };
                let name = last.ident.to_string();
                if let Some((_, n)) = BUILDERS.iter().find(|(b, _)| *b == name) {
                    if args.len() == *n {
                        let written: Vec<String> = args
                            .iter()
                            .map(|a| quote::quote!(#a).to_string().replace(' ', ""))
                            .collect();
                        let written = written.join(", ");
                        cx.error_spanned_by(
                            ty,
                            format!(
                                "`{name}<{written}>` is dfdx's builder (what `dev.build_module` takes); a struct field holds the module: write `{name}<{written}, {e}, {d}>`"
                            ),
                        );
                        return;
                    }
                }
                for arg in args {
                    if let syn::GenericArgument::Type(t) = arg {
                        walk(cx, t, (e, d));
                    }
                }
            }
            _ => {}
        }
    }
    for field in cont.fields.iter().filter(|f| f.attrs.skip.is_none()) {
        walk(cx, &field.original.ty, (&cont.dtype, &cont.device));
    }
}
