//! The stages of a neuron task, one module each, over typed inputs and outputs:
//! [`crop`] (stage 1), [`caption`] and [`summarize`] (stage 2), [`generate`] and
//! [`score`] (stage 3), and [`evaluate`] (the labels scored against their neurons, when
//! asked for). The neuron task (`neuron_task.rs`) composes them; the probe (stage 0) is
//! `probe.rs`.

pub mod caption;
pub mod crop;
pub mod evaluate;
pub mod generate;
pub mod score;
pub mod summarize;
