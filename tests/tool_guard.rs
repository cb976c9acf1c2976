//! The set-up guard: every program the repo's demo, tests, benchmarks, soak, fuzzing and cross
//! builds run is either on a fresh Debian 12 minbase root (`tests/data/debian12-minbase-commands.txt`),
//! part of the Rust toolchain the README asks for, or installed by a set-up script's
//! `tool=package` table. A program that only this machine happens to have fails here, naming the
//! file and line that runs it, instead of failing later on a fresh machine or in CI.
//!
//! What it reads (files git would hold under `tests/`, `cross/`, `.ci/` and the Makefiles; not
//! `src/`, whose only programs — k3s, systemctl, rc-service — belong to the nodes it runs on):
//! - Rust: `Command::new("prog")` (or a `const` holding the name), `"netns", "exec", NS, "prog"`
//!   in an argument list, and the first element of the argument list given to a helper whose
//!   first argument is a program (`RUNNERS`). Every helper taking `&[&str]` must be classified in
//!   `RUNNERS` or `NOT_RUNNERS`, so a new helper cannot hide a program.
//! - Shell (`*.sh`, Makefiles, `.ci/run`): the first word of every simple command (after
//!   assignments; through `ip netns exec NS` and `timeout N`), in `$(...)` too, not in quoted
//!   text, comments or here-documents; builtins and the file's own functions are not programs.
//! - Python (`tests/k3s-standin`, `*.py`): `subprocess.*(["prog", ...`.
//!
//! Where the tables are: `tests/setup-host.sh` (`make deps`, run by `make demo`, `make test`,
//! `make bench` and `make soak`) serves every file; another `setup*.sh` with an `install_missing`
//! table (or a `*_TOOLS=(tool=package ...)` array) serves the files in its own directory
//! (`tests/bench/`, `cross/`); any other script with a table serves only itself.
//! Commands built at run time (strings handed to `sh -c`) are not seen: keep programs literal.

use std::collections::{BTreeMap, BTreeSet};
use std::fs;
use std::path::{Path, PathBuf};

/// Helpers (file suffix, function) whose `&[&str]` argument starts with a program name.
const RUNNERS: &[(&str, &str)] = &[
    ("tests/common/mod.rs", "sh"),
    ("tests/common/mod.rs", "exec_ok"),
    ("tests/bench/vpn.rs", "ns_output"),
    ("tests/bench/vpn.rs", "ns_run"),
    ("tests/bench/vpn.rs", "run"),
];

/// Helpers taking `&[&str]` that are not program runners: they run our own binary, Chromium,
/// the k3s stand-in or python with fixed programs (seen through `Command::new` or `netns exec`),
/// or they do not run anything.
const NOT_RUNNERS: &[(&str, &str)] = &[
    ("tests/netns_status_page.rs", "chromium"),
    ("tests/security.rs", "run"),
    ("tests/netns_k3s.rs", "run_in"),
    ("tests/netns_faults.rs", "iptables"),
    ("tests/k3s_standin.rs", "standin"),
    ("tests/k3s_standin.rs", "spawn"),
    ("tests/k3s_standin.rs", "run"),
    ("tests/common/mod.rs", "spawn"),
    ("tests/common/mod.rs", "spawn_with_env"),
    ("tests/netns_security.rs", "run_in"),
    ("tests/netns_vpn.rs", "python"),
    ("tests/netns_clients.rs", "run"),
    ("tests/netns_trust.rs", "kairos_p2p_as"),
    ("tests/cli_kairosctl.rs", "run"),
    ("tests/cli_kairosctl.rs", "ok"),
    ("tests/cli_kairosctl.rs", "openssl"),
    ("tests/config_errors.rs", "check"),
    ("tests/bench/vpn.rs", "spawn"),
    ("tests/bench/vpn.rs", "kairos"),
];

/// Programs the README asks a newcomer to have (the Rust toolchain) or that the repo builds.
const TOOLCHAIN_AND_BUILT: &[&str] = &[
    "cargo",
    "rustc",
    "rustup",
    "rustfmt",
    "make",
    "kairos-p2p",
    "kairosctl",
];

