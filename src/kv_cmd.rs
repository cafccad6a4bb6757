//! `rangekv kv` (read and write keys) and `rangekv ctl` (show the cluster).
//!
//! Exit status: 0 success, 1 error, 2 bad usage, 3 key not found (`get`),
//! 4 compare-and-swap not applied (the current value differs).
//!
//! Each invocation is one client session: a write it has to resend (its leader died,
//! no answer in time) applies once (see `rangekv_client`'s "Exactly-once writes").

use std::io::{Read, Write};
use std::path::PathBuf;
use std::process::ExitCode;
use std::time::Duration;

use anyhow::Context;
use clap::{Args, Subcommand, ValueEnum};
use rangekv_client::{Client, Config, Mutation};
use rangekv_rpc::proto::{self, kv_client::KvClient, placement_client::PlacementClient};
use serde_json::json;

pub const EXIT_NOT_FOUND: u8 = 3;
pub const EXIT_CAS_FAILED: u8 = 4;

#[derive(Debug, Clone, Copy, ValueEnum)]
pub enum Format {
    /// Values as raw bytes (`get`), tab-separated pairs (`scan`), tables (`ctl`).
    Text,
    Json,
    /// Keys and values in hexadecimal.
    Hex,
}

#[derive(Debug, Clone, Copy, ValueEnum)]
pub enum Input {
    /// Keys and values as given.
    Text,
    /// Keys and values given in hexadecimal.
    Hex,
}

#[derive(Debug, Args)]
pub struct KvArgs {
    /// Placement driver endpoint(s), comma-separated.
    #[arg(long, default_value = "http://127.0.0.1:2379", value_delimiter = ',')]
    pub pd: Vec<String>,
    #[arg(long, value_enum, default_value = "text")]
    pub format: Format,
    /// How keys and values on the command line are written.
    #[arg(long, value_enum, default_value = "text")]
    pub input: Input,
    /// Deadline of each operation, retries included (a write resent after an unknown
    /// outcome still applies at most once).
    #[arg(long, default_value_t = 10)]
    pub timeout_secs: u64,
    #[command(subcommand)]
    pub command: KvCommand,
}

#[derive(Debug, Subcommand)]
pub enum KvCommand {
    /// Print the value of KEY (exit 3 when absent).
    Get { key: String },
    /// Set KEY to VALUE; without VALUE (or with "-"), the value is read from stdin.
    Put {
        key: String,
        value: Option<String>,
        /// Read the value from this file.
        #[arg(long, conflicts_with = "value")]
        value_file: Option<PathBuf>,
    },
    /// Delete KEY.
    Del { key: String },
    /// Keys in [START, END) in order, across ranges (END omitted: to the end).
    Scan {
        start: String,
        end: Option<String>,
        #[arg(long, default_value_t = 100)]
        limit: usize,
    },
    /// Set KEY to NEW (or delete it) only if its value is EXPECTED (or it is absent);
    /// exit 4 when it is not.
    Cas {
        key: String,
        #[arg(
            long,
            conflicts_with = "expect_absent",
            required_unless_present = "expect_absent"
        )]
        expect: Option<String>,
        #[arg(long)]
        expect_absent: bool,
        #[arg(long, conflicts_with = "delete", required_unless_present = "delete")]
        new: Option<String>,
        #[arg(long)]
        delete: bool,
    },
    /// Apply lines `put KEY VALUE` / `del KEY` from FILE (or stdin), atomically per range.
    Batch {
        #[arg(long)]
        file: Option<PathBuf>,
    },
}

fn decode(input: Input, text: &str, what: &str) -> anyhow::Result<Vec<u8>> {
    match input {
        Input::Text => Ok(text.as_bytes().to_vec()),
        Input::Hex => hex_decode(text).with_context(|| format!("{what} is not hexadecimal")),
    }
}

