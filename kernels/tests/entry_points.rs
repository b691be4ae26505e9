//! The entry-point list in `lib.rs` must match the `extern "C" __global__` signatures in the
//! sources, so the CUDA backend can load and launch each kernel by name without surprises.

use sparsemoe_kernels::{HEADERS, KERNELS, Param, SOURCES, kernel, launch, source};

/// Every `extern "C" __global__` function in `text`: (name, [(type words, parameter name)]).
fn entry_points(text: &str) -> Vec<(String, Vec<(String, String)>)> {
    let mut found = Vec::new();
    let mut rest = text;
    while let Some(at) = rest.find("extern \"C\" __global__") {
        rest = rest[at + "extern \"C\" __global__".len()..].trim_start();
        rest = rest.strip_prefix("void").unwrap().trim_start();
        if rest.starts_with("__launch_bounds__") {
            rest = rest[rest.find(')').unwrap() + 1..].trim_start();
        }
        let open = rest.find('(').unwrap();
        let close = open + rest[open..].find(')').unwrap();
        let name = rest[..open].trim().to_string();
        let params = rest[open + 1..close]
            .split(',')
            .map(|p| {
                let words: Vec<&str> = p
                    .split_whitespace()
                    .filter(|w| *w != "__restrict__")
                    .collect();
                let (ty, name) = words.split_at(words.len() - 1);
                (ty.join(" "), name[0].to_string())
            })
            .collect();
        found.push((name, params));
        rest = &rest[close..];
    }
    found
}

fn c_type(param: Param) -> &'static str {
    match param {
        Param::Bf16Mut => "__nv_bfloat16*",
        Param::Bf16 => "const __nv_bfloat16*",
        Param::Bf16BitsMut => "unsigned short*",
        Param::Bf16Bits => "const unsigned short*",
        Param::F32Mut => "float*",
        Param::F32 => "const float*",
        Param::I32Mut => "int*",
        Param::I32 => "const int*",
        Param::U8Mut => "uint8_t*",
        Param::U8 => "const uint8_t*",
        Param::Addresses => "const unsigned long long*",
        Param::Int => "int",
        Param::Long => "long long",
        Param::Float => "float",
    }
}

#[test]
fn every_listed_kernel_matches_its_source_signature() {
    for k in KERNELS {
        let src = source(k.file).unwrap_or_else(|| panic!("{}: no source {}", k.name, k.file));
        let points = entry_points(src.text);
        let (_, params) = points.iter().find(|(n, _)| n == k.name).unwrap_or_else(|| {
            panic!("{} is not an extern \"C\" __global__ in {}", k.name, k.file)
        });
        let listed: Vec<(String, String)> = k
            .params
            .iter()
            .map(|(n, t)| (c_type(*t).to_string(), n.to_string()))
            .collect();
        let actual: Vec<(String, String)> = params
            .iter()
            .map(|(t, n)| (t.replace(" *", "*"), n.clone()))
            .collect();
        assert_eq!(listed, actual, "{} signature", k.name);
    }
}

#[test]
fn every_source_entry_point_is_listed_and_names_are_unique() {
    for src in SOURCES {
        for (name, _) in entry_points(src.text) {
            let k = kernel(&name)
                .unwrap_or_else(|| panic!("{name} ({}) is missing from KERNELS", src.file));
            assert_eq!(k.file, src.file, "{name}");
        }
    }
    let mut names: Vec<&str> = KERNELS.iter().map(|k| k.name).collect();
    names.sort_unstable();
    names.dedup();
    assert_eq!(names.len(), KERNELS.len(), "duplicate kernel names");
}

#[test]
fn includes_resolve_to_listed_headers() {
    for src in SOURCES.iter().chain(HEADERS) {
        for line in src.text.lines().filter(|l| l.starts_with("#include \"")) {
            let file = line.trim_start_matches("#include \"").trim_end_matches('"');
            assert!(
                HEADERS.iter().any(|h| h.file == file),
                "{}: {file} is not in HEADERS",
                src.file
            );
        }
    }
}

