"""torch.compile on the fast path: same results, fixed batch size, a persistent cache (slow)."""

from __future__ import annotations

import subprocess
import sys
import textwrap

import numpy as np
import pytest
import torch
from torch._dynamo.utils import counters

from engine.fast import FastOptions, fast_module
from engine.images import list_images, load_preprocessed

from conftest import ROOT

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def batch(shared_images, model) -> torch.Tensor:
    entries = list_images(shared_images)[::25][:10]
    images = np.stack([load_preprocessed(shared_images / e.path, model.preprocessing) for e in entries])
    return model.preprocessing.normalize(torch.from_numpy(images))


def test_compiled_matches_eager_without_recompiling_for_smaller_batches(model, batch, tmp_path, monkeypatch):
    monkeypatch.setenv("NEUROCAT_COMPILE_CACHE", str(tmp_path))
    with torch.inference_mode():
        ref = model.module(batch)
    fm = fast_module(model, ("_blocks.5",), options=FastOptions(compile=True))
    with torch.inference_mode():
        logits, acts = fm(batch[:8])  # compiles for batches of 8
        assert fm.form == "compiled" and fm.compile_seconds > 0
        frames = counters["frames"]["ok"]
        rest, rest_acts = fm(batch[4:10])  # 6 images: padded to 8, the same graph
        assert counters["frames"]["ok"] == frames
        small, _ = fm(batch[:2])  # a probe of 2: the folded graph, no compilation either
        fm(batch[:8].contiguous())  # an inference tensor in another layout: converted, no recompilation
        assert counters["frames"]["ok"] == frames
    assert (logits - ref[:8]).abs().max().item() < 1e-3
    assert (rest - ref[4:10]).abs().max().item() < 1e-3
    assert (small - ref[:2]).abs().max().item() < 1e-3
    assert torch.equal(logits.argmax(1), ref[:8].argmax(1))
    torch.testing.assert_close(rest_acts["_blocks.5"][:4], acts["_blocks.5"][4:8], atol=1e-4, rtol=1e-4)


def test_auto_compiles_once_eager_time_exceeds_the_expected_compile_time(model, batch, tmp_path, monkeypatch):
    """Ski rental: in auto mode the model compiles after it has spent, running eager, as long
    as compiling is expected to take (the last measured compile time of this graph)."""
    monkeypatch.setenv("NEUROCAT_COMPILE_CACHE", str(tmp_path))
    fm = fast_module(model, ("_blocks.10",), options=FastOptions(compile=None))
    with torch.inference_mode():
        fm(batch[:8])
        assert fm.form == "fused"  # a cold compile (about 60 s) is not worth one batch
        fm.record.save(0.0)  # pretend this graph compiles in no time now
        fm(batch[:8])
        assert fm.compiled is not None
        fm(batch[:8])
    assert fm.form == "compiled" and fm.compile_seconds is not None


SCRIPT = textwrap.dedent("""
    import sys, torch
    sys.path.insert(0, {root!r})
    from engine.fast import FastOptions, fast_module
    from engine.models import load_model
    fm = fast_module(load_model(), ("_blocks.5",), options=FastOptions(compile=True))
    with torch.inference_mode():
        fm(torch.zeros(8, 3, 224, 224))
    print(fm.compile_seconds)
""")


def test_compile_cache_makes_the_second_run_cheaper(tmp_path):
    env = {"NEUROCAT_COMPILE_CACHE": str(tmp_path / "cache"), "PATH": "/usr/bin:/bin"}
    script = SCRIPT.format(root=str(ROOT))

    def compile_seconds() -> float:
        out = subprocess.run([sys.executable, "-c", script], env=env, capture_output=True, text=True, check=True)
        return float(out.stdout.strip().splitlines()[-1])

    first, second = compile_seconds(), compile_seconds()
    assert second < 0.6 * first, (first, second)
    assert any((tmp_path / "cache").rglob("*.txt"))  # the measured time, for the auto policy
