//! A raw GGUF writer for the GGUF tests: valid files by default, anything else on request.
#![allow(dead_code)]

use r1serve_model::gguf::{parse, GgufError};

pub const F32: u32 = 0;
pub const Q8_0: u32 = 8;
pub const T_U32: u32 = 4;
pub const T_I32: u32 = 5;
pub const T_BOOL: u32 = 7;
pub const T_STRING: u32 = 8;
pub const T_ARRAY: u32 = 9;

pub fn gguf_string(s: &[u8]) -> Vec<u8> {
    let mut out = (s.len() as u64).to_le_bytes().to_vec();
    out.extend_from_slice(s);
    out
}

pub struct Writer {
    pub version: u32,
    pub kv: Vec<u8>,
    pub n_kv: u64,
    pub info: Vec<u8>,
    pub n_tensors: u64,
    pub data: Vec<u8>,
}

impl Writer {
    pub fn new() -> Self {
        Self {
            version: 3,
            kv: Vec::new(),
            n_kv: 0,
            info: Vec::new(),
            n_tensors: 0,
            data: Vec::new(),
        }
    }

    pub fn kv(mut self, key: &[u8], type_id: u32, value: &[u8]) -> Self {
        self.kv.extend(gguf_string(key));
        self.kv.extend(type_id.to_le_bytes());
        self.kv.extend_from_slice(value);
        self.n_kv += 1;
        self
    }

    pub fn u32(self, key: &str, v: u32) -> Self {
        self.kv(key.as_bytes(), T_U32, &v.to_le_bytes())
    }

    pub fn bool(self, key: &str, v: bool) -> Self {
        self.kv(key.as_bytes(), T_BOOL, &[u8::from(v)])
    }

    pub fn string(self, key: &str, v: &str) -> Self {
        self.kv(key.as_bytes(), T_STRING, &gguf_string(v.as_bytes()))
    }

    pub fn strings<S: AsRef<str>>(self, key: &str, values: &[S]) -> Self {
        let mut value = T_STRING.to_le_bytes().to_vec();
        value.extend((values.len() as u64).to_le_bytes());
        for v in values {
            value.extend(gguf_string(v.as_ref().as_bytes()));
        }
        self.kv(key.as_bytes(), T_ARRAY, &value)
    }

    pub fn i32s(self, key: &str, values: &[i32]) -> Self {
        let mut value = T_I32.to_le_bytes().to_vec();
        value.extend((values.len() as u64).to_le_bytes());
        values.iter().for_each(|v| value.extend(v.to_le_bytes()));
        self.kv(key.as_bytes(), T_ARRAY, &value)
    }

    pub fn info(mut self, name: &str, dims: &[u64], type_id: u32, offset: u64) -> Self {
        self.info.extend(gguf_string(name.as_bytes()));
        self.info.extend((dims.len() as u32).to_le_bytes());
        dims.iter().for_each(|d| self.info.extend(d.to_le_bytes()));
        self.info.extend(type_id.to_le_bytes());
        self.info.extend(offset.to_le_bytes());
        self.n_tensors += 1;
        self
    }

    /// A tensor with its data, placed at the next 32-byte boundary of the data section.
    pub fn tensor(mut self, name: &str, dims: &[u64], type_id: u32, bytes: &[u8]) -> Self {
        self.data.resize(self.data.len().div_ceil(32) * 32, 0);
        let offset = self.data.len() as u64;
        self.data.extend_from_slice(bytes);
        self.info(name, dims, type_id, offset)
    }

    pub fn f32s(self, name: &str, dims: &[u64], values: &[f32]) -> Self {
        let bytes: Vec<u8> = values.iter().flat_map(|v| v.to_le_bytes()).collect();
        self.tensor(name, dims, F32, &bytes)
    }

    pub fn build(&self) -> Vec<u8> {
        let mut out = b"GGUF".to_vec();
        out.extend(self.version.to_le_bytes());
        out.extend(self.n_tensors.to_le_bytes());
        out.extend(self.n_kv.to_le_bytes());
        out.extend_from_slice(&self.kv);
        out.extend_from_slice(&self.info);
        out.resize(out.len().div_ceil(32) * 32, 0);
        out.extend_from_slice(&self.data);
        out
    }
}

/// A small valid file: one key of each common kind and two tensors.
pub fn valid() -> Writer {
    Writer::new()
        .kv(b"general.architecture", T_STRING, &gguf_string(b"llama"))
        .u32("llama.block_count", 1)
        .kv(b"flag", T_BOOL, &[1])
        .f32s("a", &[4, 2], &[1.0; 8])
        .f32s("b", &[3], &[2.0; 3])
}

pub fn error_of(bytes: &[u8]) -> GgufError {
    parse(bytes).expect_err("must be refused")
}
