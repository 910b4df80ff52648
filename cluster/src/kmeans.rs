//! k-means on the unit-norm document embeddings: c-BTM's third stage (Gururangan et al. 2023,
//! §2.1), seeded and deterministic.
//!
//! - **Initialisation**: k-means++ (Arthur & Vassilvitskii 2007): the first centre uniform,
//!   each next one drawn with probability proportional to the squared distance to the nearest
//!   centre so far.
//! - **Plain** (Lloyd): each point to its nearest centroid, centroids to their points' means,
//!   until no assignment changes. A cluster left empty restarts at the point farthest from
//!   its centroid.
//! - **Balanced**: c-BTM fits its clusters under a size constraint so that every expert gets a
//!   similar share of the data (§2.1: "balanced k-means"; the reference uses an auction
//!   algorithm). Here the assignment step is greedy by distance rank: all (point, cluster)
//!   pairs are visited from the nearest up, a point taking the first cluster on its list that
//!   still has room ([`Capacity`]). With `balance = 1` the sizes are exactly ⌊n/k⌋ or ⌈n/k⌉;
//!   with `balance = b > 1` each is at most ⌈b·n/k⌉. The centroid step is Lloyd's.
//!
//! Squared Euclidean distance throughout (the reference's `kmeans_pytorch`; on unit vectors
//! it orders points as cosine similarity does). Every parallel step computes each point
//! independently and every sum runs in a fixed order, so a seed gives one result whatever the
//! number of threads.

use crate::error::ClusterError;
use anyhow::Result;
use btm_trainer::data::SplitMix64;
use rayon::prelude::*;
use std::cmp::Reverse;
use std::collections::BinaryHeap;

/// Settings of a k-means fit.
#[derive(Debug, Clone, PartialEq)]
pub struct KMeansOptions {
    /// Clusters.
    pub k: usize,
    /// `None`: plain k-means. `Some(b)`, `b ≥ 1`: balanced, no cluster above ⌈b·n/k⌉ points
    /// (`b = 1`: sizes ⌊n/k⌋ or ⌈n/k⌉).
    pub balance: Option<f64>,
    /// Most Lloyd iterations.
    pub max_iter: usize,
    /// Seed of the k-means++ draws.
    pub seed: u64,
}

impl Default for KMeansOptions {
    fn default() -> Self {
        Self { k: 8, balance: Some(1.0), max_iter: 100, seed: 0 }
    }
}

/// A fitted k-means.
#[derive(Debug, Clone)]
pub struct KMeans {
    /// `k × dims` centroids, row-major.
    pub centroids: Vec<f32>,
    /// Each point's cluster.
    pub assignments: Vec<u32>,
    /// Lloyd iterations run.
    pub iterations: usize,
    /// Sum of squared distances of the points to their centroids.
    pub inertia: f64,
}

/// Fit k-means to `points` (`n × dims`, row-major).
pub fn fit(points: &[f32], dims: usize, options: &KMeansOptions) -> Result<KMeans> {
    let (n, k) = (points.len() / dims.max(1), options.k);
    anyhow::ensure!(k >= 1, "k must be at least 1");
    if k > n {
        return Err(ClusterError::TooFewDocuments { k, documents: n }.into());
    }
    if let Some(b) = options.balance {
        anyhow::ensure!(b >= 1.0 && b.is_finite(), "the balance factor must be at least 1, not {b}");
    }
    let mut rng = SplitMix64::new(&[options.seed, 0x4b4d_4541_4e53]);
    let mut centroids = kmeans_plus_plus(points, dims, k, &mut rng);
    let mut assignments = vec![u32::MAX; n];
    let mut iterations = 0;
    let mut dist = distances(points, &centroids, dims);
    while iterations < options.max_iter.max(1) {
        iterations += 1;
        let next = match options.balance {
            Some(b) => assign_balanced(&dist, k, Capacity::new(n, k, b)),
            None => dist.par_chunks(k).map(|d| argmin(d) as u32).collect(),
        };
        let changed = next != assignments;
        assignments = next;
        let (next_centroids, reseeded) = update(points, dims, &assignments, k, &dist);
        centroids = next_centroids;
        dist = distances(points, &centroids, dims);
        if !changed && !reseeded {
            break;
        }
    }
    let inertia = assignments.iter().enumerate().map(|(i, &c)| f64::from(dist[i * k + c as usize])).sum();
    Ok(KMeans { centroids, assignments, iterations, inertia })
}

/// How many points each cluster may take in balanced k-means.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Capacity {
    low: usize,
    high: usize,
    /// Clusters that may still grow from `low` to `high`.
    high_slots: usize,
}

impl Capacity {
    /// The capacities for `n` points in `k` clusters under balance factor `balance` (≥ 1).
    pub fn new(n: usize, k: usize, balance: f64) -> Self {
        if balance <= 1.0 {
            // Exactly n mod k clusters get the extra point: sizes ⌊n/k⌋ or ⌈n/k⌉.
            Self { low: n / k, high: n.div_ceil(k), high_slots: n % k }
        } else {
            let cap = ((balance * n as f64 / k as f64).ceil() as usize).max(n.div_ceil(k));
            Self { low: cap, high: cap, high_slots: 0 }
        }
    }

