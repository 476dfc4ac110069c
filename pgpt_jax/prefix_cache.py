"""The prefix cache's index: which whole prompt blocks have their KV in the device pool, and where.

Host-only bookkeeping (process 0's planner owns it; no device, no text). The device side is
a pool of `blocks` KV blocks of BLOCK_TOKENS tokens each (`pool_programs.init_pool`); this index
maps a block's *key* to its pool id. A key stands for a whole prefix, not one block's
tokens: block j of a prompt is keyed by (key of block j-1, tokens of block j), a hash chain,
so a hit on block j means every token before it matched too (and the KV, which depends on
all of them and on their positions, is the one this prompt would compute). Keys are 128-bit
BLAKE2b digests, and each entry also keeps its parent's key and its own tokens, which a
lookup compares: a wrong hit would need two different prefixes whose keys collide.

Eviction is least recently used, over blocks nobody pins. A plan pins what it reads or
writes (`match`, `allocate`) until `unpin_all()` at the end of the plan: the ops of one plan
run in order on every process, so a block one op of the plan reads is never overwritten by a
later op of the same plan, and after the plan a later save may reuse it (the device
executes the reads first: the pool is a value passed from program to program).

Only full blocks are cached, and a prompt reuses at most the blocks before its last token
(the prefill must compute at least one token: its logits sample the first output token).
"""

from __future__ import annotations

import hashlib
from collections import OrderedDict
from typing import Optional, Sequence

BLOCK_TOKENS = 32  # tokens per block: 768-token prefixes are 24 blocks


def chain(tokens: Sequence[int], block: int = BLOCK_TOKENS) -> list[tuple[bytes, tuple]]:
    """(key, tokens) of each whole block of `tokens`, in order; key j hashes key j-1 and block j."""
    out, parent = [], b""
    for j in range(len(tokens) // block):
        part = tuple(int(t) for t in tokens[j * block:(j + 1) * block])
        h = hashlib.blake2b(parent, digest_size=16)
        h.update(b",".join(str(t).encode() for t in part))
        parent = h.digest()
        out.append((parent, part))
    return out


class _Block:
    __slots__ = ("key", "parent", "tokens", "pid")

    def __init__(self, key: bytes, parent: bytes, tokens: tuple, pid: int):
        self.key, self.parent, self.tokens, self.pid = key, parent, tokens, pid


class PrefixIndex:
    """Keys of cached blocks -> pool ids, bounded by `blocks`, least recently used evicted first."""

    def __init__(self, blocks: int, block_tokens: int = BLOCK_TOKENS):
        if blocks < 1:
            raise ValueError("a prefix cache needs at least one block")
        self.blocks, self.block_tokens = blocks, block_tokens
        self._by_key: "OrderedDict[bytes, _Block]" = OrderedDict()  # oldest use first
        self._free = list(range(blocks - 1, -1, -1))  # pool ids never used (or forgotten), lowest last
        self._pinned: set[bytes] = set()
        # Counters for /metrics: blocks asked for (whole blocks before each prompt's last
        # token) and found; tokens of prompts looked up and tokens served from the pool.
        self.queried_blocks = self.hit_blocks = self.queried_tokens = self.hit_tokens = 0

    @property
    def used(self) -> int:
        """Pool blocks holding a cached prefix block."""
        return len(self._by_key)

    def _get(self, key: bytes, parent: bytes, tokens: tuple) -> Optional[_Block]:
        b = self._by_key.get(key)
        if b is None or b.parent != parent or b.tokens != tokens:
            return None
        return b

    def match(self, tokens: Sequence[int]) -> list[int]:
        """Pool ids of the longest cached run of whole blocks at the start of `tokens`, at most
        the blocks before its last token; pinned until `unpin_all`, and now most recently used."""
        usable = (len(tokens) - 1) // self.block_tokens
        ids, keys, parent = [], [], b""
        for key, part in chain(tokens[:usable * self.block_tokens], self.block_tokens):
            b = self._get(key, parent, part)
            if b is None:
                break
            ids.append(b.pid)
            keys.append(key)
            parent = key
        self._touch(keys)
        return ids

    def record(self, tokens: Sequence[int], hit_blocks: int) -> None:
        """Counts one prompt looked up, whose first `hit_blocks` blocks were served from the pool."""
        self.queried_blocks += (len(tokens) - 1) // self.block_tokens
        self.hit_blocks += hit_blocks
        self.queried_tokens += len(tokens)
        self.hit_tokens += hit_blocks * self.block_tokens

    def allocate(self, tokens: Sequence[int]) -> dict[int, int]:
        """Pool ids for the whole blocks of `tokens` not cached yet: {block index: pool id}.
        Registers them at once (a later prompt of the same plan finds them: its op runs after
        the one that saves them) and pins them. Stops at the first block it finds no room
        for (every block pinned): a block is useful only after all of its predecessors."""
        out, keys, parent = {}, [], b""
        for j, (key, part) in enumerate(chain(tokens, self.block_tokens)):
            b = self._get(key, parent, part)
            if b is None:
                if key in self._by_key:  # a different prefix under this key: never reuse it
                    self._drop(self._by_key[key])
                pid = self._take()
                if pid is None:
                    break
                self._by_key[key] = _Block(key, parent, part, pid)
                out[j] = pid
            self._pinned.add(key)
            keys.append(key)
            parent = key
        self._touch(keys)
        return out

    def _touch(self, keys: list) -> None:
        """Most recently used, and pinned: a chain's last block first, so that its first
        blocks (which every longer match needs) are evicted last."""
        for key in reversed(keys):
            self._by_key.move_to_end(key)
            self._pinned.add(key)

    def _take(self) -> Optional[int]:
        if self._free:
            return self._free.pop()
        for key, b in self._by_key.items():  # oldest use first
            if key not in self._pinned:
                self._drop(b)
                return self._free.pop()
        return None

    def _drop(self, b: _Block) -> None:
        del self._by_key[b.key]
        self._pinned.discard(b.key)
        self._free.append(b.pid)

    def forget(self, pids) -> None:
        """The pool ids `pids` hold nothing usable (their save failed): drop their entries."""
        gone = set(int(p) for p in pids)
        for b in [b for b in self._by_key.values() if b.pid in gone]:
            self._drop(b)

    def clear(self) -> None:
        """Forgets every block (the pool was lost and starts again from zeros)."""
        self._by_key.clear()
        self._pinned.clear()
        self._free = list(range(self.blocks - 1, -1, -1))

    def unpin_all(self) -> None:
        """The plan is written: what it read or wrote may be evicted by later plans."""
        self._pinned.clear()
