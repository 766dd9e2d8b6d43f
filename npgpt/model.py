"""The GPT: forward (with an optional KV cache), loss, and the hand-written backward through every layer.

Pre-LN block (GPT-2/3):  x = x + attn(ln_1(x));  x = x + mlp(ln_2(x));  final ln_f
Post-LN block (GPT-1):   x = ln_1(x + attn(x));  x = ln_2(x + mlp(x));  no final LN
The LM head is tied to the token embedding: logits = x @ wte^T.
"""
from __future__ import annotations

import numpy as np

from .config import GPTConfig
from .errors import NpgptError
from .layers import (attention_backward, attention_forward, cross_entropy_backward, dropout_backward,
                     dropout_forward, embedding_backward, embedding_forward, gelu_backward, gelu_forward,
                     layernorm_backward, layernorm_forward, linear_backward, linear_forward, merge_heads,
                     merge_heads_backward, split_heads, split_heads_backward, token_nll)
from .malloc import keep_freed_memory
from .params import init_params, make_views, num_params, param_shapes


_BLOCK_MATRICES = ("attn.c_attn.weight", "attn.c_proj.weight", "mlp.c_fc.weight", "mlp.c_proj.weight")
FUSED_DECODE_MAX = 1 << 20  # weights per block (4 MB in float32) up to which decoding runs fused kernels


class KVCache:
    """Keys and values of every layer: k[l], v[l] [B, H, slots, D]. A dense layer keeps positions
    0 .. length - 1 (slots = room); a banded layer of window w < room keeps only its last w positions,
    position p in slot p % w (a ring), so a long generation's memory and reads grow in the dense layers
    only. Attention does not depend on the keys' order (positions enter through the embeddings), so a
    decode step attends to the ring as it lies. Rewinding `length` (re-scoring from a shared prefix)
    needs ring=False: a ring has overwritten the positions it would go back to."""

    def __init__(self, cfg: GPTConfig, batch: int, dtype=None, length: int | None = None, ring: bool = True):
        """Room for `length` positions (default and at most: the context). dtype None follows the model:
        the cache takes the dtype of the first keys stored (a float64 model keeps float64 attention)."""
        self.room = min(length or cfg.block_size, cfg.block_size)
        self.windows = [w if ring and 0 < w < self.room else 0 for w in map(cfg.window, range(cfg.n_layer))]
        self.follow = dtype is None
        # np.zeros maps untouched pages lazily, so a placeholder that extend() replaces costs nothing
        shapes = [(batch, cfg.n_head, w or self.room, cfg.head_dim) for w in self.windows]
        self.k = [np.zeros(s, dtype or np.float32) for s in shapes]
        self.v = [np.zeros(s, dtype or np.float32) for s in shapes]
        self.length = 0
        self.pad = None  # [B] left-padding columns of each row (None: no padding)

    @property
    def dtype(self):
        return self.k[0].dtype

    def to(self, dtype):
        """Follow the model's dtype (see __init__)."""
        if self.follow and dtype != self.dtype:
            self.k = [a.astype(dtype) for a in self.k]
            self.v = [a.astype(dtype) for a in self.v]

    def extend(self, layer, k, v):
        """Store k, v [B, H, T, D] at the next T positions; return (keys, values, first): the keys and
        values of positions first .. length + T - 1 in order, all that the new queries may see (first = 0
        for a dense layer; a ring layer's band starts at max(0, length - w + 1))."""
        self.to(k.dtype)
        t0, t1 = self.length, self.length + k.shape[2]
        K, V, w = self.k[layer], self.v[layer], self.windows[layer]
        if not w:
            K[:, :, t0:t1] = k
            V[:, :, t0:t1] = v
            return K[:, :, :t1], V[:, :, :t1], 0
        first = max(0, t0 - w + 1)
        old = np.arange(first, t0) % w
        keys = np.concatenate([K[:, :, old], k], axis=2)
        values = np.concatenate([V[:, :, old], v], axis=2)
        new = np.arange(max(t0, t1 - w), t1)  # the newest w positions go into the ring
        K[:, :, new % w] = k[:, :, new - t0]
        V[:, :, new % w] = v[:, :, new - t0]
        return keys, values, first


