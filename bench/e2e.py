"""End-to-end UNet benchmark on a GPU: ``python bench/e2e.py [--json out.json]``; ``--dry-run`` on a CPU.

UNets built from the public SD1.5 / SD2.1 / SDXL configs with random fp16 weights, batch 2 (CFG). Per
UNet call, eager and CUDA-graph replay: default diffusers attention (SDPA), attention removed (the
ceiling of any reuse method), materialised attention (``AttnProcessor``, the paper's setting), an
attnreuse reuse step and capture step with fp16, fp8 and 4-bit maps, every layer reusing (``plan="all"``: what
the kernels give). Then 20-step DDIM loops (graph replay per step): full, HURRY-10 (``plan="all"``), and step
reduction to the same latency; and the default plan (``plan="measured"``, fp8 maps, HURRY-10): per mode (eager,
graphed) its reusing layers, capturing and reusing calls, ρ predicted and measured, and its loop. With the ``DeepCache``
package: a DeepCache cached step (deep blocks from the last full step; interval 3, branch 0) alone, capturing
and reusing fp8 maps, and 20-step estimates from the per-call times: DeepCache alone, and with HURRY-10 /
PHAST-10 map reuse (on SD1.5 the costly 64² self-attention is in the shallow blocks DeepCache still computes,
so the savings add).
``--dry-run`` runs the same code eagerly on a tiny UNet on the CPU.
"""
from __future__ import annotations

import argparse
import json
import math
import sys
from pathlib import Path

import torch
from diffusers import DDIMScheduler, UNet2DConditionModel
from diffusers.models.attention_processor import AttnProcessor, AttnProcessor2_0

if __package__ in (None, ""):  # run as a file: python bench/e2e.py
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
    __package__ = "bench"

import attnreuse
from attnreuse.architectures import CONFIGS as PUBLIC_CONFIGS, TEXT_TOKENS
from attnreuse.steps import capture_and_reuse, predicted_rho, step_times
from attnreuse.timing import graphed, median_ms
from bench.measure import DEEPCACHE_INTERVAL, PHAST_SD15, copy_bandwidth, deepcache  # noqa: E402

CONFIGS = dict(PUBLIC_CONFIGS, tiny=dict(  # tiny: the CPU dry run
    down_block_types=("CrossAttnDownBlock2D", "CrossAttnDownBlock2D"),
    up_block_types=("CrossAttnUpBlock2D", "CrossAttnUpBlock2D"), block_out_channels=(32, 64),
    layers_per_block=1, norm_num_groups=16, cross_attention_dim=32, attention_head_dim=4))
CASES = [("sd15", 512), ("sd15", 768), ("sd15", 1024), ("sd21", 768), ("sdxl", 1024)]


class SkipAttention:
    """Attention removed: the layer passes its input through (the ceiling of any reuse method)."""

    def __call__(self, attn, hidden_states, *args, **kwargs):
        return hidden_states


