//! Scoring a label against the neuron it describes, with the metrics that pass
//! NeuronEval's sanity checks (ICML 2025: F1, IoU, Pearson correlation and AUPRC; cosine
//! is Pearson's uncentred twin and adds nothing here) and CoSy's generated-image scores
//! (NeuronEval found AUC under top-plus-random sampling unreliable; CoSy's AUC compares
//! generated images with *random* controls, which is the sampling it kept).
//!
//! Every metric is a pure function of numbers the caller computed: the neuron's pooled
//! activation on each probe image, the label's predicted activation on each (its text
//! embedding against the image's), and the neuron's activations on images generated from
//! the label. Each comes with a percentile bootstrap interval over images.

use serde::{Deserialize, Serialize};

use crate::error::CoreError;
use crate::stats::{auc, pearson};

/// A metric of a label.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Metric {
    /// Pearson correlation of the predicted with the actual activation over the probe set
    /// (Linear Explanations' simulation score).
    Correlation,
    /// Average precision of the prediction at finding the neuron's top-q images.
    Auprc,
    /// F1 of the prediction's top-q images against the neuron's top-q images.
    F1,
    /// Intersection over union of the same two sets.
    Iou,
    /// CoSy: the probability that an image generated from the label activates the neuron
    /// more than a random probe image.
    CosyAuc,
    /// CoSy: the mean activation difference between generated and control images, in
    /// standard deviations of the controls.
    CosyMad,
}

impl Metric {
    pub const ALL: [Metric; 6] = [
        Metric::Correlation,
        Metric::Auprc,
        Metric::F1,
        Metric::Iou,
        Metric::CosyAuc,
        Metric::CosyMad,
    ];

    /// The name the `metric` column and the report use.
    pub const fn name(self) -> &'static str {
        match self {
            Metric::Correlation => "correlation",
            Metric::Auprc => "auprc",
            Metric::F1 => "f1",
            Metric::Iou => "iou",
            Metric::CosyAuc => "cosy_auc",
            Metric::CosyMad => "cosy_mad",
        }
    }

    /// Whether the metric needs the top-q threshold (one row per q).
    pub const fn uses_quantile(self) -> bool {
        matches!(self, Metric::Auprc | Metric::F1 | Metric::Iou)
    }
}

/// How labels are evaluated (`[evaluate]` in a job file).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct EvaluationConfig {
    /// Top shares of the probe set that count as "the neuron fires" for AUPRC, F1 and IoU.
    pub quantiles: Vec<f64>,
    /// Images generated from each label for CoSy (0 turns CoSy off).
    pub generated_images: usize,
    /// Random probe images the generated ones are compared with.
    pub control_images: usize,
    /// Bootstrap resamples per interval (0: no intervals).
    pub bootstrap: usize,
    /// Labels per neuron evaluated (its reported labels, best first).
    pub labels: usize,
}

impl Default for EvaluationConfig {
    fn default() -> Self {
        Self {
            quantiles: vec![0.005, 0.05],
            generated_images: 10,
            control_images: 100,
            bootstrap: 200,
            labels: 1,
        }
    }
}

impl EvaluationConfig {
    pub fn validate(&self) -> Result<(), CoreError> {
        if self.quantiles.is_empty() {
            return Err(CoreError::invalid("evaluate.quantiles", "give at least one, e.g. [0.05]"));
        }
        if let Some(q) = self.quantiles.iter().find(|q| !(**q > 0.0 && **q < 1.0)) {
            return Err(CoreError::invalid(
                "evaluate.quantiles",
                format!("{q} is not a share strictly between 0 and 1 (0.05 = the top 5%)"),
            ));
        }
        if self.generated_images > 0 && self.control_images == 0 {
            return Err(CoreError::invalid(
                "evaluate.control_images",
                "CoSy needs control images; set at least 1, or generated_images = 0",
            ));
        }
        if self.labels == 0 || self.labels > 3 {
            return Err(CoreError::invalid("evaluate.labels", "must be 1, 2 or 3"));
        }
        Ok(())
    }
}

/// One metric's value on one label.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct MetricValue {
    pub metric: Metric,
    /// The top share for AUPRC, F1 and IoU.
    pub quantile: Option<f64>,
    /// NaN when the inputs cannot define it (e.g. a constant prediction's correlation).
    pub value: f64,
    /// The bootstrap's 2.5% and 97.5% percentiles.
    pub interval: Option<(f64, f64)>,
    /// Images the value is computed on.
    pub images: usize,
}

