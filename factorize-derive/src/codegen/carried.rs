//! One error for a field type that is not `Factorizable` (or, for `#[derive(TensorCollection)]`,
//! not a dfdx module), instead of one per generated item.
//!
//! Every generated impl and every use of the variant names the field's type, so a type that is
//! not `Factorizable` would fail each of them in turn. Instead, a hidden const checks each
//! carried-over type once, and generated code names those types through
//! `__private::Check<T, { CONST }>`, which is `T` when the check holds. When it fails, the
//! const is an error, so is every type that names it, and rustc reports nothing further about
//! them: the check's own error is the only one.
//!
//! A const cannot name the struct's generics, so the check is made at one instance: the dtype
//! as `f32`, the device as `Cpu`, const generics as zero. That instance exists whenever the
//! generic requirement holds, as long as `f32` and `Cpu` meet the struct's bounds; for bounds
//! this file does not know (or other type parameters), nothing is checked and the errors come
//! as before.

use proc_macro2::{Ident, TokenStream, TokenTree};
use quote::{format_ident, quote, quote_spanned};
use syn::punctuated::Punctuated;
use syn::spanned::Spanned;
use syn::{GenericParam, Token, Type, TypeParamBound, WherePredicate};

use crate::internals::ast::{Container, Node};

/// Bounds on the dtype parameter that `f32` meets.
const DTYPE_BOUNDS: &[&str] = &[
    "Dtype",
    "Float",
    "Unit",
    "SafeZeros",
    "SampleUniform",
    "Num",
    "NumCast",
    "FromPrimitive",
    "ToPrimitive",
    "Copy",
    "Clone",
    "Debug",
    "Display",
    "Default",
    "Send",
    "Sync",
    "PartialEq",
    "PartialOrd",
];

/// Bounds on the device parameter that dfdx's `Cpu` meets.
const DEVICE_BOUNDS: &[&str] = &[
    "Device", "Storage", "Clone", "Debug", "Default", "Send", "Sync",
];

/// Which derive checks, and so which types and which trait.
#[derive(Clone, Copy, PartialEq, Eq)]
pub enum Role {
    /// `Factorizable`: each carried-over module inside the fields must be `Factorizable`.
    Factorizable,
    /// `TensorCollection` on the struct itself: each field must be a dfdx module.
    TensorCollection,
}

/// How a struct's carried-over field types are checked, if they can be.
pub struct Carried {
    /// The hidden const; `None` when the struct's generics allow no check.
    name: Option<Ident>,
    /// Each generic parameter's stand-in at the checked instance.
    subst: Vec<(Ident, TokenStream)>,
    role: Role,
}

impl Carried {
    /// No check: types are named as written.
    pub fn none() -> Self {
        Self {
            name: None,
            subst: Vec::new(),
            role: Role::Factorizable,
        }
    }

    pub fn of(cont: &Container<'_>, role: Role) -> Self {
        let Some(subst) = stand_ins(cont) else {
            return Self::none();
        };
        let ident = &cont.input.ident;
        let name = match role {
            Role::Factorizable => format_ident!("__FACTORIZE_CARRIED_{}", ident),
            Role::TensorCollection => format_ident!("__FACTORIZE_COLLECTED_{}", ident),
        };
        Self {
            name: Some(name),
            subst,
            role,
        }
    }

