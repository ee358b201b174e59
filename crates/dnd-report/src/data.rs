//! The results tables of a job, grouped by neuron.

use std::collections::BTreeMap;

use serde::de::DeserializeOwned;

use dnd_core::{LayerName, NeuronId};
use dnd_store::results::{
    CandidateRow, CaptionRow, DescriptionRow, EvaluationRow, ExchangeRow, ImageRow, NeuronErrorRow,
    ResultTable, ScoreRow,
};
use dnd_store::{StoreError, batches_rows, read_parquet};

use crate::{Job, ReportError};

/// Everything the results say about one neuron.
#[derive(Debug, Clone)]
pub struct NeuronData {
    pub description: DescriptionRow,
    pub candidates: Vec<CandidateRow>,
    pub scores: Vec<ScoreRow>,
    pub captions: Vec<CaptionRow>,
    pub images: Vec<ImageRow>,
    pub exchanges: Vec<ExchangeRow>,
    pub errors: Vec<NeuronErrorRow>,
    /// Its labels' evaluation (empty when the job was not evaluated).
    pub evaluation: Vec<EvaluationRow>,
}

/// A job's results, neurons in the job's layer order, then by neuron.
#[derive(Debug, Clone)]
pub struct JobResults {
    pub neurons: Vec<NeuronData>,
    /// Layers in the job's order.
    pub layers: Vec<String>,
    /// Rows of `errors` in all.
    pub errors: usize,
}

async fn table<T: DeserializeOwned>(job: &Job, table: ResultTable) -> Result<Vec<T>, ReportError> {
    let relative = dnd_pipeline::JobDir::results_path(table);
    let wrap = |source: StoreError| ReportError::Table {
        location: job.location.display_path(&relative),
        source,
    };
    if !job.location.exists(&relative).await? {
        return Err(ReportError::NoResults {
            location: job.location.to_string(),
            missing: job.location.display_path(&relative),
        });
    }
    let batches = read_parquet(&job.location, &relative).await.map_err(wrap)?;
    batches_rows(table.name(), &batches).map_err(wrap)
}

/// Reads every results table of `job`.
pub async fn read_results(job: &Job) -> Result<JobResults, ReportError> {
    let descriptions: Vec<DescriptionRow> = table(job, ResultTable::Descriptions).await?;
    let candidates: Vec<CandidateRow> = table(job, ResultTable::Candidates).await?;
    let scores: Vec<ScoreRow> = table(job, ResultTable::Scores).await?;
    let captions: Vec<CaptionRow> = table(job, ResultTable::Captions).await?;
    let images: Vec<ImageRow> = table(job, ResultTable::Images).await?;
    let exchanges: Vec<ExchangeRow> = table(job, ResultTable::Exchanges).await?;
    let errors: Vec<NeuronErrorRow> = table(job, ResultTable::Errors).await?;
    // Jobs written before the evaluation table existed have none.
    let evaluated = dnd_pipeline::JobDir::results_path(ResultTable::Evaluation);
    let evaluation: Vec<EvaluationRow> = if job.location.exists(&evaluated).await? {
        table(job, ResultTable::Evaluation).await?
    } else {
        Vec::new()
    };

    let mut layers: Vec<String> = job.spec.target.layers.clone();
    for d in &descriptions {
        if !layers.iter().any(|l| *l == *d.layer) {
            layers.push(d.layer.to_string());
        }
    }
    let layer_index = |l: &str| layers.iter().position(|x| x == l).unwrap_or(usize::MAX);
    // Keys sort by layer order: prefix the layer's position so the BTreeMap keeps it.
    let mut neurons: BTreeMap<(LayerName, NeuronId), NeuronData> = BTreeMap::new();
    let mut order: BTreeMap<(usize, NeuronId), (LayerName, NeuronId)> = BTreeMap::new();
    for d in descriptions {
        let key = (d.layer.clone(), d.neuron);
        order.insert((layer_index(&d.layer), d.neuron), key.clone());
        neurons.insert(
            key,
            NeuronData {
                description: d,
                candidates: Vec::new(),
                scores: Vec::new(),
                captions: Vec::new(),
                images: Vec::new(),
                exchanges: Vec::new(),
                errors: Vec::new(),
                evaluation: Vec::new(),
            },
        );
    }
    let error_count = errors.len();
    macro_rules! attach {
        ($rows:expr, $field:ident) => {
            for row in $rows {
                if let Some(n) = neurons.get_mut(&(row.layer.clone(), row.neuron)) {
                    n.$field.push(row);
                }
            }
        };
    }
    attach!(candidates, candidates);
    attach!(scores, scores);
    attach!(captions, captions);
    attach!(images, images);
    attach!(exchanges, exchanges);
    attach!(errors, errors);
    attach!(evaluation, evaluation);
    for n in neurons.values_mut() {
        n.candidates.sort_by_key(|c| (c.final_rank, c.candidate));
        n.scores.sort_by_key(|s| (s.final_rank, s.candidate));
        n.captions.sort_by_key(|c| c.image_rank);
        n.images.sort_by(|a, b| a.kind.cmp(&b.kind).then(a.rank.cmp(&b.rank)));
        n.exchanges.sort_by_key(|e| e.seq);
    }
    let sorted: Vec<NeuronData> =
        order.into_values().filter_map(|key| neurons.remove(&key)).collect();
    Ok(JobResults { neurons: sorted, layers, errors: error_count })
}
