//! The `petrel` binary.

use std::path::{Path, PathBuf};
use std::process::ExitCode;
use std::time::Duration;

use clap::Parser;
use petrel_server::{Config, Server};
use tokio_util::sync::CancellationToken;
use tracing_subscriber::EnvFilter;

/// jemalloc, with a background thread that returns freed pages to the OS about a second after
/// they fall idle: a burst of connections (a reconnect storm, thousands of sockets stalled
/// before CONNECT) must not leave the broker's resident memory at its peak, which the system
/// allocator does. It also keeps fragmentation low under the broker's many small, short-lived
/// allocations.
#[global_allocator]
static GLOBAL: tikv_jemallocator::Jemalloc = tikv_jemallocator::Jemalloc;

/// jemalloc's startup options (read before `main`): purge dirty pages after 1 s, straight to
/// the OS (no lazy "muzzy" stage, whose pages still count as resident).
#[allow(non_upper_case_globals)]
#[export_name = "_rjem_malloc_conf"]
pub static malloc_conf: &[u8] = b"background_thread:true,dirty_decay_ms:1000,muzzy_decay_ms:0\0";

/// petrel: a high-performance MQTT broker (MQTT 3.1, 3.1.1 and 5.0).
///
/// With no arguments it listens on 127.0.0.1:1883 with built-in defaults. Log verbosity follows
/// RUST_LOG (default "info"), e.g. RUST_LOG=petrel=debug.
#[derive(Parser, Debug)]
#[command(name = "petrel", version, about, long_about = None)]
struct Cli {
    /// TOML configuration file. Unknown keys and bad values stop the broker at start.
    #[arg(short, long, value_name = "FILE")]
    config: Option<PathBuf>,

    /// Check a configuration file and exit: "configuration OK" and status 0 if it is valid,
    /// otherwise the problem (file:line: key: what is wrong) and status 1. Without FILE, checks
    /// the --config file. Starts nothing.
    #[arg(long, value_name = "FILE", num_args = 0..=1)]
    check_config: Option<Option<PathBuf>>,

    /// The `print-default-config` command as a flag, kept for scripts written before it.
    #[arg(long, hide = true)]
    print_default_config: bool,

    /// After SIGINT/SIGTERM: how long clients get to receive what is queued for them before
    /// they are disconnected (overrides the config's `shutdown_grace`, default 10s).
    #[arg(long, value_name = "DURATION", value_parser = humantime::parse_duration)]
    shutdown_grace: Option<Duration>,

    #[command(subcommand)]
    command: Option<Command>,
}

#[derive(clap::Subcommand, Debug)]
enum Command {
    /// Add a user to a password file, change its password, or delete it. The file is created
    /// if missing; the password is asked twice on the terminal, or read from one line of
    /// standard input with --stdin. Hashes are argon2id.
    Passwd {
        /// The password file (`[auth] password_file`).
        file: PathBuf,
        /// The user name.
        user: String,
        /// Remove the user instead.
        #[arg(long, short = 'D')]
        delete: bool,
        /// Read the password from standard input (for scripts) instead of prompting.
        #[arg(long, conflicts_with = "delete")]
        stdin: bool,
    },
    /// Print a configuration file with every key, its default value and what it means, then
    /// exit: `petrel print-default-config > petrel.toml` is a starting point to edit.
    PrintDefaultConfig,
    /// Check or salvage a disk store (`[storage] dir`) while no broker uses it.
    Store {
        #[command(subcommand)]
        command: StoreCommand,
    },
}

#[derive(clap::Subcommand, Debug)]
enum StoreCommand {
    /// Read every record of the store in DIR and verify it. Exits 0 if a start would accept
    /// the store, otherwise 1 with each damaged record (file, offset, partition, key). DIR is
    /// not modified: it is copied under TMPDIR for the check.
    Check { dir: PathBuf },
    /// Copy every record of the store in DIR that reads into a new, sound store in NEW_DIR
    /// (missing or empty), listing each record that cannot be read. DIR is not modified.
    Salvage {
        dir: PathBuf,
        #[arg(long, value_name = "NEW_DIR")]
        into: PathBuf,
    },
}

