//! The accounting API's one contract: every request and response body of
//! `/api/credits/*`, `/api/streaming-sessions/*` and `/api/admin/credits/grant`.
//! The server's handlers parse and answer with these types and the
//! `external` client sends and reads the same types, so the two sides cannot
//! disagree on a field name (seed lesson 1: the caller sent `{"credits":2}`
//! where the server wanted `userId` and `requiredCredits`).
//!
//! Field names are the seed's (camelCase). Credit amounts are JSON numbers in
//! decimal credits (`2`, `0.25`), exact to the µcredit: a value with more than
//! six decimals is rejected, never rounded.

use chrono::{DateTime, Utc};
use futures::future::BoxFuture;
use serde::{Deserialize, Serialize};
use serde_json::{Map, Value};
use utoipa::{IntoParams, ToSchema};

use super::{Accounting, Caller};
use crate::error::Error;
use crate::ledger::{
    Balance, Closed, Credits, MAX_PAGE_NUMBER, MAX_PAGE_SIZE, UsageOutcome, UsageRecord,
    decimal_credits,
};

/// Paths of the contract, shared by the router and the client.
pub mod paths {
    pub const CALCULATE: &str = "/api/credits/calculate";
    pub const CHECK: &str = "/api/credits/check";
    pub const BALANCE: &str = "/api/credits/balance";
    pub const USAGE: &str = "/api/credits/usage";
    pub const INITIALIZE: &str = "/api/streaming-sessions/initialize";
    pub const FINALIZE: &str = "/api/streaming-sessions/finalize";
    pub const ABORT: &str = "/api/streaming-sessions/abort";
    pub const GRANT: &str = "/api/admin/credits/grant";
}

/// Who made a streaming session's id, which decides where its hold and
/// usage record are kept. Never read from or sent in a body: a client of
/// the API always names its own sessions, and cannot reach the ids the
/// service makes for its replies.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub enum SessionNaming {
    /// A client of the API, with any id of 1 to 128 bytes.
    #[default]
    Client,
    /// This service, for one of its replies: `<origin>/<UUID v7>`, unique
    /// and ordered by the time it was made.
    Reply,
}

/// A request body of the contract: its fields (for field-level errors), its
/// answer, and the [`Accounting`] operation that answers it.
pub trait ContractRequest: serde::de::DeserializeOwned + Send + 'static {
    type Response: Serialize + Send + 'static;

    /// Fields that must be present and not null.
    const REQUIRED: &'static [&'static str];
    const OPTIONAL: &'static [&'static str];

    fn answer<'a>(
        self,
        accounting: &'a dyn Accounting,
        caller: &'a Caller,
    ) -> BoxFuture<'a, Result<Self::Response, Error>>;

    /// Parses a JSON object, naming every missing or unknown field.
    fn from_json(value: Value) -> Result<Self, Error> {
        let Value::Object(object) = value else {
            return Err(Error::InvalidFields {
                message: format!(
                    "expected a JSON object with fields {}",
                    Self::REQUIRED.join(", ")
                ),
                fields: Self::REQUIRED.iter().map(|f| (*f).to_owned()).collect(),
            });
        };
        if let Some(error) = Self::field_errors(&object) {
            return Err(error);
        }
        serde_json::from_value(Value::Object(object)).map_err(|error| Error::InvalidFields {
            message: format!("invalid field value: {error}"),
            fields: Vec::new(),
        })
    }

    /// Missing required fields (null counts as missing) and unknown fields.
    fn field_errors(object: &Map<String, Value>) -> Option<Error> {
        let missing: Vec<&str> = Self::REQUIRED
            .iter()
            .copied()
            .filter(|field| object.get(*field).is_none_or(Value::is_null))
            .collect();
        let unknown: Vec<&str> = object
            .keys()
            .map(String::as_str)
            .filter(|key| !Self::REQUIRED.contains(key) && !Self::OPTIONAL.contains(key))
            .collect();
        if missing.is_empty() && unknown.is_empty() {
            return None;
        }
        let mut parts = Vec::with_capacity(2);
        if !missing.is_empty() {
            parts.push(format!("missing fields: {}", missing.join(", ")));
        }
        if !unknown.is_empty() {
            let known: Vec<&str> = Self::REQUIRED
                .iter()
                .chain(Self::OPTIONAL)
                .copied()
                .collect();
            parts.push(format!(
                "unknown fields: {} (accepted: {})",
                unknown.join(", "),
                known.join(", ")
            ));
        }
        Some(Error::InvalidFields {
            message: parts.join("; "),
            fields: missing
                .into_iter()
                .chain(unknown)
                .map(str::to_owned)
                .collect(),
        })
    }
}

