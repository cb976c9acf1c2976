//! A resource budget for YAML documents, checked before serde_yaml builds a value.
//!
//! serde_yaml 0.9 bounds neither what aliases expand to (a few hundred KB of `&a [*b, *b, ...]`
//! build gigabytes of `Value`) nor the nesting depth libyaml's scanner works through (it keeps one
//! entry per open flow collection and walks them all for every token: quadratic, 100,000 levels
//! of `[` took 38 s), and its loader keeps every event of a document in memory before building
//! anything. So [`check`] first runs libyaml's own event parser (the one serde_yaml uses, through
//! `unsafe-libyaml`) one event at a time and stops at the first event over the budget: at most
//! [`Budget::max_depth`] open collections, and [`Budget::max_nodes`] nodes and
//! [`Budget::max_scalar_bytes`] bytes of scalars once every alias is expanded (an alias to one
//! large string is a bomb too). The same parser means the same events: nothing serde_yaml will see is left out of
//! the count. Depth stays bounded while the scan runs, so the scan is linear in the input.
//! Syntax errors are left to serde_yaml, which reports them with its own (better) messages; the
//! events before an error were within the budget, so serde_yaml's load stays bounded too.

use std::collections::HashMap;
use std::fmt;
use std::mem::MaybeUninit;

use unsafe_libyaml as unsafe_sys;

/// Limits on one YAML input (a whole stream: every document counts).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Budget {
    /// Most collections open at once.
    pub max_depth: usize,
    /// Most nodes (scalars and collections) once every alias is expanded.
    pub max_nodes: u64,
    /// Most bytes in scalars once every alias is expanded.
    pub max_scalar_bytes: u64,
}

/// The budget of a cloud-config file: generous for any real configuration (a large one has a few
/// thousand nodes, nested ten deep), small enough that the largest file (4 MiB) loads in well
/// under a second and a few tens of MB.
pub const CONFIG_BUDGET: Budget = Budget {
    max_depth: 64,
    max_nodes: 100_000,
    max_scalar_bytes: 8 * 1024 * 1024,
};

/// The budget of a network token's YAML body (twelve nodes, three deep, in every generator).
pub const TOKEN_BUDGET: Budget = Budget {
    max_depth: 8,
    max_nodes: 1_000,
    max_scalar_bytes: 128 * 1024,
};

/// Why a YAML input is over its budget.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum BudgetError {
    /// More than `max` collections open at once, first at this line.
    TooDeep { max: usize, line: u64 },
    /// More than `max` nodes with aliases expanded, first at this line.
    TooManyNodes { max: u64, line: u64 },
    /// More than `max` bytes of scalars with aliases expanded, first at this line.
    TooManyBytes { max: u64, line: u64 },
}

impl BudgetError {
    /// The 1-based line where the input went over the budget.
    #[must_use]
    pub fn line(&self) -> u64 {
        match self {
            Self::TooDeep { line, .. }
            | Self::TooManyNodes { line, .. }
            | Self::TooManyBytes { line, .. } => *line,
        }
    }
}

impl fmt::Display for BudgetError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Self::TooDeep { max, .. } => {
                write!(f, "nested more than {max} collections deep")
            }
            Self::TooManyNodes { max, .. } => write!(
                f,
                "more than {max} values once aliases are expanded (an alias bomb?)"
            ),
            Self::TooManyBytes { max, .. } => write!(
                f,
                "more than {max} bytes of text once aliases are expanded (an alias bomb?)"
            ),
        }
    }
}

/// Checks `input` against `budget`; `Ok` also when the input is not valid YAML (the caller's
/// parser reports that).
pub fn check(input: &[u8], budget: Budget) -> Result<(), BudgetError> {
    let mut parser = EventParser::new(input);
    let mut counter = Counter::new(budget);
    while let Some((event, line)) = parser.next() {
        match event {
            Event::End => return Ok(()),
            Event::Other => {}
            event => counter.count(event, line)?,
        }
    }
    Ok(())
}

/// The size of what was seen so far, or of one anchored node, aliases expanded.
#[derive(Debug, Clone, Copy, Default)]
struct Size {
    nodes: u64,
    scalar_bytes: u64,
}

/// The nodes and open collections seen so far.
struct Counter {
    budget: Budget,
    /// Everything so far, aliases expanded.
    total: Size,
    /// Open collections: their anchor and `total` before them.
    open: Vec<(Option<Vec<u8>>, Size)>,
    /// Expanded size of each anchored node (the latest definition of a name wins, as in YAML).
    anchors: HashMap<Vec<u8>, Size>,
}

impl Counter {
    fn new(budget: Budget) -> Self {
        Self {
            budget,
            total: Size::default(),
            open: Vec::new(),
            anchors: HashMap::new(),
        }
    }

