//! Rules that span several attributes or need a field's classification.

use super::ast::{Container, Node};
use super::attr::LatentValue;
use super::ctxt::Ctxt;

pub fn check(cx: &mut Ctxt, cont: &Container<'_>) {
    for field in &cont.fields {
        if field.attrs.skip.is_some() {
            continue;
        }
        let has_linear = contains_linear(&field.node);
        if !has_linear {
            if let Some(latent) = &field.attrs.latent {
                cx.syn_error(syn::Error::new(
                    latent.span(),
                    format!(
                        "`latent` applies to a `Linear<..>` field or a tuple with `Linear` layers written out; `{}` is neither (put it on the nested struct's fields)",
                        field.ident
                    ),
                ));
            }
            continue;
        }
        if let Some(latent) = &field.attrs.latent {
            latent.check(cx, "latent", 0.5);
        }
        check_generic_dims(cx, field.ident, &field.node, field.attrs.latent);
    }
}

fn contains_linear(node: &Node<'_>) -> bool {
    match node {
        Node::Linear(_) => true,
        Node::Tuple(items) => items.iter().any(contains_linear),
        Node::Other(_) => false,
    }
}

fn check_generic_dims(
    cx: &mut Ctxt,
    field: &syn::Ident,
    node: &Node<'_>,
    latent: Option<LatentValue>,
) {
    match node {
        Node::Linear(dims) => {
            let Some(param) = &dims.generic_dim else {
                return;
            };
            match latent {
                Some(LatentValue::Count(..)) => {}
                Some(LatentValue::Fraction(_, span)) => cx.syn_error(syn::Error::new(
                    span,
                    format!(
                        "field `{field}` has dims that use the struct's const generic `{param}`: a fractional latent cannot be turned into a rank in a type on stable Rust; give an integer rank, e.g. `#[factorize(latent = 64)]`"
                    ),
                )),
                None => cx.error_spanned_by(
                    dims.ty,
                    format!(
                        "field `{field}` has dims that use the struct's const generic `{param}`, and stable Rust cannot evaluate the cost rule on them in a type; add `#[factorize(latent = <rank>)]` (the rule is then checked for every instantiation) or `#[factorize(skip)]`"
                    ),
                ),
            }
        }
        Node::Tuple(items) => {
            for item in items {
                check_generic_dims(cx, field, item, latent);
            }
        }
        Node::Other(_) => {}
    }
}
