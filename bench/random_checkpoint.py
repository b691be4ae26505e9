#!/usr/bin/env python3
"""Writes a DeepSeek-V3.2 checkpoint with random bf16 weights for a config.json, so a benchmark can
run the engine at the real model's shapes (128 heads, latent 512, indexer 64 x 128, top-k 2048)
without the 690 GB checkpoint: a decode step's cost does not depend on the weights' values.

    python3 bench/random_checkpoint.py bench/configs/v32-shapes-1layer.json OUT_DIR

Needs numpy only. Tensor names and shapes are those of Hugging Face's DeepseekV32ForCausalLM
(per-expert projections, as the released checkpoints store them). Every matrix is drawn from
N(0, 1/fan_in), every norm weight is 1, biases 0: activations stay O(1) through the layers.
"""
import json
import os
import struct
import sys

import numpy as np


def bf16_bytes(x):
    """float32 array -> bf16 bytes (round to nearest even)."""
    u = np.ascontiguousarray(x, dtype=np.float32).view(np.uint32)
    rounded = (u + 0x7FFF + ((u >> 16) & 1)) >> 16
    return rounded.astype("<u2").tobytes()


def tensors(c):
    """(name, shape, kind) for every tensor the engine reads; kind: matrix, ones or zeros."""
    h, heads = c["hidden_size"], c["num_attention_heads"]
    nope, rope, v = c["qk_nope_head_dim"], c["qk_rope_head_dim"], c["v_head_dim"]
    q_rank, kv_rank = c["q_lora_rank"], c["kv_lora_rank"]
    ix_heads, ix_dim = c["index_n_heads"], c["index_head_dim"]
    out = [("model.embed_tokens.weight", (c["vocab_size"], h), "matrix"),
           ("model.norm.weight", (h,), "ones"),
           ("lm_head.weight", (c["vocab_size"], h), "matrix")]
    for layer, mlp in enumerate(c["mlp_layer_types"]):
        p = f"model.layers.{layer}"
        a = f"{p}.self_attn"
        out += [
            (f"{p}.input_layernorm.weight", (h,), "ones"),
            (f"{p}.post_attention_layernorm.weight", (h,), "ones"),
            (f"{a}.q_a_proj.weight", (q_rank, h), "matrix"),
            (f"{a}.q_a_layernorm.weight", (q_rank,), "ones"),
            (f"{a}.q_b_proj.weight", (heads * (nope + rope), q_rank), "matrix"),
            (f"{a}.kv_a_proj_with_mqa.weight", (kv_rank + rope, h), "matrix"),
            (f"{a}.kv_a_layernorm.weight", (kv_rank,), "ones"),
            (f"{a}.kv_b_proj.weight", (heads * (nope + v), kv_rank), "matrix"),
            (f"{a}.o_proj.weight", (h, heads * v), "matrix"),
            (f"{a}.indexer.wq_b.weight", (ix_heads * ix_dim, q_rank), "matrix"),
            (f"{a}.indexer.wk.weight", (ix_dim, h), "matrix"),
            (f"{a}.indexer.k_norm.weight", (ix_dim,), "ones"),
            (f"{a}.indexer.k_norm.bias", (ix_dim,), "zeros"),
            (f"{a}.indexer.weights_proj.weight", (ix_heads, h), "matrix"),
        ]
        m = f"{p}.mlp"
        if mlp == "dense":
            width = c["intermediate_size"]
            names = [m]
        else:
            width = c["moe_intermediate_size"]
            names = [f"{m}.experts.{e}" for e in range(c["n_routed_experts"])]
            out += [(f"{m}.gate.weight", (c["n_routed_experts"], h), "matrix"),
                    (f"{m}.gate.e_score_correction_bias", (c["n_routed_experts"],), "zeros")]
            if c.get("n_shared_experts", 0):
                out += [(f"{m}.shared_experts.{w}", s, "matrix") for w, s in [
                    ("gate_proj.weight", (width * c["n_shared_experts"], h)),
                    ("up_proj.weight", (width * c["n_shared_experts"], h)),
                    ("down_proj.weight", (h, width * c["n_shared_experts"]))]]
        for n in names:
            out += [(f"{n}.gate_proj.weight", (width, h), "matrix"),
                    (f"{n}.up_proj.weight", (width, h), "matrix"),
                    (f"{n}.down_proj.weight", (h, width), "matrix")]
    return out


def main():
    if len(sys.argv) != 3:
        sys.exit(__doc__)
    config_path, out_dir = sys.argv[1], sys.argv[2]
    with open(config_path) as f:
        config = json.load(f)
    if config.get("model_type") != "deepseek_v32":
        sys.exit(f"{config_path}: model_type must be deepseek_v32")
    os.makedirs(out_dir, exist_ok=True)
    rng = np.random.default_rng(0)
    header, offset, shapes = {}, 0, tensors(config)
    for name, shape, _ in shapes:
        size = int(np.prod(shape)) * 2
        header[name] = {"dtype": "BF16", "shape": list(shape), "data_offsets": [offset, offset + size]}
        offset += size
    head = json.dumps(header, separators=(",", ":")).encode()
    head += b" " * (-len(head) % 8)
    with open(os.path.join(out_dir, "model.safetensors"), "wb") as f:
        f.write(struct.pack("<Q", len(head)))
        f.write(head)
        for name, shape, kind in shapes:
            if kind == "ones":
                x = np.ones(shape, np.float32)
            elif kind == "zeros":
                x = np.zeros(shape, np.float32)
            else:
                x = rng.standard_normal(shape, dtype=np.float32) * np.float32(shape[-1] ** -0.5)
            f.write(bf16_bytes(x))
    with open(os.path.join(out_dir, "config.json"), "w") as f:
        json.dump(config, f, indent=2)
    print(f"{out_dir}: {len(shapes)} tensors, {offset / 2**20:.0f} MiB of bf16 weights")


if __name__ == "__main__":
    main()
