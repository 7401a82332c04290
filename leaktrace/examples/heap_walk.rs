//! Walks a live process's glibc heaps from outside and prints the result as JSON.
//! `cargo run --example heap_walk -- PID` (as root). No tracing involved.

use leaktrace::{
    heap::glibc as glibc_heap,
    process::{self, procfs},
};

fn main() {
    let Some(pid) = std::env::args().nth(1).and_then(|p| p.parse::<u32>().ok()) else {
        eprintln!("usage: heap_walk PID");
        std::process::exit(2);
    };
    let maps = procfs::read_maps(pid).unwrap_or_else(|e| {
        eprintln!("heap_walk: cannot read /proc/{pid}/maps: {e}");
        std::process::exit(1);
    });
    let sites = glibc_heap::find_sites(&maps, procfs::read_start_brk(pid), None);
    let mem = process::ProcMemory::open(pid).unwrap_or_else(|e| {
        eprintln!("heap_walk: cannot open /proc/{pid}/mem: {e}");
        std::process::exit(1);
    });
    let t = std::time::Instant::now();
    let w = glibc_heap::walk_heaps(&mem, &sites);
    eprintln!("walked in {:.1} ms", t.elapsed().as_secs_f64() * 1e3);
    println!("{}", serde_json::to_string_pretty(&w).expect("serializes"));
}
