//! petrel-bench-report: turns the JSON lines that `petrel-bench --json` prints into
//! BENCHMARKS.md and one SVG bar chart per scenario.
//!
//! The flow, one module per step:
//!
//! ```text
//! *.jsonl ──run::parse_jsonl──▶ Vec<Run> ──Results::new──▶ last run per (scenario, broker)
//!                                                 │
//!          targets::evaluate (headline metric per scenario, the targets petrel is held to)
//!                                                 │
//!     markdown::render (machine, command, ratio table, absolute tables; the hand-written
//!     block between the `<!-- manual -->` markers is carried over) ── charts::write_all (SVG)
//! ```
//!
//! The report knows the generator only through its JSON shape: every figure is optional, so a
//! run that failed (or a line written by `bench/compare` for a broker that never answered)
//! renders as "failed" with its reason instead of breaking the report.

pub mod charts;
pub mod format;
pub mod machine;
pub mod markdown;
pub mod run;
pub mod targets;

pub use run::{parse_jsonl, Results, Run};
