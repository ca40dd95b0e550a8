"""pytorch-metric-learning 2.9's similarity losses (the log-sum-exp family); the miner is in _ms_miner.py.

Two paths compute PML's value and gradient:

* Native (metricops' streaming engine, nothing B×B held), with the loss's default distance
  (CosineSimilarity; ``LpDistance()`` for the lifted-structure losses) and integer labels:
  - every pair of one batch: one call of metricops' functional op (``metricops.supcon_loss`` etc.). The
    reducer is the op's ``reduction`` (MeanReducer "mean", SumReducer "sum", AvgNonZeroReducer
    "mean_nonzero"); any other reducer of a per-anchor loss reduces the op's ``reduction="none"`` vector.
  - a MultiSimilarityLoss given a metricops.pml MultiSimilarityMiner's output mined on these very
    embeddings: one ``metricops.multi_similarity_loss(mining_epsilon=ε)`` call, without listing the pairs.
  - ``ref_emb``/``ref_labels`` for the per-anchor losses (SupCon, MS, Circle, GeneralizedLifted): the
    engine's rows against the reference set's columns (metricops.similarity's per-anchor functions).
  - LiftedStructureLoss with a reducer ``metricops.lifted_structure_loss`` does not compute: each row's LSE
    over its negatives from the engine, then PML's term per positive pair (listed per class, never via a
    B×B mask).
* Every pair of the batch otherwise (another distance, NT-Xent or lifted structure with ``ref_emb``, a
  reducer the op cannot express for a per-pair loss): PML's matrix in row blocks (``_dense_blocks``),
  one GEMM or metricops.pairwise_distance per block, each block checkpointed (recomputed in the backward),
  so one block × R is held at a time.
* Listed pairs (an ``indices_tuple``): torch ops over the listed (anchor, other) pairs only, O(#pairs)
  memory rather than PML's B×R matrices: each pair's similarity or distance by a chunked gather
  (``_pair_values``), per-row log-sum-exps by segment reductions.

PML's rules are followed as it applies them: a pair listed twice counts once for the matrix-based losses
(SupCon, MS, Circle, GeneralizedLifted) and each time for the pair-based ones (NT-Xent, Lifted); all index
tensors of length ≤ 1 give the zero loss.

PML semantics worth knowing are listed in metricops/reference/similarity.py's docstring.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch.utils.checkpoint import checkpoint

from . import reducers as _reducers
from ._common import all_pairs, check_call, refuse_unsupported, set_ref, wrap_indices
from .distances import BaseDistance, CosineSimilarity, LpDistance

from ._listed_pairs import _pair_values, _segment_lse, _unique_pairs, _pair_blocks, _no_terms, _element
from ._ms_miner import MinedPairs


def _native(name: str):
    """metricops' functional op ``name`` (imported at call time: metricops imports this package)."""
    import metricops

    return getattr(metricops, name)


