//! The FHIRPath the R4 SearchParameters are written in, evaluated over a resource's JSON.
//!
//! Why our own: the indexer runs every applicable expression on every write (20–60 per
//! resource), so it must be cheap and never fail on odd data; the expressions use a small
//! subset (paths, `|`, `where()`, `as`/`.as()`/`ofType()`, `exists()`, `resolve() is T`,
//! `=`/`!=`, `and`, `[n]`, `extension('url')`), and the crates on offer are either under
//! a source-available licence or pull a generated model far larger than the evaluator.
//!
//! Typed navigation: each value carries its FHIR type, looked up in the generated element
//! table (`elements.rs`), so `Observation.value` finds `valueQuantity` and knows it is a
//! Quantity, `as CodeableConcept` filters by type, and the extractor (`extract.rs`) knows a
//! CodeableConcept from an Identifier without guessing from the JSON's shape.
//!
//! Invariants: parsing is only of the shipped definitions (a syntax error there is a bug,
//! caught by the test that parses all 1,375); evaluation never fails: a path that does not
//! exist, a type that does not match or a value of the wrong JSON kind yields an empty
//! collection, as FHIRPath's own semantics say for absent data.

use serde_json::Value;

use super::elements::ELEMENTS;

/// A parsed expression.
#[derive(Debug, Clone, PartialEq)]
pub enum Expr {
    /// The focus itself (`$this`, or the start of a path).
    This,
    /// `%resource` (and `%context`): the resource being indexed.
    Resource,
    /// An identifier at the start of a path: a type name (`Patient.…`) that keeps the focus
    /// when it is of that type, or the name of a child element.
    Start(String),
    Child(Box<Expr>, String),
    Index(Box<Expr>, usize),
    Call(Box<Expr>, Function),
    Union(Vec<Expr>),
    Is(Box<Expr>, String),
    As(Box<Expr>, String),
    Equals(Box<Expr>, Box<Expr>, bool),
    And(Box<Expr>, Box<Expr>),
    Or(Box<Expr>, Box<Expr>),
    Str(String),
    Bool(bool),
}

#[derive(Debug, Clone, PartialEq)]
pub enum Function {
    Where(Box<Expr>),
    Exists,
    Empty,
    Not,
    First,
    Resolve,
    OfType(String),
    Extension(String),
}

/// One item of a collection.
#[derive(Debug, Clone, PartialEq)]
pub(crate) enum Item<'a> {
    /// A value in the resource and its FHIR type (`CodeableConcept`, `dateTime`, …).
    Node {
        value: &'a Value,
        ty: &'a str,
    },
    Str(String),
    Bool(bool),
    /// What `resolve()` knows of a reference's target without reading it: its type.
    Resolved(String),
}

impl Item<'_> {
    fn type_name(&self) -> &str {
        match self {
            Item::Node { ty, .. } => ty,
            Item::Str(_) => "string",
            Item::Bool(_) => "boolean",
            Item::Resolved(t) => t,
        }
    }
}

/// Quantity's specializations: `as Quantity` keeps them too.
pub(crate) const QUANTITY_KINDS: &[&str] =
    &["Quantity", "Age", "Count", "Distance", "Duration", "SimpleQuantity", "MoneyQuantity"];

fn is_type(item: &Item, wanted: &str) -> bool {
    let ty = item.type_name();
    ty == wanted
        || (wanted == "Quantity" && QUANTITY_KINDS.contains(&ty))
        || (wanted == "Resource" || wanted == "DomainResource")
            && ty.starts_with(|c: char| c.is_ascii_uppercase())
            && matches!(item, Item::Node { value, .. } if value.get("resourceType").is_some())
}

#[derive(Debug, Clone, PartialEq)]
pub(crate) struct ParseError(pub String);

impl std::fmt::Display for ParseError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "FHIRPath: {}", self.0)
    }
}

