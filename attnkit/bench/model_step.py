"""``attnkit bench --model-step``: a whole model's step with ``attn_implementation="attnkit"``
beside ``"sdpa"``, in Hugging Face transformers.

One randomly initialised ``LlamaForCausalLM`` (built from a config: no download) runs both
implementations on the same weights and inputs, switched with ``set_attn_implementation``:

- training step: forward, the model's own loss (``labels=input_ids``) and backward, on
  ``batch x seqlen`` tokens (gradients set to None before each step, as ``zero_grad`` does);
- decode step: one new token per sequence on a ``DynamicCache`` (generate()'s default) holding
  ``L`` tokens, filled once by a prefill; the step appends the token and the cache is cropped
  back to ``L`` after it (``cache.crop(-1)``, slicing only), so every step sees ``L`` keys.

Each step runs with no attention mask and with an all-ones ``attention_mask`` (what a
tokenizer hands a batch without padding, and what ``generate()`` passes), since the two
implementations read masks differently. Time: `attnkit.bench.timing.measure`'s median
(CUDA events around each step, so a host-bound step is timed at its host cost) in
``rounds`` rounds whose order alternates (sdpa first, then attnkit first); a row's figure is
the median of its rounds. ``ratio`` is sdpa's time over attnkit's: above 1, attnkit is
faster. The loss (training) and the last logits (decode) of the two are compared and the
difference recorded, never asserted: bf16 sums in another order.
"""

from __future__ import annotations

import dataclasses
import inspect
import statistics
import time
from dataclasses import dataclass, field

import torch

from . import timing
from .environment import environment
from .grid import DTYPES
from .host import WaitedForGpu, host_us
from .progress import Progress

IMPLEMENTATIONS = ("sdpa", "attnkit")
#: (steps per timed batch, batches) of the host-time measurement: a training step holds its
#: activations until its backward runs, so only a few are queued at once.
HOST_BATCHES = {"train": (3, 3), "decode": (20, 5)}
MASKS = ("none", "ones")
STEM = "model_step"
CACHE = "DynamicCache"
NEEDS_TRANSFORMERS = ("--model-step needs Hugging Face transformers >= 5.4, < 6: "
                      "pip install 'attnkit[transformers]'")


@dataclass(frozen=True)
class ModelShape:
    """A LlamaConfig's sizes; ``heads * head_dim == hidden``."""

    hidden: int = 1024
    layers: int = 8
    heads: int = 16
    kv_heads: int = 4
    intermediate: int = 2816
    vocab: int = 32000

    @property
    def head_dim(self) -> int:
        return self.hidden // self.heads


@dataclass
class StepSpec:
    model: ModelShape = ModelShape()
    dtype: str = "bf16"
    #: (batch, seqlen) of each training step
    train_shapes: tuple[tuple[int, int], ...] = ((4, 2048), (1, 8192))
    decode_batch: int = 1
    cache_lens: tuple[int, ...] = (1024, 4096)
    masks: tuple[str, ...] = MASKS
    warmup_ms: float = 250.0
    rep_ms: float = 1000.0
    min_reps: int = 10
    rounds: int = 2

    def as_dict(self) -> dict:
        out = dataclasses.asdict(self)
        out["model"]["head_dim"] = self.model.head_dim
        return out


def default_spec(device: str) -> StepSpec:
    """On CUDA a ~155M-parameter Llama in bf16 (hidden 1024, 8 layers, 16 heads of 64, 4 KV
    heads), training on 4 x 2048 and 1 x 8192 tokens, decoding at 1k and 4k; on a CPU a
    tiny fp32 one on tiny shapes."""
    if device == "cuda":
        return StepSpec()
    return StepSpec(model=ModelShape(hidden=64, layers=2, heads=4, kv_heads=2,
                                     intermediate=128, vocab=128),
                    dtype="fp32", train_shapes=((2, 64),), cache_lens=(64,), warmup_ms=0.0,
                    rep_ms=20.0, min_reps=2)