class _SimilarityLoss(torch.nn.Module):
    """PML's GenericPairLoss: the pairs (from labels or ``indices_tuple``), PML's loss dict, the reducer."""

    _name: str
    _native_op: str
    _pair_based = False  # True: one term per listed positive pair ("pos_pair"); else one per anchor row
    _per_anchor_op = None  # metricops.similarity's per-anchor function that also takes ref_emb/ref_labels
    _per_anchor_extra: dict = {}
    _needs_pos_and_neg = False  # the loss is 0 unless some positive and some negative pair is listed

    def __init__(self, distance, reducer, kwargs, default_reducer=_reducers.MeanReducer, cosine_default=True):
        super().__init__()
        refuse_unsupported(f"losses.{self._name}", kwargs)
        if distance is None:
            distance = CosineSimilarity() if cosine_default else LpDistance()
        if not isinstance(distance, BaseDistance):
            raise NotImplementedError(
                f"metricops.pml: losses.{self._name}(distance=...) must be metricops.pml.distances.LpDistance or "
                f"CosineSimilarity, got {type(distance).__module__}.{type(distance).__name__}"
            )
        self.distance = distance
        self.reducer = _reducers.resolve(reducer, ["loss"], default_reducer, f"losses.{self._name}")

    # -- native path
    def _native_distance(self) -> bool:
        """Whether the native op computes this loss's distance (its PML default)."""
        return isinstance(self.distance, CosineSimilarity)

    def _native_reduction(self):
        """The op's reduction that equals the reducer, "none" when the reducer can reduce the op's per-anchor
        vector, else None."""
        r = self.reducer
        if type(r) is _reducers.MeanReducer:
            return "mean"
        if type(r) is _reducers.SumReducer:
            return "sum"
        if _reducers.is_avg_nonzero(r):
            return "mean_nonzero"
        if self._pair_based or isinstance(r, _reducers.DoNothingReducer):
            return None
        return "none"

    def _native_kwargs(self) -> dict:
        raise NotImplementedError

    def forward(self, embeddings, labels=None, indices_tuple=None, ref_emb=None, ref_labels=None):
        check_call(embeddings, labels, indices_tuple)
        ref, ref_lab = set_ref(embeddings, labels, ref_emb, ref_labels)
        if labels is not None:
            labels = labels.to(embeddings.device)
        if ref_emb is None and _native_inputs(embeddings, labels):
            out = self._fast(embeddings, labels, indices_tuple)
            if out is not None:
                return out
        if ref_emb is not None and indices_tuple is None and self._per_anchor_op is not None:
            out = self._fast_ref(embeddings, labels, ref_emb, ref_labels)
            if out is not None:
                return out
        loss_dict = self.compute_loss(embeddings, labels, indices_tuple, ref, ref_lab)
        return self.reducer(loss_dict, embeddings, labels)

    def _fast(self, embeddings, labels, indices_tuple):
        """The loss from the native op where it computes exactly this call (every pair of the batch, the
        default distance, a reducer it expresses), else None."""
        if indices_tuple is not None or not self._native_distance():
            return None
        return self._reduce_native(
            lambda reduction: _native(self._native_op)(
                embeddings, labels, reduction=reduction, **self._native_kwargs()
            ),
            embeddings,
            labels,
        )

    def _fast_ref(self, embeddings, labels, ref_emb, ref_labels):
        """A per-anchor loss against a separate reference set from the engine (rows: the batch, columns:
        ref_emb; no pair is excluded, as PML has it when ref_labels is another tensor): O((B + R)·D) memory.
        None where PML's rules differ (ref_labels being labels itself, at most 2 pairs) or inputs don't fit."""
        if (
            ref_labels is None
            or ref_labels is labels
            or not self._native_distance()
            or not _native_inputs(embeddings, labels)
            or not _native_inputs(ref_emb, ref_labels)
            or ref_emb.dtype != embeddings.dtype
            or embeddings.shape[0] * ref_emb.shape[0] <= 2  # PML's "every index tensor of length <= 1" rule
        ):
            return None
        from .. import similarity as _sim

        per_anchor = getattr(_sim, self._per_anchor_op)(
            embeddings,
            labels,
            memory="auto",
            ref_emb=ref_emb,
            ref_labels=ref_labels.to(embeddings.device),
            **self._native_kwargs(),
            **self._per_anchor_extra,
        )
        return self.reducer(_element(per_anchor, embeddings.shape[0], embeddings.device), embeddings, labels)

    def _reduce_native(self, op, embeddings, labels):
        """``op(reduction)`` reduced as ``self.reducer`` would reduce PML's terms, or None where it cannot be."""
        reduction = self._native_reduction()
        if reduction is None:
            return None
        if reduction == "none" and embeddings.shape[0] <= 1:
            # PML's GenericPairLoss: at most one positive and one negative pair (that is, B <= 1) is the zero
            # loss, whatever the reducer (a MeanReducer of no term would be NaN)
            return self.reducer(_no_terms(), embeddings, labels)
        out = op(reduction)
        if reduction != "none":
            return out
        return self.reducer(_element(out, embeddings.shape[0], embeddings.device), embeddings, labels)

    def compute_loss(self, embeddings, labels, indices_tuple, ref_emb, ref_labels):
        """PML's loss dict, over the listed pairs only (``ref_emb`` is the batch itself without one)."""
        if indices_tuple is None:
            return self._dense_blocks(embeddings, labels, ref_emb, ref_labels)
        if indices_tuple is None:
            a1, p, a2, n = all_pairs(labels, ref_labels)
        elif len(indices_tuple) == 3:
            a, p, n = indices_tuple
            a1, a2 = a, a
        else:
            a1, p, a2, n = indices_tuple
        a1, p, a2, n = (torch.as_tensor(t, device=embeddings.device).long() for t in (a1, p, a2, n))
        if all(len(t) <= 1 for t in (a1, p, a2, n)):  # PML's GenericPairLoss returns the zero loss
            return _no_terms()
        # as PML's tensor indexing: negative indices count from the end, others out of range raise
        n_rows, n_cols = embeddings.shape[0], ref_emb.shape[0]
        a1, a2 = (wrap_indices(t, n_rows, "anchor") for t in (a1, a2))
        p, n = (wrap_indices(t, n_cols, "reference") for t in (p, n))
        if not self._pair_based:
            n_cols = ref_emb.shape[0]
            a1, p = _unique_pairs(a1, p, n_cols)
            a2, n = _unique_pairs(a2, n, n_cols)
            if a1.numel() and a2.numel() and bool(torch.isin(a1 * n_cols + p, a2 * n_cols + n).any()):
                raise ValueError("indices_tuple: each pair should be either positive or negative, not both")
        pos = _pair_values(self.distance, embeddings, ref_emb, a1, p)
        neg = _pair_values(self.distance, embeddings, ref_emb, a2, n)
        return self._loss_dict(pos, neg, (a1, p, a2, n), embeddings.shape[0])

    def _terms(self, pos, neg, indices, n_rows):
        """PML's loss terms from the listed pairs' values: (n_rows,) per anchor, or one per positive pair."""
        raise NotImplementedError

    def _loss_dict(self, pos, neg, indices, n_rows):
        a1, p, a2, _ = indices
        if self._needs_pos_and_neg and (a1.numel() == 0 or a2.numel() == 0):
            return _no_terms()  # PML's "if len(a1) > 0 and len(a2) > 0" (SupCon: any positive and negative)
        terms = self._terms(pos, neg, indices, n_rows)
        if self._pair_based:
            return {"loss": {"losses": terms, "indices": (a1, p), "reduction_type": "pos_pair"}}
        return _element(terms, n_rows, pos.device)

    def _dense_blocks(self, embeddings, labels, ref_emb, ref_labels):
        """Every pair of the batch (from labels) where the native op does not apply (another distance, a
        reference set, a reducer the op cannot express): PML's matrix in row blocks, one GEMM or cdist each,
        each block recomputed in the backward (checkpoint), so at most one block × R is held."""
        blocks, n_pos, n_neg = _pair_blocks(labels, ref_labels, ref_emb.shape[0])
        if n_pos <= 1 and n_neg <= 1:  # PML's GenericPairLoss returns the zero loss
            return _no_terms()
        if self._needs_pos_and_neg and (n_pos == 0 or n_neg == 0):
            return _no_terms()
        terms = []
        for rows, idx in blocks:

            def block_terms(x, y, rows=rows, idx=idx):
                mat = self._matrix(x[rows], y)
                return self._terms(mat[idx[0], idx[1]], mat[idx[2], idx[3]], idx, len(rows))

            terms.append(checkpoint(block_terms, embeddings, ref_emb, use_reentrant=False))
        return self._dense_dict(torch.cat(terms), blocks, embeddings)

    def _dense_dict(self, terms, blocks, embeddings):
        if self._pair_based:
            anchors = torch.cat([rows[idx[0]] for rows, idx in blocks])
            others = torch.cat([idx[1] for _, idx in blocks])
            return {"loss": {"losses": terms, "indices": (anchors, others), "reduction_type": "pos_pair"}}
        return _element(terms, embeddings.shape[0], embeddings.device)

    def _matrix(self, x, y):
        """PML's ``distance(x, y)``: the cosine similarity as PML computes it (normalized rows, one GEMM), or
        metricops' exact pairwise distance."""
        if isinstance(self.distance, CosineSimilarity):
            return F.normalize(x, p=2, dim=1) @ F.normalize(y, p=2, dim=1).T
        return self.distance(x, y)  # LpDistance: metricops.pairwise_distance (half precision on CPU too)

    def _similarity(self, values):
        """PML's "if dealing with actual distances, use negative distances"."""
        return values if self.distance.is_inverted else -values