#[derive(Debug, Clone, PartialEq)]
enum Token {
    Ident(String),
    Str(String),
    Int(usize),
    Sym(&'static str),
}

fn tokenize(s: &str) -> Result<Vec<Token>, ParseError> {
    let chars: Vec<char> = s.chars().collect();
    let mut out = Vec::new();
    let mut i = 0;
    while i < chars.len() {
        let c = chars[i];
        match c {
            c if c.is_whitespace() => i += 1,
            '\'' => {
                let mut lit = String::new();
                i += 1;
                while i < chars.len() && chars[i] != '\'' {
                    if chars[i] == '\\' && i + 1 < chars.len() {
                        i += 1;
                    }
                    lit.push(chars[i]);
                    i += 1;
                }
                if i >= chars.len() {
                    return Err(ParseError(format!("unterminated string in '{s}'")));
                }
                i += 1;
                out.push(Token::Str(lit));
            }
            '`' => {
                let end = chars[i + 1..].iter().position(|c| *c == '`').ok_or_else(|| ParseError(s.into()))?;
                out.push(Token::Ident(chars[i + 1..i + 1 + end].iter().collect()));
                i += end + 2;
            }
            c if c.is_ascii_digit() => {
                let start = i;
                while i < chars.len() && chars[i].is_ascii_digit() {
                    i += 1;
                }
                let n: String = chars[start..i].iter().collect();
                out.push(Token::Int(n.parse().map_err(|_| ParseError(format!("bad number in '{s}'")))?));
            }
            c if c.is_alphabetic() || c == '_' || c == '$' || c == '%' => {
                let start = i;
                i += 1;
                while i < chars.len() && (chars[i].is_alphanumeric() || chars[i] == '_') {
                    i += 1;
                }
                out.push(Token::Ident(chars[start..i].iter().collect()));
            }
            '!' if chars.get(i + 1) == Some(&'=') => {
                out.push(Token::Sym("!="));
                i += 2;
            }
            _ => {
                let sym = match c {
                    '.' => ".",
                    '(' => "(",
                    ')' => ")",
                    '[' => "[",
                    ']' => "]",
                    '|' => "|",
                    '=' => "=",
                    ',' => ",",
                    _ => return Err(ParseError(format!("unexpected '{c}' in '{s}'"))),
                };
                out.push(Token::Sym(sym));
                i += 1;
            }
        }
    }
    Ok(out)
}

struct Parser {
    tokens: Vec<Token>,
    at: usize,
    text: String,
}

impl Parser {
    fn peek(&self) -> Option<&Token> {
        self.tokens.get(self.at)
    }

    fn eat_sym(&mut self, sym: &str) -> bool {
        if matches!(self.peek(), Some(Token::Sym(s)) if *s == sym) {
            self.at += 1;
            return true;
        }
        false
    }

    fn eat_word(&mut self, word: &str) -> bool {
        if matches!(self.peek(), Some(Token::Ident(w)) if w == word) {
            self.at += 1;
            return true;
        }
        false
    }

    fn error(&self, what: &str) -> ParseError {
        ParseError(format!("{what} at token {} of '{}'", self.at, self.text))
    }

    fn expect_sym(&mut self, sym: &str) -> Result<(), ParseError> {
        match self.eat_sym(sym) {
            true => Ok(()),
            false => Err(self.error(&format!("expected '{sym}'"))),
        }
    }

    fn or(&mut self) -> Result<Expr, ParseError> {
        let mut left = self.and()?;
        while self.eat_word("or") {
            left = Expr::Or(Box::new(left), Box::new(self.and()?));
        }
        Ok(left)
    }

    fn and(&mut self) -> Result<Expr, ParseError> {
        let mut left = self.equality()?;
        while self.eat_word("and") {
            left = Expr::And(Box::new(left), Box::new(self.equality()?));
        }
        Ok(left)
    }

    fn equality(&mut self) -> Result<Expr, ParseError> {
        let left = self.union()?;
        for (sym, negated) in [("=", false), ("!=", true)] {
            if self.eat_sym(sym) {
                return Ok(Expr::Equals(Box::new(left), Box::new(self.union()?), negated));
            }
        }
        Ok(left)
    }

    fn union(&mut self) -> Result<Expr, ParseError> {
        let mut parts = vec![self.type_op()?];
        while self.eat_sym("|") {
            parts.push(self.type_op()?);
        }
        Ok(if parts.len() == 1 { parts.remove(0) } else { Expr::Union(parts) })
    }

