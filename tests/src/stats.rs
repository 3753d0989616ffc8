//! Figures for the benchmark binaries: percentiles of repeated runs and the
//! one-line report each benchmark prints per measurement.

/// The `p` quantile (0..=1) of an ascending slice (NaN when empty).
pub fn percentile(sorted: &[f64], p: f64) -> f64 {
    if sorted.is_empty() {
        return f64::NAN;
    }
    let idx = ((sorted.len() as f64 - 1.0) * p).round() as usize;
    sorted[idx.min(sorted.len() - 1)]
}

/// Prints `name`'s count, median, p99 and minimum; returns the median.
pub fn report(name: &str, unit: &str, mut v: Vec<f64>) -> f64 {
    v.sort_by(|a, b| a.total_cmp(b));
    let median = percentile(&v, 0.5);
    println!(
        "{name:<44} n={:<3} median={:>9.2} {unit}  p99={:>9.2} {unit}  min={:>9.2} {unit}",
        v.len(),
        median,
        percentile(&v, 0.99),
        v.first().copied().unwrap_or(f64::NAN)
    );
    median
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn percentiles_of_a_small_sample() {
        let v = [1.0, 2.0, 3.0, 4.0, 5.0];
        assert_eq!(percentile(&v, 0.5), 3.0);
        assert_eq!(percentile(&v, 0.99), 5.0);
        assert!(percentile(&[], 0.5).is_nan());
        assert_eq!(report("x", "ms", vec![3.0, 1.0, 2.0]), 2.0);
    }
}
