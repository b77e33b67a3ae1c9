//! The GGUF header parser: magic, version, metadata and tensor infos, read from untrusted bytes.
//!
//! Every read is bounds-checked; every count is checked against the bytes left before anything is
//! allocated from it; every size is computed with checked arithmetic. Layout (little-endian):
//! `"GGUF" u32:version u64:n_tensors u64:n_kv`, then `n_kv` × `string:key u32:type value`, then
//! `n_tensors` × `string:name u32:n_dims u64[n_dims]:ne u32:ggml_type u64:offset`, then padding to
//! `general.alignment` (default 32) and the data section; tensor offsets are relative to it.

use std::collections::HashSet;

use super::error::GgufError;
use super::metadata::{GgufArray, GgufValue, Metadata};
use super::types::{value_type as vt, GgmlType};

/// Longest metadata key (the GGUF specification's limit).
pub const MAX_KEY_LEN: u64 = 65_535;
/// Longest string value or tensor name.
pub const MAX_STRING_LEN: u64 = 16 << 20;
/// Most tensor dimensions (GGML_MAX_DIMS).
pub const MAX_DIMS: u32 = 4;
/// Deepest nesting of arrays in metadata.
pub const MAX_ARRAY_DEPTH: usize = 8;
pub const DEFAULT_ALIGNMENT: u64 = 32;
const MAX_ALIGNMENT: u64 = 1 << 30;

/// One tensor's description; `start..start + len` is its byte range in the file, checked.
#[derive(Clone, Debug, PartialEq)]
pub struct TensorInfo {
    pub name: String,
    /// GGUF order: `dims[0]` is the innermost (contiguous) axis, the reverse of a PyTorch shape.
    pub dims: Vec<u64>,
    pub ggml_type: GgmlType,
    /// Offset inside the data section, as stored.
    pub data_offset: u64,
    pub start: usize,
    pub len: usize,
    /// Where the tensor's info starts in the header (for error messages).
    pub info_offset: usize,
}

impl TensorInfo {
    /// `dims[0]`: the values per row.
    pub fn row_len(&self) -> u64 {
        self.dims.first().copied().unwrap_or(1)
    }

    /// Product of the outer dims: the number of rows when viewed as a matrix.
    pub fn rows(&self) -> u64 {
        self.dims.iter().skip(1).product()
    }
}

/// A parsed header.
#[derive(Clone, Debug)]
pub struct Header {
    pub version: u32,
    pub alignment: u64,
    pub metadata: Metadata,
    pub tensors: Vec<TensorInfo>,
    /// Absolute offset of the data section.
    pub data_start: usize,
}

struct Cursor<'a> {
    bytes: &'a [u8],
    pos: usize,
}

impl<'a> Cursor<'a> {
    fn remaining(&self) -> usize {
        self.bytes.len() - self.pos
    }

    fn take(&mut self, n: u64, what: &dyn Fn() -> String) -> Result<&'a [u8], GgufError> {
        let truncated = || GgufError::Truncated {
            what: what(),
            offset: self.pos,
            needed: n,
            file_len: self.bytes.len(),
        };
        let n = usize::try_from(n).map_err(|_| truncated())?;
        if n > self.remaining() {
            return Err(truncated());
        }
        let slice = &self.bytes[self.pos..self.pos + n];
        self.pos += n;
        Ok(slice)
    }

    fn array<const N: usize>(&mut self, what: &dyn Fn() -> String) -> Result<[u8; N], GgufError> {
        let slice = self.take(N as u64, what)?;
        let mut out = [0u8; N];
        out.copy_from_slice(slice);
        Ok(out)
    }

    fn u32(&mut self, what: &dyn Fn() -> String) -> Result<u32, GgufError> {
        self.array(what).map(u32::from_le_bytes)
    }

    fn u64(&mut self, what: &dyn Fn() -> String) -> Result<u64, GgufError> {
        self.array(what).map(u64::from_le_bytes)
    }

    /// Checks that `count` items of at least `min_size` bytes each can fit in what is left.
    fn check_count(
        &self,
        what: &dyn Fn() -> String,
        offset: usize,
        count: u64,
        min_size: u64,
    ) -> Result<(), GgufError> {
        let fits = count
            .checked_mul(min_size)
            .is_some_and(|bytes| bytes <= self.remaining() as u64);
        if fits {
            Ok(())
        } else {
            Err(GgufError::AbsurdCount {
                what: what(),
                offset,
                count,
                remaining: self.remaining(),
                min_size,
            })
        }
    }

    /// A length-prefixed string. Keys and tensor names must be UTF-8; values are decoded lossily
    /// (some tokenizer vocabularies hold stray bytes).
    fn string(&mut self, kind: StringKind, what: &dyn Fn() -> String) -> Result<String, GgufError> {
        let offset = self.pos;
        let len = self.u64(what)?;
        let max = kind.max();
        if len > max {
            return Err(match kind {
                StringKind::Key => GgufError::KeyTooLong { offset, len, max },
                _ => GgufError::StringTooLong {
                    what: what(),
                    offset,
                    len,
                    max,
                },
            });
        }
        let bytes = self.take(len, what)?;
        match kind {
            StringKind::Value => Ok(String::from_utf8_lossy(bytes).into_owned()),
            _ => String::from_utf8(bytes.to_vec()).map_err(|_| GgufError::InvalidUtf8 { what: what(), offset }),
        }
    }
}

