//! Content policies: rules that block or mask what users send and what
//! models answer. A route carries one (`ModelRoute.spec.contentPolicy`); a
//! ChatDeployment adds policies for cohorts of users (`cohortPolicies`),
//! which the operator writes into the routes file next to the routes.
//!
//! A rule has exactly one test: `words` (case-insensitive, whole words),
//! `pattern` (a regular expression in the `regex` crate's syntax) or
//! `maxLength` (characters). How a rule becomes a matcher is defined here,
//! once, so that the operator's validation and the service's enforcement
//! can never disagree about what a pattern means.

use regex::{Regex, RegexBuilder};
use regex_syntax::hir::Look;
use schemars::JsonSchema;
use serde::{Deserialize, Serialize};

use crate::problems::{ProblemKind, RouteProblem, is_valid_name};

/// Longest pattern text, in bytes.
pub const PATTERN_MAX_LEN: usize = 1024;
/// Compiled size limit of one rule's regular expression (the `regex`
/// crate's `size_limit`): a pattern that compiles larger is rejected, so a
/// hostile or careless routes file cannot make every reply slow.
pub const PATTERN_SIZE_LIMIT: usize = 256 * 1024;
/// Cache of the lazy DFA of one rule's regular expression.
pub const PATTERN_DFA_SIZE_LIMIT: usize = 1024 * 1024;
/// Longest text, in bytes, a rule applied to replies may match. Replies are
/// filtered as they stream: text that could still begin a match is held back
/// until the next chunk tells, so a bound on a match bounds what is ever
/// held back (in practice a word or two).
pub const OUTPUT_MATCH_MAX_BYTES: usize = 1024;
/// Most words one rule may list, and the longest word.
pub const WORDS_MAX: usize = 1000;
pub const WORD_MAX_CHARS: usize = 64;

/// Rules checked on every message and reply a policy covers.
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq, Eq, JsonSchema)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct ContentPolicy {
    #[schemars(length(min = 1, max = 64))]
    pub rules: Vec<ContentRule>,
}

/// A content policy for the users of some cohorts, on every route.
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq, Eq, JsonSchema)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct CohortPolicy {
    /// Users in any of these cohorts (their token's `cohorts` claim) get the rules.
    #[schemars(length(min = 1, max = 64))]
    pub cohorts: Vec<String>,
    #[schemars(length(min = 1, max = 64))]
    pub rules: Vec<ContentRule>,
}

/// One rule: a test (exactly one of `words`, `pattern`, `maxLength`), what
/// to do on a match, and which direction it applies to.
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq, Eq, JsonSchema)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct ContentRule {
    /// Names the rule in audit records and metrics: lowercase letters,
    /// digits, `.`, `_` and `-`.
    #[schemars(
        length(min = 1, max = 63),
        regex(pattern = r"^[a-z0-9]([a-z0-9._-]*[a-z0-9])?$")
    )]
    pub name: String,
    #[serde(default)]
    pub action: RuleAction,
    #[serde(default)]
    pub direction: RuleDirection,
    /// Words or phrases, matched case-insensitively as whole words.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    #[schemars(length(max = 1000))]
    pub words: Vec<String>,
    /// A regular expression (`regex` crate syntax; case-sensitive unless it
    /// starts with `(?i)`). Applied to replies, it must match at most 1,024
    /// bytes (no unbounded `*`, `+` or `{n,}`) and use no `^`/`$` text anchors.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(length(min = 1, max = 1024))]
    pub pattern: Option<String>,
    /// Longest text allowed, in characters (`block` only).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(range(min = 1))]
    pub max_length: Option<u32>,
    /// What a blocked user is told; a generic sentence when omitted.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(length(min = 1, max = 300))]
    pub reason: Option<String>,
}

/// What a rule does to a match.
#[derive(Serialize, Deserialize, Clone, Copy, Debug, Default, PartialEq, Eq, Hash, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub enum RuleAction {
    /// Refuse the message (400 `CONTENT_BLOCKED`) or end the reply (`error`
    /// `CONTENT_BLOCKED`).
    #[default]
    Block,
    /// Replace each match with `***` and go on.
    Mask,
}

/// What a rule is applied to.
#[derive(Serialize, Deserialize, Clone, Copy, Debug, Default, PartialEq, Eq, Hash, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub enum RuleDirection {
    /// The user's messages and the model's replies.
    #[default]
    Both,
    /// The user's messages only.
    Input,
    /// The model's replies only.
    Output,
}

