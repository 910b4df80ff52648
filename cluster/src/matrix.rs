//! The two matrix kinds of the randomized SVD: a sparse document × term matrix in compressed
//! rows ([`Csr`]) and tall, thin dense matrices stored a column at a time ([`ColMat`]), so
//! that the Gram–Schmidt and Jacobi steps walk contiguous memory. Products run one output
//! column per task: each column is a fixed sequence of additions, so results do not depend on
//! the number of threads.

use crate::tfidf::SparseVec;
use rayon::prelude::*;

/// A dense `rows × cols` matrix of `f64`, column-major: column `c` is
/// `data[c * rows..(c + 1) * rows]`.
#[derive(Debug, Clone, PartialEq)]
pub struct ColMat {
    /// Rows.
    pub rows: usize,
    /// Columns.
    pub cols: usize,
    /// The entries, a column after another.
    pub data: Vec<f64>,
}

impl ColMat {
    /// A matrix of zeros.
    pub fn zeros(rows: usize, cols: usize) -> Self {
        Self { rows, cols, data: vec![0.0; rows * cols] }
    }

    /// Column `c`.
    pub fn col(&self, c: usize) -> &[f64] {
        &self.data[c * self.rows..(c + 1) * self.rows]
    }

    /// Column `c`, to change.
    pub fn col_mut(&mut self, c: usize) -> &mut [f64] {
        &mut self.data[c * self.rows..(c + 1) * self.rows]
    }

    /// Entry (`r`, `c`).
    pub fn get(&self, r: usize, c: usize) -> f64 {
        self.data[c * self.rows + r]
    }

    /// The transpose.
    pub fn transpose(&self) -> Self {
        let mut t = Self::zeros(self.cols, self.rows);
        for c in 0..self.cols {
            for r in 0..self.rows {
                t.data[r * self.cols + c] = self.get(r, c);
            }
        }
        t
    }

    /// `self · other` (small matrices: the Jacobi rotations' products).
    pub fn matmul(&self, other: &ColMat) -> ColMat {
        assert_eq!(self.cols, other.rows, "matmul shapes");
        let mut out = ColMat::zeros(self.rows, other.cols);
        out.data.par_chunks_mut(self.rows.max(1)).enumerate().for_each(|(c, col)| {
            for k in 0..self.cols {
                let b = other.get(k, c);
                if b != 0.0 {
                    axpy(b, self.col(k), col);
                }
            }
        });
        out
    }
}

/// `y += a · x`.
pub fn axpy(a: f64, x: &[f64], y: &mut [f64]) {
    let n = x.len().min(y.len()) / 4 * 4;
    let (y4, ytail) = y.split_at_mut(n);
    for (y, x) in y4.chunks_exact_mut(4).zip(x.chunks_exact(4)) {
        y[0] += a * x[0];
        y[1] += a * x[1];
        y[2] += a * x[2];
        y[3] += a * x[3];
    }
    for (y, x) in ytail.iter_mut().zip(&x[n..]) {
        *y += a * x;
    }
}

/// `x · y`, in four running sums (independent additions keep the CPU's adders busy).
pub fn dot(x: &[f64], y: &[f64]) -> f64 {
    let mut acc = [0f64; 4];
    for (a, b) in x.chunks_exact(4).zip(y.chunks_exact(4)) {
        acc[0] += a[0] * b[0];
        acc[1] += a[1] * b[1];
        acc[2] += a[2] * b[2];
        acc[3] += a[3] * b[3];
    }
    let n = x.len().min(y.len()) / 4 * 4;
    let tail: f64 = x[n..].iter().zip(&y[n..]).map(|(a, b)| a * b).sum();
    (acc[0] + acc[1]) + (acc[2] + acc[3]) + tail
}

/// A sparse `rows × cols` matrix in compressed sparse rows.
#[derive(Debug, Clone)]
pub struct Csr {
    cols: usize,
    indptr: Vec<usize>,
    indices: Vec<u32>,
    values: Vec<f64>,
}

impl Csr {
    /// The matrix whose row `i` is `rows[i]` (columns below `cols`).
    pub fn from_rows(rows: &[SparseVec], cols: usize) -> Self {
        let nnz = rows.iter().map(Vec::len).sum();
        let mut m =
            Self { cols, indptr: Vec::with_capacity(rows.len() + 1), indices: Vec::with_capacity(nnz), values: Vec::with_capacity(nnz) };
        m.indptr.push(0);
        for row in rows {
            for &(c, v) in row {
                debug_assert!((c as usize) < cols);
                m.indices.push(c);
                m.values.push(f64::from(v));
            }
            m.indptr.push(m.indices.len());
        }
        m
    }

    /// Rows.
    pub fn rows(&self) -> usize {
        self.indptr.len() - 1
    }

    /// Columns.
    pub fn cols(&self) -> usize {
        self.cols
    }

    fn row(&self, i: usize) -> (&[u32], &[f64]) {
        let (a, b) = (self.indptr[i], self.indptr[i + 1]);
        (&self.indices[a..b], &self.values[a..b])
    }

    /// `self · x` for a dense `cols × l` matrix `x`: `rows × l`.
    pub fn mul(&self, x: &ColMat) -> ColMat {
        assert_eq!(x.rows, self.cols, "sparse · dense shapes");
        let rows = self.rows();
        let mut out = ColMat::zeros(rows, x.cols);
        out.data.par_chunks_mut(rows.max(1)).enumerate().for_each(|(c, col)| {
            let xc = x.col(c);
            for (i, o) in col.iter_mut().enumerate() {
                let (idx, val) = self.row(i);
                *o = idx.iter().zip(val).map(|(&j, v)| v * xc[j as usize]).sum();
            }
        });
        out
    }

    /// `selfᵀ · y` for a dense `rows × l` matrix `y`: `cols × l`.
    pub fn t_mul(&self, y: &ColMat) -> ColMat {
        assert_eq!(y.rows, self.rows(), "sparseᵀ · dense shapes");
        let mut out = ColMat::zeros(self.cols, y.cols);
        out.data.par_chunks_mut(self.cols.max(1)).enumerate().for_each(|(c, col)| {
            let yc = y.col(c);
            for (i, &yi) in yc.iter().enumerate() {
                let (idx, val) = self.row(i);
                for (&j, v) in idx.iter().zip(val) {
                    col[j as usize] += v * yi;
                }
            }
        });
        out
    }

    /// The dense form (tests and small references).
    pub fn to_dense(&self) -> ColMat {
        let mut d = ColMat::zeros(self.rows(), self.cols);
        for i in 0..self.rows() {
            let (idx, val) = self.row(i);
            for (&j, &v) in idx.iter().zip(val) {
                d.data[j as usize * d.rows + i] = v;
            }
        }
        d
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sparse_products_match_the_dense_ones() {
        let a = Csr::from_rows(&[vec![(0, 1.0), (2, 2.0)], vec![], vec![(1, -3.0), (2, 0.5)]], 3);
        let x = ColMat { rows: 3, cols: 2, data: vec![1.0, 2.0, 3.0, -1.0, 0.0, 4.0] };
        let dense = a.to_dense();
        assert_eq!(a.mul(&x), dense.matmul(&x));
        let y = ColMat { rows: 3, cols: 2, data: vec![1.0, 5.0, 2.0, 0.0, 1.0, -1.0] };
        assert_eq!(a.t_mul(&y), dense.transpose().matmul(&y));
        assert_eq!(a.mul(&x).data, vec![7.0, 0.0, -4.5, 7.0, 0.0, 2.0]);
    }
}
