//! Large message bodies, appended to segment files instead of stored in SQLite.
//!
//! SQLite writes a blob twice: into the write-ahead log at commit, then again into the
//! database file at the next checkpoint, in 4 KiB pages with a checksum each. For a 100 KiB
//! message that doubles the spool's disk traffic and keeps the writer thread copying while
//! every session of the batch waits. A body larger than [`INLINE_LIMIT`] is instead appended
//! once to the active segment file (`segments/<number>`, 16 hex digits), and SQLite keeps
//! only where it is. Small bodies stay inline: for them a second fsync would cost more than
//! the copy saves.
//!
//! Durability: the writer appends the batch's bodies, syncs the segment (`fdatasync`), and
//! only then commits the rows that point into it, with the fsync of the log that makes them
//! durable. A row never points at data that is not on stable storage. What a crash leaves
//! after the last committed body is never referenced, and a restart starts a new segment.
//!
//! Space: a segment is deleted once no row points into it and it is no longer the active one.
//! The rows' removal is made durable first (see [`Segments::delete`]); otherwise a power
//! failure could bring back rows whose data is gone. At start-up, segment files no row
//! points into are deleted.

use std::collections::HashSet;
use std::fs::{self, File, OpenOptions};
use std::io;
use std::os::unix::fs::{FileExt, OpenOptionsExt};
use std::path::{Path, PathBuf};

use crate::SpoolError;
use crate::error::Context;
use crate::sqlite::{create_private_dir, sync_dir};

/// Bodies up to this size stay in SQLite.
pub(crate) const INLINE_LIMIT: usize = 16 << 10;
/// A new segment is started once the active one has reached this size (a larger body still
/// goes into one segment whole).
const SEGMENT_SIZE: u64 = 64 << 20;
/// The directory of the segments, in the spool directory.
pub(crate) const DIR: &str = "segments";

/// Where a body is: `length` octets at `offset` in segment `segment`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct BodyLocation {
    pub(crate) segment: u64,
    pub(crate) offset: u64,
    pub(crate) length: u64,
}

pub(crate) fn path(dir: &Path, segment: u64) -> PathBuf {
    dir.join(format!("{segment:016x}"))
}

fn number(name: &std::ffi::OsStr) -> Option<u64> {
    let name = name.to_str()?;
    if name.len() != 16 {
        return None;
    }
    u64::from_str_radix(name, 16).ok()
}

/// Reads a body; the file is opened for the read, so a reader holds no descriptor of a
/// segment that is later deleted.
pub(crate) fn read(dir: &Path, location: BodyLocation) -> Result<Vec<u8>, SpoolError> {
    let path = path(dir, location.segment);
    let context = || {
        format!("reading {} octets at {} of {}", location.length, location.offset, path.display())
    };
    let length = usize::try_from(location.length)
        .map_err(|_| SpoolError::Corrupt(format!("a body of {} octets", location.length)))?;
    let file = File::open(&path).context(context)?;
    let mut body = vec![0; length];
    file.read_exact_at(&mut body, location.offset).context(context)?;
    Ok(body)
}

/// The writer's side: the active segment and the numbering.
pub(crate) struct Segments {
    dir: PathBuf,
    active: Option<Active>,
    /// The number the next new segment gets.
    next: u64,
    /// Segments that stopped being active since the last [`Segments::take_retired`]: they may
    /// already be empty, and no removal would then ever look at them again.
    retired: Vec<u64>,
    /// Segments whose sync failed since the last [`Segments::take_failed`], with the error:
    /// nothing appended to them since their last good sync may be on the disk.
    failed: Vec<(u64, SpoolError)>,
}

struct Active {
    number: u64,
    file: File,
    length: u64,
    /// Written since the last sync.
    unsynced: bool,
}

