"""attn_implementation="attnkit" in Hugging Face transformers, on tiny randomly initialised
models of three families, against transformers' own implementations in float32: Llama (full
causal, GQA) and Mistral (sliding window) against "sdpa", Gemma 2 (sliding and full layers,
attention softcap, which transformers' sdpa refuses) against "eager". Forward logits, gradients
of every parameter, right and left padding, packed (padding-free) batches against the same
documents run one by one, greedy generation with the model's KV cache (dynamic and static),
loading by name; and what is refused."""

import copy
import inspect

import pytest
import torch

transformers = pytest.importorskip("transformers")

import attnkit  # noqa: E402
import attnkit.integrations.transformers as akt  # noqa: E402
from attnkit.testing.accuracy import GRAD_FACTOR, OUT_FACTOR, check  # noqa: E402

VOCAB, PROMPT = 128, 12
COMMON = dict(vocab_size=VOCAB, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
              num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=256,
              initializer_range=0.2)  # large enough that attention moves the logits a lot

FAMILIES = {
    "llama": (lambda: transformers.LlamaConfig(**COMMON), "sdpa"),
    "mistral": (lambda: transformers.MistralConfig(**COMMON, sliding_window=5), "sdpa"),
    "gemma2": (lambda: transformers.Gemma2Config(**COMMON, head_dim=16, sliding_window=5,
                                                 attn_logit_softcapping=4.0,
                                                 final_logit_softcapping=None), "eager"),
}
PADDING = {
    "none": None,
    "right": [[1] * 12, [1] * 8 + [0] * 4, [1] * 3 + [0] * 9],
    "left": [[1] * 12, [0] * 4 + [1] * 8, [0] * 9 + [1] * 3],
}


def _math_attention(module, query, key, value, attention_mask, scaling=None, softcap=None,
                    **_kwargs):
    """Attention as written in the textbook, for the float64 reference: masked scores are
    -inf and a row with none left gives 0 (transformers' eager adds the dtype's minimum and
    takes the softmax in float32, which turns float64 rows with no key into NaN)."""
    groups = query.shape[1] // key.shape[1]
    key, value = (t.repeat_interleave(groups, 1) for t in (key, value))
    scores = query @ key.transpose(-1, -2) * scaling
    if softcap is not None:
        scores = softcap * torch.tanh(scores / softcap)
    if attention_mask is not None:  # boolean, True = visible
        scores = scores.masked_fill(~attention_mask, float("-inf"))
    weights = torch.softmax(scores, -1).nan_to_num(0.0)
    return (weights @ value).transpose(1, 2).contiguous(), None


def _math_mask(*args, **kwargs):
    kwargs.update(allow_is_causal_skip=False, allow_is_bidirectional_skip=False)
    return transformers.masking_utils.sdpa_mask(*args, **kwargs)


@pytest.fixture(scope="module", autouse=True)
def registered():
    transformers.AttentionInterface.register("test-math", _math_attention)
    transformers.masking_utils.AttentionMaskInterface.register("test-math", _math_mask)
    return akt.register()


#: CUDA too where there is one (attnkit's own kernels against torch's sdpa there).
DEVICES = ["cpu"] + (["cuda"] if torch.cuda.is_available() else [])


@pytest.fixture(params=DEVICES)
def device(request):
    return request.param


def _pair(family, device="cpu", seed=0):
    """The same random weights under attnkit and under the reference implementation."""
    make, ref_impl = FAMILIES[family]
    torch.manual_seed(seed)
    ref = transformers.AutoModelForCausalLM.from_config(make(), attn_implementation=ref_impl,
                                                        dtype=torch.float32)
    ours = transformers.AutoModelForCausalLM.from_config(make(), attn_implementation="attnkit",
                                                         dtype=torch.float32)
    ours.load_state_dict(ref.state_dict())
    assert ours.config._attn_implementation == "attnkit"
    return ours.to(device).eval(), ref.to(device).eval()


