//! Reading `agent.yaml` into an [`AgentSpec`], strictly, with errors that name the line.
//!
//! The text is parsed by `saphyr-parser` (a YAML 1.2 event parser that reports positions) into a
//! small tree that keeps each node's line and column. The tree is then checked against the
//! schema of `agent.yaml` key by key (unknown keys, wrong types and unknown enum values are
//! errors naming the key, the line and the column), converted to JSON, deserialized into
//! [`AgentSpec`] (the same type, with unknown keys refused, that the server reads) and checked
//! with [`AgentSpec::validate`], whose errors are traced back to the line of the key they name.
//!
//! Plain scalars follow YAML 1.2's core schema: `yes`, `no`, `on` and `off` are strings, not
//! booleans. Where the schema wants a string (`name`, `env` values, ...) any scalar is taken as
//! written (`DEBUG: 1` gives `"1"`, `RATIO: 1.50` gives `"1.50"`); where it wants a number, a
//! quoted string is an error. A key given with no value (`env:`) counts as absent.

use std::collections::BTreeMap;
use std::fmt;
use std::path::{Path, PathBuf};

use hangar_proto::agent::{AgentSpec, ByteSize, HumanDuration};
use saphyr_parser::{Event, Parser, ScalarStyle, ScanError, Span, StrInput, Tag};
use serde_json::{Map, Number, Value};

/// The names `load` looks for in an agent's directory, in this order.
pub const FILE_NAMES: [&str; 2] = ["agent.yaml", "agent.yml"];

/// A mistake in `agent.yaml`, with where it is.
///
/// Displays like a compiler message:
/// `examples/notes/agent.yaml:7:1: unknown key `idle_timout` (did you mean `idle_timeout`?)`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SpecError {
    /// The file (or, when no file was found, the path that was tried).
    pub file: PathBuf,
    /// 1-based, when the mistake has a place in the file.
    pub line: Option<usize>,
    /// 1-based, in characters.
    pub column: Option<usize>,
    /// The key path the mistake is about, like `resources.memory` or `protocols[1]`.
    pub key: Option<String>,
    pub message: String,
}

impl fmt::Display for SpecError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}", self.file.display())?;
        if let Some(line) = self.line {
            write!(f, ":{line}")?;
            if let Some(column) = self.column {
                write!(f, ":{column}")?;
            }
        }
        write!(f, ": {}", self.message)
    }
}

impl std::error::Error for SpecError {}

/// Reads the agent's spec from `dir/agent.yaml` (or `dir/agent.yml`); `dir` may also name the
/// file itself. Returns the spec and the file it came from.
pub fn load(dir: &Path) -> Result<(AgentSpec, PathBuf), SpecError> {
    let file = find(dir)?;
    let text = std::fs::read_to_string(&file).map_err(|e| SpecError {
        file: file.clone(),
        line: None,
        column: None,
        key: None,
        message: format!("cannot read: {e}"),
    })?;
    let spec = parse(&text, &file)?;
    Ok((spec, file))
}

/// The spec file of the agent in `dir` (or `dir` itself when it is a file).
pub fn find(dir: &Path) -> Result<PathBuf, SpecError> {
    let fail = |file: PathBuf, message: String| SpecError {
        file,
        line: None,
        column: None,
        key: None,
        message,
    };
    if dir.is_file() {
        return Ok(dir.to_path_buf());
    }
    if !dir.is_dir() {
        return Err(fail(dir.to_path_buf(), "no such directory".into()));
    }
    let found: Vec<PathBuf> = FILE_NAMES
        .iter()
        .map(|n| dir.join(n))
        .filter(|p| p.is_file())
        .collect();
    match found.as_slice() {
        [one] => Ok(one.clone()),
        [] => Err(fail(
            dir.join(FILE_NAMES[0]),
            format!(
                "not found (nor {}); an agent's directory needs an agent.yaml",
                FILE_NAMES[1]
            ),
        )),
        _ => Err(fail(
            dir.join(FILE_NAMES[0]),
            format!("{} is there too; keep only one of them", FILE_NAMES[1]),
        )),
    }
}

/// Parses the text of an `agent.yaml`; `file` is only used to name it in errors.
pub fn parse(text: &str, file: &Path) -> Result<AgentSpec, SpecError> {
    parse_located(text).map_err(|e| SpecError {
        file: file.to_path_buf(),
        line: e.pos.map(|p| p.line),
        column: e.pos.map(|p| p.col),
        key: e.key,
        message: e.message,
    })
}

fn parse_located(text: &str) -> Result<AgentSpec, Located> {
    let text = text.strip_prefix('\u{feff}').unwrap_or(text);
    let start = Pos { line: 1, col: 1 };
    let empty = || {
        Located::at(
            start,
            "the file is empty; an agent.yaml needs at least `name:` and `build:`",
        )
    };
    let root = parse_tree(text)?.ok_or_else(empty)?;
    match &root.kind {
        Kind::Map(_) => {}
        Kind::Scalar { .. } if root.is_null() => return Err(empty()),
        _ => {
            return Err(Located::at(
                root.pos,
                format!(
                "expected a mapping of keys (`name: ...`, `build: ...`) at the top level, found {}",
                root.describe()
            ),
            ))
        }
    }
    let mut locations = BTreeMap::new();
    let json = convert(&root, Ty::Struct(TOP), "", &mut locations)?;
    let spec: AgentSpec =
        serde_json::from_value(json).map_err(|e| locate(e.to_string(), &locations))?;
    spec.validate().map_err(|m| locate(m, &locations))?;
    Ok(spec)
}

/// An error with its place in the file, before the file's name is attached.
#[derive(Debug)]
struct Located {
    pos: Option<Pos>,
    key: Option<String>,
    message: String,
}

impl Located {
    fn at(pos: Pos, message: impl Into<String>) -> Self {
        Located {
            pos: Some(pos),
            key: None,
            message: message.into(),
        }
    }

    fn key(pos: Pos, key: &str, message: impl Into<String>) -> Self {
        Located {
            pos: Some(pos),
            key: Some(key.to_string()),
            message: message.into(),
        }
    }
}

/// Finds the first key path that `message` names (validation messages start with it, like
/// `resources.cpus must be > 0`) and places the message at that key.
fn locate(message: String, locations: &BTreeMap<String, Pos>) -> Located {
    let found = message
        .split(|c: char| !(c.is_ascii_alphanumeric() || c == '_' || c == '.'))
        .map(|w| w.trim_matches('.'))
        .filter(|w| !w.is_empty())
        .find_map(|word| {
            // `resources.cpus`, or failing that `resources`.
            let mut path = word;
            loop {
                if let Some(pos) = locations.get(path) {
                    return Some((path.to_string(), *pos));
                }
                path = path.rsplit_once('.')?.0;
            }
        });
    match found {
        Some((key, pos)) => Located::key(pos, &key, message),
        None => Located {
            pos: None,
            key: None,
            message,
        },
    }
}

// ---------------------------------------------------------------------------------------------
// The YAML tree.

