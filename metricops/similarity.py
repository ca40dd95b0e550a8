"""Similarity losses on a labelled batch (SupCon, NT-Xent, Multi-Similarity, Circle, lifted structure) and
the paired-view InfoNCE/CLIP loss, on one streaming log-sum-exp engine.

Every loss here is a function of a few per-anchor statistics of S, the cosine-similarity matrix of the
L2-normalized embeddings: for the positives and the negatives of each anchor, a log-sum-exp of a loss-specific
φ(s), plain sums, counts, and the hardest similarities. The native op ``metricops::lse_stats`` computes them in
tiles of S (one GEMM per tile, then a fused epilogue); its backward applies dL/dS tile by tile with two GEMMs.
``memory="streaming"`` never holds the B×B (or N×M) matrix: the backward recomputes each tile, as FlashAttention
does. ``"matrix"``, and ``"auto"`` below 4096² entries, keep the forward's tiles for the backward on CPU when a
gradient will be needed (the upper triangle with the self pairs), which skips their GEMMs. Results are the same.
"""

from __future__ import annotations

import torch

from . import _memory
from . import _validation as v
from ._ops import ops
from ._reduction import accumulation_dtype, loss_dtype, mean_of_sum
from ._registrations.similarity import (
    AUX_POS,  # noqa: F401  (re-exported for metricops.pml)
    COUNT_NEG,
    COUNT_POS,
    LIN_POS,
    LSE_NEG,
    LSE_POS,
    MAX_NEG,
    MIN_POS,
    TERM,
)

# Tests set this to (rows, cols) to force every engine call to tiles of that shape, so that tile boundaries
# fall where a test wants them; None in normal use.
_FORCED_TILE = None


# The strips of saved tiles: the CPU engine's default (csrc/cpu/lse_engine.h kDefaultBlockRows); a saving call
# passes them explicitly, since the saved tiles' size depends on them.
_SAVED_TILE_ROWS = 128


# Policies whose negatives give nothing: the CPU engine evaluates their positive pairs alone, as dot products,
# when those are at most 1/16 of the entries and no tiles are kept (csrc/cpu/lse_engine.h).
_POSITIVES_ONLY = ("ntxent_pairs", "lifted_pairs")


def _tile(memory: str, x: torch.Tensor, y, grad_needed: bool):
    """(block_rows, block_cols, save_tiles) of an engine call. The tiles are the device's (0) unless a test forces
    them (``_FORCED_TILE``: (rows, cols) or (rows, cols, save_tiles)). save_tiles keeps S's tiles from the forward
    for the backward (CPU, when a gradient will be needed): with ``memory="matrix"``, and with ``"auto"`` below the
    memory rule's size (metricops._memory: a 4096² float32 matrix); ``"streaming"`` never holds them."""
    v.check_memory(memory)
    if _FORCED_TILE is not None:
        return (*_FORCED_TILE, False)[:3]
    rows = x.shape[0]
    cols = rows if y is None else y.shape[0]
    save = (
        grad_needed
        and x.device.type == "cpu"
        and (memory == "matrix" or (memory == "auto" and rows * cols < _memory.AUTO_STREAM_MIN_B**2))
    )
    return (_SAVED_TILE_ROWS, 0, True) if save else (0, 0, False)


def _scale_tensor(value: float, x: torch.Tensor) -> torch.Tensor:
    return torch.full((), value, dtype=accumulation_dtype(x.dtype), device=x.device)


def _inverse_temperature(temperature, x: torch.Tensor) -> torch.Tensor:
    """1/temperature for a float temperature, as the engine's 0-dim scale; refused, naming the argument, when it
    overflows the statistics' dtype (float32: temperature below ~3e-39)."""
    value = v.check_positive_finite(temperature, "temperature")
    dtype = accumulation_dtype(x.dtype)
    if 1.0 / value > torch.finfo(dtype).max:
        raise ValueError(
            f"temperature must be at least {1 / torch.finfo(dtype).max:.3g} for {dtype} embeddings "
            f"(1/temperature overflows), got {value}"
        )
    return _scale_tensor(1.0 / value, x)


