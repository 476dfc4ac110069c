"""The GPT-2 model in Flax NNX, with the KV cache passed in and returned.

Parameter names follow HF GPT-2 (`wte`, `wpe`, `h.N.ln_1`, `attn.c_attn`, `attn.c_proj`,
`ln_2`, `mlp.c_fc`, `mlp.c_proj`, `ln_f`) so importing weights is a one-to-one copy;
HF's Conv1D weights are already `(in, out)`, the layout of an NNX kernel.

Shape letters are the package's (pgpt_jax/programs.py): B rows of this call, T tokens per
row, S rows of the cache (slots; S >= B), L cache length, W attention window, D n_embd,
N heads, H head_dim, F the MLP hidden (4 D), V padded vocabulary; here also C, the 3 of
c_attn's [q | k | v].

The cache is a tuple with one `(k, v)` pair per layer, each `[S, N, L, H]`. A tuple of
per-layer arrays (rather than one stacked `[layers, ...]` array) lets XLA update each
layer in place when the cache is donated; see DESIGN.md for the measured difference.
Each row writes its keys and values at its own `positions`, and a query at position p
attends to cache entries 0..p of its own row: whatever sits past p is never read.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
from flax import nnx

from pgpt_jax import attention, dense
from pgpt_jax.config import GPTConfig

KVCache = tuple[tuple[jax.Array, jax.Array], ...]


def _dtype(name: str):
    return jnp.dtype(name)


class Attention(nnx.Module):
    def __init__(self, cfg: GPTConfig, *, rngs: nnx.Rngs, implementation: str = "auto"):
        kw = dict(dtype=_dtype(cfg.dtype), param_dtype=_dtype(cfg.param_dtype), rngs=rngs)
        self.n_head, self.head_dim = cfg.n_head, cfg.head_dim
        # How attention is computed (pgpt_jax/attention.py); a static string, so it is part
        # of the graphdef and of every program's cache key.
        self.implementation = implementation
        self.c_attn = nnx.Linear(cfg.n_embd, 3 * cfg.n_embd, **kw)
        self.c_proj = nnx.Linear(cfg.n_embd, cfg.n_embd, **kw)

    def __call__(self, x, positions, kv, window: int):
        """x [B, T, D], positions i32[B, T], kv ([S, N, L, H], [S, N, L, H]) -> (y [B, T, D], kv)."""
        B, T, D = x.shape
        N, H = self.n_head, self.head_dim
        w, b = self.c_attn.kernel[...], self.c_attn.bias[...]
        x, w, b = self.c_attn.promote_dtype((x, w, b), dtype=self.c_attn.dtype)
        # HF's [D, 3D] kernel holds [q | k | v], each N x H: the same numbers as [D, 3, N, H].
        # Read that way (free for either stored shape, see `split_qkv`), a mesh that splits N
        # keeps each head's q, k and v on one shard, and slicing them apart moves nothing.
        if dense.is_packed(w):  # the programs' CPU copy (dense.py): no mesh to split over
            qkv = (dense.matmul(x, w) + b.reshape(3 * D)).reshape(B, T, 3, N, H)
        else:
            qkv = jnp.einsum("BTD,DCNH->BTCNH", x, w.reshape(D, 3, N, H)) + b.reshape(3, N, H)
        q, k, v = qkv[:, :, 0], qkv[:, :, 1], qkv[:, :, 2]  # [B, T, N, H] each
        k_cache, v_cache = (_write(c, a, positions) for c, a in zip(kv, (k, v)))
        # The cache may hold more rows than x (decode runs the occupied prefix of the slots):
        # this block's rows are the cache's first B.
        y = attention.attend_cache(q, k_cache, v_cache, positions, window, self.implementation)  # [B, T, N, H]
        y = y.reshape(B, T, D)
        return _linear(self.c_proj, y), (k_cache, v_cache)


def _linear(layer: nnx.Linear, x):
    """`layer(x)`, its kernel either HF's [in, out] or packed (`dense.matmul`)."""
    w, b = layer.kernel[...], layer.bias[...]
    x, w, b = layer.promote_dtype((x, w, b), dtype=layer.dtype)
    return dense.matmul(x, w) + b