fn hex_decode(text: &str) -> anyhow::Result<Vec<u8>> {
    anyhow::ensure!(text.len() % 2 == 0, "odd number of digits");
    (0..text.len())
        .step_by(2)
        .map(|i| {
            text.get(i..i + 2)
                .and_then(|pair| u8::from_str_radix(pair, 16).ok())
                .ok_or_else(|| anyhow::anyhow!("not a hex digit pair at {i}"))
        })
        .collect()
}

fn hex(bytes: &[u8]) -> String {
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}

/// A JSON value for bytes: a string when they are UTF-8, else `{"hex": ...}`.
fn json_bytes(bytes: &[u8]) -> serde_json::Value {
    match std::str::from_utf8(bytes) {
        Ok(text) => json!(text),
        Err(_) => json!({ "hex": hex(bytes) }),
    }
}

/// Bytes shown on one line of text: printable ASCII as is, the rest escaped.
pub fn printable(bytes: &[u8]) -> String {
    bytes
        .iter()
        .flat_map(|b| std::ascii::escape_default(*b))
        .map(char::from)
        .collect()
}

fn read_value(
    value: Option<String>,
    file: Option<PathBuf>,
    input: Input,
) -> anyhow::Result<Vec<u8>> {
    if let Some(path) = file {
        return std::fs::read(&path).with_context(|| format!("cannot read {}", path.display()));
    }
    match value.as_deref() {
        Some("-") | None => {
            let mut bytes = Vec::new();
            std::io::stdin().read_to_end(&mut bytes)?;
            Ok(bytes)
        }
        Some(text) => decode(input, text, "the value"),
    }
}

fn parse_batch(text: &str, input: Input) -> anyhow::Result<Vec<Mutation>> {
    let mut out = Vec::new();
    for (n, line) in text.lines().enumerate() {
        let line = line.trim();
        if line.is_empty() || line.starts_with('#') {
            continue;
        }
        let mut parts = line.splitn(3, ' ');
        let op = parts.next().unwrap_or_default();
        let key = parts.next().context(format!("line {}: no key", n + 1))?;
        let key = decode(input, key, "the key")?;
        match op {
            "put" => {
                let value = parts
                    .next()
                    .context(format!("line {}: put without a value", n + 1))?;
                out.push(Mutation::Put(key, decode(input, value, "the value")?));
            }
            "del" => out.push(Mutation::Delete(key)),
            other => anyhow::bail!("line {}: unknown operation {other:?} (put or del)", n + 1),
        }
    }
    Ok(out)
}

fn print_value(format: Format, key: &[u8], value: &[u8]) -> anyhow::Result<()> {
    let mut out = std::io::stdout().lock();
    match format {
        Format::Text => {
            out.write_all(value)?;
            out.write_all(b"\n")?;
        }
        Format::Hex => writeln!(out, "{}", hex(value))?,
        Format::Json => writeln!(
            out,
            "{}",
            json!({ "key": json_bytes(key), "value": json_bytes(value) })
        )?,
    }
    Ok(())
}

fn print_ok(format: Format) {
    match format {
        Format::Json => println!("{}", json!({ "ok": true })),
        _ => println!("OK"),
    }
}

