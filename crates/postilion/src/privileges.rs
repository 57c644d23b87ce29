//! Running as root only as long as needed: a server started as root binds its listeners
//! (ports below 1024 need root), gives its data directory to the configured user, and then
//! becomes that user for good, before any thread is started and before it reads a byte from
//! the network.

use std::path::Path;

use anyhow::{Context, bail};
use std::os::fd::OwnedFd;

use rustix::fs::{AtFlags, Dir, FileType, Mode, OFlags, chownat, fchown, fstat, open, openat};
use rustix::process::{
    Gid, Resource, Rlimit, Uid, getegid, geteuid, getgid, getpriority_process, getrlimit, getuid,
    setrlimit,
};
use rustix::thread::{set_thread_groups, set_thread_res_gid, set_thread_res_uid};

/// A user to become.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Account {
    pub uid: u32,
    pub gid: u32,
}

/// Finds `user`: a name in /etc/passwd, or `uid:gid` in numbers (for systems whose users
/// come from elsewhere).
pub fn lookup(user: &str) -> anyhow::Result<Account> {
    if let Some((uid, gid)) = user.split_once(':')
        && let (Ok(uid), Ok(gid)) = (uid.parse(), gid.parse())
    {
        return Ok(Account { uid, gid });
    }
    let passwd = std::fs::read_to_string("/etc/passwd").context("reading /etc/passwd")?;
    find_in_passwd(&passwd, user)
        .with_context(|| format!("no user {user:?} in /etc/passwd (or give it as uid:gid)"))
}

fn find_in_passwd(passwd: &str, user: &str) -> Option<Account> {
    passwd.lines().find_map(|line| {
        let mut fields = line.split(':');
        if fields.next()? != user {
            return None;
        }
        let _password = fields.next()?;
        let uid = fields.next()?.parse().ok()?;
        let gid = fields.next()?.parse().ok()?;
        Some(Account { uid, gid })
    })
}

/// Whether the process runs as root and so must drop privileges.
pub fn running_as_root() -> bool {
    geteuid().is_root()
}

/// Gives `dir` and everything in it to `account`, so the server can still use what an
/// earlier run as root created.
///
/// The user being given the tree may be the one who controls it, and could swap an entry
/// for a symbolic link or a hard link to some root-owned file while root walks it. So the
/// walk goes by file descriptor, never by path: each entry is opened without following
/// links (`O_PATH | O_NOFOLLOW`), looked at through that descriptor, and changed through it;
/// symbolic links, special files and files with more than one link are left alone; a
/// directory is opened again with `O_NOFOLLOW` and must be the same inode.
pub fn hand_over(dir: &Path, account: Account) -> anyhow::Result<()> {
    let flags = OFlags::RDONLY | OFlags::DIRECTORY | OFlags::NOFOLLOW | OFlags::CLOEXEC;
    let fd = open(dir, flags, Mode::empty())
        .with_context(|| format!("opening {} (not a directory, or a link?)", dir.display()))?;
    hand_over_dir(&fd, account, 0)
        .with_context(|| format!("giving {} to uid {}", dir.display(), account.uid))
}

/// How deep the data directory may nest; deeper trees are not ours.
const MAX_DEPTH: usize = 16;