impl RuleDirection {
    pub fn covers_input(self) -> bool {
        matches!(self, Self::Both | Self::Input)
    }

    pub fn covers_output(self) -> bool {
        matches!(self, Self::Both | Self::Output)
    }
}

/// A rule's test, compiled.
#[derive(Debug, Clone)]
pub enum RuleMatcher {
    /// `words` or `pattern`: the regular expression and the longest text,
    /// in bytes, it can match (`None`: unbounded).
    Pattern {
        regex: Regex,
        longest_match: Option<usize>,
    },
    /// `maxLength`, in characters.
    MaxLength(usize),
}

impl ContentRule {
    /// The rule's test, compiled, or why it cannot be.
    pub fn matcher(&self) -> Result<RuleMatcher, (ProblemKind, String)> {
        let tests = usize::from(!self.words.is_empty())
            + usize::from(self.pattern.is_some())
            + usize::from(self.max_length.is_some());
        if tests != 1 {
            return Err((
                ProblemKind::InvalidContentRule,
                "a rule needs exactly one of words, pattern and maxLength".to_owned(),
            ));
        }
        if let Some(max_length) = self.max_length {
            if self.action == RuleAction::Mask {
                return Err((
                    ProblemKind::InvalidContentRule,
                    "a maxLength rule can only block; there is nothing to mask".to_owned(),
                ));
            }
            return Ok(RuleMatcher::MaxLength(max_length as usize));
        }
        let source = match &self.pattern {
            Some(pattern) if pattern.len() > PATTERN_MAX_LEN => {
                return Err((
                    ProblemKind::InvalidPattern,
                    format!("a pattern is at most {PATTERN_MAX_LEN} bytes"),
                ));
            }
            Some(pattern) => pattern.clone(),
            None => words_pattern(&self.words)?,
        };
        compile_pattern(&source, self.direction.covers_output())
    }
}

/// One case-insensitive alternation of the words, longest first, each
/// bounded by `\b` on the sides that are word characters (so `c++` works).
fn words_pattern(words: &[String]) -> Result<String, (ProblemKind, String)> {
    if words.len() > WORDS_MAX {
        return Err((
            ProblemKind::InvalidContentRule,
            format!("a rule lists at most {WORDS_MAX} words"),
        ));
    }
    let mut words: Vec<&str> = words.iter().map(|word| word.trim()).collect();
    if let Some(bad) = words
        .iter()
        .find(|word| word.is_empty() || word.chars().count() > WORD_MAX_CHARS)
    {
        return Err((
            ProblemKind::InvalidContentRule,
            format!("word `{bad}` must be 1-{WORD_MAX_CHARS} characters"),
        ));
    }
    words.sort_by_key(|word| std::cmp::Reverse(word.len()));
    let is_word = |c: Option<char>| c.is_some_and(|c| c.is_alphanumeric() || c == '_');
    let alternatives: Vec<String> = words
        .iter()
        .map(|word| {
            let start = if is_word(word.chars().next()) {
                r"\b"
            } else {
                ""
            };
            let end = if is_word(word.chars().last()) {
                r"\b"
            } else {
                ""
            };
            format!("{start}{}{end}", regex::escape(word))
        })
        .collect();
    Ok(format!("(?i)(?:{})", alternatives.join("|")))
}

fn compile_pattern(source: &str, for_output: bool) -> Result<RuleMatcher, (ProblemKind, String)> {
    let invalid = |message: String| (ProblemKind::InvalidPattern, message);
    let hir = regex_syntax::ParserBuilder::new()
        .build()
        .parse(source)
        .map_err(|error| invalid(format!("invalid regular expression: {error}")))?;
    let properties = hir.properties();
    if properties.minimum_len() == Some(0) {
        return Err(invalid(
            "the pattern matches empty text, so it would match everywhere".to_owned(),
        ));
    }
    let longest_match = properties.maximum_len();
    if for_output {
        match longest_match {
            Some(longest) if longest <= OUTPUT_MATCH_MAX_BYTES => {}
            _ => {
                return Err(invalid(format!(
                    "a pattern applied to replies must match at most {OUTPUT_MATCH_MAX_BYTES} \
                     bytes (bound every repetition, e.g. `{{1,20}}` instead of `+`), or set \
                     direction: input"
                )));
            }
        }
        let looks = properties.look_set();
        if looks.contains(Look::Start) || looks.contains(Look::End) {
            return Err(invalid(
                "a pattern applied to replies cannot use `^`, `$`, `\\A` or `\\z`: replies are \
                 checked as they stream, not as one text"
                    .to_owned(),
            ));
        }
    }
    let regex = RegexBuilder::new(source)
        .size_limit(PATTERN_SIZE_LIMIT)
        .dfa_size_limit(PATTERN_DFA_SIZE_LIMIT)
        .build()
        .map_err(|error| invalid(format!("cannot compile the pattern: {error}")))?;
    Ok(RuleMatcher::Pattern {
        regex,
        longest_match,
    })
}

