//! A message's text as the store's cache of session tails, every prompt
//! and every attempt share it: one allocation per message, and its JSON
//! string form encoded at most once. A history message is sent again with
//! every later reply of its session, and escaping it into the upstream
//! request each time was the largest single item of a reply's instructions
//! (callgrind, with the history window full).

use std::borrow::Cow;
use std::fmt;
use std::ops::Deref;
use std::sync::{Arc, OnceLock};

use serde_json::value::RawValue;

#[derive(Clone)]
pub struct SharedText(Arc<Inner>);

struct Inner {
    text: Box<str>,
    /// `None` only if the text could not be encoded, which a string always can.
    json: OnceLock<Option<Box<RawValue>>>,
}

impl SharedText {
    pub fn as_str(&self) -> &str {
        &self.0.text
    }

    /// The text as a JSON string (quoted and escaped), encoded on first use.
    pub fn json(&self) -> Option<&RawValue> {
        self.0
            .json
            .get_or_init(|| serde_json::value::to_raw_value(&*self.0.text).ok())
            .as_deref()
    }
}

impl Deref for SharedText {
    type Target = str;

    fn deref(&self) -> &str {
        self.as_str()
    }
}

impl From<&str> for SharedText {
    fn from(text: &str) -> Self {
        text.to_owned().into()
    }
}

impl From<String> for SharedText {
    fn from(text: String) -> Self {
        Self(Arc::new(Inner {
            text: text.into_boxed_str(),
            json: OnceLock::new(),
        }))
    }
}

impl From<Cow<'_, str>> for SharedText {
    fn from(text: Cow<'_, str>) -> Self {
        text.into_owned().into()
    }
}

impl PartialEq for SharedText {
    fn eq(&self, other: &Self) -> bool {
        self.as_str() == other.as_str()
    }
}

impl Eq for SharedText {}

impl fmt::Display for SharedText {
    fn fmt(&self, formatter: &mut fmt::Formatter<'_>) -> fmt::Result {
        formatter.write_str(self.as_str())
    }
}

impl fmt::Debug for SharedText {
    fn fmt(&self, formatter: &mut fmt::Formatter<'_>) -> fmt::Result {
        fmt::Debug::fmt(self.as_str(), formatter)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_json_form_is_the_text_as_a_json_string() {
        for text in [
            "",
            "plain",
            "quote \" backslash \\ newline \n tab \t",
            "é 🦀 \u{1}",
        ] {
            let shared = SharedText::from(text);
            let json = shared.json().unwrap();
            assert_eq!(json.get(), serde_json::to_string(text).unwrap());
            assert_eq!(serde_json::from_str::<String>(json.get()).unwrap(), text);
            // Encoded once: the second call gives the same encoding.
            assert!(std::ptr::eq(json, shared.json().unwrap()));
            assert_eq!(&*shared, text);
        }
    }
}
