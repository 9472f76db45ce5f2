//! Progress bars for long operations (benchmarks, image builds, migrations).
//!
//! Owns the one progress helper every long command uses: a bar on a terminal, nothing with
//! `-o json|yaml` or when stderr is not a terminal. It must not print results.

use std::io::IsTerminal;

use indicatif::{ProgressBar, ProgressStyle};

use crate::cli::Output;

/// A progress reporter; `update(done, total)` matches the libraries' progress callbacks.
pub struct Progress {
    bar: Option<ProgressBar>,
}

impl Progress {
    pub fn new(format: Output, what: &str) -> Self {
        let visible = format.is_table() && std::io::stderr().is_terminal();
        let bar = visible.then(|| {
            let bar = ProgressBar::new(1);
            let style = ProgressStyle::with_template("{msg:>12} [{bar:40}] {pos}/{len} {elapsed}")
                .unwrap_or_else(|_| ProgressStyle::default_bar())
                .progress_chars("=> ");
            bar.set_style(style);
            bar.set_message(what.to_owned());
            bar
        });
        Self { bar }
    }

    pub fn update(&self, done: u64, total: u64) {
        if let Some(bar) = &self.bar {
            bar.set_length(total.max(1));
            bar.set_position(done);
        }
    }

    /// Replaces the bar's label (what the operation is doing now).
    pub fn note(&self, message: &str) {
        if let Some(bar) = &self.bar {
            bar.set_message(message.to_owned());
        }
    }

    pub fn finish(&self) {
        if let Some(bar) = &self.bar {
            bar.finish_and_clear();
        }
    }
}

impl Progress {
    /// Runs `bench` (an async benchmark that reports to this bar) from the synchronous bench
    /// dispatcher; prints the report as JSON for `-o json` and answers None, or answers the
    /// report for the caller's table.
    pub fn run_bench<T: serde::Serialize>(
        &self,
        format: Output,
        bench: impl std::future::Future<Output = anyhow::Result<T>>,
    ) -> anyhow::Result<Option<T>> {
        // Interrupted (Ctrl-C, or SIGTERM as `timeout` sends), the benchmark is dropped: what
        // it started (agents, QEMUs, TAPs) goes with it.
        let report = tokio::task::block_in_place(|| {
            tokio::runtime::Handle::current().block_on(async {
                tokio::select! {
                    r = bench => r,
                    _ = crate::serve::shutdown_signal() => Err(anyhow::anyhow!(
                        "interrupted: what the benchmark had started is stopped"
                    )),
                }
            })
        });
        // The bar goes on every path, so an error is printed on a clean line.
        self.finish();
        let report = report?;
        if crate::output::report(format, &report)? {
            return Ok(None);
        }
        Ok(Some(report))
    }
}