fn hand_over_dir(dir: &OwnedFd, account: Account, depth: usize) -> anyhow::Result<()> {
    let (uid, gid) = (Uid::from_raw(account.uid), Gid::from_raw(account.gid));
    fchown(dir, Some(uid), Some(gid)).context("changing a directory's owner")?;
    if depth == MAX_DEPTH {
        return Ok(());
    }
    for entry in Dir::read_from(dir).context("reading a directory")? {
        let entry = entry.context("reading a directory")?;
        let name = entry.file_name();
        if name.to_bytes() == b"." || name.to_bytes() == b".." {
            continue;
        }
        let path_flags = OFlags::PATH | OFlags::NOFOLLOW | OFlags::CLOEXEC;
        let Ok(handle) = openat(dir, name, path_flags, Mode::empty()) else { continue };
        let stat = fstat(&handle).context("looking at a directory entry")?;
        match FileType::from_raw_mode(stat.st_mode) {
            FileType::RegularFile if stat.st_nlink == 1 => {
                chownat(&handle, c"", Some(uid), Some(gid), AtFlags::EMPTY_PATH)
                    .context("changing a file's owner")?;
            }
            FileType::Directory => {
                let flags = OFlags::RDONLY | OFlags::DIRECTORY | OFlags::NOFOLLOW | OFlags::CLOEXEC;
                let Ok(child) = openat(dir, name, flags, Mode::empty()) else { continue };
                let again = fstat(&child).context("looking at a directory")?;
                // Swapped between the two opens: not the directory we looked at.
                if (again.st_dev, again.st_ino) != (stat.st_dev, stat.st_ino) {
                    continue;
                }
                hand_over_dir(&child, account, depth + 1)?;
            }
            // Links, sockets, devices, hard-linked files: none of ours, left as they are.
            _ => {}
        }
    }
    Ok(())
}

/// Lets the process, once it is no longer root, run threads up to `levels` nice levels
/// above its own priority (it raises `RLIMIT_NICE`, which needs root with
/// `CAP_SYS_RESOURCE`; some containers' root lacks it). The spool's writer and sync threads
/// ask for that (see [`spool::THREAD_PRIORITY_BOOST`]).
pub fn allow_priority_boost(levels: i32) -> anyhow::Result<()> {
    let nice = getpriority_process(None).context("reading the process's nice value")?;
    // RLIMIT_NICE allows nice values down to 20 - limit.
    let needed = u64::try_from(20 - (nice - levels).max(-20)).unwrap_or(0);
    let limit = getrlimit(Resource::Nice);
    let raised = Rlimit {
        // None: unlimited, already enough.
        current: limit.current.map(|current| current.max(needed)),
        maximum: limit.maximum.map(|maximum| maximum.max(needed)),
    };
    setrlimit(Resource::Nice, raised).context("raising RLIMIT_NICE")
}

/// Becomes `account` for good: supplementary groups, then group, then user (in that order:
/// once the user is no longer root it may not change its groups). Must run while the process
/// has a single thread, since the calls change only the calling thread's credentials.
pub fn become_user(account: Account) -> anyhow::Result<()> {
    let (uid, gid) = (Uid::from_raw(account.uid), Gid::from_raw(account.gid));
    set_thread_groups(&[gid]).context("setting the supplementary groups")?;
    set_thread_res_gid(gid, gid, gid).context("setting the group id")?;
    set_thread_res_uid(uid, uid, uid).context("setting the user id")?;
    // Check: a partial change would leave a way back to root.
    if getuid() != uid || geteuid() != uid || getgid() != gid || getegid() != gid {
        bail!("privileges were not dropped to uid {} gid {}", account.uid, account.gid);
    }
    if account.uid != 0 && set_thread_res_uid(Uid::ROOT, Uid::ROOT, Uid::ROOT).is_ok() {
        bail!("could become root again after dropping privileges");
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn passwd_lines_and_numbers() {
        let passwd = "root:x:0:0:root:/root:/bin/bash\n\
                      postilion:x:998:997:Postilion:/var/spool/postilion:/usr/sbin/nologin\n\
                      broken:x:abc\n";
        assert_eq!(find_in_passwd(passwd, "postilion"), Some(Account { uid: 998, gid: 997 }));
        assert_eq!(find_in_passwd(passwd, "root"), Some(Account { uid: 0, gid: 0 }));
        assert_eq!(find_in_passwd(passwd, "broken"), None);
        assert_eq!(find_in_passwd(passwd, "post"), None);
        assert_eq!(lookup("1234:5678").unwrap(), Account { uid: 1234, gid: 5678 });
    }
}