/// What the metrics of one label need.
#[derive(Debug, Clone, Copy)]
pub struct LabelEvidence<'a> {
    /// The neuron's pooled activation on every probe image.
    pub activations: &'a [f64],
    /// The label's predicted activation on the same images, in the same order.
    pub predicted: &'a [f64],
    /// The neuron's activation on images generated from the label (empty: no CoSy).
    pub generated: &'a [f64],
    /// Indices into the probe set of the CoSy control images.
    pub controls: &'a [usize],
}

/// Every metric of one label. `seed` makes the bootstrap reproducible.
pub fn evaluate_label(
    evidence: &LabelEvidence<'_>,
    config: &EvaluationConfig,
    seed: u64,
) -> Vec<MetricValue> {
    let n = evidence.activations.len().min(evidence.predicted.len());
    let (actual, predicted) = (&evidence.activations[..n], &evidence.predicted[..n]);
    let mut out = Vec::new();
    let all: Vec<usize> = (0..n).collect();
    let mut rng = SplitMix(seed);
    let mut value = |metric, quantile, f: &dyn Fn(&[usize]) -> f64, rng: &mut SplitMix| {
        let interval = bootstrap(n, config.bootstrap, rng, f);
        out.push(MetricValue { metric, quantile, value: f(&all), interval, images: n });
    };
    value(
        Metric::Correlation,
        None,
        &|idx| pearson(&pick(predicted, idx), &pick(actual, idx)),
        &mut rng,
    );
    for &q in &config.quantiles {
        value(
            Metric::Auprc,
            Some(q),
            &|idx| auprc(&pick(predicted, idx), &top_share(&pick(actual, idx), q)),
            &mut rng,
        );
        value(
            Metric::F1,
            Some(q),
            &|idx| overlap(&pick(predicted, idx), &pick(actual, idx), q).0,
            &mut rng,
        );
        value(
            Metric::Iou,
            Some(q),
            &|idx| overlap(&pick(predicted, idx), &pick(actual, idx), q).1,
            &mut rng,
        );
    }
    if !evidence.generated.is_empty() && !evidence.controls.is_empty() {
        let controls: Vec<f64> =
            evidence.controls.iter().filter_map(|&i| actual.get(i).copied()).collect();
        let generated = evidence.generated;
        let images = generated.len() + controls.len();
        for (metric, f) in
            [(Metric::CosyAuc, auc as fn(&[f64], &[f64]) -> f64), (Metric::CosyMad, mad)]
        {
            let interval = bootstrap_two(generated, &controls, config.bootstrap, &mut rng, f);
            out.push(MetricValue {
                metric,
                quantile: None,
                value: f(generated, &controls),
                interval,
                images,
            });
        }
    }
    out
}

fn pick(values: &[f64], idx: &[usize]) -> Vec<f64> {
    idx.iter().map(|&i| values[i]).collect()
}

/// Which values are in the top `share` (at least one; ties broken by position, so the set
/// has exactly that many members).
pub fn top_share(values: &[f64], share: f64) -> Vec<bool> {
    let k = ((values.len() as f64 * share).round() as usize).clamp(1, values.len().max(1));
    let mut order: Vec<usize> = (0..values.len()).collect();
    order.sort_by(|&a, &b| values[b].total_cmp(&values[a]).then(a.cmp(&b)));
    let mut member = vec![false; values.len()];
    for &i in order.iter().take(k) {
        member[i] = true;
    }
    member
}

/// Average precision of `scores` at retrieving `positive` (ties ranked pessimistically, so
/// a constant score gets the base rate, not a lucky order). NaN without positives.
pub fn auprc(scores: &[f64], positive: &[bool]) -> f64 {
    let total = positive.iter().filter(|&&p| p).count();
    if total == 0 {
        return f64::NAN;
    }
    let mut order: Vec<usize> = (0..scores.len()).collect();
    // Within a tie, negatives first: the pessimistic order.
    order.sort_by(|&a, &b| scores[b].total_cmp(&scores[a]).then(positive[a].cmp(&positive[b])));
    let (mut hits, mut sum) = (0usize, 0.0);
    for (rank, &i) in order.iter().enumerate() {
        if positive[i] {
            hits += 1;
            sum += hits as f64 / (rank + 1) as f64;
        }
    }
    sum / total as f64
}

