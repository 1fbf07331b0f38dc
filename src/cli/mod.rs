//! The `chatvault` command line: `serve`, client commands to try the API from a shell,
//! and offline key maintenance.

mod admin;
mod client;
mod connect;
mod erase;
mod receipt;

use std::net::SocketAddr;
use std::path::PathBuf;
use std::process::ExitCode;

use clap::{Args, Parser, Subcommand};

use crate::config::Config;
use crate::crypto::Algorithm;
use crate::store::Durability;

#[derive(Parser, Debug)]
#[command(name = "chatvault", version, about = "Encrypted chat transcript store with crypto-shredding")]
pub struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand, Debug)]
enum Command {
    /// Run the gRPC server (with no configuration: local folders and a development key).
    Serve(ServerArgs),
    /// Run the stateless router: forwards each data call to the region its API key names.
    Route {
        /// TOML router configuration (see deploy/router.toml).
        #[arg(long, env = "CHATVAULT_ROUTER_CONFIG")]
        config: PathBuf,
        /// Listen address, overriding the configuration's.
        #[arg(long)]
        listen: Option<SocketAddr>,
    },
    /// Ask a server's (or the router's) gRPC health service; exits 0 only when SERVING.
    /// For container HEALTHCHECKs and scripts.
    Health {
        #[arg(long, default_value = "http://127.0.0.1:50051")]
        server: String,
        /// A service name (`chatvault.erasure`, `chatvault.region.eu`); empty: the server.
        #[arg(long, default_value = "")]
        service: String,
        #[command(flatten)]
        tls: connect::TlsArgs,
    },
    /// Check a stopped region's value log and audit trail for damage, changing nothing:
    /// lists each damaged file with its offset (exit status 1), and torn tails apart.
    Check(ServerArgs),
    /// Repair a stopped region that `check` finds damaged: cut each damaged log where it
    /// goes bad (the bytes kept beside it), drop what pointed into the cut, rebuild a lost
    /// index from its log; prints what was lost. A region without damage is not touched.
    Repair(ServerArgs),
    /// Key-store maintenance on a stopped server.
    Keys {
        #[command(subcommand)]
        command: KeysCommand,
    },
    /// Operator commands against the admin listener: tenants, API keys, allowlists, audit.
    Admin(admin::AdminArgs),
    /// Take a consistent online copy of the data directory (never of the key directory),
    /// through the admin listener.
    Backup(admin::BackupArgs),
    /// Put a backup back as the data directory (server stopped), replaying the erasure
    /// ledger into it so that nothing erased since comes back.
    Restore {
        /// The backup directory (`chatvault backup --out`).
        #[arg(long)]
        from: PathBuf,
        #[command(flatten)]
        server: ServerArgs,
    },
    /// An erasure job: shred every subject id in a file, with receipts, resumable.
    Erase(erase::EraseArgs),
    /// Erasure receipts: check one offline, fetch the signing key.
    #[command(subcommand)]
    Receipt(receipt::ReceiptCommand),
    #[command(flatten)]
    Client(client::ClientCommand),
}

#[derive(Subcommand, Debug)]
enum KeysCommand {
    /// Rotate the key-store key now (a running server rotates on SIGHUP instead).
    Rotate(ServerArgs),
}

