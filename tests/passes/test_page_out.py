"""A compressed layer's original weight, mapped from the checkpoint file, is paged out once the
run no longer reads it (``Run.page_out``): the process holds fewer of the file's pages, and
the compressed model is the same."""

import importlib
import sys

import pytest
import torch

from fxcompress import GPTQ, Recipe, SparseGPT, compile

from ..models import VOCAB, build, output

_cal = importlib.import_module("fxcompress.osmem")

pytestmark = pytest.mark.skipif(not sys.platform.startswith("linux"),
                                reason="page-out reads /proc/self/maps and calls madvise")


def _file_rss(path) -> int:
    """Resident bytes of this process's mappings of ``path`` (/proc/self/smaps)."""
    total, inside = 0, False
    with open("/proc/self/smaps") as f:
        for line in f:
            head = line.split()
            if "-" in head[0] and len(head) >= 5 and ":" not in head[0]:
                inside = len(head) == 6 and head[5] == str(path)
            elif inside and head[0] == "Rss:":
                total += int(head[1]) * 1024
    return total


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    folder = tmp_path_factory.mktemp("ckpt")
    build("llama", hidden=256, layers=3).save_pretrained(folder)
    return folder


def _load(folder):
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32).eval()


@pytest.mark.parametrize("method", [GPTQ(4, 64), SparseGPT(0.5)], ids=["gptq", "sparsegpt"])
def test_compressed_weights_mapped_from_the_file_are_paged_out(checkpoint, method,
                                                               monkeypatch):
    data = torch.randint(0, VOCAB, (8, 32), generator=torch.Generator().manual_seed(0))
    recipe = Recipe({"lm_head": None, ".*": method})
    model = _load(checkpoint)
    linears = {n: m.weight for n, m in model.named_modules()
               if isinstance(m, torch.nn.Linear) and n != "lm_head"}
    assert all(_cal.file_mapped(list(linears.values())))
    assert _cal.file_mapped([torch.randn(256, 256)]) == [False]
    paged = []
    real = _cal.page_out
    monkeypatch.setattr(_cal, "page_out", lambda t: paged.append(t.data_ptr()) or real(t))
    compile(model, data, recipe, progress=False)
    file = checkpoint / "model.safetensors"
    rss = _file_rss(file)

    monkeypatch.setattr(_cal, "page_out", lambda t: None)
    kept = _load(checkpoint)
    compile(kept, data, recipe, progress=False)
    rss_kept = _file_rss(file)

    with torch.no_grad():
        assert torch.equal(output(model, data[:2]), output(kept, data[:2]))
    for (name, t), (_, u) in zip(model.state_dict().items(), kept.state_dict().items(),
                                 strict=True):
        assert torch.equal(t, u), name
    weight_bytes = sum(w.numel() * w.element_size() for w in linears.values())
    if isinstance(method, GPTQ):
        # every compressed weight once; never the embedding or a norm
        assert sorted(paged) == sorted(w.data_ptr() for w in linears.values())
        assert rss <= rss_kept - weight_bytes // 2, (rss, rss_kept, weight_bytes)
    else:  # a pruned weight holds its result (folded): it is not the file's any more
        assert paged == []
