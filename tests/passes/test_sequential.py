"""True-sequential calibration: each linear's Hessian comes from the compressed model so far."""

import copy
import importlib

import pytest
import torch

from fxcompress import GPTQ
from fxcompress.algorithms import Hessian, WeightedCross
from fxcompress.calibration import calibrate
from fxcompress.calibration.frontier import ChunkEnv, Frontier
from fxcompress.passes import capture, find_sites
from fxcompress.passes.capture import call_kwargs
from fxcompress.pipeline import _batch

from ..models import VOCAB, build, output

_interp = importlib.import_module("fxcompress.calibration.interpreter")


def _hessian_of_input(model, module_name, calls):
    h = Hessian.zeros(model.get_submodule(module_name).in_features)
    handle = model.get_submodule(module_name).register_forward_pre_hook(
        lambda m, args: h.add(args[0]))
    with torch.no_grad():
        for args, kwargs in calls:
            model(*args, **kwargs)
    handle.remove()
    return h.value()


def test_later_hessians_see_the_compressed_earlier_layers():
    model = build("llama", layers=2)
    dense = copy.deepcopy(model)
    ids = torch.randint(0, VOCAB, (8, 16), generator=torch.Generator().manual_seed(1))
    calls = _batch([((), call_kwargs(model, (row[None],), {})) for row in ids], 4)
    ep = capture(model, *calls[0])
    sites, _ = find_sites(ep, model)
    seen = {}
    results, _ = calibrate(ep, sites, {s.fqn: GPTQ(2, 32) for s in sites}, calls, progress=False,
                           on_statistics=lambda name, st: seen.setdefault(name, st.hessian))

    def with_compressed(prefixes):
        ref = copy.deepcopy(dense)
        for name, c in results.items():
            if name.startswith(prefixes):
                ref.get_submodule(name).weight.data = c.dense()
        return ref

    # layer 1's q_proj: computed from the model whose layer 0 is compressed
    name = "model.layers.1.self_attn.q_proj"
    expected = _hessian_of_input(with_compressed(("model.layers.0.",)), name, calls)
    dense_h = _hessian_of_input(dense, name, calls)
    assert torch.allclose(seen[name], expected, rtol=1e-4, atol=1e-5 * expected.abs().max())
    assert (seen[name] - dense_h).norm() > 100 * (seen[name] - expected).norm()

    # within a layer: o_proj's input comes from the compressed q/k/v
    name = "model.layers.0.self_attn.o_proj"
    qkv = tuple(f"model.layers.0.self_attn.{p}_proj" for p in "qkv")
    expected = _hessian_of_input(with_compressed(qkv), name, calls)
    assert torch.allclose(seen[name], expected, rtol=1e-4, atol=1e-5 * expected.abs().max())
    assert not torch.allclose(seen[name], _hessian_of_input(dense, name, calls), rtol=1e-3)


def test_linears_reading_the_same_input_share_one_hessian():
    model = build("llama", layers=1)
    ids = torch.randint(0, VOCAB, (4, 16))
    calls = _batch([((), call_kwargs(model, (row[None],), {})) for row in ids], 4)
    ep = capture(model, *calls[0])
    sites, _ = find_sites(ep, model)
    seen = {}
    calibrate(ep, sites, {s.fqn: GPTQ(4, 32) for s in sites}, calls, progress=False,
              on_statistics=lambda name, st: seen.setdefault(name, st.hessian))
    q, k, v = (seen[f"model.layers.0.self_attn.{p}_proj"] for p in "qkv")
    assert q is k is v
    assert seen["model.layers.0.mlp.gate_proj"] is seen["model.layers.0.mlp.up_proj"]


def _inputs_of(model, module_name, calls):
    rows = []
    handle = model.get_submodule(module_name).register_forward_pre_hook(
        lambda m, args: rows.append(args[0].reshape(-1, args[0].shape[-1])))
    with torch.no_grad():
        for args, kwargs in calls:
            model(*args, **kwargs)
    handle.remove()
    return torch.cat(rows)