    /// `ty` at the checked instance, or `None` when it cannot be checked there.
    fn instance(&self, ty: &Type) -> Option<TokenStream> {
        self.name.as_ref()?;
        substitute(quote!(#ty), &self.subst)
    }

    /// How generated code names `ty`, a carried-over type: through the check when it is
    /// checked, else as written.
    pub fn leaf(&self, ty: &Type) -> TokenStream {
        self.through(ty, self.checks(ty))
    }

    /// How generated code names `ty`, the type of a field classified as `node`: through the
    /// check when a carried-over type inside it is checked.
    pub fn holding(&self, ty: &Type, node: &Node<'_>) -> TokenStream {
        self.through(ty, self.checks_inside(node))
    }

    /// Whether a carried-over type `ty` goes through the check.
    pub fn checks(&self, ty: &Type) -> bool {
        self.instance(ty).is_some()
    }

    fn checks_inside(&self, node: &Node<'_>) -> bool {
        match node {
            Node::Other(ty) => self.checks(ty),
            _ => node.children().iter().any(|n| self.checks_inside(n)),
        }
    }

    fn through(&self, ty: &Type, checked: bool) -> TokenStream {
        match (&self.name, checked) {
            (Some(name), true) => {
                quote!(::factorize_runtime::__private::Check<#ty, { #name }>)
            }
            _ => quote!(#ty),
        }
    }

    /// The hidden const: one check per distinct type, each at its field's span: the
    /// carried-over modules of the fields that are not skipped (`carried::<T>()`), or every
    /// field (`collected::<T>()`).
    pub fn item(&self, cont: &Container<'_>) -> TokenStream {
        let Some(name) = &self.name else {
            return TokenStream::new();
        };
        let mut seen = Vec::new();
        let mut checks = Vec::new();
        let mut leaves = Vec::new();
        let check = match self.role {
            Role::Factorizable => {
                for f in cont.fields.iter().filter(|f| f.attrs.skip.is_none()) {
                    collect(&f.node, &mut leaves);
                }
                format_ident!("carried")
            }
            Role::TensorCollection => {
                leaves.extend(cont.fields.iter().map(|f| &f.original.ty));
                format_ident!("collected")
            }
        };
        for ty in leaves {
            let Some(instance) = self.instance(ty) else {
                continue;
            };
            let key = instance.to_string();
            if seen.contains(&key) {
                continue;
            }
            seen.push(key);
            let span = super::at(ty.span());
            checks.push(
                quote_spanned!(span=> ::factorize_runtime::__private::#check::<#instance>();),
            );
        }
        quote! {
            #[doc(hidden)]
            #[allow(non_upper_case_globals)]
            const #name: bool = { #(#checks)* true };
        }
    }
}

fn collect<'a>(node: &Node<'a>, out: &mut Vec<&'a Type>) {
    match node {
        Node::Other(ty) => out.push(ty),
        _ => node.children().iter().for_each(|n| collect(n, out)),
    }
}

/// Each generic parameter's stand-in, or `None` when a bound or parameter is one whose
/// stand-in might not meet it.
fn stand_ins(cont: &Container<'_>) -> Option<Vec<(Ident, TokenStream)>> {
    let generics = &cont.input.generics;
    let known = |names: &[&str], bounds: &Punctuated<TypeParamBound, Token![+]>| {
        bounds.iter().all(|b| match b {
            TypeParamBound::Trait(t) => t
                .path
                .segments
                .last()
                .is_some_and(|s| names.contains(&s.ident.to_string().as_str())),
            TypeParamBound::Lifetime(l) => l.ident == "static",
            _ => false,
        })
    };
    let allowed = |ident: &Ident| {
        if *ident == cont.dtype {
            Some(DTYPE_BOUNDS)
        } else if *ident == cont.device {
            Some(DEVICE_BOUNDS)
        } else {
            None
        }
    };
    for predicate in generics.where_clause.iter().flat_map(|w| &w.predicates) {
        let WherePredicate::Type(p) = predicate else {
            return None;
        };
        let Type::Path(tp) = &p.bounded_ty else {
            return None;
        };
        let names = tp.path.get_ident().and_then(allowed)?;
        if p.lifetimes.is_some() || !known(names, &p.bounds) {
            return None;
        }
    }
    let pv = super::private();
    let mut subst = Vec::new();
    for param in &generics.params {
        match param {
            GenericParam::Type(t) => {
                let names = allowed(&t.ident)?;
                if t.default.is_some() || !known(names, &t.bounds) {
                    return None;
                }
                let stand_in = if t.ident == cont.dtype {
                    quote!(f32)
                } else {
                    quote!(#pv::Cpu)
                };
                subst.push((t.ident.clone(), stand_in));
            }
            GenericParam::Const(c) => {
                let Type::Path(tp) = &c.ty else {
                    return None;
                };
                let ty = tp.path.get_ident()?.to_string();
                let stand_in = match ty.as_str() {
                    "bool" => quote!(false),
                    "usize" | "u8" | "u16" | "u32" | "u64" | "u128" | "isize" | "i8" | "i16"
                    | "i32" | "i64" | "i128" => quote!(0),
                    _ => return None,
                };
                subst.push((c.ident.clone(), stand_in));
            }
            GenericParam::Lifetime(_) => return None,
        }
    }
    Some(subst)
}

/// `tokens` with each generic parameter replaced by its stand-in, or `None` when one appears
/// next to `::` (a path through it, or a name that only looks like it).
fn substitute(tokens: TokenStream, subst: &[(Ident, TokenStream)]) -> Option<TokenStream> {
    let trees: Vec<TokenTree> = tokens.into_iter().collect();
    let colon =
        |t: Option<&TokenTree>| matches!(t, Some(TokenTree::Punct(p)) if p.as_char() == ':');
    let mut out = TokenStream::new();
    for (k, tree) in trees.iter().enumerate() {
        match tree {
            TokenTree::Ident(ident) => match subst.iter().find(|(p, _)| p == ident) {
                Some((_, stand_in)) => {
                    if colon(trees.get(k + 1)) || (k > 0 && colon(trees.get(k - 1))) {
                        return None;
                    }
                    out.extend(stand_in.clone());
                }
                None => out.extend([tree.clone()]),
            },
            TokenTree::Group(g) => {
                let inner = substitute(g.stream(), subst)?;
                let mut group = proc_macro2::Group::new(g.delimiter(), inner);
                group.set_span(g.span());
                out.extend([TokenTree::Group(group)]);
            }
            _ => out.extend([tree.clone()]),
        }
    }
    Some(out)
}
