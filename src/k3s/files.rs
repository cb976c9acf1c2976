//! Writing system files: atomically (a temporary file in the same directory, synced, renamed),
//! with the mode asked for; errors name the file.

use std::fs::{self, OpenOptions};
use std::io::{self, Write as _};
use std::os::unix::fs::{OpenOptionsExt as _, PermissionsExt as _};
use std::path::{Path, PathBuf};

/// Mode of files holding secrets (env files with K3S_TOKEN, markers, manifests).
pub const PRIVATE: u32 = 0o600;
/// Mode of executable scripts (OpenRC init scripts).
pub const EXECUTABLE: u32 = 0o755;

/// A file operation that failed, with the file.
#[derive(Debug)]
pub struct FileError {
    /// What was being done (`write`, `read`, `create directory`).
    pub action: &'static str,
    /// The file.
    pub path: PathBuf,
    /// The cause.
    pub error: io::Error,
}

impl std::fmt::Display for FileError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(
            f,
            "cannot {} {}: {}",
            self.action,
            self.path.display(),
            self.error
        )
    }
}

impl std::error::Error for FileError {}

fn err<'a>(action: &'static str, path: &'a Path) -> impl FnOnce(io::Error) -> FileError + 'a {
    move |error| FileError {
        action,
        path: path.to_path_buf(),
        error,
    }
}

/// Writes `contents` to `path` atomically with `mode`, creating the parent directories.
/// Unchanged contents and mode are left alone (returns false); true when written.
pub fn write(path: &Path, contents: &[u8], mode: u32) -> Result<bool, FileError> {
    if let (Ok(old), Ok(meta)) = (fs::read(path), fs::metadata(path)) {
        if old == contents && meta.permissions().mode() & 0o7777 == mode {
            return Ok(false);
        }
    }
    let dir = path.parent().unwrap_or(Path::new("."));
    fs::create_dir_all(dir).map_err(err("create directory", dir))?;
    let name = path
        .file_name()
        .map(|n| n.to_string_lossy().into_owned())
        .unwrap_or_default();
    let tmp = dir.join(format!(".{name}.kairos-p2p.tmp"));
    let _ = fs::remove_file(&tmp);
    let result = (|| {
        let mut f = OpenOptions::new()
            .write(true)
            .create_new(true)
            .mode(mode)
            .open(&tmp)?;
        f.write_all(contents)?;
        // The umask may have narrowed the mode given at creation.
        f.set_permissions(fs::Permissions::from_mode(mode))?;
        f.sync_all()?;
        fs::rename(&tmp, path)
    })();
    if let Err(e) = result {
        let _ = fs::remove_file(&tmp);
        return Err(err("write", path)(e));
    }
    Ok(true)
}

/// Reads `path`; `Ok(None)` when it does not exist.
pub fn read(path: &Path) -> Result<Option<Vec<u8>>, FileError> {
    match fs::read(path) {
        Ok(b) => Ok(Some(b)),
        Err(e) if e.kind() == io::ErrorKind::NotFound => Ok(None),
        Err(e) => Err(err("read", path)(e)),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn writes_atomically_with_mode() {
        let dir = std::env::temp_dir().join(format!("kp2p-files-{}", std::process::id()));
        let p = dir.join("a/b/secret.env");
        assert!(write(&p, b"K3S_TOKEN=x\n", PRIVATE).unwrap());
        assert_eq!(
            fs::metadata(&p).unwrap().permissions().mode() & 0o777,
            0o600
        );
        assert!(!write(&p, b"K3S_TOKEN=x\n", PRIVATE).unwrap());
        assert!(write(&p, b"K3S_TOKEN=y\n", PRIVATE).unwrap());
        assert_eq!(read(&p).unwrap().unwrap(), b"K3S_TOKEN=y\n");
        assert_eq!(read(&dir.join("none")).unwrap(), None);
        let e = write(&p.join("under-a-file"), b"", PRIVATE).unwrap_err();
        assert!(e.to_string().contains("secret.env"), "{e}");
        fs::remove_dir_all(&dir).unwrap();
    }
}
