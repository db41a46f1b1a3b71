//! The content policy applied to a reply as it streams.
//!
//! Each chunk joins the text not yet shown. What no rule can still change is
//! let go at once — with masks applied — and only the characters that could
//! begin a match are held back until the next chunk (or the end) decides
//! them, so a masked word split across two chunks is still masked, and a
//! reply is never held whole. A blocking rule's match ends the reply: what
//! came before it is shown, the match and everything after it never is.

use std::sync::Arc;

use parley_crds::{OUTPUT_MATCH_MAX_BYTES, RuleAction};
use regex_automata::hybrid::dfa::Cache;

use super::prefix::PrefixDfa;
use super::{Block, CompiledRule, EXCERPT_CONTEXT_CHARS, MASK, ReplyPolicy, RuleTest, masked};
use crate::store::BlockDirection;

/// What the filter lets go after a chunk.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Filtered {
    /// Text to show now; empty while everything new is held back.
    Text(String),
    /// A blocking rule matched: `shown` is what may still be shown before
    /// the reply ends with the block.
    Blocked { shown: String, block: Block },
}

pub struct OutputFilter {
    rules: Vec<Arc<CompiledRule>>,
    /// One lazy-DFA cache per rule that has a prefix DFA.
    caches: Vec<Option<Cache>>,
    /// The last character let go (for `\b` at the start of what follows),
    /// then the text held back.
    buffer: String,
    /// Where the held-back text starts in `buffer`.
    held_from: usize,
    /// Characters of the reply let go so far (for `maxLength`).
    released_chars: usize,
    /// The end of what was shown, for the excerpt of a block.
    shown_tail: String,
    blocked: bool,
}

impl OutputFilter {
    pub fn new(policy: &ReplyPolicy) -> Self {
        let rules: Vec<Arc<CompiledRule>> = policy.output_rules().cloned().collect();
        let caches = rules
            .iter()
            .map(|rule| prefix_of(rule).map(PrefixDfa::cache))
            .collect();
        Self {
            rules,
            caches,
            buffer: String::new(),
            held_from: 0,
            released_chars: 0,
            shown_tail: String::new(),
            blocked: false,
        }
    }

    /// No rule applies to replies: every chunk passes as it is.
    pub fn is_passthrough(&self) -> bool {
        self.rules.is_empty()
    }

    /// Takes the next chunk of the reply.
    pub fn push(&mut self, chunk: String) -> Filtered {
        if self.is_passthrough() {
            return Filtered::Text(chunk);
        }
        if self.blocked {
            return Filtered::Text(String::new());
        }
        self.buffer.push_str(&chunk);
        self.step(false)
    }

    /// The reply ended: decides and lets go everything held back.
    pub fn finish(&mut self) -> Filtered {
        if self.blocked || self.is_passthrough() {
            return Filtered::Text(String::new());
        }
        self.step(true)
    }