/// 1-based line and column.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
struct Pos {
    line: usize,
    col: usize,
}

impl From<&saphyr_parser::Marker> for Pos {
    fn from(m: &saphyr_parser::Marker) -> Self {
        Pos {
            line: m.line(),
            col: m.col() + 1,
        }
    }
}

#[derive(Debug, Clone)]
struct Node {
    pos: Pos,
    kind: Kind,
}

#[derive(Debug, Clone)]
enum Kind {
    /// `quoted`: not a plain scalar (quoted, block, or tagged `!!str`), so always a string.
    Scalar {
        text: String,
        quoted: bool,
    },
    Seq(Vec<Node>),
    Map(Vec<(Node, Node)>),
}

/// What a scalar means under YAML 1.2's core schema.
#[derive(Debug, Clone, Copy, PartialEq)]
enum Scalar<'a> {
    Null,
    Bool(bool),
    Int(i128),
    Float(f64),
    Str(&'a str),
}

impl Node {
    fn scalar(&self) -> Option<Scalar<'_>> {
        match &self.kind {
            Kind::Scalar { text, quoted: true } => Some(Scalar::Str(text)),
            Kind::Scalar {
                text,
                quoted: false,
            } => Some(resolve_plain(text)),
            _ => None,
        }
    }

    fn text(&self) -> Option<&str> {
        match &self.kind {
            Kind::Scalar { text, .. } => Some(text),
            _ => None,
        }
    }

    fn is_null(&self) -> bool {
        self.scalar() == Some(Scalar::Null)
    }

    fn size(&self) -> usize {
        match &self.kind {
            Kind::Scalar { .. } => 1,
            Kind::Seq(items) => 1 + items.iter().map(Node::size).sum::<usize>(),
            Kind::Map(entries) => {
                1 + entries
                    .iter()
                    .map(|(k, v)| k.size() + v.size())
                    .sum::<usize>()
            }
        }
    }

    /// For messages: "a list", "the string \"lots\"", "the number 3", ...
    fn describe(&self) -> String {
        match (&self.kind, self.scalar()) {
            (Kind::Seq(_), _) => "a list".into(),
            (Kind::Map(_), _) => "a mapping".into(),
            (_, Some(Scalar::Null)) => "no value".into(),
            (_, Some(Scalar::Bool(_))) => format!("the boolean `{}`", self.text().unwrap_or("")),
            (_, Some(Scalar::Int(_) | Scalar::Float(_))) => {
                format!("the number {}", self.text().unwrap_or(""))
            }
            (_, Some(Scalar::Str(s))) => format!("the string {s:?}"),
            (_, None) => "a value".into(),
        }
    }
}

/// YAML 1.2 core schema resolution of a plain scalar.
fn resolve_plain(text: &str) -> Scalar<'_> {
    match text {
        "" | "~" | "null" | "Null" | "NULL" => return Scalar::Null,
        "true" | "True" | "TRUE" => return Scalar::Bool(true),
        "false" | "False" | "FALSE" => return Scalar::Bool(false),
        ".nan" | ".NaN" | ".NAN" => return Scalar::Float(f64::NAN),
        _ => {}
    }
    let (sign, rest) = match text.as_bytes()[0] {
        b'-' => (-1.0, &text[1..]),
        b'+' => (1.0, &text[1..]),
        _ => (1.0, text),
    };
    if matches!(rest, ".inf" | ".Inf" | ".INF") {
        return Scalar::Float(sign * f64::INFINITY);
    }
    let digits = |s: &str, radix: u32| !s.is_empty() && s.chars().all(|c| c.is_digit(radix));
    if let Some(oct) = text.strip_prefix("0o").filter(|s| digits(s, 8)) {
        if let Ok(n) = i128::from_str_radix(oct, 8) {
            return Scalar::Int(n);
        }
    }
    if let Some(hex) = text.strip_prefix("0x").filter(|s| digits(s, 16)) {
        if let Ok(n) = i128::from_str_radix(hex, 16) {
            return Scalar::Int(n);
        }
    }
    if digits(rest, 10) {
        if let Ok(n) = text.parse::<i128>() {
            return Scalar::Int(n);
        }
    }
    // [-+]?(\.[0-9]+|[0-9]+(\.[0-9]*)?)([eE][-+]?[0-9]+)?
    let (mantissa, exponent) = match rest.find(['e', 'E']) {
        Some(i) => (&rest[..i], Some(&rest[i + 1..])),
        None => (rest, None),
    };
    let mantissa_ok = match mantissa.split_once('.') {
        Some((int, frac)) => {
            (int.is_empty() && digits(frac, 10))
                || (digits(int, 10) && (frac.is_empty() || digits(frac, 10)))
        }
        None => digits(mantissa, 10),
    };
    let exponent_ok = exponent.is_none_or(|e| digits(e.strip_prefix(['-', '+']).unwrap_or(e), 10));
    if mantissa_ok && exponent_ok {
        if let Ok(f) = text.parse::<f64>() {
            return Scalar::Float(f);
        }
    }
    Scalar::Str(text)
}

/// Enough for any agent.yaml, and a bound on what aliases can blow up to.
const MAX_NODES: usize = 10_000;
const MAX_DEPTH: usize = 64;

/// Parses the one YAML document in `text` (`None` when there is none).
fn parse_tree(text: &str) -> Result<Option<Node>, Located> {
    let mut b = TreeBuilder {
        parser: Parser::new_from_str(text),
        anchors: BTreeMap::new(),
        nodes: 0,
    };
    let mut root = None;
    loop {
        let (event, span) = b.next()?;
        match event {
            Event::StreamEnd => return Ok(root),
            Event::DocumentStart(_) if root.is_some() => {
                return Err(Located::at(
                    Pos::from(&span.start),
                    "a second YAML document; agent.yaml holds exactly one",
                ))
            }
            Event::StreamStart | Event::DocumentStart(_) | Event::DocumentEnd | Event::Nothing => {}
            event => root = Some(b.node(event, span, "", 0)?),
        }
    }
}

struct TreeBuilder<'a> {
    parser: Parser<'a, StrInput<'a>>,
    anchors: BTreeMap<usize, Node>,
    nodes: usize,
}

fn syntax_error(e: &ScanError) -> Located {
    Located::at(
        Pos::from(e.marker()),
        format!("YAML syntax error: {}", e.info()),
    )
}

fn join(path: &str, key: &str) -> String {
    if path.is_empty() {
        key.to_string()
    } else {
        format!("{path}.{key}")
    }
}

impl<'a> TreeBuilder<'a> {
    fn next(&mut self) -> Result<(Event<'a>, Span), Located> {
        match self.parser.next_event() {
            Some(Ok(ev)) => Ok(ev),
            Some(Err(e)) => Err(syntax_error(&e)),
            None => Err(Located {
                pos: None,
                key: None,
                message: "YAML syntax error: unexpected end of the file".into(),
            }),
        }
    }