def _reduce(terms: torch.Tensor, reduction: str, count=None) -> torch.Tensor:
    """Reduce per-anchor terms: "mean" over `count` (default: the number of terms), "mean_nonzero" over the terms
    > 0; with no term 0, attached to the graph. The result has the embeddings' dtype."""
    if reduction == "none":
        return terms
    if reduction == "sum":
        return terms.sum()
    total = terms.sum(dtype=accumulation_dtype(terms.dtype))
    if reduction == "mean":
        if count is None:
            count = torch.full((), terms.shape[0], dtype=torch.int64, device=terms.device)
        return mean_of_sum(total, count, terms.dtype)
    return mean_of_sum(total, (terms > 0).sum(), terms.dtype)


def _prepare_labelled(embeddings, labels, reduction, memory, ref_emb=None, ref_labels=None):
    v.check_embeddings(embeddings, "embeddings")
    v.check_labels(labels, embeddings)
    v.check_reduction(reduction)
    v.check_memory(memory)
    x = embeddings  # normalized inside the engine (_stats), without a normalized copy
    if ref_emb is None:
        if ref_labels is not None:
            raise ValueError("ref_labels needs ref_emb")
        return x, None, labels, None
    v.check_embeddings(ref_emb, "ref_emb")
    v.check_same_device_dtype(embeddings, "embeddings", ref_emb, "ref_emb")
    v.check_same_dim(embeddings, "embeddings", ref_emb, "ref_emb")
    if ref_labels is None:
        raise ValueError("ref_labels is required with ref_emb")
    v.check_labels(ref_labels, ref_emb, "ref_labels", "ref_emb")
    return x, ref_emb, labels, ref_labels


def _stats(
    x, y, labels, ref_labels, policy, args=(), scale=1.0, params=None, memory="auto", col_stats=False, head="none"
):
    """The engine's statistics on the cosine similarities of x's (and y's) rows: the op normalizes them itself.
    ``head`` names the loss whose per-anchor term the op also computes (column TERM), with its gradient: one op
    instead of a dozen small ones around it (csrc/common/lse_heads.h)."""
    grad_needed = torch.is_grad_enabled() and (x.requires_grad or (y is not None and y.requires_grad))
    # The pair passes read a few entries per row: the CPU computes those alone (no tiles) unless asked to keep S
    block_rows, block_cols, save_tiles = _tile(memory, x, y, grad_needed and policy not in _POSITIVES_ONLY)
    if not isinstance(scale, torch.Tensor):
        scale = _scale_tensor(scale, x)
    rows, cols, _ = ops.lse_stats.default(
        x,
        y,
        labels,
        ref_labels,
        params,
        scale,
        policy,
        [float(a) for a in args],
        True,
        col_stats,
        block_rows,
        block_cols,
        save_tiles,
        head,
    )
    return rows, cols


def _safe(t: torch.Tensor, valid: torch.Tensor) -> torch.Tensor:
    """t where valid, else 0: keeps -inf (an empty set's LSE) out of the formulas whose gradient it would poison."""
    return torch.where(valid, t, torch.zeros_like(t))


def _out_dtype(stats_terms: torch.Tensor, embeddings: torch.Tensor) -> torch.Tensor:
    """Per-anchor terms in the loss's dtype: the embeddings', or float32 under autocast (loss_dtype)."""
    return stats_terms.to(loss_dtype(embeddings))


# ---------------------------------------------------------------------------------------------------- SupCon


def _supcon_per_anchor(embeddings, labels, *, temperature, memory, ref_emb=None, ref_labels=None):
    """SupCon's per-anchor losses (B,) (0 for an anchor without positive; all 0 when the batch has no positive or
    no negative pair, as PML)."""
    v.check_positive_finite(temperature, "temperature")
    x, y, labels, ref_labels = _prepare_labelled(embeddings, labels, "none", memory, ref_emb, ref_labels)
    scale = _inverse_temperature(temperature, embeddings)
    # head "supcon": LSE over the row's pairs − mean z of its positives, 0 without a positive (or for a batch
    # without any positive or any negative pair)
    st, _ = _stats(x, y, labels, ref_labels, "scaled", scale=scale, memory=memory, head="supcon")
    return _out_dtype(st[:, TERM], embeddings)


