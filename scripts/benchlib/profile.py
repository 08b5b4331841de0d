"""Where a training step's time goes, for either system: PhaseTimer splits steps into PHASES
by wall clock from torch's global module and optimizer hooks, and `profiled` adds
torch.profiler's top ops. `ours_profile_worker` runs `llava-tune train` under it (bench_train.py
--worker profile-ours SPEC); the peer's worker calls `profiled` itself."""

from __future__ import annotations

import contextlib
import json
import time
from pathlib import Path
from typing import Any

PHASES = ("data (fetch + collate)", "vision tower fwd", "projector fwd", "LLM fwd (embed + layers)",
          "LM head + loss fwd", "backward (+ grad clip)", "optimizer step",
          "other (loop, zero_grad, lr, to-device)")


class PhaseTimer:
    """Splits training steps into PHASES by wall clock, from hooks every torch program passes
    through: global module forward hooks (the first module called after an optimizer step is
    the model; its vision tower, projector and lm_head are found by class and name) and global
    optimizer step hooks. The data phase is not timed here: `profiled` takes it from the
    profiler (see `fetch_seconds`) out of the loop's phase, where batches are fetched. Forwards
    re-run by gradient checkpointing fall inside the backward phase and are ignored. On a GPU
    every boundary synchronizes, so phases own their kernels."""

    VISION = ("VisionTower", "CLIPVisionModel")
    PROJECTOR = ("Projector", "LlavaMultiModalProjector")

    def __init__(self, warmup: int, active: int) -> None:
        import torch

        self.cuda = torch.cuda.is_available()
        self.warmup, self.active = warmup, active
        self.steps = 0
        self.recording = False
        self.phase = PHASES[-1]
        self.last = 0.0
        self.totals = dict.fromkeys(PHASES, 0.0)
        self.top: Any = None
        self.roles: dict[int, str] = {}
        self.on_step: list = []

    def _switch(self, phase: str) -> None:
        if not self.recording:
            self.phase = phase
            return
        if self.cuda:
            import torch

            torch.cuda.synchronize()
        now = time.perf_counter()
        self.totals[self.phase] += now - self.last
        self.phase, self.last = phase, now

    def _find_parts(self, top) -> None:
        for name, module in top.named_modules():
            kind = type(module).__name__
            if kind in self.VISION and "vision" not in self.roles.values():
                self.roles[id(module)] = "vision"
            elif kind in self.PROJECTOR:
                self.roles[id(module)] = "projector"
            elif name.endswith("lm_head"):
                self.roles[id(module)] = "head"

    def pre_forward(self, module, args) -> None:
        if self.phase in ("backward (+ grad clip)", "optimizer step"):
            return  # gradient checkpointing's recomputation
        if self.top is None and self.steps >= 1:
            self.top = module
            self._find_parts(module)
        if module is self.top and self.phase not in PHASES[1:5]:
            self._switch("LLM fwd (embed + layers)")
        role = self.roles.get(id(module))
        if role == "vision" and self.phase == "LLM fwd (embed + layers)":
            self._switch("vision tower fwd")
        elif role == "projector" and self.phase == "LLM fwd (embed + layers)":
            self._switch("projector fwd")
        elif role == "head" and self.phase == "LLM fwd (embed + layers)":
            self._switch("LM head + loss fwd")

    def post_forward(self, module, args, output) -> None:
        role = self.roles.get(id(module))
        if role == "vision" and self.phase == "vision tower fwd":
            self._switch("LLM fwd (embed + layers)")
        elif role == "projector" and self.phase == "projector fwd":
            self._switch("LLM fwd (embed + layers)")
        elif module is self.top and self.phase in PHASES[1:5]:
            self._switch("backward (+ grad clip)")

    def pre_step(self, optimizer, args, kwargs) -> None:
        self._switch("optimizer step")

    def post_step(self, optimizer, args, kwargs) -> None:
        self._switch(PHASES[-1])
        self.steps += 1
        for callback in self.on_step:
            callback()
        if self.steps == self.warmup:
            if self.cuda:
                import torch

                torch.cuda.synchronize()
            self.recording, self.last = True, time.perf_counter()
            self.totals = dict.fromkeys(PHASES, 0.0)
        elif self.steps == self.warmup + self.active:
            self.recording = False

    @contextlib.contextmanager
    def installed(self):
        import torch
        from torch.optim.optimizer import (
            register_optimizer_step_post_hook,
            register_optimizer_step_pre_hook,
        )

        handles = [torch.nn.modules.module.register_module_forward_pre_hook(self.pre_forward),
                   torch.nn.modules.module.register_module_forward_hook(self.post_forward),
                   register_optimizer_step_pre_hook(self.pre_step),
                   register_optimizer_step_post_hook(self.post_step)]
        try:
            yield self
        finally:
            for handle in handles:
                handle.remove()


