//! Reading typed values out of YAML values, recording a message for anything of the wrong type.
//!
//! Rules shared by every key: a key with no value (`key:` or `key: ~`) counts as not set; strings
//! also take numbers and booleans (as Kairos' YAML decoder does); booleans are YAML booleans or
//! the YAML 1.1 words Kairos' decoder (yaml.v3 into a Go `bool`) also takes: y/yes/on and
//! n/no/off (lower case, capitalised or upper case); a string such as `"true"` or `"1"` is
//! refused there, so here too (after a template, any of the words true/false, yes/no, on/off,
//! 1/0 is taken: a template can only be written in quotes); integers must be YAML integers
//! (`"2"` in quotes is a string).

use serde_yaml::Value;

use super::diag::Ctx;
use super::keypath::KeyPath;

/// Longest part of a string value quoted in a message.
const QUOTE_MAX: usize = 32;

/// The entries of a mapping with string keys, in document order. Null is an empty mapping;
/// anything else, and non-string keys, are errors.
pub(super) fn mapping<'v>(
    ctx: &mut Ctx<'_>,
    v: &'v Value,
    path: &KeyPath,
) -> Vec<(String, &'v Value)> {
    match v {
        Value::Null => Vec::new(),
        Value::Mapping(m) => m
            .iter()
            .filter_map(|(k, v)| match k {
                Value::String(s) => Some((s.clone(), v)),
                other => {
                    ctx.error(
                        path,
                        format!("keys must be strings, found {}", describe(other)),
                    );
                    None
                }
            })
            .collect(),
        other => {
            ctx.error(
                path,
                format!("expected a mapping, found {}", describe(other)),
            );
            Vec::new()
        }
    }
}

/// A boolean.
pub(super) fn boolean(ctx: &mut Ctx<'_>, v: &Value, path: &KeyPath) -> Option<bool> {
    match v {
        Value::Null => None,
        Value::Bool(b) => Some(*b),
        Value::String(s) if s.contains("{{") => {
            let s = ctx.expand(path, s)?;
            let b = bool_word(&s);
            if b.is_none() {
                let found = describe(&Value::String(s));
                ctx.error(path, format!("expected a boolean, found {found}"));
            }
            b
        }
        Value::String(s) => {
            let b = yaml11_bool(s);
            if b.is_none() {
                let found = describe(v);
                let hint = if bool_word(s).is_some() {
                    " (a string: write it without quotes; Kairos refuses it too)"
                } else {
                    ""
                };
                ctx.error(path, format!("expected a boolean, found {found}{hint}"));
            }
            b
        }
        other => {
            ctx.error(
                path,
                format!("expected a boolean, found {}", describe(other)),
            );
            None
        }
    }
}

/// A non-negative integer that fits in `u32`.
pub(super) fn count(ctx: &mut Ctx<'_>, v: &Value, path: &KeyPath) -> Option<u32> {
    let message = match v {
        Value::Null => return None,
        Value::Number(n) => match (n.as_u64(), n.as_i64()) {
            (Some(u), _) => match u32::try_from(u) {
                Ok(c) => return Some(c),
                Err(_) => format!("{u} is too large (at most {})", u32::MAX),
            },
            (None, Some(i)) => format!("must not be negative, found {i}"),
            (None, None) => format!("expected an integer, found {}", describe(v)),
        },
        other => format!("expected an integer, found {}", describe(other)),
    };
    ctx.error(path, message);
    None
}

/// A string, templates expanded; numbers and booleans are taken as their text.
pub(super) fn text(ctx: &mut Ctx<'_>, v: &Value, path: &KeyPath) -> Option<String> {
    match v {
        Value::Null => None,
        Value::String(s) => ctx.expand(path, s),
        Value::Number(n) => Some(n.to_string()),
        Value::Bool(b) => Some(b.to_string()),
        other => {
            ctx.error(
                path,
                format!("expected a string, found {}", describe(other)),
            );
            None
        }
    }
}

/// A one-line string: [`text`] without control characters (values that reach k3s' command line,
/// environment files, unit files or manifests).
pub(super) fn line(ctx: &mut Ctx<'_>, v: &Value, path: &KeyPath) -> Option<String> {
    let s = text(ctx, v, path)?;
    if s.chars().any(char::is_control) {
        ctx.error(
            path,
            format!("must not contain control characters, found {}", quote(&s)),
        );
        return None;
    }
    Some(s)
}

