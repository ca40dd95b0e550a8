"""Every public entry point refuses bad input with a message that
names the argument and the expected value (Python layer first, the C++ checks
and the fake kernels with the same wording).

The per-module test files already cover the basic cases of each function; this
file is the audit across all of them (the table below lists every argument
check), plus the eager-vs-torch.compile wording and the direct-op last line.
"""

import inspect
import math

import numpy as np
import pytest
import torch

import metricops
from metricops import nn as mnn
from metricops.pml import distances, losses, miners

X = torch.randn(4, 3)
L = torch.tensor([0, 0, 1, 1])
Y = torch.tensor([1, 0, 1, 0])
W = torch.randn(3, 3)  # class weights / proxies for L's classes
NAN, INF = float("nan"), float("inf")
bh = metricops.batch_hard_triplet_loss
sh = metricops.semihard_triplet_loss
ba = metricops.batch_all_triplet_loss
ts = metricops.triplet_statistics
mt = metricops.mine_triplets
cl = metricops.contrastive_loss
pcl = metricops.pair_contrastive_loss
tml = metricops.triplet_margin_loss
pd = metricops.pairwise_distance

# (id, call, exception, text the message must contain)
BAD = [
    # ---- pairwise_distance
    (
        "pd_bf16_cpu",
        lambda: pd(X.bfloat16()),
        TypeError,
        "x must be float32 or float64 (float16/bfloat16 on CUDA), got torch.bfloat16 on cpu",
    ),
    ("pd_y_1d", lambda: pd(X, torch.randn(3)), ValueError, "y must be a 2-D tensor of shape (B, D), got 1-D"),
    ("pd_y_not_tensor", lambda: pd(X, [[1.0, 2.0, 3.0]]), TypeError, "y must be a torch.Tensor, got list"),
    ("pd_y_half_cpu", lambda: pd(X, X.half()), TypeError, "y must be float32 or float64"),
    (
        "pd_metric_case",
        lambda: pd(X, metric="Euclidean"),
        ValueError,
        "metric must be one of 'euclidean', 'sqeuclidean', 'cosine', got 'Euclidean'",
    ),
    ("pd_normalize_int", lambda: pd(X, normalize=1), TypeError, "normalize must be a bool, got int"),
    # ---- batch_hard_triplet_loss
    (
        "bh_emb_fp16_cpu",
        lambda: bh(X.half(), L),
        TypeError,
        "embeddings must be float32 or float64 (float16/bfloat16 on CUDA), got torch.float16 on cpu",
    ),
    ("bh_emb_3d", lambda: bh(X[None], L), ValueError, "embeddings must be a 2-D tensor of shape (B, D), got 3-D"),
    (
        "bh_emb_meta",
        lambda: bh(X.to("meta"), L),
        ValueError,
        "labels must be on the embeddings' device (meta), got cpu",
    ),
    ("bh_labels_bool", lambda: bh(X, L.bool()), TypeError, "labels must be int32 or int64, got torch.bool"),
    ("bh_labels_int16", lambda: bh(X, L.short()), TypeError, "labels must be int32 or int64, got torch.int16"),
    ("bh_labels_list", lambda: bh(X, [0, 0, 1, 1]), TypeError, "labels must be a torch.Tensor, got list"),
    ("bh_margin_inf", lambda: bh(X, L, margin=INF), ValueError, "margin must be a finite number, got inf"),
    ("bh_margin_neg", lambda: bh(X, L, margin=-0.1), ValueError, "margin must be >= 0.0, got -0.1"),
    ("bh_margin_str", lambda: bh(X, L, margin="0.2"), TypeError, "margin must be a number, got str"),
    ("bh_margin_bool", lambda: bh(X, L, margin=True), TypeError, "margin must be a number, got bool"),
    (
        "bh_margin_tensor_1d",
        lambda: bh(X, L, margin=torch.tensor([0.2])),
        TypeError,
        "margin must be a number, got a Tensor of shape (1,)",
    ),
    (
        "bh_margin_tensor_grad",
        lambda: bh(X, L, margin=torch.tensor(0.2, requires_grad=True)),
        TypeError,
        "margin must be a number, got a Tensor that requires grad",
    ),
    (
        "bh_margin_tensor_bool",
        lambda: bh(X, L, margin=torch.tensor(True)),
        TypeError,
        "margin must be a number, got a Tensor of shape () and dtype torch.bool",
    ),
    # 1/temperature must fit the statistics' dtype (torch.full's own overflow message names no argument)
    (
        "supcon_temperature_inverse_overflows",
        lambda: metricops.supcon_loss(X.float(), L, temperature=1e-300),
        ValueError,
        "temperature must be at least 2.94e-39 for torch.float32 embeddings (1/temperature overflows), got 1e-300",
    ),
    # numpy 2 names its bool scalar type "bool": the message qualifies it, or it would contradict itself
    (
        "bh_margin_np_bool",
        lambda: bh(X, L, margin=np.bool_(True)),
        TypeError,
        "margin must be a number, got numpy.bool",
    ),
    (
        "bh_normalize_np_bool",
        lambda: bh(X, L, normalize=np.bool_(True)),
        TypeError,
        "normalize must be a bool, got numpy.bool",
    ),
    ("bh_margin_complex", lambda: bh(X, L, margin=0.2 + 0j), TypeError, "margin must be a number, got complex"),
    ("bh_soft_str", lambda: bh(X, L, soft="no"), TypeError, "soft must be a bool, got str"),
    ("bh_normalize_none", lambda: bh(X, L, normalize=None), TypeError, "normalize must be a bool, got NoneType"),
    (
        "bh_memory_none",
        lambda: bh(X, L, memory=None),
        ValueError,
        "memory must be one of 'auto', 'matrix', 'streaming', got None",
    ),
    # ---- semihard / batch-all
    ("sh_margin_ninf", lambda: sh(X, L, margin=-INF), ValueError, "margin must be a finite number, got -inf"),
    (
        "sh_reduction_none_obj",
        lambda: sh(X, L, reduction=None),
        ValueError,
        "reduction must be one of 'mean', 'sum', 'mean_nonzero', 'none', got None",
    ),
    ("sh_labels_float", lambda: sh(X, L.double()), TypeError, "labels must be int32 or int64, got torch.float64"),
    (
        "ba_reduction_none",
        lambda: ba(X, L, reduction="none"),
        ValueError,
        "reduction must be one of 'mean', 'sum', 'mean_nonzero', got 'none'",
    ),
    ("ba_margin_nan", lambda: ba(X, L, margin=NAN), ValueError, "margin must not be NaN"),
    (
        "ba_metric_int",
        lambda: ba(X, L, metric=2),
        ValueError,
        "metric must be one of 'euclidean', 'sqeuclidean', 'cosine', got 2",
    ),
    # ---- triplet_statistics / mine_triplets
    ("ts_margin_inf", lambda: ts(X, L, margin=INF), ValueError, "margin must be a finite number, got inf"),
    (
        "ts_labels_meta",
        lambda: ts(X, L.to("meta")),
        ValueError,
        "labels must be on the embeddings' device (cpu), got meta",
    ),
    (
        "mt_strategy_none",
        lambda: mt(X, L, strategy=None),
        ValueError,
        "strategy must be one of 'all', 'violating', 'semihard', 'hard', 'easy', 'batch_hard', got None",
    ),
    ("mt_strategy_missing", lambda: mt(X, L), TypeError, "strategy"),
    ("mt_margin_nan", lambda: mt(X, L, strategy="all", margin=NAN), ValueError, "margin must not be NaN"),
    ("mt_emb_int", lambda: mt(X.long(), L, strategy="all"), TypeError, "embeddings must be float32 or float64"),
    # ---- contrastive_loss
    ("cl_pos_margin_nan", lambda: cl(X, L, pos_margin=NAN), ValueError, "pos_margin must not be NaN"),
    (
        "cl_reduction",
        lambda: cl(X, L, reduction="avg"),
        ValueError,
        "reduction must be one of 'mean', 'sum', 'mean_nonzero', 'none', got 'avg'",
    ),
    (
        "cl_memory",
        lambda: cl(X, L, memory="disk"),
        ValueError,
        "memory must be one of 'auto', 'matrix', 'streaming', got 'disk'",
    ),
    ("cl_normalize", lambda: cl(X, L, normalize="yes"), TypeError, "normalize must be a bool, got str"),
    (
        "cl_labels_len",
        lambda: cl(X, L[:3]),
        ValueError,
        "labels must be a 1-D tensor of length B=4 (one label per embedding), got shape (3,)",
    ),
    ("cl_bf16_cpu", lambda: cl(X.bfloat16(), L), TypeError, "embeddings must be float32 or float64"),
    # ---- pair_contrastive_loss
    ("pcl_margin_inf", lambda: pcl(X, X, Y, margin=INF), ValueError, "margin must be a finite number, got inf"),
    (
        "pcl_y_2d",
        lambda: pcl(X, X, Y[:, None]),
        ValueError,
        "y must be a 1-D tensor of length N=4 (one label per pair), got shape (4, 1)",
    ),
    (
        "pcl_y_complex",
        lambda: pcl(X, X, Y.to(torch.complex64)),
        TypeError,
        "y must be a bool, integer or floating tensor, got torch.complex64",
    ),
    (
        "pcl_y_nan",
        lambda: pcl(X, X, torch.tensor([1.0, NAN, 0.0, 1.0])),
        ValueError,
        "y must hold only 0 (dissimilar) and 1 (similar)",
    ),
    ("pcl_metric", lambda: pcl(X, X, Y, metric="l2"), ValueError, "metric must be one of"),
    ("pcl_squared_none", lambda: pcl(X, X, Y, squared=None), TypeError, "squared must be a bool, got NoneType"),
    ("pcl_x0_1d", lambda: pcl(X[0], X[0], Y[:1]), ValueError, "x0 must be a 2-D tensor of shape (B, D), got 1-D"),
    # ---- triplet_margin_loss
    ("tml_margin_inf", lambda: tml(X, X, X, margin=INF), ValueError, "margin must be a finite number, got inf"),
    ("tml_eps_nan", lambda: tml(X, X, X, eps=NAN), ValueError, "eps must not be NaN"),
    ("tml_eps_inf", lambda: tml(X, X, X, eps=INF), ValueError, "eps must be a finite number, got inf"),
    ("tml_p_inf", lambda: tml(X, X, X, p=INF), ValueError, "p must be a finite number > 0, got inf"),
    ("tml_p_neg", lambda: tml(X, X, X, p=-1.0), ValueError, "p must be a finite number > 0, got -1.0"),
    ("tml_swap_int", lambda: tml(X, X, X, swap=1), TypeError, "swap must be a bool, got int"),
    (
        "tml_mixed_rank",
        lambda: tml(X[0], X, X),
        ValueError,
        "anchor, positive and negative must have the same number of dimensions, got anchor 1-D (3,), positive 2-D (4, 3), negative 2-D (4, 3)",
    ),
    (
        "tml_not_broadcastable",
        lambda: tml(X, X[:3], X),
        ValueError,
        "anchor, positive and negative must broadcast to one shape, got anchor (4, 3), positive (3, 3), negative (4, 3)",
    ),
    ("tml_int", lambda: tml(X.long(), X.long(), X.long()), TypeError, "anchor must be float32 or float64"),
    ("tml_half_cpu", lambda: tml(X.half(), X.half(), X.half()), TypeError, "anchor must be float32 or float64"),
    (
        "tml_dtype_mix",
        lambda: tml(X, X, X.double()),
        TypeError,
        "negative must have the same dtype as anchor (torch.float32), got torch.float64",
    ),
    # ---- knn / retrieval_metrics
    ("knn_k_bool", lambda: metricops.knn(X, k=True), TypeError, "k must be an int, got bool"),
    ("knn_k_float", lambda: metricops.knn(X, k=2.0), TypeError, "k must be an int, got float"),
    ("knn_k_none", lambda: metricops.knn(X, k=None), TypeError, "k must be an int, got NoneType"),
    (
        "knn_k_float_tensor",
        lambda: metricops.knn(X, k=torch.tensor(2.0)),
        TypeError,
        "k must be an int, got a Tensor of shape () and dtype torch.float32",
    ),
    ("knn_k_np_float", lambda: metricops.knn(X, k=np.float64(2.0)), TypeError, "k must be an int, got numpy.float64"),
    (
        "knn_k_self",
        lambda: metricops.knn(X, k=4),
        ValueError,
        "k must be between 1 and the number of database rows a query can return (3, self excluded), got k=4",
    ),
    (
        "knn_k_empty_self_search",
        lambda: metricops.knn(X[:0], k=1),
        ValueError,
        "k must be between 1 and the number of database rows a query can return (0, self excluded), got k=1",
    ),
    (
        "knn_k_empty_self_search_op",
        lambda: torch.ops.metricops.knn(X[:0], None, 1, "euclidean", 0),
        ValueError,
        "k must be between 1 and the number of database rows a query can return (0, self excluded), got k=1",
    ),
    (
        "knn_k_db",
        lambda: metricops.knn(X, X[:2], k=3),
        ValueError,
        "k must be between 1 and the number of database rows a query can return (2), got k=3",
    ),
    (
        "knn_db_meta",
        lambda: metricops.knn(X, X.to("meta"), k=1),
        ValueError,
        "database must be on the same device as queries (cpu), got meta",
    ),
    (
        "knn_db_dtype",
        lambda: metricops.knn(X, X.double(), k=1),
        TypeError,
        "database must have the same dtype as queries (torch.float32), got torch.float64",
    ),
    ("knn_progress", lambda: metricops.knn(X, k=1, progress=1), TypeError, "progress must be a bool, got int"),
    ("knn_metric", lambda: metricops.knn(X, k=1, metric="dot"), ValueError, "metric must be one of"),
    (
        "rm_ks_int",
        lambda: metricops.retrieval_metrics(X, L, ks=5),
        TypeError,
        "ks must be an iterable of ints, got int",
    ),
    (
        "rm_ks_bool",
        lambda: metricops.retrieval_metrics(X, L, ks=(True,)),
        ValueError,
        "ks must hold ints >= 1, got True",
    ),
    ("rm_ks_str", lambda: metricops.retrieval_metrics(X, L, ks="5"), ValueError, "ks must hold ints >= 1, got '5'"),
    (
        "rm_ks_np_zero",
        lambda: metricops.retrieval_metrics(X, L, ks=(np.int64(0),)),
        ValueError,
        "ks must hold ints >= 1, got np.int64(0)",
    ),
    (
        "rm_progress",
        lambda: metricops.retrieval_metrics(X, L, progress="yes"),
        TypeError,
        "progress must be a bool, got str",
    ),
    (
        "rm_labels_meta",
        lambda: metricops.retrieval_metrics(X, L.to("meta")),
        ValueError,
        "query_labels must be on the same device as queries (cpu), got meta",
    ),
    (
        "rm_db_labels_dtype",
        lambda: metricops.retrieval_metrics(X, L, X, L.float()),
        TypeError,
        "database_labels must be int32 or int64, got torch.float32",
    ),
    # ---- nn modules: refused at construction, with the functionals' wording
    ("nn_pd_metric", lambda: mnn.PairwiseDistance(metric="l1"), ValueError, "metric must be one of"),
    ("nn_bh_margin", lambda: mnn.BatchHardTripletLoss(margin=-1.0), ValueError, "margin must be >= 0.0, got -1.0"),
    ("nn_bh_soft", lambda: mnn.BatchHardTripletLoss(soft="yes"), TypeError, "soft must be a bool, got str"),
    ("nn_sh_reduction", lambda: mnn.SemiHardTripletLoss(reduction="avg"), ValueError, "reduction must be one of"),
    (
        "nn_ba_reduction",
        lambda: mnn.BatchAllTripletLoss(reduction="none"),
        ValueError,
        "reduction must be one of 'mean', 'sum', 'mean_nonzero', got 'none'",
    ),
    ("nn_tml_p", lambda: mnn.TripletMarginLoss(p=0), ValueError, "p must be a finite number > 0, got 0.0"),
    ("nn_tml_margin", lambda: mnn.TripletMarginLoss(margin=NAN), ValueError, "margin must not be NaN"),
    ("nn_cl_memory", lambda: mnn.ContrastiveLoss(memory="disk"), ValueError, "memory must be one of"),
    ("nn_pcl_squared", lambda: mnn.PairContrastiveLoss(squared=2), TypeError, "squared must be a bool, got int"),
    (
        "nn_sh_streaming_none",
        lambda: mnn.SemiHardTripletLoss(memory="streaming", reduction="none"),
        ValueError,
        "reduction must be one of 'mean', 'sum', 'mean_nonzero' with memory='streaming'",
    ),
    (
        "nn_cl_streaming_none",
        lambda: mnn.ContrastiveLoss(memory="streaming", reduction="none"),
        ValueError,
        "reduction must be one of 'mean', 'sum', 'mean_nonzero' with memory='streaming'",
    ),
    (
        "nn_bh_margin_np_nan",
        lambda: mnn.BatchHardTripletLoss(margin=np.float32("nan")),
        ValueError,
        "margin must not be NaN",
    ),
    (
        "nn_bh_forward_labels",
        lambda: mnn.BatchHardTripletLoss()(X, L[:2]),
        ValueError,
        "labels must be a 1-D tensor of length B=4",
    ),
    # ---- metricops.pml
    ("pml_tml_margin", lambda: losses.TripletMarginLoss(margin=NAN), ValueError, "margin must not be NaN"),
    ("pml_tml_swap", lambda: losses.TripletMarginLoss(swap="no"), TypeError, "swap must be a bool, got str"),
    ("pml_cl_margin", lambda: losses.ContrastiveLoss(neg_margin=NAN), ValueError, "neg_margin must not be NaN"),
    (
        "pml_miner_margin",
        lambda: miners.TripletMarginMiner(margin=INF),
        ValueError,
        "margin must be a finite number, got inf",
    ),
    (
        "pml_miner_int_embeddings",  # (float16 on CPU is mined on a float32 copy, as PML takes it)
        lambda: miners.BatchHardMiner()(X.to(torch.int32), L),
        TypeError,
        "embeddings must be float32 or float64",
    ),
    ("pml_lp_p", lambda: distances.LpDistance(p=1), NotImplementedError, "supports p=2 only, got p=1"),
    (
        "pml_loss_labels_len",
        lambda: losses.TripletMarginLoss()(X, L[:3]),
        ValueError,
        "labels must be a 1-D tensor of length 4",
    ),
]


