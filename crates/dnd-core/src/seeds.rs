//! Seeds derived from a job's one seed, so a run is reproducible while each unit draws
//! its own random numbers.

use crate::ids::NeuronId;

/// The seed of one unit's random draws (its summary rounds' shuffles, its evaluation's
/// resamples): a mix of the job's `seed`, the layer's name and the neuron. The method's
/// reference shuffles every neuron's labels independently; one seed for all would give
/// every neuron the same orders, and the same top images would go unread in each of its
/// summary rounds, for every neuron.
pub fn unit_seed(seed: u64, layer: &str, neuron: NeuronId) -> u64 {
    let mut h = splitmix64(seed);
    for byte in layer.bytes() {
        h = splitmix64(h ^ u64::from(byte));
    }
    splitmix64(h ^ u64::from(neuron.to_u32()))
}

/// SplitMix64's step: a bijection of u64 that scatters nearby inputs far apart.
fn splitmix64(x: u64) -> u64 {
    let mut z = x.wrapping_add(0x9E37_79B9_7F4A_7C15);
    z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
    z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
    z ^ (z >> 31)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn unit_seeds_are_stable_and_differ_by_seed_layer_and_neuron() {
        let n = NeuronId::new;
        let base = unit_seed(0, "layer4", n(3));
        assert_eq!(base, unit_seed(0, "layer4", n(3)), "a run is reproducible");
        let others = [
            unit_seed(1, "layer4", n(3)),
            unit_seed(0, "layer3", n(3)),
            unit_seed(0, "layer4", n(4)),
        ];
        for other in others {
            assert_ne!(base, other);
        }
        // Layer and neuron do not trade places: "layer1" neuron 0 is not "layer" neuron 10.
        assert_ne!(unit_seed(0, "layer1", n(0)), unit_seed(0, "layer", n(10)));
    }
}
