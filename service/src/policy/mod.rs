//! Content policy: rules that block or mask what users send and what models
//! answer, and the record every block leaves.
//!
//! A message is checked whole, before any credit is held or model called
//! ([`ReplyPolicy::check_input`]). A reply is checked as it streams
//! ([`OutputFilter`]): text that could still begin a match is held back until
//! the next chunk tells, so masking works across chunk boundaries while
//! everything else goes out at once. Every block (a rule's, or a Bedrock
//! Guardrail's) is an audit record supervisors of the user's cohorts can list,
//! and counts in `parley_content_blocks_total{route,direction,rule}`.

mod output;
mod prefix;
mod rules;

use std::sync::Arc;

use parley_crds::{RouteTarget, RuleAction};
use prometheus_client::encoding::EncodeLabelSet;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::registry::Registry;

pub use output::{Filtered, OutputFilter};
pub use rules::{CompiledRule, PolicyBook, ReplyPolicy, RuleSource, RuleTest};

use crate::providers::Intervention;
use crate::store::{BlockAudit, BlockDirection, BlockKind, ObjectId, PolicyBlock, now};

/// What a mask leaves in place of a match.
pub const MASK: &str = "***";
/// What a stored reply ends with when a block cut it.
pub const REDACTION_MARK: &str = "[removed by the content policy]";
/// What the user is told when a guardrail blocked their message or reply.
const GUARDRAIL_REASON: &str = "This content is not allowed by the model's guardrail.";
/// Characters of context kept on each side of a match in an audit excerpt.
const EXCERPT_CONTEXT_CHARS: usize = 20;

/// Why content was blocked, as far as the user and the audit may know.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Block {
    pub direction: BlockDirection,
    pub kind: BlockKind,
    /// The rule's name, or `guardrail:<identifier>` and what it flagged.
    pub rule: String,
    /// What the user is told.
    pub reason: String,
    /// A little context around the match, with the match itself masked.
    pub excerpt: Option<String>,
}

impl Block {
    /// A Bedrock Guardrail intervened on `target`'s call: the row names the
    /// guardrail and keeps what it flagged (policy names, never the text).
    pub fn by_guardrail(target: &RouteTarget, intervention: &Intervention) -> Self {
        let guardrail = target.guardrail_identifier.as_deref().unwrap_or("unknown");
        Self {
            direction: if intervention.on_input {
                BlockDirection::Input
            } else {
                BlockDirection::Output
            },
            kind: BlockKind::Guardrail,
            rule: format!("guardrail:{guardrail}"),
            reason: GUARDRAIL_REASON.to_owned(),
            excerpt: (!intervention.flagged.is_empty()).then(|| intervention.flagged.join(", ")),
        }
    }

    fn by_rule(rule: &CompiledRule, direction: BlockDirection, excerpt: Option<String>) -> Self {
        Self {
            direction,
            kind: match rule.source {
                RuleSource::Route => BlockKind::RouteRule,
                RuleSource::Cohort => BlockKind::CohortRule,
            },
            rule: rule.name.clone(),
            reason: rule.reason.clone(),
            excerpt,
        }
    }
}

impl ReplyPolicy {
    /// The message masked (`None`: nothing to mask, send it as it is), or
    /// the block.
    pub fn check_input(&self, text: &str) -> Result<Option<String>, Block> {
        let mut masks = Vec::new();
        for rule in self.input_rules() {
            match (&rule.test, rule.action) {
                (RuleTest::MaxLength(max), _) => {
                    if text.chars().count() > *max {
                        return Err(Block::by_rule(rule, BlockDirection::Input, None));
                    }
                }
                (RuleTest::Pattern { regex, .. }, RuleAction::Block) => {
                    if let Some(found) = regex.find(text) {
                        let excerpt = excerpt(text, found.start(), found.end());
                        return Err(Block::by_rule(rule, BlockDirection::Input, Some(excerpt)));
                    }
                }
                (RuleTest::Pattern { regex, .. }, RuleAction::Mask) => {
                    masks.extend(regex.find_iter(text).map(|m| (m.start(), m.end())));
                }
            }
        }
        Ok((!masks.is_empty()).then(|| masked(text, 0, text.len(), masks)))
    }
}

/// `text[from..to]` with the spans in `masks` (offsets into `text`, inside
/// the range) replaced by [`MASK`]; overlapping spans merge.
fn masked(text: &str, from: usize, to: usize, mut masks: Vec<(usize, usize)>) -> String {
    masks.sort_unstable();
    let mut merged: Vec<(usize, usize)> = Vec::with_capacity(masks.len());
    for (start, end) in masks {
        match merged.last_mut() {
            Some(last) if start <= last.1 => last.1 = last.1.max(end),
            _ => merged.push((start, end)),
        }
    }
    let mut out = String::with_capacity(to - from);
    let mut at = from;
    for (start, end) in merged {
        out.push_str(&text[at..start.max(at)]);
        out.push_str(MASK);
        at = end.min(to).max(at);
    }
    out.push_str(&text[at..to]);
    out
}

