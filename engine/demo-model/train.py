#!/usr/bin/env python3
"""Train sparsemoe's built-in demo model: a tiny DeepSeek-V3.2 (DSA + MoE) on Jane Austen's novels.

The whole pipeline, reproducible from this one file:
  1. install check: the pinned Python packages (requirements.txt) and the pinned Debian package
     r-cran-janeaustenr (installed with apt-get when missing and we are root);
  2. text extraction: the six novels are read from the package's R lazy-load database
     (Rdata.rdx / Rdata.rdb: zlib-compressed R serializations) by a small pure-Python reader,
     so R itself is never run; lines are unwrapped into paragraphs;
  3. tokenizer: byte-level BPE (Python `tokenizers`), special tokens, chat template;
  4. model: DeepseekV32ForCausalLM trained from scratch in float32 on the CPU (AdamW, cosine,
     fixed seeds), LM loss + a KL loss that trains the DSA lightning indexer towards the main
     attention (as in DeepSeek-V3.2's indexer training; the indexer's own forward is no_grad in
     transformers), and DeepSeek's auxiliary-loss-free expert balancing (the router's
     e_score_correction_bias is nudged towards an even load after every step);
  5. saving: bf16 weights (e_score_correction_bias float32) with save_pretrained, tokenizer files;
  6. reference.json: greedy continuations by transformers (float32, eager) for the Rust engine.

Run (from the repository root, ~20-45 min on 2 cores depending on the load):
    nice -n 10 /work/venvs/fixtures/bin/python engine/demo-model/train.py
Options: --out DIR (default: this folder), --steps N, --batch N, --smoke (a few steps, to a temp dir).
"""

import argparse
import gzip
import hashlib
import json
import math
import os
import random
import re
import shutil
import struct
import subprocess
import sys
import tempfile
import time
import zlib

HERE = os.path.dirname(os.path.abspath(__file__))

DEB_PACKAGE = "r-cran-janeaustenr"
DEB_VERSION = "1.0.0-1"  # Debian 12 (bookworm)
RDATA_PREFIX = "/usr/lib/R/site-library/janeaustenr/data/Rdata"
RDATA_RDB_SHA256 = "8fb5198960d0da724b1562f96e4221e5c1b41ff455000280b02c55980c3d8f21"
NOVELS = ["sensesensibility", "prideprejudice", "mansfieldpark", "emma", "northangerabbey", "persuasion"]

BOS, EOS = "<|bos|>", "<|eos|>"
SYSTEM, USER, ASSISTANT = "<|system|>", "<|user|>", "<|assistant|>"
SPECIAL_TOKENS = [BOS, EOS, SYSTEM, USER, ASSISTANT]  # ids 0..4
VOCAB_SIZE = 2048
CONTEXT = 256

# minijinja-compatible: for, if/elif/else, {{ }}, string literals with \n.
CHAT_TEMPLATE = (
    "{{ bos_token }}"
    "{% for message in messages %}"
    "{% if message['role'] == 'system' %}{{ '<|system|>\\n' }}"
    "{% elif message['role'] == 'assistant' %}{{ '<|assistant|>\\n' }}"
    "{% else %}{{ '<|user|>\\n' }}{% endif %}"
    "{{ message['content'] }}{{ eos_token }}{{ '\\n' }}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|assistant|>\\n' }}{% endif %}"
)
SYSTEM_PROMPTS = [
    "You are a character in a novel by Jane Austen.",
    "Answer in the manner of Jane Austen.",
]

MODEL_CONFIG = dict(
    vocab_size=VOCAB_SIZE,
    hidden_size=256,
    num_hidden_layers=4,
    num_attention_heads=4,
    num_key_value_heads=4,
    q_lora_rank=64,
    kv_lora_rank=64,
    qk_nope_head_dim=32,
    qk_rope_head_dim=16,
    v_head_dim=32,
    index_n_heads=8,
    index_head_dim=32,
    index_topk=64,
    n_routed_experts=8,
    num_experts_per_tok=2,
    n_group=2,
    topk_group=1,
    n_shared_experts=1,
    moe_intermediate_size=128,
    intermediate_size=512,
    first_k_dense_replace=1,
    routed_scaling_factor=2.5,
    norm_topk_prob=True,
    max_position_embeddings=CONTEXT,
    rope_parameters={"rope_type": "default", "rope_theta": 10000.0},
    rms_norm_eps=1e-6,
    tie_word_embeddings=False,
    bos_token_id=0,
    eos_token_id=1,
    pad_token_id=1,
    initializer_range=0.02,
)

