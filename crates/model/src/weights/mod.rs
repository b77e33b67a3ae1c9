//! The weights of a model directory: safetensors files (single or sharded), memory-mapped, looked
//! up by name with their shapes checked against what the architecture expects.

pub mod convert;
mod dummy;
mod safetensors_file;

pub use dummy::DummyWeights;

use std::collections::{BTreeMap, HashMap};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::Arc;

use r1serve_kernels::{WeightFormat, WeightMatrix};
use safetensors::Dtype;
use serde_json::Value;

use crate::error::{ModelError, Result};
use crate::gguf::GgufWeights;
use safetensors_file::{MappedFile, TensorEntry};

/// The shape of `kv_b_proj` in heads: `heads · (nope + v)` rows of `rank` values, per head `nope`
/// key rows then `v` value rows.
#[derive(Clone, Copy, Debug)]
pub struct KvBShape {
    pub heads: usize,
    pub nope: usize,
    pub v: usize,
    pub rank: usize,
}

/// Per head `W_UK_hᵀ` (`[rank, nope]`) and `W_UV_h` (`[v, rank]`).
pub type HeadMatrices = (Vec<WeightMatrix>, Vec<WeightMatrix>);

const PICKLE_EXTENSIONS: [&str; 4] = ["bin", "pt", "pth", "ckpt"];

/// Name → tensor across all files of a checkpoint.
pub struct WeightStore {
    dir: PathBuf,
    files: Vec<MappedFile>,
    tensors: HashMap<String, TensorEntry>,
    fp8_block: Option<(usize, usize)>,
    /// Random weights instead of files (`--load-format dummy`).
    dummy: Option<DummyWeights>,
    /// In-situ conversion of every matrix to this format (`--quant`).
    convert_to: Option<WeightFormat>,
    progress: Option<ProgressFn>,
    matrices_done: AtomicUsize,
    /// A GGUF file instead of safetensors.
    gguf: Option<GgufWeights>,
}

/// Called after each weight matrix is ready, with the number of matrices ready so far.
pub type ProgressFn = Arc<dyn Fn(usize) + Send + Sync>;

impl WeightStore {
    /// Random weights generated on request, named and shaped as the architecture asks.
    pub fn dummy(dir: &Path, weights: DummyWeights) -> Self {
        Self {
            dir: dir.to_owned(),
            files: Vec::new(),
            tensors: HashMap::new(),
            fp8_block: weights.fp8_block,
            dummy: Some(weights),
            convert_to: None,
            progress: None,
            matrices_done: AtomicUsize::new(0),
            gguf: None,
        }
    }

    /// The tensors of a GGUF file, under their HF names.
    pub fn open_gguf(path: &Path) -> Result<Self> {
        Ok(Self {
            dir: path.to_owned(),
            files: Vec::new(),
            tensors: HashMap::new(),
            fp8_block: None,
            dummy: None,
            convert_to: None,
            progress: None,
            matrices_done: AtomicUsize::new(0),
            gguf: Some(GgufWeights::open(path)?),
        })
    }

    /// Converts every matrix handed out to `format` (in-situ quantisation), reporting progress.
    pub fn set_conversion(&mut self, format: Option<WeightFormat>, progress: Option<ProgressFn>) {
        self.convert_to = format;
        self.progress = progress;
    }

    pub fn is_dummy(&self) -> bool {
        self.dummy.is_some()
    }

    /// Opens `model.safetensors`, or every shard named by `model.safetensors.index.json`.
    /// `fp8_block` is the config's FP8 block size, needed to read `F8_E4M3` weights.
    pub fn open(dir: &Path, fp8_block: Option<(usize, usize)>) -> Result<Self> {
        let index_path = dir.join("model.safetensors.index.json");
        let single_path = dir.join("model.safetensors");
        let mut store = Self {
            dir: dir.to_owned(),
            files: Vec::new(),
            tensors: HashMap::new(),
            fp8_block,
            dummy: None,
            convert_to: None,
            progress: None,
            matrices_done: AtomicUsize::new(0),
            gguf: None,
        };
        if index_path.exists() {
            store.open_sharded(&index_path)?;
        } else if single_path.exists() {
            store.add_file(&single_path)?;
        } else {
            return Err(refuse_or_missing(dir));
        }
        Ok(store)
    }