/// F1 and IoU of the prediction's top-q set against the neuron's top-q set. Both sets have
/// the same size, so F1 is also precision and recall.
pub fn overlap(predicted: &[f64], actual: &[f64], share: f64) -> (f64, f64) {
    let (p, a) = (top_share(predicted, share), top_share(actual, share));
    let both = p.iter().zip(&a).filter(|(x, y)| **x && **y).count() as f64;
    let (np, na) =
        (p.iter().filter(|&&x| x).count() as f64, a.iter().filter(|&&x| x).count() as f64);
    if np + na == 0.0 {
        return (f64::NAN, f64::NAN);
    }
    (2.0 * both / (np + na), both / (np + na - both))
}

/// CoSy's mean activation difference: `(mean(generated) - mean(controls)) / std(controls)`.
/// NaN when the controls are constant or fewer than two.
pub fn mad(generated: &[f64], controls: &[f64]) -> f64 {
    if generated.is_empty() || controls.len() < 2 {
        return f64::NAN;
    }
    let mean = |v: &[f64]| v.iter().sum::<f64>() / v.len() as f64;
    let mc = mean(controls);
    let var = controls.iter().map(|c| (c - mc).powi(2)).sum::<f64>() / (controls.len() - 1) as f64;
    if var <= 0.0 { f64::NAN } else { (mean(generated) - mc) / var.sqrt() }
}

/// A 95% percentile interval of `f` over `resamples` resamplings (with replacement) of
/// `n` images; `None` when there is nothing to resample.
fn bootstrap(
    n: usize,
    resamples: usize,
    rng: &mut SplitMix,
    f: &dyn Fn(&[usize]) -> f64,
) -> Option<(f64, f64)> {
    if n < 2 || resamples == 0 {
        return None;
    }
    let values = (0..resamples)
        .map(|_| {
            let idx: Vec<usize> = (0..n).map(|_| rng.below(n)).collect();
            f(&idx)
        })
        .collect();
    percentiles(values)
}

/// [`bootstrap`] for a two-sample statistic: each sample resampled on its own.
fn bootstrap_two(
    a: &[f64],
    b: &[f64],
    resamples: usize,
    rng: &mut SplitMix,
    f: fn(&[f64], &[f64]) -> f64,
) -> Option<(f64, f64)> {
    if a.is_empty() || b.len() < 2 || resamples == 0 {
        return None;
    }
    let values = (0..resamples)
        .map(|_| {
            let ra: Vec<f64> = (0..a.len()).map(|_| a[rng.below(a.len())]).collect();
            let rb: Vec<f64> = (0..b.len()).map(|_| b[rng.below(b.len())]).collect();
            f(&ra, &rb)
        })
        .collect();
    percentiles(values)
}

fn percentiles(mut values: Vec<f64>) -> Option<(f64, f64)> {
    values.retain(|v| v.is_finite());
    if values.is_empty() {
        return None;
    }
    values.sort_by(f64::total_cmp);
    let at = |p: f64| values[((values.len() - 1) as f64 * p).round() as usize];
    Some((at(0.025), at(0.975)))
}

/// `count` distinct indices below `n` drawn with `seed` (all of them when `count >= n`),
/// sorted: the CoSy control images.
pub fn sample_indices(n: usize, count: usize, seed: u64) -> Vec<usize> {
    let mut all: Vec<usize> = (0..n).collect();
    let mut rng = SplitMix(seed);
    let take = count.min(n);
    for i in 0..take {
        let j = i + rng.below(n - i);
        all.swap(i, j);
    }
    all.truncate(take);
    all.sort_unstable();
    all
}

/// SplitMix64: a tiny seeded generator, enough for resampling (keeps this crate free of
/// dependencies).
struct SplitMix(u64);

