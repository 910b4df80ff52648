//! The TCP backend: collectives over plain sockets between the ranks, for clusters where MPI
//! cannot start the processes (Kubernetes pods, `btm` started once per rank by any launcher).
//!
//! The ranks find each other as PyTorch's `env://` rendezvous does: `RANK`, `WORLD_SIZE`,
//! `MASTER_ADDR` and `MASTER_PORT`. Rank 0 listens on `MASTER_PORT`; every other rank opens a
//! listener of its own, tells rank 0 its port, and gets back everyone's address; then each rank
//! connects to every lower rank, so each pair of ranks shares one connection (a full mesh).
//!
//! Every collective is a direct exchange with each peer: each rank sends its part to every
//! other rank (one writer thread per peer, so no two ranks can block each other on full socket
//! buffers) and reads theirs in rank order. A sum is taken over the gathered buffers in rank
//! order 0, 1, … on every rank, so every rank gets the same bits, and the same bits as a
//! single process adding the same micro-batches in that order. Traffic per all-reduce is
//! (n−1)·N per rank: right for the few ranks of a CPU job; MPI or NCCL (ring and tree
//! algorithms) for many. Every message carries its length, so ranks that disagree on a
//! collective get a named error instead of reading each other's bytes; a peer that dies ends
//! the others' next collective with an error, not a hang.

use crate::Collective;
use candle_core::Result;
use std::io::{Read, Write};
use std::net::{Ipv4Addr, SocketAddr, TcpListener, TcpStream, ToSocketAddrs};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

/// How long a rank keeps trying to reach rank 0 and its peers (they may start later).
const CONNECT_TIMEOUT: Duration = Duration::from_secs(300);

fn err(msg: String) -> candle_core::Error {
    candle_core::Error::Msg(format!("tcp collective: {msg}"))
}

/// The rendezvous settings, as torchrun and Kubernetes launchers set them.
#[derive(Debug, Clone, PartialEq)]
pub struct Rendezvous {
    pub rank: usize,
    pub world: usize,
    pub master_addr: String,
    pub master_port: u16,
}

impl Rendezvous {
    /// From `RANK`, `WORLD_SIZE`, `MASTER_ADDR` (default 127.0.0.1) and `MASTER_PORT`.
    pub fn from_env() -> Result<Self> {
        let var = |k: &str| {
            std::env::var(k)
                .map_err(|_| err(format!("`{k}` is not set (the TCP rendezvous needs RANK, WORLD_SIZE, MASTER_ADDR, MASTER_PORT)")))
        };
        let num = |k: &str| -> Result<usize> { var(k)?.trim().parse().map_err(|_| err(format!("`{k}` is not a number"))) };
        let (rank, world) = (num("RANK")?, num("WORLD_SIZE")?);
        if rank >= world {
            return Err(err(format!("RANK {rank} is not below WORLD_SIZE {world}")));
        }
        let master_port = var("MASTER_PORT")?.trim().parse().map_err(|_| err("`MASTER_PORT` is not a port number".into()))?;
        let master_addr = std::env::var("MASTER_ADDR").unwrap_or_else(|_| "127.0.0.1".into());
        Ok(Self { rank, world, master_addr, master_port })
    }
}

/// The world's connections: `peers[r]` is the connection to world rank r (none to itself).
struct Mesh {
    peers: Vec<Option<Peer>>,
    /// One collective at a time per process, whichever group it is on.
    busy: Mutex<()>,
}

struct Peer {
    read: Mutex<TcpStream>,
    write: Mutex<TcpStream>,
}

impl Peer {
    fn new(stream: TcpStream) -> Result<Self> {
        stream.set_nodelay(true).map_err(|e| err(format!("setting TCP_NODELAY: {e}")))?;
        let write = stream.try_clone().map_err(|e| err(format!("cloning a socket: {e}")))?;
        Ok(Self { read: Mutex::new(stream), write: Mutex::new(write) })
    }
}

