"""Reference similarity losses (the log-sum-exp family) and InfoNCE/CLIP, in plain torch.

Each function computes what pytorch-metric-learning 2.9 (PML) computes for the same
batch with its default distance (``CosineSimilarity``, or ``LpDistance()`` for the
lifted-structure losses) and its default reducer, pinned by
tests/test_similarity_reference.py against PML itself in float64. ``memory=`` is
accepted and ignored (these hold B×B matrices; the streaming engine must not).

PML semantics that are easy to get wrong (each is pinned by a test):

* Labelled batch: ``P_i`` = {j ≠ i : labels[j] == labels[i]}, ``N_i`` = {j : labels[j] != labels[i]}.
  The self pair is neither positive nor negative (with ``ref_emb`` in PML only when
  ``ref_labels is labels``; with a separate reference set nothing is excluded).
* Reducers: ``"mean"`` is PML's ``MeanReducer``: SupCon, MultiSimilarity, Circle and
  GeneralizedLifted average over **all B anchors** (anchors without a term count as 0);
  NT-Xent and LiftedStructure are "pos_pair" losses and average over **positive pairs**
  (ordered: (i, p) and (p, i) both count). ``"mean_nonzero"`` is ``AvgNonZeroReducer``:
  mean of the elements (anchors or pairs) that are > 0, and 0 when none is. Defaults:
  SupCon and Circle ``"mean_nonzero"``, the others ``"mean"``. Here > 0 is exact: PML's own
  arithmetic rounds a term to exactly 0 once it falls below about half an ulp of 1 (NT-Xent's
  −log(num/den + tiny), MS's log(1 + Σ)), and its count then leaves that term out. So where
  terms are that small (below ~1e-16 in float64, ~6e-8 in float32: e.g. NT-Xent at τ = 0.01
  with well-separated pairs, MS with base above the similarities), PML's "mean_nonzero"
  divides by fewer terms than metricops' (test_pml_similarity.py pins one such case).
* ``reduction="none"`` returns (B,): the anchor's term; for NT-Xent and lifted structure
  the sum of the anchor's positive-pair terms.
* Whole-batch zero rules (the loss is exactly 0, attached, zero gradient):
  - every loss: when PML's pair tuples all have length ≤ 1 (B ≤ 1 on a labelled batch;
    with mining_epsilon: when the MS miner keeps ≤ 1 positive pair and ≤ 1 negative pair);
  - SupCon, NT-Xent, lifted structure: when the batch has no positive pair **or no
    negative pair at all**. So a batch of a single class gives SupCon 0 (the formula
    would give LSE_P − mean_P > 0) and lifted structure 0 (the formula would give
    relu(d_ap − pos_margin)²/2 > 0);
  - MS with mining_epsilon: when the batch has no positive pair or no negative pair, the
    miner returns nothing and the loss is 0 (without mining, an all-distinct batch still
    gives each anchor its negative term).
* The LSE of an empty set counts as 0 (PML's ``lmu.logsumexp`` masks the output), not
  −inf: GeneralizedLifted's anchor with no positive gives relu(0 + LSE_N), and MS's
  ``log(1 + Σ)`` of an empty set is 0.
* SupCon: the denominator runs over P_i ∪ N_i (every j ≠ i); an anchor with no positive
  gives 0 (PML divides 0 by |P_i| + tiny); an anchor with positives but no negatives gives
  LSE_P z − mean_P z (≥ 0, only 0 for a single positive).
* NT-Xent: one term per positive pair (i, p): log(e^{z_ip} + Σ_{N_i} e^{z_in}) − z_ip, i.e.
  logaddexp(z_ip, LSE_{N_i} z) − z_ip: only the anchor's own row of negatives; a positive
  pair whose anchor has no negative gives 0 but still counts in the mean.
* LiftedStructureLoss (PML's, not the paper's): one term per ordered positive pair (a, p):
  relu(LSE({neg_margin − d[a,n] : n ∈ N_a} ⊎ {neg_margin − d[p,n] : n ∈ N_p}) + d[a,p] −
  pos_margin)² / 2, i.e. the negative LSE is logaddexp of the two rows' negative LSEs
  (empty → 0). With ``ref_emb`` PML matches negatives "of p" by comparing the reference
  index p with the query index of the negative pairs (a quirk; only the pml drop-in has it).
* MultiSimilarity with a distance (LpDistance) uses ``distance.margin``: the exponents are
  α(d − base) and β(base − d), i.e. similarity −d **and base −base**, not just S = −d.
  GeneralizedLifted/Lifted with CosineSimilarity likewise use pos_margin − S and S − neg_margin.
* Circle: a_p = relu(1 + m − S), a_n = relu(S + m) are detached; an anchor lacking a
  positive or a negative gives 0. PML's softplus is ``torch.nn.Softplus()``: x itself for
  x > 20 (threshold), which differs from log1p(e^x) by ~2e-9 there (visible in float64 parity).
* PML's per-element loss tensors are (B, 1) for MS and GeneralizedLifted and (P, 1) for
  LiftedStructure (its own PerAnchorReducer fails on the latter); values are unaffected.
* MS miner (mining_epsilon=ε): max_neg_i / min_pos_i over the anchor's negatives /
  positives; keep p if S_ip − ε < max_neg_i, keep n if S_in + ε > min_pos_i (strict). An
  anchor with no negative keeps no positive and vice versa. The masks carry no gradient.
"""

