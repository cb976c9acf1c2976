//! Go-template expressions in configuration strings, as Kairos expands them:
//! `"kubevip-{{ trunc 4 .MachineID }}"`.
//!
//! The supported subset: the fields `.MachineID` and `.Hostname`; the functions `trunc N S`
//! (sprig: the first N characters, or the last -N when N is negative), `upper S` and `lower S`;
//! string (`"..."`, `` `...` ``) and integer literals; parentheses; pipelines
//! (`{{ .MachineID | trunc 8 }}`: the value is passed as the last argument); and the trim markers
//! `{{-` / `-}}`. Anything else is an error naming what is not supported.

use super::HostFacts;

/// How deep parentheses may nest.
const MAX_DEPTH: usize = 16;

/// `input` with every `{{ ... }}` action replaced by its value.
pub(super) fn expand(input: &str, host: &HostFacts) -> Result<String, String> {
    let mut out = String::with_capacity(input.len());
    let mut rest = input;
    while let Some(start) = rest.find("{{") {
        let text = rest.get(..start).unwrap_or("");
        let mut action = rest.get(start + 2..).unwrap_or("");
        if let Some(body) = action.strip_prefix('-') {
            if body.starts_with(is_space) {
                out.push_str(text.trim_end_matches(is_space));
                action = body;
            } else {
                out.push_str(text);
            }
        } else {
            out.push_str(text);
        }
        let mut parser = Parser {
            src: action,
            host,
            depth: 0,
        };
        let value = parser.pipeline()?;
        parser.skip_space();
        let consumed = action.len() - parser.src.len();
        let spaced = action
            .get(..consumed)
            .is_some_and(|b| b.ends_with(is_space));
        if let Some(after) = parser.src.strip_prefix("-}}").filter(|_| spaced) {
            rest = after.trim_start_matches(is_space);
        } else if let Some(after) = parser.src.strip_prefix("}}") {
            rest = after;
        } else if parser.src.is_empty() {
            return Err("unclosed action: missing \"}}\"".to_owned());
        } else {
            return Err(format!("unexpected {} in action", parser.next_token()));
        }
        match value {
            Val::Str(s) => out.push_str(&s),
            Val::Int(n) => out.push_str(&n.to_string()),
        }
    }
    out.push_str(rest);
    Ok(out)
}

fn is_space(c: char) -> bool {
    matches!(c, ' ' | '\t' | '\r' | '\n')
}

#[derive(Debug, Clone, PartialEq, Eq)]
enum Val {
    Str(String),
    Int(i64),
}

struct Parser<'s, 'h> {
    /// The unparsed rest of the action.
    src: &'s str,
    host: &'h HostFacts,
    depth: usize,
}

