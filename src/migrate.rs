//! Schema migrations for both stores, embedded from `clickhouse/*.sql` and `mongo/*.json`.
//!
//! Each file is applied once, in name order, and recorded (name and checksum) in a
//! `_migrations` table/collection of the target database. A recorded file whose content
//! has changed is an error: migrations are append-only. Statements must be idempotent
//! (`IF NOT EXISTS`) because two servers starting together may both apply a file before
//! either records it.

use bson::doc;
use mongodb::options::IndexOptions;
use mongodb::{Database, IndexModel};
use serde::Deserialize;

use crate::config::ClickHouseSettings;

include!(concat!(env!("OUT_DIR"), "/migrations.rs"));

#[derive(Debug, thiserror::Error)]
pub enum MigrationError {
    #[error("ClickHouse migration {name}: {source}")]
    ClickHouse { name: String, source: clickhouse::error::Error },
    #[error("MongoDB migration {name}: {source}")]
    Mongo { name: String, source: mongodb::error::Error },
    #[error(
        "migration {name} was changed after it was applied (checksum {applied} → {now}); add a new migration instead"
    )]
    Changed { name: String, applied: String, now: String },
    #[error("MongoDB migration {name} is not valid JSON: {message}")]
    Invalid { name: String, message: String },
}

/// FNV-1a, enough to notice an edited file.
pub fn checksum(text: &str) -> String {
    let mut h: u64 = 0xcbf29ce484222325;
    for b in text.bytes() {
        h ^= b as u64;
        h = h.wrapping_mul(0x100000001b3);
    }
    format!("{h:016x}")
}

/// Splits a migration file into statements: `;` at the end of a line ends one; `--` lines
/// are comments.
pub fn statements(sql: &str) -> Vec<String> {
    let mut out = Vec::new();
    let mut current = String::new();
    for line in sql.lines() {
        if line.trim_start().starts_with("--") {
            continue;
        }
        current.push_str(line);
        current.push('\n');
        if line.trim_end().ends_with(';') {
            out.push(current.trim().trim_end_matches(';').to_string());
            current.clear();
        }
    }
    if !current.trim().is_empty() {
        out.push(current.trim().to_string());
    }
    out
}

/// A ClickHouse client whose connections set `TCP_NODELAY`. The crate's default
/// connector leaves Nagle's algorithm on, which with delayed ACKs adds ~40 ms to
/// small requests: fatal for a 5 ms write path.
pub fn clickhouse_client(s: &ClickHouseSettings) -> clickhouse::Client {
    let mut connector = hyper_util::client::legacy::connect::HttpConnector::new();
    connector.set_nodelay(true);
    connector.set_keepalive(Some(std::time::Duration::from_secs(60)));
    let http = hyper_util::client::legacy::Client::builder(hyper_util::rt::TokioExecutor::new())
        .pool_idle_timeout(std::time::Duration::from_secs(2))
        .build(connector);
    let compression = match s.compression {
        crate::config::ClickHouseCompression::None => clickhouse::Compression::None,
        crate::config::ClickHouseCompression::Lz4 => clickhouse::Compression::Lz4,
    };
    clickhouse::Client::with_http_client(http)
        .with_url(&s.url)
        .with_user(&s.user)
        .with_password(&s.password)
        .with_database(&s.database)
        .with_compression(compression)
}

/// Creates the database if needed and applies pending ClickHouse migrations. Returns the
/// names applied now.
pub async fn clickhouse(s: &ClickHouseSettings) -> Result<Vec<String>, MigrationError> {
    let err = |name: &str| {
        let name = name.to_string();
        move |source| MigrationError::ClickHouse { name: name.clone(), source }
    };
    // The database name is checked against a safe identifier alphabet when settings load.
    let server = clickhouse_client(s).with_database("default");
    server
        .query(&format!("CREATE DATABASE IF NOT EXISTS `{}`", s.database))
        .execute()
        .await
        .map_err(err("database"))?;
    let client = clickhouse_client(s);
    client
        .query(
            "CREATE TABLE IF NOT EXISTS _migrations (name String, checksum String, applied_at DateTime64(3, 'UTC') DEFAULT now64(3)) \
             ENGINE = ReplacingMergeTree(applied_at) ORDER BY name",
        )
        .execute()
        .await
        .map_err(err("_migrations"))?;
    let applied: Vec<(String, String)> = client
        .query("SELECT name, argMax(checksum, applied_at) FROM _migrations GROUP BY name")
        .fetch_all()
        .await
        .map_err(err("_migrations"))?;
    let mut done = Vec::new();
    for (name, sql) in CLICKHOUSE_MIGRATIONS {
        let sum = checksum(sql);
        if let Some((_, old)) = applied.iter().find(|(n, _)| n == name) {
            if *old != sum {
                return Err(MigrationError::Changed { name: name.to_string(), applied: old.clone(), now: sum });
            }
            continue;
        }
        for statement in statements(sql) {
            client.query(&statement).execute().await.map_err(err(name))?;
        }
        client
            .query("INSERT INTO _migrations (name, checksum) VALUES (?, ?)")
            .bind(*name)
            .bind(&sum)
            .execute()
            .await
            .map_err(err(name))?;
        done.push(name.to_string());
    }
    Ok(done)
}

