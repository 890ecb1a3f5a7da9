"""The fast training path gives the reference path's numbers: padding-free batches, packs sized in tokens, the
fused head + cross-entropy, and rows memory-mapped from Arrow, on the tiny model with real tokenized rows."""

import json
import math

import pandas as pd
import pytest
import torch
from test_train import FAST, built, losses, run_train  # noqa: F401  (built is a fixture)

from snaketune.errors import UserError
from snaketune.settings import TrainSettings
from snaketune.train.fused_loss import install, linear_cross_entropy
from snaketune.train.model_setup import resolve_speedups
from snaketune.train.packing import balance_step, flatten_rows, register_varlen_attention
from snaketune.train.token_rows import TokenRows


@pytest.fixture(scope="module")
def rows(built):  # noqa: F811
    _, data = built
    frame = pd.read_parquet(data / "train.parquet", columns=["input_ids", "labels"])
    return [{"input_ids": list(map(int, i)), "labels": list(map(int, lab))}
            for i, lab in zip(frame["input_ids"], frame["labels"], strict=True)]


@pytest.fixture(scope="module")
def model(built):  # noqa: F811
    from transformers import AutoModelForCausalLM

    manifest, _ = built
    torch.manual_seed(0)
    return AutoModelForCausalLM.from_pretrained(manifest.parent, dtype=torch.float32, attn_implementation="sdpa")


def padded(batch):
    width = max(len(r["input_ids"]) for r in batch)
    ids = torch.tensor([r["input_ids"] + [0] * (width - len(r["input_ids"])) for r in batch])
    labels = torch.tensor([r["labels"] + [-100] * (width - len(r["labels"])) for r in batch])
    mask = torch.tensor([[1] * len(r["input_ids"]) + [0] * (width - len(r["input_ids"])) for r in batch])
    return {"input_ids": ids, "labels": labels, "attention_mask": mask}


def loss_and_grads(model, batch):
    model.zero_grad()
    loss = model(**batch).loss
    loss.backward()
    return loss.item(), {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}


def test_a_steps_rows_are_dealt_into_packs_of_even_tokens_each_row_once():
    import numpy as np

    lengths = np.clip(np.random.default_rng(0).lognormal(np.log(300), 0.8, 64).astype(int), 16, 2048)
    rows = list(range(100, 164))  # the step's row indices; lengths[i] belongs to rows[i]
    packs = balance_step(rows, lengths, 8)
    assert sorted(i for pack in packs for i in pack) == rows
    tokens = [sum(int(lengths[i - 100]) for i in pack) for pack in packs]
    assert tokens == sorted(tokens, reverse=True)  # fullest first
    assert max(tokens) - sum(tokens) / 8 < max(lengths)  # longest first into the emptiest pack
    by_count = [int(lengths[i:i + 8].sum()) for i in range(0, 64, 8)]  # the padded run's micro-batches
    assert max(tokens) / min(tokens) < 1.1 < max(by_count) / min(by_count)
    assert all(pack == sorted(pack) for pack in packs)  # each keeps the step's order
    assert [len(p) for p in balance_step([7, 8, 9], [5, 5, 5], 3)] == [1, 1, 1]  # no pack empty
    with pytest.raises(ValueError, match="2 rows cannot fill 3 packs"):
        balance_step([1, 2], [5, 5], 3)


@pytest.mark.parametrize("processes", [1, 2])
def test_token_packs_hold_each_step_the_rows_of_the_padded_runs_step(processes):
    """The padded run's sampler (accelerate's, seeded with data_seed + epoch) draws the rows; the token packs of
    every process and micro-batch of a step hold exactly that step's rows, in packs of about even tokens."""
    from types import SimpleNamespace

    import numpy as np
    from accelerate.data_loader import SeedableRandomSampler

    from snaketune.train.data import step_packs_sampler

    n, batch, accumulation = 203, 4, 3
    lengths = np.random.default_rng(1).integers(10, 300, n)
    step_rows = batch * accumulation * processes
    for epoch in (0, 1):
        padded = SeedableRandomSampler(range(n), data_seed=42)
        padded.set_epoch(epoch)
        order = list(padded)
        samplers = []
        for rank in range(processes):
            args = SimpleNamespace(world_size=processes, process_index=rank, per_device_train_batch_size=batch,
                                   gradient_accumulation_steps=accumulation, data_seed=42, dataloader_drop_last=False)
            samplers.append(step_packs_sampler(SimpleNamespace(lengths=lengths), args))
            samplers[-1].set_epoch(epoch)
        packs = [list(sampler) for sampler in samplers]
        steps = math.ceil(n / step_rows)
        assert all(len(p) == len(sampler) == steps * accumulation for p, sampler in zip(packs, samplers, strict=True))
        for step in range(steps - 1):  # the last step of an epoch holds the rest
            mine = [pack for rank_packs in packs for pack in rank_packs[step * accumulation:(step + 1) * accumulation]]
            assert sorted(i for pack in mine for i in pack) == sorted(order[step * step_rows:(step + 1) * step_rows])
            tokens = [int(lengths[pack].sum()) for pack in mine]
            assert max(tokens) - min(tokens) < lengths.max()
        last = [i for rank_packs in packs for pack in rank_packs[(steps - 1) * accumulation:] for i in pack]
        assert sorted(last) == sorted(order[(steps - 1) * step_rows:])


