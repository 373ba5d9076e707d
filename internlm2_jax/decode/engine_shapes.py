"""The padded shapes the continuous-batching engine runs, so that it compiles a bounded set of programs (all of them
at `warmup()`), never one per request.

Decode rows are padded to 1, 2, then multiples of 4 (a padded row costs as much as a real one, and finer steps
than 8 saved engine time on the serving benchmark), rounded up to multiples of the mesh's data-parallel degree (a
batch that does not split is computed whole on every replica, so padding it to split costs no replica more);
prefill calls to (rows, chunk) pairs of powers of two within `prefill_chunk` tokens; page-table widths to a ladder
of powers of four. Where decoding gathers pages with XLA (no
CPU kernel reading them in place), a decode batch of >= 16 rows at the widest page table, its rows sorted by length,
may also run as four groups whose widths step down (`row_widths`), so it gathers about the pages its rows hold.
"""

from __future__ import annotations

import dataclasses


def pow2(n: int) -> int:
    """The smallest power of two >= n."""
    return 1 << (n - 1).bit_length()


def ladder(top: int, floor: int = 1) -> list[int]:
    """top, top/4, top/16, ... down to `floor` (ascending): the few sizes a dimension is padded to (a coarse ladder
    keeps the number of compiled programs small enough to compile them all at start-up)."""
    sizes = [top]
    while sizes[-1] // 4 >= floor:
        sizes.append(sizes[-1] // 4)
    return sizes[::-1]


def powers(low: int, high: int) -> list[int]:
    """The powers of two from `low` to `high` (both powers of two)."""
    return [1 << i for i in range(low.bit_length() - 1, high.bit_length())]


def fit(n: int, sizes: list[int]) -> int:
    """The first of the ascending `sizes` that holds n."""
    return next(size for size in sizes if size >= n)


# A prefill call costs about its padded tokens plus a fixed part (reading the weights), taken as this many tokens.
PREFILL_CALL_TOKENS = 64


@dataclasses.dataclass(frozen=True)
class ProgramShapes:
    decode_rows: list[int]  # a decode batch's padded row counts
    prefill_shapes: list[tuple[int, int]]  # (rows, chunk) of a prefill call
    widths: list[int]  # page-table widths
    decode_widths: list[int]  # those decode runs at: the widest only when the kernel reads pages in place
    row_profiles: list[tuple[int, ...]]  # stepped widths of a wide decode batch's four row groups

    @classmethod
    def plan(cls, *, max_running: int, max_prefill_rows: int, prefill_chunk: int, max_model_len: int,
             page_size: int, reads_pages_in_place: bool, data_parallel: int = 1) -> ProgramShapes:
        """The shapes for an engine's limits. `reads_pages_in_place`: decoding runs the CPU kernel, which stops at
        each row's length, so a decode step costs the same at any page-table width: decode then runs at the widest
        only and needs no row profiles (a third of the programs to compile). `data_parallel`: the mesh's
        data-parallel degree, which decode row counts are rounded up to multiples of."""
        rows = sorted({1, 2} | set(range(4, max_running + 4, 4)))
        decode_rows = [r for r in rows if r < max_running] + [fit(max_running, rows)]
        decode_rows = sorted({-(-r // data_parallel) * data_parallel for r in decode_rows})
        smallest = min(16, prefill_chunk)
        prefill_shapes = [(rows, chunk) for rows in powers(1, max_prefill_rows)
                          for chunk in powers(smallest, prefill_chunk // rows) if chunk >= smallest]
        widths = ladder(pow2(-(-max_model_len // page_size)))
        # Staircases of eighths of the widest width, (8, 6, 4, 2) or else (8, 8, 6, 4), whichever fits first: on
        # the serving benchmark's trace they cut the pages gathered by a third at two extra programs per row count.
        top = widths[-1]
        profiles = [tuple(top * e // 8 for e in eighths) for eighths in ((8, 6, 4, 2), (8, 8, 6, 4))
                    ] if top >= 8 and not reads_pages_in_place else []
        return cls(decode_rows, prefill_shapes, widths, widths[-1:] if reads_pages_in_place else widths, profiles)

    def decode_batch(self, rows: int) -> int:
        return fit(rows, self.decode_rows)

    def width(self, pages: int, chunk: int) -> int:
        """The page-table width of a call whose longest row holds `pages` pages."""
        return fit(pages, self.decode_widths if chunk == 1 else self.widths)

    def best_prefill(self, pending: list[int]) -> tuple[int, int]:
        """The (rows, chunk) shape that caches the most of the waiting sequences' `pending` prompt tokens (in
        admission order) per unit of cost."""

        def value(shape):
            rows, chunk = shape
            real = sum(min(n, chunk) for n in pending[:rows])
            return real / (PREFILL_CALL_TOKENS + rows * chunk), real

        return max(self.prefill_shapes, key=value)

    def row_widths(self, pages: list[int], batch: int, chunk: int, width: int) -> tuple[int, ...] | None:
        """The cheapest row profile whose groups hold their rows (`pages` per real row, sorted longest first), or
        None."""
        if chunk != 1 or batch < 16 or width != self.widths[-1]:
            return None
        group = batch // 4
        need = [pages[g * group] if g * group < len(pages) else 0 for g in range(4)]
        fits = [p for p in self.row_profiles if all(n <= w for n, w in zip(need, p, strict=True))]
        return min(fits, key=sum, default=None)

    def all_programs(self) -> list[tuple[int, int, int, tuple[int, ...] | None]]:
        """(rows, chunk, page-table width, row widths) of every program the engine can run."""
        shapes = [(rows, 1, width, None) for rows in self.decode_rows for width in self.decode_widths]
        shapes += [(rows, 1, self.widths[-1], profile) for rows in self.decode_rows if rows >= 16
                   for profile in self.row_profiles]
        shapes += [(rows, chunk, width, None) for rows, chunk in self.prefill_shapes for width in self.widths]
        return shapes