@pytest.mark.parametrize("call, exc, text", [pytest.param(c, e, t, id=i) for i, c, e, t in BAD])
def test_bad_input_names_argument_and_expectation(call, exc, text):
    with pytest.raises(exc) as info:
        call()
    assert text in str(info.value), str(info.value)


def test_negative_margin_allowed_where_meaningful():
    # Mining / statistics thresholds and the explicit losses accept a negative
    # margin (torch.nn.functional.triplet_margin_loss does too); only the
    # labelled-batch losses, where it would make the hinge meaningless, refuse it.
    assert int(ts(X, L, margin=-0.5)["total"]) == 8
    mt(X, L, strategy="violating", margin=-0.5)
    tml(X, X.flip(0), X, margin=-0.5)
    pcl(X, X, Y, margin=-0.5)
    # An infinite contrastive margin switches a group of pairs off (pml relies on it).
    assert torch.isfinite(cl(X, L, pos_margin=INF))


# --------------------------------------------------------------------------- numbers: numpy scalars and 0-dim tensors

# (id, call taking the number under test, a Python value of it): every numeric argument
# of the public API. Each must accept numbers.Real / numbers.Integral (numpy scalars
# included) and 0-dim tensors without grad, as torch's own float/int arguments do.
REALS = [
    ("bh_margin", lambda m: bh(X, L, margin=m), 0.25),
    ("sh_margin", lambda m: sh(X, L, margin=m), 0.25),
    ("ba_margin", lambda m: ba(X, L, margin=m), 0.25),
    ("ts_margin", lambda m: ts(X, L, margin=m)["easy"], 0.25),
    ("mt_margin", lambda m: mt(X, L, strategy="violating", margin=m)[0], 0.25),
    ("cl_pos_margin", lambda m: cl(X, L, pos_margin=m), 0.25),
    ("cl_neg_margin", lambda m: cl(X, L, neg_margin=m), 0.25),
    ("pcl_margin", lambda m: pcl(X, X.flip(0), Y, margin=m), 0.25),
    ("tml_margin", lambda m: tml(X, X.flip(0), X, margin=m), 0.25),
    ("tml_p", lambda m: tml(X, X.flip(0), X, p=m), 3.0),
    ("tml_eps", lambda m: tml(X, X.flip(0), X, eps=m), 0.25),
    ("nn_bh_margin", lambda m: mnn.BatchHardTripletLoss(margin=m)(X, L), 0.25),
    ("nn_tml_p", lambda m: mnn.TripletMarginLoss(p=m)(X, X.flip(0), X), 3.0),
    ("pml_tml_margin", lambda m: losses.TripletMarginLoss(margin=m)(X, L), 0.25),
    ("pml_cl_margin", lambda m: losses.ContrastiveLoss(neg_margin=m)(X, L), 0.25),
    ("pml_miner_margin", lambda m: miners.TripletMarginMiner(margin=m)(X, L)[0], 0.25),
    # the similarity losses (metricops/similarity.py) and their modules / drop-ins
    ("supcon_temperature", lambda t: metricops.supcon_loss(X, L, temperature=t), 0.25),
    ("ntxent_temperature", lambda t: metricops.ntxent_loss(X, L, temperature=t), 0.25),
    ("ms_alpha", lambda a: metricops.multi_similarity_loss(X, L, alpha=a), 2.0),
    ("ms_beta", lambda b: metricops.multi_similarity_loss(X, L, beta=b), 50.0),
    ("ms_base", lambda b: metricops.multi_similarity_loss(X, L, base=b), 0.5),
    ("ms_mining_epsilon", lambda e: metricops.multi_similarity_loss(X, L, mining_epsilon=e), 0.125),
    ("circle_m", lambda m: metricops.circle_loss(X, L, m=m), 0.375),
    ("circle_gamma", lambda g: metricops.circle_loss(X, L, gamma=g), 80.0),
    ("gls_pos_margin", lambda m: metricops.generalized_lifted_structure_loss(X, L, pos_margin=m), 0.25),
    ("gls_neg_margin", lambda m: metricops.generalized_lifted_structure_loss(X, L, neg_margin=m), 1.0),
    ("ls_neg_margin", lambda m: metricops.lifted_structure_loss(X, L, neg_margin=m), 1.0),
    ("info_nce_temperature", lambda t: metricops.info_nce_loss(X, X.flip(0), temperature=t), 0.25),
    ("nn_info_nce_temperature", lambda t: mnn.InfoNCELoss(temperature=t)(X, X.flip(0)), 0.25),
    ("pml_supcon_temperature", lambda t: losses.SupConLoss(temperature=t)(X, L), 0.25),
    ("pml_ms_alpha", lambda a: losses.MultiSimilarityLoss(alpha=a)(X, L), 2.0),
    ("pml_circle_gamma", lambda g: losses.CircleLoss(gamma=g)(X, L), 80.0),
    ("pml_ms_miner_epsilon", lambda e: miners.MultiSimilarityMiner(epsilon=e)(X, L)[0], 0.125),
    # the class-parameter losses (metricops/class_losses.py)
    ("arcface_margin", lambda m: metricops.arcface_loss(X, L, W, margin=m), 0.5),
    ("arcface_scale", lambda s: metricops.arcface_loss(X, L, W, scale=s), 64.0),
    ("cosface_margin", lambda m: metricops.cosface_loss(X, L, W, margin=m), 0.375),
    ("proxy_anchor_margin", lambda m: metricops.proxy_anchor_loss(X, L, W, margin=m), 0.125),
    ("proxy_anchor_alpha", lambda a: metricops.proxy_anchor_loss(X, L, W, alpha=a), 32.0),
]
_TENSOR_TEMPERATURE_CALLS = tuple(c for i, c, _ in REALS if "info_nce_temperature" in i)
INTEGERS = [
    ("knn_k", lambda k: metricops.knn(X, k=k)[1], 2),
    ("rm_ks", lambda k: metricops.retrieval_metrics(X, L, ks=(k,)), 2),
    ("precision_at_k", lambda k: metricops.retrieval.precision_at_k(L[None] > 0, None, k), 2),
]