/// `POST /api/credits/calculate`: the worst-case price of a request — its
/// input tokens plus the model's maximum output.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, ToSchema)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
pub struct CalculateRequest {
    /// A route alias (`default`) or a model id.
    pub model_id: String,
    /// Input (prompt) tokens; takes precedence over `message`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub tokens: Option<u64>,
    /// The prompt text, when its token count is not known (estimated as
    /// one token per four bytes of UTF-8, rounded up).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub message: Option<String>,
}

impl ContractRequest for CalculateRequest {
    type Response = CalculateResponse;

    const REQUIRED: &'static [&'static str] = &["modelId"];
    const OPTIONAL: &'static [&'static str] = &["tokens", "message"];

    fn answer<'a>(
        self,
        accounting: &'a dyn Accounting,
        caller: &'a Caller,
    ) -> BoxFuture<'a, Result<CalculateResponse, Error>> {
        accounting.calculate(caller, self)
    }
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, ToSchema)]
#[serde(rename_all = "camelCase")]
pub struct CalculateResponse {
    pub model_id: String,
    /// Tokens priced: `inputTokens + maxOutputTokens`.
    pub tokens: u64,
    pub input_tokens: u64,
    pub max_output_tokens: u64,
    #[serde(with = "decimal_credits")]
    #[schema(value_type = f64)]
    pub required_credits: Credits,
}

/// `POST /api/credits/check`: may `userId` spend `requiredCredits` now?
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, ToSchema)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
pub struct CheckRequest {
    pub user_id: String,
    #[serde(with = "decimal_credits")]
    #[schema(value_type = f64, minimum = 0)]
    pub required_credits: Credits,
    /// When given, must be a known route alias or model id.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub model_id: Option<String>,
}

impl ContractRequest for CheckRequest {
    type Response = CheckResponse;

    const REQUIRED: &'static [&'static str] = &["userId", "requiredCredits"];
    const OPTIONAL: &'static [&'static str] = &["modelId"];

    fn answer<'a>(
        self,
        accounting: &'a dyn Accounting,
        caller: &'a Caller,
    ) -> BoxFuture<'a, Result<CheckResponse, Error>> {
        accounting.check(caller, self)
    }
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, ToSchema)]
#[serde(rename_all = "camelCase")]
pub struct CheckResponse {
    pub user_id: String,
    /// `available >= requiredCredits`. A check reserves nothing: use
    /// `streaming-sessions/initialize` to hold the amount.
    pub sufficient: bool,
    #[serde(with = "decimal_credits")]
    #[schema(value_type = f64)]
    pub required_credits: Credits,
    #[serde(flatten)]
    pub balance: BalanceAmounts,
}

/// `POST /api/streaming-sessions/initialize`: hold the worst case of a reply
/// (`estimatedTokens` of input plus the model's maximum output).
///
/// Calling it again for a session that is still open refreshes the hold:
/// re-priced for `modelId` (a fallback; growing needs the difference to be
/// available), lease renewed, and `tokensGenerated` recorded.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, ToSchema)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
pub struct InitializeRequest {
    /// The caller's id for this reply (1 to 128 bytes), unique per account;
    /// finalize and abort name it again.
    #[schema(min_length = 1, max_length = 128)]
    pub session_id: String,
    /// Who made `session_id`.
    #[serde(skip)]
    pub named_by: SessionNaming,
    pub model_id: String,
    /// Estimated input (prompt) tokens.
    pub estimated_tokens: u64,
    /// The account to charge; defaults to the caller's (admins may name any).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub user_id: Option<String>,
    /// Extension: the route whose target `modelId` is, so a fallback target
    /// is priced as that route lists it.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub route: Option<String>,
    /// Extension, for a session already initialized: output tokens generated
    /// so far, recorded so that a crashed caller is charged for them.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub tokens_generated: Option<u64>,
    /// Extension: the most output tokens the reply may generate, when the
    /// caller asked for fewer than the model's maximum; the hold is priced
    /// for the smaller of the two.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub max_output_tokens: Option<u64>,
}

