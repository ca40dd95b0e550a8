"""Fake kernels, autograd and autocast for the log-sum-exp engine's ops (lse_stats, lse_stats_backward)."""

from __future__ import annotations

import torch

from .._ops import ops
from .._reduction import accumulation_dtype
from ._autograd import register_autograd
from ._common import LIB, check_embeddings, check_same_device_dtype

NUM_STATS = 13
# Columns of the statistics (csrc/common/lse_stats.h StatField); TERM: the head's per-anchor loss term.
(
    LSE_POS,
    LSE_NEG,
    LIN_POS,
    LIN_NEG,
    COUNT_POS,
    COUNT_NEG,
    MIN_POS,
    MAX_NEG,
    DSCALE_POS,
    DSCALE_NEG,
    AUX_POS,
    AUX_NEG,
    TERM,
) = range(NUM_STATS)
# policy -> (number of args, row_params columns)
POLICIES = {
    "scaled": (0, 0),
    # "scaled" with the sums d/dscale needs (DSCALE_POS/NEG, 0 from every other policy): for a scale that
    # requires grad only, since they cost the CPU epilogues two sums per entry
    "scaled_learnable": (0, 0),
    "multi_similarity": (3, 0),
    "multi_similarity_mined": (4, 2),
    "similarity_range": (0, 0),
    "circle": (2, 0),
    "lifted": (2, 0),
    "ntxent_pairs": (0, 1),
    "lifted_pairs": (2, 2),
}


# head -> the policy whose statistics it reads (csrc/common/similarity_losses.h parse_head)
HEADS = {
    "none": None,
    "supcon": "scaled",
    "multi_similarity": "multi_similarity",
    "multi_similarity_mined": "multi_similarity_mined",
    "circle": "circle",
    "generalized_lifted": "lifted",
    "info_nce": "scaled",
}


def _check_keys(keys, emb, name, emb_name):
    n = emb.shape[0]
    torch._check_value(
        keys.dim() == 1 and keys.shape[0] == n,
        lambda: f"{name} must be a 1-D tensor of length {n} (one per row of {emb_name}), got shape {tuple(keys.shape)}",
    )
    torch._check_type(
        keys.dtype in (torch.int32, torch.int64), lambda: f"{name} must be int32 or int64, got {keys.dtype}"
    )


def _check_inputs(x, y, row_keys, col_keys, row_params, scale, policy, args, col_stats, head="none"):
    torch._check_value(policy in POLICIES, lambda: f"policy must be one of {tuple(POLICIES)}, got {policy!r}")
    torch._check_value(head in HEADS, lambda: f"head must be one of {', '.join(repr(h) for h in HEADS)}, got {head!r}")
    torch._check_value(
        head == "none" or HEADS[head] == policy,
        lambda: f"head {head!r} reads another policy's statistics, got policy {policy!r}",
    )
    check_embeddings(x, "x")
    _check_keys(row_keys, x, "row_keys", "x")
    if y is not None:
        check_embeddings(y, "y")
        check_same_device_dtype(x, "x", y, "y")
        torch._check_value(
            y.shape[1] == x.shape[1],
            lambda: f"y must have the same number of columns as x (D={x.shape[1]}), got shape {tuple(y.shape)}",
        )
        torch._check_value(col_keys is not None, lambda: "col_keys is required when y is given")
        _check_keys(col_keys, y, "col_keys", "y")
    else:
        torch._check_value(col_keys is None, lambda: "col_keys must be None when y is None (the columns are x's rows)")
        torch._check_value(not col_stats, lambda: "col_stats needs y")
    nargs, nparams = POLICIES[policy]
    torch._check_value(len(args) == nargs, lambda: f"policy {policy!r} takes {nargs} args, got {len(args)}")
    if nparams:
        torch._check_value(row_params is not None, lambda: f"policy {policy!r} needs row_params")
        torch._check_value(
            row_params.dim() == 2 and row_params.shape[0] == x.shape[0] and row_params.shape[1] == nparams,
            lambda: f"row_params must have shape ({x.shape[0]}, {nparams}), got {tuple(row_params.shape)}",
        )
    else:
        torch._check_value(row_params is None, lambda: f"policy {policy!r} takes no row_params")
    torch._check_value(scale.dim() == 0, lambda: f"scale must be a 0-dim tensor, got shape {tuple(scale.shape)}")
    torch._check_type(scale.dtype.is_floating_point, lambda: f"scale must be floating, got {scale.dtype}")