@pytest.mark.parametrize("call, value", [pytest.param(c, v, id=i) for i, c, v in REALS])
def test_real_arguments_accept_numpy_scalars_and_0dim_tensors(call, value):
    expected = call(value)
    for same in (np.float32(value), np.float64(value), torch.tensor(value), torch.tensor(value, dtype=torch.float64)):
        got = call(same)
        if call in _TENSOR_TEMPERATURE_CALLS and isinstance(same, torch.Tensor):
            # info_nce_loss takes a floating tensor as a (possibly learnable) temperature: its loss comes from
            # the statistics in torch ops, a float's from the op's head, so the last bits may differ (they did
            # under some thread states of the full suite)
            torch.testing.assert_close(got, expected, rtol=1e-6, atol=0)
            continue
        assert got == expected if isinstance(got, dict) else torch.equal(got, expected), type(same)
    if value == int(value):  # an integer is a real number too
        assert torch.equal(call(np.int64(value)), expected) and torch.equal(call(torch.tensor(int(value))), expected)


@pytest.mark.parametrize("call, value", [pytest.param(c, v, id=i) for i, c, v in INTEGERS])
def test_integer_arguments_accept_numpy_integers_and_0dim_tensors(call, value):
    expected = call(value)
    for same in (
        np.int64(value),
        np.int32(value),
        np.uint8(value),
        torch.tensor(value),
        torch.tensor(value, dtype=torch.int32),
    ):
        got = call(same)
        assert got == expected if isinstance(got, dict) else torch.equal(got, expected), type(same)
    assert list(metricops.retrieval_metrics(X, L, ks=(np.int64(value),)))[0] == f"recall@{value}"  # keys use the int


