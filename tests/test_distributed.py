"""attnkit.distributed on CPU with gloo: 2, 3 and 4 processes, every method and layout,
against one process computing the whole sequence.

Each world size is one set of processes that runs every case and reports per case, so the
processes start once per world size (starting torch dominates a case's cost).
"""

from __future__ import annotations

import datetime
import json
import math
import os
import socket
import time
import traceback
import zlib

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

import attnkit
from attnkit import reference
from attnkit.testing import accuracy

HQ, D, CHUNK = 12, 8, 3  # 12 heads split over 2, 3 or 4 ranks; 2P chunks of 3 positions

OPTION_SETS = {
    "plain": {},
    "causal": {"causal": True},
    "window": {"window": (4, 2)},
    "causal-window": {"causal": True, "window": (5, -1)},
    "softcap-scale": {"causal": True, "softcap": 2.5, "scale": 0.7},
    "gqa": {"causal": True, "hkv": 4},
    "mqa-window": {"window": (3, 6), "hkv": 1},
    "lse-loss": {"causal": True, "lse_loss": True},
    "small-causal": {"causal": True, "batch": 1, "heads": 2},  # for interpreted kernels
    "small-mqa": {"causal": True, "batch": 1, "heads": 2, "hkv": 1},
    "long-causal": {"causal": True, "batch": 1, "chunk": 96, "hkv": 4},  # many kernel tiles
}
METHODS = ("p2p", "allgather", "ulysses")
LAYOUTS = ("headtail", "contiguous")


def installed(name: str) -> bool:
    """Whether backend ``name`` is registered and can run here (the core's test session has
    only the built-in reference; plugin backends join where their plugins are installed)."""
    registration = attnkit.backends().get(name)
    return registration is not None and registration.availability[0]


def fast_backend() -> str:
    """torch-blocked where installed, else the reference (which computes the same)."""
    return "torch-blocked" if installed("torch-blocked") else "reference"


# -- process harness ------------------------------------------------------------------------

def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _entry(fn_name, rank, world, port, outdir, timeout_s, pg_backend, args):
    torch.set_num_threads(1)
    result = {"rank": rank}
    try:
        device_id = None
        if pg_backend == "nccl":
            device_id = torch.device("cuda", rank)
            torch.cuda.set_device(device_id)
        dist.init_process_group(pg_backend, init_method=f"tcp://127.0.0.1:{port}", rank=rank,
                                world_size=world, device_id=device_id,
                                timeout=datetime.timedelta(seconds=timeout_s))
        result["value"] = globals()[fn_name](rank, world, *args)
    except BaseException:  # reported to the test, which fails with it
        result["error"] = traceback.format_exc()
    with open(os.path.join(outdir, f"{rank}.json"), "w") as f:
        json.dump(result, f)
    if "error" not in result:
        dist.destroy_process_group()


def _spawn(fn_name, world, tmp_path, *args, pg_timeout_s=60, deadline_s=300,
           pg_backend="gloo"):
    """Run ``fn_name(rank, world, *args)`` on ``world`` processes (gloo, or NCCL with one GPU
    per rank); per-rank values."""
    ctx = mp.get_context("spawn")
    port = _free_port()
    procs = [ctx.Process(target=_entry, args=(fn_name, r, world, port, str(tmp_path),
                                              pg_timeout_s, pg_backend, args))
             for r in range(world)]
    for p in procs:
        p.start()
    end = time.monotonic() + deadline_s
    for p in procs:
        p.join(max(0.0, end - time.monotonic()))
    hung = [r for r, p in enumerate(procs) if p.is_alive()]
    for p in procs:
        if p.is_alive():
            p.kill()
            p.join()
    assert not hung, f"rank(s) {hung} still running after {deadline_s} s"
    results = []
    for r in range(world):
        path = tmp_path / f"{r}.json"
        assert path.exists(), f"rank {r} exited (code {procs[r].exitcode}) without a result"
        results.append(json.loads(path.read_text()))
    errors = [res["error"] for res in results if "error" in res]
    assert not errors, "\n".join(errors)
    return [res["value"] for res in results]


