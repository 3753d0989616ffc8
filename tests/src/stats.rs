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

/// Count, median, p99 and minimum of repeated runs.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Summary {
    pub n: usize,
    pub median: f64,
    pub p99: f64,
    pub min: f64,
}

impl Summary {
    pub fn of(mut v: Vec<f64>) -> Self {
        v.sort_by(|a, b| a.total_cmp(b));
        Self {
            n: v.len(),
            median: percentile(&v, 0.5),
            p99: percentile(&v, 0.99),
            min: v.first().copied().unwrap_or(f64::NAN),
        }
    }
}

/// Prints `name`'s count, median, p99 and minimum; returns the summary.
pub fn summarise(name: &str, unit: &str, v: Vec<f64>) -> Summary {
    let s = Summary::of(v);
    println!(
        "{name:<52} n={:<3} median={:>9.2} {unit}  p99={:>9.2} {unit}  min={:>9.2} {unit}",
        s.n, s.median, s.p99, s.min
    );
    s
}

/// Prints `name`'s count, median, p99 and minimum; returns the median.
pub fn report(name: &str, unit: &str, v: Vec<f64>) -> f64 {
    summarise(name, unit, v).median
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