def supcon_loss(
    embeddings: torch.Tensor,
    labels: torch.Tensor,
    *,
    temperature: float = 0.1,
    reduction: str = "mean_nonzero",
    memory: str = "auto",
) -> torch.Tensor:
    """Supervised contrastive loss (Khosla et al. 2020; PML ``SupConLoss``).

    With S the cosine similarity of the L2-normalized ``embeddings (B, D)`` and z = S/τ, each anchor i with a
    positive gives ``LSE_{j≠i} z_ij − mean_{p∈P_i} z_ip`` (P_i: j ≠ i with the same label). Anchors without a
    positive give 0; as in PML, a batch without any positive or any negative pair gives 0.

    ``reduction``: ``"mean_nonzero"`` (PML's default, the mean over the anchors whose loss is > 0), ``"mean"``
    (over all B anchors), ``"sum"``, ``"none"`` (B,). ``memory``: ``"streaming"`` never holds B×B; ``"auto"``
    (below 4096² entries) and ``"matrix"`` keep S's upper triangle for the backward (module docstring).
    """
    v.check_reduction(reduction)
    return _reduce(_supcon_per_anchor(embeddings, labels, temperature=temperature, memory=memory), reduction)


# ---------------------------------------------------------------------------------------------------- NT-Xent


def _ntxent_per_anchor(embeddings, labels, *, temperature, memory, ref_emb=None, ref_labels=None):
    """(per-anchor sums over positive pairs (B,), positive pairs per anchor (B,) float)."""
    v.check_positive_finite(temperature, "temperature")
    x, y, labels, ref_labels = _prepare_labelled(embeddings, labels, "none", memory, ref_emb, ref_labels)
    scale = _inverse_temperature(temperature, embeddings)
    st, _ = _stats(x, y, labels, ref_labels, "scaled", scale=scale, memory=memory)
    m = st[:, LSE_NEG : LSE_NEG + 1]  # log Σ_n e^{z_in}; -inf without negatives (each pair then gives 0)
    st2, _ = _stats(x, y, labels, ref_labels, "ntxent_pairs", scale=scale, params=m.contiguous(), memory=memory)
    return _out_dtype(st2[:, LIN_POS], embeddings), st[:, COUNT_POS], st[:, COUNT_NEG]


def ntxent_loss(
    embeddings: torch.Tensor,
    labels: torch.Tensor,
    *,
    temperature: float = 0.07,
    reduction: str = "mean",
    memory: str = "auto",
) -> torch.Tensor:
    """NT-Xent (SimCLR's normalized temperature-scaled cross-entropy; PML ``NTXentLoss``).

    With z = S/τ (S: cosine similarity of the L2-normalized ``embeddings (B, D)``), each positive pair (i, p)
    gives ``−log(e^{z_ip} / (e^{z_ip} + Σ_{n∈N_i} e^{z_in}))``. ``"mean"`` averages over the positive pairs
    (PML), ``"sum"`` sums them, ``"mean_nonzero"`` averages over the pairs whose anchor has a negative (the
    others are 0), ``"none"`` returns (B,): each anchor's sum over its positive pairs. Never builds the
    |P|×|N| tensor PML does: two streaming passes (the negatives' LSE, then the pairs).
    """
    v.check_reduction(reduction)
    per_anchor, n_pos, n_neg = _ntxent_per_anchor(embeddings, labels, temperature=temperature, memory=memory)
    if reduction in ("none", "sum"):
        return _reduce(per_anchor, reduction)
    if reduction == "mean":
        count = n_pos.sum().to(torch.int64)
    else:
        count = torch.where(n_neg > 0, n_pos, torch.zeros_like(n_pos)).sum().to(torch.int64)
    return mean_of_sum(per_anchor.sum(dtype=accumulation_dtype(per_anchor.dtype)), count, per_anchor.dtype)


