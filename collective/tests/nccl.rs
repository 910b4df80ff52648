//! The NCCL backend on a GPU machine: one rank's communicator does every collective to itself
//! exactly as the one-process group does (`cargo test -p btm-collective --features nccl gpu`).
//! Without libcuda and libnccl the test says so and passes, unless `BTM_REQUIRE_GPU=1`.
#![cfg(feature = "nccl")]

use btm_collective::{all_gather, all_reduce_sum_many, all_to_all_v, broadcast, exchange_counts, nccl_available, Collective, Nccl, Single};
use candle_core::{Device, Tensor, Var};
use std::sync::Arc;

fn gpu() -> bool {
    let ok = nccl_available();
    if !ok {
        assert!(std::env::var("BTM_REQUIRE_GPU").as_deref() != Ok("1"), "BTM_REQUIRE_GPU=1 but libcuda/libnccl cannot be loaded");
        eprintln!("skipping: no libcuda/libnccl here");
    }
    ok
}

#[test]
fn gpu_one_rank_nccl_collectives_equal_the_one_process_group() {
    if !gpu() {
        return;
    }
    let nccl: Arc<dyn Collective> = Arc::new(Nccl::init(Arc::new(Single), 0).unwrap());
    let single: Arc<dyn Collective> = Arc::new(Single);
    let a = Tensor::new(&[[1f32, -2.5], [3.25, 4.0]], &Device::Cpu).unwrap();
    let b = Tensor::new(&[0.5f64, 7.0, -1.0], &Device::Cpu).unwrap();
    for comm in [&nccl, &single] {
        let sums = all_reduce_sum_many(comm.as_ref(), std::slice::from_ref(&a)).unwrap();
        assert_eq!(sums[0].to_vec2::<f32>().unwrap(), a.to_vec2::<f32>().unwrap());
        assert_eq!(all_gather(comm.as_ref(), &b).unwrap().to_vec1::<f64>().unwrap(), b.to_vec1::<f64>().unwrap());
        assert_eq!(broadcast(comm.as_ref(), &b, 0).unwrap().to_vec1::<f64>().unwrap(), b.to_vec1::<f64>().unwrap());
        assert_eq!(exchange_counts(comm.as_ref(), &[5]).unwrap(), vec![5]);
        comm.barrier().unwrap();
        // The differentiable exchange and its backward pass.
        let x = Var::from_tensor(&a).unwrap();
        let y = all_to_all_v(comm, x.as_tensor(), &[2], &[2]).unwrap();
        let g = (y.sqr().unwrap()).sum_all().unwrap().backward().unwrap();
        assert_eq!(g.get(x.as_tensor()).unwrap().to_vec2::<f32>().unwrap(), (&a * 2.0).unwrap().to_vec2::<f32>().unwrap());
        let sub = comm.split(0).unwrap();
        assert_eq!((sub.rank(), sub.size()), (0, 1));
    }
    let mut sums = [1.5f64, 2.0];
    nccl.all_reduce_sum_f64(&mut sums).unwrap();
    assert_eq!(sums, [1.5, 2.0]);
}