def _native_inputs(embeddings, labels) -> bool:
    return (
        labels is not None
        and labels.dtype in (torch.int32, torch.int64)
        and labels.dim() == 1
        and embeddings.dtype in (torch.float32, torch.float64)
        and embeddings.dim() == 2
    )


class _TemperatureLoss(_SimilarityLoss):
    """A loss on z = similarity/τ (−distance/τ for an LpDistance)."""

    def __init__(self, temperature, distance, reducer, kwargs, **defaults):
        super().__init__(distance, reducer, kwargs, **defaults)
        self.temperature = temperature

    def _native_kwargs(self):
        return {"temperature": self.temperature}

    def _logits(self, pos, neg):
        return self._similarity(pos) / self.temperature, self._similarity(neg) / self.temperature


class SupConLoss(_TemperatureLoss):
    """``SupConLoss(temperature=0.1, distance=None, reducer=None)``, as pytorch-metric-learning 2.9.

    With z = similarity/τ (−distance/τ for LpDistance), anchor i with a positive gives
    LSE_{j∈P_i∪N_i} z_ij − mean_{p∈P_i} z_ip, else 0; 0 overall when no positive or no negative pair is
    listed. Default reducer AvgNonZeroReducer; default distance CosineSimilarity.
    """

    _name = "SupConLoss"
    _needs_pos_and_neg = True
    _per_anchor_op = "_supcon_per_anchor"
    _native_op = "supcon_loss"

    def __init__(self, temperature: float = 0.1, distance=None, reducer=None, **kwargs):
        super().__init__(temperature, distance, reducer, kwargs, default_reducer=_reducers.AvgNonZeroReducer)

    def _terms(self, pos, neg, indices, n_rows):
        a1, _, a2, _ = indices
        z_pos, z_neg = self._logits(pos, neg)
        denominator, _ = _segment_lse(torch.cat([z_pos, z_neg]), torch.cat([a1, a2]), n_rows)
        n_pos = torch.zeros(n_rows, dtype=torch.int64, device=pos.device).index_add(0, a1, torch.ones_like(a1))
        sum_pos = torch.zeros(n_rows, dtype=pos.dtype, device=pos.device).index_add(0, a1, z_pos)
        return torch.where(n_pos > 0, denominator - sum_pos / n_pos.clamp_min(1), torch.zeros_like(sum_pos))


