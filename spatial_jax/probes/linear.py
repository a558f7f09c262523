"""Linear probes trained with optax, vmapped so a whole sweep trains in one compiled call.

The paper's recipe (reference/paper.md §3 and §6): a linear probe  logits = h W + b  per probe,
softmax cross-entropy, AdamW (lr 1e-3, weight decay 1e-4, betas 0.9/0.999, eps 1e-8, decay on W
and b as `torch.optim.AdamW(probe.parameters())` does), 200 epochs of full-batch steps, seed 0,
75/25 split by image. `train_probes` is exactly that, for many probes at once.

Probe axes and broadcasting
---------------------------
Every function here takes activations, labels and masks with leading *probe axes* `*P` (any
number, e.g. [L, G] = layers x token groups) in front of the example axes:

    x    [*Px, N, D]   activations (any float dtype; computed in float32)
    y    [*Py, N]      int class labels in [0, C) (anything where the mask is False)
    mask [*Pm, N]      bool: which examples this probe uses

The probe shape is the numpy broadcast of Px, Py and Pm. An argument that lacks a probe axis or
has size 1 there is *shared* along it and is never copied: x [N, D] with y [P, N] trains P probes
on one activation array, and x [L, 1, N, D] with mask [G, N] and y [N] trains L x G probes
(every layer x every token group) while holding only the L activation arrays. Shared arguments
enter the compiled call once (vmap `in_axes=None`), so memory is that of the distinct arrays.
Padding: probes with different numbers of examples share one padded N; padded rows get mask
False (their x and y values are ignored).

Conventions
-----------
`Probes.w` is [*P, D, C] and `Probes.b` is [*P, C]; logits = x @ w + b. The paper's torch
`nn.Linear` weight is w.T. The class directions for the amplification intervention
(`h += alpha * sum_k (h.w_k / |w_k|^2) w_k`) are the columns of w: `class_directions(probes)`
returns w, and `class_directions(probes)[l, g]` is the [D, C] `directions` of an
`sj.Intervention(op="amplify")`.

Initialisation (one choice, documented): init="normal" (default) draws W and b ~ N(0, 1/D) (the
`randn(D, C) / sqrt(D)` and `randn(C) / sqrt(D)` of the official probing/ and amplification
probes), from `jax.random.key(seed)`.
Every probe gets the same draw from its seed, as when each probe is trained alone with seed 0
(pass `seed` as an int array of shape broadcastable to P for per-probe seeds). The values differ
from torch.randn(seed 0); only the distribution is the paper's. init="uniform" is torch's
nn.Linear default (W, b ~ U(-1/sqrt(D), 1/sqrt(D))), the likely init of the §5.2.1 probes;
init="zeros" makes training deterministic in the data alone. `init_params` starts from given
weights instead (e.g. a torch nn.Linear's, which reproduces torch's AdamW loop to 2e-5).

Step budget (a property of the recipe, not of this code): Adam moves each weight by about lr per
step, so 200 epochs at lr 1e-3 move any weight or bias by at most ~0.2. On unit-scale toy
features that leaves an underfit probe whose columns keep much of the random init (a 3-class
problem along one direction, which needs a bias gap, reaches ~0.8 test accuracy; at lr 1e-2 it
reaches 0.96-0.99). Real post-projector embeddings have large norms and D in the thousands, where
~0.2 per coordinate is a large move. Pass lr/epochs to change the budget (lr is traced: no
recompilation).

Speed: all probes train in one compiled call, `lax.scan` over epochs. Along the probe axes where
x is shared, probes are vmapped (one x @ [D, probes * C] matmul per step). Along axes where x
varies, `chunk` decides: vmapped (batched matmuls; the default off-CPU) or a `lax.scan` over
probes inside the call (the default on a CPU, where XLA's batched matmul of these shapes was 3-4x
slower than a scan over plain ones). The weight is held as [C, D] while training so that its
gradient is a g^T x matmul, ~12x faster on XLA:CPU than x^T g (see `_fit_one`).

Standardisation: off by default (the paper does none that we know of). standardize=True trains
in per-probe standardised coordinates ((x - mean) / std over that probe's training examples; a
feature that is constant there keeps std 1) without copying x, and folds the statistics back into
w and b, so the returned probe applies to raw activations like any other. Weight decay and the
init then act on standardised weights, so directions differ from the unstandardised probe's.
"""
from __future__ import annotations

import dataclasses
import functools
import math
import random
from typing import Callable, Sequence

import jax
import jax.numpy as jnp
import numpy as np
import optax

INITS = ("normal", "uniform", "zeros")
_STD_EPS = 1e-6


