//! Statistics shared by the zoo's training report and the quality benchmark: correlation,
//! ranks and the Mann-Whitney AUC. One copy of each, on `f64`.

/// Pearson correlation of the common prefix of `x` and `y`; 0 when fewer than two values
/// or either side is constant.
pub fn pearson(x: &[f64], y: &[f64]) -> f64 {
    let n = x.len().min(y.len()) as f64;
    if n < 2.0 {
        return 0.0;
    }
    let mean = |v: &[f64]| v.iter().take(n as usize).sum::<f64>() / n;
    let (mx, my) = (mean(x), mean(y));
    let (mut cov, mut vx, mut vy) = (0.0, 0.0, 0.0);
    for (&a, &b) in x.iter().zip(y) {
        let (dx, dy) = (a - mx, b - my);
        cov += dx * dy;
        vx += dx * dx;
        vy += dy * dy;
    }
    if vx <= 0.0 || vy <= 0.0 { 0.0 } else { cov / (vx * vy).sqrt() }
}

/// Ranks from 1, ties sharing their mean rank.
pub fn ranks(x: &[f64]) -> Vec<f64> {
    let mut order: Vec<usize> = (0..x.len()).collect();
    order.sort_by(|&a, &b| x[a].total_cmp(&x[b]));
    let mut r = vec![0.0; x.len()];
    let mut i = 0;
    while i < order.len() {
        let mut j = i;
        while j + 1 < order.len() && x[order[j + 1]] == x[order[i]] {
            j += 1;
        }
        let mean = (i + j) as f64 / 2.0 + 1.0;
        for &k in &order[i..=j] {
            r[k] = mean;
        }
        i = j + 1;
    }
    r
}

/// Spearman's rank correlation: Pearson's on the ranks.
pub fn spearman(x: &[f64], y: &[f64]) -> f64 {
    pearson(&ranks(x), &ranks(y))
}

/// The probability that a positive scores above a negative (Mann-Whitney U / (n m); ties
/// count one half). NaN when either side is empty.
pub fn auc(positives: &[f64], negatives: &[f64]) -> f64 {
    if positives.is_empty() || negatives.is_empty() {
        return f64::NAN;
    }
    let mut sorted: Vec<f64> = negatives.to_vec();
    sorted.sort_by(f64::total_cmp);
    let mut wins = 0.0;
    for &p in positives {
        let below = sorted.partition_point(|&n| n < p);
        let equal = sorted[below..].partition_point(|&n| n <= p);
        wins += below as f64 + 0.5 * equal as f64;
    }
    wins / (positives.len() as f64 * negatives.len() as f64)
}

/// [`auc`] of `scores` split by `positive`.
pub fn auc_of(scores: &[f64], positive: &[bool]) -> f64 {
    let (mut yes, mut no) = (Vec::new(), Vec::new());
    for (&s, &p) in scores.iter().zip(positive) {
        if p { yes.push(s) } else { no.push(s) }
    }
    auc(&yes, &no)
}

/// Widens `f32` values for the functions above.
pub fn widen(values: &[f32]) -> Vec<f64> {
    values.iter().map(|&v| f64::from(v)).collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn auc_counts_pairs_and_ties() {
        assert_eq!(auc(&[3.0, 4.0], &[1.0, 2.0]), 1.0);
        assert_eq!(auc(&[1.0], &[2.0]), 0.0);
        assert_eq!(auc(&[1.0], &[1.0]), 0.5);
        assert_eq!(auc(&[2.0, 0.0], &[1.0, 1.0]), 0.5);
        assert!(auc(&[], &[1.0]).is_nan());
        assert!((auc_of(&[0.1, 0.4, 0.35, 0.8], &[false, false, true, true]) - 0.75).abs() < 1e-12);
    }

    #[test]
    fn correlations_and_ranks() {
        assert!((pearson(&[1.0, 2.0, 3.0], &[2.0, 4.0, 6.0]) - 1.0).abs() < 1e-12);
        assert_eq!(pearson(&[1.0, 1.0], &[1.0, 2.0]), 0.0);
        assert_eq!(pearson(&[1.0], &[1.0]), 0.0);
        assert!((spearman(&[1.0, 2.0, 3.0, 4.0], &[10.0, 20.0, 25.0, 100.0]) - 1.0).abs() < 1e-12);
        assert_eq!(ranks(&[3.0, 1.0, 3.0]), vec![2.5, 1.0, 2.5]);
    }
}
