import sys, time, json, torch
sys.path.insert(0, "scripts"); sys.path.insert(0, "benchmarks")
from pathlib import Path
from train_gpu import build_model
from serve_load import confine_output_head
from snaketune.serve import ChatModel, SamplingSettings
folder = Path(json.loads(build_model("qwen2.5-0.5b", Path("/tmp/diagm")).read_text())["path"])
confine_output_head(folder)
chat = ChatModel(folder, name="x")
msgs = [{"role": "user", "content": "你好"}]
chat.complete(msgs, SamplingSettings(8, temperature=0))
t = time.perf_counter(); s0 = chat.engine.steps
out = chat.complete(msgs, SamplingSettings(64, temperature=0))
dt = time.perf_counter() - t
print(json.dumps({"engine_1req_tok_s": round(64 / dt, 1), "steps": chat.engine.steps - s0, "text_len": len(out)}))
ids = torch.tensor([chat.prompt_ids(msgs)], device="cuda")
m = chat.engine.model
m.generate(ids, max_new_tokens=8, do_sample=False)
torch.cuda.synchronize(); t = time.perf_counter()
g = m.generate(ids, max_new_tokens=64, min_new_tokens=64, do_sample=False)
torch.cuda.synchronize(); print(json.dumps({"hf_generate_tok_s": round(64 / (time.perf_counter() - t), 1), "same": chat.engine.tokenizer.decode(g[0, ids.shape[1]:], skip_special_tokens=True) == out}))
import cProfile, pstats
from snaketune.batching import Engine, Request
eng = Engine(m, chat.engine.tokenizer, "cuda")
req = Request(chat.prompt_ids(msgs), SamplingSettings(64, temperature=0), lambda e: None)
with torch.inference_mode():
    eng.prefill(req)
    torch.cuda.synchronize(); t = time.perf_counter()
    pr = cProfile.Profile(); pr.enable()
    for _ in range(40):
        eng.decode()
    torch.cuda.synchronize(); pr.disable()
print(json.dumps({"decode_step_ms": round((time.perf_counter() - t) / 40 * 1000, 2)}))
pstats.Stats(pr).sort_stats("tottime").print_stats(15)
