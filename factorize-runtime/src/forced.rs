//! Compile-time messages for ranks a user forces on a field that the cost rule forbids.
//!
//! Stable Rust's const panics take a `&str`, not formatted numbers, so the message naming the
//! dims and the break-even is written into a fixed buffer by `const fn`s. The verdict itself is
//! the cost rule's [`Decision`]; this only words it.

use crate::cost::Decision;

/// Room for the longest message (field name and attribute included, truncated beyond).
const CAPACITY: usize = 640;

/// A message built at compile time.
pub struct ConstMessage {
    buf: [u8; CAPACITY],
    len: usize,
}

impl ConstMessage {
    const fn new() -> Self {
        Self {
            buf: [0; CAPACITY],
            len: 0,
        }
    }

    const fn str(mut self, s: &str) -> Self {
        let bytes = s.as_bytes();
        let mut i = 0;
        // A piece that does not fit is left out whole, so the text stays valid UTF-8.
        let fits = if self.len + bytes.len() <= CAPACITY {
            bytes.len()
        } else {
            0
        };
        while i < fits {
            self.buf[self.len] = bytes[i];
            self.len += 1;
            i += 1;
        }
        self
    }

    const fn num(mut self, mut n: usize) -> Self {
        let mut digits = [0u8; 20];
        let mut count = 0;
        loop {
            digits[count] = b'0' + (n % 10) as u8;
            count += 1;
            n /= 10;
            if n == 0 {
                break;
            }
        }
        if self.len + count > CAPACITY {
            return self;
        }
        while count > 0 {
            count -= 1;
            self.buf[self.len] = digits[count];
            self.len += 1;
        }
        self
    }

    /// The text.
    pub const fn as_str(&self) -> &str {
        let (text, _) = self.buf.split_at(self.len);
        match core::str::from_utf8(text) {
            Ok(s) => s,
            Err(_) => "a forced rank breaks the cost rule",
        }
    }
}

/// The layer a forced rank sits on, for the message.
pub struct Forced<'a> {
    /// How the rank was written, e.g. `#[factorize(latent = 600)]`.
    pub written: &'a str,
    /// The field, e.g. `fc`.
    pub field: &'a str,
    /// `Linear` or `Conv2D`.
    pub kind: &'a str,
    /// Input and output widths.
    pub in_dim: usize,
    /// Output width.
    pub out_dim: usize,
    /// Kernel side (1 for a `Linear`).
    pub kernel: usize,
    /// The attribute that sets the minimum width: `min_features` or `min_channels`.
    pub min_key: &'a str,
    /// The struct switch: `factorize_linears` or `factorize_convs`.
    pub switch: &'a str,
}

/// `None` when `decision` replaces the layer, else why the forced rank breaks the rule and
/// what to write instead.
pub const fn violation(forced: &Forced<'_>, decision: Decision) -> Option<ConstMessage> {
    let m = ConstMessage::new()
        .str("`")
        .str(forced.written)
        .str("` on `")
        .str(forced.field)
        .str("` (")
        .str(forced.kind)
        .str(" ")
        .num(forced.in_dim)
        .str(" -> ")
        .num(forced.out_dim);
    let m = if forced.kernel > 1 {
        m.str(", ")
            .num(forced.kernel)
            .str("x")
            .num(forced.kernel)
            .str(" kernel")
    } else {
        m
    };
    let m = m.str("): ");
    Some(match decision {
        Decision::Replace { .. } => return None,
        Decision::NoSaving { latent, max_rank } => m
            .str("rank ")
            .num(latent)
            .str(" saves no multiply-adds (break-even ")
            .num(max_rank + 1)
            .str("); use at most ")
            .num(max_rank)
            .str(", or remove the attribute"),
        Decision::TooNarrow { width, min } => m
            .str("width ")
            .num(width)
            .str(" < ")
            .str(forced.min_key)
            .str(" = ")
            .num(min)
            .str("; add `")
            .str(forced.min_key)
            .str(" = ")
            .num(width)
            .str("` to the field, or remove `latent`"),
        Decision::Disabled => m
            .str("the struct sets `")
            .str(forced.switch)
            .str(" = false`; remove that or the field's rank"),
        Decision::Grouped => m.str("grouped convolutions are never factorized"),
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::cost::{linear_decision, FactorizeParams, Latent};

    fn forced(written: &str) -> Forced<'_> {
        Forced {
            written,
            field: "fc",
            kind: "Linear",
            in_dim: 1024,
            out_dim: 1024,
            kernel: 1,
            min_key: "min_features",
            switch: "factorize_linears",
        }
    }

    #[test]
    fn a_rank_past_break_even_names_the_dims_and_the_limit() {
        let params = FactorizeParams {
            latent_features: Latent::Count(600),
            ..FactorizeParams::DEFAULT
        };
        let f = forced("#[factorize(latent = 600)]");
        let m = violation(&f, linear_decision(&params, 1024, 1024)).unwrap();
        assert_eq!(
            m.as_str(),
            "`#[factorize(latent = 600)]` on `fc` (Linear 1024 -> 1024): rank 600 saves no \
             multiply-adds (break-even 512); use at most 511, or remove the attribute"
        );
        let ok = FactorizeParams {
            latent_features: Latent::Count(511),
            ..params
        };
        assert!(violation(&f, linear_decision(&ok, 1024, 1024)).is_none());
    }

    #[test]
    fn a_narrow_layer_suggests_the_minimum_that_admits_it() {
        let params = FactorizeParams {
            latent_features: Latent::Count(16),
            ..FactorizeParams::DEFAULT
        };
        let f = Forced {
            in_dim: 128,
            out_dim: 200,
            ..forced("#[factorize(latent = 16)]")
        };
        let m = violation(&f, linear_decision(&params, 128, 200)).unwrap();
        assert!(
            m.as_str().ends_with(
                "width 128 < min_features = 256; add `min_features = 128` to the field, or remove `latent`"
            ),
            "{}",
            m.as_str()
        );
    }

    #[test]
    fn numbers_are_written_in_full() {
        let m = ConstMessage::new().num(0).str(" ").num(usize::MAX);
        assert_eq!(m.as_str(), format!("0 {}", usize::MAX));
    }
}
