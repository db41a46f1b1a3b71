//! What of a conversation a reply sends: each target of a route has a
//! context window (prompt and reply together, `contextTokens`), and a
//! reply's prompt to it is the route's instructions, the newest earlier
//! turns that fit beside the reply's maximum output, and the new user
//! message. Tokens are counted with the one estimate of
//! [`crate::providers::estimate_tokens`], so the hold is priced on the
//! prompt as sent.
//!
//! - Turns are dropped whole, oldest first; a history cut short starts with
//!   a user turn (Bedrock Converse refuses a conversation opening with the
//!   assistant, and an answer without its question misleads any model). A
//!   history that fits whole is sent as it is.
//! - Instructions and the new message are never dropped: when they and the
//!   reply's maximum do not fit a target, the reply skips that target; when
//!   they fit none, it is refused (`MESSAGE_TOO_LONG_FOR_MODEL`) before any
//!   credit is held or any model called.
//! - A session is read only as far back as a prompt could reach
//!   ([`history_budget`]), so neither the read nor the prompt grows with the
//!   session's length.

use std::sync::Arc;

use parley_crds::{ModelRouteSpec, RouteTarget};

use crate::error::Error;
use crate::providers::{
    BYTES_PER_TOKEN, ChatTurn, PromptTurns, Role, TOKENS_PER_TURN, estimate_input_tokens,
    estimate_turn_tokens,
};
use crate::store::HistoryBudget;
use crate::turns::History;

/// A reply's conversation before it is fitted to a target's window.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Conversation {
    /// Sent first and always: the route's system prompt, then (OpenAI API)
    /// the caller's leading system messages.
    instructions: Vec<ChatTurn>,
    /// Earlier turns, oldest first; the newest that fit are sent.
    history: History,
    /// The new user message, sent last and always.
    message: ChatTurn,
}

/// The prompt fitted to one target, and its estimated input tokens (what
/// the hold is priced for).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Prompt {
    pub turns: PromptTurns,
    pub input_tokens: u32,
}

/// Instructions and message that do not fit a window: the tokens they need
/// with the reply's maximum output.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Overflow {
    pub needed_tokens: u32,
}

impl Conversation {
    /// `system_prompt` (the route's) goes before `instructions`.
    pub fn new(
        system_prompt: Option<&str>,
        instructions: Vec<ChatTurn>,
        history: History,
        message: ChatTurn,
    ) -> Self {
        let instructions = system_prompt
            .map(|text| ChatTurn::new(Role::System, text))
            .into_iter()
            .chain(instructions)
            .collect();
        Self {
            instructions,
            history,
            message,
        }
    }

    /// Tokens of what is always sent.
    fn fixed_tokens(&self) -> u32 {
        estimate_input_tokens(&self.instructions)
            .saturating_add(estimate_turn_tokens(&self.message))
    }

    /// The prompt for a window of `context_tokens` that must leave
    /// `output_tokens` for the reply (replies go through [`Self::prompts`],
    /// which shares the turns among every target's prompt).
    #[cfg(test)]
    pub fn fit(&self, context_tokens: u32, output_tokens: u32) -> Result<Prompt, Overflow> {
        let cut = self.cut(context_tokens, output_tokens)?;
        Ok(cut.prompt(
            &self.instructions.clone().into(),
            &self.history,
            &self.message,
        ))
    }

    /// Where a window of `context_tokens` that must leave `output_tokens`
    /// for the reply cuts the history.
    fn cut(&self, context_tokens: u32, output_tokens: u32) -> Result<Cut, Overflow> {
        let allowance = context_tokens.saturating_sub(output_tokens);
        let fixed = self.fixed_tokens();
        if fixed > allowance {
            return Err(Overflow {
                needed_tokens: fixed.saturating_add(output_tokens),
            });
        }
        let room = u64::from(allowance - fixed);
        let (kept, kept_size) = self.history.newest_fitting(|size| size.tokens <= room);
        // Within `allowance`, a u32.
        let mut input_tokens = fixed + kept_size.tokens as u32;
        let mut first_kept = self.history.len() - kept;
        // A conversation that fits is sent as it is; one cut short starts
        // at a user turn.
        if first_kept > 0 {
            for turn in self.history.iter_from(first_kept) {
                if turn.role == Role::User {
                    break;
                }
                input_tokens -= estimate_turn_tokens(turn);
                first_kept += 1;
            }
        }
        Ok(Cut {
            dropped_history: first_kept,
            input_tokens,
        })
    }

