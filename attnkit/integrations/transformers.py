"""Hugging Face transformers: ``attn_implementation="attnkit"``.

`register` adds an attention function and a mask function under one name to transformers'
public ``AttentionInterface`` and ``AttentionMaskInterface``; a model loaded with that name
calls them from its own attention modules, unchanged.

The mask function runs once per forward per mask kind (full, sliding). Instead of a dense
``(B, 1, Sq, Sk)`` mask it returns a `KeyLayout`: the band (causal, sliding window) read from
the mask function transformers hands it, and the padding read from the 2D attention mask:
each row's real tokens must be one run of positions (left padding, right padding or none).
Reading the padding costs a few small reductions over the ``(B, Sk)`` mask and one
device-to-host read per mask (as transformers' own sdpa mask does); without an attention mask
nothing is read. Per layer, the attention function then calls `attnkit.attention`:

- no padding, or right padding: the keys as they are (right padding needs nothing: under a
  causal mask the padded keys after a sequence are seen only by padded queries);
- left padding: each row's keys are shifted left past its padding (one gather of K and V per
  layer, ``O(B * Hkv * Sk * D)``) and ``seqlens_k`` marks where each row's keys end, so the
  causal diagonal stays where transformers puts it.

Every query at a real token gets the result ``sdpa`` gives it. Queries at padded positions
(their outputs are never used by a real token) may differ: a padded query after a sequence
sees the padded keys before it, one before a sequence sees no key and gives 0.

Packed (padding-free) batches, several documents concatenated in a row with position_ids
restarting at each (as ``DataCollatorWithFlattening`` makes them), run through
`attnkit.attention_varlen`, each document on its own with the layer's band and softcap.
transformers marks them in the mask function it hands the mask step (it looks for them when a
forward has position_ids, no attention mask and no KV cache); the mask step reads where the
documents start to the host once (one device-to-host read per mask kind per forward) and
builds the int32 offsets. Without such a mask, ``cu_seq_lens_q``/``cu_seq_lens_k`` (and
``max_length_q``/``max_length_k``) passed to the forward, as the collator gives them for flash
attention, are used as they are, with no read. A forward that transformers does not treat as
packed because it has a padding mask or a KV cache (``use_cache`` defaults to True), yet
whose position_ids restart inside a row's tokens, is refused: sdpa would let its documents
attend to each other. Telling costs one read of one flag per mask kind for a forward of more
than one query with position_ids; a decoding step of one query reads nothing.

Attention dropout in training mode runs through ``dropout_p`` of `attnkit.attention`, or of
`attnkit.attention_varlen` for a packed batch (on a backend that declares dropout; the mask
is the one the padded batch of the same documents would draw). Refused with an error, never
computed otherwise: padding that is not one run per row, a mask function other than causal,
sliding-window causal or bidirectional (custom ``or``/``and`` masks, chunked attention),
position bias and attention sinks.
"""

from __future__ import annotations

import functools
from dataclasses import dataclass, field

import torch

try:
    import transformers as _transformers
    from transformers import AttentionInterface
    from transformers import masking_utils as _mu
    from transformers.masking_utils import AttentionMaskInterface
except ImportError as e:  # pragma: no cover - exercised only without transformers
    raise ImportError(
        "attnkit.integrations.transformers needs Hugging Face transformers: "
        "pip install 'attnkit[transformers]'") from e

from ..api import attention
from ..dropin import sdpa_band
from ..spec import describe_tensor
from ..varlen import attention_varlen

NAME = "attnkit"
#: The transformers releases whose mask functions take (q_offset, kv_offset), as this one does.
SUPPORTED = ((5, 4), (6, 0))

_PACKED = (
    "pass several sequences packed in one row without an attention mask and with "
    "use_cache=False, their position_ids restarting at each sequence (or cu_seq_lens_q/k, as "
    "DataCollatorWithFlattening gives them)")


