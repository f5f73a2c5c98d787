"""Launch-size helpers shared by every Triton kernel file."""
from __future__ import annotations

import triton

# triton.cdiv / triton.next_power_of_2 are constexpr functions (usable inside kernels); called
# on the host they pass through a wrapper that costs microseconds a call, so launchers use the
# plain functions underneath.
cdiv = getattr(triton.cdiv, "fn", triton.cdiv)
next_power_of_2 = getattr(triton.next_power_of_2, "fn", triton.next_power_of_2)

MAX_FUSED_SIZE = 65536 // 4  # elements of one row block held in registers/SRAM per program


def calculate_settings(n: int, max_block: int = MAX_FUSED_SIZE):
    """(BLOCK_SIZE, num_warps) for a row of n elements handled by one program.

    BLOCK_SIZE is next_power_of_2(n) capped at `max_block`: callers with longer rows loop over
    blocks. num_warps grows with the block so each thread keeps a few elements."""
    if n < 1:
        raise ValueError(f"row length must be >= 1, got {n}")
    block = min(next_power_of_2(n), max_block)
    if block >= 8192:
        num_warps = 16
    elif block >= 2048:
        num_warps = 8
    elif block >= 512:
        num_warps = 4
    else:
        num_warps = 2
    return block, num_warps
