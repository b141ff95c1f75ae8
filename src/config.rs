//! Configuration: built-in defaults, then an optional TOML file, then `ROSTER_*` variables.
//!
//! The environment wins so that one config file can serve several deployments and the test
//! harness can point a server at its own databases without writing files.

use std::net::SocketAddr;
use std::path::Path;

use serde::{Deserialize, Serialize};

#[derive(Debug, Clone, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct Settings {
    /// Address the HTTP server binds to.
    pub listen: SocketAddr,
    /// Public base URL used in `Location`, `fullUrl` and Bundle links. Derived from `listen`
    /// when absent.
    pub base_url: Option<String>,
    /// Largest accepted request body, in bytes (larger bodies get 413).
    pub body_limit_bytes: usize,
    pub http: HttpSettings,
    pub fhir: FhirSettings,
    pub mongo: MongoSettings,
    pub clickhouse: ClickHouseSettings,
    pub groups: GroupSettings,
    pub events: EventSettings,
    pub projections: ProjectionSettings,
    pub log: LogSettings,
}

/// Limits on connections, against clients that hold them open without finishing a request
/// (slowloris) and against more connections than the process can serve.
#[derive(Debug, Clone, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct HttpSettings {
    /// A request's headers must arrive within this time of its first byte (an idle
    /// keep-alive connection is closed after it too); otherwise the connection is closed.
    pub header_timeout_ms: u64,
    /// The longest pause between two pieces of a request body (408 after it).
    pub body_timeout_ms: u64,
    /// The longest a whole request body may take to arrive (408 after it): a client dripping
    /// one byte per pause cannot hold a connection for longer.
    pub body_deadline_ms: u64,
    /// Connections served at once; further clients wait in the listen queue until one ends.
    pub max_connections: usize,
}

impl Default for HttpSettings {
    fn default() -> Self {
        HttpSettings {
            header_timeout_ms: 30_000,
            body_timeout_ms: 30_000,
            body_deadline_ms: 600_000,
            max_connections: 1024,
        }
    }
}

#[derive(Debug, Clone, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct ProjectionSettings {
    /// Feed the built-in projections while serving (one runner per projection across all
    /// processes, by lease).
    pub run: bool,
    /// Events per projection batch.
    pub batch: usize,
}

impl Default for ProjectionSettings {
    fn default() -> Self {
        ProjectionSettings { run: true, batch: 10_000 }
    }
}

/// Where the event routing comes from (`events.routes`, `ROSTER_EVENT_ROUTES`).
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub enum EventRoutes {
    /// `builtin`: the routing file shipped in the binary (`config/event-routes.yaml`), so
    /// a new server records events, feeds projections and answers GraphQL out of the box.
    #[default]
    Builtin,
    /// `off`: no FHIR write becomes an event.
    Off,
    /// Any other value: a routing file (YAML) to read at start.
    File(std::path::PathBuf),
}

impl EventRoutes {
    pub fn parse(value: &str) -> EventRoutes {
        match value.trim() {
            "builtin" => EventRoutes::Builtin,
            "off" | "none" => EventRoutes::Off,
            path => EventRoutes::File(path.into()),
        }
    }
}

impl<'de> Deserialize<'de> for EventRoutes {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        String::deserialize(d).map(|s| EventRoutes::parse(&s))
    }
}

#[derive(Debug, Clone, Default, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct EventSettings {
    /// Which FHIR writes become events: the shipped routing (default), none, or a file.
    pub routes: EventRoutes,
    /// Retention per stream prefix; streams no rule names keep their events forever.
    pub retention: Vec<RetentionRule>,
}

/// How Group members are stored.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize, Default)]
#[serde(rename_all = "lowercase")]
pub enum MemberStorage {
    /// Member events in ClickHouse (the product).
    #[default]
    Events,
    /// Members embedded in the MongoDB document like any other element (the baseline the
    /// benchmark compares against).
    Embedded,
}

