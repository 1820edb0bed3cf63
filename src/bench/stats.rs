// SPDX-License-Identifier: Apache-2.0
//! Statistics over bench samples: min / median / p90 / max, the ratio of two medians, and
//! for `ember bench --ab` a two-sample permutation test with its verdict.
//!
//! With the handful of runs a boot benchmark can afford here, percentiles use the
//! nearest-rank method (p90 of 3 samples is the largest), and the median of an even count is
//! the mean of the two middle samples.
//!
//! The A/B test ([`compare_samples`]) follows Firecracker's A/B tooling: the statistic is the
//! difference of the means, its two-sided p-value comes from a permutation test (every split
//! of the pooled samples into groups of the two sizes when there are at most
//! [`EXACT_LIMIT`] of them, else [`MC_PERMUTATIONS`] random splits drawn with a fixed seed,
//! so the same samples always give the same p), and a change counts only when
//! `p <` [`AB_ALPHA`] and it is at least [`AB_NOISE`] of A's mean.

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

/// A change counts only when its p-value is below this.
pub const AB_ALPHA: f64 = 0.01;

/// A change counts only when it is at least this fraction of A's mean (the noise threshold).
pub const AB_NOISE: f64 = 0.05;

/// Splits enumerated exactly up to this many (`C(nA + nB, nA)`); beyond, random ones.
pub const EXACT_LIMIT: u64 = 200_000;

/// Random splits drawn when there are more than [`EXACT_LIMIT`].
pub const MC_PERMUTATIONS: u64 = 100_000;

/// Seed of the random splits (fixed: the same samples give the same p-value).
pub const MC_SEED: u64 = 0x5eed_ab7e_57ab_1e00;

/// The arithmetic mean of `samples`; `None` when there are none.
pub fn mean(samples: &[f64]) -> Option<f64> {
    (!samples.is_empty()).then(|| samples.iter().sum::<f64>() / samples.len() as f64)
}

/// `C(n, k)`, saturating at `u64::MAX`.
pub fn binomial(n: usize, k: usize) -> u64 {
    if k > n {
        return 0;
    }
    let k = k.min(n - k);
    let mut c: u128 = 1;
    for i in 0..k {
        // c * (n - i) / (i + 1) is C(n, i + 1): exact at every step.
        c = c * (n - i) as u128 / (i + 1) as u128;
        if c > u128::from(u64::MAX) {
            return u64::MAX;
        }
    }
    c as u64
}

/// The smallest two-sided p-value a permutation test of `na` against `nb` samples can give
/// (the groups as far apart as can be): `1 / C(na + nb, na)`, or twice that when the groups
/// are of the same size (swapping them gives the same distance); at most 1. With 5 and 5 it
/// is 2/252 = 0.0079; with 4 and 4, 2/70 = 0.029, so p < 0.01 cannot be reached; with 4 and
/// 5, 1/126 = 0.0079.
pub fn min_two_sided_p(na: usize, nb: usize) -> f64 {
    let tails = if na == nb { 2.0 } else { 1.0 };
    match binomial(na + nb, na) {
        0 => 1.0,
        c => (tails / c as f64).min(1.0),
    }
}

/// A small, fast, seedable random generator (SplitMix64), for the random splits.
#[derive(Debug, Clone)]
pub struct SplitMix64(u64);

impl SplitMix64 {
    /// A generator starting from `seed`.
    pub fn new(seed: u64) -> Self {
        Self(seed)
    }

    /// The next 64 random bits.
    pub fn next_u64(&mut self) -> u64 {
        self.0 = self.0.wrapping_add(0x9e37_79b9_7f4a_7c15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
        z ^ (z >> 31)
    }

    /// A number in `0..n` (`n` > 0), by multiply-and-shift (bias below 2^-50 for the sizes
    /// used here).
    pub fn below(&mut self, n: usize) -> usize {
        ((u128::from(self.next_u64()) * n as u128) >> 64) as usize
    }
}

/// How a p-value was found.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum PermutationMethod {
    /// Every split of the pooled samples.
    Exact,
    /// Random splits (the observed one counted too: p = (hits + 1) / (draws + 1)).
    MonteCarlo,
}

impl PermutationMethod {
    /// Name in reports.
    pub fn name(self) -> &'static str {
        match self {
            PermutationMethod::Exact => "exact",
            PermutationMethod::MonteCarlo => "monte-carlo",
        }
    }
}