#[derive(Deserialize)]
struct MongoMigration {
    collections: Vec<CollectionSpec>,
}

#[derive(Deserialize)]
struct CollectionSpec {
    /// Collection name; `{type}` expands to every R4 resource type.
    name: String,
    #[serde(default)]
    indexes: Vec<IndexSpec>,
    /// Indexes an earlier migration created and this one removes (absent ones are skipped).
    #[serde(default)]
    drop: Vec<String>,
}

#[derive(Deserialize)]
struct IndexSpec {
    name: String,
    keys: serde_json::Map<String, serde_json::Value>,
    #[serde(default)]
    unique: bool,
    #[serde(default)]
    sparse: bool,
}

/// Applies pending MongoDB migrations (collections and indexes). Returns the names applied.
pub async fn mongo(db: &Database) -> Result<Vec<String>, MigrationError> {
    let record = db.collection::<bson::Document>("_migrations");
    let mut done = Vec::new();
    for (name, text) in MONGO_MIGRATIONS {
        let err = |source| MigrationError::Mongo { name: name.to_string(), source };
        let sum = checksum(text);
        if let Some(old) = record.find_one(doc! { "_id": *name }).await.map_err(err)? {
            let old = old.get_str("checksum").unwrap_or_default().to_string();
            if old != sum {
                return Err(MigrationError::Changed { name: name.to_string(), applied: old, now: sum });
            }
            continue;
        }
        let migration: MongoMigration = serde_json::from_str(text)
            .map_err(|e| MigrationError::Invalid { name: name.to_string(), message: e.to_string() })?;
        for spec in &migration.collections {
            let names: Vec<String> = if spec.name.contains("{type}") {
                fhir_model::RESOURCE_TYPES.iter().map(|t| spec.name.replace("{type}", t)).collect()
            } else {
                vec![spec.name.clone()]
            };
            let models: Vec<IndexModel> = spec
                .indexes
                .iter()
                .map(|i| {
                    let keys = crate::model::json_bson::to_document(&i.keys)
                        .map_err(|e| MigrationError::Invalid { name: name.to_string(), message: e.to_string() })?;
                    let options = IndexOptions::builder()
                        .name(i.name.clone())
                        .unique(i.unique.then_some(true))
                        .sparse(i.sparse.then_some(true))
                        .build();
                    Ok(IndexModel::builder().keys(keys).options(options).build())
                })
                .collect::<Result<_, MigrationError>>()?;
            for collection in names {
                let collection = db.collection::<bson::Document>(&collection);
                for index in &spec.drop {
                    match collection.drop_index(index).await {
                        Err(e) if is_missing(&e) => {}
                        other => other.map_err(err)?,
                    }
                }
                if !models.is_empty() {
                    collection.create_indexes(models.clone()).await.map_err(err)?;
                }
            }
        }
        record
            .insert_one(doc! { "_id": *name, "checksum": &sum, "appliedAt": bson::DateTime::now() })
            .await
            .map_err(err)?;
        done.push(name.to_string());
    }
    Ok(done)
}

/// The index (or its collection) is not there: dropping it again is done.
fn is_missing(e: &mongodb::error::Error) -> bool {
    // 26 NamespaceNotFound, 27 IndexNotFound.
    matches!(&*e.kind, mongodb::error::ErrorKind::Command(c) if c.code == 26 || c.code == 27)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn splits_statements_and_skips_comments() {
        let s = statements("-- c\nCREATE TABLE a (x String);\n\nINSERT INTO a VALUES ('1;2');\n");
        assert_eq!(s, vec!["CREATE TABLE a (x String)", "INSERT INTO a VALUES ('1;2')"]);
    }

    #[test]
    fn embedded_migrations_are_ordered_and_parse() {
        assert!(!CLICKHOUSE_MIGRATIONS.is_empty() && !MONGO_MIGRATIONS.is_empty());
        assert!(CLICKHOUSE_MIGRATIONS.windows(2).all(|w| w[0].0 < w[1].0));
        for (name, text) in MONGO_MIGRATIONS {
            serde_json::from_str::<MongoMigration>(text).unwrap_or_else(|e| panic!("{name}: {e}"));
        }
    }

    /// The build script lists the migration directories only when cargo thinks they
    /// changed (by file times): a build of another checkout in the same target directory
    /// can leave this checkout's binary with that checkout's list (it once lacked a
    /// migration, and `roster reindex` then failed for want of its table).
    #[test]
    fn the_embedded_list_is_this_checkouts() {
        // Read at run time: a test binary may be reused by another checkout as it is.
        let root = std::path::PathBuf::from(std::env::var("CARGO_MANIFEST_DIR").expect("run by cargo"));
        for (dir, ext, embedded) in
            [("clickhouse", ".sql", CLICKHOUSE_MIGRATIONS), ("mongo", ".json", MONGO_MIGRATIONS)]
        {
            let mut on_disk: Vec<String> = std::fs::read_dir(root.join(dir))
                .unwrap()
                .filter_map(|e| e.ok()?.file_name().to_str()?.strip_suffix(ext).map(str::to_string))
                .collect();
            on_disk.sort();
            let embedded: Vec<&str> = embedded.iter().map(|(name, _)| *name).collect();
            assert_eq!(embedded, on_disk, "{dir}/: rebuild after `touch {dir}/*`");
        }
    }
}
