//! Collectives for training one model on many processes: the one module where ranks talk.
//!
//! A [`Collective`] is a group of ranks (processes) that call the same operations in the same
//! order: sum-all-reduce, all-to-all with per-rank counts (MPI_Alltoallv), all-gather,
//! broadcast, barrier, and [`Collective::split`] into sub-groups. Backends:
//!
//! - [`Single`]: one process, every operation the identity. World size 1 takes this path, so a
//!   one-process run does no copies and no synchronisation.
//! - `Mpi` (feature `mpi`): the system's MPI through the `mpi` crate; launched by
//!   `mpirun -np N` or `srun --mpi=pmix`.
//! - `Nccl` (feature `nccl`): NCCL on one GPU per rank, its unique id carried by MPI (or by the
//!   TCP rendezvous when no MPI launcher started the ranks).
//! - [`Tcp`]: plain sockets between ranks that some other launcher started (a Kubernetes Indexed
//!   Job, a script), meeting through `RANK`, `WORLD_SIZE`, `MASTER_ADDR`, `MASTER_PORT` as
//!   PyTorch's `env://` does; no MPI needed.
//!
//! On top of the byte-level backend sit the tensor operations training uses
//! ([`all_reduce_sum_many`], [`all_gather`], [`all_to_all_v`], …), and [`Groups`]: the world and
//! the expert-parallel and expert-data-parallel sub-groups of a `data_parallel × expert_parallel`
//! layout (Megatron-Core's, torchtitan's). [`all_to_all_v`] is differentiable: its backward pass
//! is the all-to-all of the gradient with the send and receive counts swapped.
//!
//! Every call is timed; [`time_in_collectives`] reports the total for benchmarks.

use candle_core::backend::BackendStorage;
use candle_core::{CpuStorage, CustomOp1, DType, Layout, Result, Shape, Tensor};
use serde::{Deserialize, Serialize};
use std::fmt;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

#[cfg(feature = "mpi")]
mod mpi_backend;
#[cfg(feature = "mpi")]
pub use mpi_backend::Mpi;
mod tcp_backend;
pub use tcp_backend::{Rendezvous, Tcp};
#[cfg(feature = "nccl")]
mod nccl_backend;
#[cfg(feature = "nccl")]
pub use nccl_backend::{nccl_available, Nccl};

/// Which collective engine a multi-process run uses.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize, Deserialize, schemars::JsonSchema)]
#[serde(rename_all = "snake_case")]
pub enum Backend {
    /// The system's MPI (CPU processes; `mpirun`, `srun --mpi=…`).
    #[default]
    Mpi,
    /// NCCL between GPUs, one per rank (the rank's local rank picks it); MPI starts the ranks
    /// and carries NCCL's unique id.
    Nccl,
    /// Sockets between CPU processes that another launcher started, found through `RANK`,
    /// `WORLD_SIZE`, `MASTER_ADDR` and `MASTER_PORT` (the Kubernetes engine's multi-rank jobs).
    Tcp,
}

impl Backend {
    pub fn as_str(self) -> &'static str {
        match self {
            Backend::Mpi => "mpi",
            Backend::Nccl => "nccl",
            Backend::Tcp => "tcp",
        }
    }
}

/// A group of ranks that run the same collectives in the same order.
pub trait Collective: Send + Sync + fmt::Debug {
    /// This process's index in the group, `0..size`.
    fn rank(&self) -> usize;
    /// Number of ranks in the group.
    fn size(&self) -> usize;
    /// Element-wise sum over the group, in place (same length on every rank).
    fn all_reduce_sum_f32(&self, values: &mut [f32]) -> Result<()>;
    fn all_reduce_sum_f64(&self, values: &mut [f64]) -> Result<()>;
    /// Every rank's `send` (the same length everywhere), concatenated in rank order.
    fn all_gather_bytes(&self, send: &[u8]) -> Result<Vec<u8>>;
    /// MPI_Alltoallv: `send` holds `send_counts[d]` bytes for each rank d in rank order; the
    /// result holds `recv_counts[s]` bytes from each rank s in rank order.
    fn all_to_all_v_bytes(&self, send: &[u8], send_counts: &[usize], recv_counts: &[usize]) -> Result<Vec<u8>>;
    /// `root`'s bytes into every rank's `buf` (the same length everywhere).
    fn broadcast_bytes(&self, buf: &mut [u8], root: usize) -> Result<()>;
    fn barrier(&self) -> Result<()>;
    /// The sub-group of the ranks that pass the same `color`, ordered by rank.
    fn split(&self, color: usize) -> Result<Arc<dyn Collective>>;
}

