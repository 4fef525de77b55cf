"""``python -m attnreuse search``: PHAST on a checkpoint of your own, in one process or many.

Each round's work is one item per (candidate schedule, calibration batch); under ``torchrun`` (or
``accelerate launch``) rank k samples items k, k + N, k + 2N, ... and the per-image PSNRs are gathered by
item index, so any number of processes scores every candidate exactly as one process does and reaches the
same schedule and trace. Rank 0 writes ``trace.json`` after every item it scores and after every round's
gather, and ``schedule.json`` plus ``utility.png`` at the end.
"""
from __future__ import annotations

import argparse
import itertools
import sys
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import diffusers
import torch
from tqdm.auto import tqdm

import attnreuse
from attnreuse.phast import PhastRound, greedy_search, psnr
from attnreuse.schedule import hurry, to_string

from . import files
from .figures import utility_plot
from .models import EMBEDDED, Calibration, Model, model_key
from .options import (UsageError, add_model_arguments, check_model, check_out_dir, check_sampling, device_and_dtype,
                      fail, load_model)
from .trace import Trace
from .world import World

DESCRIPTION = """\
Searches a reuse schedule (1 = compute the attention maps, 0 = reuse them) for your checkpoint with PHAST:
starting from HURRY (reuse the last REUSE steps), each round scores every schedule one swap of a reuse and a
computing step away by the mean PSNR of the calibration images against the full sampler, and keeps the best
if it gains more than --epsilon dB. Writes OUT/schedule.json (the schedule, its utility, the trace per round
and what it was searched on), OUT/utility.png and OUT/trace.json (every candidate's score, written after
each one: --resume continues a killed search from it and ends with the identical result).

One GPU:       python -m attnreuse search --model DIR_OR_ID --prompts prompts.txt --out out/search
Several GPUs:  torchrun --nproc-per-node 8 -m attnreuse search ...   (or: accelerate launch -m attnreuse search ...)
Machines:      torchrun --nnodes 2 --nproc-per-node 8 --rdzv-backend c10d --rdzv-endpoint HOST:29500 \\
                   -m attnreuse search ...   (the same command on each machine; rank 0 writes OUT)
Any number of processes gives the same schedule and trace as one."""

# what a trace's scores depend on, and the flag that sets each: resuming needs them all equal
KEY_FLAGS = {"model": "--model", "scheduler": "--scheduler", "steps": "--steps", "reuse": "--reuse",
             "resolution": "--resolution", "dtype": "--dtype", "cache_dtype": "--cache-dtype",
             "guidance": "--guidance", "prompts": "--prompts", "seeds": "--seeds", "batch_size": "--batch-size",
             "device": "the device (cpu or cuda)"}


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m attnreuse search", description=DESCRIPTION,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    add_model_arguments(p)
    p.add_argument("--steps", type=int, default=20, metavar="N", help="sampling steps, N ≥ 2 (default: %(default)s)")
    p.add_argument("--reuse", type=int, default=10, metavar="R",
                   help="reuse steps in the schedule, 1 ≤ R < N (default: %(default)s)")
    p.add_argument("--max-rounds", type=int, default=2, metavar="K",
                   help="stop after K rounds; a round scores up to R·(N−R−1) schedules (default: %(default)s; "
                        "--resume with a larger K continues a finished search)")
    p.add_argument("--epsilon", type=float, default=0.01, metavar="DB",
                   help="least gain in mean PSNR for a round to change the schedule (default: %(default)s)")
    p.add_argument("--out", default="attnreuse_search", metavar="DIR",
                   help="folder for schedule.json, utility.png and trace.json, created if missing "
                        "(default: %(default)s)")
    p.add_argument("--resume", action="store_true", help="continue the search recorded in OUT/trace.json")
    return p


@dataclass
class Plan:
    """A checked search: everything it needs, loaded."""

    args: argparse.Namespace
    model: Model
    calibration: Calibration
    key: dict
    out: Path
    resumed: dict | None  # the scores of rank 0's trace.json, read for --resume