class NTXentLoss(_TemperatureLoss):
    """``NTXentLoss(temperature=0.07, distance=None, reducer=None)``, as pytorch-metric-learning 2.9.

    One term per listed positive pair (i, p): −log(e^{z_ip} / (e^{z_ip} + Σ e^{z_in})) over the listed
    negative pairs of anchor i, z = similarity/τ (−distance/τ for LpDistance); MeanReducer averages over
    the positive pairs. Default distance CosineSimilarity.
    """

    _name = "NTXentLoss"
    _needs_pos_and_neg = True
    _native_op = "ntxent_loss"
    _pair_based = True

    def __init__(self, temperature: float = 0.07, distance=None, reducer=None, **kwargs):
        super().__init__(temperature, distance, reducer, kwargs)

    def _terms(self, pos, neg, indices, n_rows):
        a1, _, a2, _ = indices
        z_pos, z_neg = self._logits(pos, neg)
        neg_lse, _ = _segment_lse(z_neg, a2, n_rows, empty=float("-inf"))
        # log(1 + e^{L - z}), not logaddexp(z, L) - z: that rounds a term below ~1e-16·z to 0, which the
        # nonzero reducers would then not count
        return torch.logaddexp(neg_lse[a1] - z_pos, torch.zeros_like(z_pos))