    fn open_sharded(&mut self, index_path: &Path) -> Result<()> {
        let text = std::fs::read_to_string(index_path).map_err(|source| ModelError::Io {
            path: index_path.to_owned(),
            source,
        })?;
        let index: Value = serde_json::from_str(&text).map_err(|source| ModelError::Json {
            path: index_path.to_owned(),
            source,
        })?;
        let bad_index = |message: &str| ModelError::Config {
            path: index_path.to_owned(),
            message: message.to_owned(),
        };
        let weight_map = index
            .get("weight_map")
            .and_then(Value::as_object)
            .ok_or_else(|| bad_index("missing object `weight_map`"))?;
        let mut shards: BTreeMap<&str, Vec<&str>> = BTreeMap::new();
        for (name, file) in weight_map {
            let file = file
                .as_str()
                .ok_or_else(|| bad_index(&format!("weight_map entry `{name}` is not a file name")))?;
            if file.contains('/') || file.contains('\\') || matches!(file, "" | "." | "..") {
                return Err(bad_index(&format!("shard name `{file}` must be a plain file name")));
            }
            shards.entry(file).or_default().push(name);
        }
        for (shard, names) in shards {
            let path = self.dir.join(shard);
            if !path.exists() {
                return Err(ModelError::MissingShard {
                    path: index_path.to_owned(),
                    shard: shard.to_owned(),
                });
            }
            self.add_file(&path)?;
            if let Some(missing) = names.iter().find(|n| !self.tensors.contains_key(**n)) {
                return Err(ModelError::Config {
                    path: index_path.to_owned(),
                    message: format!("index maps tensor `{missing}` to `{shard}`, which does not contain it"),
                });
            }
        }
        Ok(())
    }

    fn add_file(&mut self, path: &Path) -> Result<()> {
        let (file, tensors) = MappedFile::open(path, self.files.len())?;
        self.files.push(file);
        self.tensors.extend(tensors);
        Ok(())
    }

    pub fn dir(&self) -> &Path {
        &self.dir
    }

    pub fn contains(&self, name: &str) -> bool {
        if let Some(dummy) = &self.dummy {
            return dummy.contains(name);
        }
        if let Some(gguf) = &self.gguf {
            return gguf.contains(name);
        }
        self.tensors.contains_key(name)
    }

    /// Every tensor name (for diagnostics and the MTP-layer check).
    pub fn names(&self) -> impl Iterator<Item = &str> {
        self.tensors
            .keys()
            .map(String::as_str)
            .chain(self.gguf.iter().flat_map(GgufWeights::names))
    }

    /// Element count per dtype name over all tensors (`inspect`'s dtype mix).
    pub fn dtype_counts(&self) -> BTreeMap<String, usize> {
        if let Some(gguf) = &self.gguf {
            return gguf.dtype_counts();
        }
        let mut counts = BTreeMap::new();
        for entry in self.tensors.values() {
            *counts.entry(format!("{:?}", entry.dtype)).or_insert(0) += entry.shape.iter().product::<usize>();
        }
        counts
    }

    fn entry(&self, name: &str) -> Result<&TensorEntry> {
        self.tensors.get(name).ok_or_else(|| ModelError::MissingTensor {
            name: name.to_owned(),
            dir: self.dir.clone(),
        })
    }

    fn path_of(&self, entry: &TensorEntry) -> PathBuf {
        self.files[entry.file].path.clone()
    }

    fn check_shape(&self, name: &str, entry: &TensorEntry, expected: &[usize]) -> Result<()> {
        if entry.shape != expected {
            return Err(ModelError::Shape {
                name: name.to_owned(),
                path: self.path_of(entry),
                expected: expected.to_vec(),
                found: entry.shape.clone(),
            });
        }
        Ok(())
    }