def test_a_padding_free_batch_gives_the_padded_batch_loss_and_gradients(model, rows):
    batch = rows[:8]
    assert len({len(r["input_ids"]) for r in batch}) > 1  # rows of different lengths: the padded batch pads
    flat = flatten_rows(batch)
    assert flat["input_ids"].shape == (1, sum(len(r["input_ids"]) for r in batch))
    assert flat["position_ids"][0].tolist() == [p for r in batch for p in range(len(r["input_ids"]))]
    reference_loss, reference_grads = loss_and_grads(model, padded(batch))
    loss, grads = loss_and_grads(model, flat)
    assert loss == pytest.approx(reference_loss, abs=1e-5)
    assert grads.keys() == reference_grads.keys()
    for name, grad in grads.items():
        torch.testing.assert_close(grad, reference_grads[name], atol=1e-5, rtol=1e-4, msg=name)


@pytest.mark.parametrize("attention", ["sdpa", "eager", "varlen"])
def test_no_token_attends_to_another_row_of_its_pack(built, rows, attention):  # noqa: F811
    from transformers import AutoModelForCausalLM

    register_varlen_attention()
    manifest, _ = built
    model = AutoModelForCausalLM.from_pretrained(manifest.parent, dtype=torch.float32, attn_implementation=attention)
    first, second = rows[0], rows[1]
    changed = {"input_ids": [(t + 7) % 100 + 3 for t in first["input_ids"]], "labels": first["labels"]}
    with torch.no_grad():
        logits = model(**{k: v for k, v in flatten_rows([first, second]).items() if k != "labels"}).logits
        other = model(**{k: v for k, v in flatten_rows([changed, second]).items() if k != "labels"}).logits
        alone = model(input_ids=torch.tensor([second["input_ids"]])).logits
    n = len(first["input_ids"])
    assert not torch.allclose(logits[0, :n], other[0, :n])  # the first row did change
    torch.testing.assert_close(logits[0, n:], other[0, n:], atol=1e-5, rtol=1e-5)  # the second did not see it
    torch.testing.assert_close(logits[0, n:], alone[0], atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("head_trains", [False, True])
def test_the_fused_loss_equals_the_plain_loss_and_gradients(built, rows, head_trains, monkeypatch):  # noqa: F811
    from transformers import AutoModelForCausalLM

    from snaketune.train import fused_loss

    monkeypatch.setattr(fused_loss, "CHUNK_LOGITS_BYTES", 1)  # chunks of 64 rows: the batch spans several
    manifest, _ = built
    model = AutoModelForCausalLM.from_pretrained(manifest.parent, dtype=torch.float32).train()
    for name, parameter in model.named_parameters():
        parameter.requires_grad = head_trains or "lm_head" not in name and "embed_tokens" not in name
    batch = flatten_rows(rows[:6])
    reference_loss, reference_grads = loss_and_grads(model, batch)
    assert install(model, "chunked") == "chunked"
    output = model(**batch)
    assert output.logits is None  # the full-vocabulary logits were never made
    loss, grads = loss_and_grads(model, batch)
    assert (batch["labels"] != -100).sum() > fused_loss.chunk_rows_for(model.config.vocab_size)  # two chunks or more
    assert loss == pytest.approx(reference_loss, abs=1e-5)
    assert grads.keys() == reference_grads.keys() and any("embed_tokens" in n for n in grads) == head_trains
    for name, grad in grads.items():
        torch.testing.assert_close(grad, reference_grads[name], atol=1e-5, rtol=1e-4, msg=name)
    model.eval()
    assert model(**batch).logits is not None  # evaluation keeps the plain forward


def test_the_fused_loss_divides_by_the_tokens_of_the_whole_accumulated_batch():
    torch.manual_seed(0)
    hidden = torch.randn(1, 40, 16, requires_grad=True)
    weight = torch.randn(300, 16)
    labels = torch.randint(0, 300, (1, 40))
    labels[0, :10] = -100
    mean = linear_cross_entropy(hidden, weight, labels)
    summed = linear_cross_entropy(hidden, weight, labels, num_items_in_batch=torch.tensor(100))
    assert summed.item() == pytest.approx(mean.item() * 30 / 100, rel=1e-5)  # labels 10..39 are targets


def test_with_the_host_counted_targets_the_fused_loss_never_waits_for_the_gpu(rows):
    """On tensors without data (torch's fake tensors), any step that needs a value from the device raises: the
    fused loss runs forward and backward there once the collator has counted the targets on the host."""
    from torch._subclasses.fake_tensor import DataDependentOutputException, DynamicOutputShapeException, FakeTensorMode

    batch = flatten_rows(rows[:6], count_targets=True)
    assert batch["num_targets"] == int((batch["labels"][0, 1:] != -100).sum())
    torch.manual_seed(0)
    hidden = torch.randn(1, batch["labels"].shape[1], 16, requires_grad=True)
    weight = torch.randn(300, 16)
    labels = torch.where(batch["labels"] == -100, -100, batch["labels"] % 300)  # the token ids fit the head
    expected = linear_cross_entropy(hidden, weight, labels)
    assert linear_cross_entropy(hidden, weight, labels, num_targets=batch["num_targets"]).item() == \
        pytest.approx(expected.item(), rel=1e-6)
    mode = FakeTensorMode()
    with mode:
        fake = [mode.from_tensor(t) for t in (hidden, weight, labels)]
        linear_cross_entropy(*fake, num_targets=batch["num_targets"]).backward()
        with pytest.raises((DynamicOutputShapeException, DataDependentOutputException)):  # counting there waits
            linear_cross_entropy(*fake)


def test_packed_rows_under_varlen_attention_build_no_mask_from_the_positions(built, rows, monkeypatch):  # noqa: F811
    """transformers reads the position ids back from the GPU to find packed rows when the attention has a mask
    function; the varlen attention has none, so no forward waits for that."""
    import transformers.masking_utils
    from transformers import AutoModelForCausalLM

    def waits(*args, **kwargs):
        raise AssertionError("the forward asked the device for the packed rows")

    register_varlen_attention()
    monkeypatch.setattr(transformers.masking_utils, "find_packed_sequence_indices", waits)
    model = AutoModelForCausalLM.from_pretrained(built[0].parent, dtype=torch.float32, attn_implementation="varlen")
    with torch.no_grad():
        assert model(**{k: v for k, v in flatten_rows(rows[:3]).items() if k != "labels"}).logits.isfinite().all()


def test_the_fast_path_trains_with_the_reference_loss_at_every_step(built, tmp_path):  # noqa: F811
    common = {**FAST, "max_steps": 12, "logging_steps": 1, "per_device_train_batch_size": 4,
              "gradient_accumulation_steps": 2}
    run_train(built, tmp_path / "reference", {**common, "packing": False, "fused_loss": "none"})
    run_train(built, tmp_path / "fast", {**common, "packing": "rows", "fused_loss": "chunked",
                                         "attention": "varlen"})
    reference, fast = losses(tmp_path / "reference"), losses(tmp_path / "fast")
    assert len(reference) == len(fast) == 12
    assert (reference["loss"] - fast["loss"]).abs().max() < 1e-4
    summary = json.loads((tmp_path / "fast" / "train_summary.json").read_text())
    assert summary["speedups"] == {"packing": "rows", "attention": "varlen", "fused_loss": "chunked",
                                   "liger_kernels": False, "torch_compile": False}
    reference_summary = json.loads((tmp_path / "reference" / "train_summary.json").read_text())
    assert summary["tokens_seen"] == reference_summary["tokens_seen"] > 0  # tokens/s counts real tokens alike


@pytest.mark.parametrize("method, accumulation", [("lora", 1), ("lora", 3), ("qlora", 3), ("full", 3)])
def test_token_packs_train_with_the_padded_runs_loss_at_every_step(built, tmp_path, method,  # noqa: F811
                                                                   accumulation):
    """Issue 17: a loss curve equal to the padded run's with packs sized in tokens (same data, same seed)."""
    common = {**FAST, "method": method, "max_steps": 15, "logging_steps": 1, "per_device_train_batch_size": 4,
              "gradient_accumulation_steps": accumulation, "learning_rate": 0.003 if method == "full" else 0.01}
    run_train(built, tmp_path / "padded", {**common, "packing": False})
    run_train(built, tmp_path / "tokens", {**common, "packing": "tokens"})
    padded, tokens = losses(tmp_path / "padded"), losses(tmp_path / "tokens")
    assert len(padded) == len(tokens) == 15
    assert (padded["loss"] - tokens["loss"]).abs().max() < 1e-4
    assert tokens["loss"].iloc[-1] < 0.8 * tokens["loss"].iloc[0]
    summary = json.loads((tmp_path / "tokens" / "train_summary.json").read_text())
    assert summary["speedups"]["packing"] == "tokens"
    # an epoch has the padded run's optimizer steps, so the schedule and batch size keep their meaning
    steps = math.ceil(summary["train_rows"] / (4 * accumulation))
    assert summary["train_batches_per_epoch_per_process"] == steps * accumulation


def test_a_remote_code_model_keeps_the_plain_path_and_refuses_an_explicit_fast_one():
    plain = resolve_speedups(TrainSettings(), native=False)
    assert (plain.packing, plain.fused_loss, plain.liger_kernels) == (False, "none", False)
    with pytest.raises(UserError, match="packing: tokens, fused_loss: chunked needs a model on transformers' own"):
        resolve_speedups(TrainSettings(packing="tokens", fused_loss="chunked"), native=False)
    with pytest.raises(UserError, match="packing `off ` is not one of auto, tokens, rows, False"):
        TrainSettings(packing="off ")


def test_token_rows_are_the_parquet_rows_memory_mapped(built, tmp_path):  # noqa: F811
    import pyarrow as pa

    _, data = built
    frame = pd.read_parquet(data / "train.parquet", columns=["input_ids", "labels"])
    TokenRows(data / "train.parquet", tmp_path / "train.arrow")  # converts
    before = pa.total_allocated_bytes()
    token_rows = TokenRows(data / "train.parquet", tmp_path / "train.arrow")  # maps the file written
    allocated = pa.total_allocated_bytes() - before
    assert len(token_rows) == len(frame) and (tmp_path / "train.arrow").is_file()
    for index in (0, len(frame) // 2, len(frame) - 1):
        assert token_rows[index] == {"input_ids": frame["input_ids"][index].tolist(),
                                     "labels": frame["labels"][index].tolist()}
    assert token_rows.lengths.tolist() == frame["input_ids"].map(len).tolist()
    # no token copied into Arrow's memory: the pool holds the row lengths (int32) and little else
    assert allocated <= 4 * len(frame) + 1024 < (tmp_path / "train.arrow").stat().st_size / 10


@pytest.fixture
def on_a_gpu(monkeypatch):
    """What the auto settings see on a GPU machine with liger-kernel absent: torch reports CUDA, varlen exists."""
    from snaketune.train import fused_loss, packing

    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(packing, "varlen_available", lambda: True)
    monkeypatch.setattr(fused_loss, "liger_available", lambda: False)


@pytest.mark.parametrize("method, precision, expected", [
    ("lora", "bf16", ("tokens", "varlen", "chunked", False, True)),
    ("lora", "fp32", ("tokens", "flex_attention", "chunked", False, True)),
    ("qlora", "bf16", ("tokens", "varlen", "chunked", False, True)),
    ("full", "bf16", ("tokens", "varlen", "chunked", False, False)),
])
def test_auto_picks_the_measured_fast_path_on_a_gpu(on_a_gpu, method, precision, expected):
    chosen = resolve_speedups(TrainSettings(method=method), native=True, precision=precision)
    assert (chosen.packing, chosen.attention, chosen.fused_loss, chosen.liger_kernels,
            chosen.torch_compile) == expected
    with pytest.raises(UserError, match="liger_kernels: true needs a CUDA GPU and the liger-kernel package"):
        resolve_speedups(TrainSettings(method=method, liger_kernels=True, torch_compile=False), native=True)
    with pytest.raises(UserError, match="attention: varlen needs padding-free batches"):
        resolve_speedups(TrainSettings(method=method, packing=False, attention="varlen"), native=True)


@pytest.mark.parametrize("gpu_gib, expected", [(80.0, False), (0.05, True)])
def test_auto_checkpointing_is_on_only_where_the_plan_does_not_fit_the_gpu(
        on_a_gpu, monkeypatch, built, gpu_gib, expected):  # noqa: F811
    from types import SimpleNamespace

    from snaketune.train.model_setup import needs_checkpointing

    gpu = SimpleNamespace(total_memory=gpu_gib * 2**30)
    monkeypatch.setattr(torch.cuda, "get_device_properties", lambda index: gpu)
    manifest, data = built
    split = data / "train.parquet"
    assert needs_checkpointing(TrainSettings(), manifest.parent, split) is expected
    assert needs_checkpointing(TrainSettings(gradient_checkpointing=True), manifest.parent, split) is True


def test_token_rows_convert_again_when_the_split_is_newer_than_their_copy(built, tmp_path):  # noqa: F811
    import os

    _, data = built
    frame = pd.read_parquet(data / "train.parquet", columns=["input_ids", "labels"])
    split = tmp_path / "train.parquet"
    frame.head(5).to_parquet(split)
    assert len(TokenRows(split, tmp_path / "train.arrow")) == 5
    frame.head(7).to_parquet(split)
    later = (tmp_path / "train.arrow").stat().st_mtime + 10
    os.utime(split, (later, later))
    assert len(TokenRows(split, tmp_path / "train.arrow")) == 7
