//! Truncated SVD of a sparse matrix by the randomized range finder (Halko, Martinsson and Tropp
//! 2011, "Finding structure with randomness", Algorithms 4.4 and 5.1): c-BTM's second stage
//! (scikit-learn's `TruncatedSVD(n_components=100)`: 10 oversamples, 5 power iterations, no
//! centring). Pure Rust, in `f64`:
//!
//! 1. `Y = A Ω` for a seeded Gaussian `Ω` of `l = dims + oversamples` columns; `Q = orth(Y)`;
//! 2. `q` power iterations, re-orthonormalised each step: `Q = orth(A Aᵀ Q)`;
//! 3. `Bᵀ = Aᵀ Q` (`terms × l`), factored `Bᵀ = Q_b R_b` (Gram–Schmidt);
//! 4. one-sided Jacobi on `R_bᵀ` finds the rotation `J` that makes its columns orthogonal, so
//!    `R_b = J Σ Ũᵀ` and the right singular vectors of `B` (≈ of `A`) are `Q_b J`.
//!
//! Step 4 works on an `l × l` matrix and never squares `A`'s condition number. Components come
//! out by decreasing singular value, each signed so its largest entry is positive (scikit-learn's
//! `svd_flip`), and those with a singular value below `1e-9` of the largest are dropped (the
//! sample's rank may be below `dims`). [`jacobi_svd`] on a dense matrix is the exact reference
//! the tests hold the randomized path to.

use crate::matrix::{axpy, dot, ColMat, Csr};
use btm_trainer::data::SplitMix64;
use rayon::prelude::*;

/// Settings of the randomized SVD.
#[derive(Debug, Clone, PartialEq)]
pub struct SvdOptions {
    /// Components wanted (c-BTM: 100).
    pub dims: usize,
    /// Extra random directions sampled beyond `dims` (Halko et al.: 5–10).
    pub oversamples: usize,
    /// Power iterations (scikit-learn's default for `TruncatedSVD`: 5).
    pub power_iters: usize,
    /// Seed of the Gaussian test matrix.
    pub seed: u64,
}

impl Default for SvdOptions {
    fn default() -> Self {
        Self { dims: 100, oversamples: 10, power_iters: 5, seed: 0 }
    }
}

/// A truncated SVD's right side: `A ≈ U diag(singular_values) componentsᵀ`.
#[derive(Debug, Clone)]
pub struct Svd {
    /// Singular values, decreasing.
    pub singular_values: Vec<f64>,
    /// The right singular vectors, one a column (`A.cols × singular_values.len()`).
    pub components: ColMat,
}

/// The leading right singular vectors of `a` (see the module docs).
pub fn randomized_svd(a: &Csr, options: &SvdOptions) -> Svd {
    let l = (options.dims + options.oversamples).min(a.rows()).min(a.cols()).max(1);
    let mut rng = SplitMix64::new(&[options.seed, 0x5356_445f]);
    let omega = ColMat { rows: a.cols(), cols: l, data: (0..a.cols() * l).map(|_| gaussian(&mut rng)).collect() };
    let mut q = a.mul(&omega);
    drop(omega);
    orthonormalize(&mut q);
    for _ in 0..options.power_iters {
        // Orthonormalised once per A Aᵀ step, on the document side only (the term side is
        // the wide one): in f64, one step's squared condition number (σ₁/σ_l)² stays many
        // orders of magnitude from the precision limit for tf-idf spectra.
        q = a.mul(&a.t_mul(&q));
        orthonormalize(&mut q);
    }
    let mut qb = a.t_mul(&q);
    let rb = orthonormalize(&mut qb);
    let (sigma, j) = jacobi_svd(&rb.transpose());
    let right = qb.matmul(&j);
    drop(qb);
    truncate(sigma, &right, options.dims)
}

/// The exact SVD's right side of a dense matrix by one-sided Jacobi: `(σ, J)` with `g · J`
/// having orthogonal columns of norms `σ`, so `g = Ũ diag(σ) Jᵀ`. `σ` is in column order, not
/// sorted; `J` is orthogonal.
pub fn jacobi_svd(g: &ColMat) -> (Vec<f64>, ColMat) {
    let n = g.cols;
    let mut g = g.clone();
    let mut j = ColMat::zeros(n, n);
    for i in 0..n {
        j.data[i * n + i] = 1.0;
    }
    for _sweep in 0..100 {
        let mut rotated = false;
        for p in 0..n {
            for q in p + 1..n {
                rotated |= rotate(&mut g, &mut j, p, q);
            }
        }
        if !rotated {
            break;
        }
    }
    let sigma = (0..n).map(|c| dot(g.col(c), g.col(c)).sqrt()).collect();
    (sigma, j)
}

