//! Linear layers on the CPU in f32, `out += x · Wᵀ`, with the weight packed once at load
//! time into column panels and an AVX-512 micro-kernel.
//!
//! The `gemm` crate's AVX-512 kernels need nightly Rust, and its AVX2 ones reach about
//! half of what MKL does on the same core (45 against 85 GFLOP per CPU-second, measured
//! on the AMD EPYC of docs/benchmarks.md, 197x768 by 768x3072: a ViT-B/16 image's
//! `fc1`). A vision transformer is almost nothing but such products, so this file has
//! its own: the weight `W (n, k)` is stored as panels of `NR` output columns, each
//! `(k, NR)` row-major (zero-padded past `n`), and a 12x32 tile of the output is held in
//! 24 registers while the input's rows are broadcast against a panel, `k` times.
//!
//! Every output value is summed over `k` in one fixed order, by blocks of a size that
//! depends on `k` alone: a row's result never depends on the other rows of the call (the
//! batch) nor on the threads. Without AVX-512 the `gemm` crate computes the same product.

use gemm::Parallelism;
use rayon::prelude::*;

/// Output columns per panel: two 16-float vectors.
const NR: usize = 32;
/// Input rows per tile of the micro-kernel.
const MR: usize = 12;
/// Largest block of the reduction dimension: a panel block (`NR x KC` floats, 96 KiB)
/// and the packed input block stay in the L2 cache.
const KC: usize = 768;

/// A weight `(n, k)`, laid out for [`PackedLinear::apply`].
#[derive(Clone)]
pub struct PackedLinear {
    n: usize,
    k: usize,
    /// Panels (AVX-512), or the row-major weight (the `gemm` fallback).
    data: Vec<f32>,
    panels: bool,
}

impl std::fmt::Debug for PackedLinear {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "PackedLinear({}x{}, panels: {})", self.n, self.k, self.panels)
    }
}

fn has_avx512() -> bool {
    #[cfg(target_arch = "x86_64")]
    {
        use std::sync::OnceLock;
        static HAS: OnceLock<bool> = OnceLock::new();
        *HAS.get_or_init(|| std::is_x86_feature_detected!("avx512f"))
    }
    #[cfg(not(target_arch = "x86_64"))]
    false
}

impl PackedLinear {
    /// Packs a row-major weight `(n, k)` (PyTorch's `Linear.weight`).
    pub fn new(weight: &[f32], n: usize, k: usize) -> Self {
        assert_eq!(weight.len(), n * k, "a ({n}, {k}) weight");
        if !has_avx512() {
            return Self { n, k, data: weight.to_vec(), panels: false };
        }
        let panels = n.div_ceil(NR);
        let mut data = vec![0f32; panels * k * NR];
        for (p, panel) in data.chunks_exact_mut(k * NR).enumerate() {
            for j in 0..NR.min(n - p * NR) {
                let row = &weight[(p * NR + j) * k..][..k];
                for (kk, &v) in row.iter().enumerate() {
                    panel[kk * NR + j] = v;
                }
            }
        }
        Self { n, k, data, panels: true }
    }

    pub fn rows(&self) -> usize {
        self.n
    }

    pub fn cols(&self) -> usize {
        self.k
    }

    /// The weight back in its row-major `(n, k)` layout.
    pub fn to_row_major(&self) -> Vec<f32> {
        if !self.panels {
            return self.data.clone();
        }
        let mut out = vec![0f32; self.n * self.k];
        for (i, row) in out.chunks_exact_mut(self.k).enumerate() {
            let panel = &self.data[(i / NR) * self.k * NR..];
            for (kk, v) in row.iter_mut().enumerate() {
                *v = panel[kk * NR + i % NR];
            }
        }
        out
    }

    /// `out += x · Wᵀ` for `x: (rows, k)` and `out: (rows, n)`, both row-major; with
    /// `parallel`, the output columns are split over rayon's threads.
    pub fn apply(&self, x: &[f32], rows: usize, out: &mut [f32], parallel: bool) {
        let (n, k) = (self.n, self.k);
        assert!(x.len() >= rows * k && out.len() >= rows * n, "shapes of a linear layer");
        if !self.panels {
            let par = if parallel {
                Parallelism::Rayon(rayon::current_num_threads())
            } else {
                Parallelism::None
            };
            // SAFETY: dst rows x n (row stride n) in `out`, lhs rows x k (row stride k) in
            // `x`, rhs the weight transposed: k x n read with column stride k and row
            // stride 1 inside the n x k weight; lengths asserted above.
            unsafe {
                gemm::gemm(
                    rows,
                    n,
                    k,
                    out.as_mut_ptr(),
                    1,
                    n as isize,
                    true,
                    x.as_ptr(),
                    1,
                    k as isize,
                    self.data.as_ptr(),
                    k as isize,
                    1,
                    1.0,
                    1.0,
                    false,
                    false,
                    false,
                    par,
                );
            }
            return;
        }
        #[cfg(target_arch = "x86_64")]
        {
            let blocks = k.div_ceil(KC);
            let kc = k.div_ceil(blocks);
            let tiles = rows.div_ceil(MR);
            let panels = n.div_ceil(NR);
            let out_ptr = crate::conv::SendPtr(out.as_mut_ptr());
            crate::conv::with_scratch(tiles * MR * kc, |packed| {
                for b in 0..blocks {
                    let k0 = b * kc;
                    let kb = kc.min(k - k0);
                    pack_rows(x, rows, k, k0, kb, packed);
                    let run = |p: usize| {
                        let panel = &self.data[p * k * NR + k0 * NR..][..kb * NR];
                        let cols = NR.min(n - p * NR);
                        for t in 0..tiles {
                            let r = MR.min(rows - t * MR);
                            // SAFETY: the tile's rows t*MR..t*MR+r and columns p*NR..+cols
                            // are inside `out` (rows x n); panels write disjoint columns; the
                            // CPU has AVX-512 (checked when packing).
                            unsafe {
                                let dst = out_ptr.get().add(t * MR * n + p * NR);
                                kernel(&packed[t * MR * kb..][..MR * kb], panel, dst, n, r, cols);
                            }
                        }
                    };
                    if parallel {
                        (0..panels).into_par_iter().for_each(run);
                    } else {
                        (0..panels).for_each(run);
                    }
                }
            });
        }
    }
}