impl ContractRequest for InitializeRequest {
    type Response = InitializeResponse;

    const REQUIRED: &'static [&'static str] = &["sessionId", "modelId", "estimatedTokens"];
    const OPTIONAL: &'static [&'static str] =
        &["userId", "route", "tokensGenerated", "maxOutputTokens"];

    fn answer<'a>(
        self,
        accounting: &'a dyn Accounting,
        caller: &'a Caller,
    ) -> BoxFuture<'a, Result<InitializeResponse, Error>> {
        accounting.initialize(caller, self)
    }
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, ToSchema)]
#[serde(rename_all = "camelCase")]
pub struct InitializeResponse {
    pub session_id: String,
    pub user_id: String,
    /// The model the hold is priced for (a route alias resolves to its first target).
    pub model_id: String,
    pub route: String,
    /// Held for this reply; finalize charges at most this.
    #[serde(with = "decimal_credits")]
    #[schema(value_type = f64)]
    pub allocated_credits: Credits,
    /// The hold closes by itself (charging the recorded input) after this.
    pub lease_expires_at: DateTime<Utc>,
}

/// `POST /api/streaming-sessions/finalize`: charge the reply's actual usage.
/// (Unknown fields are refused by [`ContractRequest::from_json`]; serde's
/// own check cannot be combined with the flattened extension fields.)
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, ToSchema)]
#[serde(rename_all = "camelCase")]
pub struct FinalizeRequest {
    #[schema(min_length = 1, max_length = 128)]
    pub session_id: String,
    /// Who made `session_id`.
    #[serde(skip)]
    pub named_by: SessionNaming,
    /// Output tokens generated.
    pub actual_tokens: u64,
    /// False: the reply failed (with no tokens, nothing is charged).
    pub success: bool,
    /// Reply duration in milliseconds (logged).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub duration: Option<u64>,
    /// The account of the hold; defaults to the caller's.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub user_id: Option<String>,
    #[serde(flatten)]
    pub usage: UsageDetails,
}

impl ContractRequest for FinalizeRequest {
    type Response = SettlementResponse;

    const REQUIRED: &'static [&'static str] = &["sessionId", "actualTokens", "success"];
    const OPTIONAL: &'static [&'static str] = &[
        "duration",
        "userId",
        "modelId",
        "inputTokens",
        "usageEstimated",
    ];

    fn answer<'a>(
        self,
        accounting: &'a dyn Accounting,
        caller: &'a Caller,
    ) -> BoxFuture<'a, Result<SettlementResponse, Error>> {
        accounting.finalize(caller, self)
    }
}

/// Extension fields of finalize and abort: what the reply really used.
/// Seed clients send none of them; each defaults to what initialize recorded.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize, ToSchema)]
#[serde(rename_all = "camelCase")]
pub struct UsageDetails {
    /// The model that answered (a fallback target of the hold's route).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub model_id: Option<String>,
    /// Input tokens as the model counted them.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub input_tokens: Option<u64>,
    /// True when the counts are the caller's estimate, not the model's report.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub usage_estimated: Option<bool>,
}

/// `POST /api/streaming-sessions/abort`: the reply ended early.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, ToSchema)]
#[serde(rename_all = "camelCase")]
pub struct AbortRequest {
    #[schema(min_length = 1, max_length = 128)]
    pub session_id: String,
    /// Who made `session_id`.
    #[serde(skip)]
    pub named_by: SessionNaming,
    /// Output tokens generated before the end; 0 releases the whole hold.
    pub tokens_generated: u64,
    /// Why the client stopped (the reply is recorded as cancelled).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub reason: Option<String>,
    /// What failed (the reply is recorded as failed).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub error: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub user_id: Option<String>,
    #[serde(flatten)]
    pub usage: UsageDetails,
}