#[test]
fn launch_constants_match_the_sources() {
    let defines = [
        ("indexer.cu", "INDEXER_KEYS", launch::INDEXER_KEYS),
        (
            "indexer.cu",
            "INDEXER_QUANT_THREADS",
            launch::INDEXER_QUANT_THREADS,
        ),
        ("indexer_tc.cuh", "INDEXER_TC_KEYS", launch::INDEXER_TC_KEYS),
        (
            "indexer_tc.cuh",
            "INDEXER_TC_WARPS",
            launch::INDEXER_TC_WARPS,
        ),
        ("indexer_tc.cuh", "INDEXER_TC_PAD", launch::INDEXER_TC_PAD),
        (
            "indexer_tc.cuh",
            "INDEXER_FP8_TC_MAX_DIM",
            launch::INDEXER_FP8_TC_MAX_DIM,
        ),
        (
            "indexer_tc.cuh",
            "INDEXER_FP8_TC_PAD",
            launch::INDEXER_FP8_TC_PAD,
        ),
        ("topk.cu", "TOPK_THREADS", launch::TOPK_THREADS),
        ("mla.cuh", "MLA_TILE", launch::MLA_TILE),
        ("mla.cuh", "MLA_MAX_LATENT", launch::MLA_MAX_LATENT),
        ("mla_tc.cuh", "MLA_TC_WARPS", launch::MLA_TC_WARPS),
        ("mla_tc.cuh", "MLA_TC_HEADS", launch::MLA_TC_HEADS),
        ("mla_tc.cuh", "MLA_TC_MAX_GROUPS", launch::MLA_TC_MAX_GROUPS),
        ("mla_tc.cuh", "MLA_TC_TILE", launch::MLA_TC_TILE),
        ("mla_tc.cuh", "MLA_TC_MAX_LATENT", launch::MLA_TC_MAX_LATENT),
        ("mla_tc.cuh", "MLA_TC_PAD", launch::MLA_TC_PAD),
        ("engine.cu", "ROUTE_WARPS", launch::ROUTE_TOKENS_PER_BLOCK),
        ("engine.cu", "ROUTE_MAX_EXPERTS", launch::ROUTE_MAX_EXPERTS),
        (
            "engine.cu",
            "ROUTE_SLOT_THREADS",
            launch::ROUTE_SLOT_THREADS,
        ),
        ("grouped_gemm.cu", "GG_TILE", launch::GROUPED_GEMM_TILE),
        ("engine.cu", "ENGINE_THREADS", launch::ENGINE_THREADS),
        ("engine.cu", "KV_FP8_BLOCK", launch::KV_FP8_BLOCK),
        ("engine.cu", "MLA_F32_WARPS", launch::MLA_F32_WARPS),
        (
            "engine.cu",
            "MLA_F32_HEADS_PER_WARP",
            launch::MLA_F32_HEADS_PER_WARP,
        ),
        ("engine.cu", "MLA_F32_TILE", launch::MLA_F32_TILE),
        (
            "engine.cu",
            "MLA_F32_MAX_LATENT",
            launch::MLA_F32_MAX_LATENT,
        ),
        ("engine.cu", "INDEXER_F32_KEYS", launch::INDEXER_F32_KEYS),
        (
            "engine.cu",
            "MLA_COMBINE_THREADS",
            launch::MLA_COMBINE_THREADS,
        ),
        ("engine.cu", "FP8_LINEAR_WARPS", launch::FP8_LINEAR_WARPS),
        ("engine.cu", "FP8_LINEAR_ROWS", launch::FP8_LINEAR_ROWS),
        ("engine.cu", "FP8_LINEAR_K", launch::FP8_LINEAR_K),
        (
            "engine.cu",
            "FP8_LINEAR_MIN_BLOCKS",
            launch::FP8_LINEAR_BLOCKS_PER_SM,
        ),
    ];
    for (file, name, value) in defines {
        let text = source(file).unwrap().text;
        let line = format!("#define {name} {value}");
        assert!(text.contains(&line), "{file} should have `{line}`");
    }
    let mla = source("mla.cuh").unwrap().text;
    assert!(mla.contains("#define MLA_WARPS 8") && mla.contains("#define MLA_HEADS_PER_WARP 2"));
    assert_eq!(launch::MLA_HEADS_PER_BLOCK * 32 / 2, launch::MLA_THREADS);
    // The real model's shapes: 64 index heads of 128; latent 512 + rope 64.
    assert_eq!(launch::indexer_smem_bytes(64, 128), 16384 + 16640 + 256);
    assert_eq!(
        launch::indexer_fp8_smem_bytes(64, 128),
        8192 + 256 + 8448 + 256
    );
    assert!(launch::mla_smem_bytes(512, 64) > 48 * 1024);
    assert_eq!(launch::mla_tc_smem_bytes(512, 64, 1), 57_984);
    // Four groups (64 heads): 119.5 KB, within sm_80's 163 KB.
    assert_eq!(
        launch::mla_tc_smem_bytes(512, 64, 4),
        (64 + 32) * 584 * 2 + 64 * 40 * 2 + 2 * 4 * 64 * 4 + 32 * 4
    );
    assert!(launch::mla_tc_smem_bytes(512, 64, launch::MLA_TC_MAX_GROUPS) <= 163 * 1024);
    // Padded rows: the latent part to a multiple of 32, the whole row to a multiple of 16.
    assert_eq!(launch::mla_tc_row_width(512, 64), 576);
    assert_eq!(launch::mla_tc_row_width(32, 8), 48);
    assert_eq!(launch::mla_tc_row_width(200, 24), 256);
    assert!(launch::mla_tc_fits(512, 64) && launch::mla_tc_fits(200, 24));
    assert!(
        !launch::mla_tc_fits(513, 64)
            && !launch::mla_tc_fits(32, 7)
            && !launch::mla_tc_fits(514, 64)
    );
    assert_eq!(launch::indexer_tc_smem_bytes(64, 128), 36_096);
    // fp8: 128 rows of 144 bytes, then 64 + 64 + 256 floats.
    assert_eq!(launch::indexer_fp8_tc_smem_bytes(64, 128), 19_968);
    assert_eq!(
        launch::indexer_fp8_tc_smem_bytes(20, 24),
        (32 + 64) * 48 + 32 * 4 + 64 * 4 + 256 * 4
    );
    assert!(launch::indexer_fp8_tc_fits(128) && launch::indexer_fp8_tc_fits(16));
    assert!(
        !launch::indexer_fp8_tc_fits(132)
            && !launch::indexer_fp8_tc_fits(18)
            && !launch::indexer_fp8_tc_fits(0)
    );
    let engine = source("engine.cu").unwrap().text;
    assert!(
        engine.contains("#define MLA_F32_THREADS (MLA_F32_WARPS * 32)")
            && engine.contains("#define MLA_F32_HEADS (MLA_F32_WARPS * MLA_F32_HEADS_PER_WARP)")
    );
    assert!(engine.contains("#define FP8_LINEAR_COLS (FP8_LINEAR_WARPS * 16)"));
    assert_eq!(launch::FP8_LINEAR_COLS, 64);
    // One k-step is one fp8 scale block of the weight.
    assert_eq!(launch::FP8_LINEAR_K, launch::KV_FP8_BLOCK);
    // 108 KB at DeepSeek's 512 + 64: above the default 48 KB, within sm_80's 163 KB.
    assert_eq!(
        launch::mla_f32_smem_bytes(512, 64),
        (16 * 576 + 32 * 577 + 32) * 4
    );
}