impl<'s> Parser<'s, '_> {
    /// Skips blanks.
    fn skip_space(&mut self) {
        self.src = self.src.trim_start_matches(is_space);
    }

    /// Whether the command ends here: `|`, `)`, `}}`, ` -}}` or the end of the text.
    fn at_end_of_command(&self) -> bool {
        self.src.is_empty()
            || self.src.starts_with(['|', ')'])
            || self.src.starts_with("}}")
            || self.src.starts_with("-}}")
    }

    /// The next token, for messages.
    fn next_token(&self) -> String {
        let token: String = self
            .src
            .chars()
            .take_while(|c| !is_space(*c))
            .take(20)
            .collect();
        format!("{token:?}")
    }

    fn pipeline(&mut self) -> Result<Val, String> {
        let mut value = self.command(None)?;
        loop {
            self.skip_space();
            match self.src.strip_prefix('|') {
                Some(rest) => {
                    self.src = rest;
                    value = self.command(Some(value))?;
                }
                None => return Ok(value),
            }
        }
    }

    /// A function call (with `piped` as its last argument) or a single operand.
    fn command(&mut self, piped: Option<Val>) -> Result<Val, String> {
        self.skip_space();
        if self.at_end_of_command() {
            return Err("empty command in action".to_owned());
        }
        match self.ident() {
            Some(name) => {
                let mut args = Vec::new();
                loop {
                    self.skip_space();
                    if self.at_end_of_command() {
                        break;
                    }
                    args.push(self.operand()?);
                }
                args.extend(piped);
                call(name, args)
            }
            None => {
                let value = self.operand()?;
                self.skip_space();
                if piped.is_some() || !self.at_end_of_command() {
                    return Err("only functions take arguments".to_owned());
                }
                Ok(value)
            }
        }
    }

    /// An identifier (function name) at the current position, consumed.
    fn ident(&mut self) -> Option<&'s str> {
        if !self
            .src
            .starts_with(|c: char| c.is_ascii_alphabetic() || c == '_')
        {
            return None;
        }
        let end = self
            .src
            .find(|c: char| !(c.is_ascii_alphanumeric() || c == '_'))
            .unwrap_or(self.src.len());
        let (name, rest) = self.src.split_at(end);
        self.src = rest;
        Some(name)
    }

    fn operand(&mut self) -> Result<Val, String> {
        let src = self.src;
        let mut chars = src.chars();
        match chars.next() {
            Some('.') => {
                self.src = chars.as_str();
                match self.ident() {
                    Some("MachineID") => Ok(Val::Str(self.host.machine_id.clone())),
                    Some("Hostname") => Ok(Val::Str(self.host.hostname.clone())),
                    Some(other) => Err(format!(
                        "unknown field .{other} (known: .MachineID, .Hostname)"
                    )),
                    None => {
                        Err("unsupported \".\" (known fields: .MachineID, .Hostname)".to_owned())
                    }
                }
            }
            Some('"') => self.quoted(),
            Some('`') => {
                let body = chars.as_str();
                let end = body.find('`').ok_or("unterminated raw string")?;
                let (value, rest) = body.split_at(end);
                self.src = rest.get(1..).unwrap_or("");
                Ok(Val::Str(value.to_owned()))
            }
            Some('(') => {
                if self.depth >= MAX_DEPTH {
                    return Err("parentheses nested too deeply".to_owned());
                }
                self.depth += 1;
                self.src = chars.as_str();
                let value = self.pipeline()?;
                self.skip_space();
                self.src = self
                    .src
                    .strip_prefix(')')
                    .ok_or_else(|| "missing \")\"".to_owned())?;
                self.depth -= 1;
                Ok(value)
            }
            Some(c) if c.is_ascii_digit() || c == '-' || c == '+' => {
                let end = src
                    .char_indices()
                    .skip(1)
                    .find(|(_, c)| !c.is_ascii_alphanumeric() && *c != '.' && *c != '_')
                    .map_or(src.len(), |(i, _)| i);
                let (literal, rest) = src.split_at(end);
                let n = literal
                    .parse::<i64>()
                    .map_err(|_| format!("unsupported number {literal:?} (only integers)"))?;
                self.src = rest;
                Ok(Val::Int(n))
            }
            Some(c) if c.is_ascii_alphabetic() || c == '_' => Err(format!(
                "function {:?} used as an argument: wrap the call in parentheses",
                self.ident().unwrap_or_default()
            )),
            _ => Err(format!("unexpected {} in action", self.next_token())),
        }
    }

    /// A double-quoted string literal with Go escapes.
    fn quoted(&mut self) -> Result<Val, String> {
        let mut out = String::new();
        let mut chars = self.src.char_indices().skip(1);
        while let Some((i, c)) = chars.next() {
            match c {
                '"' => {
                    self.src = self.src.get(i + 1..).unwrap_or("");
                    return Ok(Val::Str(out));
                }
                '\\' => match chars.next().map(|(_, e)| e) {
                    Some('n') => out.push('\n'),
                    Some('t') => out.push('\t'),
                    Some('r') => out.push('\r'),
                    Some(e @ ('\\' | '"')) => out.push(e),
                    Some(e) => return Err(format!("unsupported escape \\{e} in string")),
                    None => break,
                },
                '\n' => break,
                c => out.push(c),
            }
        }
        Err("unterminated string".to_owned())
    }
}

fn call(name: &str, args: Vec<Val>) -> Result<Val, String> {
    match (name, args.as_slice()) {
        ("trunc", [Val::Int(n), Val::Str(s)]) => Ok(Val::Str(trunc(*n, s))),
        ("trunc", [_, _]) => Err("trunc takes an integer and a string".to_owned()),
        ("upper", [Val::Str(s)]) => Ok(Val::Str(s.to_uppercase())),
        ("lower", [Val::Str(s)]) => Ok(Val::Str(s.to_lowercase())),
        ("upper" | "lower", [_]) => Err(format!("{name} takes a string")),
        ("trunc" | "upper" | "lower", _) => Err(format!(
            "{name} takes {} argument(s), got {}",
            if name == "trunc" { 2 } else { 1 },
            args.len()
        )),
        _ => Err(format!(
            "unknown function {name:?} (known: trunc, upper, lower)"
        )),
    }
}

