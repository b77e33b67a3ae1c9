//! One memory-mapped safetensors file: its validated header and byte views of its tensors.

use std::path::{Path, PathBuf};
use std::sync::Arc;

use memmap2::Mmap;
use r1serve_kernels::ByteView;
use safetensors::tensor::TensorInfo;
use safetensors::{Dtype, SafeTensorError, SafeTensors};

use crate::error::{ModelError, Result};

/// A tensor's place in a mapped file.
#[derive(Clone, Debug)]
pub struct TensorEntry {
    pub file: usize,
    pub dtype: Dtype,
    pub shape: Vec<usize>,
    pub start: usize,
    pub len: usize,
}

pub struct MappedFile {
    pub path: PathBuf,
    map: Arc<Mmap>,
}

impl MappedFile {
    /// Maps `path` and reads its header; every tensor's range is checked to lie inside the file.
    pub fn open(path: &Path, file_index: usize) -> Result<(Self, Vec<(String, TensorEntry)>)> {
        let map = crate::weights::map_readonly(path)?;
        let (header_len, metadata) = SafeTensors::read_metadata(&map).map_err(|e| ModelError::Safetensors {
            path: path.to_owned(),
            message: describe(&e, &map),
        })?;
        let data_start = 8 + header_len;
        let tensors = metadata
            .tensors()
            .into_iter()
            .map(|(name, info)| {
                let (s, e) = info.data_offsets;
                let entry = TensorEntry {
                    file: file_index,
                    dtype: info.dtype,
                    shape: info.shape.clone(),
                    start: data_start + s,
                    len: e - s,
                };
                (name, entry)
            })
            .collect();
        Ok((
            Self {
                path: path.to_owned(),
                map: Arc::new(map),
            },
            tensors,
        ))
    }

    pub fn view(&self, entry: &TensorEntry) -> Option<ByteView> {
        ByteView::new(self.map.clone(), entry.start, entry.len)
    }
}

/// A message that says what is wrong with the file in a user's terms, naming the tensor at fault
/// when the header can be read.
fn describe(error: &SafeTensorError, bytes: &[u8]) -> String {
    let file_len = bytes.len();
    match error {
        SafeTensorError::HeaderTooSmall => {
            format!("file of {file_len} bytes is too short to hold the 8-byte header length")
        }
        SafeTensorError::InvalidHeaderLength => {
            format!(
                "header length field points past the end of the file ({file_len} bytes): truncated or not safetensors"
            )
        }
        SafeTensorError::HeaderTooLarge => {
            "header length field is larger than the 100 MB safetensors allows: corrupt or not safetensors".into()
        }
        SafeTensorError::MetadataIncompleteBuffer => {
            let data_len = file_len.saturating_sub(8 + header_len(bytes));
            let mut beyond: Vec<_> = header_tensors(bytes)
                .into_iter()
                .filter(|(_, info)| info.data_offsets.1 > data_len)
                .collect();
            beyond.sort_by_key(|(_, info)| info.data_offsets.0);
            match beyond.first() {
                Some((name, info)) => format!(
                    "tensor `{name}` occupies data bytes {}..{} but the file holds only {data_len} bytes of data \
                     ({file_len} bytes in all){}: truncated file or bad data_offsets",
                    info.data_offsets.0,
                    info.data_offsets.1,
                    match beyond.len() - 1 {
                        0 => String::new(),
                        1 => "; 1 more tensor after it is cut off too".into(),
                        n => format!("; {n} more tensors after it are cut off too"),
                    }
                ),
                None => format!(
                    "the tensors described by the header end before the file's {data_len} bytes of data do: \
                     padded file or bad data_offsets"
                ),
            }
        }
        SafeTensorError::InvalidOffset(name) => {
            format!("tensor `{name}` has data offsets that overlap, leave gaps or run backwards")
        }
        SafeTensorError::TensorInvalidInfo | SafeTensorError::MisalignedSlice => {
            let bad = header_tensors(bytes).into_iter().find(|(_, info)| {
                let elements = info.shape.iter().try_fold(1usize, |a, &d| a.checked_mul(d));
                let bits = elements.and_then(|n| n.checked_mul(info.dtype.bitsize()));
                let (start, end) = info.data_offsets;
                bits.is_none_or(|b| b % 8 != 0 || end.checked_sub(start) != Some(b / 8))
            });
            match bad {
                Some((name, info)) => format!(
                    "tensor `{name}`: data_offsets {}..{} ({} bytes) do not match dtype {:?} and shape {:?}",
                    info.data_offsets.0,
                    info.data_offsets.1,
                    info.data_offsets.1.saturating_sub(info.data_offsets.0),
                    info.dtype,
                    info.shape
                ),
                None => "a tensor's byte range does not match its dtype and shape".into(),
            }
        }
        SafeTensorError::InvalidHeaderDeserialization(e) => match bad_header_entry(bytes) {
            Some((name, entry_error)) => format!("tensor `{name}` in the header: {entry_error}"),
            None => format!("invalid JSON in header: {e}"),
        },
        other => format!("{other}"),
    }
}

/// The first header entry that is not a valid tensor description (unknown dtype, missing
/// `shape`, ...), when the header itself is a JSON object.
fn bad_header_entry(bytes: &[u8]) -> Option<(String, serde_json::Error)> {
    let n = header_len(bytes);
    let header = bytes.get(8..8usize.checked_add(n)?)?;
    let entries = serde_json::from_slice::<serde_json::Map<String, serde_json::Value>>(header).ok()?;
    entries
        .into_iter()
        .filter(|(name, _)| name != "__metadata__")
        .find_map(|(name, value)| serde_json::from_value::<TensorInfo>(value).err().map(|e| (name, e)))
}

/// The header length field, or 0 if there is none.
fn header_len(bytes: &[u8]) -> usize {
    bytes
        .get(..8)
        .and_then(|b| b.try_into().ok())
        .map(u64::from_le_bytes)
        .and_then(|n| usize::try_from(n).ok())
        .unwrap_or(0)
}

/// The header's tensors, best effort (for error messages only): entries that do not parse are
/// skipped.
fn header_tensors(bytes: &[u8]) -> Vec<(String, TensorInfo)> {
    let n = header_len(bytes);
    let Some(header) = 8usize.checked_add(n).and_then(|end| bytes.get(8..end)) else {
        return Vec::new();
    };
    let Ok(entries) = serde_json::from_slice::<serde_json::Map<String, serde_json::Value>>(header) else {
        return Vec::new();
    };
    entries
        .into_iter()
        .filter(|(name, _)| name != "__metadata__")
        .filter_map(|(name, value)| Some((name, serde_json::from_value::<TensorInfo>(value).ok()?)))
        .collect()
}