class GPT:
    """A GPT whose parameters live in one flat buffer (`flat`) with named views (`params`).

    `forward(idx)` gives logits; `loss(idx, targets, train=...)` keeps the activations that `backward()`
    needs; `backward()` adds d(loss)/d(params) into the flat `grad` buffer (views in `grads`).
    """

    def __init__(self, config: GPTConfig, flat: np.ndarray | None = None, *, seed: int = 0,
                 dtype=np.float32, tokenizer=None, params: dict | None = None):
        self.config = config.validate()
        self.shapes = param_shapes(config)
        self.grad = self.grads = self._saved = self._defer = None
        self.tokenizer = tokenizer
        if params is not None:  # inference-only weights (e.g. int8, see quant.py): no flat buffer
            self.flat, self.params = None, params
            return
        if flat is None:
            flat = init_params(config, seed=seed, dtype=dtype)
        n = sum(int(np.prod(s)) for _, s in self.shapes)
        if flat.ndim != 1 or flat.size != n:
            raise NpgptError(f"parameter buffer has {flat.size} values, config needs {n}")
        self.flat = flat
        self.params = make_views(flat, self.shapes)

    @property
    def num_params(self) -> int:
        return num_params(self.config)

    @property
    def fused_decode(self) -> bool:
        """Whether decoding one token per row runs the fused kernels (_decode), for pre-LN models: float
        weights of at most FUSED_DECODE_MAX per block (larger float blocks keep BLAS, whose two threads
        then win, equal at GPT-2 124M, and inference without Numba: 0.5 s of start-up and ~110 MB), or
        quantized weights stored (out, in) at any size, which import Numba anyway: one kernel per block
        saves the ~20 NumPy calls around its four products (GPT-2 int8: 1.4 ms of a 4 ms token)."""
        cfg = self.config
        if cfg.ln != "pre":
            return False
        if self.quantized:  # asked once per token: remembered per params dict
            if getattr(self, "_rows_layout", (None,))[0] is not self.params:
                self._rows_layout = (self.params, all(w.decode_form() is not None for w in self._matrices()))
            return self._rows_layout[1]
        return 12 * cfg.n_embd ** 2 <= FUSED_DECODE_MAX

    def _matrices(self):
        """The matrices a decode step reads: each block's four, and wte (the tied head)."""
        return [self.params[f"h.{l}.{n}"] for l in range(self.config.n_layer) for n in _BLOCK_MATRICES] + [
            self.params["wte.weight"].T]

    @property
    def quantized(self) -> bool:
        """Inference-only weights (int8, see quant.py): no flat buffer, nothing to train or export."""
        return self.flat is None

    def zero_grad(self):
        if self.flat is None:
            raise NpgptError("this model holds inference-only (quantized) weights and cannot be trained")
        if self.grad is None:
            # training from here on: keep freed temporaries for reuse (see malloc.py). Training loops
            # call zero_grad() before their first backward(), so this is the place that always runs.
            keep_freed_memory()
            self.grad = np.zeros_like(self.flat)
            self.grads = make_views(self.grad, self.shapes)
        else:
            self.grad.fill(0)

    # ------------------------------------------------------------------ forward
    def forward(self, idx, kv: KVCache | None = None, last_only: bool = False, pad=None):
        """idx [B, T] token ids -> logits [B, T, V] (or [B, 1, V] with last_only). No state is kept for
        a backward. With a KV cache, idx continues the cached sequence and the cache is extended.
        pad [B]: row b starts with pad[b] padding columns, which no position attends to (batches of
        prompts of different lengths, left-padded); with a cache, set kv.pad instead."""
        idx = self._check_idx(idx, kv)
        if kv is not None and idx.shape[1] == 1 and self.fused_decode:
            return self._decode(idx, kv)
        x = self._body(idx, kv=kv, pad=pad)
        if last_only:
            x = x[:, -1:]
        return self._head(x)

    def loss(self, idx, targets, *, train: bool = False, rng: np.random.Generator | None = None) -> float:
        """Mean cross-entropy of next-token prediction. idx, targets [B, T] (targets < 0 are ignored).
        train=True enables dropout (drawn from rng). The activations are kept for `backward()`."""
        nll = self._lm(idx, targets, train, rng)
        return float(nll.sum(dtype=np.float64) / max(int((self._saved["targets"] >= 0).sum()), 1))

    def logprobs(self, idx, targets, *, train: bool = False, rng: np.random.Generator | None = None,
                 temperature: float = 1.0) -> np.ndarray:
        """log p(targets[b, t] | idx[b, :t+1]) per position [B, T] float32 (0 where targets < 0): what
        sequence-level objectives (SFT masks, DPO, PPO) are built from. With a temperature, of the
        distribution softmax(logits / temperature) that sampling at that temperature draws from (PPO's
        ratios and KL must be those of the policy that produced the rollouts). The activations are
        kept; pass `dlogp` (d objective / d logprobs) to `backward()`."""
        idx = np.asarray(idx)
        return -self._lm(idx, targets, train, rng, temperature).reshape(np.shape(targets))

    def features(self, idx, *, train: bool = False, rng: np.random.Generator | None = None) -> np.ndarray:
        """Final hidden states [B, T, C] without the LM head (for scalar heads: reward and value models).
        The activations are kept; `backward(dhidden=...)` follows."""
        idx = self._check_idx(idx, None)
        acts = {"idx": idx, "layers": [], "rng": rng if train else None, "logits": None}
        acts["xf"] = self._body(idx, acts=acts)
        self._saved = acts
        return acts["xf"]

    def _lm(self, idx, targets, train, rng, temperature: float = 1.0) -> np.ndarray:
        """Forward with the tied LM head (logits divided by `temperature`), keeping activations; per-token
        NLL [B * T]."""
        idx = self._check_idx(idx, None)
        targets = np.asarray(targets)
        if targets.shape != idx.shape:
            raise NpgptError(f"targets {targets.shape} must have the shape of the ids {idx.shape}")
        acts = {"idx": idx, "layers": [], "rng": rng if train else None}
        xf = self._body(idx, acts=acts)
        logits = self._head(xf)
        if temperature != 1.0:
            logits *= logits.dtype.type(1.0 / temperature)
        N = idx.size
        nll = token_nll(logits.reshape(N, -1), targets.reshape(N))
        acts.update(xf=xf, logits=logits, targets=targets, temperature=temperature)
        self._saved = acts
        return nll

    def drop_activations(self):
        """Free what the last loss()/logprobs()/features() kept for a backward (after evaluation-only calls)."""
        self._saved = None

    def _head(self, x):
        """The tied LM head: x [B, T, C] -> logits [B, T, V] = x @ wte^T, as one 2-D product."""
        wte = self.params["wte.weight"]
        return (x.reshape(-1, x.shape[-1]) @ wte.T).reshape(*x.shape[:-1], wte.shape[0])

    @property
    def hidden(self) -> np.ndarray:
        """Final hidden states [B, T, C] of the last `loss()` call (after ln_f for pre-LN models): what
        the LM head, and any task head, read."""
        if self._saved is None:
            raise RuntimeError("hidden needs a preceding loss() call")
        return self._saved["xf"]

    @property
    def logits(self) -> np.ndarray:
        """Logits [B, T, V] of the last `loss()` or `logprobs()` call (for entropies and diagnostics)."""
        if self._saved is None or self._saved.get("logits") is None:
            raise RuntimeError("logits needs a preceding loss() or logprobs() call")
        return self._saved["logits"]

    def _check_idx(self, idx, kv):
        idx = np.asarray(idx)
        if idx.ndim == 1:
            idx = idx[None]
        if idx.ndim != 2 or not np.issubdtype(idx.dtype, np.integer):
            raise NpgptError(f"token ids must be an integer array [B, T], got {idx.dtype} {idx.shape}")
        start = kv.length if kv is not None else 0
        if kv is not None and start + idx.shape[1] > kv.room:
            raise NpgptError(f"KV cache has room for {kv.room} positions, {start + idx.shape[1]} needed")
        if start + idx.shape[1] > self.config.block_size:
            raise NpgptError(f"sequence of {start + idx.shape[1]} tokens exceeds the context of "
                             f"{self.config.block_size}")
        if idx.size and (idx.min() < 0 or idx.max() >= self.config.vocab_size):
            raise NpgptError(f"token id out of range [0, {self.config.vocab_size})")
        return idx.astype(np.int64, copy=False)

    def _body(self, idx, kv: KVCache | None = None, acts: dict | None = None, pad=None):
        """Embeddings and all blocks (and ln_f for pre-LN): idx [B, T] -> hidden states [B, T, C].
        When `acts` is a dict, every activation the backward needs is stored in it."""
        cfg, p = self.config, self.params
        if acts is not None and pad is not None:  # backward() does not pass pad to embedding_backward
            raise NpgptError("left padding (pad) is for inference only: not with activations kept for a backward")
        run = {"kv": kv, "pos0": kv.length if kv is not None else 0, "pad": kv.pad if kv is not None else pad,
               "rng": acts["rng"] if acts is not None else None,
               "save": acts is not None}  # keep what backward needs (see layers.py for which path runs)
        x = embedding_forward(idx, p["wte.weight"], p["wpe.weight"], run["pos0"], run["pad"])
        x, emb_mask = dropout_forward(x, cfg.dropout, run["rng"])
        for l in range(cfg.n_layer):
            a = {}
            x = self._residual(x, l, "ln_1", self._attn_forward, a, run)
            x = self._residual(x, l, "ln_2", self._mlp_forward, a, run)
            if acts is not None:
                acts["layers"].append(a)
        if kv is not None:
            kv.length += idx.shape[1]
        if cfg.ln == "pre":
            x, ln_f = layernorm_forward(x, p["ln_f.weight"], p.get("ln_f.bias"), cfg.layer_norm_eps, run["save"])
            if acts is not None:
                acts["ln_f"] = ln_f
        if acts is not None:
            acts["emb_mask"] = emb_mask
        return x

    def _decode(self, idx, kv: KVCache):
        """forward for one new token per row with a cache (see fused_decode for which models): idx [B, 1]
        -> logits [B, 1, V]. The same math with each block fused into one kernel (kernels.decode_layer)
        and ln_f with the tied head in another (decode_head): the ~40 NumPy calls per layer cost more
        than their arithmetic in a small model, and a third of a quantized GPT-2's token. Tests hold it
        equal to _body + _head."""
        from . import kernels as K
        cfg, p = self.config, self.params
        kv.to(p["wte.weight"].dtype)
        t = kv.length
        x = np.ascontiguousarray(embedding_forward(idx, p["wte.weight"], p["wpe.weight"], t, kv.pad)[:, 0],
                                 dtype=kv.dtype)
        kstart = np.zeros(len(x), np.int64) if kv.pad is None else kv.pad.astype(np.int64)
        blocks, ln_f, wte = self._fused_weights()
        for l, weights in enumerate(blocks):
            K.decode_layer(x, *weights, kv.k[l], kv.v[l], t, kstart, cfg.layer_norm_eps, cfg.n_head, cfg.window(l))
        kv.length += 1
        logits = np.empty((len(x), cfg.vocab_size), x.dtype)
        K.decode_head(x, *ln_f, cfg.layer_norm_eps, wte, logits)
        return logits[:, None]

    def _fused_weights(self):
        """(each block's 12 tensors in decode_layer's order, (ln_f weight, bias), wte), as plain ndarrays
        (Numba types an ndarray subclass such as a memmap on a slow path: ~10 us per argument per call),
        matrices as the tuples of kernels.decode_layer's weight forms, with zero biases for bias=False.
        Built once per params dict."""
        if getattr(self, "_fused", (None,))[0] is not self.params:
            names = ("ln_1.weight", "ln_1.bias", "attn.c_attn.weight", "attn.c_attn.bias", "attn.c_proj.weight",
                     "attn.c_proj.bias", "ln_2.weight", "ln_2.bias", "mlp.c_fc.weight", "mlp.c_fc.bias",
                     "mlp.c_proj.weight", "mlp.c_proj.bias")
            p = self.params

            def tensor(name):
                if name.split(".", 2)[-1] in _BLOCK_MATRICES:
                    return p[name].decode_form() if self.quantized else (np.asarray(p[name]),)
                if name in p:
                    return np.asarray(p[name])
                return np.zeros(p[name.replace(".bias", ".weight")].shape[-1], np.float32 if self.quantized
                                else p["wte.weight"].dtype)
            blocks = [tuple(tensor(f"h.{l}.{n}") for n in names) for l in range(self.config.n_layer)]
            wte = p["wte.weight"].T.decode_form() if self.quantized else (np.asarray(p["wte.weight"]),)
            self._fused = (p, blocks, (tensor("ln_f.weight"), tensor("ln_f.bias")), wte)
        return self._fused[1:]

    # ------------------------------------------------------------------ the block, as two residual lines
    # Pre-LN (GPT-2/3): x = x + f(ln(x)).  Post-LN (GPT-1): x = ln(x + f(x)).  f is the attention, then the
    # MLP; where the LN sits is written here once for each direction.
    def _w(self, l: int, name: str, grads: bool = False):
        """Layer l's parameter (or its gradient view) `name`; None for an absent bias."""
        return (self.grads if grads else self.params).get(f"h.{l}.{name}")

    def _residual(self, x, l, ln, sublayer, a, run):
        """x [B, T, C] -> x + f(ln(x)) (pre-LN) or ln(x + f(x)) (post-LN), f = `sublayer`."""
        eps, save = self.config.layer_norm_eps, run["save"]
        if self.config.ln == "pre":
            h, a[ln] = layernorm_forward(x, self._w(l, f"{ln}.weight"), self._w(l, f"{ln}.bias"), eps, save)
            return x + sublayer(h, l, a, run)
        x, a[ln] = layernorm_forward(x + sublayer(x, l, a, run), self._w(l, f"{ln}.weight"),
                                     self._w(l, f"{ln}.bias"), eps, save)
        return x

    def _residual_backward(self, dx, l, ln, sublayer_backward, a):
        """The mirror of `_residual`: d(output) [B, T, C] -> d(input); parameter gradients added."""
        def ln_backward(d):
            return self._ln_backward(d, a[ln], f"h.{l}.{ln}")
        if self.config.ln == "pre":
            return dx + ln_backward(sublayer_backward(dx, l, a))  # the residual and the branch both feed x
        dx = ln_backward(dx)
        return dx + sublayer_backward(dx, l, a)

    def _attn_forward(self, h, l, a, run):
        """Causal self-attention sublayer: h [B, T, C] -> dropout(c_proj(attention(c_attn(h))))."""
        w, cfg = self._w, self.config
        a["attn_in"] = h
        q, k, v = split_heads(linear_forward(h, w(l, "attn.c_attn.weight"), w(l, "attn.c_attn.bias")), cfg.n_head)
        first, pad = 0, run["pad"]
        if run["kv"] is not None:
            k, v, first = run["kv"].extend(l, k, v)  # a ring layer's keys start at `first`
            if first and pad is not None:
                pad = np.maximum(pad - first, 0)
        y, a["att"] = attention_forward(q, k, v, run["pos0"] - first, cfg.dropout, run["rng"], pad, run["save"],
                                        cfg.window(l))
        a["q"], a["k"], a["v"] = q, k, v
        a["y"] = y = merge_heads(y)
        out, a["drop_1"] = dropout_forward(linear_forward(y, w(l, "attn.c_proj.weight"), w(l, "attn.c_proj.bias")),
                                           cfg.dropout, run["rng"])
        return out

    def _attn_backward(self, dout, l, a):
        """d(attention sublayer output) [B, T, C] -> d(h); parameter gradients added."""
        w = self._w
        dy = linear_backward(dropout_backward(dout, a["drop_1"]), a["y"], w(l, "attn.c_proj.weight"),
                             w(l, "attn.c_proj.weight", True), w(l, "attn.c_proj.bias", True))
        dq, dk, dv = attention_backward(merge_heads_backward(dy, self.config.n_head), a["q"], a["k"], a["v"], a["att"])
        return linear_backward(split_heads_backward(dq, dk, dv), a["attn_in"], w(l, "attn.c_attn.weight"),
                               w(l, "attn.c_attn.weight", True), w(l, "attn.c_attn.bias", True))

    def _mlp_forward(self, h, l, a, run):
        """MLP sublayer: h [B, T, C] -> dropout(c_proj(gelu(c_fc(h))))."""
        w = self._w
        a["mlp_in"] = h
        a["fc"] = f = linear_forward(h, w(l, "mlp.c_fc.weight"), w(l, "mlp.c_fc.bias"))
        a["gelu"] = g = gelu_forward(f, run["save"])
        out, a["drop_2"] = dropout_forward(linear_forward(g, w(l, "mlp.c_proj.weight"), w(l, "mlp.c_proj.bias")),
                                           self.config.dropout, run["rng"])
        return out

    def _mlp_backward(self, dout, l, a):
        """d(MLP sublayer output) [B, T, C] -> d(h); parameter gradients added."""
        w = self._w
        dg = linear_backward(dropout_backward(dout, a["drop_2"]), a["gelu"], w(l, "mlp.c_proj.weight"),
                             w(l, "mlp.c_proj.weight", True), w(l, "mlp.c_proj.bias", True))
        return linear_backward(gelu_backward(dg, a["fc"]), a["mlp_in"], w(l, "mlp.c_fc.weight"),
                               w(l, "mlp.c_fc.weight", True), w(l, "mlp.c_fc.bias", True))

    # ------------------------------------------------------------------ backward
    def backward(self, dloss: float = 1.0, dhidden: np.ndarray | None = None, dlogp: np.ndarray | None = None,
                 *, on_block=None, defer: list | None = None):
        """Add dloss * d(loss)/d(params) of the last `loss()` call into self.grad (call zero_grad first).
        Use dloss = 1/k for k accumulated micro-batches. dhidden [B, T, C], when given, is the gradient
        of another objective with respect to `hidden` (a task head on the final hidden states); it is
        added where the LM head's gradient enters. After `logprobs()`, dlogp [B, T] is the gradient of
        the objective with respect to those log-probabilities (dloss is then unused); after `features()`
        only dhidden flows.

        For data-parallel training (npgpt.distributed): on_block(l) is called as soon as the gradients
        of block l's parameters are complete (l = n_layer - 1 first). With a list `defer`, the gradients
        that are summed one token at a time in place (layernorm gains and biases; the embeddings'
        scatter-add, though not the LM head's product) are not added to self.grad: each such addition is
        appended to `defer` as (parameter names, function, leading arguments), to be applied later as
        function(*arguments, *gradient views of the names) onto other buffers."""
        acts = self._saved
        if acts is None:
            raise RuntimeError("backward() needs a preceding loss(), logprobs() or features() call")
        if self.grad is None:
            self.zero_grad()
        g = self.grads
        self._defer = defer
        if acts["logits"] is not None:
            dx = self._head_backward(acts, dloss, dlogp)
            if dhidden is not None:
                dx += dhidden
        elif dhidden is None:
            raise RuntimeError("after features(), backward() needs dhidden")
        else:
            dx = np.array(dhidden, dtype=acts["xf"].dtype)
        if self.config.ln == "pre":
            dx = self._ln_backward(dx, acts["ln_f"], "ln_f")
        for l in reversed(range(self.config.n_layer)):
            a = acts["layers"][l]
            dx = self._residual_backward(dx, l, "ln_2", self._mlp_backward, a)
            dx = self._residual_backward(dx, l, "ln_1", self._attn_backward, a)
            if on_block is not None:
                on_block(l)
        dx = dropout_backward(dx, acts["emb_mask"])
        if defer is None:
            embedding_backward(dx, acts["idx"], g["wte.weight"], g["wpe.weight"])
        else:
            defer.append((("wte.weight", "wpe.weight"), embedding_backward, (dx, acts["idx"])))
        self._saved = self._defer = None

    def _ln_backward(self, dout, cache, name):
        """The layernorm `name` ("h.0.ln_1", "ln_f"), backward: d(out) -> d(in); its gain and bias
        gradients added, or deferred (see backward)."""
        names = (f"{name}.weight", f"{name}.bias" if f"{name}.bias" in self.grads else None)
        w = self.params[names[0]]
        if self._defer is None:
            return layernorm_backward(dout, cache, w, *(self.grads.get(n) for n in names))
        self._defer.append((names, layernorm_backward, (dout, cache, w)))
        scratch = np.zeros_like(w)  # the gradients land here, unused: only d(in) is wanted now
        return layernorm_backward(dout, cache, w, scratch, scratch if names[1] else None)

    def skip_dropout(self, batch: int, length: int, rng: np.random.Generator):
        """Advance rng past the draws that loss(idx [batch, length], train=True, rng=rng) makes for
        dropout, in the same order (the embeddings'; then per block the attention probabilities', the
        attention output's, the MLP output's), computing nothing else: a rank of a data-parallel job
        passes over the other ranks' micro-batches so (tests/test_mpi.py holds the two in step)."""
        if self.config.dropout == 0.0:
            return
        C, H = self.config.n_embd, self.config.n_head
        rng.random((batch, length, C), dtype=np.float32)
        for _ in range(self.config.n_layer):
            for shape in ((batch, H, length, length), (batch, length, C), (batch, length, C)):
                rng.random(shape, dtype=np.float32)

    def _head_backward(self, acts, dloss, dlogp):
        """The tied LM head and its loss, backward: -> d(hidden) [B, T, C]; wte's gradient added.
        logits = xf @ wte^T (divided by the temperature of logprobs()); d logp / d logits = onehot -
        softmax, hence the minus on dlogp."""
        B, T = acts["idx"].shape
        N = B * T
        row_scale = None if dlogp is None else -np.asarray(dlogp, acts["xf"].dtype).reshape(N)
        dlogits = cross_entropy_backward(acts["logits"].reshape(N, -1), acts["targets"].reshape(N), dloss, row_scale)
        if acts["temperature"] != 1.0:
            dlogits *= dlogits.dtype.type(1.0 / acts["temperature"])
        self.grads["wte.weight"] += dlogits.T @ acts["xf"].reshape(N, -1)
        return (dlogits @ self.params["wte.weight"]).reshape(B, T, -1)