fn connect_retrying(addr: &str) -> Result<TcpStream> {
    let deadline = Instant::now() + CONNECT_TIMEOUT;
    loop {
        let attempt = addr.to_socket_addrs().and_then(|mut a| {
            let a = a.next().ok_or_else(|| std::io::Error::new(std::io::ErrorKind::NotFound, "no address"))?;
            TcpStream::connect_timeout(&a, Duration::from_secs(10))
        });
        match attempt {
            Ok(s) => return Ok(s),
            Err(e) if Instant::now() > deadline => return Err(err(format!("could not reach {addr} in {CONNECT_TIMEOUT:?}: {e}"))),
            Err(_) => std::thread::sleep(Duration::from_millis(200)),
        }
    }
}

/// The next connection to `listener`, waiting at most until `deadline` (a rank that never
/// comes is an error, not a hang).
fn accept_until(listener: &TcpListener, deadline: Instant) -> Result<TcpStream> {
    listener.set_nonblocking(true).map_err(|e| err(format!("listening: {e}")))?;
    loop {
        match listener.accept() {
            Ok((s, _)) => {
                s.set_nonblocking(false).map_err(|e| err(format!("accepting: {e}")))?;
                return Ok(s);
            }
            Err(e) if e.kind() == std::io::ErrorKind::WouldBlock && Instant::now() < deadline => {
                std::thread::sleep(Duration::from_millis(20))
            }
            Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => {
                return Err(err(format!("a rank did not connect within {CONNECT_TIMEOUT:?}")));
            }
            Err(e) => return Err(err(format!("accepting a rank: {e}"))),
        }
    }
}

fn write_u64(s: &mut TcpStream, v: u64) -> std::io::Result<()> {
    s.write_all(&v.to_le_bytes())
}

fn read_u64(s: &mut TcpStream) -> std::io::Result<u64> {
    let mut b = [0u8; 8];
    s.read_exact(&mut b)?;
    Ok(u64::from_le_bytes(b))
}

/// A group of ranks over the world's mesh: `members` are world ranks, in group rank order.
pub struct Tcp {
    mesh: Arc<Mesh>,
    members: Vec<usize>,
    rank: usize,
}

impl std::fmt::Debug for Tcp {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "Tcp {{ rank: {}, size: {}, world ranks: {:?} }}", self.rank, self.members.len(), self.members)
    }
}

impl Tcp {
    /// Meet the other ranks and connect to every one of them.
    pub fn init(rdzv: &Rendezvous) -> Result<Self> {
        let (rank, world) = (rdzv.rank, rdzv.world);
        let io = |what: &str| {
            let what = what.to_string();
            move |e: std::io::Error| err(format!("{what}: {e}"))
        };
        let mut peers: Vec<Option<Peer>> = (0..world).map(|_| None).collect();
        if world > 1 {
            // Every rank but 0 listens for the higher ranks on a port of its own.
            let listener = if rank == 0 {
                TcpListener::bind((Ipv4Addr::UNSPECIFIED, rdzv.master_port))
                    .map_err(io(&format!("listening on port {}", rdzv.master_port)))?
            } else {
                TcpListener::bind((Ipv4Addr::UNSPECIFIED, 0)).map_err(io("listening"))?
            };
            let my_port = listener.local_addr().map_err(io("listening"))?.port();
            let deadline = Instant::now() + CONNECT_TIMEOUT;
            // Rendezvous: rank 0 learns every rank's address and sends the table to all.
            let mut table: Vec<SocketAddr> = vec![];
            if rank == 0 {
                let mut streams: Vec<Option<(TcpStream, SocketAddr)>> = (0..world).map(|_| None).collect();
                for _ in 1..world {
                    let mut s = accept_until(&listener, deadline)?;
                    let peer = s.peer_addr().map_err(io("accepting a rank"))?;
                    let r = read_u64(&mut s).map_err(io("rendezvous"))? as usize;
                    let w = read_u64(&mut s).map_err(io("rendezvous"))? as usize;
                    let port = read_u64(&mut s).map_err(io("rendezvous"))? as u16;
                    if w != world || r == 0 || r >= world || streams[r].is_some() {
                        return Err(err(format!("rank {r} of {w} joined a rendezvous of {world} ranks (duplicate or out of range)")));
                    }
                    streams[r] = Some((s, SocketAddr::new(peer.ip(), port)));
                }
                // Rank 0's own entry is never dialled: every rank has its connection to rank 0.
                table.push(SocketAddr::new(Ipv4Addr::UNSPECIFIED.into(), my_port));
                table.extend(streams.iter().skip(1).map(|s| s.as_ref().expect("every rank joined").1));
                for (r, slot) in streams.into_iter().enumerate().skip(1) {
                    let (mut s, _) = slot.expect("every rank joined");
                    for a in &table {
                        let text = a.to_string();
                        write_u64(&mut s, text.len() as u64).map_err(io("rendezvous"))?;
                        s.write_all(text.as_bytes()).map_err(io("rendezvous"))?;
                    }
                    peers[r] = Some(Peer::new(s)?);
                }
            } else {
                let master = format!("{}:{}", rdzv.master_addr, rdzv.master_port);
                let mut s = connect_retrying(&master)?;
                for v in [rank as u64, world as u64, my_port as u64] {
                    write_u64(&mut s, v).map_err(io("rendezvous"))?;
                }
                for _ in 0..world {
                    let n = read_u64(&mut s).map_err(io(&format!("rendezvous with {master}")))? as usize;
                    let mut text = vec![0u8; n.min(256)];
                    s.read_exact(&mut text).map_err(io("rendezvous"))?;
                    let a = String::from_utf8_lossy(&text).parse().map_err(|_| err("rendezvous: a bad address".into()))?;
                    table.push(a);
                }
                peers[0] = Some(Peer::new(s)?);
                // Connect to every rank between 0 and this one; accept the higher ones.
                for (r, addr) in table.iter().enumerate().take(rank).skip(1) {
                    let mut s = connect_retrying(&addr.to_string())?;
                    write_u64(&mut s, rank as u64).map_err(io("handshake"))?;
                    peers[r] = Some(Peer::new(s)?);
                }
            }
            // Rank 0 has every connection from the rendezvous; the others accept the higher ranks.
            for _ in (rank + 1..world).filter(|_| rank > 0) {
                let mut s = accept_until(&listener, deadline)?;
                let r = read_u64(&mut s).map_err(io("handshake"))? as usize;
                if r <= rank || r >= world || peers[r].is_some() {
                    return Err(err(format!("handshake from an unexpected rank {r}")));
                }
                peers[r] = Some(Peer::new(s)?);
            }
        }
        let mesh = Arc::new(Mesh { peers, busy: Mutex::new(()) });
        Ok(Self { mesh, members: (0..world).collect(), rank })
    }