# -- the cases, run inside each process -----------------------------------------------------

class _CommCounter:
    """Counts the torch.distributed calls attnkit.distributed makes (it looks them up on the
    module at call time)."""

    NAMES = ("batch_isend_irecv", "all_gather", "reduce_scatter", "all_to_all_single")
    #: The collective each name counts: torch's newer name where it has it (the older one
    #: calls it), else the older.
    REAL = {"all_gather": ("all_gather_single", "all_gather_into_tensor"),
            "reduce_scatter": ("reduce_scatter_single", "reduce_scatter_tensor")}

    def __init__(self):
        self.counts = dict.fromkeys(self.NAMES, 0)
        self.p2p_ops = 0
        self._saved = {}

    def __enter__(self):
        for name in self.NAMES:
            attr = next(a for a in self.REAL.get(name, (name,)) if hasattr(dist, a))
            real = getattr(dist, attr)
            self._saved[attr] = real

            def counted(*a, _name=name, _real=real, **kw):
                self.counts[_name] += 1
                if _name == "batch_isend_irecv":
                    self.p2p_ops += len(a[0])
                return _real(*a, **kw)
            setattr(dist, attr, counted)
        return self

    def __exit__(self, *exc):
        for name, real in self._saved.items():
            setattr(dist, name, real)

    def take(self):
        counts, self.counts = self.counts, dict.fromkeys(self.NAMES, 0)
        counts["p2p_ops"], self.p2p_ops = self.p2p_ops, 0
        return counts


def _inputs(world, options, dtype, seed, device="cpu"):
    g = torch.Generator().manual_seed(seed)
    S = 2 * world * options.get("chunk", CHUNK)
    B, hq = options.get("batch", 2), options.get("heads", HQ)
    hkv = options.get("hkv", hq)
    q = torch.randn(B, hq, S, D, generator=g, dtype=torch.float64)
    k = torch.randn(B, hkv, S, D, generator=g, dtype=torch.float64)
    v = torch.randn(B, hkv, S, D, generator=g, dtype=torch.float64)
    dout = torch.randn(B, hq, S, D, generator=g, dtype=torch.float64)
    dlse = torch.randn(B, hq, S, generator=g, dtype=torch.float64)
    return ([t.to(device, dtype) for t in (q, k, v)], dout.to(device), dlse.to(device))


def _attention_options(options):
    return {key: options[key] for key in ("causal", "window", "softcap", "scale")
            if key in options}


def _whole(fn, q, k, v, dout, dlse, lse_loss):
    """out, lse, dq, dk, dv of ``fn`` on leaf copies; loss = <out, dout> (+ <lse, dlse>)."""
    q, k, v = (t.detach().clone().requires_grad_() for t in (q, k, v))
    out, lse = fn(q, k, v)
    loss = (out.double() * dout).sum()
    if lse_loss:
        loss = loss + (lse.double() * dlse).sum()
    loss.backward()
    return [out.detach(), lse.detach(), q.grad, k.grad, v.grad]


def _sharded(method, layout, backend, options, q, k, v, dout, dlse, counter):
    from attnkit.distributed import ring_attention, shard, ulysses_attention

    qs, ks, vs = (shard(t, layout=layout).requires_grad_() for t in (q, k, v))
    counter.take()  # what the checks of the case before communicated
    kwargs = dict(_attention_options(options), layout=layout, return_lse=True,
                  backend=backend)
    if method == "ulysses":
        out, lse = ulysses_attention(qs, ks, vs, **kwargs)
    else:
        out, lse = ring_attention(qs, ks, vs, comm=method, **kwargs)
    forward_counts = counter.take()
    loss = (out.double() * shard(dout, layout=layout)).sum()
    if options.get("lse_loss"):
        loss = loss + (lse.double() * shard(dlse, layout=layout)).sum()
    loss.backward()
    return [out.detach(), lse.detach(), qs.grad, ks.grad, vs.grad], forward_counts, \
        counter.take()


