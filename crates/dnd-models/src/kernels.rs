//! CPU f32 kernels on plain slices: the elementwise and reduction passes of the diffusion
//! models (exp, SiLU, GELU, softmax, normalisation), written so that the compiler
//! vectorises them.
//!
//! Each public function is compiled twice, once for the baseline target and once with
//! AVX2 and FMA enabled, and picks the second at run time when the CPU has them (the
//! release build targets baseline x86-64, so without this the loops would use SSE2 only).
//! On a given machine a function always takes the same path, so results never depend on
//! anything but the inputs.
//!
//! `exp` is a polynomial approximation (Cephes' `expf`, within 2 ulp over the range that
//! matters); `erf` is Abramowitz and Stegun 7.1.26 (absolute error below 1.5e-7, 4e-7
//! after f32 rounding). Both are
//! accurate well beyond what parity with PyTorch at 1e-4 needs, and an order of magnitude
//! faster than the scalar libm calls they replace, which dominated softmax and GELU.

/// Defines `pub fn $name(...)` that runs `$body` compiled with AVX2 and FMA where the
/// CPU has them, and compiled for the baseline target elsewhere.
macro_rules! vectorized {
    ($(#[$meta:meta])* pub fn $name:ident($($arg:ident: $ty:ty),* $(,)?) $(-> $ret:ty)? $body:block) => {
        $(#[$meta])*
        pub fn $name($($arg: $ty),*) $(-> $ret)? {
            #[inline(always)]
            fn body($($arg: $ty),*) $(-> $ret)? $body
            #[cfg(target_arch = "x86_64")]
            {
                #[target_feature(enable = "avx2,fma")]
                fn avx2($($arg: $ty),*) $(-> $ret)? {
                    body($($arg),*)
                }
                if has_avx2_fma() {
                    // SAFETY: the CPU has AVX2 and FMA, checked just above.
                    return unsafe { avx2($($arg),*) };
                }
            }
            body($($arg),*)
        }
    };
}

#[cfg(target_arch = "x86_64")]
fn has_avx2_fma() -> bool {
    use std::sync::OnceLock;
    static HAS: OnceLock<bool> = OnceLock::new();
    *HAS.get_or_init(|| {
        std::is_x86_feature_detected!("avx2") && std::is_x86_feature_detected!("fma")
    })
}

/// `e^x` for f32 (Cephes `expf`): range reduction by `ln 2`, a degree-6 polynomial, and
/// the exponent assembled in the bits. Below -87.3 (where the result would be subnormal)
/// it is 0; above 88.37 it saturates at 2.4e38.
#[inline(always)]
pub fn exp(x: f32) -> f32 {
    const LN2_HI: f32 = 0.693_359_4;
    const LN2_LO: f32 = -2.121_944_4e-4;
    const MIN: f32 = -87.336_55;
    let underflow = x < MIN;
    let x = x.clamp(MIN, 88.376_26);
    let n = (x * std::f32::consts::LOG2_E + 0.5).floor();
    let r = n.mul_add(-LN2_LO, n.mul_add(-LN2_HI, x));
    let mut p = 1.987_569_1e-4_f32;
    p = p.mul_add(r, 1.398_199_9e-3);
    p = p.mul_add(r, 8.333_452e-3);
    p = p.mul_add(r, 4.166_579_6e-2);
    p = p.mul_add(r, 1.666_666_5e-1);
    p = p.mul_add(r, 0.5);
    let y = p.mul_add(r * r, r) + 1.0;
    if underflow { 0.0 } else { y * pow2i(n) }
}

/// `2^n` for an integral `n` in `[-126, 127]`, from the bits alone: adding 1.5 * 2^23
/// puts `n` in the low bits of the mantissa, which become the biased exponent. Unlike a
/// float-to-int cast (saturating in Rust), this vectorises.
#[inline(always)]
fn pow2i(n: f32) -> f32 {
    const MAGIC: f32 = 12_582_912.0;
    let biased = (n + MAGIC).to_bits().wrapping_sub(MAGIC.to_bits()).wrapping_add(127);
    f32::from_bits(biased << 23)
}

/// Sum of `x` in eight lanes (so that the additions vectorise), then across the lanes.
#[inline(always)]
fn sum(x: &[f32]) -> f32 {
    let mut lanes = [0f32; 8];
    let chunks = x.chunks_exact(8);
    let tail: f32 = chunks.remainder().iter().sum();
    for c in chunks {
        for (l, &v) in lanes.iter_mut().zip(c) {
            *l += v;
        }
    }
    lanes.iter().sum::<f32>() + tail
}

/// Maximum of `x` in eight lanes, then across the lanes.
#[inline(always)]
fn max(x: &[f32]) -> f32 {
    let mut lanes = [f32::NEG_INFINITY; 8];
    let chunks = x.chunks_exact(8);
    let tail = chunks.remainder().iter().fold(f32::NEG_INFINITY, |m, &v| m.max(v));
    for c in chunks {
        for (l, &v) in lanes.iter_mut().zip(c) {
            *l = l.max(v);
        }
    }
    lanes.iter().fold(tail, |m, &v| m.max(v))
}

/// `erf(x)` (Abramowitz and Stegun 7.1.26).
#[inline(always)]
pub fn erf(x: f32) -> f32 {
    let z = x.abs();
    let t = 1.0 / 0.327_591_1f32.mul_add(z, 1.0);
    let mut p = 1.061_405_4_f32;
    p = p.mul_add(t, -1.453_152_1);
    p = p.mul_add(t, 1.421_413_8);
    p = p.mul_add(t, -0.284_496_74);
    p = p.mul_add(t, 0.254_829_6);
    let y = 1.0 - p * t * exp(-z * z);
    y.copysign(x)
}

/// `x * sigmoid(x)`.
#[inline(always)]
pub fn silu(x: f32) -> f32 {
    x / (1.0 + exp(-x))
}

/// GELU with the exact (erf) form, PyTorch's default.
#[inline(always)]
pub fn gelu(x: f32) -> f32 {
    0.5 * x * (1.0 + erf(x * std::f32::consts::FRAC_1_SQRT_2))
}

vectorized! {
    /// `x = silu(x)`, element by element.
    pub fn silu_in_place(x: &mut [f32]) {
        for v in x {
            *v = silu(*v);
        }
    }
}

vectorized! {
    /// `x = x * scale + shift` followed by SiLU when `with_silu`: the output pass of a
    /// normalisation whose statistics and affine parameters are folded into one scale and
    /// one shift.
    pub fn scale_shift(x: &[f32], scale: f32, shift: f32, with_silu: bool, out: &mut [f32]) {
        if with_silu {
            for (o, &v) in out.iter_mut().zip(x) {
                *o = silu(v.mul_add(scale, shift));
            }
        } else {
            for (o, &v) in out.iter_mut().zip(x) {
                *o = v.mul_add(scale, shift);
            }
        }
    }
}

vectorized! {
    /// `out = a * gelu(gate)`, the gated activation of a GEGLU feed-forward layer.
    pub fn gated_gelu(a: &[f32], gate: &[f32], out: &mut [f32]) {
        for ((o, &a), &g) in out.iter_mut().zip(a).zip(gate) {
            *o = a * gelu(g);
        }
    }
}

vectorized! {
    /// Softmax of one row, in place: subtract the maximum, exponentiate, normalise.
    pub fn softmax_in_place(row: &mut [f32]) {
        let max = max(row);
        for v in row.iter_mut() {
            *v = exp(*v - max);
        }
        let inv = 1.0 / sum(row);
        for v in row.iter_mut() {
            *v *= inv;
        }
    }
}

vectorized! {
    /// Mean and variance (biased, as PyTorch's normalisations) of `x`, accumulated in f64.
    pub fn mean_var(x: &[f32]) -> (f32, f32) {
        let n = x.len().max(1) as f64;
        // Eight partial sums: the f64 additions vectorise and the error stays small.
        let mut acc = [0f64; 8];
        let chunks = x.chunks_exact(8);
        let tail: f64 = chunks.remainder().iter().map(|&v| f64::from(v)).sum();
        for c in chunks {
            for (a, &v) in acc.iter_mut().zip(c) {
                *a += f64::from(v);
            }
        }
        let mean = (acc.iter().sum::<f64>() + tail) / n;
        let mut acc = [0f64; 8];
        let chunks = x.chunks_exact(8);
        let tail: f64 = chunks.remainder().iter().map(|&v| (f64::from(v) - mean).powi(2)).sum();
        for c in chunks {
            for (a, &v) in acc.iter_mut().zip(c) {
                let d = f64::from(v) - mean;
                *a += d * d;
            }
        }
        let var = (acc.iter().sum::<f64>() + tail) / n;
        (mean as f32, var as f32)
    }
}

vectorized! {
    /// Layer normalisation over the channels of a channel-major `(channels, tokens)`
    /// matrix: every token (column) is normalised over its `channels` values, then scaled
    /// by `gamma` and shifted by `beta` per channel.
    pub fn layer_norm_columns(
        x: &[f32],
        channels: usize,
        tokens: usize,
        gamma: &[f32],
        beta: &[f32],
        eps: f32,
        out: &mut [f32],
    ) {
        let mut mean = vec![0f32; tokens];
        for row in x.chunks_exact(tokens) {
            for (m, &v) in mean.iter_mut().zip(row) {
                *m += v;
            }
        }
        let inv_c = 1.0 / channels as f32;
        mean.iter_mut().for_each(|m| *m *= inv_c);
        let mut var = vec![0f32; tokens];
        for row in x.chunks_exact(tokens) {
            for ((s, &v), &m) in var.iter_mut().zip(row).zip(&mean) {
                let d = v - m;
                *s = d.mul_add(d, *s);
            }
        }
        let rstd: Vec<f32> = var.iter().map(|&s| 1.0 / (s * inv_c + eps).sqrt()).collect();
        for (c, (dst, src)) in out.chunks_exact_mut(tokens).zip(x.chunks_exact(tokens)).enumerate() {
            let (g, b) = (gamma[c], beta[c]);
            for (((o, &v), &m), &r) in dst.iter_mut().zip(src).zip(&mean).zip(&rstd) {
                *o = ((v - m) * r).mul_add(g, b);
            }
        }
    }
}

vectorized! {
    /// Layer normalisation of every row of a row-major `(rows, channels)` matrix: each
    /// row (a token) is normalised over its `channels = gamma.len()` values, then scaled
    /// by `gamma` and shifted by `beta` per channel.
    pub fn layer_norm_rows(x: &[f32], gamma: &[f32], beta: &[f32], eps: f32, out: &mut [f32]) {
        let channels = gamma.len();
        let inv_c = 1.0 / channels as f32;
        for (src, dst) in x.chunks_exact(channels).zip(out.chunks_exact_mut(channels)) {
            let mean = sum(src) * inv_c;
            // Two passes, as PyTorch: the variance of the centred values, not E[x^2] - m^2.
            let mut lanes = [0f32; 8];
            let chunks = src.chunks_exact(8);
            let tail: f32 = chunks.remainder().iter().map(|&v| (v - mean) * (v - mean)).sum();
            for c in chunks {
                for (l, &v) in lanes.iter_mut().zip(c) {
                    let d = v - mean;
                    *l = d.mul_add(d, *l);
                }
            }
            let var = (lanes.iter().sum::<f32>() + tail) * inv_c;
            let rstd = 1.0 / (var + eps).sqrt();
            for (((o, &v), &g), &b) in dst.iter_mut().zip(src).zip(gamma).zip(beta) {
                *o = ((v - mean) * rstd).mul_add(g, b);
            }
        }
    }
}

vectorized! {
    /// `x = gelu(x)` (the exact, erf form), element by element.
    pub fn gelu_in_place(x: &mut [f32]) {
        for v in x {
            *v = gelu(*v);
        }
    }
}

vectorized! {
    /// `x = x * sigmoid(1.702 x)` (OpenAI CLIP's "quick" GELU), element by element.
    pub fn quick_gelu_in_place(x: &mut [f32]) {
        for v in x {
            *v /= 1.0 + exp(-1.702 * *v);
        }
    }
}

vectorized! {
    /// `x = 0.5 x (1 + tanh(sqrt(2/pi) (x + 0.044715 x^3)))`, PyTorch's
    /// `gelu(approximate="tanh")`, element by element; `tanh(u) = 1 - 2 / (1 + e^{2u})`.
    pub fn gelu_tanh_in_place(x: &mut [f32]) {
        const SQRT_2_OVER_PI: f32 = 0.797_884_6;
        for v in x {
            let u = SQRT_2_OVER_PI * (0.044_715 * *v * *v).mul_add(*v, *v);
            let tanh = 1.0 - 2.0 / (1.0 + exp(2.0 * u));
            *v *= 0.5 * (1.0 + tanh);
        }
    }
}

vectorized! {
    /// `dst += src`, element by element.
    pub fn add_in_place(dst: &mut [f32], src: &[f32]) {
        for (d, &s) in dst.iter_mut().zip(src) {
            *d += s;
        }
    }
}

vectorized! {
    /// Winograd F(2x2, 3x3) input transform `B^T d B` of a row of tiles. `even[r]` and
    /// `odd[r]` are the even and odd columns of the tiles' input row `r` (0..4), so that
    /// tile `x` covers `even[r][x], odd[r][x], even[r][x+1], odd[r][x+1]`; the 16 values of
    /// tile `x` go to `out[k * tiles + x]`.
    pub fn winograd_input_tiles(even: &[&[f32]; 4], odd: &[&[f32]; 4], tiles: usize, out: &mut [f32]) {
        let (out, _) = out.split_at_mut(16 * tiles);
        let mut rows = out.chunks_exact_mut(tiles);
        let o: [&mut [f32]; 16] = std::array::from_fn(|_| rows.next().expect("16 rows"));
        for x in 0..tiles {
            // (B^T d) row r, column s: d[s] is (even[x], odd[x], even[x+1], odd[x+1]).
            let col = |r: usize| [even[r][x], odd[r][x], even[r][x + 1], odd[r][x + 1]];
            let (d0, d1, d2, d3) = (col(0), col(1), col(2), col(3));
            let mut bd = [[0f32; 4]; 4];
            for s in 0..4 {
                bd[0][s] = d0[s] - d2[s];
                bd[1][s] = d1[s] + d2[s];
                bd[2][s] = d2[s] - d1[s];
                bd[3][s] = d1[s] - d3[s];
            }
            for (r, row) in bd.iter().enumerate() {
                o[r * 4][x] = row[0] - row[2];
                o[r * 4 + 1][x] = row[1] + row[2];
                o[r * 4 + 2][x] = row[2] - row[1];
                o[r * 4 + 3][x] = row[1] - row[3];
            }
        }
    }
}

vectorized! {
    /// Winograd F(2x2, 3x3) output transform `A^T M A` of a row of tiles: `m[k]` holds
    /// product `k` of each tile; the two output rows of tile `x` are written, interleaved,
    /// to `top[2x], top[2x+1]` and `bottom[2x], bottom[2x+1]`.
    pub fn winograd_output_tiles(m: &[&[f32]; 16], top: &mut [f32], bottom: &mut [f32]) {
        let tiles = m[0].len();
        for x in 0..tiles {
            let mut am = [[0f32; 4]; 2];
            for s in 0..4 {
                am[0][s] = m[s][x] + m[4 + s][x] + m[8 + s][x];
                am[1][s] = m[4 + s][x] - m[8 + s][x] - m[12 + s][x];
            }
            top[2 * x] = am[0][0] + am[0][1] + am[0][2];
            top[2 * x + 1] = am[0][1] - am[0][2] - am[0][3];
            bottom[2 * x] = am[1][0] + am[1][1] + am[1][2];
            bottom[2 * x + 1] = am[1][1] - am[1][2] - am[1][3];
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn exp_is_within_two_ulp_of_libm_where_it_matters() {
        let mut worst = 0f64;
        let mut x = -87.0f32;
        while x < 88.0 {
            let want = f64::from(x).exp();
            let got = f64::from(exp(x));
            worst = worst.max(((got - want) / want).abs());
            x += 0.001_37;
        }
        assert!(worst < 2.5e-7, "relative error {worst}");
        assert_eq!(exp(-1000.0), 0.0);
        assert_eq!(exp(f32::NEG_INFINITY), 0.0);
        assert!(exp(0.0) == 1.0);
    }

    #[test]
    fn erf_and_gelu_match_their_definitions() {
        let mut worst = 0f64;
        let mut x = -6.0f32;
        while x < 6.0 {
            let want = erf_f64(f64::from(x));
            worst = worst.max((f64::from(erf(x)) - want).abs());
            x += 0.0123;
        }
        assert!(worst < 4e-7, "erf absolute error {worst}");
        assert!((gelu(1.0) - 0.841_344_7).abs() < 1e-6);
        assert!((gelu(-1.0) + 0.158_655_3).abs() < 1e-6);
    }

    /// erf by Simpson's rule on 2/sqrt(pi) e^{-t^2}: slow, exact to 1e-12 here.
    fn erf_f64(x: f64) -> f64 {
        let n = 20_000;
        let h = x / n as f64;
        let f = |t: f64| (-t * t).exp();
        let mut s = f(0.0) + f(x);
        for i in 1..n {
            s += f(i as f64 * h) * if i % 2 == 1 { 4.0 } else { 2.0 };
        }
        s * h / 3.0 * 2.0 / std::f64::consts::PI.sqrt()
    }

    #[test]
    fn softmax_rows_sum_to_one_and_keep_order() {
        let mut row = vec![1.0f32, 3.0, -2.0, 3.0, 10.0, -100.0];
        softmax_in_place(&mut row);
        let sum: f32 = row.iter().sum();
        assert!((sum - 1.0).abs() < 1e-6);
        assert!(row[4] > 0.99 && row[5] == 0.0 && row[1] == row[3] && row[1] > row[0]);
        let want = 1.0 / (1.0 + (-7f64).exp() * 2.0 + (-9f64).exp() + (-12f64).exp());
        assert!((f64::from(row[4]) - want).abs() < 1e-6);
    }

    #[test]
    fn row_layer_norm_and_activations_match_their_definitions() {
        let (rows, c) = (3, 13);
        let x: Vec<f32> = (0..rows * c).map(|i| (i as f32 * 0.37).cos() * 4.0 + 1.5).collect();
        let gamma: Vec<f32> = (0..c).map(|i| 0.5 + i as f32 * 0.1).collect();
        let beta: Vec<f32> = (0..c).map(|i| i as f32 * -0.05).collect();
        let mut out = vec![0.0; rows * c];
        layer_norm_rows(&x, &gamma, &beta, 1e-6, &mut out);
        for (src, dst) in x.chunks(c).zip(out.chunks(c)) {
            let m = src.iter().map(|&v| f64::from(v)).sum::<f64>() / c as f64;
            let var = src.iter().map(|&v| (f64::from(v) - m).powi(2)).sum::<f64>() / c as f64;
            for i in 0..c {
                let want = (f64::from(src[i]) - m) / (var + 1e-6).sqrt() * f64::from(gamma[i])
                    + f64::from(beta[i]);
                assert!((f64::from(dst[i]) - want).abs() < 1e-5, "{} vs {want}", dst[i]);
            }
        }
        let xs: Vec<f32> = (0..200).map(|i| (i as f32 - 100.0) * 0.07).collect();
        let (mut g, mut q, mut t) = (xs.clone(), xs.clone(), xs.clone());
        gelu_in_place(&mut g);
        quick_gelu_in_place(&mut q);
        gelu_tanh_in_place(&mut t);
        for (i, &v) in xs.iter().enumerate() {
            let v64 = f64::from(v);
            let quick = v64 / (1.0 + (-1.702 * v64).exp());
            let u = (2.0 / std::f64::consts::PI).sqrt() * (v64 + 0.044715 * v64.powi(3));
            let tanh = 0.5 * v64 * (1.0 + u.tanh());
            assert!(
                (f64::from(g[i]) - 0.5 * v64 * (1.0 + erf_f64(v64 / 2f64.sqrt()))).abs() < 1e-6
            );
            assert!((f64::from(q[i]) - quick).abs() < 1e-6, "quick_gelu({v})");
            assert!((f64::from(t[i]) - tanh).abs() < 1e-6, "gelu_tanh({v})");
        }
    }

    #[test]
    fn layer_norm_normalises_each_column() {
        let (c, t) = (5, 3);
        let x: Vec<f32> = (0..c * t).map(|i| (i as f32 * 0.7).sin() * 3.0 + i as f32).collect();
        let gamma = vec![2.0; c];
        let beta = vec![0.5; c];
        let mut out = vec![0.0; c * t];
        layer_norm_columns(&x, c, t, &gamma, &beta, 1e-5, &mut out);
        for j in 0..t {
            let col: Vec<f32> = (0..c).map(|i| (out[i * t + j] - 0.5) / 2.0).collect();
            let (m, v) = mean_var(&col);
            assert!(m.abs() < 1e-5 && (v - 1.0).abs() < 1e-3, "column {j}: {m} {v}");
        }
    }
}
