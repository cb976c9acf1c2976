//! Finding and reading cloud-config files.
//!
//! Directory sources follow Kairos' collector: the regular files ending in `.yaml` or `.yml`
//! directly in each directory (not in subdirectories), in lexical order of their names, whose
//! first line (trailing blanks ignored) is `#cloud-config` (or the legacy `#kairos-config` /
//! `#node-config`); other files are skipped. Missing directories are skipped. A file whose header
//! cannot be read is kept, so that loading it reports why. Files named explicitly are read
//! whatever their first line.

use std::fs::{self, File, OpenOptions};
use std::io::{self, Read};
use std::os::unix::fs::OpenOptionsExt;
use std::os::unix::io::AsRawFd;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

/// The directories Kairos reads cloud-configs from, in order.
pub const DEFAULT_DIRS: [&str; 2] = ["/oem", "/usr/local/cloud-config"];

/// Files larger than this are rejected before being read.
pub const MAX_FILE_SIZE: u64 = 4 * 1024 * 1024;

/// First lines that mark a cloud-config file.
const HEADERS: [&str; 3] = ["#cloud-config", "#kairos-config", "#node-config"];

/// The cloud-config files in [`DEFAULT_DIRS`], in the order they are merged.
pub fn default_sources() -> Vec<PathBuf> {
    let dirs: Vec<&Path> = DEFAULT_DIRS.iter().map(Path::new).collect();
    sources_in(&dirs)
}

/// The cloud-config files in `dirs`: per directory, in lexical order of file names.
pub fn sources_in(dirs: &[&Path]) -> Vec<PathBuf> {
    let mut out = Vec::new();
    for dir in dirs {
        let Ok(entries) = fs::read_dir(dir) else {
            continue;
        };
        let mut files: Vec<PathBuf> = entries
            .filter_map(Result::ok)
            .map(|e| e.path())
            .filter(|p| p.extension().is_some_and(|e| e == "yaml" || e == "yml"))
            .filter(|p| p.is_file() && has_header(p).unwrap_or(true))
            .collect();
        files.sort();
        out.extend(files);
    }
    out
}

/// Whether the file's first line is a cloud-config header; `None` if it cannot be read.
fn has_header(path: &Path) -> Option<bool> {
    let mut start = Vec::with_capacity(256);
    File::open(path)
        .and_then(|f| f.take(256).read_to_end(&mut start))
        .ok()?;
    let start = start.strip_prefix("\u{feff}".as_bytes()).unwrap_or(&start);
    let first = start.split(|b| *b == b'\n').next().unwrap_or_default();
    let first = String::from_utf8_lossy(first);
    Some(HEADERS.contains(&first.trim_end()))
}

/// Why a file could not be used, with the line when there is one.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(super) struct SourceError {
    pub(super) line: Option<usize>,
    pub(super) message: String,
}

/// The text of the file at `path`. The size is bounded before reading (and while reading, for
/// files such as pipes whose size is not known in advance); a pipe (`<(cmd)`, `/dev/stdin`, a
/// FIFO) must reach its end within [`MAX_PIPE_WAIT`], so a FIFO nobody writes to cannot hang
/// `validate` or the agent.
pub(super) fn read_source(path: &Path) -> Result<String, SourceError> {
    // Non-blocking: opening a FIFO without a writer would otherwise block in `open` itself.
    let file = OpenOptions::new()
        .read(true)
        .custom_flags(libc::O_NONBLOCK)
        .open(path)
        .map_err(cannot_read)?;
    let meta = file.metadata().map_err(cannot_read)?;
    if meta.is_dir() {
        return Err(whole_file("cannot read: is a directory".to_owned()));
    }
    if meta.len() > MAX_FILE_SIZE {
        return Err(whole_file(format!(
            "file is {} bytes, larger than the {MIB} MiB limit",
            meta.len()
        )));
    }
    let bytes = if meta.file_type().is_file() {
        let mut bytes = Vec::new();
        file.take(MAX_FILE_SIZE + 1)
            .read_to_end(&mut bytes)
            .map_err(cannot_read)?;
        bytes
    } else {
        read_pipe(file, Instant::now() + MAX_PIPE_WAIT)?
    };
    if bytes.len() as u64 > MAX_FILE_SIZE {
        return Err(whole_file(format!(
            "file is larger than the {MIB} MiB limit"
        )));
    }
    String::from_utf8(bytes).map_err(|e| {
        let valid = e.utf8_error().valid_up_to();
        let newlines = e
            .as_bytes()
            .iter()
            .take(valid)
            .filter(|b| **b == b'\n')
            .count();
        SourceError {
            line: Some(newlines + 1),
            message: format!("not valid UTF-8 (byte offset {valid})"),
        }
    })
}

const MIB: u64 = MAX_FILE_SIZE / (1024 * 1024);

/// Longest wait for a pipe or FIFO to deliver all of its text (its writer to close it).
pub const MAX_PIPE_WAIT: Duration = Duration::from_secs(5);

/// Everything `file` (opened non-blocking) delivers until its end, at most one byte more than
/// [`MAX_FILE_SIZE`], waiting until `deadline` at most.
fn read_pipe(mut file: File, deadline: Instant) -> Result<Vec<u8>, SourceError> {
    let mut bytes = Vec::new();
    let mut chunk = vec![0u8; 64 * 1024];
    loop {
        let now = Instant::now();
        if now >= deadline {
            return Err(whole_file(format!(
                "cannot read: no end of input within {} s (a pipe or FIFO nobody closes?)",
                MAX_PIPE_WAIT.as_secs()
            )));
        }
        let wait_ms = (deadline - now).as_millis().clamp(1, i32::MAX as u128) as i32;
        let mut poll = libc::pollfd {
            fd: file.as_raw_fd(),
            events: libc::POLLIN,
            revents: 0,
        };
        // SAFETY: one valid pollfd that lives for the call; `file` keeps the fd open.
        let ready = unsafe { libc::poll(&mut poll, 1, wait_ms) };
        if ready < 0 {
            let e = io::Error::last_os_error();
            if e.kind() == io::ErrorKind::Interrupted {
                continue;
            }
            return Err(cannot_read(e));
        }
        if ready == 0 {
            continue;
        }
        match file.read(&mut chunk) {
            Ok(0) => return Ok(bytes),
            Ok(n) => {
                bytes.extend_from_slice(&chunk[..n]);
                if bytes.len() as u64 > MAX_FILE_SIZE {
                    return Ok(bytes);
                }
            }
            Err(e)
                if matches!(
                    e.kind(),
                    io::ErrorKind::WouldBlock | io::ErrorKind::Interrupted
                ) => {}
            Err(e) => return Err(cannot_read(e)),
        }
    }
}

fn whole_file(message: String) -> SourceError {
    SourceError {
        line: None,
        message,
    }
}

fn cannot_read(e: io::Error) -> SourceError {
    let reason = match e.kind() {
        io::ErrorKind::NotFound => "no such file".to_owned(),
        io::ErrorKind::PermissionDenied => "permission denied".to_owned(),
        _ => e.to_string(),
    };
    whole_file(format!("cannot read: {reason}"))
}