def _expected_counts(method, world, lse_loss):
    gathers = {"all_gather": 1}  # the agreement every call starts with
    if method == "p2p":
        fwd = {**gathers, "batch_isend_irecv": world - 1, "p2p_ops": 2 * (world - 1)}
        # K/V go round W - 1 times and dK/dV W times, home again; alone, a rank sends nothing.
        sends = 2 * world - 1 if world > 1 else 0
        bwd = {"batch_isend_irecv": sends, "p2p_ops": 2 * sends}
    elif method == "allgather":
        fwd = {"all_gather": 2}
        bwd = {"all_gather": 1, "reduce_scatter": 1}
    else:
        fwd = {**gathers, "all_to_all_single": 4}  # q, k and v, out, lse
        bwd = {"all_to_all_single": 4 if lse_loss else 3}
    full = dict.fromkeys(_CommCounter.NAMES, 0)
    full["p2p_ops"] = 0
    return {**full, **fwd}, {**full, **bwd}


NAMES = ("out", "lse", "dq", "dk", "dv")


def run_cases(rank, world, cases, device="cpu"):
    """Every case in ``cases``: compare this rank's shards with the whole-sequence run.
    Returns one failure message per failing case (empty when all pass) and the largest
    relative float64 difference seen."""
    from attnkit.distributed import shard, unshard

    failures, worst = [], 0.0
    with _CommCounter() as counter:
        for method, layout, opt_name, dtype_name, backend in cases:
            label = f"{method}/{layout}/{opt_name}/{dtype_name}/{backend}"
            try:
                options = OPTION_SETS[opt_name]
                dtype = getattr(torch, dtype_name)
                lse_loss = bool(options.get("lse_loss"))
                seed = zlib.crc32(label.encode())
                if device == "cuda":
                    device = f"cuda:{rank}"
                (q, k, v), dout, dlse = _inputs(world, options, dtype, seed, device)
                att = _attention_options(options)
                got, fwd, bwd = _sharded(method, layout, backend, options, q, k, v, dout, dlse,
                                         counter)
                want_fwd, want_bwd = _expected_counts(method, world, lse_loss)
                if (fwd, bwd) != (want_fwd, want_bwd):
                    failures.append(f"{label}: communication forward {fwd}, backward {bwd}; "
                                    f"expected {want_fwd}, {want_bwd}")

                def on(backend_name, cast=None, att=att):
                    def fn(q, k, v):
                        if cast is not None:
                            q, k, v = (t.to(cast) for t in (q, k, v))
                        return attnkit.attention(q, k, v, return_lse=True, backend=backend_name,
                                                 **att)
                    return fn

                whole = _whole(on(backend), q, k, v, dout, dlse, lse_loss)
                mine = [shard(t, layout=layout) for t in whole]
                if dtype == torch.float64:  # the same backend on the whole sequence
                    for name, a, b in zip(NAMES, got, mine):
                        scale = max(1.0, float(b[torch.isfinite(b)].abs().max()))
                        err = accuracy.max_abs(a, b)
                        worst = max(worst, err / scale)
                        if not err <= 1e-12 * scale:
                            failures.append(f"{label} rank {rank}: {name} differs from one "
                                            f"process by {err:.3e} (scale {scale:.3g})")
                else:  # the suite's accuracy rule against the float64 oracle
                    ref64 = [shard(t, layout=layout) for t in _whole(
                        on("reference", torch.float64), q, k, v, dout, dlse, lse_loss)]

                    def plain(q, k, v, att=att):
                        return reference.safe(q, k, v, **att)
                    ref_lp = [shard(t, layout=layout)
                              for t in _whole(plain, q, k, v, dout, dlse, lse_loss)]
                    # gradients: the suite's second low-precision reference, the contract's
                    # backward in float32 from the state saved (the sharded run's out and lse)
                    state = (unshard(got[0], layout=layout), unshard(got[1], layout=layout))
                    saved = [shard(g, layout=layout) for g in reference.backward(
                        *(t.float() for t in (q, k, v, *state, dout)),
                        dlse=dlse.float() if lse_loss else None, **att)]
                    for i, name in enumerate(NAMES):
                        factor = accuracy.OUT_FACTOR if i < 2 else accuracy.GRAD_FACTOR
                        lps = [ref_lp[i]] if i < 2 else [ref_lp[i], saved[i - 2]]
                        ok, msg = accuracy.check(name, got[i], ref64[i], lps, dtype, factor)
                        if not ok:
                            failures.append(f"{label} rank {rank}: {msg}")
            except Exception:
                failures.append(f"{label} rank {rank}: {traceback.format_exc()}")
    return {"failures": failures, "worst_float64": worst}


