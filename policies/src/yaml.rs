//! A YAML document as a tree that remembers where each node was written, and a serde
//! deserializer over it.
//!
//! serde_yaml reports only the first mistake and cannot point at a field that parsed but
//! failed a later check. Parsing into this tree first (with yaml-rust2's marked events) lets
//! the loader feed the same derived `Deserialize` impls, attach a line and column to every
//! error, and keep going after one: the loader drops the offending entry and tries again.

use std::fmt;

use serde::de::{self, DeserializeSeed, IntoDeserializer, MapAccess, SeqAccess, Visitor};
use yaml_rust2::parser::{Event, Parser};
use yaml_rust2::scanner::TScalarStyle;

/// Nesting deeper than this is refused: no policy needs it, and it bounds recursion.
const MAX_DEPTH: usize = 32;
/// More nodes than this are refused: no policy needs them.
const MAX_NODES: usize = 10_000;

/// A place in the source text, 1-based.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord)]
pub struct Mark {
    /// Line, from 1.
    pub line: usize,
    /// Column, from 1.
    pub column: usize,
}

impl Mark {
    pub(crate) const START: Mark = Mark { line: 1, column: 1 };
}

impl fmt::Display for Mark {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}:{}", self.line, self.column)
    }
}

/// One node of the document.
#[derive(Clone, Debug)]
pub(crate) struct Node {
    pub(crate) kind: Kind,
    pub(crate) mark: Mark,
}

#[derive(Clone, Debug)]
pub(crate) enum Kind {
    /// A scalar; `plain` when written without quotes (so `10` is a number, `"10"` a string).
    Scalar {
        text: String,
        plain: bool,
    },
    Seq(Vec<Node>),
    Map(Vec<(Node, Node)>),
}

impl Node {
    /// The value under `key` in a mapping.
    pub(crate) fn get(&self, key: &str) -> Option<&Node> {
        match &self.kind {
            Kind::Map(entries) => entries
                .iter()
                .find(|(k, _)| k.scalar() == Some(key))
                .map(|(_, v)| v),
            _ => None,
        }
    }

    pub(crate) fn scalar(&self) -> Option<&str> {
        match &self.kind {
            Kind::Scalar { text, .. } => Some(text),
            _ => None,
        }
    }

    fn is_null(&self) -> bool {
        matches!(&self.kind, Kind::Scalar { text, plain: true } if matches!(text.as_str(), "" | "~" | "null" | "Null" | "NULL"))
    }

    fn describe(&self) -> &'static str {
        match &self.kind {
            Kind::Scalar { .. } if self.is_null() => "nothing (null)",
            Kind::Scalar { .. } => "a scalar",
            Kind::Seq(_) => "a list",
            Kind::Map(_) => "a mapping",
        }
    }
}

/// Why text is not a YAML document this crate accepts.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct SyntaxError {
    pub(crate) mark: Mark,
    pub(crate) message: String,
}

fn mark_of(m: yaml_rust2::scanner::Marker) -> Mark {
    // yaml-rust2 counts lines from 1 and columns from 0.
    Mark {
        line: m.line().max(1),
        column: m.col() + 1,
    }
}