/// Events of streams whose id starts with `prefix` are deleted once older than `days`.
#[derive(Debug, Clone, PartialEq, Eq, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct RetentionRule {
    pub prefix: String,
    pub days: u32,
}

/// Limits of the FHIR API that hold for every resource type.
#[derive(Debug, Clone, Default, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct FhirSettings {
    /// Most operations one PATCH may carry, in any format (more: 413). Default
    /// [`DEFAULT_MAX_PATCH_OPS`].
    pub max_patch_ops: Option<usize>,
    /// Most resources one conditional DELETE may delete (more matches: 412). Default 1:
    /// a condition that matches several is refused, as R4 allows.
    pub max_conditional_delete: Option<usize>,
    /// For measurement only: `false` writes no search keys (searches then miss what is
    /// written), to compare a write's cost with and without indexing. Default true.
    pub search_indexing: Option<bool>,
    /// Most ids a chain or `_has` step resolves to as a list of keys to look up; an inner
    /// search that matches more stays a subquery of the outer one. Default 10,000.
    pub search_listed_ids: Option<usize>,
    /// Most entries in one batch or transaction Bundle (more: 413). Default 10,000.
    pub max_bundle_entries: Option<usize>,
}

/// The default of `fhir.max_bundle_entries`.
pub const DEFAULT_MAX_BUNDLE_ENTRIES: usize = 10_000;

/// The default of `fhir.max_patch_ops`.
pub const DEFAULT_MAX_PATCH_OPS: usize = 100_000;

#[derive(Debug, Clone, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct GroupSettings {
    /// `events` (members as ClickHouse events, the product) or `embedded` (members in the
    /// MongoDB document: the benchmark baseline).
    pub members: MemberStorage,
    /// Deprecated: `fhir.max_patch_ops` (which wins when both are set). Kept so that
    /// existing configurations go on working; a warning is logged at start.
    pub max_patch_ops: Option<usize>,
    /// Most members the in-process member index holds over all groups (about 26 bytes
    /// each; 0 turns it off and every membership check asks ClickHouse).
    pub index_capacity: usize,
}

impl Default for GroupSettings {
    fn default() -> Self {
        GroupSettings { members: MemberStorage::Events, max_patch_ops: None, index_capacity: 5_000_000 }
    }
}

#[derive(Debug, Clone, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct MongoSettings {
    pub uri: String,
    pub database: String,
    /// Count the MongoDB commands each kind of request costs (`store::ops`); off in
    /// production (the driver then copies every command into its event).
    pub count_ops: bool,
}

#[derive(Debug, Clone, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct ClickHouseSettings {
    pub url: String,
    pub user: String,
    pub password: String,
    pub database: String,
    /// `none` or `lz4` for ClickHouse HTTP bodies. LZ4 saves bandwidth across a network
    /// but costs CPU: on one host, reading 100k events took 176 ms with it and 67 ms
    /// without (2 cores), so the default is `none`.
    pub compression: ClickHouseCompression,
}

#[derive(Debug, Clone, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct LogSettings {
    /// `text` or `json`.
    pub format: LogFormat,
    /// A `tracing` filter such as `info` or `roster=debug,tower_http=info`.
    pub filter: String,
}

#[derive(Debug, Clone, Copy, Deserialize, PartialEq, Eq)]
#[serde(rename_all = "lowercase")]
pub enum LogFormat {
    Text,
    Json,
}

impl Default for Settings {
    fn default() -> Self {
        Settings {
            listen: SocketAddr::from(([127, 0, 0, 1], 8080)),
            base_url: None,
            body_limit_bytes: 64 * 1024 * 1024,
            http: HttpSettings::default(),
            fhir: FhirSettings::default(),
            mongo: MongoSettings::default(),
            clickhouse: ClickHouseSettings::default(),
            groups: GroupSettings::default(),
            events: EventSettings::default(),
            projections: ProjectionSettings::default(),
            log: LogSettings::default(),
        }
    }
}

