//! Standard output and standard error for the command line, safe against a closed pipe.
//!
//! `println!` panics when the write fails, and the release build aborts on a panic: `kairos-p2p
//! help | head -c1` died with SIGABRT whenever `head` exited before the help was written. Every
//! line the CLI prints goes through [`out`] or [`err`] instead (the `outln!`/`errln!` macros):
//! - a closed pipe (`EPIPE`) ends that stream quietly: later writes to it are dropped and the
//!   command finishes with its own exit status, as if the reader had read everything;
//! - any other write error on standard output (a full disk behind `> file`) is kept and reported
//!   once by [`stdout_failure`], so the command can exit with a failure instead of claiming
//!   success for output that was never written.
//!
//! Standard error is best effort: nothing is reported about a failure to report.

use std::fmt;
use std::io::{self, Write};
use std::sync::Mutex;
use std::sync::atomic::{AtomicBool, Ordering};

/// Standard output's reader went away: drop what follows.
static STDOUT_CLOSED: AtomicBool = AtomicBool::new(false);
/// Standard error's reader went away.
static STDERR_CLOSED: AtomicBool = AtomicBool::new(false);
/// The first write error on standard output other than a closed pipe.
static STDOUT_ERROR: Mutex<Option<String>> = Mutex::new(None);

/// Writes `args` to standard output (no newline added) and flushes it.
pub fn out(args: fmt::Arguments<'_>) {
    if STDOUT_CLOSED.load(Ordering::Relaxed) {
        return;
    }
    let mut stdout = io::stdout().lock();
    let result = stdout.write_fmt(args).and_then(|()| stdout.flush());
    if let Err(e) = result {
        STDOUT_CLOSED.store(true, Ordering::Relaxed);
        if e.kind() != io::ErrorKind::BrokenPipe {
            let mut first = STDOUT_ERROR.lock().unwrap_or_else(|p| p.into_inner());
            first.get_or_insert_with(|| e.to_string());
        }
    }
}

/// Writes `args` to standard error (no newline added); errors are dropped.
pub fn err(args: fmt::Arguments<'_>) {
    if STDERR_CLOSED.load(Ordering::Relaxed) {
        return;
    }
    let mut stderr = io::stderr().lock();
    if stderr
        .write_fmt(args)
        .and_then(|()| stderr.flush())
        .is_err()
    {
        STDERR_CLOSED.store(true, Ordering::Relaxed);
    }
}

/// The first error writing standard output, other than a closed pipe (which is not a failure).
pub fn stdout_failure() -> Option<String> {
    STDOUT_ERROR
        .lock()
        .unwrap_or_else(|p| p.into_inner())
        .clone()
}

/// `println!` through [`out`](crate::console::out).
#[macro_export]
macro_rules! outln {
    () => { $crate::console::out(format_args!("\n")) };
    ($($arg:tt)*) => { $crate::console::out(format_args!("{}\n", format_args!($($arg)*))) };
}

/// `print!` through [`out`](crate::console::out).
#[macro_export]
macro_rules! out {
    ($($arg:tt)*) => { $crate::console::out(format_args!($($arg)*)) };
}

/// `eprintln!` through [`err`](crate::console::err).
#[macro_export]
macro_rules! errln {
    ($($arg:tt)*) => { $crate::console::err(format_args!("{}\n", format_args!($($arg)*))) };
}