impl Cli {
    /// The file `--check-config` is to check: its own value, else `--config`'s. Exits with a
    /// usage error (status 2) when there is none, or when the two name different files.
    fn file_to_check(&self) -> Option<PathBuf> {
        use clap::CommandFactory;
        let usage_error = |message: &str| -> ! {
            Cli::command()
                .error(clap::error::ErrorKind::ArgumentConflict, message)
                .exit()
        };
        match (self.check_config.as_ref()?, &self.config) {
            (Some(file), Some(config)) if file != config => usage_error(&format!(
                "--check-config {} and --config {} name different files; give one",
                file.display(),
                config.display()
            )),
            (Some(file), _) | (None, Some(file)) => Some(file.clone()),
            (None, None) => usage_error("--check-config needs a FILE (or --config FILE)"),
        }
    }
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    match &cli.command {
        Some(Command::Passwd {
            file,
            user,
            delete,
            stdin,
        }) => {
            return match passwd(file, user, *delete, *stdin) {
                Ok(message) => {
                    eprintln!("{message}");
                    ExitCode::SUCCESS
                }
                Err(e) => {
                    eprintln!("petrel passwd: {e}");
                    ExitCode::FAILURE
                }
            };
        }
        Some(Command::PrintDefaultConfig) => return print_default_config(),
        Some(Command::Store { command }) => {
            use petrel_server::store_tool;
            return store_tool::print(&match command {
                StoreCommand::Check { dir } => store_tool::check(dir),
                StoreCommand::Salvage { dir, into } => store_tool::salvage(dir, into),
            });
        }
        None if cli.print_default_config => return print_default_config(),
        None => {}
    }
    let check = cli.file_to_check();
    tracing_subscriber::fmt()
        .with_env_filter(
            EnvFilter::try_from_default_env().unwrap_or_else(|_| EnvFilter::new("info")),
        )
        .with_writer(std::io::stderr)
        // Colour only on a terminal: logs sent to files or journald stay plain text.
        .with_ansi(std::io::IsTerminal::is_terminal(&std::io::stderr()))
        .init();

    let config = match check.as_ref().or(cli.config.as_ref()) {
        Some(path) => match Config::load(path) {
            Ok(c) => c,
            Err(e) => {
                eprintln!("petrel: configuration error: {e}");
                return ExitCode::FAILURE;
            }
        },
        None => Config::default(),
    };
    if let Some(path) = &check {
        // The files the configuration names are read as a start would read them.
        if let Err(e) = petrel_server::server::check_files(&config) {
            eprintln!(
                "petrel: configuration error: {}: {}",
                path.display(),
                describe(&e)
            );
            return ExitCode::FAILURE;
        }
        println!("configuration OK");
        return ExitCode::SUCCESS;
    }

    let runtime = match tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
    {
        Ok(rt) => rt,
        Err(e) => {
            eprintln!("petrel: cannot start the runtime: {e}");
            return ExitCode::FAILURE;
        }
    };
    let grace = cli.shutdown_grace.unwrap_or(config.shutdown_grace);
    match runtime.block_on(run(config, cli.config.clone(), grace)) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("petrel: {e:#}");
            ExitCode::FAILURE
        }
    }
}

/// `petrel print-default-config`. Written without `print!`, which panics when stdout is closed
/// early (`petrel print-default-config | head`).
fn print_default_config() -> ExitCode {
    use std::io::Write;
    let text = petrel_server::config::default_config_toml();
    let mut out = std::io::stdout().lock();
    match out.write_all(text.as_bytes()).and_then(|()| out.flush()) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) if e.kind() == std::io::ErrorKind::BrokenPipe => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("petrel: writing the default configuration: {e}");
            ExitCode::FAILURE
        }
    }
}