def test_dense_output_sees_the_dense_models_inputs():
    """With dense_output, the cross moment at a layer is 2(X − X̃)ᵀX̃/n with X the *dense*
    model's input and X̃ the input of the model compressed so far, both computed by hooks
    (the dense path runs its own plan, past the barriers). ``down_proj``, with three times
    as many inputs as outputs here, gets it as ``W C``, the form the solve uses."""
    model = build("llama", layers=2, intermediate=384)
    dense = copy.deepcopy(model)
    ids = torch.randint(0, VOCAB, (8, 16), generator=torch.Generator().manual_seed(2))
    calls = _batch([((), call_kwargs(model, (row[None],), {})) for row in ids], 4)
    ep = capture(model, *calls[0])
    sites, _ = find_sites(ep, model)
    seen = {}
    plan = {s.fqn: GPTQ(2, 32, dense_output=True) for s in sites if s.fqn != "lm_head"}
    results, _ = calibrate(ep, sites, plan, calls, progress=False,
                           on_statistics=lambda name, st: seen.setdefault(name, st))
    compressed = copy.deepcopy(dense)
    for name, c in results.items():
        compressed.get_submodule(name).weight.data = c.dense()
    for name in ("model.layers.0.self_attn.q_proj", "model.layers.0.mlp.down_proj",
                 "model.layers.1.self_attn.o_proj", "model.layers.1.mlp.gate_proj"):
        x, x_tilde = _inputs_of(dense, name, calls), _inputs_of(compressed, name, calls)
        n = x.shape[0]
        h = 2 * x_tilde.t() @ x_tilde / n
        cross = 2 * (x - x_tilde).t() @ x_tilde / n
        st = seen[name]
        assert st.count == n
        torch.testing.assert_close(st.hessian, h, rtol=1e-4, atol=1e-5 * h.abs().max())
        if name.endswith("q_proj"):  # nothing compressed before it: no drift at all
            assert torch.count_nonzero(st.cross) == 0
            continue
        if name.endswith("down_proj"):  # fewer outputs than inputs: gathered as W C
            assert isinstance(st.cross, WeightedCross)
            cross = dense.get_submodule(name).weight.detach() @ cross
            got = st.cross.wc
        else:
            got = st.cross
        torch.testing.assert_close(got, cross, rtol=1e-3, atol=1e-4 * cross.abs().max())
        assert cross.abs().max() > 1e-3 * h.abs().max()  # a real drift was measured


def test_frontier_the_run_holds_is_the_estimates(monkeypatch):
    """The values kept for all chunks across barriers, both paths of dense-output included
    (each with its own plan), never exceed what the memory estimate plans for them, and reach
    it: chunk by chunk, a segment releases what it read for the last time as it adds what it
    hands on."""
    from fxcompress.calibration import estimate as memory
    from fxcompress.calibration.estimate import estimate_memory

    model = build("llama", hidden=64, layers=2)
    ids = torch.randint(0, VOCAB, (12, 16), generator=torch.Generator().manual_seed(3))
    calls = _batch([((), call_kwargs(model, (row[None],), {})) for row in ids], 4)
    ep = capture(model, *calls[0])
    sites, _ = find_sites(ep, model)
    plan = {s.fqn: GPTQ(4, 32) for s in sites if s.fqn != "lm_head"}  # dense-output default
    planned, frontier_peak = [], memory._frontier_peak

    def record(before, keep, costs):  # called once per path and segment
        planned.append(frontier_peak(before, keep, costs))
        return planned[-1]

    monkeypatch.setattr(memory, "_frontier_peak", record)
    estimate_memory(ep, sites, plan, calls)
    frontiers, held = [], [0]

    def measure():
        storages = {t.untyped_storage().data_ptr(): t.untyped_storage().nbytes()
                    for f in frontiers for slots in f.values.values() for v in slots
                    if v is not None for t in torch.utils._pytree.tree_leaves(v)
                    if isinstance(t, torch.Tensor)}
        held[0] = max(held[0], sum(storages.values()))

    init, put, release = Frontier.__init__, Frontier.put, Frontier.release

    def tracked(method):
        def call(self, *args, **kwargs):
            method(self, *args, **kwargs)
            measure()
        return call

    def created(self, *args, **kwargs):
        init(self, *args, **kwargs)
        frontiers.append(self)

    monkeypatch.setattr(Frontier, "__init__", created)
    monkeypatch.setattr(Frontier, "put", tracked(put))
    monkeypatch.setattr(Frontier, "release", tracked(release))
    calibrate(ep, sites, plan, calls, progress=False)
    assert len(frontiers) == 2  # the compressed and the dense path
    peak = max(planned[i] + planned[i + 1] for i in range(0, len(planned), 2))
    assert 0.9 * peak <= held[0] <= peak


def _llama_w4(seed: int):
    """A 2-layer llama, 12 samples in batches of 4, its program, sites and a GPTQ w4 plan
    (dense-output by default) for every linear but the head."""
    model = build("llama", hidden=64, layers=2)
    ids = torch.randint(0, VOCAB, (12, 16), generator=torch.Generator().manual_seed(seed))
    calls = _batch([((), call_kwargs(model, (row[None],), {})) for row in ids], 4)
    ep = capture(model, *calls[0])
    sites, _ = find_sites(ep, model)
    return model, ids, calls, ep, sites, {s.fqn: GPTQ(4, 32) for s in sites
                                          if s.fqn != "lm_head"}