/// Parses one YAML document into a tree. Aliases, tags, several documents and absurd nesting
/// are refused: a policy needs none of them, and refusing aliases keeps "billion laughs"
/// documents out.
///
/// Returns the tree and the mistakes that did not stop parsing (duplicate keys: the first
/// value is kept).
pub(crate) fn parse(text: &str) -> Result<(Node, Vec<SyntaxError>), SyntaxError> {
    enum Open {
        Seq(Mark, Vec<Node>),
        Map(Mark, Vec<(Node, Node)>, Option<Node>),
    }
    let mut parser = Parser::new_from_str(text);
    let mut stack: Vec<Open> = Vec::new();
    let mut root: Option<Node> = None;
    let mut documents = 0;
    let mut nodes = 0usize;
    let mut mistakes = Vec::new();
    loop {
        let (event, marker) = parser.next_token().map_err(|e| SyntaxError {
            mark: mark_of(*e.marker()),
            message: e.info().to_owned(),
        })?;
        let mark = mark_of(marker);
        let refuse = |message: &str| SyntaxError {
            mark,
            message: message.to_owned(),
        };
        let node = match event {
            Event::StreamEnd => break,
            Event::StreamStart | Event::DocumentEnd | Event::Nothing => continue,
            Event::DocumentStart => {
                documents += 1;
                if documents > 1 {
                    return Err(refuse(
                        "a policy file holds one YAML document, found a second",
                    ));
                }
                continue;
            }
            Event::Alias(_) => return Err(refuse("aliases (*name) are not supported in policies")),
            Event::Scalar(_, _, _, Some(_))
            | Event::SequenceStart(_, Some(_))
            | Event::MappingStart(_, Some(_)) => {
                return Err(refuse("tags (!name) are not supported in policies"));
            }
            Event::Scalar(text, style, _, None) => Node {
                kind: Kind::Scalar {
                    text,
                    plain: style == TScalarStyle::Plain,
                },
                mark,
            },
            Event::SequenceStart(_, None) | Event::MappingStart(_, None) => {
                if stack.len() >= MAX_DEPTH {
                    return Err(refuse("nesting is too deep for a policy"));
                }
                stack.push(if matches!(event, Event::SequenceStart(..)) {
                    Open::Seq(mark, Vec::new())
                } else {
                    Open::Map(mark, Vec::new(), None)
                });
                continue;
            }
            Event::SequenceEnd | Event::MappingEnd => match stack.pop() {
                Some(Open::Seq(mark, items)) => Node {
                    kind: Kind::Seq(items),
                    mark,
                },
                Some(Open::Map(mark, entries, _)) => Node {
                    // A block mapping's start event is reported after its first key; point at
                    // whichever comes first.
                    mark: entries.first().map_or(mark, |(key, _)| key.mark.min(mark)),
                    kind: Kind::Map(entries),
                },
                None => return Err(refuse("unbalanced document")),
            },
        };
        nodes += 1;
        if nodes > MAX_NODES {
            return Err(refuse("the document is too large for a policy"));
        }
        match stack.last_mut() {
            None => root = Some(node),
            Some(Open::Seq(_, items)) => items.push(node),
            Some(Open::Map(_, entries, pending)) => match pending.take() {
                None => *pending = Some(node),
                Some(key) => {
                    if !matches!(key.kind, Kind::Scalar { .. }) {
                        return Err(SyntaxError {
                            mark: key.mark,
                            message: "keys must be plain names, not lists or mappings".into(),
                        });
                    }
                    if let Some((first, _)) =
                        entries.iter().find(|(k, _)| k.scalar() == key.scalar())
                    {
                        mistakes.push(SyntaxError {
                            mark: key.mark,
                            message: format!(
                                "duplicate key `{}` (first given at line {}); the first is used",
                                key.scalar().unwrap_or_default(),
                                first.mark.line
                            ),
                        });
                        continue;
                    }
                    // An empty value is reported where the next token starts, which may be
                    // lines below; its key is the place to point at.
                    let node = if node.is_null() && node.scalar() == Some("") {
                        Node {
                            mark: key.mark,
                            ..node
                        }
                    } else {
                        node
                    };
                    entries.push((key, node));
                }
            },
        }
    }
    let root = root.unwrap_or(Node {
        kind: Kind::Scalar {
            text: String::new(),
            plain: true,
        },
        mark: Mark::START,
    });
    Ok((root, mistakes))
}

/// Where in the tree a node sits: the entry index at each mapping level (lists are never
/// descended into by policies, so entries suffice).
pub(crate) type Location = Vec<usize>;

/// What went wrong while deserializing, and where.
#[derive(Debug, Clone)]
pub(crate) struct DeError {
    pub(crate) kind: DeErrorKind,
    /// Set by the innermost node that saw the error.
    pub(crate) at: Option<(Mark, Location, String)>,
}

#[derive(Debug, Clone)]
pub(crate) enum DeErrorKind {
    UnknownField {
        field: String,
        expected: &'static [&'static str],
    },
    MissingField(&'static str),
    Other(String),
}

impl fmt::Display for DeError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match &self.kind {
            DeErrorKind::UnknownField { field, .. } => write!(f, "unknown key `{field}`"),
            DeErrorKind::MissingField(field) => write!(f, "missing key `{field}`"),
            DeErrorKind::Other(message) => f.write_str(message),
        }
    }
}

impl std::error::Error for DeError {}

impl de::Error for DeError {
    fn custom<T: fmt::Display>(msg: T) -> Self {
        Self {
            kind: DeErrorKind::Other(msg.to_string()),
            at: None,
        }
    }

    fn unknown_field(field: &str, expected: &'static [&'static str]) -> Self {
        Self {
            kind: DeErrorKind::UnknownField {
                field: field.to_owned(),
                expected,
            },
            at: None,
        }
    }

    fn missing_field(field: &'static str) -> Self {
        Self {
            kind: DeErrorKind::MissingField(field),
            at: None,
        }
    }
}