/// Columns `k0..k0+kb` of `x (rows, k)` as tiles of [`MR`] rows, each `(kb, MR)`
/// row-major: the micro-kernel reads a tile's 12 values of one `k` contiguously. Rows
/// past the end are zeros.
fn pack_rows(x: &[f32], rows: usize, k: usize, k0: usize, kb: usize, packed: &mut [f32]) {
    for (t, tile) in packed.chunks_exact_mut(MR * kb).take(rows.div_ceil(MR)).enumerate() {
        for r in 0..MR {
            let row = t * MR + r;
            if row >= rows {
                for kk in 0..kb {
                    tile[kk * MR + r] = 0.0;
                }
                continue;
            }
            let src = &x[row * k + k0..][..kb];
            for (kk, &v) in src.iter().enumerate() {
                tile[kk * MR + r] = v;
            }
        }
    }
}

/// `dst[r][c] += Σ_kk a[kk][r] · b[kk][c]` for `r < rows`, `c < cols`: `a` is a packed
/// tile `(kb, MR)`, `b` a panel block `(kb, NR)`, `dst` row-major with row stride `ldd`.
///
/// # Safety
/// The CPU has AVX-512F; `dst` is valid for `rows` rows of `cols` floats at stride `ldd`.
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx512f")]
unsafe fn kernel(a: &[f32], b: &[f32], dst: *mut f32, ldd: usize, rows: usize, cols: usize) {
    use std::arch::x86_64::*;
    let kb = b.len() / NR;
    let mut acc = [[_mm512_setzero_ps(); 2]; MR];
    for kk in 0..kb {
        // SAFETY: kk < kb, so both vectors are inside this k's row of the panel block.
        let (b0, b1) = unsafe {
            (
                _mm512_loadu_ps(b.as_ptr().add(kk * NR)),
                _mm512_loadu_ps(b.as_ptr().add(kk * NR + 16)),
            )
        };
        let av = &a[kk * MR..][..MR];
        for (r, row) in acc.iter_mut().enumerate() {
            let x = _mm512_set1_ps(av[r]);
            row[0] = _mm512_fmadd_ps(x, b0, row[0]);
            row[1] = _mm512_fmadd_ps(x, b1, row[1]);
        }
    }
    let lo = if cols >= 16 { 0xffff } else { (1u32 << cols) as u16 - 1 };
    let hi = if cols >= 32 {
        0xffff
    } else if cols > 16 {
        (1u32 << (cols - 16)) as u16 - 1
    } else {
        0
    };
    for (r, row) in acc.iter().enumerate().take(rows) {
        // SAFETY: row r < rows of dst; the masks keep the accesses to its `cols` columns.
        unsafe {
            let p = dst.add(r * ldd);
            let d0 = _mm512_maskz_loadu_ps(lo, p);
            _mm512_mask_storeu_ps(p, lo, _mm512_add_ps(d0, row[0]));
            let d1 = _mm512_maskz_loadu_ps(hi, p.add(16));
            _mm512_mask_storeu_ps(p.add(16), hi, _mm512_add_ps(d1, row[1]));
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn reference(x: &[f32], w: &[f32], rows: usize, n: usize, k: usize, out: &mut [f32]) {
        for r in 0..rows {
            for c in 0..n {
                let dot: f64 =
                    (0..k).map(|i| f64::from(x[r * k + i]) * f64::from(w[c * k + i])).sum();
                out[r * n + c] += dot as f32;
            }
        }
    }

    /// Every edge: rows and columns not multiples of the tile, several `k` blocks, and
    /// the accumulation into what `out` holds; rows never depend on the other rows.
    #[test]
    fn packed_linear_matches_a_plain_product() {
        for &(rows, n, k) in &[(1, 1, 1), (13, 33, 7), (25, 64, 100), (12, 31, 1600), (40, 70, 769)]
        {
            let x: Vec<f32> = (0..rows * k).map(|i| ((i * 7 % 13) as f32 - 6.0) * 0.1).collect();
            let w: Vec<f32> = (0..n * k).map(|i| ((i * 5 % 11) as f32 - 5.0) * 0.05).collect();
            let start: Vec<f32> = (0..rows * n).map(|i| (i % 3) as f32).collect();
            let linear = PackedLinear::new(&w, n, k);
            assert_eq!(linear.to_row_major(), w);
            let mut want = start.clone();
            reference(&x, &w, rows, n, k, &mut want);
            for parallel in [false, true] {
                let mut got = start.clone();
                linear.apply(&x, rows, &mut got, parallel);
                for (g, w) in got.iter().zip(&want) {
                    assert!((g - w).abs() < 1e-4 * (1.0 + w.abs()), "{rows}x{n}x{k}: {g} vs {w}");
                }
                if rows > 1 {
                    let mut alone = start[n..2 * n].to_vec();
                    linear.apply(&x[k..2 * k], 1, &mut alone, parallel);
                    assert!(
                        alone.iter().zip(&got[n..2 * n]).all(|(a, b)| a.to_bits() == b.to_bits())
                    );
                }
            }
        }
    }
}
