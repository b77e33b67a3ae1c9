//! A model directory's JSON files, and the config pieces every architecture shares.

use std::path::{Path, PathBuf};

use r1serve_kernels::RopeScaling;
use serde::de::DeserializeOwned;
use serde_json::Value;

use crate::error::{ModelError, Result};

/// Largest width, count or context accepted from a config (2^24; real models stay far below).
pub const MAX_DIMENSION: usize = 1 << 24;
/// Largest layer count accepted from a config.
pub const MAX_LAYERS: usize = 1 << 16;

/// A HuggingFace-style model directory (or a lone `config.json` for config-only tools).
#[derive(Clone, Debug)]
pub struct ModelDir {
    /// The directory weights are looked up in.
    pub dir: PathBuf,
    pub config_path: PathBuf,
    pub config: Value,
    pub generation_config: Option<Value>,
}

fn read_json(path: &Path) -> Result<Value> {
    let text = std::fs::read_to_string(path).map_err(|source| ModelError::Io {
        path: path.to_owned(),
        source,
    })?;
    serde_json::from_str(&text).map_err(|source| ModelError::Json {
        path: path.to_owned(),
        source,
    })
}

impl ModelDir {
    /// Opens `dir/config.json` (required) and `dir/generation_config.json` (optional). A `.gguf`
    /// file, or a directory with no `config.json` and exactly one `.gguf`, opens that GGUF file
    /// (see [`ModelDir::from_gguf`]).
    pub fn open(dir: impl AsRef<Path>) -> Result<Self> {
        let dir = dir.as_ref().to_owned();
        if let Some(gguf) = crate::gguf::resolve(&dir)? {
            return Self::from_gguf(&gguf);
        }
        if !dir.is_dir() {
            return Err(ModelError::Io {
                path: dir,
                source: std::io::Error::new(std::io::ErrorKind::NotFound, "model directory not found"),
            });
        }
        let config_path = dir.join("config.json");
        let config = read_json(&config_path)?;
        let generation_path = dir.join("generation_config.json");
        let generation_config = if generation_path.exists() {
            Some(read_json(&generation_path)?)
        } else {
            None
        };
        let model_dir = Self {
            dir,
            config_path,
            config,
            generation_config,
        };
        model_dir.check_is_object()?;
        Ok(model_dir)
    }

    /// A config file alone, with no weights (for `inspect --config`).
    pub fn from_config_file(path: impl AsRef<Path>) -> Result<Self> {
        let config_path = path.as_ref().to_owned();
        let config = read_json(&config_path)?;
        let dir = config_path.parent().map(Path::to_owned).unwrap_or_default();
        let model_dir = Self {
            dir,
            config_path,
            config,
            generation_config: None,
        };
        model_dir.check_is_object()?;
        Ok(model_dir)
    }

    /// A model described by a GGUF file: the config is synthesised from its metadata, and
    /// `config_path` is the `.gguf` file (the registry then loads the weights from it).
    pub fn from_gguf(path: impl AsRef<Path>) -> Result<Self> {
        crate::gguf::model_dir(path.as_ref())
    }

    /// The GGUF file this model comes from, if it does.
    pub fn gguf_path(&self) -> Option<&Path> {
        crate::gguf::is_gguf_path(&self.config_path).then_some(self.config_path.as_path())
    }

    fn check_is_object(&self) -> Result<()> {
        if self.config.is_object() {
            Ok(())
        } else {
            Err(self.error("config must be a JSON object"))
        }
    }

    /// An error about this config file.
    pub fn error(&self, message: impl Into<String>) -> ModelError {
        ModelError::Config {
            path: self.config_path.clone(),
            message: message.into(),
        }
    }

    /// Rejects sizes no real model has, before anything is allocated or multiplied from them.
    pub fn check_limits(&self, fields: &[(&str, usize)]) -> Result<()> {
        for &(key, value) in fields {
            let limit = if key == "num_hidden_layers" {
                MAX_LAYERS
            } else {
                MAX_DIMENSION
            };
            if value > limit {
                return Err(self.error(format!(
                    "config key `{key}` = {value} is beyond any supported model (at most {limit})"
                )));
            }
        }
        Ok(())
    }