impl ContractRequest for AbortRequest {
    type Response = SettlementResponse;

    const REQUIRED: &'static [&'static str] = &["sessionId", "tokensGenerated"];
    const OPTIONAL: &'static [&'static str] = &[
        "reason",
        "error",
        "userId",
        "modelId",
        "inputTokens",
        "usageEstimated",
    ];

    fn answer<'a>(
        self,
        accounting: &'a dyn Accounting,
        caller: &'a Caller,
    ) -> BoxFuture<'a, Result<SettlementResponse, Error>> {
        accounting.abort(caller, self)
    }
}

/// The answer of finalize and abort: the reply's one usage record. A repeat
/// (or an abort after a finalize, or the reverse) returns the first record
/// with `replayed: true` and charges nothing more.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, ToSchema)]
#[serde(rename_all = "camelCase")]
pub struct SettlementResponse {
    pub session_id: String,
    pub user_id: String,
    pub model_id: String,
    pub outcome: UsageOutcome,
    pub input_tokens: u64,
    pub output_tokens: u64,
    #[serde(with = "decimal_credits")]
    #[schema(value_type = f64)]
    pub allocated_credits: Credits,
    #[serde(with = "decimal_credits")]
    #[schema(value_type = f64)]
    pub charged_credits: Credits,
    pub replayed: bool,
    #[serde(flatten)]
    pub balance: BalanceAmounts,
}

impl SettlementResponse {
    pub fn from_closed(session_id: String, closed: Closed) -> Self {
        let record = closed.record;
        SettlementResponse {
            session_id,
            user_id: record.user,
            model_id: record.model,
            outcome: record.outcome,
            input_tokens: record.input_tokens,
            output_tokens: record.output_tokens,
            allocated_credits: record.held,
            charged_credits: record.charged,
            replayed: closed.replayed,
            balance: closed.balance.into(),
        }
    }
}

/// An account's money, in credits.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, ToSchema)]
#[serde(rename_all = "camelCase")]
pub struct BalanceAmounts {
    #[serde(with = "decimal_credits")]
    #[schema(value_type = f64)]
    pub balance: Credits,
    /// Sum of open holds.
    #[serde(with = "decimal_credits")]
    #[schema(value_type = f64)]
    pub held: Credits,
    /// `balance - held`.
    #[serde(with = "decimal_credits")]
    #[schema(value_type = f64)]
    pub available: Credits,
}

impl From<Balance> for BalanceAmounts {
    fn from(balance: Balance) -> Self {
        BalanceAmounts {
            balance: balance.balance,
            held: balance.held,
            available: balance.available,
        }
    }
}

/// `GET /api/credits/balance` and the answer of a grant.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, ToSchema)]
#[serde(rename_all = "camelCase")]
pub struct BalanceResponse {
    pub user_id: String,
    #[serde(flatten)]
    pub balance: BalanceAmounts,
}

/// Query of `GET /api/credits/balance` and `GET /api/credits/usage`.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize, IntoParams)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
#[into_params(parameter_in = Query)]
pub struct AccountQuery {
    /// Another user's account (admins only); defaults to the caller's.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub user_id: Option<String>,
    /// Usage only: 1-based page (default 1), at most a million.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[param(minimum = 1, maximum = 1_000_000)]
    pub page: Option<u32>,
    /// Usage only: records per page, 1 to 500 (default 50).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[param(minimum = 1, maximum = 500)]
    pub limit: Option<u32>,
}

/// Records per page of a usage answer when the query names none.
pub const DEFAULT_USAGE_LIMIT: u32 = 50;