/// Shell words that are not programs: keywords and bash builtins.
const SHELL_BUILTINS: &[&str] = &[
    ".",
    ":",
    "[",
    "[[",
    "]]",
    "alias",
    "bg",
    "break",
    "builtin",
    "case",
    "cd",
    "command",
    "continue",
    "declare",
    "do",
    "done",
    "echo",
    "elif",
    "else",
    "esac",
    "eval",
    "exec",
    "exit",
    "export",
    "false",
    "fg",
    "fi",
    "for",
    "function",
    "getopts",
    "hash",
    "if",
    "in",
    "jobs",
    "kill",
    "let",
    "local",
    "mapfile",
    "popd",
    "printf",
    "pushd",
    "pwd",
    "read",
    "readarray",
    "readonly",
    "return",
    "select",
    "set",
    "shift",
    "shopt",
    "source",
    "test",
    "then",
    "time",
    "trap",
    "true",
    "type",
    "typeset",
    "ulimit",
    "umask",
    "unalias",
    "unset",
    "until",
    "wait",
    "while",
    "{",
    "}",
];

/// One place where the repo runs a program.
#[derive(Clone, Debug, PartialEq, Eq, PartialOrd, Ord)]
struct Use {
    file: String,
    line: usize,
    program: String,
}

/// A set-up script's table: where it applies (a directory prefix; "" = everywhere) and what it
/// installs (tool -> package).
#[derive(Clone, Debug)]
struct Table {
    script: String,
    scope: String,
    tools: BTreeMap<String, String>,
}

fn repo() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
}

/// The files to scan, relative to the repo, sorted.
fn scanned_files(root: &Path) -> Vec<String> {
    let mut out = Vec::new();
    for top in ["tests", "cross", ".ci"] {
        walk(root, &root.join(top), &mut out);
    }
    for f in ["Makefile"] {
        if root.join(f).is_file() {
            out.push(f.to_string());
        }
    }
    out.sort();
    out
}

