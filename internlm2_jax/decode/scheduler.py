"""Host-side bookkeeping of the continuous-batching engine: which pages are free, which sequence owns which pages,
and which full prompt pages can be shared by a later prompt with the same prefix (prefix caching).

Nothing here touches the device; `decode.engine` turns these decisions into page tables for each step.
"""

from __future__ import annotations

import collections
import dataclasses
from collections.abc import Callable

from internlm2_jax.decode.requests import Event, Request


class PagePool:
    """Page ids 1..num_pages-1 (page 0 is the null page) with reference counts.

    With prefix caching, a full page of prompt tokens is registered under a key naming every token up to its end;
    when its last owner finishes, it is kept (least recently used first out) instead of freed, so a later prompt
    with the same prefix maps it into its page table instead of recomputing it. Shared pages are never written:
    a sequence only writes at positions past its shared prefix.
    """

    def __init__(self, num_pages: int, page_size: int, *, prefix_caching: bool = True):
        self.page_size = page_size
        self.prefix_caching = prefix_caching
        self._free = collections.deque(range(1, num_pages))
        self._refs = [0] * num_pages
        self._idle: collections.OrderedDict[int, None] = collections.OrderedDict()  # cached pages nobody holds
        self._page_of: dict[tuple[int, tuple[int, ...]], int] = {}
        self._key_of: dict[int, tuple[int, tuple[int, ...]]] = {}

    @property
    def capacity(self) -> int:
        return len(self._refs) - 1

    @property
    def available(self) -> int:
        """Pages that `allocate` can hand out now (free, or cached and idle)."""
        return len(self._free) + len(self._idle)

    @property
    def cached(self) -> int:
        return len(self._key_of)

    def allocate(self, n: int) -> list[int]:
        if n > self.available:
            raise RuntimeError(f"asked for {n} pages with {self.available} available")  # the scheduler checks first
        pages = []
        for _ in range(n):
            if self._free:
                page = self._free.popleft()
            else:  # evict the least recently used idle prefix page
                page, _ = self._idle.popitem(last=False)
                del self._page_of[self._key_of.pop(page)]
            self._refs[page] = 1
            pages.append(page)
        return pages

    def release(self, pages: list[int]) -> None:
        for page in pages:
            self._refs[page] -= 1
            if self._refs[page] == 0:
                if page in self._key_of:
                    self._idle[page] = None
                else:
                    self._free.append(page)

    def prefix_keys(self, tokens: list[int], pages: int) -> list[tuple[int, tuple[int, ...]]]:
        """Keys of the first `pages` full pages of `tokens`: (hash of the previous key, this page's tokens), so a
        key names its whole prefix and equal keys mean equal tokens (up to a 64-bit hash of the part before)."""
        keys, parent = [], 0
        for i in range(pages):
            key = (parent, tuple(tokens[i * self.page_size:(i + 1) * self.page_size]))
            keys.append(key)
            parent = hash(key)
        return keys

    def share(self, keys) -> list[int]:
        """The cached pages of the longest registered prefix of `keys`, each now held once more."""
        pages = []
        for key in keys if self.prefix_caching else ():
            page = self._page_of.get(key)
            if page is None:
                break
            if self._refs[page] == 0:
                del self._idle[page]
            self._refs[page] += 1
            pages.append(page)
        return pages

    def register(self, page: int, key) -> None:
        """Offers a full, written prompt page for sharing (the first page registered under a key wins)."""
        if self.prefix_caching and key not in self._page_of and page not in self._key_of:
            self._page_of[key] = page
            self._key_of[page] = key


@dataclasses.dataclass(eq=False)
class Sequence:
    """One request in the engine: its tokens (prompt, then generated), pages and what was sent to its caller."""

    request_id: int
    request: Request
    on_event: Callable[[Event], None]
    key_data: tuple[int, ...]  # the PRNG key of its seed, computed once
    arrival: float
    tokens: list[int] = dataclasses.field(default_factory=list)
    generated: list[int] = dataclasses.field(default_factory=list)
    logprobs: list[float] = dataclasses.field(default_factory=list)
    top_logprobs: list[dict[int, float]] = dataclasses.field(default_factory=list)
    pages: list[int] = dataclasses.field(default_factory=list)
    shared_pages: int = 0  # leading pages mapped from the prefix cache
    registered: bool = False  # its prompt pages were offered to the prefix cache
    num_cached: int = 0  # tokens whose K/V are in its pages
    slot: int = -1  # its row of the penalty state while running
    admitted: int = -1  # admission order (preemption takes the newest)
    sent_tokens: int = 0
    sent_text: str = ""
    first_token_time: float | None = None
    prompt_scores: tuple[list, list] | None = None  # (log-probs, top-n) of the prompt tokens, when asked for

    @property
    def prompt_len(self) -> int:
        return len(self.request.prompt_ids)

    @property
    def pending(self) -> int:
        """Tokens to run through the model before the next sample (1 when decoding)."""
        return len(self.tokens) - self.num_cached

    def pages_needed(self, upto: int, page_size: int) -> int:
        """More pages for the cache to hold `upto` tokens."""
        return max(0, -(-upto // page_size) - len(self.pages))
