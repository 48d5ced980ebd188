//! `flotilla store snapshot save | status | restore`: backups in the shape of etcdctl's and
//! etcdutl's commands, in Flotilla's own file format (see `flotilla_store::backup`).

use std::io::Write;
use std::path::PathBuf;
use std::time::Duration;

use anyhow::{bail, Context};
use clap::{Args, Subcommand};
use flotilla_proto::etcdserverpb::maintenance_client::MaintenanceClient;
use flotilla_proto::etcdserverpb::SnapshotRequest;
use flotilla_store::backup;

#[derive(Subcommand)]
pub enum SnapshotCommand {
    /// Stream a backup from a member into FILE.
    Save(SaveArgs),
    /// Check a backup file and print its revision, key count, size and hash.
    Status(StatusArgs),
    /// Build a new member's data dir from a backup (same keys, same revisions).
    Restore(RestoreArgs),
}

#[derive(Args)]
pub struct SaveArgs {
    /// Where the backup goes.
    file: PathBuf,
    /// The member to take it from (one client URL).
    #[arg(long, default_value = "http://127.0.0.1:2379")]
    endpoints: String,
    /// Give up if no data arrives for this long.
    #[arg(long, default_value = "30s", value_parser = crate::parse_duration)]
    command_timeout: Duration,
    /// username[:password] when auth is on (a root-role user; asks for the password on
    /// the terminal if it is not given).
    #[arg(long)]
    user: Option<String>,
    /// CA certificate that verifies an https endpoint.
    #[arg(long)]
    cacert: Option<PathBuf>,
    /// Client certificate, for an endpoint that asks for one.
    #[arg(long)]
    cert: Option<PathBuf>,
    /// Client key.
    #[arg(long)]
    key: Option<PathBuf>,
}

#[derive(Args)]
pub struct StatusArgs {
    file: PathBuf,
    /// Output format: table or json.
    #[arg(short = 'w', long = "write-out", default_value = "table")]
    write_out: String,
}

#[derive(Args)]
pub struct RestoreArgs {
    file: PathBuf,
    /// The new member's data directory (must not exist).
    #[arg(long)]
    data_dir: Option<PathBuf>,
    /// The new member's name.
    #[arg(long, default_value = "default")]
    name: String,
    /// The new cluster: name=peer-url,...
    #[arg(long)]
    initial_cluster: Option<String>,
    /// The new cluster's token.
    #[arg(long, default_value = "etcd-cluster")]
    initial_cluster_token: String,
    /// The new member's peer URLs.
    #[arg(long, default_value = "http://localhost:2380")]
    initial_advertise_peer_urls: String,
}

/// A channel to one client URL: plain for http://, rustls for https:// (with `--cacert`,
/// and `--cert`/`--key` when the endpoint asks for a client certificate).
async fn connect(endpoint: &str, a: &SaveArgs) -> anyhow::Result<tonic::transport::Channel> {
    let channel = if endpoint.starts_with("https://") {
        let Some(ca) = &a.cacert else {
            bail!("{endpoint}: an https endpoint needs --cacert");
        };
        let identity = match (&a.cert, &a.key) {
            (Some(c), Some(k)) => Some((c.as_path(), k.as_path())),
            (None, None) => None,
            _ => bail!("--cert and --key go together"),
        };
        let config = flotilla_store::server::tls::client_config(ca, identity)?;
        flotilla_store::server::tls::https_channel(endpoint, config)
            .map_err(|e| anyhow::anyhow!("{endpoint}: {e}"))?
    } else {
        tonic::transport::Endpoint::from_shared(endpoint.to_string())
            .with_context(|| format!("{endpoint:?} is not a URL"))?
            .connect_timeout(Duration::from_secs(5))
            .connect()
            .await
            .with_context(|| format!("cannot connect to {endpoint}"))?
    };
    Ok(channel)
}

/// Logs in as `user` (`name:password`, or `name` and a password typed on the terminal).
async fn authenticate(
    channel: tonic::transport::Channel,
    endpoint: &str,
    user: &str,
) -> anyhow::Result<Option<String>> {
    let (name, password) = match user.split_once(':') {
        Some((n, p)) => (n.to_string(), p.to_string()),
        None => {
            eprint!("Password: ");
            let mut line = String::new();
            std::io::stdin()
                .read_line(&mut line)
                .context("reading the password")?;
            (
                user.to_string(),
                line.trim_end_matches(['\r', '\n']).to_string(),
            )
        }
    };
    let mut auth = flotilla_proto::etcdserverpb::auth_client::AuthClient::new(channel);
    match auth
        .authenticate(flotilla_proto::etcdserverpb::AuthenticateRequest { name, password })
        .await
    {
        Ok(resp) => Ok(Some(resp.into_inner().token)),
        Err(s) if s.message() == "etcdserver: authentication is not enabled" => Ok(None),
        Err(s) => bail!("{endpoint}: {}", s.message()),
    }
}

pub async fn run(cmd: SnapshotCommand) -> anyhow::Result<()> {
    match cmd {
        SnapshotCommand::Save(a) => save(a).await,
        SnapshotCommand::Status(a) => status(a),
        SnapshotCommand::Restore(a) => restore(a),
    }
}

