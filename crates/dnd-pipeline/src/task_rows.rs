//! The results rows of one neuron of a neuron task: its evidence images, captions,
//! summariser exchanges, generated images, candidates, scores and description.

use dnd_core::{LayerName, NeuronId, TaskId, UnitKind};
use dnd_store::results::{
    CandidateRow, CaptionRow, DescriptionRow, DescriptionStatus, EvaluationRow, ExchangeRow,
    ImageRow, NeuronErrorRow, ScoreRow,
};
use dnd_summarize::{Answer, Exchange};

use crate::job::JobSpec;
use crate::stages::caption::Captions;
use crate::stages::crop::Evidence;
use crate::stages::score::NeuronScores;
use crate::stages::summarize::Labelling;
use crate::workbench::{GeneratedEntry, Workbench};

/// Every row a task produces, one vector per results table.
#[derive(Debug, Default)]
pub struct TaskTables {
    pub descriptions: Vec<DescriptionRow>,
    pub candidates: Vec<CandidateRow>,
    pub scores: Vec<ScoreRow>,
    pub captions: Vec<CaptionRow>,
    pub images: Vec<ImageRow>,
    pub exchanges: Vec<ExchangeRow>,
    pub errors: Vec<NeuronErrorRow>,
    pub evaluation: Vec<EvaluationRow>,
}

/// Makes the rows of one task's neurons (units).
pub(crate) struct RowMaker<'a> {
    pub layer: &'a LayerName,
    pub unit_kind: UnitKind,
    pub unit_source: Option<&'a str>,
    pub task: &'a TaskId,
    pub spec: &'a JobSpec,
    pub bench: &'a Workbench,
}

/// Everything the stages found about one neuron.
pub(crate) struct NeuronOutcome<'a> {
    pub neuron: NeuronId,
    /// Originals and crops, by descending activation.
    pub evidence: &'a [Evidence],
    pub captions: &'a Captions,
    pub labelling: &'a Labelling,
    pub scored: &'a NeuronScores,
    /// The task's generated images (request order) and their pixel hashes.
    pub generated: &'a [GeneratedEntry],
    pub generated_hashes: &'a [String],
    pub seeds: &'a [u64],
}

/// `(cached, total)` of a sequence of "was it cached" flags.
fn count(flags: impl Iterator<Item = bool>) -> (i32, i32) {
    flags.fold((0, 0), |(c, t), cached| (c + i32::from(cached), t + 1))
}

fn exchange_row(rows: &RowMaker<'_>, neuron: NeuronId, seq: usize, e: &Exchange) -> ExchangeRow {
    let (answer, error) = match &e.answer {
        Ok(Answer::Label(l)) => (Some(l.clone()), None),
        Ok(Answer::Several(items)) => (Some(items.join("; ")), None),
        Err(err) => (None, Some(err.to_string())),
    };
    ExchangeRow {
        layer: rows.layer.clone(),
        neuron,
        unit_kind: rows.unit_kind,
        unit_source: rows.source(),
        seq: seq as i32,
        step: serde_json::to_value(e.step)
            .ok()
            .and_then(|v| v.as_str().map(String::from))
            .unwrap_or_default(),
        backend: e.backend.clone(),
        model: e.model.clone(),
        prompt_version: e.prompt_version.clone(),
        request: e.request.clone(),
        reply: e.reply.clone(),
        answer,
        error,
        cached: e.cached,
    }
}

