//! `roster projection …`: list, status, rebuild, reset, run.

use std::sync::Arc;

use clap::Subcommand;
use serde_json::json;

use crate::config::Settings;
use crate::eventstore::log::ClickHouseEventStore;
use crate::eventstore::EventStore;
use crate::projection::builtin;
use crate::projection::rebuild::{Progress, Rebuild};
use crate::projection::runner::{Checkpoints, Runner, RunnerConfig};
use crate::projection::snapshot::SnapshotStore;
use crate::startup::{self, BoxError};

#[derive(Subcommand)]
pub enum ProjectionCommand {
    /// The built-in projections and the tables they write.
    List,
    /// Checkpoint, state, lag and lease of each projection.
    Status,
    /// Replay a projection into shadow tables and swap them in (safe while serving).
    Rebuild {
        name: String,
        /// Start from the latest snapshot instead of the first event.
        #[arg(long)]
        from_snapshot: bool,
        /// Build and count, but keep the live tables.
        #[arg(long)]
        dry_run: bool,
    },
    /// Clear a failed projection's error so it is fed again from its checkpoint.
    Reset { name: String },
    /// Feed every projection in the foreground until Ctrl-C (`serve` also does).
    Run,
}

fn find(name: &str) -> Result<Arc<dyn crate::projection::Projection>, BoxError> {
    builtin::all().into_iter().find(|p| p.name() == name).ok_or_else(|| {
        let names: Vec<_> = builtin::all().iter().map(|p| p.name()).collect();
        format!("no projection '{name}' (there are: {})", names.join(", ")).into()
    })
}

pub async fn run(settings: &Settings, command: ProjectionCommand, as_json: bool) -> Result<(), BoxError> {
    if let ProjectionCommand::List = command {
        for p in builtin::all() {
            match as_json {
                true => println!(
                    "{}",
                    json!({ "name": p.name(), "tables": p.tables(), "snapshots": p.snapshots().is_some() })
                ),
                false => println!(
                    "{:<20} {}{}",
                    p.name(),
                    p.tables().join(", "),
                    if p.snapshots().is_some() { "  (snapshots)" } else { "" }
                ),
            }
        }
        return Ok(());
    }
    let db = startup::mongo_database(settings).await?;
    crate::migrate::clickhouse(&settings.clickhouse).await?;
    crate::migrate::mongo(&db).await?;
    let ch = crate::migrate::clickhouse_client(&settings.clickhouse);
    let store = Arc::new(ClickHouseEventStore::new(&db, ch.clone()));
    let checkpoints = Checkpoints::new(&db);
    match command {
        ProjectionCommand::List => unreachable!("answered above"),
        ProjectionCommand::Status => {
            let last = store.last_position().await?;
            for p in builtin::all() {
                let s = checkpoints.status(p.name()).await?;
                if as_json {
                    let mut v = serde_json::to_value(&s)?;
                    v["lag"] = json!(last - s.position);
                    println!("{v}");
                    continue;
                }
                let error = s
                    .error
                    .map(|e| format!("  failed at {}: {e}", s.failed_position.unwrap_or(-1)))
                    .unwrap_or_default();
                println!(
                    "{:<20} {:<10} position {:>10}  lag {:>8}  processed {:>10}  lease {}{error}",
                    s.name,
                    s.state,
                    s.position,
                    last - s.position,
                    s.events_processed,
                    s.lease_holder.as_deref().unwrap_or("-"),
                );
            }
        }
        ProjectionCommand::Rebuild { name, from_snapshot, dry_run } => {
            let p = find(&name)?;
            let snapshots = SnapshotStore::new(&db);
            let rebuild = Rebuild { ch: &ch, store: &store, checkpoints: &checkpoints, snapshots: &snapshots };
            let bar = (!as_json).then(|| progress_bar(&name, "events"));
            let report = rebuild
                .run(&*p, from_snapshot, dry_run, |pr: Progress| {
                    if let Some(bar) = &bar {
                        bar.set_length(pr.total);
                        bar.set_position(pr.done);
                    }
                })
                .await?;
            if let Some(bar) = bar {
                bar.finish();
            }
            if as_json {
                println!(
                    "{}",
                    json!({ "name": report.name, "events": report.events, "seconds": report.elapsed.as_secs_f64(),
                            "snapshot": report.snapshot, "rows": report.rows, "swapped": report.swapped, "position": report.position })
                );
            } else {
                let rows: Vec<String> = report.rows.iter().map(|(t, n)| format!("{t}: {n} rows")).collect();
                println!(
                    "{}: {} events in {:.1} s{}; {}; {}",
                    report.name,
                    report.events,
                    report.elapsed.as_secs_f64(),
                    report.snapshot.map(|p| format!(" after the snapshot at {p}")).unwrap_or_default(),
                    rows.join(", "),
                    if report.swapped {
                        format!("swapped in at position {}", report.position)
                    } else {
                        "dry run: live tables kept".into()
                    }
                );
            }
        }
        ProjectionCommand::Reset { name } => {
            let p = find(&name)?;
            let s = checkpoints.status(p.name()).await?;
            checkpoints.set(p.name(), s.position, crate::projection::runner::ProjectionState::Running, false).await?;
            println!("{}: will be fed again from position {}", p.name(), s.position + 1);
        }
        ProjectionCommand::Run => {
            let runner = Runner::new(&db, ch.clone(), store.clone(), RunnerConfig::default());
            let tasks = runner.spawn(builtin::all());
            println!("feeding {} projections; Ctrl-C stops", tasks.len());
            let _ = tokio::signal::ctrl_c().await;
            for t in tasks {
                t.abort();
            }
        }
    }
    Ok(())
}

/// One line on stderr, redrawn: bar, count, rate, time left. Drawn also when stderr is
/// not a terminal (a log of the rebuild shows how far it got).
pub(super) fn progress_bar(name: &str, unit: &str) -> indicatif::ProgressBar {
    let template = format!("{{prefix}} [{{bar:30}}] {{pos}}/{{len}} {unit}  {{per_sec}}  ETA {{eta}}");
    let style = indicatif::ProgressStyle::with_template(&template)
        .unwrap_or_else(|_| indicatif::ProgressStyle::default_bar())
        .progress_chars("#> ");
    let target = indicatif::ProgressDrawTarget::term_like(Box::new(console::Term::stderr()));
    indicatif::ProgressBar::with_draw_target(Some(0), target).with_style(style).with_prefix(name.to_string())
}