    fn type_op(&mut self) -> Result<Expr, ParseError> {
        let left = self.postfix()?;
        if self.eat_word("is") {
            return Ok(Expr::Is(Box::new(left), self.type_name()?));
        }
        if self.eat_word("as") {
            return Ok(Expr::As(Box::new(left), self.type_name()?));
        }
        Ok(left)
    }

    /// A type specifier, namespace dropped (`FHIR.Patient`, `System.String`).
    fn type_name(&mut self) -> Result<String, ParseError> {
        let mut name = self.ident()?;
        while self.eat_sym(".") {
            name = self.ident()?;
        }
        Ok(name)
    }

    fn ident(&mut self) -> Result<String, ParseError> {
        match self.peek().cloned() {
            Some(Token::Ident(w)) => {
                self.at += 1;
                Ok(w)
            }
            _ => Err(self.error("expected a name")),
        }
    }

    fn postfix(&mut self) -> Result<Expr, ParseError> {
        let mut expr = self.term()?;
        loop {
            if self.eat_sym(".") {
                let name = self.ident()?;
                expr = match self.eat_sym("(") {
                    true => self.call(expr, &name)?,
                    false => Expr::Child(Box::new(expr), name),
                };
            } else if self.eat_sym("[") {
                let n = match self.peek().cloned() {
                    Some(Token::Int(n)) => n,
                    _ => return Err(self.error("expected an index")),
                };
                self.at += 1;
                self.expect_sym("]")?;
                expr = Expr::Index(Box::new(expr), n);
            } else {
                return Ok(expr);
            }
        }
    }

    fn term(&mut self) -> Result<Expr, ParseError> {
        match self.peek().cloned() {
            Some(Token::Sym("(")) => {
                self.at += 1;
                let inner = self.or()?;
                self.expect_sym(")")?;
                Ok(inner)
            }
            Some(Token::Str(s)) => {
                self.at += 1;
                Ok(Expr::Str(s))
            }
            Some(Token::Ident(w)) => {
                self.at += 1;
                match w.as_str() {
                    "true" => Ok(Expr::Bool(true)),
                    "false" => Ok(Expr::Bool(false)),
                    "$this" => Ok(Expr::This),
                    "%resource" | "%context" | "%rootResource" => Ok(Expr::Resource),
                    _ if self.eat_sym("(") => self.call(Expr::This, &w),
                    _ => Ok(Expr::Start(w)),
                }
            }
            _ => Err(self.error("expected an expression")),
        }
    }

    /// A function call; the opening parenthesis is consumed.
    fn call(&mut self, on: Expr, name: &str) -> Result<Expr, ParseError> {
        let function = match name {
            "where" => Function::Where(Box::new(self.or()?)),
            "exists" => Function::Exists,
            "empty" => Function::Empty,
            "not" => Function::Not,
            "first" => Function::First,
            "resolve" => Function::Resolve,
            "as" | "ofType" => Function::OfType(self.type_name()?),
            "extension" => match self.peek().cloned() {
                Some(Token::Str(url)) => {
                    self.at += 1;
                    Function::Extension(url)
                }
                _ => return Err(self.error("extension() takes a string")),
            },
            other => return Err(self.error(&format!("function {other}() is not supported"))),
        };
        self.expect_sym(")")?;
        Ok(Expr::Call(Box::new(on), function))
    }
}

/// Parses one expression.
pub(crate) fn parse(text: &str) -> Result<Expr, ParseError> {
    let mut p = Parser { tokens: tokenize(text)?, at: 0, text: text.to_string() };
    let expr = p.or()?;
    match p.at == p.tokens.len() {
        true => Ok(expr),
        false => Err(p.error("unexpected trailing input")),
    }
}

/// The element table's rows for `owner.name`.
fn rows(owner: &str, name: &str) -> &'static [(&'static str, &'static str, &'static str, &'static str)] {
    let start = ELEMENTS.partition_point(|(o, n, _, _)| (*o, *n) < (owner, name));
    let len = ELEMENTS[start..].iter().take_while(|(o, n, _, _)| *o == owner && *n == name).count();
    &ELEMENTS[start..start + len]
}

/// The type of a value the table calls `Resource` (contained, Bundle entries): its own.
fn concrete<'a>(value: &'a Value, ty: &'a str) -> &'a str {
    match ty {
        "Resource" => value.get("resourceType").and_then(Value::as_str).unwrap_or(ty),
        _ => ty,
    }
}