/// One process: a group of size 1.
#[derive(Debug, Clone, Copy, Default)]
pub struct Single;

impl Collective for Single {
    fn rank(&self) -> usize {
        0
    }
    fn size(&self) -> usize {
        1
    }
    fn all_reduce_sum_f32(&self, _: &mut [f32]) -> Result<()> {
        Ok(())
    }
    fn all_reduce_sum_f64(&self, _: &mut [f64]) -> Result<()> {
        Ok(())
    }
    fn all_gather_bytes(&self, send: &[u8]) -> Result<Vec<u8>> {
        Ok(send.to_vec())
    }
    fn all_to_all_v_bytes(&self, send: &[u8], send_counts: &[usize], recv_counts: &[usize]) -> Result<Vec<u8>> {
        if send_counts != [send.len()] || recv_counts != [send.len()] {
            candle_core::bail!("all_to_all_v: one rank sends {send_counts:?} and receives {recv_counts:?} of {} bytes", send.len());
        }
        Ok(send.to_vec())
    }
    fn broadcast_bytes(&self, _: &mut [u8], root: usize) -> Result<()> {
        check_rank(root, 1)
    }
    fn barrier(&self) -> Result<()> {
        Ok(())
    }
    fn split(&self, _: usize) -> Result<Arc<dyn Collective>> {
        Ok(Arc::new(Single))
    }
}

/// An all-to-all-v's counts: one send and one receive count per rank, the send counts covering
/// the `send_len` bytes.
fn check_counts(send_len: usize, send_counts: &[usize], recv_counts: &[usize], size: usize) -> Result<()> {
    if send_counts.len() != size || recv_counts.len() != size || send_counts.iter().sum::<usize>() != send_len {
        candle_core::bail!("all_to_all_v: {send_len} bytes, send counts {send_counts:?}, receive counts {recv_counts:?}");
    }
    Ok(())
}

fn check_rank(rank: usize, size: usize) -> Result<()> {
    if rank >= size {
        candle_core::bail!("rank {rank} is not in a group of {size}");
    }
    Ok(())
}

static NANOS_IN_COLLECTIVES: AtomicU64 = AtomicU64::new(0);

/// Wall time this process has spent inside collective operations (waiting included).
pub fn time_in_collectives() -> Duration {
    Duration::from_nanos(NANOS_IN_COLLECTIVES.load(Ordering::Relaxed))
}

/// Run `f`, adding its wall time to [`time_in_collectives`].
fn timed<T>(f: impl FnOnce() -> Result<T>) -> Result<T> {
    let started = Instant::now();
    let out = f();
    NANOS_IN_COLLECTIVES.fetch_add(started.elapsed().as_nanos() as u64, Ordering::Relaxed);
    out
}

/// The number of processes the launcher started (`mpirun`, `srun`), read from the variables
/// Open MPI, MPICH/PMI and PMIx set; `None` when not started by one.
pub fn launched_world_size() -> Option<usize> {
    ["OMPI_COMM_WORLD_SIZE", "PMI_SIZE", "PMIX_SIZE", "MPI_LOCALNRANKS"]
        .iter()
        .find_map(|v| std::env::var(v).ok().and_then(|s| s.trim().parse().ok()))
}