async fn save(a: SaveArgs) -> anyhow::Result<()> {
    let endpoint = a.endpoints.split(',').next().unwrap_or_default().trim();
    if a.endpoints.contains(',') {
        bail!(
            "snapshot must be requested to one selected node, not multiple {:?}",
            a.endpoints
        );
    }
    let channel = connect(endpoint, &a).await?;
    let mut request = tonic::Request::new(SnapshotRequest {});
    if let Some(user) = &a.user {
        // As etcdctl: with auth off there is no token, and the request goes without one.
        if let Some(token) = authenticate(channel.clone(), endpoint, user).await? {
            request.metadata_mut().insert(
                "token",
                token
                    .parse()
                    .context("the endpoint answered an unusable token")?,
            );
        }
    }
    let mut client = MaintenanceClient::new(channel).max_decoding_message_size(16 << 20);
    let mut stream = client
        .snapshot(request)
        .await
        .map_err(|s| anyhow::anyhow!("{endpoint}: {}", s.message()))?
        .into_inner();
    let part = a.file.with_extension("part");
    let mut out = std::io::BufWriter::new(
        std::fs::File::create(&part).with_context(|| format!("creating {}", part.display()))?,
    );
    let mut total = 0u64;
    let mut revision = None;
    loop {
        let msg = match tokio::time::timeout(a.command_timeout, stream.message()).await {
            Err(_) => bail!("no data from {endpoint} for {:?}", a.command_timeout),
            Ok(Err(s)) => bail!("{endpoint}: {}", s.message()),
            Ok(Ok(None)) => break,
            Ok(Ok(Some(m))) => m,
        };
        if revision.is_none() {
            revision = msg.header.as_ref().map(|h| h.revision);
        }
        total += msg.blob.len() as u64;
        out.write_all(&msg.blob)?;
    }
    let file = out.into_inner().map_err(|e| e.into_error())?;
    file.sync_all()?;
    drop(file);
    if let Err(e) = backup::verify(&part) {
        let _ = std::fs::remove_file(&part);
        return Err(e);
    }
    std::fs::rename(&part, &a.file)
        .with_context(|| format!("renaming {} to {}", part.display(), a.file.display()))?;
    eprintln!(
        "fetched snapshot from {endpoint}: {total} bytes at revision {}",
        revision.unwrap_or_default()
    );
    println!("Snapshot saved at {}", a.file.display());
    Ok(())
}

fn human_size(bytes: u64) -> String {
    let units = ["B", "kB", "MB", "GB", "TB"];
    let mut v = bytes as f64;
    let mut u = 0;
    while v >= 1000.0 && u + 1 < units.len() {
        v /= 1000.0;
        u += 1;
    }
    if u == 0 {
        format!("{bytes} B")
    } else {
        format!("{v:.1} {}", units[u])
    }
}

fn status(a: StatusArgs) -> anyhow::Result<()> {
    let s = backup::status(&a.file)?;
    match a.write_out.as_str() {
        "json" => println!("{}", serde_json::to_string(&s)?),
        "table" => {
            let row = [
                format!("{:x}", s.hash),
                s.revision.to_string(),
                s.total_keys.to_string(),
                human_size(s.total_size),
            ];
            let head = ["HASH", "REVISION", "TOTAL KEYS", "TOTAL SIZE"];
            let widths: Vec<usize> = head
                .iter()
                .zip(&row)
                .map(|(h, r)| h.len().max(r.len()) + 2)
                .collect();
            let line: String = widths
                .iter()
                .map(|w| format!("+{}", "-".repeat(*w)))
                .collect::<String>()
                + "+";
            let cells = |cols: &[String]| -> String {
                cols.iter()
                    .zip(&widths)
                    .map(|(c, w)| format!("|{c:^w$}", w = *w))
                    .collect::<String>()
                    + "|"
            };
            println!("{line}");
            println!("{}", cells(&head.map(String::from)));
            println!("{line}");
            println!("{}", cells(&row));
            println!("{line}");
        }
        other => bail!("unsupported output format {other:?} (table or json)"),
    }
    Ok(())
}

fn restore(a: RestoreArgs) -> anyhow::Result<()> {
    let initial_cluster = a
        .initial_cluster
        .unwrap_or_else(|| format!("{}={}", a.name, a.initial_advertise_peer_urls));
    let cluster = flotilla_store::parse_initial_cluster(&initial_cluster)?;
    let Some(urls) = cluster.get(&a.name) else {
        bail!(
            "--initial-cluster has no member named {:?} (--name)",
            a.name
        );
    };
    let advertised: Vec<String> = crate::urls(&a.initial_advertise_peer_urls);
    if *urls != advertised {
        bail!(
            "--initial-cluster has {}={} but --initial-advertise-peer-urls is {}",
            a.name,
            urls.join(","),
            advertised.join(",")
        );
    }
    let data_dir = a
        .data_dir
        .unwrap_or_else(|| PathBuf::from(format!("{}.flotilla", a.name)));
    let header = backup::restore(&a.file, &data_dir)?;
    println!(
        "restored snapshot at revision {} into {}; start the member with --name {} --data-dir {} \
         --initial-cluster {initial_cluster} --initial-cluster-token {} --initial-cluster-state new",
        header.revision,
        data_dir.display(),
        a.name,
        data_dir.display(),
        a.initial_cluster_token,
    );
    Ok(())
}
