//! The derive's view of the input: the struct, its dtype and device parameters, and each field
//! classified as a `Linear`, a tuple of modules, or another module. Original syntax is kept for
//! spans.

use proc_macro2::Ident;
use syn::spanned::Spanned;
use syn::{Data, DeriveInput, Fields, GenericArgument, GenericParam, PathArguments, Type};

use super::attr::{ContainerAttrs, FieldAttrs};
use super::ctxt::Ctxt;
use super::symbol::{GENERALIZED_RESIDUAL, NEWTYPE_WRAPPERS, REPEATED};

pub struct Container<'a> {
    pub input: &'a DeriveInput,
    pub attrs: ContainerAttrs,
    pub fields: Vec<Field<'a>>,
    /// The dtype parameter (`E: Dtype`).
    pub dtype: Ident,
    /// The device parameter (`D: Device<E>`).
    pub device: Ident,
}

pub struct Field<'a> {
    pub ident: &'a Ident,
    pub original: &'a syn::Field,
    pub attrs: FieldAttrs,
    pub node: Node<'a>,
}

/// What a field (or a tuple element) is.
pub enum Node<'a> {
    /// `Linear<I, O, E, D>` written out.
    Linear(LinearDims<'a>),
    /// `Conv2D<I, O, K, S, P, DIL, E, D>` written out.
    Conv(ConvDims<'a>),
    /// A tuple of modules written out: dfdx's sequential model.
    Tuple(Vec<Node<'a>>),
    /// One of dfdx's wrappers (`Residual`, `Repeated`, ..) with layers written out inside.
    Wrapper(Wrapper<'a>),
    /// Anything else: carried over through its `Factorizable` impl.
    Other(&'a Type),
}

impl<'a> Node<'a> {
    /// The nodes inside a tuple or a wrapper.
    pub fn children(&self) -> &[Node<'a>] {
        match self {
            Node::Tuple(items) => items,
            Node::Wrapper(w) => &w.parts,
            Node::Linear(_) | Node::Conv(_) | Node::Other(_) => &[],
        }
    }

    /// Whether a `Linear` (`Conv2D` when `conv`) is written out in this node.
    pub fn contains(&self, conv: bool) -> bool {
        match self {
            Node::Linear(_) => !conv,
            Node::Conv(_) => conv,
            _ => self.children().iter().any(|n| n.contains(conv)),
        }
    }
}

/// dfdx's module wrappers that the derive looks into.
#[derive(Clone, Copy, PartialEq, Eq)]
pub enum WrapperKind {
    /// `Residual<T>`, `SplitInto<T>`, `AddInto<T>`: a tuple struct around one module.
    Newtype(&'static str),
    /// `GeneralizedResidual<F, R>`: fields `f` and `r`.
    GeneralizedResidual,
    /// `Repeated<T, N>`: `N` copies in `modules`.
    Repeated,
}

pub struct Wrapper<'a> {
    pub kind: WrapperKind,
    /// The wrapped modules: one, or `f` and `r`.
    pub parts: Vec<Node<'a>>,
    /// `N` of `Repeated<T, N>`.
    pub count: Option<&'a GenericArgument>,
}

pub struct LinearDims<'a> {
    pub ty: &'a Type,
    pub in_dim: &'a GenericArgument,
    pub out_dim: &'a GenericArgument,
    pub dtype: &'a GenericArgument,
    pub device: &'a GenericArgument,
    /// The first of the struct's own const generics the dims use, if any.
    pub generic_dim: Option<Ident>,
}

pub struct ConvDims<'a> {
    pub ty: &'a Type,
    pub in_dim: &'a GenericArgument,
    pub out_dim: &'a GenericArgument,
    pub kernel: &'a GenericArgument,
    pub stride: &'a GenericArgument,
    pub padding: &'a GenericArgument,
    pub dilation: &'a GenericArgument,
    pub dtype: &'a GenericArgument,
    pub device: &'a GenericArgument,
    /// The first of the struct's own const generics the dims use, if any.
    pub generic_dim: Option<Ident>,
}

/// Which derive is reading the struct: `TensorCollection` needs only its shape, not the
/// `#[factorize]` attributes (the `Factorizable` derive beside it reports those, once).
#[derive(Clone, Copy, PartialEq, Eq)]
pub enum Derive {
    Factorizable,
    TensorCollection,
}

impl Derive {
    fn name(self) -> &'static str {
        match self {
            Derive::Factorizable => "Factorizable",
            Derive::TensorCollection => "TensorCollection",
        }
    }
}

impl<'a> Container<'a> {
    pub fn from_ast(cx: &mut Ctxt, input: &'a DeriveInput, derive: Derive) -> Option<Self> {
        let name = derive.name();
        let named = match &input.data {
            Data::Struct(s) => match &s.fields {
                Fields::Named(named) => named,
                Fields::Unnamed(_) => {
                    cx.error_spanned_by(
                        &input.ident,
                        format!("{name} cannot be derived for a tuple struct: name its fields (`struct Model<E, D> {{ fc1: Linear<..>, .. }}`)"),
                    );
                    return None;
                }
                Fields::Unit => {
                    cx.error_spanned_by(
                        &input.ident,
                        format!("{name} cannot be derived for a unit struct: it has no layers"),
                    );
                    return None;
                }
            },
            Data::Enum(e) => {
                cx.error_spanned_by(
                    e.enum_token,
                    format!("{name} can only be derived for a struct with named fields, not for an enum"),
                );
                return None;
            }
            Data::Union(u) => {
                cx.error_spanned_by(
                    u.union_token,
                    format!("{name} can only be derived for a struct with named fields, not for a union"),
                );
                return None;
            }
        };
        let parse_attrs = derive == Derive::Factorizable;
        let attrs = if parse_attrs {
            ContainerAttrs::parse(cx, &input.attrs)
        } else {
            ContainerAttrs::default()
        };
        let (dtype, device) = dtype_and_device(cx, input, name)?;
        let const_params: Vec<Ident> = input
            .generics
            .params
            .iter()
            .filter_map(|p| match p {
                GenericParam::Const(c) => Some(c.ident.clone()),
                _ => None,
            })
            .collect();
        let fields = named
            .named
            .iter()
            .map(|f| Field {
                // Named fields always have an ident.
                ident: f.ident.as_ref().unwrap_or(&input.ident),
                original: f,
                attrs: if parse_attrs {
                    FieldAttrs::parse(cx, &f.attrs)
                } else {
                    FieldAttrs::default()
                },
                node: classify(&f.ty, &const_params),
            })
            .collect();
        Some(Container {
            input,
            attrs,
            fields,
            dtype,
            device,
        })
    }
}

/// Finds `E: Dtype` and `D: Device<E>` (or `Storage<E>`) by their bounds.
fn dtype_and_device(cx: &mut Ctxt, input: &DeriveInput, name: &str) -> Option<(Ident, Ident)> {
    let mut dtype = None;
    let mut device = None;
    let bound_names =
        |bounds: &syn::punctuated::Punctuated<syn::TypeParamBound, syn::Token![+]>| {
            bounds
                .iter()
                .filter_map(|b| match b {
                    syn::TypeParamBound::Trait(t) => {
                        t.path.segments.last().map(|s| s.ident.to_string())
                    }
                    _ => None,
                })
                .collect::<Vec<_>>()
        };
    let where_bounds = |ident: &Ident| {
        input
            .generics
            .where_clause
            .iter()
            .flat_map(|w| w.predicates.iter())
            .filter_map(|p| match p {
                syn::WherePredicate::Type(t) => match &t.bounded_ty {
                    Type::Path(tp) if tp.path.is_ident(ident) => Some(bound_names(&t.bounds)),
                    _ => None,
                },
                _ => None,
            })
            .flatten()
            .collect::<Vec<_>>()
    };
    for param in input.generics.type_params() {
        let mut names = bound_names(&param.bounds);
        names.extend(where_bounds(&param.ident));
        if names.iter().any(|n| n == "Dtype") {
            dtype = Some(param.ident.clone());
        } else if names.iter().any(|n| n == "Device" || n == "Storage") {
            device = Some(param.ident.clone());
        }
    }
    match (dtype, device) {
        (Some(e), Some(d)) => Some((e, d)),
        _ if input.generics.params.is_empty() => {
            // A concrete struct (`Linear<.., f32, Cpu>` fields) cannot name its variant at
            // another dtype or device, which dfdx's `TensorCollection` needs.
            let ident = &input.ident;
            cx.error_spanned_by(
                ident,
                format!("{name} needs a struct generic over dtype and device, as dfdx's modules are: write `struct {ident}<E: Dtype, D: Device<E>>` and use `{ident}<f32, Cpu>`"),
            );
            None
        }
        _ => {
            cx.error_spanned_by(
                &input.generics,
                format!("{name} needs the dfdx module generics: a dtype parameter `E: Dtype` and a device parameter `D: Device<E>`"),
            );
            None
        }
    }
}

pub fn classify<'a>(ty: &'a Type, const_params: &[Ident]) -> Node<'a> {
    match ty {
        Type::Paren(p) => classify(&p.elem, const_params),
        Type::Group(g) => classify(&g.elem, const_params),
        Type::Tuple(t) if !t.elems.is_empty() => {
            Node::Tuple(t.elems.iter().map(|e| classify(e, const_params)).collect())
        }
        Type::Path(p) if p.qself.is_none() => {
            let Some(last) = p.path.segments.last() else {
                return Node::Other(ty);
            };
            let PathArguments::AngleBracketed(args) = &last.arguments else {
                return Node::Other(ty);
            };
            let args: Vec<&GenericArgument> = args.args.iter().collect();
            if let Some(w) = wrapper(&last.ident, &args, const_params) {
                return Node::Wrapper(w);
            }
            if last.ident == "Conv2D" {
                let [in_dim, out_dim, kernel, stride, padding, dilation, dtype, device] =
                    args.as_slice()
                else {
                    return Node::Other(ty);
                };
                let generic_dim = [in_dim, out_dim, kernel, stride, padding, dilation]
                    .iter()
                    .find_map(|a| mentions(a, const_params));
                return Node::Conv(ConvDims {
                    ty,
                    in_dim,
                    out_dim,
                    kernel,
                    stride,
                    padding,
                    dilation,
                    dtype,
                    device,
                    generic_dim,
                });
            }
            if last.ident != "Linear" {
                return Node::Other(ty);
            }
            let [in_dim, out_dim, dtype, device] = args.as_slice() else {
                return Node::Other(ty);
            };
            let generic_dim = [in_dim, out_dim]
                .iter()
                .find_map(|a| mentions(a, const_params));
            Node::Linear(LinearDims {
                ty,
                in_dim,
                out_dim,
                dtype,
                device,
                generic_dim,
            })
        }
        _ => Node::Other(ty),
    }
}