#[test]
fn attention_blocks_take_more_heads_only_while_every_multiprocessor_gets_one() {
    // (heads, rows, multiprocessors) -> groups of 16 heads a block.
    let cases = [
        // DeepSeek's 128 heads on an H200 (132): 64 rows in blocks of 64 heads would be 128
        // blocks, so 32 heads a block; 66 rows fill it with 64.
        ((128, 64, 132), 2),
        ((128, 66, 132), 4),
        ((128, 1, 132), 1),
        ((128, 1, 1), 4),
        // 20 heads are two groups (the second partial): both in one block when it is divisible.
        ((20, 1, 1), 2),
        ((3, 1, 1), 1),
        // Five or three groups split evenly only one a block.
        ((80, 1000, 132), 1),
        ((48, 1000, 132), 1),
        // No overflow at the extremes.
        ((u32::MAX, u32::MAX, u32::MAX), 4),
    ];
    for ((heads, rows, sms), groups) in cases {
        assert_eq!(
            launch::mla_tc_groups(heads, rows, sms),
            groups,
            "{heads} heads, {rows} rows, {sms} multiprocessors"
        );
    }
}

#[test]
fn indexer_blocks_take_more_key_tiles_only_while_every_multiprocessor_keeps_four() {
    // (rows, keys, multiprocessors) -> tiles of 64 keys a block.
    let cases = [
        // A batch of 64 at 64K on an H200: 1024 tiles a row, 8 a block still leaves 8192 blocks.
        ((64, 65_536, 132), 8),
        // 8 rows of 16K: 256 tiles a row; 4 a block would be 512 blocks < 4 · 132, 2 are 1024.
        ((8, 16_384, 132), 2),
        // One row of 4K: 64 blocks even at one tile each.
        ((1, 4_096, 132), 1),
        // The emulator's one multiprocessor: 4 blocks are enough, a ragged last tile counts.
        ((1, 4_096, 1), 8),
        ((1, 1_000, 1), 4),
        ((1, 300, 1), 1),
        // No keys, and no overflow at the extremes.
        ((4, 0, 132), 1),
        ((u32::MAX, u32::MAX, u32::MAX), 8),
    ];
    for ((rows, keys, sms), tiles) in cases {
        assert_eq!(
            launch::indexer_tc_tiles(rows, keys, sms),
            tiles,
            "{rows} rows, {keys} keys, {sms} multiprocessors"
        );
    }
}

