//! The one estimate of tokens made before any model counted them, shared by
//! the validation of routes (a system prompt must leave room in every
//! target's window) and the service (prompts, holds, unreported usage).

/// Bytes of UTF-8 counted as one token by [`estimate_tokens`].
pub const BYTES_PER_TOKEN: usize = 4;
/// Tokens a turn costs besides its text: chat formats wrap each message in
/// a role and delimiters, three or four tokens in the common templates.
pub const TOKENS_PER_TURN: u32 = 4;

/// Tokens of a text estimated before any model counted them: one per four
/// bytes of UTF-8, rounded up (close to real tokenizers on English prose,
/// and more for text whose characters take several bytes). There is no
/// tokenizer here; this is the one estimate, used to fit prompts to context windows, to price
/// holds, and to charge replies whose provider reported no usage (marked
/// estimated).
pub fn estimate_tokens(text: &str) -> u32 {
    estimate_tokens_of_bytes(text.len())
}

/// [`estimate_tokens`] of a text `bytes` long, for a caller that knows the
/// length without reading the text.
pub fn estimate_tokens_of_bytes(bytes: usize) -> u32 {
    u32::try_from(bytes.div_ceil(BYTES_PER_TOKEN)).unwrap_or(u32::MAX)
}