/// One Jacobi rotation making columns `p` and `q` of `g` orthogonal (applied to `j` as well);
/// false when they already are, to working precision.
fn rotate(g: &mut ColMat, j: &mut ColMat, p: usize, q: usize) -> bool {
    let (alpha, beta, gamma) = (dot(g.col(p), g.col(p)), dot(g.col(q), g.col(q)), dot(g.col(p), g.col(q)));
    if gamma == 0.0 || gamma.abs() <= 1e-15 * (alpha * beta).sqrt() {
        return false;
    }
    // Golub & Van Loan §8.5: t the smaller root of t² + 2ζt − 1 = 0.
    let zeta = (beta - alpha) / (2.0 * gamma);
    let t = zeta.signum() / (zeta.abs() + (1.0 + zeta * zeta).sqrt());
    let c = 1.0 / (1.0 + t * t).sqrt();
    let s = c * t;
    for m in [g, j] {
        let rows = m.rows;
        let (lo, hi) = m.data.split_at_mut(q * rows);
        let (cp, cq) = (&mut lo[p * rows..(p + 1) * rows], &mut hi[..rows]);
        for (x, y) in cp.iter_mut().zip(cq.iter_mut()) {
            let (a, b) = (*x, *y);
            *x = c * a - s * b;
            *y = s * a + c * b;
        }
    }
    true
}

/// Orthonormalize `m`'s columns in place by classical Gram–Schmidt applied twice (CGS2, as
/// stable as modified Gram–Schmidt: Giraud et al. 2005, "twice is enough"), and return `R`
/// (`cols × cols`, upper triangular) with `m_before = m_after · R`. A column dependent on
/// those before it becomes zero. The projections of a column run in parallel (its dot
/// products, then its update a block of rows at a time), each a fixed sequence of operations.
pub fn orthonormalize(m: &mut ColMat) -> ColMat {
    const ROWS_PER_TASK: usize = 4096;
    let (rows, cols) = (m.rows, m.cols);
    let mut r = ColMat::zeros(cols, cols);
    for c in 0..cols {
        let (done, rest) = m.data.split_at_mut(c * rows);
        let done = &*done;
        let v = &mut rest[..rows];
        let original = dot(v, v).sqrt();
        for _pass in 0..2 {
            let h: Vec<f64> = done.par_chunks(rows.max(1)).map(|q| dot(q, v)).collect();
            v.par_chunks_mut(ROWS_PER_TASK).enumerate().for_each(|(block, vb)| {
                let from = block * ROWS_PER_TASK;
                for (i, &hi) in h.iter().enumerate() {
                    axpy(-hi, &done[i * rows + from..i * rows + from + vb.len()], vb);
                }
            });
            for (i, hi) in h.into_iter().enumerate() {
                r.data[c * cols + i] += hi;
            }
        }
        let norm = dot(v, v).sqrt();
        if norm > 1e-10 * original && norm > 0.0 {
            v.iter_mut().for_each(|x| *x /= norm);
            r.data[c * cols + c] = norm;
        } else {
            v.iter_mut().for_each(|x| *x = 0.0);
        }
    }
    r
}

/// The `dims` columns of `right` with the largest `sigma` (non-negligible ones only), sorted
/// and sign-fixed.
fn truncate(sigma: Vec<f64>, right: &ColMat, dims: usize) -> Svd {
    let mut order: Vec<usize> = (0..sigma.len()).collect();
    order.sort_by(|&a, &b| sigma[b].total_cmp(&sigma[a]).then(a.cmp(&b)));
    let top = sigma.iter().copied().fold(0.0f64, f64::max);
    order.retain(|&i| sigma[i] > 1e-9 * top);
    order.truncate(dims);
    let mut components = ColMat::zeros(right.rows, order.len());
    for (k, &i) in order.iter().enumerate() {
        let col = components.col_mut(k);
        col.copy_from_slice(right.col(i));
        // svd_flip: the entry of largest magnitude (the first such) is positive.
        let big = col.iter().enumerate().fold(0, |best, (r, x)| if x.abs() > col[best].abs() { r } else { best });
        if col[big] < 0.0 {
            col.iter_mut().for_each(|x| *x = -*x);
        }
    }
    Svd { singular_values: order.iter().map(|&i| sigma[i]).collect(), components }
}

