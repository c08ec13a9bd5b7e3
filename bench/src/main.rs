//! The `petrel-bench` binary: flags → `petrel_bench::run` on a runtime of `--threads` workers →
//! a table on stdout, or one JSON object with `--json`. Exits 0 when the report says `ok`, 1
//! otherwise (the report is printed either way).

use std::io::IsTerminal;
use std::process::ExitCode;
use std::time::Duration;

use anyhow::Context;
use clap::{Args, Parser, Subcommand};
use petrel_bench::{Options, Scenario};
use petrel_codec::{ProtocolVersion, QoS};

/// petrel-bench: MQTT load generator (fan-in, fan-out, pairs, latency, connections, wildcards,
/// retained) for petrel or any other broker.
#[derive(Parser, Debug)]
// `--version` is the MQTT version (scripts use it), so the program's version is `-V` /
// `--program-version` rather than clap's automatic `--version`.
#[command(name = "petrel-bench", version, about, long_about = None, disable_version_flag = true)]
struct Cli {
    /// Print the program's version.
    #[arg(short = 'V', long = "program-version", action = clap::ArgAction::Version)]
    program_version: (),
    #[command(flatten)]
    common: Common,
    #[command(subcommand)]
    scenario: Command,
}

#[derive(Args, Debug)]
struct Common {
    /// Broker host.
    #[arg(long, global = true, default_value = "127.0.0.1")]
    host: String,
    /// Broker port [default: 1883].
    #[arg(long, global = true)]
    port: Option<u16>,
    /// Several brokers' ports, comma-separated (the nodes of a cluster), instead of --port:
    /// subscriber i connects to the (i mod n)-th, publisher i to the one after it.
    #[arg(long, global = true, value_delimiter = ',', num_args = 1)]
    ports: Vec<u16>,
    /// QoS of every publish and subscription (0, 1 or 2).
    #[arg(long, global = true, default_value_t = 0, value_parser = clap::value_parser!(u8).range(0..=2))]
    qos: u8,
    /// Payload bytes per message (at least 16: sequence number and send time).
    #[arg(long, global = true, default_value_t = 64)]
    payload: usize,
    /// MQTT version: 3.1.1 or 5 (3.1 also accepted).
    #[arg(long, global = true, default_value = "3.1.1", value_parser = parse_version)]
    version: ProtocolVersion,
    /// Print one JSON object to stdout at the end instead of the table.
    #[arg(long, global = true)]
    json: bool,
    /// Name of the broker under test, copied into the report.
    #[arg(long, global = true, default_value = "")]
    label: String,
    /// Runtime worker threads; 1 uses a current-thread runtime and leaves the other cores to
    /// the broker.
    #[arg(long, global = true, default_value_t = 1)]
    threads: usize,
    /// Unacknowledged QoS 1/2 messages per publisher.
    #[arg(long, global = true, default_value_t = 64)]
    inflight: u16,
    /// Bound on the whole run in seconds; a run that hits it reports what arrived with ok=false.
    #[arg(long, global = true, default_value_t = 120.0)]
    timeout: f64,
    /// Persistent sessions (3.x Clean Session 0; v5 Session Expiry Interval 3600): a broker
    /// with durable sessions stores every QoS 1/2 message before acknowledging it.
    #[arg(long, global = true)]
    persistent: bool,
    /// Shell command run after every subscriber is subscribed and before any publisher
    /// connects (not timed); a non-zero exit fails the run. E.g. wait for a cluster's
    /// subscriptions to reach every node.
    #[arg(long, global = true, value_name = "COMMAND")]
    before_publish: Option<String>,
}

#[derive(Subcommand, Debug)]
enum Command {
    /// N publishers → 1 subscriber on one topic.
    FanIn {
        #[arg(long, default_value_t = 8)]
        publishers: u32,
        /// Messages per publisher.
        #[arg(long, default_value_t = 100_000)]
        messages: u32,
    },
    /// 1 publisher → N subscribers on one topic (N × M deliveries).
    FanOut {
        #[arg(long, default_value_t = 50)]
        subscribers: u32,
        #[arg(long, default_value_t = 20_000)]
        messages: u32,
    },
    /// N publisher/subscriber pairs on distinct topics.
    Pairs {
        #[arg(long, default_value_t = 50)]
        pairs: u32,
        /// Messages per pair.
        #[arg(long, default_value_t = 20_000)]
        messages: u32,
    },
    /// Paced publishing at a fixed total rate; end-to-end latency percentiles.
    Latency {
        /// Messages per second over all publishers.
        #[arg(long, default_value_t = 20_000)]
        rate: u32,
        /// Seconds of publishing.
        #[arg(long, default_value_t = 10.0)]
        duration: f64,
        #[arg(long, default_value_t = 4)]
        publishers: u32,
    },
    /// N idle clients: connect rate, broker RSS per connection, PINGREQ sweep.
    Connections {
        #[arg(long, default_value_t = 15_000)]
        connections: u32,
        /// Clients connecting at once.
        #[arg(long, default_value_t = 200)]
        concurrency: u32,
        /// The broker's process id, to read its VmRSS before and after.
        #[arg(long)]
        broker_pid: Option<u32>,
    },
    /// K connections sharing N exact, `+` and `#` subscriptions; 1 publisher.
    Wildcards {
        #[arg(long, default_value_t = 100_000)]
        subscriptions: u32,
        #[arg(long, default_value_t = 10)]
        subscribers: u32,
        #[arg(long, default_value_t = 100_000)]
        messages: u32,
    },
    /// N retained messages stored, then replayed to one `#` subscriber.
    Retained {
        #[arg(long, default_value_t = 100_000)]
        retained: u32,
    },
}