from __future__ import annotations

from typing import Union

import torch
import torch.nn.functional as F

from .distance import pairwise_distance

_REDUCTIONS = ("mean", "sum", "mean_nonzero", "none")


def _check_reduction(reduction: str) -> None:
    if reduction not in _REDUCTIONS:
        raise ValueError(f"reduction must be one of 'mean', 'sum', 'mean_nonzero', 'none', got {reduction!r}")


def _pair_masks(labels: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(B, B) bool masks: positives (same label, off the diagonal) and negatives."""
    same = labels[:, None] == labels[None, :]
    eye = torch.eye(labels.shape[0], dtype=torch.bool, device=labels.device)
    return same & ~eye, ~same


def _masked_lse(x: torch.Tensor, mask: torch.Tensor, *, add_one: bool = False) -> torch.Tensor:
    """Row-wise log-sum-exp over ``mask`` (log(1 + Σ) with add_one); an empty row gives 0, as in PML."""
    x = x.masked_fill(~mask, float("-inf"))
    if add_one:
        x = torch.cat([x, torch.zeros_like(x[:, :1])], dim=1)
    out = torch.logsumexp(x, dim=1)
    return torch.where(mask.any(dim=1), out, torch.zeros_like(out))


def _zero(embeddings: torch.Tensor, reduction: str) -> torch.Tensor:
    """0 (or zeros (B,)) still attached to the graph, with zero gradient."""
    per_anchor = (embeddings * 0).sum(dim=1)
    return per_anchor if reduction == "none" else per_anchor.sum()


def _reduce(elements: torch.Tensor, per_anchor: torch.Tensor, reduction: str) -> torch.Tensor:
    """PML's reducers over ``elements`` (anchors or positive pairs); "none" gives ``per_anchor``."""
    if reduction == "none":
        return per_anchor
    if reduction == "sum":
        return elements.sum()
    if reduction == "mean":
        return elements.sum() / max(elements.numel(), 1)
    positive = elements > 0  # mean_nonzero: AvgNonZeroReducer, 0 when no element is > 0
    return torch.where(positive, elements, torch.zeros_like(elements)).sum() / positive.sum().clamp_min(1)


def _cosine(embeddings: torch.Tensor) -> torch.Tensor:
    x = F.normalize(embeddings, p=2, dim=1)
    return x @ x.T


def supcon_loss(
    embeddings: torch.Tensor,
    labels: torch.Tensor,
    *,
    temperature: float = 0.1,
    reduction: str = "mean_nonzero",
    memory: str = "auto",
) -> torch.Tensor:
    """Reference for :func:`metricops.supcon_loss` (PML ``SupConLoss``).

    z = S/τ; anchor i with a positive gives LSE_{j≠i} z_ij − mean_{p∈P_i} z_ip, else 0.
    0 for the whole batch when it has no positive pair or no negative pair. Returns a
    scalar, or (B,) with reduction="none".
    """
    _check_reduction(reduction)
    pos, neg = _pair_masks(labels)
    if not pos.any() or not neg.any():
        return _zero(embeddings, reduction)
    z = _cosine(embeddings) / temperature
    denominator = _masked_lse(z, pos | neg)
    n_pos = pos.sum(dim=1)
    mean_pos = torch.where(pos, z, torch.zeros_like(z)).sum(dim=1) / n_pos.clamp_min(1)
    per_anchor = torch.where(n_pos > 0, denominator - mean_pos, torch.zeros_like(mean_pos))
    return _reduce(per_anchor, per_anchor, reduction)


def _pair_terms_reduce(terms: torch.Tensor, pos: torch.Tensor, reduction: str) -> torch.Tensor:
    """Reduce a (B, B) matrix of positive-pair terms (0 off ``pos``), PML's pos_pair reduction."""
    return _reduce(terms[pos], terms.sum(dim=1), reduction)


def ntxent_loss(
    embeddings: torch.Tensor,
    labels: torch.Tensor,
    *,
    temperature: float = 0.07,
    reduction: str = "mean",
    memory: str = "auto",
) -> torch.Tensor:
    """Reference for :func:`metricops.ntxent_loss` (PML ``NTXentLoss``).

    z = S/τ; each positive pair (i, p) gives log(e^{z_ip} + Σ_{n∈N_i} e^{z_in}) − z_ip;
    "mean" averages over positive pairs, "none" gives each anchor's sum over its pairs.
    0 when the batch has no positive pair or no negative pair.
    """
    _check_reduction(reduction)
    pos, neg = _pair_masks(labels)
    if not pos.any() or not neg.any():
        return _zero(embeddings, reduction)
    z = _cosine(embeddings) / temperature
    neg_lse = torch.logsumexp(z.masked_fill(~neg, float("-inf")), dim=1, keepdim=True)  # −inf: no negative
    terms = torch.logaddexp(z, neg_lse) - z
    terms = torch.where(pos, terms, torch.zeros_like(terms))
    return _pair_terms_reduce(terms, pos, reduction)


def multi_similarity_masks(
    sim: torch.Tensor, pos: torch.Tensor, neg: torch.Tensor, epsilon: float
) -> tuple[torch.Tensor, torch.Tensor]:
    """The pairs PML's ``MultiSimilarityMiner(epsilon)`` keeps, as (B, M) bool masks (no gradient).

    Positive p is kept if S_ip − ε < max_{n∈N_i} S_in; negative n if S_in + ε > min_{p∈P_i} S_ip.
    """
    sim = sim.detach()
    max_neg = sim.masked_fill(~neg, float("-inf")).amax(dim=1, keepdim=True)
    min_pos = sim.masked_fill(~pos, float("inf")).amin(dim=1, keepdim=True)
    return pos & (sim - epsilon < max_neg), neg & (sim + epsilon > min_pos)


def multi_similarity_loss(
    embeddings: torch.Tensor,
    labels: torch.Tensor,
    *,
    alpha: float = 2.0,
    beta: float = 50.0,
    base: float = 0.5,
    mining_epsilon: Union[float, None] = None,
    reduction: str = "mean",
    memory: str = "auto",
) -> torch.Tensor:
    """Reference for :func:`metricops.multi_similarity_loss` (PML ``MultiSimilarityLoss``).

    Anchor i: (1/α)·log(1 + Σ_{P_i} e^{−α(S_ip − base)}) + (1/β)·log(1 + Σ_{N_i} e^{β(S_in − base)});
    "mean" averages over all B anchors. With ``mining_epsilon`` the sets are first cut to
    the pairs PML's ``MultiSimilarityMiner(epsilon)`` keeps, and the loss is 0 when the
    miner keeps nothing (no positive or no negative pair in the batch) or ≤ 1 pair of each.
    """
    _check_reduction(reduction)
    pos, neg = _pair_masks(labels)
    if labels.shape[0] <= 1:
        return _zero(embeddings, reduction)
    sim = _cosine(embeddings)
    if mining_epsilon is not None:
        if not pos.any() or not neg.any():
            return _zero(embeddings, reduction)
        pos, neg = multi_similarity_masks(sim, pos, neg, mining_epsilon)
        if pos.sum() <= 1 and neg.sum() <= 1:
            return _zero(embeddings, reduction)
    pos_term = _masked_lse(-alpha * (sim - base), pos, add_one=True) / alpha
    neg_term = _masked_lse(beta * (sim - base), neg, add_one=True) / beta
    per_anchor = pos_term + neg_term
    return _reduce(per_anchor, per_anchor, reduction)


def circle_loss(
    embeddings: torch.Tensor,
    labels: torch.Tensor,
    *,
    m: float = 0.4,
    gamma: float = 80.0,
    reduction: str = "mean_nonzero",
    memory: str = "auto",
) -> torch.Tensor:
    """Reference for :func:`metricops.circle_loss` (PML ``CircleLoss``).

    Anchor i with a positive and a negative: softplus(LSE_P(−γ·a_p·(S_ip − 1 + m)) +
    LSE_N(γ·a_n·(S_in − m))) with a_p = relu(1 + m − S_ip), a_n = relu(S_in + m)
    detached; other anchors give 0.
    """
    _check_reduction(reduction)
    pos, neg = _pair_masks(labels)
    if labels.shape[0] <= 1:
        return _zero(embeddings, reduction)
    sim = _cosine(embeddings)
    a_p = F.relu(1 + m - sim.detach())
    a_n = F.relu(sim.detach() + m)
    lse_pos = _masked_lse(-gamma * a_p * (sim - (1 - m)), pos)
    lse_neg = _masked_lse(gamma * a_n * (sim - m), neg)
    valid = pos.any(dim=1) & neg.any(dim=1)
    per_anchor = torch.where(valid, F.softplus(lse_pos + lse_neg), torch.zeros_like(lse_pos))
    return _reduce(per_anchor, per_anchor, reduction)


def _normalized_euclidean(embeddings: torch.Tensor) -> torch.Tensor:
    """PML's default ``LpDistance()``: euclidean distance of the L2-normalized rows."""
    return pairwise_distance(embeddings, metric="euclidean", normalize=True)


def generalized_lifted_structure_loss(
    embeddings: torch.Tensor,
    labels: torch.Tensor,
    *,
    pos_margin: float = 0.0,
    neg_margin: float = 1.0,
    reduction: str = "mean",
    memory: str = "auto",
) -> torch.Tensor:
    """Reference for :func:`metricops.generalized_lifted_structure_loss` (PML ``GeneralizedLiftedStructureLoss``).

    d = euclidean distance of the normalized embeddings. Anchor i:
    relu(LSE_{P_i}(d − pos_margin) + LSE_{N_i}(neg_margin − d)), an empty set's LSE
    counting as 0; "mean" averages over all B anchors.
    """
    _check_reduction(reduction)
    pos, neg = _pair_masks(labels)
    if labels.shape[0] <= 1:
        return _zero(embeddings, reduction)
    d = _normalized_euclidean(embeddings)
    per_anchor = F.relu(_masked_lse(d - pos_margin, pos) + _masked_lse(neg_margin - d, neg))
    return _reduce(per_anchor, per_anchor, reduction)


def lifted_structure_loss(
    embeddings: torch.Tensor,
    labels: torch.Tensor,
    *,
    pos_margin: float = 0.0,
    neg_margin: float = 1.0,
    reduction: str = "mean",
    memory: str = "auto",
) -> torch.Tensor:
    """Reference for :func:`metricops.lifted_structure_loss` (PML ``LiftedStructureLoss``).

    d = euclidean distance of the normalized embeddings. Each ordered positive pair
    (a, p) gives relu(L_ap + d_ap − pos_margin)² / 2, where L_ap is the LSE of
    neg_margin − d over the negative pairs of row a and of row p together (0 when both
    are empty); "mean" averages over positive pairs, "none" sums each anchor's pairs.
    0 when the batch has no positive pair or no negative pair.
    """
    _check_reduction(reduction)
    pos, neg = _pair_masks(labels)
    if not pos.any() or not neg.any():
        return _zero(embeddings, reduction)
    d = _normalized_euclidean(embeddings)
    row_lse = torch.logsumexp((neg_margin - d).masked_fill(~neg, float("-inf")), dim=1)  # −inf: no negative
    pair_lse = torch.logaddexp(row_lse[:, None], row_lse[None, :])
    pair_lse = torch.where(torch.isneginf(pair_lse), torch.zeros_like(pair_lse), pair_lse)
    terms = F.relu(pair_lse + d - pos_margin) ** 2 / 2
    terms = torch.where(pos, terms, torch.zeros_like(terms))
    return _pair_terms_reduce(terms, pos, reduction)


def info_nce_loss(
    queries: torch.Tensor,
    keys: torch.Tensor,
    *,
    temperature: Union[float, torch.Tensor] = 0.05,
    symmetric: bool = False,
    normalize: bool = True,
    reduction: str = "mean",
) -> torch.Tensor:
    """Reference for :func:`metricops.info_nce_loss`: F.cross_entropy(S/τ, arange(N)).

    queries (N, D), keys (M, D), M ≥ N: query i's positive is key i, keys past N are
    extra negatives. S is the cosine similarity (the dot product with normalize=False).
    symmetric=True (CLIP, M == N) averages with the keys→queries loss, term by term for
    reduction="none" ((N,)).
    """
    _check_reduction(reduction)
    if queries.dim() != 2 or keys.dim() != 2 or keys.shape[1] != queries.shape[1]:
        raise ValueError(
            f"queries and keys must be (N, D) and (M, D) with the same D, got {tuple(queries.shape)}, {tuple(keys.shape)}"
        )
    n, m = queries.shape[0], keys.shape[0]
    if m < n:
        raise ValueError(f"keys must have at least as many rows as queries (M >= N), got M={m}, N={n}")
    if symmetric and m != n:
        raise ValueError(f"symmetric=True needs as many keys as queries, got M={m}, N={n}")
    if normalize:
        queries, keys = F.normalize(queries, p=2, dim=1), F.normalize(keys, p=2, dim=1)
    logits = queries @ keys.T / temperature
    target = torch.arange(n, device=queries.device)
    terms = F.cross_entropy(logits, target, reduction="none")
    if symmetric:
        terms = (terms + F.cross_entropy(logits.T, target, reduction="none")) / 2
    return _reduce(terms, terms, reduction)
