//! The progress bar on stderr. Tasks bump one relaxed counter per socket read (never per
//! message); a ticker task copies it into the bar ten times a second.

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use indicatif::{ProgressBar, ProgressDrawTarget, ProgressStyle};

pub struct Progress {
    /// `None` when hidden: then `add` does not even touch the counter.
    bar: Option<ProgressBar>,
    count: Arc<AtomicU64>,
    ticker: Mutex<Option<tokio::task::JoinHandle<()>>>,
}

impl Progress {
    pub fn new(visible: bool) -> Progress {
        let bar = visible.then(|| {
            let bar = ProgressBar::with_draw_target(Some(0), ProgressDrawTarget::stderr());
            bar.set_style(
                ProgressStyle::with_template(
                    "{msg:>12} [{elapsed_precise}] {wide_bar} {pos}/{len} ({per_sec})",
                )
                .unwrap_or_else(|_| ProgressStyle::default_bar()),
            );
            bar
        });
        Progress {
            bar,
            count: Arc::new(AtomicU64::new(0)),
            ticker: Mutex::new(None),
        }
    }

    /// Starts counting a new phase towards `total`.
    pub fn phase(&self, name: &str, total: u64) {
        let Some(bar) = &self.bar else {
            return;
        };
        self.count.store(0, Ordering::Relaxed);
        bar.set_position(0);
        bar.set_length(total);
        bar.reset();
        bar.set_message(name.to_string());
        let mut ticker = self.ticker.lock().unwrap_or_else(|e| e.into_inner());
        if ticker.is_none() {
            let bar = bar.clone();
            let count = self.count.clone();
            *ticker = Some(tokio::spawn(async move {
                let mut every = tokio::time::interval(Duration::from_millis(100));
                loop {
                    every.tick().await;
                    bar.set_position(count.load(Ordering::Relaxed));
                }
            }));
        }
    }

    pub fn add(&self, n: u64) {
        if self.bar.is_some() && n > 0 {
            self.count.fetch_add(n, Ordering::Relaxed);
        }
    }

    pub fn finish(&self) {
        if let Some(t) = self.ticker.lock().unwrap_or_else(|e| e.into_inner()).take() {
            t.abort();
        }
        if let Some(bar) = &self.bar {
            bar.finish_and_clear();
        }
    }
}