    fn count(&mut self, n: usize, pos: Pos) -> Result<(), Located> {
        self.nodes += n;
        if self.nodes > MAX_NODES {
            return Err(Located::at(
                pos,
                format!("more than {MAX_NODES} YAML nodes (after expanding aliases)"),
            ));
        }
        Ok(())
    }

    fn check_tag(tag: Option<&Tag>, pos: Pos, path: &str) -> Result<bool, Located> {
        match tag {
            None => Ok(false),
            Some(t) if t.is_yaml_core_schema() => Ok(t.suffix == "str"),
            Some(t) => Err(Located::key(
                pos,
                path,
                format!("unsupported YAML tag `{t}`; agent.yaml uses plain values only"),
            )),
        }
    }

    /// Builds the node that `event` starts; `path` names it in messages.
    fn node(
        &mut self,
        event: Event<'a>,
        span: Span,
        path: &str,
        depth: usize,
    ) -> Result<Node, Located> {
        let pos = Pos::from(&span.start);
        if depth > MAX_DEPTH {
            return Err(Located::at(pos, "nested too deeply"));
        }
        self.count(1, pos)?;
        let (node, anchor) = match event {
            Event::Scalar(text, style, anchor, tag) => {
                let tagged_str = Self::check_tag(tag.as_deref(), pos, path)?;
                let quoted = tagged_str || style != ScalarStyle::Plain;
                let kind = Kind::Scalar {
                    text: text.into_owned(),
                    quoted,
                };
                (Node { pos, kind }, anchor)
            }
            Event::SequenceStart(anchor, tag) => {
                Self::check_tag(tag.as_deref(), pos, path)?;
                let mut items = vec![];
                loop {
                    let (event, span) = self.next()?;
                    if matches!(event, Event::SequenceEnd) {
                        break;
                    }
                    let item_path = format!("{path}[{}]", items.len());
                    items.push(self.node(event, span, &item_path, depth + 1)?);
                }
                let kind = Kind::Seq(items);
                (Node { pos, kind }, anchor)
            }
            Event::MappingStart(anchor, tag) => {
                Self::check_tag(tag.as_deref(), pos, path)?;
                let mut entries: Vec<(Node, Node)> = vec![];
                let mut seen: BTreeMap<String, Pos> = BTreeMap::new();
                loop {
                    let (event, span) = self.next()?;
                    if matches!(event, Event::MappingEnd) {
                        break;
                    }
                    let key = self.node(event, span, path, depth + 1)?;
                    let Some(text) = key.text() else {
                        return Err(Located::key(
                            key.pos,
                            path,
                            format!("keys must be plain strings, not {}", key.describe()),
                        ));
                    };
                    if text == "<<" && matches!(key.kind, Kind::Scalar { quoted: false, .. }) {
                        return Err(Located::key(
                            key.pos,
                            path,
                            "merge keys (`<<`) are not supported; write the keys out",
                        ));
                    }
                    let child = join(path, text);
                    if let Some(first) = seen.get(text) {
                        return Err(Located::key(
                            key.pos,
                            &child,
                            format!(
                                "duplicate key `{child}` (first given on line {})",
                                first.line
                            ),
                        ));
                    }
                    seen.insert(text.to_string(), key.pos);
                    let (event, span) = self.next()?;
                    let value = self.node(event, span, &child, depth + 1)?;
                    entries.push((key, value));
                }
                let kind = Kind::Map(entries);
                (Node { pos, kind }, anchor)
            }
            Event::Alias(id) => {
                let Some(target) = self.anchors.get(&id) else {
                    return Err(Located::at(pos, "alias to an unknown anchor"));
                };
                let mut node = target.clone();
                self.count(node.size(), pos)?;
                node.pos = pos;
                return Ok(node);
            }
            other => {
                return Err(Located::at(
                    pos,
                    format!("YAML syntax error: unexpected {other:?}"),
                ))
            }
        };
        if anchor > 0 {
            self.count(node.size(), pos)?;
            self.anchors.insert(anchor, node.clone());
        }
        Ok(node)
    }
}

// ---------------------------------------------------------------------------------------------
// The schema of agent.yaml, and the conversion of the tree to JSON.

/// What a key's value must be.
#[derive(Debug, Clone, Copy)]
enum Ty {
    /// Any scalar, taken as written.
    Str,
    /// An integer or a float (`cpus`).
    Number,
    /// A non-negative integer.
    Count,
    /// An integer from 0 to 65535.
    Port,
    /// [`ByteSize`]: bytes, or a string like `512Mi`.
    Size,
    /// [`HumanDuration`]: seconds, or a string like `15m`.
    Duration,
    /// One of these strings.
    Enum(&'static [&'static str]),
    List(&'static Ty),
    /// `true` or `false`.
    Bool,
    /// A mapping of strings to strings (`env`).
    StrMap,
    Struct(&'static [Field]),
}

#[derive(Debug, Clone, Copy)]
struct Field {
    key: &'static str,
    ty: Ty,
    required: bool,
}

const fn opt(key: &'static str, ty: Ty) -> Field {
    Field {
        key,
        ty,
        required: false,
    }
}

const PROTOCOLS: &[&str] = &["responses", "invocations", "activity"];
const ISOLATIONS: &[&str] = &["auto", "vm", "gvisor", "container"];
const EGRESS: &[&str] = &["none", "allowlist", "all"];
static PROTOCOL: Ty = Ty::Enum(PROTOCOLS);
static STRING: Ty = Ty::Str;

const BUILD: &[Field] = &[
    opt("dockerfile", Ty::Str),
    opt("context", Ty::Str),
    opt("image", Ty::Str),
    opt("oci", Ty::Str),
    opt("rootfs", Ty::Str),
];
const RESOURCES: &[Field] = &[
    opt("cpus", Ty::Number),
    opt("memory", Ty::Size),
    opt("disk", Ty::Size),
    opt("pids", Ty::Count),
];
const INJECT: &[Field] = &[
    Field {
        key: "secret",
        ty: Ty::Str,
        required: true,
    },
    Field {
        key: "hosts",
        ty: Ty::List(&STRING),
        required: true,
    },
    opt("header", Ty::Str),
    opt("format", Ty::Str),
    opt("tls", Ty::Bool),
];
static INJECTION: Ty = Ty::Struct(INJECT);
const NETWORK: &[Field] = &[
    opt("egress", Ty::Enum(EGRESS)),
    opt("allow", Ty::List(&STRING)),
    opt("attach", Ty::Str),
    opt("inject", Ty::List(&INJECTION)),
];
const ACTIVITY: &[Field] = &[
    opt("app_id", Ty::Str),
    opt("tenant", Ty::Str),
    opt("client_secret", Ty::Str),
    opt("token_endpoint", Ty::Str),
    opt("scope", Ty::Str),
    opt("openid_metadata", Ty::Str),
    opt("issuer", Ty::Str),
    opt("anonymous", Ty::Bool),
];
const CHANNELS: &[Field] = &[opt("activity", Ty::Struct(ACTIVITY))];
const OUTPUT_ACTIONS: &[&str] = &["redact", "block", "off"];
const EGRESS_ACTIONS: &[&str] = &["block", "off"];
const BUILTINS: &[&str] = &["card_number", "private_key", "cloud_key", "email"];
static BUILTIN: Ty = Ty::Enum(BUILTINS);
const GUARDRAILS: &[Field] = &[
    opt("detectors", Ty::List(&BUILTIN)),
    opt("patterns", Ty::StrMap),
    opt("output", Ty::Enum(OUTPUT_ACTIONS)),
    opt("egress", Ty::Enum(EGRESS_ACTIONS)),
];
/// The top level of agent.yaml: the fields of [`AgentSpec`].
const TOP: &[Field] = &[
    Field {
        key: "name",
        ty: Ty::Str,
        required: true,
    },
    opt("description", Ty::Str),
    Field {
        key: "build",
        ty: Ty::Struct(BUILD),
        required: true,
    },
    opt("protocols", Ty::List(&PROTOCOL)),
    opt("isolation", Ty::Enum(ISOLATIONS)),
    opt("resources", Ty::Struct(RESOURCES)),
    opt("idle_timeout", Ty::Duration),
    opt("session_retention", Ty::Duration),
    opt("startup_timeout", Ty::Duration),
    opt("port", Ty::Port),
    opt("env", Ty::StrMap),
    opt("network", Ty::Struct(NETWORK)),
    opt("channels", Ty::Struct(CHANNELS)),
    opt("guardrails", Ty::Struct(GUARDRAILS)),
];

/// Every struct of the schema with its key path: `("", TOP)`, `("build", BUILD)`, ...
fn structs() -> Vec<(String, &'static [Field])> {
    fn walk(path: String, fields: &'static [Field], out: &mut Vec<(String, &'static [Field])>) {
        for f in fields {
            if let Ty::Struct(inner) = f.ty {
                walk(join(&path, f.key), inner, out);
            }
        }
        out.push((path, fields));
    }
    let mut out = vec![];
    walk(String::new(), TOP, &mut out);
    out
}