# --------------------------------------------------------------------------- direct torch.ops calls: the C++ last line

E = torch.randn(4, 3)
IDX = torch.tensor([1, 0, 3, 2])


@pytest.mark.parametrize(
    "call, text",
    [
        pytest.param(
            lambda: torch.ops.metricops.pairwise_distance(X.bfloat16(), None, "euclidean"),
            "x must be float32 or float64 (float16/bfloat16 on CUDA)",
            id="pd_bf16",
        ),
        pytest.param(
            lambda: torch.ops.metricops.pairwise_distance(X, X.double(), "euclidean"),
            "y must have the same dtype as x",
            id="pd_dtype",
        ),
        pytest.param(
            lambda: torch.ops.metricops.batch_hard_triplet(X, L.short(), 0.2, "euclidean", False, 0),
            "labels must be int32 or int64",
            id="bh_labels_int16",
        ),
        pytest.param(
            lambda: torch.ops.metricops.mine_triplets(X, L, "hardest", 0.2, "euclidean"),
            "strategy must be one of",
            id="mt_strategy",
        ),
        pytest.param(
            lambda: torch.ops.metricops.triplet_statistics(X, L, NAN, "euclidean"),
            "margin must be a finite number",
            id="ts_margin_nan",
        ),
        pytest.param(
            lambda: torch.ops.metricops.batch_all_triplet(X, L, INF, "euclidean"),
            "margin must be a finite number",
            id="ba_margin_inf",
        ),
        pytest.param(
            lambda: torch.ops.metricops.contrastive_loss(X, L, NAN, 1.0, "euclidean", False, "mean"),
            "pos_margin must not be NaN",
            id="cl_nan",
        ),
        pytest.param(
            lambda: torch.ops.metricops.triplet_margin_loss(X, X, X, 1.0, INF, 1e-6, False, False),
            "p must be a finite number > 0",
            id="tml_p_inf",
        ),
        pytest.param(
            lambda: torch.ops.metricops.knn(X, X.double(), 1, "euclidean", 0),
            "database must have the same dtype as queries",
            id="knn_dtype",
        ),
        # Foreign indices into the batch-hard backward used to be read unchecked (aux[p]).
        pytest.param(
            lambda: torch.ops.metricops.batch_hard_triplet_backward(
                torch.ones(4),
                torch.zeros(4),
                torch.zeros(4),
                E,
                torch.tensor([1, 0, 3, 40]),
                IDX,
                torch.ones(4),
                torch.ones(4),
                0.2,
                "euclidean",
                False,
            ),
            "positive must hold indices in [-1, 4)",
            id="bh_backward_index_high",
        ),
        pytest.param(
            lambda: torch.ops.metricops.batch_hard_triplet_backward(
                torch.ones(4),
                torch.zeros(4),
                torch.zeros(4),
                E,
                IDX,
                torch.tensor([1, 0, 3, 4]),
                torch.ones(4),
                torch.ones(4),
                0.2,
                "cosine",
                False,
            ),
            "negative must hold indices in [-1, 4)",
            id="bh_backward_index_B_cosine",
        ),
        pytest.param(
            lambda: torch.ops.metricops.batch_hard_triplet_backward(
                torch.ones(4),
                torch.zeros(4),
                torch.zeros(4),
                E,
                IDX,
                torch.tensor([1, -7, 3, 2]),
                torch.ones(4),
                torch.ones(4),
                0.2,
                "euclidean",
                False,
            ),
            "negative must hold indices in [-1, 4)",
            id="bh_backward_index_low",
        ),
    ],
)
def test_direct_op_refuses(call, text):
    with pytest.raises((RuntimeError, ValueError, TypeError)) as info:
        call()
    assert text in str(info.value), str(info.value)