def train_shapes(seqlens, tokens: int) -> tuple[tuple[int, int], ...]:
    """``(tokens // S, S)`` per seqlen (at least one sequence)."""
    return tuple((max(1, tokens // s), s) for s in seqlens)


@dataclass
class Timed:
    """One implementation's figures in one row."""

    ms: float | None = None
    ms_rounds: list[float] = field(default_factory=list)
    ms_min: float | None = None
    reps: list[int] = field(default_factory=list)
    #: host time per step with the GPU held busy (`attnkit.bench.host.host_us`), median
    host_ms: float | None = None
    host_error: str = ""  # why host_ms is None (a step that synchronizes with the GPU)
    peak_bytes: int | None = None
    error: str = ""


@dataclass
class StepRow:
    step: str  # "train" or "decode"
    batch: int
    seqlen: int  # train: tokens per sequence; decode: keys in the cache before the step
    mask: str
    auto_backend: str | None = None
    sdpa: Timed = field(default_factory=Timed)
    attnkit: Timed = field(default_factory=Timed)
    ratio: float | None = None
    #: train: |loss(attnkit) - loss(sdpa)|; decode: max |logits(attnkit) - logits(sdpa)|
    max_abs_diff: float | None = None
    status: str = "ok"

    def as_dict(self) -> dict:
        return dataclasses.asdict(self)


def register(backend: str | None):
    """``attn_implementation="attnkit"`` registered with ``backend``; returns transformers.
    ImportError or RuntimeError (an unsupported release) say what to install."""
    try:
        import transformers

        from ..integrations.transformers import register as _register
    except ImportError as e:
        raise ImportError(f"{NEEDS_TRANSFORMERS} ({e})") from None
    try:
        _register(backend=backend)
    except RuntimeError as e:
        raise RuntimeError(f"{NEEDS_TRANSFORMERS}: {e}") from None
    return transformers


def build_model(transformers, shape: ModelShape, dtype: torch.dtype, device: torch.device,
                seed: int):
    config = transformers.LlamaConfig(
        vocab_size=shape.vocab, hidden_size=shape.hidden, intermediate_size=shape.intermediate,
        num_hidden_layers=shape.layers, num_attention_heads=shape.heads,
        num_key_value_heads=shape.kv_heads, max_position_embeddings=16384)
    torch.manual_seed(seed)
    with torch.device(device):  # initialised where it runs: no copy of the weights
        model = transformers.LlamaForCausalLM(config)
    return model.to(dtype)


def _cache_kwarg(model) -> str:
    """``cache`` from transformers 5.18 on, ``past_key_values`` before."""
    return "cache" if "cache" in inspect.signature(model.forward).parameters else \
        "past_key_values"


def _auto_backend(shape: ModelShape, batch: int, sq: int, sk: int, dtype, device,
                  train: bool) -> str | None:
    """What ``backend="auto"`` picks for this step's attention calls (or why none)."""
    from .. import explain

    q = torch.empty(batch, shape.heads, sq, shape.head_dim, dtype=dtype, device=device)
    k = torch.empty(batch, shape.kv_heads, sk, shape.head_dim, dtype=dtype, device=device)
    try:
        return explain(q, k, k, causal=True, needs_grad=train).chosen or "none"
    except Exception as e:  # noqa: BLE001 - the step itself will report it too
        return f"none ({_error(e)})"


def _error(e: BaseException) -> str:
    return f"{type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}"[:300]


def _time_row(row: StepRow, model, step, spec: StepSpec, device, progress, peak,
              reset=None) -> dict:
    """Both implementations, ``spec.rounds`` rounds in alternating order; returns each one's
    first output (for the agreement check). ``reset`` restores what a failed step may have
    left half-done (a cache some layers appended to)."""
    first: dict = {}
    for r in range(spec.rounds):
        for impl in IMPLEMENTATIONS if r % 2 == 0 else IMPLEMENTATIONS[::-1]:
            timed: Timed = getattr(row, impl)
            length = "S" if row.step == "train" else "L"
            progress.step(f"{row.step} B={row.batch} {length}={row.seqlen} mask={row.mask} "
                          f"{impl}")
            if timed.error:
                continue
            try:
                model.set_attn_implementation(impl)
                if impl not in first:
                    first[impl] = step(output=True)
                    if peak is not None:
                        timed.peak_bytes = peak(step)
                t = timing.measure(step, device, warmup_ms=spec.warmup_ms, rep_ms=spec.rep_ms,
                                   min_reps=spec.min_reps, first_call_done=True)
                if timed.host_ms is None and not timed.host_error:
                    try:  # a few steps queued while the GPU is held
                        timed.host_ms = host_us(step, device, *HOST_BATCHES[row.step])[0] / 1e3
                    except WaitedForGpu as e:
                        timed.host_error = str(e)
                timed.ms_rounds.append(t.median_ms)
                timed.reps.append(t.reps)
                timed.ms_min = t.min_ms if timed.ms_min is None else min(timed.ms_min, t.min_ms)
            except Exception as e:  # noqa: BLE001 - recorded in the row
                timed.error = _error(e)
                timing.release_memory(device, collect=True)
                if reset is not None:
                    reset()
    for impl in IMPLEMENTATIONS:
        timed = getattr(row, impl)
        if timed.ms_rounds and not timed.error:
            timed.ms = statistics.median(timed.ms_rounds)
    if row.sdpa.ms and row.attnkit.ms:
        row.ratio = row.sdpa.ms / row.attnkit.ms
    else:
        row.status = "error"
    return first


def _train_rows(model, spec, dtype, device, progress, backend, seed) -> list[StepRow]:
    rows = []
    model.train()

    def peak(step):
        model.zero_grad(set_to_none=True)
        measured = timing.peak_memory(step, device)
        return None if measured is None else measured[1]

    for batch, seqlen in spec.train_shapes:
        g = torch.Generator(device=device).manual_seed(seed + seqlen)
        ids = torch.randint(0, spec.model.vocab, (batch, seqlen), device=device, generator=g)
        auto = None if backend else _auto_backend(spec.model, batch, seqlen, seqlen, dtype,
                                                  device, train=True)
        for mask in spec.masks:
            attention_mask = torch.ones_like(ids) if mask == "ones" else None

            def step(output=False, ids=ids, attention_mask=attention_mask):
                model.zero_grad(set_to_none=True)
                loss = model(input_ids=ids, attention_mask=attention_mask, labels=ids).loss
                loss.backward()
                return float(loss.detach()) if output else None

            row = StepRow("train", batch, seqlen, mask, auto)
            first = _time_row(row, model, step, spec, device, progress, peak)
            if len(first) == 2:
                row.max_abs_diff = abs(first["attnkit"] - first["sdpa"])
            rows.append(row)
            model.zero_grad(set_to_none=True)
            timing.release_memory(device)
    return rows


def _decode_rows(model, transformers, spec, dtype, device, progress, backend,
                 seed) -> list[StepRow]:
    rows = []
    model.eval()
    kwarg, B = _cache_kwarg(model), spec.decode_batch
    for L in spec.cache_lens:
        g = torch.Generator(device=device).manual_seed(seed + L)
        prompt = torch.randint(0, spec.model.vocab, (B, L), device=device, generator=g)
        token = torch.randint(0, spec.model.vocab, (B, 1), device=device, generator=g)
        auto = None if backend else _auto_backend(spec.model, B, 1, L + 1, dtype, device,
                                                  train=False)
        state: dict = {}

        def prefill(prompt=prompt, state=state):
            """A fresh cache of the prompt, made by sdpa: the same for both implementations."""
            state.clear()
            cache = transformers.DynamicCache(config=model.config)
            model.set_attn_implementation("sdpa")
            model(input_ids=prompt, use_cache=True, logits_to_keep=1, **{kwarg: cache})
            state["cache"] = cache

        with torch.no_grad():
            try:
                prefill()
            except Exception as e:  # noqa: BLE001 - no step of this length can run
                why = f"prefill of the cache: {_error(e)}"
                rows += [StepRow("decode", B, L, mask, auto, Timed(error=why), Timed(error=why),
                                 status="error") for mask in spec.masks]
                for _ in range(len(spec.masks) * spec.rounds * len(IMPLEMENTATIONS)):
                    progress.step(f"decode B={B} L={L}: not run, the prefill failed")
                state.clear()
                timing.release_memory(device, collect=True)
                continue
            for mask in spec.masks:
                attention_mask = (torch.ones(B, L + 1, dtype=torch.long, device=device)
                                  if mask == "ones" else None)

                def step(output=False, token=token, state=state,
                         attention_mask=attention_mask):
                    logits = model(input_ids=token, attention_mask=attention_mask,
                                   use_cache=True, **{kwarg: state["cache"]}).logits
                    state["cache"].crop(-1)
                    return logits.float() if output else None

                row = StepRow("decode", B, L, mask, auto)
                first = _time_row(row, model, step, spec, device, progress, None,
                                  reset=prefill)
                if len(first) == 2:
                    row.max_abs_diff = float((first["attnkit"] - first["sdpa"]).abs().max())
                rows.append(row)
        state.clear()
        timing.release_memory(device)
    return rows


def run_model_step(*, device: str | torch.device = "auto", backend: str | None = None,
                   spec: StepSpec | None = None, seed: int = 0,
                   progress: bool | Progress = True) -> dict:
    """Time both implementations on ``spec`` (default: `default_spec` of the device);
    ``backend`` is attnkit's (None: auto). Returns a JSON-ready dict. A step that raises is
    recorded in its row and the run goes on."""
    from . import resolve_device

    dev = resolve_device(device)
    transformers = register(backend)
    spec = spec or default_spec(dev.type)
    if spec.dtype not in DTYPES:
        raise ValueError(f"unknown dtype {spec.dtype!r}; choose from {sorted(DTYPES)}")
    if spec.model.hidden % spec.model.heads or spec.model.heads % spec.model.kv_heads:
        raise ValueError(f"model heads do not divide: {spec.model}")
    if not isinstance(progress, Progress):
        progress = Progress(enabled=bool(progress))
    t0 = time.perf_counter()
    env = environment(dev)
    dtype = DTYPES[spec.dtype]
    timing.prepare(dev)
    model = build_model(transformers, spec.model, dtype, dev, seed)
    progress.start((len(spec.train_shapes) + len(spec.cache_lens)) * len(spec.masks)
                   * spec.rounds * len(IMPLEMENTATIONS))
    rows = _train_rows(model, spec, dtype, dev, progress, backend, seed)
    rows += _decode_rows(model, transformers, spec, dtype, dev, progress, backend, seed)
    progress.finish()
    return {
        "kind": STEM,
        "environment": env,
        "config": {"device": str(dev), "backend": backend or "auto", "spec": spec.as_dict(),
                   "seed": seed, "model": "LlamaForCausalLM, random weights",
                   "parameters": sum(p.numel() for p in model.parameters()),
                   "cache": CACHE, "transformers": transformers.__version__},
        "method": {
            "train": "zero_grad(set_to_none=True); model(input_ids, attention_mask, "
                     "labels=input_ids).loss.backward()",
            "decode": f"model(input_ids=next_token, attention_mask, cache={CACHE} of L "
                      "tokens, use_cache=True); cache.crop(-1)",
            "ms": "median of the rounds' medians (CUDA events around each step on a GPU)",
            "ratio": "sdpa ms / attnkit ms (above 1: attnkit faster)",
            "peak_bytes": "torch.cuda.max_memory_allocated during one training step minus "
                          "what was allocated before it (weights, inputs)",
        },
        "rows": [r.as_dict() for r in rows],
        "elapsed_s": round(time.perf_counter() - t0, 1),
    }


# -- the table --------------------------------------------------------------------------------

def _ms(t: dict) -> str:
    return f"{t['ms']:.2f}" if t["ms"] is not None else "error"


def _mib(t: dict) -> str:
    return f"{t['peak_bytes'] / 2**20:.0f}" if t["peak_bytes"] is not None else "-"


def table(result: dict) -> str:
    from .tables import fmt_table

    cfg, spec = result["config"], result["config"]["spec"]
    m = spec["model"]
    device = result["environment"]["device"]["name"]
    out = [f"attnkit bench --model-step on {cfg['device']} ({device}), transformers "
           f"{cfg['transformers']}: {cfg['model']}, {cfg['parameters'] / 1e6:.3g}M parameters "
           f"(hidden {m['hidden']}, {m['layers']} layers, {m['heads']} heads ({m['kv_heads']} "
           f"KV) of D={m['head_dim']}, MLP {m['intermediate']}, vocab {m['vocab']}), "
           f"{spec['dtype']}",
           f'attn_implementation="attnkit" (backend {cfg["backend"]}) beside "sdpa", the same '
           f"weights and inputs; median ms over {spec['rounds']} rounds in alternating order; "
           "sdpa/attnkit above 1: attnkit faster; host ms: host time per step with the GPU "
           "held busy (a step whose host time is near its median time is bound by the host)"]
    errors: list[str] = []

    def mark(t: dict) -> str:
        if not t["error"]:
            return _ms(t)
        if t["error"] not in errors:
            errors.append(t["error"])
        return f"E{errors.index(t['error']) + 1}"

    for step, title, diff in (
            ("train", "Training step: forward, loss, backward", "|loss diff|"),
            ("decode", f"Decode step: one token per sequence, {cfg['cache']} of L tokens",
             "max |logit diff|")):
        rows = [r for r in result["rows"] if r["step"] == step]
        if not rows:
            continue
        columns = ["sdpa ms", "attnkit ms", "sdpa/attnkit", "host ms sdpa", "host ms attnkit"]
        if step == "train":
            columns += ["peak MiB sdpa", "peak MiB attnkit"]
        columns += [diff]
        if any(r["auto_backend"] for r in rows):
            columns.append("auto chose")
        values, labels = {}, []
        for r in rows:
            label = (f"{r['batch']}x{r['seqlen']} mask={r['mask']}" if step == "train" else
                     f"B={r['batch']} L={r['seqlen']} mask={r['mask']}")
            labels.append(label)
            values[(label, "sdpa ms")] = mark(r["sdpa"])
            values[(label, "attnkit ms")] = mark(r["attnkit"])
            values[(label, "sdpa/attnkit")] = f"{r['ratio']:.2f}x" if r["ratio"] else "-"
            for impl in IMPLEMENTATIONS:
                host = r[impl].get("host_ms")  # absent from results written before it
                values[(label, f"host ms {impl}")] = (
                    f"{host:.2f}" if host is not None else
                    "sync" if r[impl].get("host_error") else "-")
            values[(label, "peak MiB sdpa")] = _mib(r["sdpa"])
            values[(label, "peak MiB attnkit")] = _mib(r["attnkit"])
            values[(label, diff)] = (f"{r['max_abs_diff']:.2g}"
                                     if r["max_abs_diff"] is not None else "-")
            values[(label, "auto chose")] = r["auto_backend"] or "-"
        out += fmt_table(f"\n{title}", "shape", labels, columns, values)
        if any(r[impl].get("host_error") for r in rows for impl in IMPLEMENTATIONS):
            out.append("  sync: the step synchronizes with the GPU, so its host time cannot "
                       "be told apart from GPU time")
    out += [f"  E{i + 1}: {text}" for i, text in enumerate(errors)]
    out.append(f"({len(result['rows'])} rows in {result['elapsed_s']}s)")
    return "\n".join(out)


def summary(result: dict) -> str:
    """The lowest sdpa/attnkit ratio of each step (the target is at least 1.0x)."""
    parts = []
    for step, name in (("train", "training"), ("decode", "decode")):
        rows = [r for r in result["rows"] if r["step"] == step]
        ratios = [r["ratio"] for r in rows if r["ratio"]]
        if rows:
            failed = len(rows) - len(ratios)
            parts.append(f"{name} " + (f"{min(ratios):.2f}x" if ratios else "-")
                         + (f" ({failed} of {len(rows)} rows failed)" if failed else ""))
    return ("\nSummary: lowest sdpa/attnkit time ratio, " + ", ".join(parts)
            + " (target: at least 1.00x)")


# -- the command ------------------------------------------------------------------------------

#: `attnkit bench` flags this mode reads; any other given is refused rather than ignored.
_NOT_READ = ("label", "compare", "env", "head_dims", "model_dim", "causal", "modes", "mixes",
             "layout", "page_sizes", "slow_call_s", "time_limit_s", "dropout_p", "cp_worlds")


def run_cli(args) -> int:
    """``attnkit bench --model-step``: run, print the table, write ``model_step.json`` and
    ``model_step.txt`` to ``--out``."""
    from pathlib import Path

    from .cli import DEFAULT_OUT, UsageError, _writable

    given = [f"--{n.replace('_', '-')}" for n in _NOT_READ if getattr(args, n, None)]
    if args.paged:
        given.append("--paged")
    if given:
        raise UsageError(f"{', '.join(given)} do(es) not apply to --model-step")
    backends = args.backends or [None]
    if len(backends) > 1:
        raise UsageError(f"--model-step runs one attnkit backend (or auto); got {backends}")
    backend = backends[0]
    from .. import api

    known = {n for n, reg in api.backends().items() if reg.availability[0]}
    if backend is not None and backend not in known:
        raise UsageError(f"--backends {backend}: not an available attnkit backend; "
                         f"available: {sorted(known)}")
    out = Path(args.out or DEFAULT_OUT)
    _writable(out)
    try:
        register(backend)
    except (ImportError, RuntimeError) as e:
        raise UsageError(str(e)) from None
    from . import resolve_device

    dev = resolve_device(args.device)
    spec = default_spec(dev.type)
    if args.seqlens or args.tokens:
        seqlens = args.seqlens or [s for _, s in spec.train_shapes]
        tokens = args.tokens or max(b * s for b, s in spec.train_shapes)
        spec.train_shapes = train_shapes(seqlens, tokens)
    for name, value in (("cache_lens", args.cache_lens), ("warmup_ms", args.warmup_ms),
                        ("rep_ms", args.rep_ms)):
        if value is not None:
            setattr(spec, name, tuple(value) if isinstance(value, list) else value)
    if args.dtypes:
        spec.dtype = args.dtypes[0]
    result = run_model_step(device=dev, backend=backend, spec=spec, seed=args.seed,
                            progress=not args.quiet)
    text = table(result) + "\n" + summary(result)
    print(text)
    from .report import write_json

    write_json(result, out / f"{STEM}.json")
    (out / f"{STEM}.txt").write_text(text + "\n")
    print(f"wrote {out / f'{STEM}.json'}, {out / f'{STEM}.txt'}")
    return 0 if any(r["status"] == "ok" for r in result["rows"]) else 1
