//! SIGINT/SIGTERM as an event in the mio loop (the self-pipe pattern).

use std::fs::File;
use std::io::{self, Read};
use std::os::fd::{AsRawFd, FromRawFd, RawFd};
use std::sync::atomic::{AtomicI32, Ordering};

/// Write end of the pipe, for the handler (the only thing it touches: async-signal-safe).
static PIPE_WRITE_FD: AtomicI32 = AtomicI32::new(-1);

extern "C" fn on_signal(signal: libc::c_int) {
    let fd = PIPE_WRITE_FD.load(Ordering::Relaxed);
    if fd >= 0 {
        let byte = signal as u8;
        // SAFETY: write(2) is async-signal-safe; a full pipe just drops the byte.
        unsafe { libc::write(fd, (&raw const byte).cast(), 1) };
    }
}

/// The readable end of the signal pipe; register it with mio and call [`ShutdownSignal::take`]
/// when it is readable.
pub struct ShutdownSignal {
    read: File,
}

impl ShutdownSignal {
    /// Installs handlers for SIGINT and SIGTERM (once per process) and ignores SIGPIPE.
    pub fn install() -> io::Result<Self> {
        let mut fds = [0 as RawFd; 2];
        // SAFETY: pipe2 fills two fds we own from here on.
        if unsafe { libc::pipe2(fds.as_mut_ptr(), libc::O_NONBLOCK | libc::O_CLOEXEC) } != 0 {
            return Err(io::Error::last_os_error());
        }
        // SAFETY: fds[0] is a fresh fd owned by nobody else.
        let read = unsafe { File::from_raw_fd(fds[0]) };
        let old = PIPE_WRITE_FD.swap(fds[1], Ordering::Relaxed);
        if old >= 0 {
            // SAFETY: the previous write end was ours and is no longer published.
            unsafe { libc::close(old) };
        }
        for signal in [libc::SIGINT, libc::SIGTERM] {
            // SAFETY: a zeroed sigaction with a plain handler and an empty mask is valid.
            let mut action: libc::sigaction = unsafe { std::mem::zeroed() };
            action.sa_sigaction = on_signal as extern "C" fn(libc::c_int) as *const () as usize;
            action.sa_flags = libc::SA_RESTART;
            // SAFETY: installing a handler that only calls write(2).
            if unsafe { libc::sigaction(signal, &action, std::ptr::null_mut()) } != 0 {
                return Err(io::Error::last_os_error());
            }
        }
        // SAFETY: ignoring SIGPIPE so a closed API client gives EPIPE instead of killing us.
        unsafe { libc::signal(libc::SIGPIPE, libc::SIG_IGN) };
        Ok(Self { read })
    }

    /// The fd to register for readability.
    pub fn raw_fd(&self) -> RawFd {
        self.read.as_raw_fd()
    }

    /// Drains the pipe; returns the last signal received, if any.
    pub fn take(&mut self) -> Option<i32> {
        let mut buf = [0u8; 16];
        let mut last = None;
        while let Ok(n @ 1..) = self.read.read(&mut buf) {
            last = buf.get(n - 1).map(|&b| i32::from(b));
        }
        last
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_signal_arrives_as_a_byte_on_the_pipe() {
        let mut signal = ShutdownSignal::install().unwrap();
        assert_eq!(signal.take(), None);
        // SAFETY: raising SIGTERM runs our handler (installed above), which only writes a byte.
        unsafe { libc::raise(libc::SIGTERM) };
        assert_eq!(signal.take(), Some(libc::SIGTERM));
    }
}