def test_batch_hard_backward_accepts_minus_one():
    # -1 (anchor without a triplet) stays valid and gives zero gradient for that anchor.
    g = torch.ops.metricops.batch_hard_triplet_backward(
        torch.ones(4),
        torch.zeros(4),
        torch.zeros(4),
        E,
        torch.tensor([-1, 0, 3, 2]),
        torch.tensor([-1, 2, 0, 1]),
        torch.ones(4),
        torch.ones(4),
        0.2,
        "euclidean",
        False,
    )
    assert torch.isfinite(g).all()


# --------------------------------------------------------------------------- eager and torch.compile say the same thing


def _message(fn, *args):
    with pytest.raises(Exception) as info:
        fn(*args)
    return str(info.value)


@pytest.mark.parametrize(
    "fn, args, text",
    [
        pytest.param(
            lambda x: metricops.pairwise_distance(x),
            (torch.randn(2, 3, 4),),
            "x must be a 2-D tensor of shape (B, D), got 3-D tensor of shape (2, 3, 4)",
            id="pd_public",
        ),
        pytest.param(
            lambda x, y: torch.ops.metricops.pairwise_distance(x, y, "euclidean"),
            (torch.randn(3, 4), torch.randn(3, 5)),
            "y must have the same embedding size D as x (4), got shape",
            id="pd_op_dim",
        ),
        pytest.param(
            lambda x: torch.ops.metricops.pairwise_distance(x, None, "euclidean"),
            (torch.randn(2, 3, 4),),
            "x must be a 2-D tensor of shape (B, D), got 3-D tensor of shape",
            id="pd_op_rank",
        ),
        pytest.param(
            lambda x, lab: metricops.batch_hard_triplet_loss(x, lab),
            (torch.randn(4, 3), torch.zeros(5, dtype=torch.int64)),
            "labels must be a 1-D tensor of length B=4 (one label per embedding), got shape (5,)",
            id="bh_public",
        ),
        pytest.param(
            lambda x, lab: torch.ops.metricops.batch_hard_triplet(x, lab, 0.2, "euclidean", False, 0),
            (torch.randn(4, 3), torch.zeros(5, dtype=torch.int64)),
            "labels must be a 1-D tensor of length B=4 (one label per embedding), got shape",
            id="bh_op_labels",
        ),
        pytest.param(
            lambda x, lab: torch.ops.metricops.batch_hard_triplet(x, lab, 0.2, "euclidean", False, 0),
            (torch.randn(4, 3, 1), torch.zeros(4, dtype=torch.int64)),
            "embeddings must be a 2-D tensor of shape (B, D), got 3-D tensor of shape",
            id="bh_op_rank",
        ),
        pytest.param(
            lambda x, lab: torch.ops.metricops.contrastive_loss(x, lab, 0.0, 1.0, "euclidean", False, "mean"),
            (torch.randn(4, 3), torch.zeros(4)),
            "labels must be int32 or int64, got",
            id="cl_op_dtype",
        ),
        pytest.param(
            lambda q: torch.ops.metricops.knn(q, None, 4, "euclidean", 0),
            (torch.randn(4, 3),),
            "k must be between 1 and the number of database rows a query can return (3, self excluded), got k=4",
            id="knn_op_k",
        ),
    ],
)
def test_compile_error_matches_eager(fn, args, text):
    torch._dynamo.reset()
    eager = _message(fn, *args)
    assert text in eager, eager
    compiled = _message(torch.compile(fn, fullgraph=True, dynamic=False), *args)
    assert text in compiled, compiled


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_fake_kernel_refuses_low_precision_on_cpu(dtype):
    # The fake kernel (used for meta tensors and under torch.compile) repeats the dtype rule, and raises
    # TypeError as the CPU kernel does.
    x = torch.randn(3, 4, dtype=dtype, device="meta")
    with pytest.raises(TypeError, match=r"x must be float32 or float64 \(float16/bfloat16 on CUDA\)"):
        torch.ops.metricops.pairwise_distance(x, None, "euclidean")