@dataclass(frozen=True)
class KeyLayout:
    """What a layer's attention sees, in its own key positions ``0 .. kv_length - 1``.

    Query ``i`` sits at key position ``i + diagonal``. ``causal``: it sees keys up to there;
    ``window_left``: and no further back than that many keys. Keys at or past ``key_end`` are
    seen by no query. ``starts`` (``(B,)``, None = all 0): where each row's tokens begin;
    ``counts`` (``(B,)`` int32, None = ``key_end - starts`` for all): each row's key count
    after its keys are shifted left by its start.

    ``diagonal``: query ``i``'s key position less ``i``. ``run`` (``(2, B)``, None without a
    padding mask): where each row's real tokens start and end, in key positions.

    A packed batch has ``cu_seqlens``: int32 offsets of its documents in the ``B * Sq``
    tokens taken row after row (a row's first token always starts one), and ``max_seqlen``, the
    longest document; queries and keys are then the same tokens.

    ``shape``/``ndim`` are those of the 4-D mask it stands for: generation with a static cache
    makes the mask ahead of the forward, whose own mask step then hands it back to
    `key_layout` (which returns it as it is) instead of treating it as a 2-D padding mask.
    """

    batch: int
    q_length: int
    kv_length: int
    causal: bool
    window_left: int | None
    key_end: int
    starts: torch.Tensor | None = None
    counts: torch.Tensor | None = None
    diagonal: int = 0
    run: torch.Tensor | None = None
    cu_seqlens: torch.Tensor | None = None
    max_seqlen: int = 0
    # position_ids already checked against this layout, so that all its layers read once
    checked: set = field(default_factory=set, compare=False, hash=False, repr=False)

    ndim = 4

    @property
    def shape(self) -> tuple[int, int, int, int]:
        return (self.batch, 1, self.q_length, self.kv_length)


def register(name: str = NAME, backend: str | None = None) -> str:
    """Register attnkit with transformers under ``name`` (``attn_implementation=name``);
    ``backend`` forces one attnkit backend (None: the best available). Returns ``name``.
    Registering again replaces the earlier registration."""
    version = tuple(int(x) for x in _transformers.__version__.split(".")[:2] if x.isdigit())
    if not SUPPORTED[0] <= version < SUPPORTED[1]:
        raise RuntimeError(
            f"attnkit.integrations.transformers supports transformers >= 5.4, < 6; this is "
            f"{_transformers.__version__} (pip install 'attnkit[transformers]')")
    forward = functools.partial(attention_forward, backend=backend)
    functools.update_wrapper(forward, attention_forward)
    AttentionInterface.register(name, forward)
    AttentionMaskInterface.register(name, key_layout)
    return name


# -- the mask function ------------------------------------------------------------------------

def _closure(fn, var: str):
    return fn.__closure__[fn.__code__.co_freevars.index(var)].cell_contents


_AND_CODE = _mu.and_masks(_mu.causal_mask_function).__code__
_SLIDING_CODE = _mu.sliding_window_overlay(1).__code__
_SEGMENTS = getattr(_mu, "packed_sequence_mask_function", None)
_SEGMENTS_CODE = _SEGMENTS(None).__code__ if _SEGMENTS else None
# remaps the band to each document's own positions, from transformers 5.x on (not in all 5.x);
# within a document positions rise by one from token to token, so the band stays the same
_REMAP = getattr(_mu, "remap_positions_for_packed_sequence", None)
_REMAP_CODE = _REMAP(_mu.causal_mask_function, None).__code__ if _REMAP else None


def _parts(fn) -> list:
    """The mask functions ``fn`` is the AND of (``fn`` itself if none)."""
    if getattr(fn, "__code__", None) is _AND_CODE:
        return [p for f in _closure(fn, "mask_functions") for p in _parts(f)]
    return [fn]


def read_mask_function(mask_function) -> tuple[bool, int | None, torch.Tensor | None]:
    """``(causal, window_left, segments)`` of the mask functions transformers builds for
    causal, sliding-window causal and bidirectional attention, each over one document per row
    (``segments`` None) or over packed documents (``segments``: transformers' ``(B, S)``
    document index of each token); anything else raises ``ValueError``."""
    parts, segments, remapped = [], [], False
    for p in _parts(mask_function):
        code = getattr(p, "__code__", None)
        if code is not None and code is _SEGMENTS_CODE:
            segments.append(_closure(p, "packed_sequence_mask"))
        elif code is not None and code is _REMAP_CODE:
            parts += _parts(_closure(p, "mask_function"))
            remapped = True
        else:
            parts.append(p)
    windows = [_closure(p, "sliding_window") for p in parts
               if getattr(p, "__code__", None) is _SLIDING_CODE]
    rest = [p for p in parts if getattr(p, "__code__", None) is not _SLIDING_CODE]
    if len(segments) <= 1 and (segments or not remapped):
        segments = segments[0] if segments else None
        if rest == [_mu.causal_mask_function] and len(windows) <= 1:
            # the overlay keeps kv > q - w: w - 1 keys before the diagonal
            return True, (windows[0] - 1 if windows else None), segments
        if rest == [_mu.bidirectional_mask_function] and not windows:
            return False, None, segments
    raise ValueError(
        f"attn_implementation='attnkit' runs causal, sliding-window causal and bidirectional "
        f"masks; this model asked for another mask function ({mask_function!r}: custom "
        "or_mask/and_mask functions, chunked or block attention), which attnkit does not "
        "compute; use attn_implementation='sdpa' for it")