# Chosen (among a few candidates) for clear greedy margins; the third one is longer than
# index_topk=64 tokens with its continuation, so the sparse selection is exercised, and its
# indexer top-k boundaries are not ties (see "indexer_min_topk_gap" in reference.json).
REFERENCE_PROMPTS = [
    {"kind": "completion", "text": "It is a truth universally acknowledged, that"},
    {"kind": "chat", "messages": [{"role": "user", "content": "How do you do, Miss Bennet?"}]},
    {
        "kind": "completion",
        "text": (
            "\"My dear Fanny,\" said Edmund, taking her hand, \"you must not be unhappy. My mother will want "
            "you very much this winter, and my father has been so kind to you that I am sure you will like to "
            "stay with us at Mansfield. Do not cry, but tell me what it is that"
        ),
    },
]
REFERENCE_NEW_TOKENS = 24


# ----------------------------------------------------------------------------- 1. install check
def read_requirements():
    pins = {}
    with open(os.path.join(HERE, "requirements.txt")) as f:
        for line in f:
            line = line.split("#")[0].strip()
            if "==" in line:
                name, ver = line.split("==")
                pins[name.strip().lower()] = ver.strip()
    return pins


def check_python_packages(strict):
    from importlib.metadata import version, PackageNotFoundError

    bad = []
    for name, want in read_requirements().items():
        try:
            have = version(name)
        except PackageNotFoundError:
            have = None
        if have != want:
            bad.append(f"{name}: want {want}, have {have}")
    if bad:
        msg = "Python packages differ from requirements.txt:\n  " + "\n  ".join(bad)
        if strict:
            sys.exit(msg + "\n(pip install -r engine/demo-model/requirements.txt, or pass --no-strict)")
        print("WARNING:", msg)


def check_debian_package():
    def installed_version():
        r = subprocess.run(["dpkg-query", "-W", "-f=${Version}", DEB_PACKAGE], capture_output=True, text=True)
        return r.stdout.strip() if r.returncode == 0 else None

    have = installed_version()
    if have != DEB_VERSION:
        cmd = ["apt-get", "install", "-y", "--no-install-recommends", f"{DEB_PACKAGE}={DEB_VERSION}"]
        if os.geteuid() != 0:
            sys.exit(f"{DEB_PACKAGE} {DEB_VERSION} is not installed (have {have}); run as root: {' '.join(cmd)}")
        env = dict(os.environ, DEBIAN_FRONTEND="noninteractive")
        print("installing:", " ".join(cmd), flush=True)
        if subprocess.run(cmd, env=env).returncode != 0:
            subprocess.run(["apt-get", "update"], env=env, check=True)
            subprocess.run(cmd, env=env, check=True)
        have = installed_version()
        if have != DEB_VERSION:
            sys.exit(f"{DEB_PACKAGE}: want {DEB_VERSION}, have {have}")
    digest = hashlib.sha256(open(RDATA_PREFIX + ".rdb", "rb").read()).hexdigest()
    if digest != RDATA_RDB_SHA256:
        sys.exit(f"{RDATA_PREFIX}.rdb has sha256 {digest}, expected {RDATA_RDB_SHA256}")


# ----------------------------------------------------------------------------- 2. text extraction
class RUnserializer:
    """Just enough of R's XDR serialization format (versions 2 and 3) for the lazy-load database
    of a data package: character/integer/double/logical vectors, generic vectors (lists) with a
    names attribute, pairlists (attributes), symbols, references and NULL."""

    def __init__(self, data):
        self.b, self.p, self.refs = data, 0, []
        if data[:2] != b"X\n":
            raise ValueError("not an XDR R serialization")
        self.p = 2
        version = self.i32()
        self.i32()  # writer R version
        self.i32()  # minimal reader R version
        if version == 3:
            n = self.i32()  # native encoding name
            self.p += n
        elif version != 2:
            raise ValueError(f"unsupported serialization version {version}")

    def i32(self):
        (v,) = struct.unpack_from(">i", self.b, self.p)
        self.p += 4
        return v

    def read(self):
        flags = self.i32()
        sexptype = flags & 0xFF
        has_attr, has_tag = bool(flags & (1 << 9)), bool(flags & (1 << 10))
        if sexptype in (254, 242, 253, 251):  # NULL, empty env, global env, missing arg
            return None
        if sexptype == 255:  # reference to an earlier symbol/environment
            return self.refs[(flags >> 8) - 1]
        if sexptype == 1:  # SYMSXP
            sym = ("symbol", self.read())
            self.refs.append(sym)
            return sym
        if sexptype == 9:  # CHARSXP
            n = self.i32()
            if n == -1:
                return None  # NA_character_
            raw = self.b[self.p : self.p + n]
            self.p += n
            levels = flags >> 12
            return raw.decode("latin-1" if levels & 4 else "utf-8")
        if sexptype == 2:  # LISTSXP (pairlist): attributes
            out = {}
            while True:
                if has_attr:
                    self.read()
                tag = self.read() if has_tag else None
                out[tag[1] if tag else len(out)] = self.read()
                nxt = self.i32()
                if nxt & 0xFF == 254:
                    return out
                if nxt & 0xFF != 2:
                    raise ValueError("malformed pairlist")
                has_attr, has_tag = bool(nxt & (1 << 9)), bool(nxt & (1 << 10))
        if sexptype in (10, 13, 14, 16, 19):  # LGL, INT, REAL, STR, VEC
            n = self.i32()
            if sexptype in (16, 19):
                value = [self.read() for _ in range(n)]
            elif sexptype == 14:
                value = list(struct.unpack_from(f">{n}d", self.b, self.p))
                self.p += 8 * n
            else:
                value = list(struct.unpack_from(f">{n}i", self.b, self.p))
                self.p += 4 * n
            attrs = self.read() if has_attr else None
            if sexptype == 19 and attrs and "names" in attrs:
                return dict(zip(attrs["names"], value))
            return value
        raise ValueError(f"unsupported R object type {sexptype}")