/// The outcome of a permutation test.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct PermutationTest {
    /// Two-sided p-value: the share of splits whose difference of means is at least as far
    /// from 0 as the observed one.
    pub p: f64,
    /// How it was found.
    pub method: PermutationMethod,
    /// Splits looked at.
    pub permutations: u64,
}

/// The two-sided permutation test of the difference of means of `b` and `a`, with the
/// limits of `ember bench --ab`; `None` when either side has no sample.
pub fn permutation_test(a: &[f64], b: &[f64]) -> Option<PermutationTest> {
    permutation_test_with(a, b, EXACT_LIMIT, MC_PERMUTATIONS, MC_SEED)
}

/// [`permutation_test`] with its limits: exact when there are at most `exact_limit` splits,
/// else `draws` random ones from `seed`.
pub fn permutation_test_with(
    a: &[f64],
    b: &[f64],
    exact_limit: u64,
    draws: u64,
    seed: u64,
) -> Option<PermutationTest> {
    let (na, nb) = (a.len(), b.len());
    if na == 0 || nb == 0 || a.iter().chain(b).any(|x| !x.is_finite()) {
        return None;
    }
    let pool: Vec<f64> = a.iter().chain(b).copied().collect();
    let n = pool.len();
    let total: f64 = pool.iter().sum();
    // With the total fixed, a split is known by the sum of its A group.
    let diff = |sum_a: f64| (total - sum_a) / nb as f64 - sum_a / na as f64;
    let observed = diff(a.iter().sum()).abs();
    // Sums of the same numbers in another order differ in their last bits: a split as far
    // out as the observed one must count even so (ties, identical samples).
    let scale = pool.iter().fold(1.0_f64, |m, x| m.max(x.abs()));
    let at_least = |sum_a: f64| diff(sum_a).abs() >= observed - 1e-9 * scale;

    let splits = binomial(n, na);
    if splits <= exact_limit {
        // Every A group of na indices, in lexicographic order.
        let mut idx: Vec<usize> = (0..na).collect();
        let mut hits = 0u64;
        let mut seen = 0u64;
        loop {
            seen += 1;
            if at_least(idx.iter().map(|&i| pool[i]).sum()) {
                hits += 1;
            }
            // The rightmost index that can still move right.
            let Some(i) = (0..na).rev().find(|&i| idx[i] < n - na + i) else {
                break;
            };
            idx[i] += 1;
            for j in i + 1..na {
                idx[j] = idx[j - 1] + 1;
            }
        }
        return Some(PermutationTest {
            p: hits as f64 / seen as f64,
            method: PermutationMethod::Exact,
            permutations: seen,
        });
    }
    let mut rng = SplitMix64::new(seed);
    let mut shuffled = pool;
    let mut hits = 0u64;
    for _ in 0..draws {
        // A partial Fisher-Yates shuffle: the first na places are a uniform random A group.
        for i in 0..na {
            let j = i + rng.below(n - i);
            shuffled.swap(i, j);
        }
        if at_least(shuffled[..na].iter().sum()) {
            hits += 1;
        }
    }
    Some(PermutationTest {
        p: (hits + 1) as f64 / (draws + 1) as f64,
        method: PermutationMethod::MonteCarlo,
        permutations: draws,
    })
}

/// What a figure measures, for the wording of a verdict.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum MetricKind {
    /// A time: less is faster.
    Time,
    /// CPU time used.
    Cpu,
    /// Memory.
    Memory,
}

/// One figure of A against B.
#[derive(Debug, Clone, PartialEq)]
pub struct Comparison {
    /// A's samples.
    pub a: Summary,
    /// B's samples.
    pub b: Summary,
    /// A's mean.
    pub mean_a: f64,
    /// B's mean.
    pub mean_b: f64,
    /// `(mean B - mean A) / mean A`, in percent; `None` when A's mean is 0.
    pub change_pct: Option<f64>,
    /// The permutation test.
    pub test: PermutationTest,
}

impl Comparison {
    /// Whether p is below [`AB_ALPHA`].
    pub fn p_passes(&self) -> bool {
        self.test.p < AB_ALPHA
    }

