"""Nyström self-attention (Xiong et al., AAAI 2021, "Nyströmformer"), masked exactly per sequence.

Softmax attention ``softmax(Q Kᵀ/√d) V`` costs O(T²) for T tokens; Nyström attention approximates
it through m landmarks, the means ``Q̃``, ``K̃`` of m segments of consecutive queries and keys::

    F = softmax(Q K̃ᵀ/√d)  (T, m)    A = softmax(Q̃ K̃ᵀ/√d)  (m, m)    B = softmax(Q̃ Kᵀ/√d)  (m, T)
    attention(Q, K, V) ≈ F A⁺ (B V)  +  depth-wise convolution of V along the sequence

with ``A⁺`` the Moore-Penrose pseudo-inverse by the paper's iterative scheme
(:func:`iterative_pinv`) and the paper's skip connection of the values through a depth-wise
convolution.

Masking is exact: the valid tokens of each sequence are a prefix of length ``T_b`` (``lengths``),
and its segments come from ``T_b`` alone (``min(m, T_b)`` segments of ⌊T_b/m⌋ or ⌈T_b/m⌉ tokens),
so a sequence padded inside a batch gives the same outputs as alone. With ``T_b <= m`` every token
is its own landmark, ``F = A = B`` is the exact attention matrix and ``F A⁺ B`` equals it up to the
pseudo-inverse's convergence. Unused landmarks are masked out of F and B and enter A as an identity
block, which leaves the pseudo-inverse of the used block unchanged. That is also why the landmark
axis can shrink to ``min(m, T)`` for a batch of at most T tokens (the pseudo-inverse costs m³ per
head): eager runs do so, while traced and exported graphs keep all m, so that their shapes follow
T without a minimum; both give the same outputs. The kernels and the pseudo-inverse run in float32
even under autocast: in bfloat16 the pseudo-inverse of a 128 × 128 softmax matrix is off by
~1% of its largest entry.
"""

from __future__ import annotations

import contextlib

import torch
from torch import Tensor, nn

VALUE_SKIP_KERNEL = 33  # tokens: the Nyströmformer's depth-wise value convolution


def sequence_positions(like: Tensor) -> Tensor:
    """Positions 0 .. T-1 (T,) int64 of the second axis of ``like`` (B, T, ...)."""
    return torch.arange(like.shape[1], device=like.device)


def prefix_mask(lengths: Tensor, like: Tensor) -> Tensor:
    """(B, T) bool: True on the first ``lengths[b]`` positions of row b of ``like`` (B, T, ...)."""
    return sequence_positions(like)[None, :] < lengths[:, None]


def landmark_pooling(lengths: Tensor, valid: Tensor, landmarks: int) -> tuple[Tensor, Tensor]:
    """The segment means that make the landmarks, from each sequence's own valid length.

    ``lengths`` (B,) int64 valid tokens per sequence, ``valid`` (B, T) bool their prefix mask ->
    ``pooling`` (B, m, T) float32 whose row j averages the tokens of segment j (``pooling @ Q`` are
    the landmark queries), and ``used`` (B, m) bool, False on landmarks with no token (``T_b < m``).
    """
    total = lengths.clamp(min=1)[:, None]
    used_count = total.clamp(max=landmarks)
    # token t of a sequence of T_b tokens falls in segment ⌊t·u/T_b⌋ of u = min(m, T_b) segments
    segment = sequence_positions(valid)[None, :] * used_count // total  # (B, T)
    segment = segment.masked_fill(~valid, landmarks)  # padding: in no segment
    landmark_ids = torch.arange(landmarks, device=valid.device)
    member = segment[:, None, :] == landmark_ids[None, :, None]  # (B, m, T)
    sizes = member.sum(dim=-1)  # (B, m)
    pooling = member.float() / sizes.clamp(min=1)[..., None].float()
    return pooling, sizes > 0


def iterative_pinv(matrix: Tensor, iterations: int) -> Tensor:
    """Moore-Penrose pseudo-inverse of square matrices (..., m, m) by the iteration the
    Nyströmformer uses (Razavi et al. 2014): ``Z ← ¼ Z (13I − AZ (15I − AZ (7I − AZ)))`` from
    ``Z₀ = Aᵀ / (‖A‖₁ ‖A‖∞)``, scaled per matrix so that one matrix never changes another's
    inverse (the reference implementation scales by the batch maximum)."""
    absolute = matrix.abs()
    scale = absolute.sum(dim=-2).amax(dim=-1) * absolute.sum(dim=-1).amax(dim=-1)
    z = matrix.transpose(-1, -2) / scale[..., None, None]
    eye = torch.eye(matrix.shape[-1], dtype=matrix.dtype, device=matrix.device)
    for _ in range(iterations):
        az = matrix @ z
        z = 0.25 * z @ (13 * eye - az @ (15 * eye - az @ (7 * eye - az)))
    return z