def read_lazyload_db(prefix):
    """R's lazy-load database: <prefix>.rdx (gzip'd serialization of an index: variable ->
    (offset, length) in <prefix>.rdb); each .rdb record is a 4-byte big-endian length + zlib data."""
    index = RUnserializer(gzip.decompress(open(prefix + ".rdx", "rb").read())).read()
    rdb = open(prefix + ".rdb", "rb").read()
    out = {}
    for name, (offset, length) in index["variables"].items():
        rec = rdb[offset : offset + length]
        (size,) = struct.unpack(">I", rec[:4])
        raw = zlib.decompress(rec[4:])
        assert len(raw) == size, name
        out[name] = RUnserializer(raw).read()
    return out


HEADING = re.compile(r"^(CHAPTER|Chapter|VOLUME|Volume|FINIS|THE END|by\b|By\b|\(\d{4}\)$)")


def paragraphs_of(lines):
    """Unwrap the Gutenberg line-wrapped text into paragraphs; drop titles, chapter headings and
    the _italic_ markers."""
    paras, cur = [], []
    for line in lines + [""]:
        line = (line or "").strip()
        if line:
            cur.append(line)
            continue
        if cur:
            p = re.sub(r"\s+", " ", " ".join(cur)).replace("_", "").strip()
            cur = []
            letters = [c for c in p if c.isalpha()]
            if not letters or p.upper() == p or (HEADING.match(p) and len(p) < 60):
                continue  # title, "CHAPTER I", "VOLUME II", "by Jane Austen", ...
            paras.append(p)
    return paras


def load_novels():
    db = read_lazyload_db(RDATA_PREFIX)
    return {name: paragraphs_of(db[name]) for name in NOVELS}


# ----------------------------------------------------------------------------- 3. tokenizer
def train_tokenizer(paragraphs, out_dir):
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=VOCAB_SIZE,
        min_frequency=2,
        special_tokens=SPECIAL_TOKENS,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(paragraphs, trainer=trainer)
    # encode(text) (add_special_tokens=True) puts <|bos|> first; the chat template writes its own
    # bos_token, so rendered chats are encoded with add_special_tokens=False.
    tok.post_processor = processors.TemplateProcessing(
        single=f"{BOS} $A", pair=f"{BOS} $A $B:1", special_tokens=[(BOS, tok.token_to_id(BOS))]
    )
    for i, t in enumerate(SPECIAL_TOKENS):
        assert tok.token_to_id(t) == i, (t, tok.token_to_id(t))
    assert tok.get_vocab_size() == VOCAB_SIZE, tok.get_vocab_size()
    tok.save(os.path.join(out_dir, "tokenizer.json"))
    config = {
        "tokenizer_class": "PreTrainedTokenizerFast",
        "bos_token": BOS,
        "eos_token": EOS,
        "pad_token": EOS,
        "unk_token": None,
        "add_bos_token": True,
        "add_eos_token": False,
        "clean_up_tokenization_spaces": False,
        "model_max_length": CONTEXT,
        "chat_template": CHAT_TEMPLATE,
    }
    with open(os.path.join(out_dir, "tokenizer_config.json"), "w") as f:
        json.dump(config, f, indent=2, ensure_ascii=False)
        f.write("\n")
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(out_dir)


# ----------------------------------------------------------------------------- 4. data
def is_speech(p):
    return p.startswith('"') and len(p) < 400


def strip_quotes(p):
    if p.startswith('"') and p.endswith('"') and p.count('"') == 2:
        return p[1:-1].strip()
    return p