/// Deserializes one node, knowing its location and dotted path.
pub(crate) struct NodeDeserializer<'a> {
    pub(crate) node: &'a Node,
    pub(crate) location: Location,
    pub(crate) path: String,
}

impl<'a> NodeDeserializer<'a> {
    pub(crate) fn root(node: &'a Node) -> Self {
        Self {
            node,
            location: Vec::new(),
            path: String::new(),
        }
    }

    fn locate(&self, mut error: DeError) -> DeError {
        if error.at.is_none() {
            error.at = Some((self.node.mark, self.location.clone(), self.path.clone()));
        }
        error
    }

    fn invalid_type(&self, exp: &dyn de::Expected) -> DeError {
        de::Error::custom(format!("expected {exp}, found {}", self.node.describe()))
    }
}

/// A plain scalar read the YAML 1.2 core way: null, booleans, integers, floats, or text.
enum Plain<'a> {
    Null,
    Bool(bool),
    Int(i64),
    UInt(u64),
    Float(f64),
    Str(&'a str),
}

fn resolve(text: &str) -> Plain<'_> {
    match text {
        "" | "~" | "null" | "Null" | "NULL" => return Plain::Null,
        "true" | "True" | "TRUE" => return Plain::Bool(true),
        "false" | "False" | "FALSE" => return Plain::Bool(false),
        _ => {}
    }
    if let Ok(u) = text.parse::<u64>() {
        return Plain::UInt(u);
    }
    if let Ok(i) = text.parse::<i64>() {
        return Plain::Int(i);
    }
    let numeric =
        text.starts_with(|c: char| c.is_ascii_digit() || c == '-' || c == '+' || c == '.');
    if numeric && let Ok(f) = text.parse::<f64>() {
        return Plain::Float(f);
    }
    Plain::Str(text)
}

impl<'de> de::Deserializer<'de> for NodeDeserializer<'_> {
    type Error = DeError;

    fn deserialize_any<V: Visitor<'de>>(self, visitor: V) -> Result<V::Value, DeError> {
        let result = match &self.node.kind {
            Kind::Scalar { text, plain: false } => visitor.visit_str(text),
            Kind::Scalar { text, plain: true } => match resolve(text) {
                Plain::Null => visitor.visit_unit(),
                Plain::Bool(b) => visitor.visit_bool(b),
                Plain::Int(i) => visitor.visit_i64(i),
                Plain::UInt(u) => visitor.visit_u64(u),
                Plain::Float(f) => visitor.visit_f64(f),
                Plain::Str(s) => visitor.visit_str(s),
            },
            Kind::Seq(items) => visitor.visit_seq(Items {
                items: items.iter(),
                parent: &self,
                index: 0,
            }),
            Kind::Map(entries) => visitor.visit_map(Entries {
                entries: entries.iter().enumerate(),
                parent: &self,
                value: None,
            }),
        };
        result.map_err(|e| self.locate(e))
    }

    fn deserialize_str<V: Visitor<'de>>(self, visitor: V) -> Result<V::Value, DeError> {
        match &self.node.kind {
            Kind::Scalar { text, .. } if !self.node.is_null() => {
                visitor.visit_str(text).map_err(|e| self.locate(e))
            }
            _ => Err(self.locate(self.invalid_type(&visitor))),
        }
    }

    fn deserialize_string<V: Visitor<'de>>(self, visitor: V) -> Result<V::Value, DeError> {
        self.deserialize_str(visitor)
    }

    fn deserialize_identifier<V: Visitor<'de>>(self, visitor: V) -> Result<V::Value, DeError> {
        self.deserialize_str(visitor)
    }

    fn deserialize_option<V: Visitor<'de>>(self, visitor: V) -> Result<V::Value, DeError> {
        if self.node.is_null() {
            visitor.visit_none().map_err(|e| self.locate(e))
        } else {
            visitor.visit_some(self)
        }
    }

    fn deserialize_struct<V: Visitor<'de>>(
        self,
        _name: &'static str,
        _fields: &'static [&'static str],
        visitor: V,
    ) -> Result<V::Value, DeError> {
        match &self.node.kind {
            Kind::Map(_) => self.deserialize_any(visitor),
            _ => Err(self.locate(self.invalid_type(&visitor))),
        }
    }

    fn deserialize_newtype_struct<V: Visitor<'de>>(
        self,
        _name: &'static str,
        visitor: V,
    ) -> Result<V::Value, DeError> {
        visitor.visit_newtype_struct(self)
    }

    fn deserialize_enum<V: Visitor<'de>>(
        self,
        _name: &'static str,
        _variants: &'static [&'static str],
        visitor: V,
    ) -> Result<V::Value, DeError> {
        match &self.node.kind {
            Kind::Scalar { text, .. } => visitor
                .visit_enum(text.as_str().into_deserializer())
                .map_err(|e| self.locate(e)),
            _ => Err(self.locate(self.invalid_type(&visitor))),
        }
    }

    serde::forward_to_deserialize_any! {
        bool i8 i16 i32 i64 i128 u8 u16 u32 u64 u128 f32 f64 char
        bytes byte_buf unit unit_struct seq tuple tuple_struct map ignored_any
    }
}