pub async fn run_kv(args: KvArgs) -> anyhow::Result<ExitCode> {
    let config = Config {
        timeout: Duration::from_secs(args.timeout_secs.max(1)),
        ..Config::default()
    };
    let endpoints: Vec<&str> = args.pd.iter().map(String::as_str).collect();
    let client = Client::connect(&endpoints, config).await?;
    let (format, input) = (args.format, args.input);
    match args.command {
        KvCommand::Get { key } => {
            let key = decode(input, &key, "the key")?;
            match client.get(&key).await? {
                Some(value) => print_value(format, &key, &value)?,
                None => {
                    if let Format::Json = format {
                        println!("{}", json!({ "key": json_bytes(&key), "found": false }));
                    } else {
                        eprintln!("not found: {}", printable(&key));
                    }
                    return Ok(ExitCode::from(EXIT_NOT_FOUND));
                }
            }
        }
        KvCommand::Put {
            key,
            value,
            value_file,
        } => {
            let key = decode(input, &key, "the key")?;
            let value = read_value(value, value_file, input)?;
            client.put(&key, &value).await?;
            print_ok(format);
        }
        KvCommand::Del { key } => {
            client.delete(&decode(input, &key, "the key")?).await?;
            print_ok(format);
        }
        KvCommand::Scan { start, end, limit } => {
            let start = decode(input, &start, "the start key")?;
            let end = match end {
                Some(end) => decode(input, &end, "the end key")?,
                None => Vec::new(),
            };
            let mut rows = Vec::new();
            let mut out = std::io::stdout().lock();
            let mut failed = None;
            client
                .scan_each(&start, &end, limit, |key, value| {
                    let written = match format {
                        Format::Text => writeln!(out, "{}\t{}", printable(&key), printable(&value)),
                        Format::Hex => writeln!(out, "{}\t{}", hex(&key), hex(&value)),
                        Format::Json => {
                            rows.push(
                                json!({ "key": json_bytes(&key), "value": json_bytes(&value) }),
                            );
                            Ok(())
                        }
                    };
                    if let Err(error) = written {
                        failed.get_or_insert(error);
                    }
                })
                .await?;
            if let Some(error) = failed {
                return Err(error.into());
            }
            if let Format::Json = format {
                writeln!(out, "{}", serde_json::Value::Array(rows))?;
            }
        }
        KvCommand::Cas {
            key,
            expect,
            expect_absent: _,
            new,
            delete: _,
        } => {
            let key = decode(input, &key, "the key")?;
            let expected = expect.map(|e| decode(input, &e, "--expect")).transpose()?;
            let new = new.map(|n| decode(input, &n, "--new")).transpose()?;
            let outcome = client
                .compare_and_swap(&key, expected.as_deref(), new.as_deref())
                .await?;
            match format {
                Format::Json => println!(
                    "{}",
                    json!({
                        "succeeded": outcome.succeeded,
                        "previous": outcome.previous.as_deref().map(json_bytes),
                    })
                ),
                _ if outcome.succeeded => println!("applied"),
                _ => println!(
                    "not applied: current value is {}",
                    outcome
                        .previous
                        .as_deref()
                        .map_or("absent".to_string(), |v| match format {
                            Format::Hex => hex(v),
                            _ => printable(v),
                        })
                ),
            }
            if !outcome.succeeded {
                return Ok(ExitCode::from(EXIT_CAS_FAILED));
            }
        }
        KvCommand::Batch { file } => {
            let text = match file {
                Some(path) => std::fs::read_to_string(&path)
                    .with_context(|| format!("cannot read {}", path.display()))?,
                None => {
                    let mut text = String::new();
                    std::io::stdin().read_to_string(&mut text)?;
                    text
                }
            };
            let mutations = parse_batch(&text, input)?;
            let count = mutations.len();
            client.batch_put(mutations).await?;
            match format {
                Format::Json => println!("{}", json!({ "ok": true, "mutations": count })),
                _ => println!("OK ({count} mutations)"),
            }
        }
    }
    Ok(ExitCode::SUCCESS)
}

#[derive(Debug, Args)]
pub struct CtlArgs {
    /// Placement driver endpoint.
    #[arg(long, default_value = "http://127.0.0.1:2379")]
    pub pd: String,
    #[arg(long, value_enum, default_value = "text")]
    pub format: Format,
    #[command(subcommand)]
    pub command: CtlCommand,
}

#[derive(Debug, Subcommand)]
pub enum CtlCommand {
    /// Every store: address, state, range and leader counts, last heartbeat.
    Stores,
    /// Every range: span, epoch, replicas, leader.
    Ranges,
    /// The range holding KEY.
    Range { key: String },
    /// The leader of range RANGE_ID.
    Leader { range_id: u64 },
    /// Hand the leadership of range RANGE_ID to its replica on store STORE_ID (a
    /// voter); waits until PD sees the new leader.
    TransferLeader {
        range_id: u64,
        store_id: u64,
        /// Seconds to wait for PD to report the new leader.
        #[arg(long, default_value_t = 10)]
        wait_secs: u64,
    },
}