    /// Deserialises the config into an architecture's typed config; missing or mistyped keys are
    /// named in the error.
    pub fn parse<T: DeserializeOwned>(&self) -> Result<T> {
        let error = match serde_json::from_value::<T>(self.config.clone()) {
            Ok(parsed) => return Ok(parsed),
            Err(e) => e,
        };
        // serde names a missing field but not a mistyped one ("invalid type: string, expected
        // usize"); find the key whose removal changes the error, which is the one it tripped on.
        let culprit = self.config.as_object().and_then(|object| {
            let message = error.to_string();
            if message.starts_with("missing field") {
                return None;
            }
            object.keys().find(|key| {
                let mut without = object.clone();
                without.remove(*key);
                match serde_json::from_value::<T>(Value::Object(without)) {
                    Ok(_) => true,
                    Err(e) => e.to_string() != message,
                }
            })
        });
        Err(match culprit {
            Some(key) => self.error(format!("config key `{key}`: {error} (value: {})", self.config[key])),
            None => self.error(format!("config: {error}")),
        })
    }

    /// The architecture name: `architectures[0]`, or derived from `model_type`.
    pub fn architecture(&self) -> Result<String> {
        if let Some(name) = self
            .config
            .get("architectures")
            .and_then(|a| a.get(0))
            .and_then(Value::as_str)
        {
            return Ok(name.to_owned());
        }
        let model_type =
            self.config.get("model_type").and_then(Value::as_str).ok_or_else(|| {
                self.error("missing config key `architectures` (and no `model_type` to fall back on)")
            })?;
        Ok(match model_type {
            "llama" => "LlamaForCausalLM",
            "qwen2" => "Qwen2ForCausalLM",
            "deepseek_v2" => "DeepseekV2ForCausalLM",
            "deepseek_v3" => "DeepseekV3ForCausalLM",
            other => other,
        }
        .to_owned())
    }

    fn token_ids(&self, key: &str) -> Vec<u32> {
        let from = |v: &Value| -> Option<Vec<u32>> {
            match v.get(key)? {
                Value::Number(n) => n.as_u64().map(|n| vec![n as u32]),
                Value::Array(items) => Some(items.iter().filter_map(Value::as_u64).map(|n| n as u32).collect()),
                _ => None,
            }
        };
        self.generation_config
            .as_ref()
            .and_then(from)
            .or_else(|| from(&self.config))
            .unwrap_or_default()
    }

    pub fn bos_token_id(&self) -> Option<u32> {
        self.token_ids("bos_token_id").first().copied()
    }

    /// All end-of-sequence ids (generation config first; it often lists several).
    pub fn eos_token_ids(&self) -> Vec<u32> {
        self.token_ids("eos_token_id")
    }

    /// `(rope_theta, scaling)` from either the classic keys (`rope_theta` + `rope_scaling`) or the
    /// `rope_parameters` object that transformers ≥ 5 writes.
    pub fn rope(&self) -> Result<(f64, RopeScaling)> {
        let (theta, params) = match self.config.get("rope_parameters") {
            Some(p) if p.is_object() => (p.get("rope_theta").and_then(Value::as_f64), Some(p)),
            _ => (
                self.config.get("rope_theta").and_then(Value::as_f64),
                self.config.get("rope_scaling").filter(|v| v.is_object()),
            ),
        };
        let theta = theta.unwrap_or(10000.0);
        let Some(params) = params else {
            return Ok((theta, RopeScaling::None));
        };
        let kind = params
            .get("rope_type")
            .or_else(|| params.get("type"))
            .and_then(Value::as_str)
            .unwrap_or("default");
        let number = |key: &str| params.get(key).and_then(Value::as_f64);
        let required = |key: &str| {
            number(key).ok_or_else(|| self.error(format!("rope scaling `{kind}` needs numeric key `{key}`")))
        };
        let max_positions = self.config.get("max_position_embeddings").and_then(Value::as_f64);
        let scaling = match kind {
            "default" => RopeScaling::None,
            "linear" => RopeScaling::Linear {
                factor: required("factor")?,
            },
            "llama3" => RopeScaling::Llama3 {
                factor: required("factor")?,
                low_freq_factor: required("low_freq_factor")?,
                high_freq_factor: required("high_freq_factor")?,
                original_max_position_embeddings: required("original_max_position_embeddings")?,
            },
            "yarn" | "deepseek_yarn" => {
                let factor = required("factor")?;
                let original = number("original_max_position_embeddings")
                    .or(max_positions.map(|m| m / factor))
                    .ok_or_else(|| self.error("yarn rope scaling needs `original_max_position_embeddings`"))?;
                RopeScaling::Yarn {
                    factor,
                    original_max_position_embeddings: original,
                    beta_fast: number("beta_fast").unwrap_or(32.0),
                    beta_slow: number("beta_slow").unwrap_or(1.0),
                    mscale: number("mscale"),
                    mscale_all_dim: number("mscale_all_dim"),
                    attention_factor: number("attention_factor"),
                }
            }
            other => {
                return Err(self.error(format!(
                    "unsupported rope scaling type `{other}` (supported: default, linear, llama3, yarn)"
                )))
            }
        };
        Ok((theta, scaling))
    }