/// A dfdx wrapper with a `Linear` or `Conv2D` written out inside; other wrappers (around
/// nested structs) are left to their `Factorizable` impls.
fn wrapper<'a>(
    ident: &Ident,
    args: &[&'a GenericArgument],
    const_params: &[Ident],
) -> Option<Wrapper<'a>> {
    let ty = |a: &&'a GenericArgument| match a {
        GenericArgument::Type(t) => Some(classify(t, const_params)),
        _ => None,
    };
    let name = ident.to_string();
    let newtype = NEWTYPE_WRAPPERS.iter().find(|w| **w == name);
    let (kind, parts, count) = match (newtype, name.as_str(), args) {
        (Some(name), _, [t]) => (WrapperKind::Newtype(name), vec![ty(t)?], None),
        (None, GENERALIZED_RESIDUAL, [f, r]) => {
            (WrapperKind::GeneralizedResidual, vec![ty(f)?, ty(r)?], None)
        }
        (None, REPEATED, [t, n]) => (WrapperKind::Repeated, vec![ty(t)?], Some(*n)),
        _ => return None,
    };
    let layers = parts.iter().any(|p| p.contains(false) || p.contains(true));
    layers.then_some(Wrapper { kind, parts, count })
}

/// The first of `names` that occurs as an identifier in `arg`.
fn mentions(arg: &GenericArgument, names: &[Ident]) -> Option<Ident> {
    fn walk(tokens: proc_macro2::TokenStream, names: &[Ident]) -> Option<Ident> {
        for tt in tokens {
            match tt {
                proc_macro2::TokenTree::Ident(i) if names.contains(&i) => return Some(i),
                proc_macro2::TokenTree::Group(g) => {
                    if let Some(i) = walk(g.stream(), names) {
                        return Some(i);
                    }
                }
                _ => {}
            }
        }
        None
    }
    walk(quote::quote!(#arg), names).map(|i| Ident::new(&i.to_string(), arg.span()))
}
