//! The device's memory pool: keep freed memory cached, and read and reset its peak use.

use std::ffi::c_void;

use candle_core::cuda_backend::CudaDevice;
use candle_core::Result;

use super::launch::driver;

/// The default memory pool of a device, from which cudarc's stream-ordered allocations come.
fn default_pool(dev: &CudaDevice) -> Result<cudarc::driver::sys::CUmemoryPool> {
    use cudarc::driver::sys;
    let stream = dev.cuda_stream();
    let ctx = stream.context();
    ctx.bind_to_thread().map_err(driver)?;
    let mut pool: sys::CUmemoryPool = std::ptr::null_mut();
    // SAFETY: writes one handle for a valid device.
    unsafe { sys::cuDeviceGetDefaultMemPool(&mut pool, ctx.cu_device()) }.result().map_err(driver)?;
    Ok(pool)
}

fn pool_attribute(dev: &CudaDevice, attr: cudarc::driver::sys::CUmemPool_attribute, set: Option<u64>) -> Result<u64> {
    let pool = default_pool(dev)?;
    let mut value: u64 = set.unwrap_or(0);
    let at = &mut value as *mut u64 as *mut c_void;
    // SAFETY: the attributes used here are 64-bit values.
    let status = unsafe {
        match set {
            Some(_) => cudarc::driver::sys::cuMemPoolSetAttribute(pool, attr, at),
            None => cudarc::driver::sys::cuMemPoolGetAttribute(pool, attr, at),
        }
    };
    status.result().map_err(driver)?;
    Ok(value)
}

/// Keep freed device memory in the pool instead of returning it to the driver at every
/// synchronisation (the pool's default release threshold is 0), as a caching allocator does.
pub fn keep_freed_memory(dev: &CudaDevice) -> Result<()> {
    pool_attribute(dev, cudarc::driver::sys::CUmemPool_attribute::CU_MEMPOOL_ATTR_RELEASE_THRESHOLD, Some(u64::MAX)).map(|_| ())
}

/// The most device memory in use at once since the last [`reset_peak_memory`], in bytes.
pub fn peak_memory(dev: &CudaDevice) -> Result<u64> {
    pool_attribute(dev, cudarc::driver::sys::CUmemPool_attribute::CU_MEMPOOL_ATTR_USED_MEM_HIGH, None)
}

/// Start [`peak_memory`]'s count again from the memory in use now.
pub fn reset_peak_memory(dev: &CudaDevice) -> Result<()> {
    pool_attribute(dev, cudarc::driver::sys::CUmemPool_attribute::CU_MEMPOOL_ATTR_USED_MEM_HIGH, Some(0)).map(|_| ())
}