#[test]
fn attention_keys_are_split_only_while_the_blocks_leave_multiprocessors_idle() {
    // (blocks, longest list, multiprocessors) -> keys a split (0: none).
    let cases = [
        // One decode row of 128 heads (8 blocks) on an H200 (132): top-k 2048 in 8 splits of
        // the 256-key minimum; a dense 64K context in 17 splits (136 blocks).
        ((8, 2048, 132), 256),
        ((8, 65536, 132), 3872),
        // Enough blocks already, or too few keys to split.
        ((132, 65536, 132), 0),
        ((512, 2048, 132), 0),
        ((8, 256, 132), 0),
        // 511 keys are one split's worth; 600 two, each a whole number of 32-key tiles.
        ((8, 511, 132), 0),
        ((8, 600, 132), 320),
        // One block on many multiprocessors: at most 32 splits.
        ((1, 1 << 20, 1000), 32768),
        // The emulator's one multiprocessor never splits; no overflow at the extremes.
        ((1, 1 << 20, 1), 0),
        ((0, u32::MAX - 64, u32::MAX), 134_217_728),
    ];
    for ((blocks, longest, sms), keys) in cases {
        let split = launch::mla_split_keys(blocks, longest, sms);
        assert_eq!(
            split, keys,
            "{blocks} blocks, {longest} keys, {sms} multiprocessors"
        );
        if split > 0 {
            let splits = longest.div_ceil(split);
            assert!(
                split.is_multiple_of(32) && split >= launch::MLA_SPLIT_MIN_KEYS,
                "{split} keys"
            );
            assert!(
                (2..=launch::MLA_MAX_SPLITS).contains(&splits),
                "{splits} splits"
            );
        }
    }
}

