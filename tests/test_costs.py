"""The cost tables (attnreuse.costs): on disk per GPU/driver/torch/Triton/attnreuse key, eager and graphed kept
apart, corrupt or foreign files ignored, an unwritable folder harmless; and the module layering (timing below
everything, no import circle). Costs are injected: nothing here asserts a timing."""
from __future__ import annotations

import ast
import json
import math
import warnings
from pathlib import Path

import pytest
import torch

import attnreuse
from attnreuse import costs
from attnreuse.costs import CostStore, MeasuredCosts, measure_costs
from attnreuse.planner import LayerCost, LayerShape
from tests.helpers import make_unet, sample

SHAPES = [LayerShape(2, 8, 64, 64, 4, 32, 32), LayerShape(2, 8, 64, 7, 4, 32, 32)]
KEY = {"gpu": "NVIDIA Test GPU", "driver": "550.1", "torch": "2.13.0", "triton": "3.6.0", "attnreuse": "0.1.0"}


class FakeMeasure:
    """Counts what it is asked to measure; self-attention pays in graphed mode only, cross-attention never."""

    def __init__(self):
        self.calls = []

    def __call__(self, shape, fmt, device, dtype, backend, mode):
        self.calls.append((shape, fmt.name, mode))
        if shape.kv_tokens != shape.q_tokens:
            return LayerCost(1.0, 1.5, 2.0)
        return LayerCost(1.0, 1.2, 0.2) if mode == "graphed" else LayerCost(1.0, 1.6, 0.9)


def measure(store, fake, key=KEY, modes=("eager",), formats=("fp16", "fp8")):
    return measure_costs(SHAPES, formats, "cpu", torch.float16, modes=modes, store=store, key=key, measure=fake)


def test_table_round_trip_on_disk(tmp_path):
    fake = FakeMeasure()
    first = measure(CostStore(tmp_path), fake)
    assert len(first) == len(fake.calls) == 4  # 2 shapes x 2 formats, eager
    (path,) = tmp_path.glob("costs-*.json")
    assert "NVIDIA-Test-GPU" in path.name and not list(tmp_path.glob("*.tmp"))
    data = json.loads(path.read_text())
    assert data["key"] == KEY and len(data["entries"]) == 4 and data["entries"][0]["mode"] == "eager"
    again = measure(CostStore(tmp_path), fake)  # another process: read from disk, nothing measured
    assert again == first and len(fake.calls) == 4
    (shape, fmt, dtype, backend, mode), cost = next(iter(again.items()))
    assert isinstance(shape, LayerShape) and (fmt, dtype, backend, mode) == ("fp16", "float16", "auto", "eager")


@pytest.mark.parametrize("field", ["gpu", "driver", "torch", "triton", "attnreuse"])
def test_another_gpu_driver_or_version_measures_again(tmp_path, field):
    fake = FakeMeasure()
    store = CostStore(tmp_path)
    measure(store, fake)
    measure(store, fake, key=dict(KEY, **{field: "other"}))
    assert len(fake.calls) == 8 and len(list(tmp_path.glob("costs-*.json"))) == 2
    measure(CostStore(tmp_path), fake)  # the first table is still there
    assert len(fake.calls) == 8


def test_eager_and_graphed_tables_are_kept_apart(tmp_path):
    fake = FakeMeasure()
    store = CostStore(tmp_path)
    eager = measure(store, fake, modes=("eager",))
    graphed = measure(store, fake, modes=("graphed",))  # nothing of eager's is reused for graphed
    assert len(fake.calls) == 8 and {m for *_, m in fake.calls} == {"eager", "graphed"}
    assert not set(eager) & set(graphed)
    both = measure(CostStore(tmp_path), fake, modes=("eager", "graphed"))
    assert both == {**eager, **graphed} and len(fake.calls) == 8
    self_fp16 = SHAPES[0], "fp16", "float16", "auto"
    assert both[(*self_fp16, "eager")] != both[(*self_fp16, "graphed")]


def test_graphed_mode_needs_a_gpu():
    with pytest.raises(ValueError, match="graphed.*CUDA"):
        measure_costs(SHAPES, ["fp16"], "cpu", torch.float32, modes=("graphed",), persist=False)
    with pytest.raises(ValueError, match="mode='compiled'.*'eager'.*'graphed'"):
        MeasuredCosts()(torch.device("cpu"), torch.float32, "auto", mode="compiled")


@pytest.mark.parametrize("content", ["{not json", json.dumps({"attnreuse_costs": 1, "key": dict(KEY, gpu="x"),
                                                              "entries": []}),
                                     json.dumps({"attnreuse_costs": 1, "key": KEY, "entries": [{"batch": 2}]})])
def test_corrupt_or_foreign_table_is_ignored_and_measured_again(tmp_path, content):
    fake = FakeMeasure()
    path = CostStore(tmp_path).path(KEY)
    path.write_text(content)
    with pytest.warns(UserWarning, match="ignoring the cost table.*measured again"):
        got = measure(CostStore(tmp_path), fake)
    assert len(fake.calls) == 4 and all(isinstance(c, LayerCost) for c in got.values())
    assert json.loads(path.read_text())["key"] == KEY  # rewritten whole
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert measure(CostStore(tmp_path), fake) == got and len(fake.calls) == 4


def test_unwritable_folder_keeps_costs_in_memory_and_warns_once(tmp_path):
    blocker = tmp_path / "file"
    blocker.write_text("")
    store, fake = CostStore(blocker / "costs"), FakeMeasure()  # a folder under a file cannot be made
    with pytest.warns(UserWarning, match="cannot write the cost table") as caught:
        measure(store, fake)
    assert len([w for w in caught if "cannot write" in str(w.message)]) == 1
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        measure(store, fake, modes=("graphed",))  # written nowhere, said once
        assert len(measure(store, fake, modes=("eager", "graphed"))) == 8 and len(fake.calls) == 8