impl Default for MongoSettings {
    fn default() -> Self {
        MongoSettings {
            uri: "mongodb://127.0.0.1:27117/?directConnection=true".into(),
            database: "roster".into(),
            count_ops: false,
        }
    }
}

#[derive(Debug, Clone, Copy, Default, Deserialize, PartialEq, Eq)]
#[serde(rename_all = "lowercase")]
pub enum ClickHouseCompression {
    #[default]
    None,
    Lz4,
}

impl std::str::FromStr for ClickHouseCompression {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, String> {
        match s {
            "none" => Ok(ClickHouseCompression::None),
            "lz4" => Ok(ClickHouseCompression::Lz4),
            other => Err(format!("'{other}' is not none or lz4")),
        }
    }
}

impl Default for ClickHouseSettings {
    fn default() -> Self {
        ClickHouseSettings {
            url: "http://127.0.0.1:18123".into(),
            user: "default".into(),
            password: String::new(),
            database: "roster".into(),
            compression: ClickHouseCompression::None,
        }
    }
}

impl Default for LogSettings {
    fn default() -> Self {
        LogSettings { format: LogFormat::Text, filter: "info".into() }
    }
}

/// One environment variable: its name, what it sets (printed by `--help`), and how.
pub struct EnvVar {
    pub name: &'static str,
    pub help: &'static str,
    set: fn(&mut Settings, &str) -> Result<(), String>,
}

const fn var(name: &'static str, help: &'static str, set: fn(&mut Settings, &str) -> Result<(), String>) -> EnvVar {
    EnvVar { name, help, set }
}

/// `value` parsed as `T`, the parser's complaint otherwise.
fn parsed<T: std::str::FromStr>(value: &str) -> Result<T, String>
where
    T::Err: std::fmt::Display,
{
    value.parse().map_err(|e: T::Err| e.to_string())
}

/// `value` as it is.
fn text(value: &str) -> Result<String, String> {
    Ok(value.to_string())
}

/// `value` when it is one of `words`, each with what it means.
fn one_of<T: Copy>(value: &str, words: &[(&str, T)]) -> Result<T, String> {
    words.iter().find(|(w, _)| *w == value).map(|(_, t)| *t).ok_or_else(|| {
        let names: Vec<&str> = words.iter().map(|(w, _)| *w).collect();
        format!("'{value}' is not {}", names.join(" or "))
    })
}

