//! SIGINT/SIGTERM → finish the current step, write a checkpoint, exit cleanly.
//!
//! The handler only records the signal in an atomic (async-signal-safe); the training loop
//! polls it between steps. A second signal while the first is pending exits at once.

use std::sync::atomic::{AtomicI32, Ordering};
use std::sync::Arc;

/// The pending stop request: 0 for none, else the signal number.
#[derive(Debug, Clone, Default)]
pub struct StopFlag(Arc<AtomicI32>);

impl StopFlag {
    pub fn new() -> Self {
        Self::default()
    }

    /// Ask the loop to stop (as if `signal` had arrived).
    pub fn request(&self, signal: i32) {
        self.0.store(signal, Ordering::SeqCst);
    }

    /// The signal that asked for a stop, if any.
    pub fn requested(&self) -> Option<i32> {
        match self.0.load(Ordering::SeqCst) {
            0 => None,
            s => Some(s),
        }
    }
}

/// Route SIGINT and SIGTERM to a new [`StopFlag`].
pub fn install() -> std::io::Result<StopFlag> {
    let flag = StopFlag::new();
    for sig in [libc::SIGINT, libc::SIGTERM] {
        let f = flag.0.clone();
        let action = move || {
            if f.swap(sig, Ordering::SeqCst) != 0 {
                // Second signal: the user insists. `_exit` is async-signal-safe.
                unsafe { libc::_exit(128 + sig) };
            }
        };
        // SAFETY: the action only touches an atomic and calls `_exit`, both async-signal-safe.
        unsafe { signal_hook_registry::register(sig, action) }?;
    }
    Ok(flag)
}