    /// The prompt for each target of `route`, in chain order; `None` for a
    /// target whose window the instructions and message do not fit (the
    /// reply skips it). `MessageTooLongForModel` when they fit none.
    pub fn prompts(
        self,
        route: &ModelRouteSpec,
        asked_output_tokens: Option<u32>,
    ) -> Result<Vec<Option<Prompt>>, Error> {
        let mut smallest_overflow: Option<(Overflow, u32)> = None;
        let cuts: Vec<Option<Cut>> = route
            .targets
            .iter()
            .map(|target| {
                let context_tokens = target.context_tokens();
                let fitted = self.cut(context_tokens, output_tokens(target, asked_output_tokens));
                if let Err(overflow) = fitted {
                    let over = overflow.needed_tokens.saturating_sub(context_tokens);
                    if smallest_overflow.is_none_or(|(smallest, window)| {
                        over < smallest.needed_tokens.saturating_sub(window)
                    }) {
                        smallest_overflow = Some((overflow, context_tokens));
                    }
                }
                fitted.ok()
            })
            .collect();
        match smallest_overflow {
            Some((overflow, context_tokens)) if cuts.iter().all(Option::is_none) => {
                Err(Error::MessageTooLongForModel {
                    needed_tokens: overflow.needed_tokens,
                    context_tokens,
                })
            }
            _ => {
                let Self {
                    instructions,
                    history,
                    message,
                } = self;
                let instructions = instructions.into();
                Ok(cuts
                    .into_iter()
                    .map(|cut| cut.map(|cut| cut.prompt(&instructions, &history, &message)))
                    .collect())
            }
        }
    }
}

/// How much of the history a target's window leaves out.
#[derive(Clone, Copy, Debug)]
struct Cut {
    /// The oldest turns of the history, not sent.
    dropped_history: usize,
    input_tokens: u32,
}

impl Cut {
    /// The prompt this cut leaves of a conversation, sharing its
    /// instructions, its history's segments and its message's text.
    fn prompt(
        self,
        instructions: &Arc<[ChatTurn]>,
        history: &History,
        message: &ChatTurn,
    ) -> Prompt {
        Prompt {
            turns: PromptTurns::new(
                Arc::clone(instructions),
                history.without_oldest(self.dropped_history),
                message.clone(),
            ),
            input_tokens: self.input_tokens,
        }
    }
}

/// The most output tokens a reply on `target` may generate: the target's
/// maximum, or fewer when the caller asked for fewer.
pub fn output_tokens(target: &RouteTarget, asked: Option<u32>) -> u32 {
    asked.map_or(target.max_output_tokens, |asked| {
        asked.min(target.max_output_tokens)
    })
}