    fn step(&mut self, at_end: bool) -> Filtered {
        let text = self.buffer.as_str();
        let from = self.held_from;
        // Where a match could still begin and run past what has arrived.
        let mut hold = text.len();
        if !at_end {
            for (rule, cache) in self.rules.iter().zip(self.caches.iter_mut()) {
                if let (Some(prefix), Some(cache)) = (prefix_of(rule), cache.as_mut()) {
                    hold = first_live_start(prefix, cache, text, from, hold);
                }
            }
        }
        // Matches starting before `hold` are final.
        let mut masks = Vec::new();
        let mut block: Option<(usize, usize, &Arc<CompiledRule>)> = None;
        for rule in &self.rules {
            match &rule.test {
                RuleTest::Pattern { regex, .. } => {
                    let mut at = from;
                    while let Some(found) = regex.find_at(text, at) {
                        if found.start() >= hold {
                            break;
                        }
                        if rule.action == RuleAction::Block {
                            if block.is_none_or(|(start, ..)| found.start() < start) {
                                block = Some((found.start(), found.end(), rule));
                            }
                            break;
                        }
                        masks.push((found.start(), found.end()));
                        // Validated patterns never match empty text.
                        at = found.end();
                    }
                }
                RuleTest::MaxLength(max) => {
                    let allowed = max.saturating_sub(self.released_chars);
                    if let Some((offset, _)) = text[from..].char_indices().nth(allowed)
                        && block.is_none_or(|(start, ..)| from + offset < start)
                    {
                        block = Some((from + offset, from + offset, rule));
                    }
                }
            }
        }
        let mut end = hold;
        if let Some((start, ..)) = block {
            end = end.min(start);
        }
        // A mask is let go whole or not at all.
        while let Some(&(start, _)) = masks
            .iter()
            .find(|(start, mask_end)| *start < end && *mask_end > end)
        {
            end = start;
        }
        masks.retain(|(start, _)| *start < end);
        let shown = masked(text, from, end, masks);
        self.shown_tail.push_str(&shown);
        let tail_from = self
            .shown_tail
            .char_indices()
            .rev()
            .nth(EXCERPT_CONTEXT_CHARS - 1)
            .map_or(0, |(at, _)| at);
        self.shown_tail.drain(..tail_from);
        let outcome = match block {
            Some((start, match_end, rule)) => {
                // What the user saw before the match, and the match masked:
                // the text held back after it was never shown, so it stays out.
                let excerpt = (match_end > start).then(|| format!("{}{MASK}", self.shown_tail));
                self.blocked = true;
                Filtered::Blocked {
                    shown,
                    block: Block::by_rule(rule, BlockDirection::Output, excerpt),
                }
            }
            None => Filtered::Text(shown),
        };
        self.released_chars += text[from..end].chars().count();
        // Keep the last character let go as context for `\b`.
        let keep = text[..end].char_indices().last().map_or(end, |(at, _)| at);
        self.buffer.drain(..keep);
        self.held_from = end - keep;
        outcome
    }
}

fn prefix_of(rule: &CompiledRule) -> Option<&PrefixDfa> {
    match &rule.test {
        RuleTest::Pattern {
            prefix: Some(prefix),
            ..
        } => Some(prefix),
        _ => None,
    }
}

