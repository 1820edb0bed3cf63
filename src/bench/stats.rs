// SPDX-License-Identifier: Apache-2.0
//! Statistics over bench samples: min / median / p90 / max, and the ratio of two medians.
//!
//! With the handful of runs a boot benchmark can afford here, percentiles use the
//! nearest-rank method (p90 of 3 samples is the largest), and the median of an even count is
//! the mean of the two middle samples.

/// Summary of a set of samples.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Summary {
    /// Number of samples.
    pub n: usize,
    /// Smallest.
    pub min: f64,
    /// Median.
    pub median: f64,
    /// 90th percentile (nearest rank).
    pub p90: f64,
    /// Largest.
    pub max: f64,
}

/// Summarizes `samples` (NaNs are ignored); `None` when there are none.
pub fn summarize(samples: &[f64]) -> Option<Summary> {
    let mut v: Vec<f64> = samples.iter().copied().filter(|x| !x.is_nan()).collect();
    if v.is_empty() {
        return None;
    }
    v.sort_by(f64::total_cmp);
    let n = v.len();
    let median = if n % 2 == 1 {
        v[n / 2]
    } else {
        (v[n / 2 - 1] + v[n / 2]) / 2.0
    };
    Some(Summary {
        n,
        min: v[0],
        median,
        p90: percentile_sorted(&v, 90.0),
        max: v[n - 1],
    })
}

/// The nearest-rank percentile `p` (0..=100) of sorted, non-empty samples.
fn percentile_sorted(sorted: &[f64], p: f64) -> f64 {
    let n = sorted.len();
    // Rank ceil(p/100 * n), 1-based; clamp to 1..=n.
    let rank = ((p / 100.0) * n as f64).ceil().max(1.0) as usize;
    sorted[rank.min(n) - 1]
}

/// `peer / ours`, when both are positive.
pub fn ratio(peer: f64, ours: f64) -> Option<f64> {
    (peer > 0.0 && ours > 0.0 && peer.is_finite() && ours.is_finite()).then(|| peer / ours)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn summaries_of_recorded_samples() {
        // Boot-timer times (ms) of five real runs.
        let s = summarize(&[20_512.3, 19_870.1, 21_004.9, 20_100.0, 19_999.5]).unwrap();
        assert_eq!(s.n, 5);
        assert_eq!(s.min, 19_870.1);
        assert_eq!(s.median, 20_100.0);
        assert_eq!(s.p90, 21_004.9);
        assert_eq!(s.max, 21_004.9);

        let s = summarize(&[4.0, 1.0, 3.0, 2.0]).unwrap();
        assert_eq!(s.median, 2.5);
        assert_eq!(s.p90, 4.0);

        let ten: Vec<f64> = (1..=10).map(f64::from).collect();
        assert_eq!(summarize(&ten).unwrap().p90, 9.0);
        let one = summarize(&[7.0]).unwrap();
        assert_eq!(
            (one.min, one.median, one.p90, one.max),
            (7.0, 7.0, 7.0, 7.0)
        );
    }

    #[test]
    fn nothing_to_summarize() {
        assert_eq!(summarize(&[]), None);
        assert_eq!(summarize(&[f64::NAN]), None);
        assert_eq!(summarize(&[f64::NAN, 2.0]).unwrap().n, 1);
    }

    #[test]
    fn ratios() {
        assert_eq!(ratio(30.0, 20.0), Some(1.5));
        assert_eq!(ratio(30.0, 0.0), None);
        assert_eq!(ratio(-1.0, 2.0), None);
    }
}