/// Up to [`EXCERPT_CONTEXT_CHARS`] characters on each side of a match, the
/// match masked: enough for a supervisor to see what kind of thing it was,
/// never the blocked text itself.
fn excerpt(text: &str, start: usize, end: usize) -> String {
    let before: String = {
        let chars: Vec<char> = text[..start]
            .chars()
            .rev()
            .take(EXCERPT_CONTEXT_CHARS)
            .collect();
        chars.into_iter().rev().collect()
    };
    let after: String = text[end..].chars().take(EXCERPT_CONTEXT_CHARS).collect();
    format!("{before}{MASK}{after}")
}

#[derive(Debug, Clone, Hash, PartialEq, Eq, EncodeLabelSet)]
struct BlockLabels {
    route: String,
    /// `input` or `output`.
    direction: &'static str,
    rule: String,
}

/// Who and where a block happened to.
#[derive(Debug, Clone)]
pub struct BlockContext {
    pub user_id: String,
    pub user_cohorts: Vec<String>,
    /// `None` for a session's first message refused at its creation.
    pub session_id: Option<ObjectId>,
    pub route: String,
    /// The target that answered, for blocks of a reply.
    pub model: Option<String>,
}

/// Records blocks: an audit row and a metric each.
pub struct BlockRecorder {
    audit: Arc<dyn BlockAudit>,
    blocks: Family<BlockLabels, Counter>,
}

impl BlockRecorder {
    pub fn new(audit: Arc<dyn BlockAudit>, registry: &mut Registry) -> Self {
        let blocks = Family::default();
        registry.register(
            "parley_content_blocks",
            "Messages and replies blocked by a content policy rule or a guardrail",
            blocks.clone(),
        );
        Self { audit, blocks }
    }

    pub fn audit(&self) -> &Arc<dyn BlockAudit> {
        &self.audit
    }

    /// Counts `block` and writes its audit row. The content stays blocked
    /// whether or not the row could be written; a failure is logged.
    pub async fn record(&self, block: &Block, context: &BlockContext) {
        self.blocks
            .get_or_create(&BlockLabels {
                route: context.route.clone(),
                direction: block.direction.as_str(),
                rule: block.rule.clone(),
            })
            .inc();
        let row = PolicyBlock {
            id: ObjectId::new(),
            at: now(),
            direction: block.direction,
            kind: block.kind,
            rule: block.rule.clone(),
            user_id: context.user_id.clone(),
            user_cohorts: context.user_cohorts.clone(),
            session_id: context.session_id,
            route: context.route.clone(),
            model: context.model.clone(),
            excerpt: block.excerpt.clone(),
        };
        tracing::info!(rule = %block.rule, direction = block.direction.as_str(), route = %context.route, user = %context.user_id, "content blocked");
        if let Err(error) = self.audit.block_recorded(&row).await {
            tracing::error!(%error, rule = %block.rule, "recording a content block in the audit failed");
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn policy(yaml: &str, cohorts: &[&str]) -> ReplyPolicy {
        let file = parley_crds::RoutesFile::from_yaml(yaml).unwrap();
        file.validate().unwrap();
        let cohorts: Vec<String> = cohorts.iter().map(|c| (*c).to_owned()).collect();
        PolicyBook::compile(&file)
            .unwrap()
            .for_reply("default", &cohorts)
    }

    const ROUTES: &str = r"
cohortPolicies:
  - cohorts: [young]
    rules:
      - {name: mild, words: [heck], action: mask}
routes:
  - alias: default
    contentPolicy:
      rules:
        - {name: ssn, pattern: '\b\d{3}-\d{2}-\d{4}\b', action: mask}
        - {name: cheat, words: [answer key], reason: Ask your teacher., direction: input}
        - {name: short, maxLength: 40, direction: input}
    targets:
      - {provider: simulated, model: s, pricing: {inputPer1k: 1, outputPer1k: 1}, maxOutputTokens: 5}
";

    #[test]
    fn input_is_masked_or_blocked_with_the_rules_reason() {
        let adult = policy(ROUTES, &["older"]);
        assert_eq!(
            adult.check_input("my id is 123-45-6789, heck").unwrap(),
            Some("my id is ***, heck".to_owned())
        );
        assert_eq!(adult.check_input("nothing to mask").unwrap(), None);
        let young = policy(ROUTES, &["young", "x"]);
        assert_eq!(
            young.check_input("HECK, my id is 123-45-6789").unwrap(),
            Some("***, my id is ***".to_owned())
        );
        let block = young.check_input("where is the Answer Key?").unwrap_err();
        assert_eq!(
            (block.rule.as_str(), block.reason.as_str(), block.kind),
            ("cheat", "Ask your teacher.", BlockKind::RouteRule)
        );
        assert_eq!(block.excerpt.as_deref(), Some("where is the ***?"));
        let long = young.check_input(&"a".repeat(41)).unwrap_err();
        assert_eq!((long.rule.as_str(), long.excerpt), ("short", None));
        assert_eq!(
            long.reason, "this content is not allowed here",
            "a rule without a reason gets the generic sentence"
        );
    }

    #[test]
    fn excerpts_keep_a_little_context_and_never_the_match() {
        let text = format!("{}SECRET{}", "b".repeat(30), "a".repeat(30));
        let start = 30;
        assert_eq!(
            excerpt(&text, start, start + 6),
            format!("{}***{}", "b".repeat(20), "a".repeat(20))
        );
        assert_eq!(masked("abcdef", 0, 6, vec![(1, 3), (2, 4)]), "a***ef");
    }
}