/// The world group for a run of `world` ranks: [`Single`] for one, else the `backend`'s world.
pub fn init(world: usize, backend: Backend) -> Result<Arc<dyn Collective>> {
    let launched = launched_world_size().unwrap_or(1);
    if world <= 1 && launched > 1 {
        candle_core::bail!("the job asks for 1 rank but the launcher started {launched}: launch it without mpirun/srun -n");
    }
    match backend {
        Backend::Mpi if world <= 1 => Ok(Arc::new(Single)),
        Backend::Mpi => init_mpi(world),
        Backend::Tcp if world <= 1 => Ok(Arc::new(Single)),
        Backend::Tcp => init_tcp(world),
        // One rank over NCCL still makes a communicator (collectives to itself), so the NCCL
        // path can be checked on a machine with one GPU.
        Backend::Nccl => {
            // NCCL's unique id travels through MPI when MPI started the ranks, else through the
            // TCP rendezvous (a Kubernetes pod per rank).
            let bootstrap: Arc<dyn Collective> = if world <= 1 {
                Arc::new(Single)
            } else if launched_world_size().is_none() && std::env::var_os("MASTER_PORT").is_some() {
                init_tcp(world)?
            } else {
                init_mpi(world)?
            };
            init_nccl(bootstrap)
        }
    }
}

/// The world over the TCP rendezvous of `RANK`, `WORLD_SIZE`, `MASTER_ADDR`, `MASTER_PORT`.
fn init_tcp(world: usize) -> Result<Arc<dyn Collective>> {
    let rdzv = Rendezvous::from_env()?;
    if rdzv.world != world {
        candle_core::bail!("the job asks for {world} ranks but WORLD_SIZE is {}", rdzv.world);
    }
    Ok(Arc::new(Tcp::init(&rdzv)?))
}

/// This process's index among the ranks on its node (Open MPI, MPICH, Slurm, torchrun).
pub fn local_rank() -> usize {
    ["OMPI_COMM_WORLD_LOCAL_RANK", "MPI_LOCALRANKID", "SLURM_LOCALID", "LOCAL_RANK"]
        .iter()
        .find_map(|v| std::env::var(v).ok().and_then(|s| s.trim().parse().ok()))
        .unwrap_or(0)
}

/// The GPU this process binds, as an ordinal among the visible ones: its local rank's
/// ([`gpu_of_rank`] over `CUDA_VISIBLE_DEVICES`). The trainer's device and NCCL agree on it.
pub fn local_gpu() -> usize {
    gpu_of_rank(local_rank(), std::env::var("CUDA_VISIBLE_DEVICES").ok().as_deref())
}

/// The ordinal local rank `rank` binds among `cuda_visible_devices`: its own when the job
/// sees a GPU per rank or more (`0,1` for two ranks), wrapping when the launcher already
/// narrowed each rank to fewer (srun's per-task binding shows every rank ordinal 0).
pub fn gpu_of_rank(rank: usize, cuda_visible_devices: Option<&str>) -> usize {
    let visible = cuda_visible_devices.map(|v| v.split(',').filter(|s| !s.trim().is_empty()).count());
    match visible {
        Some(n) if n > 0 => rank % n,
        _ => rank,
    }
}

#[cfg(feature = "nccl")]
fn init_nccl(bootstrap: Arc<dyn Collective>) -> Result<Arc<dyn Collective>> {
    Ok(Arc::new(Nccl::init(bootstrap, local_gpu())?))
}

#[cfg(not(feature = "nccl"))]
fn init_nccl(_bootstrap: Arc<dyn Collective>) -> Result<Arc<dyn Collective>> {
    candle_core::bail!("collective: nccl, but this btm was built without NCCL: rebuild with `--features nccl`")
}

#[cfg(feature = "mpi")]
fn init_mpi(world: usize) -> Result<Arc<dyn Collective>> {
    let comm = Mpi::init()?;
    if comm.size() != world {
        candle_core::bail!(
            "the job asks for {world} ranks but MPI started {}: launch it with `mpirun -np {world}` (or `srun --ntasks {world}`)",
            comm.size()
        );
    }
    Ok(Arc::new(comm))
}

#[cfg(not(feature = "mpi"))]
fn init_mpi(world: usize) -> Result<Arc<dyn Collective>> {
    candle_core::bail!(
        "the job asks for {world} ranks, but this btm was built without MPI: rebuild with `cargo build --release --features mpi`"
    )
}