def _batch(padding, device="cpu", seed=1):
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(0, VOCAB, (3, PROMPT), generator=g).to(device)
    mask = None if PADDING[padding] is None else torch.tensor(PADDING[padding]).to(device)
    return ids, mask


def _close(got, ref, what):
    """For float32 runs that should agree closely (same device, same inputs)."""
    tol = 2e-5 * max(1.0, float(ref.abs().max()))
    err = float((got - ref).abs().max()) if got.numel() else 0.0
    assert err <= tol, f"{what}: max|attnkit - reference| = {err:.3e} > {tol:.3e}"


def _rule(what, got, ref32, ref64, factor=OUT_FACTOR):
    """The accuracy rule: attnkit's float32 model against the reference implementation's
    float64 copy, with the reference's own float32 error as the yardstick."""
    ok, msg = check(what, got, ref64, ref32, torch.float32, factor)
    assert ok, msg


def _f64(model):
    """A float64 copy of ``model`` computing attention as `_math_attention` does."""
    model = copy.deepcopy(model).double()
    model.set_attn_implementation("test-math")
    return model


@pytest.fixture
def varlen_calls(monkeypatch):
    """Every attnkit.attention_varlen call the integration makes, with its options."""
    seen = []
    real = akt.attention_varlen

    def spy(q, k, v, cu_q, cu_k, max_q, max_k, **options):
        seen.append(dict(options, cu_q=cu_q.tolist(), cu_k=cu_k.tolist(), max_q=max_q,
                         max_k=max_k, k_shape=tuple(k.shape)))
        return real(q, k, v, cu_q, cu_k, max_q, max_k, **options)

    monkeypatch.setattr(akt, "attention_varlen", spy)
    return seen


@pytest.fixture
def calls(monkeypatch):
    """Every attnkit.attention call the integration makes, with its options."""
    seen = []
    real = akt.attention

    def spy(q, k, v, **options):
        seen.append(dict(options, k_shape=tuple(k.shape)))
        return real(q, k, v, **options)

    monkeypatch.setattr(akt, "attention", spy)
    return seen


@pytest.mark.parametrize("padding", list(PADDING))
@pytest.mark.parametrize("family", list(FAMILIES))
def test_forward_logits_match(family, padding, calls, device):
    ours, ref = _pair(family, device)
    ids, mask = _batch(padding, device)
    with torch.no_grad():
        got, want, want64 = (m(ids, attention_mask=mask, use_cache=False).logits
                             for m in (ours, ref, _f64(ref)))
    real = slice(None) if mask is None else mask.bool()  # padded positions carry no token
    _rule(f"{family} logits, {padding} padding", got[real], want[real], want64[real])
    assert len(calls) == ours.config.num_hidden_layers  # every layer ran through attnkit
    if family == "gemma2":
        assert {c["softcap"] for c in calls} == {4.0}
        assert {c["window"] for c in calls} == {(4, -1), None}  # one sliding, one full layer
    if family == "mistral":
        assert {c["window"] for c in calls} == {(4, -1)}
    assert all(c["causal"] for c in calls)
    if padding == "left":  # shifted rows, each ending where its keys end
        assert calls[0]["seqlens_k"].tolist() == [12, 8, 3]
    else:
        assert calls[0]["seqlens_k"] is None


@pytest.mark.parametrize("padding", ["none", "right", "left"])
@pytest.mark.parametrize("family", list(FAMILIES))
def test_backward_matches(family, padding, device):
    ours, ref = _pair(family, device)
    ids, mask = _batch(padding, device)
    labels = ids.clone()
    if mask is not None:  # no loss on padding, nor on a token predicted from padding (what a
        labels[mask == 0] = -100  # padded query gets is each implementation's own)
        labels[:, 1:][mask[:, :-1] == 0] = -100
    grads = []
    for model in (ours, ref, _f64(ref)):
        model.train()  # attention_dropout is 0 in these configs
        model.zero_grad()
        loss = model(ids, attention_mask=mask, labels=labels, use_cache=False).loss
        loss.backward()
        grads.append({n: p.grad.clone() for n, p in model.named_parameters()
                      if p.grad is not None})
    assert grads[0].keys() == grads[1].keys() == grads[2].keys() and grads[0]
    for name in grads[1]:
        _rule(f"{family} {padding} d{name}", grads[0][name], grads[1][name], grads[2][name],
              GRAD_FACTOR)


