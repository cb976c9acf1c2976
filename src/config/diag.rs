//! Collecting problems while reading: errors and warnings are recorded with their file and key
//! path, and turned into [`ConfigError`]s (with line numbers) once every file has been read.

use std::collections::HashSet;
use std::path::{Path, PathBuf};

use super::HostFacts;
use super::error::ConfigError;
use super::keypath::KeyPath;
use super::{locate, template};

/// At most this many errors (and as many warnings) are reported per file; a pathological file
/// must not produce megabytes of messages.
const MAX_PER_FILE: usize = 50;

/// Where a value came from: the index of its file in the source list and its key path.
#[derive(Debug, Clone)]
pub(super) struct Origin {
    pub(super) file: usize,
    pub(super) path: KeyPath,
}

/// A value together with where it was set; kept for the few settings that cross-field checks
/// need to point at after the files have been merged.
#[derive(Debug, Clone)]
pub(super) struct Sourced<T> {
    pub(super) value: T,
    pub(super) origin: Origin,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Severity {
    Error,
    Warning,
}

#[derive(Debug)]
struct Diag {
    severity: Severity,
    origin: Origin,
    /// A line known without locating the key (whole-file problems).
    line: Option<usize>,
    message: String,
}

/// A file as the diagnostics see it: its name and, when it could be read, its text (to locate
/// keys). A file that could not be read has its error recorded instead.
pub(super) struct FileText<'a> {
    pub(super) path: &'a Path,
    pub(super) text: Option<&'a str>,
}

/// All problems found so far, across files.
#[derive(Debug, Default)]
pub(super) struct Diagnostics {
    diags: Vec<Diag>,
    /// Keys with an error already: one error per key is enough.
    failed: HashSet<(usize, KeyPath)>,
    counts: Vec<Counts>,
}

/// Per file: messages kept and dropped beyond the cap, by severity.
#[derive(Debug, Default, Clone, Copy)]
struct Counts {
    errors: usize,
    warnings: usize,
    dropped_errors: usize,
    dropped_warnings: usize,
}

impl Diagnostics {
    /// Records an error at `origin`.
    pub(super) fn error(&mut self, origin: Origin, message: impl Into<String>) {
        self.push(Severity::Error, origin, None, message.into());
    }

    /// Records a warning at `origin`.
    pub(super) fn warn(&mut self, origin: Origin, message: impl Into<String>) {
        self.push(Severity::Warning, origin, None, message.into());
    }

    /// Records an error about file `file` as a whole, at `line` if known.
    pub(super) fn file_error(&mut self, file: usize, line: Option<usize>, message: String) {
        let origin = Origin {
            file,
            path: KeyPath::default(),
        };
        self.push(Severity::Error, origin, line, message);
    }

    fn push(&mut self, severity: Severity, origin: Origin, line: Option<usize>, message: String) {
        if severity == Severity::Error
            && !origin.path.segs().is_empty()
            && !self.failed.insert((origin.file, origin.path.clone()))
        {
            return;
        }
        if self.counts.len() <= origin.file {
            self.counts.resize(origin.file + 1, Counts::default());
        }
        if let Some(c) = self.counts.get_mut(origin.file) {
            let (kept, dropped) = match severity {
                Severity::Error => (&mut c.errors, &mut c.dropped_errors),
                Severity::Warning => (&mut c.warnings, &mut c.dropped_warnings),
            };
            if *kept >= MAX_PER_FILE {
                *dropped += 1;
                return;
            }
            *kept += 1;
        }
        self.diags.push(Diag {
            severity,
            origin,
            line,
            message,
        });
    }

    /// Locates every recorded key in its file and returns (errors, warnings), grouped by file in
    /// source order, in the order found within a file.
    pub(super) fn finish(self, files: &[FileText<'_>]) -> (Vec<ConfigError>, Vec<String>) {
        let mut errors = Vec::new();
        let mut warnings = Vec::new();
        for (index, file) in files.iter().enumerate() {
            let diags: Vec<&Diag> = self
                .diags
                .iter()
                .filter(|d| d.origin.file == index)
                .collect();
            let wanted: Vec<&KeyPath> = diags
                .iter()
                .map(|d| &d.origin.path)
                .filter(|p| !p.segs().is_empty())
                .collect();
            let mut located = match file.text {
                Some(text) => locate::find_lines(text, &wanted),
                None => vec![None; wanted.len()],
            }
            .into_iter();
            for diag in diags {
                let line = if diag.origin.path.segs().is_empty() {
                    diag.line
                } else {
                    located.next().flatten()
                };
                let e = ConfigError {
                    file: file.path.to_path_buf(),
                    line,
                    key: diag.origin.path.to_string(),
                    message: diag.message.clone(),
                };
                match diag.severity {
                    Severity::Error => errors.push(e),
                    Severity::Warning => warnings.push(e.to_string()),
                }
            }
            let counts = self.counts.get(index).copied().unwrap_or_default();
            if counts.dropped_errors > 0 {
                errors.push(summary(file.path, counts.dropped_errors, "errors"));
            }
            if counts.dropped_warnings > 0 {
                warnings.push(summary(file.path, counts.dropped_warnings, "warnings").to_string());
            }
        }
        (errors, warnings)
    }
}

fn summary(path: &Path, n: usize, what: &str) -> ConfigError {
    ConfigError {
        file: PathBuf::from(path),
        line: None,
        key: String::new(),
        message: format!("{n} more {what} not shown"),
    }
}

/// The reading context for one file: records problems against that file, and expands
/// templates with the host's facts.
pub(super) struct Ctx<'a> {
    file: usize,
    diags: &'a mut Diagnostics,
    host: &'a HostFacts,
}