    fn peer(&self, group_rank: usize) -> &Peer {
        self.mesh.peers[self.members[group_rank]].as_ref().expect("a connection to every other rank")
    }

    /// Send `parts[d]` to each group rank d ≠ self (one writer thread per peer) and read
    /// `lens[s]` bytes from each group rank s ≠ self, in rank order; the part for this rank is
    /// returned as given. Every message is preceded by its length, checked on arrival.
    fn exchange(&self, parts: &[&[u8]], lens: &[usize], what: &str) -> Result<Vec<Vec<u8>>> {
        let _one_at_a_time = self.mesh.busy.lock().unwrap_or_else(|p| p.into_inner());
        let n = self.members.len();
        let me = self.rank;
        std::thread::scope(|scope| {
            let writers: Vec<_> = (0..n)
                .filter(|&d| d != me)
                .map(|d| {
                    let (peer, part) = (self.peer(d), parts[d]);
                    scope.spawn(move || -> std::io::Result<()> {
                        let mut w = peer.write.lock().unwrap_or_else(|p| p.into_inner());
                        write_u64(&mut w, part.len() as u64)?;
                        w.write_all(part)?;
                        w.flush()
                    })
                })
                .collect();
            let mut out = Vec::with_capacity(n);
            let mut failure = None;
            for (s, &want) in lens.iter().enumerate() {
                if s == me {
                    out.push(parts[me].to_vec());
                    continue;
                }
                let world_rank = self.members[s];
                let received = (|| -> Result<Vec<u8>> {
                    let mut r = self.peer(s).read.lock().unwrap_or_else(|p| p.into_inner());
                    let len = read_u64(&mut r).map_err(|e| err(format!("{what}: rank {world_rank}: {e}")))? as usize;
                    if len != want {
                        return Err(err(format!(
                            "{what}: rank {world_rank} sent {len} bytes, {want} expected (the ranks disagree on the collective)"
                        )));
                    }
                    let mut buf = vec![0u8; len];
                    r.read_exact(&mut buf).map_err(|e| err(format!("{what}: rank {world_rank}: {e}")))?;
                    Ok(buf)
                })();
                match received {
                    Ok(b) => out.push(b),
                    Err(e) => {
                        failure = Some(e);
                        break;
                    }
                }
            }
            for w in writers {
                if let Err(e) = w.join().expect("a writer thread") {
                    failure.get_or_insert(err(format!("{what}: sending: {e}")));
                }
            }
            match failure {
                Some(e) => Err(e),
                None => Ok(out),
            }
        })
    }

