"""A bounded prefix tree of recent prompts, for cache-aware routing (pure).

One ``PrefixTree`` per model. It is a radix tree over characters: each node holds the text of the
edge from its parent, and the workers that served a prompt passing through it, each with the
logical time (a counter bumped once per recorded prompt, never wall time) it last did so. A
worker marked on a node is marked on every ancestor too, so the workers of a child are a subset
of its parent's: a walk down the tree can stop as soon as none of the candidates is left.

Memory is bounded by ``max_chars``: the total length of all edge texts, plus ``node_chars`` (32)
for every node, so that prompts crafted to branch at every character cannot make the per-node
overhead outgrow the bound. A prompt is stored up to ``max_chars // 2`` characters. Over the
bound, the least recently used leaves are evicted: a lazy min-heap of ``(tick, seq, leaf)`` holds
an entry for each leaf's current tick (stale entries are skipped when popped, and the heap is
rebuilt when stale entries outnumber the nodes). A prefix is touched whenever any prompt
extending it is, so it is never older than its extensions: eviction eats prompts from the end.

Several workers can hold one node (a hot prompt that routing spread over more workers is marked
on each of them, and ``match_lengths`` tells how much of a prompt each one holds). The holders of
a node are bounded by the workers serving the model: ``forget`` drops a worker that leaves.

Costs: ``match``, ``match_lengths`` and ``record`` walk one path; comparing an edge is a C-level
``startswith``, so a long shared prefix costs little Python work. ``forget`` visits only the
nodes the worker is on.
"""

from __future__ import annotations

import heapq
import itertools
from collections.abc import Iterable

from actors.core.model import WorkerId


class _Node:
    __slots__ = ("children", "parent", "text", "tick", "workers")

    def __init__(self, text: str, parent: _Node | None, tick: int) -> None:
        self.text = text
        self.parent = parent  # None for the root and for a node that was removed
        self.children: dict[str, _Node] = {}  # by the first character of the child's text
        self.workers: dict[WorkerId, int] = {}  # worker -> tick it last served through here
        self.tick = tick  # last tick any prompt passed through this node


def _common_length(text: str, prompt: str, pos: int) -> int:
    """How many leading characters of ``text`` match ``prompt`` from ``pos``."""
    if prompt.startswith(text, pos):
        return len(text)
    low, high = 0, min(len(text), len(prompt) - pos)
    while low < high:  # largest n with text[:n] == prompt[pos:pos + n]
        mid = (low + high + 1) // 2
        if prompt.startswith(text[:mid], pos):
            low = mid
        else:
            high = mid - 1
    return low


