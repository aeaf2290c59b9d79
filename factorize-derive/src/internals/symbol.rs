//! Every attribute key, named once.

pub const FACTORIZE: &str = "factorize";

pub const FACTORIZE_CONVS: &str = "factorize_convs";
pub const FACTORIZE_LINEARS: &str = "factorize_linears";
pub const MIN_CHANNELS: &str = "min_channels";
pub const LATENT_CHANNELS: &str = "latent_channels";
pub const MIN_FEATURES: &str = "min_features";
pub const LATENT_FEATURES: &str = "latent_features";

pub const RANKS: &str = "ranks";
pub const RANKS_PREFIX: &str = "ranks_prefix";

pub const SKIP: &str = "skip";
pub const LATENT: &str = "latent";

/// Keys accepted on the struct.
pub const CONTAINER_KEYS: &[&str] = &[
    FACTORIZE_CONVS,
    FACTORIZE_LINEARS,
    MIN_CHANNELS,
    LATENT_CHANNELS,
    MIN_FEATURES,
    LATENT_FEATURES,
    RANKS,
    RANKS_PREFIX,
];

/// Keys accepted on a field.
pub const FIELD_KEYS: &[&str] = &[SKIP, LATENT, MIN_FEATURES, MIN_CHANNELS];

/// dfdx's one-module wrappers (tuple structs around one module).
pub const NEWTYPE_WRAPPERS: &[&str] = &["Residual", "SplitInto", "AddInto"];
pub const GENERALIZED_RESIDUAL: &str = "GeneralizedResidual";
pub const REPEATED: &str = "Repeated";

/// Every dfdx wrapper the macros look into.
pub fn is_wrapper(name: &str) -> bool {
    NEWTYPE_WRAPPERS.contains(&name) || name == GENERALIZED_RESIDUAL || name == REPEATED
}