/// Prints rows as columns aligned under `header`.
fn table(header: &[&str], rows: Vec<Vec<String>>) {
    let mut widths: Vec<usize> = header.iter().map(|h| h.len()).collect();
    for row in &rows {
        for (i, cell) in row.iter().enumerate() {
            widths[i] = widths[i].max(cell.chars().count());
        }
    }
    let line = |cells: Vec<String>| {
        let padded: Vec<String> = cells
            .iter()
            .enumerate()
            .map(|(i, c)| format!("{c:<width$}", width = widths[i]))
            .collect();
        println!("{}", padded.join("  ").trim_end());
    };
    line(header.iter().map(|h| h.to_string()).collect());
    for row in rows {
        line(row);
    }
}

/// A replica's role as `ctl` names it (JSON `role`).
fn role_name(role: i32) -> &'static str {
    match proto::PeerRole::try_from(role) {
        Ok(proto::PeerRole::Voter) => "voter",
        Ok(proto::PeerRole::Learner) => "learner",
        Ok(proto::PeerRole::IncomingVoter) => "incoming_voter",
        Ok(proto::PeerRole::DemotingVoter) => "demoting_voter",
        Err(_) => "unknown",
    }
}

fn peer_label(peer: &proto::Peer) -> String {
    let role = match role_name(peer.role) {
        "voter" => String::new(),
        other => format!(" ({})", other.replace('_', " ")),
    };
    format!("{}@s{}{role}", peer.peer_id, peer.store_id)
}

fn route_row(route: &proto::RangeRoute) -> Vec<String> {
    let Some(range) = &route.range else {
        return vec!["?".into(); 6];
    };
    let epoch = range.epoch.unwrap_or_default();
    vec![
        range.range_id.to_string(),
        if range.start_key.is_empty() {
            "-inf".into()
        } else {
            printable(&range.start_key)
        },
        if range.end_key.is_empty() {
            "+inf".into()
        } else {
            printable(&range.end_key)
        },
        format!("{}/{}", epoch.conf_ver, epoch.version),
        range
            .replicas
            .iter()
            .map(peer_label)
            .collect::<Vec<_>>()
            .join(","),
        route.leader.as_ref().map_or("-".into(), peer_label),
    ]
}

fn route_json(route: &proto::RangeRoute) -> serde_json::Value {
    let range = route.range.clone().unwrap_or_default();
    let epoch = range.epoch.unwrap_or_default();
    json!({
        "range_id": range.range_id,
        "start_key": json_bytes(&range.start_key),
        "end_key": json_bytes(&range.end_key),
        "epoch": { "conf_ver": epoch.conf_ver, "version": epoch.version },
        "replicas": range.replicas.iter().map(|p| json!({"peer_id": p.peer_id, "store_id": p.store_id, "role": role_name(p.role)})).collect::<Vec<_>>(),
        "leader": route.leader.as_ref().map(|p| json!({"peer_id": p.peer_id, "store_id": p.store_id})),
    })
}

const RANGE_HEADER: [&str; 6] = ["RANGE", "START", "END", "EPOCH", "REPLICAS", "LEADER"];

fn print_routes(format: Format, routes: &[proto::RangeRoute]) {
    match format {
        Format::Json => println!(
            "{}",
            serde_json::Value::Array(routes.iter().map(route_json).collect())
        ),
        _ => table(&RANGE_HEADER, routes.iter().map(route_row).collect()),
    }
}

