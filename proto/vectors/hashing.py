#!/usr/bin/env python3
"""Writes proto/vectors/hashing.json from the rules in docs/HASHING.md.

The vectors must come from an implementation independent of the Rust code they test, so
BLAKE3 is implemented here in plain Python from its specification (the hash function of
the BLAKE3 paper, unkeyed, 32-byte output), and checked against the specification's own
test values before any vector is written. Run: python3 proto/vectors/hashing.py
"""

import json
import struct
from pathlib import Path

IV = [0x6A09E667, 0xBB67AE85, 0x3C6EF372, 0xA54FF53A, 0x510E527F, 0x9B05688C, 0x1F83D9AB, 0x5BE0CD19]
PERMUTATION = [2, 6, 3, 10, 7, 0, 4, 13, 1, 11, 12, 5, 9, 14, 15, 8]
CHUNK_START, CHUNK_END, PARENT, ROOT = 1, 2, 4, 8
BLOCK_LEN, CHUNK_LEN = 64, 1024
MASK = 0xFFFFFFFF


def rotr(x, n):
    return ((x >> n) | (x << (32 - n))) & MASK


def g(s, a, b, c, d, mx, my):
    s[a] = (s[a] + s[b] + mx) & MASK
    s[d] = rotr(s[d] ^ s[a], 16)
    s[c] = (s[c] + s[d]) & MASK
    s[b] = rotr(s[b] ^ s[c], 12)
    s[a] = (s[a] + s[b] + my) & MASK
    s[d] = rotr(s[d] ^ s[a], 8)
    s[c] = (s[c] + s[d]) & MASK
    s[b] = rotr(s[b] ^ s[c], 7)


def compress(cv, block_words, counter, block_len, flags):
    s = cv[:] + IV[:4] + [counter & MASK, (counter >> 32) & MASK, block_len, flags]
    m = block_words[:]
    for r in range(7):
        g(s, 0, 4, 8, 12, m[0], m[1])
        g(s, 1, 5, 9, 13, m[2], m[3])
        g(s, 2, 6, 10, 14, m[4], m[5])
        g(s, 3, 7, 11, 15, m[6], m[7])
        g(s, 0, 5, 10, 15, m[8], m[9])
        g(s, 1, 6, 11, 12, m[10], m[11])
        g(s, 2, 7, 8, 13, m[12], m[13])
        g(s, 3, 4, 9, 14, m[14], m[15])
        if r < 6:
            m = [m[i] for i in PERMUTATION]
    return [s[i] ^ s[i + 8] for i in range(8)]


def words(block):
    return list(struct.unpack("<16I", block.ljust(BLOCK_LEN, b"\0")))


def chunk_output(data, counter):
    """(chaining value input, last block words, last block length, flags) of one chunk."""
    cv = IV[:]
    blocks = [data[i:i + BLOCK_LEN] for i in range(0, max(len(data), 1), BLOCK_LEN)] or [b""]
    for i, block in enumerate(blocks[:-1]):
        cv = compress(cv, words(block), counter, BLOCK_LEN, CHUNK_START if i == 0 else 0)
    last = blocks[-1]
    flags = CHUNK_END | (CHUNK_START if len(blocks) == 1 else 0)
    return cv, words(last), len(last), flags, counter


def blake3(data):
    chunks = [data[i:i + CHUNK_LEN] for i in range(0, len(data), CHUNK_LEN)] or [b""]

    def finish(out):
        cv, w, length, flags, counter = out
        return compress(cv, w, counter, length, flags)

    def subtree(lo, hi):
        """The output node of chunks lo..hi; the left subtree takes the largest power of
        two of chunks that is less than their number."""
        if hi - lo == 1:
            return chunk_output(chunks[lo], lo)
        left = 1 << ((hi - lo - 1).bit_length() - 1)
        return IV[:], finish(subtree(lo, lo + left)) + finish(subtree(lo + left, hi)), BLOCK_LEN, PARENT, 0

    cv, w, length, flags, counter = subtree(0, len(chunks))
    return struct.pack("<8I", *compress(cv, w, counter, length, flags | ROOT))


def u32be(n):
    return struct.pack(">I", n)


def u64be(n):
    return struct.pack(">Q", n)


def payload_hash(payload):
    return blake3(payload)


def chain_hash(prev, stream_id, seq, kind, phash):
    s, k = stream_id.encode(), kind.encode()
    return blake3(prev + u32be(len(s)) + s + u64be(seq) + u32be(len(k)) + k + phash)


def key_hash(stream_id, key):
    s = stream_id.encode()
    return blake3(u32be(len(s)) + s + key.encode())[:16]


def window_key(stream_id, bucket):
    s = stream_id.encode()
    return blake3(b"khala.window" + u32be(len(s)) + s + u64be(bucket))[:16]


def self_check():
    # The BLAKE3 specification's test vectors for the empty input and one zero byte.
    assert blake3(b"").hex() == "af1349b9f5f9a1a6a0404dea36dcc9499bcb25c9adc112b7cc9a93cae41f3262"
    assert blake3(b"\0").hex() == "2d3adedff11b61f14c886e35afa036736dcd87a74d27b5c1510225d0f592e213"
    # Where the `blake3` package (the official bindings) is installed, agree with it on
    # every tree shape up to 5 chunks.
    try:
        import blake3 as official
    except ImportError:
        return
    for n in list(range(0, 200)) + [1023, 1024, 1025, 2047, 2048, 2049, 3072, 4096, 4097, 5120]:
        data = bytes(i % 251 for i in range(n))
        assert blake3(data) == official.blake3(data).digest(), f"{n} bytes"


def main():
    self_check()
    payloads = ["", "{}", '{"a":1,"b":[true,null,"x"]}', "héllo", "x" * 300]
    chain_stream = "runtime.run.42.events"
    chain_events = [
        (1, "run.started", '{"run":42}'),
        (2, "run.step", '{"n":1}'),
        (3, "run.step", '{"n":2,"note":"ünïcode"}'),
        (4, "run.finished", "{}"),
    ]
    prev = bytes(32)
    events = []
    for seq, kind, payload in chain_events:
        prev = chain_hash(prev, chain_stream, seq, kind, payload_hash(payload.encode()))
        events.append({"seq": seq, "kind": kind, "payload_utf8": payload, "chain_hash": prev.hex()})
    keys = [
        ("runtime.run.42.events", "topic:run:42:events:seq:1:kind:run.started"),
        ("ab", "c"),
        ("a", "bc"),
    ]
    windows = [("runtime.run.42.events", 0), ("runtime.run.42.events", 1), ("s", 123456789)]
    out = {
        "comment": "Written by proto/vectors/hashing.py, a plain-Python BLAKE3 from the specification (checked against the specification's own vectors); never regenerate from the Rust code.",
        "payload": [{"payload_utf8": p, "payload_hash": payload_hash(p.encode()).hex()} for p in payloads],
        "chain": {"stream_id": chain_stream, "events": events},
        "key": [{"stream_id": s, "key": k, "key_hash": key_hash(s, k).hex()} for s, k in keys],
        "window": [{"stream_id": s, "bucket": b, "window_key": window_key(s, b).hex()} for s, b in windows],
    }
    path = Path(__file__).with_name("hashing.json")
    path.write_text(json.dumps(out, indent=2, ensure_ascii=False) + "\n")
    print(f"wrote {path}")


if __name__ == "__main__":
    main()
