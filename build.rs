//! Embeds `clickhouse/*.sql` and `mongo/*.json` into the binary, in file-name order, so a
//! deployed `roster migrate` needs no files beside it.

use std::fmt::Write;
use std::path::Path;

fn list(dir: &str, ext: &str) -> Vec<(String, String)> {
    println!("cargo:rerun-if-changed={dir}");
    let root = Path::new(env!("CARGO_MANIFEST_DIR")).join(dir);
    let mut files: Vec<(String, String)> = std::fs::read_dir(&root)
        .unwrap_or_else(|e| panic!("cannot read {}: {e}", root.display()))
        .filter_map(|entry| {
            let path = entry.ok()?.path();
            let name = path.file_name()?.to_str()?.to_string();
            let stem = name.strip_suffix(ext)?.to_string();
            Some((stem, path.display().to_string()))
        })
        .collect();
    files.sort();
    files
}

fn main() {
    let mut out = String::new();
    for (konst, dir, ext) in [("CLICKHOUSE_MIGRATIONS", "clickhouse", ".sql"), ("MONGO_MIGRATIONS", "mongo", ".json")] {
        writeln!(out, "pub const {konst}: &[(&str, &str)] = &[").unwrap();
        for (name, path) in list(dir, ext) {
            writeln!(out, "    ({name:?}, include_str!({path:?})),").unwrap();
        }
        writeln!(out, "];").unwrap();
    }
    let dest = Path::new(&std::env::var("OUT_DIR").unwrap()).join("migrations.rs");
    std::fs::write(dest, out).unwrap();
}