@pytest.mark.parametrize("cache", ["dynamic", "static"])
@pytest.mark.parametrize("padding", ["none", "left"])
@pytest.mark.parametrize("family", list(FAMILIES))
def test_generate_greedy_tokens_match(family, padding, cache, device):
    ours, ref = _pair(family, device)
    ids, mask = _batch(padding, device)
    out = [m.generate(ids, attention_mask=mask, max_new_tokens=10, do_sample=False,
                      cache_implementation=cache, pad_token_id=0) for m in (ours, ref)]
    assert out[0].shape == (3, PROMPT + 10)
    assert torch.equal(out[0], out[1]), (out[0][:, PROMPT:], out[1][:, PROMPT:])


def test_compiled_static_cache_decoding(device):
    # generate() compiles the decoding step for a static cache (on a GPU by itself; asked for
    # here on any device): the layout made ahead of each step goes through the compiled
    # graph, attnkit through its custom op, one graph for all steps (fullgraph).
    torch._dynamo.reset()
    torch._dynamo.utils.counters.clear()
    ours, ref = _pair("mistral", device)
    ids, mask = _batch("left", device)
    config = transformers.CompileConfig(backend="aot_eager", fullgraph=True, mode=None)
    config._compile_all_devices = True
    out = ours.generate(ids, attention_mask=mask, max_new_tokens=8, do_sample=False,
                        cache_implementation="static", compile_config=config, pad_token_id=0)
    want = ref.generate(ids, attention_mask=mask, max_new_tokens=8, do_sample=False,
                        cache_implementation="static", pad_token_id=0)
    assert torch._dynamo.utils.counters["stats"]["unique_graphs"] >= 1  # it did compile
    assert torch.equal(out, want), (out[:, PROMPT:], want[:, PROMPT:])


def test_decode_logits_match_with_cache(device):
    # Every decode step's logits, not only their argmax: one left-padded prompt, then
    # single-token steps past the sliding window, all models fed the reference's tokens.
    ours, ref = _pair("mistral", device)
    ids, mask = _batch("left", device)
    steps = ref.generate(ids, attention_mask=mask, max_new_tokens=8, do_sample=False,
                         pad_token_id=0)[:, PROMPT:]
    logits = []
    for model in (ours, ref, _f64(ref)):
        m, seen = mask, []
        with torch.no_grad():
            out = model(ids, attention_mask=m, use_cache=True)
            for t in range(steps.shape[1]):
                m = torch.cat([m, m.new_ones(3, 1)], 1)
                out = model(steps[:, t:t + 1], attention_mask=m, use_cache=True,
                            **{_CACHE_ARG: out.past_key_values})
                seen.append(out.logits)
        logits.append(torch.cat(seen, 1))
    _rule("decode-step logits", *logits)


#: The forward's name for the cache it continues from (``past_key_values`` before 5.25).
_CACHE_ARG = ("cache" if "cache" in inspect.signature(transformers.LlamaForCausalLM.forward)
              .parameters else "past_key_values")


def test_from_pretrained_by_name(tmp_path):
    _, ref = _pair("llama")
    ref.save_pretrained(tmp_path)
    ours = transformers.AutoModelForCausalLM.from_pretrained(tmp_path,
                                                             attn_implementation="attnkit")
    assert ours.config._attn_implementation == "attnkit"
    ids, mask = _batch("right")
    with torch.no_grad():
        _close(ours(ids, attention_mask=mask).logits[mask.bool()],
               ref(ids, attention_mask=mask).logits[mask.bool()], "from_pretrained logits")


