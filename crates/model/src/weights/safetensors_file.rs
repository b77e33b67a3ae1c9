//! One memory-mapped safetensors file: its validated header and byte views of its tensors.

use std::fs::File;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use memmap2::Mmap;
use r1serve_kernels::ByteView;
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
        let io_err = |source| ModelError::Io {
            path: path.to_owned(),
            source,
        };
        let file = File::open(path).map_err(io_err)?;
        // SAFETY: the file is opened read-only; r1serve never writes it, and a file changed by
        // another process while mapped is outside what any mmap-based loader can defend against.
        let map = unsafe { Mmap::map(&file) }.map_err(io_err)?;
        let (header_len, metadata) = SafeTensors::read_metadata(&map).map_err(|e| ModelError::Safetensors {
            path: path.to_owned(),
            message: describe(&e, map.len()),
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

/// A message that says what is wrong with the file in a user's terms.
fn describe(error: &SafeTensorError, file_len: usize) -> String {
    match error {
        SafeTensorError::HeaderTooSmall => format!("file of {file_len} bytes is too short to hold the 8-byte header length"),
        SafeTensorError::InvalidHeaderLength => {
            format!("header length field points past the end of the file ({file_len} bytes): truncated or not safetensors")
        }
        SafeTensorError::HeaderTooLarge => "header length field is larger than the 100 MB safetensors allows".into(),
        SafeTensorError::MetadataIncompleteBuffer => format!(
            "tensor data described by the header does not match the file size ({file_len} bytes): truncated or padded file"
        ),
        SafeTensorError::InvalidOffset(name) => format!("tensor `{name}` has data offsets that overlap, leave gaps or run backwards"),
        SafeTensorError::TensorInvalidInfo => "a tensor's byte range does not match its dtype and shape".into(),
        other => format!("{other}"),
    }
}