impl AccountQuery {
    /// The page number and size, defaulted and checked. A balance has no
    /// pages but refuses the same values, as its document says.
    pub fn page(&self) -> Result<(u32, u32), Error> {
        let page = self.page.unwrap_or(1);
        if !(1..=MAX_PAGE_NUMBER).contains(&page) {
            return Err(Error::Validation {
                field: "page",
                message: format!("must be between 1 and {MAX_PAGE_NUMBER}"),
            });
        }
        let limit = self.limit.unwrap_or(DEFAULT_USAGE_LIMIT);
        if !(1..=MAX_PAGE_SIZE).contains(&limit) {
            return Err(Error::Validation {
                field: "limit",
                message: format!("must be between 1 and {MAX_PAGE_SIZE}"),
            });
        }
        Ok((page, limit))
    }
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, ToSchema)]
#[serde(rename_all = "camelCase")]
pub struct UsageResponse {
    pub user_id: String,
    pub page: u32,
    pub limit: u32,
    /// Newest first.
    pub records: Vec<UsageView>,
}

/// The answer of a `GET` on an account ([`AccountQuery`]): each report is
/// read by one [`Accounting`] operation.
pub trait AccountReport: Serialize + Send + Sized + 'static {
    fn read<'a>(
        accounting: &'a dyn Accounting,
        caller: &'a Caller,
        query: AccountQuery,
    ) -> BoxFuture<'a, Result<Self, Error>>;
}

impl AccountReport for BalanceResponse {
    fn read<'a>(
        accounting: &'a dyn Accounting,
        caller: &'a Caller,
        query: AccountQuery,
    ) -> BoxFuture<'a, Result<Self, Error>> {
        accounting.balance(caller, query)
    }
}

impl AccountReport for UsageResponse {
    fn read<'a>(
        accounting: &'a dyn Accounting,
        caller: &'a Caller,
        query: AccountQuery,
    ) -> BoxFuture<'a, Result<Self, Error>> {
        accounting.usage(caller, query)
    }
}

/// One request's usage record.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, ToSchema)]
#[serde(rename_all = "camelCase")]
pub struct UsageView {
    pub request_id: String,
    pub session_id: String,
    pub route: String,
    pub model_id: String,
    pub input_tokens: u64,
    pub output_tokens: u64,
    #[serde(with = "decimal_credits")]
    #[schema(value_type = f64)]
    pub held: Credits,
    #[serde(with = "decimal_credits")]
    #[schema(value_type = f64)]
    pub charged: Credits,
    /// Cost above the hold, not charged.
    #[serde(with = "decimal_credits")]
    #[schema(value_type = f64)]
    pub overage: Credits,
    pub outcome: UsageOutcome,
    /// True when the tokens come from progress reports, not a final count.
    pub estimated: bool,
    pub started_at: DateTime<Utc>,
    pub settled_at: DateTime<Utc>,
}

impl From<UsageRecord> for UsageView {
    fn from(record: UsageRecord) -> Self {
        UsageView {
            request_id: record.request_id,
            session_id: record.session_id,
            route: record.route,
            model_id: record.model,
            input_tokens: record.input_tokens,
            output_tokens: record.output_tokens,
            held: record.held,
            charged: record.charged,
            overage: record.overage,
            outcome: record.outcome,
            estimated: record.estimated,
            started_at: record.started_at,
            settled_at: record.settled_at,
        }
    }
}

/// `POST /api/admin/credits/grant` (admins only): add credits to an account.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, ToSchema)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
pub struct GrantRequest {
    pub user_id: String,
    /// Credits to add; more than zero.
    #[serde(with = "decimal_credits")]
    #[schema(value_type = f64, exclusive_minimum = 0)]
    pub credits: Credits,
}

impl ContractRequest for GrantRequest {
    type Response = BalanceResponse;

    const REQUIRED: &'static [&'static str] = &["userId", "credits"];
    const OPTIONAL: &'static [&'static str] = &[];

    fn answer<'a>(
        self,
        accounting: &'a dyn Accounting,
        caller: &'a Caller,
    ) -> BoxFuture<'a, Result<BalanceResponse, Error>> {
        accounting.grant(caller, self)
    }
}

/// An error answer as the client reads it (the server writes
/// [`crate::error::ErrorBody`]; a test pins that the two agree).
#[derive(Debug, Clone, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct ErrorReply {
    pub code: String,
    pub message: String,
    #[serde(default)]
    pub allowed: Option<Vec<String>>,
    #[serde(default, with = "decimal_credits::option")]
    pub balance: Option<Credits>,
    #[serde(default, with = "decimal_credits::option")]
    pub available: Option<Credits>,
    #[serde(default, with = "decimal_credits::option")]
    pub required_credits: Option<Credits>,
}