fn walk(root: &Path, dir: &Path, out: &mut Vec<String>) {
    let Ok(entries) = fs::read_dir(dir) else {
        return;
    };
    for entry in entries.flatten() {
        let path = entry.path();
        let rel = path
            .strip_prefix(root)
            .unwrap()
            .to_string_lossy()
            .into_owned();
        let name = entry.file_name().to_string_lossy().into_owned();
        if path.is_dir() {
            // Fuzz inputs, build output and data are not code.
            if !matches!(
                name.as_str(),
                "seeds" | "corpus" | "artifacts" | "regressions" | "target" | "data" | "overlay"
            ) {
                walk(root, &path, out);
            }
        } else if kind(&rel, &path).is_some() {
            out.push(rel);
        }
    }
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Kind {
    Rust,
    Shell,
    Make,
    Python,
}

fn kind(rel: &str, path: &Path) -> Option<Kind> {
    let name = rel.rsplit('/').next().unwrap_or(rel);
    if name.ends_with(".rs") {
        Some(Kind::Rust)
    } else if name.ends_with(".sh") || rel == ".ci/run" {
        Some(Kind::Shell)
    } else if name == "Makefile" || name.ends_with(".inc") {
        Some(Kind::Make)
    } else if name.ends_with(".py") {
        Some(Kind::Python)
    } else {
        let head = fs::read_to_string(path).ok()?;
        let first = head.lines().next()?;
        if first.starts_with("#!") && first.contains("python") {
            Some(Kind::Python)
        } else if first.starts_with("#!") && (first.contains("bash") || first.ends_with("/sh")) {
            Some(Kind::Shell)
        } else {
            None
        }
    }
}

// ------------------------------------------------------------------------------------------
// Set-up tables

/// `tool=package` words of `install_missing WHO ...` calls and `*_TOOLS=( ... )` arrays.
fn tables(root: &Path, files: &[String]) -> Vec<Table> {
    let mut out = Vec::new();
    for rel in files {
        if !rel.ends_with(".sh") {
            continue;
        }
        let text = join_continuations(&fs::read_to_string(root.join(rel)).unwrap());
        let mut tools = BTreeMap::new();
        let mut in_array = false;
        for line in text.lines() {
            let code = strip_comment(line);
            let trimmed = code.trim_start();
            let words: Vec<&str> = if trimmed.starts_with("install_missing ") {
                trimmed.split_whitespace().skip(2).collect()
            } else if let Some(rest) = array_start(trimmed) {
                in_array = !rest.contains(')');
                rest.trim_end_matches(')').split_whitespace().collect()
            } else if in_array {
                in_array = !trimmed.contains(')');
                trimmed.trim_end_matches(')').split_whitespace().collect()
            } else {
                Vec::new()
            };
            for word in words {
                if let Some((tool, package)) = word.split_once('=') {
                    if is_name(tool) && !package.is_empty() {
                        tools.insert(tool.to_string(), package.to_string());
                    }
                }
            }
        }
        if tools.is_empty() {
            continue;
        }
        // setup-host.sh serves everything; another set-up script (setup-*.sh) its directory;
        // any other script with a table (soak.sh, clean-room.sh) only itself.
        let name = rel.rsplit('/').next().unwrap_or(rel);
        let scope = if rel == "tests/setup-host.sh" {
            String::new()
        } else if name.starts_with("setup") {
            rel[..rel.len() - name.len()].to_string()
        } else {
            rel.clone()
        };
        out.push(Table {
            script: rel.clone(),
            scope,
            tools,
        });
    }
    out
}

/// `NAME_TOOLS=(` at the start of a line: the rest after the parenthesis.
fn array_start(line: &str) -> Option<&str> {
    let (name, rest) = line.split_once("=(")?;
    (name.ends_with("_TOOLS") && is_name(name)).then_some(rest)
}

fn minbase(root: &Path) -> BTreeSet<String> {
    fs::read_to_string(root.join("tests/data/debian12-minbase-commands.txt"))
        .expect("tests/data/debian12-minbase-commands.txt")
        .lines()
        .map(str::trim)
        .filter(|l| !l.is_empty() && !l.starts_with('#'))
        .map(String::from)
        .collect()
}

// ------------------------------------------------------------------------------------------
// Shell

fn is_name(word: &str) -> bool {
    let mut chars = word.chars();
    matches!(chars.next(), Some(c) if c.is_ascii_alphanumeric() || c == '_')
        && chars.all(|c| c.is_ascii_alphanumeric() || matches!(c, '_' | '.' | '+' | '-'))
}

fn join_continuations(text: &str) -> String {
    // Keep line numbers: a joined line is followed by empty lines.
    let mut out = String::new();
    let mut pending = 0;
    for line in text.lines() {
        if let Some(head) = line.strip_suffix('\\') {
            out.push_str(head);
            out.push(' ');
            pending += 1;
        } else {
            out.push_str(line);
            out.push('\n');
            for _ in 0..pending {
                out.push('\n');
            }
            pending = 0;
        }
    }
    out
}

/// The line without its comment (a `#` outside quotes at a word start): for the tables.
fn strip_comment(line: &str) -> String {
    let mut out = String::new();
    let (mut single, mut double) = (false, false);
    let mut prev = ' ';
    for c in line.chars() {
        match c {
            '\'' if !double => single = !single,
            '"' if !single => double = !double,
            '#' if !single && !double && (prev.is_whitespace() || prev == ';') => break,
            _ => {}
        }
        out.push(c);
        prev = c;
    }
    out
}

/// Where the shell scanner is: in code (with the number of `(` open in it) or in double quotes.
#[derive(Clone, Copy, PartialEq)]
enum Ctx {
    Code(i32),
    Double,
}

/// The shell code of a script with the same lines: comments, here-document bodies and quoted
/// text blanked (quotes kept), except command substitutions inside double quotes, which stay
/// code. Quotes may span lines.
fn shell_code(text: &str) -> String {
    let chars: Vec<char> = text.chars().collect();
    let mut out = String::with_capacity(text.len());
    let mut stack = vec![Ctx::Code(0)];
    let mut heredocs: Vec<(String, bool)> = Vec::new();
    let mut i = 0;
    while i < chars.len() {
        let c = chars[i];
        let next = chars.get(i + 1).copied();
        let top = *stack.last().unwrap();
        match top {
            Ctx::Double => match c {
                '"' => {
                    stack.pop();
                    out.push('"');
                }
                '\\' => {
                    out.push('.');
                    if next.is_some_and(|n| n != '\n') {
                        out.push('.');
                        i += 1;
                    }
                }
                '$' if next == Some('(') && chars.get(i + 2) != Some(&'(') => {
                    stack.push(Ctx::Code(0));
                    out.push_str("$(");
                    i += 1;
                }
                '\n' => out.push('\n'),
                _ => out.push('.'),
            },
            Ctx::Code(depth) => match c {
                '\'' => {
                    out.push('\'');
                    i += 1;
                    while i < chars.len() && chars[i] != '\'' {
                        out.push(if chars[i] == '\n' { '\n' } else { '.' });
                        i += 1;
                    }
                    out.push('\'');
                }
                '"' => {
                    stack.push(Ctx::Double);
                    out.push('"');
                }
                '#' if out
                    .chars()
                    .last()
                    .is_none_or(|p| p.is_whitespace() || p == ';' || p == '(') =>
                {
                    while i + 1 < chars.len() && chars[i + 1] != '\n' {
                        i += 1;
                    }
                }
                '\\' => {
                    out.push('\\');
                    if let Some(n) = next {
                        out.push(n);
                        i += 1;
                    }
                }
                '(' => {
                    *stack.last_mut().unwrap() = Ctx::Code(depth + 1);
                    out.push('(');
                }
                ')' => {
                    if depth == 0 && stack.len() > 1 {
                        stack.pop(); // the end of a `$(` inside double quotes
                    } else {
                        *stack.last_mut().unwrap() = Ctx::Code(depth - 1);
                    }
                    out.push(')');
                }
                '<' if next == Some('<') && chars.get(i + 2) == Some(&'<') => {
                    out.push_str("<<<"); // a here-string: a word, not a body
                    i += 3;
                    continue;
                }
                '<' if next == Some('<') => {
                    let mut j = i + 2;
                    let dash = chars.get(j) == Some(&'-');
                    if dash {
                        j += 1;
                    }
                    while chars.get(j).is_some_and(|c| *c == ' ' || *c == '\t') {
                        j += 1;
                    }
                    let quoted = matches!(chars.get(j), Some('\'') | Some('"'));
                    if quoted {
                        j += 1;
                    }
                    let word: String = chars[j..]
                        .iter()
                        .take_while(|c| c.is_ascii_alphanumeric() || **c == '_')
                        .collect();
                    j += word.chars().count() + usize::from(quoted);
                    if !word.is_empty() {
                        heredocs.push((word, dash));
                    }
                    out.push_str("<<");
                    out.extend(std::iter::repeat_n(' ', j - i - 2));
                    i = j;
                    continue;
                }
                '\n' => {
                    out.push('\n');
                    // Here-document bodies start on the next line.
                    for (delimiter, dash) in std::mem::take(&mut heredocs) {
                        while i + 1 < chars.len() {
                            let start = i + 1;
                            let end = chars[start..]
                                .iter()
                                .position(|c| *c == '\n')
                                .map_or(chars.len(), |p| start + p);
                            let line: String = chars[start..end].iter().collect();
                            out.push('\n');
                            i = end;
                            let line = if dash {
                                line.trim_start()
                            } else {
                                line.as_str()
                            };
                            if line == delimiter {
                                break;
                            }
                        }
                    }
                }
                _ => out.push(c),
            },
        }
        i += 1;
    }
    out
}

/// Programs run by a shell script (or a Makefile's recipes).
fn shell_uses(rel: &str, text: &str, make: bool, functions: &BTreeSet<String>) -> Vec<Use> {
    let text = join_continuations(text);
    let text = if make {
        // Only recipes run commands (variable and rule lines do not).
        text.lines()
            .map(|l| {
                if l.starts_with('\t') {
                    make_recipe(l)
                } else {
                    String::new()
                }
            })
            .collect::<Vec<_>>()
            .join("\n")
    } else {
        text
    };
    let code = shell_code(&text);
    let mut out = Vec::new();
    for (index, line) in code.lines().enumerate() {
        for program in commands_of(line) {
            if !functions.contains(&program) && !SHELL_BUILTINS.contains(&program.as_str()) {
                out.push(Use {
                    file: rel.to_string(),
                    line: index + 1,
                    program,
                });
            }
        }
    }
    out
}

/// A Makefile recipe line as shell: make's own `$(...)` references become a variable word and
/// `$$` becomes `$`.
fn make_recipe(line: &str) -> String {
    let line = line
        .trim_start_matches('\t')
        .trim_start_matches(['@', '-', '+']);
    let placeholder = "\u{1}";
    let line = line.replace("$$", placeholder);
    let mut out = String::new();
    let chars: Vec<char> = line.chars().collect();
    let mut i = 0;
    while i < chars.len() {
        if chars[i] == '$' && matches!(chars.get(i + 1), Some('(') | Some('{')) {
            let mut depth = 0;
            while i < chars.len() {
                match chars[i] {
                    '(' | '{' => depth += 1,
                    ')' | '}' => {
                        depth -= 1;
                        if depth == 0 {
                            break;
                        }
                    }
                    _ => {}
                }
                i += 1;
            }
            out.push_str("$MAKEVAR");
        } else {
            out.push(chars[i]);
        }
        i += 1;
    }
    out.replace(placeholder, "$")
}

fn shell_functions(text: &str) -> BTreeSet<String> {
    let mut out = BTreeSet::new();
    for line in text.lines() {
        let t = line
            .trim_start()
            .trim_start_matches("function ")
            .trim_start();
        if let Some((name, _)) = t.split_once("()") {
            if is_name(name.trim()) {
                out.insert(name.trim().to_string());
            }
        }
    }
    out
}

/// The program of every simple command in a line of shell code (quoted text already blanked).
fn commands_of(code: &str) -> Vec<String> {
    // Split into segments at command separators; a `)` that closes no `(` ends a case pattern,
    // whose text is not a command.
    let chars: Vec<char> = code.chars().collect();
    let mut segments: Vec<String> = Vec::new();
    let mut current = String::new();
    let mut depth = 0i32;
    let mut i = 0;
    while i < chars.len() {
        let c = chars[i];
        // Arithmetic (`$((...))`, `((...))`), parameter expansions (`${...}`) and array values
        // (`x=(a b)`) hold no commands: they become one word.
        let arithmetic = c == '(' && chars.get(i + 1) == Some(&'(');
        let expansion = c == '$' && chars.get(i + 1) == Some(&'{');
        let array = c == '(' && i > 0 && chars[i - 1] == '=';
        if arithmetic || expansion || array {
            let (open, close) = if expansion { ('{', '}') } else { ('(', ')') };
            let mut nesting = 0;
            while i < chars.len() {
                if chars[i] == open {
                    nesting += 1;
                } else if chars[i] == close {
                    nesting -= 1;
                    if nesting == 0 {
                        break;
                    }
                }
                i += 1;
            }
            current.push_str("$V");
            i += 1;
            continue;
        }
        match c {
            '&' if i > 0 && matches!(chars[i - 1], '>' | '<') || chars.get(i + 1) == Some(&'>') => {
                current.push(c); // a redirection: 2>&1, &>file
            }
            ';' | '&' | '|' | '`' | '{' | '}' | '!' => {
                segments.push(std::mem::take(&mut current));
            }
            '(' => {
                depth += 1;
                segments.push(std::mem::take(&mut current));
            }
            ')' => {
                if depth == 0 {
                    current.clear(); // case pattern
                } else {
                    depth -= 1;
                    segments.push(std::mem::take(&mut current));
                }
            }
            '$' if chars.get(i + 1) == Some(&'(') && chars.get(i + 2) != Some(&'(') => {
                segments.push(std::mem::take(&mut current));
            }
            _ => current.push(c),
        }
        i += 1;
    }
    segments.push(current);

    let mut out = Vec::new();
    for segment in segments {
        let words: Vec<&str> = segment.split_whitespace().collect();
        programs_of_command(&words, &mut out);
    }
    out
}

/// The program of one simple command's words, and the program it wraps (`ip netns exec NS
/// prog`, `timeout [-k T] DURATION prog`).
fn programs_of_command(words: &[&str], out: &mut Vec<String>) {
    let mut words = words.iter().copied().peekable();
    // Keywords that start a command, and assignments before it.
    while let Some(w) = words.peek() {
        let assignment = w
            .split_once('=')
            .is_some_and(|(k, _)| is_name(k) && !k.contains(['.', '-', '+']));
        if assignment
            || matches!(
                *w,
                "if" | "then" | "else" | "elif" | "do" | "while" | "until" | "time" | "exec"
            )
        {
            words.next();
        } else {
            break;
        }
    }
    let Some(first) = words.next() else { return };
    if matches!(
        first,
        "for" | "case" | "select" | "function" | "local" | "export" | "declare" | "command"
    ) {
        return; // `command -v x` checks for a program, it does not run it
    }
    let rest: Vec<&str> = words.collect();
    let first = first.rsplit('/').next().unwrap_or(first);
    if !is_name(first) || SHELL_BUILTINS.contains(&first) {
        return; // a variable, a path built at run time, a redirection, a builtin
    }
    out.push(first.to_string());
    let inner: &[&str] = match first {
        "ip" if rest.len() >= 3 && rest[0] == "netns" && rest[1] == "exec" => &rest[3..],
        "timeout" => {
            let mut i = 0;
            while i < rest.len() && rest[i].starts_with('-') {
                i += if rest[i] == "-k" || rest[i] == "-s" {
                    2
                } else {
                    1
                };
            }
            rest.get(i + 1..).unwrap_or(&[])
        }
        _ => &[],
    };
    if !inner.is_empty() {
        programs_of_command(inner, out);
    }
}

// ------------------------------------------------------------------------------------------
// Rust

/// The first string literal at or after `from` (skipping whitespace, `&`, `[`, `vec!`), if
/// the next token is one.
fn literal_at(text: &str, from: usize) -> Option<String> {
    let rest = text[from..].trim_start();
    let rest = rest.strip_prefix('"')?;
    let end = rest.find('"')?;
    Some(rest[..end].to_string())
}

fn line_of(text: &str, at: usize) -> usize {
    text[..at].matches('\n').count() + 1
}

fn rust_uses(rel: &str, text: &str) -> Vec<Use> {
    let mut out = Vec::new();
    let mut push = |at: usize, program: String| {
        if is_name(&program) {
            out.push(Use {
                file: rel.to_string(),
                line: line_of(text, at),
                program,
            });
        }
    };
    let consts = rust_str_consts(text);
    // Command::new("prog") and Command::new(CONST).
    for (at, _) in text.match_indices("Command::new(") {
        let after = at + "Command::new(".len();
        if let Some(program) = literal_at(text, after) {
            push(at, program);
        } else {
            let ident: String = text[after..]
                .chars()
                .take_while(|c| c.is_ascii_alphanumeric() || *c == '_')
                .collect();
            if let Some(value) = consts.get(&ident) {
                push(at, value.clone());
            }
        }
    }
    // "netns", "exec", NS, "prog"
    for (at, _) in text.match_indices("\"exec\",") {
        let after = at + "\"exec\",".len();
        let Some(comma) = text[after..].find(',') else {
            continue;
        };
        let next = after + comma + 1;
        if text[after..next].contains(']') {
            continue;
        }
        if let Some(program) = literal_at(text, next) {
            push(at, program);
        } else {
            let ident: String = text[next..]
                .trim_start()
                .chars()
                .take_while(|c| c.is_ascii_alphanumeric() || *c == '_')
                .collect();
            if let Some(value) = consts.get(&ident) {
                push(at, value.clone());
            }
        }
    }
    // RUNNER(..., &["prog", ...]) and RUNNER(..., &vec) with `let vec = vec!["prog", ...]`.
    let vectors = rust_vec_literals(text);
    for (defined_in, name) in RUNNERS {
        // A runner is called in its own file, and tests/common's in the files that use it.
        let reaches = rel == *defined_in
            || (*defined_in == "tests/common/mod.rs" && text.contains("mod common;"));
        if !reaches {
            continue;
        }
        let needle = format!("{name}(");
        for (at, _) in text.match_indices(&needle) {
            let before = text[..at].chars().next_back();
            if before.is_some_and(|c| c.is_ascii_alphanumeric() || c == '_') {
                continue;
            }
            if text[..at].trim_end().ends_with("fn") {
                continue;
            }
            let call = &text[at + needle.len()..];
            let end = call_end(call);
            let args = &call[..end];
            if let Some(open) = args.find("[\"") {
                if let Some(program) = literal_at(args, open + 1) {
                    push(at, program);
                }
            } else if let Some(amp) = args.rfind('&') {
                let ident: String = args[amp + 1..]
                    .chars()
                    .take_while(|c| c.is_ascii_alphanumeric() || *c == '_')
                    .collect();
                if let Some(program) = vectors.get(&ident) {
                    push(at, program.clone());
                }
            }
        }
    }
    out
}

/// Length of a call's argument text up to its closing parenthesis.
fn call_end(call: &str) -> usize {
    let mut depth = 1;
    for (i, c) in call.char_indices() {
        match c {
            '(' | '[' => depth += 1,
            ')' | ']' => {
                depth -= 1;
                if depth == 0 {
                    return i;
                }
            }
            _ => {}
        }
    }
    call.len()
}

/// `const NAME: &str = "value";`
fn rust_str_consts(text: &str) -> BTreeMap<String, String> {
    let mut out = BTreeMap::new();
    for (at, _) in text.match_indices("const ") {
        let rest = &text[at + 6..];
        let Some((name, tail)) = rest.split_once(": &str =") else {
            continue;
        };
        if !is_name(name.trim()) {
            continue;
        }
        if let Some(value) = literal_at(tail, 0) {
            out.insert(name.trim().to_string(), value);
        }
    }
    out
}

/// `let [mut] NAME = vec!["prog", ...` -> NAME: prog.
fn rust_vec_literals(text: &str) -> BTreeMap<String, String> {
    let mut out = BTreeMap::new();
    for (at, _) in text.match_indices("let ") {
        let rest = text[at + 4..].trim_start_matches("mut ");
        let Some((name, tail)) = rest.split_once('=') else {
            continue;
        };
        let name = name.trim().split(':').next().unwrap_or("").trim();
        if !is_name(name) {
            continue;
        }
        let tail = tail.trim_start();
        if let Some(list) = tail.strip_prefix("vec![") {
            if let Some(program) = literal_at(list, 0) {
                out.insert(name.to_string(), program);
            }
        }
    }
    out
}

/// Functions with a `&[&str]` parameter: (name, line).
fn rust_str_slice_functions(text: &str) -> Vec<(String, usize)> {
    let mut out = Vec::new();
    for (at, _) in text.match_indices("fn ") {
        let rest = &text[at + 3..];
        let name: String = rest
            .chars()
            .take_while(|c| c.is_ascii_alphanumeric() || *c == '_')
            .collect();
        let Some(open) = rest.find('(') else { continue };
        let params = &rest[open..open + call_end(&rest[open + 1..]) + 1];
        if params.contains("&[&str]") && !name.is_empty() {
            out.push((name, line_of(text, at)));
        }
    }
    out
}

// ------------------------------------------------------------------------------------------
// Python

fn python_uses(rel: &str, text: &str) -> Vec<Use> {
    let mut out = Vec::new();
    for (at, _) in text.match_indices("subprocess.") {
        let rest = &text[at..];
        let Some(open) = rest.find('(') else { continue };
        let args = rest[open + 1..].trim_start();
        if let Some(list) = args.strip_prefix('[') {
            let list = list.trim_start();
            let quote = list.chars().next();
            if let Some(q @ ('"' | '\'')) = quote {
                if let Some(end) = list[1..].find(q) {
                    let program = list[1..1 + end]
                        .rsplit('/')
                        .next()
                        .unwrap_or("")
                        .to_string();
                    if is_name(&program) {
                        out.push(Use {
                            file: rel.to_string(),
                            line: line_of(text, at),
                            program,
                        });
                    }
                }
            }
        }
    }
    out
}

// ------------------------------------------------------------------------------------------
// The check

fn uses_of(root: &Path, files: &[String]) -> Vec<Use> {
    // Shell functions of every script count everywhere: scripts source each other.
    let mut functions = BTreeSet::new();
    for rel in files.iter().filter(|f| f.ends_with(".sh")) {
        functions.extend(shell_functions(
            &fs::read_to_string(root.join(rel)).unwrap(),
        ));
    }
    let mut out = Vec::new();
    for rel in files {
        if rel == "tests/tool_guard.rs" {
            continue; // this file's tests hold sample code, not commands the repo runs
        }
        let path = root.join(rel);
        let text = fs::read_to_string(&path).unwrap();
        out.extend(match kind(rel, &path) {
            Some(Kind::Rust) => rust_uses(rel, &text),
            Some(Kind::Shell) => shell_uses(rel, &text, false, &functions),
            Some(Kind::Make) => shell_uses(rel, &text, true, &functions),
            Some(Kind::Python) => python_uses(rel, &text),
            None => Vec::new(),
        });
    }
    out.sort();
    out.dedup();
    out
}

/// The uses that nothing provides, each with the message that says how to fix it.
fn unprovided(uses: &[Use], tables: &[Table], base: &BTreeSet<String>) -> Vec<String> {
    let mut out = Vec::new();
    for u in uses {
        if base.contains(&u.program) || TOOLCHAIN_AND_BUILT.contains(&u.program.as_str()) {
            continue;
        }
        let served = tables
            .iter()
            .any(|t| u.file.starts_with(&t.scope) && t.tools.contains_key(&u.program));
        if !served {
            out.push(format!(
                "{}:{}: runs `{}`, which no set-up script installs and a fresh Debian 12 minbase \
                 root lacks: add `{}=<Debian package>` to tests/setup-host.sh's table (or to the \
                 set-up script of that directory)",
                u.file, u.line, u.program, u.program
            ));
        }
    }
    out
}

fn scan() -> (Vec<Use>, Vec<Table>, BTreeSet<String>) {
    let root = repo();
    let files = scanned_files(&root);
    (
        uses_of(&root, &files),
        tables(&root, &files),
        minbase(&root),
    )
}

#[test]
fn every_program_the_repo_runs_is_installed_by_a_setup_script() {
    let (uses, tables, base) = scan();
    let programs: BTreeSet<&str> = uses.iter().map(|u| u.program.as_str()).collect();
    println!("programs the repo runs ({}): {programs:?}", programs.len());
    for t in &tables {
        println!(
            "table {} (scope '{}'): {:?}",
            t.script,
            t.scope,
            t.tools.keys().collect::<Vec<_>>()
        );
    }
    // The scan must see the programs we know the tests run, or it is blind.
    for known in [
        "ip", "ping", "iptables", "python3", "chromium", "iperf3", "kill", "file",
    ] {
        assert!(
            programs.contains(known),
            "the scan no longer sees `{known}`: {programs:?}"
        );
    }
    let missing = unprovided(&uses, &tables, &base);
    assert!(
        missing.is_empty(),
        "programs not installed by any set-up script:\n{}",
        missing.join("\n")
    );
}

#[test]
fn the_guard_fails_when_ping_is_taken_out_of_the_table() {
    let (uses, mut tables, base) = scan();
    let host = tables
        .iter_mut()
        .find(|t| t.script == "tests/setup-host.sh")
        .expect("setup-host table");
    assert!(
        host.tools.remove("ping").is_some(),
        "ping is in tests/setup-host.sh's table"
    );
    let missing = unprovided(&uses, &tables, &base);
    assert!(
        missing
            .iter()
            .any(|m| m.contains("runs `ping`") && m.contains("tests/common/mod.rs")),
        "{missing:?}"
    );
}

#[test]
fn every_helper_taking_an_argument_list_is_classified() {
    let root = repo();
    let mut unclassified = Vec::new();
    for rel in scanned_files(&root) {
        if !rel.ends_with(".rs") || rel == "tests/tool_guard.rs" {
            continue;
        }
        let text = fs::read_to_string(root.join(&rel)).unwrap();
        for (name, line) in rust_str_slice_functions(&text) {
            let known = RUNNERS
                .iter()
                .chain(NOT_RUNNERS)
                .any(|(f, n)| rel == *f && name == *n);
            if !known {
                unclassified.push(format!(
                    "{rel}:{line}: fn {name} takes `&[&str]`: add it to RUNNERS (its first element \
                     is a program) or NOT_RUNNERS in tests/tool_guard.rs"
                ));
            }
        }
    }
    assert!(unclassified.is_empty(), "{}", unclassified.join("\n"));
}

#[test]
fn shell_commands_are_found_through_separators_wrappers_and_substitutions() {
    let script = r#"#!/bin/bash
# ping in a comment is not a command
helper() { grep -q x "$1"; }
say "install iperf3 first"   # quoted text is not a command
X=1 Y=2 curl -s http://x | jq .a && helper file || wget -q y
v="$(installed_version rustc-web)"
ip netns exec "$ns" ping -c1 10.0.0.1
timeout 5 iperf3 -c x
case "$arch" in arm64) qemu-aarch64-static ./bin ;; esac
cat >f <<'EOF'
not-a-command here
EOF
if ! command -v socat >/dev/null; then apt-get install socat; fi
"#;
    let functions = shell_functions(script);
    let got: Vec<String> = shell_uses("x.sh", script, false, &functions)
        .into_iter()
        .map(|u| u.program)
        .collect();
    assert_eq!(
        got,
        [
            "grep",
            "say",
            "curl",
            "jq",
            "wget",
            "installed_version",
            "ip",
            "ping",
            "timeout",
            "iperf3",
            "qemu-aarch64-static",
            "cat",
            "apt-get"
        ]
    );
}