# ---------------------------------------------------------------------------------------------------- Multi-Similarity


def _multi_similarity_per_anchor(
    embeddings, labels, *, alpha, beta, base, mining_epsilon, memory, ref_emb=None, ref_labels=None
):
    alpha = v.check_positive_finite(alpha, "alpha")
    beta = v.check_positive_finite(beta, "beta")
    base = v.check_number(base, "base", finite=True)
    x, y, labels, ref_labels = _prepare_labelled(embeddings, labels, "none", memory, ref_emb, ref_labels)
    # heads "multi_similarity(_mined)": log(1 + Σ_p)/α + log(1 + Σ_n)/β over the classes the anchor has; mined, 0
    # for a miner output of <= 1 positive and <= 1 negative pair (PML)
    if mining_epsilon is None:
        st, _ = _stats(
            x, y, labels, ref_labels, "multi_similarity", (alpha, beta, base), memory=memory, head="multi_similarity"
        )
    else:
        eps = v.check_number(mining_epsilon, "mining_epsilon", finite=True)
        with torch.no_grad():  # the miner's thresholds select pairs; they carry no gradient
            first, _ = _stats(
                x.detach(), None if y is None else y.detach(), labels, ref_labels, "similarity_range", memory=memory
            )
        thresholds = first[:, MIN_POS : MAX_NEG + 1].contiguous()
        st, _ = _stats(
            x,
            y,
            labels,
            ref_labels,
            "multi_similarity_mined",
            (alpha, beta, base, eps),
            params=thresholds,
            memory=memory,
            head="multi_similarity_mined",
        )
    return _out_dtype(st[:, TERM], embeddings)


def multi_similarity_loss(
    embeddings: torch.Tensor,
    labels: torch.Tensor,
    *,
    alpha: float = 2.0,
    beta: float = 50.0,
    base: float = 0.5,
    mining_epsilon=None,
    reduction: str = "mean",
    memory: str = "auto",
) -> torch.Tensor:
    """Multi-Similarity loss (Wang et al. 2019; PML ``MultiSimilarityLoss``).

    Each anchor gives ``(1/α)·log(1 + Σ_{p∈P_i} e^{−α(S_ip − base)}) + (1/β)·log(1 + Σ_{n∈N_i} e^{β(S_in − base)})``;
    ``"mean"`` averages over all B anchors. ``mining_epsilon=ε`` keeps only the pairs PML's
    ``MultiSimilarityMiner(epsilon=ε)`` keeps (positive p if S_ip − ε < max_n S_in, negative n if
    S_in + ε > min_p S_ip), fused: a first streaming pass finds each anchor's thresholds, the second computes
    the loss on the kept pairs.
    """
    v.check_reduction(reduction)
    per_anchor = _multi_similarity_per_anchor(
        embeddings, labels, alpha=alpha, beta=beta, base=base, mining_epsilon=mining_epsilon, memory=memory
    )
    return _reduce(per_anchor, reduction)


# ---------------------------------------------------------------------------------------------------- Circle


def _circle_per_anchor(embeddings, labels, *, m, gamma, memory, ref_emb=None, ref_labels=None):
    m = v.check_number(m, "m", finite=True)
    gamma = v.check_positive_finite(gamma, "gamma")
    x, y, labels, ref_labels = _prepare_labelled(embeddings, labels, "none", memory, ref_emb, ref_labels)
    # head "circle": softplus(LSE_pos + LSE_neg) (F.softplus, as PML), 0 without a positive or a negative
    st, _ = _stats(x, y, labels, ref_labels, "circle", (m, gamma), memory=memory, head="circle")
    return _out_dtype(st[:, TERM], embeddings)