def _write(cache, new, positions):
    """cache [S, N, L, H] with new [B, T, N, H] (B <= S) written at row b's positions[b]
    (i32[B, T]; past L: dropped). Rows past B are left as they are.

    Written row by row (a vmap: one scatter batched over rows) so that a mesh that splits
    the rows over `data` updates each shard's rows in place and moves nothing; a scatter
    indexed by row numbers would all-gather the updates and permute them between shards.
    """
    S, B, L = cache.shape[0], new.shape[0], cache.shape[2]
    if B < S:  # decode over the first B slots: the other rows write past L, i.e. nowhere
        new = jnp.pad(new, ((0, S - B), (0, 0), (0, 0), (0, 0)))
        positions = jnp.pad(positions, ((0, S - B), (0, 0)), constant_values=L)
    return jax.vmap(lambda c, n, p: c.at[:, p].set(n.swapaxes(0, 1).astype(c.dtype), mode="drop"))(
        cache, new, positions)


class MLP(nnx.Module):
    def __init__(self, cfg: GPTConfig, *, rngs: nnx.Rngs):
        kw = dict(dtype=_dtype(cfg.dtype), param_dtype=_dtype(cfg.param_dtype), rngs=rngs)
        self.c_fc = nnx.Linear(cfg.n_embd, 4 * cfg.n_embd, **kw)
        self.c_proj = nnx.Linear(4 * cfg.n_embd, cfg.n_embd, **kw)

    def __call__(self, x):
        return _linear(self.c_proj, jax.nn.gelu(_linear(self.c_fc, x), approximate=True))


class Block(nnx.Module):
    def __init__(self, cfg: GPTConfig, *, rngs: nnx.Rngs):
        kw = dict(epsilon=cfg.layer_norm_epsilon, dtype=_dtype(cfg.dtype),
                  param_dtype=_dtype(cfg.param_dtype), rngs=rngs)
        self.ln_1 = nnx.LayerNorm(cfg.n_embd, **kw)
        self.attn = Attention(cfg, rngs=rngs)
        self.ln_2 = nnx.LayerNorm(cfg.n_embd, **kw)
        self.mlp = MLP(cfg, rngs=rngs)

    def __call__(self, x, positions, kv, window: int):
        a, kv = self.attn(self.ln_1(x), positions, kv, window)
        x = x + a
        return x + self.mlp(self.ln_2(x)), kv


class GPT(nnx.Module):
    def __init__(self, cfg: GPTConfig, *, rngs: nnx.Rngs):
        self.config = cfg
        kw = dict(dtype=_dtype(cfg.dtype), param_dtype=_dtype(cfg.param_dtype), rngs=rngs)
        init = nnx.initializers.normal(0.02)
        self.wte = nnx.Embed(cfg.padded_vocab, cfg.n_embd, embedding_init=init, **kw)
        self.wpe = nnx.Embed(cfg.n_positions, cfg.n_embd, embedding_init=init, **kw)
        self.h = nnx.List([Block(cfg, rngs=rngs) for _ in range(cfg.n_layer)])
        self.ln_f = nnx.LayerNorm(cfg.n_embd, epsilon=cfg.layer_norm_epsilon,
                                  dtype=kw["dtype"], param_dtype=kw["param_dtype"], rngs=rngs)

    def __call__(self, tokens, positions, cache: KVCache, window: int | None = None):
        """tokens, positions i32[B, T] -> (hidden [B, T, D] after ln_f, cache).

        `window` (static, W) is how much of the cache attention reads: decode passes a
        length that covers the longest active row, so it does not pay for all of L.
        """
        window = window or cache[0][0].shape[2]
        # Positions past the context (a verify call's padding, programs.verify) embed as the
        # last one: their keys and values are never written (`_write` drops them).
        x = self.wte(tokens) + self.wpe(jnp.minimum(positions, self.config.n_positions - 1))
        new_cache = []
        for block, kv in zip(self.h, cache):
            x, kv = block(x, positions, kv, window)
            new_cache.append(kv)
        return self.ln_f(x), tuple(new_cache)

    def logits(self, hidden, head=None):
        """hidden [..., D] -> f32 logits [..., V] (tied embedding); padded entries are -inf.

        `head` is `lm_head(model)`, the embedding already transposed to [D, V] (on CPU a
        product against the [V, D] table transposes it on every call: 2x slower at 32 rows),
        or that packed (`dense.pack_params`).
        """
        if head is None:
            logits = self.wte.attend(hidden)
        else:
            logits = dense.matmul(hidden.astype(head.dtype), head)
        logits = logits.astype(jnp.float32)
        real = jnp.arange(logits.shape[-1]) < self.config.vocab_size
        return jnp.where(real, logits, -jnp.inf)


