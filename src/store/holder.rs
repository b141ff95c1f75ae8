//! Who holds a lease, written into the lease so that another process can tell a dead holder
//! from a slow one without waiting for the lease to run out.
//!
//! Why: the leases (the event log's, each Group flush's) last seconds to tens of seconds so
//! that a slow holder is never overtaken. After a crash that is pure waiting: a restarted
//! server answered 503 for a Group read until the dead flusher's 30 s lease ended.
//!
//! A holder is named by the kernel's boot id, its PID namespace, its pid and the pid's
//! start time (`/proc/<pid>/stat`, field 22). Another process may declare it dead only when
//! it sees the same boot id and the same PID namespace (so the pid means the same process
//! table), and that pid is gone or now belongs to a process that started at another time
//! (a reused pid). Anything it cannot check (another machine, another container, no
//! `/proc`) counts as alive: then the lease keeps its timing, as before.

use std::sync::OnceLock;

use bson::{doc, Document};

#[derive(Debug, Clone, PartialEq, Eq)]
struct Identity {
    boot: String,
    pid_namespace: String,
    pid: u32,
    start: u64,
}

/// A process's start time in clock ticks since boot (`/proc/<pid>/stat` field 22).
fn start_time(pid: u32) -> Option<u64> {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    // Field 2 (the command) is in parentheses and may contain anything; count after it.
    let rest = &stat[stat.rfind(')')? + 1..];
    rest.split_whitespace().nth(19)?.parse().ok()
}

fn this_identity() -> Option<&'static Identity> {
    static IDENTITY: OnceLock<Option<Identity>> = OnceLock::new();
    IDENTITY
        .get_or_init(|| {
            let pid = std::process::id();
            Some(Identity {
                boot: std::fs::read_to_string("/proc/sys/kernel/random/boot_id").ok()?.trim().to_string(),
                pid_namespace: std::fs::read_link("/proc/self/ns/pid").ok()?.to_string_lossy().into_owned(),
                pid,
                start: start_time(pid)?,
            })
        })
        .as_ref()
}

/// This process, as a lease records it (`{}` where it cannot be told).
pub fn this_process() -> Document {
    match this_identity() {
        Some(i) => doc! {
            "boot": &i.boot, "pidNamespace": &i.pid_namespace, "pid": i.pid as i64, "start": i.start as i64,
        },
        None => Document::new(),
    }
}

/// Whether the process a lease names is certainly dead (see the module doc).
pub fn is_dead(holder: &Document) -> bool {
    let Some(me) = this_identity() else { return false };
    let (Ok(boot), Ok(namespace), Ok(pid), Ok(start)) =
        (holder.get_str("boot"), holder.get_str("pidNamespace"), holder.get_i64("pid"), holder.get_i64("start"))
    else {
        return false;
    };
    if boot != me.boot || namespace != me.pid_namespace {
        return false;
    }
    let Ok(pid) = u32::try_from(pid) else { return false };
    if pid == me.pid {
        // This very process: alive, unless it is a restart that got the same pid.
        return start as u64 != me.start;
    }
    start_time(pid) != Some(start as u64)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn this_process_is_alive_and_a_gone_or_reused_pid_is_dead() {
        let me = this_process();
        if me.is_empty() {
            return; // no /proc here: nothing can be declared dead, which is the safe answer
        }
        assert!(!is_dead(&me));
        let mut reused = me.clone();
        reused.insert("start", me.get_i64("start").unwrap() + 1);
        assert!(is_dead(&reused), "same pid, another start time: a restart that got the pid");
        let mut gone = me.clone();
        gone.insert("pid", 4_194_303i64); // above Linux's pid_max default: no such process
        assert!(is_dead(&gone));
        let mut elsewhere = gone.clone();
        elsewhere.insert("pidNamespace", "pid:[1]");
        assert!(!is_dead(&elsewhere), "another PID namespace cannot be checked: alive");
        let mut other_boot = gone.clone();
        other_boot.insert("boot", "another machine");
        assert!(!is_dead(&other_boot));
        assert!(!is_dead(&Document::new()), "a lease from before holders were recorded: alive");
    }
}
