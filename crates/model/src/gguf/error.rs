//! What can be wrong with a GGUF file. Every variant says where: the byte offset in the file, and
//! the key or tensor involved when there is one. [`crate::ModelError::Gguf`] adds the file path.

/// A malformed or unsupported GGUF file.
#[derive(Debug, thiserror::Error, PartialEq)]
pub enum GgufError {
    #[error("not a GGUF file: the first 4 bytes are {found:02x?}, not the magic `GGUF`")]
    BadMagic { found: Vec<u8> },
    #[error(
        "GGUF version {version} is not supported (supported: 2 and 3){}",
        version_hint(*version)
    )]
    UnsupportedVersion { version: u32 },
    #[error("file ends at byte {file_len} while reading {what} at byte {offset} ({needed} bytes needed)")]
    Truncated {
        what: String,
        offset: usize,
        needed: u64,
        file_len: usize,
    },
    #[error(
        "{what} at byte {offset} is {count}, more than the {remaining} bytes left in the file could hold \
         (at least {min_size} bytes each)"
    )]
    AbsurdCount {
        what: String,
        offset: usize,
        count: u64,
        remaining: usize,
        min_size: u64,
    },
    #[error("metadata key at byte {offset} is {len} bytes long (at most {max})")]
    KeyTooLong { offset: usize, len: u64, max: u64 },
    #[error("{what} at byte {offset} is {len} bytes long (at most {max})")]
    StringTooLong {
        what: String,
        offset: usize,
        len: u64,
        max: u64,
    },
    #[error("{what} at byte {offset} is not valid UTF-8")]
    InvalidUtf8 { what: String, offset: usize },
    #[error("metadata key `{key}` at byte {offset}: unknown value type {type_id} (known: 0..=12)")]
    UnknownValueType { key: String, offset: usize, type_id: u32 },
    #[error("metadata key `{key}` at byte {offset}: arrays nested more than {max} deep")]
    ArrayTooDeep { key: String, offset: usize, max: usize },
    #[error("metadata key `{key}` at byte {offset}: bool byte is {byte}, not 0 or 1")]
    InvalidBool { key: String, offset: usize, byte: u8 },
    #[error("metadata key `{key}` appears twice (again at byte {offset})")]
    DuplicateKey { key: String, offset: usize },
    #[error("`general.alignment` is {value}; it must be a power of two between 1 and 2^30")]
    BadAlignment { value: u64 },
    #[error("tensor `{tensor}` (info at byte {offset}) has {n_dims} dimensions (at most {max})")]
    TooManyDims {
        tensor: String,
        offset: usize,
        n_dims: u32,
        max: u32,
    },
    #[error("tensor `{tensor}` (info at byte {offset}): shape {dims:?} overflows its element or byte count")]
    ShapeOverflow {
        tensor: String,
        offset: usize,
        dims: Vec<u64>,
    },
    #[error("tensor `{tensor}` (info at byte {offset}): unknown GGML type {type_id}")]
    UnknownGgmlType {
        tensor: String,
        offset: usize,
        type_id: u32,
    },
    #[error(
        "tensor `{tensor}` (info at byte {offset}): rows of {ne0} values are not a multiple of \
         {ggml_type}'s block of {block}"
    )]
    RowNotBlockMultiple {
        tensor: String,
        offset: usize,
        ne0: u64,
        ggml_type: &'static str,
        block: u64,
    },
    #[error("tensor `{tensor}` appears twice (again at byte {offset})")]
    DuplicateTensor { tensor: String, offset: usize },
    #[error("tensor `{tensor}`: data offset {data_offset} is not a multiple of the alignment {alignment}")]
    MisalignedTensor {
        tensor: String,
        data_offset: u64,
        alignment: u64,
    },
    #[error(
        "tensor `{tensor}` occupies bytes {start}..{end} but the file is {file_len} bytes long: \
         truncated file or bad offset"
    )]
    DataOutOfRange {
        tensor: String,
        start: u64,
        end: u64,
        file_len: usize,
    },
    #[error("metadata key `{key}` is missing")]
    MissingKey { key: String },
    #[error("metadata key `{key}` is a {found}, expected {expected}")]
    WrongValueType {
        key: String,
        expected: &'static str,
        found: String,
    },
    #[error("metadata key `{key}` = {value} is out of range ({expected})")]
    ValueOutOfRange {
        key: String,
        value: String,
        expected: &'static str,
    },
    #[error("architecture `{name}` is not supported (supported: {supported})")]
    UnsupportedArchitecture { name: String, supported: &'static str },
    #[error("{0}")]
    Unsupported(String),
    #[error("metadata key `{key}` = `{value}` is not supported (supported: {supported})")]
    UnsupportedTokenizer {
        key: &'static str,
        value: String,
        supported: &'static str,
    },
    #[error(
        "metadata key `{key}` has {len} entries but `{other}` has {other_len}; they must describe the same tokens"
    )]
    LengthMismatch {
        key: &'static str,
        len: usize,
        other: &'static str,
        other_len: usize,
    },
    #[error("metadata key `{key}` = {id} is not a token id (`tokenizer.ggml.tokens` has {n_tokens})")]
    TokenIdOutOfRange { key: String, id: usize, n_tokens: usize },
    #[error("`tokenizer.ggml.token_type`[{index}] = {value} is not a token type (0..=6)")]
    BadTokenType { index: usize, value: i128 },
    #[error("`tokenizer.ggml.tokens` lists {token:?} twice (ids {first} and {second})")]
    DuplicateToken { token: String, first: usize, second: usize },
    #[error("`tokenizer.ggml.merges`[{index}] = {merge:?}: {reason}")]
    BadMerge {
        index: usize,
        merge: String,
        reason: String,
    },
    #[error("tensor `{tensor}` has shape {dims:?} (GGUF order); {message}")]
    BadTensor {
        tensor: String,
        dims: Vec<u64>,
        message: String,
    },
}

fn version_hint(version: u32) -> &'static str {
    match version {
        1 => "; version 1 is the 2023 draft format with 32-bit lengths: re-convert the model",
        v if v.swap_bytes() == 2 || v.swap_bytes() == 3 => "; this looks like a big-endian file",
        _ => "",
    }
}