/// The first position (a character boundary in `from..limit`) where a match
/// could begin and still be running at the end of `text`; `limit` if none.
/// No match of a rule applied to replies is longer than
/// [`OUTPUT_MATCH_MAX_BYTES`], so earlier positions are not looked at.
fn first_live_start(
    prefix: &PrefixDfa,
    cache: &mut Cache,
    text: &str,
    from: usize,
    limit: usize,
) -> usize {
    let mut start = from.max(text.len().saturating_sub(OUTPUT_MATCH_MAX_BYTES + 4));
    while !text.is_char_boundary(start) {
        start += 1;
    }
    if start >= limit {
        return limit;
    }
    text[start..limit]
        .char_indices()
        .map(|(offset, _)| start + offset)
        .find(|&at| prefix.alive_at_end(cache, text.as_bytes(), at))
        .unwrap_or(limit)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::policy::PolicyBook;

    fn filter(rules: &str) -> OutputFilter {
        let yaml = format!(
            "routes:\n  - alias: default\n    contentPolicy:\n      rules:\n{rules}    targets:\n      \
             - {{provider: simulated, model: s, pricing: {{inputPer1k: 1, outputPer1k: 1}}, \
             maxOutputTokens: 5}}\n"
        );
        let file = parley_crds::RoutesFile::from_yaml(&yaml).unwrap();
        file.validate().unwrap();
        let policy = PolicyBook::compile(&file)
            .unwrap()
            .for_reply("default", &[]);
        OutputFilter::new(&policy)
    }

    /// Every chunk's output, then the end's.
    fn run(filter: &mut OutputFilter, chunks: &[&str]) -> Vec<Filtered> {
        let mut out: Vec<Filtered> = chunks
            .iter()
            .map(|chunk| filter.push((*chunk).to_owned()))
            .collect();
        out.push(filter.finish());
        out
    }

    fn text(out: &[Filtered]) -> Vec<&str> {
        out.iter()
            .map(|f| match f {
                Filtered::Text(text) => text.as_str(),
                Filtered::Blocked { shown, .. } => shown.as_str(),
            })
            .collect()
    }

    const WORDS: &str = "        - {name: mild, words: [heck, darn it], action: mask}\n";

    #[test]
    fn a_word_split_across_chunks_is_masked_and_only_its_start_was_held() {
        let mut words = filter(WORDS);
        let out = run(
            &mut words,
            &["Oh he", "ck, that is ", "a heckle. Darn", " it!"],
        );
        assert_eq!(
            text(&out),
            ["Oh ", "***, that is ", "a heckle. ", "***!", ""]
        );
    }

    #[test]
    fn a_match_at_the_very_end_is_decided_when_the_reply_ends() {
        let mut words = filter(WORDS);
        assert_eq!(text(&run(&mut words, &["well, heck"])), ["well, ", "***"]);
        let mut words = filter(WORDS);
        assert_eq!(text(&run(&mut words, &["che", "ck"])), ["c", "", "heck"]);
    }

    #[test]
    fn every_split_of_a_reply_gives_the_same_text() {
        let reply = "Heck: call 555-1234 or 123-45-6789, darn it. Checks heck! Ünï heck";
        let expected = "***: call 555-1234 or ***, ***. Checks ***! Ünï ***";
        let rules = "        - {name: mild, words: [heck, darn it], action: mask}\n        \
                     - {name: ssn, pattern: '\\b\\d{3}-\\d{2}-\\d{4}\\b', action: mask}\n";
        for cut in 0..=reply.len() {
            if !reply.is_char_boundary(cut) {
                continue;
            }
            for second in cut..=reply.len() {
                if !reply.is_char_boundary(second) {
                    continue;
                }
                let mut masking = filter(rules);
                let out = run(
                    &mut masking,
                    &[&reply[..cut], &reply[cut..second], &reply[second..]],
                );
                assert_eq!(text(&out).concat(), expected, "cut at {cut} and {second}");
            }
        }
    }

    #[test]
    fn a_blocking_match_ends_the_reply_before_it_is_shown() {
        let mut blocking = filter(
            "        - {name: recipe, words: [nitroglycerin], reason: Not here.}\n        \
             - {name: mild, words: [heck], action: mask}\n",
        );
        let out = run(
            &mut blocking,
            &[
                "Heck, here is how to make nitro",
                "glycerin at home",
                " and more",
            ],
        );
        assert_eq!(out[0], Filtered::Text("***, here is how to make ".into()));
        match &out[1] {
            Filtered::Blocked { shown, block } => {
                assert_eq!(shown, "");
                assert_eq!(
                    (block.rule.as_str(), block.reason.as_str()),
                    ("recipe", "Not here.")
                );
                assert_eq!(block.direction, BlockDirection::Output);
                assert_eq!(block.excerpt.as_deref(), Some("here is how to make ***"));
            }
            other => panic!("expected a block, got {other:?}"),
        }
        assert_eq!(out[2], Filtered::Text(String::new()));
    }

    #[test]
    fn a_length_limit_cuts_the_reply_at_the_limit() {
        let mut limited = filter("        - {name: brief, maxLength: 10, direction: output}\n");
        let out = run(&mut limited, &["12345", "67890abc", "more"]);
        assert_eq!(out[0], Filtered::Text("12345".into()));
        match &out[1] {
            Filtered::Blocked { shown, block } => {
                assert_eq!((shown.as_str(), block.rule.as_str()), ("67890", "brief"));
                assert_eq!(block.excerpt, None);
            }
            other => panic!("expected a block, got {other:?}"),
        }
    }

    #[test]
    fn without_rules_chunks_pass_untouched() {
        let mut none = filter("        - {name: in, words: [x], direction: input}\n");
        assert!(none.is_passthrough());
        assert_eq!(none.push("a heck".into()), Filtered::Text("a heck".into()));
    }
}