fn kind_name(ty: Ty) -> String {
    match ty {
        Ty::Str => "a string".into(),
        Ty::Number => "a number".into(),
        Ty::Count => "a whole number".into(),
        Ty::Port => "a port number".into(),
        Ty::Size => "a size like 512Mi or 2Gi (or a number of bytes)".into(),
        Ty::Duration => "a duration like 30s, 15m, 2h or 30d (or a number of seconds)".into(),
        Ty::Enum(values) => format!("one of {}", values.join(", ")),
        Ty::List(_) => "a list".into(),
        Ty::Bool => "true or false".into(),
        Ty::StrMap => "a mapping of names to strings".into(),
        Ty::Struct(_) => "a mapping".into(),
    }
}

fn mismatch(node: &Node, ty: Ty, path: &str) -> Located {
    let mut message = format!(
        "`{path}`: expected {}, found {}",
        kind_name(ty),
        node.describe()
    );
    match (ty, node.scalar()) {
        (Ty::List(_), Some(Scalar::Str(s))) => {
            let key = path.rsplit('.').next().unwrap_or(path);
            message += &format!(" (write `{key}: [{s}]`)");
        }
        (Ty::Number | Ty::Count | Ty::Port, Some(Scalar::Str(s)))
            if matches!(resolve_plain(s), Scalar::Int(_) | Scalar::Float(_)) =>
        {
            message += " (remove the quotes)";
        }
        _ => {}
    }
    Located::key(node.pos, path, message)
}

fn convert(
    node: &Node,
    ty: Ty,
    path: &str,
    locations: &mut BTreeMap<String, Pos>,
) -> Result<Value, Located> {
    let scalar = node.scalar();
    let int = |n: i128, max: u64| -> Result<Value, Located> {
        match u64::try_from(n) {
            Ok(n) if n <= max => Ok(Value::Number(Number::from(n))),
            Ok(_) => Err(Located::key(
                node.pos,
                path,
                format!("`{path}`: {n} is too large (at most {max})"),
            )),
            Err(_) => Err(Located::key(
                node.pos,
                path,
                format!("`{path}` must not be negative, not {n}"),
            )),
        }
    };
    match ty {
        Ty::Str => match scalar {
            Some(Scalar::Null) | None => Err(mismatch(node, ty, path)),
            Some(_) => Ok(Value::String(node.text().unwrap_or_default().to_string())),
        },
        Ty::Number => match scalar {
            Some(Scalar::Int(n)) => Ok(Value::from(n as f64)),
            Some(Scalar::Float(f)) => Number::from_f64(f).map(Value::Number).ok_or_else(|| {
                Located::key(node.pos, path, format!("`{path}` must be a finite number"))
            }),
            _ => Err(mismatch(node, ty, path)),
        },
        Ty::Count => match scalar {
            Some(Scalar::Int(n)) => int(n, u64::MAX),
            _ => Err(mismatch(node, ty, path)),
        },
        Ty::Port => match scalar {
            Some(Scalar::Int(n)) => int(n, u16::MAX.into()),
            _ => Err(mismatch(node, ty, path)),
        },
        Ty::Size | Ty::Duration => match scalar {
            Some(Scalar::Int(n)) => int(n, u64::MAX),
            Some(Scalar::Str(s)) => {
                let checked = if matches!(ty, Ty::Size) {
                    s.parse::<ByteSize>().map(drop)
                } else {
                    s.parse::<HumanDuration>().map(drop)
                };
                match checked {
                    Ok(()) => Ok(Value::String(s.to_string())),
                    Err(e) => Err(Located::key(node.pos, path, format!("`{path}`: {e}"))),
                }
            }
            _ => Err(mismatch(node, ty, path)),
        },
        Ty::Bool => match scalar {
            Some(Scalar::Bool(b)) => Ok(Value::Bool(b)),
            _ => Err(mismatch(node, ty, path)),
        },
        Ty::Enum(values) => match scalar {
            Some(Scalar::Str(s)) if values.contains(&s) => Ok(Value::String(s.to_string())),
            Some(Scalar::Str(_) | Scalar::Bool(_) | Scalar::Int(_) | Scalar::Float(_)) => {
                let text = node.text().unwrap_or_default();
                let mut message = format!(
                    "`{path}`: unknown value `{text}`; expected one of {}",
                    values.join(", ")
                );
                if let Some(best) = closest(text, values.iter().copied()) {
                    message += &format!(" (did you mean `{best}`?)");
                }
                Err(Located::key(node.pos, path, message))
            }
            _ => Err(mismatch(node, ty, path)),
        },
        Ty::List(item) => match &node.kind {
            Kind::Seq(items) => {
                let mut out = Vec::with_capacity(items.len());
                for (i, n) in items.iter().enumerate() {
                    out.push(convert(n, *item, &format!("{path}[{i}]"), locations)?);
                }
                Ok(Value::Array(out))
            }
            _ => Err(mismatch(node, ty, path)),
        },
        Ty::StrMap => {
            match &node.kind {
                Kind::Map(entries) => {
                    let mut out = Map::new();
                    for (k, v) in entries {
                        let key = k.text().unwrap_or_default();
                        let child = join(path, key);
                        locations.insert(child.clone(), k.pos);
                        if v.is_null() {
                            return Err(Located::key(
                            k.pos,
                            &child,
                            format!("`{child}` has no value (write `{key}: \"\"` for an empty string)"),
                        ));
                        }
                        out.insert(key.to_string(), convert(v, Ty::Str, &child, locations)?);
                    }
                    Ok(Value::Object(out))
                }
                _ => Err(mismatch(node, ty, path)),
            }
        }
        Ty::Struct(fields) => {
            let Kind::Map(entries) = &node.kind else {
                return Err(mismatch(node, ty, path));
            };
            let mut out = Map::new();
            for (k, v) in entries {
                let key = k.text().unwrap_or_default();
                let child = join(path, key);
                let Some(field) = fields.iter().find(|f| f.key == key) else {
                    return Err(unknown_key(k.pos, key, path, fields));
                };
                locations.insert(child.clone(), k.pos);
                if v.is_null() {
                    if field.required {
                        return Err(Located::key(
                            k.pos,
                            &child,
                            format!("`{child}` needs a value"),
                        ));
                    }
                    continue;
                }
                out.insert(key.to_string(), convert(v, field.ty, &child, locations)?);
            }
            if let Some(missing) = fields
                .iter()
                .find(|f| f.required && !out.contains_key(f.key))
            {
                let child = join(path, missing.key);
                let hint = match missing.ty {
                    Ty::Struct(inner) => format!(
                        " (a mapping with one of {})",
                        inner
                            .iter()
                            .filter(|f| f.key != "context")
                            .map(|f| f.key)
                            .collect::<Vec<_>>()
                            .join(", ")
                    ),
                    _ => String::new(),
                };
                return Err(Located {
                    pos: None,
                    key: Some(child.clone()),
                    message: format!("missing required key `{child}`{hint}"),
                });
            }
            Ok(Value::Object(out))
        }
    }
}

