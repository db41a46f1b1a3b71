//! Whether text could still begin a match: the question a reply filter asks
//! of its last characters before it lets them go.
//!
//! Each pattern gets a lazy DFA of a relaxed form of itself: every look-around
//! assertion (`\b`, `^`, …) is dropped, so the DFA accepts at least what the
//! pattern accepts, and it keeps every thread alive (`MatchKind::All`).
//! When that DFA, run anchored from a position to the end of the text seen so
//! far, reaches its dead state, no match of the real pattern can start there
//! and reach beyond the text: whatever the pattern decides at that position
//! is final. Dropping the assertions also keeps Unicode word boundaries,
//! which lazy DFAs cannot evaluate, out of it.

use regex_automata::hybrid::dfa::{Cache, DFA};
use regex_automata::nfa::thompson::{self, WhichCaptures};
use regex_automata::util::syntax;
use regex_automata::{Anchored, Input, MatchKind};
use regex_syntax::hir::{Hir, HirKind, Repetition};

/// Most memory one rule's lazy DFA may use for its states; beyond it the
/// cache is cleared and refilled.
const CACHE_CAPACITY: usize = 1024 * 1024;

#[derive(Debug)]
pub struct PrefixDfa {
    dfa: DFA,
}

impl PrefixDfa {
    /// The relaxed DFA of `pattern` (already validated by `parley_crds`).
    pub fn new(pattern: &str) -> Result<Self, String> {
        let hir = syntax::parse(pattern).map_err(|error| error.to_string())?;
        let nfa = thompson::Compiler::new()
            .configure(thompson::Config::new().which_captures(WhichCaptures::None))
            .build_from_hir(&without_assertions(&hir))
            .map_err(|error| error.to_string())?;
        let dfa = DFA::builder()
            .configure(
                DFA::config()
                    .match_kind(MatchKind::All)
                    .cache_capacity(CACHE_CAPACITY)
                    .skip_cache_capacity_check(true),
            )
            .build_from_nfa(nfa)
            .map_err(|error| error.to_string())?;
        Ok(Self { dfa })
    }

    pub fn cache(&self) -> Cache {
        self.dfa.create_cache()
    }

    /// Whether a match could start at `start` and run past the end of
    /// `text`. When in doubt (the DFA gave up), yes: holding text back a
    /// little longer is safe, letting a match go is not.
    pub fn alive_at_end(&self, cache: &mut Cache, text: &[u8], start: usize) -> bool {
        let input = Input::new(text).range(start..).anchored(Anchored::Yes);
        let Ok(mut state) = self.dfa.start_state_forward(cache, &input) else {
            return true;
        };
        for &byte in &text[start..] {
            match self.dfa.next_state(cache, state, byte) {
                Ok(next) if next.is_dead() => return false,
                Ok(next) if next.is_quit() => return true,
                Ok(next) => state = next,
                Err(_) => return true,
            }
        }
        // The DFA reports a match one byte late, so a state that is not dead
        // may only be carrying a match that ended before the last byte. The
        // position is alive if some next byte keeps the DFA going: a thread
        // still running, or a match ending right at the end of the text
        // (which what follows may still cut, e.g. at a `\b`).
        let classes = self.dfa.byte_classes();
        classes
            .representatives(0..=255)
            .filter_map(|unit| unit.as_u8())
            .any(|byte| match self.dfa.next_state(cache, state, byte) {
                Ok(next) => !next.is_dead(),
                Err(_) => true,
            })
    }
}

/// `hir` with every look-around assertion replaced by the empty match and
/// capture groups dissolved: a pattern that matches at least as much.
fn without_assertions(hir: &Hir) -> Hir {
    match hir.kind() {
        HirKind::Empty | HirKind::Look(_) => Hir::empty(),
        HirKind::Literal(literal) => Hir::literal(literal.0.clone()),
        HirKind::Class(class) => Hir::class(class.clone()),
        HirKind::Repetition(repetition) => Hir::repetition(Repetition {
            min: repetition.min,
            max: repetition.max,
            greedy: repetition.greedy,
            sub: Box::new(without_assertions(&repetition.sub)),
        }),
        HirKind::Capture(capture) => without_assertions(&capture.sub),
        HirKind::Concat(parts) => Hir::concat(parts.iter().map(without_assertions).collect()),
        HirKind::Alternation(parts) => {
            Hir::alternation(parts.iter().map(without_assertions).collect())
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn alive(pattern: &str, text: &str, start: usize) -> bool {
        let dfa = PrefixDfa::new(pattern).unwrap();
        dfa.alive_at_end(&mut dfa.cache(), text.as_bytes(), start)
    }

    #[test]
    fn a_position_is_alive_while_the_text_could_still_become_a_match() {
        let words = r"(?i)(?:\bheck\b|\bdarn\b)";
        assert!(alive(words, "oh he", 3));
        assert!(alive(words, "oh HE", 3));
        assert!(!alive(words, "oh he", 2), "a space starts no match");
        assert!(!alive(words, "oh hex", 3));
        // A whole match at the end may still be cut by what follows (`heckle`).
        assert!(alive(words, "oh heck", 3));
        assert!(!alive(words, "oh heck!", 3));
        let ssn = r"\b\d{3}-\d{2}-\d{4}\b";
        assert!(alive(ssn, "id 123-4", 3));
        assert!(!alive(ssn, "id 123-4x", 3));
        assert!(!alive(ssn, "id 123-45-67890", 3), "longer than any match");
    }
}
