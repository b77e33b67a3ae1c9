//! GGUF metadata values and typed access to them: every getter checks the stored type first and
//! names the key when it is wrong.

use std::collections::HashMap;

use super::error::GgufError;

/// One metadata value. Arrays are stored per element type, so memory stays proportional to the
/// bytes they occupy in the file.
#[derive(Clone, Debug, PartialEq)]
pub enum GgufValue {
    U8(u8),
    I8(i8),
    U16(u16),
    I16(i16),
    U32(u32),
    I32(i32),
    U64(u64),
    I64(i64),
    F32(f32),
    F64(f64),
    Bool(bool),
    String(String),
    Array(GgufArray),
}

/// A metadata array, homogeneous by GGUF's rules.
#[derive(Clone, Debug, PartialEq)]
pub enum GgufArray {
    U8(Vec<u8>),
    I8(Vec<i8>),
    U16(Vec<u16>),
    I16(Vec<i16>),
    U32(Vec<u32>),
    I32(Vec<i32>),
    U64(Vec<u64>),
    I64(Vec<i64>),
    F32(Vec<f32>),
    F64(Vec<f64>),
    Bool(Vec<bool>),
    String(Vec<String>),
    Array(Vec<GgufArray>),
}

impl GgufArray {
    pub fn len(&self) -> usize {
        match self {
            GgufArray::U8(v) => v.len(),
            GgufArray::I8(v) => v.len(),
            GgufArray::U16(v) => v.len(),
            GgufArray::I16(v) => v.len(),
            GgufArray::U32(v) => v.len(),
            GgufArray::I32(v) => v.len(),
            GgufArray::U64(v) => v.len(),
            GgufArray::I64(v) => v.len(),
            GgufArray::F32(v) => v.len(),
            GgufArray::F64(v) => v.len(),
            GgufArray::Bool(v) => v.len(),
            GgufArray::String(v) => v.len(),
            GgufArray::Array(v) => v.len(),
        }
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// Length and element type, for error messages: `array of 3 u32`.
    pub fn describe(&self) -> String {
        let element = match self {
            GgufArray::U8(_) => "u8",
            GgufArray::I8(_) => "i8",
            GgufArray::U16(_) => "u16",
            GgufArray::I16(_) => "i16",
            GgufArray::U32(_) => "u32",
            GgufArray::I32(_) => "i32",
            GgufArray::U64(_) => "u64",
            GgufArray::I64(_) => "i64",
            GgufArray::F32(_) => "f32",
            GgufArray::F64(_) => "f64",
            GgufArray::Bool(_) => "bool",
            GgufArray::String(_) => "string",
            GgufArray::Array(_) => "array",
        };
        format!("array of {} {element}", self.len())
    }
}

impl GgufValue {
    /// The GGUF type name, for error messages.
    pub fn type_name(&self) -> String {
        match self {
            GgufValue::U8(_) => "u8".into(),
            GgufValue::I8(_) => "i8".into(),
            GgufValue::U16(_) => "u16".into(),
            GgufValue::I16(_) => "i16".into(),
            GgufValue::U32(_) => "u32".into(),
            GgufValue::I32(_) => "i32".into(),
            GgufValue::U64(_) => "u64".into(),
            GgufValue::I64(_) => "i64".into(),
            GgufValue::F32(_) => "f32".into(),
            GgufValue::F64(_) => "f64".into(),
            GgufValue::Bool(_) => "bool".into(),
            GgufValue::String(_) => "string".into(),
            GgufValue::Array(a) => a.describe(),
        }
    }

    /// Any integer type, widened (`None` for other types).
    pub fn as_i128(&self) -> Option<i128> {
        Some(match *self {
            GgufValue::U8(v) => v.into(),
            GgufValue::I8(v) => v.into(),
            GgufValue::U16(v) => v.into(),
            GgufValue::I16(v) => v.into(),
            GgufValue::U32(v) => v.into(),
            GgufValue::I32(v) => v.into(),
            GgufValue::U64(v) => v.into(),
            GgufValue::I64(v) => v.into(),
            _ => return None,
        })
    }
}

/// The key → value map of a file (duplicate keys are refused while parsing).
#[derive(Clone, Debug, Default)]
pub struct Metadata {
    values: HashMap<String, GgufValue>,
}

impl Metadata {
    /// Adds a key; `false` if it was already present.
    pub(crate) fn insert(&mut self, key: String, value: GgufValue) -> bool {
        if self.values.contains_key(&key) {
            return false;
        }
        self.values.insert(key, value);
        true
    }