class MultiSimilarityLoss(_SimilarityLoss):
    """``MultiSimilarityLoss(alpha=2, beta=50, base=0.5, distance=None, reducer=None)``, as
    pytorch-metric-learning 2.9.

    Anchor i: (1/α)·log(1 + Σ_P e^{α·margin(s, base)}) + (1/β)·log(1 + Σ_N e^{β·margin(base, s)}) with PML's
    ``distance.margin`` (CosineSimilarity: base − s and s − base; LpDistance: d − base and base − d).
    Given a metricops.pml MultiSimilarityMiner's output on the same embeddings it is one native call.
    """

    _name = "MultiSimilarityLoss"
    _per_anchor_op = "_multi_similarity_per_anchor"
    _per_anchor_extra = {"mining_epsilon": None}
    _native_op = "multi_similarity_loss"

    def __init__(self, alpha: float = 2, beta: float = 50, base: float = 0.5, distance=None, reducer=None, **kwargs):
        super().__init__(distance, reducer, kwargs)
        self.alpha = alpha
        self.beta = beta
        self.base = base

    def _native_kwargs(self):
        return {"alpha": self.alpha, "beta": self.beta, "base": self.base}

    def _fast(self, embeddings, labels, indices_tuple):
        if indices_tuple is None or not self._native_distance():
            return super()._fast(embeddings, labels, indices_tuple)
        if not isinstance(indices_tuple, MinedPairs) or indices_tuple.source is None:
            return None
        source, miner_distance = indices_tuple.source, indices_tuple.selection.distance
        if (
            not isinstance(miner_distance, CosineSimilarity)
            or not source.is_unchanged(embeddings)
            or source.labels.device != embeddings.device
            or source.labels.dtype not in (torch.int32, torch.int64)
        ):
            return None
        epsilon = indices_tuple.selection.epsilon
        return self._reduce_native(
            lambda reduction: _native(self._native_op)(
                embeddings, source.labels, mining_epsilon=epsilon, reduction=reduction, **self._native_kwargs()
            ),
            embeddings,
            labels,
        )

    def _terms(self, pos, neg, indices, n_rows):
        a1, _, a2, _ = indices
        margin = self.distance.margin
        pos_term, _ = _segment_lse(self.alpha * margin(pos, self.base), a1, n_rows, add_one=True)
        neg_term, _ = _segment_lse(self.beta * margin(self.base, neg), a2, n_rows, add_one=True)
        return pos_term / self.alpha + neg_term / self.beta


class CircleLoss(_SimilarityLoss):
    """``CircleLoss(m=0.4, gamma=80, distance=None, reducer=None)``, as pytorch-metric-learning 2.9
    (CosineSimilarity only, as PML).

    Anchor i with a positive and a negative: softplus(LSE_P(−γ·a_p·(s − 1 + m)) + LSE_N(γ·a_n·(s − m))),
    a_p = relu(1 + m − s), a_n = relu(s + m) held constant; else 0. Default reducer AvgNonZeroReducer.
    """

    _name = "CircleLoss"
    _per_anchor_op = "_circle_per_anchor"
    _native_op = "circle_loss"

    def __init__(self, m: float = 0.4, gamma: float = 80, distance=None, reducer=None, **kwargs):
        super().__init__(distance, reducer, kwargs, default_reducer=_reducers.AvgNonZeroReducer)
        if not isinstance(self.distance, CosineSimilarity):
            raise ValueError(
                f"losses.CircleLoss: distance must be CosineSimilarity (as in pytorch-metric-learning), "
                f"got {type(self.distance).__name__}"
            )
        self.m = m
        self.gamma = gamma

    def _native_kwargs(self):
        return {"m": self.m, "gamma": self.gamma}

    def _terms(self, pos, neg, indices, n_rows):
        a1, _, a2, _ = indices
        m, gamma = self.m, self.gamma
        pos_logits = -gamma * F.relu(1 + m - pos.detach()) * (pos - (1 - m))
        neg_logits = gamma * F.relu(neg.detach() + m) * (neg - m)
        lse_pos, n_pos = _segment_lse(pos_logits, a1, n_rows)
        lse_neg, n_neg = _segment_lse(neg_logits, a2, n_rows)
        valid = (n_pos > 0) & (n_neg > 0)
        return torch.where(valid, F.softplus(lse_pos + lse_neg), torch.zeros_like(lse_pos))


