//! Where reports go: stdout, or `-o FILE` written as root into a directory someone else
//! may own.
//!
//! The file is never opened by its name: a link planted there (in /tmp, or any directory
//! an unprivileged user writes) would make root truncate what it points to, and a FIFO
//! would block forever. Reports are written to a new file in the same directory, created
//! exclusively without following links and with a fixed mode (0644, whatever the umask),
//! which replaces whatever is at the name with one `rename` when the first report is
//! written. Until then nothing at the name is touched: a session refused later (a bad
//! pid, a kernel without what it needs) leaves it as it was, and the new file goes.

use std::{
    fs::File,
    io::Write as _,
    os::unix::fs::{OpenOptionsExt as _, PermissionsExt as _},
    path::{Path, PathBuf},
};

use crate::error::Error;

/// Mode of a report file.
const MODE: u32 = 0o644;

/// Where reports go.
pub struct Output {
    /// What error messages call it.
    path: String,
    out: Sink,
}

enum Sink {
    Stdout(std::io::Stdout),
    File {
        file: File,
        /// The new file's name while it has not replaced `dest` yet.
        pending: Option<PathBuf>,
        dest: PathBuf,
    },
}

impl Output {
    /// Standard output.
    pub fn stdout() -> Self {
        Self {
            path: "stdout".into(),
            out: Sink::Stdout(std::io::stdout()),
        }
    }

    /// Prepares `-o path`: checks that what is there may be replaced (a regular file or
    /// a link, not a directory) and creates the new file beside it.
    pub fn file(path: &Path) -> Result<Self, Error> {
        let shown = path.display().to_string();
        let fail = |source: std::io::Error| Error::Output {
            path: shown.clone(),
            source,
        };
        if let Ok(m) = std::fs::symlink_metadata(path)
            && m.is_dir()
        {
            return Err(fail(std::io::Error::from(std::io::ErrorKind::IsADirectory)));
        }
        let name = path
            .file_name()
            .ok_or_else(|| fail(std::io::Error::from(std::io::ErrorKind::InvalidInput)))?;
        let dir = match path.parent() {
            Some(d) if !d.as_os_str().is_empty() => d.to_path_buf(),
            _ => PathBuf::from("."),
        };
        let mut last = None;
        for attempt in 0..16u32 {
            let nanos = std::time::SystemTime::now()
                .duration_since(std::time::UNIX_EPOCH)
                .map_or(0, |d| d.subsec_nanos());
            let mut temp_name = std::ffi::OsString::from(".");
            temp_name.push(name);
            temp_name.push(format!(
                ".leaktrace-{}-{nanos:x}-{attempt}",
                std::process::id()
            ));
            let temp = dir.join(temp_name);
            match std::fs::OpenOptions::new()
                .write(true)
                .create_new(true)
                .mode(MODE)
                .custom_flags(libc::O_NOFOLLOW | libc::O_CLOEXEC)
                .open(&temp)
            {
                Ok(file) => {
                    // The umask applied to the mode at creation; set it exactly.
                    if let Err(e) = file.set_permissions(std::fs::Permissions::from_mode(MODE)) {
                        let _ = std::fs::remove_file(&temp);
                        return Err(fail(e));
                    }
                    return Ok(Self {
                        path: shown,
                        out: Sink::File {
                            file,
                            pending: Some(temp),
                            dest: path.to_path_buf(),
                        },
                    });
                }
                Err(e) if e.kind() == std::io::ErrorKind::AlreadyExists => last = Some(e),
                Err(e) => return Err(fail(e)),
            }
        }
        Err(fail(last.unwrap_or_else(|| {
            std::io::Error::from(std::io::ErrorKind::AlreadyExists)
        })))
    }

    /// Writes `s` (a whole report) and flushes it; the first write puts the file in place.
    pub fn write(&mut self, s: &str) -> Result<(), Error> {
        self.write_bytes(s.as_bytes())
    }

