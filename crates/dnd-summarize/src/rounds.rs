//! Stage 2 as the method runs it: simplify every caption, then summarise the labels over
//! several seeded shuffles, feeding a reply that lists several labels back once to merge.

use rand::SeedableRng;
use rand::seq::SliceRandom;
use rand_chacha::ChaCha8Rng;
use serde::{Deserialize, Serialize};

use crate::candidates::normalize_candidates;
use crate::error::SummarizeError;
use crate::reply::Answer;
use crate::{Exchange, Summarizer};

/// The method asks for a summary five times.
pub const DEFAULT_ROUNDS: usize = 5;

/// What a stage-2 step produced: every exchange in the order it happened, and the labels
/// it settled on.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Labelled {
    pub exchanges: Vec<Exchange>,
    pub labels: Vec<String>,
}

/// Simplifies each caption to a label, in caption order. A caption whose reply gives no
/// usable label (even after one merge) contributes no label; its exchanges are kept.
pub async fn simplify_captions(
    summarizer: &dyn Summarizer,
    captions: &[String],
) -> Result<Labelled, SummarizeError> {
    let mut exchanges = Vec::new();
    let mut labels = Vec::new();
    for caption in captions {
        let first = summarizer.simplify(caption).await?;
        if let Some(label) = settle(summarizer, first, &mut exchanges).await? {
            labels.push(label);
        }
    }
    Ok(Labelled { exchanges, labels })
}

/// The method's summary rounds. Round `i` shuffles the labels with a ChaCha8 generator
/// seeded with `seed` (one generator for all rounds, so round orders differ but a run is
/// reproducible), asks for one summary label, and merges a listing reply once. The
/// returned labels are the normalised candidates ([`normalize_candidates`]); a round whose
/// reply gives no label adds none, so all rounds failing gives no candidates, not an error.
pub async fn summarize_rounds(
    summarizer: &dyn Summarizer,
    labels: &[String],
    seed: u64,
    rounds: usize,
) -> Result<Labelled, SummarizeError> {
    if rounds == 0 {
        return Err(SummarizeError::invalid("rounds", "ask for at least one summary round"));
    }
    let mut rng = ChaCha8Rng::seed_from_u64(seed);
    let mut order = labels.to_vec();
    let mut exchanges = Vec::new();
    let mut round_labels = Vec::new();
    for _ in 0..rounds {
        order.shuffle(&mut rng);
        let first = summarizer.summarize(&order).await?;
        if let Some(label) = settle(summarizer, first, &mut exchanges).await? {
            round_labels.push(label);
        }
    }
    Ok(Labelled { exchanges, labels: normalize_candidates(&round_labels) })
}

/// Records `first` and returns its label; a reply listing several labels is merged once.
async fn settle(
    summarizer: &dyn Summarizer,
    first: Exchange,
    exchanges: &mut Vec<Exchange>,
) -> Result<Option<String>, SummarizeError> {
    let listed = match &first.answer {
        Ok(Answer::Several(items)) => Some(items.clone()),
        _ => None,
    };
    let mut label = first.label().map(str::to_string);
    exchanges.push(first);
    if let Some(items) = listed {
        let merged = summarizer.merge(&items).await?;
        label = merged.label().map(str::to_string);
        exchanges.push(merged);
    }
    Ok(label)
}

#[cfg(test)]
mod tests {
    use std::collections::VecDeque;
    use std::sync::Mutex;

    use async_trait::async_trait;

    use super::*;
    use crate::error::ReplyError;
    use crate::{Step, require_labels};

    /// Answers from a script and records what it was asked.
    #[derive(Default)]
    struct Scripted {
        answers: Mutex<VecDeque<Result<Answer, ReplyError>>>,
        asked: Mutex<Vec<(Step, Vec<String>)>>,
    }

    impl Scripted {
        fn new(answers: Vec<Result<Answer, ReplyError>>) -> Self {
            Scripted { answers: Mutex::new(answers.into()), ..Default::default() }
        }

        fn answer(&self, step: Step, input: Vec<String>) -> Result<Exchange, SummarizeError> {
            let answer = self
                .answers
                .lock()
                .unwrap()
                .pop_front()
                .unwrap_or(Ok(Answer::Label("same".into())));
            self.asked.lock().unwrap().push((step, input.clone()));
            Ok(Exchange {
                step,
                backend: "scripted".into(),
                model: "script".into(),
                prompt_version: "test".into(),
                request: input.join("\n"),
                reply: format!("{answer:?}"),
                answer,
                cached: false,
            })
        }

