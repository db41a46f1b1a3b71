//! What the content policy engine adds to a reply: a 2,000-token reply (one
//! token per chunk, as models stream) through the output filter of a
//! school's policy, against the same reply with no policy, in one run.
//! Run: `cargo bench -p parley-service --bench policy`. It prints:
//! - the time to the first character shown (the engine holds back only what
//!   could still begin a match, so this is the added time-to-first-token);
//! - the whole reply's filtering time, and per chunk;
//! - checking a 2,000-token user message before it is sent.
//!
//! In-process and single-threaded: the figures are the engine's own CPU,
//! with no network or model in them.
#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::hint::black_box;
use std::time::{Duration, Instant};

use parley_crds::RoutesFile;
use parley_service::policy::{Filtered, OutputFilter, PolicyBook, ReplyPolicy};

/// A school's policy: words blocked and masked, identifiers masked by
/// pattern, a length limit on messages, and a cohort's own word list.
const ROUTES: &str = r"
cohortPolicies:
  - cohorts: [grade-5]
    rules:
      - {name: mild, words: [heck, darn, shoot, crud, dang], action: mask}
routes:
  - alias: default
    contentPolicy:
      rules:
        - {name: ssn, pattern: '\b\d{3}-\d{2}-\d{4}\b', action: mask}
        - {name: email, pattern: '\b[A-Za-z0-9._%+-]{1,64}@[A-Za-z0-9.-]{1,253}\.[A-Za-z]{2,24}\b', action: mask}
        - {name: phone, pattern: '\b\d{3}[ .-]\d{3}[ .-]\d{4}\b', action: mask}
        - {name: weapons, words: [nitroglycerin, pipe bomb, thermite, napalm, detonator], reason: Not here.}
        - {name: cheating, words: [answer key, test answers], direction: input}
        - {name: length, maxLength: 20000, direction: input}
    targets:
      - {provider: simulated, model: s, pricing: {inputPer1k: 1, outputPer1k: 1}, maxOutputTokens: 4096}
";

const REPLY_TOKENS: usize = 2_000;
const ROUNDS: usize = 200;

/// A plausible reply: words, numbers and punctuation, a few masked items.
fn reply_chunks() -> Vec<String> {
    let words = [
        " The",
        " answer",
        " depends",
        " on",
        " the",
        " heck",
        " experiment",
        ";",
        " call",
        " 555-123-4567",
        " or",
        " write",
        " to",
        " teacher@school.edu",
        ".",
        " Numbers",
        " like",
        " 123-45-6789",
        " are",
        " private",
        ",",
        " darn",
        " it",
        "!",
    ];
    (0..REPLY_TOKENS)
        .map(|index| words[index % words.len()].to_owned())
        .collect()
}

struct Run {
    first_shown: Duration,
    whole: Duration,
    shown_bytes: usize,
}

fn filter_reply(policy: &ReplyPolicy, chunks: &[String]) -> Run {
    let started = Instant::now();
    let mut filter = OutputFilter::new(policy);
    let mut first_shown = None;
    let mut shown_bytes = 0;
    for chunk in chunks {
        match filter.push(chunk.clone()) {
            Filtered::Text(text) => {
                if !text.is_empty() && first_shown.is_none() {
                    first_shown = Some(started.elapsed());
                }
                shown_bytes += text.len();
            }
            Filtered::Blocked { .. } => panic!("the bench reply has nothing to block"),
        }
    }
    if let Filtered::Text(text) = filter.finish() {
        shown_bytes += text.len();
    }
    let whole = started.elapsed();
    Run {
        first_shown: first_shown.unwrap_or(whole),
        whole,
        shown_bytes: black_box(shown_bytes),
    }
}

fn median(mut samples: Vec<Duration>) -> Duration {
    samples.sort();
    samples[samples.len() / 2]
}

fn measure(policy: &ReplyPolicy, chunks: &[String]) -> (Duration, Duration, usize) {
    let runs: Vec<Run> = (0..ROUNDS).map(|_| filter_reply(policy, chunks)).collect();
    let shown = runs[0].shown_bytes;
    let first = median(runs.iter().map(|run| run.first_shown).collect());
    let whole = median(runs.iter().map(|run| run.whole).collect());
    (first, whole, shown)
}

fn micros(duration: Duration) -> f64 {
    duration.as_secs_f64() * 1e6
}

fn main() {
    let file = RoutesFile::from_yaml(ROUTES).unwrap();
    file.validate().unwrap();
    let book = PolicyBook::compile(&file).unwrap();
    let cohorts = ["grade-5".to_owned()];
    let policed = book.for_reply("default", &cohorts);
    let open = PolicyBook::default().for_reply("default", &[]);
    let chunks = reply_chunks();
    let reply_bytes: usize = chunks.iter().map(String::len).sum();

    let (open_first, open_whole, open_shown) = measure(&open, &chunks);
    let (first, whole, shown) = measure(&policed, &chunks);
    assert_eq!(open_shown, reply_bytes);
    println!(
        "content policy on a {REPLY_TOKENS}-token reply ({reply_bytes} bytes, one token a chunk; \
         {} rules; median of {ROUNDS} runs)",
        policed.output_rules().count()
    );
    println!("| | no policy | school policy | added |");
    println!("|---|---|---|---|");
    println!(
        "| first text shown | {:.1} µs | {:.1} µs | +{:.1} µs |",
        micros(open_first),
        micros(first),
        micros(first.saturating_sub(open_first))
    );
    println!(
        "| whole reply | {:.1} µs | {:.1} µs | +{:.1} µs ({:.2} µs per chunk) |",
        micros(open_whole),
        micros(whole),
        micros(whole.saturating_sub(open_whole)),
        micros(whole.saturating_sub(open_whole)) / REPLY_TOKENS as f64
    );
    println!("shown after masking: {shown} of {reply_bytes} bytes");

    let message: String = chunks.concat();
    let checks: Vec<Duration> = (0..ROUNDS)
        .map(|_| {
            let started = Instant::now();
            let masked = policed.check_input(black_box(&message)).unwrap();
            black_box(masked);
            started.elapsed()
        })
        .collect();
    println!(
        "checking a {REPLY_TOKENS}-token user message: {:.1} µs",
        micros(median(checks))
    );
}
