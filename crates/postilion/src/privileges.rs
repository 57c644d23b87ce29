//! Running as root only as long as needed: a server started as root binds its listeners
//! (ports below 1024 need root), gives its data directory to the configured user, and then
//! becomes that user for good, before any thread is started and before it reads a byte from
//! the network.

use std::path::Path;

use anyhow::{Context, bail};
use rustix::fs::{AtFlags, CWD, chownat};
use rustix::process::{Gid, Uid, getegid, geteuid, getgid, getuid};
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
    if let Some((uid, gid)) = user.split_once(':') {
        if let (Ok(uid), Ok(gid)) = (uid.parse(), gid.parse()) {
            return Ok(Account { uid, gid });
        }
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

/// Gives `dir` and everything in it to `account` (without following symbolic links), so the
/// server can still use what an earlier run as root created.
pub fn hand_over(dir: &Path, account: Account) -> anyhow::Result<()> {
    let (uid, gid) = (Uid::from_raw(account.uid), Gid::from_raw(account.gid));
    chownat(CWD, dir, Some(uid), Some(gid), AtFlags::SYMLINK_NOFOLLOW)
        .with_context(|| format!("giving {} to uid {}", dir.display(), account.uid))?;
    if dir.symlink_metadata().is_ok_and(|m| m.is_dir()) {
        for entry in std::fs::read_dir(dir).with_context(|| format!("reading {}", dir.display()))? {
            let entry = entry.with_context(|| format!("reading {}", dir.display()))?;
            hand_over(&entry.path(), account)?;
        }
    }
    Ok(())
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