def _all_cases():
    fast = fast_backend()
    cases = [(m, lay, o, "float64", fast)
             for m in METHODS for lay in LAYOUTS for o in OPTION_SETS
             if "small" not in o and "long" not in o]
    if fast != "reference":
        cases += [(m, "headtail", o, "float64", "reference")
                  for m in METHODS for o in ("causal", "mqa-window")]
    cases += [(m, lay, o, "float32", fast)
              for m in METHODS for lay in LAYOUTS for o in ("causal", "window", "gqa")]
    cases += [(m, "headtail", o, "bfloat16", fast)
              for m in METHODS for o in ("causal", "softcap-scale")]
    return cases


@pytest.mark.parametrize("world", [1, 2, 3, 4])
def test_every_method_and_layout_matches_one_process(world, tmp_path):
    """float64 to 1e-12 at every world size (the error does not grow with it), fp32 and
    bf16 within the accuracy rule; out, lse, dq, dk, dv; communication counted per call.
    Also `run_helpers` (shard/unshard) at this world size."""
    per_rank = _spawn("run_cases_and_helpers", world, tmp_path, _all_cases())
    for r in per_rank:
        assert all(r["helpers"].values()), r["helpers"]
    failures = [f for r in per_rank for f in r["failures"]]
    assert not failures, "\n".join(failures)
    print(f"world {world}: largest relative float64 difference from one process "
          f"{max(r['worst_float64'] for r in per_rank):.2e}")


def test_triton_interpreted_on_cpu(tmp_path, monkeypatch):
    """The triton backend (its interpreter on CPU) runs every method's blocks, where its
    plugin is installed (the triton conformance session checks its blocks in one process)."""
    monkeypatch.setenv("TRITON_INTERPRET", "1")  # the processes inherit it
    pytest.importorskip("triton", reason="the triton plugin's package is not installed")
    if "triton" not in attnkit.backends():
        pytest.skip("the triton plugin is not installed")
    cases = [("p2p", "headtail", "small-causal", "float32", "triton"),
             ("allgather", "contiguous", "small-causal", "float32", "triton"),
             ("ulysses", "headtail", "small-mqa", "float32", "triton")]
    failures = [f for r in _spawn("run_cases", 2, tmp_path, cases) for f in r["failures"]]
    assert not failures, "\n".join(failures)


# -- refusals, agreement and failure mid-call -----------------------------------------------