impl<'a> Ctx<'a> {
    /// A context for the file at `file` in the source list.
    pub(super) fn new(file: usize, diags: &'a mut Diagnostics, host: &'a HostFacts) -> Self {
        Ctx { file, diags, host }
    }

    /// `s` with its templates expanded, or `None` after recording why it cannot be.
    pub(super) fn expand(&mut self, path: &KeyPath, s: &str) -> Option<String> {
        if !s.contains("{{") {
            return Some(s.to_owned());
        }
        let expanded = template::expand(s, self.host).map_err(|e| format!("template: {e}"));
        self.check(path, expanded)
    }

    /// Where `path` is in this file.
    pub(super) fn origin(&self, path: &KeyPath) -> Origin {
        Origin {
            file: self.file,
            path: path.clone(),
        }
    }

    /// Records an error at `path`.
    pub(super) fn error(&mut self, path: &KeyPath, message: impl Into<String>) {
        let origin = self.origin(path);
        self.diags.error(origin, message);
    }

    /// Records an error about the whole file, at `line`.
    pub(super) fn error_at_line(&mut self, line: u64, message: impl Into<String>) {
        let line = usize::try_from(line).ok();
        self.diags.file_error(self.file, line, message.into());
    }

    /// Records a warning at `path`.
    pub(super) fn warn(&mut self, path: &KeyPath, message: impl Into<String>) {
        let origin = self.origin(path);
        self.diags.warn(origin, message);
    }

    /// The value of `result`, or `None` after recording its error at `path`.
    pub(super) fn check<T>(&mut self, path: &KeyPath, result: Result<T, String>) -> Option<T> {
        result.map_err(|e| self.error(path, e)).ok()
    }

    /// `value` with its origin at `path`.
    pub(super) fn sourced<T>(&self, path: &KeyPath, value: T) -> Sourced<T> {
        Sourced {
            value,
            origin: self.origin(path),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn one_error_per_key() {
        let mut diags = Diagnostics::default();
        let host = HostFacts::default();
        let mut ctx = Ctx::new(0, &mut diags, &host);
        let path = KeyPath::default().key("p2p");
        ctx.error(&path, "first");
        ctx.error(&path, "second");
        ctx.error(&KeyPath::default(), "file 1");
        ctx.error(&KeyPath::default(), "file 2");
        let files = [FileText {
            path: Path::new("a.yaml"),
            text: None,
        }];
        let (errors, _) = diags.finish(&files);
        let errors: Vec<String> = errors.iter().map(|e| e.to_string()).collect();
        assert_eq!(
            errors,
            ["a.yaml: p2p: first", "a.yaml: file 1", "a.yaml: file 2"]
        );
    }

    #[test]
    fn caps_messages_per_file() {
        let mut diags = Diagnostics::default();
        let host = HostFacts::default();
        let mut ctx = Ctx::new(0, &mut diags, &host);
        let path = KeyPath::default().key("p2p");
        for i in 0..MAX_PER_FILE + 7 {
            ctx.error(&path.index(i), "bad");
        }
        ctx.warn(&path, "odd");
        let files = [FileText {
            path: Path::new("a.yaml"),
            text: Some("p2p:\n  x: 1\n"),
        }];
        let (errors, warnings) = diags.finish(&files);
        assert_eq!(errors.len(), MAX_PER_FILE + 1);
        assert_eq!(errors[0].to_string(), "a.yaml: p2p[0]: bad");
        assert_eq!(
            errors[MAX_PER_FILE].to_string(),
            "a.yaml: 7 more errors not shown"
        );
        assert_eq!(warnings, ["a.yaml:1: p2p: odd"]);
    }
}