    /// Whether the change is at least [`AB_NOISE`] (in either direction).
    pub fn threshold_passes(&self) -> bool {
        self.change_pct
            .is_some_and(|c| c.abs() >= AB_NOISE * 100.0 - 1e-9)
    }

    /// Whether the change counts: p below [`AB_ALPHA`] and at least [`AB_NOISE`].
    pub fn significant(&self) -> bool {
        self.p_passes() && self.threshold_passes()
    }

    /// The verdict, naming side B `b`: "B faster by 7.3 %", "B uses 12.0 % less memory",
    /// or "no significant change (...)" saying which condition failed.
    pub fn verdict(&self, kind: MetricKind, b: &str) -> String {
        let Some(change) = self.change_pct else {
            return "no relative change: A's mean is 0".into();
        };
        if self.significant() {
            let x = change.abs();
            let less = change < 0.0;
            return match kind {
                MetricKind::Time if less => format!("{b} faster by {x:.1} %"),
                MetricKind::Time => format!("{b} slower by {x:.1} %"),
                MetricKind::Cpu if less => format!("{b} uses {x:.1} % less CPU time"),
                MetricKind::Cpu => format!("{b} uses {x:.1} % more CPU time"),
                MetricKind::Memory if less => format!("{b} uses {x:.1} % less memory"),
                MetricKind::Memory => format!("{b} uses {x:.1} % more memory"),
            };
        }
        let mut why = Vec::new();
        if !self.p_passes() {
            why.push(format!("p = {} >= {AB_ALPHA}", fmt_p(self.test.p)));
        }
        if !self.threshold_passes() {
            why.push(format!(
                "|change| {:.1} % < {} %",
                change.abs(),
                AB_NOISE * 100.0
            ));
        }
        format!("no significant change ({})", why.join(", "))
    }
}

/// A p-value for a table: 4 decimals, or 2 significant digits below 0.001.
pub fn fmt_p(p: f64) -> String {
    if p < 0.001 {
        format!("{p:.1e}")
    } else {
        format!("{p:.4}")
    }
}

