//! The MPI backend: the `mpi` crate (rsmpi) over the system's Open MPI or MPICH.
//!
//! MPI is initialised at `MPI_THREAD_SERIALIZED` and every call goes through one mutex, so
//! any thread may call (candle runs backward passes on the caller's thread, rayon never calls
//! here) and no two calls overlap, which is what that level requires. MPI errors are fatal
//! (MPI's default handler): a failed rank aborts, and the launcher ends the others, so a job
//! never hangs half-alive in a collective.

use crate::Collective;
use candle_core::Result;
use mpi::datatype::{Partition, PartitionMut};
use mpi::environment::Universe;
use mpi::topology::{Color, SimpleCommunicator};
use mpi::traits::*;
use mpi::Count;
use std::sync::{Arc, Mutex};

/// The initialised MPI library; `MPI_Finalize` runs when the last group using it is dropped.
struct Runtime(#[allow(dead_code)] Universe);

// SAFETY: the universe is only dropped (finalised), never used, after initialisation; MPI is
// at the SERIALIZED level and all calls are serialised by `Mpi::comm`'s mutex.
unsafe impl Send for Runtime {}
unsafe impl Sync for Runtime {}

/// A group of MPI ranks (a communicator).
pub struct Mpi {
    comm: Mutex<Handle>,
    rank: usize,
    size: usize,
    /// Declared last so the communicator is freed before MPI may be finalised.
    _runtime: Arc<Runtime>,
}

struct Handle(SimpleCommunicator);
// SAFETY: see `Runtime`: calls on the communicator are serialised by the mutex around it.
unsafe impl Send for Handle {}

impl std::fmt::Debug for Mpi {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "Mpi {{ rank: {}, size: {} }}", self.rank, self.size)
    }
}

impl Mpi {
    /// Initialise MPI and return the world. Fails if MPI was initialised before in this process.
    pub fn init() -> Result<Self> {
        let Some((universe, level)) = mpi::initialize_with_threading(mpi::Threading::Serialized) else {
            candle_core::bail!("MPI: already initialised in this process");
        };
        if matches!(level, mpi::Threading::Single | mpi::Threading::Funneled) {
            candle_core::bail!("MPI: the library offers thread level {level:?}; btm needs SERIALIZED");
        }
        let world = universe.world();
        Ok(Self::wrap(world, Arc::new(Runtime(universe))))
    }

    fn wrap(comm: SimpleCommunicator, runtime: Arc<Runtime>) -> Self {
        let (rank, size) = (comm.rank() as usize, comm.size() as usize);
        Self { comm: Mutex::new(Handle(comm)), rank, size, _runtime: runtime }
    }

    fn with<T>(&self, f: impl FnOnce(&SimpleCommunicator) -> T) -> T {
        let guard = self.comm.lock().unwrap_or_else(|p| p.into_inner());
        f(&guard.0)
    }
}

/// Byte counts and displacements as MPI's `int`s.
fn counts_and_displs(counts: &[usize], what: &str) -> Result<(Vec<Count>, Vec<Count>)> {
    let mut displs = Vec::with_capacity(counts.len());
    let mut at = 0usize;
    for &c in counts {
        displs.push(at);
        at += c;
    }
    let to_int = |v: usize| Count::try_from(v).map_err(|_| candle_core::Error::Msg(format!("{what}: {v} bytes is over MPI's 2 GiB limit")));
    Ok((counts.iter().map(|&c| to_int(c)).collect::<Result<_>>()?, displs.into_iter().map(to_int).collect::<Result<_>>()?))
}

impl Collective for Mpi {
    fn rank(&self) -> usize {
        self.rank
    }
    fn size(&self) -> usize {
        self.size
    }
    fn all_reduce_sum_f32(&self, values: &mut [f32]) -> Result<()> {
        let send = values.to_vec();
        self.with(|c| c.all_reduce_into(&send[..], values, mpi::collective::SystemOperation::sum()));
        Ok(())
    }
    fn all_reduce_sum_f64(&self, values: &mut [f64]) -> Result<()> {
        let send = values.to_vec();
        self.with(|c| c.all_reduce_into(&send[..], values, mpi::collective::SystemOperation::sum()));
        Ok(())
    }
    fn all_gather_bytes(&self, send: &[u8]) -> Result<Vec<u8>> {
        let mut out = vec![0u8; send.len() * self.size];
        self.with(|c| c.all_gather_into(send, &mut out[..]));
        Ok(out)
    }
    fn all_to_all_v_bytes(&self, send: &[u8], send_counts: &[usize], recv_counts: &[usize]) -> Result<Vec<u8>> {
        crate::check_counts(send.len(), send_counts, recv_counts, self.size)?;
        let (sc, sd) = counts_and_displs(send_counts, "all_to_all_v")?;
        let (rc, rd) = counts_and_displs(recv_counts, "all_to_all_v")?;
        let mut out = vec![0u8; recv_counts.iter().sum()];
        self.with(|c| {
            let partition = Partition::new(send, &sc[..], &sd[..]);
            let mut received = PartitionMut::new(&mut out[..], &rc[..], &rd[..]);
            c.all_to_all_varcount_into(&partition, &mut received)
        });
        Ok(out)
    }
    fn broadcast_bytes(&self, buf: &mut [u8], root: usize) -> Result<()> {
        crate::check_rank(root, self.size)?;
        self.with(|c| c.process_at_rank(root as i32).broadcast_into(buf));
        Ok(())
    }
    fn barrier(&self) -> Result<()> {
        self.with(|c| c.barrier());
        Ok(())
    }
    fn split(&self, color: usize) -> Result<Arc<dyn Collective>> {
        let color = i32::try_from(color).map_err(|_| candle_core::Error::Msg(format!("MPI: color {color} is too large")))?;
        let Some(sub) = self.with(|c| c.split_by_color(Color::with_value(color))) else {
            candle_core::bail!("MPI: splitting the group by color {color} gave no group");
        };
        Ok(Arc::new(Mpi::wrap(sub, self._runtime.clone())))
    }
}