def lm_head(model: GPT):
    """The tied embedding as a [D, V] array of its own (for `GPT.logits(hidden, head)`)."""
    return jnp.asarray(model.wte.embedding[...].T)


def set_attention(model: GPT, implementation: str) -> GPT:
    """Every layer's attention computed by `implementation` (one of `attention.IMPLEMENTATIONS`;
    new models say "auto"), in place; returns the model. Programs made from it afterwards
    (an Engine's) use it."""
    if implementation not in attention.IMPLEMENTATIONS:
        raise ValueError(f"unknown attention implementation {implementation!r}; "
                         f"choose one of {attention.IMPLEMENTATIONS}")
    for block in model.h:
        block.attn.implementation = implementation
    return model


def split_qkv(params, cfg: GPTConfig):
    """An nnx.State of GPT params with c_attn's kernel [D, 3D] as [D, 3, N, H] and its bias
    [3D] as [3, N, H] (C = 3 indexes q, k, v): the same numbers in HF's order, with the head
    axis exposed so that `sharding.PARAM_AXES` can split it over `model`. Attention reads
    both shapes, so the model's own params and checkpoints keep HF's; only the programs'
    copy is split (`programs.program_params`). Other params, and split ones, pass through."""
    D, N, H = cfg.n_embd, cfg.n_head, cfg.head_dim
    shapes = {(D, 3 * D): (D, 3, N, H), (3 * D,): (3, N, H)}

    def one(path, a):
        names = {str(getattr(k, "key", k)) for k in path}
        return a.reshape(shapes[a.shape]) if "c_attn" in names and a.shape in shapes else a

    return jax.tree_util.tree_map_with_path(one, params)


def init_cache(cfg: GPTConfig, batch: int, length: int | None = None, dtype=None) -> KVCache:
    """Zeros: one (k, v) pair per layer, each [batch, N, length, H] ([S, N, L, H] for the engine)."""
    length = length or cfg.n_positions
    shape = (batch, cfg.n_head, length, cfg.head_dim)
    dt = dtype or _dtype(cfg.dtype)
    return tuple((jnp.zeros(shape, dt), jnp.zeros(shape, dt)) for _ in range(cfg.n_layer))


def forward(model: GPT, tokens, positions, cache: KVCache, window: int | None = None):
    """tokens, positions i32[B, T] -> (logits f32[B, T, V], cache). Prefill and decode alike."""
    hidden, cache = model(tokens, positions, cache, window)
    return model.logits(hidden), cache


def init_model(preset_or_config: str | GPTConfig = "gpt2", *, seed: int = 0,
               dtype: str | None = None, param_dtype: str | None = None, mesh=None) -> GPT:
    """Random weights of a preset's (or a config's) shape, for tests and benchmarks.

    With a `mesh` (see pgpt_jax.sharding) each parameter is created directly on its shards,
    never whole on one device first.
    """
    cfg = preset_or_config
    if isinstance(cfg, str):
        cfg = GPTConfig.preset(cfg)
    if dtype is not None:
        cfg = cfg.replace(dtype=dtype, param_dtype=param_dtype or dtype)
    elif param_dtype is not None:
        cfg = cfg.replace(param_dtype=param_dtype)
    if mesh is None:
        return GPT(cfg, rngs=nnx.Rngs(seed))
    from pgpt_jax import sharding

    def make():
        return nnx.split(GPT(cfg, rngs=nnx.Rngs(seed)))[1]

    graphdef, abstract = nnx.split(nnx.eval_shape(lambda: GPT(cfg, rngs=nnx.Rngs(seed))))
    state = jax.jit(make, out_shardings=sharding.param_shardings(abstract, mesh))()
    return nnx.merge(graphdef, state)