pub async fn run_ctl(args: CtlArgs) -> anyhow::Result<ExitCode> {
    let mut pd = PlacementClient::connect(args.pd.clone())
        .await
        .with_context(|| format!("cannot reach PD at {}", args.pd))?;
    match args.command {
        CtlCommand::Stores => {
            let stores = pd
                .list_stores(proto::ListStoresRequest {})
                .await?
                .into_inner()
                .stores;
            let now_ms = std::time::SystemTime::now()
                .duration_since(std::time::UNIX_EPOCH)
                .map(|d| d.as_millis() as u64)
                .unwrap_or(0);
            match args.format {
                Format::Json => println!(
                    "{}",
                    serde_json::Value::Array(
                        stores
                            .iter()
                            .map(|s| json!({
                                "store_id": s.store_id,
                                "address": s.address,
                                "state": if s.state == proto::StoreState::Down as i32 { "down" } else { "up" },
                                "ranges": s.range_count,
                                "leaders": s.leader_count,
                                "last_heartbeat_unix_ms": s.last_heartbeat_unix_ms,
                            }))
                            .collect()
                    )
                ),
                _ => table(
                    &["STORE", "ADDRESS", "STATE", "RANGES", "LEADERS", "LAST HEARTBEAT"],
                    stores
                        .iter()
                        .map(|s| {
                            vec![
                                s.store_id.to_string(),
                                s.address.clone(),
                                if s.state == proto::StoreState::Down as i32 { "down" } else { "up" }.into(),
                                s.range_count.to_string(),
                                s.leader_count.to_string(),
                                if s.last_heartbeat_unix_ms == 0 {
                                    "never".into()
                                } else {
                                    format!("{:.1}s ago", now_ms.saturating_sub(s.last_heartbeat_unix_ms) as f64 / 1e3)
                                },
                            ]
                        })
                        .collect(),
                ),
            }
        }
        CtlCommand::Ranges => {
            let routes = pd
                .scan_ranges(proto::ScanRangesRequest::default())
                .await?
                .into_inner()
                .routes;
            print_routes(args.format, &routes);
        }
        CtlCommand::Range { key } => {
            let route = pd
                .get_range(proto::GetRangeRequest {
                    key: key.into_bytes().into(),
                })
                .await?
                .into_inner()
                .route
                .context("PD returned no range")?;
            print_routes(args.format, &[route]);
        }
        CtlCommand::Leader { range_id } => {
            let route = pd
                .get_range_by_id(proto::GetRangeByIdRequest { range_id })
                .await?
                .into_inner()
                .route
                .context("PD returned no range")?;
            let Some(leader) = route.leader else {
                eprintln!("range {range_id} has no known leader");
                return Ok(ExitCode::from(EXIT_NOT_FOUND));
            };
            let store = pd
                .get_store(proto::GetStoreRequest {
                    store_id: leader.store_id,
                })
                .await?
                .into_inner()
                .store
                .context("PD does not know the leader's store")?;
            match args.format {
                Format::Json => println!(
                    "{}",
                    json!({"range_id": range_id, "peer_id": leader.peer_id, "store_id": leader.store_id, "address": store.address})
                ),
                _ => println!(
                    "{} (peer {} on store {})",
                    store.address, leader.peer_id, leader.store_id
                ),
            }
        }
        CtlCommand::TransferLeader {
            range_id,
            store_id,
            wait_secs,
        } => {
            transfer_leader(&mut pd, args.format, range_id, store_id, wait_secs).await?;
        }
    }
    Ok(ExitCode::SUCCESS)
}

/// The route of `range_id` as PD knows it.
async fn route_of(
    pd: &mut PlacementClient<tonic::transport::Channel>,
    range_id: u64,
) -> anyhow::Result<proto::RangeRoute> {
    pd.get_range_by_id(proto::GetRangeByIdRequest { range_id })
        .await?
        .into_inner()
        .route
        .with_context(|| format!("PD knows no range {range_id}"))
}

