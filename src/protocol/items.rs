//! A fanout's items read from an object without decoding it whole: the
//! object (a large step result, or items uploaded with `fanjet items put`)
//! is a JSON array or JSON lines, and [`ItemScanner`] cuts the bytes, as
//! they arrive, into one slice per item, tracking only nesting and
//! strings. So a manager reads ten million items with a buffer, and parses
//! only those it dispatches.

use serde::{Deserialize, Serialize};
use thiserror::Error;

/// How the items of an object are written.
#[derive(
    Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize, schemars::JsonSchema,
)]
#[serde(rename_all = "lowercase")]
pub enum ItemsFormat {
    /// One JSON array.
    #[default]
    Json,
    /// One JSON value per line (blank lines skipped).
    Lines,
}

impl ItemsFormat {
    fn is_json(&self) -> bool {
        *self == ItemsFormat::Json
    }
}

/// Whether a format is the default (for `skip_serializing_if`).
pub fn is_json_format(f: &ItemsFormat) -> bool {
    f.is_json()
}

/// Why the bytes are not items.
#[derive(Debug, Error, PartialEq, Eq)]
pub enum ItemsError {
    #[error("the items are not a JSON array: it must start with '[' (byte {0})")]
    NotAnArray(u64),
    #[error("unexpected {found:?} after the items' array ended (byte {at})")]
    AfterEnd { found: char, at: u64 },
    #[error("unexpected {found:?} where an item should start (byte {at})")]
    Unexpected { found: char, at: u64 },
    #[error("the items end in the middle of an item or before the array closes")]
    Truncated,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum State {
    /// Before the opening `[` (JSON) or between lines.
    Start,
    /// Between items of the array: an item, `,` or `]` next.
    Between,
    /// Inside an item.
    Item,
    /// After the array's `]`: only whitespace.
    Done,
}

/// Cuts bytes into items (see the module's doc).
#[derive(Debug)]
pub struct ItemScanner {
    format: ItemsFormat,
    state: State,
    depth: u32,
    in_string: bool,
    escaped: bool,
    /// Whether the last item of the array was followed by a comma.
    after_comma: bool,
    item: Vec<u8>,
    offset: u64,
}

fn is_space(b: u8) -> bool {
    matches!(b, b' ' | b'\t' | b'\n' | b'\r')
}

impl ItemScanner {
    pub fn new(format: ItemsFormat) -> Self {
        ItemScanner {
            format,
            state: State::Start,
            depth: 0,
            in_string: false,
            escaped: false,
            after_comma: false,
            item: Vec::new(),
            offset: 0,
        }
    }

    /// Feeds the next bytes; `each` gets every item they complete (its
    /// JSON text, not checked beyond its nesting).
    pub fn feed(&mut self, bytes: &[u8], mut each: impl FnMut(&[u8])) -> Result<(), ItemsError> {
        for &b in bytes {
            self.offset += 1;
            match self.format {
                ItemsFormat::Lines => self.line_byte(b, &mut each),
                ItemsFormat::Json => self.json_byte(b, &mut each)?,
            }
        }
        Ok(())
    }

    /// Ends the input: the last item, or an error if it was cut short.
    pub fn finish(&mut self, mut each: impl FnMut(&[u8])) -> Result<(), ItemsError> {
        match self.format {
            ItemsFormat::Lines => {
                if self.item.iter().any(|b| !is_space(*b)) {
                    each(trim(&self.item));
                }
                self.item.clear();
                Ok(())
            }
            ItemsFormat::Json if self.state == State::Done => Ok(()),
            ItemsFormat::Json => Err(ItemsError::Truncated),
        }
    }

    fn line_byte(&mut self, b: u8, each: &mut impl FnMut(&[u8])) {
        if b == b'\n' {
            if self.item.iter().any(|b| !is_space(*b)) {
                each(trim(&self.item));
            }
            self.item.clear();
        } else {
            self.item.push(b);
        }
    }

    fn json_byte(&mut self, b: u8, each: &mut impl FnMut(&[u8])) -> Result<(), ItemsError> {
        let at = self.offset - 1;
        match self.state {
            State::Start => match b {
                b'[' => self.state = State::Between,
                b if is_space(b) => {}
                _ => return Err(ItemsError::NotAnArray(at)),
            },
            State::Done => {
                if !is_space(b) {
                    return Err(ItemsError::AfterEnd {
                        found: b as char,
                        at,
                    });
                }
            }
            State::Between => match b {
                b if is_space(b) => {}
                b']' if !self.after_comma => self.state = State::Done,
                b',' | b']' | b'}' => {
                    return Err(ItemsError::Unexpected {
                        found: b as char,
                        at,
                    })
                }
                _ => {
                    self.state = State::Item;
                    self.after_comma = false;
                    self.item.clear();
                    self.item_byte(b);
                }
            },
            State::Item => {
                if !self.in_string && self.depth == 0 && (b == b',' || b == b']') {
                    each(trim(&self.item));
                    self.item.clear();
                    if b == b',' {
                        self.state = State::Between;
                        self.after_comma = true;
                    } else {
                        self.state = State::Done;
                    }
                } else {
                    self.item_byte(b);
                }
            }
        }
        Ok(())
    }

