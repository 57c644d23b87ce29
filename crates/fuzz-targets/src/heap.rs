//! How much the current thread holds on the heap, for the memory bounds of the session
//! target.
//!
//! The counters are only fed when the binary's global allocator calls [`allocated`] and
//! [`freed`]: the fuzz binaries in `fuzz/fuzz_targets/` install such an allocator, the stable
//! replay does not (the workspace forbids unsafe code), and there [`installed`] stays false and
//! the memory bound is not checked.

use std::cell::Cell;

thread_local! {
    static LIVE: Cell<usize> = const { Cell::new(0) };
    static PEAK: Cell<usize> = const { Cell::new(0) };
    static INSTALLED: Cell<bool> = const { Cell::new(false) };
}

/// The allocator handed out `size` octets on this thread.
pub fn allocated(size: usize) {
    let _ = INSTALLED.try_with(|installed| installed.set(true));
    let _ = LIVE.try_with(|live| {
        let now = live.get().saturating_add(size);
        live.set(now);
        let _ = PEAK.try_with(|peak| peak.set(peak.get().max(now)));
    });
}

/// The allocator took back `size` octets on this thread.
pub fn freed(size: usize) {
    let _ = LIVE.try_with(|live| live.set(live.get().saturating_sub(size)));
}

/// True when a counting allocator feeds this module.
pub fn installed() -> bool {
    INSTALLED.try_with(Cell::get).unwrap_or(false)
}

/// Starts a measurement: returns what is live now, and makes that the peak.
pub fn start() -> usize {
    let live = LIVE.try_with(Cell::get).unwrap_or(0);
    let _ = PEAK.try_with(|peak| peak.set(live));
    live
}

/// The most that was live on this thread since [`start`] returned `base`, beyond `base`.
pub fn peak_since(base: usize) -> usize {
    PEAK.try_with(Cell::get).unwrap_or(0).saturating_sub(base)
}