fn push_values<'a>(out: &mut Vec<Item<'a>>, value: &'a Value, ty: &'a str) {
    match value {
        Value::Array(items) => {
            for v in items {
                if !v.is_null() {
                    out.push(Item::Node { value: v, ty: concrete(v, ty) });
                }
            }
        }
        Value::Null => {}
        v => out.push(Item::Node { value: v, ty: concrete(v, ty) }),
    }
}

fn children<'a>(item: &Item<'a>, name: &str, out: &mut Vec<Item<'a>>) {
    let Item::Node { value, ty } = item else { return };
    let Some(object) = value.as_object() else { return };
    if name == "extension" || name == "modifierExtension" {
        if let Some(v) = object.get(name) {
            push_values(out, v, "Extension");
        }
        return;
    }
    let rows = rows(ty, name);
    if rows.is_empty() {
        // Not in the model (a type the table lacks): the JSON name, type unknown.
        if let Some(v) = object.get(name) {
            push_values(out, v, "");
        }
        return;
    }
    for (_, _, choice, element_type) in rows {
        let v = match choice.is_empty() {
            true => object.get(name),
            false => object.get(&format!("{name}{choice}")),
        };
        if let Some(v) = v {
            push_values(out, v, element_type);
        }
    }
}

/// The resource type a reference names, from its `reference` (relative, absolute or
/// contained) or its `type`.
pub(crate) fn reference_type<'a>(reference: &'a Value, root: &'a Value) -> Option<&'a str> {
    if let Some(r) = reference.get("reference").and_then(Value::as_str) {
        if let Some(local) = r.strip_prefix('#') {
            return root.get("contained").and_then(Value::as_array).and_then(|c| {
                c.iter()
                    .find(|x| x.get("id").and_then(Value::as_str) == Some(local))
                    .and_then(|x| x.get("resourceType").and_then(Value::as_str))
            });
        }
        let path = r.split(['?', '#']).next().unwrap_or(r);
        let segments: Vec<&str> = path.split('/').collect();
        // […/]Type/id[/_history/v]
        let at = match segments.len() {
            n if n >= 4 && segments[n - 2] == "_history" => n - 4,
            n if n >= 2 => n - 2,
            _ => return reference.get("type").and_then(Value::as_str),
        };
        let t = segments[at];
        if t.starts_with(|c: char| c.is_ascii_uppercase()) {
            return Some(t);
        }
    }
    reference.get("type").and_then(Value::as_str).map(|t| t.rsplit('/').next().unwrap_or(t))
}

fn truthy(items: &[Item]) -> bool {
    matches!(items, [Item::Bool(true)])
}

fn equal(a: &Item, b: &Item) -> Option<bool> {
    let text = |i: &Item| -> Option<String> {
        match i {
            Item::Str(s) => Some(s.clone()),
            Item::Node { value: Value::String(s), .. } => Some(s.clone()),
            _ => None,
        }
    };
    let boolean = |i: &Item| -> Option<bool> {
        match i {
            Item::Bool(b) => Some(*b),
            Item::Node { value: Value::Bool(b), .. } => Some(*b),
            _ => None,
        }
    };
    if let (Some(x), Some(y)) = (boolean(a), boolean(b)) {
        return Some(x == y);
    }
    if let (Some(x), Some(y)) = (text(a), text(b)) {
        return Some(x == y);
    }
    match (a, b) {
        (Item::Node { value: x, .. }, Item::Node { value: y, .. }) => Some(x == y),
        // Values of different kinds (a dateTime and `false`) are not equal.
        _ => Some(false),
    }
}