class PrefixTree:
    """The prompts recently routed for one model, and which workers served them."""

    def __init__(self, max_chars: int, *, node_chars: int = 32) -> None:
        if max_chars < 1 or node_chars < 0:
            raise ValueError("max_chars must be positive and node_chars not negative")
        self.max_chars = max_chars
        self.node_chars = node_chars
        self._root = _Node("", None, 0)
        self._tick = 0
        self._chars = 0
        self._nodes = 0
        self._heap: list[tuple[int, int, _Node]] = []
        self._seq = itertools.count()

    @property
    def chars(self) -> int:
        """Characters stored (the sum of the edge texts)."""
        return self._chars

    @property
    def size(self) -> int:
        """What the bound counts: ``chars + node_chars * nodes``; never above ``max_chars``."""
        return self._chars + self.node_chars * self._nodes

    @property
    def nodes(self) -> int:
        return self._nodes

    @property
    def heap_size(self) -> int:
        return len(self._heap)

    def match(self, prompt: str, candidates: Iterable[WorkerId]) -> tuple[int, dict[WorkerId, int]]:
        """The longest prefix of ``prompt`` that some candidate served: its length, and those
        candidates with the tick each last served it (empty when no candidate matches)."""
        node, pos = self._root, 0
        hits: dict[WorkerId, int] = {}
        length = 0
        pool: Iterable[WorkerId] = candidates
        while pos < len(prompt):
            child = node.children.get(prompt[pos])
            if child is None:
                break
            workers = child.workers
            found = {w: t for w in pool if (t := workers.get(w)) is not None}
            if not found:
                break  # the child's descendants serve a subset of its workers
            hits, pool = found, found
            n = _common_length(child.text, prompt, pos)
            length = pos + n
            if n < len(child.text):
                break
            node, pos = child, length
        return length, hits

    def match_lengths(self, prompt: str, candidates: Iterable[WorkerId]) -> dict[WorkerId, int]:
        """For each candidate, the length of the longest prefix of ``prompt`` it served; only
        candidates with a match above 0 are listed. One walk down one path: a candidate leaves
        the pool at the first node it is not on (nor is it on any node below)."""
        lengths: dict[WorkerId, int] = {}
        node, pos, end = self._root, 0, len(prompt)
        pool = set(candidates)
        while pos < end:
            child = node.children.get(prompt[pos])
            if child is None:
                break
            workers = child.workers
            if len(workers) < len(pool) or not pool.issubset(workers):
                found = pool.intersection(workers)
                if pos:
                    for w in pool.difference(found):
                        lengths[w] = pos
                if not found:
                    return lengths
                pool = found
            text = child.text
            if prompt.startswith(text, pos):
                pos += len(text)
                node = child
            else:
                pos += _common_length(text, prompt, pos)
                break
        if pos:
            for w in pool:
                lengths[w] = pos
        return lengths

    def record(self, prompt: str, worker_id: WorkerId) -> None:
        """Remember that ``worker_id`` served ``prompt`` (at most ``max_chars // 2`` of it)."""
        prompt = prompt[: self.max_chars // 2]
        if not prompt:
            return
        self._tick += 1
        tick = self._tick
        node, pos = self._root, 0
        node.tick = tick
        while pos < len(prompt):
            child = node.children.get(prompt[pos])
            if child is None:
                child = _Node(prompt[pos:], node, tick)
                node.children[prompt[pos]] = child
                self._chars += len(child.text)
                self._nodes += 1
                pos = len(prompt)
            else:
                n = _common_length(child.text, prompt, pos)
                if n < len(child.text):
                    child = self._split(child, n)
                pos += n
            child.workers[worker_id] = tick
            child.tick = tick
            node = child
        if not node.children:
            self._push(node)
        self._evict()

    def forget(self, worker_id: WorkerId) -> None:
        """Drop every mark of ``worker_id``; nodes no worker is left on are removed."""
        stack = [self._root]
        while stack:
            for child in list(stack.pop().children.values()):
                if child.workers.pop(worker_id, None) is None:
                    continue  # nor is it on any descendant
                if child.workers:
                    stack.append(child)
                else:
                    self._remove(child)

    def _split(self, child: _Node, n: int) -> _Node:
        """Cut ``child``'s edge after ``n`` characters; return the new upper node."""
        parent = child.parent
        assert parent is not None
        upper = _Node(child.text[:n], parent, child.tick)
        upper.workers = dict(child.workers)
        parent.children[upper.text[0]] = upper
        child.text = child.text[n:]
        child.parent = upper
        upper.children[child.text[0]] = child
        self._nodes += 1
        return upper

    def _push(self, leaf: _Node) -> None:
        heapq.heappush(self._heap, (leaf.tick, next(self._seq), leaf))
        if len(self._heap) > 2 * self._nodes + 64:
            self._heap = [(n.tick, next(self._seq), n) for n in self._leaves()]
            heapq.heapify(self._heap)

    def _leaves(self) -> list[_Node]:
        leaves, stack = [], [self._root]
        while stack:
            node = stack.pop()
            if node.children:
                stack.extend(node.children.values())
            elif node is not self._root:
                leaves.append(node)
        return leaves

    def _evict(self) -> None:
        while self.size > self.max_chars and self._heap:
            tick, _, node = heapq.heappop(self._heap)
            if node.parent is not None and not node.children and node.tick == tick:
                self._remove(node)

    def _remove(self, node: _Node) -> None:
        """Detach ``node`` and its subtree; its parent, if left childless, becomes a leaf."""
        parent = node.parent
        assert parent is not None
        del parent.children[node.text[0]]
        stack = [node]
        while stack:
            gone = stack.pop()
            gone.parent = None  # makes its heap entries stale
            self._chars -= len(gone.text)
            self._nodes -= 1
            stack.extend(gone.children.values())
        if parent is not self._root and not parent.children:
            self._push(parent)
