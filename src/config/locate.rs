//! Finding the line of a key path in YAML source text.
//!
//! serde_yaml's `Value` carries no positions, so a small indentation-aware scanner walks the text
//! and tracks the path of every block-style mapping key and sequence item. That is good enough for
//! block-style YAML, the way cloud-configs are written. Inside a flow collection (`p2p: {a: 1}`)
//! or an alias (`p2p: *base`) the line of the key holding it is used; otherwise (anything the
//! scanner does not understand) the line is simply unknown. Only the wanted paths are recorded,
//! so memory stays proportional to the number of messages, not to the size of the file.

use std::collections::HashMap;

use super::keypath::{KeyPath, Seg};

/// Paths deeper than this are not located (kairos-p2p's keys are at most 4 deep).
const MAX_DEPTH: usize = 16;

/// The 1-based line of each wanted path in `text`, `None` where it could not be located.
pub(super) fn find_lines(text: &str, wanted: &[&KeyPath]) -> Vec<Option<usize>> {
    let mut found: HashMap<&[Seg], Option<Mark>> = HashMap::new();
    let mut max_depth = 0;
    for path in wanted {
        let segs = path.segs();
        if segs.len() > MAX_DEPTH {
            continue;
        }
        max_depth = max_depth.max(segs.len());
        for n in 1..=segs.len() {
            if let Some(prefix) = segs.get(..n) {
                found.entry(prefix).or_insert(None);
            }
        }
    }
    if !found.is_empty() {
        let mut scanner = Scanner {
            frames: Vec::new(),
            root_items: 0,
            skip: Skip::None,
            max_depth,
            found: &mut found,
            current: None,
        };
        let text = text.strip_prefix('\u{feff}').unwrap_or(text);
        for (i, line) in text.lines().enumerate() {
            scanner.line(i + 1, line);
        }
    }
    wanted.iter().map(|p| lookup(&found, p.segs())).collect()
}

/// The exact line of `segs`, else the line of the nearest enclosing flow collection or alias.
fn lookup(found: &HashMap<&[Seg], Option<Mark>>, segs: &[Seg]) -> Option<usize> {
    if let Some(Some(mark)) = found.get(segs) {
        return Some(mark.line);
    }
    (1..segs.len()).rev().find_map(|n| {
        let prefix = segs.get(..n)?;
        match found.get(prefix) {
            Some(Some(mark)) if mark.opaque => Some(mark.line),
            _ => None,
        }
    })
}

#[derive(Debug, Clone, Copy)]
struct Mark {
    line: usize,
    /// The value is a flow collection or an alias: keys below it have no line of their own.
    opaque: bool,
}

#[derive(Debug)]
struct Frame {
    indent: usize,
    seg: Seg,
    item: bool,
    /// Sequence items seen so far under this frame.
    items: usize,
}

/// Lines that belong to a multi-line value and must not be read as keys.
#[derive(Debug, Clone, Copy)]
enum Skip {
    None,
    /// A block scalar (`|`, `>`): blank lines and lines indented more than `indent`.
    Block {
        indent: usize,
    },
    /// A quoted scalar not closed on its first line.
    Quoted(char),
    /// A flow collection not closed on its first line, with its nesting depth.
    Flow(usize),
}

struct Scanner<'f, 'w> {
    frames: Vec<Frame>,
    root_items: usize,
    skip: Skip,
    max_depth: usize,
    found: &'f mut HashMap<&'w [Seg], Option<Mark>>,
    /// The wanted path recorded on the current line, if any.
    current: Option<Vec<Seg>>,
}

impl Scanner<'_, '_> {
    fn line(&mut self, no: usize, raw: &str) {
        let body = raw.trim_end();
        let content = body.trim_start_matches(' ');
        let indent = body.len() - content.len();
        match self.skip {
            Skip::None => {}
            Skip::Block { indent: min } => {
                if content.is_empty() || indent > min {
                    return;
                }
                self.skip = Skip::None;
            }
            Skip::Quoted(q) => {
                if closing_quote(q, body).is_some() {
                    self.skip = Skip::None;
                }
                return;
            }
            Skip::Flow(depth) => {
                let depth = depth.saturating_add_signed(bracket_delta(body));
                self.skip = if depth > 0 {
                    Skip::Flow(depth)
                } else {
                    Skip::None
                };
                return;
            }
        }
        if content.is_empty() || content.starts_with('#') {
            return;
        }
        if indent == 0
            && (content.starts_with("---")
                || content.starts_with("...")
                || content.starts_with('%'))
        {
            self.frames.clear();
            self.root_items = 0;
            return;
        }
        self.content(no, indent, content);
    }