/// Evaluates `expr` on `focus`; `root` is the resource (for `resolve()` of contained ones).
pub(crate) fn evaluate<'a>(expr: &Expr, focus: &[Item<'a>], root: &'a Value) -> Vec<Item<'a>> {
    match expr {
        Expr::This => focus.to_vec(),
        Expr::Resource => {
            let ty = root.get("resourceType").and_then(Value::as_str).unwrap_or("");
            vec![Item::Node { value: root, ty }]
        }
        Expr::Start(name) => {
            if name.starts_with(|c: char| c.is_ascii_uppercase()) {
                // A type name: the focus, where it is of that type.
                return focus.iter().filter(|i| is_type(i, name)).cloned().collect();
            }
            let mut out = Vec::new();
            for item in focus {
                children(item, name, &mut out);
            }
            out
        }
        Expr::Child(on, name) => {
            let mut out = Vec::new();
            for item in evaluate(on, focus, root) {
                children(&item, name, &mut out);
            }
            out
        }
        Expr::Index(on, n) => evaluate(on, focus, root).into_iter().nth(*n).into_iter().collect(),
        Expr::Union(parts) => {
            let mut out: Vec<Item> = Vec::new();
            for p in parts {
                for item in evaluate(p, focus, root) {
                    if !out.contains(&item) {
                        out.push(item);
                    }
                }
            }
            out
        }
        Expr::Is(on, t) => match evaluate(on, focus, root).as_slice() {
            [one] => vec![Item::Bool(is_type(one, t))],
            _ => vec![],
        },
        Expr::As(on, t) => evaluate(on, focus, root).into_iter().filter(|i| is_type(i, t)).collect(),
        Expr::Equals(a, b, negated) => {
            let (a, b) = (evaluate(a, focus, root), evaluate(b, focus, root));
            match (a.as_slice(), b.as_slice()) {
                ([x], [y]) => equal(x, y).map(|e| Item::Bool(e != *negated)).into_iter().collect(),
                _ => vec![],
            }
        }
        Expr::And(a, b) => {
            let (a, b) = (evaluate(a, focus, root), evaluate(b, focus, root));
            match (a.as_slice(), b.as_slice()) {
                ([Item::Bool(false)], _) | (_, [Item::Bool(false)]) => vec![Item::Bool(false)],
                ([Item::Bool(true)], [Item::Bool(true)]) => vec![Item::Bool(true)],
                _ => vec![],
            }
        }
        Expr::Or(a, b) => {
            let (a, b) = (evaluate(a, focus, root), evaluate(b, focus, root));
            match (a.as_slice(), b.as_slice()) {
                ([Item::Bool(true)], _) | (_, [Item::Bool(true)]) => vec![Item::Bool(true)],
                ([Item::Bool(false)], [Item::Bool(false)]) => vec![Item::Bool(false)],
                _ => vec![],
            }
        }
        Expr::Str(s) => vec![Item::Str(s.clone())],
        Expr::Bool(b) => vec![Item::Bool(*b)],
        Expr::Call(on, function) => {
            let input = evaluate(on, focus, root);
            match function {
                Function::Where(condition) => {
                    input.into_iter().filter(|i| truthy(&evaluate(condition, std::slice::from_ref(i), root))).collect()
                }
                Function::Exists => vec![Item::Bool(!input.is_empty())],
                Function::Empty => vec![Item::Bool(input.is_empty())],
                Function::Not => match input.as_slice() {
                    [Item::Bool(b)] => vec![Item::Bool(!b)],
                    _ => vec![],
                },
                Function::First => input.into_iter().take(1).collect(),
                Function::Resolve => input
                    .iter()
                    .filter_map(|i| match i {
                        Item::Node { value, ty: "Reference" } => reference_type(value, root),
                        Item::Node { value: Value::String(s), .. } => reference_type_of_url(s),
                        _ => None,
                    })
                    .map(|t| Item::Resolved(t.to_string()))
                    .collect(),
                Function::OfType(t) => input.into_iter().filter(|i| is_type(i, t)).collect(),
                Function::Extension(url) => {
                    let mut all = Vec::new();
                    for item in &input {
                        children(item, "extension", &mut all);
                    }
                    all.into_iter()
                        .filter(|e| matches!(e, Item::Node { value, .. } if value.get("url").and_then(Value::as_str) == Some(url)))
                        .collect()
                }
            }
        }
    }
}

/// The type named by a reference URL (`Patient/1`, `http://x/fhir/Patient/1`), if any.
fn reference_type_of_url(url: &str) -> Option<&str> {
    let segments: Vec<&str> = url.split('/').collect();
    let n = segments.len();
    (n >= 2).then(|| segments[n - 2]).filter(|t| t.starts_with(|c: char| c.is_ascii_uppercase()))
}