def run_refusals(rank, world):
    from attnkit.distributed import CallMismatchError, ring_attention, ulysses_attention

    seen = {}

    def outcome(fn):
        try:
            fn()
        except (CallMismatchError, ValueError, TypeError) as e:
            return f"{type(e).__name__}: {e}"
        return "ran"

    x = torch.randn(1, 4, 8, 8)
    be = fast_backend()
    other = torch.randn(1, 4, 6 if rank == 1 else 8, 8)
    seen["shape-mismatch"] = outcome(lambda: ring_attention(other, other, other, backend=be))
    seen["odd-local-headtail"] = outcome(
        lambda: ring_attention(*(torch.randn(1, 4, 5, 8),) * 3, backend=be))
    seen["odd-local-contiguous"] = outcome(
        lambda: ring_attention(*(torch.randn(1, 4, 5, 8),) * 3, layout="contiguous",
                               backend=be))
    seen["option-mismatch"] = outcome(lambda: ring_attention(x, x, x, causal=rank == 0, backend=be))
    seen["heads-ulysses"] = outcome(
        lambda: ulysses_attention(*(torch.randn(1, 3, 8, 8),) * 3, backend=be))
    seen["bad-comm"] = outcome(lambda: ring_attention(x, x, x, comm="ring", backend=be))
    seen["bad-window"] = outcome(lambda: ring_attention(x, x, x, window=(-3, 0), backend=be))
    seen["no-backend"] = outcome(lambda: ring_attention(x.double(), x.double(), x.double(),
                                                        backend="triton"))
    seen["no-backend-ulysses"] = outcome(
        lambda: ulysses_attention(x.double(), x.double(), x.double(), backend="triton"))
    seen["one-rank-refuses"] = outcome(
        lambda: ring_attention(x, x, x, softcap=-1.0 if rank == 1 else None, backend=be))
    seen["return-lse-type"] = outcome(lambda: ring_attention(x, x, x, return_lse="yes", backend=be))
    # after every refusal the group still works
    seen["after"] = outcome(lambda: ring_attention(x, x, x, causal=True, backend=be))
    return seen


def test_refusals_raise_on_every_rank(tmp_path):
    world = 2
    seen = _spawn("run_refusals", world, tmp_path)
    for key in ("shape-mismatch", "option-mismatch"):
        for rank in range(world):
            assert seen[rank][key].startswith("CallMismatchError"), (key, seen[rank][key])
    assert "q.shape[2]: rank 0=8, rank 1=6" in seen[0]["shape-mismatch"]
    assert "causal: rank 0=1, rank 1=0" in seen[1]["option-mismatch"]
    for key, phrase in (("odd-local-headtail", "must be divisible by 2 under layout='headtail'"),
                        ("heads-ulysses", "Hq must be divisible by 2"),
                        ("bad-comm", "comm must be one of"),
                        ("bad-window", "window left must be >= 0"),
                        ("no-backend", "triton"), ("no-backend-ulysses", "triton"),
                        ("return-lse-type", "return_lse must be a bool")):
        for rank in range(world):
            assert phrase in seen[rank][key], (key, rank, seen[rank][key])
    assert seen[0]["one-rank-refuses"].startswith("CallMismatchError: rank(s) [1] of the group "
                                                  "refused this call")
    assert seen[1]["one-rank-refuses"].startswith("ValueError: softcap must be finite and > 0")
    for rank in range(world):
        assert seen[rank]["odd-local-contiguous"] == "ran"
        assert seen[rank]["after"] == "ran"


def run_failure_mid_call(rank, world, method, flag):
    """Rank 1 fails after the agreement, before sending anything; rank 0 must raise when the
    process group's timeout expires, not wait forever."""
    from attnkit.distributed import ring, ring_attention, ulysses, ulysses_attention

    x = torch.randn(1, 4, 8, 8)
    if rank == 1:
        def broken(*a, **kw):
            raise RuntimeError("rank 1 fails mid-call")
        ring.RingCall._rotate = broken
        ring.RingCall._gather_kv = broken
        ulysses._seq_to_heads = broken
    start = time.monotonic()
    try:
        if method == "ulysses":
            ulysses_attention(x, x, x, causal=True, backend=fast_backend())
        else:
            ring_attention(x, x, x, causal=True, comm=method, backend=fast_backend())
    except Exception as e:
        outcome = f"{type(e).__name__}: {str(e)[:200]}"
    else:
        outcome = "returned"
    elapsed = time.monotonic() - start
    if rank == 0:
        open(flag, "w").close()
    else:  # stay alive (a hung rank, not a closed connection) until rank 0 has given up
        end = time.monotonic() + 60
        while not os.path.exists(flag) and time.monotonic() < end:
            time.sleep(0.1)
    return {"outcome": outcome, "elapsed": elapsed}


