//! The NCCL backend: one NCCL communicator per group on one GPU per rank, through cudarc's
//! bindings (loaded at run time, like the rest of btm's CUDA code).
//!
//! Rank 0 makes the communicator's unique id and a bootstrap group (MPI) carries it to the
//! others, as `torch.distributed` does through its store. All-to-all-v is NCCL's documented
//! pattern: one grouped `ncclSend`/`ncclRecv` per peer between `ncclGroupStart` and
//! `ncclGroupEnd`. Sub-groups are new communicators over the bootstrap's own split.
//!
//! The [`Collective`] methods take host buffers, so this backend copies them to the device and
//! back around each call; CUDA tensors will use the device buffers directly once training runs
//! on the GPU. NCCL refuses two ranks on one GPU (`NCCL_MULTI_RANK_GPU_ENABLE` aside), so each
//! rank takes the device given by its local rank.

use crate::Collective;
use candle_core::Result;
use cudarc::driver::{CudaContext, CudaSlice, CudaStream};
use cudarc::nccl::{group_end, group_start, Comm, Id, ReduceOp};
use std::sync::{Arc, Mutex};

/// Whether `libnccl` can be loaded (cudarc panics on first use when it cannot).
pub fn nccl_available() -> bool {
    // SAFETY: only tries to dlopen the library by its candidate names.
    unsafe { cudarc::driver::sys::is_culib_present() && cudarc::nccl::sys::is_culib_present() }
}

fn err(what: &str, e: impl std::fmt::Debug) -> candle_core::Error {
    candle_core::Error::Msg(format!("NCCL: {what}: {e:?}"))
}

struct Handle(Comm);
// SAFETY: a communicator is used by one thread at a time (the mutex in `Nccl`), which is what
// NCCL requires of a communicator shared between threads.
unsafe impl Send for Handle {}

/// A group of ranks over NCCL, one GPU each.
pub struct Nccl {
    comm: Mutex<Handle>,
    stream: Arc<CudaStream>,
    rank: usize,
    size: usize,
    /// The group the unique ids travel through (and sub-groups are split from).
    bootstrap: Arc<dyn Collective>,
    ordinal: usize,
}

impl std::fmt::Debug for Nccl {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "Nccl {{ rank: {}, size: {}, gpu: {} }}", self.rank, self.size, self.ordinal)
    }
}

impl Nccl {
    /// The NCCL group of the same ranks as `bootstrap`, on GPU `ordinal`.
    pub fn init(bootstrap: Arc<dyn Collective>, ordinal: usize) -> Result<Self> {
        if !nccl_available() {
            candle_core::bail!("NCCL: libcuda or libnccl cannot be loaded on this machine");
        }
        let ctx = CudaContext::new(ordinal).map_err(|e| err(&format!("opening GPU {ordinal}"), e))?;
        let stream = ctx.default_stream();
        let (rank, size) = (bootstrap.rank(), bootstrap.size());
        let mut id = [0u8; 128];
        if rank == 0 {
            let made = Id::new().map_err(|e| err("making the unique id", e))?;
            for (b, c) in id.iter_mut().zip(made.internal()) {
                *b = *c as u8;
            }
        }
        bootstrap.broadcast_bytes(&mut id, 0)?;
        let id = Id::uninit(id.map(|b| b as std::ffi::c_char));
        let comm = Comm::from_rank(stream.clone(), rank, size, id).map_err(|e| err("joining the communicator", e))?;
        Ok(Self { comm: Mutex::new(Handle(comm)), stream, rank, size, bootstrap, ordinal })
    }

    fn with<T>(&self, f: impl FnOnce(&Comm, &Arc<CudaStream>) -> Result<T>) -> Result<T> {
        let guard = self.comm.lock().unwrap_or_else(|p| p.into_inner());
        let out = f(&guard.0, &self.stream)?;
        self.stream.synchronize().map_err(|e| err("synchronising", e))?;
        Ok(out)
    }

    fn to_device<T: cudarc::driver::DeviceRepr>(&self, host: &[T]) -> Result<CudaSlice<T>> {
        self.stream.clone_htod(host).map_err(|e| err("copying to the GPU", e))
    }

