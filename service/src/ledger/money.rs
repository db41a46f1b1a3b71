//! Money: integer micro-credits, never floats.

use std::fmt;

use serde::{Deserialize, Serialize};

use super::LedgerError;

/// Micro-credits in one credit.
pub const MICROS_PER_CREDIT: u64 = 1_000_000;

/// Digits after the decimal point that a credit amount can carry (µcredits).
const DECIMAL_PLACES: usize = 6;

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
    /// or `"1.000001"`. More than six decimal places cannot be represented
    /// exactly and are rejected rather than rounded.
    pub fn parse_decimal(text: &str) -> Result<Self, LedgerError> {
        let invalid = || LedgerError::InvalidAmount(text.to_owned());
        let (whole, fraction) = text.split_once('.').unwrap_or((text, ""));
        let all_digits = |part: &str| part.bytes().all(|b| b.is_ascii_digit());
        if whole.is_empty() || !all_digits(whole) || !all_digits(fraction) {
            return Err(invalid());
        }
        let fraction = fraction.trim_end_matches('0');
        if fraction.len() > DECIMAL_PLACES {
            return Err(invalid());
        }
        let whole: u64 = whole.parse().map_err(|_| invalid())?;
        let mut fraction_micros: u64 = 0;
        for (place, digit) in fraction.bytes().enumerate() {
            let weight = 10_u64.pow((DECIMAL_PLACES - 1 - place) as u32);
            fraction_micros += u64::from(digit - b'0') * weight;
        }
        Credits::from_credits(whole)?.checked_add(Credits(fraction_micros))
    }

    /// Converts a configured price such as `0.25` (a JSON number, hence a
    /// float) exactly: the float's shortest round-trip decimal text is parsed,
    /// so `0.1` is 100_000 µcredits, not 99_999. Negative, non-finite or
    /// finer-than-µcredit values are rejected.
    pub fn from_credits_f64(credits: f64) -> Result<Self, LedgerError> {
        if !credits.is_finite() || credits.is_sign_negative() {
            return Err(LedgerError::InvalidAmount(credits.to_string()));
        }
        Credits::parse_decimal(&credits.to_string())
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

/// A route target's price: credits per 1,000 input tokens and per 1,000
/// output tokens.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Pricing {
    pub input_per_1k: Credits,
    pub output_per_1k: Credits,
}

impl Pricing {
    /// The price of a request, rounded up to the next µcredit (the sum is
    /// rounded once, so two fractional parts never both round up).
    pub fn price(&self, input_tokens: u64, output_tokens: u64) -> Result<Credits, LedgerError> {
        let input = u128::from(input_tokens) * u128::from(self.input_per_1k.micros());
        let output = u128::from(output_tokens) * u128::from(self.output_per_1k.micros());
        let per_1k = input
            .checked_add(output)
            .ok_or(LedgerError::AmountOutOfRange)?;
        let micros = per_1k.div_ceil(1000);
        u64::try_from(micros)
            .map(Credits)
            .map_err(|_| LedgerError::AmountOutOfRange)
    }

    /// What a request may cost at most: all its input plus the target's
    /// maximum output. This is the amount to hold before calling the model.
    pub fn worst_case(
        &self,
        input_tokens: u64,
        max_output_tokens: u64,
    ) -> Result<Credits, LedgerError> {
        self.price(input_tokens, max_output_tokens)
    }
}