@jax.tree_util.register_dataclass
@dataclasses.dataclass(frozen=True)
class Probes:
    """A stack of linear probes: w [*P, D, C], b [*P, C] (float32); logits = x @ w + b."""

    w: jax.Array
    b: jax.Array

    @property
    def shape(self) -> tuple:
        """The probe shape P."""
        return tuple(self.w.shape[:-2])

    def __getitem__(self, index) -> "Probes":
        """Indexes the probe axes: probes[l, g] is one probe (w [D, C], b [C])."""
        index = index if isinstance(index, tuple) else (index,)
        return Probes(self.w[index], self.b[index])


# ----------------------------------------------------------------------------- broadcasting


def _probe_map(fn: Callable, args: Sequence, n_trailing: Sequence[int], chunk: int | None = None,
               chunk_arg: int = 0):
    """Maps `fn` (one probe's computation) over the broadcast probe axes of `args`.

    args[i] has shape [*P_i, <n_trailing[i] dims>]. The probe shape P is the broadcast of all
    P_i. Along each probe axis an argument either varies (vmapped) or is shared (size 1 or
    absent: passed unbatched, never broadcast in memory). With `chunk` set, every probe axis along
    which args[chunk_arg] varies runs as `lax.map(batch_size=chunk)` (chunk 1: a sequential
    scan) instead of vmap: the same result, `chunk` probes at a time, so that no batched matmul
    over that argument is formed. Returns fn's outputs with leading axes P.
    """
    args = [jnp.asarray(a) for a in args]
    batch_shapes = [a.shape[: a.ndim - t] for a, t in zip(args, n_trailing)]
    for a, t in zip(args, n_trailing):
        if a.ndim < t:
            raise ValueError(f"an argument of shape {a.shape} needs at least {t} dims")
    try:
        probe_shape = tuple(np.broadcast_shapes(*batch_shapes))
    except ValueError as e:
        raise ValueError(f"probe axes do not broadcast: {batch_shapes}") from e
    k = len(probe_shape)
    flags, prepared = [], []
    for a, bs, t in zip(args, batch_shapes, n_trailing):
        padded = (1,) * (k - len(bs)) + tuple(bs)
        f = [padded[i] == probe_shape[i] for i in range(k)]  # varies along axis i (or P_i == 1)
        flags.append(f)
        prepared.append(a.reshape(tuple(s for s, v in zip(padded, f) if v) + a.shape[a.ndim - t:]))

    def nested(level: int) -> Callable:
        if level == k:
            return fn
        inner = nested(level + 1)
        axes = tuple(0 if f[level] else None for f in flags)
        if chunk is not None and flags[chunk_arg][level] and probe_shape[level] > 1:
            size = min(chunk, probe_shape[level])

            def mapped(*xs):
                batched = [x for x, ax in zip(xs, axes) if ax == 0]

                def one(bxs):
                    it = iter(bxs)
                    return inner(*[next(it) if ax == 0 else x for x, ax in zip(xs, axes)])

                return jax.lax.map(one, batched, batch_size=size if size > 1 else None)
            return mapped
        return jax.vmap(inner, in_axes=axes)

    return nested(0)(*prepared)


# ----------------------------------------------------------------------------- one probe


def _init(key: jax.Array, d: int, c: int, init: str):
    if init == "normal":
        kw, kb = jax.random.split(key)
        return (jax.random.normal(kw, (d, c), jnp.float32) / math.sqrt(d),
                jax.random.normal(kb, (c,), jnp.float32) / math.sqrt(d))
    if init == "uniform":
        kw, kb = jax.random.split(key)
        bound = 1.0 / math.sqrt(d)
        return (jax.random.uniform(kw, (d, c), jnp.float32, -bound, bound),
                jax.random.uniform(kb, (c,), jnp.float32, -bound, bound))
    if init == "zeros":
        return jnp.zeros((d, c), jnp.float32), jnp.zeros((c,), jnp.float32)
    raise ValueError(f"unknown init {init!r}; known: {INITS}")


def _masked_ce(logits, y, mask):
    """Mean softmax cross-entropy over the masked examples (0 where there are none)."""
    y = jnp.where(mask, y, 0).astype(jnp.int32)
    ce = optax.softmax_cross_entropy_with_integer_labels(logits, y)
    return jnp.sum(jnp.where(mask, ce, 0.0)) / jnp.maximum(jnp.sum(mask), 1)


