"""TransMIL (Shao et al., NeurIPS 2021): self-attention between the instances of a bag.

The instances are projected (Linear + ReLU + dropout), a learned class token is put in front, and
``depth`` pre-norm layers ``x + NystromAttention(LayerNorm(x))`` mix all tokens (Nyström attention,
:mod:`slidemil.models.nystrom`); after the first layer the PPEG adds position information with
depth-wise 7×7, 5×5 and 3×3 convolutions over the instances laid out on a square. The class token,
layer-normed, gives the logits through one Linear layer.

Square layout (option ``layout``): with ``"coords"`` (the default) and the bag's patch coordinates
(``forward(..., coords=)``), each instance sits in its cell of the slide's own patch grid, row
``round((y - y_min) / step_y)`` and column ``round((x - x_min) / step_x)``; the step per axis is the
smallest positive gap between the bag's distinct coordinate values (at least 1 level-0 pixel), as
grid patches share one step. The PPEG then mixes each patch with its neighbours on the tissue,
cells without a patch (background, the tissue's border) read zeros, and the outputs do not depend
on the order of the bag's rows. Two patches in one cell (overlapping patches off the grid): the
neighbours see the first of them in bag order. With ``"order"``, or without coordinates (CLAM
``.pt`` bags have none), a bag of n instances fills a ⌈√n⌉ × ⌈√n⌉ square row by row in bag order,
and the empty cells repeat the first instances (the paper's padding). Unlike the authors' code,
those copies exist only as the PPEG's inputs: attention runs over the n instances themselves, so
each instance has one score and a bag's outputs do not depend on how much padding a batch adds.

Explanation: ``attention`` is the class token's attention to each instance in the last layer
(the row of the effective Nyström matrix ``F A⁺ B``, mean over heads), clipped at 0 and normalised
to sum to 1 over the bag's instances; ``scores`` (``return_scores=True``) are the same attention
times n, the instance's weight relative to a uniform share (1 = average), which compares across
bags of any size. The values' skip convolution is not attention and is not part of either.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from slidemil.errors import ConfigError
from slidemil.models.abmil import input_projection
from slidemil.models.nystrom import NystromAttention, prefix_mask, sequence_positions
from slidemil.models.registry import register_model

PPEG_RADIUS = 3  # the 7×7 kernel; the 5×5 and 3×3 ones sit at its centre
LAYOUTS = ("coords", "order")
_FAR = 1e30  # sorts after any coordinate (and fits a float32 constant of an exported graph)


def compaction_targets(mask: Tensor) -> Tensor:
    """For ``mask`` (B, N) bool, where each instance moves (B, N) int64 so that a bag's valid
    instances come first, in their order, and its padding after them."""
    valid = mask.long()
    counts = valid.sum(dim=1, keepdim=True)
    valid_rank = valid.cumsum(dim=1) - 1
    padding_rank = (1 - valid).cumsum(dim=1) - 1 + counts
    return torch.where(mask, valid_rank, padding_rank)


def square_side(counts: Tensor) -> Tensor:
    """⌈√n⌉ (B,) int64 for ``counts`` n (B,) int64 (at least 1), exact for any n: the float
    square root may be one off for large n, which the two integer checks correct."""
    side = torch.ceil(torch.sqrt(counts.float())).long()
    side = side + (side * side < counts).long()
    side = side - ((side - 1) * (side - 1) >= counts).long()
    return side.clamp(min=1)


def square_neighbours(counts: Tensor, like: Tensor, radius: int) -> Tensor:
    """Each instance's neighbours on its bag's square layout, for offsets (dr, dc) in
    [-radius, radius]² in row-major order (K = (2·radius + 1)² of them).

    ``counts`` (B,) int64 valid instances n per bag, ``like`` (B, N, ...) the instances ->
    (B, K, N) int64 indices into one zero row followed by the bag's instances (instance i at
    i + 1): the instance in the neighbouring cell (cells past n hold instance ``cell - n``, the
    paper's repetition of the first instances), or 0 where the cell is off the square or the
    instance itself is padding.
    """
    positions = sequence_positions(like)[None, :]  # (1, N)
    side = square_side(counts)[:, None]  # (B, 1)
    n = counts.clamp(min=1)[:, None]
    row, column = positions // side, positions % side
    real = positions < counts[:, None]
    sources = []
    for dr in range(-radius, radius + 1):
        for dc in range(-radius, radius + 1):
            r, c = row + dr, column + dc
            on_square = (r >= 0) & (r < side) & (c >= 0) & (c < side) & real
            cell = r * side + c
            source = torch.where(cell < n, cell, cell - n)
            sources.append(torch.where(on_square, source + 1, torch.zeros_like(source)))
    return torch.stack(sources, dim=1)


def grid_cells(coords: Tensor, counts: Tensor) -> tuple[Tensor, Tensor]:
    """Each instance's cell on its bag's patch grid: ``coords`` (B, N, 2) level-0 x, y with each
    bag's ``counts`` (B,) valid rows first -> (row, column), (B, N) int64 each (0 on padding).

    The step per axis is the smallest positive gap between the bag's distinct values on that axis
    (1 where all are equal), at least 1 pixel; the cell is the offset from the bag's minimum over
    the step, rounded.
    """
    values = coords.to(torch.float64)
    valid = prefix_mask(counts, values[..., 0])[..., None]  # (B, N, 1)
    ordered = torch.sort(torch.where(valid, values, _FAR), dim=1).values  # (B, N, 2)
    gaps = ordered[:, 1:] - ordered[:, :-1]
    between_valid = prefix_mask(counts - 1, gaps[..., 0])[..., None]
    gaps = torch.where(between_valid & (gaps > 0), gaps, _FAR)
    gaps = torch.cat([gaps, torch.full_like(ordered[:, :1], _FAR)], dim=1)  # N = 1: no gaps
    step = gaps.min(dim=1, keepdim=True).values  # (B, 1, 2)
    step = torch.where(step < _FAR / 2, step, torch.ones_like(step)).clamp(min=1.0)
    origin = ordered[:, :1]  # (B, 1, 2): each axis's minimum
    cell = torch.round((values - origin) / step)
    cell = torch.where(valid, cell, torch.zeros_like(cell)).to(torch.long)
    return cell[..., 1], cell[..., 0]


def grid_keys(coords: Tensor, counts: Tensor, radius: int) -> tuple[Tensor, Tensor, Tensor]:
    """The bags' grid cells as integers: ``coords`` (B, N, 2) with each bag's ``counts`` (B,)
    valid rows first -> ``cell`` (B, N) = ``(row + r) · S + column + r`` (S = the widest column
    + 2r + 1, so that every offset within the radius r is a different cell), ``stride`` S (B, 1),
    and ``keys`` (B, N) ``cell · N + position``: unique, in raster order, padding last."""
    size = coords.shape[1]
    row, column = grid_cells(coords, counts)
    positions = sequence_positions(row)[None, :]  # (1, N)
    real = positions < counts[:, None]
    stride = column.max(dim=1, keepdim=True).values + 2 * radius + 1  # (B, 1)
    cell = (row + radius) * stride + column + radius
    far = (cell.max() + 2 * radius * stride.max() + radius + 2) * size  # past every query key
    return cell, stride, torch.where(real, cell * size + positions, far + positions)


def grid_neighbours(coords: Tensor, counts: Tensor, radius: int) -> Tensor:
    """:func:`square_neighbours` on the bags' patch grids (:func:`grid_keys`): (B, K, N) int64,
    the instance in each neighbouring cell + 1, or 0 where that cell holds no patch of the bag or
    the instance is padding.

    A cell is looked up among the sorted keys (the first patch in a cell wins) by sorting it in
    with them and counting the keys before it, which uses (B, (K + 1) · N) memory and exports
    (ONNX has no searchsorted).
    """
    batch, size = coords.shape[:2]
    cell, stride, keys = grid_keys(coords, counts, radius)
    real = prefix_mask(counts, cell)
    sorted_keys, order = torch.sort(keys, dim=1)
    offsets = [dr * stride + dc for dr in range(-radius, radius + 1)
               for dc in range(-radius, radius + 1)]  # fmt: skip
    queries = torch.stack([(cell + o) * size for o in offsets], dim=1)  # (B, K, N)
    queries = queries.reshape(batch, -1)
    # keys odd, queries even: a query sorts after the keys of smaller cells and before its own
    merged = torch.cat([2 * keys + 1, 2 * queries], dim=1)
    merged_order = torch.sort(merged, dim=1).indices
    is_key = (merged_order < size).long()
    keys_before = torch.cumsum(is_key, dim=1) - is_key
    found = torch.zeros_like(keys_before).scatter(1, merged_order, keys_before)[:, size:]
    found = found.clamp(max=size - 1)
    candidate = torch.gather(sorted_keys, 1, found)
    hit = (candidate >= queries) & (candidate < queries + size)
    source = torch.gather(order, 1, found) + 1
    source = torch.where(hit, source, torch.zeros_like(source)).view(batch, len(offsets), size)
    return source.masked_fill(~real[:, None, :], 0)


class PPEG(nn.Module):
    """Pyramid position encoding generator: ``x + conv7(x) + conv5(x) + conv3(x)``, depth-wise
    convolutions with zero padding over each bag's square layout of its instances.

    The convolutions run as gathers of the neighbouring cells rather than on an image, so that one
    batch holds bags of different squares and an exported graph serves any bag size.
    """

    def __init__(self, dim: int):
        super().__init__()
        self.conv7 = nn.Conv2d(dim, dim, 7, padding=3, groups=dim)
        self.conv5 = nn.Conv2d(dim, dim, 5, padding=2, groups=dim)
        self.conv3 = nn.Conv2d(dim, dim, 3, padding=1, groups=dim)

    def forward(self, instances: Tensor, counts: Tensor, coords: Tensor | None = None) -> Tensor:
        """``instances`` (B, N, dim) with each bag's ``counts`` (B,) valid ones first ->
        (B, N, dim), zeros on padding. With ``coords`` (B, N, 2) (the same rows) the layout is
        the bags' patch grids (:func:`grid_neighbours`), else the square in bag order."""
        # x + conv7 + conv5 + conv3 is one 7×7 depth-wise convolution with the kernels summed
        kernel = (
            self.conv7.weight[:, 0]
            + F.pad(self.conv5.weight[:, 0], (1, 1, 1, 1))
            + F.pad(self.conv3.weight[:, 0], (2, 2, 2, 2))
        )  # (dim, 7, 7)
        offsets = kernel.flatten(1).transpose(0, 1)  # (49, dim), row-major (dr, dc)
        bias = self.conv7.bias + self.conv5.bias + self.conv3.bias
        if coords is None:
            sources = square_neighbours(counts, instances, PPEG_RADIUS)  # (B, 49, N)
        else:
            sources = grid_neighbours(coords, counts, PPEG_RADIUS)
        batch, size, dim = instances.shape
        # a zero row before each bag for the cells off the square; all bags in one table
        table = torch.cat([instances.new_zeros(batch, 1, dim), instances], dim=1)
        table = table.reshape(-1, dim)
        bag_start = (torch.arange(batch, device=instances.device) * (size + 1))[:, None]
        out = instances + bias
        for k in range(offsets.shape[0]):
            rows = (sources[:, k] + bag_start).reshape(-1)
            neighbour = table.index_select(0, rows).view(batch, size, dim)
            out = torch.addcmul(out, neighbour, offsets[k])
        return out.masked_fill(~prefix_mask(counts, instances)[..., None], 0.0)


class TransLayer(nn.Module):
    """Pre-norm residual Nyström attention: ``x + attention(LayerNorm(x))``."""

    def __init__(self, dim: int, heads: int, landmarks: int, pinv_iterations: int, dropout: float):
        super().__init__()
        self.norm = nn.LayerNorm(dim)
        self.attention = NystromAttention(
            dim, heads, max(1, dim // heads), landmarks, pinv_iterations, dropout
        )

    def forward(
        self, tokens: Tensor, lengths: Tensor, first_token_attention: bool = False
    ) -> tuple[Tensor, Tensor | None]:
        mixed, first_row = self.attention(self.norm(tokens), lengths, first_token_attention)
        return tokens + mixed, first_row


class TransMIL(nn.Module):
    """TransMIL; see the module docstring. ``forward`` keeps the MIL model interface."""

    uses_labels = False
    uses_coords = True

    def __init__(
        self,
        in_dim: int,
        n_classes: int,
        hidden_dim: int = 256,
        depth: int = 2,
        heads: int = 8,
        landmarks: int = 128,
        pinv_iterations: int = 6,
        dropout: float = 0.1,
        layout: str = "coords",
    ):
        super().__init__()
        if layout not in LAYOUTS:
            raise ConfigError(
                None, f"transmil option layout={layout!r} must be one of {', '.join(LAYOUTS)}"
            )
        self.layout = layout
        for name, value in (
            ("depth", depth), ("heads", heads), ("landmarks", landmarks),
            ("pinv_iterations", pinv_iterations),
        ):  # fmt: skip
            if value < 1:
                raise ConfigError(None, f"transmil option {name}={value} must be at least 1")
        self.project = input_projection(in_dim, hidden_dim, dropout)
        self.class_token = nn.Parameter(torch.randn(1, 1, hidden_dim))
        self.layers = nn.ModuleList(
            TransLayer(hidden_dim, heads, landmarks, pinv_iterations, dropout) for _ in range(depth)
        )
        self.position = PPEG(hidden_dim)
        self.norm = nn.LayerNorm(hidden_dim)
        self.head = nn.Linear(hidden_dim, n_classes)

    def forward(
        self,
        features: Tensor,
        mask: Tensor,
        return_scores: bool = False,
        labels: Tensor | None = None,
        coords: Tensor | None = None,
    ) -> tuple[Tensor, Tensor] | tuple[Tensor, Tensor, Tensor]:
        """``features`` (B, N, D), ``mask`` (B, N) bool -> logits (B, C), attention (B, N)
        [, scores (B, N): attention × n, ``-inf`` on padding]. ``coords`` (B, N, 2) level-0
        x, y of the rows (float or int; padding rows ignored) lay the PPEG out on the patch grid
        when ``layout`` is ``"coords"``; None: the square in bag order. ``labels`` is not used."""
        targets = compaction_targets(mask)  # valid instances first, wherever the padding is
        counts = mask.sum(dim=1)
        placed_coords = None
        if coords is not None and self.layout == "coords":
            targets, placed_coords = _raster_order(targets, coords, counts)
        clean = features.masked_fill(~mask[..., None], 0.0)  # padding may hold anything
        projected = self.project(clean)
        instances = torch.zeros_like(projected).scatter(
            1, targets[..., None].expand_as(projected), projected
        )
        tokens = torch.cat([self.class_token.expand(features.shape[0], -1, -1), instances], 1)
        lengths = counts + 1  # the class token is always valid
        first_row = None
        for index, layer in enumerate(self.layers):
            tokens, first_row = layer(tokens, lengths, index == len(self.layers) - 1)
            if index == 0:  # the PPEG follows the first layer
                placed = self.position(tokens[:, 1:], counts, placed_coords)
                tokens = torch.cat([tokens[:, :1], placed], dim=1)
        logits = self.head(self.norm(tokens[:, 0]))
        # the class token's attention to the instances, back in the input's order
        to_instances = torch.gather(first_row.mean(dim=1)[:, 1:], 1, targets)
        to_instances = to_instances.to(logits.dtype)
        weights = _normalised(to_instances, mask, counts)
        if return_scores:
            relative = to_instances * counts[:, None].to(to_instances.dtype)
            return logits, weights, relative.masked_fill(~mask, float("-inf"))
        return logits, weights


def _raster_order(targets: Tensor, coords: Tensor, counts: Tensor) -> tuple[Tensor, Tensor]:
    """Where each instance moves (B, N) so that a bag's valid instances come first in the raster
    order of their grid cells (ties in bag order), and the coordinates (B, N, 2) float64 so
    placed: the sequence, and so the Nyström landmarks' segments and the values' skip
    convolution, then no longer depends on the order of the bag's rows."""
    expanded = targets[..., None].expand(-1, -1, 2)
    values = coords.to(torch.float64)
    compact = torch.zeros_like(values).scatter(1, expanded, values)
    order = torch.sort(grid_keys(compact, counts, PPEG_RADIUS)[2], dim=1).indices
    rank = torch.zeros_like(order).scatter(
        1, order, sequence_positions(order)[None].expand_as(order)
    )
    targets = torch.gather(rank, 1, targets)
    placed = torch.zeros_like(values).scatter(1, targets[..., None].expand(-1, -1, 2), values)
    return targets, placed


def _normalised(attention: Tensor, mask: Tensor, counts: Tensor) -> Tensor:
    # Nyström's approximate matrix may hold small negative entries: clip, then sum to 1; a bag
    # whose clipped attention is all 0 gets the uniform weights instead.
    clipped = attention.clamp(min=0.0) * mask
    total = clipped.sum(dim=1, keepdim=True)
    uniform = mask / counts.clamp(min=1)[:, None]
    return torch.where(total > 0, clipped / total.clamp(min=1e-30), uniform.to(attention.dtype))


@register_model("transmil", "Nyström self-attention with PPEG positions (Shao et al. 2021)")
def transmil(
    in_dim: int,
    n_classes: int,
    hidden_dim: int = 256,
    depth: int = 2,
    heads: int = 8,
    landmarks: int = 128,
    pinv_iterations: int = 6,
    dropout: float = 0.1,
    layout: str = "coords",
) -> TransMIL:
    return TransMIL(
        in_dim, n_classes, hidden_dim, depth, heads, landmarks, pinv_iterations, dropout, layout
    )