def build_stream(paras, hf_tok, rng):
    """Token stream of documents, each `<|bos|> ... <|eos|>`:
    - prose: 1-6 consecutive paragraphs joined by blank lines;
    - chat (about 1/3 of the runs of 2+ speeches): consecutive speeches as alternating
      user/assistant turns rendered with the chat template, sometimes with a system prompt.
    Returns the ids and the positions where documents start (each a <|bos|>)."""
    bos, eos = hf_tok.convert_tokens_to_ids(BOS), hf_tok.convert_tokens_to_ids(EOS)
    ids, starts = [], []
    i = 0
    while i < len(paras):
        run = 0
        while i + run < len(paras) and is_speech(paras[i + run]) and run < 6:
            run += 1
        if run >= 2 and rng.random() < 0.35:
            n = run - (run % 2)
            msgs = [
                {"role": "user" if k % 2 == 0 else "assistant", "content": strip_quotes(paras[i + k])}
                for k in range(n)
            ]
            if rng.random() < 0.15:
                msgs.insert(0, {"role": "system", "content": rng.choice(SYSTEM_PROMPTS)})
            text = hf_tok.apply_chat_template(msgs, tokenize=False)
            doc = hf_tok(text, add_special_tokens=False)["input_ids"]
            assert doc[0] == bos
            i += n
        else:
            n = rng.randint(1, 6)
            text = "\n\n".join(paras[i : i + n])
            doc = hf_tok(text, add_special_tokens=True)["input_ids"] + [eos]
            i += n
        starts.append(len(ids))
        ids.extend(doc)
    return ids, starts


# ----------------------------------------------------------------------------- 5. model training
def make_config():
    from transformers import DeepseekV32Config

    return DeepseekV32Config(**MODEL_CONFIG)


class TrainingHooks:
    """Indexer KL loss and expert-load counting, attached with module hooks so transformers'
    modelling code is used unchanged."""

    def __init__(self, model):
        import torch

        self.torch = torch
        self.model = model
        self.active = False
        self.index_losses = []
        self.loads = {}
        self.captured = {}
        self.coverage = []
        for li, layer in enumerate(model.model.layers):
            attn = layer.self_attn
            attn.indexer.register_forward_pre_hook(self._capture(li), with_kwargs=True)
            attn.register_forward_hook(self._index_loss(li))
            if hasattr(layer.mlp, "gate"):
                layer.mlp.gate.register_forward_hook(self._count(li))

    def _capture(self, li):
        def hook(module, args, kwargs):
            if self.active:
                hidden, q_resid, pos_emb, mask = args[:4]
                self.captured[li] = (module, hidden.detach(), q_resid.detach(), pos_emb, mask)

        return hook

    def _index_loss(self, li):
        torch = self.torch
        F = torch.nn.functional

        def hook(module, args, output):
            if not self.active:
                return
            ix, hidden, q_resid, (cos, sin), mask = self.captured.pop(li)
            attn_weights = output[1]  # [B, H, S, T], eager attention (after the sparse mask)
            from transformers.models.deepseek_v32.modeling_deepseek_v32 import apply_rotary_pos_emb

            b, s, _ = hidden.shape
            q = ix.wq_b(q_resid).view(b, s, ix.n_heads, ix.head_dim)
            q_rot, q_pass = torch.split(q, [ix.qk_rope_head_dim, ix.head_dim - ix.qk_rope_head_dim], dim=-1)
            k = ix.k_norm(ix.wk(hidden)).unsqueeze(2)
            k_rot, k_pass = torch.split(k, [ix.qk_rope_head_dim, ix.head_dim - ix.qk_rope_head_dim], dim=-1)
            q_rot, k_rot = apply_rotary_pos_emb(q_rot, k_rot, cos, sin, unsqueeze_dim=2)
            q = torch.cat([q_rot, q_pass], dim=-1)
            k = torch.cat([k_rot, k_pass], dim=-1).squeeze(2)
            scores = F.relu(torch.matmul(q.transpose(1, 2), k.transpose(-1, -2).unsqueeze(1)) * ix.softmax_scale)
            weights = ix.weights_proj(hidden) * (ix.n_heads**-0.5)  # [B, S, Hi]
            index_scores = torch.einsum("bsh,bhst->bst", weights, scores)
            # target: the main attention, summed over heads, renormalised (on the selected keys)
            target = attn_weights.detach().float().sum(1)
            target = target / target.sum(-1, keepdim=True).clamp_min(1e-12)
            support = target > 0
            logp = F.log_softmax(index_scores.masked_fill(~support, float("-inf")), dim=-1)
            kl = (target * (torch.log(target.clamp_min(1e-12)) - logp.masked_fill(~support, 0.0))).sum(-1)
            self.index_losses.append(kl.mean())

        return hook

    def _count(self, li):
        torch = self.torch

        def hook(module, args, output):
            if self.active:
                counts = torch.bincount(output[2].reshape(-1), minlength=module.num_experts).float()
                self.loads[li] = self.loads.get(li, 0) + counts

        return hook

    def balance(self, rate):
        """DeepSeek-V3's auxiliary-loss-free balancing: bias_e += rate * sign(mean load - load_e)."""
        torch = self.torch
        with torch.no_grad():
            for li, counts in self.loads.items():
                gate = self.model.model.layers[li].mlp.gate
                gate.e_score_correction_bias += rate * torch.sign(counts.mean() - counts)
        loads = {li: (c / c.sum()).tolist() for li, c in self.loads.items()}
        self.loads = {}
        return loads


