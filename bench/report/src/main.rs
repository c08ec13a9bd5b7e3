//! `petrel-bench-report`: reads the JSON lines of a comparison and writes BENCHMARKS.md and the
//! SVG charts it links to. `bench/compare` runs it; it can be re-run by hand on saved results.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::process::ExitCode;

use clap::Parser;
use petrel_bench_report::machine::Machine;
use petrel_bench_report::markdown::{self, BrokerInfo, Report};
use petrel_bench_report::run::BROKER_ORDER;
use petrel_bench_report::{charts, parse_jsonl, Results};

/// Writes BENCHMARKS.md and one SVG chart per scenario from petrel-bench JSON lines.
#[derive(Parser, Debug)]
#[command(name = "petrel-bench-report", version, about)]
struct Cli {
    /// JSONL files written by `petrel-bench --json` (the broker in each run's `label`). A later
    /// run of the same scenario and broker replaces an earlier one.
    #[arg(required = true, value_name = "JSONL")]
    inputs: Vec<PathBuf>,

    /// The markdown file to write; its `<!-- manual -->` block is kept.
    #[arg(long, default_value = "BENCHMARKS.md")]
    out: PathBuf,

    /// Where the SVG charts go.
    #[arg(long, default_value = "bench/charts")]
    charts_dir: PathBuf,

    /// The exact command that produced the results, shown in the report.
    #[arg(long, default_value = "")]
    command: String,

    /// SCENARIO=COMMAND: the generator's command line for a scenario.
    #[arg(long = "scenario-command", value_name = "SCENARIO=COMMAND")]
    scenario_commands: Vec<String>,

    /// NAME=DESCRIPTION: a broker's version and provenance.
    #[arg(long = "broker", value_name = "NAME=DESCRIPTION")]
    brokers: Vec<String>,

    /// A line for the report's setup section (repeatable).
    #[arg(long = "note", value_name = "TEXT")]
    notes: Vec<String>,

    /// NAME=PATH: the configuration file a broker ran with, shown in the report.
    #[arg(long = "broker-config", value_name = "NAME=PATH")]
    broker_configs: Vec<String>,
}

fn main() -> ExitCode {
    match run(Cli::parse()) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("petrel-bench-report: {e}");
            ExitCode::FAILURE
        }
    }
}

fn run(cli: Cli) -> Result<(), String> {
    let mut runs = Vec::new();
    for input in &cli.inputs {
        let text = std::fs::read_to_string(input)
            .map_err(|e| format!("reading {}: {e}", input.display()))?;
        let (parsed, skipped) = parse_jsonl(&text);
        for s in skipped {
            eprintln!(
                "petrel-bench-report: {}:{}: skipped, not a run: {}",
                input.display(),
                s.line,
                s.problem
            );
        }
        runs.extend(parsed);
    }
    let results = Results::new(runs);
    if results.is_empty() {
        return Err("no runs in the input files".to_owned());
    }

    let written = charts::write_all(&results, &cli.charts_dir)?;
    let link_dir = relative_to(&cli.charts_dir, cli.out.parent().unwrap_or(Path::new(".")));
    let charts_written = written.len();
    let mut chart_links: BTreeMap<String, Vec<(String, String)>> = BTreeMap::new();
    for w in written {
        chart_links
            .entry(w.scenario)
            .or_default()
            .push((w.metric.to_owned(), format!("{link_dir}/{}", w.file)));
    }

    let scenario_commands: BTreeMap<String, String> = cli
        .scenario_commands
        .iter()
        .map(|s| split_pair(s, "--scenario-command"))
        .collect::<Result<_, _>>()?;
    let brokers = broker_infos(&cli.brokers, &cli.broker_configs)?;
    // The results were measured when their file was last written, which a later re-render
    // of the same file must not change.
    let measured = cli
        .inputs
        .iter()
        .filter_map(|p| std::fs::metadata(p).and_then(|m| m.modified()).ok())
        .max();
    let machine = Machine::detect(measured);
    let previous = std::fs::read_to_string(&cli.out).ok();
    let md = markdown::render(
        &Report {
            results,
            machine: Some(machine),
            command: cli.command,
            scenario_commands,
            brokers,
            notes: cli.notes,
            charts: chart_links,
        },
        previous.as_deref(),
    );
    std::fs::write(&cli.out, md).map_err(|e| format!("writing {}: {e}", cli.out.display()))?;
    eprintln!(
        "petrel-bench-report: wrote {} and {charts_written} chart(s) in {}",
        cli.out.display(),
        cli.charts_dir.display()
    );
    Ok(())
}

fn split_pair(arg: &str, flag: &str) -> Result<(String, String), String> {
    arg.split_once('=')
        .map(|(k, v)| (k.trim().to_owned(), v.trim().to_owned()))
        .ok_or_else(|| format!("{flag} {arg:?}: expected NAME=VALUE"))
}

fn broker_infos(descriptions: &[String], configs: &[String]) -> Result<Vec<BrokerInfo>, String> {
    let mut infos: Vec<BrokerInfo> = Vec::new();
    for d in descriptions {
        let (name, description) = split_pair(d, "--broker")?;
        infos.push(BrokerInfo {
            name,
            description,
            config: None,
        });
    }
    for c in configs {
        let (name, path) = split_pair(c, "--broker-config")?;
        let text = std::fs::read_to_string(&path).map_err(|e| format!("reading {path}: {e}"))?;
        let file = Path::new(&path)
            .file_name()
            .map_or_else(|| path.clone(), |f| f.to_string_lossy().into_owned());
        match infos.iter_mut().find(|i| i.name == name) {
            Some(info) => info.config = Some((file, text)),
            None => infos.push(BrokerInfo {
                name,
                description: String::new(),
                config: Some((file, text)),
            }),
        }
    }
    // The report's order, whatever the order of the flags.
    infos.sort_by_key(|i| {
        BROKER_ORDER
            .iter()
            .position(|b| *b == i.name)
            .unwrap_or(BROKER_ORDER.len())
    });
    Ok(infos)
}

/// `dir` as a link from markdown in `base`: relative when `dir` is inside `base`, else as given.
fn relative_to(dir: &Path, base: &Path) -> String {
    let base = if base.as_os_str().is_empty() {
        Path::new(".")
    } else {
        base
    };
    let relative = match (dir.canonicalize(), base.canonicalize()) {
        (Ok(d), Ok(b)) => d.strip_prefix(&b).map(Path::to_path_buf).ok(),
        _ => None,
    };
    let shown = relative.unwrap_or_else(|| dir.to_path_buf());
    shown
        .components()
        .map(|c| c.as_os_str().to_string_lossy())
        .collect::<Vec<_>>()
        .join("/")
}
