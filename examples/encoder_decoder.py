"""An encoder-decoder decoding loop on attnkit's KV-cache API, shaped like FasterTransformer's
decoder: every step runs each decoder layer's self-attention over a growing cache and its
cross-attention over the encoder's outputs, cached once.

- The encoder encodes a batch of source sequences of different lengths, padded to the longest;
  each layer's cross-attention keys/values are computed once into a cache and attended with
  ``cache_seqlens = encoder lengths``, ``causal=False`` (padding is never seen).
- The decoder prefills a prompt, then generates one token per step greedily; each step
  appends its keys/values to the self-attention caches (``attention_with_kvcache`` with
  ``k_new``/``v_new``) and the loop, the caller, advances ``cache_seqlens``.
- At every step the logits are checked against recomputing the whole decoder from scratch
  over all tokens so far with ``attnkit.attention`` (no cache).

Run: ``python examples/encoder_decoder.py [--backend NAME]`` (CPU, a few seconds).
"""

from __future__ import annotations

import argparse

import torch

import attnkit


def make_model(vocab=50, d_model=64, heads=4, kv_heads=2, layers=2, seed=0):
    gen = torch.Generator().manual_seed(seed)

    def w(*shape):
        return torch.randn(shape, generator=gen) / shape[0] ** 0.5

    head_dim = d_model // heads
    kv_dim = kv_heads * head_dim

    def attn_weights():
        return {"q": w(d_model, d_model), "k": w(d_model, kv_dim), "v": w(d_model, kv_dim),
                "o": w(d_model, d_model)}

    return {
        "heads": heads, "kv_heads": kv_heads, "head_dim": head_dim,
        "embed": torch.randn((vocab, d_model), generator=gen),
        "pos": torch.randn((256, d_model), generator=gen) * 0.1,
        "enc": [{"self": attn_weights(), "mlp": (w(d_model, 4 * d_model), w(4 * d_model, d_model))}
                for _ in range(layers)],
        "dec": [{"self": attn_weights(), "cross": attn_weights(),
                 "mlp": (w(d_model, 4 * d_model), w(4 * d_model, d_model))}
                for _ in range(layers)],
        "unembed": w(d_model, vocab),
    }


def _heads(x, n, d):
    """(B, S, n * d) -> (B, n, S, d)."""
    return x.view(x.shape[0], x.shape[1], n, d).transpose(1, 2)


def _merge(x):
    """(B, H, S, d) -> (B, S, H * d)."""
    return x.transpose(1, 2).reshape(x.shape[0], x.shape[2], -1)


def _norm(x):
    return torch.nn.functional.layer_norm(x, x.shape[-1:])


def _mlp(x, mlp):
    return torch.relu(x @ mlp[0]) @ mlp[1]


def _kv(m, x, weights):
    return (_heads(x @ weights["k"], m["kv_heads"], m["head_dim"]),
            _heads(x @ weights["v"], m["kv_heads"], m["head_dim"]))


def encode(m, src, src_lens, backend):
    """Encoder over padded sources; positions >= src_lens[b] are never attended."""
    x = m["embed"][src] + m["pos"][: src.shape[1]]
    for layer in m["enc"]:
        h = _norm(x)
        q = _heads(h @ layer["self"]["q"], m["heads"], m["head_dim"])
        k, v = _kv(m, h, layer["self"])
        a = attnkit.attention(q, k, v, seqlens_k=src_lens, backend=backend)
        x = x + _merge(a) @ layer["self"]["o"]
        x = x + _mlp(_norm(x), layer["mlp"])
    return x


