//! One SVG bar chart per scenario: its headline metric, one bar per broker, petrel in colour.
//!
//! SVG only, and text is left to the viewer's fonts, so drawing needs no font files here.

use std::path::Path;

use plotters::coord::ranged1d::SegmentValue;
use plotters::prelude::*;
use plotters::style::text_anchor::{HPos, Pos, VPos};

use crate::format;
use crate::run::{Results, SUBJECT};
use crate::targets::{self, Better, Figure, Metric, Unit};

const SIZE: (u32, u32) = (640, 360);
const SUBJECT_COLOUR: RGBColor = RGBColor(0x1f, 0x6f, 0xb4);
const PEER_COLOUR: RGBColor = RGBColor(0x9a, 0x9a, 0x9a);

/// One broker's bar.
#[derive(Debug, Clone, PartialEq)]
pub struct Bar {
    pub broker: String,
    pub figure: Figure,
}

/// The charts of a scenario: its headline metric, and for `connections` also the memory that
/// idle connections cost, which has a target of its own. (file stem, metric) pairs.
pub fn charted(scenario: &str) -> Vec<(String, Metric)> {
    let mut charts = vec![(scenario.to_owned(), targets::headline(scenario))];
    if scenario == "connections" {
        charts.push((format!("{scenario}-memory"), targets::BYTES_PER_CONNECTION));
    }
    charts
}

/// The bars of one scenario's metric, in broker order.
pub fn bars(results: &Results, scenario: &str, metric: Metric) -> Vec<Bar> {
    results
        .scenario_runs(scenario)
        .into_iter()
        .map(|run| Bar {
            broker: run.label.clone(),
            figure: Figure::of(results, scenario, &run.label, metric),
        })
        .collect()
}

/// The SVG document for one scenario.
pub fn render(scenario: &str, metric: Metric, bars: &[Bar]) -> Result<String, String> {
    let mut svg = String::new();
    draw(&mut svg, scenario, metric, bars).map_err(|e| format!("drawing {scenario}: {e}"))?;
    Ok(svg)
}

fn draw(
    svg: &mut String,
    scenario: &str,
    metric: Metric,
    bars: &[Bar],
) -> Result<(), Box<dyn std::error::Error>> {
    let root = SVGBackend::with_string(svg, SIZE).into_drawing_area();
    root.fill(&WHITE)?;
    if bars.is_empty() {
        root.present()?;
        return Ok(());
    }
    let highest = bars
        .iter()
        .filter_map(|b| b.figure.value())
        .fold(0.0_f64, f64::max);
    let top = if highest > 0.0 { highest * 1.2 } else { 1.0 };
    let direction = match metric.better {
        Better::Higher => "higher is better",
        Better::Lower => "lower is better",
    };
    // Integer ranges are inclusive as discrete coordinates: 0..=last gives one segment a bar.
    let last = bars.len() as i32 - 1;
    let mut chart = ChartBuilder::on(&root)
        .caption(
            format!("{scenario}: {} ({direction})", metric.name),
            ("sans-serif", 20),
        )
        .margin(12)
        .x_label_area_size(36)
        .y_label_area_size(90)
        .build_cartesian_2d((0..last).into_segmented(), 0.0..top)?;
    chart
        .configure_mesh()
        .disable_x_mesh()
        .light_line_style(WHITE)
        .x_labels(bars.len())
        .x_label_formatter(&|x| match x {
            SegmentValue::CenterOf(i) => usize::try_from(*i)
                .ok()
                .and_then(|i| bars.get(i))
                .map_or_else(String::new, |b| b.broker.clone()),
            _ => String::new(),
        })
        .y_label_formatter(&|y| axis_label(*y, metric.unit, top))
        .label_style(("sans-serif", 14))
        .draw()?;

    let value_style =
        TextStyle::from(("sans-serif", 14).into_font()).pos(Pos::new(HPos::Center, VPos::Bottom));
    for (i, bar) in bars.iter().enumerate() {
        let i = i as i32;
        let colour = if bar.broker == SUBJECT {
            SUBJECT_COLOUR
        } else {
            PEER_COLOUR
        };
        let (height, label) = match &bar.figure {
            Figure::Value(v) => (*v, format::value(*v, metric.unit)),
            Figure::Failed(_) => (0.0, "failed".to_owned()),
            Figure::Missing => (0.0, "no figure".to_owned()),
        };
        if height > 0.0 {
            let mut rect = Rectangle::new(
                [
                    (SegmentValue::Exact(i), 0.0),
                    (SegmentValue::Exact(i + 1), height),
                ],
                colour.filled(),
            );
            rect.set_margin(0, 0, 24, 24);
            chart.draw_series(std::iter::once(rect))?;
        }
        chart.draw_series(std::iter::once(
            EmptyElement::at((SegmentValue::CenterOf(i), height))
                + Text::new(label, (0, -4), value_style.clone()),
        ))?;
    }
    root.present()?;
    Ok(())
}

