// metricops' operator library: every schema lives here, in one TORCH_LIBRARY
// block. Kernels register themselves from cpu/ and cuda/ (one file per op
// family); fake kernels and autograd are registered from Python
// (metricops/_registrations/).
#include <Python.h>
#include <torch/library.h>

#include <string>

// `import metricops._C` only needs to run the static registrations below, so
// the module has no pybind11 bindings (and builds against the limited API).
extern "C" {
PyObject* PyInit__C(void) {
  static struct PyModuleDef module_def = {
      PyModuleDef_HEAD_INIT, "_C", "metricops native operators (registered under torch.ops.metricops)", -1, nullptr,
  };
  return PyModule_Create(&module_def);
}
}

namespace metricops {

std::string build_info() {
  std::string info = "cpu";
#ifdef METRICOPS_WITH_CUDA
  info += "|cuda";
#ifdef METRICOPS_CUDA_ARCHS
  info += std::string("|archs=") + METRICOPS_CUDA_ARCHS;
#endif
#endif
#ifdef __SANITIZE_ADDRESS__
  info += "|asan";
#endif
  return info;
}

// Two rules that hold across the schemas below:
//  * block_rows (the memory= rule): the number of rows of the B×B distance
//    matrix an op holds at once. Python chooses it, in one place
//    (metricops/_memory.py); the ops take it as given, > 0 meaning at most
//    that many rows. What <= 0 means is per op (common/row_blocks.h): one
//    block of all B rows for the triplet ops, a bounded device default for
//    contrastive_loss_streaming. Only direct torch.ops calls pass <= 0 to the
//    streaming ops.
//  * normalize (distances of F.normalize(x), eps 1e-12): batch_hard_triplet,
//    lse_stats and their backwards take it. batch_hard's CPU kernels fuse it
//    (no normalised copy; F.normalize's backward applied row by row in the
//    assembly), its CUDA kernels compose l2_normalize / l2_normalize_backward
//    around themselves in C++; lse_stats folds it into its GEMM tiles on both
//    (its schema says how). Every other op's normalize=True is composed in
//    Python (l2_normalize before the op, autograd through it).
TORCH_LIBRARY(metricops, m) {
  // "cpu|cuda|archs=8.0;9.0": which backends this binary was compiled with.
  m.def("_build_info() -> str", &build_info);

  // Distances. y=None means y=x (then the euclidean diagonal is exactly 0).
  m.def("pairwise_distance(Tensor x, Tensor? y, str metric) -> Tensor");
  // grad_y is an empty (0, D) tensor when y is None.
  m.def(
      "pairwise_distance_backward(Tensor grad, Tensor x, Tensor? y, Tensor dist, str metric) "
      "-> (Tensor grad_x, Tensor grad_y)");

  // Row-wise L2 normalisation, F.normalize(x, p=2, dim=1, eps) semantics:
  // y = x / max(||x||, eps). norm (B,) is what the backward needs (in the
  // accumulation dtype: float32 for float16/bfloat16).
  m.def("l2_normalize(Tensor x, float eps) -> (Tensor y, Tensor norm)");
  m.def("l2_normalize_backward(Tensor grad, Tensor x, Tensor norm, float eps) -> Tensor");

  // Triplet mining and losses on a labelled batch (see metricops/triplet.py).
  // batch-hard: per anchor its loss, farthest positive, nearest negative
  // (-1 when the anchor has no triplet) and their distances. block_rows > 0
  // bounds the rows of distances held at once; <= 0: no bound (CUDA computes
  // the whole matrix; the CPU's triangular sweep always works in blocks of
  // at most 128 rows). normalize: the distances are those of
  // F.normalize(embeddings) (eps 1e-12), and the backward returns the
  // gradient w.r.t. the raw embeddings.
  m.def(
      "batch_hard_triplet(Tensor embeddings, Tensor labels, float margin, str metric, bool soft, int block_rows, "
      "bool normalize=False) -> (Tensor losses, Tensor positive, Tensor negative, Tensor dist_ap, Tensor dist_an)");
  m.def(
      "batch_hard_triplet_backward(Tensor grad_losses, Tensor grad_dist_ap, Tensor grad_dist_an, Tensor embeddings, "
      "Tensor positive, Tensor negative, Tensor dist_ap, Tensor dist_an, float margin, str metric, bool soft, "
      "bool normalize=False) -> Tensor");
  // semi-hard: (B, B) terms and chosen negatives (-1 off valid pairs), and the
  // distance matrix; the backward is pairwise_distance_backward.
  m.def(
      "semihard_triplet(Tensor embeddings, Tensor labels, float margin, str metric) "
      "-> (Tensor losses, Tensor negative, Tensor dist)");
  // d(loss)/d(embeddings) of semihard_triplet: +g at (a, p), -g at
  // (a, n*) for every active term, then pairwise_distance_backward.
  m.def(
      "semihard_triplet_backward(Tensor grad_losses, Tensor? grad_dist, Tensor embeddings, Tensor losses, "
      "Tensor negative, Tensor dist, str metric) -> Tensor");
  // batch-all: sum of terms, numbers of valid and of active (> 0) triplets,
  // the distance matrix, and each pair's signed multiplicity in active
  // triplets (the loss sum's gradient w.r.t. the distances).
  m.def(
      "batch_all_triplet(Tensor embeddings, Tensor labels, float margin, str metric) "
      "-> (Tensor loss_sum, Tensor num_valid, Tensor num_active, Tensor dist, Tensor multiplicity)");
  // Streaming semi-hard and batch-all (scalar reductions): the B×B matrix is
  // never held. Semi-hard gives per-anchor term sums, numbers of valid
  // (anchor, positive) pairs and of terms > 0; batch-all the same totals as
  // batch_all_triplet. Backwards recompute and re-mine the distances in row
  // blocks; block_rows <= 0 means one block of all B rows. The sums (loss_sum, row_sum,
  // and batch_all_triplet's loss_sum) are float32 for float16/bfloat16
  // embeddings: a batch's terms add up past float16's range.
  m.def(
      "semihard_triplet_streaming(Tensor embeddings, Tensor labels, float margin, str metric, int block_rows) "
      "-> (Tensor row_sum, Tensor row_valid, Tensor row_active)");
  m.def(
      "semihard_triplet_streaming_backward(Tensor grad_row_sum, Tensor embeddings, Tensor labels, float margin, "
      "str metric, int block_rows) -> Tensor");
  m.def(
      "batch_all_triplet_streaming(Tensor embeddings, Tensor labels, float margin, str metric, int block_rows) "
      "-> (Tensor loss_sum, Tensor num_valid, Tensor num_active)");
  m.def(
      "batch_all_triplet_streaming_backward(Tensor grad_sum, Tensor embeddings, Tensor labels, float margin, "
      "str metric, int block_rows) -> Tensor");
  // int64 (4,): total, easy, semihard, hard valid triplets.
  m.def("triplet_statistics(Tensor embeddings, Tensor labels, float margin, str metric) -> Tensor");
  // (anchor, positive, negative) int64, sorted lexicographically.
  m.def(
      "mine_triplets(Tensor embeddings, Tensor labels, str strategy, float margin, str metric) "
      "-> (Tensor anchor, Tensor positive, Tensor negative)");
  // Contrastive loss on a labelled batch (ordered pairs i != j). For the scalar
  // reductions `mat` is the unit-upstream GEMM weight W of the backward (in
  // the accumulation dtype: float32 for float16/bfloat16) and row_coef its
  // row coefficients; for "none" `mat` is the distance matrix and
  // row_coef is empty. denom: what the summed terms were divided by (0: none).
  m.def(
      "contrastive_loss(Tensor embeddings, Tensor labels, float pos_margin, float neg_margin, str metric, "
      "bool squared, str reduction) -> (Tensor loss, Tensor mat, Tensor row_coef, Tensor denom)");
  m.def(
      "contrastive_loss_backward(Tensor grad, Tensor embeddings, Tensor labels, Tensor mat, Tensor row_coef, "
      "Tensor denom, float pos_margin, float neg_margin, str metric, bool squared, str reduction) -> Tensor");
  // Streaming contrastive loss (reductions mean/sum/mean_nonzero): holds one
  // row block of the B×B matrix at a time; the backward recomputes distances
  // block by block. block_rows <= 0 picks the block per device (CPU 256 rows,
  // CUDA at most 256 MiB of distances), never all B rows. denom: what the
  // summed terms were divided by (0: no term, loss 0).
  m.def(
      "contrastive_loss_streaming(Tensor embeddings, Tensor labels, float pos_margin, float neg_margin, str metric, "
      "bool squared, str reduction, int block_rows) -> (Tensor loss, Tensor denom)");
  m.def(
      "contrastive_loss_streaming_backward(Tensor grad, Tensor embeddings, Tensor labels, Tensor denom, "
      "float pos_margin, float neg_margin, str metric, bool squared, int block_rows) -> Tensor");
  // Explicit pairs; y is bool (N,). Per-pair losses; the reduction is the caller's.
  m.def(
      "pair_contrastive_loss(Tensor x0, Tensor x1, Tensor y, float margin, str metric, bool squared) "
      "-> (Tensor loss, Tensor dist)");
  m.def(
      "pair_contrastive_loss_backward(Tensor grad, Tensor x0, Tensor x1, Tensor y, Tensor dist, float margin, "
      "str metric, bool squared) -> (Tensor grad_x0, Tensor grad_x1)");
  // Explicit triplets, torch.nn.functional.triplet_margin_loss semantics.
  // Per-row losses and dists (N, 3): d(a,p), d(a,n), d(p,n) (0 without swap).
  m.def(
      "triplet_margin_loss(Tensor anchor, Tensor positive, Tensor negative, float margin, float p, float eps, "
      "bool swap, bool squared) -> (Tensor loss, Tensor dists)");
  m.def(
      "triplet_margin_loss_backward(Tensor grad, Tensor anchor, Tensor positive, Tensor negative, Tensor dists, "
      "float margin, float p, float eps, bool swap, bool squared) -> (Tensor grad_anchor, Tensor grad_positive, "
      "Tensor grad_negative)");
  // Retrieval. database=None searches the queries against themselves, each
  // query leaving itself out. Sorted by (distance, index), NaN last; not
  // differentiable. chunk_size > 0 overrides the block sizes (tests use it to
  // cross chunk boundaries); 0 picks them per device.
  m.def(
      "knn(Tensor queries, Tensor? database, int k, str metric, int chunk_size=0) "
      "-> (Tensor distances, Tensor indices)");
  // pytorch-metric-learning's TripletMarginMiner feeding TripletMarginLoss,
  // without listing the triplets: on a (B, B) distance matrix, the triplets
  // (a, p, n) whose m = d(a,n) - d(a,p) lies in the interval lower < m (when
  // has_lower), m <= upper (upper_inclusive) or m < upper. weight (B, B):
  // +#selected triplets using (a, p) at positives, -#using (a, n) at
  // negatives (so the loss sum is M*count + sum(weight * dist)); float32 for
  // float16/bfloat16 dist. row_count (B,) int64: selected triplets per anchor.
  // Not differentiable (counts).
  m.def(
      "triplet_interval_weights(Tensor dist, Tensor labels, float lower, bool has_lower, float upper, "
      "bool upper_inclusive) -> (Tensor weight, Tensor row_count)");
  // ---- The streaming log-sum-exp engine (metricops/similarity.py, csrc/common/lse_stats.h).
  // Rows x (B, D), columns y (M, D) (y=None: the columns are x's rows, the self pair (i, i) is ignored,
  // col_keys must be None). S = x yᵀ; entry (i, j) is positive when row_keys[i] == col_keys[j], else
  // negative. `policy` names φ_pos/φ_neg and the per-entry sums ("scaled": φ = lin = scale·(s - 1), the logits
  // scale·s shifted to keep precision near s = 1 (csrc/common/lse_stats.h ScaledPolicy);
  // "scaled_learnable": the same, with the dLSE/dscale columns, which the others leave 0;
  // "multi_similarity" args (alpha, beta, base): φ_pos = -alpha(s - base), φ_neg = beta(s - base);
  // "multi_similarity_mined" args (alpha, beta, base, epsilon), row_params (B, 2) = (min positive s,
  // max negative s): only the pairs PML's MultiSimilarityMiner keeps count; "similarity_range": only
  // the counts and those two thresholds (no exp; the miner's first pass); "circle" args (m, gamma);
  // "lifted" args (pos_margin, neg_margin) on d = sqrt(2 - 2s): φ_pos = d - pos_margin,
  // φ_neg = neg_margin - d (normalize=False: for unit rows; normalize=True: d = ||x̂_i - x̂_j|| for every row: the
  // entries are e = s_ij + o_i + o_j = -d²/2 with o = -||x̂||²/2, -1/2 except for rows of norm < eps, which
  // F.normalize leaves shorter than 1 (their o is held constant in the backward), and on the CPU the entries near
  // d = 0 are recomputed from the rows); "ntxent_pairs" row_params (B, 1) = m_i: each positive gives
  // lin = softplus(m_i - z), aux = sigmoid(m_i - z), z = scale·(s - 1) as "scaled"). scale: a 0-dim tensor.
  // row_stats (B, 13), in float64 for float64 inputs and float32 otherwise, columns: LSE_pos, LSE_neg
  // (-inf when empty), lin_pos, lin_neg, count_pos, count_neg, min positive s, max negative s (these
  // two from "similarity_range" only, +inf / -inf from the other policies),
  // dLSE_pos/dscale, dLSE_neg/dscale, aux_pos, aux_neg, term. col_stats: the same per column of y when
  // col_stats (y required), else (0, 13). `head` (csrc/common/lse_heads.h) names a loss whose per-anchor
  // term the op computes from these statistics into column 12 ("supcon", "info_nce" on "scaled";
  // "multi_similarity", "multi_similarity_mined", "circle", "generalized_lifted" on the policy of that
  // name and "lifted"; "none": 0). Gradients flow through columns 0-3 and 12 only (the backward, which
  // applies the head's derivatives); the others are piecewise constant or are used by the caller's own
  // formulas. block_rows/block_cols
  // <= 0 pick the device's tiles; > 0 force them (tests cross tile boundaries with them). normalize:
  // S is the cosine similarity of F.normalize(x) and F.normalize(y) (eps 1e-12), gradients to the raw
  // x and y: each GEMM tile of x yᵀ is scaled by the rows' inverse norms, so no normalized copy is
  // made. save_tiles=False: never holds more than one block_rows × block_cols tile of S, and `tiles`
  // is (0,). save_tiles=True (CPU; needs block_rows > 0): every tile is kept, packed strip by strip
  // of block_rows rows (in the self mode each strip from its first row's column on: the upper
  // triangle, Σ rows·(M - r0) entries; else B·M), as `tiles` in the statistics' dtype (the entries the
  // policy reads: S, or the distance policies' -d²/2), so that the backward reads them instead of
  // recomputing S.
  m.def(
      "lse_stats(Tensor x, Tensor? y, Tensor row_keys, Tensor? col_keys, Tensor? row_params, Tensor scale, "
      "str policy, float[] args, bool normalize, bool col_stats, int block_rows, int block_cols, "
      "bool save_tiles=False, str head=\"none\") -> (Tensor row_stats, Tensor col_stats, Tensor tiles)");
  // Gradients of lse_stats w.r.t. x and y (y: (0, D) when y is None) from the gradients of its
  // statistics' columns 0-3 and 12 (None: zero; `head` as the forward's), recomputing S tile by tile,
  // or reading it from the forward's `tiles` (same tiles: the same block_rows/block_cols) when given
  // and not empty.
  m.def(
      "lse_stats_backward(Tensor? grad_row_stats, Tensor? grad_col_stats, Tensor x, Tensor? y, Tensor row_keys, "
      "Tensor? col_keys, Tensor? row_params, Tensor scale, str policy, float[] args, bool normalize, "
      "Tensor row_stats, Tensor col_stats, int block_rows, int block_cols, Tensor? tiles=None, str head=\"none\") -> "
      "(Tensor grad_x, Tensor grad_y)");

  // Losses with learnable class parameters (metricops/class_losses.py), chunked
  // over classes: S = embeddings · normalize(weight)ᵀ is computed one tile of
  // class_chunk classes at a time (class_chunk <= 0 picks it per device) and
  // never held whole. `embeddings` are used as given (the Python side
  // normalizes them); weight/proxies are (C, D), normalized row-wise inside.
  // Labels must be in [0, C). Statistics are in the accumulation dtype
  // (float32 for float16/bfloat16).
  // ArcFace/CosFace (kind 'arcface' | 'cosface'): per-row cross-entropy of
  // scale·logits with the label's logit after the margin, and the row's
  // log-sum-exp of the logits (what the backward needs).
  m.def(
      "margin_softmax_loss(Tensor embeddings, Tensor labels, Tensor weight, str kind, float margin, float scale, "
      "int class_chunk=0) -> (Tensor loss, Tensor lse)");
  m.def(
      "margin_softmax_loss_backward(Tensor grad_loss, Tensor embeddings, Tensor labels, Tensor weight, Tensor lse, "
      "str kind, float margin, float scale, int class_chunk=0) -> (Tensor grad_embeddings, Tensor grad_weight)");
  // ProxyAnchor: per class c, pos[c] = log(1 + Σ_{y_i = c} e^{−α(S_ic − δ)}) and
  // neg[c] = log(1 + Σ_{y_i != c} e^{α(S_ic + δ)}) (0 over an empty set).
  // save_tile=True: all C classes in one tile, returned as `tile` (C, B), the
  // dot products proxies·embeddingsᵀ in the accumulation dtype, so that the
  // backward skips recomputing them (one GEMM of four); the caller asks for
  // it only when C·B is small. Otherwise `tile` is (0, B) and the backward
  // recomputes each chunk.
  // normalize=True: the embeddings are raw and normalized inside like the
  // proxies (each tile entry scaled by both rows' inverse norms, gradients to
  // the raw rows; no normalized copy), else they are used as given.
  m.def(
      "proxy_anchor_loss(Tensor embeddings, Tensor labels, Tensor proxies, float margin, float alpha, "
      "int class_chunk=0, bool save_tile=False, bool normalize=False) -> (Tensor pos, Tensor neg, Tensor tile)");
  m.def(
      "proxy_anchor_loss_backward(Tensor grad_pos, Tensor grad_neg, Tensor embeddings, Tensor labels, "
      "Tensor proxies, Tensor pos, Tensor neg, Tensor tile, float margin, float alpha, int class_chunk=0, "
      "bool normalize=False) -> (Tensor grad_embeddings, Tensor grad_proxies)");
  // ProxyAnchor reduced as the loss defines it, Σ_c pos[c] / max(|C⁺|, 1) +
  // Σ_c neg[c] / C (C⁺: the classes with a label in the batch), a 0-dim
  // tensor, with pos and neg as above. grad_embeddings / grad_proxies: the
  // same pass also returns that gradient of the loss for an upstream gradient
  // of 1 (each class's derivatives are known once its row of the tile is
  // reduced), so the backward only scales it (in place: a caller must not
  // keep it across a backward through this op); a gradient not asked for is
  // (0, D) and its GEMM is skipped.
  m.def(
      "proxy_anchor_loss_and_grad(Tensor embeddings, Tensor labels, Tensor proxies, float margin, float alpha, "
      "int class_chunk=0, bool normalize=False, bool grad_embeddings=False, bool grad_proxies=False) -> (Tensor loss, "
      "Tensor pos, Tensor neg, Tensor grad_embeddings, Tensor grad_proxies)");
}

}  // namespace metricops
