//! The allocation bound of the fuzz targets and of the corpus test: any single allocation (or
//! reallocation) larger than [`MAX_ALLOCATION`] aborts the process with a message, as libFuzzer's
//! `-malloc_limit_mb` does; libFuzzer's `-rss_limit_mb` bounds the total. Included with `#[path]`
//! by every fuzz target and by `tests/fuzz_corpus.rs`, so both run under the same bound.

use std::alloc::{GlobalAlloc, Layout, System};

/// The largest single allocation an input may cause: 64 MiB, 32 times the largest input any target
/// takes (2 MiB).
pub const MAX_ALLOCATION: usize = 64 << 20;

/// The system allocator, refusing allocations over [`MAX_ALLOCATION`].
pub struct Bounded;

fn over() -> ! {
    // Writing a static message allocates nothing (stderr is unbuffered).
    let _ = std::io::Write::write_all(
        &mut std::io::stderr(),
        b"allocation bound exceeded: one allocation over 64 MiB\n",
    );
    std::process::abort();
}

// SAFETY: forwards to the system allocator unchanged; only refuses sizes over the bound.
unsafe impl GlobalAlloc for Bounded {
    unsafe fn alloc(&self, layout: Layout) -> *mut u8 {
        if layout.size() > MAX_ALLOCATION {
            over();
        }
        System.alloc(layout)
    }

    unsafe fn alloc_zeroed(&self, layout: Layout) -> *mut u8 {
        if layout.size() > MAX_ALLOCATION {
            over();
        }
        System.alloc_zeroed(layout)
    }

    unsafe fn dealloc(&self, ptr: *mut u8, layout: Layout) {
        System.dealloc(ptr, layout)
    }

    unsafe fn realloc(&self, ptr: *mut u8, layout: Layout, new_size: usize) -> *mut u8 {
        if new_size > MAX_ALLOCATION {
            over();
        }
        System.realloc(ptr, layout, new_size)
    }
}