impl SplitMix {
    fn next(&mut self) -> u64 {
        self.0 = self.0.wrapping_add(0x9e37_79b9_7f4a_7c15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
        z ^ (z >> 31)
    }

    fn below(&mut self, n: usize) -> usize {
        (self.next() % n as u64) as usize
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn config(bootstrap: usize) -> EvaluationConfig {
        EvaluationConfig { quantiles: vec![0.1], bootstrap, ..EvaluationConfig::default() }
    }

    fn value(values: &[MetricValue], metric: Metric) -> f64 {
        values.iter().find(|v| v.metric == metric).unwrap().value
    }

    #[test]
    fn a_perfect_prediction_scores_one_and_a_reversed_one_scores_low() {
        let actual: Vec<f64> = (0..100).map(f64::from).collect();
        let reversed: Vec<f64> = actual.iter().map(|a| -a).collect();
        let controls = sample_indices(100, 20, 1);
        let good = evaluate_label(
            &LabelEvidence {
                activations: &actual,
                predicted: &actual,
                generated: &[150.0; 5],
                controls: &controls,
            },
            &config(50),
            7,
        );
        assert!((value(&good, Metric::Correlation) - 1.0).abs() < 1e-12);
        assert_eq!(value(&good, Metric::Auprc), 1.0);
        assert_eq!(value(&good, Metric::F1), 1.0);
        assert_eq!(value(&good, Metric::Iou), 1.0);
        assert_eq!(value(&good, Metric::CosyAuc), 1.0);
        assert!(value(&good, Metric::CosyMad) > 2.0);
        let bad = evaluate_label(
            &LabelEvidence {
                activations: &actual,
                predicted: &reversed,
                generated: &[-1.0; 5],
                controls: &controls,
            },
            &config(50),
            7,
        );
        assert!((value(&bad, Metric::Correlation) + 1.0).abs() < 1e-12);
        assert!(value(&bad, Metric::Auprc) < 0.1);
        assert_eq!(value(&bad, Metric::F1), 0.0);
        assert_eq!(value(&bad, Metric::Iou), 0.0);
        assert_eq!(value(&bad, Metric::CosyAuc), 0.0);
        // Intervals bracket the value and are reproducible from the seed.
        for v in &good {
            let (lo, hi) = v.interval.unwrap();
            assert!(lo <= hi, "{v:?}");
        }
        let again = evaluate_label(
            &LabelEvidence {
                activations: &actual,
                predicted: &actual,
                generated: &[150.0; 5],
                controls: &controls,
            },
            &config(50),
            7,
        );
        assert_eq!(good, again);
    }

    #[test]
    fn auprc_of_a_constant_score_is_the_base_rate_not_a_lucky_order() {
        let positive = [true, false, false, false];
        assert_eq!(auprc(&[1.0; 4], &positive), 0.25);
        assert_eq!(auprc(&[4.0, 3.0, 2.0, 1.0], &positive), 1.0);
        assert!(auprc(&[1.0; 3], &[false; 3]).is_nan());
    }

    #[test]
    fn overlap_counts_shared_top_images() {
        // Top 2 of each: predicted {0, 1}, actual {1, 2}: one shared.
        let (f1, iou) = overlap(&[4.0, 3.0, 1.0, 0.0], &[0.0, 5.0, 4.0, 1.0], 0.5);
        assert!((f1 - 0.5).abs() < 1e-12);
        assert!((iou - 1.0 / 3.0).abs() < 1e-12);
    }

    #[test]
    fn mad_is_in_control_standard_deviations() {
        let controls = [0.0, 2.0]; // mean 1, sample std sqrt(2)
        assert!((mad(&[1.0 + 2f64.sqrt()], &controls) - 1.0).abs() < 1e-12);
        assert!(mad(&[1.0], &[3.0, 3.0]).is_nan());
    }

    #[test]
    fn control_samples_are_distinct_sorted_and_seeded() {
        let s = sample_indices(50, 10, 3);
        assert_eq!(s.len(), 10);
        assert!(s.windows(2).all(|w| w[0] < w[1]));
        assert_eq!(s, sample_indices(50, 10, 3));
        assert_ne!(s, sample_indices(50, 10, 4));
        assert_eq!(sample_indices(5, 10, 3), vec![0, 1, 2, 3, 4]);
    }

    #[test]
    fn bad_settings_are_refused_with_the_fix() {
        let mut c = EvaluationConfig::default();
        assert!(c.validate().is_ok());
        c.quantiles = vec![5.0];
        assert!(c.validate().unwrap_err().to_string().contains("top 5%"));
        c.quantiles = vec![0.05];
        c.control_images = 0;
        assert!(c.validate().unwrap_err().to_string().contains("control_images"));
    }
}