/// Where the server's configuration comes from; flags override the file.
#[derive(Args, Debug)]
pub struct ServerArgs {
    /// TOML configuration file (see deploy/chatvault.toml).
    #[arg(long, env = "CHATVAULT_CONFIG")]
    config: Option<PathBuf>,
    /// Listen address [default: 127.0.0.1:50051].
    #[arg(long, env = "CHATVAULT_LISTEN")]
    listen: Option<SocketAddr>,
    /// Admin listen address [default: 127.0.0.1:50052].
    #[arg(long, env = "CHATVAULT_ADMIN_LISTEN")]
    admin_listen: Option<SocketAddr>,
    /// Prometheus endpoint address [default: 127.0.0.1:50053].
    #[arg(long, env = "CHATVAULT_METRICS_LISTEN")]
    metrics_listen: Option<SocketAddr>,
    /// The region to serve: with --data-dir/--key-dir, the region those directories are
    /// (a data directory from before regions becomes it); with [regions.*] in the
    /// configuration, the one of them to host [default: eu and us, in
    /// <data-dir>/<region> and <key-dir>/<region>].
    #[arg(long, env = "CHATVAULT_REGION")]
    region: Option<String>,
    /// Data directory [default: ./chatvault-data].
    #[arg(long, env = "CHATVAULT_DATA_DIR")]
    data_dir: Option<PathBuf>,
    /// Key directory [default: ./chatvault-keys].
    #[arg(long, env = "CHATVAULT_KEY_DIR")]
    key_dir: Option<PathBuf>,
    /// Root key file: 32 raw bytes or 64 hex characters, mode 0600.
    #[arg(long, env = "CHATVAULT_ROOT_KEY_FILE")]
    root_key_file: Option<PathBuf>,
    /// fsync (default), flush or none.
    #[arg(long, env = "CHATVAULT_DURABILITY")]
    durability: Option<Durability>,
    /// aes-256-gcm (default) or chacha20-poly1305, for new records.
    #[arg(long, env = "CHATVAULT_CIPHER")]
    cipher: Option<Algorithm>,
    /// The data directory was restored from a backup or rolled back: bring it forward from
    /// the erasure ledger (re-destroy erased keys, revoke keys, accept lost audit records)
    /// instead of refusing to start.
    #[arg(long)]
    replay_erasures: bool,
    /// The value log is damaged where writes were acknowledged (start refused, naming the
    /// file and offset): cut it there, keeping the cut bytes beside it, and lose what they held.
    #[arg(long)]
    accept_damage: bool,
}

impl ServerArgs {
    fn config(&self) -> Result<Config, String> {
        let mut cfg = match &self.config {
            Some(path) => Config::load(path).map_err(|e| e.to_string())?,
            None => Config::default(),
        };
        if let Some(v) = self.listen {
            cfg.listen = v;
        }
        if let Some(v) = self.admin_listen {
            cfg.admin_listen = v;
        }
        if let Some(v) = self.metrics_listen {
            cfg.metrics_listen = Some(v);
        }
        if let Some(v) = &self.region {
            cfg.region = Some(v.clone());
        }
        if let Some(v) = &self.data_dir {
            cfg.data_dir = v.clone();
        }
        if let Some(v) = &self.key_dir {
            cfg.key_dir = v.clone();
        }
        if let Some(v) = &self.root_key_file {
            cfg.root_key_file = Some(v.clone());
        }
        if let Some(v) = self.durability {
            cfg.durability = v;
        }
        if let Some(v) = self.cipher {
            cfg.cipher = v;
        }
        cfg.replay_erasures = self.replay_erasures;
        cfg.accept_damage = self.accept_damage;
        Ok(cfg)
    }
}

pub fn main() -> ExitCode {
    let cli = Cli::parse();
    init_logging();
    let runtime = match tokio::runtime::Builder::new_multi_thread().enable_all().build() {
        Ok(rt) => rt,
        Err(e) => return fail(format!("cannot start the runtime: {e}")),
    };
    // Before any key is read: no core dumps, no other user's access to what is written.
    if matches!(cli.command, Command::Serve(_) | Command::Restore { .. } | Command::Keys { .. })
        && let Err(e) = crate::server::harden_process()
    {
        return fail(e);
    }
    let result = match cli.command {
        Command::Serve(args) => match args.config() {
            Ok(cfg) => runtime.block_on(crate::server::run(cfg)).map_err(|e| e.to_string()),
            Err(e) => Err(e),
        },
        Command::Route { config, listen } => runtime.block_on(route(&config, listen)),
        Command::Health { server, service, tls } => runtime.block_on(health(&server, &service, &tls)),
        Command::Keys { command: KeysCommand::Rotate(args) } => args.config().and_then(rotate_offline),
        Command::Check(args) => args.config().and_then(check),
        Command::Repair(args) => args.config().and_then(|cfg| runtime.block_on(repair(cfg))),
        Command::Admin(args) => runtime.block_on(admin::run(args)),
        Command::Receipt(cmd) => runtime.block_on(receipt::run(cmd)),
        Command::Erase(args) => runtime.block_on(erase::run(args)),
        Command::Backup(args) => runtime.block_on(admin::backup(args)),
        Command::Restore { from, server } => server.config().and_then(|cfg| runtime.block_on(restore(cfg, &from))),
        Command::Client(cmd) => runtime.block_on(client::run(cmd)),
    };
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => fail(e),
    }
}