def circle_loss(
    embeddings: torch.Tensor,
    labels: torch.Tensor,
    *,
    m: float = 0.4,
    gamma: float = 80.0,
    reduction: str = "mean_nonzero",
    memory: str = "auto",
) -> torch.Tensor:
    """Circle loss (Sun et al. 2020; PML ``CircleLoss``).

    With a_p = relu(1 + m − S_ip) and a_n = relu(S_in + m) held constant, each anchor with a positive and a
    negative gives ``softplus(LSE_p(−γ·a_p·(S_ip − 1 + m)) + LSE_n(γ·a_n·(S_in − m)))``; others give 0.
    ``"mean_nonzero"`` (PML's default) averages over the anchors whose loss is > 0.
    """
    v.check_reduction(reduction)
    return _reduce(_circle_per_anchor(embeddings, labels, m=m, gamma=gamma, memory=memory), reduction)


# ---------------------------------------------------------------------------------------------------- lifted


def _generalized_lifted_per_anchor(
    embeddings, labels, *, pos_margin, neg_margin, memory, ref_emb=None, ref_labels=None
):
    pos_margin = v.check_number(pos_margin, "pos_margin", finite=True)
    neg_margin = v.check_number(neg_margin, "neg_margin", finite=True)
    x, y, labels, ref_labels = _prepare_labelled(embeddings, labels, "none", memory, ref_emb, ref_labels)
    # head "generalized_lifted": relu(LSE_pos + LSE_neg), an empty set's LSE counting as 0
    st, _ = _stats(
        x, y, labels, ref_labels, "lifted", (pos_margin, neg_margin), memory=memory, head="generalized_lifted"
    )
    return _out_dtype(st[:, TERM], embeddings)


def generalized_lifted_structure_loss(
    embeddings: torch.Tensor,
    labels: torch.Tensor,
    *,
    pos_margin: float = 0.0,
    neg_margin: float = 1.0,
    reduction: str = "mean",
    memory: str = "auto",
) -> torch.Tensor:
    """Generalized lifted structure loss (Hermans et al. 2017, p. 4; PML ``GeneralizedLiftedStructureLoss``).

    On d, the euclidean distance of the L2-normalized embeddings (F.normalize's: a zero row stays 0, at distance 1
    from the others; a row of norm below 1e-12 gets the exact value, and a gradient that leaves out the term
    through its own norm), each anchor gives
    ``relu(LSE_{p∈P_i}(d_ip − pos_margin) + LSE_{n∈N_i}(neg_margin − d_in))``, an empty set's LSE counting as 0;
    ``"mean"`` averages over all B anchors. Duplicated rows are at distance exactly 0 (gradient 0, never inf).
    """
    v.check_reduction(reduction)
    per_anchor = _generalized_lifted_per_anchor(
        embeddings, labels, pos_margin=pos_margin, neg_margin=neg_margin, memory=memory
    )
    return _reduce(per_anchor, reduction)


def _lifted_per_anchor(embeddings, labels, *, pos_margin, neg_margin, memory, count_nonzero=False):
    """(per-anchor sums of PML's LiftedStructureLoss pair terms (B,), positive pairs per anchor (B,), pairs
    with a term > 0 (0-dim, only when count_nonzero))."""
    pos_margin = v.check_number(pos_margin, "pos_margin", finite=True)
    neg_margin = v.check_number(neg_margin, "neg_margin", finite=True)
    x, _, labels, _ = _prepare_labelled(embeddings, labels, "none", memory)
    st, _ = _stats(x, None, labels, None, "lifted", (pos_margin, neg_margin), memory=memory)
    neg_lse = st[:, LSE_NEG]  # L_i = LSE_{n∈N_i}(neg_margin − d_in), -inf without negatives
    params = torch.stack([neg_lse, torch.ones_like(neg_lse)], 1)
    pairs, _ = _stats(x, None, labels, None, "lifted_pairs", (pos_margin, 0.0), params=params, memory=memory)
    # PML: a batch without any positive pair or any negative pair gives 0
    batch_ok = (st[:, COUNT_POS] > 0).any() & (st[:, COUNT_NEG] > 0).any()
    per_anchor = _safe(pairs[:, LIN_POS], batch_ok.expand(pairs.shape[0]))
    nonzero = None
    if count_nonzero:
        with torch.no_grad():
            counted, _ = _stats(
                x.detach(), None, labels, None, "lifted_pairs", (pos_margin, 1.0), params=params.detach(), memory=memory
            )
            nonzero = torch.where(batch_ok, counted[:, LIN_POS].sum(), 0).to(torch.int64)
    return _out_dtype(per_anchor, embeddings), st[:, COUNT_POS], nonzero