/// Evaluates `expr` on a resource.
pub(crate) fn evaluate_resource<'a>(expr: &Expr, resource: &'a Value) -> Vec<Item<'a>> {
    let ty = resource.get("resourceType").and_then(Value::as_str).unwrap_or("");
    evaluate(expr, &[Item::Node { value: resource, ty }], resource)
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn eval(expr: &str, resource: &Value) -> Vec<Value> {
        let e = parse(expr).unwrap();
        evaluate_resource(&e, resource)
            .into_iter()
            .map(|i| match i {
                Item::Node { value, ty } => json!({ "ty": ty, "v": value }),
                Item::Str(s) => json!(s),
                Item::Bool(b) => json!(b),
                Item::Resolved(t) => json!({ "resolved": t }),
            })
            .collect()
    }

    #[test]
    fn paths_choices_and_types() {
        let obs = json!({"resourceType": "Observation", "code": {"text": "x"},
            "valueQuantity": {"value": 5}, "component": [{"valueCodeableConcept": {"text": "a"}}, {"valueString": "s"}]});
        assert_eq!(eval("Observation.value", &obs), vec![json!({"ty": "Quantity", "v": {"value": 5}})]);
        assert_eq!(eval("(Observation.value as Quantity)", &obs).len(), 1);
        assert!(eval("(Observation.value as CodeableConcept)", &obs).is_empty());
        assert_eq!(eval("Observation.component.value.as(CodeableConcept)", &obs).len(), 1);
        assert_eq!(
            eval("(Observation.component.value as CodeableConcept).text", &obs),
            vec![json!({"ty": "string", "v": "a"})]
        );
        assert!(eval("Patient.name", &obs).is_empty(), "another type's path yields nothing");
        assert_eq!(eval("Patient.name | Observation.code", &obs).len(), 1);
    }

    #[test]
    fn where_resolve_and_booleans() {
        let acc = json!({"resourceType": "Account", "subject": [{"reference": "Patient/1"}, {"reference": "Device/2"},
            {"reference": "http://example.org/fhir/Patient/3/_history/2"}]});
        assert_eq!(eval("Account.subject.where(resolve() is Patient)", &acc).len(), 2);
        let p = json!({"resourceType": "Patient", "deceasedBoolean": false,
            "telecom": [{"system": "email", "value": "a@b"}, {"system": "phone", "value": "1"}]});
        assert_eq!(eval("Patient.deceased.exists() and Patient.deceased != false", &p), vec![json!(false)]);
        let p2 = json!({"resourceType": "Patient", "deceasedDateTime": "2020"});
        assert_eq!(eval("Patient.deceased.exists() and Patient.deceased != false", &p2), vec![json!(true)]);
        assert_eq!(eval("Patient.telecom.where(system='email')", &p).len(), 1);
        let b = json!({"resourceType": "Bundle", "entry": [{"resource": {"resourceType": "Composition", "id": "c"}}]});
        assert_eq!(
            eval("Bundle.entry[0].resource", &b),
            vec![json!({"ty": "Composition", "v": {"resourceType": "Composition", "id": "c"}})]
        );
    }

    #[test]
    fn contained_references_and_extensions() {
        let r = json!({"resourceType": "Account", "contained": [{"resourceType": "Patient", "id": "p"}],
            "subject": [{"reference": "#p"}], "extension": [{"url": "u", "valueString": "v"}]});
        assert_eq!(eval("Account.subject.where(resolve() is Patient)", &r).len(), 1);
        assert_eq!(eval("Account.extension('u').value", &r), vec![json!({"ty": "string", "v": "v"})]);
    }

    #[test]
    fn every_shipped_expression_parses() {
        let defs: Vec<Value> = serde_json::from_str(include_str!("search-parameters.json")).unwrap();
        let mut parsed = 0;
        for d in &defs {
            if let Some(e) = d.get("expression").and_then(Value::as_str) {
                parse(e).unwrap_or_else(|err| panic!("{}: {err}", d["url"]));
                parsed += 1;
            }
            for c in d.get("component").and_then(Value::as_array).into_iter().flatten() {
                parse(c["expression"].as_str().unwrap()).unwrap();
            }
        }
        assert_eq!(parsed, 1372);
    }
}