    fn content(&mut self, no: usize, mut col: usize, mut rest: &str) {
        self.current = None;
        let mut item = false;
        while let Some(after) = rest.strip_prefix('-') {
            if !(after.is_empty() || after.starts_with([' ', '\t'])) {
                break;
            }
            self.item(no, col);
            item = true;
            let value = after.trim_start_matches([' ', '\t']);
            if value.is_empty() || value.starts_with('#') {
                return;
            }
            col += 1 + (after.len() - value.len());
            rest = value;
        }
        match split_key(rest) {
            Some((key, value)) => {
                self.key(no, col, key);
                self.value(value.trim_start_matches([' ', '\t']));
            }
            None if item => self.value(rest),
            None => {}
        }
    }

    fn key(&mut self, no: usize, col: usize, key: String) {
        while self.frames.last().is_some_and(|f| f.indent >= col) {
            self.frames.pop();
        }
        self.frames.push(Frame {
            indent: col,
            seg: Seg::Key(key),
            item: false,
            items: 0,
        });
        self.record(no);
    }

    fn item(&mut self, no: usize, col: usize) {
        while self
            .frames
            .last()
            .is_some_and(|f| f.indent > col || (f.indent == col && f.item))
        {
            self.frames.pop();
        }
        let counter = match self.frames.last_mut() {
            Some(parent) => &mut parent.items,
            None => &mut self.root_items,
        };
        let index = *counter;
        *counter += 1;
        self.frames.push(Frame {
            indent: col,
            seg: Seg::Index(index),
            item: true,
            items: 0,
        });
        self.record(no);
    }

    fn record(&mut self, no: usize) {
        self.current = None;
        if self.frames.len() > self.max_depth {
            return;
        }
        let path: Vec<Seg> = self.frames.iter().map(|f| f.seg.clone()).collect();
        if let Some(slot) = self.found.get_mut(path.as_slice()) {
            if slot.is_none() {
                *slot = Some(Mark {
                    line: no,
                    opaque: false,
                });
                self.current = Some(path);
            }
        }
    }

    /// Looks at the value after a key or a dash: multi-line values set `skip`.
    fn value(&mut self, value: &str) {
        let value = strip_properties(value);
        let indent = self.frames.last().map_or(0, |f| f.indent);
        match value.chars().next() {
            Some('|' | '>') => self.skip = Skip::Block { indent },
            Some('[' | '{') => {
                self.mark_opaque();
                let depth = bracket_delta(value);
                if depth > 0 {
                    self.skip = Skip::Flow(depth.unsigned_abs());
                }
            }
            Some('*') => self.mark_opaque(),
            Some(q @ ('"' | '\'')) if closing_quote(q, value.get(1..).unwrap_or("")).is_none() => {
                self.skip = Skip::Quoted(q);
            }
            _ => {}
        }
    }

    fn mark_opaque(&mut self) {
        if let Some(path) = &self.current {
            if let Some(Some(mark)) = self.found.get_mut(path.as_slice()) {
                mark.opaque = true;
            }
        }
    }
}

/// Splits `key: value` (plain, double- or single-quoted key); `None` when the text is no key.
fn split_key(s: &str) -> Option<(String, &str)> {
    let (key, after) = if let Some(inner) = s.strip_prefix('"') {
        let end = closing_quote('"', inner)?;
        let key = inner
            .get(..end)?
            .replace("\\\"", "\"")
            .replace("\\\\", "\\");
        (key, inner.get(end + 1..)?)
    } else if let Some(inner) = s.strip_prefix('\'') {
        let end = closing_quote('\'', inner)?;
        (inner.get(..end)?.replace("''", "'"), inner.get(end + 1..)?)
    } else {
        if s.starts_with(['[', '{', '#', '&', '*', '!', '|', '>', '%', '@', '`', '?']) {
            return None;
        }
        let mut prev_blank = false;
        for (i, c) in s.char_indices() {
            if c == '#' && prev_blank {
                return None;
            }
            if c == ':' {
                let after = s.get(i + 1..)?;
                if after.is_empty() || after.starts_with([' ', '\t']) {
                    return Some((s.get(..i)?.trim_end().to_owned(), after));
                }
            }
            prev_blank = c == ' ' || c == '\t';
        }
        return None;
    };
    let value = after.trim_start_matches([' ', '\t']).strip_prefix(':')?;
    (value.is_empty() || value.starts_with([' ', '\t'])).then_some((key, value))
}

/// Byte offset of the quote closing a scalar whose opening quote `q` precedes `s`.
fn closing_quote(q: char, s: &str) -> Option<usize> {
    let mut chars = s.char_indices().peekable();
    while let Some((i, c)) = chars.next() {
        if q == '"' && c == '\\' {
            chars.next();
        } else if c == q {
            if q == '\'' && chars.peek().is_some_and(|&(_, n)| n == '\'') {
                chars.next();
            } else {
                return Some(i);
            }
        }
    }
    None
}