    /// Writes bytes (a binary profile) as [`Output::write`] writes text.
    pub fn write_bytes(&mut self, s: &[u8]) -> Result<(), Error> {
        let result = match &mut self.out {
            Sink::Stdout(o) => o.write_all(s).and_then(|()| o.flush()),
            Sink::File {
                file,
                pending,
                dest,
            } => file.write_all(s).and_then(|()| {
                file.flush()?;
                if let Some(temp) = pending.take() {
                    std::fs::rename(&temp, dest).inspect_err(|_| {
                        let _ = std::fs::remove_file(&temp);
                    })?;
                }
                Ok(())
            }),
        };
        result.map_err(|source| Error::Output {
            path: self.path.clone(),
            source,
        })
    }
}

impl Drop for Output {
    fn drop(&mut self) {
        // No report was written: the name keeps what it had.
        if let Sink::File {
            pending: Some(temp),
            ..
        } = &self.out
        {
            let _ = std::fs::remove_file(temp);
        }
    }
}

#[cfg(test)]
mod tests {
    use std::os::unix::fs::MetadataExt as _;

    use super::*;

    fn scratch(tag: &str) -> PathBuf {
        let d = std::env::temp_dir().join(format!("leaktrace-output-{tag}-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&d);
        std::fs::create_dir_all(&d).unwrap();
        d
    }

    /// A link at the name is replaced, not followed: what it points to keeps its bytes.
    #[test]
    fn a_planted_link_is_replaced_not_followed() {
        let d = scratch("link");
        let victim = d.join("victim");
        std::fs::write(&victim, "precious").unwrap();
        let report = d.join("report.txt");
        std::os::unix::fs::symlink(&victim, &report).unwrap();
        let mut o = Output::file(&report).unwrap();
        o.write("report\n").unwrap();
        drop(o);
        assert_eq!(std::fs::read_to_string(&victim).unwrap(), "precious");
        let m = std::fs::symlink_metadata(&report).unwrap();
        assert!(m.file_type().is_file(), "{m:?}");
        assert_eq!(m.mode() & 0o7777, MODE);
        assert_eq!(std::fs::read_to_string(&report).unwrap(), "report\n");
        let _ = std::fs::remove_dir_all(&d);
    }

    /// Nothing written, nothing touched: the old file stays and no new file is left.
    #[test]
    fn no_report_leaves_the_name_as_it_was() {
        let d = scratch("keep");
        let keep = d.join("keep.txt");
        std::fs::write(&keep, "keep").unwrap();
        drop(Output::file(&keep).unwrap());
        assert_eq!(std::fs::read_to_string(&keep).unwrap(), "keep");
        assert_eq!(std::fs::read_dir(&d).unwrap().count(), 1);
        let _ = std::fs::remove_dir_all(&d);
    }

    /// A FIFO at the name is replaced without being opened (opening it would block).
    #[test]
    fn a_fifo_is_replaced_without_blocking() {
        let d = scratch("fifo");
        let fifo = d.join("out");
        let c = std::ffi::CString::new(fifo.as_os_str().as_encoded_bytes()).unwrap();
        // SAFETY: a valid NUL-terminated path.
        assert_eq!(unsafe { libc::mkfifo(c.as_ptr(), 0o644) }, 0);
        let mut o = Output::file(&fifo).unwrap();
        o.write("a\n").unwrap();
        o.write("b\n").unwrap();
        drop(o);
        assert_eq!(std::fs::read_to_string(&fifo).unwrap(), "a\nb\n");
        let _ = std::fs::remove_dir_all(&d);
    }

    /// A directory at the name, or a missing directory, is refused.
    #[test]
    fn directories_are_refused() {
        let d = scratch("dir");
        assert!(Output::file(&d).is_err());
        assert!(Output::file(&d.join("missing/report")).is_err());
        let _ = std::fs::remove_dir_all(&d);
    }
}
