"""Profile a few training steps of any process that imports transformers' Trainer (the benchmarks put this folder
first on PYTHONPATH, so torchrun's workers load it too). Off unless SNAKETUNE_PROFILE names a JSON path.

    SNAKETUNE_PROFILE=out.json SNAKETUNE_PROFILE_STEPS=6-9 PYTHONPATH=benchmarks/profiling python scripts/train.py ...

Between the two steps (counted in optimizer steps) it runs torch.profiler (CPU and CUDA) and cProfile on the
main thread, then writes, from rank 0: the wall seconds per step, the summed GPU kernel time, the top operators
by GPU and by CPU time, and the top Python functions by cumulative and by own time.
"""

import importlib.abc
import importlib.util
import os
import sys

PATH = os.environ.get("SNAKETUNE_PROFILE")


def profile_callback():
    import cProfile
    import json
    import pstats
    import time

    import torch
    from transformers import TrainerCallback

    def sync():
        if torch.cuda.is_available():
            torch.cuda.synchronize()

    first, last = (int(x) for x in os.environ.get("SNAKETUNE_PROFILE_STEPS", "6-9").split("-"))

    class ProfileSteps(TrainerCallback):
        def on_step_begin(self, args, state, control, **kwargs):
            if state.global_step == first - 1:
                sync()
                self.began = time.perf_counter()
                self.torch = torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU,
                                                                torch.profiler.ProfilerActivity.CUDA])
                self.torch.__enter__()
                self.python = cProfile.Profile()
                self.python.enable()

        def on_step_end(self, args, state, control, **kwargs):
            if state.global_step != last or not hasattr(self, "python"):
                return
            self.python.disable()
            sync()
            wall = time.perf_counter() - self.began
            self.torch.__exit__(None, None, None)
            if int(os.environ.get("RANK", "0")) != 0:
                return
            events = self.torch.key_averages()

            def top(key, n=30):
                rows = sorted(events, key=lambda e: getattr(e, key), reverse=True)[:n]
                return [{"name": e.key[:120], "calls": e.count, "gpu_ms": round(e.device_time_total / 1e3, 2),
                         "self_gpu_ms": round(e.self_device_time_total / 1e3, 2),
                         "cpu_ms": round(e.cpu_time_total / 1e3, 2),
                         "self_cpu_ms": round(e.self_cpu_time_total / 1e3, 2)} for e in rows]

            stats = pstats.Stats(self.python)
            functions = [{"function": f"{'/'.join(path.rsplit('/', 2)[-2:])}:{line}:{name}", "calls": calls,
                          "own_s": round(own, 3), "cumulative_s": round(cumulative, 3)}
                         for (path, line, name), (_, calls, own, cumulative, _) in stats.stats.items()]
            steps = last - first + 1
            gpu_seconds = sum(e.self_device_time_total for e in events) / 1e6
            report = {"steps": steps, "wall_seconds_per_step": round(wall / steps, 4),
                      "gpu_kernel_seconds_per_step": round(gpu_seconds / steps, 4),
                      "top_gpu": top("self_device_time_total"), "top_cpu": top("self_cpu_time_total"),
                      "python_cumulative": sorted(functions, key=lambda f: -f["cumulative_s"])[:60],
                      "python_own": sorted(functions, key=lambda f: -f["own_s"])[:40]}
            with open(PATH, "w") as out:
                json.dump(report, out, indent=1)

    return ProfileSteps()


class AddCallback(importlib.abc.MetaPathFinder, importlib.abc.Loader):
    """Once transformers.trainer is imported, every Trainer gets the profiling callback."""

    def find_spec(self, name, path, target=None):
        if name != "transformers.trainer":
            return None
        sys.meta_path.remove(self)
        spec = importlib.util.find_spec(name)
        sys.meta_path.insert(0, self)
        self.loader = spec.loader
        spec.loader = self
        return spec

    def create_module(self, spec):
        return self.loader.create_module(spec)

    def exec_module(self, module):
        self.loader.exec_module(module)
        original = module.Trainer.__init__

        def init(trainer, *args, **kwargs):
            original(trainer, *args, **kwargs)
            trainer.add_callback(profile_callback())

        module.Trainer.__init__ = init


if PATH:
    sys.meta_path.insert(0, AddCallback())
