//! Where a ledger's snapshot and journal are kept: the agent's files ([`FileDisk`], with its
//! fsync and atomic rename) or, in the simulator, a [`MemoryDisk`] holding the same bytes. Both
//! are written by [`Ledger::persist_to`] and read back through [`Ledger::from_disk_bytes`], so
//! the simulator exercises the real on-disk format, journal replay included.

use std::fs;
use std::io;
use std::path::Path;

use super::journal::{append, journal_header, journal_path};
use super::persist::write_snapshot_file;
use super::{Ledger, LedgerError, Limits};

/// A place that keeps a ledger's snapshot and journal.
pub trait LedgerDisk {
    /// Replaces the snapshot with `bytes`, atomically (a crash leaves the old or the new one).
    fn write_snapshot(&mut self, bytes: Vec<u8>) -> Result<(), LedgerError>;

    /// Removes the journal (what it held is in the snapshot just written).
    fn remove_journal(&mut self) -> Result<(), LedgerError>;

    /// Appends journal `records` (starting the journal over, header first, when `fresh` or
    /// when there is none) and returns the bytes written. On failure, says whether the journal
    /// was cut back to where it was (no torn record left behind).
    fn append_journal(&mut self, fresh: bool, records: &[u8]) -> Result<u64, (LedgerError, bool)>;
}

/// The agent's disk: the snapshot file at a path and its journal beside it
/// ([`journal_path`]).
#[derive(Debug, Clone, Copy)]
pub struct FileDisk<'a> {
    path: &'a Path,
}

impl<'a> FileDisk<'a> {
    /// The snapshot at `path`.
    #[must_use]
    pub fn new(path: &'a Path) -> Self {
        Self { path }
    }
}

impl LedgerDisk for FileDisk<'_> {
    fn write_snapshot(&mut self, bytes: Vec<u8>) -> Result<(), LedgerError> {
        write_snapshot_file(self.path, &bytes)
    }

    fn remove_journal(&mut self) -> Result<(), LedgerError> {
        let journal = journal_path(self.path);
        match fs::remove_file(&journal) {
            Ok(()) => Ok(()),
            Err(e) if e.kind() == io::ErrorKind::NotFound => Ok(()),
            Err(error) => Err(LedgerError::Io {
                path: journal,
                error,
            }),
        }
    }

    fn append_journal(&mut self, fresh: bool, records: &[u8]) -> Result<u64, (LedgerError, bool)> {
        append(&journal_path(self.path), fresh, records).map_err(|(error, cut_back)| {
            let path = journal_path(self.path);
            (LedgerError::Io { path, error }, cut_back)
        })
    }
}

/// The simulator's virtual disk: the bytes the agent's files would hold.
#[derive(Debug, Clone, Default)]
pub struct MemoryDisk {
    snapshot: Option<Vec<u8>>,
    journal: Option<Vec<u8>>,
}

impl MemoryDisk {
    /// Loads the ledger a restart finds on this disk, as [`Ledger::load`] does from files (an
    /// empty disk is an empty ledger); the error says what is wrong with the snapshot.
    pub fn load(&self, limits: Limits) -> Result<Ledger, String> {
        Ledger::from_disk_bytes(self.snapshot.as_deref(), self.journal.as_deref(), limits)
            .map(|(ledger, _)| ledger)
    }

    /// The snapshot's bytes (`None`: never saved).
    #[must_use]
    pub fn snapshot(&self) -> Option<&[u8]> {
        self.snapshot.as_deref()
    }

    /// The journal's bytes (`None`: none since the last snapshot).
    #[must_use]
    pub fn journal(&self) -> Option<&[u8]> {
        self.journal.as_deref()
    }
}

impl LedgerDisk for MemoryDisk {
    fn write_snapshot(&mut self, mut bytes: Vec<u8>) -> Result<(), LedgerError> {
        // Thousands of simulated disks: hold what is written, not the encoder's estimate.
        bytes.shrink_to_fit();
        self.snapshot = Some(bytes);
        Ok(())
    }

    fn remove_journal(&mut self) -> Result<(), LedgerError> {
        self.journal = None;
        Ok(())
    }

    fn append_journal(&mut self, fresh: bool, records: &[u8]) -> Result<u64, (LedgerError, bool)> {
        let journal = self.journal.get_or_insert_with(Vec::new);
        let mut written = 0;
        if fresh || journal.is_empty() {
            journal.clear();
            journal.extend_from_slice(&journal_header());
            written = journal.len();
        }
        // Grown by a quarter rather than doubled: a copy now and then, a quarter wasted at most.
        let spare = journal.capacity() - journal.len();
        if spare < records.len() {
            journal.reserve_exact(records.len().max(journal.len() / 4));
        }
        journal.extend_from_slice(records);
        Ok((written + records.len()) as u64)
    }
}

/// A virtual disk that keeps no bytes, for simulations that never restart a node from its
/// disk: the ledger encodes and "writes" every save as it would to [`MemoryDisk`] (the same
/// choice between a journal append and a whole snapshot), and only whether anything was saved
/// is kept. A thousand simulated nodes' snapshots and journals would hold gigabytes of RAM that
/// real nodes keep on their disks.
#[derive(Debug, Clone, Copy, Default)]
pub struct DiscardDisk {
    saved: bool,
    journal: bool,
}

impl DiscardDisk {
    /// Whether any save reached this disk (its bytes are gone).
    #[must_use]
    pub fn saved(&self) -> bool {
        self.saved
    }
}

impl LedgerDisk for DiscardDisk {
    fn write_snapshot(&mut self, _bytes: Vec<u8>) -> Result<(), LedgerError> {
        self.saved = true;
        Ok(())
    }

    fn remove_journal(&mut self) -> Result<(), LedgerError> {
        self.journal = false;
        Ok(())
    }

    fn append_journal(&mut self, fresh: bool, records: &[u8]) -> Result<u64, (LedgerError, bool)> {
        self.saved = true;
        let header = if fresh || !self.journal {
            journal_header().len()
        } else {
            0
        };
        self.journal = true;
        Ok((header + records.len()) as u64)
    }
}