    /// The largest size a cluster may reach.
    pub fn max(&self) -> usize {
        self.high
    }

    /// Give a cluster now of `size` points one more, if it has room.
    fn take(&mut self, size: &mut usize) -> bool {
        if *size < self.low {
            *size += 1;
            true
        } else if *size < self.high && self.high_slots > 0 {
            *size += 1;
            self.high_slots -= 1;
            true
        } else {
            false
        }
    }
}

/// Balanced assignment, greedy by distance rank (module docs). `dist` is `n × k`. The total
/// capacity is at least `n` at every step, so every point finds room.
fn assign_balanced(dist: &[f32], k: usize, mut capacity: Capacity) -> Vec<u32> {
    let n = dist.len() / k;
    // Each point's clusters, nearest first (ties by index).
    let order: Vec<u32> = dist
        .par_chunks(k)
        .flat_map_iter(|d| {
            let mut o: Vec<u32> = (0..k as u32).collect();
            o.sort_by(|&a, &b| d[a as usize].total_cmp(&d[b as usize]).then(a.cmp(&b)));
            o
        })
        .collect();
    // Non-negative floats order as their bit patterns; ties go to the lower point index.
    let key = |i: usize, rank: usize| {
        let d = dist[i * k + order[i * k + rank] as usize];
        Reverse((if d > 0.0 { d.to_bits() } else { 0 }, i as u32, rank as u32))
    };
    let mut heap: BinaryHeap<_> = (0..n).map(|i| key(i, 0)).collect();
    let (mut sizes, mut out) = (vec![0usize; k], vec![0u32; n]);
    while let Some(Reverse((_, i, rank))) = heap.pop() {
        let (i, rank) = (i as usize, rank as usize);
        let c = order[i * k + rank];
        if capacity.take(&mut sizes[c as usize]) {
            out[i] = c;
        } else {
            assert!(rank + 1 < k, "balanced k-means: the clusters' capacity is below the number of points");
            heap.push(key(i, rank + 1));
        }
    }
    out
}

/// Centroids as their points' means; an empty cluster restarts at the point farthest from its
/// own centroid (each such point used once). Also says whether any cluster was empty.
fn update(points: &[f32], dims: usize, assignments: &[u32], k: usize, dist: &[f32]) -> (Vec<f32>, bool) {
    let mut sums = vec![0f64; k * dims];
    let mut counts = vec![0usize; k];
    for (p, &c) in points.chunks(dims).zip(assignments) {
        counts[c as usize] += 1;
        for (s, &x) in sums[c as usize * dims..(c as usize + 1) * dims].iter_mut().zip(p) {
            *s += f64::from(x);
        }
    }
    let mut centroids: Vec<f32> =
        sums.chunks(dims).zip(&counts).flat_map(|(s, &n)| s.iter().map(move |x| if n > 0 { (x / n as f64) as f32 } else { 0.0 })).collect();
    let empty: Vec<usize> = (0..k).filter(|&c| counts[c] == 0).collect();
    if !empty.is_empty() {
        let mut far: Vec<usize> = (0..assignments.len()).collect();
        let own = |i: usize| dist[i * k + assignments[i] as usize];
        far.sort_by(|&a, &b| own(b).total_cmp(&own(a)).then(a.cmp(&b)));
        for (c, i) in empty.into_iter().zip(far) {
            centroids[c * dims..(c + 1) * dims].copy_from_slice(&points[i * dims..(i + 1) * dims]);
        }
        return (centroids, true);
    }
    (centroids, false)
}

/// k-means++ seeding (module docs).
fn kmeans_plus_plus(points: &[f32], dims: usize, k: usize, rng: &mut SplitMix64) -> Vec<f32> {
    let n = points.len() / dims;
    let point = |i: usize| &points[i * dims..(i + 1) * dims];
    let first = rng.below(n as u64) as usize;
    let mut centroids = point(first).to_vec();
    let mut d2: Vec<f64> = (0..n).into_par_iter().map(|i| f64::from(sq_dist(point(i), point(first)))).collect();
    for _ in 1..k {
        let total: f64 = d2.iter().sum();
        let pick = if total > 0.0 {
            let target = rng.next_f64() * total;
            let mut acc = 0.0;
            d2.iter()
                .position(|&d| {
                    acc += d;
                    acc > target
                })
                // Rounding can leave the target just above the running sum: the last candidate.
                .unwrap_or_else(|| d2.iter().rposition(|&d| d > 0.0).unwrap_or(n - 1))
        } else {
            rng.below(n as u64) as usize
        };
        let new = point(pick).to_vec();
        d2.par_iter_mut().enumerate().for_each(|(i, d)| *d = d.min(f64::from(sq_dist(point(i), &new))));
        centroids.extend(new);
    }
    centroids
}