def set_index_topk(model, k):
    for layer in model.model.layers:
        layer.self_attn.indexer.index_topk = k


def train(args, hf_tok, train_ids, train_starts, val_ids, val_starts, log):
    import numpy as np
    import torch
    from transformers import DeepseekV32ForCausalLM

    torch.manual_seed(args.seed)
    cfg = make_config()
    model = DeepseekV32ForCausalLM._from_config(
        cfg, attn_implementation="eager", experts_implementation="grouped_mm", dtype=torch.float32
    )
    model.train()
    n_params = sum(p.numel() for p in model.parameters())
    log(f"parameters: {n_params}")
    hooks = TrainingHooks(model)

    decay = [p for n, p in model.named_parameters() if p.ndim >= 2 and "embed_tokens" not in n]
    no_decay = [p for n, p in model.named_parameters() if not (p.ndim >= 2 and "embed_tokens" not in n)]
    opt = torch.optim.AdamW(
        [{"params": decay, "weight_decay": 0.1}, {"params": no_decay, "weight_decay": 0.0}],
        lr=args.lr, betas=(0.9, 0.95), eps=1e-8,
    )
    warmup, total = max(1, args.steps // 20), args.steps
    dense_steps = int(args.steps * args.dense_frac)

    def lr_at(step):
        if step < warmup:
            return args.lr * (step + 1) / warmup
        t = (step - warmup) / max(1, total - warmup)
        return args.lr * (0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * t)))

    T = CONTEXT + 1
    rng = np.random.default_rng(args.seed)
    train_arr = torch.tensor(train_ids, dtype=torch.long)
    val_arr = torch.tensor(val_ids, dtype=torch.long)
    ok_starts = np.array([s for s in train_starts if s + T <= len(train_ids)])
    val_ok = [s for s in val_starts if s + T <= len(val_ids)]
    val_rows = torch.stack([val_arr[s : s + T] for s in val_ok[:: max(1, len(val_ok) // args.val_rows)][: args.val_rows]])

    def evaluate():
        model.eval()
        losses = []
        with torch.no_grad():
            for i in range(0, len(val_rows), 8):
                x = val_rows[i : i + 8]
                logits = model(input_ids=x[:, :-1], use_cache=False).logits
                losses.append(torch.nn.functional.cross_entropy(logits.reshape(-1, VOCAB_SIZE), x[:, 1:].reshape(-1), reduction="sum").item())
        model.train()
        return sum(losses) / (len(val_rows) * CONTEXT)

    t0 = time.time()
    c0 = time.process_time()
    history = []
    ema = None
    for step in range(total):
        set_index_topk(model, CONTEXT if step < dense_steps else cfg.index_topk)
        for g in opt.param_groups:
            g["lr"] = lr_at(step)
        # half of the rows begin at a document start (<|bos|> at position 0, as when serving),
        # the others at a random offset, so every part of the text is seen
        n_doc = args.batch // 2
        starts = np.concatenate([
            rng.choice(ok_starts, size=n_doc, replace=False),
            rng.integers(0, len(train_ids) - T, size=args.batch - n_doc),
        ])
        x = torch.stack([train_arr[s : s + T] for s in starts])
        hooks.active = True
        logits = model(input_ids=x[:, :-1], use_cache=False).logits
        hooks.active = False
        lm = torch.nn.functional.cross_entropy(logits.reshape(-1, VOCAB_SIZE), x[:, 1:].reshape(-1))
        ix = torch.stack(hooks.index_losses).mean()
        hooks.index_losses = []
        (lm + ix).backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        opt.zero_grad(set_to_none=True)
        loads = hooks.balance(args.bias_rate)
        ema = lm.item() if ema is None else 0.95 * ema + 0.05 * lm.item()
        if step % 10 == 0 or step == total - 1:
            maxload = max(max(v) for v in loads.values()) if loads else 0
            log(
                f"step {step:4d}/{total} lr {lr_at(step):.2e} loss {lm.item():.3f} (ema {ema:.3f}) "
                f"indexer-kl {ix.item():.3f} max-expert-load {maxload:.2f} "
                f"wall {time.time() - t0:6.0f}s cpu {time.process_time() - c0:6.0f}s"
            )
        if (step + 1) % max(1, total // 4) == 0 or step == total - 1:
            set_index_topk(model, cfg.index_topk)
            v = evaluate()
            history.append({"step": step + 1, "train_loss_ema": round(ema, 4), "val_loss": round(v, 4)})
            log(f"eval step {step + 1}: val loss {v:.4f} (train ema {ema:.4f}); expert load per MoE layer: "
                + " | ".join(" ".join(f"{x:.2f}" for x in loads[li]) for li in sorted(loads)))
    set_index_topk(model, cfg.index_topk)
    model.eval()
    # final train loss on a fixed sample of training windows (same size as val)
    sel = ok_starts[:: max(1, len(ok_starts) // args.val_rows)][: args.val_rows]
    tr_rows = torch.stack([train_arr[s : s + T] for s in sel])
    with torch.no_grad():
        tl = 0.0
        for i in range(0, len(tr_rows), 8):
            x = tr_rows[i : i + 8]
            logits = model(input_ids=x[:, :-1], use_cache=False).logits
            tl += torch.nn.functional.cross_entropy(logits.reshape(-1, VOCAB_SIZE), x[:, 1:].reshape(-1), reduction="sum").item()
    stats = {
        "steps": total,
        "batch": args.batch,
        "context": CONTEXT,
        "tokens_seen": total * args.batch * CONTEXT,
        "dense_warmup_steps": dense_steps,
        "train_loss": round(tl / (len(tr_rows) * CONTEXT), 4),
        "val_loss": history[-1]["val_loss"],
        "history": history,
        "wall_seconds": round(time.time() - t0),
        "cpu_seconds": round(time.process_time() - c0),
        "parameters": n_params,
    }
    return model, stats


# ----------------------------------------------------------------------------- 6. save + reference
def save_model(model, out_dir):
    import torch

    model = model.to(torch.bfloat16)
    for layer in model.model.layers:
        if hasattr(layer.mlp, "gate"):
            layer.mlp.gate.e_score_correction_bias.data = layer.mlp.gate.e_score_correction_bias.data.float()
    model.config.use_cache = True
    model.save_pretrained(out_dir, safe_serialization=True)
    gc = os.path.join(out_dir, "generation_config.json")
    if os.path.exists(gc):
        os.remove(gc)


def reference(out_dir, hf_tok, log):
    import torch
    from transformers import DeepseekV32ForCausalLM

    model = DeepseekV32ForCausalLM.from_pretrained(
        out_dir, dtype=torch.float32, attn_implementation="eager", experts_implementation="eager"
    )
    model.eval()
    k = model.config.index_topk
    cases = []
    for p in REFERENCE_PROMPTS:
        if p["kind"] == "chat":
            text = hf_tok.apply_chat_template(p["messages"], tokenize=False, add_generation_prompt=True)
            ids = hf_tok(text, add_special_tokens=False)["input_ids"]
        else:
            text = p["text"]
            ids = hf_tok(text, add_special_tokens=True)["input_ids"]
        seq = list(ids)
        margins = []
        first = None
        with torch.no_grad():
            for step in range(REFERENCE_NEW_TOKENS):
                logits = model(input_ids=torch.tensor([seq]), use_cache=False).logits[0, -1]
                top = torch.topk(logits, 5)
                if step == 0:
                    first = {
                        "argmax": int(top.indices[0]),
                        "top5": [[int(i), round(float(v), 5)] for i, v in zip(top.indices, top.values)],
                    }
                margins.append(float(top.values[0] - top.values[1]))
                seq.append(int(top.indices[0]))
                if seq[-1] == model.config.eos_token_id:
                    break  # an engine stops here too
            # the same with transformers' own cached greedy decoding
            gen = model.generate(
                torch.tensor([ids]), max_new_tokens=REFERENCE_NEW_TOKENS, do_sample=False, use_cache=True,
                eos_token_id=model.config.eos_token_id, pad_token_id=model.config.eos_token_id,
            )[0].tolist()
            # indexer top-k margins over the full final sequence (only rows with more than k keys matter)
            ix_gaps = []
            hooks = []
            for layer in model.model.layers:
                ind = layer.self_attn.indexer

                def pre(module, a, kw, store=ix_gaps):
                    store.append(a)

                hooks.append(ind.register_forward_pre_hook(pre, with_kwargs=True))
            model(input_ids=torch.tensor([seq]), use_cache=False)
            for h in hooks:
                h.remove()
        new = seq[len(ids):]
        min_ix_gap = index_topk_min_gap(model, ix_gaps, k)
        case = {
            "kind": p["kind"],
            "prompt": text,
            "prompt_ids": ids,
            "add_special_tokens": p["kind"] != "chat",
            "last_prompt_position_argmax": first["argmax"],
            "last_prompt_position_top5": first["top5"],
            "greedy_ids": new,
            "greedy_text": hf_tok.decode(new, skip_special_tokens=False),
            "stopped_at_eos": new[-1] == model.config.eos_token_id,
            "min_top1_margin": round(min(margins), 5),
            "cached_generate_matches": gen[len(ids):] == new,
            "total_len": len(seq),
            "indexer_sparse": len(seq) > k,
            "indexer_min_topk_gap": min_ix_gap,
        }
        if p["kind"] == "chat":
            case["messages"] = p["messages"]
        cases.append(case)
        log(f"reference [{p['kind']}] {text!r} -> {case['greedy_text']!r} (min margin {case['min_top1_margin']}, "
            f"cached match {case['cached_generate_matches']}, indexer gap {min_ix_gap})")
    return cases


def index_topk_min_gap(model, captured, k):
    """Smallest gap between the k-th and (k+1)-th indexer score over causal keys, over all rows
    and layers with more than k causal keys (None when no row has more than k keys)."""
    import torch

    best = None
    for layer, args in zip(model.model.layers, captured):
        ix = layer.self_attn.indexer
        hidden, q_resid, pos, mask = args[:4]
        b, s, _ = hidden.shape
        if s <= k:
            continue
        with torch.no_grad():
            from transformers.models.deepseek_v32.modeling_deepseek_v32 import apply_rotary_pos_emb

            cos, sin = pos
            q = ix.wq_b(q_resid).view(b, s, ix.n_heads, ix.head_dim)
            q_rot, q_pass = torch.split(q, [ix.qk_rope_head_dim, ix.head_dim - ix.qk_rope_head_dim], dim=-1)
            kk = ix.k_norm(ix.wk(hidden)).unsqueeze(2)
            k_rot, k_pass = torch.split(kk, [ix.qk_rope_head_dim, ix.head_dim - ix.qk_rope_head_dim], dim=-1)
            q_rot, k_rot = apply_rotary_pos_emb(q_rot, k_rot, cos, sin, unsqueeze_dim=2)
            q = torch.cat([q_rot, q_pass], dim=-1)
            kk = torch.cat([k_rot, k_pass], dim=-1).squeeze(2)
            sc = torch.relu(torch.matmul(q.float().transpose(1, 2), kk.float().transpose(-1, -2).unsqueeze(1)) * ix.softmax_scale)
            w = ix.weights_proj(hidden).float() * ix.n_heads**-0.5
            I = torch.einsum("bsh,bhst->bst", w, sc)[0]
            for t in range(k, s):  # row t has t+1 causal keys
                v = torch.sort(I[t, : t + 1], descending=True).values
                g = float(v[k - 1] - v[k])
                best = g if best is None else min(best, g)
    return None if best is None else float(f"{best:.3g}")


def sample_texts(out_dir, hf_tok, log, seed):
    """A few sampled continuations (temperature 0.8, top-k 40) for the README."""
    import torch
    from transformers import DeepseekV32ForCausalLM

    model = DeepseekV32ForCausalLM.from_pretrained(out_dir, dtype=torch.float32)
    model.eval()
    torch.manual_seed(seed)
    prompts = [
        ("completion", "It is a truth universally acknowledged"),
        ("completion", "Mrs. Bennet said"),
        ("chat", [{"role": "user", "content": "Will you dance with me this evening?"}]),
    ]
    out = []
    for kind, p in prompts:
        if kind == "chat":
            text = hf_tok.apply_chat_template(p, tokenize=False, add_generation_prompt=True)
            ids = hf_tok(text, add_special_tokens=False, return_tensors="pt")["input_ids"]
        else:
            text = p
            ids = hf_tok(text, return_tensors="pt")["input_ids"]
        with torch.no_grad():
            g = model.generate(ids, max_new_tokens=80, do_sample=True, temperature=0.8, top_k=40, eos_token_id=1, pad_token_id=1)
        cont = hf_tok.decode(g[0, ids.shape[1]:], skip_special_tokens=False)
        out.append({"kind": kind, "prompt": text, "sample": cont})
        log(f"sample [{kind}] {text!r} -> {cont!r}")
    return out


# ----------------------------------------------------------------------------- main
def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", default=HERE)
    ap.add_argument("--steps", type=int, default=400)
    ap.add_argument("--batch", type=int, default=16)
    ap.add_argument("--lr", type=float, default=2e-3)
    ap.add_argument("--dense-frac", type=float, default=0.1, help="fraction of steps with dense attention (indexer warm-up)")
    ap.add_argument("--bias-rate", type=float, default=1e-2)
    ap.add_argument("--val-rows", type=int, default=64)
    ap.add_argument("--seed", type=int, default=1234)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--no-strict", action="store_true", help="warn instead of stopping on other package versions")
    ap.add_argument("--smoke", action="store_true", help="8 steps into a temporary folder (pipeline check)")
    ap.add_argument("--reference-only", action="store_true",
                    help="no training: recompute reference.json (cases, samples) for the model already in --out")
    args = ap.parse_args()
    if args.smoke:
        args.steps, args.val_rows = 8, 8
        args.out = tempfile.mkdtemp(prefix="demo-model-smoke-")

    check_python_packages(strict=not args.no_strict)
    check_debian_package()

    import numpy as np
    import torch

    torch.set_num_threads(args.threads)
    random.seed(args.seed)
    np.random.seed(args.seed)
    torch.manual_seed(args.seed)
    os.makedirs(args.out, exist_ok=True)
    logf = open(os.path.join(args.out, "train.log") if args.smoke else os.path.join(tempfile.gettempdir(), "demo-model-train.log"), "w")

    def log(msg):
        print(msg, flush=True)
        logf.write(msg + "\n")
        logf.flush()

    if args.reference_only:
        from transformers import AutoTokenizer

        ref_path = os.path.join(args.out, "reference.json")
        doc = json.load(open(ref_path))
        hf_tok = AutoTokenizer.from_pretrained(args.out)
        doc["cases"] = reference(args.out, hf_tok, log)
        doc["samples"] = sample_texts(args.out, hf_tok, log, args.seed)
        with open(ref_path, "w") as f:
            json.dump(doc, f, indent=1, ensure_ascii=False)
            f.write("\n")
        return

    t_start = time.time()
    novels = load_novels()
    corpus = "\n\n".join("\n\n".join(p) for p in novels.values())
    log(f"text: {len(corpus)} characters, {sum(len(p) for p in novels.values())} paragraphs, sha256 {hashlib.sha256(corpus.encode()).hexdigest()}")
    # validation: the last 4 % of the paragraphs of each novel
    train_paras, val_paras = [], []
    for name, paras in novels.items():
        cut = int(len(paras) * 0.96)
        train_paras.append(paras[:cut])
        val_paras.append(paras[cut:])

    hf_tok = train_tokenizer([p for ps in train_paras for p in ps], args.out)
    rng = random.Random(args.seed)
    train_ids, train_starts, val_ids, val_starts = [], [], [], []
    for ps in train_paras:
        ids, st = build_stream(ps, hf_tok, rng)
        train_starts += [s + len(train_ids) for s in st]
        train_ids += ids
    for ps in val_paras:
        ids, st = build_stream(ps, hf_tok, rng)
        val_starts += [s + len(val_ids) for s in st]
        val_ids += ids
    n_chars = sum(len(p) for ps in train_paras for p in ps)
    log(f"tokens: train {len(train_ids)} ({n_chars / len(train_ids):.2f} chars/token), val {len(val_ids)}, "
        f"documents {len(train_starts)} + {len(val_starts)}")

    model, stats = train(args, hf_tok, train_ids, train_starts, val_ids, val_starts, log)
    save_model(model, args.out)
    refs = reference(args.out, hf_tok, log)
    samples = sample_texts(args.out, hf_tok, log, args.seed)
    stats["pipeline_wall_seconds"] = round(time.time() - t_start)
    stats["train_tokens"] = len(train_ids)
    stats["val_tokens"] = len(val_ids)
    doc = {
        "about": "Greedy decoding by transformers 5.23.0 (DeepseekV32ForCausalLM, float32, eager attention and "
                 "experts, CPU) of the demo model in this folder, reloaded from its bf16 safetensors with "
                 "dtype=float32. greedy_ids: argmax at every step over the full sequence (use_cache=False), "
                 "at most 24 new tokens, stopping after <|eos|> (included in greedy_ids when produced). prompt_ids: the tokens fed to the model "
                 "(completion prompts: tokenizer.encode(text) with add_special_tokens, which puts <|bos|> first; "
                 "chat prompts: the chat template rendered with add_generation_prompt=true, encoded without "
                 "special tokens, the template writes <|bos|> itself).",
        "special_tokens": {t: i for i, t in enumerate(SPECIAL_TOKENS)},
        "bos_token_id": 0,
        "eos_token_id": 1,
        "training": {k: v for k, v in stats.items() if k != "history"},
        "loss_history": stats["history"],
        "cases": refs,
        "samples": samples,
    }
    with open(os.path.join(args.out, "reference.json"), "w") as f:
        json.dump(doc, f, indent=1, ensure_ascii=False)
        f.write("\n")
    log(json.dumps(doc["training"]))
    for name in sorted(os.listdir(args.out)):
        log(f"  {name}: {os.path.getsize(os.path.join(args.out, name))} bytes")


if __name__ == "__main__":
    main()