#[test]
fn fp8_products_split_k_only_while_the_blocks_leave_multiprocessors_idle() {
    // (blocks a split, k, multiprocessors) -> k-steps a split.
    let cases = [
        // A decode step's expert gate product on an H200 (132): 2048 weight rows are 32
        // blocks; k = 7168 is 56 steps, in 16 splits (the most) of 4 steps (14 splits).
        ((32, 7168, 132), 4),
        // o_proj (7168 rows: 112 blocks, k = 16384: 128 steps): 5 splits of 26.
        ((112, 16384, 132), 26),
        // Enough blocks: one split of every step.
        ((528, 7168, 132), 56),
        ((10_000, 7168, 132), 56),
        // Too few steps to split (at least 2 a split): 3 steps in 1; 4 in 2.
        ((1, 384, 132), 3),
        ((1, 512, 132), 2),
        // A partial last step counts; k = 0 is one (empty) step.
        ((1, 129, 132), 2),
        ((1, 0, 132), 1),
        // The emulator's one multiprocessor: 4 blocks are enough.
        ((4, 7168, 1), 56),
        ((1, 7168, 1), 14),
        // No overflow at the extremes.
        // (four blocks an SM wanted: 4 splits).
        (
            (u32::MAX, u32::MAX, u32::MAX),
            u32::MAX.div_ceil(128).div_ceil(4),
        ),
    ];
    for ((blocks, k, sms), steps) in cases {
        let split = launch::fp8_linear_split_steps(blocks, k, sms);
        assert_eq!(
            split, steps,
            "{blocks} blocks, k = {k}, {sms} multiprocessors"
        );
        let total = k.div_ceil(launch::FP8_LINEAR_K).max(1);
        let splits = total.div_ceil(split);
        assert!(splits <= launch::FP8_LINEAR_MAX_SPLITS, "{splits} splits");
        // Every split has a step.
        assert!((splits - 1) * split < total, "an empty split");
    }
}

#[test]
fn top_k_rows_are_split_only_while_the_rows_leave_multiprocessors_idle() {
    // (rows, keys a row, k, multiprocessors) -> parts.
    let cases = [
        // A decode step of 8 rows at 64K keys on an H200 (132): 16 parts would fill it, but
        // √(64K / 2048) = 5 weighs the parts' reads against the merge's.
        ((8, 65536, 2048, 132), 5),
        // 64 rows: two parts fill 128 of the 132.
        ((64, 65536, 2048, 132), 2),
        // One row of 128K: 8 parts (√64); of 1M keys, the most (16).
        ((1, 131_072, 2048, 132), 8),
        ((1, 1 << 20, 2048, 1000), 16),
        // Enough rows, or too few keys a row for two parts of k.
        ((132, 65536, 2048, 132), 1),
        ((1000, 65536, 2048, 132), 1),
        ((1, 4095, 2048, 132), 1),
        ((1, 1000, 2048, 132), 1),
        // The emulator's one multiprocessor never splits; nor does k = 0.
        ((1, 1 << 20, 2048, 1), 1),
        ((1, 1 << 20, 0, 132), 1),
        // The engine's tests: 3 rows of 598 keys, k = 64.
        ((3, 598, 64, 132), 3),
        ((1, u32::MAX, 1, u32::MAX), 16),
    ];
    for ((rows, n_keys, k, sms), parts) in cases {
        let case = format!("{rows} rows of {n_keys}, k = {k}, {sms} multiprocessors");
        assert_eq!(launch::topk_parts(rows, n_keys, k, sms), parts, "{case}");
    }
    // (keys, k, parts asked) -> (parts, part_len), None for no split.
    let splits = [
        ((65536, 2048, 5), Some((5, 13120))),
        ((65536, 2048, 2), Some((2, 32768))),
        ((65536, 2048, 100), Some((16, 4096))),
        ((598, 64, 3), Some((3, 224))),
        // 9 parts of 598 would be 67 keys; 96 (whole chunks of 32) take 7.
        ((598, 64, 32), Some((7, 96))),
        // Two parts of 16 round up to one chunk of 32: no split.
        ((32, 16, 2), None),
        ((100, 64, 4), None),
        ((65536, 2048, 1), None),
        ((65536, 0, 4), None),
        ((u32::MAX, 1, 16), Some((16, 268_435_456))),
    ];
    for ((n_keys, k, asked), want) in splits {
        let got = launch::topk_split(n_keys, k, asked);
        assert_eq!(got, want, "{n_keys} keys, k = {k}, {asked} parts");
        if let Some((parts, part_len)) = got {
            // Whole chunks, each part at least k (the merge's candidates are then a prefix),
            // every key in a part and no part empty.
            assert!(part_len.is_multiple_of(32) && part_len >= k, "{part_len}");
            assert!((2..=launch::TOPK_MAX_PARTS).contains(&parts), "{parts}");
            assert!(u64::from(parts) * u64::from(part_len) >= u64::from(n_keys));
            assert!((parts - 1) * part_len < n_keys, "an empty part");
        }
    }
}