    /// A `[rows, cols]` weight kept in its stored format (FP8 with its `_scale_inv` blocks).
    pub fn matrix(&self, name: &str, rows: usize, cols: usize) -> Result<WeightMatrix> {
        let stored = self.stored_matrix(name, rows, cols)?;
        let matrix = match self.convert_to {
            Some(format) => convert::convert(name, stored, format).map_err(|source| ModelError::Weight {
                name: name.to_owned(),
                path: self.dir.clone(),
                source,
            })?,
            None => stored,
        };
        self.count_matrix();
        Ok(matrix)
    }

    /// One more matrix handed out, for the conversion's progress.
    fn count_matrix(&self) {
        let done = self.matrices_done.fetch_add(1, Ordering::Relaxed) + 1;
        if let Some(progress) = &self.progress {
            progress(done);
        }
    }

    /// `kv_b_proj` as per-head `W_UK_hᵀ` / `W_UV_h`, kept as stored, where the file holds it split
    /// that way (GGUF `attn_k_b` / `attn_v_b`) and no conversion was asked for; `None` otherwise
    /// (then [`WeightStore::matrix`] gives the whole tensor).
    pub fn split_kv_b(&self, name: &str, shape: KvBShape) -> Result<Option<HeadMatrices>> {
        let (Some(gguf), None, None) = (&self.gguf, &self.dummy, self.convert_to) else {
            return Ok(None);
        };
        let split = gguf.split_kv_b(name, shape)?;
        if split.is_some() {
            self.count_matrix();
        }
        Ok(split)
    }

    fn stored_matrix(&self, name: &str, rows: usize, cols: usize) -> Result<WeightMatrix> {
        if let Some(dummy) = &self.dummy {
            return dummy.matrix(name, rows, cols).map_err(|source| ModelError::Weight {
                name: name.to_owned(),
                path: self.dir.clone(),
                source,
            });
        }
        if let Some(gguf) = &self.gguf {
            return gguf.matrix(name, rows, cols);
        }
        let entry = self.entry(name)?;
        self.check_shape(name, entry, &[rows, cols])?;
        let path = self.path_of(entry);
        let view = self.files[entry.file]
            .view(entry)
            .ok_or_else(|| ModelError::Safetensors {
                path: path.clone(),
                message: format!("tensor `{name}` lies outside the file"),
            })?;
        let weight_err = |source| ModelError::Weight {
            name: name.to_owned(),
            path: path.clone(),
            source,
        };
        let format = match entry.dtype {
            Dtype::F32 => WeightFormat::F32,
            Dtype::BF16 => WeightFormat::Bf16,
            Dtype::F16 => WeightFormat::F16,
            Dtype::F8_E4M3 => {
                let (block_rows, block_cols) = self.fp8_block.ok_or_else(|| ModelError::Config {
                    path: path.clone(),
                    message: format!(
                        "tensor `{name}` is F8_E4M3 but config.json has no quantization_config.weight_block_size"
                    ),
                })?;
                let scale_name = format!("{name}_scale_inv");
                let scales =
                    self.vector_shaped(&scale_name, &[rows.div_ceil(block_rows), cols.div_ceil(block_cols)])?;
                return WeightMatrix::new_fp8_block(rows, cols, block_rows, block_cols, view, scales)
                    .map_err(weight_err);
            }
            other => {
                return Err(ModelError::DType {
                    name: name.to_owned(),
                    path,
                    dtype: format!("{other:?}"),
                    expected: "F32, BF16, F16 or F8_E4M3 (with _scale_inv blocks)",
                })
            }
        };
        WeightMatrix::new(rows, cols, format, view).map_err(weight_err)
    }

    /// A 1-D tensor of `len` values decoded to f32 (norm weights, biases, router bias).
    pub fn vector(&self, name: &str, len: usize) -> Result<Vec<f32>> {
        self.vector_shaped(name, &[len])
    }