def saved_tiles_size(b, m, self_mode: bool, block_rows: int):
    """Entries of lse_stats' saved tiles (csrc/cpu/lse_engine.h saved_tiles_size): strips of R rows, each from its
    first row's column on in the self mode (Σ rows·(M − r0), the upper triangle), else B·M. Closed form, so that it
    also holds for a symbolic B under torch.compile."""
    if not self_mode:
        return b * m
    r = block_rows if block_rows < b else b  # the strips' rows (min(block_rows, B); B itself when smaller)
    if b == 0:
        return 0
    full = b // r  # strips of r rows, then one of `rest` rows
    rest = b - full * r
    return r * full * m - r * r * (full * (full - 1) // 2) + rest * (m - full * r)


@torch.library.register_fake(LIB + "lse_stats")
def _lse_stats_fake(
    x,
    y,
    row_keys,
    col_keys,
    row_params,
    scale,
    policy,
    args,
    normalize,
    col_stats,
    block_rows,
    block_cols,
    save_tiles=False,
    head="none",
):
    _check_inputs(x, y, row_keys, col_keys, row_params, scale, policy, args, col_stats, head)
    torch._check_value(
        not save_tiles or block_rows > 0,
        lambda: f"save_tiles=True needs block_rows > 0 (the saved tiles' size depends on it), got block_rows={block_rows}",
    )
    acc = accumulation_dtype(x.dtype)
    b = x.shape[0]
    m = y.shape[0] if y is not None else b
    tiles = saved_tiles_size(b, m, y is None, block_rows) if save_tiles else 0
    return (
        x.new_empty((b, NUM_STATS), dtype=acc),
        x.new_empty((m if col_stats else 0, NUM_STATS), dtype=acc),
        x.new_empty((tiles,), dtype=acc),
    )


@torch.library.register_fake(LIB + "lse_stats_backward")
def _lse_stats_backward_fake(
    grad_row,
    grad_col,
    x,
    y,
    row_keys,
    col_keys,
    row_params,
    scale,
    policy,
    args,
    normalize,
    row_stats,
    col_stats,
    br,
    bc,
    tiles=None,
    head="none",
):
    _check_inputs(x, y, row_keys, col_keys, row_params, scale, policy, args, col_stats.shape[0] > 0, head)
    b = x.shape[0]
    m = y.shape[0] if y is not None else b

    def check_stats(t, name, n):  # csrc/common/similarity_losses.h check_lse_backward_stats
        torch._check_value(
            t.dim() == 2 and t.shape[0] == n and t.shape[1] == NUM_STATS,
            lambda: f"{name} must have shape ({n}, {NUM_STATS}), got {list(t.shape)}",
        )

    check_stats(row_stats, "row_stats", b)
    torch._check_value(
        col_stats.dim() == 2,
        lambda: f"col_stats must have shape ({m}, {NUM_STATS}) or (0, {NUM_STATS}), got {list(col_stats.shape)}",
    )
    has_col = col_stats.shape[0] > 0
    if has_col:
        check_stats(col_stats, "col_stats", m)
    if grad_row is not None:
        check_stats(grad_row, "grad_row_stats", b)
    if grad_col is not None:
        if has_col:
            check_stats(grad_col, "grad_col_stats", m)
        else:
            torch._check_value(
                grad_col.numel() == 0,
                lambda: f"grad_col_stats must be None or empty without column statistics, got shape {list(grad_col.shape)}",
            )
    gx = torch.empty_like(x, memory_format=torch.contiguous_format)
    gy = torch.empty_like(y, memory_format=torch.contiguous_format) if y is not None else x.new_empty((0, x.shape[1]))
    return gx, gy


def _setup_context(ctx, inputs, output):
    ctx.set_materialize_grads(False)
    x, y, row_keys, col_keys, row_params, scale, policy, args, normalize, col_stats, block_rows, block_cols = inputs[
        :12
    ]
    head = inputs[13]
    row_stats, col_stats_out, tiles = output
    # columns 0-3 and TERM of the statistics carry gradients, the others are used as constants; the tiles are S
    # itself, kept for the backward only
    ctx.mark_non_differentiable(tiles)
    ctx.save_for_backward(x, y, row_keys, col_keys, row_params, scale, row_stats, col_stats_out, tiles)
    ctx.args = (policy, args, normalize, block_rows, block_cols, head)


def _scale_grad(grad, stats, scale):
    """d/dscale of the "scaled_learnable" policy's statistics: dLSE_c/dscale is a column of the statistics,
    lin_c = scale·Σ (s − 1)."""
    if grad is None or stats.shape[0] == 0:
        return None
    g = grad.to(stats.dtype)
    lin = torch.nan_to_num(g[:, LIN_POS] * stats[:, LIN_POS] + g[:, LIN_NEG] * stats[:, LIN_NEG])
    part = g[:, LSE_POS] * stats[:, DSCALE_POS] + g[:, LSE_NEG] * stats[:, DSCALE_NEG]
    return part.sum() + lin.sum() / scale.to(stats.dtype)


def _backward(ctx, grad_row, grad_col, _grad_tiles):
    x, y, row_keys, col_keys, row_params, scale, row_stats, col_stats, tiles = ctx.saved_tensors
    policy, args, normalize, block_rows, block_cols, head = ctx.args
    needs = ctx.needs_input_grad
    grad_x = grad_y = grad_params = grad_scale = None
    if grad_row is None and grad_col is None:
        return (None,) * 14
    if needs[0] or (y is not None and needs[1]):
        grad_x, grad_y = ops.lse_stats_backward.default(
            grad_row,
            grad_col,
            x,
            y,
            row_keys,
            col_keys,
            row_params,
            scale,
            policy,
            args,
            normalize,
            row_stats,
            col_stats,
            block_rows,
            block_cols,
            tiles if tiles.numel() > 0 else None,
            head,
        )
        if y is None:
            grad_y = None
    if row_params is not None and needs[4] and grad_row is not None:
        if policy == "ntxent_pairs":  # lin_pos = Σ softplus(m - z): d/dm is aux_pos
            grad_params = (grad_row[:, LIN_POS] * row_stats[:, AUX_POS]).unsqueeze(1).to(row_params.dtype)
        elif policy == "lifted_pairs":
            # lin_pos_i = Σ_j r_ij²/2 with LA_ij = logaddexp(L_i, L_j): L_i gets g_i·Σ_j r_ij e^{L_i - LA_ij} from its
            # own row (aux_pos, w = 1) and Σ_j g_j r_ji e^{L_i - LA_ji} from the rows that pair with it: the same
            # pass with w = g (r and LA are symmetric).
            g = grad_row[:, LIN_POS].to(row_params.dtype)
            weighted = torch.stack([row_params[:, 0], g], 1)
            again, _, _ = ops.lse_stats.default(
                x, y, row_keys, col_keys, weighted, scale, policy, args, normalize, False, block_rows, block_cols
            )
            grad_l = g * row_stats[:, AUX_POS] + again[:, AUX_POS]
            grad_params = torch.stack([grad_l, torch.zeros_like(grad_l)], 1)
        # multi_similarity_mined's thresholds only select pairs: no gradient
    if needs[5]:
        torch._check_value(
            policy == "scaled_learnable",
            lambda: f"a scale that requires grad needs policy 'scaled_learnable', got {policy!r}",
        )
        parts = [
            p
            for p in (_scale_grad(grad_row, row_stats, scale), _scale_grad(grad_col, col_stats, scale))
            if p is not None
        ]
        grad_scale = sum(parts).to(scale.dtype) if parts else None
    return grad_x, grad_y, None, None, grad_params, grad_scale, None, None, None, None, None, None, None, None


register_autograd("lse_stats", _backward, _setup_context)