    pub fn get(&self, key: &str) -> Option<&GgufValue> {
        self.values.get(key)
    }

    pub fn len(&self) -> usize {
        self.values.len()
    }

    pub fn is_empty(&self) -> bool {
        self.values.is_empty()
    }

    pub fn keys(&self) -> impl Iterator<Item = &str> {
        self.values.keys().map(String::as_str)
    }

    fn wrong(key: &str, expected: &'static str, value: &GgufValue) -> GgufError {
        GgufError::WrongValueType {
            key: key.to_owned(),
            expected,
            found: value.type_name(),
        }
    }

    /// A non-negative integer of any integer type that fits `usize`.
    pub fn usize(&self, key: &str) -> Result<Option<usize>, GgufError> {
        let Some(value) = self.get(key) else {
            return Ok(None);
        };
        let n = value.as_i128().ok_or_else(|| Self::wrong(key, "an integer", value))?;
        usize::try_from(n).map(Some).map_err(|_| GgufError::ValueOutOfRange {
            key: key.to_owned(),
            value: n.to_string(),
            expected: "a non-negative integer",
        })
    }

    /// A finite float (f32 or f64; integers are accepted too).
    pub fn f64(&self, key: &str) -> Result<Option<f64>, GgufError> {
        let Some(value) = self.get(key) else {
            return Ok(None);
        };
        let v = match *value {
            GgufValue::F32(v) => v as f64,
            GgufValue::F64(v) => v,
            ref other => other
                .as_i128()
                .map(|n| n as f64)
                .ok_or_else(|| Self::wrong(key, "a number", value))?,
        };
        if !v.is_finite() {
            return Err(GgufError::ValueOutOfRange {
                key: key.to_owned(),
                value: v.to_string(),
                expected: "a finite number",
            });
        }
        Ok(Some(v))
    }

    pub fn bool(&self, key: &str) -> Result<Option<bool>, GgufError> {
        match self.get(key) {
            None => Ok(None),
            Some(GgufValue::Bool(b)) => Ok(Some(*b)),
            Some(other) => Err(Self::wrong(key, "a bool", other)),
        }
    }

    pub fn str(&self, key: &str) -> Result<Option<&str>, GgufError> {
        match self.get(key) {
            None => Ok(None),
            Some(GgufValue::String(s)) => Ok(Some(s)),
            Some(other) => Err(Self::wrong(key, "a string", other)),
        }
    }

    pub fn array(&self, key: &str) -> Result<Option<&GgufArray>, GgufError> {
        match self.get(key) {
            None => Ok(None),
            Some(GgufValue::Array(a)) => Ok(Some(a)),
            Some(other) => Err(Self::wrong(key, "an array", other)),
        }
    }

    /// A required integer.
    pub fn require_usize(&self, key: &str) -> Result<usize, GgufError> {
        self.usize(key)?
            .ok_or_else(|| GgufError::MissingKey { key: key.to_owned() })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn getters_check_the_type() {
        let mut m = Metadata::default();
        assert!(m.insert("a".into(), GgufValue::U32(7)));
        assert!(!m.insert("a".into(), GgufValue::U32(8)));
        m.insert("neg".into(), GgufValue::I32(-1));
        m.insert("s".into(), GgufValue::String("x".into()));
        m.insert("f".into(), GgufValue::F32(f32::NAN));
        assert_eq!(m.usize("a").unwrap(), Some(7));
        assert_eq!(m.f64("a").unwrap(), Some(7.0));
        assert!(matches!(m.usize("s"), Err(GgufError::WrongValueType { .. })));
        assert!(matches!(m.usize("neg"), Err(GgufError::ValueOutOfRange { .. })));
        assert!(matches!(m.f64("f"), Err(GgufError::ValueOutOfRange { .. })));
        assert!(matches!(m.bool("a"), Err(GgufError::WrongValueType { .. })));
        assert!(matches!(m.require_usize("zz"), Err(GgufError::MissingKey { .. })));
        assert_eq!(m.str("s").unwrap(), Some("x"));
    }
}