def test_dense_path_hands_on_the_layer_output_past_the_barrier(monkeypatch):
    """The dense path of dense-output computes with the original weights, so its segment at
    ``down_proj``'s barrier runs on through ``down_proj`` and the residual add and hands on
    the layer's output, where the compressed path must keep the 4×-wide MLP intermediate
    (at a price that does not recompute it, as for wide models): the dense frontier there
    is a fraction of the compressed one. The estimate counts each path with its own plan."""
    from fxcompress.calibration import estimate as memory
    from fxcompress.calibration import liveness
    from fxcompress.calibration.estimate import estimate_memory
    from fxcompress.calibration.schedule import schedule

    model, ids, calls, ep, sites, plan = _llama_w4(seed=4)
    sched = schedule(ep.graph_module, sites, plan)
    price = 64.0  # keep the intermediate: recomputing it costs 64 flops a byte here
    live, dense = liveness.plan_paths(ep, sched, calls[0], price, True)
    bind = liveness.symbols(ep, calls[0])

    def held(nodes):
        return sum(liveness.value_bytes(r, bind) for r in {liveness.root(n) for n in nodes})

    k = next(i for i, seg in enumerate(live.segments) if seg.barrier is not None and
             sched.groups[seg.barrier][0].fqn == "model.layers.0.mlp.down_proj")
    x = live.segments[k].barrier
    assert x in live.segments[k].keep and x not in dense.segments[k].keep
    assert dense.segments[k].end > live.segments[k].end  # it ran past the barrier
    assert held(dense.segments[k].keep) <= 0.5 * held(live.segments[k].keep)
    assert all(held(d.keep) <= held(c.keep) for c, d in
               zip(live.segments, dense.segments, strict=True))

    shared = memory.segment_peaks  # the old plan: the dense path keeps what the other keeps
    with monkeypatch.context() as m:
        m.setattr(memory, "segment_peaks", lambda live, groups, costs, dense_live=None:
                  shared(live, groups, costs, None))
        before = max(s.total for s in estimate_memory(ep, sites, plan, calls, recompute=price))
    after = max(s.total for s in estimate_memory(ep, sites, plan, calls, recompute=price))
    assert after < before


def test_memory_fallbacks_recompute_before_offloading():
    """compile(max_memory=...) runs the default plan when it fits, recomputes whatever saves
    memory when only that fits, and offloads the frontier only after that."""
    import fxcompress
    from fxcompress.api import InMemory, Rewrite, memory_tries
    from fxcompress.calibration import EAGER, PRICE
    from fxcompress.pipeline import Planned, _estimator, fit_memory

    model, ids, calls, ep, sites, plan = _llama_w4(seed=4)
    tries = memory_tries(torch.device("cpu"))
    estimate = _estimator(Planned(ep, sites, plan, {}), calls, InMemory(model), Rewrite(model))
    offload, price, full = fit_memory(tries, estimate, None)
    assert (offload, price) == (None, PRICE)
    offload, price, peak = fit_memory(tries, estimate, full - 1)
    assert (offload, price) == (None, EAGER) and peak < full
    offload, _, lowest = fit_memory(tries, estimate, peak - 1)
    assert offload == "disk" and lowest < peak

    fxcompress.compile(model, ids, plan, progress=False, batch_size=4, max_memory=peak)
    assert model.fxcompress_report.offload is None


def test_a_site_without_dense_output_ignores_its_group_mates_cross_moment():
    """q/k/v share one input: when only q_proj asks for dense-output, k_proj and v_proj are
    still solved on the plain objective (the same result as when no site asks for it)."""
    _, _, calls, ep, sites, w4 = _llama_w4(seed=4)
    plain = {name: GPTQ(3, 32, dense_output=False) for name in w4}
    q = "model.layers.1.self_attn.q_proj"
    mixed = {**plain, q: GPTQ(3, 32, dense_output=True)}
    ref, _ = calibrate(ep, sites, plain, calls, progress=False)
    got, _ = calibrate(ep, sites, mixed, calls, progress=False)
    for p in "kv":
        name = f"model.layers.1.self_attn.{p}_proj"
        assert torch.equal(got[name].dense(), ref[name].dense()), name
    assert not torch.equal(got[q].dense(), ref[q].dense())


def test_recomputing_gives_the_same_results_as_keeping():
    """docs/SCALING.md: recomputed values are computed with the same weights as the first
    time, so the liveness plan (keep everything, the default price, recompute eagerly) does
    not change a single code."""
    from fxcompress.calibration.liveness import EAGER, PRICE, plan_paths
    from fxcompress.calibration.schedule import schedule

    _, _, calls, ep, sites, plan = _llama_w4(seed=5)
    sched = schedule(ep.graph_module, sites, plan)
    recomputed = [sum(len(s.recomputed) for live in plan_paths(ep, sched, calls[0], r, True)
                      for s in live.segments) for r in (None, PRICE, EAGER)]
    assert recomputed[0] == 0 and 0 < recomputed[1] <= recomputed[2]
    runs = [calibrate(ep, sites, plan, calls, progress=False, recompute=r)[0]
            for r in (None, PRICE, EAGER)]
    for name in plan:
        for got in runs[1:]:
            assert torch.equal(got[name].dense(), runs[0][name].dense()), name


