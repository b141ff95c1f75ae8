//! `roster eventstore …`: the event store from a terminal. Human tables by default,
//! `--json` (one JSON document, or JSON lines for `read`) for scripts.

use clap::Subcommand;
use serde_json::json;

use crate::config::Settings;
use crate::eventstore::log::ClickHouseEventStore;
use crate::eventstore::{EventStore, ExpectedVersion, NewEvent};
use crate::startup::{self, BoxError};

#[derive(Subcommand)]
pub enum EventStoreCommand {
    /// Create the event store's tables and indexes (all migrations), then exit.
    Init,
    /// Totals: events, streams, last position, time span, events by type.
    Stats,
    /// Streams with their version, event count and last event time.
    Streams {
        /// Only streams whose id starts with this.
        #[arg(long, default_value = "")]
        prefix: String,
        #[arg(long, default_value_t = 100)]
        max: usize,
    },
    /// A stream's events from a version on (`group:{id}` reads a Group's member events).
    Read {
        stream: String,
        #[arg(long, default_value_t = 0)]
        from: u64,
        #[arg(long, default_value_t = 100)]
        max: usize,
    },
    /// Append one event.
    Append {
        stream: String,
        #[arg(long = "type")]
        event_type: String,
        /// The event's data, JSON.
        #[arg(long)]
        data: String,
        /// any | no-stream | exists | a version number
        #[arg(long, default_value = "any")]
        expected_version: String,
    },
    /// Apply the configured retention rules now.
    Retention,
}

/// Milliseconds since the epoch as an instant (UTC, milliseconds).
fn time_text(ms: i64) -> String {
    crate::model::datetime::format_bson_instant(bson::DateTime::from_millis(ms))
}

/// Prints rows as a left-aligned table under `header`.
fn table(header: &[&str], rows: &[Vec<String>]) {
    let mut widths: Vec<usize> = header.iter().map(|h| h.len()).collect();
    for row in rows {
        for (w, cell) in widths.iter_mut().zip(row) {
            *w = (*w).max(cell.chars().count());
        }
    }
    let line = |cells: Vec<String>| {
        let padded: Vec<String> = cells.iter().zip(&widths).map(|(c, w)| format!("{c:<w$}")).collect();
        println!("{}", padded.join("  ").trim_end());
    };
    line(header.iter().map(|h| h.to_string()).collect());
    line(widths.iter().map(|w| "-".repeat(*w)).collect());
    for row in rows {
        line(row.clone());
    }
}

fn shorten(text: &str, max: usize) -> String {
    match text.char_indices().nth(max) {
        Some((i, _)) => format!("{}…", &text[..i]),
        None => text.to_string(),
    }
}

pub async fn run(settings: &Settings, command: EventStoreCommand, as_json: bool) -> Result<(), BoxError> {
    let db = startup::mongo_database(settings).await?;
    // Every command may be the first on a fresh database: the schema comes first.
    let ch = crate::migrate::clickhouse(&settings.clickhouse).await?;
    let mg = crate::migrate::mongo(&db).await?;
    if let EventStoreCommand::Init = command {
        match as_json {
            true => println!("{}", json!({ "clickhouse": ch, "mongo": mg })),
            false => println!("event store ready (migrations applied now: ClickHouse {ch:?}, MongoDB {mg:?})"),
        }
        return Ok(());
    }
    let ch = crate::migrate::clickhouse_client(&settings.clickhouse);
    let store = ClickHouseEventStore::new(&db, ch.clone());
    let result = run_with(&store, &ch, settings, command, as_json).await;
    store.close().await;
    result
}

async fn run_with(
    store: &ClickHouseEventStore,
    ch: &clickhouse::Client,
    settings: &Settings,
    command: EventStoreCommand,
    as_json: bool,
) -> Result<(), BoxError> {
    match command {
        EventStoreCommand::Init => unreachable!("handled before a store is opened"),
        EventStoreCommand::Stats => {
            let s = store.stats().await?;
            if as_json {
                println!("{}", serde_json::to_string(&s)?);
                return Ok(());
            }
            let span = match s.events {
                0 => "-".to_string(),
                _ => format!("{} … {}", time_text(s.first_time), time_text(s.last_time)),
            };
            table(
                &["measure", "value"],
                &[
                    vec!["events".into(), s.events.to_string()],
                    vec!["streams".into(), s.streams.to_string()],
                    vec!["last position".into(), s.last_position.to_string()],
                    vec!["time span".into(), span],
                ],
            );
            println!();
            let rows: Vec<Vec<String>> = s.by_type.iter().map(|(t, n)| vec![t.clone(), n.to_string()]).collect();
            table(&["event type", "events"], &rows);
        }
        EventStoreCommand::Streams { prefix, max } => {
            let streams = store.streams(&prefix, max).await?;
            if as_json {
                println!("{}", serde_json::to_string(&streams)?);
                return Ok(());
            }
            let rows: Vec<Vec<String>> = streams
                .iter()
                .map(|s| {
                    vec![s.stream_id.clone(), s.version.to_string(), s.events.to_string(), time_text(s.last_event)]
                })
                .collect();
            table(&["stream", "version", "events", "last event"], &rows);
        }
        EventStoreCommand::Read { stream, from, max } => {
            let events = store.read_stream(&stream, from, max).await?;
            if as_json {
                for e in &events {
                    let mut line = String::new();
                    e.write_json(&mut line);
                    println!("{line}");
                }
                return Ok(());
            }
            let rows: Vec<Vec<String>> = events
                .iter()
                .map(|e| {
                    vec![
                        e.stream_version.to_string(),
                        e.position.to_string(),
                        time_text(e.timestamp),
                        e.event_type.clone(),
                        shorten(&e.data, 60),
                    ]
                })
                .collect();
            table(&["version", "position", "time", "type", "data"], &rows);
        }
        EventStoreCommand::Append { stream, event_type, data, expected_version } => {
            let expected: ExpectedVersion = expected_version.parse()?;
            let data: serde_json::Value =
                serde_json::from_str(&data).map_err(|e| format!("--data is not JSON: {e}"))?;
            let result = store.append(&stream, expected, vec![NewEvent::new(&event_type, &data)]).await?;
            match as_json {
                true => println!("{}", serde_json::to_string(&result)?),
                false => println!(
                    "appended to {stream}: version {}, position {}",
                    result.next_expected_version, result.position
                ),
            }
        }
        EventStoreCommand::Retention => {
            let done = crate::eventstore::retention::apply(ch, &settings.events.retention).await?;
            if as_json {
                let rows: Vec<_> =
                    done.iter().map(|(r, n)| json!({ "prefix": r.prefix, "days": r.days, "deleted": n })).collect();
                println!("{}", serde_json::Value::Array(rows));
                return Ok(());
            }
            if done.is_empty() {
                println!("no retention rules: every event is kept");
            }
            let rows: Vec<Vec<String>> =
                done.iter().map(|(r, n)| vec![r.prefix.clone(), r.days.to_string(), n.to_string()]).collect();
            table(&["prefix", "days", "deleted"], &rows);
        }
    }
    Ok(())
}