def _fit_one(x, y, mask, seed, lr, weight_decay, w0, b0, *, n_classes, epochs, init, standardize):
    """One probe: x [N, D], y [N], mask [N], seed [] -> (w [D, C], b [C], losses [epochs]).

    w0 [D, C], b0 [C]: initial weights, or None to draw them from `init` and `seed`.
    """
    x = x.astype(jnp.float32)
    mask = mask.astype(bool)
    d = x.shape[-1]
    if w0 is None:
        w0, b0 = _init(jax.random.key(seed), d, n_classes, init)
    else:
        w0, b0 = w0.astype(jnp.float32), b0.astype(jnp.float32)
    if standardize:
        n = jnp.maximum(jnp.sum(mask), 1)
        mf = mask.astype(jnp.float32)
        mu = mf @ x / n
        var = jnp.sum(mf[:, None] * jnp.square(x - mu), axis=0) / n  # two-pass: no cancellation
        std = jnp.sqrt(var)
        scale = jnp.where(std > _STD_EPS * (1.0 + jnp.abs(mu)), std, 1.0)
    else:
        mu, scale = jnp.zeros((d,), jnp.float32), jnp.ones((d,), jnp.float32)

    # The weight is held as wt [C, D] (torch's layout) while training: its gradient g^T x is then
    # a [C, N] x [N, D] matmul, which XLA:CPU runs ~15x faster than the x^T g of a [D, C] weight.
    def raw(params):
        """Standardised-coordinate params -> raw-coordinate (wt, b), so x is never copied."""
        wt, b = params
        wt_raw = wt / scale
        return wt_raw, b - wt_raw @ mu

    def loss_fn(params):
        wt, b = raw(params) if standardize else params
        return _masked_ce(jnp.einsum("nd,cd->nc", x, wt) + b, y, mask)

    opt = optax.adamw(lr, b1=0.9, b2=0.999, eps=1e-8, weight_decay=weight_decay)
    params = (w0.T, b0)

    def step(carry, _):
        params, state = carry
        loss, grads = jax.value_and_grad(loss_fn)(params)
        updates, state = opt.update(grads, state, params)
        return (optax.apply_updates(params, updates), state), loss

    (params, _), losses = jax.lax.scan(step, (params, opt.init(params)), None, length=epochs)
    wt, b = raw(params) if standardize else params
    return wt.T, b, losses


# ----------------------------------------------------------------------------- public API


@functools.partial(jax.jit, static_argnames=("n_classes", "epochs", "init", "standardize", "chunk",
                                             "return_losses"))
def train_probes(x, y, train_mask, n_classes: int, *, epochs: int = 200, lr=1e-3, weight_decay=1e-4,
                 seed=0, init: str = "normal", standardize: bool = False, chunk: int | str | None = "auto",
                 init_params: Probes | None = None, return_losses: bool = False):
    """Trains every probe of a sweep in one compiled call (the paper's recipe by default).

    Args:
      x: [*Px, N, D] activations (shared along probe axes it lacks; see module docstring).
      y: [*Py, N] int labels in [0, n_classes).
      train_mask: [*Pm, N] bool, the training examples of each probe (padding: False).
      n_classes: C (static).
      epochs: full-batch AdamW steps (static), scanned with `lax.scan`.
      lr, weight_decay: AdamW hyperparameters (traced: a new value does not recompile).
      seed: int, or int array broadcastable to P: the init seed of each probe.
      init: "normal" (W, b ~ N(0, 1/D); default), "uniform" (torch nn.Linear) or "zeros".
      init_params: Probes(w [*Pw, D, C], b [*Pw, C]) to start from instead of `init` and `seed`
        (broadcast over the probe axes like x; e.g. a torch nn.Linear's weight.T and bias). With
        standardize=True they are initial weights in standardised coordinates.
      standardize: train on per-probe standardised features, folded back into w, b (default off).
      chunk: how the probe axes along which x varies are run (axes where x is shared are always
        vmapped, which makes one wide matmul x @ [D, probes * C]). None: vmapped too, every probe
        at once (a batched matmul; best on an accelerator). An int K: `lax.map` over them, K
        probes at a time, inside the same compiled call (same result to float rounding; K = 1 is
        a sequential scan, fastest on a CPU, where XLA's batched matmul of these shapes is slow).
        "auto" (default): 1 on a CPU backend, None elsewhere.
      return_losses: also return the training loss before each step, [*P, epochs].

    Returns:
      Probes(w [*P, D, C], b [*P, C]), or (Probes, losses [*P, epochs]) if return_losses.
    """
    if init not in INITS:
        raise ValueError(f"unknown init {init!r}; known: {INITS}")
    if chunk == "auto":
        chunk = 1 if jax.default_backend() == "cpu" else None
    fit = functools.partial(_fit_one, n_classes=n_classes, epochs=epochs, init=init, standardize=standardize)
    args = [x, y, train_mask, jnp.asarray(seed, jnp.int32), jnp.asarray(lr, jnp.float32),
            jnp.asarray(weight_decay, jnp.float32)]
    if init_params is None:
        w, b, losses = _probe_map(lambda *a: fit(*a, None, None), args, [2, 1, 1, 0, 0, 0], chunk=chunk)
    else:
        w, b, losses = _probe_map(fit, args + [init_params.w, init_params.b], [2, 1, 1, 0, 0, 0, 2, 1],
                                  chunk=chunk)
    probes = Probes(w, b)
    return (probes, losses) if return_losses else probes


