//! The Rust allocator scenarios on mimalloc linked statically (the `mimalloc` crate:
//! `mi_`-named, so the C library's malloc stays beside it).

#[global_allocator]
static GLOBAL: mimalloc::MiMalloc = mimalloc::MiMalloc;

#[path = "../alloc_fixtures/scenarios.rs"]
mod scenarios;

fn main() {
    scenarios::run(|| "no counts".into());
}