def _graph_capture() -> bool:
    # torch.jit.trace and torch.export record shapes, which must not depend on T through min()
    return torch.jit.is_tracing() or torch.compiler.is_compiling()


def _masked_softmax(logits: Tensor, keep: Tensor) -> Tensor:
    # every row keeps at least one column here (each sequence has >= 1 valid token and landmark)
    return torch.softmax(logits.masked_fill(~keep, float("-inf")), dim=-1)


def _float32_kernels(device_type: str) -> contextlib.AbstractContextManager:
    if torch.is_autocast_enabled(device_type):
        return torch.autocast(device_type, enabled=False)
    return contextlib.nullcontext()


class NystromAttention(nn.Module):
    """Multi-head Nyström self-attention over (B, T, dim) tokens whose valid ones are a prefix.

    ``heads`` heads of ``dim_head`` features each, ``landmarks`` m, ``pinv_iterations`` iterations
    of the pseudo-inverse (6 in the paper), ``dropout`` on the output projection.
    """

    def __init__(
        self,
        dim: int,
        heads: int,
        dim_head: int,
        landmarks: int,
        pinv_iterations: int = 6,
        dropout: float = 0.0,
    ):
        super().__init__()
        self.heads = heads
        self.dim_head = dim_head
        self.landmarks = landmarks
        self.pinv_iterations = pinv_iterations
        self.scale = dim_head**-0.5
        self.to_qkv = nn.Linear(dim, 3 * heads * dim_head, bias=False)
        self.to_out = nn.Sequential(nn.Linear(heads * dim_head, dim), nn.Dropout(dropout))
        self.value_skip = nn.Conv2d(
            heads, heads, (VALUE_SKIP_KERNEL, 1), padding=(VALUE_SKIP_KERNEL // 2, 0),
            groups=heads, bias=False,
        )  # fmt: skip

    def forward(
        self, tokens: Tensor, lengths: Tensor, first_token_attention: bool = False
    ) -> tuple[Tensor, Tensor | None]:
        """``tokens`` (B, T, dim), ``lengths`` (B,) int64 valid prefix lengths -> the attended
        tokens (B, T, dim) (rows past a sequence's length are meaningless) and, with
        ``first_token_attention``, the first token's row of the effective attention matrix
        ``F A⁺ B`` (B, heads, T), 0 on padding; else None."""
        valid = prefix_mask(lengths, tokens)
        q, k, v = (
            part.unflatten(-1, (self.heads, self.dim_head)).transpose(1, 2)
            for part in self.to_qkv(tokens).chunk(3, dim=-1)
        )  # each (B, h, T, d)
        with _float32_kernels(tokens.device.type):
            keep = valid[:, None, :, None]
            q, k, v = (part.float().masked_fill(~keep, 0.0) for part in (q, k, v))
            q = q * self.scale
            landmarks = self.landmarks
            if not _graph_capture():
                landmarks = min(landmarks, tokens.shape[1])  # the rest would be identity blocks
            pooling, used = landmark_pooling(lengths, valid, landmarks)
            q_landmarks = pooling[:, None] @ q  # (B, h, m, d)
            k_landmarks = pooling[:, None] @ k
            used_columns = used[:, None, None, :]
            kernel_f = _masked_softmax(q @ k_landmarks.transpose(-1, -2), used_columns)
            kernel_a = _masked_softmax(q_landmarks @ k_landmarks.transpose(-1, -2), used_columns)
            eye = torch.eye(landmarks, dtype=kernel_a.dtype, device=kernel_a.device)
            kernel_a = torch.where(used[:, None, :, None] & used_columns, kernel_a, eye)
            kernel_b = _masked_softmax(q_landmarks @ k.transpose(-1, -2), valid[:, None, None, :])
            inverse = iterative_pinv(kernel_a, self.pinv_iterations)
            # F (A⁺ (B V)): the (T, m) × (m, m) product F A⁺ would cost T·m² per head
            mixed = kernel_f @ (inverse @ (kernel_b @ v)) + self.value_skip(v)
            first_row = None
            if first_token_attention:
                first_row = ((kernel_f[:, :, :1] @ inverse) @ kernel_b)[:, :, 0]
        merged = mixed.transpose(1, 2).flatten(2).to(tokens.dtype)
        return self.to_out(merged), first_row
