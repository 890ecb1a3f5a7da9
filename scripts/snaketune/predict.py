"""Predict stage: batched generation on the test split into ``predictions.csv``.

Prompts are the ones the dataset stage rendered with the model's chat template, so inference sees exactly
what training saw. Batches are sorted by length and left-padded so each batch wastes little compute.
"""

from __future__ import annotations

import csv
import os
import sys
import time
from dataclasses import replace
from pathlib import Path

from snaketune.settings import GenerationSettings

PREDICTION_COLUMNS = ["id", "prompt", "reference", "prediction", "generation_seconds"]
AUTO_BATCH_LIMIT = {"cuda": 512, "cpu": 128}  # rows: a GPU's decoding step costs about the same for 1 or 500
# rows; the CPU computes every padded position, so smaller, tighter length-sorted batches serve it better


def source_columns(sources, ours=PREDICTION_COLUMNS):
    """The test rows' original fields as columns (nested values as JSON), for people reading predictions.csv
    beside their data; a field named like one of ``ours`` gets a ``source_`` prefix."""
    import json

    import pandas as pd

    rows = [json.loads(text) if text else {} for text in sources]
    frame = pd.DataFrame([{key: value if isinstance(value, str | int | float | bool) or value is None
                           else json.dumps(value, ensure_ascii=False) for key, value in row.items()} for row in rows])
    return frame.rename(columns=lambda c: f"source_{c}" if c in set(ours) else c)


def compute_dtype(wanted: str = "auto", gpu: bool | None = None):
    """The torch dtype generation and exams compute in: ``wanted``, or for ``auto`` float32 on a CPU (bf16 there
    is emulated, slow, and its rounding ties the exam's letter scores) and bf16 on a GPU (float16 where it has no
    bf16)."""
    import torch

    if wanted != "auto":
        return getattr(torch, wanted)
    if gpu is None:
        gpu = torch.cuda.is_available()
    if not gpu:
        return torch.float32
    return torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16


def load_for_generation(model_dir: Path, adapter_dir: Path | None, trust_remote_code: bool = False,
                        dtype: str = "auto"):
    """Tokenizer (left padding) and model in eval mode, in ``compute_dtype(dtype)``: a merged folder, or a base
    with its adapter applied. A vision-language folder loads as transformers' image-text-to-text model."""
    from transformers import AutoModelForCausalLM, AutoModelForImageTextToText, AutoTokenizer

    from snaketune.vision import family_of

    auto_class = AutoModelForImageTextToText if family_of(model_dir) else AutoModelForCausalLM

    tokenizer = AutoTokenizer.from_pretrained(adapter_dir or model_dir, padding_side="left",
                                              trust_remote_code=trust_remote_code)
    torch_dtype = compute_dtype(dtype)
    print(f"computing in {torch_dtype}", file=sys.stderr)
    model = auto_class.from_pretrained(model_dir, dtype=torch_dtype, trust_remote_code=trust_remote_code)
    if adapter_dir is not None and (adapter_dir / "adapter_config.json").is_file():
        from peft import PeftModel

        model = PeftModel.from_pretrained(model, adapter_dir)
    elif adapter_dir is not None:  # a full fine-tune: the "adapter" folder holds the whole model
        model = auto_class.from_pretrained(adapter_dir, dtype=torch_dtype, trust_remote_code=trust_remote_code)
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    return tokenizer, model.eval()


def image_prompts(tokenizer, prompts: list[str], images: list[list[str]], vision):
    """Left-padded ids of prompts whose image tokens are expanded for their images, the attention mask, and the
    images (decoded once, in row order)."""
    import torch

    from snaketune.vision import prompt_with_images

    rows, decoded = [], []
    for prompt, refs in zip(prompts, images, strict=True):
        ids, row_images = prompt_with_images(vision, tokenizer(prompt, add_special_tokens=False)["input_ids"], refs)
        rows.append(ids)
        decoded += row_images
    width = max(len(row) for row in rows)
    input_ids = torch.tensor([[tokenizer.pad_token_id] * (width - len(row)) + row for row in rows])
    mask = torch.tensor([[0] * (width - len(row)) + [1] * len(row) for row in rows])
    return input_ids, mask, decoded


