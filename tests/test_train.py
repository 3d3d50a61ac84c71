"""Tests of the PyTorch training tools: data, model, trainer, export, engine parity."""

from __future__ import annotations

import dataclasses
import importlib.util
import json
import math
import shutil
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch

from llama2rnn.checkpoint import (
    Config,
    random_weights,
    read_checkpoint,
    write_llama2c_v1,
    write_llama2rnn,
)
from llama2rnn.train import data, trainer
from llama2rnn.train.export import export_model, model_from_weights, model_to_weights
from llama2rnn.train.model import ModelArgs, Transformer

torch.set_num_threads(1)

try:
    import llama2rnn._llama2rnn  # noqa: F401

    HAS_ENGINE = True
except ImportError:
    HAS_ENGINE = False
HAS_TOKENIZER_MODULE = importlib.util.find_spec("llama2rnn.tokenizer") is not None


# ----------------------------------------------------------------------------
# Independent token-by-token formulation, float64 numpy


def rmsnorm(x: np.ndarray, w: np.ndarray) -> np.ndarray:
    return w * x / np.sqrt(np.mean(x * x) + 1e-5)


def silu(a: np.ndarray) -> np.ndarray:
    return a / (1.0 + np.exp(-a))


def rope(vec: np.ndarray, pos: int, head_size: int) -> np.ndarray:
    """Rotate each pair (2j, 2j+1) of each head by pos * 10000^(-2j/head_size)."""
    out = vec.copy()
    for base in range(0, len(vec), head_size):
        for j in range(head_size // 2):
            angle = pos * 10000.0 ** (-2.0 * j / head_size)
            a, b = vec[base + 2 * j], vec[base + 2 * j + 1]
            out[base + 2 * j] = a * math.cos(angle) - b * math.sin(angle)
            out[base + 2 * j + 1] = a * math.sin(angle) + b * math.cos(angle)
    return out


def attend_one(q: np.ndarray, keys: np.ndarray, values: np.ndarray, cfg: Config) -> np.ndarray:
    """Attention of one query over rows of keys/values, head by head."""
    hs = cfg.head_size
    out = np.zeros(cfg.dim)
    group = cfg.n_heads // cfg.n_kv_heads
    for h in range(cfg.n_heads):
        kv = h // group
        scores = keys[:, kv * hs : (kv + 1) * hs] @ q[h * hs : (h + 1) * hs] / math.sqrt(hs)
        weights = np.exp(scores - scores.max())
        weights /= weights.sum()
        out[h * hs : (h + 1) * hs] = weights @ values[:, kv * hs : (kv + 1) * hs]
    return out


def reference_logits(cfg: Config, weights: dict[str, np.ndarray], tokens: list[int]) -> np.ndarray:
    """Logits of each token, one token at a time, carrying memory across chunks.

    With mem_len 0 this is plain causal attention at absolute positions.
    """
    w = {k: v.astype(np.float64) for k, v in weights.items()}
    M = cfg.mem_len
    L = cfg.n_layers
    memory = [w["ori_mem"][i] for i in range(L)] if M else []
    mem_keys: list[np.ndarray] = [np.zeros((0, cfg.kv_dim))] * L
    mem_values: list[np.ndarray] = [np.zeros((0, cfg.kv_dim))] * L
    keys: list[list[np.ndarray]] = [[] for _ in range(L)]
    values: list[list[np.ndarray]] = [[] for _ in range(L)]
    chunk_att: list[list[np.ndarray]] = [[] for _ in range(L)]
    logits = []
    for t, token in enumerate(tokens):
        if M and t % M == 0:
            for i in range(L):
                rows_k, rows_v = [], []
                for r in range(M):
                    mem = memory[i][r]
                    g = rmsnorm(mem, w["rms_mff"][i])
                    m = mem + w["aw2"][i] @ (silu(w["aw1"][i] @ g) * (w["aw3"][i] @ g))
                    n = rmsnorm(m, w["rms_mem"][i])
                    rows_k.append(rope(w["wk"][i] @ n, r, cfg.head_size))
                    rows_v.append(w["wv"][i] @ n)
                mem_keys[i], mem_values[i] = np.array(rows_k), np.array(rows_v)
                keys[i], values[i], chunk_att[i] = [], [], []
        pos = M + t % M if M else t
        x = w["embedding"][token].copy()
        for i in range(L):
            xb = rmsnorm(x, w["rms_att"][i])
            q = rope(w["wq"][i] @ xb, pos, cfg.head_size)
            keys[i].append(rope(w["wk"][i] @ xb, pos, cfg.head_size))
            values[i].append(w["wv"][i] @ xb)
            all_keys = np.vstack([mem_keys[i], np.array(keys[i])])
            all_values = np.vstack([mem_values[i], np.array(values[i])])
            att = attend_one(q, all_keys, all_values, cfg)
            chunk_att[i].append(att)
            x = x + w["wo"][i] @ att
            h = rmsnorm(x, w["rms_ffn"][i])
            x = x + w["w2"][i] @ (silu(w["w1"][i] @ h) * (w["w3"][i] @ h))
        logits.append(w["embedding"] @ rmsnorm(x, w["rms_final"]))
        if M and t % M == M - 1:
            memory = [np.array(chunk_att[i]) for i in range(L)]
    return np.array(logits)


def torch_logits(model: Transformer, tokens: list[int]) -> np.ndarray:
    with torch.no_grad():
        logits, _, _ = model(torch.tensor([tokens]))
    return logits[0].double().numpy()


GQA_MEMORY = Config(
    dim=32, hidden_dim=48, n_layers=2, n_heads=4, n_kv_heads=2, vocab_size=61, seq_len=32, mem_len=8
)


# ----------------------------------------------------------------------------
# Model


@pytest.mark.parametrize("n_kv_heads", [4, 2, 1])
def test_memory_model_matches_token_loop(n_kv_heads: int) -> None:
    cfg = Config(
        dim=32,
        hidden_dim=48,
        n_layers=2,
        n_heads=4,
        n_kv_heads=n_kv_heads,
        vocab_size=61,
        seq_len=32,
        mem_len=8,
    )
    weights = random_weights(cfg, seed=n_kv_heads)
    model = model_from_weights(cfg, weights)
    # 3.5 chunks: three memory hand-overs and a final partial chunk.
    tokens = np.random.default_rng(0).integers(0, cfg.vocab_size, 28).tolist()
    expected = reference_logits(cfg, weights, tokens)
    actual = torch_logits(model, tokens)
    np.testing.assert_allclose(actual, expected, rtol=1e-4, atol=1e-4 * np.abs(expected).max())


def test_baseline_matches_token_loop() -> None:
    cfg = Config(
        dim=32,
        hidden_dim=48,
        n_layers=2,
        n_heads=4,
        n_kv_heads=2,
        vocab_size=61,
        seq_len=24,
        mem_len=0,
    )
    weights = random_weights(cfg, seed=5)
    model = model_from_weights(cfg, weights)
    tokens = np.random.default_rng(1).integers(0, cfg.vocab_size, 24).tolist()
    expected = reference_logits(cfg, weights, tokens)
    actual = torch_logits(model, tokens)
    np.testing.assert_allclose(actual, expected, rtol=1e-4, atol=1e-4 * np.abs(expected).max())


def test_memory_carries_across_calls() -> None:
    weights = random_weights(GQA_MEMORY, seed=3)
    model = model_from_weights(GQA_MEMORY, weights)
    tokens = torch.tensor([np.random.default_rng(2).integers(0, 61, 24).tolist()])
    with torch.no_grad():
        whole, _, _ = model(tokens)
        first, _, memory = model(tokens[:, :16])
        second, _, _ = model(tokens[:, 16:], memory=memory)
    torch.testing.assert_close(torch.cat([first, second], dim=1), whole, rtol=1e-5, atol=1e-5)


def test_memory_gradient_reaches_earlier_chunks() -> None:
    args = ModelArgs(
        dim=32,
        n_layers=2,
        n_heads=4,
        n_kv_heads=2,
        vocab_size=61,
        hidden_dim=48,
        seq_len=24,
        mem_len=8,
    )
    torch.manual_seed(0)
    model = Transformer(args)
    tokens = torch.randint(0, 61, (2, 24))
    embeddings = model.tok_embeddings(tokens).detach().requires_grad_(True)
    # Loss on the last chunk only: its gradient must reach the first chunk through memory.
    x = embeddings
    rope = (model.rope_cos, model.rope_sin)
    for layer in model.layers:
        x, _ = layer(x, None, rope)
    x[:, 16:].sum().backward()
    assert embeddings.grad is not None
    assert embeddings.grad[:, :8].abs().sum() > 0


def test_weights_round_trip() -> None:
    weights = random_weights(GQA_MEMORY, seed=7)
    cfg, back = model_to_weights(model_from_weights(GQA_MEMORY, weights))
    assert cfg == GQA_MEMORY
    assert sorted(back) == sorted(weights)
    for name, value in weights.items():
        np.testing.assert_array_equal(back[name], value, err_msg=name)


def test_init_scales() -> None:
    args = ModelArgs(
        dim=64,
        n_layers=4,
        n_heads=4,
        n_kv_heads=4,
        vocab_size=512,
        hidden_dim=128,
        seq_len=64,
        mem_len=16,
    )
    torch.manual_seed(0)
    model = Transformer(args)
    assert model.output.weight is model.tok_embeddings.weight
    assert abs(model.layers[0].wq.weight.std().item() - 0.02) < 0.002
    assert abs(model.layers[0].wo.weight.std().item() - 0.02 / math.sqrt(8)) < 0.001
    assert abs(model.layers[0].feed_forward.w2.weight.std().item() - 0.02 / math.sqrt(8)) < 0.001
    assert torch.all(model.layers[0].memory_norm.weight == 1)
    assert model.layers[0].ori_mem.std().item() < 0.05


def test_model_args_validation() -> None:
    with pytest.raises(ValueError, match="multiple of mem_len"):
        ModelArgs(seq_len=100, mem_len=32)
    with pytest.raises(ValueError, match="n_kv_heads"):
        ModelArgs(n_heads=4, n_kv_heads=3)


# ----------------------------------------------------------------------------
# Data


def message(sender: str, text: str) -> dict[str, str]:
    return {"text": text, "sender": sender, "timestamp": "2018-05-02T19:38:15Z"}


CONVERSATION = {
    "messages": [
        [message("a", "Hi"), message("a", " there ")],
        [message("b", "Hello!")],
        [message("a", "How are you?")],
        [message("b", "Fine"), message("b", "thanks")],
        [message("a", "Bye")],
    ]
}


def test_exchanges_join_and_pair_turns() -> None:
    exchanges = data.conversation_exchanges(CONVERSATION)
    assert exchanges == [
        data.Exchange("Hi\nthere", "Hello!"),
        data.Exchange("How are you?", "Fine\nthanks"),
        data.Exchange("Bye", None),
    ]


def test_exchange_text_template() -> None:
    assert data.exchange_text(data.Exchange("Hi", "Hello")) == "[INST] Hi [/INST] Hello "
    assert data.exchange_text(data.Exchange("Bye", None)) == "[INST] Bye [/INST]"


def test_split_is_seeded_and_stable() -> None:
    ids = [f"conversation-{i}" for i in range(4000)]
    train_a, val_a = data.split_ids(ids, 0.05, seed=0)
    train_b, val_b = data.split_ids(reversed(ids), 0.05, seed=0)
    assert sorted(val_a) == sorted(val_b)
    assert len(train_a) + len(val_a) == len(ids)
    assert 150 < len(val_a) < 250
    _, val_other_seed = data.split_ids(ids, 0.05, seed=1)
    assert val_other_seed != val_a


@pytest.fixture(scope="module")
def prepared(tmp_path_factory: pytest.TempPathFactory) -> Path:
    conversations = data.load_chitchat()
    subset = dict(list(conversations.items())[:40])
    out = tmp_path_factory.mktemp("data")
    data.prepare(out, subset, vocab_size=512, val_fraction=0.1, seed=0)
    return out


def test_prepare_writes_streams_and_index(prepared: Path) -> None:
    import sentencepiece as spm

    meta = data.read_meta(prepared)
    assert meta["vocab_size"] == 512
    sp = spm.SentencePieceProcessor(model_file=str(prepared / "tokenizer.model"))
    assert (sp.bos_id(), sp.eos_id()) == (data.BOS_ID, data.EOS_ID)
    conversations = data.load_chitchat()
    for split in ("train", "val"):
        tokens = data.read_tokens(prepared, split)
        index = data.read_index(prepared, split)
        ids = meta["splits"][split]["ids"]
        assert len(index) == len(ids) + 1
        assert index[-1] == len(tokens) == meta["splits"][split]["tokens"]
        for cid, conversation_tokens in zip(ids, data.iter_conversations(prepared, split)):
            expected = data.encode_conversation(sp, conversations[cid])
            assert conversation_tokens.tolist() == expected
    first = data.read_tokens(prepared, "train")[: data.read_index(prepared, "train")[1]].tolist()
    assert first[0] == data.BOS_ID
    assert first.count(data.BOS_ID) == len(
        data.conversation_exchanges(conversations[meta["splits"]["train"]["ids"][0]])
    )
    assert sp.decode(first).startswith("[INST] ")
    if HAS_TOKENIZER_MODULE:
        assert (prepared / "tokenizer.bin").exists()


def test_tokenizer_options_keep_text_exact(prepared: Path) -> None:
    import sentencepiece as spm

    sp = spm.SentencePieceProcessor(model_file=str(prepared / "tokenizer.model"))
    text = "[INST] a  b\nc 2024 ü✓ [/INST] ok "
    assert sp.decode(sp.encode(text)) == text
    assert "2024" not in sp.id_to_piece(sp.encode("2024"))


# ----------------------------------------------------------------------------
# Trainer


def tiny_config(data_dir: Path, out_dir: Path, **overrides: Any) -> trainer.TrainConfig:
    values: dict[str, Any] = dict(
        data_dir=str(data_dir),
        out_dir=str(out_dir),
        dim=32,
        n_layers=2,
        n_heads=4,
        n_kv_heads=2,
        hidden_dim=64,
        seq_len=32,
        mem_len=8,
        batch_size=8,
        lr=3e-3,
        min_lr=3e-4,
        warmup_steps=5,
        max_steps=40,
        eval_interval=20,
        eval_tokens=1024,
        log_interval=10,
        checkpoint_interval=20,
    )
    values.update(overrides)
    return trainer.TrainConfig(**values)


def test_lr_schedule() -> None:
    config = trainer.TrainConfig(lr=1e-3, min_lr=1e-4, warmup_steps=10)
    assert trainer.lr_at(0, config, 100) == pytest.approx(1e-4)
    assert trainer.lr_at(9, config, 100) == pytest.approx(1e-3)
    assert trainer.lr_at(10, config, 100) == pytest.approx(1e-3)
    assert trainer.lr_at(55, config, 100) == pytest.approx(5.5e-4)
    assert trainer.lr_at(100, config, 100) == pytest.approx(1e-4)
    assert trainer.lr_at(50, config, None) == pytest.approx(1e-3)


def test_replan_keeps_lr_continuous() -> None:
    config = trainer.TrainConfig(
        lr=1e-3, min_lr=1e-4, warmup_steps=10, max_minutes=10, eval_interval=100
    )
    planner = trainer.Planner(config, tokens_per_step=1000, eval_seconds=1.0)
    planner.calibrate(step=20, elapsed=60.0, timed_steps=20, timed_seconds=20.0, announce=False)
    assert planner.total_steps is not None
    first_total = planner.total_steps
    before = planner.lr(300)
    # Training became twice as slow: fewer steps fit, and the rate continues from where it is.
    planner.replan(step=300, elapsed=400.0, seconds_per_step=2.0, announce=False)
    assert planner.total_steps < first_total
    assert planner.lr(300) == pytest.approx(before)
    assert planner.lr(planner.total_steps) == pytest.approx(1e-4)
    assert planner.lr(planner.total_steps - 1) < planner.lr(301) < before
    # A change under 3% of the remaining steps keeps the plan.
    total = planner.total_steps
    planner.replan(step=300, elapsed=400.0, seconds_per_step=2.01, announce=False)
    assert planner.total_steps == total


def test_train_export_end_to_end(prepared: Path, tmp_path: Path) -> None:
    summary = trainer.train(tiny_config(prepared, tmp_path / "run"))
    records = [
        json.loads(line) for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()
    ]
    train_losses = [r["train_loss"] for r in records if "train_loss" in r]
    val_losses = [r["val_loss"] for r in records if "val_loss" in r]
    assert summary["steps"] == 40
    assert train_losses[-1] < train_losses[0] - 0.5
    assert summary["val_loss"] < math.log(512) - 0.5
    assert val_losses[-1] == summary["val_loss"]

    state = trainer.load_checkpoint(tmp_path / "run" / "ckpt.pt")
    model = trainer.model_from_checkpoint(state)
    out = tmp_path / "model" / "model.bin"
    errors = export_model(model, out)
    assert errors["wq"] < 0.01

    fmt, cfg, weights, group_size = read_checkpoint(out)
    assert fmt == "llama2rnn"
    assert cfg == Config(
        dim=32,
        hidden_dim=64,
        n_layers=2,
        n_heads=4,
        n_kv_heads=2,
        vocab_size=512,
        seq_len=32,
        mem_len=8,
    )
    assert group_size is not None
    _, original = model_to_weights(model)
    assert sorted(weights) == sorted(original)
    for name, value in original.items():
        np.testing.assert_allclose(
            weights[name], value, atol=errors.get(name, 0.0) * 1.01 + 1e-7, err_msg=name
        )


def test_resume_matches_uninterrupted_run(
    prepared: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    saved: dict[int, Path] = {}
    original_save = trainer.save_checkpoint

    def save_and_copy(path: Path, state: dict[str, Any]) -> None:
        original_save(path, state)
        copy = path.with_name(f"step{state['step']}.pt")
        shutil.copyfile(path, copy)
        saved[state["step"]] = copy

    monkeypatch.setattr(trainer, "save_checkpoint", save_and_copy)
    settings = dict(max_steps=8, checkpoint_interval=4, eval_interval=100)
    trainer.train(tiny_config(prepared, tmp_path / "full", **settings))
    assert 4 in saved

    resumed_dir = tmp_path / "resumed"
    resumed_dir.mkdir()
    shutil.copyfile(saved[4], resumed_dir / trainer.CHECKPOINT_NAME)
    trainer.train(tiny_config(prepared, resumed_dir, **settings))

    full = trainer.load_checkpoint(tmp_path / "full" / "ckpt.pt")
    resumed = trainer.load_checkpoint(resumed_dir / "ckpt.pt")
    assert resumed["step"] == full["step"] == 8
    for name, value in full["model"].items():
        torch.testing.assert_close(resumed["model"][name], value, rtol=0, atol=0, msg=name)


def test_time_budget_fits_schedule(prepared: Path, tmp_path: Path) -> None:
    budget_minutes = 0.1
    summary = trainer.train(
        tiny_config(
            prepared, tmp_path / "budget", max_steps=0, max_minutes=budget_minutes, eval_interval=50
        )
    )
    state = trainer.load_checkpoint(tmp_path / "budget" / "ckpt.pt")
    assert state["total_steps"] is not None
    assert summary["tokens_per_second"] > 0
    assert summary["steps"] > 10
    # The plan keeps 3% margin, and the final evaluation of a tiny model is fast.
    assert summary["train_seconds"] < budget_minutes * 60 + 2.0


def test_cli_help_lists_subcommands(capsys: pytest.CaptureFixture[str]) -> None:
    from llama2rnn.train.__main__ import main

    with pytest.raises(SystemExit):
        main(["--help"])
    text = capsys.readouterr().out
    for command in ("prepare", "train", "export"):
        assert command in text


# ----------------------------------------------------------------------------
# Engine parity


def engine_logits(path: Path, tokens: list[int]) -> np.ndarray:
    from llama2rnn import Model

    model = Model.load(path, threads=1)
    return np.array([np.asarray(model.forward(int(t)), dtype=np.float64) for t in tokens])


def round_q8_0(x: torch.Tensor, group_size: int) -> torch.Tensor:
    """Round x to Q8_0 per group along the last axis (max |x| / 127 scale, half away from zero)."""
    groups = x.unflatten(-1, (-1, group_size))
    scale = groups.abs().amax(-1, keepdim=True) / 127
    ratio = groups / torch.where(scale == 0, torch.ones_like(scale), scale)
    q = (torch.sign(ratio) * torch.floor(ratio.abs() + 0.5)).clamp(-127, 127)
    return (q * scale).flatten(-2)


def quantize_linear_inputs(model: Transformer, group_size: int) -> None:
    """Make every matmul of ``model`` round its input to Q8_0, as the engine does for Q8_0 weights."""
    for module in model.modules():
        if isinstance(module, torch.nn.Linear):
            module.register_forward_pre_hook(lambda _, inputs: (round_q8_0(inputs[0], group_size),))


@pytest.mark.skipif(not HAS_ENGINE, reason="the Rust extension llama2rnn._llama2rnn is not built")
def test_engine_matches_torch_memory_model(tmp_path: Path) -> None:
    cfg = Config(
        dim=64,
        hidden_dim=128,
        n_layers=2,
        n_heads=4,
        n_kv_heads=2,
        vocab_size=97,
        seq_len=64,
        mem_len=8,
    )
    path = tmp_path / "memory.bin"
    write_llama2rnn(path, cfg, random_weights(cfg, seed=11))
    _, read_cfg, dequantized, group_size = read_checkpoint(path)
    assert group_size is not None
    # 4.5 chunks, so the engine hands memory over four times.
    tokens = np.random.default_rng(4).integers(0, cfg.vocab_size, 36).tolist()
    actual = engine_logits(path, tokens)

    # The PyTorch model on the dequantized weights: the engine also rounds every matmul
    # input to Q8_0, which moves these random-weight logits by about 3% RMS.
    model = model_from_weights(read_cfg, dequantized)
    expected = torch_logits(model, tokens)
    rms = np.sqrt(np.mean(expected**2))
    assert np.sqrt(np.mean((actual - expected) ** 2)) < 0.06 * rms

    # With the same input rounding the results agree up to float summation order. The
    # tolerance leaves room for an input that lands on a rounding boundary on one side only.
    quantize_linear_inputs(model, group_size)
    expected_rounded = torch_logits(model, tokens)
    np.testing.assert_allclose(
        actual, expected_rounded, rtol=0, atol=2e-3 * np.abs(expected_rounded).max()
    )


@pytest.mark.skipif(not HAS_ENGINE, reason="the Rust extension llama2rnn._llama2rnn is not built")
def test_engine_matches_torch_baseline_fp32(tmp_path: Path) -> None:
    cfg = Config(
        dim=64,
        hidden_dim=128,
        n_layers=2,
        n_heads=4,
        n_kv_heads=2,
        vocab_size=97,
        seq_len=40,
        mem_len=0,
    )
    weights = random_weights(cfg, seed=12)
    path = tmp_path / "plain.bin"
    write_llama2c_v1(path, cfg, weights)
    tokens = np.random.default_rng(5).integers(0, cfg.vocab_size, 40).tolist()
    expected = torch_logits(model_from_weights(cfg, weights), tokens)
    actual = engine_logits(path, tokens)
    np.testing.assert_allclose(actual, expected, rtol=1e-4, atol=1e-4 * np.abs(expected).max())


@pytest.mark.skipif(not HAS_ENGINE, reason="the Rust extension llama2rnn._llama2rnn is not built")
def test_export_seq_len_past_training(tmp_path: Path) -> None:
    cfg = Config(
        dim=64,
        hidden_dim=128,
        n_layers=2,
        n_heads=4,
        n_kv_heads=4,
        vocab_size=97,
        seq_len=16,
        mem_len=0,
    )
    weights = random_weights(cfg, seed=13)
    path = tmp_path / "plain-long.bin"
    export_model(model_from_weights(cfg, weights), path, format="llama2c-v1", seq_len=48)
    _, read_cfg, _, _ = read_checkpoint(path)
    assert read_cfg.seq_len == 48
    tokens = np.random.default_rng(6).integers(0, cfg.vocab_size, 40).tolist()
    long_cfg = dataclasses.replace(cfg, seq_len=48)
    expected = torch_logits(model_from_weights(long_cfg, weights), tokens)
    actual = engine_logits(path, tokens)
    np.testing.assert_allclose(actual, expected, rtol=1e-4, atol=1e-4 * np.abs(expected).max())
    with pytest.raises(ValueError, match="seq_len must be positive"):
        export_model(model_from_weights(cfg, weights), path, seq_len=0)
