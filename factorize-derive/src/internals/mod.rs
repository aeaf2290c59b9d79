//! Parsing and checking, apart from code generation.

pub mod ast;
pub mod attr;
pub mod check;
pub mod ctxt;
pub mod ranks;
pub mod symbol;