async fn health(server: &str, service: &str, tls: &connect::TlsArgs) -> Result<(), String> {
    let ch = connect::channel(server, tls).await?;
    let mut client = tonic_health::pb::health_client::HealthClient::new(ch);
    let mut req = tonic::Request::new(tonic_health::pb::HealthCheckRequest { service: service.to_owned() });
    req.set_timeout(std::time::Duration::from_secs(5));
    let status = client.check(req).await.map_err(|s| format!("health check: {}", s.message()))?.into_inner().status();
    println!("{}", status.as_str_name());
    match status {
        tonic_health::pb::health_check_response::ServingStatus::Serving => Ok(()),
        other => Err(format!("{} is {}", if service.is_empty() { server } else { service }, other.as_str_name())),
    }
}

async fn route(path: &std::path::Path, listen: Option<SocketAddr>) -> Result<(), String> {
    let mut cfg = crate::router::RouterConfig::load(path)?;
    if let Some(l) = listen {
        cfg.listen = l;
    }
    use tokio::signal::unix::{SignalKind, signal};
    // Installed before the ready line: a SIGTERM sent the moment it is printed must find them.
    let mut term = signal(SignalKind::terminate()).map_err(|e| format!("signal handler: {e}"))?;
    let mut int = signal(SignalKind::interrupt()).map_err(|e| format!("signal handler: {e}"))?;
    let stop = async move {
        tokio::select! { _ = term.recv() => {}, _ = int.recv() => {} }
        tracing::info!("router shutting down");
    };
    crate::router::run(cfg, stop).await.map_err(|e| e.to_string())
}

fn check(cfg: Config) -> Result<(), String> {
    let report = crate::server::check(&cfg).map_err(|e| e.to_string())?;
    println!("{}", serde_json::to_string_pretty(&report).map_err(|e| e.to_string())?);
    if report.ok {
        Ok(())
    } else {
        Err(format!("region {}: damage found ({} places)", report.region, report.damage.len()))
    }
}

async fn repair(cfg: Config) -> Result<(), String> {
    let report = crate::server::repair(&cfg).await.map_err(|e| e.to_string())?;
    println!("{}", serde_json::to_string_pretty(&report).map_err(|e| e.to_string())?);
    if report.ok {
        Ok(())
    } else {
        Err(format!("region {}: damage is left after the repair (see above)", report.region))
    }
}

fn rotate_offline(cfg: Config) -> Result<(), String> {
    let spec = crate::server::one_region(&cfg, "keys rotate").map_err(|e| e.to_string())?;
    let opts = cfg.vault_options(&spec).map_err(|e| e.to_string())?;
    let (vault, _) = crate::vault::Vault::open(opts).map_err(|e| e.to_string())?;
    let report = vault.rotate_key_store().map_err(|e| e.to_string())?;
    println!(
        "key-store rotated to epoch {}; destroyed epochs {:?}; {} keys re-wrapped",
        report.new_epoch, report.destroyed_epochs, report.keys_rewrapped
    );
    Ok(())
}

async fn restore(cfg: Config, from: &std::path::Path) -> Result<(), String> {
    let data_dir = crate::server::one_region(&cfg, "restore").map_err(|e| e.to_string())?.data_dir;
    let m = crate::server::restore(cfg, from).await.map_err(|e| e.to_string())?;
    let out = serde_json::json!({
        "restored_to": data_dir.display().to_string(),
        "taken_at": m.taken_at,
        "records": m.records,
        "ledger_counter": m.ledger_counter,
        "note": "erasures, revocations and deletions made since the backup were replayed; other writes since are lost",
    });
    println!("{}", serde_json::to_string_pretty(&out).map_err(|e| e.to_string())?);
    Ok(())
}

fn fail(message: String) -> ExitCode {
    eprintln!("chatvault: {message}");
    ExitCode::FAILURE
}

fn init_logging() {
    let filter = tracing_subscriber::EnvFilter::try_from_env("CHATVAULT_LOG")
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info"));
    let _ = tracing_subscriber::fmt().with_env_filter(filter).with_writer(std::io::stderr).try_init();
}