    /// Every rank's equal-length `send`, in group rank order.
    fn gather(&self, send: &[u8], what: &str) -> Result<Vec<Vec<u8>>> {
        let n = self.members.len();
        self.exchange(&vec![send; n], &vec![send.len(); n], what)
    }

    fn sum_in_rank_order<T: bytemuck::Pod + std::ops::AddAssign>(&self, values: &mut [T], what: &str) -> Result<()> {
        if self.members.len() == 1 {
            return Ok(());
        }
        let all = self.gather(bytemuck::cast_slice(values), what)?;
        let parts: Vec<Vec<T>> = all.iter().map(|b| crate::pod_vec::<T>(b)).collect();
        for (i, v) in values.iter_mut().enumerate() {
            let mut acc = parts[0][i];
            for p in &parts[1..] {
                acc += p[i];
            }
            *v = acc;
        }
        Ok(())
    }
}

impl Collective for Tcp {
    fn rank(&self) -> usize {
        self.rank
    }
    fn size(&self) -> usize {
        self.members.len()
    }
    fn all_reduce_sum_f32(&self, values: &mut [f32]) -> Result<()> {
        self.sum_in_rank_order(values, "all_reduce")
    }
    fn all_reduce_sum_f64(&self, values: &mut [f64]) -> Result<()> {
        self.sum_in_rank_order(values, "all_reduce")
    }
    fn all_gather_bytes(&self, send: &[u8]) -> Result<Vec<u8>> {
        Ok(self.gather(send, "all_gather")?.concat())
    }
    fn all_to_all_v_bytes(&self, send: &[u8], send_counts: &[usize], recv_counts: &[usize]) -> Result<Vec<u8>> {
        crate::check_counts(send.len(), send_counts, recv_counts, self.members.len())?;
        let mut parts = Vec::with_capacity(send_counts.len());
        let mut at = 0;
        for &c in send_counts {
            parts.push(&send[at..at + c]);
            at += c;
        }
        let mut lens = recv_counts.to_vec();
        // This rank's own part is copied, not received.
        lens[self.rank] = send_counts[self.rank];
        if send_counts[self.rank] != recv_counts[self.rank] {
            return Err(err(format!(
                "all_to_all_v: rank sends itself {} bytes but expects {}",
                send_counts[self.rank], recv_counts[self.rank]
            )));
        }
        Ok(self.exchange(&parts, &lens, "all_to_all_v")?.concat())
    }
    fn broadcast_bytes(&self, buf: &mut [u8], root: usize) -> Result<()> {
        crate::check_rank(root, self.members.len())?;
        if self.members.len() == 1 {
            return Ok(());
        }
        // The root sends to everyone; the others send nothing back.
        let n = self.members.len();
        let empty: &[u8] = &[];
        let parts: Vec<&[u8]> = (0..n).map(|_| if self.rank == root { &*buf } else { empty }).collect();
        let lens: Vec<usize> = (0..n).map(|s| if s == root { buf.len() } else { 0 }).collect();
        let got = self.exchange(&parts, &lens, "broadcast")?;
        if self.rank != root {
            buf.copy_from_slice(&got[root]);
        }
        Ok(())
    }
    fn barrier(&self) -> Result<()> {
        self.gather(&[0u8], "barrier").map(|_| ())
    }
    fn split(&self, color: usize) -> Result<Arc<dyn Collective>> {
        let colors: Vec<u64> = crate::pod_vec(&self.gather(&(color as u64).to_le_bytes(), "split")?.concat());
        let members: Vec<usize> = colors.iter().enumerate().filter(|(_, &c)| c == color as u64).map(|(g, _)| self.members[g]).collect();
        let rank = members.iter().position(|&w| w == self.members[self.rank]).expect("a rank is in its own color");
        Ok(Arc::new(Tcp { mesh: self.mesh.clone(), members, rank }))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// `n` ranks as threads of this process on a free loopback port.
    fn world(n: usize) -> Vec<Tcp> {
        let port = TcpListener::bind((Ipv4Addr::LOCALHOST, 0)).unwrap().local_addr().unwrap().port();
        let handles: Vec<_> = (0..n)
            .map(|rank| {
                let rdzv = Rendezvous { rank, world: n, master_addr: "127.0.0.1".into(), master_port: port };
                std::thread::spawn(move || Tcp::init(&rdzv).unwrap())
            })
            .collect();
        handles.into_iter().map(|h| h.join().unwrap()).collect()
    }

    /// Run `f` on every rank at once and collect the results in rank order.
    fn on_all<T: Send>(ranks: &[Tcp], f: impl Fn(&Tcp) -> T + Sync) -> Vec<T> {
        std::thread::scope(|s| {
            let hs: Vec<_> = ranks.iter().map(|r| s.spawn(|| f(r))).collect();
            hs.into_iter().map(|h| h.join().unwrap()).collect()
        })
    }

    #[test]
    fn collectives_over_three_ranks() {
        let ranks = world(3);
        // Sums in rank order, the same bits on every rank (large enough to fill socket buffers).
        let sums = on_all(&ranks, |c| {
            let mut v: Vec<f32> = (0..300_000).map(|i| (i as f32 * 0.1 + c.rank() as f32).sin()).collect();
            c.all_reduce_sum_f32(&mut v).unwrap();
            v
        });
        let want: Vec<f32> =
            (0..300_000).map(|i| ((i as f32 * 0.1).sin() + (i as f32 * 0.1 + 1.0).sin()) + (i as f32 * 0.1 + 2.0).sin()).collect();
        for s in &sums {
            assert!(s.iter().zip(&want).all(|(a, b)| a.to_bits() == b.to_bits()));
        }
        let gathered = on_all(&ranks, |c| c.all_gather_bytes(&[c.rank() as u8; 2]).unwrap());
        assert!(gathered.iter().all(|g| g == &[0, 0, 1, 1, 2, 2]));
        // All-to-all-v: rank s sends d+1 bytes of value 10·s+d to rank d.
        let received = on_all(&ranks, |c| {
            let s = c.rank();
            let send: Vec<u8> = (0..3).flat_map(|d| vec![(10 * s + d) as u8; d + 1]).collect();
            c.all_to_all_v_bytes(&send, &[1, 2, 3], &[s + 1; 3]).unwrap()
        });
        for (d, got) in received.iter().enumerate() {
            let want: Vec<u8> = (0..3).flat_map(|s| vec![(10 * s + d) as u8; d + 1]).collect();
            assert_eq!(got, &want);
        }
        let bcast = on_all(&ranks, |c| {
            let mut b = if c.rank() == 1 { vec![7u8, 8, 9] } else { vec![0; 3] };
            c.broadcast_bytes(&mut b, 1).unwrap();
            c.barrier().unwrap();
            b
        });
        assert!(bcast.iter().all(|b| b == &[7, 8, 9]));
        // Sub-groups: {0, 2} and {1}.
        let subs = on_all(&ranks, |c| {
            let g = c.split(c.rank() % 2).unwrap();
            let mut v = vec![c.rank() as f64 + 1.0];
            g.all_reduce_sum_f64(&mut v).unwrap();
            (g.rank(), g.size(), v[0])
        });
        assert_eq!(subs, vec![(0, 2, 4.0), (0, 1, 2.0), (1, 2, 4.0)]);
        // Ranks that disagree on a collective get a named error, not each other's bytes.
        let mismatch = on_all(&ranks, |c| c.all_gather_bytes(&vec![0u8; 1 + c.rank()]).map_err(|e| e.to_string()));
        assert!(mismatch.iter().any(|r| r.as_ref().is_err_and(|e| e.contains("the ranks disagree"))), "{mismatch:?}");
    }

    #[test]
    fn a_dead_peer_is_an_error_not_a_hang() {
        let mut ranks = world(2);
        drop(ranks.pop());
        let mut v = vec![1f32; 4];
        let e = ranks[0].all_reduce_sum_f32(&mut v).unwrap_err().to_string();
        assert!(e.contains("rank 1"), "{e}");
    }
}