/// Reports the problems of `rules` (at `path`, e.g. `spec.contentPolicy`).
pub(crate) fn collect_rule_problems(
    rules: &[ContentRule],
    path: &str,
    problems: &mut Vec<RouteProblem>,
) {
    let mut names = std::collections::HashSet::new();
    for (index, rule) in rules.iter().enumerate() {
        let rule_path = format!("{path}.rules[{index}]");
        if !is_valid_name(&rule.name) {
            problems.push(RouteProblem::new(
                format!("{rule_path}.name"),
                ProblemKind::InvalidContentRule,
                format!(
                    "rule name `{}` must be 1-63 lowercase letters, digits, `.`, `_` or `-`",
                    rule.name
                ),
            ));
        } else if !names.insert(rule.name.as_str()) {
            problems.push(RouteProblem::new(
                format!("{rule_path}.name"),
                ProblemKind::InvalidContentRule,
                format!("rule name `{}` is used twice in this policy", rule.name),
            ));
        }
        if let Err((kind, message)) = rule.matcher() {
            problems.push(RouteProblem::new(rule_path, kind, message));
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn rule(yaml: &str) -> ContentRule {
        serde_yaml::from_str(yaml).unwrap()
    }

    fn regex_of(rule: &ContentRule) -> Regex {
        match rule.matcher().unwrap() {
            RuleMatcher::Pattern { regex, .. } => regex,
            RuleMatcher::MaxLength(_) => panic!("not a pattern"),
        }
    }

    #[test]
    fn words_match_whole_words_case_insensitively() {
        let words = rule("{name: w, words: [heck, c++, Bad Word]}");
        let regex = regex_of(&words);
        for hit in ["Heck!", "what the HECK", "I like C++.", "a BAD WORD"] {
            assert!(regex.is_match(hit), "{hit}");
        }
        for miss in ["heckle", "checkout", "bad words", "a bad  word", "cc++"] {
            assert!(!regex.is_match(miss), "{miss}");
        }
        assert!(regex.is_match("ÜBER heck"));
    }

    #[test]
    fn invalid_rules_say_why() {
        let cases = [
            ("{name: a}", ProblemKind::InvalidContentRule, "exactly one"),
            (
                "{name: a, words: [x], maxLength: 3}",
                ProblemKind::InvalidContentRule,
                "exactly one",
            ),
            (
                "{name: a, maxLength: 3, action: mask}",
                ProblemKind::InvalidContentRule,
                "only block",
            ),
            (
                "{name: a, pattern: '('}",
                ProblemKind::InvalidPattern,
                "invalid regular",
            ),
            (
                "{name: a, pattern: 'x*'}",
                ProblemKind::InvalidPattern,
                "empty text",
            ),
            (
                "{name: a, pattern: '\\d+'}",
                ProblemKind::InvalidPattern,
                "at most 1024",
            ),
            (
                "{name: a, pattern: '^hi'}",
                ProblemKind::InvalidPattern,
                "`^`",
            ),
            (
                "{name: a, pattern: 'a{1000}{1000}', direction: input}",
                ProblemKind::InvalidPattern,
                "",
            ),
            (
                "{name: a, words: ['  ']}",
                ProblemKind::InvalidContentRule,
                "word",
            ),
        ];
        for (yaml, kind, wording) in cases {
            let (found, message) = rule(yaml).matcher().unwrap_err();
            assert_eq!(found, kind, "{yaml}: {message}");
            assert!(message.contains(wording), "{yaml}: {message}");
        }
        // Unbounded patterns are fine for input, where the whole text is known.
        rule("{name: a, pattern: '\\d+', direction: input}")
            .matcher()
            .unwrap();
    }

    #[test]
    fn output_patterns_know_their_longest_match() {
        match rule("{name: ssn, pattern: '\\b\\d{3}-\\d{2}-\\d{4}\\b'}").matcher() {
            // `\d` is any Unicode digit, up to four bytes each.
            Ok(RuleMatcher::Pattern { longest_match, .. }) => {
                assert_eq!(longest_match, Some(9 * 4 + 2));
            }
            other => panic!("{other:?}"),
        }
    }
}