def test_register_under_another_name_with_a_backend(calls):
    name = akt.register("attnkit-reference", backend="reference")
    make, _ = FAMILIES["llama"]
    model = transformers.AutoModelForCausalLM.from_config(make(), attn_implementation=name)
    model(_batch("none")[0], use_cache=False)
    assert calls and {c["backend"] for c in calls} == {"reference"}


def test_a_four_d_mask_passed_by_the_caller_runs_as_sdpa_would():
    ours, ref = _pair("llama")
    ids, _ = _batch("none")
    causal = torch.ones(PROMPT, PROMPT, dtype=torch.bool).tril()[None, None].expand(3, 1, -1,
                                                                                     -1)
    with torch.no_grad():
        _close(ours(ids, attention_mask=causal, use_cache=False).logits,
               ref(ids, attention_mask=causal, use_cache=False).logits, "4-D mask logits")


# -- packed (padding-free) batches ------------------------------------------------------------

#: Documents packed back to back in each row (lengths), position_ids restarting at 0 in each;
#: one in each row starts inside it and is longer than the sliding window (5).
PACKED = [[4, 6, 2], [3, 9]]
PACKED_OFFSETS = [0, 4, 10, 12, 15, 24]


def _packed(device="cpu", seed=2):
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(0, VOCAB, (len(PACKED), PROMPT), generator=g).to(device)
    positions = torch.tensor([[i for n in row for i in range(n)] for row in PACKED]).to(device)
    return ids, positions


def _documents():
    """``(row, start, end)`` of each packed document."""
    for r, row in enumerate(PACKED):
        start = 0
        for n in row:
            yield r, start, start + n
            start += n


def _check_varlen_calls(family, varlen_calls, layers):
    assert len(varlen_calls) == layers  # every layer ran each document on its own
    assert all(c["cu_q"] == c["cu_k"] == PACKED_OFFSETS for c in varlen_calls)
    assert all(c["max_q"] == c["max_k"] == 9 and c["causal"] for c in varlen_calls)
    windows = {"llama": {None}, "mistral": {(4, -1)}, "gemma2": {(4, -1), None}}[family]
    assert {c["window"] for c in varlen_calls} == windows
    assert {c["softcap"] for c in varlen_calls} == ({4.0} if family == "gemma2" else {None})


@pytest.mark.parametrize("family", list(FAMILIES))
def test_packed_forward_matches_separate_documents_and_reference(family, varlen_calls,
                                                                 device):
    ours, ref = _pair(family, device)
    ids, positions = _packed(device)
    with torch.no_grad():
        got, want, want64 = (m(ids, position_ids=positions, use_cache=False).logits
                             for m in (ours, ref, _f64(ref)))
        _check_varlen_calls(family, varlen_calls, ours.config.num_hidden_layers)
        # transformers' own packed masking in its sdpa (eager for Gemma 2)
        _rule(f"{family} packed logits", got, want, want64)
        # causal attention across the documents' boundaries (a 4-D mask, not packed)
        crossed = torch.ones(PROMPT, PROMPT, dtype=torch.bool, device=device).tril()
        crossed = ref(ids, attention_mask=crossed[None, None].expand(len(PACKED), 1, -1, -1),
                      position_ids=positions, use_cache=False).logits
        alone = torch.zeros_like(got)
        for r, start, end in _documents():
            alone[r, start:end] = ours(ids[r:r + 1, start:end], use_cache=False).logits[0]
            if start > 0:  # the checks below see documents attending to each other
                err = float((crossed[r, start:end] - alone[r, start:end]).abs().max())
                assert err > 1e3 * 2e-5 * max(1.0, float(alone.abs().max()))
    # the documents run one by one: as accurate, and on the CPU the same to fp32 rounding
    _rule(f"{family} packed logits against the documents alone", got, alone, want64)
    if device == "cpu":
        _close(got, alone, f"{family} packed logits against the documents alone")


