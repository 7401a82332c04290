//! Resolved stacks: what a stack id names once symbolized, and the store the
//! report reads them from (kept by the session, filled by its worker thread).

use rustc_hash::FxHashMap;

/// What kind of code a frame is.
#[derive(Clone, Copy, Debug, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum FrameKind {
    /// Machine code, symbolized from the object's symbols and debug info.
    Native,
    /// A CPython frame: the code object's qualified name, file and line.
    Python,
}

/// One frame of a symbolized stack.
#[derive(Clone, Debug, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct Frame {
    /// Function name, demangled; `null` when unknown.
    pub function: Option<String>,
    /// Source file, when debug info has it.
    pub file: Option<String>,
    /// Source line, when debug info has it.
    pub line: Option<u32>,
    /// Object the code belongs to.
    pub module: Option<String>,
    /// Native code, or a CPython frame.
    pub kind: FrameKind,
    /// The address in the target, hex.
    pub address: String,
    /// Whether the function was inlined into the next frame.
    pub inlined: bool,
}

/// A resolved stack.
#[derive(Clone, Debug, Default, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct Stack {
    /// Frames, innermost first.
    pub frames: Vec<Frame>,
    /// The walk stopped before the outermost frame.
    pub truncated: bool,
    /// Bytes of stack from the stack pointer to the outermost frame reached.
    pub span: u64,
}

/// Resolved stacks by stack id.
#[derive(Debug, Default)]
pub struct StackStore {
    stacks: FxHashMap<i64, Stack>,
}

impl StackStore {
    /// Adds resolved stacks (a stack resolved again replaces the old one).
    pub fn extend(&mut self, stacks: impl IntoIterator<Item = (i64, Stack)>) {
        self.stacks.extend(stacks);
    }

    /// A resolved stack.
    pub fn get(&self, id: i64) -> Option<&Stack> {
        self.stacks.get(&id)
    }

    /// Forgets stacks (aged out).
    pub fn forget(&mut self, ids: &[i64]) {
        for id in ids {
            self.stacks.remove(id);
        }
    }

    /// The stacks, by id, in no order.
    pub fn iter(&self) -> impl Iterator<Item = (i64, &Stack)> {
        self.stacks.iter().map(|(&id, s)| (id, s))
    }

    /// Stacks resolved so far.
    pub fn len(&self) -> usize {
        self.stacks.len()
    }

    /// Whether no stack was resolved yet.
    pub fn is_empty(&self) -> bool {
        self.stacks.is_empty()
    }
}