class _LiftedBase(_SimilarityLoss):
    def __init__(self, neg_margin, pos_margin, distance, reducer, kwargs):
        super().__init__(distance, reducer, kwargs, cosine_default=False)
        self.neg_margin = neg_margin
        self.pos_margin = pos_margin

    def _native_distance(self):
        d = self.distance
        return isinstance(d, LpDistance) and d.normalize_embeddings and d.power == 1

    def _native_kwargs(self):
        return {"pos_margin": self.pos_margin, "neg_margin": self.neg_margin}


class GeneralizedLiftedStructureLoss(_LiftedBase):
    """``GeneralizedLiftedStructureLoss(neg_margin=1, pos_margin=0, distance=None, reducer=None)``, as
    pytorch-metric-learning 2.9.

    Anchor i: relu(LSE_P(margin(d, pos_margin)) + LSE_N(margin(neg_margin, d))), an empty set's LSE counting
    as 0. Default distance ``LpDistance()`` (euclidean on normalized embeddings).
    """

    _name = "GeneralizedLiftedStructureLoss"
    _per_anchor_op = "_generalized_lifted_per_anchor"
    _native_op = "generalized_lifted_structure_loss"

    def __init__(self, neg_margin: float = 1, pos_margin: float = 0, distance=None, reducer=None, **kwargs):
        super().__init__(neg_margin, pos_margin, distance, reducer, kwargs)

    def _terms(self, pos, neg, indices, n_rows):
        a1, _, a2, _ = indices
        margin = self.distance.margin
        pos_lse, _ = _segment_lse(margin(pos, self.pos_margin), a1, n_rows)
        neg_lse, _ = _segment_lse(margin(self.neg_margin, neg), a2, n_rows)
        return F.relu(pos_lse + neg_lse)


class LiftedStructureLoss(_LiftedBase):
    """``LiftedStructureLoss(neg_margin=1, pos_margin=0, distance=None, reducer=None)``, as
    pytorch-metric-learning 2.9.

    One term per listed positive pair (a, p): relu(LSE(margin(neg_margin, d)) + margin(d_ap, pos_margin))² / 2,
    the LSE over the listed negative pairs whose anchor is a or p (p read as a row index, as PML does also
    with ``ref_emb``; 0 when there are none). Default distance ``LpDistance()``.
    """

    _name = "LiftedStructureLoss"
    _needs_pos_and_neg = True
    _native_op = "lifted_structure_loss"
    _pair_based = True

    def __init__(self, neg_margin: float = 1, pos_margin: float = 0, distance=None, reducer=None, **kwargs):
        super().__init__(neg_margin, pos_margin, distance, reducer, kwargs)

    def _fast(self, embeddings, labels, indices_tuple):
        if indices_tuple is not None or not self._native_distance():
            return None
        import metricops

        if hasattr(metricops, self._native_op):
            result = super()._fast(embeddings, labels, indices_tuple)
            if result is not None:
                return result
        # PML's per-pair terms from the engine's row statistics: exact for every reducer
        return self.reducer(self._engine_loss_dict(embeddings, labels), embeddings, labels)

    def _engine_loss_dict(self, embeddings, labels):
        """PML's per-pair loss dict from the streaming engine: each row's LSE of neg_margin − d over its
        negatives (metricops' lse_stats, nothing B×B), then d_ap for the positive pairs only (O(#positive
        pairs) memory; the pairs of each class are listed without a B×B mask)."""
        from .. import similarity as _sim
        from .._registrations.similarity import COUNT_NEG, LSE_NEG

        x = _sim._prepare_labelled(embeddings, labels, "none", "auto")[0]
        st, _ = _sim._stats(x, None, labels, None, "lifted", (float(self.pos_margin), float(self.neg_margin)))
        a1, p = _positive_pairs(labels)
        if a1.numel() == 0 or not bool((st[:, COUNT_NEG] > 0).any()):
            return _no_terms()
        has_neg = st[:, COUNT_NEG] > 0
        row_lse = torch.where(has_neg, st[:, LSE_NEG], torch.zeros_like(st[:, LSE_NEG])).to(embeddings.dtype)
        lse = _logaddexp_of_rows(row_lse, has_neg, a1, p)
        d_ap = _pair_values(self.distance, embeddings, embeddings, a1, p)
        losses = F.relu(lse + d_ap - self.pos_margin) ** 2 / 2
        return {"loss": {"losses": losses, "indices": (a1, p), "reduction_type": "pos_pair"}}

    def _dense_blocks(self, embeddings, labels, ref_emb, ref_labels):
        """Two passes over the row blocks (a pair's term also needs row p's negatives): each row's LSE over its
        negatives, then each positive pair's term; both checkpointed per block."""
        blocks, n_pos, n_neg = _pair_blocks(labels, ref_labels, ref_emb.shape[0])
        if (n_pos <= 1 and n_neg <= 1) or n_pos == 0 or n_neg == 0:
            return _no_terms()
        margin = self.distance.margin
        row_lse, has = [], []
        for rows, idx in blocks:

            def block_lse(x, y, rows=rows, idx=idx):
                mat = self._matrix(x[rows], y)
                return _segment_lse(margin(self.neg_margin, mat[idx[2], idx[3]]), idx[2], len(rows))[0]

            row_lse.append(checkpoint(block_lse, embeddings, ref_emb, use_reentrant=False))
            has.append(torch.zeros(len(rows), dtype=torch.bool, device=rows.device).index_fill(0, idx[2], True))
        row_lse, has = torch.cat(row_lse), torch.cat(has)
        terms = []
        for rows, idx in blocks:

            def block_terms(x, y, row_lse, rows=rows, idx=idx):
                d_ap = self._matrix(x[rows], y)[idx[0], idx[1]]
                lse = _logaddexp_of_rows(row_lse, has, rows[idx[0]], idx[1])
                return F.relu(lse + margin(d_ap, self.pos_margin)) ** 2 / 2

            terms.append(checkpoint(block_terms, embeddings, ref_emb, row_lse, use_reentrant=False))
        return self._dense_dict(torch.cat(terms), blocks, embeddings)

    def _terms(self, pos, neg, indices, n_rows):
        a1, p, a2, _ = indices
        margin = self.distance.margin
        row_lse, counts = _segment_lse(margin(self.neg_margin, neg), a2, n_rows)
        # negatives of the anchor's row, and of row p (a row index also with ref_emb, as PML reads it)
        lse = _logaddexp_of_rows(row_lse, counts > 0, a1, p)
        return F.relu(lse + margin(pos, self.pos_margin)) ** 2 / 2