def generate_batch(model, tokenizer, prompts: list[str], settings: GenerationSettings, device,
                   images: list[list[str]] | None = None, vision=None) -> list[str]:
    """Greedy (or sampled) continuations of left-padded prompts, decoded without special tokens. ``images``: each
    prompt's images, for a vision-language model (``vision``: its ImageInputs)."""
    import torch

    if images is not None and any(images):
        from snaketune.vision import model_image_inputs

        input_ids, mask, decoded = image_prompts(tokenizer, prompts, images, vision)
        extra = model_image_inputs(vision, input_ids, decoded, token_types=False)
        inputs = {"input_ids": input_ids.to(device), "attention_mask": mask.to(device),
                  **{key: value.to(device) for key, value in extra.items()}}
        settings = replace(settings, decoder="generate")  # the one decoder that feeds pixels to the prefill
    else:
        inputs = tokenizer(prompts, return_tensors="pt", padding=True, add_special_tokens=False).to(device)
    with torch.no_grad():
        if settings.decoder == "generate" or settings.do_sample:
            sampling = {"temperature": settings.temperature, "top_p": settings.top_p} if settings.do_sample else {}
            output = model.generate(**inputs, max_new_tokens=settings.max_new_tokens, do_sample=settings.do_sample,
                                    pad_token_id=tokenizer.pad_token_id, use_cache=True, **sampling)
            new = output[:, inputs["input_ids"].shape[1]:]
        else:
            new = greedy_tokens(model, inputs["input_ids"], inputs["attention_mask"], settings.max_new_tokens,
                                tokenizer.pad_token_id)
    return [text.strip() for text in tokenizer.batch_decode(new, skip_special_tokens=True)]


GROUPED_DECODE = "grouped_decode"  # attention for decoding steps (see grouped_decode_attention)


