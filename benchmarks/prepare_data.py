"""Throughput and memory of the data preparation (``python -m hf_ivonpc.data.prepare``).

Generates a synthetic local ``.jsonl`` corpus of English-like text (a Zipf-distributed vocabulary
of 200,000 pseudo-words around the most common English words, documents of ~800 words on
average, with punctuation and paragraphs; deterministic for a seed), then prepares it with each
of ``--num_procs`` in a fresh subprocess (``--overwrite --no_progress``, GPT-2 tokenizer) and
reports, for each run:

* ``tokens_per_s``: tokens written / the preparation's own time (reading, tokenizing, writing,
  publishing; from the summary line the command prints), and ``wall_tokens_per_s`` over the whole
  subprocess (interpreter start, imports and tokenizer load included);
* ``peak_rss_tree_mb``: the peak over time of the summed RSS of the process and its workers
  (psutil, sampled every ``--interval`` s, USS every ``--uss_interval`` s; pages shared after fork are counted once per process,
  so it is an upper bound), ``peak_uss_tree_mb`` (the same with unique set sizes, when readable)
  and ``peak_rss_max_process_mb`` (the largest single process). Without psutil:
  ``resource.getrusage(RUSAGE_CHILDREN).ru_maxrss``, the largest single process only;
* ``owt_hours``: the time OpenWebText's 9.04e9 GPT-2 tokens would take at ``tokens_per_s``.

``--sizes 50,200`` repeats this for several corpus sizes: the peak RSS should stay flat while the
corpus grows (memory is bounded by a few batches per process, not by the corpus).

    python benchmarks/prepare_data.py [--size_mb 200] [--sizes 50,200] [--num_procs 1,2]
                                      [--batch_size 1024] [--json results/prepare_data.json]

Synthetic text is a proxy: a real corpus has another mix of words (and the tokenizer's word cache
hits differently), so confirm the extrapolation on a slice of the real corpus. Run it on a quiet
machine: the numbers are wall-clock rates. ``--size_mb 2`` checks that the script runs.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

try:
    import psutil
except ImportError:   # optional: fall back to getrusage of the children
    psutil = None

REPO = Path(__file__).resolve().parents[1]
OWT_TOKENS = 9.04e9
COMMON = ("the of and to a in is that it was for on are with as I his they be at one have this from "
          "or had by not word but what some we can out other were all there when up use your how said "
          "an each she which do their time if will way about many then them write would like so these "
          "her long make thing see him two has look more day could go come did number sound no most "
          "people my over know water than call first who may down side been now find").split()
SYLLABLES = ("ka ri to men sa lo de vi na pe tor al in ber ston ish ment ly ed ing er an con pro ex "
             "re un tion ous ive at or ble com par ti la mo fi ru ne go sta tri").split()


def make_corpus(path: Path, size_mb: float, seed: int = 0) -> dict:
    """Write a ``.jsonl`` of about ``size_mb`` MB (``{"text": ...}`` lines); returns its stats."""
    rng = np.random.default_rng(seed)
    n_vocab = 200_000
    words = list(COMMON)
    while len(words) < n_vocab:
        k = rng.integers(1, 5, size=4096)
        parts = rng.integers(0, len(SYLLABLES), size=(4096, 4))
        words.extend("".join(SYLLABLES[j] for j in row[:n]) for row, n in zip(parts, k))
    words = np.array(words[:n_vocab], dtype=object)
    ranks = np.arange(1, n_vocab + 1)
    cdf = np.cumsum(1.0 / ranks ** 1.07)
    cdf /= cdf[-1]
    suffixes = np.array([".\n\n", ".", ",", ""], dtype=object)
    target = int(size_mb * 1e6)
    written = docs = 0
    with open(path, "w", encoding="utf-8") as f:
        while written < target:
            n = max(5, int(rng.lognormal(6.4, 0.8)))       # ~800 words on average, a long tail
            w = words[np.minimum(np.searchsorted(cdf, rng.random(n)), n_vocab - 1)]
            caps = rng.random(n) < 0.06
            w[caps] = [x.capitalize() for x in w[caps]]
            e = rng.random(n)
            w = w + suffixes[np.select([e < 0.01, e < 0.06, e < 0.12], [0, 1, 2], 3)]
            line = json.dumps({"text": " ".join(w).replace("\n\n ", "\n\n")}, ensure_ascii=False) + "\n"
            f.write(line)
            written += len(line.encode("utf-8"))
            docs += 1
    return {"path": str(path), "bytes": written, "documents": docs}


def _tree(proc):
    try:
        return [proc] + proc.children(recursive=True)
    except psutil.Error:
        return [proc]


def run_prepare(corpus: Path, out: Path, num_proc: int, batch_size: int, interval: float,
                uss_interval: float) -> dict:
    cmd = [sys.executable, "-m", "hf_ivonpc.data.prepare", "--dataset", str(corpus), "--out", str(out),
           "--num_proc", str(num_proc), "--batch_size", str(batch_size), "--overwrite", "--no_progress"]
    env = dict(os.environ, HF_HUB_OFFLINE="1", HF_DATASETS_OFFLINE="1")
    t0 = time.perf_counter()
    proc = subprocess.Popen(cmd, cwd=REPO, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    peak_rss = peak_uss = peak_one = 0
    uss_ok = psutil is not None
    if psutil is not None:
        root = psutil.Process(proc.pid)
        next_uss = time.perf_counter()
        while proc.poll() is None:
            rss = uss = one = 0
            with_uss = uss_ok and time.perf_counter() >= next_uss   # smaps is costly: less often
            if with_uss:
                next_uss = time.perf_counter() + uss_interval
            for p in _tree(root):
                try:
                    r = p.memory_info().rss
                    rss, one = rss + r, max(one, r)
                    if with_uss:
                        uss += p.memory_full_info().uss
                except psutil.AccessDenied:
                    uss_ok = False
                except psutil.Error:   # a process that just ended
                    pass
            peak_rss, peak_uss, peak_one = max(peak_rss, rss), max(peak_uss, uss), max(peak_one, one)
            time.sleep(interval)
    stdout, stderr = proc.communicate()
    wall = time.perf_counter() - t0
    if proc.returncode != 0:
        raise RuntimeError(f"{' '.join(cmd)} failed ({proc.returncode}):\n{stderr[-3000:]}")
    summary = json.loads(stdout.strip().splitlines()[-1])
    tokens = sum(summary["tokens"].values())
    row = {"num_proc": num_proc, "tokens": tokens, "documents": sum(summary["documents"].values()),
           "seconds": summary["seconds"], "wall_seconds": round(wall, 3),
           "tokens_per_s": tokens / summary["seconds"], "wall_tokens_per_s": tokens / wall}
    if psutil is not None:
        row.update(peak_rss_tree_mb=peak_rss / 2 ** 20, peak_rss_max_process_mb=peak_one / 2 ** 20,
                   peak_uss_tree_mb=peak_uss / 2 ** 20 if uss_ok else None, rss_source="psutil")
    else:
        import resource

        maxrss = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss   # KiB on Linux, bytes on macOS
        scale = 1 if sys.platform == "darwin" else 1024
        row.update(peak_rss_tree_mb=None, peak_rss_max_process_mb=maxrss * scale / 2 ** 20,
                   peak_uss_tree_mb=None, rss_source="getrusage(RUSAGE_CHILDREN), largest child so far")
    row["owt_hours"] = OWT_TOKENS / row["tokens_per_s"] / 3600
    return row


def _fmt(x, spec):
    return "-" if x is None else format(x, spec)


def main(argv=None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--size_mb", type=float, default=200.0, help="size of the synthetic corpus in MB")
    ap.add_argument("--sizes", default=None, help="several sizes in MB, e.g. 50,200 (overrides --size_mb)")
    ap.add_argument("--num_procs", default="1,2", help="--num_proc values to run, e.g. 1,2,8")
    ap.add_argument("--batch_size", type=int, default=1024, help="documents per batch (--batch_size)")
    ap.add_argument("--interval", type=float, default=0.1, help="seconds between RSS samples")
    ap.add_argument("--uss_interval", type=float, default=2.0,
                    help="seconds between USS samples (reading smaps costs CPU)")
    ap.add_argument("--seed", type=int, default=0, help="seed of the synthetic corpus")
    ap.add_argument("--workdir", default=None, help="folder for the corpus and outputs (default: a "
                    "temporary folder, removed at the end)")
    ap.add_argument("--keep", action="store_true", help="keep the corpora and outputs")
    ap.add_argument("--json", default=None, help="write the results there as JSON")
    a = ap.parse_args(argv)
    sizes = [float(s) for s in a.sizes.split(",")] if a.sizes else [a.size_mb]
    procs = [int(n) for n in a.num_procs.split(",")]
    if any(s <= 0 for s in sizes) or any(n < 1 for n in procs):
        ap.error(f"sizes {sizes} must be > 0 MB and num_procs {procs} >= 1")
    work = Path(a.workdir) if a.workdir else Path(tempfile.mkdtemp(prefix="prepare_bench."))
    work.mkdir(parents=True, exist_ok=True)
    rows, corpora = [], []
    try:
        for size in sizes:
            corpus = work / f"synthetic_{size:g}MB_seed{a.seed}.jsonl"
            t0 = time.perf_counter()
            stats = make_corpus(corpus, size, a.seed)
            stats["generate_seconds"] = round(time.perf_counter() - t0, 2)
            corpora.append(stats)
            for n in procs:
                row = run_prepare(corpus, work / f"out_{size:g}MB_{n}proc", n, a.batch_size, a.interval,
                                  a.uss_interval)
                row["size_mb"] = size
                rows.append(row)
                print(f"  {size:g} MB, num_proc={n}: {row['tokens_per_s']:,.0f} tokens/s", file=sys.stderr)
    finally:
        if not a.keep and not a.workdir:
            shutil.rmtree(work, ignore_errors=True)
    result = {
        "benchmark": "prepare_data", "owt_tokens": OWT_TOKENS, "batch_size": a.batch_size, "corpora": corpora,
        "runs": rows,
        "machine": {"platform": platform.platform(), "python": platform.python_version(),
                    "cpu_count": os.cpu_count(), "loadavg": os.getloadavg() if hasattr(os, "getloadavg") else None,
                    "TOKENIZERS_PARALLELISM": os.environ.get("TOKENIZERS_PARALLELISM")},
    }
    head = (f"{'size MB':>8} {'procs':>5} {'tokens':>12} {'prep s':>8} {'tokens/s':>11} {'wall tok/s':>11} "
            f"{'RSS tree MB':>11} {'USS tree MB':>11} {'max proc MB':>11} {'OWT h':>7}")
    print(head)
    for r in rows:
        print(f"{r['size_mb']:>8g} {r['num_proc']:>5} {r['tokens']:>12,} {r['seconds']:>8.2f} "
              f"{r['tokens_per_s']:>11,.0f} {r['wall_tokens_per_s']:>11,.0f} "
              f"{_fmt(r['peak_rss_tree_mb'], '>11.0f')} {_fmt(r['peak_uss_tree_mb'], '>11.0f')} "
              f"{_fmt(r['peak_rss_max_process_mb'], '>11.0f')} {r['owt_hours']:>7.2f}")
    if a.json:
        Path(a.json).parent.mkdir(parents=True, exist_ok=True)
        Path(a.json).write_text(json.dumps(result, indent=2))
    return result


if __name__ == "__main__":
    main()