fn unknown_key(pos: Pos, key: &str, path: &str, fields: &[Field]) -> Located {
    let full = join(path, key);
    let place = if path.is_empty() {
        String::new()
    } else {
        format!(" in `{path}`")
    };
    let mut message = format!("unknown key `{key}`{place}");
    if let Some(best) = closest(key, fields.iter().map(|f| f.key)) {
        message += &format!(" (did you mean `{best}`?)");
    } else if let Some((parent, best)) = structs()
        .into_iter()
        .filter(|(p, _)| p != path)
        .find_map(|(p, fs)| closest(key, fs.iter().map(|f| f.key)).map(|b| (p, b)))
    {
        let there = if parent.is_empty() {
            "at the top level".to_string()
        } else {
            format!("under `{parent}`")
        };
        message += &format!(
            " (did you mean `{}`? `{best}` goes {there})",
            join(&parent, best)
        );
    } else {
        let known: Vec<&str> = fields.iter().map(|f| f.key).collect();
        message += &format!("; expected one of {}", known.join(", "));
    }
    Located::key(pos, &full, message)
}

/// The candidate nearest to `word` if it is near enough to be a likely typo.
fn closest<'c>(word: &str, candidates: impl Iterator<Item = &'c str>) -> Option<&'c str> {
    let norm = |s: &str| s.to_ascii_lowercase().replace('-', "_");
    let word = norm(word);
    let limit = (word.chars().count() / 3).clamp(1, 3);
    candidates
        .map(|c| {
            let n = norm(c);
            let d = if word.len() >= 3 && n.starts_with(&word) {
                0
            } else {
                edit_distance(&word, &n)
            };
            (d, c)
        })
        .filter(|(d, _)| *d <= limit)
        .min_by_key(|(d, _)| *d)
        .map(|(_, c)| c)
}

/// Levenshtein distance, in characters.
fn edit_distance(a: &str, b: &str) -> usize {
    let b: Vec<char> = b.chars().collect();
    let mut prev: Vec<usize> = (0..=b.len()).collect();
    for (i, ca) in a.chars().enumerate() {
        let mut cur = Vec::with_capacity(b.len() + 1);
        cur.push(i + 1);
        for (j, cb) in b.iter().enumerate() {
            let substitute = prev[j] + usize::from(ca != *cb);
            cur.push(substitute.min(prev[j + 1] + 1).min(cur[j] + 1));
        }
        prev = cur;
    }
    prev[b.len()]
}

#[cfg(test)]
mod tests {
    use std::time::Duration;

    use hangar_proto::agent::{AgentResources, BuildSpec, Network, Protocol};
    use hangar_proto::sandbox::{DriverKind, EgressPolicyKind};

    use super::*;

    const FILE: &str = "examples/notes/agent.yaml";

    /// The example of DESIGN.md, "agent.yaml".
    const DESIGN_EXAMPLE: &str = r#"name: notes
description: Keeps notes for each user in its workspace
build: { dockerfile: Dockerfile }        # or { image: REF } or { oci: ./path-to-oci-layout } or { rootfs: ./dir }
protocols: [responses]                   # what the container implements natively
isolation: auto                          # auto | vm | gvisor | container
resources: { cpus: 1, memory: 512Mi, disk: 2Gi }
idle_timeout: 15m                        # scale to zero after this long without a request
session_retention: 30d
env: { LOG_LEVEL: info }
network: { egress: allowlist, allow: ["pypi.org", "*.githubusercontent.com"] }   # none | allowlist | all
"#;

    fn ok(text: &str) -> AgentSpec {
        parse(text, Path::new(FILE)).unwrap_or_else(|e| panic!("{e}"))
    }

    fn err(text: &str) -> SpecError {
        match parse(text, Path::new(FILE)) {
            Ok(spec) => panic!("parsed, but should not have: {spec:?}"),
            Err(e) => e,
        }
    }

    /// Asserts the error's line and column and that its message contains each of `parts`.
    #[track_caller]
    fn assert_err(text: &str, line: usize, col: usize, parts: &[&str]) -> SpecError {
        let e = err(text);
        assert_eq!((e.line, e.column), (Some(line), Some(col)), "{e}");
        for p in parts {
            assert!(e.message.contains(p), "{e:?} should contain {p:?}");
        }
        e
    }

    const MINIMAL: &str = "name: notes\nbuild: { image: notes:latest }\n";