/// How much of a session a reply of `message` on any of `routes` could
/// send: the history of the target with the most room left beside the
/// route's system prompt, the message and the reply's maximum, as bytes
/// (a turn costs at least a token per [`BYTES_PER_TOKEN`] bytes) and as
/// turns (each costs at least [`TOKENS_PER_TURN`]).
pub fn history_budget<'a>(
    routes: impl IntoIterator<Item = &'a ModelRouteSpec>,
    message: &ChatTurn,
    asked_output_tokens: Option<u32>,
) -> HistoryBudget {
    let history_tokens = routes
        .into_iter()
        .flat_map(|route| {
            let conversation = Conversation::new(
                route.system_prompt.as_deref(),
                Vec::new(),
                History::default(),
                message.clone(),
            );
            let fixed = conversation.fixed_tokens();
            route.targets.iter().map(move |target| {
                target
                    .context_tokens()
                    .saturating_sub(output_tokens(target, asked_output_tokens))
                    .saturating_sub(fixed)
            })
        })
        .max()
        .unwrap_or(0);
    HistoryBudget {
        max_messages: history_tokens / TOKENS_PER_TURN,
        max_bytes: u64::from(history_tokens) * BYTES_PER_TOKEN as u64,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A turn of exactly `tokens` estimated tokens (overhead included).
    fn turn(role: Role, tokens: u32) -> ChatTurn {
        let text = "x".repeat(((tokens - TOKENS_PER_TURN) as usize) * BYTES_PER_TOKEN);
        let turn = ChatTurn::new(role, text);
        assert_eq!(estimate_turn_tokens(&turn), tokens);
        turn
    }

    /// Ten turns of 10 tokens, user first, marked by their position.
    fn history() -> History {
        (0..10_u32)
            .map(|index| {
                let role = if index.is_multiple_of(2) {
                    Role::User
                } else {
                    Role::Assistant
                };
                let mut text = turn(role, 10).text.to_string();
                text.replace_range(0..1, &index.to_string());
                ChatTurn::new(role, text)
            })
            .collect()
    }

    /// The turns a prompt sends.
    fn sent(prompt: &Prompt) -> Vec<ChatTurn> {
        prompt.turns.iter().cloned().collect()
    }

    fn kept_history(prompt: &Prompt, instructions: usize) -> Vec<String> {
        let sent = sent(prompt);
        sent[instructions..sent.len() - 1]
            .iter()
            .map(|turn| turn.text[0..1].to_owned())
            .collect()
    }

    #[test]
    fn the_estimate_is_bytes_over_four_rounded_up_plus_the_turn_overhead() {
        assert_eq!(estimate_turn_tokens(&ChatTurn::new(Role::User, "")), 4);
        assert_eq!(estimate_turn_tokens(&ChatTurn::new(Role::User, "abcd")), 5);
        assert_eq!(estimate_turn_tokens(&ChatTurn::new(Role::User, "abcde")), 6);
        // Three bytes a character: counted by bytes, not characters.
        assert_eq!(estimate_turn_tokens(&ChatTurn::new(Role::User, "中文")), 6);
    }

    #[test]
    fn the_newest_turns_that_fit_are_kept_with_the_message() {
        let conversation = Conversation::new(None, Vec::new(), history(), turn(Role::User, 6));
        // 100 - 20 output = 80: the message (6) and seven turns (70) fit,
        // but the oldest of those is an answer, so six are kept.
        let prompt = conversation.fit(100, 20).unwrap();
        assert_eq!(kept_history(&prompt, 0), ["4", "5", "6", "7", "8", "9"]);
        assert_eq!(prompt.input_tokens, 66);
        assert_eq!(prompt.turns.iter().next_back(), Some(&conversation.message));
        assert_eq!(
            prompt.input_tokens,
            estimate_input_tokens(prompt.turns.iter())
        );
    }

    #[test]
    fn a_window_holding_everything_keeps_everything() {
        let conversation = Conversation::new(None, Vec::new(), history(), turn(Role::User, 6));
        // Exactly 100 + 6 + 20: nothing is dropped at the boundary...
        let prompt = conversation.fit(126, 20).unwrap();
        assert_eq!(prompt.turns.iter().count(), 11);
        assert_eq!(prompt.input_tokens, 106);
        // ...and one token less drops the oldest pair.
        let prompt = conversation.fit(125, 20).unwrap();
        assert_eq!(
            kept_history(&prompt, 0),
            ["2", "3", "4", "5", "6", "7", "8", "9"]
        );
    }

    #[test]
    fn the_system_prompt_and_instructions_are_counted_and_always_first() {
        let system = "x".repeat(40); // 10 + 4 tokens
        let instructions = vec![turn(Role::System, 12)];
        let conversation =
            Conversation::new(Some(&system), instructions, history(), turn(Role::User, 6));
        // 80 - 14 - 12 - 6 = 48: four turns fit.
        let prompt = conversation.fit(100, 20).unwrap();
        assert_eq!(sent(&prompt)[0], ChatTurn::new(Role::System, system));
        assert_eq!(sent(&prompt)[1].role, Role::System);
        assert_eq!(kept_history(&prompt, 2), ["6", "7", "8", "9"]);
        assert_eq!(prompt.input_tokens, 72);
    }

    #[test]
    fn the_message_alone_fits_exactly_or_overflows() {
        let conversation = Conversation::new(
            Some("be brief"),
            Vec::new(),
            history(),
            turn(Role::User, 50),
        );
        // System prompt 6 + message 50 + output 44 = 100: fits, no history.
        let prompt = conversation.fit(100, 44).unwrap();
        assert_eq!(prompt.turns.iter().count(), 2);
        assert_eq!(prompt.input_tokens, 56);
        assert_eq!(
            conversation.fit(100, 45),
            Err(Overflow { needed_tokens: 101 })
        );
    }

    #[test]
    fn a_history_that_cannot_start_with_a_user_turn_is_left_out() {
        let history = vec![turn(Role::User, 10), turn(Role::Assistant, 10)];
        let conversation =
            Conversation::new(None, Vec::new(), history.into(), turn(Role::User, 10));
        // Room for one turn: only the answer would fit, without its question.
        let prompt = conversation.fit(30, 5).unwrap();
        assert_eq!(sent(&prompt), std::slice::from_ref(&conversation.message));
        assert_eq!(prompt.input_tokens, 10);
    }

    fn route(windows: &[(u32, u32)]) -> ModelRouteSpec {
        let targets: Vec<serde_json::Value> = windows
            .iter()
            .enumerate()
            .map(|(index, (context, output))| {
                serde_json::json!({
                    "provider": "simulated", "model": format!("m{index}"),
                    "pricing": {"inputPer1k": 1, "outputPer1k": 1},
                    "maxOutputTokens": output, "contextTokens": context,
                })
            })
            .collect();
        serde_json::from_value(serde_json::json!({
            "alias": "r", "systemPrompt": "x".repeat(24), "targets": targets,
        }))
        .unwrap()
    }

    #[test]
    fn each_target_gets_its_own_prompt_and_one_too_small_is_skipped() {
        // System prompt 10 tokens, message 10.
        let route = route(&[(60, 20), (40, 20), (200, 100)]);
        let conversation = Conversation::new(
            route.system_prompt.as_deref(),
            Vec::new(),
            history(),
            turn(Role::User, 10),
        );
        let prompts = conversation.clone().prompts(&route, None).unwrap();
        let kept: Vec<Option<usize>> = prompts
            .iter()
            .map(|prompt| prompt.as_ref().map(|p| p.turns.iter().count()))
            .collect();
        // Room for history: 60 - 20 - 20 = 20, two turns; 40 - 20 - 20 = 0,
        // none (the message fits exactly); 200 - 100 - 20 = 80, eight.
        assert_eq!(kept, [Some(4), Some(2), Some(10)]);
        // The caller asking for fewer output tokens leaves more room.
        let prompts = conversation.clone().prompts(&route, Some(80)).unwrap();
        assert_eq!(
            prompts[2].as_ref().map(|p| p.turns.iter().count()),
            Some(12)
        );
        let tight = super::tests::route(&[(60, 20), (39, 20)]);
        let prompts = conversation.prompts(&tight, None).unwrap();
        assert!(prompts[0].is_some());
        assert_eq!(prompts[1], None);
    }

    #[test]
    fn a_message_fitting_no_target_is_refused_with_the_closest_window() {
        let route = route(&[(30, 20), (35, 20)]);
        let conversation = Conversation::new(
            route.system_prompt.as_deref(),
            Vec::new(),
            history(),
            turn(Role::User, 10),
        );
        match conversation.prompts(&route, None) {
            Err(Error::MessageTooLongForModel {
                needed_tokens,
                context_tokens,
            }) => assert_eq!((needed_tokens, context_tokens), (40, 35)),
            other => panic!("expected MessageTooLongForModel, got {other:?}"),
        }
    }

    #[test]
    fn the_history_budget_covers_what_the_roomiest_target_could_send() {
        let route = route(&[(60, 20), (200, 100)]);
        let message = turn(Role::User, 10);
        // 200 - 100 - 10 (system prompt) - 10 (message) = 80 tokens.
        let budget = history_budget([&route], &message, None);
        assert_eq!(
            budget,
            HistoryBudget {
                max_messages: 20,
                max_bytes: 320
            }
        );
        let none = history_budget([&route], &turn(Role::User, 500), None);
        assert_eq!(none, HistoryBudget::NONE);
    }
}
