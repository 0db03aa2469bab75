"""The KV-cache model of the fake worker: a paged prefix cache and a worker's service times.

Pure and deterministic (no trio, no I/O): the timed part, which queues requests on trio's clock,
lives in ``scripts/fake_worker.py`` (``CacheSimulator``) and calls these functions.

* **Tokens** are the whitespace-separated words of the prompt (``tokenize``).
* **Blocks**: ``block_tokens`` consecutive tokens. Only whole blocks are cached, as in a paged
  KV cache; a prompt's trailing partial block never is.
* **A block's identity** is a hash of the whole prefix up to and including it (``block_hashes``
  chains each block's hash onto its parent's), so two prompts share a block only if they agree on
  every token before it: the same rule as a radix tree of pages.
* **Cached tokens** of a prompt: the longest run of its leading blocks that are all present
  (``PrefixCache.match``) times ``block_tokens``.
* **Insertion** (after prefill): every whole block of the prompt is added or touched, deepest
  first, so a prefix is never less recent than what hangs below it.
* **Eviction**: least recently used block first, while more than ``capacity_blocks`` are held.
  Because a prefix is always at least as recent as its extensions, leaves go before their
  parents (a radix cache's leaf-first LRU), and a prompt longer than the whole cache keeps its
  leading blocks.
* **Service time** (``ServiceTimes``): prefill costs ``prefill_ms_per_token`` per uncached
  token, decode ``decode_ms_per_token`` per generated token after the first (the first token is
  produced by the prefill).
"""

from __future__ import annotations

import hashlib
from collections import OrderedDict
from collections.abc import Sequence
from dataclasses import dataclass

BlockHash = bytes
_ROOT = b"\x00" * 16


def tokenize(text: str) -> list[str]:
    """The tokens of ``text``: its whitespace-separated words."""
    return text.split()


def prompt_text(request: object) -> str | None:
    """The prompt of an OpenAI-style body: chat messages' string contents joined by a space, or
    ``prompt`` (a string, or a list of strings); None when it has neither."""
    if not isinstance(request, dict):
        return None
    messages = request.get("messages")
    if isinstance(messages, list):
        parts = [m.get("content") for m in messages if isinstance(m, dict)]
        return " ".join(p for p in parts if isinstance(p, str))
    prompt = request.get("prompt")
    if isinstance(prompt, str):
        return prompt
    if isinstance(prompt, list) and all(isinstance(p, str) for p in prompt):
        return " ".join(prompt)
    return None


def block_hashes(tokens: Sequence[str], block_tokens: int) -> list[BlockHash]:
    """One hash per whole block of ``tokens``, each covering the whole prefix up to its end."""
    if block_tokens < 1:
        raise ValueError("block_tokens must be at least 1")
    hashes: list[BlockHash] = []
    parent = _ROOT
    for end in range(block_tokens, len(tokens) + 1, block_tokens):
        block = "\x1f".join(tokens[end - block_tokens : end]).encode()
        parent = hashlib.blake2b(parent + block, digest_size=16).digest()
        hashes.append(parent)
    return hashes


class PrefixCache:
    """An LRU set of block hashes with room for ``capacity_blocks`` (0: caches nothing)."""

    def __init__(self, capacity_blocks: int) -> None:
        if capacity_blocks < 0:
            raise ValueError("capacity_blocks must be at least 0")
        self.capacity_blocks = capacity_blocks
        self._blocks: OrderedDict[BlockHash, None] = OrderedDict()  # least recent first
        self.evictions = 0

    def __len__(self) -> int:
        return len(self._blocks)

    def __contains__(self, block: object) -> bool:
        return block in self._blocks

    def blocks(self) -> list[BlockHash]:
        """The held blocks, least recently used first."""
        return list(self._blocks)

    def match(self, hashes: Sequence[BlockHash]) -> int:
        """How many leading blocks of ``hashes`` are held (nothing is touched)."""
        n = 0
        for block in hashes:
            if block not in self._blocks:
                break
            n += 1
        return n

    def insert(self, hashes: Sequence[BlockHash]) -> None:
        """Add or touch every block, deepest first; then evict down to the capacity."""
        blocks = self._blocks
        for block in reversed(hashes):
            if block in blocks:
                blocks.move_to_end(block)
            else:
                blocks[block] = None
        while len(blocks) > self.capacity_blocks:
            blocks.popitem(last=False)
            self.evictions += 1


@dataclass(frozen=True, slots=True, kw_only=True)
class ServiceTimes:
    """Per-token costs of one worker, in milliseconds."""

    prefill_ms_per_token: float = 1.0
    decode_ms_per_token: float = 20.0

    def prefill_secs(self, uncached_tokens: int) -> float:
        return max(0, uncached_tokens) * self.prefill_ms_per_token / 1000

    def decode_secs(self, generated_tokens: int) -> float:
        """Decode time after the first token (which the prefill yields)."""
        return max(0, generated_tokens - 1) * self.decode_ms_per_token / 1000


@dataclass(frozen=True, slots=True)
class Lookup:
    """What a prompt finds in a cache: ``cached`` of its ``prompt`` tokens are reused."""

    prompt_tokens: int
    cached_tokens: int
    hashes: tuple[BlockHash, ...]

    @property
    def uncached_tokens(self) -> int:
        return self.prompt_tokens - self.cached_tokens


def look_up(cache: PrefixCache, text: str, block_tokens: int) -> Lookup:
    """Tokenize ``text`` and match its blocks against ``cache`` (nothing is touched)."""
    tokens = tokenize(text)
    hashes = block_hashes(tokens, block_tokens)
    return Lookup(len(tokens), cache.match(hashes) * block_tokens, tuple(hashes))