@jax.jit
def logits(probes: Probes, x):
    """probes [*Pw], x [*Px, M, D] -> [*P, M, C] float32 logits of each probe on each row."""
    return _probe_map(lambda w, b, xx: xx.astype(jnp.float32) @ w + b, [probes.w, probes.b, x], [2, 1, 2])


@jax.jit
def predict_proba(probes: Probes, x):
    """probes [*Pw], x [*Px, M, D] -> [*P, M, C] softmax probabilities (rows sum to 1).

    E.g. every visual token of every test image: x [L, 1, B * Ni, D] for probes [L, G] gives each
    probe's class probabilities per token, for the paper's "strip" heatmaps.
    """
    return jax.nn.softmax(logits(probes, x), axis=-1)


@jax.jit
def predict(probes: Probes, x):
    """probes [*Pw], x [*Px, M, D] -> [*P, M] int32 predicted class."""
    return jnp.argmax(logits(probes, x), axis=-1).astype(jnp.int32)


@jax.jit
def accuracy(probes: Probes, x, y, mask):
    """Fraction of masked examples each probe classifies correctly.

    probes [*Pw], x [*Px, N, D], y [*Py, N] int, mask [*Pm, N] bool (e.g. valid & ~train_mask)
    -> [*P] float32 (NaN for a probe with no masked example).
    """
    def one(w, b, xx, yy, mm):
        hit = (jnp.argmax(xx.astype(jnp.float32) @ w + b, axis=-1) == yy) & mm
        return jnp.sum(hit) / jnp.sum(mm)

    return _probe_map(one, [probes.w, probes.b, x, y, mask], [2, 1, 2, 1, 1])


@jax.jit
def loss(probes: Probes, x, y, mask):
    """Mean softmax cross-entropy over the masked examples: [*P] float32."""
    return _probe_map(lambda w, b, xx, yy, mm: _masked_ce(xx.astype(jnp.float32) @ w + b, yy, mm),
                      [probes.w, probes.b, x, y, mask], [2, 1, 2, 1, 1])


def class_directions(probes: Probes) -> jax.Array:
    """Each probe's class directions, [*P, D, C]: the columns w_k of its weight.

    `class_directions(probes)[p]` is the [D, C] `directions` of `sj.Intervention(op="amplify")`,
    h += alpha * sum_k (h.w_k / |w_k|^2) w_k, as in the paper's §6 (raw columns, no centring or
    normalisation; the bias is not used).
    """
    return probes.w


def random_directions(key: jax.Array, d: int, k: int = 2) -> jax.Array:
    """The paper's Random control: k fresh unit-norm Gaussian directions, [D, K] float32."""
    v = jax.random.normal(key, (d, k), jnp.float32)
    return v / jnp.linalg.norm(v, axis=0, keepdims=True)


def shuffle_split(n: int, train_fraction: float = 0.75, seed: int = 0) -> np.ndarray:
    """The official probing/ split of n images: indices shuffled with `random.Random(seed)`, the
    first int(train_fraction * n) train (120 images at 0.75 -> 90 / 30). Returns train_mask [n]."""
    order = list(range(n))
    random.Random(seed).shuffle(order)
    train = np.zeros(n, bool)
    train[order[:int(train_fraction * n)]] = True
    return train


def split_by_group(groups, test_fraction: float = 0.25, seed: int = 0) -> np.ndarray:
    """Deterministic train/test split by group (e.g. image id); host-side numpy, not jitted.

    groups: [N] hashable ids (ints or strings), one per example. The distinct ids are sorted,
    permuted with `np.random.default_rng(seed)`, and the first ceil(test_fraction * n_groups)
    (at least 1 and at most n_groups - 1 when there are two or more groups and
    0 < test_fraction < 1) become test groups, as sklearn's GroupShuffleSplit counts. The result
    depends on the set of ids and the seed only, not on the order of the examples; every example
    of a group falls on the same side. 120 images at 0.25 -> 90 train / 30 test (the paper's).

    Returns train_mask [N] bool (test examples: ~train_mask).
    """
    groups = np.asarray(groups)
    if groups.ndim != 1:
        raise ValueError(f"groups must be [N], got shape {groups.shape}")
    if not 0.0 <= test_fraction <= 1.0:
        raise ValueError(f"test_fraction must be in [0, 1], got {test_fraction}")
    uniq, inverse = np.unique(groups, return_inverse=True)
    n = len(uniq)
    n_test = int(math.ceil(test_fraction * n - 1e-9))
    if n >= 2 and 0.0 < test_fraction < 1.0:
        n_test = min(max(n_test, 1), n - 1)
    order = np.random.default_rng(seed).permutation(n)
    is_test = np.zeros(n, bool)
    is_test[order[:n_test]] = True
    return ~is_test[inverse.reshape(-1)]
