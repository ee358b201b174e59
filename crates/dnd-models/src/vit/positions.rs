//! Resampling a position table to another patch grid, as PyTorch's
//! `interpolate(mode="bicubic", align_corners=False)` does it, with or without
//! `antialias` (the libraries differ: see [`super::VitConfig::antialias_positions`]).

/// Each output coordinate's source indices and weights along one axis.
type AxisTaps = Vec<(Vec<usize>, Vec<f32>)>;

/// Resamples a table `(r0*c0, dim)`, row-major over the grid, to `(r1*c1, dim)`: the
/// width pass first, then the height pass over its results, as PyTorch groups the sums.
pub(super) fn resample(
    table: &[f32],
    dim: usize,
    (r0, c0): (usize, usize),
    (r1, c1): (usize, usize),
    antialias: bool,
) -> Vec<f32> {
    let taps = if antialias { antialiased } else { plain };
    let (ys, xs) = (taps(r0, r1), taps(c0, c1));
    let mut out = vec![0f32; r1 * c1 * dim];
    for (oy, (iy, wy)) in ys.iter().enumerate() {
        for (ox, (ix, wx)) in xs.iter().enumerate() {
            let dst = &mut out[(oy * c1 + ox) * dim..][..dim];
            for (ch, o) in dst.iter_mut().enumerate() {
                let row = |y: usize| -> f32 {
                    ix.iter().zip(wx).map(|(&x, &w)| table[(y * c0 + x) * dim + ch] * w).sum()
                };
                *o = iy.iter().zip(wy).map(|(&y, &w)| row(y) * w).sum();
            }
        }
    }
    out
}

/// Cubic convolution (Keys) with parameter `a` at distance `x`.
fn cubic(x: f32, a: f32) -> f32 {
    let x = x.abs();
    if x < 1.0 {
        ((a + 2.0) * x - (a + 3.0)) * x * x + 1.0
    } else if x < 2.0 {
        ((a * x - 5.0 * a) * x + 8.0 * a) * x - 4.0 * a
    } else {
        0.0
    }
}

/// Without antialiasing: four neighbours of `(i + 0.5) * in / out - 0.5`, clamped to the
/// edge, a = -0.75 (PyTorch's `upsample_bicubic2d`).
fn plain(n_in: usize, n_out: usize) -> AxisTaps {
    let scale = n_in as f32 / n_out as f32;
    (0..n_out)
        .map(|i| {
            let real = scale * (i as f32 + 0.5) - 0.5;
            let floor = real.floor();
            let t = real - floor;
            let at = |k: isize| (floor as isize + k).clamp(0, n_in as isize - 1) as usize;
            let weights = vec![
                cubic(t + 1.0, -0.75),
                cubic(t, -0.75),
                cubic(1.0 - t, -0.75),
                cubic(2.0 - t, -0.75),
            ];
            (vec![at(-1), at(0), at(1), at(2)], weights)
        })
        .collect()
}

/// With antialiasing (PyTorch's `_upsample_bicubic2d_aa`, Pillow's filter): a = -0.5, the
/// kernel widened by the downscaling factor, cut at the edges and renormalised.
fn antialiased(n_in: usize, n_out: usize) -> AxisTaps {
    let scale = n_in as f32 / n_out as f32;
    let (support, invscale) = if scale >= 1.0 { (2.0 * scale, 1.0 / scale) } else { (2.0, 1.0) };
    (0..n_out)
        .map(|i| {
            let center = scale * (i as f32 + 0.5);
            // Truncations toward zero, as the C++ casts.
            let lo = ((center - support + 0.5) as i64).max(0) as usize;
            let hi = ((center + support + 0.5) as i64).min(n_in as i64) as usize;
            let indices: Vec<usize> = (lo..hi.max(lo)).collect();
            let mut weights: Vec<f32> = indices
                .iter()
                .map(|&j| cubic((j as f32 - center + 0.5) * invscale, -0.5))
                .collect();
            let total: f32 = weights.iter().sum();
            if total != 0.0 {
                weights.iter_mut().for_each(|w| *w /= total);
            }
            (indices, weights)
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    /// `torch.nn.functional.interpolate(x, size, mode="bicubic", align_corners=False,
    /// antialias=...)` of `x = arange(1, 13).reshape(1, 1, 3, 4) ** 1.5`: downsampling,
    /// upsampling and the edges, both kernels.
    #[test]
    fn matches_pytorch_bicubic_with_and_without_antialiasing() {
        let table: Vec<f32> = (1..=12).map(|v| (v as f32).powf(1.5)).collect();
        let cases: [((usize, usize), bool, &[f32]); 3] = [
            (
                (5, 2),
                false,
                &[
                    0.646_996, 5.465_279, 4.744_936, 10.960_043, 12.580_202, 20.932_274,
                    23.324_774, 33.300_59, 30.418_213, 41.262_424,
                ],
            ),
            (
                (5, 2),
                true,
                &[
                    1.238_455, 5.308_165, 5.260_249, 10.395_006, 13.247_185, 20.218_927,
                    24.438_889, 32.764_694, 30.957_754, 39.972_33,
                ],
            ),
            (
                (2, 7),
                true,
                &[
                    3.7391, 4.536_526, 6.107_642, 7.667_111, 9.370_598, 11.493_78, 12.613_795,
                    21.531_53, 22.998_838, 25.841_604, 28.423_43, 31.089_12, 34.253_372,
                    35.908_535,
                ],
            ),
        ];
        for (size, antialias, want) in cases {
            let got = resample(&table, 1, (3, 4), size, antialias);
            assert_eq!(got.len(), want.len());
            for (g, w) in got.iter().zip(want) {
                assert!((g - w).abs() < 2e-5, "{size:?} antialias={antialias}: {got:?}");
            }
        }
        // Channels are resampled independently.
        let two: Vec<f32> = table.iter().flat_map(|&v| [v, -v]).collect();
        let one = resample(&table, 1, (3, 4), (5, 2), true);
        for (i, pair) in resample(&two, 2, (3, 4), (5, 2), true).chunks(2).enumerate() {
            assert_eq!((pair[0], pair[1]), (one[i], -one[i]));
        }
    }
}