/// An error and its causes, each said once: most of petrel's errors already include their
/// cause in their message, and `{:#}` would repeat it.
fn describe(error: &dyn std::error::Error) -> String {
    let mut text = error.to_string();
    let mut cause = error.source();
    while let Some(e) = cause {
        let said = e.to_string();
        if !text.contains(&said) {
            text.push_str(": ");
            text.push_str(&said);
        }
        cause = e.source();
    }
    text
}

async fn run(config: Config, path: Option<PathBuf>, grace: Duration) -> anyhow::Result<()> {
    // A start that fails on the configuration (or a file it names) says which file.
    let mut server = Server::bind(&config).await.map_err(|e| match &path {
        Some(path) => anyhow::anyhow!("configuration error: {}: {}", path.display(), describe(&e)),
        None => anyhow::anyhow!("{}", describe(&e)),
    })?;
    if let Some(path) = path {
        // SIGHUP reloads users, the password file and the ACL from it.
        server = server.reload_from(path);
    }
    let shutdown = CancellationToken::new();
    tokio::spawn(wait_for_signal(shutdown.clone()));
    tracing::info!(version = env!("CARGO_PKG_VERSION"), "petrel starting");
    server.run(shutdown, grace).await;
    tracing::info!("petrel stopped");
    Ok(())
}

async fn wait_for_signal(shutdown: CancellationToken) {
    use tokio::signal::unix::{signal, SignalKind};
    let (Ok(mut term), Ok(mut int)) = (
        signal(SignalKind::terminate()),
        signal(SignalKind::interrupt()),
    ) else {
        tracing::error!("cannot install signal handlers; stop with SIGKILL");
        return;
    };
    let name = tokio::select! {
        _ = term.recv() => "SIGTERM",
        _ = int.recv() => "SIGINT",
    };
    tracing::info!(
        signal = name,
        "shutting down: no new connections, closing open ones"
    );
    shutdown.cancel();
}

/// `petrel passwd`: changes one user in a password file, written whole to a temporary file
/// (mode 0600) and renamed over the old one, so a failure leaves the old file intact.
fn passwd(file: &Path, user: &str, delete: bool, stdin: bool) -> anyhow::Result<String> {
    use anyhow::{bail, Context};
    use petrel_server::passwords::{hash, PasswordFile};
    if user.is_empty() || user.contains(':') || user.contains(char::is_whitespace) {
        bail!("a user name may not be empty or hold ':' or white space");
    }
    let mut entries = PasswordFile::load_or_empty(file)?;
    let message = if delete {
        if !entries.remove(user) {
            bail!("no user {user:?} in {}", file.display());
        }
        format!("removed {user:?} from {}", file.display())
    } else {
        let password = if stdin {
            let mut line = String::new();
            std::io::stdin()
                .read_line(&mut line)
                .context("reading the password from standard input")?;
            line.trim_end_matches(['\n', '\r']).to_owned()
        } else {
            let first = rpassword::prompt_password(format!("password for {user}: "))
                .context("reading the password from the terminal (use --stdin in scripts)")?;
            let again = rpassword::prompt_password("again: ")?;
            if first != again {
                bail!("the passwords differ; nothing changed");
            }
            first
        };
        if password.is_empty() {
            bail!("empty password; nothing changed");
        }
        let existed = entries.get(user).is_some();
        let hashed = hash(password.as_bytes()).map_err(|e| anyhow::anyhow!("hashing: {e}"))?;
        entries.set(user, hashed);
        format!(
            "{} {user:?} in {}",
            if existed { "changed" } else { "added" },
            file.display()
        )
    };
    let tmp = file.with_extension("petrel-tmp");
    {
        use std::io::Write;
        use std::os::unix::fs::OpenOptionsExt;
        let mut out = std::fs::OpenOptions::new()
            .write(true)
            .create(true)
            .truncate(true)
            .mode(0o600)
            .open(&tmp)
            .with_context(|| format!("writing {}", tmp.display()))?;
        out.write_all(entries.to_text().as_bytes())?;
        out.sync_all()?;
    }
    std::fs::rename(&tmp, file).with_context(|| format!("replacing {}", file.display()))?;
    Ok(message)
}