#[derive(Clone, Copy, PartialEq)]
enum StringKind {
    Key,
    Name,
    Value,
}

impl StringKind {
    fn max(self) -> u64 {
        match self {
            StringKind::Key | StringKind::Name => MAX_KEY_LEN,
            StringKind::Value => MAX_STRING_LEN,
        }
    }
}

/// Smallest encoding of one value of a type (for count checks); `None` for an unknown type.
fn min_size(type_id: u32) -> Option<u64> {
    Some(match type_id {
        vt::U8 | vt::I8 | vt::BOOL => 1,
        vt::U16 | vt::I16 => 2,
        vt::U32 | vt::I32 | vt::F32 => 4,
        vt::U64 | vt::I64 | vt::F64 | vt::STRING => 8,
        vt::ARRAY => 12,
        _ => return None,
    })
}

/// Reads `count` fixed-size little-endian values.
fn fixed<const N: usize, T>(
    cur: &mut Cursor,
    count: u64,
    what: &dyn Fn() -> String,
    decode: fn([u8; N]) -> T,
) -> Result<Vec<T>, GgufError> {
    let total = count.saturating_mul(N as u64);
    let bytes = cur.take(total, what)?;
    Ok(bytes
        .chunks_exact(N)
        .map(|c| {
            let mut a = [0u8; N];
            a.copy_from_slice(c);
            decode(a)
        })
        .collect())
}

fn bool_byte(key: &str, offset: usize, byte: u8) -> Result<bool, GgufError> {
    match byte {
        0 => Ok(false),
        1 => Ok(true),
        _ => Err(GgufError::InvalidBool {
            key: key.to_owned(),
            offset,
            byte,
        }),
    }
}

fn read_value(cur: &mut Cursor, key: &str, type_id: u32, offset: usize) -> Result<GgufValue, GgufError> {
    let what = || format!("value of key `{key}`");
    Ok(match type_id {
        vt::U8 => GgufValue::U8(u8::from_le_bytes(cur.array(&what)?)),
        vt::I8 => GgufValue::I8(i8::from_le_bytes(cur.array(&what)?)),
        vt::U16 => GgufValue::U16(u16::from_le_bytes(cur.array(&what)?)),
        vt::I16 => GgufValue::I16(i16::from_le_bytes(cur.array(&what)?)),
        vt::U32 => GgufValue::U32(u32::from_le_bytes(cur.array(&what)?)),
        vt::I32 => GgufValue::I32(i32::from_le_bytes(cur.array(&what)?)),
        vt::F32 => GgufValue::F32(f32::from_le_bytes(cur.array(&what)?)),
        vt::U64 => GgufValue::U64(u64::from_le_bytes(cur.array(&what)?)),
        vt::I64 => GgufValue::I64(i64::from_le_bytes(cur.array(&what)?)),
        vt::F64 => GgufValue::F64(f64::from_le_bytes(cur.array(&what)?)),
        vt::BOOL => {
            let at = cur.pos;
            GgufValue::Bool(bool_byte(key, at, cur.array::<1>(&what)?[0])?)
        }
        vt::STRING => GgufValue::String(cur.string(StringKind::Value, &what)?),
        vt::ARRAY => GgufValue::Array(read_array(cur, key, 1)?),
        _ => {
            return Err(GgufError::UnknownValueType {
                key: key.to_owned(),
                offset,
                type_id,
            })
        }
    })
}