def check(args, world: World) -> Plan:
    """Every argument and input checked, the model loaded; raises :class:`UsageError` before any sampling."""
    if args.steps < 2:
        raise UsageError(f"--steps {args.steps}", "pass at least 2 sampling steps")
    if not 1 <= args.reuse < args.steps:
        raise UsageError(f"--reuse {args.reuse} with --steps {args.steps}",
                         f"pass 1 ≤ --reuse < --steps, e.g. --reuse {args.steps // 2} (the first step always computes)")
    if args.max_rounds < 1:
        raise UsageError(f"--max-rounds {args.max_rounds}", "pass 1 or more rounds")
    if args.epsilon < 0:
        raise UsageError(f"--epsilon {args.epsilon}", "pass a gain of 0 dB or more")
    check_model(args.model)
    embedded = args.model == EMBEDDED
    calibration, resolution = check_sampling(args, embedded)
    device, dtype = device_and_dtype(args, world.local_rank)
    if device.type == "cpu":
        # CPU kernels round differently with another thread count: one thread per process makes any number
        # of processes score alike (torchrun --nproc-per-node C uses C cores)
        torch.set_num_threads(1)
    key = {"model": model_key(args.model), "scheduler": args.scheduler or ("ddim" if embedded else None),
           "steps": args.steps, "reuse": args.reuse, "resolution": list(resolution) if resolution else None,
           "dtype": str(dtype).removeprefix("torch."), "cache_dtype": args.cache_dtype, "guidance": args.guidance,
           "prompts": list(calibration.prompts), "seeds": list(calibration.seeds),
           "batch_size": calibration.batch_size, "device": device.type}
    out = Path(args.out).expanduser()
    resumed = check_out(out, args.resume, key) if world.first else None  # only rank 0 touches OUT
    if not world.first:
        diffusers.utils.logging.disable_progress_bar()  # one set of loading bars, rank 0's
    model = load_model(args, device, dtype, resolution)
    return Plan(args, model, calibration, key, out, resumed)


def check_out(out: Path, resume: bool, key: dict) -> dict | None:
    """The output folder (created if missing, once all else is checked) and, for --resume, the scores its trace
    of the same search holds."""
    path = check_out_dir(out) / "trace.json"
    entries = None
    if resume:
        if not path.exists():
            raise UsageError(f"--resume: {path} does not exist", "run without --resume to start a search")
        trace = Trace.read(path)
        for field, flag in KEY_FLAGS.items():
            old, new = trace.key.get(field), key[field]
            if old != new:
                raise UsageError(f"--resume: {path} is a search with {field} {_short(old)}, not {_short(new)}",
                                 f"pass the same {flag} to continue it, or another --out for a new search")
        entries = trace.entries
    elif path.exists():
        raise UsageError(f"--out {out} holds a search already ({path.name})",
                         "pass --resume to continue it, or another --out (or delete it) to start over")
    try:
        out.mkdir(parents=True, exist_ok=True)
        files.write_bytes(out / ".write-test", b"")
        (out / ".write-test").unlink()
    except OSError as e:
        raise UsageError(f"--out {out}: cannot write there ({e.strerror})", "pass a writable folder") from None
    return entries


def _short(value) -> str:
    text = repr(value)
    return text if len(text) <= 80 else text[:77] + "..."


class Scorer:
    """``evaluate(schedules) -> utilities`` for :func:`attnreuse.phast.greedy_search`: one item per (schedule,
    calibration batch) not in the trace yet, spread over the ranks, PSNRs gathered by item index."""

    def __init__(self, plan: Plan, world: World, trace: Trace):
        self.model, self.world, self.trace = plan.model, world, trace
        self.steps, self.cache_dtype = plan.args.steps, plan.args.cache_dtype
        self.path = plan.out / "trace.json"
        self.batches = plan.calibration.batches()
        starts = itertools.accumulate(map(len, self.batches), initial=0)  # zip drops the last, the total
        self.ranges = [range(s, s + len(b)) for s, b in zip(starts, self.batches)]
        self.references: dict[int, torch.Tensor] = {}  # full-sampler images per batch, sampled when first needed
        self.calls = 0

    def __call__(self, schedules) -> list[float]:
        names = [to_string(s) for s in schedules]
        round_ = self.calls
        self.calls += 1
        self.trace.register(names, round_)
        work = [(s, b) for s in names for b in range(len(self.batches)) if self.trace.missing(s, self.ranges[b])]
        mine = list(enumerate(work))[self.world.rank::self.world.size]
        done = {}
        desc = "start (HURRY)" if round_ == 0 else f"round {round_}"
        unit = "candidate" if len(self.batches) == 1 else "batch"
        for k, (s, b) in tqdm(mine, desc=desc, unit=unit, leave=False, disable=not self.world.first, file=sys.stderr):
            done[k] = self.score(s, b)
            self.trace.record(s, self.ranges[b], done[k])
            self.save()
        for k, values in self.world.gather(done).items():
            s, b = work[k]
            self.trace.record(s, self.ranges[b], values)
        self.save()
        return [self.trace.utility(s) for s in names]

    @torch.no_grad()
    def score(self, schedule: str, b: int) -> list[float]:
        """Per-image PSNR of batch ``b`` sampled with ``schedule`` against the full sampler."""
        batch = self.batches[b]
        if b not in self.references:
            self.references[b] = self.model.sample(batch, self.steps)
        with attnreuse.patch(self.model.pipe, schedule, cache_dtype=self.cache_dtype):
            images = self.model.sample(batch, self.steps)
        return psnr(images, self.references[b]).tolist()

    def save(self) -> None:
        if self.world.first:
            self.trace.save(self.path)