/// sprig's `trunc`: the first `n` characters, or the last `-n` when `n` is negative; the whole
/// string when it is shorter.
fn trunc(n: i64, s: &str) -> String {
    let len = s.chars().count();
    let k = usize::try_from(n.unsigned_abs()).unwrap_or(usize::MAX);
    if k >= len {
        s.to_owned()
    } else if n < 0 {
        s.chars().skip(len - k).collect()
    } else {
        s.chars().take(k).collect()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn host() -> HostFacts {
        HostFacts {
            machine_id: "0123456789abcdef".to_owned(),
            hostname: "node-a".to_owned(),
        }
    }

    fn ok(input: &str) -> String {
        expand(input, &host()).unwrap()
    }

    fn err(input: &str) -> String {
        expand(input, &host()).unwrap_err()
    }

    #[test]
    fn documented_forms() {
        assert_eq!(ok("kubevip-{{ trunc 4 .MachineID }}"), "kubevip-0123");
        assert_eq!(ok("{{.MachineID}}"), "0123456789abcdef");
        assert_eq!(ok("h-{{ .Hostname }}"), "h-node-a");
        assert_eq!(ok("{{ trunc -4 .MachineID }}"), "cdef");
        assert_eq!(ok("{{ trunc 100 .MachineID }}"), "0123456789abcdef");
        assert_eq!(ok("{{ trunc -100 .Hostname }}"), "node-a");
        assert_eq!(ok("{{ trunc 0 .Hostname }}"), "");
        assert_eq!(ok("{{ upper .Hostname }}"), "NODE-A");
        assert_eq!(ok("{{ lower \"AbC\" }}"), "abc");
        assert_eq!(ok("{{ upper (trunc 2 .Hostname) }}"), "NO");
        assert_eq!(ok("{{ .MachineID | trunc 3 | upper }}"), "012");
        assert_eq!(ok("a  {{- .Hostname -}}  b"), "anode-ab");
        assert_eq!(ok("{{ `raw {{` }}"), "raw {{");
        assert_eq!(ok("{{ 42 }}"), "42");
        assert_eq!(ok("no template }} here"), "no template }} here");
        assert_eq!(ok("{{ trunc 2 \"a\\\"b\" }}"), "a\"");
    }

    #[test]
    fn errors() {
        assert_eq!(
            err("{{ foo .MachineID }}"),
            "unknown function \"foo\" (known: trunc, upper, lower)"
        );
        assert_eq!(
            err("{{ .MachineId }}"),
            "unknown field .MachineId (known: .MachineID, .Hostname)"
        );
        assert_eq!(err("{{ .MachineID"), "unclosed action: missing \"}}\"");
        assert_eq!(err("{{ }}"), "empty command in action");
        assert_eq!(
            err("{{ trunc .MachineID 4 }}"),
            "trunc takes an integer and a string"
        );
        assert_eq!(err("{{ trunc 4 }}"), "trunc takes 2 argument(s), got 1");
        assert_eq!(err("{{ upper 4 }}"), "upper takes a string");
        assert_eq!(err("{{ .Hostname 4 }}"), "only functions take arguments");
        assert_eq!(err("{{ 4 | upper }}"), "upper takes a string");
        assert_eq!(
            err("{{ trunc 1.5 .Hostname }}"),
            "unsupported number \"1.5\" (only integers)"
        );
        assert_eq!(
            err("{{ trunc 99999999999999999999 .Hostname }}"),
            "unsupported number \"99999999999999999999\" (only integers)"
        );
        assert_eq!(
            err("{{ upper lower }}"),
            "function \"lower\" used as an argument: wrap the call in parentheses"
        );
        assert_eq!(err("{{ \"abc }}"), "unterminated string");
        assert_eq!(
            err("a {{-.Hostname}}"),
            "unsupported number \"-.Hostname\" (only integers)"
        );
        assert_eq!(err("{{ (upper .Hostname }}"), "missing \")\"");
        assert_eq!(
            err("{{ . }}"),
            "unsupported \".\" (known fields: .MachineID, .Hostname)"
        );
        assert_eq!(err("{{ .Hostname ) }}"), "unexpected \")\" in action");
        assert_eq!(
            err(&format!(
                "{{{{ {}.Hostname{} }}}}",
                "(".repeat(40),
                ")".repeat(40)
            )),
            "parentheses nested too deeply"
        );
    }

    #[test]
    fn never_panics_on_odd_input() {
        for s in [
            "{{",
            "{{-",
            "{{- ",
            "{{-}}",
            "{{ `",
            "{{ \"\\",
            "{{ é }}",
            "{{ .é }}",
            "{{ -",
            "{{ +x }}",
            "{{ 1é }}",
            "{{ trunc -9223372036854775808 .Hostname }}",
        ] {
            let _ = expand(s, &host());
        }
        assert_eq!(ok("{{ trunc -9223372036854775808 .Hostname }}"), "node-a");
    }
}
