//! The local engine's GPUs: which ones it hands out ([`pool_ids`]), whether CUDA can use
//! them on this machine ([`Probe`], checked before any job starts), and which ones each
//! running job holds ([`GpuPool`]: a job gets whole GPUs through `CUDA_VISIBLE_DEVICES`, and
//! no two running jobs share one).

use crate::pipeline::spec::Gpus;

/// Where the NVIDIA kernel driver says which version it is, and lists its GPUs.
const DRIVER_VERSION: &str = "/proc/driver/nvidia/version";
const DRIVER_GPUS: &str = "/proc/driver/nvidia/gpus";

/// The GPU ids `CUDA_VISIBLE_DEVICES` names (`None` when unset or empty).
fn visible_ids(cuda_visible_devices: Option<&str>) -> Option<Vec<String>> {
    let ids: Vec<String> = cuda_visible_devices?.split(',').map(str::trim).filter(|s| !s.is_empty()).map(String::from).collect();
    (!ids.is_empty()).then_some(ids)
}

/// The GPU ids the local engine hands out for `gpus`: the first N of `CUDA_VISIBLE_DEVICES`
/// (all of them for `auto`), else 0…N-1 (`auto`: the `machine` count). Fewer than asked when
/// `CUDA_VISIBLE_DEVICES` names fewer; [`Probe::missing`] says so.
pub fn pool_ids(gpus: Gpus, cuda_visible_devices: Option<&str>, machine: impl FnOnce() -> usize) -> Vec<String> {
    let visible = visible_ids(cuda_visible_devices);
    match (gpus, visible) {
        (Gpus::Count(n), Some(v)) => v.into_iter().take(n).collect(),
        (Gpus::Count(n), None) => (0..n).map(|i| i.to_string()).collect(),
        (Gpus::Auto, Some(v)) => v,
        (Gpus::Auto, None) => (0..machine()).map(|i| i.to_string()).collect(),
    }
}

/// GPUs the NVIDIA driver lists on this machine (0 without the driver).
pub fn machine_gpus() -> usize {
    std::fs::read_dir(DRIVER_GPUS).map_or(0, |d| d.filter_map(|e| e.ok()).count())
}

/// What this machine offers CUDA: the driver, its CUDA library, its GPUs.
#[derive(Debug, Clone, PartialEq)]
pub struct Probe {
    /// The driver's version line, `None` without the driver.
    pub driver: Option<String>,
    /// Why `libcuda.so.1` (the driver's CUDA library) cannot be loaded, `None` when it can.
    pub libcuda_error: Option<String>,
    pub devices: usize,
    /// Whether this btm has the CUDA backend (`--features cuda`).
    pub built_with_cuda: bool,
}

impl Probe {
    pub fn of_this_machine() -> Self {
        Probe {
            driver: std::fs::read_to_string(DRIVER_VERSION).ok().map(|v| v.lines().next().unwrap_or_default().trim().to_string()),
            libcuda_error: load_libcuda().err(),
            devices: machine_gpus(),
            built_with_cuda: cfg!(feature = "cuda"),
        }
    }

    /// Everything that stops a run whose jobs need up to `most` GPUs at once from `pool`
    /// (`asked`: the engine's count, `None` for `auto`), btm's own trainer among them when
    /// `btm_trains_on_cuda`; empty when nothing does.
    pub fn missing(&self, pool: &[String], asked: Option<usize>, most: usize, btm_trains_on_cuda: bool) -> Vec<String> {
        let mut missing = vec![];
        if self.driver.is_none() {
            missing.push(format!("the NVIDIA driver: {DRIVER_VERSION} does not exist (run the CUDA phases on a machine with NVIDIA GPUs)"));
        }
        if let Some(why) = &self.libcuda_error {
            missing.push(format!("libcuda.so.1, the driver's CUDA library, cannot be loaded: {why}"));
        }
        if self.driver.is_some() && self.devices == 0 {
            missing.push(format!("a GPU: the driver lists none in {DRIVER_GPUS}"));
        }
        if let Some(n) = asked.filter(|&n| pool.len() < n) {
            missing.push(format!("{n} GPUs: engine.gpus asks for {n}, CUDA_VISIBLE_DEVICES names {}", pool.len()));
        }
        if most > pool.len() && missing.is_empty() {
            missing.push(format!("{most} GPUs for one job: the engine has {}", pool.len()));
        }
        if btm_trains_on_cuda && !self.built_with_cuda {
            missing.push("CUDA in this btm: it was built without it (`cargo install --path orchestrator --features cuda`)".into());
        }
        missing
    }
}