@pytest.mark.parametrize("family", list(FAMILIES))
def test_packed_backward_matches_separate_documents(family, device):
    ours, ref = _pair(family, device)
    ids, positions = _packed(device)
    weights = torch.randn(len(PACKED), PROMPT, VOCAB,
                          generator=torch.Generator().manual_seed(3)).to(device)

    def grads(model, packed):
        model.train()  # attention_dropout is 0 in these configs
        model.zero_grad()
        if packed:  # a loss linear in the logits: the packed row's is the documents' sum
            logits = model(ids, position_ids=positions, use_cache=False).logits
            (logits * weights).sum().backward()
        else:
            for r, start, end in _documents():
                logits = model(ids[r:r + 1, start:end], use_cache=False).logits
                (logits * weights[r:r + 1, start:end]).sum().backward()
        return {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}

    packed, separate = grads(ours, True), grads(ours, False)
    want, want64 = grads(ref, True), grads(_f64(ref), True)
    assert packed.keys() == separate.keys() == want.keys() == want64.keys() and packed
    for name in packed:  # against the documents alone, then against transformers' packing
        _rule(f"{family} packed d{name}", packed[name], separate[name], want64[name],
              GRAD_FACTOR)
        _rule(f"{family} packed d{name}", packed[name], want[name], want64[name], GRAD_FACTOR)
        if device == "cpu":
            _close(packed[name], separate[name], f"{family} packed d{name}")


def test_packed_bidirectional_layout_runs_each_document_on_its_own():
    # An encoder's packed mask: no causal band, documents still kept apart.
    mu = transformers.masking_utils
    ids, positions = _packed()
    segments = transformers.masking_utils.find_packed_sequence_indices(positions)
    mask_function = mu.and_masks(mu.bidirectional_mask_function,
                                 mu.packed_sequence_mask_function(segments))
    layout = akt.key_layout(len(PACKED), PROMPT, PROMPT, mask_function=mask_function)
    assert not layout.causal and layout.cu_seqlens.tolist() == PACKED_OFFSETS
    assert layout.cu_seqlens.dtype == torch.int32 and layout.max_seqlen == 9
    g = torch.Generator().manual_seed(4)
    q = torch.randn(len(PACKED), 4, PROMPT, 16, generator=g, dtype=torch.float64)
    k, v = (torch.randn(len(PACKED), 2, PROMPT, 16, generator=g, dtype=torch.float64)
            for _ in range(2))
    out, _ = akt.attention_forward(None, q, k, v, layout, scaling=0.25)
    assert out.shape == (len(PACKED), PROMPT, 4, 16)
    for r, start, end in _documents():
        alone = attnkit.attention(*(t[r:r + 1, :, start:end] for t in (q, k, v)), scale=0.25)
        torch.testing.assert_close(out[r, start:end], alone[0].transpose(0, 1))


@pytest.mark.parametrize("positions", [True, False], ids=["position_ids", "no_position_ids"])
def test_flattening_collator_with_flash_arguments(positions, varlen_calls, device):
    # cu_seq_lens_q/k and max_length_q/k as the collator gives them for flash attention: used
    # as they are, whether or not position_ids mark the documents too. Row 1's second
    # document is longer than Mistral's window.
    ours, ref = _pair("mistral", device)
    ids, _ = _packed()
    docs = [{"input_ids": ids[1, start:end].tolist()} for r, start, end in _documents()
            if r == 1]
    batch = transformers.DataCollatorWithFlattening(
        return_flash_attn_kwargs=True, return_position_ids=positions)(docs)
    assert batch["cu_seq_lens_q"].tolist() == [0, 3, 12] and batch["max_length_q"] == 9
    batch.pop("labels")
    batch = {k: v.to(device) if isinstance(v, torch.Tensor) else v for k, v in batch.items()}
    with torch.no_grad():
        got = ours(**batch).logits[0]  # use_cache left at its default (True)
        assert len(varlen_calls) == ours.config.num_hidden_layers
        assert {(c["max_q"], c["window"]) for c in varlen_calls} == {(9, (4, -1))}
        alone, alone_ref, alone64 = (
            torch.cat([m(batch["input_ids"][:, s:e], use_cache=False).logits[0]
                       for s, e in ((0, 3), (3, 12))])
            for m in (ours, ref, _f64(ref)))
    # without position_ids, rotary positions run on across documents: the same relative
    # positions, rounded differently; the reference's own error is the yardstick either way
    _rule("collator logits", got, [alone, alone_ref], alone64)
    if positions and device == "cpu":
        _close(got, alone, "collator logits")