    fn count(&mut self, event: Event, line: u64) -> Result<(), BudgetError> {
        match event {
            Event::Scalar(anchor, len) => {
                let size = Size {
                    nodes: 1,
                    scalar_bytes: len,
                };
                self.add(size, line)?;
                if let Some(anchor) = anchor {
                    self.anchors.insert(anchor, size);
                }
            }
            Event::Alias(anchor) => {
                // An unknown anchor is serde_yaml's error to report; count it as one node.
                let size = self.anchors.get(&anchor).copied().unwrap_or(Size {
                    nodes: 1,
                    scalar_bytes: 0,
                });
                self.add(size, line)?;
            }
            Event::Start(anchor) => {
                if self.open.len() >= self.budget.max_depth {
                    return Err(BudgetError::TooDeep {
                        max: self.budget.max_depth,
                        line,
                    });
                }
                self.open.push((anchor, self.total));
                let one = Size {
                    nodes: 1,
                    scalar_bytes: 0,
                };
                self.add(one, line)?;
            }
            Event::End | Event::Other => {}
            Event::CollectionEnd => {
                if let Some((Some(anchor), before)) = self.open.pop() {
                    let size = Size {
                        nodes: self.total.nodes - before.nodes,
                        scalar_bytes: self.total.scalar_bytes - before.scalar_bytes,
                    };
                    self.anchors.insert(anchor, size);
                }
            }
        }
        Ok(())
    }

    fn add(&mut self, size: Size, line: u64) -> Result<(), BudgetError> {
        self.total.nodes = self.total.nodes.saturating_add(size.nodes);
        self.total.scalar_bytes = self.total.scalar_bytes.saturating_add(size.scalar_bytes);
        if self.total.nodes > self.budget.max_nodes {
            return Err(BudgetError::TooManyNodes {
                max: self.budget.max_nodes,
                line,
            });
        }
        if self.total.scalar_bytes > self.budget.max_scalar_bytes {
            return Err(BudgetError::TooManyBytes {
                max: self.budget.max_scalar_bytes,
                line,
            });
        }
        Ok(())
    }
}

/// What the budget needs of one libyaml event.
enum Event {
    /// A scalar, with its anchor and its length in bytes.
    Scalar(Option<Vec<u8>>, u64),
    /// An alias to this anchor.
    Alias(Vec<u8>),
    /// A sequence or mapping opens, with its anchor.
    Start(Option<Vec<u8>>),
    /// A sequence or mapping closes.
    CollectionEnd,
    /// Stream and document boundaries.
    Other,
    /// The end of the stream.
    End,
}

/// libyaml's event parser over a borrowed input. Boxed: libyaml keeps pointers into the parser
/// struct, so it must not move once initialised.
struct EventParser<'input> {
    sys: Box<MaybeUninit<unsafe_sys::yaml_parser_t>>,
    /// Whether `yaml_parser_initialize` succeeded (then `Drop` must delete the parser).
    ready: bool,
    /// Set after an error or the end of the stream: libyaml must not be called again.
    done: bool,
    _input: std::marker::PhantomData<&'input [u8]>,
}

impl<'input> EventParser<'input> {
    fn new(input: &'input [u8]) -> Self {
        let mut sys = Box::new(MaybeUninit::<unsafe_sys::yaml_parser_t>::uninit());
        let parser = sys.as_mut_ptr();
        // SAFETY: `parser` points to writable memory that `yaml_parser_initialize` zeroes and
        // initialises; the input outlives the parser (the `'input` borrow) and is only read.
        let ready = unsafe {
            let ok = unsafe_sys::yaml_parser_initialize(parser).ok;
            if ok {
                unsafe_sys::yaml_parser_set_encoding(parser, unsafe_sys::YAML_UTF8_ENCODING);
                unsafe_sys::yaml_parser_set_input_string(
                    parser,
                    input.as_ptr(),
                    input.len() as u64,
                );
            }
            ok
        };
        Self {
            sys,
            ready,
            done: !ready,
            _input: std::marker::PhantomData,
        }
    }

