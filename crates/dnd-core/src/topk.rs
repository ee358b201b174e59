//! Streaming top-K per neuron: memory is `neurons x K`, whatever the number of images.

use std::cmp::Ordering;
use std::collections::BinaryHeap;

/// One (image, activation) pair of a neuron's top-K list.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Scored {
    /// Index of the image in the probe set's id table.
    pub image: u32,
    pub activation: f32,
}

/// Total order used everywhere for "more activating": higher activation first, ties
/// broken by the lower image index, so results never depend on batch boundaries.
/// NaN activations never enter a top-K list.
fn better(a: &Scored, b: &Scored) -> Ordering {
    b.activation.total_cmp(&a.activation).then(a.image.cmp(&b.image))
}

/// Heap entry ordered so that the heap's top is the *worst* kept entry.
#[derive(Debug, Clone, Copy)]
struct Worst(Scored);

impl PartialEq for Worst {
    fn eq(&self, other: &Self) -> bool {
        better(&self.0, &other.0) == Ordering::Equal
    }
}
impl Eq for Worst {}
impl PartialOrd for Worst {
    fn partial_cmp(&self, other: &Self) -> Option<Ordering> {
        Some(self.cmp(other))
    }
}
impl Ord for Worst {
    fn cmp(&self, other: &Self) -> Ordering {
        better(&self.0, &other.0)
    }
}

/// The K most activating images of one neuron seen so far.
#[derive(Debug, Clone)]
pub struct TopK {
    k: usize,
    heap: BinaryHeap<Worst>,
}

impl TopK {
    pub fn new(k: usize) -> Self {
        Self { k, heap: BinaryHeap::with_capacity(k + 1) }
    }

    pub fn push(&mut self, image: u32, activation: f32) {
        if self.k == 0 || activation.is_nan() {
            return;
        }
        let entry = Worst(Scored { image, activation });
        if self.heap.len() < self.k {
            self.heap.push(entry);
        } else if let Some(worst) = self.heap.peek()
            && entry < *worst
        {
            self.heap.pop();
            self.heap.push(entry);
        }
    }

    /// Merges another partial top-K of the same neuron (e.g. from another probe slice).
    pub fn merge(&mut self, other: &TopK) {
        for w in &other.heap {
            self.push(w.0.image, w.0.activation);
        }
    }

    /// The kept entries, most activating first.
    pub fn sorted(&self) -> Vec<Scored> {
        let mut v: Vec<Scored> = self.heap.iter().map(|w| w.0).collect();
        v.sort_by(better);
        v
    }
}

/// Top-K lists of every neuron of one layer.
#[derive(Debug, Clone)]
pub struct LayerTopK {
    neurons: Vec<TopK>,
}

impl LayerTopK {
    pub fn new(neurons: usize, k: usize) -> Self {
        Self { neurons: vec![TopK::new(k); neurons] }
    }

    pub fn neurons(&self) -> usize {
        self.neurons.len()
    }

    /// Adds one batch of pooled activations, `rows[i]` holding all neurons of image
    /// `images[i]` (row-major `images.len() x neurons`).
    pub fn push_batch(&mut self, images: &[u32], pooled: &[f32]) {
        let n = self.neurons.len();
        assert_eq!(pooled.len(), images.len() * n, "pooled batch does not match its images");
        for (row, &image) in pooled.chunks_exact(n).zip(images) {
            for (topk, &v) in self.neurons.iter_mut().zip(row) {
                topk.push(image, v);
            }
        }
    }

    pub fn merge(&mut self, other: &LayerTopK) {
        assert_eq!(self.neurons.len(), other.neurons.len(), "merging top-K of different layers");
        for (a, b) in self.neurons.iter_mut().zip(&other.neurons) {
            a.merge(b);
        }
    }

    pub fn neuron(&self, neuron: usize) -> &TopK {
        &self.neurons[neuron]
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn keeps_the_k_largest_in_order() {
        let mut t = TopK::new(3);
        for (i, v) in [0.1, 5.0, -1.0, 3.0, 4.0, 2.0].into_iter().enumerate() {
            t.push(i as u32, v);
        }
        let got: Vec<_> = t.sorted().iter().map(|s| (s.image, s.activation)).collect();
        assert_eq!(got, vec![(1, 5.0), (4, 4.0), (3, 3.0)]);
    }

    #[test]
    fn ties_prefer_the_lower_image_index_and_nan_is_ignored() {
        let mut t = TopK::new(2);
        t.push(7, 1.0);
        t.push(f32::NAN.to_bits(), f32::NAN);
        t.push(3, 1.0);
        t.push(5, 1.0);
        let got: Vec<_> = t.sorted().iter().map(|s| s.image).collect();
        assert_eq!(got, vec![3, 5]);
    }

    #[test]
    fn merging_slices_equals_one_pass() {
        let values: Vec<f32> = (0..200).map(|i| ((i * 7919) % 101) as f32 * 0.5).collect();
        let mut whole = LayerTopK::new(1, 10);
        whole.push_batch(&(0..200).collect::<Vec<_>>(), &values);
        let mut a = LayerTopK::new(1, 10);
        a.push_batch(&(0..90).collect::<Vec<_>>(), &values[..90]);
        let mut b = LayerTopK::new(1, 10);
        b.push_batch(&(90..200).collect::<Vec<_>>(), &values[90..]);
        b.merge(&a);
        assert_eq!(b.neuron(0).sorted(), whole.neuron(0).sorted());
    }

    #[test]
    fn batch_rows_map_to_neurons() {
        let mut l = LayerTopK::new(2, 1);
        // image 10: (1, 9), image 11: (3, 2)
        l.push_batch(&[10, 11], &[1.0, 9.0, 3.0, 2.0]);
        assert_eq!(l.neuron(0).sorted()[0].image, 11);
        assert_eq!(l.neuron(1).sorted()[0].image, 10);
    }
}