class Decoder:
    """The incremental decoder: self-attention caches grow, cross-attention caches are
    filled once from the encoder's output."""

    def __init__(self, m, enc_out, enc_lens, max_len, backend):
        self.m, self.backend, self.enc_lens = m, backend, enc_lens
        B = enc_out.shape[0]
        shape = (B, m["kv_heads"], max_len, m["head_dim"])
        # Zeros, not empty(): unfilled positions are never attended, but the reference
        # backend's materialized P @ V would still turn a NaN bit pattern there into NaN.
        self.self_k = [torch.zeros(shape) for _ in m["dec"]]
        self.self_v = [torch.zeros(shape) for _ in m["dec"]]
        self.cross = [_kv(m, enc_out, layer["cross"]) for layer in m["dec"]]
        self.cache_seqlens = torch.zeros(B, dtype=torch.int32)

    def step(self, tokens):
        """Logits (B, S_new, vocab) of tokens (B, S_new) placed after the cached ones."""
        m, B, s_new = self.m, tokens.shape[0], tokens.shape[1]
        pos = self.cache_seqlens.long().view(B, 1) + torch.arange(s_new).view(1, s_new)
        x = m["embed"][tokens] + m["pos"][pos]
        for i, layer in enumerate(m["dec"]):
            h = _norm(x)
            q = _heads(h @ layer["self"]["q"], m["heads"], m["head_dim"])
            k_new, v_new = _kv(m, h, layer["self"])
            a = attnkit.attention_with_kvcache(q, self.self_k[i], self.self_v[i],
                                               self.cache_seqlens, k_new, v_new,
                                               causal=True, backend=self.backend)
            x = x + _merge(a) @ layer["self"]["o"]
            h = _norm(x)
            q = _heads(h @ layer["cross"]["q"], m["heads"], m["head_dim"])
            ck, cv = self.cross[i]
            a = attnkit.attention_with_kvcache(q, ck, cv, self.enc_lens, causal=False,
                                               backend=self.backend)
            x = x + _merge(a) @ layer["cross"]["o"]
            x = x + _mlp(_norm(x), layer["mlp"])
        self.cache_seqlens += s_new  # the caller advances the fill level, once per step
        return _norm(x) @ m["unembed"]


def decode_full(m, tokens, enc_out, enc_lens, backend):
    """The same decoder without caches: full causal self-attention over all tokens."""
    n = tokens.shape[1]
    x = m["embed"][tokens] + m["pos"][:n]
    for layer in m["dec"]:
        h = _norm(x)
        q = _heads(h @ layer["self"]["q"], m["heads"], m["head_dim"])
        k, v = _kv(m, h, layer["self"])
        x = x + _merge(attnkit.attention(q, k, v, causal=True, backend=backend)) \
            @ layer["self"]["o"]
        h = _norm(x)
        q = _heads(h @ layer["cross"]["q"], m["heads"], m["head_dim"])
        ck, cv = _kv(m, enc_out, layer["cross"])
        x = x + _merge(attnkit.attention(q, ck, cv, seqlens_k=enc_lens, backend=backend)) \
            @ layer["cross"]["o"]
        x = x + _mlp(_norm(x), layer["mlp"])
    return _norm(x) @ m["unembed"]


def pick_backend(requested):
    """The requested backend, or the automatic choice; the reference when nothing installed
    is chosen automatically for CPU float32 (said out loud, not silently)."""
    if requested not in (None, "auto"):
        return requested
    t = torch.zeros(1, 1, 1, 16)
    if attnkit.explain(t, t, t, causal=True).chosen is None:
        print("no backend is chosen automatically for CPU float32 here; using 'reference'")
        return "reference"
    return None


def main(backend=None, steps=10, verbose=True) -> float:
    """Run the loop; returns the largest |step logits - full recompute logits| seen."""
    torch.manual_seed(0)
    backend = pick_backend(backend)
    m = make_model()
    src_lens = torch.tensor([7, 12, 3], dtype=torch.int32)
    src = torch.randint(0, 50, (3, int(src_lens.max())))
    prompt = torch.randint(0, 50, (3, 3))
    with torch.no_grad():
        enc_out = encode(m, src, src_lens, backend)
        # Padding rows of the encoder output are garbage; the cross caches must never read them.
        enc_out = enc_out.clone()
        for b, n in enumerate(src_lens.tolist()):
            enc_out[b, n:] = torch.randn_like(enc_out[b, n:]) * 100
        dec = Decoder(m, enc_out, src_lens, prompt.shape[1] + steps, backend)
        tokens = prompt
        logits = dec.step(prompt)
        worst = 0.0
        for t in range(steps):
            full = decode_full(m, tokens, enc_out, src_lens, backend)
            err = (logits[:, -1] - full[:, -1]).abs().max().item()
            worst = max(worst, err)
            if verbose:
                print(f"step {t:2d}: cache_seqlens {dec.cache_seqlens.tolist()}, "
                      f"max|step - full recompute| = {err:.2e}")
            assert err < 1e-4, f"step {t}: incremental decoding differs from recompute by {err}"
            nxt = logits[:, -1].argmax(-1, keepdim=True)
            tokens = torch.cat([tokens, nxt], 1)
            if t + 1 < steps:
                logits = dec.step(nxt)
    if verbose:
        print(f"decoded {steps} steps: step-by-step equals full recompute (max diff {worst:.2e})")
    return worst


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--backend", default=None, help="attnkit backend (default: auto)")
    parser.add_argument("--steps", type=int, default=10)
    args = parser.parse_args()
    main(args.backend, args.steps)
