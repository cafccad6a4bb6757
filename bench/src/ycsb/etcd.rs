//! etcd as the YCSB yardstick: a 3-member etcd 3.4 cluster on loopback started and
//! stopped by the bench (`--etcd local`, Debian's `etcd-server`), or given endpoints.

use std::path::Path;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use anyhow::Context;

/// A 3-member etcd cluster this process started; stopped (SIGTERM, then SIGKILL) on drop.
pub struct LocalEtcd {
    members: Vec<Child>,
    pub endpoints: Vec<String>,
    _dir: tempfile::TempDir,
}

fn free_port() -> anyhow::Result<u16> {
    Ok(std::net::TcpListener::bind("127.0.0.1:0")?
        .local_addr()?
        .port())
}

/// Why a local cluster did not come up: a member exited (worth another try on new
/// ports), or none served in time.
enum NotReady {
    Exited(String),
    Timeout(String),
}

impl LocalEtcd {
    /// Starts 3 members (fsync on, as etcd always does) and waits until they serve.
    /// A member that exits before the cluster serves (most often: one of the ports
    /// `free_port` chose was taken before etcd bound it) starts a new cluster on new
    /// ports, up to `ATTEMPTS` times.
    pub async fn start() -> anyhow::Result<LocalEtcd> {
        const ATTEMPTS: usize = 3;
        let mut attempt = 1;
        loop {
            let mut etcd = LocalEtcd::spawn()?;
            match etcd.wait_ready(Duration::from_secs(30)).await {
                Ok(()) => return Ok(etcd),
                Err(NotReady::Exited(why)) if attempt < ATTEMPTS => {
                    eprintln!("local etcd did not start (attempt {attempt}), retrying on new ports: {why}");
                    attempt += 1;
                }
                Err(NotReady::Exited(why) | NotReady::Timeout(why)) => anyhow::bail!(why),
            }
        }
    }

    fn spawn() -> anyhow::Result<LocalEtcd> {
        let dir = tempfile::Builder::new().prefix("rangekv-etcd").tempdir()?;
        let ports: Vec<(u16, u16)> = (0..3)
            .map(|_| Ok((free_port()?, free_port()?)))
            .collect::<anyhow::Result<_>>()?;
        let cluster: Vec<String> = ports
            .iter()
            .enumerate()
            .map(|(i, (_, peer))| format!("e{i}=http://127.0.0.1:{peer}"))
            .collect();
        let mut members = Vec::new();
        let mut endpoints = Vec::new();
        for (i, (client, peer)) in ports.iter().enumerate() {
            let log = std::fs::File::create(dir.path().join(format!("e{i}.log")))?;
            let child = Command::new("etcd")
                .args([
                    "--name",
                    &format!("e{i}"),
                    "--data-dir",
                    &dir.path().join(format!("e{i}")).display().to_string(),
                    "--listen-client-urls",
                    &format!("http://127.0.0.1:{client}"),
                    "--advertise-client-urls",
                    &format!("http://127.0.0.1:{client}"),
                    "--listen-peer-urls",
                    &format!("http://127.0.0.1:{peer}"),
                    "--initial-advertise-peer-urls",
                    &format!("http://127.0.0.1:{peer}"),
                    "--initial-cluster",
                    &cluster.join(","),
                    "--initial-cluster-state",
                    "new",
                    "--initial-cluster-token",
                    "rangekv-bench",
                    "--quota-backend-bytes",
                    "8589934592",
                ])
                .stdin(Stdio::null())
                .stdout(log.try_clone()?)
                .stderr(log)
                .spawn()
                .context(
                    "cannot start etcd (Debian: apt-get install etcd-server; `make deps` does)",
                )?;
            members.push(child);
            endpoints.push(format!("http://127.0.0.1:{client}"));
        }
        Ok(LocalEtcd {
            members,
            endpoints,
            _dir: dir,
        })
    }

    /// Waits until a put succeeds. A member that exits ends the wait at once; either
    /// failure carries the members' last log lines.
    async fn wait_ready(&mut self, patience: Duration) -> Result<(), NotReady> {
        let give_up = Instant::now() + patience;
        loop {
            if let Ok(mut client) = etcd_client::Client::connect(&self.endpoints, None).await {
                if client.put("rangekv-bench-ready", "1", None).await.is_ok() {
                    return Ok(());
                }
            }
            for (i, member) in self.members.iter_mut().enumerate() {
                if let Ok(Some(status)) = member.try_wait() {
                    return Err(NotReady::Exited(format!(
                        "etcd member e{i} exited ({status}) before the cluster served\n{}",
                        self.log_tails()
                    )));
                }
            }
            if Instant::now() >= give_up {
                return Err(NotReady::Timeout(format!(
                    "etcd did not serve within {patience:?}\n{}",
                    self.log_tails()
                )));
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    }

    /// The last lines of each member's log, for an error message.
    fn log_tails(&self) -> String {
        const LINES: usize = 5;
        (0..self.members.len())
            .map(|i| {
                let path = self._dir.path().join(format!("e{i}.log"));
                let text = std::fs::read_to_string(&path).unwrap_or_default();
                let lines: Vec<&str> = text.lines().collect();
                let tail = lines[lines.len().saturating_sub(LINES)..].join("\n");
                format!("--- {}:\n{tail}", path.display())
            })
            .collect::<Vec<_>>()
            .join("\n")
    }

    pub fn log_dir(&self) -> &Path {
        self._dir.path()
    }
}

impl Drop for LocalEtcd {
    fn drop(&mut self) {
        for member in &mut self.members {
            if let Ok(pid) = i32::try_from(member.id()) {
                // SAFETY: kill(2) on a child this process started and has not reaped.
                unsafe {
                    libc::kill(pid, libc::SIGTERM);
                }
            }
        }
        let give_up = Instant::now() + Duration::from_secs(10);
        for member in &mut self.members {
            while matches!(member.try_wait(), Ok(None)) && Instant::now() < give_up {
                std::thread::sleep(Duration::from_millis(20));
            }
            let _ = member.kill();
            let _ = member.wait();
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A member that exits ends the wait at once (not after the whole patience), and
    /// the error carries its log: what `start` retries on new ports.
    #[tokio::test]
    async fn a_member_that_exits_ends_the_wait_with_its_log() {
        let dir = tempfile::tempdir().unwrap();
        let log = std::fs::File::create(dir.path().join("e0.log")).unwrap();
        let member = Command::new("sh")
            .args([
                "-c",
                "echo 'listen tcp: address already in use' >&2; exit 1",
            ])
            .stdout(log.try_clone().unwrap())
            .stderr(log)
            .spawn()
            .unwrap();
        let port = free_port().unwrap();
        let mut etcd = LocalEtcd {
            members: vec![member],
            endpoints: vec![format!("http://127.0.0.1:{port}")],
            _dir: dir,
        };
        let started = Instant::now();
        let Err(NotReady::Exited(why)) = etcd.wait_ready(Duration::from_secs(120)).await else {
            panic!("an exited member must end the wait as Exited");
        };
        assert!(started.elapsed() < Duration::from_secs(60), "{why}");
        assert!(why.contains("e0 exited"), "{why}");
        assert!(why.contains("address already in use"), "{why}");
    }
}