#[test]
fn make_recipes_run_their_first_words_and_make_variables_are_not_programs() {
    let makefile = "CARGO ?= cargo\nx:\n\t@$(CARGO) build\n\t@bash tests/a.sh $(ARGS)\n\tif [ -x \"$$(command -v qemu-arm)\" ]; then file bin; fi\n";
    let got: Vec<String> = shell_uses("Makefile", makefile, true, &BTreeSet::new())
        .into_iter()
        .map(|u| u.program)
        .collect();
    assert_eq!(got, ["bash", "file"]);
}

#[test]
fn rust_programs_are_found_in_commands_netns_exec_and_runner_calls() {
    let code = r#"
const BROWSER: &str = "chromium";
fn f() {
    Command::new("ip").args(["netns", "exec", &ns, "ping", "-c1"]);
    Command::new(BROWSER);
    sh(&["sysctl", "-w", "x=1"]).unwrap();
    lab.exec_ok(
        &ns,
        &["iptables", "-A", "INPUT"],
    );
    let mut rule = vec!["nft", "add"];
    lab.exec_ok(&ns, &rule);
    Command::new("ip").args(["netns", "exec", ns, BROWSER]);
}
"#;
    let mut got: Vec<String> = rust_uses("tests/common/mod.rs", code)
        .into_iter()
        .map(|u| u.program)
        .collect();
    got.sort();
    assert_eq!(
        got,
        [
            "chromium", "chromium", "ip", "ip", "iptables", "nft", "ping", "sysctl"
        ]
    );
}