def _logaddexp_of_rows(row_lse, has, a, p):
    """Per pair, the LSE over the union of rows a and p's sets (row p only when it is another row of the batch:
    PML's mask is an "or"); 0 when both are empty. ``row_lse`` holds 0 (not −inf) for empty rows, so no
    gradient is NaN."""
    n_rows = row_lse.shape[0]
    p_row = torch.where((p < n_rows) & (p != a), p, torch.zeros_like(p))
    has_a = has[a]
    has_p = has[p_row] & (p < n_rows) & (p != a)
    la, lp = row_lse[a], row_lse[p_row]
    both = torch.logaddexp(la, lp)
    zero = torch.zeros_like(la)
    return torch.where(has_a & has_p, both, torch.where(has_a, la, torch.where(has_p, lp, zero)))


def _positive_pairs(labels):
    """Every (i, j), i ≠ j, with labels[i] == labels[j], in row-major order (as ``torch.where`` on PML's
    mask), from the sorted labels: O(#pairs) memory, never a B×B mask."""
    b = labels.shape[0]
    order = torch.argsort(labels, stable=True)
    _, counts = torch.unique_consecutive(labels[order], return_counts=True)
    size = counts.repeat_interleave(counts)  # class size of each sorted element
    start = (torch.cumsum(counts, 0) - counts).repeat_interleave(counts)
    anchor = torch.arange(b, device=labels.device).repeat_interleave(size)
    first = torch.cumsum(size, 0) - size
    partner = (
        start.repeat_interleave(size)
        + torch.arange(anchor.numel(), device=labels.device)
        - first.repeat_interleave(size)
    )
    keep = anchor != partner
    a, p = order[anchor[keep]], order[partner[keep]]
    key = torch.argsort(a * b + p)
    return a[key], p[key]


__all__ = [
    "CircleLoss",
    "GeneralizedLiftedStructureLoss",
    "LiftedStructureLoss",
    "MultiSimilarityLoss",
    "NTXentLoss",
    "SupConLoss",
]
