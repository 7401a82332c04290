//! The Rust allocator scenarios on jemalloc linked statically (tikv-jemallocator:
//! `_rjem_`-prefixed, so the C library's malloc stays beside it).

#[global_allocator]
static GLOBAL: tikv_jemallocator::Jemalloc = tikv_jemallocator::Jemalloc;

#[path = "../alloc_fixtures/scenarios.rs"]
mod scenarios;

fn main() {
    scenarios::run();
}