/// A against B: summaries, means, relative change and the permutation test; `None` when
/// either side has no (finite) sample.
pub fn compare_samples(a: &[f64], b: &[f64]) -> Option<Comparison> {
    let test = permutation_test(a, b)?;
    let (mean_a, mean_b) = (mean(a)?, mean(b)?);
    Some(Comparison {
        a: summarize(a)?,
        b: summarize(b)?,
        mean_a,
        mean_b,
        change_pct: (mean_a != 0.0).then(|| (mean_b - mean_a) / mean_a * 100.0),
        test,
    })
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

    fn exact(a: &[f64], b: &[f64]) -> PermutationTest {
        let t = permutation_test(a, b).unwrap();
        assert_eq!(t.method, PermutationMethod::Exact);
        t
    }

    #[test]
    fn binomials() {
        assert_eq!(binomial(10, 5), 252);
        assert_eq!(binomial(8, 4), 70);
        assert_eq!(binomial(5, 0), 1);
        assert_eq!(binomial(3, 4), 0);
        assert_eq!(binomial(40, 20), 137_846_528_820);
        assert_eq!(binomial(1000, 500), u64::MAX);
        assert!((min_two_sided_p(5, 5) - 2.0 / 252.0).abs() < 1e-15);
        assert!(min_two_sided_p(5, 5) < AB_ALPHA);
        assert!(min_two_sided_p(4, 4) >= AB_ALPHA);
        assert!((min_two_sided_p(4, 5) - 1.0 / 126.0).abs() < 1e-15);
        assert!(min_two_sided_p(3, 6) >= AB_ALPHA);
        assert!(min_two_sided_p(3, 7) < AB_ALPHA);
        assert_eq!(min_two_sided_p(1, 1), 1.0);
        assert_eq!(min_two_sided_p(0, 3), 1.0);
    }

    #[test]
    fn exact_p_of_small_known_cases() {
        // Fully separated groups of 5: only the observed split and its mirror are as far
        // apart, 2 of C(10, 5) = 252.
        let lo = [1.0, 2.0, 3.0, 4.0, 5.0];
        let hi = [6.0, 7.0, 8.0, 9.0, 10.0];
        let t = exact(&lo, &hi);
        assert_eq!(t.permutations, 252);
        assert!((t.p - 2.0 / 252.0).abs() < 1e-15, "{t:?}");
        // The order of the sides and of the samples does not matter.
        assert_eq!(exact(&hi, &lo).p, t.p);
        assert_eq!(exact(&[5.0, 3.0, 1.0, 4.0, 2.0], &hi).p, t.p);
        // 2 against 2 ([1, 2] vs [3, 4]): the 6 splits have differences of means
        // +-2 (twice), +-1 (twice) and 0 (twice): 2 of 6 are as far out.
        let t = exact(&[1.0, 2.0], &[3.0, 4.0]);
        assert_eq!(t.permutations, 6);
        assert!((t.p - 2.0 / 6.0).abs() < 1e-15, "{t:?}");
        // [1, 2, 4] vs [3, 5, 6]: sums of A groups of 3 out of 1..6; observed sum 7, mean
        // difference (21 - 7)/3 - 7/3 = 14/3 - 7/3 = 7/3. Splits with |21 - 2s| >= 7, that is
        // s <= 7 or s >= 14: {1,2,3}=6, {1,2,4}=7, and their complements: 4 of 20.
        let t = exact(&[1.0, 2.0, 4.0], &[3.0, 5.0, 6.0]);
        assert_eq!(t.permutations, 20);
        assert!((t.p - 4.0 / 20.0).abs() < 1e-15, "{t:?}");
        // Unequal sizes: [1] vs [2, 3]: A groups {1} (d = 2.5 - 1 = 1.5), {2} (d = 0),
        // {3} (d = -1.5): 2 of 3.
        let t = exact(&[1.0], &[2.0, 3.0]);
        assert!((t.p - 2.0 / 3.0).abs() < 1e-15, "{t:?}");
        // Unequal sizes far apart: swapped groups are not as far apart, so only the
        // observed split counts: 1 of C(9, 4) = 126, the smallest p of 4 against 5.
        let t = exact(&[1.0, 2.0, 3.0, 4.0], &[100.0, 101.0, 102.0, 103.0, 104.0]);
        assert!((t.p - 1.0 / 126.0).abs() < 1e-15, "{t:?}");
        assert_eq!(t.p, min_two_sided_p(4, 5));
    }

    #[test]
    fn identical_samples_and_ties_give_p_1() {
        let x = [20_512.3, 19_870.1, 21_004.9, 20_100.0, 19_999.5];
        assert_eq!(exact(&x, &x).p, 1.0);
        // All equal values: every split is a tie with the observed one.
        assert_eq!(exact(&[7.0; 4], &[7.0; 5]).p, 1.0);
        // [0.1, 0.1, 0.1] vs [0.1, 0.1, 0.2]: the 0.2 is in B or in A; both are as far out.
        // (0.1 is not exact in binary: sums in other orders differ in their last bits.)
        assert_eq!(exact(&[0.1, 0.1, 0.1], &[0.1, 0.1, 0.2]).p, 1.0);
        // Tied groups that are fully apart: as for distinct values, 2 of 252.
        let t = exact(&[1.0; 5], &[2.0; 5]);
        assert!((t.p - 2.0 / 252.0).abs() < 1e-15, "{t:?}");
        let c = compare_samples(&x, &x).unwrap();
        assert_eq!(c.change_pct, Some(0.0));
        assert!(c
            .verdict(MetricKind::Time, "B")
            .starts_with("no significant change (p = 1"));
    }

    #[test]
    fn a_shift_within_the_noise_is_not_significant() {
        // Boot times (ms) with about 2 % noise, B shifted by about +1 %.
        let a = [20_100.0, 20_600.0, 19_800.0, 20_300.0, 19_900.0];
        let b = [20_500.0, 20_000.0, 20_800.0, 20_200.0, 20_400.0];
        let c = compare_samples(&a, &b).unwrap();
        assert!(c.test.p > AB_ALPHA, "{c:?}");
        assert!(!c.significant());
        let v = c.verdict(MetricKind::Time, "B");
        assert!(v.starts_with("no significant change (p = "), "{v}");
        assert!(v.contains("|change| 1.2 % < 5 %"), "{v}");
    }

    #[test]
    fn verdicts_need_both_p_and_the_threshold() {
        // Fully apart, 10 % slower: significant.
        let a = [100.0, 101.0, 102.0, 103.0, 104.0];
        let b: Vec<f64> = a.iter().map(|x| x * 1.1).collect();
        let c = compare_samples(&a, &b).unwrap();
        assert!(c.significant(), "{c:?}");
        assert!((c.change_pct.unwrap() - 10.0).abs() < 1e-9);
        assert_eq!(c.verdict(MetricKind::Time, "new"), "new slower by 10.0 %");
        assert_eq!(
            c.verdict(MetricKind::Memory, "B"),
            "B uses 10.0 % more memory"
        );
        let c = compare_samples(&b, &a).unwrap();
        assert_eq!(c.verdict(MetricKind::Time, "B"), "B faster by 9.1 %");
        assert_eq!(
            c.verdict(MetricKind::Cpu, "B"),
            "B uses 9.1 % less CPU time"
        );
        // Fully apart but only 4.9 % apart: p passes, the threshold does not.
        let b2: Vec<f64> = a.iter().map(|x| x + 5.0).collect();
        let c = compare_samples(&a, &b2).unwrap();
        assert!(c.p_passes() && !c.threshold_passes(), "{c:?}");
        let v = c.verdict(MetricKind::Time, "B");
        assert!(v.starts_with("no significant change (|change|"), "{v}");
        assert!(!v.contains("p ="), "{v}");
        // 4 against 4, fully apart and 50 % slower: p = 2/70 cannot pass.
        let c = compare_samples(&a[..4], &[150.0, 151.0, 152.0, 153.0]).unwrap();
        assert!(!c.p_passes() && c.threshold_passes(), "{c:?}");
        let v = c.verdict(MetricKind::Time, "B");
        assert_eq!(v, "no significant change (p = 0.0286 >= 0.01)");
        // A's mean 0: no relative change.
        let c = compare_samples(&[0.0, 0.0], &[1.0, 2.0]).unwrap();
        assert_eq!(c.change_pct, None);
        assert!(!c.significant());
        assert!(compare_samples(&[], &[1.0]).is_none());
        assert!(compare_samples(&[f64::NAN], &[1.0]).is_none());
    }

    #[test]
    fn monte_carlo_agrees_with_the_exact_test() {
        // 9 against 9: C(18, 9) = 48620 splits, exact by default; forced random here.
        let a = [101.2, 99.8, 103.5, 100.1, 98.7, 102.9, 100.4, 101.7, 99.3];
        let b = [
            102.8, 101.9, 104.1, 100.9, 103.3, 101.1, 105.0, 102.2, 100.6,
        ];
        let exact = exact(&a, &b);
        assert_eq!(exact.permutations, 48_620);
        let mc = permutation_test_with(&a, &b, 1000, MC_PERMUTATIONS, MC_SEED).unwrap();
        assert_eq!(mc.method, PermutationMethod::MonteCarlo);
        assert_eq!(mc.permutations, MC_PERMUTATIONS);
        assert!(
            exact.p > 0.001 && exact.p < 0.2,
            "a case with a mid-size p: {exact:?}"
        );
        // The standard error of p from 100000 draws is below 0.0015 here.
        assert!((mc.p - exact.p).abs() < 0.005, "{mc:?} vs {exact:?}");
        // A fixed seed: the same samples give the same p.
        assert_eq!(
            permutation_test_with(&a, &b, 1000, MC_PERMUTATIONS, MC_SEED),
            Some(mc)
        );
        // Identical samples stay at p = 1 on the random path too.
        let mc = permutation_test_with(&a, &a, 1000, 1000, 1).unwrap();
        assert_eq!(mc.p, 1.0);
        // Large samples take the random path by default.
        let big: Vec<f64> = (0..40).map(f64::from).collect();
        let t = permutation_test(&big[..20], &big[20..]).unwrap();
        assert_eq!(t.method, PermutationMethod::MonteCarlo);
        assert!(
            (t.p - 1.0 / (MC_PERMUTATIONS + 1) as f64).abs() < 1e-12,
            "{t:?}"
        );
    }

    #[test]
    fn random_indices_are_in_range_and_spread() {
        let mut r = SplitMix64::new(42);
        let mut counts = [0u32; 7];
        for _ in 0..70_000 {
            counts[r.below(7)] += 1;
        }
        assert!(
            counts.iter().all(|&c| (9_000..11_000).contains(&c)),
            "{counts:?}"
        );
    }
}