/// The groups of a `data_parallel × expert_parallel` layout (world = dp · ep). Rank r is
/// expert-parallel rank `r % ep` in data-parallel replica `r / ep`:
/// - `expert`: the ep consecutive ranks that exchange tokens in each MoE layer and together hold
///   every expert once (rank i of the group holds experts `i·E/ep .. (i+1)·E/ep`);
/// - `expert_data`: the dp ranks that hold the same experts, over which those experts'
///   gradients are summed. Non-expert gradients are summed over `world`.
#[derive(Debug, Clone)]
pub struct Groups {
    pub world: Arc<dyn Collective>,
    pub expert: Arc<dyn Collective>,
    pub expert_data: Arc<dyn Collective>,
}

impl Groups {
    pub fn new(world: Arc<dyn Collective>, expert_parallel: usize) -> Result<Self> {
        let (n, ep) = (world.size(), expert_parallel.max(1));
        if !n.is_multiple_of(ep) {
            candle_core::bail!("expert_parallel {ep} does not divide the {n} ranks");
        }
        let r = world.rank();
        let (expert, expert_data) = if ep == 1 {
            (Arc::new(Single) as Arc<dyn Collective>, world.clone())
        } else if ep == n {
            (world.clone(), Arc::new(Single) as Arc<dyn Collective>)
        } else {
            // Every rank takes part in both splits, in the same order.
            (world.split(r / ep)?, world.split(r % ep)?)
        };
        Ok(Self { world, expert, expert_data })
    }

    /// One process, no peers.
    pub fn single() -> Self {
        Self { world: Arc::new(Single), expert: Arc::new(Single), expert_data: Arc::new(Single) }
    }
}

/// Element-wise sums over `comm` of every tensor in `tensors` (float32 or float64, any shapes),
/// as one collective over one flat buffer in the given order, so every rank adds the same
/// numbers in the same order. Returns the inputs themselves for a group of one.
pub fn all_reduce_sum_many(comm: &dyn Collective, tensors: &[Tensor]) -> Result<Vec<Tensor>> {
    if comm.size() == 1 || tensors.is_empty() {
        return Ok(tensors.to_vec());
    }
    let dtype = tensors[0].dtype();
    if tensors.iter().any(|t| t.dtype() != dtype) {
        candle_core::bail!("all_reduce_sum_many: tensors of mixed dtypes");
    }
    let flat = Tensor::cat(&tensors.iter().map(|t| t.flatten_all()).collect::<Result<Vec<_>>>()?, 0)?;
    let summed = match dtype {
        DType::F32 => {
            let mut v = flat.to_vec1::<f32>()?;
            timed(|| comm.all_reduce_sum_f32(&mut v))?;
            Tensor::from_vec(v, flat.elem_count(), flat.device())?
        }
        DType::F64 => {
            let mut v = flat.to_vec1::<f64>()?;
            timed(|| comm.all_reduce_sum_f64(&mut v))?;
            Tensor::from_vec(v, flat.elem_count(), flat.device())?
        }
        other => candle_core::bail!("all_reduce_sum: {other:?} tensors are not supported (float32, float64)"),
    };
    let mut out = Vec::with_capacity(tensors.len());
    let mut offset = 0;
    for t in tensors {
        out.push(summed.narrow(0, offset, t.elem_count())?.reshape(t.shape())?);
        offset += t.elem_count();
    }
    Ok(out)
}

/// Element-wise sum over `comm` of host values, in place.
pub fn all_reduce_sum_host(comm: &dyn Collective, values: &mut [f64]) -> Result<()> {
    if comm.size() == 1 {
        return Ok(());
    }
    timed(|| comm.all_reduce_sum_f64(values))
}

/// Every rank's `t` (the same shape everywhere) concatenated along dimension 0 in rank order.
pub fn all_gather(comm: &dyn Collective, t: &Tensor) -> Result<Tensor> {
    if comm.size() == 1 {
        return Ok(t.clone());
    }
    let bytes = to_bytes(t)?;
    let all = timed(|| comm.all_gather_bytes(&bytes))?;
    let mut dims = t.dims().to_vec();
    if dims.is_empty() {
        dims.push(1);
    }
    dims[0] *= comm.size();
    from_bytes(&all, t.dtype(), dims, t.device())
}