        fn orders(&self) -> Vec<Vec<String>> {
            self.asked.lock().unwrap().iter().map(|(_, input)| input.clone()).collect()
        }
    }

    #[async_trait]
    impl Summarizer for Scripted {
        async fn simplify(&self, caption: &str) -> Result<Exchange, SummarizeError> {
            self.answer(Step::Simplify, vec![caption.to_string()])
        }
        async fn summarize(&self, labels: &[String]) -> Result<Exchange, SummarizeError> {
            require_labels(labels)?;
            self.answer(Step::Summarize, labels.to_vec())
        }
        async fn merge(&self, labels: &[String]) -> Result<Exchange, SummarizeError> {
            self.answer(Step::Merge, labels.to_vec())
        }
        fn describe(&self) -> String {
            "scripted".into()
        }
    }

    fn labels(n: usize) -> Vec<String> {
        (0..n).map(|i| format!("label {i}")).collect()
    }

    fn label(text: &str) -> Result<Answer, ReplyError> {
        Ok(Answer::Label(text.into()))
    }

    fn several(items: &[&str]) -> Result<Answer, ReplyError> {
        Ok(Answer::Several(items.iter().map(|s| s.to_string()).collect()))
    }

    #[tokio::test]
    async fn shuffles_are_reproducible_per_seed_and_differ_between_rounds() {
        let input = labels(10);
        let run = |seed| {
            let input = input.clone();
            async move {
                let scripted = Scripted::default();
                let out = summarize_rounds(&scripted, &input, seed, DEFAULT_ROUNDS).await.unwrap();
                assert_eq!(out.exchanges.len(), DEFAULT_ROUNDS);
                assert_eq!(out.labels, ["same"], "equal round labels become one candidate");
                scripted.orders()
            }
        };
        let first = run(42).await;
        assert_eq!(first, run(42).await, "the same seed gives the same orders");
        assert_ne!(first, run(43).await, "another seed gives other orders");
        for order in &first {
            let mut sorted = order.clone();
            sorted.sort();
            assert_eq!(sorted, input, "each round sees every label once");
        }
        assert!(
            first.windows(2).all(|w| w[0] != w[1]),
            "consecutive rounds see different orders: {first:?}"
        );
    }

    #[tokio::test]
    async fn a_listing_reply_is_merged_once_and_failed_rounds_add_no_candidate() {
        let scripted = Scripted::new(vec![
            several(&["red circles", "blue squares"]),
            label("Colored shapes."),
            Err(ReplyError::TooManyWords { words: 9, max: 5 }),
            several(&["dog face", "cat face"]),
            several(&["still", "two"]),
            label("Floral Design"),
        ]);
        let out = summarize_rounds(&scripted, &labels(4), 0, 4).await.unwrap();
        let steps: Vec<Step> = out.exchanges.iter().map(|e| e.step).collect();
        use Step::{Merge, Summarize};
        assert_eq!(steps, [Summarize, Merge, Summarize, Summarize, Merge, Summarize]);
        assert_eq!(
            scripted.orders()[1],
            ["red circles", "blue squares"],
            "the merge gets the listed labels"
        );
        assert_eq!(out.labels, ["colored shapes", "floral design", "floral design background"]);
    }

    #[tokio::test]
    async fn simplify_captions_keeps_caption_order_and_skips_unusable_replies() {
        let scripted = Scripted::new(vec![
            label("red circle"),
            Err(ReplyError::Empty),
            several(&["a", "b"]),
            label("a and b"),
            label("dots"),
        ]);
        let captions: Vec<String> = ["c1", "c2", "c3", "c4"].map(String::from).to_vec();
        let out = simplify_captions(&scripted, &captions).await.unwrap();
        assert_eq!(out.labels, ["red circle", "a and b", "dots"]);
        assert_eq!(out.exchanges.len(), 5);
    }

    #[tokio::test]
    async fn bad_arguments_are_user_errors() {
        let scripted = Scripted::default();
        assert!(summarize_rounds(&scripted, &labels(3), 0, 0).await.unwrap_err().is_user_error());
        assert!(summarize_rounds(&scripted, &[], 0, 5).await.unwrap_err().is_user_error());
    }
}
