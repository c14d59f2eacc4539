"""Check a prepared corpus (``cratelm verify-data DIR``): every part present and finished,
every file of the size and sha256 its part.json records, every index consistent with its
files (offsets from 0, never decreasing, one EOS ending each document), and the totals of
meta.json equal to the sum of the parts. Reads every token file once (sha256)."""

from __future__ import annotations

import json
import os
import re
from pathlib import Path

import numpy as np

from cratelm.data.indexed import DTYPES, META_FILE, PART_FILE, read_index, read_part
from cratelm.utils import file_sha256

_PART = re.compile(r"part-(\d{5})-of-(\d{5})$")


def verify_corpus(corpus_dir: str | os.PathLike, hashes: bool = True) -> list[str]:
    """Problems found in the corpus at ``corpus_dir`` (empty: it is complete and consistent).
    ``hashes=False`` skips the sha256 of the token files (sizes and indexes still checked)."""
    out = Path(corpus_dir)
    problems: list[str] = []
    parts_found = sorted(p.name for p in out.glob("part-*") if _PART.match(p.name))
    if not parts_found:
        return [f"{out}: no part-IIIII-of-NNNNN directory (not a version 2 corpus, or nothing finished)"]
    n = int(_PART.match(parts_found[0]).group(2))
    expected = [f"part-{i:05d}-of-{n:05d}" for i in range(n)]
    problems += [f"{out / p}: missing (part {int(p[5:10])} of {n} not finished)" for p in expected
                 if p not in parts_found]
    problems += [f"{out / p}: a part of another sharding" for p in parts_found if p not in expected]
    totals: dict[str, dict[str, int]] = {}
    settings = None
    for part in [p for p in expected if p in parts_found]:
        try:
            info = read_part(out, part)
        except ValueError as e:
            problems.append(str(e))
            continue
        if settings is None:
            settings = info["settings"]
        elif info["settings"] != settings:
            problems.append(f"{out / part / PART_FILE}: settings differ from part 0's (another run's part?)")
        for name, s in info["splits"].items():
            problems += _check_split(out / part, name, s, settings["eos_id"], hashes)
            tot = totals.setdefault(name, {"num_tokens": 0, "num_documents": 0, "num_bytes": 0})
            for k in tot:
                tot[k] += s[k]
    meta_path = out / META_FILE
    if not meta_path.exists():
        problems.append(f"{meta_path}: missing (written when the last part finishes; "
                        f"`cratelm verify-data --finalize` writes it once every part is there)")
    elif not problems:
        meta = json.loads(meta_path.read_text(encoding="utf-8"))
        if meta.get("splits") != {k: v for k, v in totals.items() if v["num_documents"]}:
            problems.append(f"{meta_path}: splits {meta.get('splits')} differ from the parts' sums {totals}")
        if meta.get("parts") != expected:
            problems.append(f"{meta_path}: lists parts {meta.get('parts')}, expected {expected}")
    return problems


def _check_split(folder: Path, name: str, s: dict, eos_id: int, hashes: bool) -> list[str]:
    problems = []
    idx = folder / s["index"]
    try:
        dtype, offsets = read_index(idx)
    except ValueError as e:
        return [str(e)]
    if len(offsets) - 1 != s["num_documents"] or int(offsets[-1]) != s["num_tokens"]:
        problems.append(f"{idx}: {len(offsets) - 1} documents / {int(offsets[-1])} tokens, part.json says "
                        f"{s['num_documents']} / {s['num_tokens']}")
    if offsets[0] != 0 or np.any(np.diff(offsets) <= 0):
        problems.append(f"{idx}: offsets do not start at 0 and increase")
    if sum(f["num_tokens"] for f in s["files"]) != s["num_tokens"]:
        problems.append(f"{folder / PART_FILE}: split {name}'s files hold {sum(f['num_tokens'] for f in s['files'])} "
                        f"tokens, not {s['num_tokens']}")
    if hashes and file_sha256(idx) != s["index_sha256"]:
        problems.append(f"{idx}: sha256 differs from part.json")
    base, ends = 0, offsets[1:]
    for f in s["files"]:
        path = folder / f["file"]
        size = path.stat().st_size if path.exists() else None
        if size != f["num_tokens"] * DTYPES[dtype].itemsize:
            problems.append(f"{path}: {'missing' if size is None else f'{size} bytes'}, expected "
                            f"{f['num_tokens'] * DTYPES[dtype].itemsize}")
            continue
        if hashes and file_sha256(path) != f["sha256"]:
            problems.append(f"{path}: sha256 differs from part.json (corrupted or rewritten)")
        if f["num_tokens"]:
            tokens = np.memmap(path, dtype=DTYPES[dtype], mode="r")
            local = ends[(ends > base) & (ends <= base + f["num_tokens"])] - base - 1
            if np.any(tokens[local] != eos_id):
                problems.append(f"{path}: a document does not end with EOS ({eos_id})")
        base += f["num_tokens"]
    return problems