def run(plan: Plan, world: World) -> dict | None:
    """The search; rank 0 writes and returns schedule.json's content."""
    args = plan.args
    trace = Trace(plan.key, len(plan.calibration.items))
    trace.entries = world.share(plan.resumed if plan.resumed is not None else {})
    scorer = Scorer(plan, world, trace)
    bar = tqdm(total=args.max_rounds, desc="PHAST", unit="round", disable=not world.first, file=sys.stderr)

    def on_round(r: PhastRound) -> None:
        trace.rounds.append(asdict(r))
        scorer.save()
        bar.set_postfix_str(f"{r.utility:.2f} dB {r.schedule}")
        bar.update()

    t0 = time.time()
    with bar:
        result = greedy_search(scorer, args.steps, args.reuse, epsilon=args.epsilon, max_rounds=args.max_rounds,
                               on_round=on_round)
    if not world.first:
        return None
    utilities = {s: trace.utility(s) for s in trace.entries if not trace.missing(s, range(trace.images))}
    start = to_string(hurry(args.steps, args.reuse))
    report = {
        "schedule": to_string(result.schedule), "utility_db": result.utility,
        "start_schedule": start, "start_utility_db": result.start_utility,
        "steps": args.steps, "reuse": args.reuse, "trace": [asdict(r) for r in result.trace],
        "candidates": [{"schedule": s, "round": trace.entries[s]["round"], "utility_db": u}
                       for s, u in utilities.items()],
        "samplings": result.samplings, **plan.model.describe(), "scheduler": plan.key["scheduler"],
        "cache_dtype": args.cache_dtype,
        "calibration": {"prompts": list(plan.calibration.prompts), "seeds": list(plan.calibration.seeds),
                        "batch_size": plan.calibration.batch_size},
        "epsilon": args.epsilon, "max_rounds": args.max_rounds, "processes": world.size,
        "seconds": round(time.time() - t0, 1), "version": attnreuse.__version__, "torch": torch.__version__,
        "diffusers": diffusers.__version__,
    }
    files.write_json(plan.out / "schedule.json", report)
    best = [(0, result.start_utility)] + [(r.round, r.utility) for r in result.trace]
    plot = utility_plot([(e["round"], e["utility_db"]) for e in report["candidates"]], best,
                        f"PHAST {args.steps} steps, {args.reuse} reuse: {Path(plan.model.name).name}, "
                        f"{report['scheduler_class']}")
    files.write_png(plan.out / "utility.png", plot)
    print(f"PHAST: {start} {result.start_utility:.2f} dB -> {report['schedule']} {result.utility:.2f} dB after "
          f"{len(result.trace)} round(s), {result.samplings} samplings, {report['seconds']:.0f} s on {world.size} "
          f"process(es); wrote {plan.out / 'schedule.json'}, utility.png, trace.json", flush=True)
    return report


def main(argv=None) -> dict | None:
    args = build_parser().parse_args(argv)
    world = World()
    threads = torch.get_num_threads()
    try:
        try:
            plan = check(args, world)
        except UsageError as e:
            fail("search", e)
        world.start()
        return run(plan, world)
    finally:
        world.stop()
        torch.set_num_threads(threads)  # check() set one thread on a CPU; a caller in this process gets its own back