    /// `(block_rows, block_cols)` of FP8 block-scaled weights, from `quantization_config`.
    pub fn fp8_block_size(&self) -> Result<Option<(usize, usize)>> {
        let Some(q) = self.config.get("quantization_config").filter(|v| v.is_object()) else {
            return Ok(None);
        };
        let method = q.get("quant_method").and_then(Value::as_str).unwrap_or("");
        if method != "fp8" {
            return Err(self.error(format!(
                "unsupported quantization_config.quant_method `{method}` (supported: fp8 with weight_block_size)"
            )));
        }
        let block = q
            .get("weight_block_size")
            .and_then(Value::as_array)
            .map(|b| {
                b.iter()
                    .filter_map(Value::as_u64)
                    .map(|v| v as usize)
                    .collect::<Vec<_>>()
            })
            .unwrap_or_else(|| vec![128, 128]);
        match block[..] {
            [r, c] if r > 0 && c > 0 => Ok(Some((r, c))),
            _ => Err(self.error(format!(
                "quantization_config.weight_block_size must be two positive integers, got {block:?}"
            ))),
        }
    }
}

/// A config held in memory, for unit tests of config parsing.
#[cfg(test)]
pub(crate) fn dir_with(config: Value) -> ModelDir {
    ModelDir {
        dir: PathBuf::from("m"),
        config_path: PathBuf::from("m/config.json"),
        config,
        generation_config: None,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn rope_both_styles_agree() {
        let classic = dir_with(serde_json::json!({
            "rope_theta": 10000.0,
            "rope_scaling": {"type": "yarn", "factor": 40, "original_max_position_embeddings": 4096,
                             "beta_fast": 32, "beta_slow": 1, "mscale": 1.0, "mscale_all_dim": 1.0}
        }));
        let v5 = dir_with(serde_json::json!({
            "rope_parameters": {"rope_type": "yarn", "rope_theta": 10000.0, "factor": 40,
                                "original_max_position_embeddings": 4096, "beta_fast": 32, "beta_slow": 1,
                                "mscale": 1.0, "mscale_all_dim": 1.0}
        }));
        assert_eq!(classic.rope().unwrap(), v5.rope().unwrap());
    }

    #[test]
    fn unknown_rope_type_is_named() {
        let d = dir_with(serde_json::json!({"rope_scaling": {"type": "dynamic-ish", "factor": 2}}));
        let msg = d.rope().unwrap_err().to_string();
        assert!(msg.contains("dynamic-ish"), "{msg}");
    }

    #[test]
    fn mistyped_key_is_named() {
        #[derive(Debug, serde::Deserialize)]
        #[allow(dead_code)]
        struct Small {
            hidden_size: usize,
            #[serde(default)]
            head_dim: Option<usize>,
        }
        let d = dir_with(serde_json::json!({"a": 1, "hidden_size": "64", "z": 2}));
        let msg = d.parse::<Small>().unwrap_err().to_string();
        assert!(msg.contains("`hidden_size`") && msg.contains("\"64\""), "{msg}");
        let d = dir_with(serde_json::json!({"hidden_size": 64, "head_dim": -1}));
        let msg = d.parse::<Small>().unwrap_err().to_string();
        assert!(msg.contains("`head_dim`"), "{msg}");
        let d = dir_with(serde_json::json!({"head_dim": 4}));
        let msg = d.parse::<Small>().unwrap_err().to_string();
        assert!(msg.contains("missing field `hidden_size`"), "{msg}");
    }

    #[test]
    fn fp8_block_size_is_validated() {
        let d = dir_with(
            serde_json::json!({"quantization_config": {"quant_method": "fp8", "weight_block_size": [128, 0]}}),
        );
        assert!(d
            .fp8_block_size()
            .unwrap_err()
            .to_string()
            .contains("weight_block_size"));
        let d = dir_with(serde_json::json!({"quantization_config": {"quant_method": "awq"}}));
        assert!(d.fp8_block_size().unwrap_err().to_string().contains("awq"));
    }
}