/// `root`'s `t` on every rank (the same shape and dtype everywhere).
pub fn broadcast(comm: &dyn Collective, t: &Tensor, root: usize) -> Result<Tensor> {
    if comm.size() == 1 {
        return Ok(t.clone());
    }
    let mut bytes = to_bytes(t)?;
    timed(|| comm.broadcast_bytes(&mut bytes, root))?;
    from_bytes(&bytes, t.dtype(), t.dims().to_vec(), t.device())
}

/// All-to-all of counts: `send[d · n .. (d+1) · n]` goes to rank d; the result holds n values
/// from each rank in rank order (n = `send.len() / size`).
pub fn exchange_counts(comm: &dyn Collective, send: &[usize]) -> Result<Vec<usize>> {
    let size = comm.size();
    if size == 1 {
        return Ok(send.to_vec());
    }
    if !send.len().is_multiple_of(size) {
        candle_core::bail!("exchange_counts: {} values for {size} ranks", send.len());
    }
    let values: Vec<u64> = send.iter().map(|&c| c as u64).collect();
    let per_rank = vec![send.len() / size * 8; size];
    let bytes = timed(|| comm.all_to_all_v_bytes(bytemuck::cast_slice(&values), &per_rank, &per_rank))?;
    Ok(bytes.chunks_exact(8).map(|b| u64::from_le_bytes(b.try_into().expect("8 bytes")) as usize).collect())
}

/// Rows of `x` [N, C] exchanged between ranks: the first `send_rows[0]` rows go to rank 0, the
/// next `send_rows[1]` to rank 1, …; the result [Σ recv_rows, C] holds `recv_rows[s]` rows from
/// each rank s in rank order. Differentiable: the gradient goes back by the same exchange with
/// the counts swapped (Megatron-Core's `all_to_all`, torchtitan's `all_to_all_single_autograd`).
/// Every rank of `comm` must call it, in the same order relative to its other collectives.
pub fn all_to_all_v(comm: &Arc<dyn Collective>, x: &Tensor, send_rows: &[usize], recv_rows: &[usize]) -> Result<Tensor> {
    let (n, _) = x.dims2()?;
    if send_rows.len() != comm.size() || recv_rows.len() != comm.size() {
        candle_core::bail!("all_to_all_v: {} send and {} receive counts for {} ranks", send_rows.len(), recv_rows.len(), comm.size());
    }
    if send_rows.iter().sum::<usize>() != n {
        candle_core::bail!("all_to_all_v: send counts {send_rows:?} do not add up to the {n} rows");
    }
    x.contiguous()?.apply_op1(AllToAllV { comm: comm.clone(), send_rows: send_rows.to_vec(), recv_rows: recv_rows.to_vec() })
}

struct AllToAllV {
    comm: Arc<dyn Collective>,
    send_rows: Vec<usize>,
    recv_rows: Vec<usize>,
}

impl CustomOp1 for AllToAllV {
    fn name(&self) -> &'static str {
        "all-to-all-v"
    }
    fn cpu_fwd(&self, s: &CpuStorage, l: &Layout) -> Result<(CpuStorage, Shape)> {
        let (_, c) = l.shape().dims2()?;
        let Some((start, end)) = l.contiguous_offsets() else {
            candle_core::bail!("all_to_all_v: the input must be contiguous");
        };
        let row_bytes = c * s.dtype().size_in_bytes();
        let send: Vec<usize> = self.send_rows.iter().map(|r| r * row_bytes).collect();
        let recv: Vec<usize> = self.recv_rows.iter().map(|r| r * row_bytes).collect();
        let rows: usize = self.recv_rows.iter().sum();
        let exchange = |bytes: &[u8]| timed(|| self.comm.all_to_all_v_bytes(bytes, &send, &recv));
        let out = match s {
            CpuStorage::F32(v) => CpuStorage::F32(pod_vec(&exchange(bytemuck::cast_slice(&v[start..end]))?)),
            CpuStorage::F64(v) => CpuStorage::F64(pod_vec(&exchange(bytemuck::cast_slice(&v[start..end]))?)),
            other => candle_core::bail!("all_to_all_v: {:?} rows are not supported (float32, float64)", other.dtype()),
        };
        Ok((out, Shape::from((rows, c))))
    }
    fn bwd(&self, _x: &Tensor, _res: &Tensor, grad: &Tensor) -> Result<Option<Tensor>> {
        Ok(Some(all_to_all_v(&self.comm, grad, &self.recv_rows, &self.send_rows)?))
    }
}

