"""The IMDB reviews (Maas et al. 2011) as npgpt inputs for GPT-1's experiment. Research use only: the
text is read from ../shared/data/imdb and written under runs/, never into the repository.

    python examples/imdb_data.py --imdb ../shared/data/imdb --out runs/imdb

writes
    pretrain.jsonl   the 50,000 unlabelled reviews and the 20,000 labelled training reviews outside the dev
                     split, *without their labels*, in a seeded random order ({"text"} per line; `npgpt
                     prepare` separates documents with <|endoftext|>)
    train.jsonl      those 20,000 labelled reviews ({"text", "label": "positive"|"negative"})
    dev.jsonl        the dev split: 5,000 training reviews drawn with seed 0, 2,500 of each label, never
                     in pretraining
HTML line breaks (<br />) become newlines; nothing else is changed.
"""
from __future__ import annotations

import argparse
import gzip
import json
import random
import sys
from pathlib import Path

DEV_SEED, DEV_PER_LABEL = 0, 2500


def clean(text: str) -> str:
    """A review as plain text: the archive's HTML line breaks become newlines."""
    return text.replace("<br />", "\n").replace("<br/>", "\n").strip()


def read_gz_jsonl(path: Path) -> list[dict]:
    with gzip.open(path, "rt", encoding="utf-8") as f:
        return [json.loads(line) for line in f if line.strip()]


def split(train: list[dict]):
    """(dev, rest): 2,500 reviews of each label drawn with DEV_SEED; the rest keep the file's order."""
    rng = random.Random(DEV_SEED)
    dev_ids = set()
    for label in (0, 1):
        ids = sorted(r["id"] for r in train if r["label"] == label)
        dev_ids.update(rng.sample(ids, DEV_PER_LABEL))
    dev = [r for r in train if r["id"] in dev_ids]
    rest = [r for r in train if r["id"] not in dev_ids]
    return dev, rest


def write_jsonl(path: Path, records):
    tmp = path.with_suffix(".tmp")
    with open(tmp, "w", encoding="utf-8") as f:
        for r in records:
            f.write(json.dumps(r, ensure_ascii=False) + "\n")
    tmp.replace(path)


def labelled(r: dict) -> dict:
    return {"text": clean(r["text"]), "label": "positive" if r["label"] == 1 else "negative"}


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--imdb", default="../shared/data/imdb", help="folder with train.jsonl.gz and unsup.jsonl.gz")
    ap.add_argument("--out", default="runs/imdb")
    args = ap.parse_args()
    src, out = Path(args.imdb), Path(args.out)
    for f in ("train.jsonl.gz", "unsup.jsonl.gz"):
        if not (src / f).is_file():
            sys.exit(f"IMDB not found: {src / f} is missing (it may not be shipped; pass --imdb with its folder)")
    out.mkdir(parents=True, exist_ok=True)
    train, unsup = read_gz_jsonl(src / "train.jsonl.gz"), read_gz_jsonl(src / "unsup.jsonl.gz")
    dev, rest = split(train)
    docs = [clean(r["text"]) for r in unsup] + [clean(r["text"]) for r in rest]
    random.Random(1).shuffle(docs)
    write_jsonl(out / "pretrain.jsonl", ({"text": d} for d in docs))
    write_jsonl(out / "train.jsonl", map(labelled, rest))
    write_jsonl(out / "dev.jsonl", map(labelled, dev))
    chars = sum(len(d) for d in docs)
    print(f"{out}: pretrain {len(docs):,} reviews ({chars:,} characters), train {len(rest):,}, dev {len(dev):,}")


if __name__ == "__main__":
    main()
