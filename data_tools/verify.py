"""Check a prepared corpus against its manifest: every shard's size, SHA-256 and tar members.

    python -m data_tools.verify data/mycorpus

Prints one `error: ...` line per bad shard and exits with status 2 if there is any; reads
every byte, so it takes as long as reading the corpus once.
"""

import sys
from pathlib import Path

from gpt2dist.arguments import Parser
from gpt2dist.fileio import sha256_of
from gpt2dist.data.shards import CorpusError, read_manifest, shard_offsets, shard_path


def problems(corpus_dir: Path) -> list[str]:
    """What is wrong with the corpus, one line per shard (an empty list if nothing)."""
    manifest = read_manifest(corpus_dir)
    found = []
    for split in manifest["splits"].values():
        for s in split["shards"]:
            path = shard_path(corpus_dir, s["file"])
            if not path.is_file():
                found.append(f"{path}: missing")
            elif path.stat().st_size != s["bytes"]:
                found.append(f"{path}: {path.stat().st_size:,} bytes, but the manifest says {s['bytes']:,}")
            elif sha256_of(path) != s["sha256"]:
                found.append(f"{path}: SHA-256 differs from the manifest (damaged or replaced)")
            else:
                try:
                    shard_offsets(path, s["blocks"], manifest["block_tokens"])
                except CorpusError as e:
                    found.append(str(e))
    return found


def main(argv: list[str] | None = None) -> int:
    p = Parser("python -m data_tools.verify", __doc__)
    p.add_argument("corpus", type=Path, help="a directory written by data_tools.prepare")
    args = p.parse_args(argv)
    try:
        found = problems(args.corpus)
    except CorpusError as e:
        found = [str(e)]
    for line in found:
        print(f"error: {line}", file=sys.stderr)
    if found:
        return 2
    manifest = read_manifest(args.corpus)
    shards = sum(len(s["shards"]) for s in manifest["splits"].values())
    tokens = sum(s["tokens"] for s in manifest["splits"].values())
    print(f"ok: {args.corpus}: {shards} shards, {tokens:,} tokens match the manifest")
    return 0


if __name__ == "__main__":
    sys.exit(main())