@pytest.mark.needs_cuda
def test_tensors_on_different_gpus_refused():  # pragma: no cover - needs 2 GPUs
    if torch.cuda.device_count() < 2:
        pytest.skip("needs two GPUs")
    a, b = torch.randn(3, 4, device="cuda:0"), torch.randn(3, 4, device="cuda:1")
    with pytest.raises(ValueError, match=r"y must be on the same device as x \(cuda:0\), got cuda:1"):
        metricops.pairwise_distance(a, b)
    with pytest.raises((RuntimeError, ValueError), match="y must be on the same device as x"):
        torch.ops.metricops.pairwise_distance(a, b, "euclidean")
    with pytest.raises(ValueError, match="labels must be on the embeddings' device"):
        metricops.batch_hard_triplet_loss(a, torch.zeros(3, dtype=torch.int64, device="cuda:1"))


# --------------------------------------------------------------------------- nn modules: construction vs forward


def _module_classes():
    return [
        c
        for name, c in vars(mnn).items()
        if inspect.isclass(c)
        and issubclass(c, torch.nn.Module)
        and c.__module__ == "metricops.nn"
        and not name.startswith("_")
    ]


def _module_inputs(cls):
    g = torch.Generator().manual_seed(0)
    emb = torch.randn(8, 4, generator=g)
    if cls is mnn.PairwiseDistance:
        return (emb,)
    if cls is mnn.TripletMarginLoss:
        return (emb, emb.flip(0), emb.roll(1, 0))
    if cls is mnn.PairContrastiveLoss:
        return (emb, emb.flip(0), torch.arange(8) % 2)
    if cls is mnn.InfoNCELoss:
        return (emb, emb.flip(0))
    return (emb, torch.arange(8) // 2)


_ODD_VALUES = [INF, -INF, NAN, 0.0, -1.0, 1e9, 3, True, np.bool_(True), np.float32(0.3), None, "x", "mean_nonzero"]
_ODD_VALUES += ["none", "matrix", "streaming", "cosine"]


@pytest.mark.parametrize("cls", _module_classes(), ids=lambda c: c.__name__)
def test_module_constructors_refuse_what_forward_refuses(cls):
    """Each metricops.nn module, one constructor argument at a time set to an odd value: a value the
    constructor accepts must work in forward (nn.py refuses bad arguments at construction, with the
    functionals' wording), so no module is built that can never run."""
    signature = inspect.signature(cls.__init__)
    required = {"num_classes": 4, "embedding_size": 4} if "num_classes" in signature.parameters else {}
    optional = [p.name for p in signature.parameters.values() if p.default is not inspect.Parameter.empty]
    assert optional, cls
    for name in optional:
        for value in _ODD_VALUES:
            try:
                module = cls(**required, **{name: value})
            except (ValueError, TypeError):
                continue
            with torch.no_grad():
                module(*_module_inputs(cls))  # must not raise


# Every op's scalar arguments (metric, strategy, reduction, margins, eps, p, chunk_size, scale, alpha): the fake
# kernels checked tensors only, so a direct op call under torch.compile traced and failed only when run.
_SX, _SLAB, nan = torch.randn(6, 4), torch.arange(6) // 2, math.nan
ops = torch.ops.metricops
_SCALAR_ARGUMENT_CALLS = {
    "pd_metric": lambda: ops.pairwise_distance(_SX, None, "bogus"),
    "l2_eps": lambda: ops.l2_normalize(_SX, -1.0),
    "knn_metric": lambda: ops.knn(_SX, None, 2, "bogus", 0),
    "knn_chunk": lambda: ops.knn(_SX, None, 2, "euclidean", -1),
    "bh_nan": lambda: ops.batch_hard_triplet(_SX, _SLAB, nan, "euclidean", False, 0),
    "bh_metric": lambda: ops.batch_hard_triplet(_SX, _SLAB, 0.2, "bogus", False, 0),
    "sh_nan": lambda: ops.semihard_triplet(_SX, _SLAB, nan, "euclidean"),
    "ba_metric": lambda: ops.batch_all_triplet(_SX, _SLAB, 0.2, "bogus"),
    "ba_inf": lambda: ops.batch_all_triplet(_SX, _SLAB, math.inf, "euclidean"),
    "bas_nan": lambda: ops.batch_all_triplet_streaming(_SX, _SLAB, nan, "euclidean", 2),
    "shs_metric": lambda: ops.semihard_triplet_streaming(_SX, _SLAB, 0.2, "bogus", 2),
    "stats_nan": lambda: ops.triplet_statistics(_SX, _SLAB, nan, "euclidean"),
    "mine_strategy": lambda: ops.mine_triplets(_SX, _SLAB, "bogus", 0.2, "euclidean"),
    "mine_metric": lambda: ops.mine_triplets(_SX, _SLAB, "all", 0.2, "bogus"),
    "cl_nan": lambda: ops.contrastive_loss(_SX, _SLAB, nan, 1.0, "euclidean", False, "mean"),
    "cl_metric": lambda: ops.contrastive_loss(_SX, _SLAB, 0.0, 1.0, "bogus", False, "mean"),
    "cl_red": lambda: ops.contrastive_loss(_SX, _SLAB, 0.0, 1.0, "euclidean", False, "avg"),
    "cls_red": lambda: ops.contrastive_loss_streaming(_SX, _SLAB, 0.0, 1.0, "euclidean", False, "none", 2),
    "cls_metric": lambda: ops.contrastive_loss_streaming(_SX, _SLAB, 0.0, 1.0, "bogus", False, "mean", 2),
    "pcl_nan": lambda: ops.pair_contrastive_loss(_SX, _SX.flip(0), _SLAB > 0, nan, "euclidean", False),
    "pcl_metric": lambda: ops.pair_contrastive_loss(_SX, _SX.flip(0), _SLAB > 0, 1.0, "bogus", False),
    "tml_nan": lambda: ops.triplet_margin_loss(_SX, _SX, _SX, nan, 2.0, 1e-6, False, False),
    "tml_p": lambda: ops.triplet_margin_loss(_SX, _SX, _SX, 1.0, 0.0, 1e-6, False, False),
    "tml_sq": lambda: ops.triplet_margin_loss(_SX, _SX, _SX, 1.0, 1.0, 1e-6, False, True),
    "ms_scale": lambda: ops.margin_softmax_loss(_SX, _SLAB % 3, torch.randn(3, 4), "arcface", 0.5, math.inf),
    "pa_alpha": lambda: ops.proxy_anchor_loss(_SX, _SLAB % 3, torch.randn(3, 4), 0.1, nan),
}


@pytest.mark.parametrize("name", sorted(_SCALAR_ARGUMENT_CALLS))
def test_fake_kernels_check_scalar_arguments_as_the_kernels(name):
    """The same exception and message from the kernel and from the fake kernel (FakeTensorMode)."""
    from torch._subclasses.fake_tensor import FakeTensorMode

    call = _SCALAR_ARGUMENT_CALLS[name]
    with pytest.raises(ValueError) as eager:
        call()
    with FakeTensorMode(allow_non_fake_inputs=True), pytest.raises(ValueError) as fake:
        call()
    assert str(fake.value).splitlines()[0] == str(eager.value).splitlines()[0]