/// Every environment variable the server reads, in the order they are applied. The
/// overlay reads them through a function ([`Settings::load_from`]), not the process
/// environment directly, so tests never have to change the environment of the process.
pub const ENV_VARS: &[EnvVar] = &[
    var("ROSTER_CONFIG", "path of the TOML config file (default: ./roster.toml if present)", |_, _| Ok(())),
    var("ROSTER_LISTEN", "listen address, e.g. 127.0.0.1:8080", |s, v| parsed(v).map(|x| s.listen = x)),
    var("ROSTER_BASE_URL", "public base URL, e.g. https://fhir.example.org", |s, v| {
        text(v).map(|x| s.base_url = Some(x))
    }),
    var("ROSTER_BODY_LIMIT_BYTES", "largest request body in bytes", |s, v| parsed(v).map(|x| s.body_limit_bytes = x)),
    var("ROSTER_HTTP_HEADER_TIMEOUT_MS", "request headers must arrive within this (default 30000)", |s, v| {
        parsed(v).map(|x| s.http.header_timeout_ms = x)
    }),
    var("ROSTER_HTTP_BODY_TIMEOUT_MS", "longest pause inside a request body (default 30000)", |s, v| {
        parsed(v).map(|x| s.http.body_timeout_ms = x)
    }),
    var("ROSTER_HTTP_BODY_DEADLINE_MS", "longest a whole request body may take (default 600000)", |s, v| {
        parsed(v).map(|x| s.http.body_deadline_ms = x)
    }),
    var("ROSTER_HTTP_MAX_CONNECTIONS", "connections served at once (default 1024)", |s, v| {
        parsed(v).map(|x| s.http.max_connections = x)
    }),
    var("ROSTER_MONGO_URI", "MongoDB connection string", |s, v| text(v).map(|x| s.mongo.uri = x)),
    var("ROSTER_MONGO_DATABASE", "MongoDB database name", |s, v| text(v).map(|x| s.mongo.database = x)),
    var(
        "ROSTER_MONGO_COUNT_OPS",
        "count MongoDB commands by command and collection (true/false, default false)",
        |s, v| parsed(v).map(|x| s.mongo.count_ops = x),
    ),
    var("ROSTER_CLICKHOUSE_URL", "ClickHouse HTTP URL", |s, v| text(v).map(|x| s.clickhouse.url = x)),
    var("ROSTER_CLICKHOUSE_USER", "ClickHouse user", |s, v| text(v).map(|x| s.clickhouse.user = x)),
    var("ROSTER_CLICKHOUSE_PASSWORD", "ClickHouse password", |s, v| text(v).map(|x| s.clickhouse.password = x)),
    var("ROSTER_CLICKHOUSE_DATABASE", "ClickHouse database name", |s, v| text(v).map(|x| s.clickhouse.database = x)),
    var("ROSTER_CLICKHOUSE_COMPRESSION", "none (default: same host) or lz4 (across a network)", |s, v| {
        parsed(v).map(|x| s.clickhouse.compression = x)
    }),
    var("ROSTER_GROUP_MEMBERS", "events (ClickHouse member events) or embedded (members in MongoDB)", |s, v| {
        one_of(v, &[("events", MemberStorage::Events), ("embedded", MemberStorage::Embedded)])
            .map(|x| s.groups.members = x)
    }),
    var("ROSTER_FHIR_MAX_PATCH_OPS", "most operations in one PATCH (default 100000)", |s, v| {
        parsed(v).map(|x| s.fhir.max_patch_ops = Some(x))
    }),
    var("ROSTER_FHIR_MAX_CONDITIONAL_DELETE", "most resources one conditional DELETE deletes (default 1)", |s, v| {
        parsed(v).map(|x| s.fhir.max_conditional_delete = Some(x))
    }),
    var(
        "ROSTER_FHIR_SEARCH_INDEXING",
        "false only to measure writes without search indexing (default true)",
        |s, v| parsed(v).map(|x| s.fhir.search_indexing = Some(x)),
    ),
    var("ROSTER_FHIR_MAX_BUNDLE_ENTRIES", "most entries in one batch or transaction Bundle (default 10000)", |s, v| {
        parsed(v).map(|x| s.fhir.max_bundle_entries = Some(x))
    }),
    var(
        "ROSTER_FHIR_SEARCH_LISTED_IDS",
        "most ids a chain or _has step lists before it becomes a subquery (default 10000)",
        |s, v| parsed(v).map(|x| s.fhir.search_listed_ids = Some(x)),
    ),
    var("ROSTER_GROUP_MAX_PATCH_OPS", "deprecated: ROSTER_FHIR_MAX_PATCH_OPS", |s, v| {
        parsed(v).map(|x| s.groups.max_patch_ops = Some(x))
    }),
    var(
        "ROSTER_GROUP_INDEX_CAPACITY",
        "most members in the in-process member index (default 5000000; 0 = off)",
        |s, v| parsed(v).map(|x| s.groups.index_capacity = x),
    ),
    var(
        "ROSTER_EVENT_ROUTES",
        "builtin (default: the shipped routing), off, or a routing file (YAML) turning FHIR writes into events",
        |s, v| text(v).map(|x| s.events.routes = EventRoutes::parse(&x)),
    ),
    var("ROSTER_PROJECTIONS", "on (default) or off: feed the built-in projections while serving", |s, v| {
        one_of(v, &[("on", true), ("off", false)]).map(|x| s.projections.run = x)
    }),
    var("ROSTER_LOG_FORMAT", "text or json", |s, v| {
        one_of(v, &[("text", LogFormat::Text), ("json", LogFormat::Json)]).map(|x| s.log.format = x)
    }),
    var("ROSTER_LOG", "tracing filter, e.g. info or roster=debug", |s, v| text(v).map(|x| s.log.filter = x)),
];