    /// Any float tensor of the given shape, decoded to f32 and flattened.
    pub fn vector_shaped(&self, name: &str, shape: &[usize]) -> Result<Vec<f32>> {
        if let Some(dummy) = &self.dummy {
            return Ok(dummy.vector(name, shape.iter().product()));
        }
        if let Some(gguf) = &self.gguf {
            return gguf.vector_shaped(name, shape);
        }
        let entry = self.entry(name)?;
        self.check_shape(name, entry, shape)?;
        let path = self.path_of(entry);
        let view = self.files[entry.file]
            .view(entry)
            .ok_or_else(|| ModelError::Safetensors {
                path: path.clone(),
                message: format!("tensor `{name}` lies outside the file"),
            })?;
        let bytes = view.bytes();
        let values = match entry.dtype {
            Dtype::F32 => bytes
                .chunks_exact(4)
                .map(|b| f32::from_le_bytes([b[0], b[1], b[2], b[3]]))
                .collect(),
            Dtype::BF16 => bytes
                .chunks_exact(2)
                .map(|b| r1serve_kernels::dtype::bf16_to_f32(u16::from_le_bytes([b[0], b[1]])))
                .collect(),
            Dtype::F16 => bytes
                .chunks_exact(2)
                .map(|b| r1serve_kernels::dtype::f16_to_f32(u16::from_le_bytes([b[0], b[1]])))
                .collect(),
            other => {
                return Err(ModelError::DType {
                    name: name.to_owned(),
                    path,
                    dtype: format!("{other:?}"),
                    expected: "F32, BF16 or F16",
                })
            }
        };
        Ok(values)
    }
}

static MEMORY_MAPPING: AtomicBool = AtomicBool::new(true);

/// Whether weight files are memory-mapped (the default: instant start, pages shared with the
/// page cache and other processes) or read into the process's own memory (llama.cpp's
/// `--no-mmap`): slower to start and never shared, but backed by huge pages where the kernel
/// allows, which rows read in place during decode (`Q4_K`/`Q6_K` at one token) stream faster.
pub fn set_memory_mapping(on: bool) {
    MEMORY_MAPPING.store(on, Ordering::Relaxed);
}

/// A weight file's bytes, read-only (regular files only: a directory or device is refused):
/// mapped, or copied into anonymous memory (see [`set_memory_mapping`]).
pub(crate) fn map_readonly(path: &Path) -> Result<memmap2::Mmap> {
    let io_err = |source| ModelError::Io {
        path: path.to_owned(),
        source,
    };
    let mut file = std::fs::File::open(path).map_err(io_err)?;
    let metadata = file.metadata().map_err(io_err)?;
    if !metadata.is_file() {
        return Err(io_err(std::io::Error::other("not a regular file")));
    }
    if !MEMORY_MAPPING.load(Ordering::Relaxed) {
        let len = usize::try_from(metadata.len()).map_err(|_| io_err(std::io::Error::other("file too large")))?;
        let mut copy = memmap2::MmapMut::map_anon(len).map_err(io_err)?;
        // Advice only: a kernel without transparent huge pages keeps 4 KiB pages.
        #[cfg(target_os = "linux")]
        let _ = copy.advise(memmap2::Advice::HugePage);
        std::io::Read::read_exact(&mut file, &mut copy[..]).map_err(io_err)?;
        return copy.make_read_only().map_err(io_err);
    }
    // SAFETY: the file is opened read-only and r1serve never writes it; a file changed by another
    // process while mapped is outside what any mmap-based loader can defend against.
    unsafe { memmap2::Mmap::map(&file) }.map_err(io_err)
}

/// The error for a directory with no safetensors: pickle files are refused by name.
fn refuse_or_missing(dir: &Path) -> ModelError {
    let pickle = std::fs::read_dir(dir).ok().and_then(|entries| {
        entries.filter_map(|e| e.ok()).map(|e| e.path()).find(|p| {
            p.extension()
                .and_then(|e| e.to_str())
                .is_some_and(|e| PICKLE_EXTENSIONS.contains(&e))
        })
    });
    match pickle {
        Some(path) => ModelError::PickleRefused { path },
        None => ModelError::NoWeights { dir: dir.to_owned() },
    }
}