impl RowMaker<'_> {
    fn source(&self) -> Option<String> {
        self.unit_source.map(String::from)
    }

    /// An error row of `neuron` at `stage`.
    pub fn error(
        &self,
        neuron: NeuronId,
        stage: &str,
        image_id: Option<String>,
        reason: &str,
        message: String,
    ) -> NeuronErrorRow {
        NeuronErrorRow {
            layer: self.layer.clone(),
            neuron,
            unit_kind: self.unit_kind,
            unit_source: self.source(),
            stage: stage.into(),
            image_id,
            reason: reason.into(),
            message,
            task: self.task.to_string(),
        }
    }

    /// Every row of one neuron, appended to `tables`.
    pub fn neuron(&self, tables: &mut TaskTables, o: &NeuronOutcome<'_>) {
        let top_n = self.spec.describe.top_images;
        self.evidence_rows(tables, o);
        let top: Vec<&Evidence> = o.evidence.iter().take(top_n).collect();
        for (rank, e) in top.iter().enumerate() {
            let (caption, cached) = o.captions.of(&e.hash);
            tables.captions.push(CaptionRow {
                layer: self.layer.clone(),
                neuron: o.neuron,
                unit_kind: self.unit_kind,
                unit_source: self.source(),
                image_rank: rank as i32,
                image_hash: e.hash.clone(),
                caption: caption.clone(),
                simplified: o.labelling.simplified.get(rank).cloned().flatten(),
                captioner: self.bench.captioner.identity.clone(),
                cached: *cached,
            });
        }
        for (seq, e) in o.labelling.exchanges.iter().enumerate() {
            tables.exchanges.push(exchange_row(self, o.neuron, seq, e));
        }
        if let Some(failure) = &o.labelling.failure {
            let row = self.error(o.neuron, "summarize", None, "summarizer_failed", failure.clone());
            tables.errors.push(row);
        }
        self.generated_rows(tables, o);
        self.score_rows(tables, o);
        tables.descriptions.push(self.description(o, &top));
    }

    fn evidence_rows(&self, tables: &mut TaskTables, o: &NeuronOutcome<'_>) {
        let top_n = self.spec.describe.top_images;
        for (rank, e) in o.evidence.iter().enumerate() {
            let (crop_index, b) = match e.crop {
                Some((c, b)) => (Some(c as i32), Some(b)),
                None => (None, None),
            };
            tables.images.push(ImageRow {
                layer: self.layer.clone(),
                neuron: o.neuron,
                unit_kind: self.unit_kind,
                unit_source: self.source(),
                kind: if e.crop.is_some() { "crop" } else { "original" }.into(),
                rank: rank as i32,
                activation: e.activation,
                top: rank < top_n,
                image_id: Some(e.image_id.clone()),
                crop_index,
                canvas_size: b.map(|_| self.spec.crops.canvas_size as i32),
                x0: b.map(|b| b.x0 as i32),
                y0: b.map(|b| b.y0 as i32),
                x1: b.map(|b| b.x1 as i32),
                y1: b.map(|b| b.y1 as i32),
                candidate: None,
                concept: None,
                seed: None,
                similarity: None,
                uri: e.uri.clone(),
                image_hash: e.hash.clone(),
                cached: false,
            });
        }
    }

    fn generated_rows(&self, tables: &mut TaskTables, o: &NeuronOutcome<'_>) {
        let s = o.scored;
        for (j, (img, &r)) in s.images.iter().zip(&s.requests).enumerate() {
            tables.images.push(ImageRow {
                layer: self.layer.clone(),
                neuron: o.neuron,
                unit_kind: self.unit_kind,
                unit_source: self.source(),
                kind: "generated".into(),
                rank: s.positions[j] as i32,
                activation: img.activation,
                top: s.positions[j] < self.spec.scoring.similarity_top,
                image_id: None,
                crop_index: None,
                canvas_size: None,
                x0: None,
                y0: None,
                x1: None,
                y1: None,
                candidate: Some(img.candidate as i32),
                concept: Some(o.labelling.candidates[img.candidate].clone()),
                seed: Some(o.seeds[r] as i64),
                similarity: Some(img.similarity),
                uri: self.bench.cache.display_path(&o.generated[r].key),
                image_hash: o.generated_hashes[r].clone(),
                cached: o.generated[r].cached,
            });
        }
    }

    fn score_rows(&self, tables: &mut TaskTables, o: &NeuronOutcome<'_>) {
        let scoring = &self.spec.scoring;
        let rank_score = serde_json::to_value(scoring.rank_score)
            .ok()
            .and_then(|v| v.as_str().map(String::from))
            .unwrap_or_default();
        for s in &o.scored.candidates {
            let concept = o.labelling.candidates[s.candidate].clone();
            tables.candidates.push(CandidateRow {
                layer: self.layer.clone(),
                neuron: o.neuron,
                unit_kind: self.unit_kind,
                unit_source: self.source(),
                candidate: s.candidate as i32,
                prompt: self.spec.generator.sampling.prompt(&concept),
                concept: concept.clone(),
                images: s.positions.len() as i32,
                final_rank: s.final_rank as i32,
                selected: s.final_rank < scoring.labels,
            });
            tables.scores.push(ScoreRow {
                layer: self.layer.clone(),
                neuron: o.neuron,
                unit_kind: self.unit_kind,
                unit_source: self.source(),
                candidate: s.candidate as i32,
                concept,
                topk_sq_mean: s.topk_sq_mean,
                mean: s.mean,
                median: s.median,
                sq_mean: s.sq_mean,
                rank_score: rank_score.clone(),
                rank_order: s.rank_order as i32,
                similarity: s.similarity,
                final_score: s.final_score,
                final_rank: s.final_rank as i32,
            });
        }
    }

    fn description(&self, o: &NeuronOutcome<'_>, top: &[&Evidence]) -> DescriptionRow {
        let l = o.labelling;
        let mut ranked: Vec<_> = o.scored.candidates.iter().collect();
        ranked.sort_by_key(|s| s.final_rank);
        let label = |i: usize| {
            ranked
                .get(i)
                .filter(|_| i < self.spec.scoring.labels)
                .map(|s| (l.candidates[s.candidate].clone(), s.final_score))
        };
        let status = if l.failure.is_some() {
            DescriptionStatus::Failed
        } else if l.candidates.is_empty() {
            DescriptionStatus::NoCandidates
        } else {
            DescriptionStatus::Ok
        };
        let (captions_cached, captions_total) = count(top.iter().map(|e| o.captions.of(&e.hash).1));
        let (replies_cached, replies_total) = count(l.exchanges.iter().map(|e| e.cached));
        let (images_cached, images_total) =
            count(o.scored.requests.iter().map(|&r| o.generated[r].cached));
        DescriptionRow {
            layer: self.layer.clone(),
            neuron: o.neuron,
            unit_kind: self.unit_kind,
            unit_source: self.source(),
            status,
            label: label(0).map(|x| x.0),
            score: label(0).map(|x| x.1),
            label_2: label(1).map(|x| x.0),
            score_2: label(1).map(|x| x.1),
            label_3: label(2).map(|x| x.0),
            score_3: label(2).map(|x| x.1),
            candidates: l.candidates.len() as i32,
            top_images: top.len() as i32,
            captions_cached,
            captions_total,
            replies_cached,
            replies_total,
            images_cached,
            images_total,
            error: l.failure.clone(),
            task: self.task.to_string(),
        }
    }
}