FETCH = "enumerate(DataLoader)#_SingleProcessDataLoaderIter.__next__"
"""The range torch's DataLoader records around each batch it fetches in this process (the
sampler's indices, the dataset items, collate, pinning): `record_function`, seen by the
profiler. With num_workers > 0 the workers fetch; this process only waits, in the loop's
phase, as before."""


def fetch_seconds(events) -> float:
    """Seconds the profiled steps spent fetching batches (dataset items + collate) in this
    process: the FETCH ranges among the profiler's `events`, less pinning their batches (an
    HF Trainer's default on a GPU), which, like the move to the device, is the loop's."""

    def pinning(event) -> float:
        return sum(child.cpu_time_total if child.name == "aten::pin_memory" else pinning(child)
                   for child in event.cpu_children)

    return sum(e.cpu_time_total - pinning(e) for e in events if e.name == FETCH) / 1e6


def profiled(train, warmup: int, active: int) -> dict[str, Any]:
    """Run `train()` with the PhaseTimer and torch.profiler recording steps warmup+1 ..
    warmup+active; ms per step by phase and the top ops by self CPU (and GPU) time."""
    import torch
    from torch.profiler import ProfilerActivity, profile, schedule

    timer = PhaseTimer(warmup, active)
    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if timer.cuda else [])
    steps = schedule(wait=max(0, warmup - 1), warmup=min(1, warmup), active=active, repeat=1)
    with profile(activities=activities, schedule=steps) as prof:
        timer.on_step.append(prof.step)
        with timer.installed():
            train()
    # Batches are fetched in the loop, between an optimizer step and the next forward.
    fetching = fetch_seconds(prof.events())
    timer.totals[PHASES[0]] += fetching
    timer.totals[PHASES[-1]] -= fetching
    ms = {phase: 1000 * t / active for phase, t in timer.totals.items()}
    averages = [e for e in prof.key_averages() if not e.key.startswith("ProfilerStep")]
    events = sorted(averages, key=lambda e: e.self_cpu_time_total, reverse=True)
    top = [{"op": e.key, "calls_per_step": e.count / active,
            "self_cpu_ms_per_step": e.self_cpu_time_total / 1000 / active,
            "self_gpu_ms_per_step": getattr(e, "self_device_time_total", 0) / 1000 / active}
           for e in events[:15]]
    if torch.cuda.is_available():
        by_gpu = sorted(averages, key=lambda e: getattr(e, "self_device_time_total", 0),
                        reverse=True)
        top_gpu = [{"op": e.key, "self_gpu_ms_per_step": e.self_device_time_total / 1000 / active}
                   for e in by_gpu[:15]]
    else:
        top_gpu = []
    return {"ms_per_step": ms, "step_ms": sum(ms.values()), "steps": active, "top_ops": top,
            "top_gpu_ops": top_gpu}


def ours_profile_worker(spec: dict[str, Any]) -> None:
    """`llava-tune train` in this process, under the profiler (see `profiled`)."""
    from llava_tune.cli import main as cli

    def train() -> None:
        if cli(["train", spec["config"], *spec["overrides"]]) != 0:
            raise RuntimeError("llava-tune train failed")

    Path(spec["result"]).write_text(json.dumps({"profile": profiled(train, spec["warmup"],
                                                                     spec["steps"] - spec["warmup"])}))
