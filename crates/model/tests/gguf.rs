//! GGUF parser: every malformed-input class gets its own named error, on files built by the raw
//! writer in `gguf_support`; corrupted and truncated files never panic.

mod gguf_support;

use gguf_support::*;
use r1serve_model::gguf::{parse, GgufError};
use r1serve_model::weights::WeightStore;
use r1serve_model::{ModelDir, ModelError};

#[test]
fn valid_file_parses() {
    let h = parse(&valid().build()).unwrap();
    assert_eq!(
        (h.version, h.alignment, h.tensors.len(), h.metadata.len()),
        (3, 32, 2, 3)
    );
    assert_eq!(h.tensors[1].dims, vec![3]);
    let mut v2 = valid();
    v2.version = 2;
    assert_eq!(parse(&v2.build()).unwrap().version, 2);
}

#[test]
fn bad_magic() {
    let mut bytes = valid().build();
    bytes[..4].copy_from_slice(b"GGML");
    assert!(matches!(error_of(&bytes), GgufError::BadMagic { .. }));
    assert!(matches!(error_of(b"GG"), GgufError::BadMagic { .. }));
}

#[test]
fn bad_version() {
    for version in [1u32, 4, 0x0300_0000] {
        let mut w = valid();
        w.version = version;
        let e = error_of(&w.build());
        assert_eq!(e, GgufError::UnsupportedVersion { version });
        let msg = e.to_string();
        assert!(msg.contains(&format!("version {version}")), "{msg}");
    }
    assert!(GgufError::UnsupportedVersion { version: 0x0300_0000 }
        .to_string()
        .contains("big-endian"));
}

#[test]
fn absurd_counts() {
    for at in [8usize, 16] {
        let mut bytes = valid().build();
        bytes[at..at + 8].copy_from_slice(&(u64::MAX / 3).to_le_bytes());
        assert!(
            matches!(error_of(&bytes), GgufError::AbsurdCount { .. }),
            "count at {at}"
        );
    }
    // An array claiming 2^62 strings in a tiny file is refused before anything is allocated.
    let mut value = T_STRING.to_le_bytes().to_vec();
    value.extend((1u64 << 62).to_le_bytes());
    let e = error_of(&Writer::new().kv(b"tokenizer.ggml.tokens", T_ARRAY, &value).build());
    assert!(
        matches!(e, GgufError::AbsurdCount { ref what, .. } if what.contains("tokenizer.ggml.tokens")),
        "{e}"
    );
}

#[test]
fn key_too_long() {
    let key = vec![b'k'; 70_000];
    let e = error_of(&Writer::new().u32(std::str::from_utf8(&key).unwrap(), 1).build());
    assert!(matches!(e, GgufError::KeyTooLong { len: 70_000, .. }), "{e}");
    // A string value declared at 17 MiB is refused before reading it.
    let mut value = (17u64 << 20).to_le_bytes().to_vec();
    value.extend(b"short");
    let e = error_of(&Writer::new().kv(b"name", T_STRING, &value).build());
    assert!(matches!(e, GgufError::StringTooLong { .. }), "{e}");
    let e = error_of(&Writer::new().kv(&[0xff, 0xfe], T_U32, &[0; 4]).build());
    assert!(matches!(e, GgufError::InvalidUtf8 { .. }), "{e}");
}

#[test]
fn unknown_value_type() {
    let e = error_of(&Writer::new().kv(b"odd", 13, &[0; 8]).build());
    assert!(
        matches!(e, GgufError::UnknownValueType { ref key, type_id: 13, .. } if key == "odd"),
        "{e}"
    );
    let mut array = 99u32.to_le_bytes().to_vec();
    array.extend(1u64.to_le_bytes());
    let e = error_of(&Writer::new().kv(b"arr", T_ARRAY, &array).build());
    assert!(matches!(e, GgufError::UnknownValueType { type_id: 99, .. }), "{e}");
    let e = error_of(&Writer::new().kv(b"flag", T_BOOL, &[2]).build());
    assert!(matches!(e, GgufError::InvalidBool { byte: 2, .. }), "{e}");
}

