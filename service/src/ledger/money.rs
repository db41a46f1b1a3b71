//! Money: integer micro-credits, never floats.

use std::fmt;

use serde::{Deserialize, Serialize};

use parley_crds::Pricing;

use super::LedgerError;

/// Micro-credits in one credit.
pub const MICROS_PER_CREDIT: u64 = 1_000_000;

/// The largest amount a JSON number may carry: up to it, a µcredit count
/// travels through a double exactly (see [`decimal_credits`]); past it, a
/// number would be read as a neighbouring amount.
pub const MAX_JSON_CREDITS: f64 = 1_000_000_000.0;

/// An amount of credits, counted in integer micro-credits (1 credit =
/// 1_000_000 µcredits). Arithmetic is checked: an overflow is an error, never
/// a wrap-around or a saturated "allow".
#[derive(
    Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, Default, Serialize, Deserialize,
)]
#[serde(transparent)]
pub struct Credits(u64);

impl Credits {
    pub const ZERO: Credits = Credits(0);

    pub const fn from_micros(micros: u64) -> Self {
        Credits(micros)
    }

    /// Whole credits; fails when the amount does not fit.
    pub fn from_credits(credits: u64) -> Result<Self, LedgerError> {
        credits
            .checked_mul(MICROS_PER_CREDIT)
            .map(Credits)
            .ok_or(LedgerError::AmountOutOfRange)
    }

    pub const fn micros(self) -> u64 {
        self.0
    }

    pub fn checked_add(self, other: Credits) -> Result<Credits, LedgerError> {
        self.0
            .checked_add(other.0)
            .map(Credits)
            .ok_or(LedgerError::AmountOutOfRange)
    }

    pub fn checked_sub(self, other: Credits) -> Result<Credits, LedgerError> {
        self.0
            .checked_sub(other.0)
            .map(Credits)
            .ok_or(LedgerError::AmountOutOfRange)
    }

    /// `self - other`, or zero when `other` is larger.
    pub fn saturating_sub(self, other: Credits) -> Credits {
        Credits(self.0.saturating_sub(other.0))
    }

    /// Parses a non-negative decimal number of credits such as `"2"`, `"0.25"`
    /// or `"1.000001"` (the syntax of [`parley_crds::Credits`]). More than six
    /// decimal places cannot be represented exactly and are rejected rather
    /// than rounded.
    pub fn parse_decimal(text: &str) -> Result<Self, LedgerError> {
        parley_crds::Credits::parse_decimal(text)
            .map_err(|_| LedgerError::InvalidAmount(text.to_owned()))
            .and_then(Credits::try_from)
    }

    /// Converts a configured price such as `0.25` (a JSON number, hence a
    /// float) exactly: the float's shortest round-trip decimal text is parsed,
    /// so `0.1` is 100_000 µcredits, not 99_999. Negative, non-finite,
    /// finer-than-µcredit or larger-than-[`MAX_JSON_CREDITS`] values are
    /// rejected.
    pub fn from_credits_f64(credits: f64) -> Result<Self, LedgerError> {
        if !credits.is_finite() || credits.is_sign_negative() {
            return Err(LedgerError::InvalidAmount(credits.to_string()));
        }
        if credits > MAX_JSON_CREDITS {
            return Err(LedgerError::AmountOutOfRange);
        }
        Credits::parse_decimal(&credits.to_string())
    }
}

/// A price or amount of the routes (signed, possibly inexact so validation
/// can report it) as a ledger amount: only exact, non-negative ones convert.
impl TryFrom<parley_crds::Credits> for Credits {
    type Error = LedgerError;

    fn try_from(amount: parley_crds::Credits) -> Result<Self, LedgerError> {
        if !amount.is_exact() {
            return Err(LedgerError::InvalidAmount(amount.to_string()));
        }
        u64::try_from(amount.micros())
            .map(Credits)
            .map_err(|_| LedgerError::InvalidAmount(amount.to_string()))
    }
}

impl fmt::Display for Credits {
    /// Decimal credits with trailing zeros trimmed: `1.5`, `0.000001`, `3`.
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let whole = self.0 / MICROS_PER_CREDIT;
        let fraction = self.0 % MICROS_PER_CREDIT;
        if fraction == 0 {
            return write!(f, "{whole}");
        }
        let digits = format!("{fraction:06}");
        write!(f, "{whole}.{}", digits.trim_end_matches('0'))
    }
}

/// The price of a request in ledger credits, by the routes' one pricing
/// rule ([`Pricing::cost`]).
pub fn price(
    pricing: &Pricing,
    input_tokens: u64,
    output_tokens: u64,
) -> Result<Credits, LedgerError> {
    pricing
        .cost(input_tokens, output_tokens)
        .ok_or(LedgerError::AmountOutOfRange)
        .and_then(Credits::try_from)
}

/// Credits as JSON numbers in decimal credits. Serialized through `f64`:
/// a µcredit count below 2^53 divided by 10^6 is the double nearest the
/// decimal, whose shortest representation is that decimal again, so amounts
/// up to a billion credits ([`MAX_JSON_CREDITS`]) round-trip exactly; larger
/// ones are refused when read (found by the `accounting_bodies` fuzz target:
/// 9719925474.9931 came back one µcredit off).
pub mod decimal_credits {
    use serde::{Deserialize, Deserializer, Serializer};

    use super::{Credits, MICROS_PER_CREDIT};

    pub fn serialize<S: Serializer>(credits: &Credits, serializer: S) -> Result<S::Ok, S::Error> {
        // Exact for the amounts documented above; this is the wire format only.
        #[allow(clippy::cast_precision_loss)]
        let value = credits.micros() as f64 / MICROS_PER_CREDIT as f64;
        serializer.serialize_f64(value)
    }

    pub fn deserialize<'de, D: Deserializer<'de>>(deserializer: D) -> Result<Credits, D::Error> {
        let value = f64::deserialize(deserializer)?;
        Credits::from_credits_f64(value).map_err(serde::de::Error::custom)
    }

    pub mod option {
        use serde::{Deserialize, Deserializer, Serializer};

        use super::super::Credits;

        pub fn serialize<S: Serializer>(
            credits: &Option<Credits>,
            serializer: S,
        ) -> Result<S::Ok, S::Error> {
            match credits {
                Some(credits) => super::serialize(credits, serializer),
                None => serializer.serialize_none(),
            }
        }

        pub fn deserialize<'de, D: Deserializer<'de>>(
            deserializer: D,
        ) -> Result<Option<Credits>, D::Error> {
            Option::<f64>::deserialize(deserializer)?
                .map(|value| Credits::from_credits_f64(value).map_err(serde::de::Error::custom))
                .transpose()
        }
    }
}
