"""How `glmtune data dedupe` scales: N near-duplicate-heavy short records -> wall time.

Data: N / 5 distinct base sentences (random CJK + ASCII words, 30-60 characters), each written 5
times: as is, and with 1-3 characters changed (Jaccard of 3-gram shingles mostly >= 0.9, some just
below). The run is the exact function the CLI calls (glmtune.data.pipeline.dedupe_file): read,
validate, exact + near dedupe, write.

    python3 bench/dedupe_scale.py --n 100000 --out bench/results/dedupe_scale.md
"""
from __future__ import annotations

import argparse
import json
import os
import random
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

CHARS = "的一是在不了有和人这中大为上个国我以要他时来用们生到作地于出就分对成会可主发年动同工也能下过子说产种面而方后多定行学法所民得经十三之进着等部度家电力里如水化高自二理起小物现实加量都两体制机当使点从业本去把性好应开它合还因由其些然前外天政四日那社义事平形相全表间样与关各重新线内数正心反你明看原又么利比或但质气第向道命此变条只没结解问意建月公无系军很情者最立代想已通并提直题党程展五果料象员革位入常文总次品式活设及管特件长求老头基资边流路级少图山统接知较将组见计别她手角期根论运农指几九区强放决西被干做必战先回则任取据处理府研质"
WORDS = ["account", "refund", "plan", "signal", "data", "bill", "roaming", "package", "service", "upgrade"]


def make_records(n: int, seed: int = 0) -> list[dict]:
    rng = random.Random(seed)
    out = []
    for _ in range(n // 5):
        base = "".join(rng.choice(CHARS) if rng.random() < 0.8 else f" {rng.choice(WORDS)} "
                       for _ in range(rng.randint(30, 60)))
        for k in range(5):
            text = list(base)
            for _ in range(0 if k == 0 else rng.randint(1, 3)):
                text[rng.randrange(len(text))] = rng.choice(CHARS)
            out.append({"messages": [{"role": "user", "content": "".join(text)},
                                     {"role": "assistant", "content": "好的"}]})
    return out


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--n", type=int, default=100_000)
    ap.add_argument("--threshold", type=float, default=0.9)
    ap.add_argument("--out", type=Path, default=None, help="Append a result row (Markdown) here.")
    args = ap.parse_args()
    from glmtune.data.pipeline import dedupe_file

    with tempfile.TemporaryDirectory() as tmp:
        src, dst = Path(tmp) / "in.jsonl", Path(tmp) / "out.jsonl"
        src.write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in make_records(args.n)),
                       encoding="utf-8")
        t0, c0 = time.perf_counter(), time.process_time()
        report = dedupe_file(src, dst, threshold=args.threshold)
        seconds, cpu = time.perf_counter() - t0, time.process_time() - c0
    # CPU seconds = what the run costs one free core (wall time also counts waiting for a busy CPU)
    row = (f"| {args.n:,} | {args.threshold} | {report.exact:,} | {report.near:,} | {report.records_out:,} "
           f"| {seconds:.1f} | {cpu:.1f} | {os.getloadavg()[0]:.1f} |")
    print(row, flush=True)
    if args.out:
        if not args.out.exists():
            args.out.parent.mkdir(parents=True, exist_ok=True)
            args.out.write_text("| records | threshold | exact dups | near dups | kept | wall s | CPU s | load avg |\n"
                                "|---|---|---|---|---|---|---|---|\n", encoding="utf-8")
        with open(args.out, "a", encoding="utf-8") as f:
            f.write(row + "\n")


if __name__ == "__main__":
    main()
