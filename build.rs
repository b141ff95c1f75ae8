//! Embeds `clickhouse/*.sql` and `mongo/*.json` into the binary, in file-name order, so a
//! deployed `roster migrate` needs no files beside it.

use std::fmt::Write;
use std::path::Path;

fn list(dir: &str, ext: &str) -> Vec<(String, String)> {
    println!("cargo:rerun-if-changed={dir}");
    // Read at run time, not `env!` (baked in when the script is compiled): a build script
    // binary is reused by every checkout that shares the target directory.
    let root = Path::new(&std::env::var("CARGO_MANIFEST_DIR").unwrap()).join(dir);
    let mut files: Vec<(String, String)> = std::fs::read_dir(&root)
        .unwrap_or_else(|e| panic!("cannot read {}: {e}", root.display()))
        .filter_map(|entry| {
            let path = entry.ok()?.path();
            let name = path.file_name()?.to_str()?.to_string();
            let stem = name.strip_suffix(ext)?.to_string();
            Some((stem, format!("/{dir}/{name}")))
        })
        .collect();
    files.sort();
    files
}

fn main() {
    let mut out = String::new();
    for (konst, dir, ext) in [("CLICKHOUSE_MIGRATIONS", "clickhouse", ".sql"), ("MONGO_MIGRATIONS", "mongo", ".json")] {
        writeln!(out, "pub const {konst}: &[(&str, &str)] = &[").unwrap();
        // Paths relative to the crate being compiled, so the generated file is the same
        // whichever checkout produced it.
        for (name, path) in list(dir, ext) {
            writeln!(out, "    ({name:?}, include_str!(concat!(env!(\"CARGO_MANIFEST_DIR\"), {path:?}))),").unwrap();
        }
        writeln!(out, "];").unwrap();
    }
    let dest = Path::new(&std::env::var("OUT_DIR").unwrap()).join("migrations.rs");
    std::fs::write(dest, out).unwrap();
}