    /// The next event and its 1-based line; `None` after a syntax error (or if libyaml could
    /// not start).
    fn next(&mut self) -> Option<(Event, u64)> {
        if self.done {
            return None;
        }
        let parser = self.sys.as_mut_ptr();
        let mut raw = MaybeUninit::<unsafe_sys::yaml_event_t>::uninit();
        // SAFETY: the parser is initialised (`ready`) and has not failed (`done` is set on the
        // first failure); a successfully parsed event is read, then deleted exactly once.
        unsafe {
            if !unsafe_sys::yaml_parser_parse(parser, raw.as_mut_ptr()).ok {
                self.done = true;
                return None;
            }
            let raw = raw.as_mut_ptr();
            let event = match (*raw).type_ {
                unsafe_sys::YAML_SCALAR_EVENT => {
                    Event::Scalar(anchor((*raw).data.scalar.anchor), (*raw).data.scalar.length)
                }
                unsafe_sys::YAML_ALIAS_EVENT => {
                    Event::Alias(anchor((*raw).data.alias.anchor).unwrap_or_default())
                }
                unsafe_sys::YAML_SEQUENCE_START_EVENT => {
                    Event::Start(anchor((*raw).data.sequence_start.anchor))
                }
                unsafe_sys::YAML_MAPPING_START_EVENT => {
                    Event::Start(anchor((*raw).data.mapping_start.anchor))
                }
                unsafe_sys::YAML_SEQUENCE_END_EVENT | unsafe_sys::YAML_MAPPING_END_EVENT => {
                    Event::CollectionEnd
                }
                unsafe_sys::YAML_STREAM_END_EVENT => {
                    self.done = true;
                    Event::End
                }
                _ => Event::Other,
            };
            let line = (*raw).start_mark.line + 1;
            unsafe_sys::yaml_event_delete(raw);
            Some((event, line))
        }
    }
}

/// A copy of a NUL-terminated anchor name; `None` for a null pointer.
///
/// # Safety
/// `ptr` is null or points to a NUL-terminated string that lives for the call.
unsafe fn anchor(ptr: *const u8) -> Option<Vec<u8>> {
    if ptr.is_null() {
        return None;
    }
    // SAFETY: guaranteed by the caller.
    let name = unsafe { std::ffi::CStr::from_ptr(ptr.cast()) };
    Some(name.to_bytes().to_vec())
}

impl Drop for EventParser<'_> {
    fn drop(&mut self) {
        if self.ready {
            // SAFETY: initialised by `yaml_parser_initialize`, deleted once.
            unsafe { unsafe_sys::yaml_parser_delete(self.sys.as_mut_ptr()) }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const SMALL: Budget = Budget {
        max_depth: 4,
        max_nodes: 20,
        max_scalar_bytes: 100,
    };

    #[test]
    fn ordinary_documents_pass() {
        let doc = "p2p:\n  network_token: x\n  auto:\n    ha:\n      enable: true\nk3s:\n  args: [a, b]\n";
        assert_eq!(check(doc.as_bytes(), CONFIG_BUDGET), Ok(()));
        assert_eq!(check(b"", SMALL), Ok(()));
        assert_eq!(check(b"a: &x [1, 2]\nb: *x\n", SMALL), Ok(()));
    }

    #[test]
    fn syntax_errors_are_left_to_the_parser() {
        assert_eq!(check(b"a: [\n", SMALL), Ok(()));
        assert_eq!(check(b"a: *nope\n", SMALL), Ok(()));
        assert_eq!(check(b"\"unterminated\n", SMALL), Ok(()));
    }

    #[test]
    fn depth_is_bounded_in_flow_and_block_style() {
        assert_eq!(check(b"[[[[x]]]]", SMALL), Ok(()));
        assert_eq!(
            check(b"[[[[[x]]]]]", SMALL),
            Err(BudgetError::TooDeep { max: 4, line: 1 })
        );
        assert_eq!(
            check(b"a:\n b:\n  c:\n   d:\n    e: 1\n", SMALL),
            Err(BudgetError::TooDeep { max: 4, line: 5 })
        );
        assert!(check(b"- - - - - x\n", SMALL).is_err());
    }

    #[test]
    fn aliases_count_what_they_expand_to() {
        // a: 3 nodes; b: 1 + 3*3 = 10; c = 1 + 2*10 = 21 -> over 20 with the mapping and keys.
        let bomb = b"a: &a [1, 2]\nb: &b [*a, *a, *a]\nc: [*b, *b]\n";
        assert!(matches!(
            check(bomb, SMALL),
            Err(BudgetError::TooManyNodes { max: 20, line: 3 })
        ));
        // A redefined anchor counts with its latest definition.
        assert_eq!(
            check(b"- &a [1, 2, 3, 4, 5, 6]\n- &a 1\n- [*a, *a, *a]\n", SMALL),
            Ok(())
        );
    }

    #[test]
    fn aliases_to_long_strings_count_their_bytes() {
        let text = "x".repeat(40);
        assert_eq!(
            check(format!("a: &a {text}\nb: *a\n").as_bytes(), SMALL),
            Ok(())
        );
        assert!(matches!(
            check(format!("a: &a {text}\nb: [*a, *a]\n").as_bytes(), SMALL),
            Err(BudgetError::TooManyBytes { max: 100, line: 2 })
        ));
    }

    #[test]
    fn every_document_of_a_stream_counts() {
        let stream = "---\n[1, 2, 3, 4, 5, 6, 7, 8]\n".repeat(3);
        assert!(check(stream.as_bytes(), SMALL).is_err());
    }
}
