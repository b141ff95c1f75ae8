//! What a query may cost before async-graphql parses and validates it (see the parent
//! module's doc): body size, bracket nesting, and fields with fragments expanded, counted
//! once per fragment.

use std::collections::HashMap;

use async_graphql::parser::types::{ExecutableDocument, Selection, SelectionSet};

use super::{MAX_NESTING, MAX_SELECTIONS};

/// Refuses a query whose parsing or validation would cost more than its size suggests
/// (see the module doc). Linear in the query's length. Returns the parsed document, which
/// the request then carries, so async-graphql does not parse it again.
pub fn guard(query: &str) -> Result<ExecutableDocument, String> {
    let nesting = nesting_depth(query);
    if nesting > MAX_NESTING {
        return Err(format!("brackets nest {nesting} deep; at most {MAX_NESTING} are allowed"));
    }
    let document = async_graphql::parser::parse_query(query).map_err(|e| e.to_string())?;
    let mut count = Expansion { document: &document, sizes: HashMap::new(), open: Vec::new() };
    for (_, operation) in document.operations.iter() {
        let n = count.selections(&operation.node.selection_set.node)?;
        if n > MAX_SELECTIONS {
            return Err(format!(
                "the operation selects {n} fields once its fragments are expanded; at most {MAX_SELECTIONS} are allowed"
            ));
        }
    }
    Ok(document)
}

/// The deepest nesting of `{`, `(` and `[` outside strings and comments.
fn nesting_depth(query: &str) -> usize {
    let (mut depth, mut deepest) = (0usize, 0usize);
    let mut chars = query.chars().peekable();
    while let Some(c) = chars.next() {
        match c {
            '{' | '(' | '[' => {
                depth += 1;
                deepest = deepest.max(depth);
            }
            '}' | ')' | ']' => depth = depth.saturating_sub(1),
            '#' => {
                for c in chars.by_ref() {
                    if c == '\n' || c == '\r' {
                        break;
                    }
                }
            }
            '"' => {
                // A string or a block string: skip to its end (escapes included).
                while let Some(c) = chars.next() {
                    match c {
                        '\\' => {
                            chars.next();
                        }
                        '"' => break,
                        _ => {}
                    }
                }
            }
            _ => {}
        }
    }
    deepest
}

/// Counts the fields an operation selects with fragments expanded, once per fragment.
struct Expansion<'a> {
    document: &'a ExecutableDocument,
    sizes: HashMap<&'a str, u64>,
    /// Fragments being counted (a spread of one of them is a cycle).
    open: Vec<&'a str>,
}

impl<'a> Expansion<'a> {
    fn selections(&mut self, set: &'a SelectionSet) -> Result<u64, String> {
        let mut n = 0u64;
        for item in &set.items {
            let size = match &item.node {
                Selection::Field(f) => 1 + self.selections(&f.node.selection_set.node)?,
                Selection::InlineFragment(f) => self.selections(&f.node.selection_set.node)?,
                Selection::FragmentSpread(s) => self.fragment(s.node.fragment_name.node.as_str())?,
            };
            n = n.saturating_add(size);
        }
        Ok(n)
    }

    fn fragment(&mut self, name: &'a str) -> Result<u64, String> {
        if let Some(n) = self.sizes.get(name) {
            return Ok(*n);
        }
        if self.open.contains(&name) {
            return Err(format!("fragment '{name}' spreads itself"));
        }
        if self.open.len() >= MAX_NESTING {
            return Err(format!("fragments spread each other more than {MAX_NESTING} deep"));
        }
        let Some(definition) = self.document.fragments.get(name) else {
            return Err(format!("unknown fragment '{name}'"));
        };
        self.open.push(name);
        let n = self.selections(&definition.node.selection_set.node);
        self.open.pop();
        let n = n?;
        self.sizes.insert(name, n);
        Ok(n)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// `levels` fragments, each spreading the next twice; the last selects one field.
    fn fragment_bomb(levels: usize) -> String {
        let mut q = String::from("query Q { ...F0 }\n");
        for i in 0..levels {
            q.push_str(&format!("fragment F{i} on Query {{ __typename ...F{n} ...F{n} }}\n", n = i + 1));
        }
        q.push_str(&format!("fragment F{levels} on Query {{ __typename }}\n"));
        q
    }

    #[test]
    fn a_fragment_bomb_is_refused_before_expansion() {
        let started = std::time::Instant::now();
        let refused = guard(&fragment_bomb(30)).unwrap_err();
        assert!(refused.contains("fragments are expanded") && refused.contains("2147483647"), "{refused}");
        // Counting is linear: even 1,000 levels (a count far past u64) is refused, saturated.
        assert!(guard(&fragment_bomb(1000)).is_err());
        assert!(started.elapsed() < std::time::Duration::from_secs(5), "the guard must not expand");
        assert!(guard(&fragment_bomb(10)).is_ok(), "2,047 fields are within the limit");
    }

    #[test]
    fn cycles_unknown_fragments_and_deep_brackets_are_refused() {
        assert!(guard("query { ...A } fragment A on Query { ...B } fragment B on Query { ...A }")
            .unwrap_err()
            .contains("spreads itself"));
        assert!(guard("query { ...Nope }").unwrap_err().contains("unknown fragment"));
        let deep = format!("{}{}", "{a".repeat(10_000), "}".repeat(10_000));
        assert!(guard(&deep).unwrap_err().contains("nest 10000 deep"));
        // Brackets inside strings and comments do not count.
        let quoted = format!("{{ a(s: \"{}\\\"\") # {}\n }}", "{".repeat(100), "[".repeat(100));
        assert_eq!(nesting_depth(&quoted), 2);
        assert!(guard("{ nope ").is_err());
    }
}
