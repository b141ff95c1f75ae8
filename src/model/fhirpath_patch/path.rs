//! Parsing path expressions (the FHIRPath subset of the parent module's doc).

use super::*;

struct Parser<'a> {
    s: &'a [u8],
    pos: usize,
    depth: usize,
}

/// Parses a path expression.
pub fn parse_path(text: &str) -> Result<Vec<Step>, String> {
    if text.len() > MAX_PATH {
        return Err(format!("the path is longer than {MAX_PATH} bytes"));
    }
    let mut p = Parser { s: text.as_bytes(), pos: 0, depth: 0 };
    let steps = p.path(false)?;
    p.ws();
    if p.pos != p.s.len() {
        return Err(format!("unexpected '{}' at offset {} of the path", &text[p.pos..], p.pos));
    }
    Ok(steps)
}

impl Parser<'_> {
    fn ws(&mut self) {
        while self.s.get(self.pos).is_some_and(u8::is_ascii_whitespace) {
            self.pos += 1;
        }
    }

    fn eat(&mut self, token: &str) -> bool {
        self.ws();
        if self.s[self.pos..].starts_with(token.as_bytes()) {
            self.pos += token.len();
            true
        } else {
            false
        }
    }

    fn identifier(&mut self) -> Option<String> {
        self.ws();
        if self.s.get(self.pos) == Some(&b'`') {
            let end = self.s[self.pos + 1..].iter().position(|b| *b == b'`')?;
            let id = String::from_utf8_lossy(&self.s[self.pos + 1..self.pos + 1 + end]).into_owned();
            self.pos += end + 2;
            return Some(id);
        }
        let start = self.pos;
        while self.s.get(self.pos).is_some_and(|b| b.is_ascii_alphanumeric() || *b == b'_') {
            self.pos += 1;
        }
        let id = &self.s[start..self.pos];
        (!id.is_empty() && !id[0].is_ascii_digit()).then(|| String::from_utf8_lossy(id).into_owned())
    }

    /// A path; inside `where()` (`criterion`), `exists()`, `empty()` and `not()` come
    /// back as pseudo-names ending in `()`.
    fn path(&mut self, criterion: bool) -> Result<Vec<Step>, String> {
        let mut steps = Vec::new();
        loop {
            let at = self.pos;
            let name = self.identifier().ok_or_else(|| format!("expected an element name at offset {at}"))?;
            if self.eat("(") {
                match name.as_str() {
                    "exists" | "empty" | "not" if criterion => {
                        if !self.eat(")") {
                            return Err(format!("{name}() takes no arguments here"));
                        }
                        steps.push(Step::Name(format!("{name}()")));
                    }
                    _ => steps.push(self.function(&name)?),
                }
            } else {
                steps.push(Step::Name(name));
            }
            while self.eat("[") {
                self.ws();
                let start = self.pos;
                while self.s.get(self.pos).is_some_and(u8::is_ascii_digit) {
                    self.pos += 1;
                }
                let n = std::str::from_utf8(&self.s[start..self.pos])
                    .ok()
                    .and_then(|d| d.parse::<usize>().ok())
                    .ok_or_else(|| format!("expected an index at offset {start}"))?;
                if !self.eat("]") {
                    return Err(format!("expected ']' at offset {}", self.pos));
                }
                steps.push(Step::Index(n));
            }
            if !self.eat(".") {
                return Ok(steps);
            }
        }
    }

    fn function(&mut self, name: &str) -> Result<Step, String> {
        let step = match name {
            "first" => Step::First,
            "last" => Step::Last,
            "ofType" => Step::OfType(self.identifier().ok_or("ofType() needs a type name")?),
            "where" => {
                self.depth += 1;
                if self.depth > MAX_DEPTH {
                    return Err(format!("where() nests deeper than {MAX_DEPTH}"));
                }
                let c = self.or()?;
                self.depth -= 1;
                Step::Where(Box::new(c))
            }
            other => {
                return Err(format!(
                    "the function {other}() is not supported in a patch path (first, last, ofType, where)"
                ))
            }
        };
        if !self.eat(")") {
            return Err(format!("expected ')' at offset {}", self.pos));
        }
        Ok(step)
    }

    fn or(&mut self) -> Result<Criterion, String> {
        let mut left = self.and()?;
        while self.keyword("or") {
            left = Criterion::Or(Box::new(left), Box::new(self.and()?));
        }
        Ok(left)
    }

    fn and(&mut self) -> Result<Criterion, String> {
        let mut left = self.term()?;
        while self.keyword("and") {
            left = Criterion::And(Box::new(left), Box::new(self.term()?));
        }
        Ok(left)
    }

    fn keyword(&mut self, word: &str) -> bool {
        let save = self.pos;
        self.ws();
        if self.s[self.pos..].starts_with(word.as_bytes())
            && !self.s.get(self.pos + word.len()).is_some_and(|b| b.is_ascii_alphanumeric())
        {
            self.pos += word.len();
            true
        } else {
            self.pos = save;
            false
        }
    }

    fn term(&mut self) -> Result<Criterion, String> {
        if self.eat("(") {
            self.depth += 1;
            if self.depth > MAX_DEPTH {
                return Err(format!("criteria nest deeper than {MAX_DEPTH}"));
            }
            let inner = self.or()?;
            self.depth -= 1;
            if !self.eat(")") {
                return Err(format!("expected ')' at offset {}", self.pos));
            }
            return Ok(inner);
        }
        let mut path = self.path(true)?;
        let mut criterion = match path.last() {
            Some(Step::Name(n)) if n == "exists" || n == "empty" || n == "not" => {
                return Err(format!("{n} must be called: {n}()"));
            }
            _ => None,
        };
        // `exists()`, `empty()` and `not()` were parsed as names followed by `()`.
        while let Some(Step::Name(n)) = path.last().cloned() {
            let function = match n.as_str() {
                "exists()" | "empty()" | "not()" => n,
                _ => break,
            };
            path.pop();
            criterion = Some(match (function.as_str(), criterion.take()) {
                ("exists()", None) => Criterion::Exists(std::mem::take(&mut path)),
                ("empty()", None) => Criterion::Empty(std::mem::take(&mut path)),
                ("not()", Some(c)) if path.is_empty() => Criterion::Not(Box::new(c)),
                _ => return Err("not() must follow a criterion, as in exists().not()".into()),
            });
        }
        if let Some(c) = criterion {
            return Ok(c);
        }
        let equal = if self.eat("!=") {
            false
        } else if self.eat("=") {
            true
        } else {
            return Err(format!("expected '=', '!=' or exists() at offset {}", self.pos));
        };
        let literal = self.literal()?;
        Ok(Criterion::Compare { path, equal, literal })
    }

    fn literal(&mut self) -> Result<Value, String> {
        self.ws();
        match self.s.get(self.pos) {
            Some(b'\'') => {
                let mut out = Vec::new();
                let mut i = self.pos + 1;
                loop {
                    match self.s.get(i) {
                        None => return Err("unterminated string literal".into()),
                        Some(b'\\') => {
                            let escaped = *self.s.get(i + 1).ok_or("unterminated string literal")?;
                            out.push(match escaped {
                                b'n' => b'\n',
                                b't' => b'\t',
                                b'r' => b'\r',
                                other => other,
                            });
                            i += 2;
                        }
                        Some(b'\'') => break,
                        Some(b) => {
                            out.push(*b);
                            i += 1;
                        }
                    }
                }
                self.pos = i + 1;
                Ok(Value::String(String::from_utf8_lossy(&out).into_owned()))
            }
            _ if self.keyword("true") => Ok(Value::Bool(true)),
            _ if self.keyword("false") => Ok(Value::Bool(false)),
            _ => {
                let start = self.pos;
                while self.s.get(self.pos).is_some_and(|b| b.is_ascii_digit() || matches!(b, b'-' | b'.')) {
                    self.pos += 1;
                }
                let text = std::str::from_utf8(&self.s[start..self.pos]).unwrap_or("");
                serde_json::from_str::<Value>(text)
                    .ok()
                    .filter(Value::is_number)
                    .ok_or_else(|| format!("expected a literal at offset {start}"))
            }
        }
    }
}
