//! Command line: `roster serve | migrate | config | eventstore … | projection …`.

mod eventstore;
mod projection;

use std::path::PathBuf;

use clap::{Parser, Subcommand};

use crate::config::{Settings, ENV_VARS};
use crate::pipeline::Hooks;
use crate::startup::{self, Application, BoxError};

#[derive(Parser)]
#[command(name = "roster", version, about = "FHIR R4 server for large, fast-changing Groups (MongoDB + ClickHouse)")]
#[command(after_help = env_help())]
pub struct Cli {
    /// TOML config file (default: $ROSTER_CONFIG, else ./roster.toml when present).
    #[arg(long, global = true, value_name = "FILE")]
    pub config: Option<PathBuf>,
    #[command(subcommand)]
    pub command: Command,
}

#[derive(Subcommand)]
pub enum Command {
    /// Apply migrations, then serve the FHIR API until SIGTERM/Ctrl-C.
    Serve,
    /// Apply ClickHouse and MongoDB migrations, then exit.
    Migrate,
    /// Print the effective configuration (password masked) and exit.
    Config,
    /// The general event store: init, stats, streams, read, append, retention.
    Eventstore {
        /// Machine-readable output (JSON; JSON lines for `read`).
        #[arg(long, global = true)]
        json: bool,
        #[command(subcommand)]
        command: eventstore::EventStoreCommand,
    },
    /// Index stored resources for search (those stored before their keys were), with a
    /// progress bar; resumable, and safe while servers run.
    Reindex {
        /// Only this resource type.
        #[arg(long = "type", value_name = "TYPE")]
        resource_type: Option<String>,
    },
    /// Projections (read models): list, status, rebuild, reset, run.
    Projection {
        /// Machine-readable output (JSON lines).
        #[arg(long, global = true)]
        json: bool,
        #[command(subcommand)]
        command: projection::ProjectionCommand,
    },
}

fn env_help() -> String {
    let mut s = String::from("Environment (overrides the config file):\n");
    for var in ENV_VARS {
        s.push_str(&format!("  {:<28} {}\n", var.name, var.help));
    }
    s
}

pub async fn run(cli: Cli) -> Result<(), BoxError> {
    let settings = Settings::load(cli.config.as_deref())?;
    crate::telemetry::init(&settings.log);
    match cli.command {
        Command::Serve => Application::build(settings, Hooks::default()).await?.run_until_stopped().await?,
        Command::Migrate => {
            let db = startup::mongo_database(&settings).await?;
            let ch = crate::migrate::clickhouse(&settings.clickhouse).await?;
            let mg = crate::migrate::mongo(&db).await?;
            println!("ClickHouse `{}`: applied {:?}", settings.clickhouse.database, ch);
            println!("MongoDB `{}`: applied {:?}", settings.mongo.database, mg);
        }
        Command::Eventstore { json, command } => eventstore::run(&settings, command, json).await?,
        Command::Projection { json, command } => projection::run(&settings, command, json).await?,
        Command::Reindex { resource_type } => reindex(&settings, resource_type).await?,
        Command::Config => {
            let mut shown = settings.clone();
            if !shown.clickhouse.password.is_empty() {
                shown.clickhouse.password = "****".into();
            }
            println!("{shown:#?}");
        }
    }
    Ok(())
}

/// `roster reindex`: every type (or one), each with a progress bar.
async fn reindex(settings: &Settings, only: Option<String>) -> Result<(), BoxError> {
    use crate::search::reindex;
    let db = startup::mongo_database(settings).await?;
    crate::migrate::clickhouse(&settings.clickhouse).await?;
    crate::migrate::mongo(&db).await?;
    let ch = crate::migrate::clickhouse_client(&settings.clickhouse);
    let base = format!("{}/4_0_0", settings.public_base_url().trim_end_matches('/'));
    let types: Vec<&str> = match &only {
        Some(t) if fhir_model::is_resource_type(t) => vec![t.as_str()],
        Some(t) => return Err(format!("'{t}' is not a FHIR R4 resource type").into()),
        None => fhir_model::RESOURCE_TYPES.to_vec(),
    };
    let started = std::time::Instant::now();
    let mut total = reindex::Done::default();
    for rt in types {
        let n = reindex::count(&db, rt).await?;
        if n == 0 {
            continue;
        }
        let bar = projection::progress_bar(rt, "resources");
        bar.set_length(n);
        let done = reindex::reindex_type(&db, &ch, &base, rt, &|scanned| bar.set_position(scanned)).await?;
        bar.finish();
        total.scanned += done.scanned;
        total.indexed += done.indexed;
    }
    if only.is_none() {
        reindex::mark_all_done(&db).await?;
    }
    let secs = started.elapsed().as_secs_f64();
    println!(
        "scanned {} resources, indexed {} in {secs:.1} s ({:.0}/s)",
        total.scanned,
        total.indexed,
        total.scanned as f64 / secs.max(1e-9)
    );
    Ok(())
}