@pytest.mark.parametrize("method", METHODS)
def test_a_rank_failing_mid_call_does_not_hang_the_others(method, tmp_path):
    seen = _spawn("run_failure_mid_call", 2, tmp_path, method, str(tmp_path / "rank0-done"),
                  pg_timeout_s=2, deadline_s=120)
    assert seen[1]["outcome"].startswith("RuntimeError: rank 1 fails mid-call")
    assert seen[0]["outcome"] != "returned", seen[0]
    assert "imed out" in seen[0]["outcome"] or "timeout" in seen[0]["outcome"].lower(), seen[0]


# -- world size 1, shard/unshard -----------------------------------------------------------

def run_helpers(rank, world):
    from attnkit.distributed import ring_attention, shard, ulysses_attention, unshard

    x = torch.arange(2 * world * 3 * 2, dtype=torch.float64).reshape(1, 1, -1, 2)
    checks = {}
    for layout in LAYOUTS:
        mine = shard(x, layout=layout)
        checks[f"roundtrip-{layout}"] = bool(torch.equal(unshard(mine, layout=layout), x))
        seq_last = shard(x.transpose(2, 3), seq_dim=-1, layout=layout)
        checks[f"seq-dim-{layout}"] = bool(torch.equal(seq_last, mine.transpose(2, 3)))
    if world == 1:  # no communication but the agreement: one call's numbers
        q = torch.randn(1, 2, 4, 8, dtype=torch.float64)
        want = attnkit.attention(q, q, q, causal=True, backend=fast_backend())
        for name, fn in (("ring", ring_attention), ("ulysses", ulysses_attention)):
            got = fn(q, q, q, causal=True, backend=fast_backend())
            checks[f"world1-{name}"] = accuracy.max_abs(got, want) <= 1e-13
    empty = torch.randn(0, 2, 4, 8)
    checks["empty"] = tuple(ring_attention(empty, empty, empty, backend=fast_backend()).shape) \
        == (0, 2, 4, 8)
    return checks


def run_cases_and_helpers(rank, world, cases):
    """One set of processes per world size: `run_cases`, then `run_helpers`."""
    return {**run_cases(rank, world, cases), "helpers": run_helpers(rank, world)}


def test_shard_unshard_and_world_size_one(tmp_path):
    """World size 1 here; 2, 3 and 4 with `test_every_method_and_layout_matches_one_process`."""
    for checks in _spawn("run_helpers", 1, tmp_path):
        assert all(checks.values()), checks


def test_a_compiled_model_breaks_its_graph_around_the_call():
    """In this process, a group of one: the compiled function computes what eager does,
    gradients included."""
    from attnkit.distributed import ring_attention, ulysses_attention

    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{_free_port()}", rank=0,
                            world_size=1)
    try:
        q = torch.randn(1, 2, 8, 16, dtype=torch.float64, requires_grad=True)
        for fn in (ring_attention, ulysses_attention):
            def loss(q, fn=fn):
                return (fn(q * 2, q, q, causal=True, backend=fast_backend()) ** 2).sum()
            got = torch.compile(loss, backend="aot_eager")(q)
            (g_got,) = torch.autograd.grad(got, q)
            want = loss(q)
            (g_want,) = torch.autograd.grad(want, q)
            assert accuracy.max_abs(got, want) <= 1e-12 and accuracy.max_abs(g_got, g_want) <= 1e-12
    finally:
        dist.destroy_process_group()


def test_storage_helpers_without_processes():
    from attnkit.distributed.layout import global_to_storage, storage_to_global

    x = torch.arange(24).reshape(1, 24)
    for world in (1, 2, 3, 4):
        for layout in LAYOUTS:
            s = global_to_storage(x, 1, world, layout)
            assert torch.equal(storage_to_global(s, 1, world, layout), x)
    assert global_to_storage(torch.arange(8), 0, 2, "headtail").tolist() == \
        [0, 1, 6, 7, 2, 3, 4, 5]
    assert math.isfinite(1.0)
