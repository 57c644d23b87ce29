//! The system allocator, telling `fuzz_targets::heap` what each thread holds, so that the
//! session target can check its memory bound.

use std::alloc::{GlobalAlloc, Layout, System};

struct Counting;

// SAFETY: every call is passed on to the system allocator unchanged; the counters are plain
// thread-local cells that neither allocate nor unwind.
unsafe impl GlobalAlloc for Counting {
    unsafe fn alloc(&self, layout: Layout) -> *mut u8 {
        fuzz_targets::heap::allocated(layout.size());
        unsafe { System.alloc(layout) }
    }

    unsafe fn alloc_zeroed(&self, layout: Layout) -> *mut u8 {
        fuzz_targets::heap::allocated(layout.size());
        unsafe { System.alloc_zeroed(layout) }
    }

    unsafe fn dealloc(&self, ptr: *mut u8, layout: Layout) {
        fuzz_targets::heap::freed(layout.size());
        unsafe { System.dealloc(ptr, layout) }
    }

    unsafe fn realloc(&self, ptr: *mut u8, layout: Layout, new_size: usize) -> *mut u8 {
        fuzz_targets::heap::freed(layout.size());
        fuzz_targets::heap::allocated(new_size);
        unsafe { System.realloc(ptr, layout, new_size) }
    }
}

#[global_allocator]
static ALLOCATOR: Counting = Counting;