def grouped_decode_attention(module, query, key, value, attention_mask, dropout: float = 0.0, scaling=None,
                             **kwargs):
    """transformers' sdpa attention, except for a decoding step (one query position): there the query heads that
    share a key/value head are multiplied with it as a group, two matmuls and a softmax in float32.

    With padded rows (a mask), sdpa would first copy the keys and values once per query head (grouped-query
    models), then run a kernel that pads the single query to a 64-row tile: on an H100 those two took half of
    the decoding time of 500 rows (benchmarks/README.md). Sliding windows and soft-capped scores go to sdpa.
    """
    import torch
    from transformers.integrations.sdpa_attention import sdpa_attention_forward

    if query.shape[2] != 1 or kwargs.get("sliding_window") or kwargs.get("softcap") or dropout:
        return sdpa_attention_forward(module, query, key, value, attention_mask, dropout=dropout, scaling=scaling,
                                      **kwargs)
    batch, heads, _, dim = query.shape
    grouped = query.view(batch, key.shape[1], heads // key.shape[1], dim)
    scores = torch.matmul(grouped, key.transpose(-1, -2)) * (dim**-0.5 if scaling is None else scaling)
    if attention_mask is not None:
        mask = attention_mask[..., : key.shape[-2]]  # (batch, 1, 1, keys): broadcast over the groups
        scores = scores.masked_fill(~mask, float("-inf")) if mask.dtype == torch.bool else scores + mask
    weights = torch.softmax(scores, dim=-1, dtype=torch.float32).to(value.dtype)
    return torch.matmul(weights, value).reshape(batch, 1, heads, dim), None


def use_grouped_decode(model) -> bool:
    """Switch a model on transformers' sdpa attention to ``grouped_decode_attention``; False where it is not."""
    from transformers import AttentionInterface
    from transformers.masking_utils import AttentionMaskInterface, sdpa_mask

    base = model.get_base_model() if hasattr(model, "get_base_model") else model
    if getattr(base.config, "_attn_implementation", None) != "sdpa":
        return False
    AttentionInterface.register(GROUPED_DECODE, grouped_decode_attention)
    AttentionMaskInterface.register(GROUPED_DECODE, sdpa_mask)
    try:
        base.set_attn_implementation(GROUPED_DECODE)
    except (ValueError, ImportError, AttributeError):  # remote code, or a model that fixes its attention
        return False
    return True


STOP_CHECK_EVERY = 8  # decoding steps between checks that every row has ended (each check waits for the GPU)
PREFILL_TOKENS = 16_384  # prompt positions (padding included) each prefill pass reads at most


def prefill(model, input_ids, mask, positions, budget: int = PREFILL_TOKENS):
    """Read the prompts into a KV cache and return it with the logits of each row's last position.

    The rows of a batch are sorted by length (``predict`` sorts them), so consecutive rows have prompts of about
    the same length: they are read a chunk of ``budget`` positions at a time, each chunk cut to its own longest
    prompt, and the chunks' caches are left-padded (zeros, masked out) into the one cache the decoding steps share.
    A batch of hundreds of rows then reads its short prompts without the long ones' padding. Models whose cache is
    not plain per-layer keys and values (sliding windows, ...) read the whole batch in one pass.
    """
    import torch
    from transformers import DynamicCache
    from transformers.cache_utils import DynamicLayer

    width = input_ids.shape[1]
    rows = max(1, budget // width)
    if not all(type(layer) is DynamicLayer for layer in DynamicCache(config=model.config).layers):
        rows = len(input_ids)  # chunks' caches can be joined only where every layer keeps all its keys and values
    chunks = [slice(start, start + rows) for start in range(0, len(input_ids), rows)]
    caches, logits = [], []
    for chunk in chunks:
        cut = width - int(mask[chunk].sum(-1).max()) if len(chunks) > 1 else 0
        cache = DynamicCache(config=model.config)
        logits.append(model(input_ids=input_ids[chunk, cut:], attention_mask=mask[chunk, cut:],
                            position_ids=positions[chunk, cut:], past_key_values=cache, use_cache=True,
                            logits_to_keep=1).logits[:, -1])
        caches.append((cut, cache))
    if len(caches) == 1:
        return caches[0][1], logits[0]
    joined = DynamicCache(config=model.config)
    for index in range(len(caches[0][1].layers)):
        keys, values = ([torch.nn.functional.pad(getattr(cache.layers[index], name), (0, 0, cut, 0))
                         for cut, cache in caches] for name in ("keys", "values"))
        for _, cache in caches:  # free each chunk's tensors as they are joined
            cache.layers[index].keys = cache.layers[index].values = None
        joined.update(torch.cat(keys), torch.cat(values), index)
    return joined, torch.cat(logits)


def greedy_tokens(model, input_ids, attention_mask, max_new_tokens: int, pad_token_id: int,
                  prefill_tokens: int = PREFILL_TOKENS, static: bool | None = None):
    """The greedy tokens ``model.generate`` gives for left-padded rows (same positions, mask, cache and end of
    row: the generation config's eos ids, then padding), from a loop that does only that: it reads the prompts in
    chunks of similar length (``prefill``), asks for the last position's logits alone and waits for the GPU once
    every STOP_CHECK_EVERY steps instead of at every step.

    ``static`` (None: on a GPU, where every layer keeps all its keys and values): the decoding steps write into a
    preallocated cache (``StaticSteps``), so a step has one shape and address for the whole batch and on a GPU is
    captured once as a CUDA graph and replayed; otherwise the cache grows a step at a time."""
    import torch

    eos = model.generation_config.eos_token_id
    eos = torch.tensor([eos] if isinstance(eos, int) else list(eos or []), device=input_ids.device)
    mask = attention_mask
    positions = (mask.long().cumsum(-1) - 1).masked_fill_(mask == 0, 1)
    cache, logits = prefill(model, input_ids, mask, positions, prefill_tokens)
    steps = StaticSteps.make(model, cache, mask, positions, max_new_tokens, static)
    ended = torch.zeros(len(input_ids), dtype=torch.bool, device=input_ids.device)
    tokens = []
    for step in range(max_new_tokens):
        token = logits.float().argmax(-1).masked_fill_(ended, pad_token_id)
        tokens.append(token)
        ended |= torch.isin(token, eos)
        if step + 1 == max_new_tokens or (step + 1) % STOP_CHECK_EVERY == 0 and bool(ended.all()):
            break
        if steps is not None:
            logits = steps(token)
            continue
        mask = torch.cat([mask, mask.new_ones(len(mask), 1)], dim=1)
        positions = positions[:, -1:] + 1
        logits = model(input_ids=token[:, None], attention_mask=mask, position_ids=positions, past_key_values=cache,
                       use_cache=True, logits_to_keep=1).logits[:, -1]
    return torch.stack(tokens, dim=1)


class StaticSteps:
    """Decoding steps over a preallocated cache: the prefill's keys and values copied into transformers'
    ``StaticCache`` (room for every new token), and a 4D mask, the token and the positions in buffers that each
    step updates in place. Every step then runs the same kernels on the same addresses, so on a GPU the step is
    captured once as a CUDA graph and replayed: a decoding step of a small model is otherwise mostly the CPU
    launching a few hundred small kernels (benchmarks/README.md, issue 36). The new positions are masked until
    their step, so the answers are the growing cache's."""

    def __init__(self, model, cache, mask, positions, width: int, graphs: bool):
        import torch

        self.model, self.cache, self.graphs, self.graph = model, cache, graphs, None
        self.width, self.column = width, width
        total = cache.layers[0].max_cache_len
        self.mask = torch.zeros(len(mask), 1, 1, total, dtype=torch.bool, device=mask.device)
        self.mask[:, 0, 0, :width] = mask.bool()
        self.token = torch.zeros(len(mask), 1, dtype=torch.long, device=mask.device)
        self.positions = positions[:, -1:].clone()

    @classmethod
    def make(cls, model, dynamic, mask, positions, max_new_tokens: int, static: bool | None):
        """The steps for this batch, or None where the growing cache is used: ``static`` False, or None on a CPU,
        or a model whose layers keep a window of keys (or other state) rather than all of them."""
        import torch
        from transformers import StaticCache
        from transformers.cache_utils import DynamicLayer, StaticLayer

        gpu = mask.device.type == "cuda"
        if static is False or (static is None and not gpu) or max_new_tokens < 2:
            return None
        width = mask.shape[1]
        cache = StaticCache(config=model.config, max_cache_len=width + max_new_tokens)
        grown_layers = getattr(dynamic, "layers", None) or []
        filled = [type(layer) is DynamicLayer and getattr(layer, "keys", None) is not None for layer in grown_layers]
        if not all(type(layer) is StaticLayer for layer in cache.layers) or len(grown_layers) != len(cache.layers) or \
                not all(filled):
            return None  # sliding windows, or a model that did not fill the cache it was given
        for layer, grown in zip(cache.layers, grown_layers, strict=True):
            layer.lazy_initialization(grown.keys, grown.values)
            layer.keys[:, :, :width].copy_(grown.keys)
            layer.values[:, :, :width].copy_(grown.values)
            layer.cumulative_length.fill_(width)
            grown.keys = grown.values = None  # the prefill's copy is freed layer by layer
        return cls(model, cache, mask, positions, width, graphs=gpu and torch.cuda.is_available())

    def forward(self):
        return self.model(input_ids=self.token, attention_mask=self.mask, position_ids=self.positions,
                          past_key_values=self.cache, use_cache=True, logits_to_keep=1).logits[:, -1]

    def __call__(self, token):
        """The logits after ``token`` (one per row), its key and value written at the next position."""
        self.token.copy_(token[:, None])
        self.positions.add_(1)
        self.mask[:, 0, 0, self.column] = True
        self.column += 1
        if not self.graphs:
            return self.forward()
        if self.graph is None:
            self.graph, self.logits = self.capture()
        self.graph.replay()
        return self.logits

    def capture(self):
        """Record one step as a CUDA graph: run it once on a side stream (as capturing requires), wind the cache
        back a position, then capture; the first replay computes that step again."""
        import torch

        side = torch.cuda.Stream()
        side.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(side):
            self.forward()
        torch.cuda.current_stream().wait_stream(side)
        for layer in self.cache.layers:
            layer.cumulative_length.sub_(1)
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph):
            logits = self.forward()
        return graph, logits


def auto_batch_size(model, longest_prompt: int, max_new_tokens: int, device: str) -> int:
    """Rows per batch for ``batch_size: auto``: as many as 70% of the free GPU memory (on the CPU, a quarter of
    the available RAM) holds, each row counted with its KV cache at full length, its prefill activations and its
    last logits, up to AUTO_BATCH_LIMIT (512 rows on a GPU, 128 on the CPU).

    A decoding step costs nearly the same for a few rows or hundreds (it reads every weight once), so the fewer,
    larger batches this gives generate the same rows in a fraction of the steps.
    """
    import os

    import torch

    config = model.config.get_text_config()
    dtype_bytes = next(model.parameters()).element_size()
    heads = config.num_attention_heads
    head_dim = getattr(config, "head_dim", None) or config.hidden_size // heads
    kv_heads = getattr(config, "num_key_value_heads", None) or heads
    kv = 2 * config.num_hidden_layers * kv_heads * head_dim * dtype_bytes * (longest_prompt + max_new_tokens)
    prefill = longest_prompt * (4 * config.hidden_size + 3 * config.intermediate_size) * dtype_bytes
    per_row = kv + prefill + 8 * config.vocab_size
    if device == "cuda":
        budget = 0.7 * torch.cuda.mem_get_info()[0]
    else:
        budget = 0.25 * os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")
    return max(1, min(AUTO_BATCH_LIMIT.get(device, AUTO_BATCH_LIMIT["cpu"]), int(budget / per_row)))


class PartialPredictions:
    """Rows already generated, appended batch by batch to ``rows_path``, so a killed job resumes.

    The rows are kept only if they came from the same model, test split and settings (a fingerprint file beside
    them, ``<rows_path>.key``, says so).
    """

    def __init__(self, rows_path: Path, fingerprint: str):
        self.rows_path = Path(rows_path)
        self.key_path = self.rows_path.with_name(self.rows_path.name + ".key")
        if not (self.key_path.exists() and self.key_path.read_text() == fingerprint):
            self.rows_path.unlink(missing_ok=True)
            self.key_path.write_text(fingerprint)

    def done(self) -> dict[str, tuple[str, float]]:
        if not self.rows_path.exists():
            return {}
        done = {}
        with self.rows_path.open(newline="", encoding="utf-8") as handle:
            try:
                for row in csv.reader(handle, strict=True):
                    if len(row) == 3:  # a row cut short by the kill has fewer cells and is generated again
                        done[row[0]] = (row[1], float(row[2]))
            except (csv.Error, ValueError):
                pass  # the kill cut the last row mid-field
        return done

    def append(self, rows: list[tuple[str, str, float]]) -> None:
        with self.rows_path.open("a", newline="", encoding="utf-8") as handle:
            csv.writer(handle, quoting=csv.QUOTE_ALL).writerows(rows)
            handle.flush()
            os.fsync(handle.fileno())

    def remove(self) -> None:
        self.rows_path.unlink(missing_ok=True)
        self.key_path.unlink(missing_ok=True)


def predict(settings: GenerationSettings, model_dir: Path, test_path: Path, out_csv: Path, partial_csv: Path,
            adapter_dir: Path | None = None, trust_remote_code: bool = False) -> int:
    """Generate an answer for every test row and write ``out_csv`` atomically; return the row count.

    Rows are generated shortest first in batches; each finished batch is appended to ``partial_csv``, so a
    restarted job generates only the rows that are missing.
    """
    import hashlib
    import json

    import pandas as pd
    import torch
    from tqdm import tqdm
    from transformers import set_seed

    from snaketune.errors import UserError
    from snaketune.io import atomic_file, sha256_file

    set_seed(settings.seed)
    tokenizer, model = load_for_generation(model_dir, adapter_dir, trust_remote_code, settings.dtype)
    device = "cuda" if torch.cuda.is_available() else "cpu"
    model.to(device)
    if settings.decoder == "greedy" and not settings.do_sample and device == "cuda":  # measured there (the CPU's
        use_grouped_decode(model)  # sdpa neither copies keys per head nor pads a query into a tile)
    import pyarrow.parquet as pq

    names = pq.read_schema(test_path).names
    wanted = ["id", "prompt", "reference"] + [name for name in ("source", "images") if name in names]
    test = pd.read_parquet(test_path, columns=wanted)
    test["id"] = test["id"].astype(str)
    vision = None
    if "images" in test:  # a vision-language build: each row's image paths (or data URLs stored in the build)
        from snaketune.vision import ImageInputs

        vision = ImageInputs.of(model_dir, tokenizer)
        if vision is None:
            raise UserError(f"{test_path}: its rows have images, and {model_dir} is a text-only model")
        test["images"] = [list(refs) for refs in test["images"]]
    fingerprint = hashlib.sha256(json.dumps(
        [vars(settings), str(model_dir.resolve()), str(adapter_dir.resolve()) if adapter_dir else None,
         sha256_file(test_path)], sort_keys=True).encode()).hexdigest()
    partial = PartialPredictions(partial_csv, fingerprint)
    predictions = {k: v for k, v in partial.done().items() if k in set(test["id"])}
    if predictions:
        print(f"resuming: {len(predictions)} of {len(test)} rows already generated", file=sys.stderr)
    todo = [i for i in range(len(test)) if test["id"][i] not in predictions]
    lengths = {i: len(tokenizer(test["prompt"][i], add_special_tokens=False)["input_ids"]) for i in todo}
    order = sorted(todo, key=lambda i: lengths[i])
    size = settings.batch_size
    if size == "auto":
        size = auto_batch_size(model, max(lengths.values(), default=1), settings.max_new_tokens, device)
        print(f"batch_size auto: {size} rows", file=sys.stderr)
    with tqdm(total=len(test), initial=len(predictions), desc="generate", unit="row", file=sys.stderr) as bar:
        start = 0
        while start < len(order):
            batch = order[start : start + size]
            began = time.perf_counter()
            try:
                texts = generate_batch(model, tokenizer, [test["prompt"][i] for i in batch], settings, device,
                                       [test["images"][i] for i in batch] if vision else None, vision)
            except torch.OutOfMemoryError:
                if size == 1 or settings.batch_size != "auto":
                    raise
                size //= 2  # the estimate was too hopeful: the same rows again, in smaller batches
                torch.cuda.empty_cache()
                print(f"out of memory: batch_size auto now {size} rows", file=sys.stderr)
                continue
            seconds = round((time.perf_counter() - began) / len(batch), 4)
            rows = [(test["id"][i], text, seconds) for i, text in zip(batch, texts, strict=True)]
            partial.append(rows)
            predictions.update({row_id: (text, sec) for row_id, text, sec in rows})
            bar.update(len(batch))
            start += len(batch)
    columns = PREDICTION_COLUMNS + (["images"] if vision else [])  # the images' paths: the report shows them
    frame = test.assign(prediction=[predictions[i][0] for i in test["id"]],
                        generation_seconds=[predictions[i][1] for i in test["id"]])[columns]
    if vision:
        frame["images"] = [json.dumps(refs) for refs in frame["images"]]
    if "source" in test:
        frame = pd.concat([frame, source_columns(test["source"], frame.columns)], axis=1)
    with atomic_file(out_csv) as tmp:
        # Quote every field: generated text can hold a bare "\r", which unquoted would split a row in two.
        # UTF-8 with a BOM: Excel on a Chinese (GBK) Windows otherwise shows the text garbled.
        frame.to_csv(tmp, index=False, quoting=csv.QUOTE_ALL, encoding="utf-8-sig")
    partial.remove()
    return len(frame)