def lifted_structure_loss(
    embeddings: torch.Tensor,
    labels: torch.Tensor,
    *,
    pos_margin: float = 0.0,
    neg_margin: float = 1.0,
    reduction: str = "mean",
    memory: str = "auto",
) -> torch.Tensor:
    """Lifted structure loss as PML's ``LiftedStructureLoss`` computes it (Oh Song et al. 2016).

    On d, the euclidean distance of the L2-normalized embeddings (zero and tiny rows: as in
    ``generalized_lifted_structure_loss``), each ordered positive pair (a, p) gives
    ``relu(LSE({neg_margin − d_an : n ∈ N_a} ⊎ {neg_margin − d_pn : n ∈ N_p}) + d_ap − pos_margin)² / 2`` (an
    empty set's LSE counts as 0); a batch without any positive or any negative pair gives 0. ``"mean"``
    averages over the positive pairs, ``"mean_nonzero"`` over those whose term is > 0, ``"none"`` returns
    (B,): each anchor's sum over its positive pairs. Streaming: the negatives' LSE per row, then a pass over
    the pairs with both rows' LSEs; nothing |P|×|N| or B×B is held.
    """
    v.check_reduction(reduction)
    per_anchor, n_pos, nonzero = _lifted_per_anchor(
        embeddings,
        labels,
        pos_margin=pos_margin,
        neg_margin=neg_margin,
        memory=memory,
        count_nonzero=reduction == "mean_nonzero",
    )
    if reduction in ("none", "sum"):
        return _reduce(per_anchor, reduction)
    count = n_pos.sum().to(torch.int64) if reduction == "mean" else nonzero
    return mean_of_sum(per_anchor.sum(dtype=accumulation_dtype(per_anchor.dtype)), count, per_anchor.dtype)


# ---------------------------------------------------------------------------------------------------- InfoNCE


def _check_temperature(temperature, like: torch.Tensor):
    """1/temperature as a 0-dim tensor in the statistics' dtype (differentiable when temperature requires grad).
    A non-floating tensor is a number, as for every other loss (an integer 0-dim tensor; a bool is refused)."""
    if isinstance(temperature, torch.Tensor) and temperature.is_floating_point():
        if temperature.dim() != 0:
            raise ValueError(
                f"temperature must be a float or a 0-dim floating tensor, got a {temperature.dtype} tensor of shape "
                f"{tuple(temperature.shape)}"
            )
        if temperature.device != like.device and temperature.device.type != "cpu":
            raise ValueError(f"temperature must be on the queries' device ({like.device}) or the CPU")
        # Reading the values syncs with the device: not while compiling or capturing a CUDA graph (a sync fails the
        # capture; the op itself reads the scale on the device)
        capturing = temperature.is_cuda and torch.cuda.is_current_stream_capturing()
        if not torch.compiler.is_compiling() and not capturing and temperature.device.type != "meta":
            # under torch.func the values are inside wrappers (a vmapped one holds them all, and has no .item())
            values = temperature.detach()
            while torch._C._functorch.is_functorch_wrapped_tensor(values):
                values = torch._C._functorch.get_unwrapped(values)
            bad = ~((values > 0) & torch.isfinite(values) & torch.isfinite(_inverse(values, like)))
            if bad.any():
                raise ValueError(
                    f"temperature must be a finite number > 0 whose inverse is finite, got {values[bad].flatten()[0].item()}"
                )
        return _inverse(temperature, like).to(like.device)
    return _inverse_temperature(temperature, like)