#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    #[error("cannot read config file {path}: {source}")]
    Read { path: String, source: std::io::Error },
    #[error("invalid config file {path}: {message}")]
    Parse { path: String, message: String },
    #[error("invalid value for {var}: {message}")]
    Env { var: &'static str, message: String },
}

impl Settings {
    /// Loads settings: defaults, then `file` (or `$ROSTER_CONFIG`, or `./roster.toml` when it
    /// exists), then the process environment.
    pub fn load(file: Option<&Path>) -> Result<Settings, ConfigError> {
        let env = |k: &str| std::env::var(k).ok();
        Self::load_from(file, env)
    }

    /// Like [`Settings::load`] with an explicit environment, so tests need not mutate the
    /// process environment.
    pub fn load_from(file: Option<&Path>, env: impl Fn(&str) -> Option<String>) -> Result<Settings, ConfigError> {
        let explicit = file.map(Path::to_path_buf).or_else(|| env("ROSTER_CONFIG").map(Into::into));
        let path = match explicit {
            Some(p) => Some(p),
            None => Some(std::path::PathBuf::from("roster.toml")).filter(|p| p.exists()),
        };
        let mut settings = match path {
            Some(path) => {
                let shown = path.display().to_string();
                let text = std::fs::read_to_string(&path)
                    .map_err(|source| ConfigError::Read { path: shown.clone(), source })?;
                toml::from_str(&text).map_err(|e| ConfigError::Parse { path: shown, message: e.to_string() })?
            }
            None => Settings::default(),
        };
        settings.apply_env(env)?;
        settings.validate()?;
        Ok(settings)
    }

    fn apply_env(&mut self, env: impl Fn(&str) -> Option<String>) -> Result<(), ConfigError> {
        for var in ENV_VARS {
            if let Some(value) = env(var.name) {
                (var.set)(self, &value).map_err(|message| ConfigError::Env { var: var.name, message })?;
            }
        }
        Ok(())
    }

    fn validate(&self) -> Result<(), ConfigError> {
        // Database names end up as identifiers in DDL (which cannot take bound parameters),
        // so they are restricted to a safe alphabet here, once.
        for (var, name) in
            [("ROSTER_MONGO_DATABASE", &self.mongo.database), ("ROSTER_CLICKHOUSE_DATABASE", &self.clickhouse.database)]
        {
            if !is_safe_identifier(name) {
                return Err(ConfigError::Env {
                    var,
                    message: format!("'{name}' must match [A-Za-z_][A-Za-z0-9_]{{0,62}}"),
                });
            }
        }
        let http = &self.http;
        for (var, zero) in [
            ("ROSTER_HTTP_HEADER_TIMEOUT_MS", http.header_timeout_ms == 0),
            ("ROSTER_HTTP_BODY_TIMEOUT_MS", http.body_timeout_ms == 0),
            ("ROSTER_HTTP_BODY_DEADLINE_MS", http.body_deadline_ms == 0),
            ("ROSTER_HTTP_MAX_CONNECTIONS", http.max_connections == 0),
        ] {
            if zero {
                return Err(ConfigError::Env { var, message: "must be greater than 0".into() });
            }
        }
        if self.body_limit_bytes == 0 {
            return Err(ConfigError::Env { var: "ROSTER_BODY_LIMIT_BYTES", message: "must be greater than 0".into() });
        }
        Ok(())
    }