#[test]
fn nested_arrays_all_types_and_depth_limit() {
    // [[1, 2], [3]] as u32, then strings and every scalar type.
    let mut value = T_ARRAY.to_le_bytes().to_vec();
    value.extend(2u64.to_le_bytes());
    for inner in [&[1u32, 2][..], &[3]] {
        value.extend(T_U32.to_le_bytes());
        value.extend((inner.len() as u64).to_le_bytes());
        inner.iter().for_each(|v| value.extend(v.to_le_bytes()));
    }
    let mut w = Writer::new().kv(b"nested", T_ARRAY, &value);
    for (type_id, width) in [
        (0u32, 1usize),
        (1, 1),
        (2, 2),
        (3, 2),
        (4, 4),
        (5, 4),
        (6, 4),
        (10, 8),
        (11, 8),
        (12, 8),
    ] {
        w = w.kv(format!("scalar{type_id}").as_bytes(), type_id, &vec![1; width]);
    }
    let h = parse(&w.build()).unwrap();
    assert_eq!(h.metadata.len(), 11);
    let depth = r1serve_model::gguf::MAX_ARRAY_DEPTH + 1;
    let mut deep = Vec::new();
    for _ in 0..depth {
        deep.extend(T_ARRAY.to_le_bytes());
        deep.extend(1u64.to_le_bytes());
    }
    deep.extend(T_U32.to_le_bytes());
    deep.extend(0u64.to_le_bytes());
    let e = error_of(&Writer::new().kv(b"deep", T_ARRAY, &deep).build());
    assert!(matches!(e, GgufError::ArrayTooDeep { .. }), "{e}");
}

#[test]
fn duplicate_key() {
    let e = error_of(&Writer::new().u32("a.b", 1).u32("a.b", 2).build());
    assert!(
        matches!(e, GgufError::DuplicateKey { ref key, .. } if key == "a.b"),
        "{e}"
    );
}

#[test]
fn bad_alignment() {
    for value in [0u32, 3, 48] {
        let e = error_of(&valid().u32("general.alignment", value).build());
        assert_eq!(e, GgufError::BadAlignment { value: value as u64 });
    }
    let e = error_of(&valid().kv(b"general.alignment", T_STRING, &gguf_string(b"32")).build());
    assert!(matches!(e, GgufError::WrongValueType { .. }), "{e}");
    // Alignment 64: a tensor at offset 32 is misaligned.
    let e = error_of(
        &Writer::new()
            .u32("general.alignment", 64)
            .info("t", &[8], F32, 32)
            .build(),
    );
    assert!(matches!(e, GgufError::MisalignedTensor { ref tensor, data_offset: 32, alignment: 64 } if tensor == "t"));
}

#[test]
fn too_many_dims() {
    let e = error_of(&Writer::new().info("t", &[1, 1, 1, 1, 1], F32, 0).build());
    assert!(
        matches!(e, GgufError::TooManyDims { n_dims: 5, ref tensor, .. } if tensor == "t"),
        "{e}"
    );
}

#[test]
fn shape_overflow() {
    for dims in [&[u64::MAX, 2][..], &[1 << 32, 1 << 32, 1 << 32], &[1 << 62, 8]] {
        let e = error_of(&Writer::new().info("big", dims, F32, 0).build());
        assert!(
            matches!(e, GgufError::ShapeOverflow { ref tensor, .. } if tensor == "big"),
            "{dims:?}: {e}"
        );
    }
    let e = error_of(&Writer::new().info("q", &[33, 2], Q8_0, 0).build());
    assert!(
        matches!(e, GgufError::RowNotBlockMultiple { ne0: 33, block: 32, .. }),
        "{e}"
    );
}

#[test]
fn data_out_of_range() {
    let e = error_of(&valid().info("far", &[8], F32, 1 << 40).build());
    assert!(
        matches!(e, GgufError::DataOutOfRange { ref tensor, .. } if tensor == "far"),
        "{e}"
    );
    let e = error_of(&valid().info("wrap", &[8], F32, u64::MAX - 31).build());
    assert!(matches!(e, GgufError::DataOutOfRange { .. }), "{e}");
}