def key_layout(
    batch_size: int,
    q_length: int,
    kv_length: int,
    q_offset: int = 0,
    kv_offset: int = 0,
    mask_function=_mu.causal_mask_function,
    attention_mask: torch.Tensor | None = None,
    **kwargs,
) -> KeyLayout:
    """transformers' mask-function signature; returns the `KeyLayout` its attention reads."""
    if isinstance(attention_mask, KeyLayout):  # made ahead of this forward (static cache)
        return attention_mask
    causal, window_left, segments = read_mask_function(mask_function)
    diagonal = int(q_offset) - kv_offset  # a static cache's offset is a tensor: one read
    if segments is not None:
        return _packed_layout(segments, batch_size, q_length, kv_length, diagonal,
                              attention_mask, causal, window_left)
    key_end = max(0, min(diagonal + q_length, kv_length)) if causal else kv_length
    starts = counts = run = None
    if attention_mask is not None and key_end > 0:
        starts, counts, run = _padding(attention_mask, causal, kv_offset, key_end)
    if key_end < kv_length:
        # Keys past the last query (a static cache's unwritten end) go by counts, not by a
        # narrower key tensor: the layout's sizes then stay the same from one decoding step
        # to the next, as a compiled decoding step needs.
        if counts is None:
            device = attention_mask.device if attention_mask is not None else kwargs.get(
                "device")
            counts = torch.full((batch_size,), key_end, dtype=torch.int32, device=device)
        key_end = kv_length
    return KeyLayout(batch_size, q_length, kv_length, causal, window_left, key_end, starts,
                     counts, diagonal, run)


def _packed_layout(segments, batch_size, q_length, kv_length, diagonal, attention_mask, causal,
                   window_left) -> KeyLayout:
    """The layout of a packed batch: documents' offsets from transformers' ``(B, S)``
    document index, with one device-to-host read of where documents start."""
    if (attention_mask is not None or diagonal != 0 or q_length != kv_length
            or tuple(segments.shape) != (batch_size, q_length)):
        raise ValueError(
            f"attn_implementation='attnkit': a packed mask for {q_length} queries and "
            f"{kv_length} keys (offset {diagonal}), {describe_tensor('segments', segments)}, "
            f"with{'' if attention_mask is not None else 'out'} a padding mask; packed "
            "documents are run only as transformers makes them: queries and keys the same "
            "tokens, no padding mask")
    first = torch.ones_like(segments, dtype=torch.bool)
    first[:, 1:] = segments[:, 1:] != segments[:, :-1]
    starts = first.flatten().cpu().nonzero().flatten()  # the one read
    total = batch_size * q_length
    cu = torch.cat([starts, starts.new_tensor([total])]).to(torch.int32)
    longest = int(cu.diff().max()) if total else 0
    if segments.device.type == "cuda":  # copied while the host goes on
        cu = cu.pin_memory().to(segments.device, non_blocking=True)
    else:
        cu = cu.to(segments.device)
    return KeyLayout(batch_size, q_length, kv_length, causal, window_left, kv_length,
                     cu_seqlens=cu, max_seqlen=longest)