def _inverse(temperature: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
    """1/temperature in the statistics' dtype, inverted in it or wider: a float16/bfloat16 temperature inverted in
    its own dtype is off by up to 2^-9 (bfloat16), which the loss and the temperature's gradient would carry."""
    acc = accumulation_dtype(like.dtype)
    return (1.0 / temperature.to(torch.promote_types(temperature.dtype, acc))).to(acc)


def info_nce_loss(
    queries: torch.Tensor,
    keys: torch.Tensor,
    *,
    temperature=0.05,
    symmetric: bool = False,
    normalize: bool = True,
    reduction: str = "mean",
) -> torch.Tensor:
    """InfoNCE over paired views (sentence-transformers' MultipleNegativesRankingLoss; CLIP with ``symmetric``).

    ``queries (N, D)``, ``keys (M, D)``, M ≥ N: query i's positive is key i, every other key (rows past N
    included: extra hard negatives) is a negative. Equals ``F.cross_entropy(S / τ, arange(N))`` with S the
    cosine similarity (the dot product when ``normalize=False``), values and gradients. ``symmetric=True``
    (CLIP; needs M == N) averages it with the same loss from keys to queries. ``temperature``: a float or a
    0-dim tensor; a tensor that requires grad (a learnable logit scale) gets its exact gradient.
    ``reduction``: ``"mean"``, ``"sum"``, ``"none"`` ((N,): each query's term, averaged with its key's when
    symmetric). Never holds the N×M matrix, nor normalized copies of the inputs: the tiles of S are scaled by the
    rows' inverse norms and recomputed in the backward (extra memory O(N + M) plus one tile, besides the
    inputs' gradients).
    """
    v.check_embeddings(queries, "queries")
    v.check_embeddings(keys, "keys")
    v.check_same_device_dtype(queries, "queries", keys, "keys")
    v.check_same_dim(queries, "queries", keys, "keys")
    v.check_flag(symmetric, "symmetric")
    v.check_flag(normalize, "normalize")
    v.check_reduction(reduction, ("mean", "sum", "none"))
    n, m = queries.shape[0], keys.shape[0]
    if m < n:
        raise ValueError(f"keys must have at least as many rows as queries (M >= N={n}), got M={m}")
    if symmetric and m != n:
        raise ValueError(f"symmetric=True needs as many keys as queries (M == N={n}), got M={m}")
    scale = _check_temperature(temperature, queries)
    row_keys = torch.arange(n, device=queries.device)
    col_keys = torch.arange(m, device=queries.device)
    block_rows, block_cols, _ = _tile("streaming", queries, keys, False)
    # normalize: the op scales its tiles by the rows' inverse norms (no normalized copies of q and k)
    # a temperature tensor takes the policy with d/dscale's sums (under torch.func its requires_grad may not show)
    # (its gradient is the caller's formula's; a float's goes through the op's head "info_nce")
    learnable = isinstance(temperature, torch.Tensor) and temperature.is_floating_point()
    policy = "scaled_learnable" if learnable else "scaled"
    rows, cols, _ = ops.lse_stats.default(
        queries,
        keys,
        row_keys,
        col_keys,
        None,
        scale,
        policy,
        [],
        normalize,
        symmetric,
        block_rows,
        block_cols,
        False,
        "none" if learnable else "info_nce",
    )
    # cross-entropy: LSE over all keys − the positive's logit (lin_pos = z_ii)
    if learnable:
        loss = torch.logaddexp(rows[:, LSE_POS], rows[:, LSE_NEG]) - rows[:, LIN_POS]
        if symmetric:
            loss = 0.5 * (loss + torch.logaddexp(cols[:, LSE_POS], cols[:, LSE_NEG]) - cols[:, LIN_POS])
    else:
        loss = rows[:, TERM]
        if symmetric:
            loss = 0.5 * (loss + cols[:, TERM])
    loss = _out_dtype(loss, queries)
    return _reduce(loss, reduction)