fn read_array(cur: &mut Cursor, key: &str, depth: usize) -> Result<GgufArray, GgufError> {
    let offset = cur.pos;
    if depth > MAX_ARRAY_DEPTH {
        return Err(GgufError::ArrayTooDeep {
            key: key.to_owned(),
            offset,
            max: MAX_ARRAY_DEPTH,
        });
    }
    let what = || format!("array of key `{key}`");
    let elem = cur.u32(&what)?;
    let count = cur.u64(&what)?;
    let min = min_size(elem).ok_or_else(|| GgufError::UnknownValueType {
        key: key.to_owned(),
        offset,
        type_id: elem,
    })?;
    cur.check_count(&|| format!("element count of array `{key}`"), offset, count, min)?;
    // From here `count` is bounded by the bytes left, so it fits in memory.
    Ok(match elem {
        vt::U8 => GgufArray::U8(fixed(cur, count, &what, u8::from_le_bytes)?),
        vt::I8 => GgufArray::I8(fixed(cur, count, &what, i8::from_le_bytes)?),
        vt::U16 => GgufArray::U16(fixed(cur, count, &what, u16::from_le_bytes)?),
        vt::I16 => GgufArray::I16(fixed(cur, count, &what, i16::from_le_bytes)?),
        vt::U32 => GgufArray::U32(fixed(cur, count, &what, u32::from_le_bytes)?),
        vt::I32 => GgufArray::I32(fixed(cur, count, &what, i32::from_le_bytes)?),
        vt::F32 => GgufArray::F32(fixed(cur, count, &what, f32::from_le_bytes)?),
        vt::U64 => GgufArray::U64(fixed(cur, count, &what, u64::from_le_bytes)?),
        vt::I64 => GgufArray::I64(fixed(cur, count, &what, i64::from_le_bytes)?),
        vt::F64 => GgufArray::F64(fixed(cur, count, &what, f64::from_le_bytes)?),
        vt::BOOL => {
            let start = cur.pos;
            let bytes = fixed(cur, count, &what, u8::from_le_bytes)?;
            let values = bytes
                .iter()
                .enumerate()
                .map(|(i, &b)| bool_byte(key, start + i, b))
                .collect::<Result<_, _>>()?;
            GgufArray::Bool(values)
        }
        vt::STRING => GgufArray::String(
            (0..count)
                .map(|_| cur.string(StringKind::Value, &what))
                .collect::<Result<_, _>>()?,
        ),
        _ => GgufArray::Array(
            (0..count)
                .map(|_| read_array(cur, key, depth + 1))
                .collect::<Result<_, _>>()?,
        ),
    })
}

fn read_tensor_info(cur: &mut Cursor, index: u64, alignment: u64) -> Result<TensorInfo, GgufError> {
    let info_offset = cur.pos;
    let name = cur.string(StringKind::Name, &|| format!("name of tensor #{index}"))?;
    let what = || format!("info of tensor `{name}`");
    let n_dims = cur.u32(&what)?;
    if n_dims > MAX_DIMS {
        return Err(GgufError::TooManyDims {
            tensor: name,
            offset: info_offset,
            n_dims,
            max: MAX_DIMS,
        });
    }
    let dims = (0..n_dims).map(|_| cur.u64(&what)).collect::<Result<Vec<_>, _>>()?;
    let type_id = cur.u32(&what)?;
    let data_offset = cur.u64(&what)?;
    let ggml_type = GgmlType::from_id(type_id).ok_or_else(|| GgufError::UnknownGgmlType {
        tensor: name.clone(),
        offset: info_offset,
        type_id,
    })?;
    let overflow = || GgufError::ShapeOverflow {
        tensor: name.clone(),
        offset: info_offset,
        dims: dims.clone(),
    };
    // Zero dims count as 1 here, so that no product of any subset of the dims can overflow later.
    dims.iter()
        .try_fold(1u64, |acc, &d| acc.checked_mul(d.max(1)))
        .ok_or_else(overflow)?;
    let elements: u64 = dims.iter().product();
    let ne0 = dims.first().copied().unwrap_or(1);
    if !ne0.is_multiple_of(ggml_type.block) {
        return Err(GgufError::RowNotBlockMultiple {
            tensor: name,
            offset: info_offset,
            ne0,
            ggml_type: ggml_type.name,
            block: ggml_type.block,
        });
    }
    let bytes = ggml_type
        .bytes_for(elements)
        .and_then(|b| usize::try_from(b).ok())
        .ok_or_else(overflow)?;
    if !data_offset.is_multiple_of(alignment) {
        return Err(GgufError::MisalignedTensor {
            tensor: name,
            data_offset,
            alignment,
        });
    }
    Ok(TensorInfo {
        name,
        dims,
        ggml_type,
        data_offset,
        start: 0,
        len: bytes,
        info_offset,
    })
}

