"""Deterministic launch heuristics shared by the row-tiled kernels (no autotuning: the same shape
always gets the same grid, so results and timings are reproducible)."""

from __future__ import annotations

import triton


def row_tiled(rows: int, cols: int, block_r: int, block_c: int, programs: int) -> tuple[int, int, int, int]:
    """Tiles of (block_r, block_c), at most `block_c` rounded to the columns; each program walks a run
    of row tiles so that about `programs` programs fill the GPU. Returns (BLOCK_R, BLOCK_C, row tiles
    per program, row programs); the grid is (cdiv(cols, BLOCK_C), row programs)."""
    block_c = block_c if cols >= block_c else triton.next_power_of_2(max(cols, 16))
    col_blocks = triton.cdiv(cols, block_c)
    row_tiles = triton.cdiv(rows, block_r)
    programs_r = max(1, min(row_tiles, programs // col_blocks))
    per_program = triton.cdiv(row_tiles, programs_r)
    return block_r, block_c, per_program, triton.cdiv(row_tiles, per_program)
