#!/usr/bin/env python3
"""Cut the small sample corpus btm ships (data/sample/) from the shared four-domain corpus.

    python3 scripts/make_sample.py --corpus ../shared/corpus --out data/sample

Only text whose license allows redistribution with this project is taken:
  scripture  King James Bible (public domain)
  code       CPython 3.11 standard library (Python Software Foundation License)
  computing  Jargon File entries only (public domain); FOLDOC entries (GFDL) are skipped
Documents are taken whole, in corpus order, until each split's byte budget is reached.
"""
import argparse
import json
import os

BUDGET = {"train": 200_000, "valid": 24_000, "test": 24_000}
MAX_DOC = 12_000  # skip very long documents so the sample covers more of them


def keep(domain, doc):
    if domain == "computing":
        return doc["id"].startswith("jargon")
    return True


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--corpus", default="../shared/corpus")
    ap.add_argument("--out", default="data/sample")
    args = ap.parse_args()
    for domain in ["scripture", "code", "computing"]:
        os.makedirs(os.path.join(args.out, domain), exist_ok=True)
        for split, budget in BUDGET.items():
            total, kept = 0, []
            with open(os.path.join(args.corpus, domain, f"{split}.jsonl"), encoding="utf-8") as f:
                for line in f:
                    doc = json.loads(line)
                    n = len(doc["text"].encode("utf-8"))
                    if not keep(domain, doc) or n > MAX_DOC:
                        continue
                    if total + n > budget:
                        break
                    kept.append({"id": doc["id"], "text": doc["text"]})
                    total += n
            with open(os.path.join(args.out, domain, f"{split}.jsonl"), "w", encoding="utf-8") as f:
                for doc in kept:
                    f.write(json.dumps(doc, ensure_ascii=False) + "\n")
            print(f"{domain}/{split}: {len(kept)} documents, {total} bytes")


if __name__ == "__main__":
    main()