struct Items<'a, 'p> {
    items: std::slice::Iter<'a, Node>,
    parent: &'p NodeDeserializer<'a>,
    index: usize,
}

impl<'de> SeqAccess<'de> for Items<'_, '_> {
    type Error = DeError;

    fn next_element_seed<T: DeserializeSeed<'de>>(
        &mut self,
        seed: T,
    ) -> Result<Option<T::Value>, DeError> {
        let Some(node) = self.items.next() else {
            return Ok(None);
        };
        let path = format!("{}[{}]", self.parent.path, self.index);
        self.index += 1;
        seed.deserialize(NodeDeserializer {
            node,
            // Lists are not descended into for recovery: an error inside one points at the list.
            location: self.parent.location.clone(),
            path,
        })
        .map(Some)
    }
}

struct Entries<'a, 'p> {
    entries: std::iter::Enumerate<std::slice::Iter<'a, (Node, Node)>>,
    parent: &'p NodeDeserializer<'a>,
    value: Option<NodeDeserializer<'a>>,
}

impl<'de> MapAccess<'de> for Entries<'_, '_> {
    type Error = DeError;

    fn next_key_seed<K: DeserializeSeed<'de>>(
        &mut self,
        seed: K,
    ) -> Result<Option<K::Value>, DeError> {
        let Some((index, (key, value))) = self.entries.next() else {
            return Ok(None);
        };
        let name = key.scalar().unwrap_or_default();
        let path = if self.parent.path.is_empty() {
            name.to_owned()
        } else {
            format!("{}.{name}", self.parent.path)
        };
        let mut location = self.parent.location.clone();
        location.push(index);
        let key_de = NodeDeserializer {
            node: key,
            location: location.clone(),
            path: path.clone(),
        };
        let parsed = seed.deserialize(key_de)?;
        self.value = Some(NodeDeserializer {
            node: value,
            location,
            path,
        });
        Ok(Some(parsed))
    }

    fn next_value_seed<V: DeserializeSeed<'de>>(&mut self, seed: V) -> Result<V::Value, DeError> {
        let value = self.value.take().ok_or_else(|| {
            <DeError as de::Error>::custom("a value was asked for before its key")
        })?;
        seed.deserialize(value)
    }
}

/// Removes the entry at `location` (a mapping entry) from the tree. Returns false when the
/// location does not name an entry.
pub(crate) fn remove_entry(root: &mut Node, location: &[usize]) -> bool {
    let Some((last, parents)) = location.split_last() else {
        return false;
    };
    let mut node = root;
    for &i in parents {
        match &mut node.kind {
            Kind::Map(entries) if i < entries.len() => node = &mut entries[i].1,
            _ => return false,
        }
    }
    match &mut node.kind {
        Kind::Map(entries) if *last < entries.len() => {
            entries.remove(*last);
            true
        }
        _ => false,
    }
}

/// Adds `key: text` to the mapping at `location`, so a missing required key stops failing
/// and the rest of the document can still be checked.
pub(crate) fn insert_placeholder(
    root: &mut Node,
    location: &[usize],
    key: &str,
    text: &str,
) -> bool {
    let mut node = root;
    for &i in location {
        match &mut node.kind {
            Kind::Map(entries) if i < entries.len() => node = &mut entries[i].1,
            _ => return false,
        }
    }
    let mark = node.mark;
    match &mut node.kind {
        Kind::Map(entries) => {
            let scalar = |text: &str| Node {
                kind: Kind::Scalar {
                    text: text.to_owned(),
                    plain: false,
                },
                mark,
            };
            entries.push((scalar(key), scalar(text)));
            true
        }
        _ => false,
    }
}