/// `ctl transfer-leader`: asks the range's leader to hand over to `to_store`, then
/// waits for PD to report the new leader, asking again every 2 s meanwhile (raft
/// abandons a transfer to a follower that does not catch up within an election
/// timeout, and the leader may have moved).
async fn transfer_leader(
    pd: &mut PlacementClient<tonic::transport::Channel>,
    format: Format,
    range_id: u64,
    to_store: u64,
    wait_secs: u64,
) -> anyhow::Result<()> {
    let route = route_of(pd, range_id).await?;
    let range = route.range.clone().unwrap_or_default();
    anyhow::ensure!(
        range.replicas.iter().any(|p| p.store_id == to_store),
        "store {to_store} holds no replica of range {range_id}"
    );
    let give_up = tokio::time::Instant::now() + Duration::from_secs(wait_secs);
    let mut asked_at: Option<tokio::time::Instant> = None;
    loop {
        let route = route_of(pd, range_id).await?;
        let leader = route.leader.as_ref().map(|l| l.store_id);
        if leader == Some(to_store) {
            break;
        }
        anyhow::ensure!(
            tokio::time::Instant::now() < give_up,
            "the leadership of range {range_id} did not reach store {to_store} within {wait_secs} s (leader now: {})",
            leader.map_or("none known".to_string(), |s| format!("store {s}"))
        );
        let due = asked_at.is_none_or(|at| at.elapsed() >= Duration::from_secs(2));
        if let (Some(leader), true) = (leader, due) {
            asked_at = Some(tokio::time::Instant::now());
            let range = route.range.unwrap_or_default();
            ask_transfer(pd, leader, range_id, range.epoch, to_store).await?;
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    match format {
        Format::Json => println!(
            "{}",
            json!({"range_id": range_id, "leader_store_id": to_store})
        ),
        _ => println!("range {range_id} is led by store {to_store}"),
    }
    Ok(())
}

/// Asks the store `leader` (the range's leader, as PD knows it) to hand range
/// `range_id` to `to_store`. A refusal that is not about the request itself (no
/// longer the leader) leaves the caller to ask again.
async fn ask_transfer(
    pd: &mut PlacementClient<tonic::transport::Channel>,
    leader: u64,
    range_id: u64,
    epoch: Option<proto::RangeEpoch>,
    to_store: u64,
) -> anyhow::Result<()> {
    let address = pd
        .get_store(proto::GetStoreRequest { store_id: leader })
        .await?
        .into_inner()
        .store
        .context("PD does not know the leader's store")?
        .address;
    let Ok(mut node) = KvClient::connect(format!("http://{address}")).await else {
        return Ok(());
    };
    let request = proto::TransferLeaderRequest {
        header: Some(proto::RequestHeader {
            range_id,
            epoch,
            ..Default::default()
        }),
        to_store_id: to_store,
    };
    match node.transfer_leader(request).await {
        Err(status) if status.code() == tonic::Code::InvalidArgument => {
            anyhow::bail!("{}", status.message())
        }
        // Not the leader any more, unreachable, busy: asked again with a fresh route.
        Err(_) => Ok(()),
        Ok(_) => Ok(()),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn hex_round_trips_and_rejects_garbage() {
        assert_eq!(hex_decode(&hex(b"\x00\xffab")).unwrap(), b"\x00\xffab");
        assert!(hex_decode("abc").is_err());
        assert!(hex_decode("zz").is_err());
    }

    #[test]
    fn batch_lines_parse_and_bad_ones_name_their_line() {
        let batch = parse_batch(
            "# comment\nput a 1\n\ndel b\nput c two words\n",
            Input::Text,
        )
        .unwrap();
        assert_eq!(
            batch,
            vec![
                Mutation::Put(b"a".to_vec(), b"1".to_vec()),
                Mutation::Delete(b"b".to_vec()),
                Mutation::Put(b"c".to_vec(), b"two words".to_vec()),
            ]
        );
        let error = parse_batch("put a 1\nmove b\n", Input::Text).unwrap_err();
        assert!(error.to_string().contains("line 2"), "{error}");
        assert!(parse_batch("put a\n", Input::Text).is_err());
    }

    #[test]
    fn binary_shows_escaped_in_text_and_as_hex_in_json() {
        assert_eq!(printable(b"a\x00b"), "a\\x00b");
        assert_eq!(json_bytes(b"ok"), json!("ok"));
        assert_eq!(json_bytes(b"\xff"), json!({"hex": "ff"}));
    }
}
