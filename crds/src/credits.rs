//! Exact credit amounts.
//!
//! Prices are money: they are kept as whole micro-credits (millionths of a
//! credit) in an `i64`, never as floating point, so that summing and
//! multiplying prices is exact. On the wire (CRDs, routes file) an amount is a
//! plain JSON/YAML number such as `1`, `4` or `0.25` with at most six decimal
//! places. A finer amount still parses (rounded up, marked inexact) so that one
//! bad ModelRoute cannot break reading all of them; validation then rejects it.

use std::borrow::Cow;
use std::fmt;

use schemars::{JsonSchema, Schema, SchemaGenerator, json_schema};
use serde::de::{self, Visitor};
use serde::{Deserialize, Deserializer, Serialize, Serializer};

/// Micro-credits in one credit.
pub const MICROS_PER_CREDIT: i64 = 1_000_000;
const DECIMAL_PLACES: usize = 6;

/// Largest amount the CRD schema admits, far inside the `i64` range.
pub const MAX_WHOLE_CREDITS: i64 = 1_000_000_000;

/// An amount of credits, exact to one micro-credit. May be negative or
/// inexact only so that validation can report such a price instead of
/// failing to parse it.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct Credits {
    micros: i64,
    /// The written amount had more than six decimal places.
    inexact: bool,
}

impl Credits {
    pub const ZERO: Credits = Credits::from_micros(0);

    pub const fn from_micros(micros: i64) -> Self {
        Self {
            micros,
            inexact: false,
        }
    }

    /// Whole credits, saturating at the representable range.
    pub const fn from_whole(credits: i64) -> Self {
        Self::from_micros(credits.saturating_mul(MICROS_PER_CREDIT))
    }

    /// False when the written amount was finer than a micro-credit (and
    /// was rounded away from zero).
    pub const fn is_exact(self) -> bool {
        !self.inexact
    }

    pub const fn micros(self) -> i64 {
        self.micros
    }

    pub const fn is_negative(self) -> bool {
        self.micros < 0
    }

    /// Parses a decimal literal such as `12`, `-3`, `0.25` (no exponent).
    /// More than six decimal places round away from zero and mark the
    /// amount inexact.
    pub fn parse_decimal(text: &str) -> Result<Self, CreditsParseError> {
        let invalid = || CreditsParseError::NotADecimal(text.to_owned());
        let (negative, digits) = match text.strip_prefix('-') {
            Some(rest) => (true, rest),
            None => (false, text),
        };
        let (whole, fraction) = digits.split_once('.').unwrap_or((digits, ""));
        if whole.is_empty() || !whole.bytes().all(|b| b.is_ascii_digit()) {
            return Err(invalid());
        }
        if !fraction.bytes().all(|b| b.is_ascii_digit()) {
            return Err(invalid());
        }
        let fraction = fraction.trim_end_matches('0');
        let (fraction, excess) = fraction.split_at(fraction.len().min(DECIMAL_PLACES));
        let inexact = !excess.is_empty();
        let whole: i64 = whole
            .parse()
            .map_err(|_| CreditsParseError::OutOfRange(text.to_owned()))?;
        let mut fraction_micros: i64 = 0;
        for (place, digit) in fraction.bytes().enumerate() {
            let exponent = u32::try_from(DECIMAL_PLACES - 1 - place).unwrap_or(0);
            fraction_micros += i64::from(digit - b'0') * 10_i64.pow(exponent);
        }
        let micros = whole
            .checked_mul(MICROS_PER_CREDIT)
            .and_then(|m| m.checked_add(fraction_micros + i64::from(inexact)))
            .ok_or_else(|| CreditsParseError::OutOfRange(text.to_owned()))?;
        Ok(Self {
            micros: if negative { -micros } else { micros },
            inexact,
        })
    }
}

impl fmt::Display for Credits {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let sign = if self.micros < 0 { "-" } else { "" };
        let abs = self.micros.unsigned_abs();
        let per = MICROS_PER_CREDIT.unsigned_abs();
        let (whole, fraction) = (abs / per, abs % per);
        if fraction == 0 {
            write!(f, "{sign}{whole}")
        } else {
            let digits = format!("{fraction:06}");
            write!(f, "{sign}{whole}.{}", digits.trim_end_matches('0'))
        }
    }
}

/// Why a number is not a valid credit amount.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum CreditsParseError {
    #[error("`{0}` is not a decimal number")]
    NotADecimal(String),
    #[error("`{0}` is out of range for a credit amount")]
    OutOfRange(String),
}

