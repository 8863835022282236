//! Config text to a JSON `Value`, noting every duplicated key: serde_json
//! would silently keep the last of two `"Apps"`, and other readers of the
//! same file (jq, the Go tester, a person) need not agree on which wins.

use std::cell::RefCell;
use std::fmt;

use serde::de::{DeserializeSeed, MapAccess, SeqAccess, Visitor};
use serde_json::{Map, Number, Value};

/// Parses `text`; each duplicated key becomes an error in `errors` (with
/// its field path), and its first value is the one kept.
pub(super) fn parse(text: &str, errors: &mut Vec<String>) -> serde_json::Result<Value> {
    let dups = RefCell::new(Vec::new());
    let mut de = serde_json::Deserializer::from_str(text);
    let value = Node {
        path: String::new(),
        dups: &dups,
    }
    .deserialize(&mut de)?;
    de.end()?;
    errors.extend(dups.into_inner());
    Ok(value)
}

/// One value being read, and where it sits (`Apps[1]`, empty at the top).
struct Node<'a> {
    path: String,
    dups: &'a RefCell<Vec<String>>,
}

impl Node<'_> {
    fn child(&self, path: String) -> Self {
        Node {
            path,
            dups: self.dups,
        }
    }
}

impl<'de> DeserializeSeed<'de> for Node<'_> {
    type Value = Value;

    fn deserialize<D: serde::Deserializer<'de>>(self, d: D) -> Result<Value, D::Error> {
        d.deserialize_any(self)
    }
}

impl<'de> Visitor<'de> for Node<'_> {
    type Value = Value;

    fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("a JSON value")
    }

    fn visit_unit<E>(self) -> Result<Value, E> {
        Ok(Value::Null)
    }

    fn visit_bool<E>(self, v: bool) -> Result<Value, E> {
        Ok(Value::Bool(v))
    }

    fn visit_i64<E>(self, v: i64) -> Result<Value, E> {
        Ok(Value::Number(v.into()))
    }

    fn visit_u64<E>(self, v: u64) -> Result<Value, E> {
        Ok(Value::Number(v.into()))
    }

    fn visit_f64<E>(self, v: f64) -> Result<Value, E> {
        // JSON text has no NaN or infinity, so this is never Null.
        Ok(Number::from_f64(v).map_or(Value::Null, Value::Number))
    }

    fn visit_str<E>(self, v: &str) -> Result<Value, E> {
        Ok(Value::String(v.to_string()))
    }

    fn visit_string<E>(self, v: String) -> Result<Value, E> {
        Ok(Value::String(v))
    }

    fn visit_seq<A: SeqAccess<'de>>(self, mut seq: A) -> Result<Value, A::Error> {
        let mut items = Vec::new();
        while let Some(v) =
            seq.next_element_seed(self.child(format!("{}[{}]", self.path, items.len())))?
        {
            items.push(v);
        }
        Ok(Value::Array(items))
    }

    fn visit_map<A: MapAccess<'de>>(self, mut map: A) -> Result<Value, A::Error> {
        let mut obj = Map::new();
        while let Some(key) = map.next_key::<String>()? {
            let path = if self.path.is_empty() {
                key.clone()
            } else {
                format!("{}.{key}", self.path)
            };
            let value = map.next_value_seed(self.child(path))?;
            if obj.contains_key(&key) {
                let at = if self.path.is_empty() {
                    "top level"
                } else {
                    &self.path
                };
                self.dups.borrow_mut().push(format!(
                    "{at}: field `{}` appears twice; keep one (JSON readers disagree on which of two equal keys wins)",
                    key.escape_debug()
                ));
            } else {
                obj.insert(key, value);
            }
        }
        Ok(Value::Object(obj))
    }
}