def test_packed_batches_with_a_cache_or_padding_are_refused():
    ours, _ = _pair("llama")
    ids, positions = _packed()
    mask = torch.ones_like(ids)
    # transformers makes these masks for one sequence per row (sdpa lets the documents see
    # each other): refused, not computed
    for kwargs in (dict(), dict(use_cache=True), dict(attention_mask=mask, use_cache=False)):
        with pytest.raises(ValueError, match=r"position_ids \(shape \(2, 12\).*restart"):
            ours(ids, position_ids=positions, **kwargs)
    ours.train()
    with pytest.raises(ValueError, match="restart"):
        ours(ids, position_ids=positions)  # use_cache defaults to True in training too
    cu = torch.tensor(PACKED_OFFSETS[:4], dtype=torch.int32)
    flash = dict(cu_seq_lens_q=cu, cu_seq_lens_k=cu, max_length_q=6, max_length_k=6)
    with pytest.raises(ValueError, match="cu_seq_lens_q/k mark a packed batch.*padding mask"):
        ours(ids[:1], attention_mask=mask[:1], use_cache=False, **flash)
    # generate()'s position_ids for left and right padding (1 on padding, 0, 1, ... on the
    # tokens) restart only where padding begins or ends: not refused
    padded = torch.tensor([[0] * 4 + [1] * 8, [1] * 8 + [0] * 4])
    ours.eval()
    with torch.no_grad():
        ours(ids, attention_mask=padded,
             position_ids=(padded.cumsum(-1) - 1).masked_fill(padded == 0, 1))


def test_dropout_on_a_packed_batch_runs_varlen_dropout(varlen_calls):
    make, _ = FAMILIES["llama"]
    config = make()
    config.attention_dropout = 0.1
    model = transformers.AutoModelForCausalLM.from_config(config, attn_implementation="attnkit")
    ids, positions = _packed()
    model.train()
    torch.manual_seed(0)
    a = model(ids, position_ids=positions, use_cache=False).logits
    assert [c["dropout_p"] for c in varlen_calls] == [0.1] * config.num_hidden_layers
    torch.manual_seed(0)
    assert torch.equal(a, model(ids, position_ids=positions, use_cache=False).logits)
    assert not torch.equal(a, model(ids, position_ids=positions, use_cache=False).logits)
    model.eval()  # no dropout in evaluation
    b = model(ids, position_ids=positions, use_cache=False).logits
    assert varlen_calls[-1]["dropout_p"] == 0.0
    assert not torch.equal(a, b)


def test_packed_dropout_is_attention_varlen_dropout():
    # one layer's packed call draws what attention_varlen draws for those documents
    mu = transformers.masking_utils
    ids, positions = _packed()
    segments = mu.find_packed_sequence_indices(positions)
    mask_function = mu.and_masks(mu.causal_mask_function,
                                 mu.packed_sequence_mask_function(segments))
    layout = akt.key_layout(len(PACKED), PROMPT, PROMPT, mask_function=mask_function)
    g = torch.Generator().manual_seed(3)
    q = torch.randn(len(PACKED), 4, PROMPT, 16, generator=g, dtype=torch.float64)
    k, v = (torch.randn(len(PACKED), 2, PROMPT, 16, generator=g, dtype=torch.float64)
            for _ in range(2))
    torch.manual_seed(5)
    out, _ = akt.attention_forward(None, q, k, v, layout, dropout=0.25, scaling=0.25)
    flat = [t.transpose(1, 2).reshape(-1, t.shape[1], 16) for t in (q, k, v)]
    cu = torch.tensor(PACKED_OFFSETS, dtype=torch.int32)
    torch.manual_seed(5)
    want = attnkit.attention_varlen(*flat, cu, cu, 9, 9, causal=True, scale=0.25,
                                    dropout_p=0.25)
    torch.testing.assert_close(out.reshape(-1, 4, 16), want, rtol=0, atol=0)
    torch.manual_seed(5)
    plain = attnkit.attention_varlen(*flat, cu, cu, 9, 9, causal=True, scale=0.25)
    assert not torch.equal(want, plain)


