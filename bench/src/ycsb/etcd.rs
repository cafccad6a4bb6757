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

impl LocalEtcd {
    /// Starts 3 members (fsync on, as etcd always does) and waits until they serve.
    pub async fn start() -> anyhow::Result<LocalEtcd> {
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
        let etcd = LocalEtcd {
            members,
            endpoints,
            _dir: dir,
        };
        etcd.wait_ready(Duration::from_secs(30)).await?;
        Ok(etcd)
    }

    async fn wait_ready(&self, patience: Duration) -> anyhow::Result<()> {
        let give_up = Instant::now() + patience;
        loop {
            if let Ok(mut client) = etcd_client::Client::connect(&self.endpoints, None).await {
                if client.put("rangekv-bench-ready", "1", None).await.is_ok() {
                    return Ok(());
                }
            }
            anyhow::ensure!(
                Instant::now() < give_up,
                "etcd did not serve within {patience:?}"
            );
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
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
