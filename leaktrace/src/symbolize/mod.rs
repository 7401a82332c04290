//! Stack ids to frames: the native frames of a stack ([`native`], blazesym over a
//! snapshot of the target's mappings), CPython's frames read from the interpreter
//! ([`python`]), and the resolved stacks the report reads ([`stacks`]).

pub mod native;
pub mod python;
pub mod stacks;

pub use stacks::{Frame, FrameKind, Stack, StackStore};