#[cfg(test)]
mod tests {
    use serde_json::json;

    use super::*;

    /// Every field a type serializes is one its parser accepts, and the
    /// reverse: the field lists cannot drift from the serde names.
    fn fields_match<T: ContractRequest + Serialize>(full: &T) {
        let Value::Object(object) = serde_json::to_value(full).unwrap() else {
            panic!("not an object");
        };
        let mut serialized: Vec<&str> = object.keys().map(String::as_str).collect();
        let mut declared: Vec<&str> = T::REQUIRED.iter().chain(T::OPTIONAL).copied().collect();
        serialized.sort_unstable();
        declared.sort_unstable();
        assert_eq!(serialized, declared);
        assert!(T::field_errors(&object).is_none());
    }

    #[test]
    fn declared_fields_are_the_serialized_fields() {
        fields_match(&CalculateRequest {
            model_id: "m".into(),
            tokens: Some(1),
            message: Some("hi".into()),
        });
        fields_match(&CheckRequest {
            user_id: "u".into(),
            required_credits: Credits::from_micros(1),
            model_id: Some("m".into()),
        });
        fields_match(&InitializeRequest {
            session_id: "s".into(),
            named_by: SessionNaming::Client,
            model_id: "m".into(),
            estimated_tokens: 1,
            user_id: Some("u".into()),
            route: Some("r".into()),
            tokens_generated: Some(1),
            max_output_tokens: Some(1),
        });
        let usage = UsageDetails {
            model_id: Some("m".into()),
            input_tokens: Some(1),
            usage_estimated: Some(true),
        };
        fields_match(&FinalizeRequest {
            session_id: "s".into(),
            named_by: SessionNaming::Client,
            actual_tokens: 1,
            success: true,
            duration: Some(1),
            user_id: Some("u".into()),
            usage: usage.clone(),
        });
        fields_match(&AbortRequest {
            session_id: "s".into(),
            named_by: SessionNaming::Client,
            tokens_generated: 1,
            reason: Some("r".into()),
            error: Some("e".into()),
            user_id: Some("u".into()),
            usage,
        });
        fields_match(&GrantRequest {
            user_id: "u".into(),
            credits: Credits::from_micros(1),
        });
    }

    #[test]
    fn the_old_bad_check_payload_names_its_missing_fields() {
        let error = CheckRequest::from_json(json!({"credits": 2})).unwrap_err();
        let Error::InvalidFields { message, fields } = error else {
            panic!("{error:?}");
        };
        assert_eq!(
            message,
            "missing fields: userId, requiredCredits; unknown fields: credits \
             (accepted: userId, requiredCredits, modelId)"
        );
        assert_eq!(fields, ["userId", "requiredCredits", "credits"]);
    }

    #[test]
    fn credits_are_exact_decimal_numbers() {
        let request =
            CheckRequest::from_json(json!({"userId": "u", "requiredCredits": 0.1})).unwrap();
        assert_eq!(request.required_credits, Credits::from_micros(100_000));
        let json = serde_json::to_string(&request).unwrap();
        assert_eq!(json, r#"{"userId":"u","requiredCredits":0.1}"#);
        for micros in [0, 1, 999_999, 123_456_789, 1_000_000_000_000_000] {
            let amounts = BalanceAmounts {
                balance: Credits::from_micros(micros),
                held: Credits::ZERO,
                available: Credits::from_micros(micros),
            };
            let back: BalanceAmounts =
                serde_json::from_str(&serde_json::to_string(&amounts).unwrap()).unwrap();
            assert_eq!(back, amounts);
        }
        for bad in [json!(-1), json!(0.0000001), json!("2")] {
            let result = CheckRequest::from_json(json!({"userId": "u", "requiredCredits": bad}));
            assert!(
                matches!(result, Err(Error::InvalidFields { .. })),
                "{result:?}"
            );
        }
    }
}