/// Values of type T from their bytes (which need not be aligned for T).
fn pod_vec<T: bytemuck::Pod>(bytes: &[u8]) -> Vec<T> {
    let n = bytes.len() / std::mem::size_of::<T>();
    let mut out = vec![T::zeroed(); n];
    bytemuck::cast_slice_mut::<T, u8>(&mut out).copy_from_slice(&bytes[..n * std::mem::size_of::<T>()]);
    out
}

fn to_bytes(t: &Tensor) -> Result<Vec<u8>> {
    let flat = t.flatten_all()?;
    Ok(match t.dtype() {
        DType::F32 => bytemuck::cast_slice(&flat.to_vec1::<f32>()?).to_vec(),
        DType::F64 => bytemuck::cast_slice(&flat.to_vec1::<f64>()?).to_vec(),
        DType::U32 => bytemuck::cast_slice(&flat.to_vec1::<u32>()?).to_vec(),
        DType::U8 => flat.to_vec1::<u8>()?,
        other => candle_core::bail!("collective: {other:?} tensors are not supported"),
    })
}

fn from_bytes(bytes: &[u8], dtype: DType, dims: Vec<usize>, device: &candle_core::Device) -> Result<Tensor> {
    match dtype {
        DType::F32 => Tensor::from_vec(pod_vec::<f32>(bytes), dims, device),
        DType::F64 => Tensor::from_vec(pod_vec::<f64>(bytes), dims, device),
        DType::U32 => Tensor::from_vec(pod_vec::<u32>(bytes), dims, device),
        DType::U8 => Tensor::from_vec(bytes.to_vec(), dims, device),
        other => candle_core::bail!("collective: {other:?} tensors are not supported"),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use candle_core::{Device, Var};

    #[test]
    fn each_rank_binds_its_own_gpu_among_the_visible_ones() {
        assert_eq!(gpu_of_rank(0, None), 0);
        assert_eq!(gpu_of_rank(1, Some("4,5")), 1);
        // srun bound every task to one GPU of its own: each sees ordinal 0.
        assert_eq!(gpu_of_rank(3, Some("2")), 0);
        assert_eq!(gpu_of_rank(2, Some("")), 2);
    }

    #[test]
    fn one_rank_is_the_identity() {
        let comm: Arc<dyn Collective> = Arc::new(Single);
        let a = Tensor::new(&[[1f32, 2.], [3., 4.]], &Device::Cpu).unwrap();
        let b = Tensor::new(&[5f32], &Device::Cpu).unwrap();
        let sums = all_reduce_sum_many(comm.as_ref(), &[a.clone(), b.clone()]).unwrap();
        assert_eq!(sums[0].to_vec2::<f32>().unwrap(), a.to_vec2::<f32>().unwrap());
        assert_eq!(all_gather(comm.as_ref(), &a).unwrap().dims(), &[2, 2]);
        assert_eq!(exchange_counts(comm.as_ref(), &[3, 4]).unwrap(), vec![3, 4]);
        let groups = Groups::new(comm.clone(), 1).unwrap();
        assert_eq!((groups.expert.size(), groups.expert_data.size()), (1, 1));
    }

    /// The all-to-all is a graph node: on one rank it passes rows and their gradient through.
    #[test]
    fn all_to_all_backward_reaches_the_input() {
        let comm: Arc<dyn Collective> = Arc::new(Single);
        let x = Var::new(&[[1f32, 2.], [3., 4.], [5., 6.]], &Device::Cpu).unwrap();
        let y = all_to_all_v(&comm, x.as_tensor(), &[3], &[3]).unwrap();
        let w = Tensor::new(&[[1f32, 10.], [100., 1000.], [2., 3.]], &Device::Cpu).unwrap();
        let grads = (y * &w).unwrap().sum_all().unwrap().backward().unwrap();
        assert_eq!(grads.get(x.as_tensor()).unwrap().to_vec2::<f32>().unwrap(), w.to_vec2::<f32>().unwrap());
        assert!(all_to_all_v(&comm, x.as_tensor(), &[2], &[3]).is_err());
    }
}