/// Squared distances of every point to every centroid: `n × k`, row-major.
pub fn distances(points: &[f32], centroids: &[f32], dims: usize) -> Vec<f32> {
    points.par_chunks(dims).flat_map_iter(|p| centroids.chunks(dims).map(move |c| sq_dist(p, c))).collect()
}

/// `‖a − b‖²`.
pub fn sq_dist(a: &[f32], b: &[f32]) -> f32 {
    a.iter().zip(b).map(|(x, y)| (x - y) * (x - y)).sum()
}

/// The index of the smallest value (the first of equals).
pub fn argmin(v: &[f32]) -> usize {
    v.iter().enumerate().fold(0, |best, (i, x)| if *x < v[best] { i } else { best })
}

#[cfg(test)]
mod tests {
    use super::*;

    /// `n` points in 2-D around `centres`, a point's centre chosen round-robin.
    fn blobs(centres: &[(f32, f32)], n: usize, seed: u64) -> Vec<f32> {
        let mut rng = SplitMix64::new(&[seed]);
        (0..n)
            .flat_map(|i| {
                let (x, y) = centres[i % centres.len()];
                [x + (rng.next_f64() as f32 - 0.5) * 0.2, y + (rng.next_f64() as f32 - 0.5) * 0.2]
            })
            .collect()
    }

    fn sizes(a: &[u32], k: usize) -> Vec<usize> {
        (0..k).map(|c| a.iter().filter(|&&x| x as usize == c).count()).collect()
    }

    #[test]
    fn plain_kmeans_finds_well_separated_blobs() {
        let pts = blobs(&[(0.0, 0.0), (5.0, 5.0), (0.0, 5.0)], 300, 1);
        let km = fit(&pts, 2, &KMeansOptions { k: 3, balance: None, ..Default::default() }).unwrap();
        // Points of one blob share a cluster, and the three blobs have three clusters.
        for b in 0..3 {
            let c = km.assignments[b];
            assert!((b..300).step_by(3).all(|i| km.assignments[i] == c));
        }
        assert_eq!(sizes(&km.assignments, 3), [100, 100, 100]);
    }

    /// Blobs of 200, 60 and 40 points: plain k-means follows them, balanced k-means holds every
    /// cluster within its bound (exactly ⌊n/k⌋ or ⌈n/k⌉ at balance 1, ⌈1.5·n/k⌉ at most at 1.5).
    #[test]
    fn balanced_kmeans_keeps_every_cluster_within_its_bound() {
        let mut pts = blobs(&[(0.0, 0.0)], 200, 2);
        pts.extend(blobs(&[(4.0, 0.0)], 60, 3));
        pts.extend(blobs(&[(0.0, 4.0)], 41, 4));
        let n = 301;
        let plain = fit(&pts, 2, &KMeansOptions { k: 3, balance: None, ..Default::default() }).unwrap();
        let mut s = sizes(&plain.assignments, 3);
        s.sort();
        assert_eq!(s, [41, 60, 200]);
        for (balance, bound) in [(1.0, 101), (1.5, 151)] {
            let km = fit(&pts, 2, &KMeansOptions { k: 3, balance: Some(balance), ..Default::default() }).unwrap();
            let s = sizes(&km.assignments, 3);
            assert_eq!(Capacity::new(n, 3, balance).max(), bound);
            assert!(s.iter().all(|&x| x <= bound), "balance {balance}: {s:?}");
            assert_eq!(s.iter().sum::<usize>(), n);
            if balance == 1.0 {
                assert!(s.iter().all(|&x| x == 100 || x == 101), "{s:?}");
            }
        }
    }

    #[test]
    fn the_same_seed_gives_the_same_clusters() {
        let pts = blobs(&[(0.0, 0.0), (1.0, 1.0), (0.0, 1.0), (1.0, 0.0)], 400, 5);
        for balance in [None, Some(1.0)] {
            let a = fit(&pts, 2, &KMeansOptions { k: 5, balance, seed: 3, ..Default::default() }).unwrap();
            let b = fit(&pts, 2, &KMeansOptions { k: 5, balance, seed: 3, ..Default::default() }).unwrap();
            assert_eq!(a.assignments, b.assignments);
            assert_eq!(a.centroids, b.centroids);
        }
    }

    #[test]
    fn more_clusters_than_points_is_a_named_error() {
        let e = fit(&[0.0, 1.0, 2.0, 3.0], 2, &KMeansOptions { k: 3, ..Default::default() }).unwrap_err();
        assert!(matches!(e.downcast_ref::<ClusterError>(), Some(ClusterError::TooFewDocuments { k: 3, documents: 2 })), "{e}");
        // k = n works: every point its own cluster.
        let km = fit(&[0.0, 1.0, 2.0, 3.0], 2, &KMeansOptions { k: 2, balance: None, ..Default::default() }).unwrap();
        assert_ne!(km.assignments[0], km.assignments[1]);
    }
}