/// Skips anchors (`&name`) and tags (`!tag`) in front of a value.
fn strip_properties(mut s: &str) -> &str {
    while s.starts_with(['&', '!']) {
        s = s
            .find([' ', '\t'])
            .and_then(|i| s.get(i..))
            .unwrap_or("")
            .trim_start_matches([' ', '\t']);
    }
    s
}

/// Opening minus closing brackets outside quoted scalars and comments.
fn bracket_delta(s: &str) -> isize {
    let mut delta = 0isize;
    let mut quote = None;
    let mut escaped = false;
    let mut prev_blank = true;
    for c in s.chars() {
        match quote {
            Some('"') if escaped => escaped = false,
            Some('"') if c == '\\' => escaped = true,
            Some(q) if c == q => quote = None,
            Some(_) => {}
            None => match c {
                '"' | '\'' => quote = Some(c),
                '#' if prev_blank => break,
                '[' | '{' => delta += 1,
                ']' | '}' => delta -= 1,
                _ => {}
            },
        }
        prev_blank = c == ' ' || c == '\t';
    }
    delta
}

#[cfg(test)]
mod tests {
    use super::*;

    fn path(s: &str) -> KeyPath {
        let mut p = KeyPath::default();
        for part in s.split('.') {
            let mut pieces = part.split('[');
            p = p.key(pieces.next().unwrap());
            for i in pieces {
                p = p.index(i.trim_end_matches(']').parse().unwrap());
            }
        }
        p
    }

    fn lines(text: &str, paths: &[&str]) -> Vec<Option<usize>> {
        let owned: Vec<KeyPath> = paths.iter().map(|p| path(p)).collect();
        let wanted: Vec<&KeyPath> = owned.iter().collect();
        find_lines(text, &wanted)
    }

    const DOC: &str = r#"#cloud-config
install:
  auto: true
hostname: "kubevip-{{ trunc 4 .MachineID }}"
users:
- name: "kairos"
  ssh_authorized_keys:
  - github:mudler
kubevip:
  eip: "192.168.1.110"   # the VIP: not a key
p2p:
 role: ""
 vpn:
   create: false
 auto:
   ha:
     master_nodes: 2
k3s:
  args:
    - --a
    -   "--b"
  env:
    A: b
"#;

    #[test]
    fn block_style_paths() {
        assert_eq!(
            lines(
                DOC,
                &[
                    "kubevip.eip",
                    "p2p.role",
                    "p2p.vpn.create",
                    "p2p.auto.ha.master_nodes",
                    "k3s.args[0]",
                    "k3s.args[1]",
                    "k3s.env.A",
                    "users[0].ssh_authorized_keys[0]",
                    "p2p.missing",
                ]
            ),
            [
                Some(10),
                Some(12),
                Some(14),
                Some(17),
                Some(20),
                Some(21),
                Some(23),
                Some(8),
                None
            ]
        );
    }

    #[test]
    fn flow_and_aliases_use_the_enclosing_key() {
        let text = "base: &b {network_id: x}\np2p: {vpn: {create: 1},\n  role: x}\nk3s: *b\nkubevip:\n  eip: 1\n";
        assert_eq!(
            lines(
                text,
                &[
                    "p2p.vpn.create",
                    "p2p.role",
                    "k3s.network_id",
                    "kubevip.eip"
                ]
            ),
            [Some(2), Some(2), Some(4), Some(6)]
        );
    }

    #[test]
    fn multi_line_scalars_are_not_keys() {
        let text = "a: |\n  p2p:\n    role: x\nb: \"line one\n  p2p: 2\"\nc: [1,\n  p2p: 3]\np2p:\n  role: y\n";
        assert_eq!(lines(text, &["p2p.role"]), [Some(9)]);
    }

    #[test]
    fn quoted_keys_comments_and_documents() {
        let text =
            "---\n\"p2p\":\n  'role': master # role: x\n  # dns: true\n  x: a:b\n  'it''s': 1\n";
        assert_eq!(
            lines(text, &["p2p.role", "p2p.dns", "p2p.x", "p2p.it's"]),
            [Some(3), None, Some(5), Some(6)]
        );
    }

    #[test]
    fn nested_sequences_and_items_at_parent_indent() {
        let text = "a:\n- - x\n  - y\n- z\nb:\n  - k: 1\n    j: 2\n  - k: 3\n";
        assert_eq!(
            lines(text, &["a[0][1]", "a[1]", "b[0].j", "b[1].k"]),
            [Some(3), Some(4), Some(7), Some(8)]
        );
    }

    #[test]
    fn odd_input_does_not_panic() {
        for text in [
            "- -\n",
            ": :\n",
            "\"unterminated: x\n",
            "'a''",
            "p2p: &\n",
            "]]]]\n",
            "a: {\n",
        ] {
            let _ = lines(text, &["p2p.role"]);
        }
    }
}