/// Axis ticks, all in the one unit that suits the axis's top (no "500 µs" under "1.00 ms").
fn axis_label(v: f64, unit: Unit, top: f64) -> String {
    match unit {
        Unit::MessagesPerSecond | Unit::ConnectionsPerSecond => format::grouped(v),
        Unit::Microseconds if top >= 1_000_000.0 => format!("{:.1} s", v / 1_000_000.0),
        Unit::Microseconds if top >= 1_000.0 => format!("{:.1} ms", v / 1_000.0),
        Unit::Microseconds => format!("{v:.0} µs"),
        Unit::Bytes if top >= 1024.0 * 1024.0 => format!("{:.1} MiB", v / (1024.0 * 1024.0)),
        Unit::Bytes if top >= 1024.0 => format!("{:.1} KiB", v / 1024.0),
        Unit::Bytes => format!("{v:.0} B"),
        Unit::Seconds if top < 1.0 => format!("{:.0} ms", v * 1000.0),
        Unit::Seconds => format!("{v:.1} s"),
    }
}

/// A chart written to disk.
#[derive(Debug, Clone, PartialEq)]
pub struct Written {
    pub scenario: String,
    pub metric: &'static str,
    pub file: String,
}

/// Writes `<dir>/<stem>.svg` for each chart of every scenario, and removes the other SVG files
/// there: the directory holds the charts of the current report, so a chart of a scenario that
/// is no longer reported does not linger beside it.
pub fn write_all(results: &Results, dir: &Path) -> Result<Vec<Written>, String> {
    std::fs::create_dir_all(dir).map_err(|e| format!("creating {}: {e}", dir.display()))?;
    let mut written = Vec::new();
    for scenario in results.scenarios() {
        for (stem, metric) in charted(&scenario) {
            let svg = render(&scenario, metric, &bars(results, &scenario, metric))?;
            let file = format!("{stem}.svg");
            let path = dir.join(&file);
            std::fs::write(&path, svg).map_err(|e| format!("writing {}: {e}", path.display()))?;
            written.push(Written {
                scenario: scenario.clone(),
                metric: metric.name,
                file,
            });
        }
    }
    let entries = std::fs::read_dir(dir).map_err(|e| format!("listing {}: {e}", dir.display()))?;
    for entry in entries.flatten() {
        let name = entry.file_name().to_string_lossy().into_owned();
        if name.ends_with(".svg") && !written.iter().any(|w| w.file == name) {
            let path = entry.path();
            std::fs::remove_file(&path).map_err(|e| format!("removing {}: {e}", path.display()))?;
        }
    }
    Ok(written)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_chart_has_a_bar_and_label_per_broker() {
        let bars = vec![
            Bar {
                broker: "petrel".into(),
                figure: Figure::Value(400_000.0),
            },
            Bar {
                broker: "mosquitto".into(),
                figure: Figure::Value(70_000.0),
            },
            Bar {
                broker: "rumqttd".into(),
                figure: Figure::Failed("timed out".into()),
            },
        ];
        let svg = render("fan-in", targets::DELIVERED, &bars).unwrap();
        assert!(svg.starts_with("<svg"));
        assert!(svg.contains("fan-in: delivered msg/s (higher is better)"));
        for text in ["petrel", "mosquitto", "rumqttd", "400,000 msg/s", "failed"] {
            assert!(svg.contains(text), "{text} missing");
        }
        assert!(
            svg.contains("#1F6FB4") || svg.contains("#1f6fb4"),
            "petrel's bar"
        );
    }

    #[test]
    fn a_single_broker_still_charts() {
        let bars = vec![Bar {
            broker: "petrel".into(),
            figure: Figure::Value(12.0),
        }];
        let svg = render("latency", targets::P99, &bars).unwrap();
        assert!(svg.contains("12 µs"));
    }

    #[test]
    fn the_charts_directory_holds_only_the_current_charts() {
        let dir = std::env::temp_dir().join(format!("petrel-bench-report-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        std::fs::write(dir.join("wildcards.svg"), "<svg/>").unwrap();
        std::fs::write(dir.join("notes.txt"), "kept").unwrap();
        let results = Results::new([crate::Run {
            scenario: "connections".into(),
            label: "petrel".into(),
            ok: true,
            connections_per_s: Some(1000.0),
            rss_per_connection_bytes: Some(1500.0),
            ..crate::Run::default()
        }]);
        let written = write_all(&results, &dir).unwrap();
        let mut names: Vec<String> = std::fs::read_dir(&dir)
            .unwrap()
            .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
            .collect();
        names.sort();
        std::fs::remove_dir_all(&dir).unwrap();
        assert_eq!(written.len(), 2);
        assert_eq!(
            names,
            ["connections-memory.svg", "connections.svg", "notes.txt"]
        );
    }
}
