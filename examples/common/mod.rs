//! What the benchmarks share: starting a release `roster serve` on fresh databases,
//! percentiles, the machine line, and writing one section of `docs/benchmarks.md`.

#![allow(dead_code)] // each benchmark uses a different part

use std::process::{Child, Command, Stdio};
use std::time::Duration;

pub struct Server {
    pub child: Child,
    pub base: String,
}

impl Drop for Server {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

impl Server {
    /// Starts the `roster` built beside this benchmark.
    pub fn start(mode: &str, tag: &str, extra: &[(&str, &str)]) -> Server {
        let exe = std::env::current_exe().unwrap();
        let bin = exe.parent().unwrap().parent().unwrap().join("roster");
        Server::start_binary(bin, mode, tag, extra)
    }

    /// Starts the `roster` binary at `bin` (another build, to compare).
    pub fn start_binary(bin: impl AsRef<std::path::Path>, mode: &str, tag: &str, extra: &[(&str, &str)]) -> Server {
        let bin = bin.as_ref();
        let port = std::net::TcpListener::bind("127.0.0.1:0").unwrap().local_addr().unwrap().port();
        let db = format!("bench_{tag}_{}", std::process::id());
        let mut child = Command::new(bin)
            .arg("serve")
            .env("ROSTER_LISTEN", format!("127.0.0.1:{port}"))
            .env("ROSTER_MONGO_DATABASE", &db)
            .env("ROSTER_CLICKHOUSE_DATABASE", &db)
            .env("ROSTER_GROUP_MEMBERS", mode)
            .env("ROSTER_FHIR_MAX_PATCH_OPS", "100000")
            .env("ROSTER_BODY_LIMIT_BYTES", "1073741824")
            .env("ROSTER_LOG", std::env::var("BENCH_SERVER_LOG").unwrap_or_else(|_| "warn".into()))
            .envs(extra.iter().copied())
            .stdout(Stdio::null())
            .stderr(Stdio::inherit())
            .spawn()
            .unwrap_or_else(|e| panic!("cannot start {}: {e}", bin.display()));
        let base = format!("http://127.0.0.1:{port}");
        for _ in 0..600 {
            if std::net::TcpStream::connect(("127.0.0.1", port)).is_ok() {
                return Server { child, base };
            }
            std::thread::sleep(Duration::from_millis(100));
        }
        let _ = child.kill();
        let _ = child.wait();
        panic!("{mode} server did not start");
    }
}

/// Resident memory of a process, in KiB (0 when unreadable).
pub fn rss_kib(pid: u32) -> u64 {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap_or_default();
    status
        .lines()
        .find(|l| l.starts_with("VmRSS:"))
        .and_then(|l| l.split_whitespace().nth(1))
        .and_then(|v| v.parse().ok())
        .unwrap_or(0)
}

pub fn ms(d: Duration) -> f64 {
    d.as_secs_f64() * 1000.0
}

pub fn pct(samples: &mut [Duration], p: f64) -> f64 {
    samples.sort();
    let i = ((samples.len() as f64 - 1.0) * p).round() as usize;
    ms(samples[i])
}

pub fn machine() -> String {
    let cpu = std::fs::read_to_string("/proc/cpuinfo")
        .ok()
        .and_then(|s| {
            s.lines()
                .find(|l| l.starts_with("model name"))
                .map(|l| l.split(':').nth(1).unwrap_or("").trim().to_string())
        })
        .unwrap_or_else(|| "unknown CPU".into());
    let mem = std::fs::read_to_string("/proc/meminfo")
        .ok()
        .and_then(|s| s.lines().next().and_then(|l| l.split_whitespace().nth(1)).and_then(|k| k.parse::<u64>().ok()))
        .map(|k| format!("{:.0} GiB", k as f64 / 1024.0 / 1024.0))
        .unwrap_or_default();
    format!("{} cores ({cpu}), {mem} RAM", std::thread::available_parallelism().map(|n| n.get()).unwrap_or(0))
}

/// Replaces the section of `path` between `<!-- bench:{name} -->` and
/// `<!-- /bench:{name} -->` with `body` (appending the section when it is missing), so
/// each benchmark rewrites only its own rows.
pub fn write_section(path: &str, name: &str, body: &str) {
    let (open, close) = (format!("<!-- bench:{name} -->"), format!("<!-- /bench:{name} -->"));
    let old = std::fs::read_to_string(path).unwrap_or_else(|_| "# Benchmarks\n".into());
    let section = format!("{open}\n{}\n{close}", body.trim_end());
    let new = match (old.find(&open), old.find(&close)) {
        (Some(a), Some(b)) if a < b => format!("{}{section}{}", &old[..a], &old[b + close.len()..]),
        _ => format!("{}\n\n{section}\n", old.trim_end()),
    };
    std::fs::create_dir_all(std::path::Path::new(path).parent().unwrap()).ok();
    std::fs::write(path, new).unwrap();
}