    fn sum<T>(&self, values: &mut [T]) -> Result<()>
    where
        T: cudarc::driver::DeviceRepr + cudarc::driver::ValidAsZeroBits + cudarc::nccl::NcclType + Copy,
    {
        if values.is_empty() {
            return Ok(());
        }
        let back = self.with(|comm, stream| {
            let send = self.to_device(values)?;
            let mut recv = stream.alloc_zeros::<T>(values.len()).map_err(|e| err("allocating", e))?;
            comm.all_reduce(&send, &mut recv, &ReduceOp::Sum).map_err(|e| err("all-reduce", e))?;
            stream.clone_dtoh(&recv).map_err(|e| err("copying from the GPU", e))
        })?;
        values.copy_from_slice(&back);
        Ok(())
    }
}

impl Collective for Nccl {
    fn rank(&self) -> usize {
        self.rank
    }
    fn size(&self) -> usize {
        self.size
    }
    fn all_reduce_sum_f32(&self, values: &mut [f32]) -> Result<()> {
        self.sum(values)
    }
    fn all_reduce_sum_f64(&self, values: &mut [f64]) -> Result<()> {
        self.sum(values)
    }
    fn all_gather_bytes(&self, send: &[u8]) -> Result<Vec<u8>> {
        if send.is_empty() {
            return Ok(Vec::new());
        }
        self.with(|comm, stream| {
            let src = self.to_device(send)?;
            let mut dst = stream.alloc_zeros::<u8>(send.len() * self.size).map_err(|e| err("allocating", e))?;
            comm.all_gather(&src, &mut dst).map_err(|e| err("all-gather", e))?;
            stream.clone_dtoh(&dst).map_err(|e| err("copying from the GPU", e))
        })
    }
    fn all_to_all_v_bytes(&self, send: &[u8], send_counts: &[usize], recv_counts: &[usize]) -> Result<Vec<u8>> {
        crate::check_counts(send.len(), send_counts, recv_counts, self.size)?;
        let total: usize = recv_counts.iter().sum();
        self.with(|comm, stream| {
            // One byte more than needed: NCCL and cudarc want no zero-length allocations.
            let src = self.to_device(&[send, &[0u8]].concat())?;
            let mut dst = stream.alloc_zeros::<u8>(total + 1).map_err(|e| err("allocating", e))?;
            group_start().map_err(|e| err("group start", e))?;
            let (mut s_at, mut r_at) = (0, 0);
            for peer in 0..self.size {
                let (s, r) = (send_counts[peer], recv_counts[peer]);
                if s > 0 {
                    comm.send(&src.slice(s_at..s_at + s), peer as i32).map_err(|e| err("send", e))?;
                }
                if r > 0 {
                    comm.recv(&mut dst.slice_mut(r_at..r_at + r), peer as i32).map_err(|e| err("recv", e))?;
                }
                s_at += s;
                r_at += r;
            }
            group_end().map_err(|e| err("group end", e))?;
            let mut out = stream.clone_dtoh(&dst).map_err(|e| err("copying from the GPU", e))?;
            out.truncate(total);
            Ok(out)
        })
    }
    fn broadcast_bytes(&self, buf: &mut [u8], root: usize) -> Result<()> {
        crate::check_rank(root, self.size)?;
        if buf.is_empty() {
            return Ok(());
        }
        let back = self.with(|comm, stream| {
            let mut dev = self.to_device(buf)?;
            comm.broadcast_in_place(&mut dev, root as i32).map_err(|e| err("broadcast", e))?;
            stream.clone_dtoh(&dev).map_err(|e| err("copying from the GPU", e))
        })?;
        buf.copy_from_slice(&back);
        Ok(())
    }
    fn barrier(&self) -> Result<()> {
        self.sum(&mut [0f32])
    }
    fn split(&self, color: usize) -> Result<Arc<dyn Collective>> {
        let sub = self.bootstrap.split(color)?;
        Ok(Arc::new(Nccl::init(sub, self.ordinal)?))
    }
}
