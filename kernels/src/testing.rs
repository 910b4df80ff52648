//! Test helpers: seeded random tensors, closeness checks and a finite-difference gradient check.

use candle_core::{DType, Device, Result, Tensor, Var};
use rand::{rngs::StdRng, Rng, SeedableRng};

/// A tensor of uniform values in [-1, 1) from a seeded generator (candle's CPU RNG can't be seeded).
pub fn random(dims: &[usize], seed: u64, dtype: DType) -> Tensor {
    let mut rng = StdRng::seed_from_u64(seed);
    let n: usize = dims.iter().product();
    let data: Vec<f64> = (0..n).map(|_| rng.random_range(-1.0..1.0)).collect();
    Tensor::from_vec(data, dims, &Device::Cpu).unwrap().to_dtype(dtype).unwrap()
}

/// `max |a − b| ≤ rel · max(1, max |b|)`, with a message naming `what`.
pub fn assert_close(a: &Tensor, b: &Tensor, rel: f64, what: &str) {
    assert_eq!(a.dims(), b.dims(), "{what}: shapes");
    let a = a.to_dtype(DType::F64).unwrap().flatten_all().unwrap().to_vec1::<f64>().unwrap();
    let b = b.to_dtype(DType::F64).unwrap().flatten_all().unwrap().to_vec1::<f64>().unwrap();
    let scale = b.iter().fold(1.0f64, |m, v| m.max(v.abs()));
    let err = a.iter().zip(&b).fold(0.0f64, |m, (x, y)| m.max((x - y).abs()));
    assert!(err <= rel * scale, "{what}: max abs error {err:e} > {rel:e} × {scale}");
}

/// Compare the autograd gradient of the scalar `f(vars)` with central differences (step 1e-6)
/// for every element of every variable; `vars` must be float64.
pub fn finite_difference_check(vars: &[&Var], f: impl Fn(&[&Tensor]) -> Result<Tensor>) {
    let tensors: Vec<&Tensor> = vars.iter().map(|v| v.as_tensor()).collect();
    let grads = f(&tensors).unwrap().backward().unwrap();
    let eps = 1e-6;
    for (i, var) in vars.iter().enumerate() {
        let analytic = grads
            .get(var.as_tensor())
            .unwrap_or_else(|| panic!("no gradient reached variable {i}"))
            .flatten_all()
            .unwrap()
            .to_vec1::<f64>()
            .unwrap();
        let base = var.as_tensor().flatten_all().unwrap().to_vec1::<f64>().unwrap();
        let eval = |at: usize, delta: f64| -> f64 {
            let mut v = base.clone();
            v[at] += delta;
            var.set(&Tensor::from_vec(v, var.shape(), &Device::Cpu).unwrap()).unwrap();
            f(&tensors).unwrap().to_scalar::<f64>().unwrap()
        };
        for (at, &auto) in analytic.iter().enumerate() {
            let numeric = (eval(at, eps) - eval(at, -eps)) / (2.0 * eps);
            let tol = 1e-6 * numeric.abs().max(1.0);
            assert!((numeric - auto).abs() <= tol, "variable {i} element {at}: finite difference {numeric} vs autograd {auto}");
        }
        var.set(&Tensor::from_vec(base, var.shape(), &Device::Cpu).unwrap()).unwrap();
    }
}