    /// Most operations one PATCH may carry: `fhir.max_patch_ops`, else the deprecated
    /// `groups.max_patch_ops`, else [`DEFAULT_MAX_PATCH_OPS`].
    pub fn max_patch_ops(&self) -> usize {
        self.fhir.max_patch_ops.or(self.groups.max_patch_ops).unwrap_or(DEFAULT_MAX_PATCH_OPS)
    }

    /// The base URL clients see, without a trailing slash.
    pub fn public_base_url(&self) -> String {
        match &self.base_url {
            Some(url) => url.trim_end_matches('/').to_string(),
            None => format!("http://{}", self.listen),
        }
    }
}

pub fn is_safe_identifier(name: &str) -> bool {
    let mut chars = name.chars();
    matches!(chars.next(), Some(c) if c.is_ascii_alphabetic() || c == '_')
        && name.len() <= 63
        && chars.all(|c| c.is_ascii_alphanumeric() || c == '_')
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::collections::HashMap;

    fn env(pairs: &[(&str, &str)]) -> impl Fn(&str) -> Option<String> {
        let map: HashMap<String, String> = pairs.iter().map(|(k, v)| (k.to_string(), v.to_string())).collect();
        move |k| map.get(k).cloned()
    }

    #[test]
    fn every_variable_sets_its_setting_and_a_bad_value_names_it() {
        let names: std::collections::BTreeSet<&str> = ENV_VARS.iter().map(|v| v.name).collect();
        assert_eq!(names.len(), ENV_VARS.len(), "each variable once");
        let set = Settings::load_from(
            None,
            env(&[
                ("ROSTER_LISTEN", "127.0.0.1:9999"),
                ("ROSTER_BASE_URL", "https://fhir.example.org"),
                ("ROSTER_HTTP_MAX_CONNECTIONS", "7"),
                ("ROSTER_CLICKHOUSE_PASSWORD", "secret"),
                ("ROSTER_GROUP_MEMBERS", "embedded"),
                ("ROSTER_PROJECTIONS", "off"),
                ("ROSTER_LOG_FORMAT", "json"),
                ("ROSTER_EVENT_ROUTES", "off"),
            ]),
        )
        .unwrap();
        assert_eq!(set.listen.port(), 9999);
        assert_eq!(set.base_url.as_deref(), Some("https://fhir.example.org"));
        assert_eq!((set.http.max_connections, set.clickhouse.password.as_str()), (7, "secret"));
        assert_eq!(
            (set.groups.members, set.projections.run, set.log.format),
            (MemberStorage::Embedded, false, LogFormat::Json)
        );
        assert!(matches!(set.events.routes, EventRoutes::Off));
        for (var, bad) in [
            ("ROSTER_LISTEN", "nowhere"),
            ("ROSTER_HTTP_BODY_TIMEOUT_MS", "-1"),
            ("ROSTER_GROUP_MEMBERS", "some"),
            ("ROSTER_PROJECTIONS", "yes"),
            ("ROSTER_CLICKHOUSE_COMPRESSION", "zip"),
        ] {
            match Settings::load_from(None, env(&[(var, bad)])) {
                Err(ConfigError::Env { var: named, .. }) => assert_eq!(named, var),
                other => panic!("{var}={bad}: {:?}", other.map(|_| ())),
            }
        }
    }

    #[test]
    fn environment_overrides_file() {
        let dir = std::env::temp_dir().join(format!("roster-cfg-{}", uuid::Uuid::new_v4()));
        std::fs::create_dir_all(&dir).unwrap();
        let file = dir.join("roster.toml");
        std::fs::write(&file, "listen = \"127.0.0.1:9999\"\nbody_limit_bytes = 10\n[mongo]\ndatabase = \"fromfile\"\n")
            .unwrap();
        let s = Settings::load_from(Some(&file), env(&[("ROSTER_MONGO_DATABASE", "fromenv")])).unwrap();
        assert_eq!(s.listen.port(), 9999);
        assert_eq!(s.body_limit_bytes, 10);
        assert_eq!(s.mongo.database, "fromenv");
    }

    #[test]
    fn rejects_unknown_keys_and_unsafe_names() {
        let dir = std::env::temp_dir().join(format!("roster-cfg-{}", uuid::Uuid::new_v4()));
        std::fs::create_dir_all(&dir).unwrap();
        let file = dir.join("roster.toml");
        std::fs::write(&file, "lisen = \"127.0.0.1:1\"\n").unwrap();
        let err = Settings::load_from(Some(&file), env(&[])).unwrap_err().to_string();
        assert!(err.contains("lisen"), "{err}");
        let err = Settings::load_from(None, env(&[("ROSTER_CLICKHOUSE_DATABASE", "a;drop")])).unwrap_err().to_string();
        assert!(err.contains("ROSTER_CLICKHOUSE_DATABASE"), "{err}");
        let err = Settings::load_from(None, env(&[("ROSTER_LOG_FORMAT", "xml")])).unwrap_err();
        assert!(err.to_string().contains("xml"));
    }

    #[test]
    fn the_example_file_loads_and_event_settings_parse() {
        let example = Settings::load_from(Some(Path::new("roster.example.toml")), env(&[])).unwrap();
        assert_eq!(example.clickhouse.compression, ClickHouseCompression::None);
        let dir = std::env::temp_dir().join(format!("roster-cfg-{}", uuid::Uuid::new_v4()));
        std::fs::create_dir_all(&dir).unwrap();
        let file = dir.join("roster.toml");
        let text = "[events]\nroutes = \"r.yaml\"\n[[events.retention]]\nprefix = \"source:\"\ndays = 30\n";
        std::fs::write(&file, text).unwrap();
        let s = Settings::load_from(Some(&file), env(&[("ROSTER_CLICKHOUSE_COMPRESSION", "lz4")])).unwrap();
        assert_eq!(s.events.routes, EventRoutes::File("r.yaml".into()));
        assert_eq!(Settings::load_from(None, env(&[])).unwrap().events.routes, EventRoutes::Builtin);
        let off = Settings::load_from(None, env(&[("ROSTER_EVENT_ROUTES", "off")])).unwrap();
        assert_eq!(off.events.routes, EventRoutes::Off);
        assert_eq!(s.events.retention, [RetentionRule { prefix: "source:".into(), days: 30 }]);
        assert_eq!(s.clickhouse.compression, ClickHouseCompression::Lz4);
        let err = Settings::load_from(None, env(&[("ROSTER_CLICKHOUSE_COMPRESSION", "gzip")])).unwrap_err();
        assert!(err.to_string().contains("gzip"));
    }

    #[test]
    fn the_patch_limit_is_a_fhir_setting_and_the_old_group_key_still_works() {
        assert_eq!(Settings::load_from(None, env(&[])).unwrap().max_patch_ops(), DEFAULT_MAX_PATCH_OPS);
        let old = Settings::load_from(None, env(&[("ROSTER_GROUP_MAX_PATCH_OPS", "7")])).unwrap();
        assert_eq!(old.max_patch_ops(), 7);
        let both =
            Settings::load_from(None, env(&[("ROSTER_GROUP_MAX_PATCH_OPS", "7"), ("ROSTER_FHIR_MAX_PATCH_OPS", "9")]))
                .unwrap();
        assert_eq!(both.max_patch_ops(), 9, "the new key wins");
        let dir = std::env::temp_dir().join(format!("roster-cfg-{}", uuid::Uuid::new_v4()));
        std::fs::create_dir_all(&dir).unwrap();
        let file = dir.join("roster.toml");
        std::fs::write(&file, "[groups]\nmax_patch_ops = 5\n").unwrap();
        assert_eq!(Settings::load_from(Some(&file), env(&[])).unwrap().max_patch_ops(), 5);
    }
}