    #[test]
    fn design_example_parses() {
        let spec = ok(DESIGN_EXAMPLE);
        let expected = AgentSpec {
            name: "notes".into(),
            description: "Keeps notes for each user in its workspace".into(),
            build: BuildSpec {
                dockerfile: Some("Dockerfile".into()),
                ..BuildSpec::default()
            },
            protocols: vec![Protocol::Responses],
            isolation: DriverKind::Auto,
            resources: AgentResources {
                cpus: 1.0,
                memory: ByteSize(512 << 20),
                disk: ByteSize(2 << 30),
                pids: 512,
            },
            idle_timeout: HumanDuration(Duration::from_secs(15 * 60)),
            session_retention: HumanDuration(Duration::from_secs(30 * 86400)),
            startup_timeout: HumanDuration(Duration::from_secs(60)),
            port: 8088,
            env: [("LOG_LEVEL".to_string(), "info".to_string())].into(),
            network: Network {
                egress: EgressPolicyKind::Allowlist,
                allow: vec!["pypi.org".into(), "*.githubusercontent.com".into()],
                ..Default::default()
            },
            channels: Default::default(),
            guardrails: Default::default(),
        };
        assert_eq!(spec, expected);
    }

    #[test]
    fn block_style_and_defaults() {
        let spec = ok("
# An agent.
name: notes
build:
  image: notes:latest
protocols:
  - responses
  - invocations
isolation: vm
resources:
  cpus: 0.5
  memory: 1073741824
  pids: 64
idle_timeout: 90
startup_timeout: 2m
port: 9000
description: |
  Two
  lines
");
        assert_eq!(spec.protocols, [Protocol::Responses, Protocol::Invocations]);
        assert_eq!(spec.isolation, DriverKind::Vm);
        assert_eq!(spec.resources.cpus, 0.5);
        assert_eq!(spec.resources.memory, ByteSize(1 << 30));
        assert_eq!(spec.resources.disk, ByteSize(2048 << 20));
        assert_eq!(spec.resources.pids, 64);
        assert_eq!(spec.idle_timeout.0, Duration::from_secs(90));
        assert_eq!(spec.startup_timeout.0, Duration::from_secs(120));
        assert_eq!(spec.port, 9000);
        assert_eq!(spec.description, "Two\nlines\n");

        let min = ok(MINIMAL);
        let from_json: AgentSpec =
            serde_json::from_str(r#"{"name": "notes", "build": {"image": "notes:latest"}}"#)
                .unwrap();
        assert_eq!(min, from_json);
        // A key with no value counts as absent.
        assert_eq!(ok(&format!("{MINIMAL}env:\nresources:\nnetwork: ~\n")), min);
        // A byte-order mark and CRLF line ends are fine.
        assert_eq!(
            ok(&format!("\u{feff}{}", MINIMAL.replace('\n', "\r\n"))),
            min
        );
    }

    #[test]
    fn scalars_follow_yaml_1_2() {
        let spec = ok(&format!(
            "{MINIMAL}env: {{ DEBUG: 1, FLAG: yes, OFF: off, RATIO: 1.50, HEX: 0x1F, T: true, \
             Q: \"quoted\", N: '007', S: !!str 12, 42: answer }}\nresources: {{ cpus: 2 }}\n"
        ));
        let env: Vec<(&str, &str)> = spec
            .env
            .iter()
            .map(|(k, v)| (k.as_str(), v.as_str()))
            .collect();
        assert_eq!(
            env,
            [
                ("42", "answer"),
                ("DEBUG", "1"),
                ("FLAG", "yes"),
                ("HEX", "0x1F"),
                ("N", "007"),
                ("OFF", "off"),
                ("Q", "quoted"),
                ("RATIO", "1.50"),
                ("S", "12"),
                ("T", "true"),
            ]
        );
        assert_eq!(spec.resources.cpus, 2.0);
        assert_eq!(resolve_plain("1e3"), Scalar::Float(1000.0));
        assert_eq!(resolve_plain("-.5"), Scalar::Float(-0.5));
        assert_eq!(resolve_plain("0o17"), Scalar::Int(15));
        assert_eq!(resolve_plain("-12"), Scalar::Int(-12));
        assert_eq!(resolve_plain("-.inf"), Scalar::Float(f64::NEG_INFINITY));
        for s in [
            "yes", "no", "on", "off", "1.2.3", "1e", "inf", "nan", "0x", "12abc", "+",
        ] {
            assert_eq!(resolve_plain(s), Scalar::Str(s), "{s}");
        }
        for s in ["", "~", "null", "NULL"] {
            assert_eq!(resolve_plain(s), Scalar::Null, "{s}");
        }
    }

    #[test]
    fn unknown_keys_name_the_line_and_suggest() {
        let text = format!("{MINIMAL}\n# comment\nport: 8088\nenv: {{}}\nidle_timout: 10m\n");
        let e = assert_err(&text, 7, 1, &[]);
        assert_eq!(
            e.to_string(),
            "examples/notes/agent.yaml:7:1: unknown key `idle_timout` (did you mean `idle_timeout`?)"
        );
        assert_eq!(e.key.as_deref(), Some("idle_timout"));

        let e = assert_err(
            &format!("{MINIMAL}resources:\n  cpus: 1\n  memroy: 1Gi\n"),
            5,
            3,
            &["unknown key `memroy` in `resources` (did you mean `memory`?)"],
        );
        assert_eq!(e.key.as_deref(), Some("resources.memroy"));
        assert_err(
            "name: a\nbuild: { dockerfle: Dockerfile }\n",
            2,
            10,
            &["unknown key `dockerfle` in `build` (did you mean `dockerfile`?)"],
        );
        assert_err(
            &format!("{MINIMAL}Isolation: vm\n"),
            3,
            1,
            &["did you mean `isolation`?"],
        );
        assert_err(
            &format!("{MINIMAL}desc: x\n"),
            3,
            1,
            &["did you mean `description`?"],
        );
        // A key at the wrong level.
        assert_err(
            &format!("{MINIMAL}memory: 1Gi\n"),
            3,
            1,
            &["unknown key `memory` (did you mean `resources.memory`? `memory` goes under `resources`)"],
        );
        assert_err(
            &format!("{MINIMAL}resources: {{ port: 80 }}\n"),
            3,
            14,
            &["(did you mean `port`? `port` goes at the top level)"],
        );
        // Nothing close: the known keys are listed.
        assert_err(
            &format!("{MINIMAL}replicas: 3\n"),
            3,
            1,
            &["unknown key `replicas`; expected one of name, description, build, protocols, isolation, resources, idle_timeout, session_retention, startup_timeout, port, env, network, channels, guardrails"],
        );
        assert_err(
            &format!("{MINIMAL}<<: {{ port: 1 }}\n"),
            3,
            1,
            &["merge keys"],
        );
    }

    #[test]
    fn wrong_types_name_the_key_path_and_line() {
        let cases: &[(&str, usize, usize, &str, &str)] = &[
            (
                "resources: { memory: lots }",
                3,
                22,
                "resources.memory",
                "`resources.memory`: \"lots\" is not a size like 512Mi or 2Gi",
            ),
            (
                "resources:\n  cpus: \"x\"",
                4,
                9,
                "resources.cpus",
                "`resources.cpus`: expected a number, found the string \"x\"",
            ),
            (
                "resources: { cpus: \"2\" }",
                3,
                20,
                "resources.cpus",
                "expected a number, found the string \"2\" (remove the quotes)",
            ),
            (
                "protocols: responses",
                3,
                12,
                "protocols",
                "`protocols`: expected a list, found the string \"responses\" (write `protocols: [responses]`)",
            ),
            (
                "protocols: [responses, grpc]",
                3,
                24,
                "protocols[1]",
                "`protocols[1]`: unknown value `grpc`; expected one of responses, invocations, activity",
            ),
            (
                "isolation: docker",
                3,
                12,
                "isolation",
                "`isolation`: unknown value `docker`; expected one of auto, vm, gvisor, container",
            ),
            (
                "isolation: gvisr",
                3,
                12,
                "isolation",
                "(did you mean `gvisor`?)",
            ),
            (
                "network: { egress: yes }",
                3,
                20,
                "network.egress",
                "unknown value `yes`; expected one of none, allowlist, all",
            ),
            (
                "network: { allow: pypi.org }",
                3,
                19,
                "network.allow",
                "expected a list, found the string \"pypi.org\"",
            ),
            (
                "idle_timeout: soon",
                3,
                15,
                "idle_timeout",
                "`idle_timeout`: \"soon\" is not a duration like 30s, 15m, 2h or 30d",
            ),
            (
                "idle_timeout: 1.5",
                3,
                15,
                "idle_timeout",
                "expected a duration like 30s, 15m, 2h or 30d (or a number of seconds), found the number 1.5",
            ),
            ("port: 70000", 3, 7, "port", "`port`: 70000 is too large (at most 65535)"),
            ("port: http", 3, 7, "port", "expected a port number, found the string \"http\""),
            (
                "resources: { pids: -1 }",
                3,
                20,
                "resources.pids",
                "`resources.pids` must not be negative, not -1",
            ),
            ("idle_timeout: -5", 3, 15, "idle_timeout", "must not be negative"),
            ("env: [A, B]", 3, 6, "env", "`env`: expected a mapping of names to strings, found a list"),
            ("env:\n  A: [1]", 4, 6, "env.A", "`env.A`: expected a string, found a list"),
            ("env:\n  A:", 4, 3, "env.A", "`env.A` has no value (write `A: \"\"` for an empty string)"),
            ("resources: 2", 3, 12, "resources", "`resources`: expected a mapping, found the number 2"),
            ("description: [a]", 3, 14, "description", "expected a string, found a list"),
        ];
        for (extra, line, col, key, message) in cases {
            let e = err(&format!("{MINIMAL}{extra}\n"));
            assert_eq!(
                (e.line, e.column),
                (Some(*line), Some(*col)),
                "{extra}: {e}"
            );
            assert_eq!(e.key.as_deref(), Some(*key), "{extra}: {e}");
            assert!(e.message.contains(message), "{extra}: {e}");
        }
        // Required keys.
        let e = err("name: notes\n");
        assert_eq!(
            e.to_string(),
            "examples/notes/agent.yaml: missing required key `build` (a mapping with one of dockerfile, image, oci, rootfs)"
        );
        assert_err(
            "name:\nbuild: {image: x}\n",
            1,
            1,
            &["`name` needs a value"],
        );
    }

    #[test]
    fn duplicate_keys_are_errors() {
        let e = assert_err(
            "name: a\nbuild: { image: x }\nname: b\n",
            3,
            1,
            &["duplicate key `name` (first given on line 1)"],
        );
        assert_eq!(e.key.as_deref(), Some("name"));
        assert_err(
            "name: a\nbuild:\n  image: x\n  image: y\n",
            4,
            3,
            &["duplicate key `build.image` (first given on line 3)"],
        );
        assert_err(
            &format!("{MINIMAL}env: {{ A: 1, B: 2, A: 3 }}\n"),
            3,
            20,
            &["duplicate key `env.A`"],
        );
    }

    #[test]
    fn validation_errors_point_at_the_key() {
        let e = assert_err(
            "name: Notes\nbuild: { image: x }\n",
            1,
            1,
            &["agent name \"Notes\""],
        );
        assert_eq!(e.key.as_deref(), Some("name"));
        assert_err(
            "name: a\nbuild: {}\n",
            2,
            1,
            &["build needs one of dockerfile, image, oci or rootfs"],
        );
        assert_err(
            "name: a\nbuild:\n  image: x\n  context: .\n",
            4,
            3,
            &["build.context only goes with build.dockerfile"],
        );
        assert_err(
            &format!("{MINIMAL}resources:\n  memory: 1Gi\n  cpus: 0\n"),
            5,
            3,
            &["resources.cpus must be > 0"],
        );
        assert_err(
            &format!("{MINIMAL}resources: {{ memory: 1Mi }}\n"),
            3,
            14,
            &["resources.memory must be at least 16Mi"],
        );
        assert_err(
            &format!("{MINIMAL}idle_timeout: 2h\nsession_retention: 1h\n"),
            4,
            1,
            &["session_retention must not be shorter than idle_timeout"],
        );
        assert_err(
            &format!("{MINIMAL}port: 0\n"),
            3,
            1,
            &["port must not be 0"],
        );
        assert_err(
            &format!("{MINIMAL}protocols: []\n"),
            3,
            1,
            &["protocols must name"],
        );
        assert_err(
            &format!("{MINIMAL}env: {{ \"A=B\": x }}\n"),
            3,
            1,
            &["env key \"A=B\""],
        );
    }

    #[test]
    fn empty_syntax_errors_and_other_shapes() {
        for empty in ["", "\n\n", "# nothing yet\n", "---\n", "~\n"] {
            let e = assert_err(empty, 1, 1, &["the file is empty"]);
            assert_eq!(
                e.to_string(),
                "examples/notes/agent.yaml:1:1: the file is empty; an agent.yaml needs at least `name:` and `build:`"
            );
        }
        assert_err("name: notes\nbuild: [image\n", 3, 1, &["YAML syntax error"]);
        assert_err(
            "name: notes\nbuild: image: x\n",
            2,
            13,
            &["YAML syntax error"],
        );
        assert_err(
            "name: notes\nbuild:\n\timage: x\n",
            3,
            2,
            &["YAML syntax error: tabs disallowed"],
        );
        assert_err(
            "- name: notes\n",
            1,
            1,
            &["expected a mapping of keys", "found a list"],
        );
        assert_err("just words\n", 1, 1, &["found the string \"just words\""]);
        assert_err(
            &format!("{MINIMAL}---\nname: b\n"),
            3,
            1,
            &["a second YAML document"],
        );
        assert_err(
            &format!("{MINIMAL}port: !custom 80\n"),
            3,
            7,
            &["unsupported YAML tag `!custom`"],
        );
        assert_err(
            &format!("{MINIMAL}? [a, b]\n: c\n"),
            3,
            3,
            &["keys must be plain strings"],
        );
    }

    #[test]
    fn anchors_work_and_alias_bombs_do_not() {
        let spec = ok(&format!(
            "{MINIMAL}env: {{ A: &v hello, B: *v }}\nnetwork: {{ egress: allowlist, allow: &hosts [a.org] }}\n"
        ));
        assert_eq!(spec.env["B"], "hello");
        assert_eq!(spec.network.allow, ["a.org"]);
        let mut bomb = String::from("a0: &a0 [x, x, x, x, x, x, x, x, x, x]\n");
        for i in 1..10 {
            let p = i - 1;
            bomb +=
                &format!("a{i}: &a{i} [*a{p}, *a{p}, *a{p}, *a{p}, *a{p}, *a{p}, *a{p}, *a{p}]\n");
        }
        let e = err(&bomb);
        assert!(e.message.contains("YAML nodes"), "{e}");
    }

    #[test]
    fn spec_round_trips_through_json() {
        let spec = ok(DESIGN_EXAMPLE);
        let json = serde_json::to_string(&spec).unwrap();
        let back: AgentSpec = serde_json::from_str(&json).unwrap();
        assert_eq!(back, spec);
        back.validate().unwrap();
        let value = serde_json::to_value(&spec).unwrap();
        assert_eq!(value["resources"]["memory"], "512Mi");
        assert_eq!(value["idle_timeout"], "15m");
        assert_eq!(value["session_retention"], "30d");
    }

    /// The schema here lists AgentSpec's keys and enum values by hand; this catches drift.
    #[test]
    fn schema_matches_agent_spec() {
        let full = AgentSpec {
            description: "d".into(),
            build: BuildSpec {
                dockerfile: Some("f".into()),
                context: Some("c".into()),
                image: Some("i".into()),
                oci: Some("o".into()),
                rootfs: Some("r".into()),
            },
            env: [("A".to_string(), "b".to_string())].into(),
            network: Network {
                egress: EgressPolicyKind::Allowlist,
                allow: vec!["a.org".into()],
                attach: Some("corp".into()),
                inject: vec![hangar_proto::agent::Inject {
                    secret: "key".into(),
                    hosts: vec!["a.org".into()],
                    header: "X-Key".into(),
                    format: Some("{value}".into()),
                    tls: false,
                }],
            },
            guardrails: hangar_proto::agent::Guardrails {
                detectors: vec!["email".into()],
                patterns: [("t".to_string(), "T-[0-9]+".to_string())].into(),
                output: hangar_proto::agent::OutputAction::Block,
                egress: hangar_proto::agent::EgressAction::Off,
            },
            channels: hangar_proto::agent::Channels {
                activity: Some(hangar_proto::agent::ActivityChannel {
                    app_id: "a".into(),
                    tenant: "t".into(),
                    client_secret: Some("s".into()),
                    token_endpoint: Some("https://t".into()),
                    scope: "s".into(),
                    openid_metadata: "https://o".into(),
                    issuer: "i".into(),
                    anonymous: true,
                }),
            },
            ..ok(MINIMAL)
        };
        let value = serde_json::to_value(&full).unwrap();
        fn check(value: &Value, fields: &[Field], path: &str) {
            let Value::Object(map) = value else {
                panic!("{path} is not an object")
            };
            let mut json_keys: Vec<&str> = map.keys().map(String::as_str).collect();
            let mut ours: Vec<&str> = fields.iter().map(|f| f.key).collect();
            json_keys.sort_unstable();
            ours.sort_unstable();
            assert_eq!(json_keys, ours, "keys of `{path}`");
            for f in fields {
                match f.ty {
                    Ty::Struct(inner) => check(&map[f.key], inner, &join(path, f.key)),
                    Ty::List(Ty::Struct(inner)) => {
                        check(&map[f.key][0], inner, &format!("{}[0]", join(path, f.key)))
                    }
                    _ => {}
                }
            }
        }
        check(&value, TOP, "");

        fn enum_values<T: serde::de::DeserializeOwned + fmt::Debug>(values: &[&str]) {
            for v in values {
                serde_json::from_value::<T>(Value::from(*v)).unwrap();
            }
            let e = serde_json::from_value::<T>(Value::from("zzz")).unwrap_err();
            let listed: Vec<String> = values.iter().map(|v| format!("`{v}`")).collect();
            // serde lists two values as "`a` or `b`", more as "`a`, `b`, `c`".
            let sep = if listed.len() == 2 { " or " } else { ", " };
            assert!(e.to_string().contains(&listed.join(sep)), "{e}");
        }
        enum_values::<Protocol>(PROTOCOLS);
        enum_values::<DriverKind>(ISOLATIONS);
        enum_values::<EgressPolicyKind>(EGRESS);
        enum_values::<hangar_proto::agent::OutputAction>(OUTPUT_ACTIONS);
        enum_values::<hangar_proto::agent::EgressAction>(EGRESS_ACTIONS);
    }

    #[test]
    fn load_finds_the_file() {
        let dir = tempfile::tempdir().unwrap();
        let e = load(dir.path()).unwrap_err();
        assert_eq!(e.file, dir.path().join("agent.yaml"));
        assert!(
            e.to_string()
                .contains("agent.yaml: not found (nor agent.yml)"),
            "{e}"
        );

        std::fs::write(dir.path().join("agent.yml"), MINIMAL).unwrap();
        let (spec, file) = load(dir.path()).unwrap();
        assert_eq!(spec.name, "notes");
        assert_eq!(file, dir.path().join("agent.yml"));
        // The file itself may be named.
        assert_eq!(load(&file).unwrap().1, file);

        std::fs::write(dir.path().join("agent.yaml"), MINIMAL).unwrap();
        let e = load(dir.path()).unwrap_err();
        assert!(e.message.contains("agent.yml is there too"), "{e}");
        std::fs::remove_file(dir.path().join("agent.yml")).unwrap();

        std::fs::write(dir.path().join("agent.yaml"), "name: notes\nbild: {}\n").unwrap();
        let e = load(dir.path()).unwrap_err();
        assert_eq!(e.file, dir.path().join("agent.yaml"));
        assert_eq!((e.line, e.column), (Some(2), Some(1)));
        assert!(e.message.contains("did you mean `build`?"), "{e}");

        let e = load(&dir.path().join("missing")).unwrap_err();
        assert!(e.to_string().ends_with("missing: no such directory"), "{e}");
    }

    /// Every example agent in the repository parses.
    #[test]
    fn examples_parse() {
        let examples = Path::new(env!("CARGO_MANIFEST_DIR")).join("../../examples");
        let Ok(entries) = std::fs::read_dir(&examples) else {
            return;
        };
        for entry in entries {
            let dir = entry.unwrap().path();
            if FILE_NAMES.iter().any(|n| dir.join(n).is_file()) {
                load(&dir).unwrap_or_else(|e| panic!("{e}"));
            }
        }
    }

    #[test]
    fn edit_distances() {
        assert_eq!(edit_distance("idle_timout", "idle_timeout"), 1);
        assert_eq!(edit_distance("", "abc"), 3);
        assert_eq!(edit_distance("kitten", "sitting"), 3);
        assert_eq!(closest("timeout", TOP.iter().map(|f| f.key)), None);
        assert_eq!(
            closest("pid", RESOURCES.iter().map(|f| f.key)),
            Some("pids")
        );
    }
}