def _padding(attention_mask: torch.Tensor, causal: bool, kv_offset: int, key_end: int):
    """``(starts, counts, run)`` of `KeyLayout` from the 2-D mask (True/1 = a real token),
    ``starts`` and ``counts`` None when nothing needs shifting or counting; one device-to-host
    read."""
    real = attention_mask.to(torch.bool)
    if real.shape[-1] < kv_offset + key_end:  # as transformers pads it: unseen = padding
        real = torch.nn.functional.pad(real, (0, kv_offset + key_end - real.shape[-1]))
    real = real[:, kv_offset:kv_offset + key_end]
    count = real.sum(-1)
    as_bytes = real.view(torch.uint8)
    first = as_bytes.argmax(-1)
    last = (key_end - 1) - as_bytes.flip(-1).argmax(-1)
    seen = count > 0
    one_run = ~seen | (count == last - first + 1)
    start = torch.where(seen, first, 0)
    end = torch.where(seen, last + 1, 0)
    ok, start_max, end_min = torch.stack([one_run.all(), start.amax(), end.amin()]).tolist()
    if not ok:
        raise ValueError(
            f"attn_implementation='attnkit': {describe_tensor('attention_mask', attention_mask)}"
            " has a row whose tokens are not one run of positions (padding inside a "
            "sequence); attnkit runs left padding, right padding or none. If these are "
            f"several sequences packed in one row: {_PACKED}")
    run = torch.stack([start, end])
    if causal:  # padding after a sequence is seen only by padding queries
        if start_max == 0:
            return None, None, run
        return start, (key_end - start).to(torch.int32), run
    if start_max == 0 and end_min == key_end:
        return None, None, run
    return (start if start_max > 0 else None), (end - start).to(torch.int32), run


# -- the attention function -------------------------------------------------------------------

def _shift_left(t: torch.Tensor, starts: torch.Tensor) -> torch.Tensor:
    """Row ``b`` of ``t (B, H, S, D)`` moved left by ``starts[b]`` positions (the positions
    freed at the end repeat the last key; they lie past the row's count and are never read)."""
    B, H, S, D = t.shape
    index = (torch.arange(S, device=t.device) + starts.unsqueeze(-1)).clamp(max=S - 1)
    return t.gather(2, index[:, None, :, None].expand(B, H, S, D))


def _refuse_unsupported(kwargs) -> None:
    for name in ("position_bias", "s_aux", "sinks"):
        if kwargs.get(name) is not None:
            raise ValueError(f"attn_implementation='attnkit' does not compute {name} (an "
                             "additive bias or attention sinks); use attn_implementation="
                             "'eager' or 'sdpa' for this model")
    if kwargs.get("block_table") is not None:
        raise ValueError("attn_implementation='attnkit' does not run continuous batching's "
                         "paged cache (block_table); use generate() or another "
                         "attn_implementation for it")


def _check_not_packed(layout: KeyLayout, position_ids, q_length: int) -> None:
    """Refuse position_ids that restart inside a row's real tokens when transformers made the
    mask for one document per row (it does so under a padding mask or a KV cache): sdpa lets
    such documents see each other. One read of one flag per layout."""
    if (q_length < 2 or not isinstance(position_ids, torch.Tensor) or position_ids.dim() != 2
            or position_ids.shape[-1] != q_length or id(position_ids) in layout.checked):
        return
    pos = position_ids.expand(layout.batch, -1)
    restarts = pos[:, 1:] != pos[:, :-1] + 1  # query t + 1 does not follow query t
    if layout.run is not None:  # only between two real tokens
        key = torch.arange(1, q_length, device=pos.device) + layout.diagonal
        start, end = layout.run.to(pos.device)
        restarts &= (key - 1 >= start[:, None]) & (key < end[:, None])
    if bool(restarts.any()):
        raise ValueError(
            f"attn_implementation='attnkit': {describe_tensor('position_ids', position_ids)} "
            "restart inside a row, as in several sequences packed in one row, but transformers "
            "made this forward's mask for one sequence per row, because an attention_mask or "
            "a KV cache was given (use_cache defaults to True), so the sequences would attend "
            f"to each other; {_PACKED}")
    layout.checked.add(id(position_ids))