fn parse_version(s: &str) -> Result<ProtocolVersion, String> {
    match s {
        "3.1.1" | "4" => Ok(ProtocolVersion::V3_1_1),
        "5" | "5.0" => Ok(ProtocolVersion::V5),
        "3.1" | "3" => Ok(ProtocolVersion::V3_1),
        _ => Err(format!("{s:?} is not 3.1.1, 5 or 3.1")),
    }
}

/// The brokers' ports: `--ports`, or the one `--port`, or 1883.
fn broker_ports(port: Option<u16>, ports: &[u16]) -> anyhow::Result<Vec<u16>> {
    match (port, ports) {
        (None, []) => Ok(vec![1883]),
        (Some(p), []) => Ok(vec![p]),
        (None, list) => Ok(list.to_vec()),
        (Some(_), _) => anyhow::bail!("give either --port or --ports, not both"),
    }
}

fn seconds(flag: &str, s: f64) -> anyhow::Result<Duration> {
    Duration::try_from_secs_f64(s).with_context(|| format!("{flag} {s} is not a duration"))
}

fn main() -> ExitCode {
    match run() {
        Ok(true) => ExitCode::SUCCESS,
        Ok(false) => ExitCode::FAILURE,
        Err(e) => {
            eprintln!("petrel-bench: {e:#}");
            ExitCode::from(2)
        }
    }
}

fn run() -> anyhow::Result<bool> {
    let cli = Cli::parse();
    let c = &cli.common;
    anyhow::ensure!(c.threads >= 1, "--threads must be at least 1");
    let opts = Options {
        host: c.host.clone(),
        ports: broker_ports(c.port, &c.ports)?,
        qos: QoS::from_u8(c.qos).context("--qos")?,
        payload: c.payload,
        version: c.version,
        label: c.label.clone(),
        threads: c.threads,
        inflight: c.inflight,
        timeout: seconds("--timeout", c.timeout)?,
        progress: !c.json && std::io::stderr().is_terminal(),
        persistent: c.persistent,
        before_publish: c.before_publish.clone(),
    };
    let scenario = match cli.scenario {
        Command::FanIn {
            publishers,
            messages,
        } => Scenario::FanIn {
            publishers,
            messages,
        },
        Command::FanOut {
            subscribers,
            messages,
        } => Scenario::FanOut {
            subscribers,
            messages,
        },
        Command::Pairs { pairs, messages } => Scenario::Pairs { pairs, messages },
        Command::Latency {
            rate,
            duration,
            publishers,
        } => Scenario::Latency {
            rate,
            duration: seconds("--duration", duration)?,
            publishers,
        },
        Command::Connections {
            connections,
            concurrency,
            broker_pid,
        } => Scenario::Connections {
            connections,
            concurrency,
            broker_pid,
        },
        Command::Wildcards {
            subscriptions,
            subscribers,
            messages,
        } => Scenario::Wildcards {
            subscriptions,
            subscribers,
            messages,
        },
        Command::Retained { retained } => Scenario::Retained { retained },
    };

    let runtime = if c.threads == 1 {
        tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
    } else {
        tokio::runtime::Builder::new_multi_thread()
            .worker_threads(c.threads)
            .enable_all()
            .build()
    }
    .context("starting the tokio runtime")?;
    let report = runtime.block_on(petrel_bench::run(&opts, &scenario));
    if c.json {
        println!("{}", serde_json::to_string(&report)?);
    } else {
        print!("{}", report.table());
    }
    Ok(report.ok)
}

#[cfg(test)]
mod tests {
    use super::*;
    use clap::CommandFactory;

    #[test]
    fn the_command_line_is_consistent_and_version_is_the_mqtt_version() {
        Cli::command().debug_assert();
        let cli =
            Cli::try_parse_from(["petrel-bench", "--version", "5", "--ports", "1,2", "fan-in"])
                .expect("parses");
        assert_eq!(cli.common.version, ProtocolVersion::V5);
        assert_eq!(cli.common.ports, [1, 2]);
        let shown = Cli::try_parse_from(["petrel-bench", "-V"]).unwrap_err();
        assert_eq!(shown.kind(), clap::error::ErrorKind::DisplayVersion);
    }

    #[test]
    fn one_port_by_default_or_from_port() {
        assert_eq!(broker_ports(None, &[]).unwrap(), [1883]);
        assert_eq!(broker_ports(Some(18801), &[]).unwrap(), [18801]);
    }

    #[test]
    fn ports_gives_every_broker_in_order() {
        let three = [18801, 18802, 18803];
        assert_eq!(broker_ports(None, &three).unwrap(), three);
    }

    #[test]
    fn port_and_ports_together_are_refused() {
        assert!(broker_ports(Some(1), &[2, 3]).is_err());
    }
}