class _Aliasing(torch.nn.Module):
    """``h`` is read for the last time by ``silu`` while a view of it is still to be read:
    writing the result in place would change what follows. (Export routes the later read of
    ``y`` through its no-op ``to``, so one tensor under two names is left to the unit test
    below.)"""

    def __init__(self):
        super().__init__()
        self.a, self.b, self.c = (torch.nn.Linear(32, 64), torch.nn.Linear(64, 32),
                                  torch.nn.Linear(32, 32))

    def forward(self, x):
        h = self.a(x)
        v = h.view(*h.shape[:-1], 8, 8)
        g = torch.nn.functional.silu(h) * 2
        y = self.b(g + v.flatten(-2))
        return self.c(y.to(torch.float32) * 3 + y + x)


@pytest.mark.parametrize("arch", ["llama", "gpt2", "opt", "qwen2moe", "aliasing"])
def test_results_written_in_place_equal_fresh_ones(arch, monkeypatch):
    """Elementwise ops write into an input that dies with them (``_Interpreter.dying``): the
    compressed model is bit for bit the one computed with a fresh tensor for every result,
    and the in-place path does run."""
    from fxcompress import Recipe, compile

    torch.manual_seed(3)
    if arch == "aliasing":
        dense, data = _Aliasing(), torch.randn(12, 16, 32)
    else:
        dense, data = build(arch, hidden=64), torch.randint(0, VOCAB, (12, 16))
    calls = []
    table = {op: (lambda *a, f=f, **k: calls.append(f) or f(*a, **k), pos)
             for op, (f, pos) in _interp._IN_PLACE.items()}
    models = []
    for in_place in (table, {}):
        monkeypatch.setattr(_interp, "_IN_PLACE", in_place)
        m = copy.deepcopy(dense)
        compile(m, data, Recipe({"lm_head": None, ".*": GPTQ(4, 32)}), progress=False)
        models.append(m)
    assert calls, "nothing was computed in place"
    run = (lambda m: m(data[:2])) if arch == "aliasing" else (lambda m: output(m, data[:2]))
    with torch.no_grad():
        assert torch.equal(run(models[0]), run(models[1]))
    for (name, t), (_, u) in zip(models[0].state_dict().items(),
                                 models[1].state_dict().items(), strict=True):
        assert torch.equal(t, u), name


def test_a_value_held_twice_is_not_written_in_place():
    """An op may hand on its input itself (a no-op ``to`` or ``alias``): then two nodes hold
    one tensor, and the one read for the last time must not take a result."""
    from torch import fx


    def f(x):
        a = torch.ops.aten.mul.Tensor(x, 2.0)
        b = torch.ops.aten.alias.default(a)
        return torch.ops.aten.mul.Tensor(a, 3.0), b

    gm = fx.symbolic_trace(f)
    _, a, b, c, _ = gm.graph.nodes
    for held_twice in (True, False):
        interp = _interp.Interpreter(gm)
        interp.env = env = ChunkEnv(0, Frontier(1), {})
        env[a] = torch.randn(64)
        before = env[a].clone()
        if held_twice:
            env[b] = env[a]
        interp.dying = [a]
        out = interp.run_node(c)
        torch.testing.assert_close(out, before * 3, rtol=1e-6, atol=0)
        assert (out is env[a]) is not held_twice  # written in place only when held once
        if held_twice:
            assert torch.equal(env[b], before)


def test_an_integer_input_does_not_take_a_float_result():
    """``div`` and ``rsqrt`` of integers make floats: such an input keeps its own values."""
    from torch import fx


    def f(x):
        return torch.ops.aten.div.Tensor(x, 3), torch.ops.aten.rsqrt.default(x + 1)

    gm = fx.symbolic_trace(f)
    interp = _interp.Interpreter(gm)
    interp.env = env = ChunkEnv(0, Frontier(1), {})
    x = torch.randint(1, 100, (64,))
    for n in gm.graph.nodes:
        if n.op == "placeholder":
            env[n] = x.clone()
        elif n.op == "call_function":
            interp.dying = list(n.all_input_nodes)
            env[n] = interp.run_node(n)
    div, _, rsqrt = [env[n] for n in gm.graph.nodes if n.op == "call_function"]
    torch.testing.assert_close(div, x / 3, rtol=1e-6, atol=0)
    torch.testing.assert_close(rsqrt, torch.rsqrt(x + 1.0), rtol=1e-6, atol=0)