def _given_offsets(kwargs, layout, query, key):
    """``(cu_q, cu_k, max_q, max_k)`` from the flash-attention arguments ``cu_seq_lens_q/k``
    and ``max_length_q/k``, or None when they are not given."""
    cu_q, cu_k = kwargs.get("cu_seq_lens_q"), kwargs.get("cu_seq_lens_k")
    if cu_q is None and cu_k is None:
        return None
    if cu_q is None or cu_k is None:
        raise ValueError("attn_implementation='attnkit': cu_seq_lens_q and cu_seq_lens_k "
                         "come together; one of them is None")
    padded = isinstance(layout, KeyLayout) and (layout.run is not None or layout.diagonal)
    if (padded or query.shape[2] != key.shape[2]
            or not (layout is None or isinstance(layout, KeyLayout))):
        raise ValueError(
            f"attn_implementation='attnkit': cu_seq_lens_q/k mark a packed batch, but this "
            f"layer has {describe_tensor('query', query)}, {describe_tensor('key', key)} and "
            f"{'a padding mask' if padded else 'a KV cache or a 4-D mask'}; {_PACKED}")
    maxes = []
    for name in ("max_length_q", "max_length_k"):
        m = kwargs.get(name)
        maxes.append(int(m) if isinstance(m, torch.Tensor) else m)  # a tensor: one read
    return (cu_q.to(query.device, torch.int32), cu_k.to(query.device, torch.int32), *maxes)


def _packed_attention(query, key, value, offsets, causal, window, scaling, softcap, dropout,
                      backend):
    """Each packed document on its own through `attention_varlen`; ``(B, Sq, Hq, D)``."""
    B, Hq, Sq, D = query.shape
    q = query.transpose(1, 2).reshape(B * Sq, Hq, D)  # a view for one row, a copy for several
    k, v = (t.transpose(1, 2).reshape(B * t.shape[2], t.shape[1], D) for t in (key, value))
    out = attention_varlen(q, k, v, *offsets, causal=causal, scale=scaling, window=window,
                           softcap=softcap, dropout_p=float(dropout), backend=backend)
    return out.view(B, Sq, Hq, D)


def attention_forward(
    module: torch.nn.Module,
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    attention_mask,
    dropout: float = 0.0,
    scaling: float | None = None,
    softcap: float | None = None,
    is_causal: bool | None = None,
    backend: str | None = None,
    **kwargs,
) -> tuple[torch.Tensor, None]:
    """transformers' attention-function signature: ``query (B, Hq, Sq, D)``, ``key``/``value``
    ``(B, Hkv, Sk, D)``; returns ``(out (B, Sq, Hq, D), None)``."""
    _refuse_unsupported(kwargs)
    window, seqlens_k = None, None
    layout = attention_mask if isinstance(attention_mask, KeyLayout) else None
    if layout is not None:
        if key.shape[2] != layout.kv_length or query.shape[2] != layout.q_length:
            raise ValueError(
                f"attn_implementation='attnkit': the mask was made for {layout.q_length} "
                f"queries and {layout.kv_length} keys, but this layer has "
                f"{describe_tensor('query', query)}, {describe_tensor('key', key)}")
        causal, key_end, seqlens_k = layout.causal, layout.key_end, layout.counts
        if layout.window_left is not None:
            window = (layout.window_left, -1)
        if layout.cu_seqlens is not None:
            offsets = (layout.cu_seqlens, layout.cu_seqlens, layout.max_seqlen,
                       layout.max_seqlen)
            return _packed_attention(query, key, value, offsets, causal, window, scaling,
                                     softcap, dropout, backend), None
    else:
        # No KeyLayout: transformers made no mask (a model that builds none) or the caller
        # passed a 4-D one. Then it is what transformers' sdpa function would be given.
        if attention_mask is None:
            causal_flag = is_causal if is_causal is not None else getattr(module, "is_causal",
                                                                          True)
            is_causal = bool(query.shape[2] > 1 and causal_flag)
        else:
            is_causal = False
        causal, window, key_end, seqlens_k = sdpa_band(query, key, attention_mask, is_causal)
    offsets = _given_offsets(kwargs, attention_mask, query, key)
    if offsets is not None:
        return _packed_attention(query, key, value, offsets, causal, window, scaling, softcap,
                                 dropout, backend), None
    if layout is not None:
        _check_not_packed(layout, kwargs.get("position_ids"), query.shape[2])
    if key_end < key.shape[2]:
        key, value = key[:, :, :key_end], value[:, :, :key_end]
    if layout is not None and layout.starts is not None:
        key = _shift_left(key, layout.starts)
        value = _shift_left(value, layout.starts)
    out = attention(query, key, value, causal=causal, scale=scaling, window=window,
                    seqlens_k=seqlens_k, softcap=softcap, dropout_p=float(dropout),
                    backend=backend)
    return out.transpose(1, 2).contiguous(), None