/// Load and unload the driver's CUDA library, as CUDA itself will.
fn load_libcuda() -> Result<(), String> {
    let name = c"libcuda.so.1";
    // SAFETY: dlopen with a valid C string; the handle is closed at once.
    unsafe {
        let handle = libc::dlopen(name.as_ptr(), libc::RTLD_LAZY | libc::RTLD_LOCAL);
        if handle.is_null() {
            let err = libc::dlerror();
            return Err(if err.is_null() { "dlopen failed".into() } else { std::ffi::CStr::from_ptr(err).to_string_lossy().into_owned() });
        }
        libc::dlclose(handle);
    }
    Ok(())
}

/// Which of the engine's GPUs are free; a job takes the lowest free ones.
#[derive(Debug, Clone, Default)]
pub struct GpuPool {
    ids: Vec<String>,
    held: Vec<bool>,
}

impl GpuPool {
    pub fn new(ids: Vec<String>) -> Self {
        let held = vec![false; ids.len()];
        GpuPool { ids, held }
    }

    pub fn len(&self) -> usize {
        self.ids.len()
    }

    pub fn is_empty(&self) -> bool {
        self.ids.is_empty()
    }

    pub fn free(&self) -> usize {
        self.held.iter().filter(|h| !**h).count()
    }

    /// `n` free GPUs, now held, or `None` (nothing taken) when fewer are free.
    pub fn take(&mut self, n: usize) -> Option<Vec<String>> {
        if self.free() < n {
            return None;
        }
        let mut taken = vec![];
        for (id, held) in self.ids.iter().zip(self.held.iter_mut()).filter(|(_, h)| !**h).take(n) {
            *held = true;
            taken.push(id.clone());
        }
        Some(taken)
    }

    /// Free what [`Self::take`] gave.
    pub fn give_back(&mut self, ids: &[String]) {
        for (id, held) in self.ids.iter().zip(self.held.iter_mut()) {
            if ids.contains(id) {
                *held = false;
            }
        }
    }
}

/// The `CUDA_VISIBLE_DEVICES` value of a job holding `ids`.
pub fn visible_devices(ids: &[String]) -> String {
    ids.join(",")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_pool_is_the_visible_gpus_or_the_machines() {
        assert_eq!(pool_ids(Gpus::Count(3), None, || 8), ["0", "1", "2"]);
        assert_eq!(pool_ids(Gpus::Count(2), Some("5,7,9"), || 8), ["5", "7"]);
        assert_eq!(pool_ids(Gpus::Auto, Some("5, 7"), || 8), ["5", "7"]);
        assert_eq!(pool_ids(Gpus::Auto, None, || 2), ["0", "1"]);
        assert_eq!(pool_ids(Gpus::Auto, Some(""), || 1), ["0"]);
    }

    #[test]
    fn a_job_takes_the_lowest_free_gpus_and_never_a_held_one() {
        let mut pool = GpuPool::new(vec!["0".into(), "1".into(), "2".into()]);
        let a = pool.take(1).unwrap();
        let b = pool.take(2).unwrap();
        assert_eq!((a.as_slice(), b.as_slice()), (&["0".to_string()][..], &["1".to_string(), "2".to_string()][..]));
        assert_eq!(pool.take(1), None);
        pool.give_back(&a);
        assert_eq!(pool.take(2), None, "one free GPU is not two");
        assert_eq!(pool.take(1).unwrap(), ["0"]);
    }

    #[test]
    fn a_machine_without_gpus_is_told_what_is_missing() {
        let cpu_only = Probe {
            driver: None,
            libcuda_error: Some("libcuda.so.1: cannot open shared object file".into()),
            devices: 0,
            built_with_cuda: false,
        };
        let pool: Vec<String> = vec!["0".into(), "1".into(), "2".into()];
        let missing = cpu_only.missing(&pool, Some(3), 1, true).join("\n");
        assert!(missing.contains("the NVIDIA driver"), "{missing}");
        assert!(missing.contains("libcuda.so.1"), "{missing}");
        assert!(missing.contains("built without"), "{missing}");

        let gpu = Probe { driver: Some("NVRM 580".into()), libcuda_error: None, devices: 2, built_with_cuda: true };
        assert!(gpu.missing(&pool[..2], None, 2, true).is_empty());
        assert!(gpu.missing(&pool[..2], None, 3, true)[0].contains("3 GPUs for one job"));
        assert!(gpu.missing(&pool[..2], Some(3), 1, true)[0].contains("engine.gpus asks for 3"));
        let no_device = Probe { devices: 0, ..gpu };
        assert!(no_device.missing(&[], None, 1, false)[0].contains("lists none"));
    }
}
