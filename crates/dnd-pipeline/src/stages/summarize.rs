//! Stage 2, second half: a neuron's captions to candidate concepts. Each caption is
//! simplified to a short label, then the labels are summarised over seeded rounds
//! (`dnd_summarize`); every exchange is kept for the results.

use dnd_summarize::{Exchange, Step, Summarizer, simplify_captions, summarize_rounds};

/// What stage 2 made of one neuron.
#[derive(Debug, Default)]
pub struct Labelling {
    pub exchanges: Vec<Exchange>,
    /// Simplified label of each top image's caption, in top-image order.
    pub simplified: Vec<Option<String>>,
    pub candidates: Vec<String>,
    /// Why the summariser failed, when it did (the neuron is then `failed`).
    pub failure: Option<String>,
}

/// Simplifies each of a neuron's captions, then summarises the labels over `rounds`
/// seeded shuffles. A failure is recorded in the result, not returned: it fails this
/// neuron only.
pub async fn label_neuron(
    summarizer: &dyn Summarizer,
    captions: &[String],
    seed: u64,
    rounds: usize,
) -> Labelling {
    let mut out = Labelling::default();
    match simplify_captions(summarizer, captions).await {
        Ok(simplified) => {
            // Map labels back to captions: an exchange per caption, plus merges.
            out.simplified = per_caption_labels(&simplified.exchanges, captions.len());
            out.exchanges = simplified.exchanges;
            if !simplified.labels.is_empty() {
                match summarize_rounds(summarizer, &simplified.labels, seed, rounds).await {
                    Ok(rounds) => {
                        out.exchanges.extend(rounds.exchanges);
                        out.candidates = rounds.labels;
                    }
                    Err(e) => out.failure = Some(e.to_string()),
                }
            }
        }
        Err(e) => out.failure = Some(e.to_string()),
    }
    out
}

/// The label each caption got: the simplify exchange's label, or the merge that followed
/// a listing reply. `simplify_captions` asks once per caption, in order.
fn per_caption_labels(exchanges: &[Exchange], captions: usize) -> Vec<Option<String>> {
    let mut labels: Vec<Option<String>> = Vec::with_capacity(captions);
    for e in exchanges {
        match e.step {
            Step::Simplify => labels.push(e.label().map(String::from)),
            Step::Merge => {
                if let Some(last) = labels.last_mut() {
                    *last = e.label().map(String::from);
                }
            }
            Step::Summarize => {}
        }
    }
    labels.resize(captions, None);
    labels
}

#[cfg(test)]
mod tests {
    use super::*;
    use dnd_summarize::{Backend, SummarizerConfig};

    fn consensus() -> Box<dyn Summarizer> {
        let config = SummarizerConfig { backend: Backend::Consensus, ..Default::default() };
        dnd_summarize::build(&config).unwrap()
    }

    #[tokio::test]
    async fn captions_become_candidates_with_every_exchange_kept() {
        let summarizer = consensus();
        let captions: Vec<String> =
            ["a red circle on a plain background", "a red square", "two red stars"]
                .map(String::from)
                .into();
        let labelling = label_neuron(summarizer.as_ref(), &captions, 0, 5).await;
        assert!(labelling.failure.is_none(), "{:?}", labelling.failure);
        assert_eq!(labelling.simplified.len(), captions.len());
        assert!(labelling.simplified.iter().all(Option::is_some), "{:?}", labelling.simplified);
        assert!(!labelling.candidates.is_empty());
        assert!(
            labelling.candidates.iter().any(|c| c.contains("red")),
            "{:?}",
            labelling.candidates
        );
        let simplify = labelling.exchanges.iter().filter(|e| e.step == Step::Simplify).count();
        assert_eq!(simplify, captions.len());
        assert!(labelling.exchanges.iter().any(|e| e.step == Step::Summarize));
    }

    #[tokio::test]
    async fn no_captions_no_candidates_and_no_failure() {
        let labelling = label_neuron(consensus().as_ref(), &[], 0, 5).await;
        assert!(labelling.candidates.is_empty() && labelling.failure.is_none());
        assert!(labelling.simplified.is_empty());
    }
}