/// A list of one-line strings.
pub(super) fn text_list(ctx: &mut Ctx<'_>, v: &Value, path: &KeyPath) -> Option<Vec<String>> {
    match v {
        Value::Null => None,
        Value::Sequence(items) => Some(
            items
                .iter()
                .enumerate()
                .filter_map(|(i, item)| {
                    let p = path.index(i);
                    match item {
                        Value::Null => {
                            ctx.error(&p, "expected a string, found null");
                            None
                        }
                        _ => line(ctx, item, &p),
                    }
                })
                .collect(),
        ),
        other => {
            ctx.error(
                path,
                format!("expected a list of strings, found {}", describe(other)),
            );
            None
        }
    }
}

/// A mapping of environment variables to their values (strings, numbers or booleans, taken as
/// text by `value`: [`text`], or [`line`] for k3s' environment), with the path of each entry,
/// in document order. Entries without a value are not set.
pub(super) fn env_map(
    ctx: &mut Ctx<'_>,
    v: &Value,
    path: &KeyPath,
    value: fn(&mut Ctx<'_>, &Value, &KeyPath) -> Option<String>,
) -> Vec<EnvEntry> {
    let mut out = Vec::new();
    for (name, entry) in mapping(ctx, v, path) {
        let p = path.key(&name);
        if name.is_empty() || name.contains('=') || name.chars().any(char::is_control) {
            ctx.error(&p, "not a valid environment variable name");
            continue;
        }
        if let Some(value) = value(ctx, entry, &p) {
            out.push(EnvEntry {
                name,
                value,
                path: p,
            });
        }
    }
    out
}

/// One environment variable of an `env` mapping.
pub(super) struct EnvEntry {
    pub(super) name: String,
    pub(super) value: String,
    pub(super) path: KeyPath,
}

/// A YAML 1.1 boolean word that YAML 1.2 reads as a string, as yaml.v3 takes it into a Go
/// `bool`: y/yes/on, n/no/off (lower case, capitalised or upper case).
fn yaml11_bool(s: &str) -> Option<bool> {
    match s {
        "y" | "Y" | "yes" | "Yes" | "YES" | "on" | "On" | "ON" => Some(true),
        "n" | "N" | "no" | "No" | "NO" | "off" | "Off" | "OFF" => Some(false),
        _ => None,
    }
}

/// A boolean written as a word: true/false, yes/no, on/off, 1/0, in any case.
pub(super) fn bool_word(s: &str) -> Option<bool> {
    match s.trim().to_ascii_lowercase().as_str() {
        "true" | "yes" | "on" | "1" => Some(true),
        "false" | "no" | "off" | "0" => Some(false),
        _ => None,
    }
}

/// A short description of a value for messages: `string "maybe"`, `integer 5`, `a list`.
pub(super) fn describe(v: &Value) -> String {
    match v {
        Value::Null => "null".to_owned(),
        Value::Bool(b) => format!("boolean {b}"),
        Value::Number(n) if n.is_f64() => format!("number {n}"),
        Value::Number(n) => format!("integer {n}"),
        Value::String(s) => format!("string {}", quote(s)),
        Value::Sequence(_) => "a list".to_owned(),
        Value::Mapping(_) => "a mapping".to_owned(),
        Value::Tagged(t) => format!("a value tagged {}", t.tag),
    }
}

/// `s` in double quotes with escapes, shortened to [`QUOTE_MAX`] characters.
pub(super) fn quote(s: &str) -> String {
    let short: String = s.chars().take(QUOTE_MAX).collect();
    let ellipsis = if short.len() < s.len() { "..." } else { "" };
    format!("\"{}{ellipsis}\"", short.escape_debug())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::HostFacts;
    use crate::config::diag::{Diagnostics, FileText};
    use std::path::Path;

    fn run<T>(yaml: &str, f: impl FnOnce(&mut Ctx<'_>, &Value, &KeyPath) -> T) -> (T, Vec<String>) {
        let v: Value = serde_yaml::from_str(yaml).unwrap();
        let mut diags = Diagnostics::default();
        let host = HostFacts {
            machine_id: "abcdef".to_owned(),
            hostname: "h".to_owned(),
        };
        let out = f(
            &mut Ctx::new(0, &mut diags, &host),
            &v,
            &KeyPath::default().key("k"),
        );
        let files = [FileText {
            path: Path::new("t.yaml"),
            text: None,
        }];
        let (errors, _) = diags.finish(&files);
        (out, errors.iter().map(|e| e.to_string()).collect())
    }

    #[test]
    fn booleans() {
        assert_eq!(run("true", boolean), (Some(true), vec![]));
        assert_eq!(run("\"Yes\"", boolean), (Some(true), vec![]));
        assert_eq!(run("off", boolean), (Some(false), vec![]));
        assert_eq!(run("N", boolean), (Some(false), vec![]));
        // Quoted true/false and 1/0 are strings, refused as Kairos refuses them.
        for quoted in ["\"true\"", "'false'", "\"1\"", "oN"] {
            assert_eq!(run(quoted, boolean).0, None, "{quoted}");
        }
        assert_eq!(
            run("\"true\"", boolean).1,
            [
                "t.yaml: k: expected a boolean, found string \"true\" (a string: write it without quotes; Kairos refuses it too)"
            ]
        );
        assert_eq!(run("~", boolean), (None, vec![]));
        assert_eq!(
            run("maybe", boolean),
            (
                None,
                vec!["t.yaml: k: expected a boolean, found string \"maybe\"".to_owned()]
            )
        );
        assert_eq!(
            run("2", boolean).1,
            ["t.yaml: k: expected a boolean, found integer 2"]
        );
    }

    #[test]
    fn templates_are_expanded_in_strings() {
        assert_eq!(
            run("\"{{ trunc 2 .MachineID }}\"", text),
            (Some("ab".to_owned()), vec![])
        );
        assert_eq!(run("\"{{ `on` }}\"", boolean), (Some(true), vec![]));
        assert_eq!(
            run("[\"{{ .Nope }}\", x]", text_list),
            (
                Some(vec!["x".to_owned()]),
                vec![
                    "t.yaml: k[0]: template: unknown field .Nope (known: .MachineID, .Hostname)"
                        .to_owned()
                ]
            )
        );
    }

    #[test]
    fn counts() {
        assert_eq!(run("3", count), (Some(3), vec![]));
        assert_eq!(
            run("\"3\"", count).1,
            ["t.yaml: k: expected an integer, found string \"3\""]
        );
        assert_eq!(
            run("-1", count).1,
            ["t.yaml: k: must not be negative, found -1"]
        );
        assert_eq!(
            run("1.5", count).1,
            ["t.yaml: k: expected an integer, found number 1.5"]
        );
        assert_eq!(
            run("4294967296", count).1,
            ["t.yaml: k: 4294967296 is too large (at most 4294967295)"]
        );
    }

    #[test]
    fn texts_and_lists() {
        assert_eq!(run("12", text), (Some("12".to_owned()), vec![]));
        assert_eq!(
            run("[a]", text).1,
            ["t.yaml: k: expected a string, found a list"]
        );
        assert_eq!(
            run("[a, 1, ~, [x]]", text_list),
            (
                Some(vec!["a".to_owned(), "1".to_owned()]),
                vec![
                    "t.yaml: k[2]: expected a string, found null".to_owned(),
                    "t.yaml: k[3]: expected a string, found a list".to_owned()
                ]
            )
        );
        assert_eq!(
            run("{a: 1}", text_list).1,
            ["t.yaml: k: expected a list of strings, found a mapping"]
        );
    }

    #[test]
    fn mappings_and_env() {
        assert_eq!(
            run("{1: a, b: c}", |c, v, p| mapping(c, v, p).len()),
            (
                1,
                vec!["t.yaml: k: keys must be strings, found integer 1".to_owned()]
            )
        );
        assert_eq!(
            run("[1]", |c, v, p| mapping(c, v, p).len()).1,
            ["t.yaml: k: expected a mapping, found a list"]
        );
        let (env, errors) = run("{B: true, A: 1, C: ~, \"D=E\": x}", |c, v, p| {
            env_map(c, v, p, text)
        });
        let env: Vec<(&str, &str)> = env
            .iter()
            .map(|e| (e.name.as_str(), e.value.as_str()))
            .collect();
        assert_eq!(env, [("B", "true"), ("A", "1")]);
        assert_eq!(
            errors,
            ["t.yaml: k.D=E: not a valid environment variable name"]
        );
    }

    #[test]
    fn values_bound_for_k3s_refuse_control_characters() {
        assert_eq!(
            run("[\"a\\rb\", c]", text_list),
            (
                Some(vec!["c".to_owned()]),
                vec![
                    "t.yaml: k[0]: must not contain control characters, found \"a\\rb\"".to_owned()
                ]
            )
        );
        let (env, errors) = run("{A: \"x\\ny\", \"B\\r\": z, C: ok}", |c, v, p| {
            env_map(c, v, p, line)
        });
        assert_eq!(env.len(), 1);
        assert_eq!(errors.len(), 2, "{errors:?}");
        assert_eq!(run("\"tab\\there\"", line).0, None);
    }

    #[test]
    fn quoting_is_short_and_escaped() {
        assert_eq!(quote("a\"b\n"), "\"a\\\"b\\n\"");
        assert_eq!(quote(&"x".repeat(40)), format!("\"{}...\"", "x".repeat(32)));
        assert_eq!(describe(&Value::Null), "null");
    }
}