class Bench:
    def __init__(self, arch: str, px: int, device, dtype, reps: int, graphs: bool):
        torch.manual_seed(0)
        self.unet = UNet2DConditionModel(sample_size=px // 8, **CONFIGS[arch]).eval()
        # torch's own cast: diffusers' ModelMixin.to warns on any dtype cast of a model built in code
        torch.nn.Module.to(self.unet, device, dtype)
        self.device, self.reps, self.graphs = device, reps, graphs
        cfg = self.unet.config
        lat = px // 8
        self.x = torch.randn(2, 4, lat, lat, device=device, dtype=dtype)
        self.t = torch.tensor(500, device=device)
        self.kwargs = {"encoder_hidden_states": torch.randn(2, TEXT_TOKENS, cfg.cross_attention_dim, device=device,
                                                            dtype=dtype)}
        if cfg.addition_embed_type == "text_time":
            self.kwargs["added_cond_kwargs"] = {"text_embeds": torch.randn(2, 1280, device=device, dtype=dtype),
                                                "time_ids": torch.randn(2, 6, device=device, dtype=dtype)}
        self.out = None

    @torch.no_grad()
    def call(self):
        self.out = self.unet(self.x, self.t, **self.kwargs).sample
        return self.out

    def time_call(self) -> dict:
        """Eager and (on CUDA) graph-replay ms of one UNet call as currently configured."""
        r = {"eager": median_ms(self.call, self.device, self.reps)}
        if self.graphs:
            g = graphed(self.call)
            r["graph"] = median_ms(g.replay, self.device, self.reps)
            del g
        return r

    def with_processor(self, proc) -> dict:
        self.unet.set_attn_processor(proc)
        try:
            return self.time_call()
        finally:
            self.unet.set_attn_processor(AttnProcessor2_0())

    def deepcache_steps(self) -> dict:
        """UNet call ms of a DeepCache cached step: alone, capturing fp8 maps, reusing them. DeepCache's own UNet
        wrapper finds the step index with a host sync; here its step counter is set directly, so the calls
        replay as CUDA graphs (the cached blocks' outputs are the full step's graph outputs)."""
        from types import SimpleNamespace

        helper = deepcache(SimpleNamespace(unet=self.unet))
        del self.unet.forward  # the class's forward again, without the step-finding wrapper
        helper.start_timestep = 0
        r = {}
        try:
            with attnreuse.patch(self.unet, "10", cache_dtype="fp8", plan="all") as handle, \
                    handle.generation(2) as gen:
                helper.cur_timestep = 0  # a full DeepCache step, capturing every layer's map
                gen.hold(0)
                self.time_call()
                helper.cur_timestep = 1  # cached steps
                r["dc_cached_capture_fp8"] = self.time_call()
                gen.hold(1)
                r["dc_cached_reuse_fp8"] = self.time_call()
            r["dc_cached"] = self.time_call()
        finally:
            helper.disable()
        return r

    def reuse_and_capture(self, cache_dtype: str) -> tuple[dict, dict, int]:
        capture, reuse, nbytes = capture_and_reuse(self.unet, self.time_call, cache_dtype)
        return reuse, capture, nbytes

    def default_plan(self, cache_dtype: str, steps: int) -> dict:
        """The default plan (``plan="measured"``: this GPU's costs) for HURRY-``steps // 2``, per mode: the layers
        that reuse, the capturing and reusing calls, ρ predicted by the plan and measured, and the DDIM loop."""
        schedule = attnreuse.hurry(steps, steps // 2)
        inputs = (self.x, self.kwargs["encoder_hidden_states"])
        out = {}
        for mode, key in [("eager", "eager")] + [("graphed", "graph")] * self.graphs:
            timed = step_times(self.unet, lambda: self.time_call()[key], schedule, inputs=inputs, mode=mode,
                               cache_dtype=cache_dtype)
            default = self.time_call()[key]
            plan = timed["plan"] or []
            out[mode] = {"layers_reusing": sum(p.reuse for p in plan), "layers": len(plan),
                         "capture": timed["capture"], "reuse": timed["reuse"], "default": default,
                         "rho_measured": timed["reuse"] / default,
                         "rho_predicted": predicted_rho(plan, default) if plan else None}
        out["loop"] = self.loop_ms(schedule, cache_dtype, steps, plan="measured")
        return out

    @torch.no_grad()
    def loop_ms(self, schedule, cache_dtype: str, steps: int, plan: str = "all") -> float:
        """A DDIM loop of ``len(schedule)`` steps (or ``steps`` without a schedule), one replayed CUDA graph
        per step kind (eager UNet calls on the CPU). ``plan="all"``: every layer reuses, what the kernels give;
        ``"measured"``: the default plan (in graph mode, made with graphed costs)."""
        sched = DDIMScheduler(num_train_timesteps=1000)
        sched.set_timesteps(steps, device=self.device)
        latents = self.x.clone()
        handle = (attnreuse.patch(self.unet, schedule, cache_dtype=cache_dtype, plan=plan) if schedule is not None
                  else None)
        if handle is not None and plan == "measured":
            handle.prepare(self.x, self.kwargs["encoder_hidden_states"], len(schedule),
                           mode="graphed" if self.graphs else "eager")
        gen = handle.generation(len(schedule)) if handle is not None else None
        acts = attnreuse.schedule.actions(schedule or (1,) * steps)
        runners = {}  # one per kind of step, each returning the UNet's output
        for i, action in enumerate(acts):
            if action.value in runners:
                continue
            if gen is not None:
                gen.hold(i)  # held steps keep the maps the recorded graphs read and write
            if self.graphs:
                graph, out = graphed(self.call), self.out
                runners[action.value] = lambda graph=graph, out=out: (graph.replay(), out)[1]
            else:
                runners[action.value] = self.call

        def run():
            nonlocal latents
            for i, t in enumerate(sched.timesteps):
                self.x.copy_(latents)
                if gen is not None:
                    gen.hold(i)  # eager calls follow the schedule; replayed graphs hold their step
                out = runners[acts[i].value]()
                latents = sched.step(out, t, latents).prev_sample
        try:
            return median_ms(run, self.device, max(3, self.reps // 10))
        finally:
            if handle is not None:
                gen.end()
                handle.remove()


def run_case(arch, px, args, device, dtype, bw) -> dict:
    b = Bench(arch, px, device, dtype, args.reps, graphs=device.type == "cuda")
    r = {"arch": arch, "px": px}
    r["default"] = b.time_call()
    r["none"] = b.with_processor(SkipAttention())
    r["materialised"] = b.with_processor(AttnProcessor())
    for dt in ("fp16", "fp8", "fp4"):
        r[f"reuse_{dt}"], r[f"capture_{dt}"], r[f"cache_bytes_{dt}"] = b.reuse_and_capture(dt)
        torch.cuda.empty_cache() if device.type == "cuda" else None
    mode = "graph" if b.graphs else "eager"
    try:
        r.update(b.deepcache_steps())
        r["loops_deepcache"] = deepcache_loops(r, mode, args.steps)
    except ImportError:
        r["loops_deepcache"] = "DeepCache is not installed (pip install DeepCache)"
    n, reuse = args.steps, args.steps // 2
    hurry = attnreuse.hurry(n, reuse)
    r["loop_full"] = b.loop_ms(None, "fp8", n)
    r["loop_hurry_fp8"] = b.loop_ms(hurry, "fp8", n)
    per_step = r["loop_full"] / n
    r["fewer_steps"] = max(1, math.floor(r["loop_hurry_fp8"] / per_step))  # same latency as HURRY
    r["loop_fewer"] = b.loop_ms(None, "fp8", r["fewer_steps"])
    r["default_plan_fp8"] = b.default_plan("fp8", n)
    # the card's limits (see the module docstring of bench/kernel_table.py for t_lim)
    t_def, t_none = r["default"][mode], r["none"][mode]
    limit_reuse = t_none + r["cache_bytes_fp8"] / bw * 1e3
    r["limit_reuse_ms"] = limit_reuse
    r["reuse_target_ms"] = t_none + 1.2 * r["cache_bytes_fp8"] / bw * 1e3
    limit_loop = (n - reuse) * t_def + reuse * limit_reuse
    r["speedup"] = r["loop_full"] / r["loop_hurry_fp8"]
    r["speedup_limit"] = n * t_def / limit_loop
    r["mode"] = mode
    del b
    return r


def deepcache_loops(r: dict, mode: str, steps: int) -> dict:
    """ms of ``steps``-step loops from per-call times: DeepCache alone (a full step every DEEPCACHE_INTERVAL),
    with HURRY and PHAST map reuse (fp8 maps), and without either."""
    full = {"compute": r["default"][mode], "capture": r["capture_fp8"][mode], "reuse": r["reuse_fp8"][mode]}
    cached = {"compute": r["dc_cached"][mode], "capture": r["dc_cached_capture_fp8"][mode],
              "reuse": r["dc_cached_reuse_fp8"][mode]}
    schedules = {"none": (1,) * steps, f"hurry-{steps // 2}": attnreuse.hurry(steps, steps // 2)}
    if steps == len(PHAST_SD15):
        schedules["phast-10"] = attnreuse.as_schedule(PHAST_SD15)
    out = {}
    for name, schedule in schedules.items():
        kinds = [a.value for a in attnreuse.schedule.actions(schedule)]
        out[f"{name}"] = sum(full[k] for k in kinds)
        out[f"deepcache+{name}"] = sum((full if i % DEEPCACHE_INTERVAL == 0 else cached)[k]
                                       for i, k in enumerate(kinds))
    return out


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--dry-run", action="store_true", help="tiny UNet, CPU, eager: exercises the code")
    ap.add_argument("--cases", nargs="*", help="e.g. sd15:512 sdxl:1024")
    ap.add_argument("--reps", type=int, default=30)
    ap.add_argument("--steps", type=int, default=20)
    ap.add_argument("--json")
    args = ap.parse_args(argv)
    if args.dry_run:
        device, dtype, cases = torch.device("cpu"), torch.float32, [("tiny", 128)]
        args.reps, args.steps = 2, 4
    else:
        device, dtype = torch.device("cuda"), torch.float16
        cases = [(c.split(":")[0], int(c.split(":")[1])) for c in args.cases] if args.cases else CASES
    card = torch.cuda.get_device_name() if device.type == "cuda" else "cpu (dry run)"
    bw = copy_bandwidth(device)
    results = {"card": card, "copy_TBps": bw / 1e12, "torch": torch.__version__, "cases": []}
    for arch, px in cases:
        r = run_case(arch, px, args, device, dtype, bw)
        results["cases"].append(r)
        print(json.dumps(r), flush=True)
        if args.json:  # as it goes: a timeout keeps the cases that finished
            Path(args.json).write_text(json.dumps(results, indent=1))
        if device.type == "cuda":
            torch.cuda.empty_cache()
    if args.json:
        Path(args.json).write_text(json.dumps(results, indent=1))
    print(f"\n{card}, copy {bw / 1e12:.2f} TB/s; ms per UNet call (batch 2), {results['cases'][0]['mode']}; "
          f"loops: {args.steps}-step DDIM")
    print(f"{'case':11} {'default':>8} {'none':>8} {'materl':>8} {'reuse16':>8} {'reuse8':>8} {'limit8':>8} "
          f"{'cap8':>8} {'cap8/def':>8} {'cache8 GB':>9} {'full':>8} {'hurry':>8} {'fewer':>10} "
          f"{'speedup':>7} {'limit':>6}")
    for r in results["cases"]:
        if isinstance(r["loops_deepcache"], dict):
            print(f"{r['arch']} {r['px']}: {args.steps}-step estimates from per-call times (DeepCache interval "
                  f"{DEEPCACHE_INTERVAL}, fp8 maps): " + ", ".join(f"{k} {v:.1f} ms" for k, v in r["loops_deepcache"].items()))
    for r in results["cases"]:
        m = r["mode"]
        print(f"{r['arch'] + ' ' + str(r['px']):11} {r['default'][m]:8.2f} {r['none'][m]:8.2f} "
              f"{r['materialised'][m]:8.2f} {r['reuse_fp16'][m]:8.2f} {r['reuse_fp8'][m]:8.2f} "
              f"{r['limit_reuse_ms']:8.2f} {r['capture_fp8'][m]:8.2f} {r['capture_fp8'][m] / r['default'][m]:8.2f} "
              f"{r['cache_bytes_fp8'] / 1e9:9.2f} {r['loop_full']:8.1f} {r['loop_hurry_fp8']:8.1f} "
              f"{r['loop_fewer']:7.1f}/{r['fewer_steps']:<2} {r['speedup']:7.3f} {r['speedup_limit']:6.3f}")
    return results


if __name__ == "__main__":
    main()