#[test]
fn truncated_file_at_every_length() {
    let bytes = valid().build();
    for len in 0..bytes.len() {
        let e = parse(&bytes[..len]).expect_err("prefix must be refused");
        assert!(
            matches!(
                e,
                GgufError::BadMagic { .. }
                    | GgufError::Truncated { .. }
                    | GgufError::AbsurdCount { .. }
                    | GgufError::DataOutOfRange { .. }
            ),
            "{len}: {e}"
        );
    }
}

#[test]
fn duplicate_tensor() {
    let e = error_of(&valid().f32s("a", &[1], &[0.0]).build());
    assert!(
        matches!(e, GgufError::DuplicateTensor { ref tensor, .. } if tensor == "a"),
        "{e}"
    );
}

#[test]
fn unknown_ggml_type() {
    for type_id in [4u32, 100] {
        let e = error_of(&Writer::new().info("t", &[32], type_id, 0).build());
        assert!(
            matches!(e, GgufError::UnknownGgmlType { type_id: t, .. } if t == type_id),
            "{e}"
        );
    }
}

#[test]
fn corrupted_bytes_never_panic() {
    let bytes = valid().build();
    let mut state = 0x2545_f491_4f6c_dd1du64;
    for _ in 0..5000 {
        let mut copy = bytes.clone();
        for _ in 0..3 {
            state ^= state << 13;
            state ^= state >> 7;
            state ^= state << 17;
            let at = (state as usize) % copy.len();
            copy[at] = (state >> 32) as u8;
        }
        let _ = parse(&copy);
    }
}

#[test]
fn errors_name_the_file_and_unsupported_types_are_named() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("bad.gguf");
    std::fs::write(&path, b"GGUF\x01\0\0\0").unwrap();
    let msg = ModelDir::open(&path).unwrap_err().to_string();
    assert!(msg.contains("bad.gguf") && msg.contains("version 1"), "{msg}");
    // A tensor type the kernels do not run is refused when the tensor is asked for, by name.
    let q5_k = 13;
    let bytes = Writer::new()
        .kv(b"general.architecture", T_STRING, &gguf_string(b"qwen2"))
        .tensor("blk.0.attn_v.weight", &[256, 2], q5_k, &vec![0u8; 2 * 176])
        .build();
    std::fs::write(&path, bytes).unwrap();
    let store = WeightStore::open_gguf(&path).unwrap();
    let e = store
        .matrix("model.layers.0.self_attn.v_proj.weight", 2, 256)
        .unwrap_err();
    assert!(
        matches!(e, ModelError::DType { .. }) && e.to_string().contains("Q5_K"),
        "{e}"
    );
    let e = store
        .matrix("model.layers.0.self_attn.v_proj.weight", 256, 2)
        .unwrap_err();
    assert!(matches!(e, ModelError::Shape { .. }), "{e}");
    let e = ModelDir::open(&path).unwrap_err();
    assert!(e.to_string().contains("qwen2.attention.head_count"), "{e}");
}

#[test]
fn zero_dims_and_absurd_expert_counts_are_refused_when_mapping() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("experts.gguf");
    for dims in [[64u64, 0, 8], [1, 1, 1 << 20]] {
        let bytes = Writer::new()
            .kv(b"general.architecture", T_STRING, &gguf_string(b"deepseek2"))
            .tensor(
                "blk.1.ffn_gate_exps.weight",
                &dims,
                F32,
                &vec![0u8; (dims.iter().product::<u64>() * 4) as usize],
            )
            .build();
        std::fs::write(&path, bytes).unwrap();
        let e = WeightStore::open_gguf(&path).err().expect("must be refused");
        assert!(
            matches!(
                e,
                ModelError::Gguf {
                    source: GgufError::BadTensor { .. },
                    ..
                }
            ),
            "{e}"
        );
        assert!(e.to_string().contains("blk.1.ffn_gate_exps.weight"), "{e}");
    }
}