# -- refusals ----------------------------------------------------------------------------------

def test_padding_inside_a_sequence_is_refused():
    ours, _ = _pair("llama")
    ids, _ = _batch("none")
    holes = torch.ones(3, PROMPT, dtype=torch.long)
    holes[1, 4] = 0
    with pytest.raises(ValueError, match=r"attention_mask \(shape \(3, 12\).*one run"):
        ours(ids, attention_mask=holes)


def test_attention_dropout_in_training_runs_attnkit_dropout():
    make, _ = FAMILIES["llama"]
    config = make()
    config.attention_dropout = 0.1
    model = transformers.AutoModelForCausalLM.from_config(config, attn_implementation="attnkit")
    ids = _batch("none")[0]
    model.train()
    torch.manual_seed(0)
    a = model(ids, use_cache=False).logits
    torch.manual_seed(0)
    assert torch.equal(a, model(ids, use_cache=False).logits)  # the seed fixes the masks
    model.eval()  # no dropout in evaluation
    b = model(ids, use_cache=False).logits
    assert not torch.equal(a, b) and torch.equal(b, model(ids, use_cache=False).logits)


def test_other_mask_functions_are_refused():
    mu = transformers.masking_utils
    assert akt.read_mask_function(mu.causal_mask_function) == (True, None, None)
    assert akt.read_mask_function(mu.sliding_window_causal_mask_function(8)) == (True, 7,
                                                                                None)
    assert akt.read_mask_function(mu.bidirectional_mask_function) == (False, None, None)
    chunked = mu.chunked_causal_mask_function(4, torch.zeros(1, dtype=torch.long))
    custom = mu.or_masks(mu.causal_mask_function, lambda b, h, q, kv: kv == 0)
    for fn in (chunked, custom):
        with pytest.raises(ValueError, match="does not\\s+compute"):
            akt.read_mask_function(fn)
    # packed documents: each document's band, and transformers' document index of each token,
    # with each document's positions remapped (newer transformers 5.x) or not
    segments = torch.tensor([[0, 0, 1, 1, 1]])
    band = mu.sliding_window_causal_mask_function(8)
    forms = [mu.and_masks(band, mu.packed_sequence_mask_function(segments))]
    remap = getattr(mu, "remap_positions_for_packed_sequence", None)
    if remap is not None:
        remapped = remap(band, torch.tensor([[0, 1, 0, 1, 2]]))
        forms.append(mu.and_masks(remapped, mu.packed_sequence_mask_function(segments)))
        with pytest.raises(ValueError, match="does not\\s+compute"):
            akt.read_mask_function(remapped)  # remapped positions without documents
    for packed in forms:
        causal, window, got = akt.read_mask_function(packed)
        assert (causal, window) == (True, 7) and got is segments
    with pytest.raises(ValueError, match="does not\\s+compute"):
        akt.read_mask_function(mu.and_masks(mu.packed_sequence_mask_function(segments),
                                            mu.packed_sequence_mask_function(segments)))


def test_readme_snippet_runs():
    from test_sdpa import readme_snippet

    scope = {}
    exec(compile(readme_snippet("Hugging Face transformers"), "README", "exec"), scope)
    assert scope["tokens"].shape == (2, 20)
    assert scope["model"].config._attn_implementation == "attnkit"