/// A standard normal draw (Box–Muller), from a generator whose stream never changes.
fn gaussian(rng: &mut SplitMix64) -> f64 {
    let u1 = 1.0 - rng.next_f64(); // (0, 1]
    let u2 = rng.next_f64();
    (-2.0 * u1.ln()).sqrt() * (std::f64::consts::TAU * u2).cos()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn close(a: f64, b: f64, tol: f64) -> bool {
        (a - b).abs() <= tol
    }

    /// A = [[3, 0], [4, 5]]: AᵀA = [[25, 20], [20, 25]], eigenvalues 45 and 5, so σ = 3√5 and
    /// √5 with right singular vectors (1, 1)/√2 and (1, −1)/√2.
    #[test]
    fn a_two_by_two_matches_the_hand_computation() {
        let a = Csr::from_rows(&[vec![(0, 3.0)], vec![(0, 4.0), (1, 5.0)]], 2);
        let svd = randomized_svd(&a, &SvdOptions { dims: 2, ..Default::default() });
        let h = std::f64::consts::FRAC_1_SQRT_2;
        assert!(close(svd.singular_values[0], 45f64.sqrt(), 1e-9) && close(svd.singular_values[1], 5f64.sqrt(), 1e-9));
        let v0 = svd.components.col(0);
        assert!(close(v0[0], h, 1e-9) && close(v0[1], h, 1e-9), "{v0:?}");
        let v1 = svd.components.col(1);
        assert!(close(v1[0].abs(), h, 1e-9) && close(v1[0], -v1[1], 1e-9), "{v1:?}");
    }

    /// On a matrix of rank 6 plus a little noise, the randomized components match the exact
    /// ones (Jacobi on the dense matrix) and the singular values agree.
    #[test]
    fn randomized_svd_matches_the_exact_reference() {
        let (rows, cols) = (80, 50);
        let mut rng = SplitMix64::new(&[7]);
        let basis: Vec<Vec<f64>> = (0..6).map(|_| (0..cols).map(|_| gaussian(&mut rng)).collect()).collect();
        let dense_rows: Vec<Vec<(u32, f32)>> = (0..rows)
            .map(|_| {
                let w: Vec<f64> = (0..6).map(|k| gaussian(&mut rng) * (6 - k) as f64).collect();
                (0..cols)
                    .map(|c| (c as u32, ((0..6).map(|k| w[k] * basis[k][c]).sum::<f64>() + 1e-3 * gaussian(&mut rng)) as f32))
                    .collect()
            })
            .collect();
        let a = Csr::from_rows(&dense_rows, cols);
        let svd = randomized_svd(&a, &SvdOptions { dims: 5, ..Default::default() });
        let (sigma, j) = jacobi_svd(&a.to_dense());
        let exact = truncate(sigma, &j, 5);
        for k in 0..5 {
            let (got, want) = (svd.singular_values[k], exact.singular_values[k]);
            assert!(close(got, want, 1e-6 * want), "σ{k}: {got} vs {want}");
            let cos = dot(svd.components.col(k), exact.components.col(k));
            assert!(close(cos, 1.0, 1e-6), "component {k}: cos {cos}");
        }
    }

    #[test]
    fn a_rank_deficient_sample_keeps_only_its_rank() {
        // Two documents: at most two components, however many are asked for.
        let a = Csr::from_rows(&[vec![(0, 1.0), (3, 1.0)], vec![(1, 2.0)]], 5);
        let svd = randomized_svd(&a, &SvdOptions { dims: 4, ..Default::default() });
        assert_eq!(svd.singular_values.len(), 2);
        assert_eq!((svd.components.rows, svd.components.cols), (5, 2));
        assert!(close(svd.singular_values[0], 2.0, 1e-12) && close(svd.singular_values[1], 2f64.sqrt(), 1e-12));
    }

    #[test]
    fn gram_schmidt_gives_q_and_r() {
        let m0 = ColMat { rows: 3, cols: 3, data: vec![1.0, 1.0, 0.0, 2.0, 0.0, 1.0, 3.0, 1.0, 1.0] };
        let mut q = m0.clone();
        let r = orthonormalize(&mut q);
        let back = q.matmul(&r);
        for (a, b) in back.data.iter().zip(&m0.data) {
            assert!(close(*a, *b, 1e-12));
        }
        // The third column is the sum of the first two: it becomes zero.
        assert!(q.col(2).iter().all(|&x| x == 0.0));
        assert!(close(dot(q.col(0), q.col(1)), 0.0, 1e-12));
    }
}