    fn item_byte(&mut self, b: u8) {
        self.item.push(b);
        if self.in_string {
            match (self.escaped, b) {
                (true, _) => self.escaped = false,
                (false, b'\\') => self.escaped = true,
                (false, b'"') => self.in_string = false,
                _ => {}
            }
            return;
        }
        match b {
            b'"' => self.in_string = true,
            b'[' | b'{' => self.depth += 1,
            b']' | b'}' => self.depth = self.depth.saturating_sub(1),
            _ => {}
        }
    }
}

fn trim(mut s: &[u8]) -> &[u8] {
    while let [first, rest @ ..] = s {
        if !is_space(*first) {
            break;
        }
        s = rest;
    }
    while let [rest @ .., last] = s {
        if !is_space(*last) {
            break;
        }
        s = rest;
    }
    s
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;
    use serde_json::{json, Value};

    /// Every item of `text` fed in pieces of `piece` bytes.
    fn scan(text: &str, format: ItemsFormat, piece: usize) -> Result<Vec<Value>, ItemsError> {
        let mut s = ItemScanner::new(format);
        let mut out = Vec::new();
        for chunk in text.as_bytes().chunks(piece.max(1)) {
            s.feed(chunk, |b| out.push(serde_json::from_slice(b).unwrap()))?;
        }
        s.finish(|b| out.push(serde_json::from_slice(b).unwrap()))?;
        Ok(out)
    }

    #[test]
    fn arrays_and_lines_give_each_item_once() {
        let text = r#" [1, "a,]b\"", {"x": [1, {"y": "}"}]}, [], null ,true] "#;
        let want = vec![
            json!(1),
            json!("a,]b\""),
            json!({"x": [1, {"y": "}"}]}),
            json!([]),
            json!(null),
            json!(true),
        ];
        for piece in [1, 2, 3, 7, 1000] {
            assert_eq!(scan(text, ItemsFormat::Json, piece).unwrap(), want);
        }
        assert_eq!(
            scan("[]", ItemsFormat::Json, 1).unwrap(),
            Vec::<Value>::new()
        );
        let lines = "1\n\"a\"\n\n{\"x\": 2}\r\n[3]";
        assert_eq!(
            scan(lines, ItemsFormat::Lines, 2).unwrap(),
            vec![json!(1), json!("a"), json!({"x": 2}), json!([3])]
        );
    }

    #[test]
    fn what_is_not_an_array_of_items_is_refused() {
        assert_eq!(
            scan("{\"a\": 1}", ItemsFormat::Json, 4),
            Err(ItemsError::NotAnArray(0))
        );
        assert_eq!(
            scan("[1, 2", ItemsFormat::Json, 4),
            Err(ItemsError::Truncated)
        );
        assert!(matches!(
            scan("[1,]", ItemsFormat::Json, 4),
            Err(ItemsError::Unexpected { found: ']', .. })
        ));
        assert!(matches!(
            scan("[1] 2", ItemsFormat::Json, 4),
            Err(ItemsError::AfterEnd { found: '2', .. })
        ));
    }

    fn item() -> impl Strategy<Value = Value> {
        let leaf = prop_oneof![
            Just(Value::Null),
            any::<bool>().prop_map(Value::Bool),
            any::<i64>().prop_map(|n| json!(n)),
            ".{0,12}".prop_map(Value::String),
        ];
        leaf.prop_recursive(3, 24, 4, |inner| {
            prop_oneof![
                prop::collection::vec(inner.clone(), 0..4).prop_map(Value::Array),
                prop::collection::btree_map(".{0,6}", inner, 0..4)
                    .prop_map(|m| Value::Object(m.into_iter().collect())),
            ]
        })
    }

    proptest! {
        #[test]
        fn any_array_or_lines_scan_to_its_items(
            items in prop::collection::vec(item(), 0..20),
            piece in 1usize..64,
            pretty in any::<bool>(),
        ) {
            let array = match pretty {
                true => serde_json::to_string_pretty(&items).unwrap(),
                false => serde_json::to_string(&items).unwrap(),
            };
            prop_assert_eq!(scan(&array, ItemsFormat::Json, piece).unwrap(), items.clone());
            let lines: String = items
                .iter()
                .map(|i| serde_json::to_string(i).unwrap() + "\n")
                .collect();
            prop_assert_eq!(scan(&lines, ItemsFormat::Lines, piece).unwrap(), items);
        }
    }
}