impl Segments {
    /// Opens the segment directory in `spool_dir` (creating it), deletes every segment that
    /// no row points into (`referenced` lists those that rows do), and numbers new segments
    /// after every one seen.
    pub(crate) fn open(
        spool_dir: &Path,
        referenced: &HashSet<u64>,
    ) -> Result<Segments, SpoolError> {
        let dir = spool_dir.join(DIR);
        create_private_dir(&dir)?;
        let mut highest = referenced.iter().copied().max().unwrap_or(0);
        let entries = fs::read_dir(&dir).context(|| format!("listing {}", dir.display()))?;
        for entry in entries {
            let entry = entry.context(|| format!("listing {}", dir.display()))?;
            let Some(segment) = number(&entry.file_name()) else { continue };
            highest = highest.max(segment);
            if !referenced.contains(&segment) {
                remove(&entry.path())?;
            }
        }
        Ok(Segments {
            dir,
            active: None,
            next: highest + 1,
            retired: Vec::new(),
            failed: Vec::new(),
        })
    }

    pub(crate) fn dir(&self) -> &Path {
        &self.dir
    }

    pub(crate) fn is_active(&self, segment: u64) -> bool {
        self.active.as_ref().is_some_and(|active| active.number == segment)
    }

    /// Appends `body` to the active segment, starting a new one when needed. Not durable
    /// until [`Segments::sync`].
    pub(crate) fn append(&mut self, body: &[u8]) -> Result<BodyLocation, SpoolError> {
        let full = self.active.as_ref().is_some_and(|active| {
            active.length > 0 && active.length + body.len() as u64 > SEGMENT_SIZE
        });
        if full {
            // Its bodies must be durable before the rows of this batch commit, like the
            // new segment's.
            self.sync()?;
            self.retire();
        }
        if self.active.is_none() {
            self.active = Some(self.create()?);
        }
        let Some(active) = self.active.as_mut() else { unreachable!("created above") };
        let offset = active.length;
        let written = active.file.write_all_at(body, offset);
        // Even a failed write may have written something: sync it with the rest.
        active.unsynced = true;
        written.context(|| format!("appending to {}", path(&self.dir, active.number).display()))?;
        active.length += body.len() as u64;
        Ok(BodyLocation { segment: active.number, offset, length: body.len() as u64 })
    }

    /// Makes every body appended so far durable. After a failure the segment is given up
    /// (what the kernel kept of it is unknown), the next body starts a new one, and the
    /// segment is listed for [`Segments::take_failed`].
    pub(crate) fn sync(&mut self) -> Result<(), SpoolError> {
        let Some(active) = self.active.as_mut() else { return Ok(()) };
        if !active.unsynced {
            return Ok(());
        }
        match active.file.sync_data() {
            Ok(()) => {
                active.unsynced = false;
                Ok(())
            }
            Err(error) => {
                let context = format!("syncing {}", path(&self.dir, active.number).display());
                let error = SpoolError::io(context, error);
                self.failed.push((active.number, error.clone()));
                self.retire();
                Err(error)
            }
        }
    }

    /// Stops appending to the active segment, so it can be deleted once empty.
    pub(crate) fn retire(&mut self) {
        if let Some(active) = self.active.take() {
            self.retired.push(active.number);
        }
    }

    pub(crate) fn take_retired(&mut self) -> Vec<u64> {
        std::mem::take(&mut self.retired)
    }

    pub(crate) fn take_failed(&mut self) -> Vec<(u64, SpoolError)> {
        std::mem::take(&mut self.failed)
    }

    /// Deletes a segment that no row points into any more. The caller has made that
    /// durable: the removals of its rows were committed and the log synced.
    pub(crate) fn delete(&self, segment: u64) -> Result<(), SpoolError> {
        remove(&path(&self.dir, segment))
    }

    fn create(&mut self) -> Result<Active, SpoolError> {
        let number = self.next;
        let path = path(&self.dir, number);
        let file = OpenOptions::new()
            .read(true)
            .write(true)
            .create_new(true)
            .mode(0o600)
            .open(&path)
            .context(|| format!("creating {}", path.display()))?;
        // The new name must be durable before any row points at it.
        sync_dir(&self.dir)?;
        self.next += 1;
        Ok(Active { number, file, length: 0, unsynced: false })
    }
}

fn remove(path: &Path) -> Result<(), SpoolError> {
    match fs::remove_file(path) {
        Err(error) if error.kind() != io::ErrorKind::NotFound => {
            Err(SpoolError::io(format!("deleting {}", path.display()), error))
        }
        _ => Ok(()),
    }
}