def test_sampling_with_an_unwritable_cache_folder(tmp_path, monkeypatch):
    blocker = tmp_path / "file"
    blocker.write_text("")
    monkeypatch.setenv("ATTNREUSE_CACHE_DIR", str(blocker / "costs"))
    unet = make_unet("sd15")
    with attnreuse.patch(unet, attnreuse.hurry(4, 2)) as handle:
        handle.plans.cost = MeasuredCosts(store=CostStore(), key=KEY, measure=lambda *a: LayerCost(1.0, 1.2, 0.2),
                                          device_types=("cpu",))
        with pytest.warns(UserWarning, match="cannot write the cost table"):
            out = sample(unet, steps=4)
        assert torch.isfinite(out).all() and any(p.reuse for p in handle.plan)


def test_cache_folder_from_the_environment(monkeypatch, tmp_path):
    monkeypatch.setenv("ATTNREUSE_CACHE_DIR", str(tmp_path / "a"))
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "xdg"))
    assert costs.cache_dir() == tmp_path / "a" and CostStore().folder == tmp_path / "a"
    monkeypatch.delenv("ATTNREUSE_CACHE_DIR")
    assert costs.cache_dir() == tmp_path / "xdg" / "attnreuse"
    monkeypatch.delenv("XDG_CACHE_HOME")
    assert costs.cache_dir() == Path.home() / ".cache" / "attnreuse"


def test_device_key_names_every_version():
    key = costs.device_key("cpu")
    assert set(key) == {"gpu", "driver", "torch", "triton", "attnreuse"}
    assert key["gpu"] == "cpu" and key["torch"] == torch.__version__
    assert key["attnreuse"].startswith(attnreuse.__version__ + "+")  # and a hash of the kernels' source


def test_measure_layer_times_the_three_calls_on_cpu():
    cost = costs.measure_layer(SHAPES[0], "fp16", "cpu", torch.float32, mode="eager")
    assert all(math.isfinite(v) and v > 0 for v in (cost.compute, cost.capture, cost.reuse))


def test_a_plan_uses_the_table_of_its_mode(tmp_path):
    """The first generation plans with eager costs (only cross-attention... nothing pays there: a warning);
    handle.prepare(..., mode="graphed") plans the same input with the graphed table (self-attention pays)."""
    unet = make_unet("sd15")
    fake = FakeMeasure()
    x, context = torch.randn(2, 4, 8, 8), torch.randn(2, 7, 32)
    with attnreuse.patch(unet, attnreuse.hurry(4, 2)) as handle:
        handle.plans.cost = MeasuredCosts(store=CostStore(tmp_path), key=KEY, measure=fake, device_types=("cpu",))
        with pytest.warns(UserWarning, match="no layer is worth reusing on cpu"):
            eager = handle.prepare(x, context, 4)
        assert not any(p.reuse for p in eager) and {p.mode for p in eager} == {"eager"}
        graphed = handle.prepare(x, context, 4, mode="graphed")
        assert {p.mode for p in graphed} == {"graphed"} and handle.plans.mode(handle.plans.last) == "graphed"
        assert {p.name for p in graphed if p.reuse} == {p.name for p in graphed if p.name.endswith("attn1")}
        assert handle.prepare(x, context, 4, mode="graphed") is graphed  # made once per mode
        n = len(fake.calls)
        handle.prepare(x, context, 4)  # back to eager: from the table, nothing measured
        assert len(fake.calls) == n and {m for *_, m in fake.calls} == {"eager", "graphed"}
        with pytest.raises(ValueError, match="mode='fast'"):
            handle.prepare(x, context, 4, mode="fast")


# ---- the layering ---------------------------------------------------------------------------------------------

ROOT = Path(attnreuse.__file__).parent


def _modules() -> dict[str, tuple[Path, bool]]:
    out = {}
    for f in ROOT.rglob("*.py"):
        parts = list(f.relative_to(ROOT.parent).with_suffix("").parts)
        package = parts[-1] == "__init__"
        out[".".join(parts[:-1] if package else parts)] = (f, package)
    return out


def _imports(name: str, path: Path, package: bool, modules) -> set[str]:
    """Every attnreuse module ``name`` imports, at the top or inside functions."""
    found = set()
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
        if isinstance(node, ast.Import):
            found |= {a.name for a in node.names if a.name.split(".")[0] == "attnreuse"}
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = name.split(".") if package else name.split(".")[:-1]
                base = base[: len(base) - node.level + 1]
                target = ".".join(base + ([node.module] if node.module else []))
            else:
                target = node.module or ""
            if target.split(".")[0] != "attnreuse":
                continue
            found |= {f"{target}.{a.name}" if f"{target}.{a.name}" in modules else target for a in node.names}
    return {m for m in found if m in modules and m != name}


def test_timing_is_a_leaf_and_no_module_imports_in_a_circle():
    modules = _modules()
    graph = {name: _imports(name, path, package, modules) for name, (path, package) in modules.items()}
    assert graph["attnreuse.timing"] == set()
    assert "attnreuse.patching" not in graph["attnreuse.costs"] | graph["attnreuse.planner"]
    assert "attnreuse.patching" in graph["attnreuse.steps"]
    state: dict[str, int] = {}  # 1: on the path, 2: done

    def visit(name, path):
        state[name] = 1
        for dep in sorted(graph[name]):
            if state.get(dep) == 1:
                pytest.fail("import circle: " + " -> ".join(path[path.index(dep):] + [dep]))
            if dep not in state:
                visit(dep, path + [dep])
        state[name] = 2

    for name in sorted(graph):
        if name not in state:
            visit(name, [name])