fn alignment_of(metadata: &Metadata) -> Result<u64, GgufError> {
    let Some(value) = metadata.usize("general.alignment")? else {
        return Ok(DEFAULT_ALIGNMENT);
    };
    let value = value as u64;
    if value == 0 || !value.is_power_of_two() || value > MAX_ALIGNMENT {
        return Err(GgufError::BadAlignment { value });
    }
    Ok(value)
}

/// Parses the header of a GGUF file held in `bytes` (the whole file).
pub fn parse(bytes: &[u8]) -> Result<Header, GgufError> {
    let mut cur = Cursor { bytes, pos: 0 };
    let magic = bytes.get(..4).unwrap_or(bytes);
    if magic != b"GGUF" {
        return Err(GgufError::BadMagic { found: magic.to_vec() });
    }
    cur.pos = 4;
    let version = cur.u32(&|| "version".into())?;
    if version != 2 && version != 3 {
        return Err(GgufError::UnsupportedVersion { version });
    }
    let counts_at = cur.pos;
    let n_tensors = cur.u64(&|| "tensor count".into())?;
    let n_kv = cur.u64(&|| "metadata count".into())?;
    // Smallest tensor info: empty name (8) + n_dims (4) + type (4) + offset (8).
    cur.check_count(&|| "tensor count".into(), counts_at, n_tensors, 24)?;
    // Smallest key/value: empty key (8) + type (4) + a one-byte value.
    cur.check_count(&|| "metadata count".into(), counts_at + 8, n_kv, 13)?;

    let mut metadata = Metadata::default();
    for _ in 0..n_kv {
        let offset = cur.pos;
        let key = cur.string(StringKind::Key, &|| "metadata key".into())?;
        let type_id = cur.u32(&|| format!("type of key `{key}`"))?;
        let value = read_value(&mut cur, &key, type_id, offset)?;
        if !metadata.insert(key.clone(), value) {
            return Err(GgufError::DuplicateKey { key, offset });
        }
    }
    let alignment = alignment_of(&metadata)?;

    let mut tensors = Vec::new();
    let mut names = HashSet::new();
    for index in 0..n_tensors {
        let info = read_tensor_info(&mut cur, index, alignment)?;
        if !names.insert(info.name.clone()) {
            return Err(GgufError::DuplicateTensor {
                tensor: info.name,
                offset: info.info_offset,
            });
        }
        tensors.push(info);
    }

    let header_end = cur.pos as u64;
    let data_start = header_end.div_ceil(alignment).saturating_mul(alignment);
    for t in &mut tensors {
        let start = data_start.checked_add(t.data_offset);
        let end = start.and_then(|s| s.checked_add(t.len as u64));
        match (start, end) {
            (Some(s), Some(e)) if e <= bytes.len() as u64 => t.start = s as usize,
            _ => {
                return Err(GgufError::DataOutOfRange {
                    tensor: t.name.clone(),
                    start: start.unwrap_or(u64::MAX),
                    end: end.unwrap_or(u64::MAX),
                    file_len: bytes.len(),
                })
            }
        }
    }
    Ok(Header {
        version,
        alignment,
        metadata,
        tensors,
        data_start: usize::try_from(data_start).unwrap_or(usize::MAX),
    })
}