impl Serialize for Credits {
    fn serialize<S: Serializer>(&self, serializer: S) -> Result<S::Ok, S::Error> {
        if self.micros % MICROS_PER_CREDIT == 0 {
            serializer.serialize_i64(self.micros / MICROS_PER_CREDIT)
        } else {
            // Correctly rounded division of two exactly representable values
            // gives the f64 nearest the decimal, whose shortest rendering is
            // that decimal again, so a round trip through text is exact.
            #[allow(clippy::cast_precision_loss)]
            let value = self.micros as f64 / MICROS_PER_CREDIT as f64;
            serializer.serialize_f64(value)
        }
    }
}

impl<'de> Deserialize<'de> for Credits {
    fn deserialize<D: Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        deserializer.deserialize_any(CreditsVisitor)
    }
}

struct CreditsVisitor;

impl Visitor<'_> for CreditsVisitor {
    type Value = Credits;

    fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("a number of credits with at most six decimal places")
    }

    fn visit_i64<E: de::Error>(self, value: i64) -> Result<Credits, E> {
        value
            .checked_mul(MICROS_PER_CREDIT)
            .map(Credits::from_micros)
            .ok_or_else(|| E::custom(CreditsParseError::OutOfRange(value.to_string())))
    }

    fn visit_u64<E: de::Error>(self, value: u64) -> Result<Credits, E> {
        i64::try_from(value)
            .map_err(|_| E::custom(CreditsParseError::OutOfRange(value.to_string())))
            .and_then(|v| self.visit_i64(v))
    }

    fn visit_f64<E: de::Error>(self, value: f64) -> Result<Credits, E> {
        if !value.is_finite() {
            return Err(E::custom(CreditsParseError::NotADecimal(value.to_string())));
        }
        // `Display` for f64 prints the shortest decimal that round-trips and
        // never uses an exponent, i.e. the literal the author wrote.
        Credits::parse_decimal(&value.to_string()).map_err(E::custom)
    }
}

impl JsonSchema for Credits {
    fn schema_name() -> Cow<'static, str> {
        "Credits".into()
    }

    fn inline_schema() -> bool {
        true
    }

    fn json_schema(_: &mut SchemaGenerator) -> Schema {
        json_schema!({
            "type": "number",
            "minimum": 0,
            "maximum": MAX_WHOLE_CREDITS,
            "description": "Credits, exact to six decimal places (e.g. 1, 4, 0.25)."
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_decimals_exactly() {
        assert_eq!(Credits::parse_decimal("1").unwrap().micros(), 1_000_000);
        assert_eq!(Credits::parse_decimal("0.25").unwrap().micros(), 250_000);
        assert_eq!(Credits::parse_decimal("0.000001").unwrap().micros(), 1);
        assert_eq!(Credits::parse_decimal("-2.5").unwrap().micros(), -2_500_000);
        assert_eq!(
            Credits::parse_decimal("3.100000").unwrap().micros(),
            3_100_000
        );
        let finer = Credits::parse_decimal("0.0000001").unwrap();
        assert_eq!((finer.micros(), finer.is_exact()), (1, false));
        assert!(Credits::parse_decimal("0.25").unwrap().is_exact());
        assert!(Credits::parse_decimal("1e3").is_err());
        assert!(Credits::parse_decimal(".5").is_err());
        assert!(Credits::parse_decimal("99999999999999999").is_err());
    }

    #[test]
    fn yaml_round_trip_is_exact() {
        for text in ["1", "4", "0.1", "0.25", "0.3", "123456.654321", "0.000001"] {
            let credits: Credits = serde_yaml::from_str(text).unwrap();
            assert_eq!(credits, Credits::parse_decimal(text).unwrap(), "{text}");
            let back = serde_yaml::to_string(&credits).unwrap();
            // Tiny amounts may come back in exponent form (`1e-6`): same number.
            assert_eq!(
                serde_yaml::from_str::<Credits>(&back).unwrap(),
                credits,
                "{back}"
            );
            assert_eq!(credits.to_string(), text);
        }
        assert_eq!(
            serde_yaml::to_string(&Credits::from_micros(250_000))
                .unwrap()
                .trim(),
            "0.25"
        );
        let finer: Credits = serde_yaml::from_str("1.0000001").unwrap();
        assert_eq!((finer.micros(), finer.is_exact()), (1_000_001, false));
        assert!(serde_yaml::from_str::<Credits>(".nan").is_err());
        assert!(serde_yaml::from_str::<Credits>("\"1\"").is_err());
    }

    #[test]
    fn displays_negative_amounts() {
        assert_eq!(Credits::from_micros(-1_500_000).to_string(), "-1.5");
        assert_eq!(Credits::from_whole(-3).to_string(), "-3");
    }
}
