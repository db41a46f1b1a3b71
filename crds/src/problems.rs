//! What validation finds wrong in a route, a routes file or a content
//! policy: the vocabulary both `routes_file` and `content_policy` report in.

use std::fmt;

pub const ALIAS_MAX_LEN: usize = 63;

/// Aliases and rule names: 1-63 lowercase letters, digits, `.`, `_` or `-`,
/// starting and ending with a letter or digit.
pub(crate) fn is_valid_name(name: &str) -> bool {
    let bytes = name.as_bytes();
    let inner_ok = |b: &u8| b.is_ascii_lowercase() || b.is_ascii_digit() || b"._-".contains(b);
    let edge_ok = |b: Option<&u8>| b.is_some_and(|b| b.is_ascii_lowercase() || b.is_ascii_digit());
    name.len() <= ALIAS_MAX_LEN
        && edge_ok(bytes.first())
        && edge_ok(bytes.last())
        && bytes.iter().all(inner_ok)
}

/// What is wrong with a route; [`ProblemKind::reason`] is the condition reason.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum ProblemKind {
    EmptyChain,
    InvalidAlias,
    NoAllowedRoles,
    EmptyModel,
    DuplicateTarget,
    NegativePrice,
    TooPrecise,
    LimitOutOfRange,
    DuplicateAlias,
    UnknownDefaultRoute,
    InvalidCapability,
    InvalidGuardrail,
    InvalidContentRule,
    InvalidPattern,
}

impl ProblemKind {
    /// CamelCase reason for Kubernetes conditions and events.
    pub fn reason(self) -> &'static str {
        match self {
            ProblemKind::EmptyChain => "EmptyChain",
            ProblemKind::InvalidAlias => "InvalidAlias",
            ProblemKind::NoAllowedRoles => "NoAllowedRoles",
            ProblemKind::EmptyModel => "EmptyModel",
            ProblemKind::DuplicateTarget => "DuplicateTarget",
            ProblemKind::NegativePrice => "NegativePrice",
            ProblemKind::TooPrecise => "TooPrecise",
            ProblemKind::LimitOutOfRange => "LimitOutOfRange",
            ProblemKind::DuplicateAlias => "DuplicateAlias",
            ProblemKind::UnknownDefaultRoute => "UnknownDefaultRoute",
            ProblemKind::InvalidCapability => "InvalidCapability",
            ProblemKind::InvalidGuardrail => "InvalidGuardrail",
            ProblemKind::InvalidContentRule => "InvalidContentRule",
            ProblemKind::InvalidPattern => "InvalidPattern",
        }
    }
}

/// One problem, located by a field path such as `routes[1].targets[0].model`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RouteProblem {
    pub path: String,
    pub kind: ProblemKind,
    pub message: String,
}

impl RouteProblem {
    pub fn new(path: String, kind: ProblemKind, message: String) -> Self {
        Self {
            path,
            kind,
            message,
        }
    }
}

impl fmt::Display for RouteProblem {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}: {}", self.path, self.message)
    }
}

/// Every problem found in a route or routes file (never empty).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RouteProblems(pub Vec<RouteProblem>);

impl RouteProblems {
    pub(crate) fn result(problems: Vec<RouteProblem>) -> Result<(), Self> {
        if problems.is_empty() {
            Ok(())
        } else {
            Err(Self(problems))
        }
    }

    /// The reason of the first problem, for a condition's `reason`.
    pub fn reason(&self) -> &'static str {
        self.0
            .first()
            .map_or("Invalid", |problem| problem.kind.reason())
    }
}

impl fmt::Display for RouteProblems {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        for (index, problem) in self.0.iter().enumerate() {
            if index > 0 {
                f.write_str("; ")?;
            }
            write!(f, "{problem}")?;
        }
        Ok(())
    }
}

impl std::error::Error for RouteProblems {}
